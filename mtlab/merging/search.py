"""Merge-set selection by sliding windows, the layer-pruning baseline, recovery fine-tuning.

The FF-merging recipe (docs/methods.md, section 2): slide a window of k adjacent layers over a
stack, merge the window's FF sublayers (permute or vanilla) into one tied sublayer, score
every merged model on VALIDATION data and keep the best window per k; then fine-tune the
tied model briefly. The baseline is layer pruning at the same k.

Data discipline (one of the public code's defects was using one split for everything):

* alignment statistics (FF feature correlations) come from `align_split` (train);
* windows are scored and selected on `select_split` (dev);
* the test split is never read here except by `final_eval`, which a user calls
  explicitly on the few models chosen on dev.

Layer pruning at equal k: merging k layers removes k-1 FF sublayers (their weights are
tied to the anchor's); `prune_model` removes k-1 whole BLOCKS of the window and keeps its
FIRST block (so for T5 the stack-wide relative position bias of block 0 is never
dropped, and "window 2-4" reads the same for both methods: layers 3 and 4 disappear). A
pruned block takes its attention and norms with it, so at equal k pruning removes more
parameters than merging; `window_search` reports `params` and `params_removed` of every
row so the comparison stays honest (pruning is also faster at inference; merging is not).

Spec strings in the result: a merge is its `MergeSpec` string ("encoder:2-4@3/permute");
pruning is "prune STACK:START-END" naming the WINDOW (the blocks after START are dropped;
the `removed` column spells out what disappears). `mtlab.candidate.apply(model, spec, ...)`
rebuilds the model of any row.
"""
from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from ..anatomy import FF_ROLES, anatomy
from ..measure import count_params
from ..surgery import drop_blocks
from .spec import MergeSpec, PruneSpec, candidate_spec, layer_runs
from .merge import merge_ffs, merged_specs, save_merged
from .methods import get_merge_method, merge_methods
from .stats import merge_correlations

__all__ = ["windows", "CorrelationCache", "merge_model", "prune_model", "PruneSpec", "candidate_spec", "count_params",
           "window_search", "final_eval", "recover", "tie_groups", "check_ties"]

ScoreFn = Callable[[nn.Module], Mapping[str, float]]
BatchesFn = Callable[[], Iterable]


# ---------------------------------------------------------------------------
# windows

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
# correlations, memoised

class CorrelationCache:
    """Anchor-vs-layer FF correlations of ONE model on fixed alignment data, computed on demand.

    Use it as `merge_ffs(..., correlations=cache)`: for a spec it returns {layer: corr}
    for the spec's non-anchor layers, computing (with `merge_correlations`, one capture
    pass per call over the layers still missing) only pairs not seen before; results are
    memoised by (stack, anchor, layer). Every window of a search starts from the same
    unmerged model, so a pair's correlation does not depend on the window, and each pair
    is computed once. `batches_fn()` must return FRESH batches each call, the same ones
    every time (a list also works; a one-shot generator does not); the token cap
    `max_tokens` then selects the same tokens for every pair.
    """

    def __init__(self, model: nn.Module, batches_fn: BatchesFn | Sequence | None, max_tokens: int | None = 10_000,
                 progress: bool = False):
        if batches_fn is not None and not callable(batches_fn) and not isinstance(batches_fn, Sequence):
            raise TypeError("batches_fn must be a callable returning fresh batches (or a list of batches); "
                            f"got {type(batches_fn).__name__}, which can be iterated only once")
        self.model = model
        self.batches_fn = batches_fn
        self.max_tokens = max_tokens
        self.progress = progress
        self._corr: dict[tuple[str, int, int], torch.Tensor] = {}
        self.tokens: dict[tuple[str, int], int] = {}  # (stack, anchor) -> alignment tokens used
        self.seconds = 0.0

    def __call__(self, spec: MergeSpec) -> dict[int, torch.Tensor]:
        a = spec.anchor_layer()
        missing = [i for i in spec.others() if (spec.stack, a, i) not in self._corr]
        if missing:
            if self.batches_fn is None:
                raise ValueError(f"merge spec {str(spec)!r} needs alignment data (method {spec.method}): pass batches_fn, "
                                 "a callable returning fresh batches of the alignment split")
            t0 = time.perf_counter()
            st = merge_correlations(self.model, self.batches_fn, spec.stack, missing, a,
                                    max_tokens=self.max_tokens, progress=self.progress, return_stats=True)
            for i in missing:
                self._corr[spec.stack, a, i] = st.correlation(i).cpu()
            self.tokens[spec.stack, a] = st.n
            self.seconds += time.perf_counter() - t0
        return {i: self._corr[spec.stack, a, i] for i in spec.others()}

    def __len__(self) -> int:
        return len(self._corr)


# ---------------------------------------------------------------------------
# building candidates

def merge_model(model: nn.Module, specs: Iterable[MergeSpec | str] | MergeSpec | str,
                batches_fn: BatchesFn | Sequence | None = None, max_tokens: int | None = 10_000, *,
                cache: CorrelationCache | None = None, progress: bool = False) -> nn.Module:
    """A merged, tied COPY of `model`; `model` itself is untouched.

    Correlations for "permute" sets are computed on the alignment data `batches_fn()`
    (a callable returning fresh batches: mtlab Batches or dicts of model inputs, e.g.
    `lambda: task.iter_batches("train", 64, shuffle=True)`), at most `max_tokens`
    non-padding tokens per stack, through merge_ffs's callable hook. Pass `cache` (a
    CorrelationCache of this same model) to reuse correlations across calls. "vanilla"
    sets need no data.
    """
    if cache is None:
        cache = CorrelationCache(model, batches_fn, max_tokens=max_tokens, progress=progress)
    elif cache.model is not model:
        raise ValueError("cache was built for another model: correlations must come from the model being merged")
    out = copy.deepcopy(model)
    return merge_ffs(out, specs, correlations=cache)


def prune_model(model: nn.Module, stack: str, start: int, size: int) -> nn.Module:
    """Layer-pruning baseline for the window `start .. start+size-1` of `stack`: a copy of the model
    keeping the window's FIRST block and dropping the size-1 blocks after it (the same number of
    FF sublayers a merge of the window removes, plus their attention and norms). `model` is untouched."""
    an = anatomy(model)
    depth = len(an.stack(stack))
    if size < 2 or start < 0 or start + size > depth:
        raise ValueError(f"window start={start} size={size} does not fit stack {stack!r} with {depth} layers "
                         f"(need size >= 2 and start + size <= {depth})")
    dropped = PruneSpec.window(stack, start, size).dropped()
    out = drop_blocks(model, {stack: dropped})
    config = getattr(out, "config", None)
    if config is not None:
        config.mtlab_pruned = list(getattr(config, "mtlab_pruned", None) or []) + [f"{stack}:{layer_runs(dropped)}"]
    return out


# ---------------------------------------------------------------------------
# scoring

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


def _refuse_test(split: str, what: str) -> None:
    if split == "test":
        raise ValueError(f"{what}='test': the test split is reserved for final numbers (final_eval) of models "
                         "chosen on dev; align on 'train' and select on 'dev'")


def _mark_best(df: pd.DataFrame, metric: str, higher_is_better: bool) -> pd.Series:
    best = pd.Series(False, index=df.index)
    cand = df[df.kind.isin(["merge", "prune"]) & df[metric].notna()]
    for _, g in cand.groupby(["stack", "size", "method"], sort=False):
        best[g[metric].idxmax() if higher_is_better else g[metric].idxmin()] = True
    return best


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
    if score_fn is None and task is None:
        raise ValueError("pass a task (seq2seq models) or score_fn(model) -> dict of scores")
    _refuse_test(select_split, "select_split")
    _refuse_test(align_split, "align_split")
    if task is not None and align_split == select_split and align_batches is None:
        warnings.warn(f"align_split == select_split == {align_split!r}: windows are selected on the data their "
                      "alignment was computed on; align on 'train' and select on 'dev'", stacklevel=2)
    methods = list(merge_methods() if methods is None else methods)
    bad = [m for m in methods if m not in merge_methods()]
    if bad:
        raise ValueError(f"unknown method(s) {bad}; use {merge_methods()} (or register one with "
                         "@mtlab.merging.methods.merge_method)")
    if not methods and not include_pruning:
        raise ValueError("nothing to search: no merge method and include_pruning=False")
    eval_kw = dict(eval_kw or {})
    by_task = score_fn is None
    if by_task:
        score_fn = _task_scorer(task, select_split, select_limit, eval_kw)
        metric = metric or task.primary_metric
        higher_is_better = task.higher_is_better if higher_is_better is None else higher_is_better
    elif higher_is_better is None:
        if task is None:
            raise ValueError("with score_fn, say which way is better: higher_is_better=True or False")
        higher_is_better = task.higher_is_better
    if align_batches is None and task is not None:
        def align_batches():
            return task.iter_batches(align_split, batch_size, shuffle=True, seed=seed)
    aligned = [m for m in methods if get_merge_method(m).needs_correlations]
    if aligned and align_batches is None:
        raise ValueError(f"method {aligned[0]!r} needs alignment data: pass align_batches (a callable returning "
                         "fresh batches) or a task")
    if cache is None:
        cache = CorrelationCache(model, align_batches, max_tokens=align_tokens)
    elif cache.model is not model:
        raise ValueError("cache was built for another model")

    an = anatomy(model)
    stacks = list(an.stacks) if stack is None else [stack] if isinstance(stack, str) else list(stack)
    for s in stacks:
        an.stack(s)  # KeyError naming the valid stacks
    starts = None if starts is None else {int(s) for s in starts}
    plan = []
    for s in stacks:
        depth = len(an.stack(s))
        for start, k in windows(depth, sizes):
            if starts is not None and start not in starts:
                continue
            plan += [(s, start, k, m) for m in methods]
            if include_pruning:
                plan.append((s, start, k, "prune"))
    if not plan:
        raise ValueError(f"no window fits: stacks {stacks}, sizes {sizes}, starts {sorted(starts or [])}")

    n0 = count_params(model)
    rows = []

    def row(**kw):
        rows.append(kw)
        return kw

    def scores(m) -> dict:
        m.eval()
        return _numeric(score_fn(m))

    bar = tqdm(total=len(plan) + int(include_original), desc="window search", disable=not progress)
    if include_original:
        row(stack="-", start=-1, size=0, layers="", kind="original", method="none", anchor=-1, spec="original",
            removed="", params=n0, params_removed=0, params_removed_frac=0.0, ff_removed=0, blocks_removed=0,
            **scores(model), build_seconds=0.0)
        bar.update()
    for s, start, k, method in plan:
        layers = list(range(start, start + k))
        t0 = time.perf_counter()
        if method == "prune":
            cand = prune_model(model, s, start, k)
            spec, kind, anchor_layer = str(PruneSpec.window(s, start, k)), "prune", start
            removed, blocks = f"{s}:{layer_runs(layers[1:])}", k - 1
        else:
            ms = MergeSpec(s, tuple(layers), anchor, method)
            ms.validate(an)
            cand = merge_model(model, [ms], cache=cache)
            anchor_layer = ms.anchor_layer()
            spec, kind, removed, blocks = str(ms), "merge", f"{s}:{layer_runs(ms.others())}", 0
        built = time.perf_counter() - t0
        n = count_params(cand)
        bar.set_postfix_str(spec)
        row(stack=s, start=start, size=k, layers=layer_runs(layers), kind=kind, method=method, anchor=anchor_layer,
            spec=spec, removed=removed, params=n, params_removed=n0 - n, params_removed_frac=(n0 - n) / n0,
            ff_removed=k - 1, blocks_removed=blocks, **scores(cand), build_seconds=built)
        del cand
        bar.update()
    bar.close()

    df = pd.DataFrame(rows)
    if metric is None:
        metric = next((c for c in df.columns if c not in FIXED_COLUMNS), None)
    if metric not in df.columns:
        raise ValueError(f"metric {metric!r} is not among the scores {[c for c in df.columns if c not in FIXED_COLUMNS]}")
    df["best"] = _mark_best(df, metric, bool(higher_is_better))
    df.attrs["config"] = {
        "model": type(model).__name__, "family": an.family, "stacks": {s: len(an.stack(s)) for s in stacks},
        "sizes": None if sizes is None else sorted({int(k) for k in sizes}), "starts": None if starts is None else sorted(starts),
        "anchor": anchor, "methods": methods, "include_pruning": include_pruning,
        "prune_keeps": "first block of the window",
        "task": getattr(task, "name", None) if task is not None else None,
        "scored_by": f"task.evaluate({select_split!r}, limit={select_limit})" if by_task else "score_fn",
        "align_split": align_split if task is not None else "align_batches", "select_split": select_split,
        "align_tokens": align_tokens, "alignment_tokens_used": {f"{s}@{a}": n for (s, a), n in cache.tokens.items()},
        "select_limit": select_limit, "metric": metric, "higher_is_better": bool(higher_is_better),
        "batch_size": batch_size, "seed": seed, "original_params": n0,
        "correlation_seconds": round(cache.seconds, 3),
    }
    return df


FIXED_COLUMNS = {"stack", "start", "size", "layers", "kind", "method", "anchor", "spec", "removed", "params",
          "params_removed", "params_removed_frac", "ff_removed", "blocks_removed", "build_seconds", "best",
          "n_eval", "eval_seconds"}


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


# ---------------------------------------------------------------------------
# recovery fine-tune

def tie_groups(model: nn.Module) -> list[tuple[str, list[nn.Parameter]]]:
    """For every recorded merge, for every FF projection weight/bias: (name, the Parameter each
    layer of the set uses). A model whose ties hold has one object per group."""
    an = anatomy(model)
    groups = []
    for spec in merged_specs(model):
        st = an.stack(spec.stack)
        for role in FF_ROLES:
            for attr in ("weight", "bias"):
                ps = []
                for i in spec.layers:
                    m = getattr(st.layer(i).ff, role)
                    p = None if m is None else getattr(m, attr, None)
                    if p is not None:
                        ps.append(p)
                if ps:
                    groups.append((f"{spec} {role}.{attr}", ps))
    return groups


def check_ties(model: nn.Module) -> None:
    """Raise AssertionError if a merged set's layers no longer share one Parameter per projection."""
    for name, ps in tie_groups(model):
        if any(p is not ps[0] for p in ps):
            raise AssertionError(f"tie broken: {name} is no longer one shared Parameter")


def recover(model: nn.Module, task, cfg, out_dir: str | Path, *, loss_fn=None, evaluate=None,
            max_seconds: float | None = None, progress: bool = True, save: bool = True):
    """Recovery fine-tune of a merged (tied) or pruned model on `cfg.split` (train) with
    `mtlab.train.train`, in place; resumable: rerun with the same `out_dir` (and a model built
    the same way) to continue from `out_dir/checkpoint`. Tied parameters appear once in
    `model.parameters()`, so the optimizer updates one shared copy and the ties hold; this is
    checked after training (AssertionError otherwise), as is the unchanged parameter count.
    When training is complete and `save`, the model is written to `out_dir/model` with
    `save_merged` (load it with `load_merged`). Returns (model in eval mode, log DataFrame).
    The paper's recipe: AdamW, lr ~5e-5, a short run.
    """
    from ..train import on_main_process, train

    _refuse_test(cfg.split, "cfg.split")
    check_ties(model)
    before = [(name, [id(p) for p in ps]) for name, ps in tie_groups(model)]
    n0 = count_params(model)
    log = train(model, task, cfg, out_dir, loss_fn=loss_fn, evaluate=evaluate, max_seconds=max_seconds,
                progress=progress)
    check_ties(model)
    after = [(name, [id(p) for p in ps]) for name, ps in tie_groups(model)]
    if after != before:
        raise AssertionError("training replaced tied Parameter objects; the merged sets are no longer shared")
    if count_params(model) != n0:
        raise AssertionError(f"parameter count changed during training: {n0} -> {count_params(model)}")
    done = bool(len(log)) and "step" in log and int(log.step.max()) >= cfg.steps
    if save and done:
        on_main_process(lambda: save_merged(model, Path(out_dir) / "model"))
    return model.eval(), log
