"""Evolutionary search of merge recipes (as in Akiba et al., "Evolutionary Optimization of Model Merging Recipes"):
CMA-ES (the `cmaes` library) proposes genes, each candidate is the starting recipe with its numbers (or, for
passthrough layer stacking, its layers' source models) replaced (space.py), merged into a scratch directory,
scored by `evaluate(model_dir) -> float` (higher is better; CMA-ES minimises -score) and deleted.

Every evaluated candidate is appended to OUT/search.jsonl (genes, parameters, score, seconds) as soon as it is
scored. Rerunning the same search into the same OUT replays them into a fresh optimizer (same seed, same asks,
the recorded scores told in order), so no finished evaluation is recomputed and the result is the one an
uninterrupted run would give. `budget` counts evaluations in all runs together. At the end (and when interrupted)
OUT/best.yaml holds the best recipe found (mergekit YAML, input to `cairn merge` and to mergekit) and
OUT/search.png the score of every candidate and the best so far; at the end OUT/best/ holds the best model merged.

Candidates of one generation are independent: `map_fn(fn, jobs)` runs them (default: the builtin `map`, one
after another here); `cairn.pool.tasks.DeviceMap()` runs them on the pool's devices. Each job carries the
candidate's recipe text (model paths made absolute) and the evaluate function, and its worker merges and scores by
itself, so only text travels: the input models must exist at the same paths on every worker machine, and
`scratch` must be a directory path that can be created on each (a local temporary directory is right)."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import yaml

from cairn.errors import UserError
from cairn.fsutil import atomic_write, atomic_write_text
from cairn.merge.recipe import Recipe, parse_recipe
from cairn.merge.run import merge
from cairn.merge.space import SearchSpace, search_space

LOG, BEST_YAML, BEST_DIR, PLOT, SCRATCH = "search.jsonl", "best.yaml", "best", "search.png", "scratch"
"""What a search writes in its output directory."""

FAILED = 1e30
"""What CMA-ES is told for a candidate that could not be merged or scored (worse than any real one)."""

DEFAULT_SIGMA, DATAFLOW_SIGMA = 0.2, 0.3
"""Initial step size of CMA-ES, in gene units (every gene spans [0, 1]): for numbers, and for layer choices (where
the start sits 0.25 from the nearest other choice of two, so each flips with about 20% probability at first)."""

MapFn = Callable[[Callable[[Any], Any], list], Iterable[Any]]
"""Runs fn over a list of jobs, giving the results in order (lazily or as a list)."""


@dataclass(frozen=True)
class Candidate:
    """One evaluated candidate (a line of search.jsonl)."""

    index: int
    """Its place among all evaluations (0-based)."""
    generation: int
    """The CMA-ES generation it belongs to."""
    member: int
    """Its place in its generation."""
    genes: tuple[float, ...]
    """The genes CMA-ES proposed (each in [0, 1])."""
    params: Mapping[str, Any]
    """What the genes stand for, by gene name."""
    score: float | None
    """evaluate()'s score (None: the merge failed or the score was not a finite number)."""
    seconds: float
    """Wall time of merging and scoring it."""
    error: str | None = None
    """Why it has no score."""


@dataclass(frozen=True)
class SearchResult:
    """What a search found and wrote."""

    out_dir: Path
    """Where everything was written."""
    best_yaml: Path
    """The best recipe (mergekit YAML)."""
    best_dir: Path | None
    """The best model, merged (None when not kept)."""
    best_score: float
    """Its score."""
    best_params: Mapping[str, Any]
    """What its genes stand for."""
    best_index: int
    """Which evaluation it was (0-based)."""
    evaluations: int
    """Candidates evaluated in all runs together."""
    resumed: int
    """Of those, the ones replayed from an earlier run's search.jsonl."""
    generations: int
    """Complete CMA-ES generations."""
    population: int
    """Candidates per generation."""
    merge_seed: int | None
    """The seed of the random drops of every merge (dare methods; None for deterministic methods)."""
    plot: Path
    """The progress chart."""
    seconds: float
    """Wall time of this run."""


@dataclass(frozen=True)
class CandidateJob:
    """Everything one worker needs to merge and score one candidate."""

    recipe: str
    """The candidate's recipe (YAML, model paths absolute)."""
    scratch: str
    """The directory to merge into (removed afterwards)."""
    evaluate: Callable[[Path], float]
    """The score function."""
    seed: int | None
    """The merge seed (dare methods)."""


def run_candidate(job: CandidateJob) -> tuple[float | None, float, str | None]:
    """Merge a candidate, score it, remove the merge: (score or None, seconds, error or None). A merge the
    candidate's parameters make impossible (e.g. linear weights summing to 0) is a failed candidate, not an error."""
    t0 = time.perf_counter()
    scratch = Path(job.scratch)
    try:
        try:
            merge(parse_recipe(job.recipe), scratch, seed=job.seed)
        except UserError as e:
            return None, time.perf_counter() - t0, f"merge failed: {e}"
        score = float(job.evaluate(scratch))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if not math.isfinite(score):
        return None, time.perf_counter() - t0, f"evaluate returned {score}"
    return score, time.perf_counter() - t0, None


def search(recipe: Recipe | str | Path, evaluate: Callable[[Path], float], budget: int, out_dir: str | Path,
           population: int | None = None, seed: int = 0, progress: bool = False, map_fn: MapFn | None = None,
           bounds: Mapping[str, tuple[float, float]] | None = None, sigma: float | None = None,
           skip_layers: bool = False, scratch: str | Path | None = None, keep_best: bool = True) -> SearchResult:
    """Search the numbers of `recipe` (a Recipe or a YAML path) for the merge `evaluate` scores highest, with
    `budget` evaluations in all (resumed from out_dir/search.jsonl when it holds earlier ones of this search).
    population: candidates per CMA-ES generation (None: cmaes' default, 4 + 3 ln(genes)); seed: of CMA-ES and of
    the merges' random drops; bounds: per parameter name, overriding space.DEFAULT_BOUNDS; sigma: CMA-ES' initial
    step in gene units (None: DEFAULT_SIGMA, or DATAFLOW_SIGMA for layer stacking); skip_layers: a passthrough
    search may also drop layers; scratch: where candidates are merged (None: out_dir/scratch); keep_best: merge the
    best recipe into out_dir/best at the end. map_fn: runs a generation's jobs (default: the builtin map, here, one
    after another); results may come lazily, each is recorded as soon as it comes."""
    t0 = time.perf_counter()
    if budget < 1:
        raise UserError(f"the search budget must be at least 1 evaluation, got {budget}", param="budget")
    if sigma is not None and not 0 < sigma <= 1:
        raise UserError(f"sigma is a step in gene units and must be in (0, 1], got {sigma}", param="sigma")
    if population is not None and population < 4:  # fewer leave CMA-ES' covariance update undefined
        raise UserError(f"population must be at least 4 candidates per generation, got {population}",
                        param="population")
    space = search_space(recipe, bounds, skip_layers)
    _check_inputs(space)
    sigma = sigma if sigma is not None else DATAFLOW_SIGMA if space.slots else DEFAULT_SIGMA
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    opt = _optimizer(space, sigma, seed, population)
    header = {"version": 1, "recipe": space.text, "genes": [d.name for d in space.dims],
              "bounds": [[d.low, d.high] for d in space.dims], "population": opt.population_size, "seed": seed,
              "sigma": sigma}
    records = _open_log(out_dir / LOG, header)
    resumed = len(records)
    scratch_root = Path(scratch) if scratch is not None else out_dir / SCRATCH
    merge_seed = seed if parse_recipe(space.text).method.random else None
    jobs = _JobMaker(space, evaluate, scratch_root, merge_seed)
    try:
        generations = _run(opt, space, records, budget, map_fn or map, jobs, out_dir / LOG, progress)
    finally:
        best = _best(records)
        if best is not None:
            _write_best(space, best, len(records), merge_seed, out_dir / BEST_YAML)
            plot(records, out_dir / PLOT)
    if best is None:
        first = next((c.error for c in records if c.error), "no candidate was evaluated")
        raise UserError(f"none of the {len(records)} candidates could be merged and scored ({first}); fix the "
                        f"recipe or the evaluation, delete {out_dir / LOG} and run again", param="recipe")
    best_dir = None
    if keep_best:
        best_dir = out_dir / BEST_DIR
        merge(load_best(out_dir / BEST_YAML), best_dir, seed=merge_seed, progress=progress)
    if scratch is None:
        shutil.rmtree(scratch_root, ignore_errors=True)
    return SearchResult(out_dir, out_dir / BEST_YAML, best_dir, best.score, best.params, best.index, len(records),
                        resumed, generations, opt.population_size, merge_seed, out_dir / PLOT,
                        time.perf_counter() - t0)


def load_best(path: str | Path) -> Recipe:
    """The recipe a search wrote to best.yaml."""
    return parse_recipe(Path(path).read_text(encoding="utf-8"))


def _cma():
    try:
        from cmaes import CMA
    except ModuleNotFoundError:
        raise UserError("merge search needs the cmaes package (CMA-ES), which is not installed here: "
                        "pip install cmaes") from None
    return CMA


def _optimizer(space: SearchSpace, sigma: float, seed: int, population: int | None):
    n = len(space.dims)
    bounds = np.tile(np.array([0.0, 1.0]), (n, 1))  # (genes, 2)
    return _cma()(mean=np.array(space.start, dtype=float), sigma=sigma, bounds=bounds, seed=seed,
                  population_size=population)


def _check_inputs(space: SearchSpace) -> None:
    """Plan the starting recipe (config files and tensor headers only): a missing model or a mismatch fails here
    once, rather than as every candidate failing."""
    from cairn.merge.inputs import Reader
    from cairn.merge.plan import plan_merge

    with Reader() as reader:
        plan_merge(parse_recipe(space.text), reader)


@dataclass(frozen=True)
class _JobMaker:
    """Turns a candidate's genes into a CandidateJob."""

    space: SearchSpace
    """The search space."""
    evaluate: Callable[[Path], float]
    """The score function."""
    scratch: Path
    """Where candidates are merged."""
    seed: int | None
    """The merge seed."""

    def __call__(self, genes: np.ndarray, index: int) -> CandidateJob:
        text = absolute_paths(self.space.recipe_text(genes))
        return CandidateJob(text, str((self.scratch / f"candidate-{index:05d}").absolute()), self.evaluate, self.seed)


def _run(opt, space: SearchSpace, records: list[Candidate], budget: int, run: MapFn, make_job: _JobMaker,
         log: Path, progress: bool) -> int:
    """Ask, evaluate (or replay from `records`) and tell generation after generation until `budget` evaluations
    exist; every new one is appended to `records` and to the log. Returns the complete generations."""
    from tqdm import tqdm

    pop = opt.population_size
    done = {(c.generation, c.member): c for c in records}
    generation = 0
    with tqdm(total=budget, initial=min(budget, len(records)), unit="candidate", desc="merge search",
              file=sys.stderr, disable=not progress, dynamic_ncols=True) as bar:
        while True:
            asked = [opt.ask() for _ in range(pop)]  # asked even when replayed: keeps CMA-ES' random stream
            new = [m for m in range(pop) if (generation, m) not in done][:max(0, budget - len(records))]
            jobs = [make_job(asked[m], len(records) + k) for k, m in enumerate(new)]
            for m, (score, seconds, error) in zip(new, run(run_candidate, jobs)):
                c = Candidate(len(records), generation, m, tuple(float(g) for g in asked[m]),
                              MappingProxyType(space.params(asked[m])), score, seconds, error)
                _append(log, c)
                records.append(c)
                done[(generation, m)] = c
                bar.update(1)
                best = _best(records)
                if best is not None:
                    bar.set_postfix(best=f"{best.score:.4g}")
            if any((generation, m) not in done for m in range(pop)):
                return generation
            told = [done[(generation, m)] for m in range(pop)]
            opt.tell([(np.array(c.genes), -c.score if c.score is not None else FAILED) for c in told])
            generation += 1


def _best(records: list[Candidate]) -> Candidate | None:
    """The highest-scoring candidate (the earliest of equals); None when none has a score."""
    scored = [c for c in records if c.score is not None]
    return max(scored, key=lambda c: (c.score, -c.index)) if scored else None


# --- the log ---------------------------------------------------------------------------------------------------

def _open_log(path: Path, header: dict) -> list[Candidate]:
    """The candidates of an earlier run of this search (a new log when there is none). A last line cut short by
    an interruption is dropped; a log of another search is refused."""
    if not path.is_file():
        atomic_write_text(path, json.dumps({"search": header}) + "\n")
        return []
    lines = path.read_text(encoding="utf-8").split("\n")
    complete, tail = lines[:-1], lines[-1]  # a complete file ends with "\n": tail is ""
    try:
        earlier = json.loads(complete[0])["search"] if complete else None
    except (json.JSONDecodeError, KeyError, TypeError):
        earlier = None
    if earlier is None:
        raise UserError(f"{path} is not a merge search log; choose another output directory", param="out")
    changed = [k if k in ("recipe", "genes", "bounds") else f"{k} {earlier.get(k)} now {header[k]}"
               for k in header if earlier.get(k) != header[k]]
    if changed:
        raise UserError(f"{path.parent} holds a search with other settings ({', '.join(changed)}); rerun it with "
                        f"the same ones, use another output directory, or delete {path} to start over", param="out")
    records = []
    for n, line in enumerate(complete[1:], start=2):
        try:
            records.append(_candidate(json.loads(line)["candidate"]))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{path} line {n} is corrupt ({type(e).__name__}); delete that line and the ones "
                            "after it to resume from there", param="out") from None
    if tail:  # cut short by an interruption: keep the complete lines only
        atomic_write_text(path, "\n".join(complete) + "\n")
    return records


def _candidate(d: dict) -> Candidate:
    return Candidate(int(d["index"]), int(d["generation"]), int(d["member"]), tuple(float(g) for g in d["genes"]),
                     MappingProxyType(dict(d["params"])), None if d["score"] is None else float(d["score"]),
                     float(d["seconds"]), d.get("error"))


def _append(path: Path, c: Candidate) -> None:
    line = json.dumps({"candidate": {"index": c.index, "generation": c.generation, "member": c.member,
                                     "genes": list(c.genes), "params": dict(c.params), "score": c.score,
                                     "seconds": round(c.seconds, 3), "error": c.error}})
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


# --- outputs ---------------------------------------------------------------------------------------------------

def _write_best(space: SearchSpace, best: Candidate, evaluations: int, merge_seed: int | None, path: Path) -> None:
    seeded = f" --seed {merge_seed}" if merge_seed is not None else ""
    text = (f"# the best of {evaluations} candidates of a cairn merge search: score {best.score:.6g} (evaluation "
            f"{best.index})\n# merge it with: cairn merge {path.name} --out DIR{seeded}\n")
    atomic_write_text(path, text + space.recipe_text(best.genes))


def plot(records: list[Candidate], path: str | Path) -> None:
    """A PNG of every candidate's score and the best so far, against the evaluation number."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=110)
    ax = fig.add_subplot()
    scored = [c for c in records if c.score is not None]
    xs, ys = [c.index + 1 for c in scored], [c.score for c in scored]
    ax.scatter(xs, ys, s=14, alpha=0.6, label="candidate")
    if scored:
        ax.step(xs, np.maximum.accumulate(ys), where="post", color="C3", label="best so far")
    failed = len(records) - len(scored)
    ax.set_xlabel("evaluation")
    ax.set_ylabel("score (higher is better)")
    ax.set_title(f"merge search: {len(records)} candidates" + (f", {failed} failed" if failed else "") +
                 (f", best {max(ys):.4g}" if ys else ""))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


MODEL_KEYS = ("base_model", "tokenizer_source")


def absolute_paths(text: str) -> str:
    """The recipe with every model directory absolute (resolved against this process's working directory), so a
    worker that runs elsewhere reads the same models."""
    doc = yaml.safe_load(text)

    def fix(p: Any) -> Any:
        return os.path.abspath(os.path.expanduser(p)) if isinstance(p, str) and p not in ("base", "union") else p

    for key in MODEL_KEYS:
        if key in doc:
            doc[key] = fix(doc[key])
    if isinstance(doc.get("tokenizer"), dict) and "source" in doc["tokenizer"]:
        doc["tokenizer"]["source"] = fix(doc["tokenizer"]["source"])
    for i, item in enumerate(doc.get("models") or []):
        if isinstance(item, str):
            doc["models"][i] = fix(item)
        else:
            item["model"] = fix(item["model"])
    for sl in doc.get("slices") or []:
        if "base_model" in sl:
            sl["base_model"] = fix(sl["base_model"])
        for src in sl["sources"]:
            src["model"] = fix(src["model"])
    return yaml.safe_dump(doc, sort_keys=False)


# --- scoring by cairn eval -------------------------------------------------------------------------------------

TASK_KINDS = ("choice", "generate", "perplexity")


def task_score(tasks: list[dict], weights: Mapping[str, float] | None = None,
               generate_metric: str = "exact_match") -> float:
    """The weighted mean of the headline metric of each `cairn eval` task result: acc for choice, exact_match (or
    `generate_metric`: contains) for generate, -ln(perplexity) (the mean log-likelihood per token) for perplexity,
    so that higher is always better. weights: by task kind (default 1 each)."""
    weights = weights or {}
    total = norm = 0.0
    for t in tasks:
        kind = t["task"]
        value = (t["acc"] if kind == "choice" else t[generate_metric] if kind == "generate"
                 else -math.log(t["perplexity"]))
        w = float(weights.get(kind, 1.0))
        total, norm = total + w * value, norm + w
    if norm <= 0:
        raise UserError("the task weights sum to 0; give positive weights", param="weights")
    return total / norm


@dataclass(frozen=True)
class EvalScore:
    """A score function for search(): load the model, run `cairn eval` tasks on it, combine them (task_score)."""

    choice_files: tuple[str, ...] = ()
    """Multiple-choice JSONL files (scored by acc)."""
    generate_files: tuple[str, ...] = ()
    """Generation JSONL files (scored by exact match or contains)."""
    perplexity_files: tuple[str, ...] = ()
    """Text files (scored by -ln perplexity)."""
    weights: Mapping[str, float] = field(default_factory=dict)
    """Weight of each task kind in the mean (default 1 each)."""
    generate_metric: str = "exact_match"
    """"exact_match" or "contains"."""
    threads: int | None = None
    """torch CPU threads (None: torch's default)."""
    device: str | None = None
    """Where the model runs (None: cuda when the machine that scores has it, else cpu)."""
    max_tokens: int = 64
    """Longest generated answer."""
    fewshot: int = 0
    """Examples taken from the start of each choice file."""

    def __call__(self, model_dir: str | Path) -> float:
        import torch

        from cairn.config import EngineConfig
        from cairn.engine.api import LLM
        from cairn.eval.commands import evaluate

        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        config = EngineConfig(device=device, max_seqs=16, threads=self.threads)
        with LLM(str(model_dir), config) as llm:
            result = evaluate(llm, self.perplexity_files, self.choice_files, self.generate_files,
                              fewshot=self.fewshot, max_tokens=self.max_tokens)
        return task_score(result["tasks"], self.weights, self.generate_metric)


def eval_score(choice_files: Iterable[str] = (), generate_files: Iterable[str] = (),
               perplexity_files: Iterable[str] = (), weights: Mapping[str, float] | None = None,
               generate_metric: str = "exact_match", threads: int | None = None, device: str | None = None,
               max_tokens: int = 64, fewshot: int = 0) -> EvalScore:
    """A score function for search() over `cairn eval` tasks (see task_score for how they are combined). The files
    are checked to exist here, before any merge; with a pool they must exist at the same paths on every worker."""
    files = {"choice": tuple(map(str, choice_files)), "generate": tuple(map(str, generate_files)),
             "perplexity": tuple(map(str, perplexity_files))}
    if not any(files.values()):
        raise UserError("a merge search needs at least one evaluation task: --choice FILE, --generate FILE or "
                        "--perplexity FILE", param="eval")
    for kind, paths in files.items():
        for p in paths:
            if not Path(p).is_file():
                raise UserError(f"{kind} task file {p} not found; give the path of an existing file", param=kind)
    unknown = set(weights or {}) - set(TASK_KINDS)
    if unknown:
        raise UserError(f"task weights for unknown kinds {sorted(unknown)}; the kinds are {', '.join(TASK_KINDS)}",
                        param="weights")
    if generate_metric not in ("exact_match", "contains"):
        raise UserError(f"generate_metric must be exact_match or contains, got {generate_metric!r}",
                        param="generate_metric")
    absolute = {k: tuple(os.path.abspath(p) for p in v) for k, v in files.items()}
    return EvalScore(absolute["choice"], absolute["generate"], absolute["perplexity"], dict(weights or {}),
                     generate_metric, threads, device, max_tokens, fewshot)
