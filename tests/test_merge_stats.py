"""mtlab.merging.stats: exact streamed anchor-vs-layer correlations for FF alignment.

Guards against the public code's defects: the anchor's statistics are counted once
(an identical copy of the anchor correlates exactly 1 on the diagonal and matches
with the identity permutation, which a doubled anchor self-term breaks), padding is
excluded, and decoder statistics use the decoder's own token count.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from mtlab.capture import collect
from mtlab.merging.stats import CorrelationStats, merge_correlations
from test_anatomy import _model, _t5
from test_capture import _s2s_batch


def _feats(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * torch.rand(d, generator=g) * 3 + torch.randn(d, generator=g) * 5


def _assignment(corr: torch.Tensor) -> np.ndarray:
    rows, cols = linear_sum_assignment(corr.numpy(), maximize=True)
    perm = np.empty(len(rows), dtype=np.int64)
    perm[rows] = cols
    return perm


def test_streamed_equals_corrcoef():
    A = _feats(700, 8, 0)
    B = A[:, :6] @ torch.randn(6, 10, generator=torch.Generator().manual_seed(1)) + _feats(700, 10, 2)
    C = _feats(700, 8, 3)
    st = CorrelationStats(anchor=0)
    for lo, hi in [(0, 100), (100, 101), (101, 450), (450, 700)]:
        st.update(A[lo:hi], {1: B[lo:hi], 2: C[lo:hi]})
    assert st.n == 700 and st.layers == [1, 2]
    for k, X in ((1, B), (2, C)):
        ref = np.corrcoef(A.double().numpy().T, X.double().numpy().T)[:8, 8:]
        got = st.correlation(k)
        assert got.shape == (8, X.shape[1]) and got.dtype == torch.float64
        np.testing.assert_allclose(got.numpy(), ref, atol=1e-6)


def test_anchor_counted_once_identical_copy():
    A = _feats(500, 16, 4)
    st = CorrelationStats(anchor=3)
    for lo in range(0, 500, 128):
        st.update(A[lo:lo + 128], {4: A[lo:lo + 128].clone(), 5: 2.5 * A[lo:lo + 128] - 7.0})
    for k in (4, 5):
        corr = st.correlation(k)
        np.testing.assert_allclose(torch.diagonal(corr).numpy(), 1.0, atol=1e-12)
        assert (corr.abs() <= 1).all()
        assert (_assignment(corr) == np.arange(16)).all()
    with pytest.raises(ValueError, match="twice"):
        st.update(A[:5], {3: A[:5], 4: A[:5], 5: A[:5]})
    with pytest.raises(ValueError, match="itself"):
        st.correlation(3)


def test_dead_neurons_give_zero_not_nan():
    A = _feats(200, 4, 5)
    B = _feats(200, 4, 6)
    A[:, 1] = 0.0
    B[:, 2] = 3.25  # constant but non-zero
    st = CorrelationStats(anchor="a")
    st.update(A, {"b": B})
    corr = st.correlation("b")
    assert torch.isfinite(corr).all()
    assert (corr[1] == 0).all() and (corr[:, 2] == 0).all()


def test_shape_checks():
    st = CorrelationStats(anchor=0)
    with pytest.raises(ValueError, match="same tokens"):
        st.update(torch.zeros(5, 3), {1: torch.zeros(4, 3)})
    st.update(torch.randn(5, 3), {1: torch.randn(5, 3)})
    with pytest.raises(ValueError, match="changed"):
        st.update(torch.randn(5, 3), {2: torch.randn(5, 3)})


def test_merge_correlations_tiny_t5_matches_corrcoef():
    model = _model("t5")
    batches = [_s2s_batch(s) for s in range(3)]
    out = merge_correlations(model, batches, "decoder", layers=[0, 1, 2], anchor=1, progress=False)
    assert sorted(out) == [0, 2]
    feats = collect(model, batches, [f"decoder.{i}.ff_pre" for i in range(3)])
    a = feats["decoder.1.ff_pre"].double().numpy()
    for k in (0, 2):
        ref = np.corrcoef(a.T, feats[f"decoder.{k}.ff_pre"].double().numpy().T)[:64, 64:]
        np.testing.assert_allclose(out[k].numpy(), ref, atol=1e-6)
    st = merge_correlations(model, batches, "decoder", layers=[-1, -2], anchor=-1, progress=False,
                            return_stats=True)
    assert st.anchor == 2 and st.layers == [1]
    assert st.n == sum(int((b["labels"] != -100).sum()) for b in batches)  # decoder's own count
    enc = merge_correlations(model, batches, "encoder", layers=[0, 1], anchor=0, progress=False,
                             return_stats=True, max_tokens=7)
    assert enc.n == 7
    with pytest.raises(ValueError, match="other than the anchor"):
        merge_correlations(model, batches, "encoder", layers=[0], anchor=0, progress=False)


def test_merge_correlations_identical_layers_identity():
    """A T5 whose encoder block 1 sees exactly block 0's FF input (attention and FF outputs of the
    first blocks zeroed, same w_in): its ff_pre is an identical copy of the anchor's."""
    torch.manual_seed(0)
    model = _t5().eval()
    enc = model.encoder.block
    with torch.no_grad():
        for b in (enc[0], enc[1]):
            b.layer[0].SelfAttention.o.weight.zero_()
        enc[0].layer[-1].DenseReluDense.wo.weight.zero_()
        enc[1].layer[-1].layer_norm.weight.copy_(enc[0].layer[-1].layer_norm.weight)
        enc[1].layer[-1].DenseReluDense.wi.weight.copy_(enc[0].layer[-1].DenseReluDense.wi.weight)
    batches = [_s2s_batch(s) for s in range(4)]
    feats = collect(model, batches, ["encoder.0.ff_pre", "encoder.1.ff_pre"])
    assert torch.equal(feats["encoder.0.ff_pre"], feats["encoder.1.ff_pre"])
    corr = merge_correlations(model, batches, "encoder", layers=[0, 1], anchor=0, progress=False)[1]
    np.testing.assert_allclose(torch.diagonal(corr).numpy(), 1.0, atol=1e-12)
    assert (_assignment(corr) == np.arange(corr.shape[0])).all()
