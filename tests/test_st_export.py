"""mtlab.st_export: a compressed MiniLM exports to a folder that sentence_transformers loads, with
the original's pooling and normalisation, embedding as mtlab does to 1e-5; re-exports work; a
template without a pooling config is refused naming the fix; user files are never touched."""
from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch

from mtlab.export import EXPORT_RECORD, ExportTargetError, export, read_export_record
from mtlab.minilm import embed, load_minilm, model_dir
from mtlab.st_export import PoolingConfigError, export_sentence_transformer

st = pytest.importorskip("sentence_transformers")

SENTENCES = ["A cat sits on the mat.", "Compression keeps the embeddings close to the original ones, mostly.",
             "Short.", "The library reads its configuration from a file in the home directory."]


@pytest.fixture(scope="module")
def minilm():
    return load_minilm()


def _pruned_and_merged(model):
    from mtlab.baselines import keep_only
    from mtlab.merging.merge import tie_ffs

    pruned = keep_only(model, {"layers": [0, 1, 2, 4, 5]})  # a layer dropped ...
    return tie_ffs(pruned, ["layers:1-2@first/vanilla"])    # ... and two FF sublayers tied (combined)


def _st_embeddings(path):
    loaded = st.SentenceTransformer(str(path), device="cpu", local_files_only=True)
    return loaded, loaded.encode(SENTENCES, convert_to_tensor=True).float().cpu()


def test_compressed_minilm_loads_in_sentence_transformers(minilm, tmp_path):
    model, tok = minilm
    small = _pruned_and_merged(model)
    out = export_sentence_transformer(small, tmp_path / "st")
    loaded, got = _st_embeddings(out)
    ours = embed(small, tok, SENTENCES)
    assert (got - ours).abs().max().item() <= 1e-5
    assert not torch.allclose(ours, embed(model, tok, SENTENCES), atol=1e-3)  # really the compressed model
    # the original's pipeline: modules, mean pooling, normalisation, max_seq_length
    orig = model_dir()
    assert json.loads((out / "modules.json").read_text()) == json.loads((orig / "modules.json").read_text())
    assert json.loads((out / "1_Pooling/config.json").read_text()) == json.loads(
        (orig / "1_Pooling/config.json").read_text())
    assert [type(m).__name__ for m in loaded] == ["Transformer", "Pooling", "Normalize"]
    assert loaded.max_seq_length == 256
    assert loaded[0].auto_model.config.num_hidden_layers == 5
    record = read_export_record(out)
    assert set(record["files"]) >= {"modules.json", "1_Pooling/config.json", "sentence_bert_config.json",
                                    "model.safetensors", "tokenizer.json"}
    assert record["sentence_transformers"]["max_abs_diff"] <= 1e-5


def test_reexport_replaces_and_never_touches_user_files(minilm, tmp_path):
    model, tok = minilm
    from mtlab.baselines import keep_only

    out = tmp_path / "st"
    export_sentence_transformer(keep_only(model, {"layers": [0, 2, 4]}), out)
    export_sentence_transformer(keep_only(model, {"layers": [0, 1, 3, 5]}), out)  # again, no flag needed
    _, got = _st_embeddings(out)
    assert st.SentenceTransformer(str(out), device="cpu")[0].auto_model.config.num_hidden_layers == 4
    export(keep_only(model, {"layers": [1, 2]}), out)  # a plain export replaces it too: every file was listed
    assert not (out / "modules.json").exists()
    export_sentence_transformer(keep_only(model, {"layers": [0, 5]}), out)  # and back
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ExportTargetError, match="overwrite=True"):
        export_sentence_transformer(keep_only(model, {"layers": [0, 4]}), out)
    export_sentence_transformer(keep_only(model, {"layers": [0, 4]}), out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
    assert "notes.txt" not in read_export_record(out)["files"]
    _, got = _st_embeddings(out)
    assert (got - embed(keep_only(model, {"layers": [0, 4]}), tok, SENTENCES)).abs().max().item() <= 1e-5


def test_template_without_pooling_config_names_the_fix(minilm, tmp_path):
    model, _ = minilm
    plain = tmp_path / "plain"
    plain.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(model_dir() / f, plain / f)
    with pytest.raises(PoolingConfigError, match=r"no modules\.json.*pooling='mean'"):
        export_sentence_transformer(model, tmp_path / "out", template=plain)
    shutil.copy(model_dir() / "modules.json", plain / "modules.json")  # lists Pooling, but no 1_Pooling/config.json
    with pytest.raises(PoolingConfigError, match=r"no pooling config.*template="):
        export_sentence_transformer(model, tmp_path / "out", template=plain)
    (plain / "1_Pooling").mkdir()
    (plain / "1_Pooling/config.json").write_text(json.dumps({"word_embedding_dimension": 384,
                                                             "pooling_mode_cls_token": True}))
    with pytest.raises(PoolingConfigError, match="mean-pooled"):
        export_sentence_transformer(model, tmp_path / "out", template=plain)
    assert not (tmp_path / "out").exists()  # refused before any work


def test_tiny_bert_with_mean_pooling_and_no_template(minilm, tmp_path):
    from transformers import BertConfig, BertModel

    _, tok = minilm
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    tiny = BertModel(cfg).eval()
    with pytest.raises(ValueError, match="tokenizer="):
        export_sentence_transformer(tiny, tmp_path / "x", pooling="mean")
    with pytest.raises(PoolingConfigError, match="hidden size is 32"):  # MiniLM's template is another model's
        export_sentence_transformer(tiny, tmp_path / "x", tokenizer=tok)
    out = export_sentence_transformer(tiny, tmp_path / "tiny", tokenizer=tok, pooling="mean", max_seq_length=64)
    _, got = _st_embeddings(out)
    assert (got - embed(tiny, tok, SENTENCES, max_length=64)).abs().max().item() <= 1e-5
    assert json.loads((out / "1_Pooling/config.json").read_text())["word_embedding_dimension"] == 32
    assert EXPORT_RECORD in {p.name for p in out.iterdir()}


def test_merged_copy_is_not_changed(minilm, tmp_path):
    model, _ = minilm
    small = _pruned_and_merged(model)
    before = copy.deepcopy(small.state_dict())
    export_sentence_transformer(small, tmp_path / "st")
    assert all(torch.equal(before[k], v) for k, v in small.state_dict().items())
