"""`cairn merge`: run a mergekit YAML recipe and say what was written; `cairn merge search`: search its numbers."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cairn.errors import UserError
from cairn.merge.recipe import load_recipe, with_inputs
from cairn.merge.run import merge

if TYPE_CHECKING:
    from cairn.merge.search import EvalScore, SearchResult


def merge_recipe(recipe: str, out: str, seed: int | None = None, shard_mib: int = 1024, progress: bool = True,
                 resolve=None) -> int:
    """Merge models as a mergekit YAML recipe says (merge_method linear, slerp, task_arithmetic, ties, dare_linear,
    dare_ties, breadcrumbs, breadcrumbs_ties, model_stock or passthrough; `models:` or `slices:`; parameters as
    scalars, layer gradients or name filters) into a Hugging Face checkpoint at --out, tensor by tensor (memory: one
    shard of --shard-mib plus a few input tensors). --seed fixes the random drops of dare_*; an interrupted merge
    rerun with the same recipe and --out keeps the shards already written."""
    if shard_mib <= 0:
        raise UserError(f"--shard-mib must be positive, got {shard_mib}", param="shard_mib")
    parsed = load_recipe(recipe)
    if resolve is not None:  # GGUF files and LoRA adapters as inputs
        parsed = with_inputs(parsed, resolve)
    r = merge(parsed, out, seed=seed, progress=progress, shard_bytes=shard_mib << 20)
    resumed = f", {r.resumed_shards} kept from an earlier run" if r.resumed_shards else ""
    seeded = f", seed {r.seed}" if r.seed is not None else ""
    print(f"merged ({r.method}{seeded}) {r.tensors} tensors, {r.layers} layers in {r.shards} shard(s){resumed} in "
          f"{r.seconds:.1f}s; wrote {r.out_dir}")
    return 0


def search_recipe(recipe: str, out: str, budget: int, choice: list[str] | None = None,
                  generate: list[str] | None = None, perplexity: list[str] | None = None,
                  population: int | None = None, seed: int = 0, threads: int | None = None, pool: str | None = None,
                  token: str | None = None, bounds: list[str] | None = None, skip_layers: bool = False,
                  progress: bool = True) -> int:
    """Search a mergekit recipe's numbers for the merge that scores best (evolutionary model merging, CMA-ES): every
    weight, density, t, lambda, gamma and epsilon the recipe writes (each entry of a layer gradient too) is searched
    from its value within bounds (weight 0:1, density 0.05:1, t 0:1, lambda 0:2, gamma 0:0.2, epsilon 0:0.2;
    --bounds weight=-1:2 changes one); a passthrough recipe of `slices:` instead searches which model each stacked
    layer is read from (--skip-layers: and which layers to drop). Each of --budget candidates is merged, scored by
    the `cairn eval` tasks given (--choice: acc, --generate: exact match, --perplexity: -ln perplexity; their mean,
    higher is better) and deleted. Writes OUT/best.yaml (input to `cairn merge` and mergekit), OUT/best/ (the best
    model), OUT/search.png and OUT/search.jsonl; rerun the same command to resume an interrupted search (or to
    continue with a larger --budget). --population N candidates per generation (default 4 + 3 ln of the number of
    searched values); --seed S fixes CMA-ES and dare's random drops. --pool ADDRESS (--token T or
    $CAIRN_POOL_TOKEN) scores a generation's candidates in parallel, one per pool device, each worker merging by
    itself (the models and eval files must exist at the same paths on every machine; a --population that is a
    multiple of the device count keeps them all busy)."""
    from cairn.merge.search import eval_score, search
    from cairn.merge.space import describe, search_space

    if budget < 1:
        raise UserError(f"--budget must be at least 1 evaluation, got {budget}", param="budget")
    score = eval_score(choice or (), generate or (), perplexity or (), threads=threads)
    limits = _parse_bounds(bounds or [])
    space = search_space(recipe, limits, skip_layers)
    print(f"searching {len(space.dims)} value(s) of {recipe}:\n  " + describe(space).replace("\n", "\n  "),
          flush=True)
    if pool is None:
        r = search(recipe, score, budget, out, population=population, seed=seed, progress=progress, bounds=limits,
                   skip_layers=skip_layers)
    else:
        r = _search_on_pool(recipe, score, budget, out, population, seed, progress, limits, skip_layers, pool, token)
    resumed = f" ({r.resumed} from an earlier run)" if r.resumed else ""
    params = ", ".join(f"{k}={v}" for k, v in r.best_params.items())
    print(f"searched {r.evaluations} candidates{resumed} in {r.generations} generation(s) of {r.population}; best "
          f"score {r.best_score:.6g} (evaluation {r.best_index}): {params}")
    print(f"wrote {r.best_yaml}, {r.best_dir}, {r.plot}")
    return 0


def _parse_bounds(items: list[str]) -> dict[str, tuple[float, float]]:
    """--bounds NAME=LOW:HIGH entries as {name: (low, high)}."""
    out = {}
    for item in items:
        name, _, rng = item.partition("=")
        low, _, high = rng.partition(":")
        try:
            out[name.strip()] = (float(low), float(high))
        except ValueError:
            raise UserError(f"--bounds {item!r} must look like NAME=LOW:HIGH, e.g. weight=-1:2",
                            param="bounds") from None
    return out


def _search_on_pool(recipe: str, score: EvalScore, budget: int, out: str, population: int | None, seed: int,
                    progress: bool, limits: dict[str, tuple[float, float]], skip_layers: bool, pool: str,
                    token: str | None) -> SearchResult:
    """search() with each generation's candidates merged and scored on the pool's devices."""
    import importlib.util
    import os
    import tempfile

    from cairn.merge.search import search

    if importlib.util.find_spec("ray") is None:
        raise UserError("--pool needs the pool extra (Ray), which is not installed here: pip install 'cairn[pool]'")
    from cairn.pool import control

    control.connect(pool, token)  # before anything imports ray (the CLI passes $CAIRN_POOL_TOKEN as token)
    from cairn.pool.tasks import DeviceMap

    scratch = os.path.join(tempfile.gettempdir(), f"cairn-merge-search-{os.getpid()}")
    with DeviceMap() as run:
        return search(recipe, score, budget, out, population=population, seed=seed, progress=progress,
                      map_fn=run, bounds=limits, skip_layers=skip_layers, scratch=scratch)
