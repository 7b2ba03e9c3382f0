"""The artifact cache: computed once per config, never reused for another config, and says why."""
import pandas as pd
import pytest

from mtlab.cache import cached_frame, config_hash, stale_note


def test_cached_frame_computes_once_and_names_what_made_an_old_table_stale(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MTLAB_CACHE", str(tmp_path))
    calls = []

    def compute(v):
        calls.append(v)
        return pd.DataFrame({"x": [v]})

    a = {"teacher": "aaa", "profile": {"steps": 10}}
    assert cached_frame("t", a, lambda: compute(1)).x[0] == 1
    assert cached_frame("t", a, lambda: compute(2)).x[0] == 1 and calls == [1]   # read back
    assert stale_note("t", a) is None
    b = {"teacher": "bbb", "profile": {"steps": 10}}                             # another teacher
    df = cached_frame("t", b, lambda: compute(3))
    assert df.x[0] == 3 and calls == [1, 3] and df.attrs["config"] == b
    out = capsys.readouterr().out
    assert "differs in teacher" in out and "not reused" in out and config_hash(b) in out


def test_report_refuses_to_start_without_its_dependencies():
    from mtlab.notebooks import ReportError, check_dependencies

    with pytest.raises(ReportError, match="no_such_package_xyz.*make venv"):
        check_dependencies(required=("papermill", "no_such_package_xyz"))
    with pytest.raises(ReportError, match="no Jupyter kernel named 'nope'"):
        check_dependencies(kernel="nope")


# ---------------------------------------------------------------------------
# One of each concept (issue #24): one hash, one config diff, one splitter

def test_one_hash_gives_every_old_key_unchanged(tmp_path):
    """mtlab.keys is the one hash: cache keys, file and weights hashes, baseline run folders and the
    corpus card's digest are what the four hand-written hashes gave (shipped keys stay valid)."""
    import hashlib
    import json

    import torch
    import transformers as T

    from mtlab import baselines, cache, keys, shipped
    from mtlab.modular import bank

    cfg = {"b": (1, 2), "a": {"p": tmp_path}, "c": 0.5}
    assert cache.config_hash is keys.config_hash
    assert keys.config_hash(cfg) == hashlib.sha1(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:12]
    key = {"depths": {"encoder": 3, "decoder": 3}}
    assert baselines.default_run_dir("sft", key).name == \
        hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    f = tmp_path / "w.bin"
    f.write_bytes(bytes(range(256)) * 5000)
    assert keys.file_hash(f) == hashlib.sha1(f.read_bytes()).hexdigest()[:12] == cache.file_hash(f)
    assert keys.file_hash(f, "sha256", None) == hashlib.sha256(f.read_bytes()).hexdigest() == shipped.sha256(f)
    torch.manual_seed(0)
    model = T.BertModel(T.BertConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     vocab_size=20, max_position_embeddings=8))
    old = hashlib.sha1()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        old.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        old.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    assert keys.weights_hash(model) == old.hexdigest() and bank.weights_hash is keys.weights_hash
    assert keys.text_hash("a sentence", "sha256") == hashlib.sha256(b"a sentence").hexdigest()


def test_one_config_diff_for_resumes_and_stale_caches():
    from mtlab import keys, train

    assert train.config_diff is keys.config_diff
    old = {"lr": 1e-3, "steps": 100, "sampling": {"p": 0.5, "kind": "ladder"}, "extra": None, "tags": (1, 2), "on": 1}
    new = {"lr": 1e-3, "steps": 100.0, "sampling": {"p": 0.25, "kind": "ladder"}, "tags": [1, 2], "on": True}
    # a JSON round trip first (tuples are lists); an absent field reads as None; True is not 1
    assert keys.config_diff(old, new, prefix="train.") == ["train.on: checkpoint 1, now True",
                                                          "train.sampling.p: checkpoint 0.5, now 0.25"]
    assert keys.changed_fields(old, new) == ["on", "sampling.p"] and keys.changed_fields(old, new, ignore=("on",)) == \
        ["sampling.p"]
    assert keys.config_diff(None, {"a": {}}, was="recorded") == ["a: recorded '(absent)', now {}"]
    assert keys.config_diff({"a": {"b": 1}}, {"a": 2}) == ["a: checkpoint '(absent)', now 2",
                                                           "a.b: checkpoint 1, now '(absent)'"]


def test_one_splitter_keeps_every_shipped_split():
    """tasks/split.py is the one splitter: the sentence corpus' split (SHA-256, 80/10/10) and MiniLM's
    align/dev/test split (SHA-1, 50/25/25) are schemes of it, and every shipped sentence stays where it was."""
    import hashlib

    from mtlab import minilm
    from mtlab.tasks import sentences as S
    from mtlab.tasks.split import SCHEMES, split_by_hash

    def old_corpus(s):
        h = int.from_bytes(hashlib.sha256(s.encode("utf-8")).digest()[:8], "big") % 100
        return "train" if h < 80 else "dev" if h < 90 else "test"

    def old_minilm(s):
        h = int.from_bytes(hashlib.sha1(s.encode("utf-8")).digest()[:4], "big") % 100
        return "align" if h < 50 else "dev" if h < 75 else "test"

    corpus = S.read_corpus(S.CORPUS)
    assert len(corpus) > 10_000
    assert [S.split_of(s) for s in corpus] == [old_corpus(s) for s in corpus]
    assert [minilm.split_of(s) for s in corpus] == [old_minilm(s) for s in corpus]
    splits = S.split_corpus(corpus)
    assert {k: len(v) for k, v in splits.items()} == {k: sum(old_corpus(s) == k for s in corpus) for k in splits}
    assert set(SCHEMES) == {"unit", "percent", "percent_sha256"}
    assert split_by_hash("x", 0.25, 0.25, scheme="percent", names=("align", "dev", "test")) == old_minilm("x")
    with pytest.raises(ValueError, match="unknown split scheme 'sha3'.*percent_sha256"):
        split_by_hash("x", scheme="sha3")
    with pytest.raises(ValueError, match="whole-percent"):
        split_by_hash("x", 0.015, 0.05, scheme="percent_sha256")
