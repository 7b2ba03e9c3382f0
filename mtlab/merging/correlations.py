"""Anchor-vs-layer FF correlations of one model, memoised across the merges of a search.

Every window of a search starts from the same unmerged model, so the correlation of a
(stack, anchor, layer) pair does not depend on the window: `CorrelationCache` computes
each pair once (docs/methods.md, section 2).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from .spec import MergeSpec
from .stats import merge_correlations

__all__ = ["CorrelationCache", "BatchesFn"]

BatchesFn = Callable[[], Iterable]


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
