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

from ..anatomy import FF_ROLES, anatomy
from ..surgery import drop_blocks
from .correlations import BatchesFn, CorrelationCache
from .merge import merge_ffs, merged_specs
from .spec import MergeSpec, PruneSpec, layer_runs

__all__ = ["merge_model", "prune_model", "tie_groups", "check_ties"]


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
