"""MoE layer forward+backward throughput and memory: every edgemoe backend against external anchors.

Anchors, built with the same d, hidden, experts, k, tokens and weights (copied from ours where the
anchor's layout allows, so outputs can be compared): Hugging Face transformers' Mixtral sparse
block (``eager`` and ``grouped_mm`` experts), DeepSpeed-MoE (``ep_size=1``, dropless and with
capacity factor 1), lucidrains' st-moe-pytorch (capacity factor 1; k >= 2 only), and the *dense
floor*: the six plain GEMMs (forward, input- and weight-gradient of both projections) over T·k
rows, i.e. the same active FLOPs with no routing, no dispatch and no activation.

Every candidate runs ``(out * g).sum().backward()`` on a fixed ``x``/``g``; runs are interleaved
(one run of each candidate per round, the order rotating each round) and the median over the
measured rounds is reported, because the CPU may be shared. ``fraction_of_gemm_peak`` divides
achieved FLOP/s by the FLOP/s of a 2048² fp32 matmul timed in the same rounds. The load average
(``/proc/loadavg``) is recorded at the start and end of every shape.

Memory: each candidate's first step (the first warm-up round) is also measured as resident-set
growth, ``VmHWM`` after the step minus ``VmRSS`` before it (peak reset through
``/proc/self/clear_refs``, free heap returned with ``malloc_trim`` first, Linux only). It includes
whatever a candidate keeps between steps (our reused activation and gradient storage) and the
parameter gradients every candidate allocates.

Shapes: the default (d=512, SwiGLU hidden 688, E=8, k=2, T=4096); the coarse sweep E ∈ {4, 8, 16,
64}, k ∈ {1, 2}, T ∈ {1024, 8192} at the same hidden size; and the fine-grained sweep E ∈ {64, 128},
k ∈ {2, 8}, T ∈ {1024, 8192} with the expert hidden size 688·2/k, so every token has the default
shape's active FLOPs (fine-grained experts are narrower).

    python benchmarks/moe_layer.py            # default shape + both sweeps, JSON to stdout and results/
    python benchmarks/moe_layer.py --fine     # default shape + the fine-grained sweep
    python benchmarks/moe_layer.py --quick    # default shape and two E=64 shapes, fewer rounds
    python benchmarks/moe_layer.py --profile 64,2,8192   # torch.profiler table of ours at one shape
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import io
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from edgemoe.files import write_json
from edgemoe.moe import MoEConfig, MoELayer, RouterConfig

HERE = Path(__file__).resolve().parent
CAPPED_FACTOR = 1.0
DEFAULT_SWIGLU_HIDDEN = 688  # 2/3 of 1024 rounded up to 16
# st-moe at k=8 T=8192 (2 GB per dispatch tensor) was killed for memory on a 24 GB machine.
ST_MOE_MAX_GB = 1.0


@dataclass(frozen=True)
class Shape:
    dim: int
    hidden: int
    num_experts: int
    top_k: int
    tokens: int
    expert_hidden: int = 0  # the SwiGLU hidden size; 0 = derived from ``hidden``

    @classmethod
    def fine(cls, num_experts: int, top_k: int, tokens: int) -> Shape:
        """A fine-grained shape: hidden 688·2/k, the default shape's active FLOPs per token."""
        return cls(512, 1024, num_experts, top_k, tokens, expert_hidden=DEFAULT_SWIGLU_HIDDEN * 2 // top_k)

    @property
    def swiglu_hidden(self) -> int:
        """``expert_hidden``, else 2/3 of ``hidden`` rounded up to 16 (the LLaMA/Mixtral convention)."""
        return self.expert_hidden or 16 * math.ceil(2 * self.hidden / 3 / 16)

    def active_flops(self) -> float:
        """Forward + backward FLOPs of the expert GEMMs over the T·k active rows."""
        h = self.swiglu_hidden
        return 3 * 2 * self.tokens * self.top_k * (self.dim * 2 * h + h * self.dim)

    def label(self) -> str:
        return f"E={self.num_experts} k={self.top_k} T={self.tokens} H={self.swiglu_hidden}"


@dataclass
class Candidate:
    name: str
    kind: str  # "ours", "anchor", "floor", "peak"
    dropless: bool
    step: Callable[[], None]
    forward: Callable[[], torch.Tensor] | None = None


class SwiGLU(nn.Module):
    """A bias-free SwiGLU expert for the anchors that take expert modules."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w13 = nn.Linear(dim, 2 * hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(nn.functional.silu(gate) * up)


def copy_experts_into(modules: list[SwiGLU], ours: MoELayer) -> None:
    with torch.no_grad():
        for e, m in enumerate(modules):
            m.w13.weight.copy_(ours.experts.w_in_EDF[e].t())
            m.w2.weight.copy_(ours.experts.w_out_EHD[e].t())


def fwd_bwd(module: nn.Module, x: torch.Tensor, g: torch.Tensor, unpack: Callable) -> Callable[[], None]:
    """A closure running forward, ``(out*g).sum()`` and backward with fresh grads."""
    params = list(module.parameters())

    def step() -> None:
        for p in params:
            p.grad = None
        xx = x.detach().requires_grad_(True)
        (unpack(module(xx)) * g).sum().backward()

    return step


def forward_of(module: nn.Module, x: torch.Tensor, unpack: Callable) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        with torch.no_grad():
            return unpack(module(x)).reshape(-1, x.shape[-1])

    return run


def first(out):
    return out[0] if isinstance(out, tuple) else out


def build_ours(shape: Shape, backend: str, capacity_factor: float) -> MoELayer:
    router = RouterConfig(name="topk", top_k=shape.top_k, capacity_factor=capacity_factor)
    cfg = MoEConfig(
        dim=shape.dim,
        hidden_dim=shape.swiglu_hidden,
        num_experts=shape.num_experts,
        router=router,
        executor=backend,
    )
    torch.manual_seed(0)
    return MoELayer(cfg)


def hf_mixtral(shape: Shape, ours: MoELayer, impl: str) -> nn.Module:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(
        hidden_size=shape.dim,
        intermediate_size=shape.swiglu_hidden,
        num_local_experts=shape.num_experts,
        num_experts_per_tok=shape.top_k,
        router_jitter_noise=0.0,
    )
    cfg._experts_implementation = impl
    block = MixtralSparseMoeBlock(cfg)
    with torch.no_grad():
        block.gate.weight.copy_(ours.router.proj.weight)
        block.experts.gate_up_proj.copy_(ours.experts.w_in_EDF.transpose(1, 2))
        block.experts.down_proj.copy_(ours.experts.w_out_EHD.transpose(1, 2))
    return block


def deepspeed_moe(shape: Shape, ours: MoELayer, dropless: bool) -> nn.Module:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        from deepspeed.moe.layer import MoE
    layer = MoE(
        hidden_size=shape.dim,
        expert=SwiGLU(shape.dim, shape.swiglu_hidden),
        num_experts=shape.num_experts,
        ep_size=1,
        k=shape.top_k,
        capacity_factor=CAPPED_FACTOR,
        min_capacity=1,
        drop_tokens=not dropless,
        use_rts=False,
        top2_2nd_expert_sampling=False,
    )
    copy_experts_into(list(layer.deepspeed_moe.experts.deepspeed_experts), ours)
    with torch.no_grad():
        layer.deepspeed_moe.gate.wg.weight.copy_(ours.router.proj.weight)
    return layer


def st_moe(shape: Shape, ours: MoELayer) -> nn.Module:
    from st_moe_pytorch import MoE

    experts = [SwiGLU(shape.dim, shape.swiglu_hidden) for _ in range(shape.num_experts)]
    copy_experts_into(experts, ours)
    # st-moe's capacity is cf·T/E for all k choices together; k·cf gives the same C as ours.
    layer = MoE(
        dim=shape.dim,
        num_experts=shape.num_experts,
        gating_top_n=shape.top_k,
        threshold_train=1e-9,
        threshold_eval=1e-9,
        capacity_factor_train=shape.top_k * CAPPED_FACTOR,
        capacity_factor_eval=shape.top_k * CAPPED_FACTOR,
        experts=nn.ModuleList(experts),
    )
    with torch.no_grad():
        layer.gate.to_gates.weight.copy_(ours.router.proj.weight)
    return layer


def dense_floor(shape: Shape) -> Callable[[], None]:
    """The six GEMMs of the two projections' forward and backward over T·k rows."""
    rows, d, h = shape.tokens * shape.top_k, shape.dim, shape.swiglu_hidden
    x, w1 = torch.randn(rows, d), torch.randn(d, 2 * h) * 0.02
    a, w2 = torch.randn(rows, h), torch.randn(h, d) * 0.02
    gy, dh = torch.randn(rows, d), torch.randn(rows, 2 * h)
    bufs = {
        "h": torch.empty(rows, 2 * h),
        "y": torch.empty(rows, d),
        "da": torch.empty(rows, h),
        "dw2": torch.empty(h, d),
        "dx": torch.empty(rows, d),
        "dw1": torch.empty(d, 2 * h),
    }

    def step() -> None:
        torch.mm(x, w1, out=bufs["h"])
        torch.mm(a, w2, out=bufs["y"])
        torch.mm(gy, w2.t(), out=bufs["da"])
        torch.mm(a.t(), gy, out=bufs["dw2"])
        torch.mm(dh, w1.t(), out=bufs["dx"])
        torch.mm(x.t(), dh, out=bufs["dw1"])

    return step


def gemm_peak(n: int = 2048) -> tuple[Callable[[], None], float]:
    a, b, c = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
    return (lambda: torch.mm(a, b, out=c)), 2.0 * n**3


def candidates(
    shape: Shape, our_backends: list[str], skip: frozenset[str] = frozenset()
) -> tuple[list[Candidate], list[str]]:
    """All runnable candidates for ``shape`` plus notes on the ones that cannot run."""
    torch.manual_seed(1)
    x = torch.randn(1, shape.tokens, shape.dim)
    g = torch.randn(1, shape.tokens, shape.dim)
    notes: list[str] = []
    out: list[Candidate] = []
    ref = build_ours(shape, "sorted", 0.0)
    for backend in our_backends:
        layer = ref if backend == "sorted" else build_ours(shape, backend, 0.0)
        out.append(
            Candidate(
                f"edgemoe/{backend}", "ours", True, fwd_bwd(layer, x, g, first), forward_of(layer, x, first)
            )
        )
    capped = build_ours(shape, "sorted", CAPPED_FACTOR)
    out.append(
        Candidate(
            "edgemoe/sorted cf=1", "ours", False, fwd_bwd(capped, x, g, first), forward_of(capped, x, first)
        )
    )
    builders: list[tuple[str, bool, Callable[[], nn.Module]]] = [
        ("hf-mixtral/eager", True, lambda: hf_mixtral(shape, ref, "eager")),
        ("hf-mixtral/grouped_mm", True, lambda: hf_mixtral(shape, ref, "grouped_mm")),
        ("deepspeed/dropless", True, lambda: deepspeed_moe(shape, ref, True)),
        ("deepspeed/cf=1", False, lambda: deepspeed_moe(shape, ref, False)),
        ("st-moe/cf=1", False, lambda: st_moe(shape, ref)),
    ]
    for name, dropless, build in builders:
        if name in skip:
            notes.append(f"{name}: not run (--skip)")
            continue
        if name.startswith("st-moe") and shape.top_k < 2:
            notes.append(f"{name}: not run, st-moe-pytorch supports only k >= 2")
            continue
        # st-moe builds dense [T, E, C] dispatch/combine tensors (C ~ k·T/E): T²·k floats each.
        st_moe_gb = 4 * shape.tokens**2 * shape.top_k / 2**30
        if name.startswith("st-moe") and st_moe_gb > ST_MOE_MAX_GB:
            notes.append(f"{name}: not run, its dense dispatch tensors need {st_moe_gb:.1f} GB each")
            continue
        try:
            module = build()
        except ImportError as exc:
            notes.append(f"{name}: not installed ({exc.name}); pip install -e '.[bench]'")
            continue
        out.append(
            Candidate(name, "anchor", dropless, fwd_bwd(module, x, g, first), forward_of(module, x, first))
        )
    out.append(Candidate("dense-floor", "floor", True, dense_floor(shape)))
    return out, notes


def loadavg() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where /proc is missing)."""
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def step_memory_mb(step: Callable[[], None]) -> float | None:
    """Run ``step`` once and return its resident-set growth (peak minus before), MB; None if unsupported."""
    try:
        gc.collect()
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        before = _status_kib("VmRSS")
    except OSError:
        step()
        return None
    step()
    return round((_status_kib("VmHWM") - before) / 1024, 1)


def measure(
    cands: list[Candidate],
    peak_step: Callable[[], None],
    warmup: int,
    rounds: int,
    slow_factor: float,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[dict[str, list[float]], list[str], dict[str, float | None]]:
    """Interleaved timing: each round runs every candidate once, in an order rotated per round.

    A candidate whose last warm-up run took more than ``slow_factor`` times ours (and over 5 s),
    or whose first run already took twice that, is not re-run: that run's time is kept as its only
    sample and it is listed as ``too_slow``. Such a candidate cannot be the fastest anchor, so the
    speedup figures do not depend on it. The first warm-up round also measures each candidate's
    memory (:func:`step_memory_mb`).
    """
    runs = [*[(c.name, c.step) for c in cands], ("gemm-peak", peak_step)]
    times: dict[str, list[float]] = {name: [] for name, _ in runs}
    memory: dict[str, float | None] = {}
    last: dict[str, float] = {}
    too_slow: list[str] = []
    for r in range(warmup + rounds):
        if slow_factor > 0 and 1 <= r <= warmup and r in (1, warmup):
            factor = slow_factor if r == warmup else 2 * slow_factor
            ours = last["edgemoe/sorted"]
            for n, t in last.items():
                if n not in too_slow and n != "gemm-peak" and t > max(factor * ours, 5.0):
                    too_slow.append(n)
                    times[n].append(t)
        shift = r % len(runs)
        for name, step in runs[shift:] + runs[:shift]:
            if r >= 1 and name in too_slow:
                continue
            t0 = clock()
            if r == 0 and warmup > 0 and name != "gemm-peak":
                memory[name] = step_memory_mb(step)
            else:
                step()
            dt = clock() - t0
            last[name] = dt
            if r >= warmup:
                times[name].append(dt)
    return times, too_slow, memory


def evaluate(
    shape: Shape,
    our_backends: list[str],
    warmup: int,
    rounds: int,
    slow_factor: float,
    clock: Callable[[], float] = time.perf_counter,
    skip: frozenset[str] = frozenset(),
) -> dict:
    load_start = loadavg()
    cands, notes = candidates(shape, our_backends, skip)
    peak_step, peak_flops = gemm_peak()
    # Timing (and memory) first: each candidate's first step is its memory measurement.
    times, too_slow, memory = measure(cands, peak_step, warmup, rounds, slow_factor, clock)
    ref_out = cands[0].forward()
    diffs = {}
    for c in cands:
        if c.forward is not None and c.dropless:
            diffs[c.name] = float((c.forward() - ref_out).abs().max())
    med = {name: statistics.median(v) for name, v in times.items()}
    peak = peak_flops / med.pop("gemm-peak")
    ours_dropless = med["edgemoe/sorted"]
    ours_capped = med["edgemoe/sorted cf=1"]
    results = {}
    anchor_ratios = {}
    for c in cands:
        t = med[c.name]
        entry = {
            "median_ms": round(1000 * t, 2),
            "min_ms": round(1000 * min(times[c.name]), 2),
            "tokens_per_s": round(shape.tokens / t, 1),
            "dropless": c.dropless,
            "runs": len(times[c.name]),
            "first_step_rss_growth_mb": memory.get(c.name),
        }
        if c.name in too_slow:
            entry["too_slow"] = True
        if c.kind == "anchor":
            mine = ours_dropless if c.dropless else ours_capped
            entry["ours_speedup"] = round(t / mine, 3)
            anchor_ratios[c.name] = t / mine
        results[c.name] = entry
    best_anchor = min(anchor_ratios, key=anchor_ratios.get) if anchor_ratios else None
    return {
        "shape": {**asdict(shape), "swiglu_hidden": shape.swiglu_hidden},
        "loadavg_start": load_start,
        "loadavg_end": loadavg(),
        "results": results,
        "best_anchor": best_anchor,
        "speedup_vs_best_anchor": round(anchor_ratios[best_anchor], 3) if best_anchor else None,
        "speedup_vs_fastest_anchor_any_semantics": round(
            min(med[c.name] for c in cands if c.kind == "anchor") / ours_dropless, 3
        )
        if anchor_ratios
        else None,
        "fraction_of_dense_floor": round(med["dense-floor"] / ours_dropless, 3),
        "fraction_of_gemm_peak": round(shape.active_flops() / ours_dropless / peak, 3),
        "gemm_peak_gflops": round(peak / 1e9, 1),
        "ours_gflops": round(shape.active_flops() / ours_dropless / 1e9, 1),
        "max_abs_diff_vs_ours": diffs,
        "notes": notes,
    }


def _label(row: dict) -> str:
    shape = row["shape"]
    return f"E={shape['num_experts']} k={shape['top_k']} T={shape['tokens']} H={shape['swiglu_hidden']}"


def _names(report: dict) -> list[str]:
    names: list[str] = []
    for row in report["shapes"]:
        for name in row["results"]:
            if name not in names:
                names.append(name)
    return names


def markdown_table(report: dict) -> str:
    """The docs/benchmarks.md table of a results JSON (median ms per candidate, ratios)."""
    names = _names(report)
    lines = [
        "| shape | " + " | ".join(names) + " | speedup vs best anchor | of dense floor | of GEMM peak |",
        "|---" * (len(names) + 4) + "|",
    ]
    for row in report["shapes"]:
        label = _label(row)
        cells = []
        for name in names:
            entry = row["results"].get(name)
            if entry is None:
                cells.append("n/a")
                continue
            mark = "¹" if entry.get("too_slow") else ""
            cells.append(f"{entry['median_ms']:.0f}{mark}")
        best = f"**{row['speedup_vs_best_anchor']:.2f}x** ({row['best_anchor']})"
        frac = f"{row['fraction_of_dense_floor']:.2f} | {row['fraction_of_gemm_peak']:.2f}"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {best} | {frac} |")
    return "\n".join(lines)


def memory_table(report: dict, min_experts: int = 64) -> str:
    """First-step resident-set growth (MB) per candidate at the shapes with >= ``min_experts``."""
    names = [n for n in _names(report) if n != "dense-floor"]
    lines = ["| shape | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for row in report["shapes"]:
        if row["shape"]["num_experts"] < min_experts:
            continue
        cells = []
        for name in names:
            mb = row["results"].get(name, {}).get("first_step_rss_growth_mb")
            cells.append("n/a" if mb is None else f"{mb:.0f}")
        lines.append(f"| {_label(row)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(rows: list[dict]) -> dict:
    """The layer's speed targets: default shape >= 1.2x / 0.85 of the floor; fine-grained T=8192 shapes
    >= 1.5x / 0.6 of the floor; never slower than any anchor of the same semantics anywhere."""
    default = next((r for r in rows if r["shape"]["num_experts"] == 8 and r["shape"]["tokens"] == 4096), None)
    speedups = [r["speedup_vs_best_anchor"] for r in rows if r["speedup_vs_best_anchor"] is not None]
    fine_big = [r for r in rows if r["shape"]["expert_hidden"] and r["shape"]["tokens"] == 8192]
    fine_speed = [r["speedup_vs_best_anchor"] for r in fine_big if r["speedup_vs_best_anchor"] is not None]
    fine_floor = [r["fraction_of_dense_floor"] for r in fine_big]
    return {
        "default_speedup_vs_best_anchor": default and default["speedup_vs_best_anchor"],
        "default_fraction_of_dense_floor": default and default["fraction_of_dense_floor"],
        "default_targets_met": default is not None
        and (default["speedup_vs_best_anchor"] or 0) >= 1.2
        and default["fraction_of_dense_floor"] >= 0.85,
        "min_speedup_anywhere": min(speedups) if speedups else None,
        "never_slower": bool(speedups) and min(speedups) >= 1.0,
        "fine_t8192_min_speedup": min(fine_speed) if fine_speed else None,
        "fine_t8192_min_fraction_of_dense_floor": min(fine_floor) if fine_floor else None,
        "fine_t8192_targets_met": bool(fine_speed) and min(fine_speed) >= 1.5 and min(fine_floor) >= 0.6,
    }


def cpu_time_by_op(step: Callable[[], None], steps: int) -> dict[str, float]:
    """CPU seconds of the calling thread per ATen op and input shapes, averaged over ``steps``.

    Thread CPU time is what a single-threaded step costs regardless of other jobs on the machine
    (wall-clock profiles on a shared CPU mostly measure the neighbours).
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    totals: dict[str, float] = {}

    class Timer(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            shapes = [list(a.shape) for a in args if isinstance(a, torch.Tensor)]
            t0 = time.thread_time()
            out = func(*args, **(kwargs or {}))
            key = f"{func.__name__} {shapes}"
            totals[key] = totals.get(key, 0.0) + (time.thread_time() - t0) / steps
            return out

    with Timer():
        for _ in range(steps):
            step()
    return totals


def profile_table(shape: Shape, steps: int = 2) -> str:
    """Where our default backend's step goes at ``shape``: torch.profiler's table (wall time at
    the configured threads, grouped by op and input shapes) and single-thread CPU time per op."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(1)
    x, g = torch.randn(1, shape.tokens, shape.dim), torch.randn(1, shape.tokens, shape.dim)
    step = fwd_bwd(build_ours(shape, "sorted", 0.0), x, g, first)
    for _ in range(2):
        step()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            step()
    wall = (time.perf_counter() - t0) / steps
    table = prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=16, max_name_column_width=28, max_shapes_column_width=60
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    totals = cpu_time_by_op(step, steps)
    torch.set_num_threads(threads)
    total = sum(totals.values())
    lines = [f"# single-thread CPU time per step: {1000 * total:.0f} ms"]
    for key, sec in sorted(totals.items(), key=lambda kv: -kv[1])[:16]:
        lines.append(f"{1000 * sec:8.1f} ms {100 * sec / total:5.1f} %  {key}")
    head = f"# {shape.label()}: {steps} steps, {1000 * wall:.0f} ms/step wall, loadavg {loadavg()}"
    return "\n".join([head, table, *lines])


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"torch": torch.__version__, "python": platform.python_version()}
    for name in ("transformers", "deepspeed", "st_moe_pytorch"):
        try:
            from importlib.metadata import version

            out[name] = version(name.replace("_", "-"))
        except Exception:
            out[name] = None
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="default shape + two E=64 shapes, 5 rounds")
    parser.add_argument("--fine", action="store_true", help="default shape + the fine-grained sweep only")
    parser.add_argument(
        "--profile", default=None, metavar="E,K,T", help="profile ours at one fine-grained shape and exit"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--clock",
        choices=["wall", "thread"],
        default="wall",
        help="thread: one thread, each step timed by its CPU time (robust on a shared machine)",
    )
    parser.add_argument("--rounds", type=int, default=None, help="measured rounds (>= 3)")
    parser.add_argument(
        "--warmup", type=int, default=2, help="warm-up rounds (the first also measures memory)"
    )
    parser.add_argument(
        "--slow-factor",
        type=float,
        default=2.5,
        help="time a candidate only once if its warm-up took this many times ours (0 = never)",
    )
    parser.add_argument("--no-sweep", action="store_true", help="default shape only")
    parser.add_argument("--tokens", default=None, help="keep only sweep shapes with these T (e.g. 8192)")
    parser.add_argument(
        "--shapes", default=None, metavar="E,K,T;...", help="run these fine-grained shapes only (no default)"
    )
    parser.add_argument("--skip", default="", help="anchors not to run, comma-separated names")
    parser.add_argument(
        "--backends", default="sorted,padded,loop", help="our backends timed at the default shape"
    )
    parser.add_argument("--sweep-backends", default="sorted", help="our backends timed in the sweep")
    parser.add_argument("--out", type=Path, default=None, help="default results/moe_layer[_quick].json")
    parser.add_argument("--table", type=Path, default=None, help="print the markdown table of a results JSON")
    args = parser.parse_args(argv)
    if args.table is not None:
        report = json.loads(args.table.read_text())
        print(markdown_table(report) + "\n\n" + memory_table(report))
        return 0

    if args.clock == "thread":
        args.threads = 1
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    torch.set_num_threads(args.threads)
    if args.profile is not None:
        num_experts, top_k, tokens = (int(v) for v in args.profile.split(","))
        print(profile_table(Shape.fine(num_experts, top_k, tokens)))
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    rounds = max(3, args.rounds or (5 if args.quick else 7))
    name = "moe_layer_quick" if args.quick else "moe_layer_fine" if args.fine else "moe_layer"
    out_path = args.out or HERE / "results" / f"{name}.json"
    default = Shape(512, 1024, 8, 2, 4096)
    fine = [Shape.fine(e, k, t) for t in (8192, 1024) for e in (64, 128) for k in (2, 8)]
    shapes = [default]
    if args.quick:
        shapes += [Shape.fine(64, 2, 1024), Shape.fine(64, 8, 1024)]
    elif args.fine:
        shapes += fine
    elif not args.no_sweep:
        shapes += [Shape(512, 1024, e, k, t) for e in (4, 8, 16, 64) for k in (1, 2) for t in (1024, 8192)]
        shapes += [s for s in fine if s.top_k != 2 or s.num_experts != 64]  # E=64 k=2 is in both
    if args.tokens:
        keep = {int(t) for t in args.tokens.split(",")}
        shapes = [default, *(s for s in shapes[1:] if s.tokens in keep)]
    if args.shapes:
        shapes = [Shape.fine(*(int(v) for v in item.split(","))) for item in args.shapes.split(";")]
    skip = frozenset(n for n in args.skip.split(",") if n)

    def backend_list(text: str) -> list[str]:
        names = [b for b in text.split(",") if b]
        return names if "sorted" in names else ["sorted", *names]

    report = {
        "benchmark": "moe_layer",
        "command": "python benchmarks/moe_layer.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "threads": args.threads,
        "clock": args.clock,
        "rounds": rounds,
        "warmup": args.warmup,
        "slow_factor": args.slow_factor,
        "dtype": "float32",
        "loss": "(out * g).sum()",
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "loadavg_start": loadavg(),
        "versions": versions(),
        "shapes": [],
    }
    for shape in shapes:
        print(f"# {shape.label()}", file=sys.stderr, flush=True)
        backends = backend_list(args.backends if shape == default else args.sweep_backends)
        row = evaluate(shape, backends, args.warmup, rounds, args.slow_factor, clock, skip)
        report["shapes"].append(row)
        for name, entry in row["results"].items():
            extra = f"  ours x{entry['ours_speedup']}" if "ours_speedup" in entry else ""
            print(f"  {name:24s} {entry['median_ms']:9.1f} ms{extra}", file=sys.stderr, flush=True)
        print(
            f"  speedup_vs_best_anchor={row['speedup_vs_best_anchor']} ({row['best_anchor']}), "
            f"fraction_of_dense_floor={row['fraction_of_dense_floor']}, "
            f"fraction_of_gemm_peak={row['fraction_of_gemm_peak']}",
            file=sys.stderr,
            flush=True,
        )
        # Written after every shape, so a long sweep that is stopped keeps what it measured.
        report["loadavg_end"] = loadavg()
        report["complete"] = len(report["shapes"]) == len(shapes)
        report["summary"] = summary(report["shapes"])
        write_json(out_path, report)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
