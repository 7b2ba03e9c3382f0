"""Building the candidates of the FF-merging recipe: a merged (tied) copy, the layer-pruning
baseline at equal k, and the check that a merged model's ties still hold.

Layer pruning at equal k: merging k layers removes k-1 FF sublayers (their weights are
tied to the anchor's); `prune_model` removes k-1 whole BLOCKS of the window and keeps its
FIRST block (so for T5 the stack-wide relative position bias of block 0 is never
dropped, and "window 2-4" reads the same for both methods: layers 3 and 4 disappear). A
pruned block takes its attention and norms with it, so at equal k pruning removes more
parameters than merging (docs/methods.md, section 2).
"""
from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence

from torch import nn

from ..anatomy import FF_ROLES, Anatomy, anatomy, sync_cache_depth
from ..surgery import drop_blocks
from .correlations import BatchesFn, CorrelationCache
from .merge import merge_ffs, merged_specs
from .spec import MergeSpec, PruneSpec, layer_runs

__all__ = ["merge_model", "prune_model", "prune_windows", "check_windows", "tie_groups", "check_ties"]


def merge_model(model: nn.Module, specs: Iterable[MergeSpec | str] | MergeSpec | str,
                batches_fn: BatchesFn | Sequence | None = None, max_tokens: int | None = 10_000, *,
                cache: CorrelationCache | None = None, progress: bool = False, inplace: bool = False) -> nn.Module:
    """A merged, tied COPY of `model`; `model` itself is untouched (`inplace`: `model` is merged and
    returned, for a copy the caller owns).

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
    out = model if inplace else copy.deepcopy(model)
    merge_ffs(out, specs, correlations=cache)
    sync_cache_depth(out)  # a model given with a decoder deeper than its encoder generates too
    return out


def prune_model(model: nn.Module, stack: str, start: int, size: int) -> nn.Module:
    """Layer-pruning baseline for the window `start .. start+size-1` of `stack`: a copy of the model
    keeping the window's FIRST block and dropping the size-1 blocks after it (the same number of
    FF sublayers a merge of the window removes, plus their attention and norms). `model` is untouched."""
    return prune_windows(model, [PruneSpec.window(stack, start, size)])


def check_windows(model_or_anatomy: nn.Module | Anatomy, prunes: Iterable[PruneSpec | str]) -> list[PruneSpec]:
    """Check pruning windows against a model, all in ITS layer numbering: each fits its stack, has at
    least 2 layers, and no two windows of a stack share a layer. Returns them as PruneSpecs."""
    an = model_or_anatomy if isinstance(model_or_anatomy, Anatomy) else anatomy(model_or_anatomy)
    prunes = [PruneSpec.parse(p) for p in prunes]
    for p in prunes:
        if p.stack not in an.stacks:
            raise ValueError(f"{p}: {type(an.model).__name__} ({an.family}) has no stack {p.stack!r}; "
                             f"use one of {list(an.stacks)}")
        depth = len(an.stacks[p.stack])
        if p.size < 2 or p.start < 0 or p.end >= depth:
            raise ValueError(f"{p}: window start={p.start} size={p.size} does not fit stack {p.stack!r} with "
                             f"{depth} layers (need size >= 2 and start + size <= {depth})")
    for i, p in enumerate(prunes):
        for q in prunes[:i]:
            common = sorted(set(range(p.start, p.end + 1)) & set(range(q.start, q.end + 1)))
            if q.stack == p.stack and common:
                raise ValueError(f"pruning windows '{q}' and '{p}' overlap at {p.stack} layer(s) {common}; every "
                                 "window names layers of the model the edits start from, and each keeps its first "
                                 f"layer: make the windows disjoint, or write them as one window "
                                 f"'prune {p.stack}:{min(p.start, q.start)}-{max(p.end, q.end)}'")
    return prunes


def prune_windows(model: nn.Module, prunes: Iterable[PruneSpec | str], *, inplace: bool = False) -> nn.Module:
    """A copy of `model` with every window pruned at once (each keeps its first block and drops the
    rest); all windows name layers of `model` itself, so their order does not matter. Recorded
    merges are renumbered (`mtlab.surgery.drop_blocks`); `config.mtlab_pruned` gains one entry per
    window, the dropped layers in the numbering of the model they were pruned from. `model` is
    untouched unless `inplace` (for a copy the caller owns)."""
    prunes = check_windows(model, prunes)
    drop: dict[str, list[int]] = {}
    for p in prunes:
        drop.setdefault(p.stack, []).extend(p.dropped())
    out = drop_blocks(model, drop, inplace=inplace)
    config = getattr(out, "config", None)
    if config is not None and prunes:
        config.mtlab_pruned = (list(getattr(config, "mtlab_pruned", None) or [])
                               + [f"{p.stack}:{layer_runs(p.dropped())}" for p in prunes])
    return out


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
