"""MoE² gateway: overhead, a slow expert under a deadline, and resource stability under load.

Everything runs on loopback in separate processes: tiny OpenAI-compatible experts
(``python -m edgemoe.testing``, each answer held ``--backend-delay`` seconds to stand in for model
compute, which sleeps and costs no CPU), gateways started with the real ``edgemoe serve`` command,
and this load generator (asyncio, one keep-alive connection per client through the same lean pool
the gateway uses: an httpx client at 100 in flight spends more CPU per request than the gateway
does and would measure itself).

(a) **Overhead**, 100 concurrent clients, ``direct`` and ``gateway`` phases alternating for
``--rounds`` rounds (latencies pooled per path):

- ``direct-mc`` POSTs expert 1's ``/v1/completions`` (the exact request the gateway makes for a
  multiple-choice question); ``gateway-mc`` POSTs ``/v1/moe2/answer`` with ``top_k: 1``;
- ``direct-stream`` streams expert 1's ``/v1/chat/completions``; ``gateway-stream`` streams the
  gateway's with ``model`` naming expert 1 (one expert, so the difference is the gateway's). For
  streams the figure is the time to the first content token.

(b) **A slow expert**: three experts, one of them answering after ``--slow-delay`` s, beyond the
request's ``latency_budget_s`` (``--budget``); ``/v1/moe2/answer`` with ``top_k: 3`` through a gateway
over three healthy experts (``healthy3``) and one over two healthy + the slow one (``delayed3``),
alternating. Targets: delayed p99 <= budget + 50 ms; delayed throughput >= 80 % of healthy. The
delayed gateway's first round starts cold, so the requests it sends before its breaker ejects the
slow expert are measured too.

(c) **Stability**: ``--soak`` s of mixed load (multiple choice and streams) on the healthy gateway,
its RSS and open file descriptors sampled every second.

Clients are closed-loop with think time so the offered load is ``--rate`` requests/s in total
(an open firehose would measure CPU saturation of a 2-core box, not the gateway). Every error
(non-200, timeout, connection failure) is counted; the run fails if there is any.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import yaml

from edgemoe.collab.backends.http_pool import AsyncHTTPPool, PoolError, StatusError

HERE = Path(__file__).resolve().parent
QUESTION = {
    "question": "Which layer of the network stack routes packets between hosts?",
    "choices": ["physical", "network", "session", "presentation"],
    "subject": "computer_security",
}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, deadline_s: float = 60.0) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            if httpx.get(url, timeout=1.0, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up within {deadline_s:.0f} s")


def proc_resources(pid: int) -> tuple[float, int]:
    """(RSS in MiB, open file descriptors) of a process (Linux /proc; NaN elsewhere)."""
    try:
        rss_kb = next(
            int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
            if line.startswith("VmRSS:")
        )  # fmt: skip
        return rss_kb / 1024, len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, StopIteration):
        return float("nan"), -1


async def first_token_stream(pool: AsyncHTTPPool, path: str, body: dict) -> float:
    """Stream one chat completion; seconds to its first non-empty content delta (raises if none)."""
    t0 = time.perf_counter()
    ttft, buffer = None, b""
    async for data in pool.stream("POST", path, body):
        buffer += data
        while ttft is None and b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            payload = event.removeprefix(b"data: ")
            if payload.startswith(b"{"):
                choices = json.loads(payload).get("choices") or []
                if choices and (choices[0].get("delta") or {}).get("content"):
                    ttft = time.perf_counter() - t0
    if ttft is None:
        raise PoolError("stream ended without content")
    return ttft


async def run_phase(
    name: str,
    url: str,
    body: dict,
    clients: int,
    rate: float,
    seconds: float,
    warmup: float,
    sample_pid: int | None = None,
) -> dict:
    """Closed-loop clients for ``warmup + seconds``; latencies of requests started after warm-up.

    ``body`` with ``"stream": true`` is streamed and timed to its first token; a list of bodies is
    used in turn. ``sample_pid``: record that process's RSS and fds every second.
    """
    think = clients / rate
    latencies: list[float] = []
    errors: dict[str, int] = {}
    samples: list[tuple[float, float, int]] = []
    t_start = time.perf_counter()
    t_measure = t_start + warmup
    t_end = t_measure + seconds
    parts = urlsplit(url)
    pool = AsyncHTTPPool(f"{parts.scheme}://{parts.netloc}", max_connections=clients)
    bodies = body if isinstance(body, list) else [body]

    async def one_client(seed: int) -> None:
        rng = random.Random(seed)
        await asyncio.sleep(rng.uniform(0, think))  # spread the clients' phases
        k = seed
        while True:
            t0 = time.perf_counter()
            if t0 >= t_end:
                return
            req = bodies[k % len(bodies)]
            k += 1
            try:
                if req.get("stream"):
                    dt = await asyncio.wait_for(first_token_stream(pool, parts.path, req), 30.0)
                    ok, key = True, ""
                else:
                    status, _ = await asyncio.wait_for(pool.request("POST", parts.path, req), 30.0)
                    ok, key = status == 200, f"http_{status}"
                    dt = time.perf_counter() - t0
            except (PoolError, StatusError, asyncio.TimeoutError) as exc:
                ok, key, dt = False, type(exc).__name__, time.perf_counter() - t0
            if t0 >= t_measure:
                if ok:
                    latencies.append(dt)
                else:
                    errors[key] = errors.get(key, 0) + 1
            await asyncio.sleep(max(0.0, rng.expovariate(1.0 / think) - (time.perf_counter() - t0)))

    async def sampler() -> None:
        while time.perf_counter() < t_end:
            samples.append((time.perf_counter() - t_start, *proc_resources(sample_pid)))
            await asyncio.sleep(1.0)

    try:
        extra = [sampler()] if sample_pid else []
        await asyncio.gather(*(one_client(i) for i in range(clients)), *extra)
    finally:
        await pool.aclose()
    lat = np.array(latencies) * 1e3
    out = {
        "phase": name,
        "latencies_ms": lat.tolist(),
        "requests": int(lat.size),
        "errors": errors,
        "achieved_rps": float(lat.size / seconds),
        "p50_ms": float(np.percentile(lat, 50)) if lat.size else float("nan"),
        "p90_ms": float(np.percentile(lat, 90)) if lat.size else float("nan"),
        "p99_ms": float(np.percentile(lat, 99)) if lat.size else float("nan"),
        "max_ms": float(lat.max()) if lat.size else float("nan"),
    }
    if samples:
        out["resources"] = [{"t_s": round(t, 2), "rss_mib": round(r, 2), "fds": f} for t, r, f in samples]
    return out


def start_experts(delays: list[float], env: dict, procs: list) -> list[str]:
    urls = []
    for seed, delay in enumerate(delays, start=1):
        port = free_port()
        cmd = [
            sys.executable,
            "-m",
            "edgemoe.testing",
            "--port",
            str(port),
            "--seed",
            str(seed),
            "--delay",
            str(delay),
        ]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL))
        urls.append(f"http://127.0.0.1:{port}")
    return urls


def start_gateway(urls: dict[str, str], tmp: Path, env: dict, procs: list) -> tuple[str, int]:
    port = free_port()
    hardware = ("jetson-orin-nano", "jetson-agx-orin", "rtx-4090")
    config = {
        "experts": [
            {"name": name, "hardware": hardware[i % 3], "params_b": 0.2,
             "backend": {"kind": "openai", "url": url, "timeout_s": 10}}
            for i, (name, url) in enumerate(urls.items())
        ],
        "budgets": {"default_latency_s": 5.0},
        "serve": {"port": port},
    }  # fmt: skip
    cfg_path = tmp / f"collab-{port}.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    log = (tmp / f"gateway-{port}.log").open("w")
    cmd = [sys.executable, "-m", "edgemoe", "serve", "--config", str(cfg_path)]
    procs.append(subprocess.Popen(cmd, env=env, stderr=log))
    return f"http://127.0.0.1:{port}", procs[-1].pid


def served_latencies_ms(log: Path, route: str) -> list[float]:
    """Latencies the gateway itself logged for ``route`` (from reading the request to its answer)."""
    out = []
    for line in log.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("msg") == "request" and rec.get("route") == route:
            out.append(float(rec["latency_ms"]))
    return out


def pooled_percentiles(values: list[float]) -> dict[int, float]:
    return {q: float(np.percentile(values, q)) for q in (50, 90, 99)} if values else {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--rate", type=float, default=200.0, help="offered requests/s over all clients")
    parser.add_argument("--seconds", type=float, default=8.0, help="measured time per phase")
    parser.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds on each path first")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per comparison")
    parser.add_argument("--backend-delay", type=float, default=0.02, help="simulated compute per answer (s)")
    parser.add_argument("--slow-delay", type=float, default=2.0, help="the slow expert's delay (s), part (b)")
    parser.add_argument("--budget", type=float, default=0.5, help="latency budget of part (b)'s requests (s)")
    parser.add_argument("--soak", type=float, default=60.0, help="seconds of part (c)")
    parser.add_argument(
        "--quick", action="store_true", help="short run (3 s phases, 10 s soak) for a smoke check"
    )
    parser.add_argument("--out", type=Path, default=HERE / "results" / "gateway.json")
    args, _ = parser.parse_known_args(argv)
    if args.quick:
        args.seconds, args.warmup, args.rounds, args.soak = 3.0, 1.0, 1, 10.0

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    procs: list[subprocess.Popen] = []
    tmp = Path(tempfile.mkdtemp(prefix="edgemoe-gateway-bench-"))
    try:
        e1, e2, e3, slow = start_experts([args.backend_delay] * 3 + [args.slow_delay], env, procs)
        healthy, healthy_pid = start_gateway({"e1": e1, "e2": e2, "e3": e3}, tmp, env, procs)
        delayed, delayed_pid = start_gateway({"e1": e1, "e2": e2, "slow": slow}, tmp, env, procs)
        for url in (e1, e2, e3, slow):
            wait_ready(url + "/health")
        wait_ready(healthy + "/health")
        wait_ready(delayed + "/health")

        from edgemoe.collab.prompts import mc_prompt

        prompt = mc_prompt(QUESTION["question"], QUESTION["choices"], QUESTION["subject"])
        mc_direct = {
            "model": "default",
            "prompt": prompt,
            "max_tokens": 1,
            "temperature": 0.0,
            "logprobs": 20,
        }
        chat = {
            "messages": [{"role": "user", "content": "Name a prime number."}],
            "max_tokens": 8,
            "stream": True,
        }
        budgeted = {**QUESTION, "top_k": 3, "latency_budget_s": args.budget}
        overhead_pairs = {
            "mc": (("direct-mc", e1 + "/v1/completions", mc_direct),
                   ("gateway-mc", healthy + "/v1/moe2/answer", {**QUESTION, "top_k": 1})),
            "stream": (("direct-stream", e1 + "/v1/chat/completions", {**chat, "model": "default"}),
                       ("gateway-stream", healthy + "/v1/chat/completions", {**chat, "model": "e1"})),
        }  # fmt: skip
        slow_pair = (("healthy3", healthy + "/v1/moe2/answer", budgeted),
                     ("delayed3", delayed + "/v1/moe2/answer", budgeted))  # fmt: skip
        # Warm every path of the healthy gateway and the experts (connections, first-call imports).
        for _, (a, b) in overhead_pairs.items():
            for _, url, body in (a, b):
                asyncio.run(run_phase("warm-up", url, body, args.clients, args.rate, args.warmup, 0.0))
        asyncio.run(run_phase("warm-up", *slow_pair[0][1:], args.clients, args.rate, args.warmup, 0.0))

        def phase(name: str, url: str, body: dict | list, seconds: float, pid: int | None = None) -> dict:
            gw_pid = delayed_pid if url.startswith(delayed) else healthy_pid
            cpu0 = cpu_seconds(gw_pid)
            res = asyncio.run(run_phase(name, url, body, args.clients, args.rate, seconds, 0.0, pid))
            res["gateway_cpu_ms_per_request"] = (
                (cpu_seconds(healthy_pid) - cpu0) / max(res["requests"], 1) * 1e3
            )
            print(
                f"{name:>15}: {res['requests']:6d} ok, errors {sum(res['errors'].values())}, "
                f"{res['achieved_rps']:6.1f} req/s, p50 {res['p50_ms']:.2f} ms, p99 {res['p99_ms']:.2f} ms, "
                f"max {res['max_ms']:.1f} ms, gateway CPU {res['gateway_cpu_ms_per_request']:.2f} ms/req",
                flush=True,
            )
            return res

        results, pooled = [], {}
        # (a) and (b): interleaved rounds, so drift in the machine's load hits both sides alike.
        for _ in range(args.rounds):
            for a, b in [*overhead_pairs.values(), slow_pair]:
                for name, url, body in (a, b):
                    res = phase(name, url, body, args.seconds)
                    pooled.setdefault(name, []).extend(res.pop("latencies_ms"))
                    results.append(res)
        pct = {name: pooled_percentiles(v) for name, v in pooled.items()}
        overhead = {
            kind: {"p50_ms": pct[b[0]][50] - pct[a[0]][50], "p99_ms": pct[b[0]][99] - pct[a[0]][99]}
            for kind, (a, b) in overhead_pairs.items()
        }
        rps = {
            n: float(np.mean([r["achieved_rps"] for r in results if r["phase"] == n]))
            for n in ("healthy3", "delayed3")
        }
        slow_expert = {
            "budget_ms": args.budget * 1e3,
            "delayed_p99_ms": pct["delayed3"][99],
            "delayed_max_ms": max(r["max_ms"] for r in results if r["phase"] == "delayed3"),
            "p99_target_ms": args.budget * 1e3 + 50,
            "meets_p99": pct["delayed3"][99] <= args.budget * 1e3 + 50,
            "throughput_ratio": rps["delayed3"] / rps["healthy3"],
            "meets_throughput": rps["delayed3"] >= 0.8 * rps["healthy3"],
        }
        # The same requests as the gateway timed them, without the wait to be read at all.
        served = served_latencies_ms(tmp / f"gateway-{urlsplit(delayed).port}.log", "/v1/moe2/answer")
        slow_expert["served_by_gateway"] = {
            "requests": len(served),
            **{f"p{q}_ms": v for q, v in pooled_percentiles(served).items()},
            "max_ms": max(served, default=float("nan")),
        }
        # (c) stability: mixed load on the healthy gateway, its RSS and fds every second.
        soak = phase(
            "soak", healthy + "/v1/chat/completions", [{**chat, "model": "edgemoe-moe2"}, {**chat, "stream": False}],
            args.soak, healthy_pid,
        )  # fmt: skip
        mc_soak = soak.pop("latencies_ms")
        samples = soak["resources"]
        tenth = max(1, len(samples) // 6)
        first, last = samples[:tenth], samples[-tenth:]
        stability = {
            "seconds": args.soak,
            "requests": soak["requests"],
            "rss_mib_first": float(np.mean([x["rss_mib"] for x in first])),
            "rss_mib_last": float(np.mean([x["rss_mib"] for x in last])),
            "rss_mib_max": max(x["rss_mib"] for x in samples),
            "fds_first": float(np.mean([x["fds"] for x in first])),
            "fds_last": float(np.mean([x["fds"] for x in last])),
            "fds_max": max(x["fds"] for x in samples),
            "p99_ms": float(np.percentile(mc_soak, 99)) if mc_soak else float("nan"),
        }
        results.append(soak)
        total_errors = sum(sum(r["errors"].values()) for r in results)
        healthy_metrics = httpx.get(healthy + "/metrics", trust_env=False).text
        delayed_metrics = httpx.get(delayed + "/metrics", trust_env=False).text
        summary = {
            "benchmark": "gateway",
            "clients": args.clients,
            "offered_rps": args.rate,
            "seconds_per_phase": args.seconds,
            "backend_delay_s": args.backend_delay,
            "rounds": args.rounds,
            "phases": results,
            "pooled_percentiles_ms": pct,
            "overhead": overhead,
            "target_p50_overhead_ms": 5.0,
            "meets_target": {k: v["p50_ms"] <= 5.0 for k, v in overhead.items()},
            "slow_expert": slow_expert,
            "stability": stability,
            "errors": total_errors,
            "gateway_degraded_responses": _metric(healthy_metrics, "edgemoe_degraded_responses_total"),
            "slow_expert_calls": {
                o: _metric(delayed_metrics, f'edgemoe_expert_calls_total{{expert="slow",outcome="{o}"}}')
                for o in ("ok", "timeout", "failed", "cancelled")
            },
            "machine": {
                "cpus": os.cpu_count(),
                "loadavg": os.getloadavg(),
                "python": platform.python_version(),
                "platform": platform.platform(),
            },
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
        for kind, o in overhead.items():
            print(f"(a) {kind} overhead: p50 {o['p50_ms']:+.2f} ms (target <= 5), p99 {o['p99_ms']:+.2f} ms")
        print(
            f"(b) slow expert: p99 {slow_expert['delayed_p99_ms']:.1f} ms (target <= {slow_expert['p99_target_ms']:.0f}), "
            f"throughput {slow_expert['throughput_ratio']:.2f} of healthy (target >= 0.80); as the gateway "
            f"timed them: p99 {slow_expert['served_by_gateway'].get('p99_ms', float('nan')):.1f} ms, "
            f"max {slow_expert['served_by_gateway']['max_ms']:.1f} ms"
        )
        print(
            f"(c) {args.soak:.0f} s: RSS {stability['rss_mib_first']:.1f} -> {stability['rss_mib_last']:.1f} MiB, "
            f"fds {stability['fds_first']:.0f} -> {stability['fds_last']:.0f}; errors {total_errors}; written {args.out}"
        )
        return 0 if total_errors == 0 else 1
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return float("nan")


if __name__ == "__main__":
    sys.exit(main())
