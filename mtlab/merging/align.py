"""Aligning FF neurons across layers: linear assignment on a correlation matrix, and
function-preserving permutation of an FF sublayer.

Convention (shared with `mtlab.stats`): a correlation matrix `corr` is
d_ff x d_ff, rows = the ANCHOR layer's neurons, columns = the OTHER layer's
neurons. `match(corr)` returns `perm` with "other-layer neuron perm[i] is
aligned to anchor neuron i", and `permute_ff(other_ff, perm)` reorders the
other layer so that its neuron i is its old neuron perm[i], i.e. it now sits
at the anchor's neuron i. Permuting the rows of w_in (and w_gate) together
with the columns of w_out leaves the layer's function unchanged.

All weight access goes through the orientation-agnostic helpers of
`mtlab.anatomy` (nn.Linear stores (out, in), GPT-2's Conv1D (in, out)).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..anatomy import FF, FF_ROLES, out_features, set_weight_oi, weight_oi
from ..stats import assign

__all__ = ["match", "check_correlation", "check_permutation", "permuted_weights", "permute_ff", "ff_width"]


def ff_width(ff: FF) -> int:
    """d_ff: the number of FF neurons (outputs of w_in)."""
    return out_features(ff.w_in)


def check_correlation(corr, d_ff: int | None = None, what: str = "correlation matrix") -> torch.Tensor:
    """`corr` as a float64 CPU tensor, after checking it is a square (d_ff x d_ff) matrix
    without infinite entries. NaN (a neuron whose feature is constant on the data, so its
    correlation is undefined) is read as 0, i.e. no evidence either way."""
    try:
        t = torch.as_tensor(corr).detach()
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{what} must be a 2-D tensor or array, got {type(corr).__name__} ({e})") from None
    if t.dim() != 2 or t.shape[0] != t.shape[1]:
        raise ValueError(f"{what} must be square (d_ff x d_ff, rows = anchor neurons, columns = the other "
                         f"layer's neurons), got shape {tuple(t.shape)}")
    if d_ff is not None and t.shape[0] != d_ff:
        raise ValueError(f"{what} is {t.shape[0]} x {t.shape[1]}, but the FF sublayers have d_ff = {d_ff}: "
                         "it was computed for another layer or model")
    if t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{what} must be real-valued, got dtype {t.dtype}")
    t = t.to("cpu", torch.float64)
    if torch.isinf(t).any():
        raise ValueError(f"{what} has infinite entries; correlations lie in [-1, 1]")
    return torch.nan_to_num(t, nan=0.0)


def match(corr) -> torch.Tensor:
    """Permutation maximising the summed correlation of aligned neuron pairs.

    `corr[i, j]` = correlation of anchor neuron i with other-layer neuron j. Returns a
    LongTensor `perm` of length d_ff: other-layer neuron perm[i] is aligned to anchor
    neuron i (feed it to `permute_ff(other_ff, perm)`).
    """
    return assign(check_correlation(corr))[0]


def check_permutation(perm, n: int) -> torch.Tensor:
    """`perm` as a CPU LongTensor, after checking it is a permutation of range(n)."""
    if isinstance(perm, torch.Tensor):
        t = perm.detach().cpu()
    else:
        try:
            t = torch.as_tensor(np.asarray(perm))
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"permutation must be a 1-D sequence of ints, got {type(perm).__name__} ({e})") from None
    if t.dim() != 1:
        raise ValueError(f"permutation must be 1-D, got shape {tuple(t.shape)}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"permutation must hold integers, got dtype {t.dtype}")
    if len(t) != n:
        raise ValueError(f"permutation has {len(t)} entries, but the FF has d_ff = {n} neurons")
    t = t.long()
    if not torch.equal(torch.sort(t).values, torch.arange(n)):
        bad = sorted(set(range(n)) - set(t.tolist()))[:5]
        raise ValueError(f"not a permutation of range({n}): repeated or out-of-range entries "
                         f"(e.g. missing {bad})")
    return t


def _bias(m: nn.Module) -> torch.Tensor | None:
    return getattr(m, "bias", None)


def permuted_weights(ff: FF, perm=None) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """Role -> ((out, in) weight, bias) of `ff` with neuron i taken from old neuron perm[i]
    (None: as is), out of place: the rows of w_in and w_gate with their biases, the columns
    of w_out (whose bias is per output feature and stays). The one FF permutation of mtlab."""
    p = None if perm is None else check_permutation(perm, ff_width(ff))
    res = {}
    for role in FF_ROLES:
        m = getattr(ff, role)
        if m is None:
            continue
        w, b = weight_oi(m).detach(), _bias(m)
        b = None if b is None else b.detach()
        if p is not None:
            idx = p.to(w.device)
            if role == "w_out":
                w = w[:, idx]
            else:
                w, b = w[idx], (None if b is None else b[idx])
        res[role] = (w, b)
    return res


def permute_ff(ff: FF, perm) -> None:
    """Reorder the FF neurons in place: neuron i becomes old neuron perm[i] (`permuted_weights`).

    Values are copied into the existing Parameters, so Parameter objects (and ties,
    optimizer state) survive. The layer's function is unchanged.
    """
    d_ff = ff_width(ff)
    if ff.w_gate is not None and out_features(ff.w_gate) != d_ff:
        raise ValueError(f"w_gate has {out_features(ff.w_gate)} outputs but w_in has {d_ff}")
    new = permuted_weights(ff, perm)
    with torch.no_grad():
        for role, (w, b) in new.items():
            m = getattr(ff, role)
            if role == "w_out":
                set_weight_oi(m, w.clone())
            else:
                set_weight_oi(m, w.clone(), bias=None if b is None else b.clone())
