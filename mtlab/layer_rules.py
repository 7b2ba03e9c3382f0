"""Which layers a cut keeps: the layer choice rules of the depth baselines (`mtlab.baselines`) and
`keep_only`, a copy of a model with only the kept layers (plain surgery, `mtlab.surgery.drop_blocks`).

Layer choice rules, for a stack of n layers cut to `depth` (0-based layer indices):

- "top" (`keep_bottom`): drop the top layers, keep [0, depth). Sajjad et al.'s top dropping.
- "alternate" (`keep_alternate`): drop the odd layers (0-based) from the top down; when all
  are gone and the stack is still too deep, repeat on the layers that remain. 6 -> 3 keeps
  [0, 2, 4], 6 -> 4 keeps [0, 1, 2, 4], 6 -> 2 keeps [0, 4]. This is Sajjad et al.'s
  "even-alternate" dropping in their 1-based numbering, and for depth = ceil(n/2) it is
  fairseq LayerDrop's "every other layer" ([0, 2, 4, ...]). Layer 0 is always kept.
- "spread" (`keep_for_depth`, SFT and LayerDrop pruning to a plan's depth): evenly spaced,
  layer floor(i * (n-1) / (depth-1)) for i = 0..depth-1, so the first and the last layer are
  always kept (depth 1 keeps [0]). 6 -> 3 keeps [0, 2, 5]; 6 -> 4 [0, 1, 3, 5]; 6 -> 2 [0, 5].
  For 6-layer teachers this is exactly DistilBART's hand-written LAYERS_TO_COPY table; for
  12 layers that table rounds some picks up (12 -> 6: DistilBART [0, 2, 4, 7, 9, 11], ours
  [0, 2, 4, 6, 8, 11]).
"""
from __future__ import annotations

from typing import Callable, Iterable, Mapping

from torch import nn

from .modular.plan import Plan
from .surgery import drop_blocks, stack_depths

__all__ = ["KEEP_RULES", "drop_layers", "keep_alternate", "keep_bottom", "keep_for_depth", "keep_layers", "keep_only",
           "resolve_keep"]

drop_layers = drop_blocks  # the layer-dropping baseline is plain surgery: mtlab.surgery.drop_blocks


# ---------------------------------------------------------------------------
# Layer choice rules (see the module docstring)

def _check_depth(depth: int, n: int, stack: str = "stack") -> None:
    if not isinstance(depth, int) or isinstance(depth, bool) or not 1 <= depth <= n:
        raise ValueError(f"{stack}: depth {depth!r} impossible for a {n}-layer stack; choose 1 <= depth <= {n}")


def keep_bottom(depth: int, n: int) -> list[int]:
    """"top" rule: drop the top n - depth layers."""
    _check_depth(depth, n)
    return list(range(depth))


def keep_alternate(depth: int, n: int) -> list[int]:
    """"alternate" rule: drop odd layers top-down, repeating on what remains (6 -> 3: [0, 2, 4])."""
    _check_depth(depth, n)
    kept = list(range(n))
    while len(kept) > depth:
        victims = set(kept[1::2][::-1][: len(kept) - depth])
        kept = [i for i in kept if i not in victims]
    return kept


def keep_for_depth(depth: int, n: int) -> list[int]:
    """"spread" rule (SFT, LayerDrop to a given depth): evenly spaced, first and last always kept
    (6 -> 3: [0, 2, 5]); layer floor(i * (n-1) / (depth-1)); depth 1 keeps [0]."""
    _check_depth(depth, n)
    if depth == 1:
        return [0]
    return [i * (n - 1) // (depth - 1) for i in range(depth)]


KEEP_RULES: dict[str, Callable[[int, int], list[int]]] = {
    "top": keep_bottom, "alternate": keep_alternate, "spread": keep_for_depth}


def keep_layers(rule: str, depth: int, n: int) -> list[int]:
    """The layers a rule keeps when a stack of n layers is cut to `depth`."""
    if rule not in KEEP_RULES:
        raise ValueError(f"unknown layer rule {rule!r}; use one of {sorted(KEEP_RULES)} or give the kept "
                         "layers per stack, e.g. {'decoder': [0, 2, 4]}")
    return KEEP_RULES[rule](depth, n)


def _check_stacks(model: nn.Module, names: Iterable[str]) -> dict[str, int]:
    d = stack_depths(model)
    unknown = [s for s in names if s not in d]
    if unknown:
        raise ValueError(f"unknown stack(s) {unknown}: {type(model).__name__} has stacks {list(d)}")
    return d


def resolve_keep(model: nn.Module, keep, depths: Mapping[str, int] | None = None) -> dict[str, list[int]]:
    """Kept layers per stack (every stack listed; unnamed stacks keep all their layers) from:
    a rule name ("top", "alternate", "spread") with `depths` (target depth per stack);
    {stack: depth} (the "spread" rule); {stack: [layers]} (explicit); or a modular Plan
    (its depth per stack, "spread" rule). Raises ValueError naming the fix."""
    if isinstance(keep, Plan):
        d = _check_stacks(model, keep.stacks)
        keep.validate(d)
        keep = {s: keep.depth(s) for s in keep.stacks}
    if isinstance(keep, str):
        if keep not in KEEP_RULES:
            raise ValueError(f"unknown layer rule {keep!r}; use one of {sorted(KEEP_RULES)} or give the kept "
                             "layers per stack, e.g. {'decoder': [0, 2, 4]}")
        if not depths:
            raise ValueError(f"rule {keep!r} needs target depths per stack, e.g. depths={{'decoder': 3}}")
        d = _check_stacks(model, depths)
        out = {}
        for s, n in d.items():
            if s in depths:
                _check_depth(depths[s], n, s)
            out[s] = keep_layers(keep, depths[s], n) if s in depths else list(range(n))
        return out
    if not isinstance(keep, Mapping):
        raise ValueError(f"keep must be a rule name, a Plan or a dict per stack, got {type(keep).__name__}")
    d = _check_stacks(model, keep)
    out = {}
    for s, n in d.items():
        v = keep.get(s)
        if v is None:
            out[s] = list(range(n))
        elif isinstance(v, int) and not isinstance(v, bool):
            _check_depth(v, n, s)
            out[s] = keep_for_depth(v, n)
        else:
            idx = [int(i) for i in v]
            if not idx:
                raise ValueError(f"{s}: no layer kept; keep at least one of layers 0-{n - 1}")
            bad = [i for i in idx if not 0 <= i < n]
            if bad:
                raise ValueError(f"{s}: layers {bad} out of range: valid layers are 0-{n - 1}")
            if len(set(idx)) != len(idx):
                raise ValueError(f"{s}: duplicate layers in {idx}; list each kept layer once")
            out[s] = sorted(idx)
    return out


def keep_only(model: nn.Module, keep) -> nn.Module:
    """A copy of `model` with only the kept layers (any form `resolve_keep` accepts with no
    depths: {stack: [layers]}, {stack: depth}, a Plan), in teacher order, via drop_layers."""
    kept = resolve_keep(model, keep)
    d = stack_depths(model)
    return drop_layers(model, {s: [i for i in range(d[s]) if i not in k] for s, k in kept.items() if len(k) < d[s]})
