"""What the delta formats cost DiLoCo with a real model's weights: one round, measured exactly.

    python benchmarks/delta_formats.py [MODEL_DIR] [--workers 3] [--steps 10] [--lr 1e-4] [--batch 4] [--seq-len 128]

MODEL_DIR defaults to SmolLM2-135M-Instruct. Each of `--workers` workers takes `--steps` AdamW steps from the same
weights on its own data order (cairn's shipped text), as in a DiLoCo round; their pseudo-gradients are sent in each
delta format (cairn/quant/compress.py), averaged and applied with plain averaging (outer lr 1, no momentum). Then the
driver's broadcast of the weights' change, in the same format, to workers holding the old weights. Printed per
format: bytes up per worker and fewer bytes than fp32, the relative error of the averaged update, the held-out loss
(examples/eval/heldout.txt, or --eval-data split) of the new weights and of what the workers rebuild from the
broadcast, against fp32. One round from the same start has no chaos to hide in: what it shows is the formats.
benchmarks/diloco.py --deltas runs whole trainings on the pool (with compounding rounds) on smaller models.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", nargs="?", default=None, help="default: SmolLM2-135M-Instruct")
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10, help="inner steps per worker (H)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-data", default=str(ROOT / "examples/eval/heldout.txt"),
                    help="held-out text; 'split': 5%% of the training text (for a model trained on it)")
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16", "int8", "int4"],
                    choices=["fp32", "bf16", "int8", "int4"], help="delta formats (the first is the reference)")
    a = ap.parse_args()

    import torch

    from cairn.models.corpus import shipped_corpus
    from cairn.train import diloco
    from cairn.train.config import TrainConfig
    from cairn.train.loop import Trainer, prepare

    torch.set_num_threads(a.threads)
    if a.model_dir is None:
        from cairn.models.gguf import resolve_model, smollm2_path

        a.model_dir = str(resolve_model(smollm2_path()))
    tmp = Path(tempfile.mkdtemp(prefix="cairn-deltas-"))
    data = tmp / "corpus.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in shipped_corpus(4000)))

    def trainer(seed: int) -> Trainer:
        cfg = TrainConfig.build(recipe="pretrain", model=a.model_dir, data=[str(data)], out=str(tmp / "out"),
                                eval_data=[] if a.eval_data == "split" else [a.eval_data], seq_len=a.seq_len,
                                batch_size=a.batch, max_steps=a.steps, lr=a.lr, schedule="constant", seed=seed,
                                progress=False, threads=a.threads)
        cfg, model_cfg, _, ds, total = prepare(cfg)
        return Trainer(cfg, model_cfg, ds, total)

    t0 = time.perf_counter()
    deltas, tokens = [], []
    for w in range(a.workers):
        tr = trainer(seed=w)
        start = {k: p.detach().clone() for k, p in tr.params.items()}
        if w == 0:
            n_params = sum(p.numel() for p in start.values())
            base_loss = tr.evaluate()["eval_loss"]
        n = sum(tr.step()["step_tokens"] for _ in range(a.steps))
        deltas.append(diloco.pseudo_gradient(start, {k: p.detach() for k, p in tr.params.items()}))
        tokens.append(n)
        print(f"worker {w}: {a.steps} steps, {n} tokens, held-out loss alone {tr.evaluate()['eval_loss']:.4f}",
              flush=True)
        del tr
    shapes = {k: v.shape for k, v in start.items()}
    ev = trainer(seed=0)

    def loss_of(weights: dict) -> float:
        with torch.no_grad():
            for k, p in ev.params.items():
                p.copy_(weights[k])
        return ev.evaluate()["eval_loss"]

    print(f"\n{Path(a.model_dir).name}: {n_params / 1e6:.1f}M parameters, {a.workers} workers x {a.steps} AdamW steps "
          f"(lr {a.lr:g}, {a.batch} x {a.seq_len} tokens) in {time.perf_counter() - t0:.0f} s; held-out loss "
          f"{base_loss:.4f} before the round\n")
    print(f"{'deltas':<7} {'MB up/worker':>12} {'fewer':>6} {'update rel err':>14} {'loss after':>10} {'vs fp32':>8} "
          f"{'broadcast rel err':>17} {'loss rebuilt':>12} {'vs fp32':>8}")
    ref = None
    for d in a.dtypes:
        payloads = [diloco.compress(x, d) for x in deltas]
        avg = diloco.weighted_average([diloco.decompress(p, shapes) for p in payloads], tokens)
        new = diloco.OuterOptimizer(lr=1.0, momentum=0.0).step(start, avg)
        _, rebuilt = diloco.Broadcast(d).step(start, new) if d != "fp32" else (None, new)
        if ref is None:
            ref = {"avg": avg, "new": new, "up": diloco.payload_bytes(payloads[0]), "loss": loss_of(new)}
        up = diloco.payload_bytes(payloads[0])
        err = _rel(avg, ref["avg"])
        loss, loss_rebuilt = loss_of(new), loss_of(rebuilt)
        print(f"{d:<7} {up / 1e6:>12.1f} {ref['up'] / up:>5.2f}x {err:>14.2e} {loss:>10.4f} "
              f"{loss / ref['loss'] - 1:>+8.3%} {_rel_change(rebuilt, new, start):>17.2e} {loss_rebuilt:>12.4f} "
              f"{loss_rebuilt / ref['loss'] - 1:>+8.3%}", flush=True)


def _rel(a: dict, b: dict) -> float:
    """||a - b|| / ||b|| over all tensors."""
    num = sum(float((a[k] - b[k]).double().pow(2).sum()) for k in b)
    den = sum(float(b[k].double().pow(2).sum()) for k in b)
    return (num / den) ** 0.5 if den else 0.0


def _rel_change(got: dict, want: dict, start: dict) -> float:
    """How far the rebuilt weights are from the intended ones, relative to the round's change."""
    return _rel({k: got[k] - start[k] for k in want}, {k: want[k] - start[k] for k in want})


if __name__ == "__main__":
    main()
