"""Tied FF sublayers with low-rank per-layer deltas: the merge method "permute_lowrank".

A merge set is aligned and averaged exactly as "permute" does (`mtlab.merging.merge`), and its
FF projections are tied to the anchor's Parameters; on top of the shared average W, each layer i
of the set keeps its own rank-r delta, so that its projection computes

    y = W x + b  +  U_i (V_i x) + c_i          U_i: (out, r), V_i: (r, in), c_i: (out,)

U_i V_i is initialised from the truncated SVD of W_i - W (W_i: the layer's ALIGNED weight), split
evenly (U = P sqrt(S), V = sqrt(S) Q^T), and c_i = b_i - b (the bias delta, kept whole: it is
small). The deltas are ordinary Parameters, trained by the recovery fine-tune
(`mtlab.merging.recover`) while the shared average stays tied. r = 0 keeps no delta at all (plain
"permute" merging); r = min(out, in) of every projection reproduces the aligned layers exactly
(the original model's function). Parameters: count_params counts the tied average once plus every
delta, k * sum over projections of (r * (out + in) + out) for a set of k layers.

Mechanics: each projection module of the set (nn.Linear or GPT-2 Conv1D) gets a child module
`mtlab_delta` (a `LowRankDelta`) and a forward hook adding its output, so the module, its tied
`weight`/`bias` and every HF forward stay as they are; the deltas appear in the state dict as
`<projection>.mtlab_delta.{u,v,bias}`. `save_merged` / `load_merged` keep them (load rebuilds
empty deltas from the recorded spec, then loads the values); `mtlab.export.export` folds them into
untied plain copies (`fold_state_dict`), which plain transformers loads to the same outputs.

The spec carries r: "encoder:3-5@middle/permute_lowrank:r=8" (default r=8). The method is not
in the default method list of `window_search` (`searched=False`): name it to compare it.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.nn import functional as F

from transformers.pytorch_utils import Conv1D

from ..anatomy import FF, FF_ROLES, in_features, out_features, weight_oi
from .align import match
from .methods import merge_method

__all__ = ["LowRankDelta", "DELTA_NAME", "DEFAULT_RANK", "deltas", "delta_params", "effective_weight",
           "fold_deltas", "fold_state_dict", "max_rank"]

DELTA_NAME = "mtlab_delta"
DEFAULT_RANK = 8


class LowRankDelta(nn.Module):
    """What one layer adds to its tied projection: x -> (x V^T) U^T (+ bias). Shapes: u (out, r),
    v (r, in), bias (out,) or None."""

    def __init__(self, out_features: int, in_features: int, rank: int, bias: bool, *, dtype=None, device=None):
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        self.u = nn.Parameter(torch.zeros(out_features, rank, **kw))
        self.v = nn.Parameter(torch.zeros(rank, in_features, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None

    @property
    def rank(self) -> int:
        return self.u.shape[1]

    def weight_oi(self) -> torch.Tensor:
        """The delta as an (out, in) matrix, U V."""
        return self.u @ self.v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.v.dtype)
        return F.linear(F.linear(x, self.v), self.u, self.bias)

    def extra_repr(self) -> str:
        return f"out={self.u.shape[0]}, in={self.v.shape[1]}, rank={self.rank}, bias={self.bias is not None}"


def _add_delta(module: nn.Module, args, output):
    """Forward hook of a projection with a delta: its output plus the delta's."""
    delta = getattr(module, DELTA_NAME, None)
    if delta is None:
        return output
    return output + delta(args[0]).to(output.dtype)


def deltas(model: nn.Module) -> dict[str, LowRankDelta]:
    """{projection module name: its LowRankDelta} of every projection with a delta."""
    return {name: getattr(m, DELTA_NAME) for name, m in model.named_modules()
            if isinstance(getattr(m, DELTA_NAME, None), LowRankDelta)}


def delta_params(model: nn.Module) -> int:
    """Number of delta parameters (U, V and bias deltas) in the model."""
    return sum(p.numel() for d in deltas(model).values() for p in d.parameters())


def effective_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight (out, in), bias) a projection computes with: its (tied) weight plus its delta."""
    w, b = weight_oi(module), getattr(module, "bias", None)
    delta = getattr(module, DELTA_NAME, None)
    if isinstance(delta, LowRankDelta):
        w = w + delta.weight_oi().to(w.dtype)
        if delta.bias is not None:
            b = delta.bias.to(w.dtype) if b is None else b + delta.bias.to(b.dtype)
    return w, b


def max_rank(ff: FF) -> int:
    """The largest rank a delta of this FF sublayer can have: min(out, in) over its projections."""
    return min(min(out_features(m), in_features(m)) for m in (getattr(ff, r) for r in FF_ROLES) if m is not None)


def _rank(spec) -> int:
    return int(dict(spec.options).get("r", DEFAULT_RANK))


def _check(spec, ffs: Mapping[int, FF]) -> None:
    """Refuse a rank the layers do not allow (or a set already carrying deltas) before merging."""
    where = f"merge spec {str(spec)!r}"
    r = _rank(spec)
    if r < 0:
        raise ValueError(f"{where}: rank r={r} is negative; use 0 <= r (r=0 is plain permute merging)")
    for i, ff in ffs.items():
        for role in FF_ROLES:
            m = getattr(ff, role)
            if m is None:
                continue
            if not isinstance(getattr(m, "weight", None), torch.Tensor):
                raise ValueError(f"{where}: the FF {role} of {spec.stack} layer {i} is a {type(m).__name__} without "
                                 "a weight; low-rank deltas need nn.Linear or Conv1D projections (mtlab.anatomy): "
                                 "register the model's FF layout with mtlab.anatomy.register(ArchSpec(...))")
            if hasattr(m, DELTA_NAME):
                raise ValueError(f"{where}: {spec.stack} layer {i} already has a low-rank delta; merge the "
                                 "unmerged model")
    full = max_rank(next(iter(ffs.values())))
    if r > full:
        shapes = ", ".join(f"{role} {out_features(m)}x{in_features(m)}" for role in FF_ROLES
                           if (m := getattr(next(iter(ffs.values())), role)) is not None)
        raise ValueError(f"{where}: rank r={r} is larger than the FF projections allow ({shapes}: full rank "
                         f"{full}); use r <= {full} (r={full} reproduces the aligned layers exactly, r=0 is plain "
                         f"permute merging), e.g. '{spec.stack}:...:r={min(DEFAULT_RANK, full)}'")


def _svd_factors(d: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(U (out, r), V (r, in)) with U V the best rank-r approximation of d (float64), split evenly."""
    p, s, qh = torch.linalg.svd(d, full_matrices=False)
    root = s[:r].sqrt()
    return p[:, :r] * root, root[:, None] * qh[:r]


def _attach(module: nn.Module, delta: LowRankDelta) -> None:
    module.add_module(DELTA_NAME, delta)
    module.register_forward_hook(_add_delta)


def _extend(spec, ffs: Mapping[int, FF], aligned: Mapping[int, Mapping[str, tuple]] | None) -> None:
    """Give every layer of the set its delta: from the aligned weights minus their average (merge),
    or empty (aligned None: load_merged fills in the saved values)."""
    r = _rank(spec)
    if r == 0:
        return
    for role in FF_ROLES:
        if getattr(ffs[spec.layers[0]], role) is None:
            continue
        mean_w = mean_b = None
        if aligned is not None:
            mean_w = torch.stack([aligned[i][role][0].double() for i in spec.layers]).mean(0)
            if aligned[spec.layers[0]][role][1] is not None:
                mean_b = torch.stack([aligned[i][role][1].double() for i in spec.layers]).mean(0)
        for i in spec.layers:
            m = getattr(ffs[i], role)
            w = weight_oi(m)
            has_bias = getattr(m, "bias", None) is not None
            delta = LowRankDelta(out_features(m), in_features(m), r, has_bias, dtype=w.dtype, device=w.device)
            if aligned is not None:
                wi, bi = aligned[i][role]
                u, v = _svd_factors(wi.double() - mean_w, r)
                with torch.no_grad():
                    delta.u.copy_(u)
                    delta.v.copy_(v)
                    if has_bias:
                        delta.bias.copy_(bi.double() - mean_b)
            _attach(m, delta)


@merge_method("permute_lowrank", needs_correlations=True, options={"r": DEFAULT_RANK}, check=_check,
              extend=_extend, searched=False)
def permute_lowrank(ffs, anchor, correlations):
    """Permute merging (aligned, averaged, tied) plus a rank-r delta per layer, initialised from the
    truncated SVD of each aligned layer minus the average and trained in recovery."""
    return {i: match(c) for i, c in correlations.items()}


def fold_deltas(module: nn.Module) -> int:
    """Fold every delta under `module` into its projection's own (new, untied) weight and bias, in
    place, and remove the delta; the outputs are unchanged. Used when a set's other layers are
    dropped and one layer is left: it is then a plain layer. Returns how many deltas were folded."""
    n = 0
    for m in list(module.modules()):
        delta = getattr(m, DELTA_NAME, None)
        if not isinstance(delta, LowRankDelta):
            continue
        with torch.no_grad():
            w, b = effective_weight(m)
            m.weight = nn.Parameter((w.T if isinstance(m, Conv1D) else w).detach().clone())
            if b is not None:
                m.bias = nn.Parameter(b.detach().clone())
        delattr(m, DELTA_NAME)
        n += 1
    return n


def fold_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` (a state dict of `model` whose FF ties are already untied, e.g.
    `mtlab.export.untied_state_dict`) with every delta folded into its projection's own weight and
    bias and the delta entries removed: a plain model's state dict. No deltas: `state` unchanged."""
    found = deltas(model)
    if not found:
        return state
    out = dict(state)
    for name, delta in found.items():
        m = model.get_submodule(name)
        dw = delta.weight_oi().detach()
        wkey, bkey = f"{name}.weight", f"{name}.bias"
        if wkey not in out:
            raise KeyError(f"{wkey} is not in the state dict; fold deltas into the model's own state dict")
        w = out[wkey]
        out[wkey] = (w.double() + (dw.T if isinstance(m, Conv1D) else dw).double()).to(w.dtype)
        if delta.bias is not None:
            out[bkey] = (out[bkey].double() + delta.bias.detach().double()).to(out[bkey].dtype)
        for k in [k for k in out if k.startswith(f"{name}.{DELTA_NAME}.")]:
            del out[k]
    return out
