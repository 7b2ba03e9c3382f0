"""mtlab.similarity: linear CKA (textbook, exact streamed, Nguyen et al. minibatch), neuron
matching, layer x layer matrices on a tiny T5, heatmap.

Test design for the minibatch estimator: it is NOT the full-data plug-in CKA, but by
definition sum_c HSIC_1(chunk c) / sqrt(...), so it is checked to 1e-9 against that
formula evaluated chunk by chunk with the textbook `hsic1`; its closeness to the
full-data value is a statistical property, checked loosely (0.02) on correlated data.
The exact feature-space estimator equals the textbook Gram formula on all tokens (1e-9).
"""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from mtlab import similarity as S  # noqa: E402
from mtlab.capture import collect, point_names  # noqa: E402
from test_anatomy import _model  # noqa: E402
from test_capture import _s2s_batch  # noqa: E402


def _rand(n, d, seed):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _related(n=600, seed=0):
    X = _rand(n, 12, seed)
    Y = X @ _rand(12, 7, seed + 1) + 1.5 * _rand(n, 7, seed + 2) + 3.0  # offset: centring matters
    return X, Y


def _stream(est, X, Y, sizes):
    start = 0
    for s in sizes:
        est.update("x", X[start:start + s])
        est.update("y", Y[start:start + s])
        est.end_batch()
        start += s
    assert start == X.shape[0]
    return est.matrix()


def _orth(d, seed):
    q, _ = torch.linalg.qr(_rand(d, d, seed))
    return q


def test_textbook_cka_properties():
    X, Y = _related()
    assert S.linear_cka(X, X) == pytest.approx(1.0, abs=1e-6)
    c = S.linear_cka(X, Y)
    assert 0.2 < c < 0.95
    assert S.linear_cka_features(X, Y) == pytest.approx(c, abs=1e-9)  # same quantity, feature space
    assert S.linear_cka(Y, X) == pytest.approx(c, abs=1e-12)
    assert S.linear_cka(X @ _orth(12, 5), Y) == pytest.approx(c, abs=1e-9)  # orthogonal invariance
    assert S.linear_cka(3.7 * X, 0.2 * Y) == pytest.approx(c, abs=1e-9)     # isotropic scaling
    assert S.linear_cka(X + 5.0, Y) == pytest.approx(c, abs=1e-9)           # translation
    with pytest.raises(ValueError):
        S.linear_cka(X, Y[:-1])


def test_independent_data_near_zero():
    X, Y = _rand(5000, 16, 10), _rand(5000, 16, 11)
    assert abs(S.linear_cka_features(X, Y)) < 0.05  # plug-in: ~ d/n bias
    mb = _stream(S.MinibatchCKA(["x", "y"], 512), X, Y, [1000] * 5)
    assert abs(mb[0, 1]) < 0.05


def test_minibatch_equals_chunked_textbook_hsic1():
    X, Y = _related(n=1003)
    sizes = [100, 37, 600, 263, 3]  # 600 -> two chunks of 300; 3 tokens: skipped
    est = S.MinibatchCKA(["x", "y"], chunk_tokens=512)
    got = _stream(est, X, Y, sizes)
    # expected, chunk by chunk, with the textbook unbiased HSIC on Gram matrices
    h = np.zeros((2, 2))
    start = 0
    chunks = 0
    for s in sizes:
        if s >= 4:
            for idx in torch.arange(start, start + s).tensor_split(math.ceil(s / 512)):
                K, L = X[idx] @ X[idx].T, Y[idx] @ Y[idx].T
                h += np.array([[S.hsic1(K, K), S.hsic1(K, L)], [S.hsic1(L, K), S.hsic1(L, L)]])
                chunks += 1
        start += s
    assert est.chunks == chunks == 5 and est.skipped_tokens == 3 and est.tokens == 1000
    expected = h[0, 1] / math.sqrt(h[0, 0] * h[1, 1])
    assert got[0, 1] == pytest.approx(expected, abs=1e-9)
    assert got[1, 0] == got[0, 1] and got[0, 0] == got[1, 1] == 1.0
    # one chunk holding everything = the full-data unbiased CKA; statistically close to it when chunked
    X2, Y2 = _related(n=400, seed=3)
    one = _stream(S.MinibatchCKA(["x", "y"], 512), X2, Y2, [400])
    assert one[0, 1] == pytest.approx(S.unbiased_cka(X2, Y2), abs=1e-9)
    assert got[0, 1] == pytest.approx(S.unbiased_cka(X, Y), abs=0.02)


def test_minibatch_invariances():
    X, Y = _related()
    sizes = [300, 300]
    base = _stream(S.MinibatchCKA(["x", "y"], 256), X, Y, sizes)[0, 1]
    assert _stream(S.MinibatchCKA(["x", "y"], 256), X, X, sizes)[0, 1] == pytest.approx(1.0, abs=1e-9)
    rot = _stream(S.MinibatchCKA(["x", "y"], 256), X @ _orth(12, 7), 4.0 * Y, sizes)[0, 1]
    assert rot == pytest.approx(base, abs=1e-9)


def test_exact_streamed_equals_textbook():
    X, Y = _related(n=500)
    got = _stream(S.FeatureCKA(["x", "y"]), X, Y, [50, 200, 7, 243])
    assert got[0, 1] == pytest.approx(S.linear_cka(X, Y), abs=1e-9)
    with pytest.raises(MemoryError, match="minibatch"):
        _stream(S.FeatureCKA(["x", "y"], max_bytes=100), X, Y, [500])


def test_neuron_matching_recovers_a_permutation():
    X = _rand(400, 10, 1)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    Y = 2.0 * X[:, perm] + 1.0  # other-layer neuron j is anchor neuron perm[j]
    p, score = S.match_neurons(S.neuron_correlation(X, Y))
    assert score == pytest.approx(1.0, abs=1e-9)
    assert torch.equal(perm[p], torch.arange(10))  # other neuron p[i] is anchor neuron i
    assert S.matching_score(X, _rand(400, 10, 2)) < 0.3
    corr = S.neuron_correlation(X, Y).numpy()
    ref = np.corrcoef(X.numpy().T, Y.numpy().T)[:10, 10:]
    np.testing.assert_allclose(corr, ref, atol=1e-9)


@pytest.fixture(scope="module")
def t5_batches():
    return [_s2s_batch(s) for s in range(3)]


@pytest.mark.parametrize("estimator", ["minibatch", "exact"])
def test_cka_matrix_tiny_t5(t5_batches, estimator):
    model = _model("t5")
    df = S.cka_matrix(model, t5_batches, point="ff_out", estimator=estimator, chunk_tokens=8, progress=False)
    labels = ["encoder.0", "encoder.1", "decoder.0", "decoder.1", "decoder.2"]
    assert list(df.index) == labels and list(df.columns) == labels
    M = df.to_numpy()
    np.testing.assert_allclose(np.diag(M), 1.0, atol=1e-9)
    np.testing.assert_allclose(M, M.T, atol=1e-12, equal_nan=True)
    assert np.isnan(M[:2, 2:]).all() and np.isfinite(M[:2, :2]).all() and np.isfinite(M[2:, 2:]).all()
    cfg = df.attrs["config"]
    n_enc = sum(int(b["attention_mask"].sum()) for b in t5_batches)
    n_dec = sum(int((b["labels"] != -100).sum()) for b in t5_batches)
    assert cfg["tokens"] == {"encoder": n_enc, "decoder": n_dec}
    assert cfg["point"] == "ff_out" and cfg["estimator"] == estimator
    if estimator == "exact":  # equals the textbook value on the concatenated, unpadded features
        feats = collect(model, t5_batches, point_names(model, "ff_out", stack="decoder"))
        assert M[2, 4] == pytest.approx(S.linear_cka(feats["decoder.0.ff_out"], feats["decoder.2.ff_out"]),
                                        abs=1e-9)
    enc = S.cka_matrix(model, t5_batches, point="block_out", stack="encoder", estimator=estimator,
                       progress=False)
    assert enc.shape == (2, 2) and list(enc.attrs["config"]["tokens"]) == ["encoder"]


def test_matching_matrix_tiny_t5(t5_batches):
    model = _model("t5")
    df = S.matching_matrix(model, t5_batches, stack="decoder", progress=False)
    M = df.to_numpy()
    assert df.shape == (3, 3) and (np.diag(M) == 1.0).all()
    np.testing.assert_allclose(M, M.T)
    assert (np.abs(M) <= 1).all()
    feats = collect(model, t5_batches, ["decoder.0.ff_pre", "decoder.2.ff_pre"])
    assert M[0, 2] == pytest.approx(S.matching_score(feats["decoder.0.ff_pre"], feats["decoder.2.ff_pre"]),
                                    abs=1e-9)
    # several passes when statistics would exceed max_bytes: same result
    tiny = S.matching_matrix(model, t5_batches, stack="decoder", max_bytes=8 * 64 * 64, progress=False)
    assert tiny.attrs["config"]["passes"] == 3
    np.testing.assert_allclose(tiny.to_numpy(), M, atol=1e-12)
    with pytest.raises(ValueError, match="one-shot"):
        S.matching_matrix(model, iter(t5_batches), stack="decoder", max_bytes=8 * 64 * 64, progress=False)


def test_heatmap():
    df = pd.DataFrame(np.eye(3), index=list("abc"), columns=list("abc"))
    df.iloc[0, 2] = np.nan
    ax = S.heatmap(df, title="t")
    assert isinstance(ax, plt.Axes) and ax.get_title() == "t"
    fig, ax2 = plt.subplots()
    assert S.heatmap(df, ax=ax2) is ax2
    plt.close("all")
    with pytest.raises(ValueError, match="empty"):
        S.heatmap(pd.DataFrame())
    with pytest.raises(ValueError, match="square"):
        S.heatmap(pd.DataFrame(np.ones((2, 3))))
