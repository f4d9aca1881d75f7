"""The slot-driven Stable-MoE trainer (docs/stable-moe.md, docs/training.md).

Every slot t:

1. scheduled faults apply (servers go offline, their queued tokens are re-routed; others rejoin);
2. N(t) samples arrive (the scenario's arrival process); the backbone turns each into P tokens and
   the gate scores every token (no graph kept);
3. the controller (any of :mod:`edgemoe.edge`) picks K servers per token and every frequency f_j; a
   scenario's popularity skew (``gate_prior: scenario``) acts only on the controller's view of the
   scores, never on the model; the model's routing bias takes one step toward the controller's
   per-server load share;
4. each live server first serves min(Q_j, D_j) tokens from its FIFO queue, D_j = f_j tau / C_j
   (fractional capacity carries over while the queue is non-empty), then appends this slot's tokens
   (a finite buffer drops the overflow);
5. every sample whose tokens' outputs are all back is trained on once: the router recomputes
   backbone and gate, forms the loss, sends dL/dy to each serving expert, which recomputes its
   forward, back-propagates and steps; the returned dL/dh flows into the backbone; the router steps;
6. the slot engine (:class:`edgemoe.edge.SlotEngine`, the same one the simulator runs) advances the
   queues and the virtual energy queues with the counts really served; metrics are recorded; every
   ``eval_every`` slots the test set is scored (top-K of gate scores + the learned routing bias over
   live servers, and plain gate top-K), every ``checkpoint_every`` slots a checkpoint is written
   atomically.

With P tokens per sample the scenario's sample arrival rate is divided by P, so the token rate, and
with it the load on every server, is the scenario's (times ``scale``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from edgemoe.config import to_dict
from edgemoe.edge import (
    NetworkSpec,
    SkewedScoreGenerator,
    SlotEngine,
    make_arrivals,
    make_controller,
    save_score_trace,
)
from edgemoe.edge.arrivals import restore_rng, rng_state
from edgemoe.edge.controllers import SWITCH_COEF, auto_block, route_sequential, topk_ids
from edgemoe.edge.spec import spec_from_dict
from edgemoe.train.checkpoint import TraceLog, check_resumable, load_checkpoint, save_checkpoint
from edgemoe.train.config import TrainConfig
from edgemoe.train.data import ImageDataset
from edgemoe.train.model import RouterSide
from edgemoe.train.server import ServerSpec
from edgemoe.train.tokens import CompletedTokens, TokenTable
from edgemoe.train.transport import LATE, ServerOrder, ServerReply, Transport
from edgemoe.train.transport import make_transport as _make_transport

# Per-slot lists kept in the checkpoint's append-only trace file, not in the checkpoint itself.
TRACED = ("history", "evals", "recorded", "recorded_labels")
# Config fields that may differ between a checkpoint and the run resuming it.
RESUMABLE_CHANGES = ("slots", "checkpoint_every", "transport", "record_scores")

SlotRow = dict[str, Any]
"""One slot's metrics: scalars by name, per-server values as ``[E]`` arrays under ``<name>_E``."""


def flat_row(row: SlotRow) -> dict[str, Any]:
    """``row`` as CSV cells: every ``<name>_E`` array becomes columns ``<name>_0 .. <name>_{E-1}``,
    interleaved by server (``served_0, backlog_0, .., served_1, ..``) where the first array stood."""
    arrays = {key[: -len("_E")]: v for key, v in row.items() if isinstance(v, np.ndarray)}
    out: dict[str, Any] = {}
    for key, value in row.items():
        if not isinstance(value, np.ndarray):
            out[key] = value
        elif key[: -len("_E")] == next(iter(arrays)):
            for j in range(len(value)):
                out.update({f"{name}_{j}": float(v[j]) for name, v in arrays.items()})
    return out


class SampleStream:
    """Endless seeded stream of training-sample indices, reshuffled every epoch."""

    def __init__(self, num_samples: int, seed: np.random.SeedSequence):
        self.num_samples = num_samples
        self.rng = np.random.default_rng(seed)
        self.order = self.rng.permutation(num_samples)
        self.pos = 0

    def next(self, count: int) -> np.ndarray:
        parts = []
        while count > 0:
            take = min(count, self.num_samples - self.pos)
            parts.append(self.order[self.pos : self.pos + take])
            self.pos += take
            count -= take
            if self.pos == self.num_samples:
                self.order, self.pos = self.rng.permutation(self.num_samples), 0
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)

    def state_dict(self) -> dict[str, Any]:
        return {"rng": rng_state(self.rng), "order": self.order.copy(), "pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        restore_rng(self.rng, state["rng"])
        self.order, self.pos = np.array(state["order"]), int(state["pos"])


@dataclass
class SlotDecision:
    """What the controller decided in one slot (kept for equivalence and resume checks)."""

    slot: int
    expert_ids_NK: np.ndarray
    freq_E: np.ndarray
    served_E: np.ndarray
    trained_ids: np.ndarray


def server_specs(cfg: TrainConfig, num_servers: int) -> list[ServerSpec]:
    """One :class:`ServerSpec` per edge server, from the run config."""
    return [
        ServerSpec(
            index=j,
            dim=cfg.model.dim,
            hidden=cfg.model.expert_hidden,
            lr=cfg.expert_lr,
            buffer=cfg.buffer,
            seed=cfg.seed,
        )
        for j in range(num_servers)
    ]


def token_spec(spec: NetworkSpec, tokens_per_sample: int) -> NetworkSpec:
    """The scenario with its (sample) arrival rates divided by the tokens per sample, so that the
    token arrival rate, and the load on every server, stay the scenario's."""
    if tokens_per_sample == 1:
        return spec
    data = spec.to_dict()
    arrivals = data["arrivals"]
    arrivals["rate"] /= tokens_per_sample
    arrivals["rates"] = [r / tokens_per_sample for r in arrivals["rates"]]
    return spec_from_dict(data)


def mutual_information_bits(counts_EC: np.ndarray) -> float:
    """MI(expert; class) in bits of a joint count table."""
    total = counts_EC.sum()
    if total == 0:
        return 0.0
    p_EC = counts_EC / total
    outer_EC = p_EC.sum(axis=1, keepdims=True) * p_EC.sum(axis=0, keepdims=True)
    nz = p_EC > 0
    return float((p_EC[nz] * np.log2(p_EC[nz] / outer_EC[nz])).sum())


def make_transport(
    cfg: TrainConfig,
    num_servers: int,
    on_event: Callable[[int, str], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Transport:
    """The transport named by ``cfg.transport.kind``."""
    return _make_transport(server_specs(cfg, num_servers), cfg.transport, on_event, should_stop)


class Trainer:
    """Runs Stable-MoE training slot by slot over a transport. See the module docstring."""

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        dataset: ImageDataset | None = None,
        transport: Transport | None = None,
        keep_decisions: bool = False,
        checkpoint_path: str | Path | None = None,
    ):
        self.cfg = cfg
        self.tokens = cfg.model.tokens_per_sample
        self.spec = token_spec(cfg.network_spec(), self.tokens)
        self.num_servers, self.k = self.spec.num_servers, self.spec.k
        self.data = dataset or cfg.data.build(cfg.seed)
        self.view_prior_E: np.ndarray | None = None
        if cfg.gate_prior == "scenario" and self.spec.scores.kind == "skewed":
            prior_E = np.exp(SkewedScoreGenerator(self.spec.scores, self.spec.f_max_E).log_popularity_E)
            self.view_prior_E = (prior_E / prior_E.sum()).astype(np.float32)
        self.controller = make_controller(cfg.policy, self.spec, **cfg.controller_params())
        aux_coef = cfg.model.aux_coef or (SWITCH_COEF if self.controller.balance_loss else 0.0)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.model = RouterSide(
                cfg.model,
                in_channels=self.data.in_channels,
                image_size=self.data.image_size,
                num_classes=self.data.num_classes,
                num_experts=self.num_servers,
                top_k=self.k,
                aux_coef=aux_coef,
            )
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        arrival_seed, sample_seed = np.random.SeedSequence(cfg.seed).spawn(2)
        self.arrivals = make_arrivals(self.spec.arrivals, arrival_seed)
        self.samples = SampleStream(len(self.data.y_train_N), sample_seed)
        self.engine = SlotEngine(self.spec, "whole")
        self.state = self.engine.state
        self.table = TokenTable(self.k, cfg.model.dim, group=self.tokens)
        self.assign_EC = np.zeros((self.num_servers, self.data.num_classes))
        self.offline_until: dict[int, int | None] = {}
        self.requeue: dict[int, np.ndarray] = {}
        self.stall_E = np.zeros(self.num_servers)
        self.slot = 0
        self.next_id = 0
        self.history: list[SlotRow] = []
        self.evals: list[dict[str, float]] = []
        self.recorded: list[np.ndarray] = []
        self.recorded_labels: list[np.ndarray] = []
        self.trace = TraceLog(TRACED)
        self.counters = {
            "arrived": 0,
            "trained": 0,
            "tokens_arrived": 0,
            "tokens_trained": 0,
            "served_assignments": 0,
            "dropped_assignments": 0,
            "rerouted": 0,
            "no_expert": 0,
            "late_replies": 0,
            "late_backward": 0,
        }
        self.keep_decisions = keep_decisions
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
        self._last_completed = 0
        self.decisions: list[SlotDecision] = []
        self.lost: dict[int, int] = {}
        self.misses_E = np.zeros(self.num_servers, dtype=np.int64)
        self.events: list[dict[str, Any]] = []
        self.on_event: Callable[[str], None] = lambda text: None
        self.transport = transport or make_transport(cfg, self.num_servers, self._transport_event)

    # ------------------------------------------------------------------------------------- faults

    def _live(self) -> np.ndarray:
        return np.flatnonzero(self.state.online_E)

    def _event(self, server: int, what: str) -> None:
        """Record a fault event (console and ``summary.json``)."""
        self.events.append({"slot": self.slot, "server": server, "event": what})
        self.on_event(f"slot {self.slot}: server {server} {what}")

    def _transport_event(self, server: int, text: str) -> None:
        self.on_event(f"slot {self.slot}: server {server} {text}")

    def go_offline(self, server: int, until: int | None) -> int:
        """Mark ``server`` offline until slot ``until`` (None = for good) and re-route its queue.

        Each queued assignment moves to a live server that does not already hold that token,
        join-the-shortest-queue with a provisional backlog; with no such server it is dropped (the
        token then trains with its other experts). Returns the number of re-routed assignments.
        """
        self.engine.mark_offline(server)
        self.offline_until[server] = until
        self.requeue.pop(server, None)
        self.transport.detach(server)
        rows, cols = self.table.queued_on(server)
        if len(rows) == 0:
            return 0
        experts_RK = self.table.experts_PK[rows]
        allowed_RE = np.tile(self.state.online_E, (len(rows), 1))
        allowed_RE[np.arange(len(rows))[:, None], experts_RK] = False
        utility_RE = np.where(allowed_RE, 0.0, -np.inf)
        backlog_E = self.table.backlog_E(self.num_servers).astype(np.float64)
        new = route_sequential(utility_RE, backlog_E, 1, auto_block(len(rows), 0))[:, 0]
        new = np.where(allowed_RE[np.arange(len(rows)), new], new, -1)
        self.table.reassign(rows, cols, new)
        self.engine.move(server, np.bincount(new[new >= 0], minlength=self.num_servers), len(rows))
        ids = self.table.ids_P[rows]
        for j in np.unique(new[new >= 0]):
            self.requeue[int(j)] = np.union1d(self.requeue.get(int(j), np.empty(0, np.int64)), ids[new == j])
        self.counters["rerouted"] += int((new >= 0).sum())
        self.counters["dropped_assignments"] += int((new < 0).sum())
        return len(rows)

    def lose(self, server: int, why: str) -> None:
        """The transport lost ``server`` (dead or too late): offline until it answers again."""
        if not self.state.online_E[server]:
            return
        self.go_offline(server, None)
        del self.offline_until[server]
        self.lost[server] = self.slot + self.cfg.transport.rejoin_after
        self._event(server, why)

    def _rejoin(self, server: int) -> None:
        self.transport.attach(server)
        self.engine.mark_online(server)
        self.misses_E[server] = 0

    def _sync_transport(self) -> None:
        """Bring back lost servers that answer again (after ``rejoin_after`` slots)."""
        back = set(self.transport.back())
        for server, earliest in list(self.lost.items()):
            if server in back and self.slot >= earliest:
                del self.lost[server]
                self._rejoin(server)
                self._event(server, "rejoined")

    def _apply_faults(self, t: int) -> None:
        self._sync_transport()
        for server, until in list(self.offline_until.items()):
            if until is not None and until == t:
                del self.offline_until[server]
                if server in self.transport.back():
                    self._rejoin(server)
                else:  # a killed process not restarted yet: rejoins when it answers
                    self.lost[server] = t
        for fault in self.cfg.faults:
            if fault.slot != t:
                continue
            until = t + fault.duration if fault.duration else None
            if fault.kind == "slow":
                self.stall_E[fault.server] = fault.stall_s
            elif fault.kind == "kill":
                self.transport.kill(fault.server)
                self.go_offline(fault.server, until)
            elif self.state.online_E[fault.server]:
                self.go_offline(fault.server, until)

    # -------------------------------------------------------------------------------------- slots

    def _orders(
        self,
        serve_E: np.ndarray,
        freq_E: np.ndarray,
        ids_N: np.ndarray,
        h_ND: Tensor,
        experts_NK: np.ndarray,
        kept_NK: np.ndarray,
    ) -> dict[int, ServerOrder]:
        orders = {}
        scale = self.cfg.transport.time_scale
        ids_t = torch.from_numpy(ids_N)
        for j in self._live():
            new = (experts_NK == j) & kept_NK
            rows_new = np.flatnonzero(new.any(axis=1))
            requeue_ids = self.requeue.pop(int(j), np.empty(0, np.int64))
            rows_re = np.searchsorted(self.table.ids_P, requeue_ids)
            busy = scale * serve_E[j] * self.spec.cycles_E[j] / freq_E[j] if scale and serve_E[j] else 0.0
            orders[int(j)] = ServerOrder(
                serve=int(serve_E[j]),
                requeue_ids=torch.from_numpy(requeue_ids),
                requeue_h=self.table.h_PD[torch.from_numpy(rows_re)] if len(requeue_ids) else None,
                enqueue_ids=ids_t[rows_new],
                enqueue_h=h_ND[torch.from_numpy(rows_new)] if len(rows_new) else None,
                busy_s=float(busy),
                stall_s=float(self.stall_E[j]),
            )
        self.stall_E[:] = 0.0
        return orders

    def _deliver(self, j: int, reply: ServerReply, served_E: np.ndarray, overflow_E: np.ndarray) -> None:
        self.table.deliver(j, reply.served_ids.numpy(), reply.served_y)
        self.table.drop(j, reply.overflow_ids.numpy())
        self.counters["dropped_assignments"] += int(reply.overflow_ids.numel())
        overflow_E[j] += reply.overflow_ids.numel()
        served_E[j] += reply.served_ids.numel()

    def _collect(self, replies: dict[int, Any]) -> tuple[np.ndarray, np.ndarray]:
        """Deliver outputs (late ones from earlier slots too), count misses, lose dead servers;
        returns the assignments served and refused (finite buffer) per server."""
        served_E = np.zeros(self.num_servers)
        overflow_E = np.zeros(self.num_servers)
        for j, late in self.transport.late_replies().items():
            for reply in late:
                self._deliver(j, reply, served_E, overflow_E)
        for j, reply in replies.items():
            if reply is None:
                self.lose(j, "unreachable")
            elif reply is LATE:
                self.misses_E[j] += 1
                self.counters["late_replies"] += 1
                if self.misses_E[j] >= self.cfg.transport.max_misses:
                    self.lose(j, f"late {self.misses_E[j]} slots in a row")
            else:
                self.misses_E[j] = 0
                self._deliver(j, reply, served_E, overflow_E)
        pending_E = np.zeros(self.num_servers, dtype=np.int64)
        for j, ids in self.requeue.items():
            pending_E[j] = len(ids)
        mirror_E = self.table.backlog_E(self.num_servers) - pending_E
        for j, reply in replies.items():
            if isinstance(reply, ServerReply) and self.state.online_E[j] and reply.backlog != mirror_E[j]:
                raise RuntimeError(
                    f"server {j} holds {reply.backlog} tokens but the router expects {mirror_E[j]}"
                )
        return served_E, overflow_E

    def controller_view(self, scores_TE: np.ndarray) -> np.ndarray:
        """The scores the controller sees: the gate's, times the scenario's popularity skew if any."""
        if self.view_prior_E is None:
            return scores_TE
        view_TE = scores_TE * self.view_prior_E
        return view_TE / view_TE.sum(axis=1, keepdims=True)

    def run_slot(self) -> SlotRow:
        """Advance one slot; returns its metrics row."""
        start = time.perf_counter()
        t = self.slot
        self._apply_faults(t)
        n = int(self.arrivals.sample(1)[0])
        samples_N = self.samples.next(n)
        samples_T = np.repeat(samples_N, self.tokens)
        ids_T = np.arange(self.next_id, self.next_id + len(samples_T), dtype=np.int64)
        self.next_id += len(samples_T)
        self.counters["arrived"] += n
        self.counters["tokens_arrived"] += len(samples_T)
        with torch.no_grad():
            self.model.eval()
            h_TD = self.model.features(self.data.x_train_NCHW[torch.from_numpy(samples_N)])
            gate_TE = self.model.gate(h_TD)[1]
        scores_TE = self.controller_view(gate_TE.numpy())
        decision = self.controller.decide(self.state, scores_TE)
        experts_TK, kept_TK = decision.expert_ids_NK.astype(np.int64), decision.kept_mask()
        arrived_E = np.bincount(experts_TK[kept_TK], minlength=self.num_servers).astype(np.float64)
        self.model.update_route_bias(
            gate_TE, torch.from_numpy(arrived_E), torch.from_numpy(self.state.online_E)
        )
        self.counters["dropped_assignments"] += int((~kept_TK).sum())
        serve_E = self.engine.plan(decision.freq_E).astype(np.int64)
        self.table.add(ids_T, samples_T, t, h_TD, experts_TK, kept_TK)
        orders = self._orders(serve_E, decision.freq_E, ids_T, h_TD, experts_TK, kept_TK)
        served_E, overflow_E = self._collect(self.transport.step(orders))
        self.counters["served_assignments"] += int(served_E.sum())
        completed = self.table.pop_completed()
        loss = self._train(completed)
        outcome = self.engine.step(decision.freq_E, arrived_E, served_E, overflow_E)
        mirror_E = self.table.backlog_E(self.num_servers)
        if not np.array_equal(self.state.backlog_E, mirror_E):
            raise RuntimeError(
                f"slot engine backlog {self.state.backlog_E} differs from the queues {mirror_E}"
            )
        if self.keep_decisions:
            self.decisions.append(
                SlotDecision(
                    t, experts_TK.copy(), decision.freq_E.copy(), served_E.copy(), completed.ids_N.copy()
                )
            )
        if self.cfg.record_scores:
            self.recorded.append(scores_TE.astype(np.float32))
            self.recorded_labels.append(self.data.y_train_N[torch.from_numpy(samples_T)].numpy())
        row = self._metrics(
            t, len(ids_T), scores_TE, experts_TK, kept_TK, served_E, outcome.energy_E, decision.freq_E, loss
        )
        row["wall_s"] = time.perf_counter() - start
        self.history.append(row)
        self.slot += 1
        if self.slot % self.cfg.eval_every == 0 or self.slot == self.cfg.slots:
            acc = self._test_pass(("bias", "gate"))
            self.evals.append(
                {"slot": self.slot, "test_accuracy": acc["bias"], "test_accuracy_gate": acc["gate"]}
            )
        return row

    def _metrics(
        self,
        t: int,
        n: int,
        scores_NE: np.ndarray,
        experts_NK: np.ndarray,
        kept_NK: np.ndarray,
        served_E: np.ndarray,
        energy_E: np.ndarray,
        freq_E: np.ndarray,
        loss: float,
    ) -> SlotRow:
        chosen = np.take_along_axis(scores_NE, experts_NK, axis=1)
        best = np.take_along_axis(scores_NE, topk_ids(scores_NE, self.k), axis=1)
        gc = float((chosen * kept_NK).sum() / best.sum()) if n else 1.0
        row: SlotRow = {
            "slot": t,
            "arrivals": n,
            "throughput": float(served_E.sum()),
            "completed": self._last_completed,
            "backlog": float(self.state.backlog_E.sum()),
            "energy_over_budget": float((energy_E / self.spec.budget_E).max()),
            "gc_norm": gc,
            "loss": loss,
            "online": int(self.state.online_E.sum()),
            "in_flight": len(self.table),
            "served_E": served_E.astype(np.float64),
            "backlog_E": self.state.backlog_E.astype(np.float64),
            "energy_E": energy_E.astype(np.float64),
            "freq_ghz_E": freq_E / 1e9,
        }
        return row

    # ----------------------------------------------------------------------------------- training

    def _train(self, batch: CompletedTokens) -> float:
        """One optimizer step on the completed samples (router and every serving expert)."""
        self._last_completed = len(batch) // self.tokens
        if len(batch) == 0:
            return float("nan")
        self.counters["trained"] += len(batch) // self.tokens
        self.counters["tokens_trained"] += len(batch)
        self.counters["no_expert"] += int((~batch.kept_NK.any(axis=1)).sum())
        self.model.train()
        samples = torch.from_numpy(batch.samples_N[:: self.tokens])
        labels_N = self.data.y_train_N[samples]
        labels_T = np.repeat(labels_N.numpy(), self.tokens)
        np.add.at(self.assign_EC, (batch.experts_NK, labels_T[:, None]), batch.kept_NK)
        h_TD = self.model.features(self.data.x_train_NCHW[samples])
        logits_TE, scores_TE = self.model.gate(h_TD)
        ids_TK, kept_TK = torch.from_numpy(batch.experts_NK), torch.from_numpy(batch.kept_NK)
        y_TKD = batch.y_NKD.clone().requires_grad_(True)
        out = self.model.classify(h_TD, scores_TE, ids_TK, y_TKD, kept_TK)
        loss = nn.functional.cross_entropy(out, labels_N) + self.model.aux_loss(
            logits_TE, scores_TE, ids_TK, kept_TK
        )
        (grad_y_TKD,) = torch.autograd.grad(loss, y_TKD, retain_graph=True)
        jobs, cells = {}, {}
        for j in self._live():
            rows, cols = np.nonzero((batch.experts_NK == j) & batch.kept_NK)
            if len(rows):
                r, c = torch.from_numpy(rows), torch.from_numpy(cols)
                jobs[int(j)] = (batch.h_ND[r], grad_y_TKD[r, c])
                cells[int(j)] = r
        grad_h_TD = torch.zeros_like(h_TD)
        for j, grad in self.transport.backward(jobs).items():
            if grad is None:
                self.lose(j, "unreachable")
            elif grad is LATE:  # the expert still steps when it catches up; the backbone goes without
                self.counters["late_backward"] += 1
            else:
                grad_h_TD.index_add_(0, cells[j], grad)
        self.optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward([loss, h_TD], [torch.ones_like(loss), grad_h_TD])
        self.optimizer.step()
        return float(loss.detach())

    TEST_ROUTINGS = ("bias", "gate", "random", "zero")
    """Test-time routings: top-K of gate scores + learned routing bias (the model's inference
    routing), plain gate top-K, K random live experts, and every expert output zeroed."""

    @torch.no_grad()
    def _test_pass(self, routings: tuple[str, ...], chunk: int = 2048) -> dict[str, float]:
        """Test accuracy under each of ``routings`` (inference is not queued); each expert runs once
        per test token. Also fills ``self.test_assign_EC`` (assignments x class under ``bias``)."""
        self.model.eval()
        live = [int(j) for j in self._live()]
        live_E = torch.from_numpy(self.state.online_E.copy())
        correct = dict.fromkeys(routings, 0)
        self.test_assign_EC = np.zeros_like(self.assign_EC)
        rng = torch.Generator().manual_seed(self.cfg.seed)
        for start in range(0, len(self.data.y_test_N), chunk):
            x = self.data.x_test_NCHW[start : start + chunk]
            labels_N = self.data.y_test_N[start : start + chunk]
            h_TD = self.model.features(x)
            _, scores_TE = self.model.gate(h_TD)
            need_experts = any(r != "zero" for r in routings)
            outs = self.transport.infer(h_TD, live) if need_experts else {}
            y_ETD = torch.zeros(self.num_servers, *h_TD.shape)
            for j, y in outs.items():
                if isinstance(y, Tensor):  # an unreachable or late expert contributes nothing
                    y_ETD[j] = y
            rows_T1 = torch.arange(len(h_TD))[:, None]
            for routing in routings:
                if routing == "random":
                    keys_TE = torch.rand(scores_TE.shape, generator=rng)
                    ids_TK = self.model.route(keys_TE, live_E, biased=False)
                else:
                    ids_TK = self.model.route(scores_TE, live_E, biased=routing != "gate")
                y_TKD = (
                    y_ETD[ids_TK, rows_T1] if routing != "zero" else torch.zeros(*ids_TK.shape, h_TD.shape[1])
                )
                logits = self.model.classify(
                    h_TD, scores_TE, ids_TK, y_TKD, torch.ones_like(ids_TK, dtype=torch.bool)
                )
                correct[routing] += int((logits.argmax(-1) == labels_N).sum())
                if routing == "bias":
                    labels_T = np.repeat(labels_N.numpy(), self.tokens)
                    np.add.at(self.test_assign_EC, (ids_TK.numpy(), labels_T[:, None]), 1.0)
        total = max(len(self.data.y_test_N), 1)
        return {r: c / total for r, c in correct.items()}

    def evaluate(self, *, use_experts: bool = True, biased: bool = True) -> float:
        """Test accuracy under the model's inference routing (``biased=False``: plain gate top-K).

        ``use_experts=False`` zeroes every expert output: an ablation that shows how much of the
        accuracy the experts (and hence routing) carry.
        """
        routing = "zero" if not use_experts else ("bias" if biased else "gate")
        return self._test_pass((routing,))[routing]

    def diagnostics(self) -> SlotRow:
        """How much routing matters to this run: test accuracy under every test routing, MI(expert;
        class) of training and test assignments (bits), and each server's share of the training
        assignments (``share_E``)."""
        acc = self._test_pass(self.TEST_ROUTINGS)
        out: SlotRow = {f"test_accuracy_{r}": v for r, v in acc.items()}
        out["mi_train_bits"] = mutual_information_bits(self.assign_EC)
        out["mi_test_bits"] = mutual_information_bits(self.test_assign_EC)
        share_E = self.assign_EC.sum(axis=1) / max(self.assign_EC.sum(), 1.0)
        out["share_E"] = share_E
        return out

    # ------------------------------------------------------------------------------------ running

    def run(
        self,
        slots: int | None = None,
        *,
        on_slot: Callable[[SlotRow], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> bool:
        """Run until ``slots`` (default ``cfg.slots``) slots have elapsed, checkpointing on schedule.

        ``should_stop`` is asked before every slot (e.g. a signal arrived); returns False if it stopped
        the run early.
        """
        end = self.cfg.slots if slots is None else slots
        while self.slot < end:
            if should_stop is not None and should_stop():
                return False
            row = self.run_slot()
            if on_slot is not None:
                on_slot(row)
            every = self.cfg.checkpoint_every
            if every and self.slot % every == 0 and self.checkpoint_path is not None:
                self.save(self.checkpoint_path)
        return True

    def summary(self) -> dict[str, Any]:
        """Headline metrics of the run so far."""
        rows = self.history
        energy = np.array([r["energy_E"] for r in rows])

        def mean(key: str) -> float:
            return float(np.nanmean([r[key] for r in rows])) if rows else float("nan")

        return {
            "policy": self.cfg.policy,
            "slots": self.slot,
            "throughput_mean": mean("throughput"),
            "completed_mean": mean("completed"),
            "test_accuracy": self.evals[-1]["test_accuracy"] if self.evals else float("nan"),
            "test_accuracy_gate": self.evals[-1]["test_accuracy_gate"] if self.evals else float("nan"),
            "backlog_mean": mean("backlog"),
            "backlog_final": rows[-1]["backlog"] if rows else 0.0,
            "energy_over_budget_max": float((energy.mean(axis=0) / self.spec.budget_E).max())
            if rows
            else 0.0,
            "gc_norm_mean": mean("gc_norm"),
            "in_flight": len(self.table),
            **self.counters,
            "offline_at_end": [int(j) for j in np.flatnonzero(~self.state.online_E)],
            "fault_events": list(self.events),
        }

    def save_scores(self, path: str | Path) -> None:
        """Write the recorded gate scores in the simulator's replay format."""
        counts = [len(s) for s in self.recorded]
        scores = (
            np.concatenate(self.recorded) if self.recorded else np.zeros((0, self.num_servers), np.float32)
        )
        labels = np.concatenate(self.recorded_labels) if self.recorded_labels else None
        save_score_trace(path, scores, np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), labels)

    # --------------------------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": 1,
            "config": to_dict(self.cfg),
            "slot": self.slot,
            "next_id": self.next_id,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "servers": self.transport.state_dict(),
            "table": self.table.state_dict(),
            "network_state": self.state.state_dict(),
            "progress_E": self.engine.progress_E.copy(),
            "assign_EC": self.assign_EC.copy(),
            "offline_until": dict(self.offline_until),
            "requeue": {j: v.copy() for j, v in self.requeue.items()},
            "controller": self.controller.state_dict(),
            "arrivals": self.arrivals.state_dict(),
            "samples": self.samples.state_dict(),
            "counters": dict(self.counters),
            "lost": dict(self.lost),
            "misses_E": self.misses_E.copy(),
            "events": list(self.events),
            "torch_rng": torch.random.get_rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_resumable(to_dict(self.cfg), state, RESUMABLE_CHANGES)
        self.load_traced(state)
        self.slot, self.next_id = int(state["slot"]), int(state["next_id"])
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.transport.load_state_dict(state["servers"])
        self.table.load_state_dict(state["table"])
        self.state.load_state_dict(state["network_state"])
        self.engine.progress_E = np.array(state["progress_E"], dtype=np.float64)
        self.assign_EC = np.array(state["assign_EC"], dtype=np.float64)
        self.offline_until = dict(state["offline_until"])
        self.requeue = {int(j): np.array(v) for j, v in state["requeue"].items()}
        self.controller.load_state_dict(state["controller"])
        self.arrivals.load_state_dict(state["arrivals"])
        self.samples.load_state_dict(state["samples"])
        self.counters = {**self.counters, **state["counters"]}
        self.events = list(state.get("events", []))
        self.misses_E = np.array(state.get("misses_E", self.misses_E))
        # servers lost to the transport rejoin as soon as they answer; scheduled faults keep their slots
        self.lost = {int(j): self.slot for j in state.get("lost", {})}
        for j in np.flatnonzero(~self.state.online_E):
            self.transport.detach(int(j))
        torch.random.set_rng_state(state["torch_rng"])

    def save(self, path: str | Path) -> Path:
        """Atomic checkpoint of everything needed to continue exactly (per-slot lists appended to the
        trace file next to it first, so the checkpoint stays the same size as the run grows)."""
        for j in np.flatnonzero(self.state.online_E & (self.misses_E > 0)):
            # a late server's queue is in flux; offline first, so the checkpoint is consistent
            self.lose(int(j), "late at a checkpoint")
        counts = self.trace.save(path, {k: getattr(self, k) for k in TRACED})
        return save_checkpoint(path, {**self.state_dict(), "traced": counts})

    def resume(self, path: str | Path) -> None:
        """Load a checkpoint written by :meth:`save` (refuses corrupt or partial files)."""
        self.load_state_dict(load_checkpoint(path))

    def load_traced(self, state: dict[str, Any]) -> None:
        """Restore the per-slot lists of a checkpoint loaded from ``state["path"]``."""
        if "traced" not in state:  # an in-memory state_dict(), or a checkpoint holding the lists itself
            for key in TRACED:
                if key in state:
                    setattr(self, key, list(state[key]))
            return
        for key, values in self.trace.load(state["path"], state["traced"]).items():
            setattr(self, key, values)

    def close(self) -> None:
        self.transport.close()
