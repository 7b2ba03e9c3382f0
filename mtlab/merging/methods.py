"""The registry of merge methods: how the non-anchor layers of a merge set are aligned
to the anchor before their FF weights are averaged and tied.

A method is one function, registered with a decorator:

    @merge_method("permute", needs_correlations=True)
    def permute(ffs, anchor, correlations):
        return {i: match(c) for i, c in correlations.items()}

It receives the set's FF sublayers `{layer: FF}`, the anchor's layer index and, for a
method that `needs_correlations`, the checked anchor-vs-layer correlation matrices of
every non-anchor layer (computed by `mtlab.merging.correlations.CorrelationCache` or passed to
`merge_ffs`); it returns `{layer: perm or None}` for the non-anchor layers (None: as is;
`perm` in the `mtlab.merging.align` convention). Averaging, tying, recording and saving are
the same for every method. Everything that lists methods (MergeSpec validation,
`window_search`, the experiments) reads `merge_methods()`.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from ..anatomy import FF
from .align import match

__all__ = ["MergeMethod", "merge_method", "merge_methods", "get_merge_method", "unregister_merge_method"]

AlignFn = Callable[[Mapping[int, FF], int, Mapping[int, torch.Tensor] | None], Mapping[int, object]]


@dataclass(frozen=True)
class MergeMethod:
    name: str
    align: AlignFn
    needs_correlations: bool = False


_REGISTRY: dict[str, MergeMethod] = {}


def merge_method(name: str, *, needs_correlations: bool = False) -> Callable[[AlignFn], AlignFn]:
    """Decorator: register `fn(ffs, anchor, correlations) -> {layer: perm | None}` as merge method
    `name` (lower case; the METHOD of a merge spec). Registering a name again replaces it."""
    key = str(name).strip().lower()
    if not key.isidentifier():
        raise ValueError(f"merge method name {name!r} must be a word (letters, digits, _): it is the METHOD "
                         "of a merge spec 'STACK:LAYERS@ANCHOR/METHOD'")

    def register(fn: AlignFn) -> AlignFn:
        _REGISTRY[key] = MergeMethod(key, fn, bool(needs_correlations))
        return fn

    return register


def merge_methods() -> tuple[str, ...]:
    """The registered method names, in registration order (built in: permute, vanilla)."""
    return tuple(_REGISTRY)


def get_merge_method(name: str) -> MergeMethod:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown merge method {name!r}; use one of {merge_methods()} or register one with "
                         "@mtlab.merging.methods.merge_method(name)") from None


def unregister_merge_method(name: str) -> None:
    """Remove a method (e.g. one a test registered)."""
    _REGISTRY.pop(name, None)


@merge_method("permute", needs_correlations=True)
def permute(ffs, anchor, correlations):
    """Verma et al.: align each layer's neurons to the anchor's by a linear assignment on their
    feature correlations."""
    return {i: match(c) for i, c in correlations.items()}


@merge_method("vanilla")
def vanilla(ffs, anchor, correlations):
    """Plain averaging, no alignment (the paper's ablation)."""
    return {i: None for i in ffs if i != anchor}
