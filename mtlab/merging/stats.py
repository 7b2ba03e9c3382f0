"""Exact streamed correlation statistics for aligning the FF neurons of a merge set.

For a merge set (layers of one stack) and its anchor layer, the alignment
needs, for every other layer l, the d_ff x d_ff Pearson correlation between
the anchor's features (rows) and layer l's features (columns), by default at
the `ff_pre` hook point (output of w_in, before the nonlinearity; for a gated
FF the linear branch, see `mtlab.capture`). The sufficient statistics are
accumulated in float64 over batches, never storing tokens:

    n, per layer sum_x and sum_x^2 (d_ff each), per other layer A^T X (d_ff x d_ff)

The statistics themselves live in `mtlab.stats` (`CorrelationStats`, shared with
`mtlab.similarity`); this module captures them from a model. Defects of the public
code that this avoids (see docs/methods.md, section 2):

* the anchor's own statistics are accumulated ONCE per token (the anchor is
  given separately from the other layers, and may not appear among them);
  counting its self-term twice shrank correlations and changed the matches;
* padding is excluded and each stack keeps its own token count (the capture
  masks encoder tokens with attention_mask, decoder tokens with the labels),
  rather than normalising decoder statistics by the encoder's token count.

Convention (shared with `mtlab.stats` and `mtlab.merging.align`): rows = anchor neurons,
columns = the other layer's neurons.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from ..anatomy import anatomy
from ..capture import Capture
from ..stats import CorrelationFeed, CorrelationStats

__all__ = ["CorrelationStats", "merge_correlations"]


def merge_correlations(model: nn.Module, batches: Iterable | Callable[[], Iterable], stack: str,
                       layers: list[int], anchor: int, max_tokens: int | None = 10_000,
                       point: str = "ff_pre", progress: bool = True, return_stats: bool = False,
                       device: torch.device | str | None = None):
    """Correlations {layer: (d_ff x d_ff) float64} of the anchor vs every other layer of the merge set.

    One capture pass over `batches` (mtlab Batches or dicts; or a callable returning them),
    counting at most `max_tokens` non-padding tokens of `stack`. `anchor` may or may not be
    in `layers`; it is never compared with itself. Negative indices count from the end;
    result keys are non-negative. With `return_stats=True` the CorrelationStats is returned
    instead (its `.n` is the token count).
    """
    an = anatomy(model)
    st = an.stack(stack)
    anchor = st.layer(anchor).index
    others = []
    for i in layers:
        j = st.layer(i).index
        if j != anchor and j not in others:
            others.append(j)
    if not others:
        raise ValueError(f"merge set {layers} has no layer other than the anchor {anchor}")
    names = {j: f"{stack}.{j}.{point}" for j in others}
    anchor_point = f"{stack}.{anchor}.{point}"
    stats = CorrelationStats(anchor=anchor, device=device)
    cap = Capture(model, [anchor_point, *names.values()], [CorrelationFeed(stats, anchor_point, names)])
    cap.run(batches() if callable(batches) else batches, max_tokens=max_tokens, progress=progress,
            desc=f"correlations {stack} anchor {anchor}")
    if stats.n == 0:
        raise ValueError(f"no non-padding {stack} tokens were captured")
    if return_stats:
        return stats
    return {j: stats.correlation(j) for j in others}
