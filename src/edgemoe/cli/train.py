"""``edgemoe train``: Stable-MoE training of an image MoE classifier over simulated edge servers.

    edgemoe train --dataset digits --policy stable-moe --slots 200
    edgemoe train --dataset fashion-mnist --scale 0.25 --policy topk --out runs/fm-topk
    edgemoe train --transport dist --workers 8          # one local process per edge server (TCP)
    edgemoe train --transport dist --listen 0.0.0.0:29500 --local-servers 0-3 --out runs/x
    edgemoe worker --connect ROUTER:29500 --servers 4-7  # on a second machine
    edgemoe train --config run.yaml --set controller.V=50 --resume auto --out runs/x

Writes ``summary.json``, ``slots.csv``, ``evals.csv``, ``scores.npz`` (gate scores for
``edgemoe simulate`` replay) and PNG plots to the run folder, which must be new or empty unless
``--resume`` continues a run in it. ``checkpoint.pt`` is written only with ``--checkpoint-every N``
(every N slots) or when a run is stopped: Ctrl-C or SIGTERM stops after the current slot, writes
``checkpoint.pt``, ``summary.json`` and ``slots.csv``, and exits 130 / 143.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgemoe.cli.common import add_config_args, load_config_dict, write_json
from edgemoe.config import to_dict
from edgemoe.files import write_csv

if TYPE_CHECKING:  # the CLI builds its parser without importing torch
    from edgemoe.train.config import TrainConfig
    from edgemoe.train.trainer import SlotRow


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
    p.add_argument("--checkpoint-every", type=int, help="write <out>/checkpoint.pt every N slots")
    add_network_args(p)
    p.add_argument("--time-scale", type=float, help="dist: wall seconds per simulated second of service")
    p.add_argument(
        "--deadline", type=float, help="wall seconds a server may take per slot before it is offline"
    )
    p.add_argument("--max-misses", type=int, help="late slots in a row before a server goes offline")
    p.add_argument("--listen", help="dist: HOST:PORT the router listens on (default 127.0.0.1:<free>)")
    p.add_argument(
        "--local-servers", help="dist: servers this machine starts, e.g. 0-3 (default all; 'none' = none)"
    )
    p.add_argument(
        "--resume", help="checkpoint to continue from, or 'auto': <out>/checkpoint.pt if present, else start"
    )
    p.add_argument(
        "--out", type=Path, help="run folder, new or empty unless --resume (default runs/train-<time>)"
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads in the router process")
    p.add_argument("--no-plots", action="store_true")
    p.set_defaults(func=run)


def add_network_args(p: argparse.ArgumentParser) -> None:
    """``--scenario``, ``--transport`` and ``--workers``."""
    p.add_argument("--scenario", help="edge network scenario (paper, homogeneous, bursty, large)")
    p.add_argument("--transport", help="inproc (default) or dist")
    p.add_argument("--workers", type=int, help="dist: number of server processes (= number of servers)")


def build_config(args: argparse.Namespace) -> TrainConfig:
    """Config file, then ``--set`` overrides, then the explicit flags."""
    from edgemoe.train.config import config_with_flags
    from edgemoe.train.worker import parse_address, parse_servers

    flags = dict(vars(args))
    if getattr(args, "listen", None):
        flags["host"], flags["port"] = parse_address(args.listen, "--listen")
    if getattr(args, "local_servers", None):
        text = args.local_servers
        flags["local_servers"] = [] if text == "none" else parse_servers(text, "--local-servers")
    return config_with_flags(load_config_dict(args), flags)


def write_run(out: Path, trainer: Any, *, plots: bool = True) -> dict[str, Any]:
    """Write the run folder (summary, traces, scores, plots); returns the summary."""
    from edgemoe.report.train import plot_comparison, plot_servers
    from edgemoe.train.trainer import flat_row

    summary = trainer.summary()
    write_json(out / "summary.json", {**summary, "config": to_dict(trainer.cfg)})
    write_csv(out / "slots.csv", [flat_row(r) for r in trainer.history])
    write_csv(out / "evals.csv", trainer.evals)
    if trainer.cfg.record_scores:
        trainer.save_scores(out / "scores.npz")
    if plots and trainer.history:
        name = trainer.cfg.policy
        plot_comparison({name: (trainer.history, trainer.evals)}, out / "curves.png", title=name)
        plot_servers(trainer.history, trainer.num_servers, out / "servers.png", title=name)
    return summary


def run(args: argparse.Namespace) -> int:
    import torch

    from edgemoe.config import require
    from edgemoe.runs import check_out_dir
    from edgemoe.train.dist import torchrun_address, under_torchrun
    from edgemoe.train.lifecycle import default_out, resolve_resume, restarted
    from edgemoe.train.worker import run_launcher

    torch.set_num_threads(args.threads)
    cfg = build_config(args)
    if cfg.transport.kind == "dist" and under_torchrun():
        world, servers = int(os.environ["WORLD_SIZE"]), cfg.network_spec().num_servers
        require(
            world == servers + 1,
            "torchrun --nproc-per-node",
            f"start J+1 = {servers + 1} processes in all (rank 0 the router, ranks 1..J the servers), "
            f"got WORLD_SIZE={world}",
        )
        rank = int(os.environ["RANK"])
        if rank != 0:  # keeps server rank-1 alive (restarting it): one death never ends the job
            return run_launcher(torchrun_address(cfg.transport), [rank - 1], cfg.transport.timeout_s)
    resuming = args.resume is not None or restarted()  # only a resumed run may reuse a used --out
    out = check_out_dir(args.out or default_out("runs", "train"), resuming=resuming)
    state = None
    resume = resolve_resume(args.resume, out)
    if resume is not None:  # checked before any worker starts
        from edgemoe.train.checkpoint import check_resumable, load_checkpoint
        from edgemoe.train.trainer import RESUMABLE_CHANGES

        state = load_checkpoint(resume)
        check_resumable(to_dict(cfg), state, RESUMABLE_CHANGES)
    return _train(args, cfg, out, state)


def _train(args: argparse.Namespace, cfg: TrainConfig, out: Path, state: dict[str, Any] | None) -> int:
    from tqdm import tqdm

    from edgemoe.report.train import format_table
    from edgemoe.runs import RunFolder
    from edgemoe.train.checkpoint import clean_stale_temps
    from edgemoe.train.config import check_subsets
    from edgemoe.train.dist import StartupInterrupted
    from edgemoe.train.lifecycle import StopSignals
    from edgemoe.train.trainer import Trainer, make_transport

    data = cfg.data.build(cfg.seed)  # data problems surface before any server process starts
    for warning in check_subsets(cfg.data, data):
        print(f"edgemoe train: warning: {warning}", file=sys.stderr)
    with StopSignals() as stop, RunFolder(out) as folder:
        try:
            transport = make_transport(
                cfg,
                cfg.network_spec().num_servers,
                lambda j, text: tqdm.write(f"server {j}: {text}", file=sys.stderr),
                stop.requested,
            )
        except StartupInterrupted as exc:
            print(f"edgemoe train: {exc}; nothing written", file=sys.stderr)
            return 128 + stop.signum
        try:
            trainer = Trainer(cfg, dataset=data, transport=transport, checkpoint_path=out / "checkpoint.pt")
        except BaseException:
            transport.close()
            raise
        trainer.on_event = lambda text: tqdm.write(text, file=sys.stderr)
        try:
            if state is not None:
                trainer.load_state_dict(state)
            folder.create()
            clean_stale_temps(out)
            bar = tqdm(total=cfg.slots, initial=trainer.slot, desc=f"train {cfg.policy}", unit="slot")

            def on_slot(row: SlotRow) -> None:
                bar.update(1)
                acc = trainer.evals[-1]["test_accuracy"] if trainer.evals else float("nan")
                bar.set_postfix(
                    tp=f"{row['throughput']:.0f}", backlog=f"{row['backlog']:.0f}", acc=f"{acc:.3f}"
                )

            finished = trainer.run(on_slot=on_slot, should_stop=stop.requested)
            bar.close()
            if cfg.checkpoint_every or not finished:
                trainer.save(out / "checkpoint.pt")
            summary = write_run(out, trainer, plots=finished and not args.no_plots)
        finally:
            trainer.close()
    if not finished:
        print(
            f"edgemoe train: stopped by {stop.name} after slot {trainer.slot} of {cfg.slots}; wrote "
            f"checkpoint.pt, summary.json and slots.csv to {out} (continue with --resume auto --out {out})",
            file=sys.stderr,
        )
        return 128 + stop.signum
    print(format_table({cfg.policy: summary}))
    if summary["fault_events"]:
        events = "; ".join(
            f"slot {e['slot']}: server {e['server']} {e['event']}" for e in summary["fault_events"]
        )
        print(f"server faults: {events}")
    if summary["offline_at_end"]:
        print(f"offline at the end: servers {summary['offline_at_end']}")
    print(f"trained {summary['trained']} of {summary['arrived']} samples; run folder: {out}")
    return 0
