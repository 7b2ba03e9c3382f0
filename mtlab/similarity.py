"""Cross-layer similarity: linear CKA and neuron matching, streamed over data.

Linear CKA (Kornblith et al. 2019) between features X [n, d1], Y [n, d2] of
the same n tokens:

    CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)),   K = X X^T, L = Y Y^T
        = ||Cxy||_F^2 / (||Cxx||_F ||Cyy||_F)          (biased HSIC; C = centred cross-covariance)

Estimators offered by `cka_matrix` (`estimator=`):

"minibatch" (default) - Nguyen, Raghu & Kornblith (2021), "Do wide and deep
    networks learn the same things?": the tokens are cut into chunks of at
    most `chunk_tokens` (512); per chunk, for every layer, the token Gram
    matrix K_l (n_c x n_c) is formed, and the UNBIASED HSIC_1 estimator of
    Song et al. (2012) is accumulated for every pair of layers; then
    CKA_ij = sum_c HSIC_ij / sqrt(sum_c HSIC_ii * sum_c HSIC_jj).
    Why the default: memory is bounded by L * chunk^2 Gram entries (plus one
    batch), whatever d and the number of tokens, so a 36-layer x 3072-wide
    layer x layer matrix costs ~75 MB, where exact feature-space accumulation
    needs L^2/2 * d^2 cross-products (~50 GB there). Each chunk's HSIC_1 is
    unbiased for the population HSIC, so the ratio is a consistent estimate
    of the population CKA, free of the upward bias of the plug-in estimate at
    small n (independent features give ~0 rather than ~d/n). It is NOT equal
    to the full-data plug-in CKA; it is exactly the chunk-sum of textbook
    HSIC_1 values (`hsic1`), which is what the tests check.
"exact" - feature-space accumulation in float64 of the column sums and of
    X_i^T X_j for every pair i <= j: the centred Cxy = X^T Y - s_x s_y^T / n
    are exact, so the result equals the textbook full-data `linear_cka` on
    the concatenated tokens. Memory L(L+1)/2 * d^2 * 8 bytes, checked
    against `max_bytes` before running.

Neuron matching (`matching_matrix`): for two layers' `ff_pre` features, the
Pearson correlation of every neuron pair (streamed exactly,
`mtlab.merging.stats.CorrelationStats`), a maximum-weight one-to-one
assignment (scipy linear_sum_assignment), and the mean correlation of the
matched pairs: 1 for layers that are permutations of each other.

Encoder and decoder layers see different tokens, so cross-stack entries are
undefined: a matrix over several stacks is block-diagonal with NaN outside
the blocks (drawn blank by `heatmap`). Padding is excluded and tokens are
counted per stack (`mtlab.capture`).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from .anatomy import anatomy, out_features
from .capture import BatchConsumer, Capture
from .merging.stats import CorrelationStats, _Feed

__all__ = ["linear_cka", "linear_cka_features", "hsic1", "unbiased_cka", "MinibatchCKA", "FeatureCKA",
           "neuron_correlation", "match_neurons", "matching_score", "cka_matrix", "matching_matrix", "heatmap"]


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


class MinibatchCKA(BatchConsumer):
    """Nguyen et al. (2021) minibatch CKA over a set of named features of the same tokens.

    Feed it batches: `update(name, feats[n, d])` for every name (same n, same tokens),
    then `end_batch()`. Each batch's tokens are split into ceil(n / chunk_tokens)
    near-equal contiguous chunks (torch.tensor_split); every chunk contributes one
    unbiased HSIC_1 per pair with equal weight. A batch of fewer than 4 tokens is
    skipped (counted in `skipped_tokens`). Names not in `names` are ignored.
    """

    def __init__(self, names: Sequence[str], chunk_tokens: int = 512):
        super().__init__()
        if chunk_tokens < 4:
            raise ValueError("chunk_tokens must be at least 4 (the unbiased HSIC needs n >= 4)")
        self.names = list(names)
        self._index = {n: k for k, n in enumerate(self.names)}
        self.chunk_tokens = chunk_tokens
        L = len(self.names)
        self.hsic = np.zeros((L, L))
        self.chunks = 0
        self.tokens = 0
        self.skipped_tokens = 0

    def update(self, name: str, feats: torch.Tensor) -> None:
        if name in self._index:
            super().update(name, feats)

    def process(self, feats: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.names if n not in feats]
        if missing:
            raise ValueError(f"batch lacks features for {missing} (every name needs the same tokens)")
        sizes = {f.shape[0] for f in feats.values()}
        if len(sizes) != 1:
            raise ValueError(f"features of one batch have different token counts {sorted(sizes)}")
        n = sizes.pop()
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


class FeatureCKA(BatchConsumer):
    """Exact streamed linear CKA (equal to `linear_cka` on all tokens) for a set of named
    features of the same tokens: float64 column sums and X_i^T X_j for every pair i <= j.
    Raises before allocating more than `max_bytes`."""

    def __init__(self, names: Sequence[str], max_bytes: float = 2 * 2**30):
        super().__init__()
        self.names = list(names)
        self._index = {n: k for k, n in enumerate(self.names)}
        self.max_bytes = max_bytes
        self.n = 0
        self.sums: list[torch.Tensor] | None = None
        self.cross: dict[tuple[int, int], torch.Tensor] = {}

    def update(self, name: str, feats: torch.Tensor) -> None:
        if name in self._index:
            super().update(name, feats)

    def process(self, feats: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.names if n not in feats]
        if missing:
            raise ValueError(f"batch lacks features for {missing} (every name needs the same tokens)")
        xs = [feats[nm].to(torch.float64) for nm in self.names]
        if len({x.shape[0] for x in xs}) != 1:
            raise ValueError("features of one batch have different token counts")
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

def neuron_correlation(X, Y, eps: float = 1e-12) -> torch.Tensor:
    """Pearson correlation of every column of X with every column of Y (rows = X's neurons)."""
    X, Y = _f64(X), _f64(Y)
    st = CorrelationStats(anchor="x", eps=eps)
    st.update(X, {"y": Y})
    return st.correlation("y")


def match_neurons(corr) -> tuple[torch.Tensor, float]:
    """Maximum-correlation one-to-one matching: (perm, mean matched correlation), with
    other-layer neuron perm[i] matched to anchor neuron i (the `mtlab.merging.align` convention)."""
    c = torch.nan_to_num(torch.as_tensor(corr, dtype=torch.float64).cpu(), nan=0.0).numpy()
    rows, cols = linear_sum_assignment(c, maximize=True)
    perm = np.full(c.shape[0], -1, dtype=np.int64)
    perm[rows] = cols
    return torch.from_numpy(perm), float(c[rows, cols].mean())


def matching_score(X, Y) -> float:
    """Mean correlation of matched neurons between two layers' features (same tokens)."""
    return match_neurons(neuron_correlation(X, Y))[1]


# ---------------------------------------------------------------------------
# model-level matrices

def _stacks(model, stack: str | None) -> list:
    an = anatomy(model)
    return [an.stack(stack)] if stack is not None else list(an.stacks.values())


def _frame(labels: list[str], blocks: dict[str, tuple[list[int], np.ndarray]]) -> pd.DataFrame:
    M = np.full((len(labels), len(labels)), np.nan)
    for idx, mat in blocks.values():
        M[np.ix_(idx, idx)] = mat
    return pd.DataFrame(M, index=labels, columns=labels)


def _resolve_batches(batches, passes: int = 1):
    if callable(batches):
        return batches
    if passes > 1 and iter(batches) is batches:
        raise ValueError(f"this needs {passes} passes over the data, but batches is a one-shot iterator: "
                         "pass a list, or a callable returning a fresh iterator")
    return lambda: batches


def cka_matrix(model: nn.Module, batches: Iterable | Callable[[], Iterable], point: str = "ff_out",
               stack: str | None = None, max_tokens: int | None = 10_000, estimator: str = "minibatch",
               chunk_tokens: int = 512, max_bytes: float = 2 * 2**30, progress: bool = True,
               exclude=None) -> pd.DataFrame:
    """Layer x layer linear CKA of one hook point kind (default: FF sublayer outputs).
    `exclude`: positions to leave out, e.g. a tokenizer for its special tokens (`mtlab.capture`).

    One capture pass; at most `max_tokens` non-padding tokens per stack. Rows/columns are
    "<stack>.<layer>"; with stack=None all stacks are included and cross-stack entries are
    NaN (different tokens). `df.attrs["config"]` records point, estimator, tokens per stack.
    """
    if estimator not in ("minibatch", "exact"):
        raise ValueError(f"estimator must be 'minibatch' or 'exact', got {estimator!r}")
    stacks = _stacks(model, stack)
    labels, blocks, consumers, points = [], {}, {}, []
    for st in stacks:
        names = [f"{st.name}.{i}.{point}" for i in range(len(st))]
        idx = list(range(len(labels), len(labels) + len(names)))
        labels += [f"{st.name}.{i}" for i in range(len(st))]
        consumers[st.name] = (MinibatchCKA(names, chunk_tokens) if estimator == "minibatch"
                              else FeatureCKA(names, max_bytes))
        blocks[st.name] = (idx, None)
        points += names
    res = Capture(model, points, list(consumers.values()), exclude).run(
        _resolve_batches(batches)(), max_tokens=max_tokens, progress=progress, desc=f"CKA {point}")
    for name, c in consumers.items():
        blocks[name] = (blocks[name][0], c.matrix())
    df = _frame(labels, blocks)
    cfg = {"measure": "linear CKA", "point": point, "estimator": estimator, "tokens": res.tokens,
           "max_tokens": max_tokens, "batches": res.batches, "excluded_tokens": res.excluded}
    if estimator == "minibatch":
        cfg.update(chunk_tokens=chunk_tokens, chunks={k: c.chunks for k, c in consumers.items()},
                   skipped_tokens={k: c.skipped_tokens for k, c in consumers.items()})
    df.attrs["config"] = cfg
    return df


def _width(layer, point: str) -> int:
    return out_features(layer.ff.w_in if point in ("ff_pre", "ff_gate", "ff_act") else layer.ff.w_out)


def matching_matrix(model: nn.Module, batches: Iterable | Callable[[], Iterable], point: str = "ff_pre",
                    stack: str | None = None, max_tokens: int | None = 10_000, max_bytes: float = 2**30,
                    progress: bool = True, exclude=None) -> pd.DataFrame:
    """Layer x layer neuron-matching score: mean correlation of matched neurons (see module doc).

    The d x d float64 cross-products for all pairs may not fit: pairs are packed into
    capture passes of at most `max_bytes` of statistics each; several passes need
    `batches` to be a list or a callable returning a fresh iterator. Diagonal = 1.
    `exclude`: positions to leave out, as in `cka_matrix`.
    """
    stacks = _stacks(model, stack)
    labels, items = [], []  # items: (stack, anchor, [others], bytes)
    offsets = {}
    for st in stacks:
        offsets[st.name] = len(labels)
        labels += [f"{st.name}.{i}" for i in range(len(st))]
        widths = [_width(st.layer(i), point) for i in range(len(st))]
        for a in range(len(st) - 1):
            group, size = [], 0
            for j in range(a + 1, len(st)):
                cost = 8 * widths[a] * widths[j]
                if cost > max_bytes:
                    raise MemoryError(f"one pair needs {cost / 2**30:.2f} GiB of statistics > max_bytes")
                if group and size + cost > max_bytes:
                    items.append((st.name, a, group, size))
                    group, size = [], 0
                group.append(j)
                size += cost
            items.append((st.name, a, group, size))
    passes, cur, size = [], [], 0
    for it in items:
        if cur and size + it[3] > max_bytes:
            passes.append(cur)
            cur, size = [], 0
        cur.append(it)
        size += it[3]
    if cur:
        passes.append(cur)
    M = np.full((len(labels), len(labels)), np.nan)
    for st in stacks:
        for i in range(len(st)):
            M[offsets[st.name] + i, offsets[st.name] + i] = 1.0
    get = _resolve_batches(batches, len(passes))
    tokens: dict[str, int] = {}
    for k, items_k in enumerate(passes):
        feeds, points = [], []
        for sname, a, others, _ in items_k:
            names = {j: f"{sname}.{j}.{point}" for j in others}
            ap = f"{sname}.{a}.{point}"
            stats = CorrelationStats(anchor=a)
            feeds.append((sname, a, stats, _Feed(stats, ap, names)))
            points += [ap, *names.values()]
        res = Capture(model, list(dict.fromkeys(points)), [f[3] for f in feeds], exclude).run(
            get(), max_tokens=max_tokens, progress=progress, desc=f"matching {point} pass {k + 1}/{len(passes)}")
        tokens.update(res.tokens)
        for sname, a, stats, _ in feeds:
            o = offsets[sname]
            for j in stats.layers:
                score = match_neurons(stats.correlation(j))[1]
                M[o + a, o + j] = M[o + j, o + a] = score
    df = pd.DataFrame(M, index=labels, columns=labels)
    df.attrs["config"] = {"measure": "neuron matching (mean matched Pearson correlation)", "point": point,
                          "tokens": tokens, "max_tokens": max_tokens, "passes": len(passes)}
    return df


# ---------------------------------------------------------------------------
# drawing

def heatmap(df: pd.DataFrame, ax=None, title: str | None = None, **kw):
    """Seaborn heatmap of a layer x layer matrix (NaN cells blank); returns the Axes."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    if not isinstance(df, pd.DataFrame):
        raise ValueError(f"heatmap needs a pandas DataFrame, got {type(df).__name__}")
    if df.empty:
        raise ValueError("heatmap: the DataFrame is empty (no layers)")
    if df.shape[0] != df.shape[1]:
        raise ValueError(f"heatmap: expected a square layer x layer matrix, got shape {df.shape}")
    if ax is None:
        n = df.shape[0]
        _, ax = plt.subplots(figsize=(min(3 + 0.35 * n, 16), min(2.5 + 0.35 * n, 15)))
    cfg = df.attrs.get("config", {})
    opts = dict(vmin=0.0, vmax=1.0, cmap="viridis", square=True,
                cbar_kws={"label": cfg.get("measure", "similarity")})
    opts.update(kw)
    sns.heatmap(df.astype(float), ax=ax, **opts)
    if title is None and cfg:
        tok = ", ".join(f"{k} {v}" for k, v in cfg.get("tokens", {}).items())
        title = f"{cfg.get('measure', '')} of {cfg.get('point', '')}" + (f" ({tok} tokens)" if tok else "")
    if title:
        ax.set_title(title)
    return ax
