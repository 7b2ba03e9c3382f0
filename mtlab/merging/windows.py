"""Merge-set selection by sliding windows: the search of the FF-merging recipe, and the final numbers.

The FF-merging recipe (docs/methods.md, section 2): slide a window of k adjacent layers over a
stack, merge the window's FF sublayers (permute or vanilla) into one tied sublayer, score
every merged model on VALIDATION data and keep the best window per k; then fine-tune the
tied model briefly (`mtlab.merging.recover`). The baseline is layer pruning at the same k
(`mtlab.merging.build.prune_model`).

Data discipline (one of the public code's defects was using one split for everything):

* alignment statistics (FF feature correlations) come from `align_split` (train);
* windows are scored and selected on `select_split` (dev);
* the test split is never read here except by `final_eval`, which a user calls
  explicitly on the few models chosen on dev.

At equal k pruning removes more parameters than merging (it drops whole blocks);
`window_search` reports `params` and `params_removed` of every row so the comparison stays
honest (pruning is also faster at inference; merging is not).

Spec strings in the result: a merge is its `MergeSpec` string ("encoder:2-4@3/permute");
pruning is "prune STACK:START-END" naming the WINDOW (the blocks after START are dropped;
the `removed` column spells out what disappears). `mtlab.candidate.apply(model, spec, ...)`
rebuilds the model of any row.
"""
from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence

import pandas as pd
from torch import nn
from tqdm.auto import tqdm

from ..anatomy import anatomy
from ..measure import count_params
from .build import merge_model, prune_model
from .correlations import BatchesFn, CorrelationCache
from .methods import get_merge_method, merge_methods
from .spec import MergeSpec, PruneSpec, layer_runs

__all__ = ["windows", "window_search", "final_eval", "refuse_test", "FIXED_COLUMNS", "ScoreFn"]

ScoreFn = Callable[[nn.Module], Mapping[str, float]]
Trial = tuple[str, int, int, str]  # (stack, start, size, method); method "prune" for pruning

FIXED_COLUMNS = {"stack", "start", "size", "layers", "kind", "method", "anchor", "spec", "removed", "params",
                 "params_removed", "params_removed_frac", "ff_removed", "blocks_removed", "build_seconds", "best",
                 "n_eval", "eval_seconds"}


def windows(depth: int, sizes: Iterable[int] | None = None) -> list[tuple[int, int]]:
    """Every contiguous window (start, size) of a stack of `depth` layers, size >= 2.

    `sizes` defaults to 2..depth. Ordered by size, then start.
    >>> windows(4, [2, 3])
    [(0, 2), (1, 2), (2, 2), (0, 3), (1, 3)]
    """
    depth = int(depth)
    if depth < 2:
        raise ValueError(f"a stack of {depth} layer(s) has no window of 2 or more layers to merge")
    sizes = list(range(2, depth + 1)) if sizes is None else sorted({int(k) for k in sizes})
    bad = [k for k in sizes if not 2 <= k <= depth]
    if bad:
        raise ValueError(f"window sizes {bad} impossible for a stack of {depth} layers: use sizes in 2..{depth}")
    return [(start, k) for k in sizes for start in range(depth - k + 1)]


# ---------------------------------------------------------------------------
# scoring

def refuse_test(split: str, what: str) -> None:
    """The test split is read only by `final_eval`: selecting or training on it is refused."""
    if split == "test":
        raise ValueError(f"{what}='test': the test split is reserved for final numbers (final_eval) of models "
                         "chosen on dev; align on 'train' and select on 'dev'")


def _numeric(d: Mapping) -> dict[str, float]:
    out = {}
    for k, v in d.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        out[{"n": "n_eval", "seconds": "eval_seconds"}.get(k, k)] = v
    return out


def _task_scorer(task, split: str, limit: int | None, eval_kw: Mapping) -> ScoreFn:
    def score(m):
        return task.evaluate(m, split, limit=limit, progress=False, **eval_kw)
    return score


def _mark_best(df: pd.DataFrame, metric: str, higher_is_better: bool) -> pd.Series:
    best = pd.Series(False, index=df.index)
    cand = df[df.kind.isin(["merge", "prune"]) & df[metric].notna()]
    for _, g in cand.groupby(["stack", "size", "method"], sort=False):
        best[g[metric].idxmax() if higher_is_better else g[metric].idxmin()] = True
    return best


# ---------------------------------------------------------------------------
# the window search, step by step

def _check_search(task, score_fn, align_split: str, select_split: str, align_batches,
                  methods: Sequence[str] | None, include_pruning: bool) -> list[str]:
    """Refuse what cannot be searched (no scorer, the test split, unknown methods); the methods to run."""
    if score_fn is None and task is None:
        raise ValueError("pass a task (seq2seq models) or score_fn(model) -> dict of scores")
    refuse_test(select_split, "select_split")
    refuse_test(align_split, "align_split")
    if task is not None and align_split == select_split and align_batches is None:
        warnings.warn(f"align_split == select_split == {align_split!r}: windows are selected on the data their "
                      "alignment was computed on; align on 'train' and select on 'dev'", stacklevel=3)
    methods = list(merge_methods(searched=True) if methods is None else methods)
    bad = [m for m in methods if m.partition(":")[0] not in merge_methods()]  # "permute_lowrank:r=8": with options
    if bad:
        raise ValueError(f"unknown method(s) {bad}; use {merge_methods()} (or register one with "
                         "@mtlab.merging.methods.merge_method)")
    if not methods and not include_pruning:
        raise ValueError("nothing to search: no merge method and include_pruning=False")
    return methods


def _scorer(task, score_fn: ScoreFn | None, split: str, limit: int | None, eval_kw: Mapping | None,
            metric: str | None, higher_is_better: bool | None) -> tuple[ScoreFn, str | None, bool]:
    """(score_fn, metric, higher_is_better): the task's evaluate() and primary metric unless `score_fn` is given."""
    if score_fn is None:
        score_fn = _task_scorer(task, split, limit, dict(eval_kw or {}))
        metric = metric or task.primary_metric
        higher_is_better = task.higher_is_better if higher_is_better is None else higher_is_better
    elif higher_is_better is None:
        if task is None:
            raise ValueError("with score_fn, say which way is better: higher_is_better=True or False")
        higher_is_better = task.higher_is_better
    return score_fn, metric, higher_is_better


def _alignment_cache(model: nn.Module, task, methods: Sequence[str], cache: CorrelationCache | None,
                     align_batches: BatchesFn | Sequence | None, align_split: str, align_tokens: int | None,
                     batch_size: int, seed: int) -> CorrelationCache:
    """The correlation cache of `model`, aligned on `align_batches` or else on the task's `align_split`."""
    if align_batches is None and task is not None:
        def align_batches():
            return task.iter_batches(align_split, batch_size, shuffle=True, seed=seed)
    aligned = [m for m in methods if get_merge_method(m).needs_correlations]
    if aligned and align_batches is None:
        raise ValueError(f"method {aligned[0]!r} needs alignment data: pass align_batches (a callable returning "
                         "fresh batches) or a task")
    if cache is None:
        return CorrelationCache(model, align_batches, max_tokens=align_tokens)
    if cache.model is not model:
        raise ValueError("cache was built for another model")
    return cache


def _candidates(an, stacks: Sequence[str], sizes: Iterable[int] | None, starts: set[int] | None,
                methods: Sequence[str], include_pruning: bool) -> list[Trial]:
    """Every (stack, start, size, method) to score: each window, each method, then its pruning."""
    plan = []
    for s in stacks:
        for start, k in windows(len(an.stack(s)), sizes):
            if starts is not None and start not in starts:
                continue
            plan += [(s, start, k, m) for m in methods]
            if include_pruning:
                plan.append((s, start, k, "prune"))
    if not plan:
        raise ValueError(f"no window fits: stacks {stacks}, sizes {sizes}, starts {sorted(starts or [])}")
    return plan


def _build(model: nn.Module, an, cache: CorrelationCache, candidate: Trial, anchor: str) -> tuple[nn.Module, dict]:
    """The model of one candidate and its describing columns (stack .. removed)."""
    s, start, k, method = candidate
    layers = list(range(start, start + k))
    if method == "prune":
        built = prune_model(model, s, start, k)
        spec, kind, anchor_layer, removed = str(PruneSpec.window(s, start, k)), "prune", start, layers[1:]
    else:
        ms = MergeSpec(s, tuple(layers), anchor, method)
        ms.validate(an)
        built = merge_model(model, [ms], cache=cache)
        spec, kind, anchor_layer, removed = str(ms), "merge", ms.anchor_layer(), ms.others()
    return built, dict(stack=s, start=start, size=k, layers=layer_runs(layers), kind=kind, method=method,
                       anchor=anchor_layer, spec=spec, removed=f"{s}:{layer_runs(removed)}")


def _score_all(model: nn.Module, an, plan: list[Trial], anchor: str, cache: CorrelationCache, score_fn: ScoreFn,
               include_original: bool, progress: bool) -> list[dict]:
    """One row per candidate (after the untouched model's, with `include_original`), built and
    scored one at a time so that one copy of the model is alive at once."""
    def scores(m) -> dict:
        m.eval()
        return _numeric(score_fn(m))

    n0 = count_params(model)
    rows = []
    bar = tqdm(total=len(plan) + int(include_original), desc="window search", disable=not progress)
    if include_original:
        rows.append(dict(stack="-", start=-1, size=0, layers="", kind="original", method="none", anchor=-1,
                         spec="original", removed="", params=n0, params_removed=0, params_removed_frac=0.0,
                         ff_removed=0, blocks_removed=0, **scores(model), build_seconds=0.0))
        bar.update()
    for candidate in plan:
        t0 = time.perf_counter()
        built, head = _build(model, an, cache, candidate, anchor)
        seconds = time.perf_counter() - t0
        n, k = count_params(built), head["size"]
        bar.set_postfix_str(head["spec"])
        rows.append(dict(**head, params=n, params_removed=n0 - n, params_removed_frac=(n0 - n) / n0, ff_removed=k - 1,
                         blocks_removed=k - 1 if head["kind"] == "prune" else 0, **scores(built),
                         build_seconds=seconds))
        del built
        bar.update()
    bar.close()
    return rows


def _result_frame(rows: list[dict], config: dict) -> pd.DataFrame:
    """The rows as a DataFrame with `best` marked by the metric (default: the first score column) and
    `attrs["config"]` (whose "metric" entry is filled in here)."""
    df = pd.DataFrame(rows)
    metric = config["metric"]
    if metric is None:
        metric = next((c for c in df.columns if c not in FIXED_COLUMNS), None)
    if metric not in df.columns:
        raise ValueError(f"metric {metric!r} is not among the scores {[c for c in df.columns if c not in FIXED_COLUMNS]}")
    df["best"] = _mark_best(df, metric, config["higher_is_better"])
    config["metric"] = metric
    df.attrs["config"] = config
    return df


def window_search(model: nn.Module, task=None, stack: str | Sequence[str] | None = None,
                  sizes: Iterable[int] | None = (2, 3), anchor: str = "middle",
                  methods: Sequence[str] | None = None, include_pruning: bool = True,
                  align_split: str = "train", select_split: str = "dev", align_tokens: int | None = 10_000,
                  select_limit: int | None = None, *, score_fn: ScoreFn | None = None,
                  align_batches: BatchesFn | Sequence | None = None, metric: str | None = None,
                  higher_is_better: bool | None = None, starts: Iterable[int] | None = None,
                  batch_size: int = 64, seed: int = 0, eval_kw: Mapping | None = None,
                  include_original: bool = True, cache: CorrelationCache | None = None,
                  progress: bool = True) -> pd.DataFrame:
    """Score every window merge (and the pruning baseline) of `stack` on validation data.

    One row per (stack, start, size, method) (method "prune" for pruning rows), plus,
    with `include_original`, a row kind="original" (start -1, size 0) for the untouched
    model. Columns: stack, start, size, layers, kind ("merge" / "prune" / "original"),
    method, anchor, spec, removed (the FF sublayers tied away, or the blocks dropped),
    params, params_removed, params_removed_frac, ff_removed, blocks_removed, the scores
    (for a task: its evaluate() metrics, e.g. per, wer, with n_eval and eval_seconds),
    build_seconds, and `best`: True on the best row of each (stack, size, method) by
    `metric`. `df.attrs["config"]` records the settings and the alignment token counts.

    Seq2seq tasks: windows are aligned on `align_split` (shuffled batches of `batch_size`,
    `seed`; at most `align_tokens` tokens per stack) and scored with
    `task.evaluate(model, select_split, limit=select_limit)`; `metric` / `higher_is_better`
    default to the task's primary metric. Other models (e.g. the encoder-only MiniLM): pass
    `score_fn(model) -> {name: value}` (column names come from its dict), `align_batches`
    (a callable returning fresh batches of alignment data), `metric` (default: the first
    key) and `higher_is_better` (required). `sizes=None`: every size 2..depth; `starts`
    restricts window starts. The test split is never touched.
    """
    methods = _check_search(task, score_fn, align_split, select_split, align_batches, methods, include_pruning)
    by_task = score_fn is None
    score_fn, metric, higher_is_better = _scorer(task, score_fn, select_split, select_limit, eval_kw, metric,
                                                 higher_is_better)
    cache = _alignment_cache(model, task, methods, cache, align_batches, align_split, align_tokens, batch_size, seed)
    an = anatomy(model)
    stacks = list(an.stacks) if stack is None else [stack] if isinstance(stack, str) else list(stack)
    for s in stacks:
        an.stack(s)  # KeyError naming the valid stacks
    starts = None if starts is None else {int(s) for s in starts}
    plan = _candidates(an, stacks, sizes, starts, methods, include_pruning)
    rows = _score_all(model, an, plan, anchor, cache, score_fn, include_original, progress)
    return _result_frame(rows, {
        "model": type(model).__name__, "family": an.family, "stacks": {s: len(an.stack(s)) for s in stacks},
        "sizes": None if sizes is None else sorted({int(k) for k in sizes}), "starts": None if starts is None else sorted(starts),
        "anchor": anchor, "methods": methods, "include_pruning": include_pruning,
        "prune_keeps": "first block of the window",
        "task": getattr(task, "name", None) if task is not None else None,
        "scored_by": f"task.evaluate({select_split!r}, limit={select_limit})" if by_task else "score_fn",
        "align_split": align_split if task is not None else "align_batches", "select_split": select_split,
        "align_tokens": align_tokens, "alignment_tokens_used": {f"{s}@{a}": n for (s, a), n in cache.tokens.items()},
        "select_limit": select_limit, "metric": metric, "higher_is_better": bool(higher_is_better),
        "batch_size": batch_size, "seed": seed, "original_params": count_params(model),
        "correlation_seconds": round(cache.seconds, 3),
    })


def final_eval(models: Mapping[str, nn.Module], task=None, split: str = "test", limit: int | None = None, *,
               score_fn: ScoreFn | None = None, eval_kw: Mapping | None = None, progress: bool = True) -> pd.DataFrame:
    """Final numbers for a few models chosen on dev: one row per name with params and the
    scores on `split` (the test split by default; the only place this module reads it).
    `score_fn(model) -> dict` replaces `task.evaluate` for non-seq2seq models."""
    if score_fn is None:
        if task is None:
            raise ValueError("pass a task or score_fn")
        score_fn = _task_scorer(task, split, limit, dict(eval_kw or {}))
    rows = []
    for name, m in tqdm(models.items(), desc=f"final eval ({split})", disable=not progress):
        m.eval()
        rows.append({"name": name, "params": count_params(m), "split": split, **_numeric(score_fn(m))})
    return pd.DataFrame(rows)
