"""The slot-driven trainer on a tiny network: every controller, conservation of samples, faults,
finite buffers, recorded gate scores, resume, and clear errors for bad configurations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgemoe.config import ConfigError
from edgemoe.edge import Workload, load_score_trace, spec_from_dict
from edgemoe.edge.controllers import CONTROLLER_NAMES
from edgemoe.errors import DataError
from edgemoe.testing.train import TINY_SERVERS as SERVERS
from edgemoe.testing.train import tiny_train_config as tiny
from edgemoe.train.checkpoint import CheckpointError
from edgemoe.train.config import train_config_from_dict
from edgemoe.train.trainer import Trainer, flat_row


def conserved(tr: Trainer) -> None:
    """Every arrived sample is either trained exactly once or still in flight."""
    trained = np.concatenate([d.trained_ids for d in tr.decisions])
    assert len(np.unique(trained)) == len(trained) == tr.counters["trained"]
    assert tr.counters["trained"] + len(tr.table) == tr.counters["arrived"] == tr.next_id
    assert not np.intersect1d(trained, tr.table.ids_P).size


@pytest.mark.parametrize("policy", CONTROLLER_NAMES)
def test_every_controller_trains(policy, digits):
    tr = Trainer(train_config_from_dict(tiny(policy=policy, slots=4)), dataset=digits, keep_decisions=True)
    tr.run()
    conserved(tr)
    s = tr.summary()
    assert s["trained"] > 0 and 0.0 <= s["test_accuracy"] <= 1.0
    assert np.isfinite([r["loss"] for r in tr.history if r["completed"]]).all()
    # the real queues equal the controller's view of the backlog
    assert np.array_equal(tr.state.backlog_E, tr.table.backlog_E(4).astype(float))


@pytest.mark.parametrize(
    "model",
    [
        {"router": "etr", "dim": 16},
        {"router": "expert_choice", "router_capacity_factor": 1.0},
        {"backbone": "vit", "patch": 4, "vit_depth": 1},
        {"residual": False, "aux_coef": 0.01},
    ],
)
def test_any_registered_router_and_backbone(model, digits):
    cfg = tiny(slots=3, model={"dim": 16, "expert_hidden": 16, "channels": 4, **model})
    tr = Trainer(train_config_from_dict(cfg), dataset=digits)
    tr.run()
    assert tr.counters["trained"] > 0 and np.isfinite(tr.history[-1]["loss"])
    assert tr.model.router.cfg.name == cfg["model"].get("router", "topk")


def test_service_follows_frequency_and_fifo(digits):
    tr = Trainer(train_config_from_dict(tiny(policy="topk", slots=5)), dataset=digits, keep_decisions=True)
    tr.run()
    for d in tr.decisions:
        capacity = np.floor(d.freq_E * tr.spec.tau / tr.spec.cycles_E + 1.0)
        assert (d.served_E <= capacity).all()
    # queues are FIFO: every server's queue holds increasing token ids
    for server in tr.transport.servers:
        ids = server.queue_ids_Q.numpy()
        assert (np.diff(ids) > 0).all()


def test_training_learns_on_digits(digits):
    servers = [dict(s, cycles_per_token=2e7) for s in SERVERS]
    cfg = tiny(
        slots=30,
        eval_every=30,
        lr=0.01,
        expert_lr=0.01,
        network={"servers": servers, "arrivals": {"rate": 30.0}},
    )
    tr = Trainer(train_config_from_dict(cfg), dataset=digits)
    tr.run()
    assert tr.evals[-1]["test_accuracy"] > 0.5  # chance is 0.1


def test_offline_server_requeues_and_rejoins(digits):
    cfg = tiny(policy="topk", slots=8, faults=[{"server": 0, "slot": 3, "kind": "offline", "duration": 2}])
    tr = Trainer(train_config_from_dict(cfg), dataset=digits, keep_decisions=True)
    tr.run(4)
    assert not tr.state.online_E[0] and tr.table.backlog_E(4)[0] == 0
    assert tr.counters["rerouted"] > 0
    assert not (tr.decisions[3].expert_ids_NK == 0).any()
    tr.run()
    assert tr.state.online_E[0]
    conserved(tr)


def test_killed_server_loses_no_sample(digits):
    cfg = tiny(policy="stable-moe", slots=7, faults=[{"server": 2, "slot": 2, "kind": "kill"}])
    tr = Trainer(train_config_from_dict(cfg), dataset=digits, keep_decisions=True)
    tr.run()
    assert not tr.state.online_E[2]
    assert all(not (d.expert_ids_NK == 2).any() for d in tr.decisions[2:])
    conserved(tr)


def test_finite_buffer_counts_overflow(digits):
    tr = Trainer(train_config_from_dict(tiny(policy="topk", buffer=3)), dataset=digits, keep_decisions=True)
    tr.run()
    assert tr.counters["dropped_assignments"] > 0
    assert (tr.table.backlog_E(4) <= 3).all()
    conserved(tr)


def test_records_gate_scores_for_replay(digits, tmp_path):
    tr = Trainer(train_config_from_dict(tiny(slots=3)), dataset=digits)
    tr.run()
    tr.save_scores(tmp_path / "scores.npz")
    trace = load_score_trace(tmp_path / "scores.npz")
    assert trace.num_slots == 3 and trace.scores.shape == (tr.next_id, 4)
    np.testing.assert_allclose(trace.scores.sum(axis=1), 1.0, atol=1e-5)
    # the simulator replays the recording slot by slot
    spec = tr.spec.to_dict()
    spec["scores"] = {"kind": "replay", "trace": str(tmp_path / "scores.npz")}
    chunk = Workload(spec_from_dict(spec)).next_chunk(3)
    assert np.array_equal(chunk.offsets, trace.offsets) and np.array_equal(chunk.scores, trace.scores)


def test_resume_continues_exactly(digits, tmp_path):
    cfg = train_config_from_dict(tiny(policy="random-k", slots=6, checkpoint_every=3))
    full = Trainer(cfg, dataset=digits, keep_decisions=True)
    full.run()
    first = Trainer(cfg, dataset=digits, checkpoint_path=tmp_path / "ckpt.pt")
    first.run(4)  # interrupted after slot 4; the last checkpoint is from slot 3
    resumed = Trainer(cfg, dataset=digits, keep_decisions=True)
    resumed.resume(tmp_path / "ckpt.pt")
    assert resumed.slot == 3
    resumed.run()
    for a, b in zip(full.decisions[3:], resumed.decisions):
        assert a.slot == b.slot
        assert np.array_equal(a.expert_ids_NK, b.expert_ids_NK)
        assert np.array_equal(a.freq_E, b.freq_E) and np.array_equal(a.served_E, b.served_E)
    for p, q in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)
    assert full.summary() == resumed.summary()


def test_corrupt_or_partial_checkpoint_is_refused(digits, tmp_path):
    cfg = train_config_from_dict(tiny(slots=2))
    tr = Trainer(cfg, dataset=digits)
    tr.run()
    path = tr.save(tmp_path / "ckpt.pt")
    raw = path.read_bytes()
    fresh = Trainer(cfg, dataset=digits)
    (tmp_path / "partial.pt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="partial"):
        fresh.resume(tmp_path / "partial.pt")
    flipped = bytearray(raw)
    flipped[-100] ^= 0xFF
    (tmp_path / "corrupt.pt").write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="corrupt"):
        fresh.resume(tmp_path / "corrupt.pt")
    (tmp_path / "other.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not an edgemoe checkpoint"):
        fresh.resume(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        fresh.resume(tmp_path / "missing.pt")
    other = Trainer(train_config_from_dict(tiny(slots=2, lr=0.1)), dataset=digits)
    with pytest.raises(CheckpointError, match="different configuration"):
        other.resume(path)
    assert not list(tmp_path.glob(".*tmp*"))  # atomic writes leave no temporary file


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"data": {"name": "imagenet"}}, "data.name"),
        ({"k": 5}, "k"),
        ({"policy": "best"}, "policy"),
        ({"transport": {"kind": "dist", "workers": 3}}, "transport.workers"),
        ({"faults": [{"server": 9, "slot": 1}]}, "faults[0].server"),
        ({"model": {"backbone": "resnet"}}, "model.backbone"),
    ],
)
def test_bad_configs_name_the_field(overrides, field):
    with pytest.raises(ConfigError) as err:
        train_config_from_dict(tiny(**overrides))
    assert err.value.field == field


def test_missing_data_dir_is_clear(tmp_path):
    cfg = train_config_from_dict(tiny(data={"name": "fashion-mnist", "data_dir": str(tmp_path / "nope")}))
    with pytest.raises(DataError, match="nope"):
        Trainer(cfg)


def test_missed_deadline_goes_offline_then_rejoins(digits):
    cfg = tiny(
        policy="stable-moe",
        slots=6,
        faults=[{"server": 1, "slot": 2, "kind": "slow", "stall_s": 0.3}],
        transport={"deadline": 0.15, "rejoin_after": 2, "max_misses": 1},
    )
    tr = Trainer(train_config_from_dict(cfg), dataset=digits, keep_decisions=True)
    tr.run(3)
    assert not tr.state.online_E[1] and tr.table.backlog_E(4)[1] == 0
    tr.run()
    assert tr.state.online_E[1]
    assert (tr.decisions[5].expert_ids_NK == 1).any()
    conserved(tr)


def test_frequency_emulation_takes_wall_time(digits):
    cfg = tiny(policy="topk", slots=3, transport={"time_scale": 0.01})
    tr = Trainer(train_config_from_dict(cfg), dataset=digits, keep_decisions=True)
    tr.run()
    for d, row in zip(tr.decisions, tr.history):
        busy = 0.01 * d.served_E * tr.spec.cycles_E / np.maximum(d.freq_E, 1.0)
        assert row["wall_s"] >= busy.max() * 0.95


def test_flat_row_interleaves_per_server_columns_by_server():
    row = {"slot": 3, "served_E": np.array([1.0, 2.0]), "backlog_E": np.array([5.0, 6.0]), "wall_s": 0.5}
    assert flat_row(row) == {
        "slot": 3,
        "served_0": 1.0,
        "backlog_0": 5.0,
        "served_1": 2.0,
        "backlog_1": 6.0,
        "wall_s": 0.5,
    }
