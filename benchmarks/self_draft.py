"""Would `--draft self:N` pay on SmolLM2? Measured before building it (issue 16): a self-draft is the target's first
N layers followed by its final norm and output head (early exit). Along the full model's own greedy answers to the
chat and copy prompts of benchmarks/speculative.py, how often does the early exit's argmax equal the full
model's (the acceptance rate a, per token)? With a draft token costing c of a full step (c = 0.79 N / L + 0.21:
layers by their share of the weight bytes, plus the whole head, ~21% of SmolLM2's bytes) and one verification
step per round, k drafted tokens give (1 - a^(k+1)) / ((1 - a) (k c + 1)) tokens per step-equivalent; the best k
is printed. Below 1.0 a self-draft slows decoding down.

    python benchmarks/self_draft.py [MODEL_DIR] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speculative import CHAT, COPY  # noqa: E402

from cairn.config import EngineConfig, ModelConfig, SamplingParams  # noqa: E402
from cairn.engine.api import LLM  # noqa: E402
from cairn.models.checkpoint import load_stage  # noqa: E402
from cairn.models.llama import full_forward  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", nargs="?", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=128)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.model_dir is None:
        from cairn.models.gguf import resolve_model, smollm2_path

        a.model_dir = str(resolve_model(smollm2_path()))
    seqs = []
    with LLM(a.model_dir, EngineConfig(max_seqs=1, threads=a.threads)) as llm:
        for kind, prompts in (("chat", CHAT), ("copy", COPY)):
            for p in prompts:
                ids = llm.render_chat([{"role": "user", "content": p}])
                out = llm.submit(ids, SamplingParams(max_tokens=a.max_tokens, temperature=0)).result().token_ids
                seqs.append((kind, ids, out))
    cfg = ModelConfig.from_hf_dir(a.model_dir)
    stage = load_stage(a.model_dir, cfg)
    hidden: dict[int, torch.Tensor] = {}
    for i, layer in enumerate(stage.layers):
        layer.register_forward_hook(lambda m, args, out, i=i: hidden.__setitem__(i, out[0] if isinstance(out, tuple)
                                                                                 else out))
    L = cfg.num_layers
    exits = sorted({max(1, round(L * f)) for f in (0.125, 0.25, 0.4, 0.5, 0.65, 0.8, 0.9)})
    agree: dict[tuple[str, int], list[float]] = {}
    with torch.no_grad():
        for kind, ids, out in seqs:
            full = full_forward(stage, torch.tensor([ids + out]))[0].argmax(-1)
            p = len(ids)
            for n in exits:
                draft = stage.lm_head(stage.norm(hidden[n - 1][0])).argmax(-1)
                agree.setdefault((kind, n), []).append((draft[p - 1 : -1] == full[p - 1 : -1]).float().mean().item())
    print(f"{a.model_dir}: {L} layers; early-exit drafts along {len(seqs)} greedy answers of up to {a.max_tokens} "
          f"tokens")
    for (kind, n), v in sorted(agree.items()):
        acc = sum(v) / len(v)
        c = 0.79 * n / L + 0.21
        best = max(((1 - acc ** (k + 1)) / (1 - acc) / (k * c + 1), k) for k in range(1, 9))
        print(f"  {kind:4} self:{n:<3} acceptance {acc:.3f}   best predicted speed-up {best[0]:.2f}x (k={best[1]})")


if __name__ == "__main__":
    main()
