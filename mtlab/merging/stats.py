"""Exact streamed correlation statistics for aligning the FF neurons of a merge set.

For a merge set (layers of one stack) and its anchor layer, the alignment
needs, for every other layer l, the d_ff x d_ff Pearson correlation between
the anchor's features (rows) and layer l's features (columns), by default at
the `ff_pre` hook point (output of w_in, before the nonlinearity; for a gated
FF the linear branch, see `mtlab.capture`). The sufficient statistics are
accumulated in float64 over batches, never storing tokens:

    n, per layer sum_x and sum_x^2 (d_ff each), per other layer A^T X (d_ff x d_ff)

Defects of the public code that this avoids (see methods.md section 2):

* the anchor's own statistics are accumulated ONCE per token (the anchor is
  given separately from the other layers, and may not appear among them);
  counting its self-term twice shrank correlations and changed the matches;
* padding is excluded and each stack keeps its own token count (the capture
  masks encoder tokens with attention_mask, decoder tokens with the labels),
  rather than normalising decoder statistics by the encoder's token count.

Convention (shared with `mtlab.merging.align`): rows = anchor neurons,
columns = the other layer's neurons.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from ..anatomy import anatomy
from ..capture import BatchConsumer, Capture

__all__ = ["CorrelationStats", "merge_correlations"]


class CorrelationStats:
    """Streamed Pearson correlation of an anchor layer's features with other layers'.

    >>> st = CorrelationStats(anchor=3)
    >>> st.update(feats_3, {4: feats_4, 5: feats_5})   # same tokens, same row order
    >>> st.correlation(4)                              # (d_anchor x d_4), float64

    A neuron whose feature is constant on the data ("dead": variance at most
    ``eps * (1 + mean^2)``, which absorbs float64 rounding) has no defined
    correlation; its row / column is 0.
    """

    def __init__(self, anchor=None, eps: float = 1e-12, device: torch.device | str | None = None):
        self.anchor = anchor
        self.eps = eps
        self.device = device
        self.n = 0
        self.sum_a: torch.Tensor | None = None
        self.sq_a: torch.Tensor | None = None
        self.sum: dict = {}
        self.sq: dict = {}
        self.cross: dict = {}

    @staticmethod
    def _f64(x: torch.Tensor, device) -> torch.Tensor:
        x = x.detach()
        if device is not None:
            x = x.to(device)
        return x.to(torch.float64)

    def update(self, anchor_feats: torch.Tensor, other_feats: Mapping) -> None:
        """Add one batch: anchor features [n, d_a] and {layer: features [n, d_l]} for the SAME tokens."""
        if anchor_feats.dim() != 2:
            raise ValueError(f"anchor features must be [tokens, d], got shape {tuple(anchor_feats.shape)}")
        if self.anchor is not None and self.anchor in other_feats:
            raise ValueError(f"layer {self.anchor!r} is the anchor: pass its features once, as anchor_feats, "
                             "not also among the other layers (its self-term would be counted twice)")
        if self.sum_a is not None and set(other_feats) != set(self.cross):
            raise ValueError(f"other layers changed between updates: {sorted(map(str, self.cross))} -> "
                             f"{sorted(map(str, other_feats))}")
        n = anchor_feats.shape[0]
        for k, x in other_feats.items():
            if x.dim() != 2 or x.shape[0] != n:
                raise ValueError(f"layer {k!r}: features of shape {tuple(x.shape)} do not match the anchor's "
                                 f"{n} tokens (rows must be the same tokens in the same order)")
        if n == 0:
            return
        a = self._f64(anchor_feats, self.device)
        if self.sum_a is None:
            d = a.shape[1]
            self.sum_a, self.sq_a = a.new_zeros(d), a.new_zeros(d)
            for k, x in other_feats.items():
                self.sum[k] = a.new_zeros(x.shape[1])
                self.sq[k] = a.new_zeros(x.shape[1])
                self.cross[k] = a.new_zeros(d, x.shape[1])
        elif a.shape[1] != self.sum_a.shape[0]:
            raise ValueError(f"anchor width changed: {self.sum_a.shape[0]} -> {a.shape[1]}")
        self.n += n
        self.sum_a += a.sum(0)
        self.sq_a += (a * a).sum(0)
        for k, x in other_feats.items():
            x = self._f64(x, a.device)
            self.sum[k] += x.sum(0)
            self.sq[k] += (x * x).sum(0)
            self.cross[k] += a.T @ x

    @property
    def layers(self) -> list:
        return list(self.cross)

    def _std(self, s: torch.Tensor, sq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = s / self.n
        var = (sq / self.n - mean * mean).clamp_min(0)
        std = var.sqrt()
        std[var <= self.eps * (1 + mean * mean)] = 0  # dead neuron
        return mean, std

    def correlation(self, layer) -> torch.Tensor:
        """Pearson correlation (d_anchor x d_layer, float64, on the accumulation device)."""
        if self.n == 0:
            raise ValueError("no tokens accumulated")
        if layer == self.anchor:
            raise ValueError("the anchor's correlation with itself is not accumulated (it is the "
                             "identity alignment); ask for another layer")
        if layer not in self.cross:
            raise KeyError(f"layer {layer!r} not accumulated; layers: {self.layers}")
        mean_a, std_a = self._std(self.sum_a, self.sq_a)
        mean_o, std_o = self._std(self.sum[layer], self.sq[layer])
        cov = self.cross[layer] / self.n - torch.outer(mean_a, mean_o)
        denom = torch.outer(std_a, std_o)
        corr = torch.where(denom > 0, cov / torch.where(denom > 0, denom, 1.0), 0.0)
        return corr.clamp_(-1.0, 1.0)


class _Feed(BatchConsumer):
    """Routes one batch's captured points into a CorrelationStats."""

    def __init__(self, stats: CorrelationStats, anchor_point: str, others: Mapping):
        super().__init__()
        self.stats, self.anchor_point, self.others = stats, anchor_point, dict(others)  # {layer: point}

    def update(self, point: str, feats: torch.Tensor) -> None:
        if point == self.anchor_point or point in self.others.values():
            super().update(point, feats)

    def process(self, feats: dict[str, torch.Tensor]) -> None:
        missing = [p for p in (self.anchor_point, *self.others.values()) if p not in feats]
        if missing:
            raise RuntimeError(f"capture delivered no features for {missing} in this batch")
        self.stats.update(feats[self.anchor_point], {k: feats[p] for k, p in self.others.items()})


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
    cap = Capture(model, [anchor_point, *names.values()], [_Feed(stats, anchor_point, names)])
    cap.run(batches() if callable(batches) else batches, max_tokens=max_tokens, progress=progress,
            desc=f"correlations {stack} anchor {anchor}")
    if stats.n == 0:
        raise ValueError(f"no non-padding {stack} tokens were captured")
    if return_stats:
        return stats
    return {j: stats.correlation(j) for j in others}
