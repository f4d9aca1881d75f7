"""Per-slot cost of the ``dist`` transport (one TCP-connected process per server, loopback) against
``inproc``, and what one paused server does to the others.

1. **Overhead**: the same training run (paper network, same seed, so the same decisions) through
   both transports at 20, 200 and 1,600 samples per slot. The two trainers advance in interleaved
   blocks of slots, so machine load hits both alike; the figure is median dist slot time / median
   inproc slot time (target <= 1.3 at 200 and above). The run checks both made identical decisions.
2. **One of eight paused**: two ``dist`` runs, interleaved the same way; in one, a busy server is
   SIGSTOPped for the rest of the run. Healthy slots (no deadline miss in them) are compared with the
   fault-free run: median ratio (target <= 1.2); the slots that waited out the deadline are counted.

All processes use one torch thread. Writes ``benchmarks/results/transport.json``.

    python benchmarks/transport.py [--slots 16] [--rates 20,200,1600] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
from pathlib import Path

import numpy as np
import torch

from edgemoe.train.config import train_config_from_dict
from edgemoe.train.data import load_dataset
from edgemoe.train.trainer import Trainer

RESULTS = Path(__file__).resolve().parent / "results"
BLOCK = 2  # slots per turn when interleaving


def config(kind: str, slots: int, rate: float, **transport):
    return train_config_from_dict(
        {
            "slots": slots,
            "eval_every": 10**9,
            "policy": "stable-moe",
            "scenario": "paper",
            "network": {"arrivals": {"rate": rate}},
            "transport": {"kind": kind, **transport},
            "record_scores": False,
        }
    )


def interleave(trainers: list[Trainer], slots: int) -> None:
    """Advance every trainer BLOCK slots at a time, in turn, until each has run ``slots``."""
    for end in range(BLOCK, slots + BLOCK, BLOCK):
        for tr in trainers:
            tr.run(min(end, slots))


def slot_times(tr: Trainer) -> list[float]:
    return [r["wall_s"] for r in tr.history[1:]]  # slot 0 includes first-call warm-up


def overhead(rate: float, slots: int, data) -> dict:
    inproc = Trainer(config("inproc", slots, rate), dataset=data, keep_decisions=True)
    dist = Trainer(config("dist", slots, rate), dataset=data, keep_decisions=True)
    try:
        interleave([inproc, dist], slots)
    finally:
        dist.close()
    same = all(
        np.array_equal(a.expert_ids_NK, b.expert_ids_NK) and np.array_equal(a.served_E, b.served_E)
        for a, b in zip(inproc.decisions, dist.decisions)
    )
    med_in, med_dist = statistics.median(slot_times(inproc)), statistics.median(slot_times(dist))
    return {
        "samples_per_slot": rate,
        "inproc_slot_ms_median": 1e3 * med_in,
        "dist_slot_ms_median": 1e3 * med_dist,
        "dist_over_inproc": med_dist / med_in,
        "identical_decisions": same,
    }


def paused(rate: float, slots: int, data, deadline: float) -> dict:
    kw = {"deadline": deadline, "max_misses": 1}
    clean = Trainer(config("dist", slots, rate, **kw), dataset=data)
    faulty = Trainer(config("dist", slots, rate, **kw), dataset=data)
    victim = None
    try:
        interleave([clean, faulty], 4)
        busiest = np.argmax(faulty.history[-1]["served_E"])
        victim = faulty.transport.pid(int(busiest))
        os.kill(victim, signal.SIGSTOP)
        start = faulty.slot
        interleave([clean, faulty], slots)
    finally:
        if victim is not None:
            os.kill(victim, signal.SIGCONT)
        clean.close()
        faulty.close()
    after = faulty.history[start:]
    waited = [r["wall_s"] for r in after if r["wall_s"] >= deadline]
    healthy = [r["wall_s"] for r in after if r["wall_s"] < deadline]
    reference = [r["wall_s"] for r in clean.history[start:]]
    return {
        "samples_per_slot": rate,
        "servers": faulty.num_servers,
        "paused_server": int(busiest),
        "deadline_s": deadline,
        "slots_after_pause": len(after),
        "slots_that_waited_out_the_deadline": len(waited),
        "healthy_slot_ms_median": 1e3 * statistics.median(healthy),
        "fault_free_slot_ms_median": 1e3 * statistics.median(reference),
        "healthy_over_fault_free": statistics.median(healthy) / statistics.median(reference),
        "paused_server_offline": not faulty.state.online_E[busiest],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--rates", default="20,200,1600", help="samples arriving per slot (comma-separated)")
    parser.add_argument("--pause-rate", type=float, default=200.0)
    parser.add_argument("--deadline", type=float, default=1.0)
    parser.add_argument("--quick", action="store_true", help="a short run (CI smoke)")
    args = parser.parse_args()
    if args.quick:
        args.slots, args.rates = 6, "20"
    torch.set_num_threads(1)
    data = load_dataset("digits")
    loads = [overhead(float(r), args.slots, data) for r in args.rates.split(",")]
    pause = paused(args.pause_rate, args.slots, data, args.deadline)
    result = {
        "benchmark": "transport",
        "network": "paper (8 servers)",
        "slots": args.slots,
        "loads": loads,
        "one_of_eight_paused": pause,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "note": "2 shared CPU cores; other jobs ran at the same time; ratios from interleaved runs",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "transport.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if all(load["identical_decisions"] for load in loads) else 1


if __name__ == "__main__":
    raise SystemExit(main())
