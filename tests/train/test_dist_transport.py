"""The ``dist`` transport (one TCP-connected process per server, loopback) against ``inproc``: same
seed, same decisions and token counts; a paused server never slows the others and rejoins; a killed
server is restarted with its expert state; token accounting stays exact throughout."""

from __future__ import annotations

import os
import signal
import statistics

import numpy as np
import pytest
import torch

from edgemoe.train.config import train_config_from_dict
from edgemoe.train.trainer import Trainer

SERVERS = [
    {"f_max": 1e9, "cycles_per_token": 1e8, "kappa": 1e-28, "energy_budget": 0.5},
    {"f_max": 2e9, "cycles_per_token": 1e8, "kappa": 1e-28, "energy_budget": 0.5, "count": 2},
]


def _cfg(kind: str, slots: int = 8, faults=None, **transport):
    return train_config_from_dict(
        {
            "slots": slots,
            "eval_every": 4,
            "k": 1,
            "policy": "stable-moe",
            "network": {"servers": SERVERS, "arrivals": {"rate": 16.0}},
            "model": {"dim": 16, "expert_hidden": 16, "channels": 4},
            "faults": faults if faults is not None else [{"server": 1, "slot": 3, "kind": "kill"}],
            "transport": {"kind": kind, "timeout_s": 60, **transport},
        }
    )


@pytest.mark.slow
def test_dist_equals_inproc_and_restarts_killed_workers(data, exact_accounting, run_until):
    ref = Trainer(_cfg("inproc"), dataset=data, keep_decisions=True)
    ref.run(5)
    tr = Trainer(_cfg("dist", slots=10_000), dataset=data, keep_decisions=True)
    try:
        tr.run(5)  # server 1's process is SIGKILLed at slot 3 by the fault schedule (never back)
        for a, b in zip(ref.decisions, tr.decisions):
            assert np.array_equal(a.expert_ids_NK, b.expert_ids_NK)
            assert np.array_equal(a.freq_E, b.freq_E) and np.array_equal(a.served_E, b.served_E)
            assert np.array_equal(a.trained_ids, b.trained_ids)
        assert ref.summary() == {**tr.summary(), "slots": 5}
        for p, q in zip(ref.model.parameters(), tr.model.parameters()):
            assert torch.equal(p, q)
        # kill server 0 (the busiest) behind the trainer's back: reported, re-routed, restarted from the
        # router's latest copy of its expert and optimizer
        tr.run(8)
        snapshot = tr.transport.state_dict()[0]
        steps_before = max(int(s["step"]) for s in snapshot["optimizer"]["state"].values())
        assert steps_before > 0
        os.kill(tr.transport.pid(0), signal.SIGKILL)
        tr.run(9)
        assert not tr.state.online_E[0]
        assert [e["event"] for e in tr.events if e["server"] == 0] == ["unreachable"]
        run_until(tr, lambda: tr.state.online_E[0])  # a restart imports torch: seconds on a busy machine
        assert tr.state.online_E[0] and tr.events[-1] == {**tr.events[-1], "server": 0, "event": "rejoined"}
        restored = tr.transport.state_dict()[0]
        assert max(int(s["step"]) for s in restored["optimizer"]["state"].values()) >= steps_before
        tr.run(tr.slot + 2)
        assert (tr.decisions[-1].expert_ids_NK == 0).any()
        assert tr.state.online_E.tolist() == [True, False, True]  # the scheduled kill is permanent
        exact_accounting(tr)
        summary = tr.summary()
        assert {"slot", "server", "event"} <= set(summary["fault_events"][0])
        assert summary["offline_at_end"] == [1]
        assert {"server": 0, "event": "unreachable"}.items() <= summary["fault_events"][0].items()
    finally:
        tr.close()
    assert all(s.proc is None or s.proc.poll() is not None for s in tr.transport.launcher.slots.values())


def test_paused_server_goes_offline_without_slowing_others_and_rejoins(data, exact_accounting, run_until):
    cfg = _cfg("dist", slots=10_000, faults=[], deadline=0.4, max_misses=1, rejoin_after=1)
    tr = Trainer(cfg, dataset=data, keep_decisions=True)
    try:
        tr.run(3)
        pid = tr.transport.pid(0)
        os.kill(pid, signal.SIGSTOP)
        try:
            paused_at = tr.slot
            tr.run(paused_at + 6)
            assert not tr.state.online_E[0]
            assert tr.events[0]["event"].startswith("late")
            healthy = [r["wall_s"] for r in tr.history[paused_at + 1 :]]
            assert statistics.median(healthy) < 0.3  # the router no longer waits for server 0
        finally:
            os.kill(pid, signal.SIGCONT)
        run_until(tr, lambda: tr.state.online_E[0])
        assert tr.state.online_E[0] and tr.events[-1]["event"] == "rejoined"
        tr.run(tr.slot + 3)
        exact_accounting(tr)
    finally:
        tr.close()


def test_late_reply_is_used_when_server_stays_online(data, exact_accounting):
    """With max_misses=2 one late slot keeps the server online: its tokens complete a slot later."""
    faults = [{"server": 0, "slot": 2, "kind": "slow", "stall_s": 0.5}]
    tr = Trainer(_cfg("inproc", slots=6, faults=faults, deadline=0.2), dataset=data, keep_decisions=True)
    tr.run(3)
    assert tr.decisions[2].served_E[0] == 0  # nothing back from server 0 in the slot it was late
    tr.run()
    ref = Trainer(_cfg("inproc", slots=6, faults=[]), dataset=data, keep_decisions=True)
    ref.run(3)
    # its late reply is delivered in the next slot, with that slot's own service
    assert tr.decisions[3].served_E[0] >= ref.decisions[2].served_E[0] > 0
    assert tr.state.online_E.all() and tr.counters["late_replies"] == 1 and not tr.events
    exact_accounting(tr)
