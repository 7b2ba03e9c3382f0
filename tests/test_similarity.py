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
    df = S.cka_matrix(model, t5_batches, point="ff_out", estimator=estimator, chunk_tokens=8, progress=False,
                      exclude=None)
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
                       progress=False, exclude=None)
    assert enc.shape == (2, 2) and list(enc.attrs["config"]["tokens"]) == ["encoder"]


def test_matching_matrix_tiny_t5(t5_batches):
    model = _model("t5")
    df = S.matching_matrix(model, t5_batches, stack="decoder", progress=False, exclude=None)
    M = df.to_numpy()
    assert df.shape == (3, 3) and (np.diag(M) == 1.0).all()
    np.testing.assert_allclose(M, M.T)
    assert (np.abs(M) <= 1).all()
    feats = collect(model, t5_batches, ["decoder.0.ff_pre", "decoder.2.ff_pre"])
    assert M[0, 2] == pytest.approx(S.matching_score(feats["decoder.0.ff_pre"], feats["decoder.2.ff_pre"]),
                                    abs=1e-9)
    # several passes when statistics would exceed max_bytes: same result
    tiny = S.matching_matrix(model, t5_batches, stack="decoder", max_bytes=8 * 64 * 64, progress=False,
                             exclude=None)
    assert tiny.attrs["config"]["passes"] == 3
    np.testing.assert_allclose(tiny.to_numpy(), M, atol=1e-12)
    with pytest.raises(ValueError, match="one-shot"):
        S.matching_matrix(model, iter(t5_batches), stack="decoder", max_bytes=8 * 64 * 64, progress=False,
                          exclude=None)


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


# ---------------------------------------------------------------------------
# special tokens are left out by default (issue 22, item 11)

SENTS = ["the quick brown fox jumps over the lazy dog", "return the number of items in a list",
         "a short one", "open the file and read every line of it", "raise an error when the value is bad",
         "compute the square root of a number"] * 4


def _bert_tokenizer():
    """A word-level BERT-style tokenizer built offline: [CLS] sentence [SEP], [PAD] = 0."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = sorted({w for t in SENTS for w in t.split()})
    vocab = {w: i for i, w in enumerate(specials + words)}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


def _spiky_bert(tok):
    """A tiny random BERT whose [CLS] carries one huge dimension through every FF (as trained BERTs do)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, pad_token_id=tok.pad_token_id)
    model = BertModel(cfg).eval()
    from test_exclude_positions import plant_cls_spike

    plant_cls_spike(model, tok.cls_token_id)
    return model


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    """The spiky BERT saved with its tokenizer, as a user's model folder is."""
    tok = _bert_tokenizer()
    folder = tmp_path_factory.mktemp("bert") / "model"
    _spiky_bert(tok).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _bert_batches(tok):
    return [dict(tok(SENTS[i:i + 8], padding=True, return_tensors="pt")) for i in range(0, len(SENTS), 8)]


def _off(df):
    M = df.to_numpy()
    return M[~np.eye(len(M), dtype=bool)]


def test_cka_and_matching_leave_special_tokens_out_by_default(bert_folder):
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(bert_folder).eval()
    tok = AutoTokenizer.from_pretrained(bert_folder)
    bs = _bert_batches(tok)
    kw = dict(max_tokens=None, progress=False)
    default = S.cka_matrix(model, bs, "ff_out", **kw)
    by_tok = S.cka_matrix(model, bs, "ff_out", exclude=tok, **kw)
    everything = S.cka_matrix(model, bs, "ff_out", exclude=None, **kw)
    np.testing.assert_allclose(default.to_numpy(), by_tok.to_numpy(), atol=1e-12)
    assert _off(everything).min() > 0.99 and _off(default).max() < 0.9  # [CLS] dominated the map over all tokens
    cfg = default.attrs["config"]
    assert cfg["tokens_left_out"] == "special tokens" and cfg["special_ids"] == sorted(tok.all_special_ids)
    assert "tokenizer saved with the model" in cfg["special_ids_from"]
    assert cfg["excluded_tokens"] == {"layers": 2 * len(SENTS)}  # [CLS] and [SEP] of every sentence
    assert everything.attrs["config"]["tokens_left_out"] == "none"
    assert everything.attrs["config"]["excluded_tokens"] == {"layers": 0}
    m = S.matching_matrix(model, bs, "ff_pre", **kw)
    assert m.attrs["config"]["tokens_left_out"] == "special tokens"
    assert m.attrs["config"]["excluded_tokens"] == {"layers": 2 * len(SENTS)}
    np.testing.assert_allclose(m.to_numpy(), S.matching_matrix(model, bs, "ff_pre", exclude=tok, **kw).to_numpy(),
                               atol=1e-12)
    plt.close("all")
    assert "special tokens left out" in S.heatmap(default).get_title()
    plt.close("all")


def test_default_without_a_tokenizer_warns_or_names_the_fix():
    tok = _bert_tokenizer()
    model = _spiky_bert(tok)  # built from a config: no folder, no tokenizer beside it
    bs = _bert_batches(tok)
    with pytest.warns(UserWarning, match="exclude=tokenizer"):
        df = S.cka_matrix(model, bs, "ff_out", max_tokens=None, progress=False)
    assert df.attrs["config"]["special_ids"] == [tok.pad_token_id]
    assert "pad_token_id=0" in df.attrs["config"]["special_ids_from"]
    model.config.pad_token_id = None
    with pytest.raises(ValueError, match="exclude=tokenizer.*exclude=None"):
        S.cka_matrix(model, bs, "ff_out", progress=False)
    with pytest.raises(ValueError, match="exclude='special'"):
        S.cka_matrix(model, bs, "ff_out", progress=False, exclude="specials")


def test_g2p_teacher_folder_names_its_special_tokens(tmp_path, tiny_t5, g2p_task):
    from mtlab.tasks.g2p import SPECIALS

    tiny_t5.save_pretrained(tmp_path)
    g2p_task.tokenizer.save(tmp_path)
    tiny_t5.config._name_or_path = str(tmp_path)
    ids, source = S.special_ids(tiny_t5)
    assert [g2p_task.tokenizer.vocab[i] for i in ids] == list(SPECIALS) == ["<pad>", "</s>", "<unk>"]
    assert "tokenizer saved with the model" in source
