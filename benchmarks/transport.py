"""Per-slot overhead of the ``dist`` transport (gloo over loopback, one process per server) against
``inproc``: the same training run (same seed, same decisions, same token counts) timed slot by slot.

Both runs use one torch thread per process. The ratio is median dist slot time / median inproc slot
time, measured in the same invocation, at a light load (communication-dominated: the pure overhead)
and a heavier one (where dist's servers also compute in parallel processes); the run also checks
that both transports made identical routing decisions. Writes ``benchmarks/results/transport.json``.

    python benchmarks/transport.py [--servers 4] [--slots 40] [--rates 20,200] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from edgemoe.train.config import train_config_from_dict
from edgemoe.train.data import load_dataset
from edgemoe.train.trainer import Trainer

RESULTS = Path(__file__).resolve().parent / "results"


def config(kind: str, servers: int, slots: int, rate: float):
    per_server = [
        {"f_max": f * 1e9, "cycles_per_token": 1e7, "kappa": 1e-28, "energy_budget": 0.5}
        for f in np.linspace(1.0, 3.0, servers)
    ]
    return train_config_from_dict(
        {
            "slots": slots,
            "eval_every": slots,
            "policy": "stable-moe",
            "network": {"servers": per_server, "arrivals": {"rate": rate}},
            "transport": {"kind": kind},
            "record_scores": False,
        }
    )


def timed_run(kind: str, args: argparse.Namespace, rate: float, data) -> tuple[Trainer, list[float], float]:
    start = time.perf_counter()
    trainer = Trainer(config(kind, args.servers, args.slots, rate), dataset=data, keep_decisions=True)
    startup = time.perf_counter() - start
    trainer.run()
    trainer.close()
    # the last slot also evaluates; keep the training slots only
    return trainer, [r["wall_s"] for r in trainer.history[1:-1]], startup


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--servers", type=int, default=4)
    parser.add_argument("--slots", type=int, default=40)
    parser.add_argument("--rates", default="20,200", help="samples arriving per slot (comma-separated)")
    parser.add_argument("--quick", action="store_true", help="a short run (CI smoke)")
    args = parser.parse_args()
    if args.quick:
        args.slots = 12
    torch.set_num_threads(1)
    data = load_dataset("digits")
    loads = []
    for rate in [float(r) for r in args.rates.split(",")]:
        inproc, t_in, s_in = timed_run("inproc", args, rate, data)
        dist, t_dist, s_dist = timed_run("dist", args, rate, data)
        same = all(
            np.array_equal(a.expert_ids_NK, b.expert_ids_NK) and np.array_equal(a.served_J, b.served_J)
            for a, b in zip(inproc.decisions, dist.decisions)
        )
        med_in, med_dist = statistics.median(t_in), statistics.median(t_dist)
        loads.append(
            {
                "samples_per_slot": rate,
                "inproc_slot_ms_median": 1e3 * med_in,
                "dist_slot_ms_median": 1e3 * med_dist,
                "dist_over_inproc": med_dist / med_in,
                "dist_overhead_ms_per_slot": 1e3 * (med_dist - med_in),
                "inproc_startup_s": s_in,
                "dist_startup_s": s_dist,
                "identical_decisions": same,
                "identical_summary": inproc.summary() == dist.summary(),
            }
        )
    same = all(load["identical_decisions"] for load in loads)
    result = {
        "benchmark": "transport",
        "servers": args.servers,
        "slots": args.slots,
        "loads": loads,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "note": "2 shared CPU cores; other jobs may have run at the same time",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "transport.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
