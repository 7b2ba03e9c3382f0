"""Leaving positions out of activation capture: special tokens of encoder-only text models,
boolean masks, per-batch masks; and the MiniLM maps over all tokens vs without special tokens.

The planted token: a tiny random BERT whose [CLS] embedding and every FF carry one huge
dimension, as [CLS]/[SEP] do in trained BERT-style encoders."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import BertConfig, BertModel

from mtlab import minilm
from mtlab.capture import Capture, collect, special_token_mask
from mtlab.similarity import cka_matrix

SENTS = ["The quick brown fox jumps over the lazy dog.", "Return the number of items in a container.",
         "A short one.", "Open the file and read every line of it until the end.",
         "Raise an error when the value is not valid.", "Compute the square root of a number."] * 8


@pytest.fixture(scope="module")
def tok():
    return minilm.load_minilm()[1]


def plant_cls_spike(model: BertModel, cls: int) -> None:
    """[CLS] spikes in dim 0, a channel private to FF neuron 0 of every layer, which fires on the
    spike and writes 100x back into dim 0 (attention neither reads nor writes it)."""
    with torch.no_grad():
        emb = model.embeddings
        for table in (emb.word_embeddings, emb.position_embeddings, emb.token_type_embeddings):
            table.weight[:, 0] = 0.0
        emb.word_embeddings.weight[cls, 0] = 50.0
        for layer in model.encoder.layer:
            att = layer.attention
            for lin in (att.self.query, att.self.key, att.self.value):
                lin.weight[:, 0] = 0.0
            att.output.dense.weight[0] = 0.0
            att.output.dense.bias[0] = 0.0
            w_in, w_out = layer.intermediate.dense, layer.output.dense
            w_in.weight[:, 0] = 0.0
            w_in.weight[0] = 0.0
            w_in.weight[0, 0], w_in.bias[0] = 10.0, -20.0
            w_out.weight[0] = 0.0
            w_out.weight[:, 0] = 0.0
            w_out.weight[0, 0], w_out.bias[0] = 100.0, 0.0


def _bert(tok, plant: bool = False) -> BertModel:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    model = BertModel(cfg).eval()
    if plant:
        plant_cls_spike(model, tok.cls_token_id)
    return model


def _batches(tok, size=16):
    return list(minilm.batches(tok, SENTS, size, max_length=32))


def _off_diagonal(df: pd.DataFrame) -> np.ndarray:
    M = df.to_numpy()
    return M[~np.eye(len(M), dtype=bool)]


def test_planted_token_dominates_cka_until_left_out(tok):
    model, bs = _bert(tok, plant=True), _batches(tok)
    kw = dict(max_tokens=None, progress=False)
    everything = cka_matrix(model, bs, "ff_out", exclude=None, **kw)  # every token (the default leaves specials out)
    clean = cka_matrix(model, bs, "ff_out", exclude=tok, **kw)
    assert _off_diagonal(everything).min() > 0.99           # unlike layers read as identical
    assert _off_diagonal(clean).max() < 0.8                  # ... and are not
    n_special = sum(int(special_token_mask(b["input_ids"], tok.all_special_ids)[b["attention_mask"].bool()].sum())
                    for b in bs)
    assert n_special == 2 * len(SENTS)                       # [CLS] and [SEP] of every sentence
    assert clean.attrs["config"]["excluded_tokens"] == {"layers": n_special}
    assert clean.attrs["config"]["tokens"]["layers"] + n_special == everything.attrs["config"]["tokens"]["layers"]
    # without the plant the special tokens do not matter much: both maps are well below 1
    plain = _bert(tok)
    assert _off_diagonal(cka_matrix(plain, bs, "ff_out", exclude=None, **kw)).max() < 0.9


def test_masks_tensor_callable_and_batch_key_agree(tok):
    model = _bert(tok)
    b = _batches(tok, 6)[0]
    special = special_token_mask(b["input_ids"], tok.all_special_ids)
    pt = ["layers.1.ff_out", "layers.2.attn_out"]
    by_tok = collect(model, [b], pt, exclude=tok)
    by_ids = collect(model, [b], pt, exclude=set(tok.all_special_ids))
    by_tensor = collect(model, [b], pt, exclude=special)
    by_fn = collect(model, [b], pt, exclude=lambda inputs: special_token_mask(inputs["input_ids"], [0, 101, 102]))
    by_key = collect(model, [{**b, "exclude_mask": special}], pt)  # the key is not passed to the model
    full = collect(model, [b], pt)
    keep = b["attention_mask"].bool() & ~special
    for got in (by_ids, by_tensor, by_fn, by_key):
        for p in pt:
            assert torch.equal(got[p], by_tok[p])
    assert by_tok[pt[0]].shape[0] == int(keep.sum()) < full[pt[0]].shape[0]
    # rows kept are exactly the non-special rows of the full capture, in order
    rows = keep[b["attention_mask"].bool()]
    assert torch.allclose(full[pt[0]][rows], by_tok[pt[0]])
    # a user mask is combined with the special ids: leave out every first word too
    first = torch.zeros_like(special)
    first[:, 1] = True
    both = Capture(model, pt[:1], lambda p, f: None, exclude=tok).run([{**b, "exclude_mask": first}], progress=False)
    assert both.excluded["layers"] == int((special | first)[b["attention_mask"].bool()].sum())


def test_bad_masks_name_expected_and_got_shapes(tok):
    model = _bert(tok)
    b = _batches(tok, 2)[0]
    B, T = b["input_ids"].shape
    with pytest.raises(ValueError, match=rf"expected shape \({B}, {T}\), got \({B}, {T - 1}\)"):
        collect(model, [b], ["layers.0.ff_out"], exclude=torch.zeros(B, T - 1, dtype=torch.bool))
    with pytest.raises(ValueError, match=rf"expected shape \({B}, {T}\), got \({B + 1}, {T}\)"):
        collect(model, [{**b, "exclude_mask": torch.zeros(B + 1, T, dtype=torch.bool)}], ["layers.0.ff_out"])
    with pytest.raises(ValueError, match="boolean.*True = leave out"):
        collect(model, [b], ["layers.0.ff_out"], exclude=torch.zeros(B, T))
    with pytest.raises(TypeError, match="exclude must be"):
        collect(model, [b], ["layers.0.ff_out"], exclude="special")


def test_contrast_sentence_follows_the_numbers():
    idx = ["layers.0", "layers.1", "layers.2"]
    a = pd.DataFrame([[1, .99, .98], [.99, 1, .97], [.98, .97, 1]], index=idx, columns=idx)
    c = pd.DataFrame([[1, .40, .20], [.40, 1, .50], [.20, .50, 1]], index=idx, columns=idx)
    energy = pd.DataFrame([{"layer": "layers.0", "special_tokens": 0.1, "special_energy": 0.97, "norm_ratio": 20.0,
                            "peak_special": 150.0, "peak_other": 4.0}])
    text = minilm.contrast_sentence(a, c, energy)
    assert "averages 0.98" in text and "averages 0.37" in text and "layers.0 vs layers.2 (0.98 -> 0.20)" in text
    assert "because the special tokens, 10% of the positions, carry 97%" in text and "20.0x" in text
    assert "the maps agree" in minilm.contrast_sentence(a, a, energy)
    assert "do not dominate" in minilm.contrast_sentence(a, c, energy.assign(special_energy=0.2))


def test_minilm_contrast_special_tokens_dominate_early_ff_outputs():
    c = minilm.special_token_contrast(n=60, max_tokens=600, energy_sentences=30, progress=False)
    assert c.all_tokens.shape == c.clean.shape == (6, 6)
    assert c.clean.attrs["config"]["tokens_left_out"] == "special tokens"
    assert c.clean.attrs["config"]["excluded_tokens"]["layers"] > 0
    assert c.all_tokens.loc["layers.0", "layers.2"] > 0.95 > c.clean.loc["layers.0", "layers.2"] + 0.2
    assert c.energy.special_energy.max() > 0.9 and (c.energy.special_tokens < 0.5).all()
    gap = (c.all_tokens - c.clean).abs().stack().idxmax()  # the cell the sentence must name
    a, b = c.all_tokens.loc[gap], c.clean.loc[gap]
    assert "because" in c.sentence and f"({a:.2f} -> {b:.2f})" in c.sentence
