"""Two "nodes" on loopback: the router with servers 0-1 (this process), and ``edgemoe worker`` with
servers 2-3 (a second launcher process). A worker killed on the second node is restarted there,
reconnects and rejoins; the run goes on and the summary lists both events."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest

from edgemoe.train.config import train_config_from_dict
from edgemoe.train.trainer import Trainer


@pytest.mark.slow
def test_two_nodes_a_worker_killed_on_the_second_rejoins(data, exact_accounting, run_until):
    """Node 1 runs the router and servers 0-1; node 2 (``edgemoe worker``) runs servers 2-3."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    servers = [{"f_max": 2e9, "cycles_per_token": 1e8, "kappa": 1e-28, "energy_budget": 0.5, "count": 4}]
    cfg = train_config_from_dict(
        {
            "slots": 10_000,
            "eval_every": 10_000,
            "k": 2,
            "policy": "stable-moe",
            "network": {"servers": servers, "arrivals": {"rate": 16.0}},
            "model": {"dim": 16, "expert_hidden": 16, "channels": 4},
            "transport": {
                "kind": "dist",
                "port": port,
                "local_servers": [0, 1],
                "timeout_s": 60,
                "rejoin_after": 1,
            },
        }
    )
    node2 = subprocess.Popen(
        [sys.executable, "-m", "edgemoe", "worker", "--connect", f"127.0.0.1:{port}", "--servers", "2-3"],
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    try:
        tr = Trainer(cfg, dataset=data, keep_decisions=True)
        try:
            tr.run(3)
            os.kill(tr.transport.pid(3), signal.SIGKILL)  # a process on node 2
            run_until(tr, lambda: any(e["event"] == "rejoined" for e in tr.events))
            tr.run(tr.slot + 3)
            summary = tr.summary()
            events = [(e["server"], e["event"]) for e in summary["fault_events"]]
            assert events == [(3, "unreachable"), (3, "rejoined")]
            assert summary["offline_at_end"] == []
            exact_accounting(tr)
        finally:
            tr.close()
        assert node2.wait(timeout=20) == 0  # the router stopped every server: node 2 is done
    finally:
        if node2.poll() is None:
            node2.kill()
            node2.wait()
