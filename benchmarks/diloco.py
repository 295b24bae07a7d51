"""DiLoCo against synchronous data parallelism on 3 local pool workers: held-out loss, bytes, wall time.

    python benchmarks/diloco.py [--shape tiny] [--steps 1000] [--h 50 100 500] [--out bench-diloco]

Same model (a random `--shape` Llama), data (cairn's shipped text, 5% held out) and token budget for every run:
`--steps` optimizer steps of `--batch` x `--seq-len` tokens per worker. Synchronous DP averages the 3 workers'
gradients every step; DiLoCo lets each worker take H AdamW steps, then averages their pseudo-gradients with outer
Nesterov SGD (--outer-lr 0.7, --outer-momentum 0.9). A reference row shows one worker alone on its third of the
tokens. Bytes count what crosses the object store: gradients or deltas up, global weights (or, compressed, their
change) down. Then the straggler experiment: one worker made 2x slower (it sleeps as long as each step took), once
under DiLoCo (rounds end soon after the first worker is done) and once under synchronous DP (every step waits for it).

Runs in a loopback-only network namespace (re-executes itself under `unshare -n`), a Ray head and 3 device nodes on
127.0.0.1. All workers share this machine's cores (1 torch thread each), so wall times measure the method on one
machine, not a network: the byte counts are what a real link would carry. Writes results.json and
loss_vs_bytes.png to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from localpool import ensure_isolated, local_pool


def make_inputs(tmp: Path, shape: str, sentences: int) -> tuple[Path, Path]:
    from cairn.models.corpus import shipped_corpus
    from cairn.models.init import init_model

    docs = shipped_corpus(sentences)
    init_model(tmp / "model", shape=shape, seed=0, corpus=docs)
    data = tmp / "corpus.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    return tmp / "model", data


def train(a, model: Path, data: Path, out: Path, slowdown: dict[int, float] | None = None, workers: int = 3,
          **kw) -> dict:
    from cairn.pool.ray_train import PoolTrainer
    from cairn.train.config import TrainConfig

    cfg = TrainConfig.build(recipe="pretrain", model=str(model), data=[str(data)], eval_fraction=0.05,
                            out=str(out), seq_len=a.seq_len, batch_size=a.batch, max_steps=a.steps, lr=a.lr,
                            warmup_steps=a.steps // 20, workers=workers, progress=False, threads=1,
                            outer_lr=a.outer_lr, outer_momentum=a.outer_momentum, **kw)
    result = PoolTrainer(cfg, log=lambda _: None, slowdown=slowdown, threads=1).run()
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    result["curve"] = [(m["bytes_up"] + m["bytes_down"], m["eval_loss"]) for m in lines if "eval_loss" in m]
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="tiny")
    ap.add_argument("--steps", type=int, default=1000, help="optimizer steps per worker (the token budget)")
    ap.add_argument("--h", type=int, nargs="+", default=[50, 100, 500], help="DiLoCo inner steps per round")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--sentences", type=int, default=40000, help="generated sentences in the corpus")
    ap.add_argument("--slow-h", type=int, default=100, help="H for the straggler experiment")
    ap.add_argument("--outer-lr", type=float, default=0.7)
    ap.add_argument("--outer-momentum", type=float, default=0.9)
    ap.add_argument("--out", default="bench-diloco")
    a = ap.parse_args()
    ensure_isolated()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="cairn-diloco-"))
    model, data = make_inputs(tmp, a.shape, a.sentences)
    tokens = 3 * a.steps * a.batch * a.seq_len
    print(f"{a.shape} model, 3 workers, {a.steps} steps x {a.batch} x {a.seq_len} tokens each = {tokens / 1e6:.2f}M "
          "tokens per run\n")
    runs: dict[str, dict] = {}
    with local_pool(3):
        ev = max(1, a.steps // 10)
        runs["sync DP"] = train(a, model, data, tmp / "sync", sync="every-step", eval_every=ev)
        for h in a.h:
            runs[f"DiLoCo H={h}"] = train(a, model, data, tmp / f"h{h}", inner_steps=h, round_slack=0,
                                          eval_every=max(1, a.steps // h // 10))
        h = a.slow_h
        runs[f"DiLoCo H={h} int8"] = train(a, model, data, tmp / f"h{h}-int8", inner_steps=h, round_slack=0,
                                           delta_dtype="int8", eval_every=max(1, a.steps // h // 10))
        # reference: what one worker reaches alone on its third of the tokens (does averaging help at all?)
        runs["1 worker alone"] = train(a, model, data, tmp / "alone", workers=1, inner_steps=a.steps,
                                       eval_every=1)
        base = runs["sync DP"]
        print(f"{'run':<18} {'held-out loss':>13} {'vs sync':>8} {'bytes total':>12} {'fewer bytes':>11} "
              f"{'wall s':>7} {'vs sync':>8}")
        for name, r in runs.items():
            b, bb = r["bytes_up"] + r["bytes_down"], base["bytes_up"] + base["bytes_down"]
            print(f"{name:<18} {r['eval_loss']:>13.4f} {r['eval_loss'] / base['eval_loss']:>7.3f}x {b / 1e6:>10.1f}MB "
                  f"{bb / b:>10.1f}x {r['seconds']:>7.1f} {r['seconds'] / base['seconds']:>7.2f}x")
        ok = [n for n, r in runs.items() if n.startswith("DiLoCo") and r["eval_loss"] <= 1.02 * base["eval_loss"]
              and (r["bytes_up"] + r["bytes_down"]) * 100 <= base["bytes_up"] + base["bytes_down"]]
        print(f"\ntarget (>= 100x fewer bytes at <= 2% higher held-out loss) met by: {', '.join(ok) or 'none'}\n")

        slow: dict[str, dict] = {}
        for label, kw in (("DiLoCo", dict(inner_steps=h)), ("sync DP", dict(sync="every-step"))):
            even = train(a, model, data, tmp / f"{label}-even", **kw)
            slowed = train(a, model, data, tmp / f"{label}-slow", slowdown={0: 2.0}, **kw)
            slow[label] = {"even_s": even["seconds"], "slow_s": slowed["seconds"], "even_loss": even["eval_loss"],
                           "slow_loss": slowed["eval_loss"], "slow_tokens": slowed["tokens"], "tokens": even["tokens"]}
            s = slow[label]
            print(f"one worker 2x slower, {label:<7}{f' H={h}' if label == 'DiLoCo' else '':>6}: wall "
                  f"{s['even_s']:.1f}s -> {s['slow_s']:.1f}s ({s['slow_s'] / s['even_s'] - 1:+.0%}), tokens "
                  f"{s['tokens'] / 1e6:.2f}M -> {s['slow_tokens'] / 1e6:.2f}M, held-out loss {s['even_loss']:.4f} -> "
                  f"{s['slow_loss']:.4f}")
    plot(runs, out / "loss_vs_bytes.png")
    (out / "results.json").write_text(json.dumps({"args": vars(a), "runs": runs, "straggler": slow}, indent=1))
    print(f"\nwrote {out / 'results.json'} and {out / 'loss_vs_bytes.png'}")


def plot(runs: dict[str, dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in runs.items():
        xs, ys = zip(*r["curve"])
        ax.plot(xs, ys, marker="o", markersize=3, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("bytes communicated (up + down, cumulative)")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title("DiLoCo vs synchronous data parallelism, 3 workers")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
