"""Streamed statistics beneath similarity and merging: moments and Pearson correlation,
linear CKA, and neuron matching by ONE linear assignment.

Both `mtlab.similarity` (layer x layer matrices) and `mtlab.merging` (aligning the FF
neurons of a merge set) build on this module; it knows nothing about models except
the capture protocol (`mtlab.capture.BatchConsumer`: features of the same tokens,
batch by batch).

- `CorrelationStats`: exact float64 running sums (n, sum x, sum x^2, A^T X) and the
  Pearson correlation of an anchor's features with other layers'; `CorrelationFeed`
  feeds it from a capture. The anchor's own statistics are accumulated ONCE per token
  (see docs/methods.md: a defect of the public merging code counted them twice).
- Linear CKA (Kornblith et al. 2019): textbook (`linear_cka`, `linear_cka_features`),
  unbiased HSIC_1 (`hsic1`, `unbiased_cka`), and the streamed estimators
  `MinibatchCKA` (Nguyen et al. 2021) and `FeatureCKA` (exact); see mtlab.similarity.
- `assign(corr)`: the maximum-correlation one-to-one matching (scipy
  linear_sum_assignment), used for both alignment and similarity scores.

Convention: a correlation matrix has rows = the anchor's neurons, columns = the other
layer's; `perm[i]` is the other-layer neuron matched to anchor neuron i.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from .capture import BatchConsumer

__all__ = ["CorrelationStats", "CorrelationFeed", "assign", "neuron_correlation", "matching_score", "linear_cka",
           "linear_cka_features", "hsic1", "unbiased_cka", "MinibatchCKA", "FeatureCKA"]


# ---------------------------------------------------------------------------
# moments and correlation

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


class CorrelationFeed(BatchConsumer):
    """Capture consumer routing one batch's points into a CorrelationStats: the anchor point and
    {layer: point} of the other layers."""

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


# ---------------------------------------------------------------------------
# textbook formulas (in memory)

def _f64(x) -> torch.Tensor:
    x = torch.as_tensor(x).detach()
    if x.dim() != 2:
        raise ValueError(f"features must be [tokens, d], got shape {tuple(x.shape)}")
    return x.to(torch.float64)


def _centre_gram(K: torch.Tensor) -> torch.Tensor:
    """H K H with H = I - 11^T/n, in O(n^2)."""
    return K - K.mean(0, keepdim=True) - K.mean(1, keepdim=True) + K.mean()


def linear_cka(X, Y) -> float:
    """Textbook linear CKA from token Gram matrices: tr(KHLH) / sqrt(tr(KHKH) tr(LHLH)).
    O(n^2) memory: for tests and small data (n up to a few thousand)."""
    X, Y = _f64(X), _f64(Y)
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"X and Y must hold the same tokens: {X.shape[0]} vs {Y.shape[0]} rows")
    Kc, Lc = _centre_gram(X @ X.T), _centre_gram(Y @ Y.T)
    return float((Kc * Lc).sum() / torch.sqrt((Kc * Kc).sum() * (Lc * Lc).sum()))


def linear_cka_features(X, Y) -> float:
    """The same value as `linear_cka`, in feature space: ||Xc^T Yc||^2 / (||Xc^T Xc|| ||Yc^T Yc||)."""
    X, Y = _f64(X), _f64(Y)
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"X and Y must hold the same tokens: {X.shape[0]} vs {Y.shape[0]} rows")
    X, Y = X - X.mean(0), Y - Y.mean(0)
    return float((X.T @ Y).square().sum() / ((X.T @ X).norm() * (Y.T @ Y).norm()))


def hsic1(K: torch.Tensor, L: torch.Tensor) -> float:
    """Unbiased HSIC estimator (Song et al. 2012, Nguyen et al. 2021 eq. 3), textbook form, n >= 4:
    [tr(K~L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3)), ~ = zeroed diagonal."""
    K, L = K.to(torch.float64).clone(), L.to(torch.float64).clone()
    n = K.shape[0]
    if n < 4:
        raise ValueError("the unbiased HSIC estimator needs at least 4 tokens")
    K.fill_diagonal_(0)
    L.fill_diagonal_(0)
    one = torch.ones(n, 1, dtype=torch.float64)
    t = (K * L.T).sum() + (one.T @ K @ one) * (one.T @ L @ one) / ((n - 1) * (n - 2)) \
        - 2.0 / (n - 2) * ((one.T @ K) @ (L @ one))  # tr(KL) = sum(K * L^T)
    return float(t / (n * (n - 3)))


def unbiased_cka(X, Y) -> float:
    """Linear CKA with the unbiased HSIC_1 on all the data at once (one 'minibatch')."""
    X, Y = _f64(X), _f64(Y)
    K, L = X @ X.T, Y @ Y.T
    return hsic1(K, L) / math.sqrt(hsic1(K, K) * hsic1(L, L))


# ---------------------------------------------------------------------------
# streamed estimators (capture consumers; also usable directly with update/end_batch)

def _cka_from_hsic(H: np.ndarray) -> np.ndarray:
    d = np.diag(H).copy()
    with np.errstate(invalid="ignore", divide="ignore"):
        denom = np.sqrt(np.where(d > 0, d, np.nan))
        C = H / np.outer(denom, denom)
    np.fill_diagonal(C, np.where(d > 0, 1.0, np.nan))
    return C


class NamedFeatures(BatchConsumer):
    """A consumer of a fixed set of named features of the same tokens: other names are ignored,
    and `token_count(feats)` checks that a batch has every name with one token count."""

    def __init__(self, names: Sequence[str]):
        super().__init__()
        self.names = list(names)
        self._index = {n: k for k, n in enumerate(self.names)}

    def update(self, name: str, feats: torch.Tensor) -> None:
        if name in self._index:
            super().update(name, feats)

    def token_count(self, feats: dict[str, torch.Tensor]) -> int:
        missing = [n for n in self.names if n not in feats]
        if missing:
            raise ValueError(f"batch lacks features for {missing} (every name needs the same tokens)")
        sizes = {feats[n].shape[0] for n in self.names}
        if len(sizes) != 1:
            raise ValueError(f"features of one batch have different token counts {sorted(sizes)}")
        return sizes.pop()


class MinibatchCKA(NamedFeatures):
    """Nguyen et al. (2021) minibatch CKA over a set of named features of the same tokens.

    Feed it batches: `update(name, feats[n, d])` for every name (same n, same tokens),
    then `end_batch()`. Each batch's tokens are split into ceil(n / chunk_tokens)
    near-equal contiguous chunks (torch.tensor_split); every chunk contributes one
    unbiased HSIC_1 per pair with equal weight. A batch of fewer than 4 tokens is
    skipped (counted in `skipped_tokens`). Names not in `names` are ignored.
    """

    def __init__(self, names: Sequence[str], chunk_tokens: int = 512):
        super().__init__(names)
        if chunk_tokens < 4:
            raise ValueError("chunk_tokens must be at least 4 (the unbiased HSIC needs n >= 4)")
        self.chunk_tokens = chunk_tokens
        L = len(self.names)
        self.hsic = np.zeros((L, L))
        self.chunks = 0
        self.tokens = 0
        self.skipped_tokens = 0

    def process(self, feats: dict[str, torch.Tensor]) -> None:
        n = self.token_count(feats)
        if n < 4:
            self.skipped_tokens += n
            return
        k = math.ceil(n / self.chunk_tokens)
        for idx in torch.arange(n).tensor_split(k):
            self._chunk([feats[nm][idx] for nm in self.names])
        self.tokens += n

    def _chunk(self, xs: list[torch.Tensor]) -> None:
        n = xs[0].shape[0]
        Ks = []
        for x in xs:
            x = x.to(torch.float64)
            K = x @ x.T
            K.fill_diagonal_(0)
            Ks.append(K)
        F = torch.stack([K.reshape(-1) for K in Ks])          # L x n^2
        U = torch.stack([K.sum(1) for K in Ks])               # L x n  (K~ 1)
        S = U.sum(1)                                          # L      (1' K~ 1)
        H = F @ F.T + torch.outer(S, S) / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (U @ U.T)
        self.hsic += (H / (n * (n - 3))).cpu().numpy()
        self.chunks += 1

    def matrix(self) -> np.ndarray:
        if not self.chunks:
            raise ValueError("no chunk of at least 4 tokens was seen")
        return _cka_from_hsic(self.hsic)


class FeatureCKA(NamedFeatures):
    """Exact streamed linear CKA (equal to `linear_cka` on all tokens) for a set of named
    features of the same tokens: float64 column sums and X_i^T X_j for every pair i <= j.
    Raises before allocating more than `max_bytes`."""

    def __init__(self, names: Sequence[str], max_bytes: float = 2 * 2**30):
        super().__init__(names)
        self.max_bytes = max_bytes
        self.n = 0
        self.sums: list[torch.Tensor] | None = None
        self.cross: dict[tuple[int, int], torch.Tensor] = {}

    def process(self, feats: dict[str, torch.Tensor]) -> None:
        self.token_count(feats)
        xs = [feats[nm].to(torch.float64) for nm in self.names]
        if self.sums is None:
            dims = [x.shape[1] for x in xs]
            need = 8 * sum(dims[i] * dims[j] for i in range(len(dims)) for j in range(i, len(dims)))
            if need > self.max_bytes:
                raise MemoryError(f"exact CKA over {len(dims)} layers of width up to {max(dims)} needs "
                                  f"{need / 2**30:.1f} GiB (> max_bytes): use estimator='minibatch'")
            self.sums = [x.new_zeros(x.shape[1]) for x in xs]
            self.cross = {(i, j): xs[i].new_zeros(dims[i], dims[j])
                          for i in range(len(xs)) for j in range(i, len(xs))}
        self.n += xs[0].shape[0]
        for i, x in enumerate(xs):
            self.sums[i] += x.sum(0)
        for (i, j), c in self.cross.items():
            c += xs[i].T @ xs[j]

    def matrix(self) -> np.ndarray:
        if not self.n:
            raise ValueError("no tokens accumulated")
        L = len(self.names)
        centred = {(i, j): c - torch.outer(self.sums[i], self.sums[j]) / self.n for (i, j), c in self.cross.items()}
        H = np.zeros((L, L))
        for (i, j), c in centred.items():
            H[i, j] = H[j, i] = float(c.square().sum())  # ||Cxy||_F^2 (the 1/n^2 cancels)
        norms = np.sqrt(np.diag(H))  # ||Cxx||_F
        with np.errstate(invalid="ignore", divide="ignore"):
            C = H / np.outer(norms, norms)
        np.fill_diagonal(C, np.where(norms > 0, 1.0, np.nan))
        return C


# ---------------------------------------------------------------------------
# neuron matching

def assign(corr) -> tuple[torch.Tensor, float]:
    """Maximum-correlation one-to-one matching of neurons: (perm, mean matched correlation).

    `corr[i, j]` = correlation of anchor neuron i with other-layer neuron j (NaN, an undefined
    correlation, reads as 0). Other-layer neuron perm[i] is matched to anchor neuron i; with more
    rows than columns the unmatched rows get -1. The one assignment of mtlab."""
    c = torch.nan_to_num(torch.as_tensor(corr, dtype=torch.float64).detach().cpu(), nan=0.0).numpy()
    rows, cols = linear_sum_assignment(c, maximize=True)
    perm = np.full(c.shape[0], -1, dtype=np.int64)
    perm[rows] = cols
    return torch.from_numpy(perm), float(c[rows, cols].mean())


def neuron_correlation(X, Y, eps: float = 1e-12) -> torch.Tensor:
    """Pearson correlation of every column of X with every column of Y (rows = X's neurons)."""
    X, Y = _f64(X), _f64(Y)
    st = CorrelationStats(anchor="x", eps=eps)
    st.update(X, {"y": Y})
    return st.correlation("y")


def matching_score(X, Y) -> float:
    """Mean correlation of matched neurons between two layers' features (same tokens)."""
    return assign(neuron_correlation(X, Y))[1]
