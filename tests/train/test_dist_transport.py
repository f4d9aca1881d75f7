"""The ``dist`` transport (gloo on loopback, one process per server) against ``inproc``: same seed,
same decisions and token counts; killed workers lose no sample and training continues."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import torch

from edgemoe.train.config import train_config_from_dict
from edgemoe.train.data import load_dataset
from edgemoe.train.trainer import Trainer

SERVERS = [
    {"f_max": 1e9, "cycles_per_token": 1e8, "kappa": 1e-28, "energy_budget": 0.5},
    {"f_max": 2e9, "cycles_per_token": 1e8, "kappa": 1e-28, "energy_budget": 0.5, "count": 2},
]


def _cfg(kind: str):
    return train_config_from_dict(
        {
            "slots": 8,
            "eval_every": 4,
            "k": 1,
            "policy": "stable-moe",
            "network": {"servers": SERVERS, "arrivals": {"rate": 16.0}},
            "model": {"dim": 16, "expert_hidden": 16, "channels": 4},
            "faults": [{"server": 1, "slot": 3, "kind": "kill"}],
            "transport": {"kind": kind, "timeout_s": 60},
        }
    )


@pytest.mark.slow
def test_dist_equals_inproc_and_survives_killed_workers():
    data = load_dataset("digits", train_subset=200, test_subset=60)
    ref = Trainer(_cfg("inproc"), dataset=data, keep_decisions=True)
    ref.run(5)
    tr = Trainer(_cfg("dist"), dataset=data, keep_decisions=True)
    try:
        tr.run(5)  # server 1's process is SIGKILLed at slot 3 by the fault schedule
        for a, b in zip(ref.decisions, tr.decisions):
            assert np.array_equal(a.expert_ids_NK, b.expert_ids_NK)
            assert np.array_equal(a.freq_J, b.freq_J) and np.array_equal(a.served_J, b.served_J)
            assert np.array_equal(a.trained_ids, b.trained_ids)
        assert ref.summary() == tr.summary()
        for p, q in zip(ref.model.parameters(), tr.model.parameters()):
            assert torch.equal(p, q)
        # now kill server 2's process behind the trainer's back: detected, re-routed, nothing lost
        os.kill(tr.transport.pids[2], signal.SIGKILL)
        tr.transport.procs[2].wait(timeout=10)
        trained_before = tr.counters["trained"]
        tr.run()
        assert tr.state.online_J.tolist() == [True, False, False]
        assert tr.counters["trained"] > trained_before
        trained = np.concatenate([d.trained_ids for d in tr.decisions])
        assert len(np.unique(trained)) == len(trained) == tr.counters["trained"]
        assert tr.counters["trained"] + len(tr.table) == tr.counters["arrived"]
        assert all(not (d.expert_ids_NK == 2).any() for d in tr.decisions[6:])
        assert 0.0 <= tr.evals[-1]["test_accuracy"] <= 1.0
    finally:
        tr.close()
    assert all(p.poll() is not None for p in tr.transport.procs)
