"""MoE² gateway overhead: 100 concurrent clients, through the gateway vs straight to a backend.

Everything runs on loopback in separate processes: two tiny OpenAI-compatible experts
(``python -m edgemoe.testing``, each answer held ``--backend-delay`` seconds to stand
in for model compute, which sleeps and costs no CPU), the gateway started with the real
``edgemoe serve`` command, and this load generator (asyncio, one keep-alive connection per
client through the same lean pool the gateway uses: an httpx client at 100 in flight spends more
CPU per request than the gateway does and would measure itself).

Phases, each ``--seconds`` long after an unmeasured warm-up of every path, with the same clients
and request rate; ``direct`` and ``gateway`` alternate for ``--rounds`` rounds and their latencies
are pooled:

- ``direct``: each client POSTs the backend's ``/v1/completions`` (the exact request the gateway
  makes for a multiple-choice question);
- ``gateway``: each client POSTs ``/v1/moe2/answer`` with ``top_k: 1`` (one expert per request, so
  the difference from ``direct`` is the gateway's added latency);
- ``gateway-fanout``: ``top_k: 2``, both experts concurrently (reported, not compared).

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

from edgemoe.collab.backends.http_pool import AsyncHTTPPool, PoolError

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


async def run_phase(
    name: str, url: str, body: dict, clients: int, rate: float, seconds: float, warmup: float
) -> dict:
    """Closed-loop clients for ``warmup + seconds``; latencies of requests started after warm-up."""
    think = clients / rate
    latencies: list[float] = []
    errors: dict[str, int] = {}
    t_start = time.perf_counter()
    t_measure = t_start + warmup
    t_end = t_measure + seconds
    parts = urlsplit(url)
    pool = AsyncHTTPPool(f"{parts.scheme}://{parts.netloc}", max_connections=clients)

    async def one_client(seed: int) -> None:
        rng = random.Random(seed)
        await asyncio.sleep(rng.uniform(0, think))  # spread the clients' phases
        while True:
            t0 = time.perf_counter()
            if t0 >= t_end:
                return
            try:
                status, _ = await asyncio.wait_for(pool.request("POST", parts.path, body), 30.0)
                ok, key = status == 200, f"http_{status}"
            except (PoolError, asyncio.TimeoutError) as exc:
                ok, key = False, type(exc).__name__
            dt = time.perf_counter() - t0
            if t0 >= t_measure:
                if ok:
                    latencies.append(dt)
                else:
                    errors[key] = errors.get(key, 0) + 1
            await asyncio.sleep(max(0.0, rng.expovariate(1.0 / think) - dt))

    try:
        await asyncio.gather(*(one_client(i) for i in range(clients)))
    finally:
        await pool.aclose()
    lat = np.array(latencies) * 1e3
    return {
        "phase": name,
        "latencies_ms": lat.tolist(),
        "requests": int(lat.size),
        "errors": errors,
        "achieved_rps": float(lat.size / seconds),
        "p50_ms": float(np.percentile(lat, 50)) if lat.size else float("nan"),
        "p90_ms": float(np.percentile(lat, 90)) if lat.size else float("nan"),
        "p99_ms": float(np.percentile(lat, 99)) if lat.size else float("nan"),
        "mean_ms": float(lat.mean()) if lat.size else float("nan"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--rate", type=float, default=200.0, help="offered requests/s over all clients")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured time per phase")
    parser.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds on each path first")
    parser.add_argument("--rounds", type=int, default=2, help="alternating direct/gateway rounds")
    parser.add_argument("--backend-delay", type=float, default=0.02, help="simulated compute per answer (s)")
    parser.add_argument("--quick", action="store_true", help="short run (3 s phases) for a smoke check")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "gateway.json")
    args, _ = parser.parse_known_args(argv)
    if args.quick:
        args.seconds, args.warmup, args.rounds = 3.0, 1.0, 1

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    procs: list[subprocess.Popen] = []
    tmp = Path(tempfile.mkdtemp(prefix="edgemoe-gateway-bench-"))
    try:
        backend_urls = []
        for seed in (1, 2):
            port = free_port()
            cmd = [
                sys.executable,
                "-m",
                "edgemoe.testing",
                "--port",
                str(port),
                "--seed",
                str(seed),
            ]
            cmd += ["--delay", str(args.backend_delay)]
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL))
            backend_urls.append(f"http://127.0.0.1:{port}")
        gw_port = free_port()
        config = {
            "experts": [
                {"name": f"tiny-{i}", "hardware": hw, "params_b": 0.2,
                 "backend": {"kind": "openai", "url": url, "timeout_s": 10}}
                for i, (url, hw) in enumerate(zip(backend_urls, ("jetson-orin-nano", "jetson-agx-orin")))
            ],
            "serve": {"port": gw_port},
        }  # fmt: skip
        cfg_path = tmp / "collab.yaml"
        cfg_path.write_text(yaml.safe_dump(config))
        log = (tmp / "gateway.log").open("w")
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "edgemoe", "serve", "--config", str(cfg_path)], env=env, stderr=log
            )
        )
        for url in backend_urls:
            wait_ready(url + "/health")
        gateway = f"http://127.0.0.1:{gw_port}"
        wait_ready(gateway + "/health")

        from edgemoe.collab.prompts import mc_prompt

        prompt = mc_prompt(QUESTION["question"], QUESTION["choices"], QUESTION["subject"])
        direct_body = {
            "model": "default",
            "prompt": prompt,
            "max_tokens": 1,
            "temperature": 0.0,
            "logprobs": 20,
        }
        direct_phase = ("direct", backend_urls[0] + "/v1/completions", direct_body)
        gateway_phase = ("gateway", gateway + "/v1/moe2/answer", {**QUESTION, "top_k": 1})
        fanout_phase = ("gateway-fanout", gateway + "/v1/moe2/answer", {**QUESTION, "top_k": 2})
        # Warm every path first (connections, first-call imports); then alternate direct and gateway
        # rounds so drift in what else loads the machine hits both alike.
        asyncio.run(run_phase("warm-up", *fanout_phase[1:], args.clients, args.rate, args.warmup, 0.0))
        asyncio.run(run_phase("warm-up", *direct_phase[1:], args.clients, args.rate, args.warmup, 0.0))
        phases = [direct_phase, gateway_phase] * args.rounds + [fanout_phase]
        results, pooled = [], {}
        gw_pid = procs[-1].pid
        for name, url, body in phases:
            cpu0 = cpu_seconds(gw_pid)
            res = asyncio.run(run_phase(name, url, body, args.clients, args.rate, args.seconds, 0.0))
            # Gateway CPU per request: a figure that, unlike latency, barely depends on what else
            # runs on the machine.
            res["gateway_cpu_ms_per_request"] = (cpu_seconds(gw_pid) - cpu0) / max(res["requests"], 1) * 1e3
            pooled.setdefault(name, []).extend(res.pop("latencies_ms"))
            results.append(res)
            print(
                f"{name:>15}: {res['requests']:6d} ok, errors {sum(res['errors'].values())}, "
                f"{res['achieved_rps']:6.1f} req/s, p50 {res['p50_ms']:.2f} ms, p99 {res['p99_ms']:.2f} ms, "
                f"gateway CPU {res['gateway_cpu_ms_per_request']:.2f} ms/req",
                flush=True,
            )
        pct = {name: {q: float(np.percentile(v, q)) for q in (50, 90, 99)} for name, v in pooled.items()}
        overhead = {
            "p50_ms": pct["gateway"][50] - pct["direct"][50],
            "p99_ms": pct["gateway"][99] - pct["direct"][99],
        }
        total_errors = sum(sum(r["errors"].values()) for r in results)
        metrics = httpx.get(gateway + "/metrics", trust_env=False).text
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
            "meets_target": overhead["p50_ms"] <= 5.0,
            "errors": total_errors,
            "gateway_degraded_responses": _metric(metrics, "edgemoe_degraded_responses_total"),
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "platform": platform.platform(),
            },
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
        print(
            f"gateway overhead: p50 {overhead['p50_ms']:+.2f} ms (target <= 5), p99 {overhead['p99_ms']:+.2f} ms; "
            f"errors {total_errors}; written {args.out}"
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
            return float(line.split()[1])
    return float("nan")


if __name__ == "__main__":
    sys.exit(main())
