"""DiLoCo against synchronous data parallelism on 3 local pool workers: held-out loss, bytes, wall time.

    python benchmarks/diloco.py [--shape tiny] [--steps 1000] [--h 50 100 500] [--int8-h 30 100] [--out bench-diloco]
    python benchmarks/diloco.py --deltas fp32 bf16 int8 int4 [--deltas-h 30] [--seeds 0 1 2] [--shape small ...]

Same model, data (cairn's shipped text, 5% held out) and token budget for every run: `--steps` optimizer steps of
`--batch` x `--seq-len` tokens per worker. Every run starts from one checkpoint: a random `--shape` Llama that one
process has pretrained for `--warm-start` steps at the synchronous batch (3 x --batch), as the DiLoCo paper starts
from a pretrained model (`--warm-start 0`: from scratch). Synchronous DP averages the 3 workers' gradients every
step, at each `--sync-lr`; the best of those is the baseline. DiLoCo lets each worker take H AdamW steps (`--lr`),
then averages their pseudo-gradients with outer Nesterov SGD (--outer-lr 0.7, --outer-momentum 0.9); the `--int8-h`
runs send int8 deltas both ways. A reference row shows one worker alone on its third of the tokens. Bytes count what
crosses the object store: gradients or deltas up, global weights (or, compressed, their change) down. Then the
straggler experiment: one worker made 2x slower (it sleeps as long as each step took), once under DiLoCo (rounds end
soon after the first worker is done) and once under synchronous DP (every step waits for it).

With --deltas, only DiLoCo at H = --deltas-h runs, once per delta dtype and --seeds seed (the same model and data;
the first dtype at the same seed is the reference): what compressing the pseudo-gradients and the broadcast weights
costs in held-out loss. Training is chaotic: a change as small as rounding order moves the final loss by about a
percent, so compare over several seeds.

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


def config(a, model: Path, data: Path, out: Path, steps: int, **kw):
    """A pretrain config over `data` for `steps` steps. Every run, the warm start included, gets the same seed and
    so the same held-out split: the warm start never sees the documents the runs are scored on."""
    from cairn.train.config import TrainConfig

    return TrainConfig.build(recipe="pretrain", model=str(model), data=[str(data)], eval_fraction=0.05, out=str(out),
                             seq_len=a.seq_len, max_steps=steps, warmup_steps=steps // 20, progress=False, threads=1,
                             **kw)


def make_inputs(tmp: Path, a) -> tuple[Path, Path, float | None]:
    """(starting model, data, its held-out loss): a random model, pretrained by one process when --warm-start."""
    from cairn.models.corpus import shipped_corpus
    from cairn.models.init import init_model
    from cairn.train.loop import train as train_local

    docs = shipped_corpus(a.sentences)
    init_model(tmp / "model", shape=a.shape, seed=0, corpus=docs, **({"num_layers": a.layers} if a.layers else {}))
    data = tmp / "corpus.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    if not a.warm_start:
        return tmp / "model", data, None
    cfg = config(a, tmp / "model", data, tmp / "warm", a.warm_start, batch_size=3 * a.batch, lr=a.warm_lr)
    r = train_local(cfg, log=lambda _: None)
    return tmp / "warm", data, r.eval["eval_loss"]


def train(a, model: Path, data: Path, out: Path, slowdown: dict[int, float] | None = None, workers: int = 3,
          lr: float | None = None, **kw) -> dict:
    from cairn.train.distributed import PoolTrainer

    cfg = config(a, model, data, out, a.steps, batch_size=a.batch, lr=lr or a.lr, workers=workers,
                 outer_lr=a.outer_lr, outer_momentum=a.outer_momentum, **kw)
    result = PoolTrainer(cfg, log=lambda _: None, slowdown=slowdown, threads=1).run()
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    result["curve"] = [(m["bytes_up"] + m["bytes_down"], m["eval_loss"]) for m in lines if "eval_loss" in m]
    result["lr"] = cfg.lr
    mb = (result["bytes_up"] + result["bytes_down"]) / 1e6
    print(f"  {out.name}: held-out loss {result['eval_loss']:.4f}, {mb:.1f} MB, {result['seconds']:.0f} s", flush=True)
    return result


def compare_deltas(a, model: Path, data: Path, tmp: Path, out: Path, warm_loss: float | None) -> None:
    """DiLoCo at H = --deltas-h once per delta dtype and seed; each dtype's held-out loss against the first's at
    the same seed (a seed fixes the held-out split and the workers' data order)."""
    from cairn.config import ModelConfig

    n = ModelConfig.from_hf_dir(model).param_count()
    print(f"{n / 1e6:.2f}M parameters; DiLoCo H={a.deltas_h}, inner lr {a.lr:g}, outer {a.outer_lr:g} / "
          f"{a.outer_momentum:g}; seeds {a.seeds}")
    runs: dict[str, dict] = {}
    with local_pool(3):
        for seed in a.seeds:
            for d in a.deltas:
                runs[f"{d} seed {seed}"] = train(a, model, data, tmp / f"deltas-{d}-{seed}", inner_steps=a.deltas_h,
                                                 round_slack=0, delta_dtype=d, seed=seed,
                                                 eval_every=max(1, a.steps // a.deltas_h // 5))
    first = a.deltas[0]
    print(f"\n{'deltas':<7} " + " ".join(f"{f'loss seed {s}':>12} {'vs ' + first:>8}" for s in a.seeds)
          + f" {'mean vs ' + first:>12} {'MB up':>8} {'MB down':>8} {'fewer bytes':>11}")
    for d in a.deltas:
        rs = [runs[f"{d} seed {s}"] for s in a.seeds]
        refs = [runs[f"{first} seed {s}"] for s in a.seeds]
        diffs = [r["eval_loss"] / f["eval_loss"] - 1 for r, f in zip(rs, refs)]
        ratio = (refs[0]["bytes_up"] + refs[0]["bytes_down"]) / (rs[0]["bytes_up"] + rs[0]["bytes_down"])
        print(f"{d:<7} " + " ".join(f"{r['eval_loss']:>12.4f} {x:>+8.2%}" for r, x in zip(rs, diffs))
              + f" {sum(diffs) / len(diffs):>+12.2%} {rs[0]['bytes_up'] / 1e6:>8.1f} {rs[0]['bytes_down'] / 1e6:>8.1f}"
              f" {ratio:>10.2f}x")
    (out / "deltas.json").write_text(json.dumps({"args": vars(a), "warm_start_loss": warm_loss, "runs": runs},
                                                indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="tiny")
    ap.add_argument("--steps", type=int, default=1000, help="optimizer steps per worker (the token budget)")
    ap.add_argument("--h", type=int, nargs="+", default=[50, 100, 500], help="DiLoCo inner steps per round (fp32)")
    ap.add_argument("--int8-h", type=int, nargs="*", default=[30, 100], help="DiLoCo runs with int8 deltas")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=6e-3, help="DiLoCo's inner AdamW learning rate")
    ap.add_argument("--sync-lr", type=float, nargs="+", default=[3e-3, 6e-3],
                    help="synchronous DP learning rates; the best run is the baseline")
    ap.add_argument("--warm-start", type=int, default=500, help="one-process pretraining steps before the runs")
    ap.add_argument("--warm-lr", type=float, default=3e-3)
    ap.add_argument("--sentences", type=int, default=40000, help="generated sentences in the corpus")
    ap.add_argument("--slow-h", type=int, default=100, help="H for the straggler experiment")
    ap.add_argument("--outer-lr", type=float, default=0.7)
    ap.add_argument("--outer-momentum", type=float, default=0.9)
    ap.add_argument("--layers", type=int, default=None, help="blocks of the model (default: the shape's)")
    ap.add_argument("--deltas", nargs="+", default=None, choices=["fp32", "bf16", "int8", "int4"],
                    help="only compare these delta dtypes at H = --deltas-h (the first is the reference)")
    ap.add_argument("--deltas-h", type=int, default=30)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="with --deltas: one run per dtype per seed")
    ap.add_argument("--out", default="bench-diloco")
    a = ap.parse_args()
    ensure_isolated()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="cairn-diloco-"))
    model, data, warm_loss = make_inputs(tmp, a)
    tokens = 3 * a.steps * a.batch * a.seq_len
    start = (f"pretrained by one process for {a.warm_start} steps x {3 * a.batch} x {a.seq_len} tokens (held-out "
             f"loss {warm_loss:.4f})" if warm_loss is not None else "from scratch")
    print(f"{a.shape} model {start}; then 3 workers, {a.steps} steps x {a.batch} x {a.seq_len} tokens each = "
          f"{tokens / 1e6:.2f}M tokens per run\n")
    runs: dict[str, dict] = {}
    if a.deltas:
        compare_deltas(a, model, data, tmp, out, warm_loss)
        return
    with local_pool(3):
        ev = max(1, a.steps // 10)
        sync = {lr: train(a, model, data, tmp / f"sync-{lr}", sync="every-step", eval_every=ev, lr=lr)
                for lr in a.sync_lr}
        best = min(sync, key=lambda lr: sync[lr]["eval_loss"])
        for lr, r in sync.items():
            runs[f"sync DP lr {lr:g}"] = r
        base = sync[best]
        for h in a.h:
            runs[f"DiLoCo H={h}"] = train(a, model, data, tmp / f"h{h}", inner_steps=h, round_slack=0,
                                          eval_every=max(1, a.steps // h // 10))
        for h in a.int8_h:
            runs[f"DiLoCo H={h} int8"] = train(a, model, data, tmp / f"h{h}-int8", inner_steps=h, round_slack=0,
                                               delta_dtype="int8", eval_every=max(1, a.steps // h // 10))
        # reference: what one worker reaches alone on its third of the tokens (does averaging help at all?)
        runs["1 worker alone"] = train(a, model, data, tmp / "alone", workers=1, inner_steps=a.steps,
                                       eval_every=1)
        print(f"{'run':<20} {'held-out loss':>13} {'vs sync':>8} {'bytes total':>12} {'fewer bytes':>11} "
              f"{'wall s':>7} {'vs sync':>8}")
        for name, r in runs.items():
            b, bb = r["bytes_up"] + r["bytes_down"], base["bytes_up"] + base["bytes_down"]
            print(f"{name:<20} {r['eval_loss']:>13.4f} {r['eval_loss'] / base['eval_loss']:>7.3f}x {b / 1e6:>10.1f}MB "
                  f"{bb / b:>10.1f}x {r['seconds']:>7.1f} {r['seconds'] / base['seconds']:>7.2f}x")
        ok = [n for n, r in runs.items() if n.startswith("DiLoCo") and r["eval_loss"] <= 1.02 * base["eval_loss"]
              and (r["bytes_up"] + r["bytes_down"]) * 100 <= base["bytes_up"] + base["bytes_down"]]
        print(f"\nbaseline: sync DP lr {best:g}. Target (>= 100x fewer bytes at <= 2% higher held-out loss) met by: "
              f"{', '.join(ok) or 'none'}\n")

        slow: dict[str, dict] = {}
        h = a.slow_h
        for label, kw in (("DiLoCo", dict(inner_steps=h)), ("sync DP", dict(sync="every-step", lr=best))):
            even = train(a, model, data, tmp / f"{label}-even", **kw)
            slowed = train(a, model, data, tmp / f"{label}-slow", slowdown={0: 2.0}, **kw)
            slow[label] = {"even_s": even["seconds"], "slow_s": slowed["seconds"], "even_loss": even["eval_loss"],
                           "slow_loss": slowed["eval_loss"], "slow_tokens": slowed["tokens"], "tokens": even["tokens"]}
            s = slow[label]
            print(f"one worker 2x slower, {label:<7}{f' H={h}' if label == 'DiLoCo' else '':>6}: wall "
                  f"{s['even_s']:.1f}s -> {s['slow_s']:.1f}s ({s['slow_s'] / s['even_s'] - 1:+.0%}), tokens "
                  f"{s['tokens'] / 1e6:.2f}M -> {s['slow_tokens'] / 1e6:.2f}M, held-out loss {s['even_loss']:.4f} -> "
                  f"{s['slow_loss']:.4f}")
    plot(runs, out / "loss_vs_bytes.png", warm_loss)
    (out / "results.json").write_text(json.dumps({"args": vars(a), "warm_start_loss": warm_loss, "baseline_lr": best,
                                                  "runs": runs, "straggler": slow}, indent=1))
    print(f"\nwrote {out / 'results.json'} and {out / 'loss_vs_bytes.png'}")


def plot(runs: dict[str, dict], png: Path, warm_loss: float | None) -> None:
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
    ax.set_title("DiLoCo vs synchronous data parallelism, 3 workers"
                 + (f" (from a checkpoint at {warm_loss:.3f})" if warm_loss is not None else ""))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
