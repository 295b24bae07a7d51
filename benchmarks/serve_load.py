"""Load test of `cairn serve`: N concurrent streaming clients for a fixed time, on 127.0.0.1 only.

Prints, per client count: requests/s, aggregate generated tokens/s, time to first token and inter-token latency
p50/p99, error count; then the ratio of aggregate tokens/s at 16 clients to 1 client.

    python benchmarks/serve_load.py MODEL_DIR [--clients 1,16,64] [--duration 60] [--max-tokens 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for tests.serverproc
from tests.serverproc import ServerProcess


def percentile(xs, q):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def client_loop(http, url, deadline, max_tokens, i, out):
    n = 0
    while time.monotonic() < deadline:
        body = {"model": "m", "prompt": f"Request {i}.{n}: the river starts", "max_tokens": max_tokens,
                "temperature": 0.8, "seed": i * 1000 + n, "stream": True, "ignore_eos": True,
                "stream_options": {"include_usage": True}}
        n += 1
        t0 = time.perf_counter()
        last, first, tokens = None, None, 0
        try:
            async with http.stream("POST", url + "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    out["errors"] += 1
                    await r.aread()
                    continue
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        out["errors"] += 1
                        break
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
                    if chunk["choices"] and chunk["choices"][0]["text"]:
                        now = time.perf_counter()
                        if first is None:
                            first = now
                            out["ttft"].append(now - t0)
                        else:
                            out["itl"].append(now - last)
                        last = now
        except httpx.HTTPError:
            out["errors"] += 1
            continue
        if time.monotonic() <= deadline + 30:
            out["requests"] += 1
            out["tokens"] += tokens


async def run_level(url, clients, duration, max_tokens):
    out = {"requests": 0, "tokens": 0, "errors": 0, "ttft": [], "itl": []}
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0), limits=limits) as http:
        t0 = time.monotonic()
        deadline = t0 + duration
        await asyncio.gather(*(client_loop(http, url, deadline, max_tokens, i, out) for i in range(clients)))
        elapsed = time.monotonic() - t0
    return {"clients": clients, "elapsed_s": elapsed, "requests_per_s": out["requests"] / elapsed,
            "tokens_per_s": out["tokens"] / elapsed, "errors": out["errors"],
            "ttft_p50_ms": 1e3 * percentile(out["ttft"], 0.5), "ttft_p99_ms": 1e3 * percentile(out["ttft"], 0.99),
            "itl_p50_ms": 1e3 * percentile(out["itl"], 0.5), "itl_p99_ms": 1e3 * percentile(out["itl"], 0.99)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("--clients", default="1,16,64")
    ap.add_argument("--duration", type=float, default=60)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-concurrency", type=int, default=16)
    ap.add_argument("--dtype", default=None)
    a = ap.parse_args()
    args = ["--served-name", "m", "--threads", str(a.threads), "--max-concurrency", str(a.max_concurrency)]
    if a.dtype:
        args += ["--dtype", a.dtype]
    with ServerProcess([a.model_dir], *args) as server:
        url = server.url
        asyncio.run(run_level(url, 2, 3, 8))  # warm-up
        print(f"cairn serve {a.model_dir}: {a.threads} threads, max-concurrency {a.max_concurrency}, "
              f"{a.max_tokens} tokens per request, {a.duration:.0f} s per level (clients share the machine)")
        print(f"{'clients':>8}{'req/s':>8}{'tok/s':>9}{'TTFT p50':>10}{'p99':>8}{'ITL p50':>9}{'p99':>8}{'errors':>8}")
        rows = {}
        for c in map(int, a.clients.split(",")):
            r = asyncio.run(run_level(url, c, a.duration, a.max_tokens))
            rows[c] = r
            print(f"{c:>8}{r['requests_per_s']:>8.2f}{r['tokens_per_s']:>9.1f}{r['ttft_p50_ms']:>10.0f}"
                  f"{r['ttft_p99_ms']:>8.0f}{r['itl_p50_ms']:>9.1f}{r['itl_p99_ms']:>8.1f}{r['errors']:>8}")
        if 1 in rows and 16 in rows:
            print(f"aggregate tokens/s, 16 clients / 1 client: {rows[16]['tokens_per_s'] / rows[1]['tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main()
