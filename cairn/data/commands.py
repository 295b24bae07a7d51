"""`cairn synth` as a typed function over an LLM (the CLI loads the teacher, locally or on the pool)."""

from __future__ import annotations

import time
from pathlib import Path

from cairn.data.synth import SynthConfig, Synthesizer, doc_tasks, logits_dir, progress_path, read_seeds, seed_tasks
from cairn.errors import UserError


def synthesize(llm, cfg: SynthConfig, out: str, teacher: str, seeds: str | None = None, from_docs: str | None = None,
               show: bool = True, log=print) -> dict:
    """Run (or resume) a synth job; returns its summary (kept, dropped by reason, tokens/s)."""
    from tqdm import tqdm

    if cfg.mode == "seeds":
        tasks = seed_tasks(read_seeds(seeds), cfg.per_source)
    elif cfg.mode == "docs":
        tasks = doc_tasks(from_docs, cfg.per_source, cfg.chunk_chars)
    else:
        tasks = None
    s = Synthesizer(llm, cfg, out, teacher)
    if s.done:
        log(f"resuming {out}: {len(s.done)} tasks finished before ({s.stats.kept} kept)")
    total = len(tasks) if tasks is not None else cfg.count
    bar = tqdm(total=total, initial=len(s.done) if tasks is not None else s.stats.kept, disable=not show,
               unit="task" if tasks is not None else "kept", dynamic_ncols=True)
    t0 = time.perf_counter()
    if tasks is not None:
        stats = s.run(tasks, on_batch=bar.update)
    else:
        shown = [s.stats.kept]

        def kept_so_far(_):
            bar.update(s.stats.kept - shown[0])
            shown[0] = s.stats.kept

        stats = s.run_self_instruct(on_batch=kept_so_far)
    bar.close()
    stats.seconds = time.perf_counter() - t0
    summary = {"out": out, "kept": stats.kept, "dropped": dict(stats.dropped), "skipped": stats.skipped,
               "generated_tokens": stats.generated_tokens, "seconds": round(stats.seconds, 2),
               "tokens_per_s": round(stats.generated_tokens / stats.seconds, 1) if stats.seconds > 0 else 0.0}
    dropped = ", ".join(f"{n} {why}" for why, n in sorted(stats.dropped.items(), key=lambda x: -x[1])) or "none"
    log(f"kept {stats.kept} examples in {out} (dropped: {dropped}); {stats.generated_tokens} tokens generated in "
        f"{stats.seconds:.1f}s ({summary['tokens_per_s']} tokens/s); progress in {progress_path(Path(out))}"
        + (f"; teacher top-{cfg.save_logits} logits in {logits_dir(Path(out))}" if cfg.save_logits else ""))
    return summary


def mode_of(seeds: str | None, from_docs: str | None, self_instruct: bool) -> str:
    given = [m for m, on in (("seeds", seeds), ("docs", from_docs), ("self-instruct", self_instruct)) if on]
    if len(given) != 1:
        raise UserError("give exactly one source of instructions: --seeds FILE, --from-docs DIR or --self-instruct",
                        param="seeds")
    return given[0]
