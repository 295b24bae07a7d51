"""Training throughput of `cairn train` against a minimal plain-PyTorch loop, and peak memory of full vs LoRA.

    python benchmarks/train_throughput.py [--shape small] [--steps 30] [--seq-len 256] [--batch 8] [--threads 2]

Same model (a random `--shape` Llama), same packed data (the text cairn ships), same batch size and optimizer
(AdamW, clip 1.0). Each measurement runs in its own process so peak memory (RSS on CPU, allocator peak on CUDA)
is its own; throughput counts steps after the first (warm-up excluded). Prints tokens/s and the ratio.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def peak_memory_mb(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args) -> dict:
    import torch

    from cairn.train.config import TrainConfig
    from cairn.train.loop import train

    torch.set_num_threads(args.threads)
    base = dict(recipe="pretrain", model=args.model, data=[args.data], seq_len=args.seq_len, batch_size=args.batch,
                max_steps=args.steps, lr=1e-3, clip_grad=1.0, eval_fraction=0, progress=False, device=args.device,
                precision=args.precision)
    stamps: list[tuple[float, int]] = []
    if args.mode == "plain":
        return plain_loop(TrainConfig.build(**base, out=args.out), args)
    lora = dict(lora_rank=16, lora_alpha=32, lora_targets=["q_proj", "k_proj", "v_proj", "o_proj"],
                lora_merge=False) if args.mode == "lora" else {}
    cfg = TrainConfig.build(**base, out=args.out, **lora)
    train(cfg, on_step=lambda m: stamps.append((time.perf_counter(), m["tokens"])), log=lambda _: None)
    (t0, n0), (t1, n1) = stamps[0], stamps[-1]
    return {"tokens_per_s": (n1 - n0) / (t1 - t0), "peak_mb": peak_memory_mb(args.device)}


def plain_loop(cfg, args) -> dict:
    """The loop a person would write by hand: no data pipeline, no metrics, no checkpoints."""
    import torch
    import torch.nn.functional as F

    from cairn.models.checkpoint import load_stage
    from cairn.models.llama import full_forward
    from cairn.train.data import collate, micro_batch_indices
    from cairn.train.loop import prepare, resolve_precision

    cfg, model_cfg, _, data, _ = prepare(cfg)
    device = torch.device(cfg.device)
    autocast = resolve_precision(cfg.precision, device)
    torch.manual_seed(cfg.seed)
    model = load_stage(cfg.model, model_cfg, dtype="float32", device=device).train().requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.adam_betas, eps=1e-8, weight_decay=0.0)
    batches = [collate([data.train[i] for i in micro_batch_indices(len(data.train), cfg.batch_size, cfg.seed, s)])
               for s in range(cfg.max_steps)]
    stamps = []
    tokens = 0
    for b in batches:
        x, y = b.inputs.to(device), b.labels.to(device)
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            logits = full_forward(model, x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()  # as the trainer does, to log it
        tokens += b.tokens
        stamps.append((time.perf_counter(), tokens))
    (t0, n0), (t1, n1) = stamps[0], stamps[-1]
    return {"tokens_per_s": (n1 - n0) / (t1 - t0), "peak_mb": peak_memory_mb(args.device)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="small", choices=["tiny", "small", "smollm-135m"])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--repeats", type=int, default=2, help="alternating runs of each; the best of each is reported")
    p.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help=argparse.SUPPRESS)
    p.add_argument("--data", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode:
        print(json.dumps(child(args)))
        return

    import torch

    from cairn.models.corpus import shipped_corpus
    from cairn.models.init import init_model

    tmp = Path(tempfile.mkdtemp(prefix="cairn-train-bench-"))
    init_model(tmp / "model", shape=args.shape, seed=0)
    (tmp / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in shipped_corpus()))
    results: dict[str, list[dict]] = {"plain": [], "cairn": [], "lora": []}
    for r in range(args.repeats):
        for mode in results:
            cmd = [sys.executable, __file__, "--mode", mode, "--model", str(tmp / "model"), "--data",
                   str(tmp / "corpus.jsonl"), "--out", str(tmp / f"out-{mode}-{r}"), "--steps", str(args.steps),
                   "--seq-len", str(args.seq_len), "--batch", str(args.batch), "--threads", str(args.threads),
                   "--device", args.device, "--precision", args.precision]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            results[mode].append(json.loads(out.strip().splitlines()[-1]))
    best = {m: max(rs, key=lambda x: x["tokens_per_s"]) for m, rs in results.items()}
    print(f"# train throughput: shape {args.shape}, seq_len {args.seq_len}, batch {args.batch}, {args.steps} steps, "
          f"device {args.device}, precision {args.precision}, threads {args.threads}, torch {torch.__version__}, "
          f"best of {args.repeats}")
    print(f"{'run':<28}{'tokens/s':>12}{'peak MB':>10}")
    for name, key in [("plain PyTorch loop", "plain"), ("cairn train (full)", "cairn"), ("cairn train (LoRA r=16)", "lora")]:
        print(f"{name:<28}{best[key]['tokens_per_s']:>12.0f}{best[key]['peak_mb']:>10.0f}")
    print(f"cairn / plain throughput: {best['cairn']['tokens_per_s'] / best['plain']['tokens_per_s']:.3f}x "
          "(target >= 0.95x)")
    print(f"LoRA / full peak memory: {best['lora']['peak_mb'] / best['cairn']['peak_mb']:.3f}x")


if __name__ == "__main__":
    main()
