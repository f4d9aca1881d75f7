"""``edgemoe train``: Stable-MoE training of an image MoE classifier over simulated edge servers.

    edgemoe train --dataset digits --policy stable-moe --slots 200
    edgemoe train --dataset fashion-mnist --scale 0.25 --policy topk --out runs/fm-topk
    edgemoe train --transport dist --workers 8          # one local process per edge server (gloo)
    torchrun --nproc-per-node 9 -m edgemoe train --transport dist   # rank 0 router, ranks 1..8 servers
    edgemoe train --config run.yaml --set controller.V=50 --resume runs/x/checkpoint.pt

Writes ``summary.json``, ``slots.csv``, ``evals.csv``, ``scores.npz`` (gate scores for
``edgemoe simulate`` replay), ``checkpoint.pt`` and PNG plots to the run folder.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgemoe.cli.common import add_config_args, load_config_dict, run_dir, write_json
from edgemoe.config import to_dict

if TYPE_CHECKING:  # the CLI builds its parser without importing torch
    from edgemoe.train.config import TrainConfig

# flag -> dotted config field
FLAGS = {
    "dataset": "data.name",
    "data_dir": "data.data_dir",
    "train_subset": "data.train_subset",
    "test_subset": "data.test_subset",
    "policy": "policy",
    "scenario": "scenario",
    "scale": "scale",
    "slots": "slots",
    "seed": "seed",
    "k": "k",
    "buffer": "buffer",
    "router": "model.router",
    "backbone": "model.backbone",
    "eval_every": "eval_every",
    "checkpoint_every": "checkpoint_every",
    "transport": "transport.kind",
    "workers": "transport.workers",
    "time_scale": "transport.time_scale",
    "deadline": "transport.deadline",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train an MoE classifier with Stable-MoE over edge servers",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(p)
    p.add_argument("--dataset", help="digits (default), fashion-mnist, cifar10, cifar100, svhn")
    p.add_argument("--data-dir", help="folder (or zip) holding the dataset's official files")
    p.add_argument("--train-subset", type=int, help="class-balanced training subset size")
    p.add_argument("--test-subset", type=int, help="class-balanced test subset size")
    p.add_argument("--policy", help="controller: stable-moe, topk, jsq-k, random-k, topk-capacity, ...")
    p.add_argument("--scale", type=float, help="scale arrivals and capacities (e.g. 0.25 for small CPUs)")
    p.add_argument("--slots", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--k", type=int, help="experts per token")
    p.add_argument("--buffer", type=int, help="finite queue buffer per server (overflow dropped)")
    p.add_argument("--router", help="gate: any router of edgemoe.moe (topk, expert_choice, etr, ...)")
    p.add_argument("--backbone", help="cnn or vit")
    p.add_argument("--eval-every", type=int)
    p.add_argument("--checkpoint-every", type=int)
    add_network_args(p)
    p.add_argument("--time-scale", type=float, help="dist: wall seconds per simulated second of service")
    p.add_argument(
        "--deadline", type=float, help="wall seconds a server may take per slot before it is offline"
    )
    p.add_argument("--resume", type=Path, help="checkpoint to continue from")
    p.add_argument("--out", type=Path, help="run folder (default runs/train-<time>)")
    p.add_argument("--threads", type=int, default=1, help="torch threads in the router process")
    p.add_argument("--no-plots", action="store_true")
    p.set_defaults(func=run)


def add_network_args(p: argparse.ArgumentParser) -> None:
    """``--scenario``, ``--transport`` and ``--workers`` (shared by ``train`` and ``profile``)."""
    p.add_argument("--scenario", help="edge network scenario (paper, homogeneous, bursty, large)")
    p.add_argument("--transport", help="inproc (default) or dist")
    p.add_argument("--workers", type=int, help="dist: number of server processes (= number of servers)")


def build_config(args: argparse.Namespace) -> TrainConfig:
    """Config file, then ``--set`` overrides, then the explicit flags."""
    from edgemoe.train.config import train_config_from_dict

    data: dict[str, Any] = load_config_dict(args)
    for flag, dotted in FLAGS.items():
        value = getattr(args, flag, None)
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node[key] = dict(node.get(key) or {})
            node = node[key]
        node[leaf] = value
    return train_config_from_dict(data)


def write_run(out: Path, trainer: Any, *, plots: bool = True) -> dict[str, Any]:
    """Write the run folder (summary, traces, scores, plots); returns the summary."""
    from edgemoe.report.train import plot_comparison, plot_servers, write_rows

    summary = trainer.summary()
    write_json(out / "summary.json", {**summary, "config": to_dict(trainer.cfg)})
    write_rows(out / "slots.csv", trainer.history)
    write_rows(out / "evals.csv", trainer.evals)
    if trainer.cfg.record_scores:
        trainer.save_scores(out / "scores.npz")
    if plots and trainer.history:
        name = trainer.cfg.policy
        plot_comparison({name: (trainer.history, trainer.evals)}, out / "curves.png", title=name)
        plot_servers(trainer.history, trainer.num_servers, out / "servers.png", title=name)
    return summary


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from edgemoe.train.dist import under_torchrun, worker_main

    torch.set_num_threads(max(1, args.threads))
    cfg = build_config(args)
    if cfg.transport.kind == "dist" and under_torchrun() and int(os.environ["RANK"]) != 0:
        worker_main(cfg.transport.backend, cfg.transport.timeout_s)
        return 0
    from edgemoe.train.trainer import Trainer

    out = run_dir(args.out, "runs", "train")
    trainer = Trainer(cfg, checkpoint_path=out / "checkpoint.pt")
    try:
        if args.resume:
            trainer.resume(args.resume)
        bar = tqdm(total=cfg.slots, initial=trainer.slot, desc=f"train {cfg.policy}", unit="slot")

        def on_slot(row: dict[str, float]) -> None:
            bar.update(1)
            acc = trainer.evals[-1]["test_accuracy"] if trainer.evals else float("nan")
            bar.set_postfix(tp=f"{row['throughput']:.0f}", backlog=f"{row['backlog']:.0f}", acc=f"{acc:.3f}")

        trainer.run(on_slot=on_slot)
        bar.close()
        if cfg.checkpoint_every:
            trainer.save(out / "checkpoint.pt")
        summary = write_run(out, trainer, plots=not args.no_plots)
    finally:
        trainer.close()
    from edgemoe.report.train import format_table

    print(format_table({cfg.policy: summary}))
    print(f"trained {summary['trained']} of {summary['arrived']} samples; run folder: {out}")
    return 0
