"""mtlab.tasks.sentences: the shipped English corpus, its hash splits, the task's batches, and
clear errors for corpus files that are missing, empty or not UTF-8."""
from __future__ import annotations

import hashlib
import re

import pytest
import torch

from mtlab.tasks import sentences as S


@pytest.fixture(scope="module")
def tok():
    from mtlab.minilm import load_minilm

    return load_minilm()[1]


def test_corpus_is_large_deterministic_and_split_by_hash():
    a, b = S.SentencesTask(), S.SentencesTask()
    assert a.splits == b.splits
    sizes = a.sizes()
    assert sum(sizes.values()) >= 20_000 and sizes["train"] > 0.75 * sum(sizes.values())
    sets = {k: set(a.sentences(k)) for k in S.SPLITS}
    assert not (sets["train"] & sets["dev"]) and not (sets["train"] & sets["test"]) and not (sets["dev"] & sets["test"])
    for split, items in sets.items():
        assert all(S.split_of(s) == split for s in items)
    # every sentence of the file is in exactly one split; a prefix is a hash-ordered sample
    assert sum(sizes.values()) == len(S.read_corpus())
    small = S.SentencesTask(limit={"train": 50, "dev": 10, "test": None})
    assert small.sentences("train") == a.sentences("train")[:50] and small.sizes()["test"] == sizes["test"]
    # the split rule depends only on the sentence: the same sentence lands in the same split in any list
    s = a.sentences("dev")[0]
    assert s in S.split_corpus(["Some other sentence of a list here.", s])["dev"]


def test_shipped_file_matches_its_card():
    card = (S.CORPUS_DIR / "README.md").read_text()
    sha = re.search(r"SHA-256 `([0-9a-f]{64})`", card).group(1)
    assert hashlib.sha256(S.CORPUS.read_bytes()).hexdigest() == sha
    sizes = S.SentencesTask().sizes()
    assert f"train {sizes['train']}, dev {sizes['dev']}, test {sizes['test']}" in card
    assert S.CORPUS.stat().st_size < 5_000_000
    lines = S.CORPUS.read_text(encoding="utf-8").splitlines()
    assert all(S.is_prose(s) for s in lines) and len(set(lines)) == len(lines)


def test_sentence_rules():
    text = "First sentence is here now. Second one follows it here!\n\nA third paragraph with e.g. a list."
    assert list(S.split_sentences(text)) == ["First sentence is here now.", "Second one follows it here!",
                                             "A third paragraph with e.g. a list."]
    assert S.is_prose('Raise an error when the "key" argument is missing.')
    for bad in ("return x.y(z) when it is the case.", "Too short here.", "Call foo_bar() on the object now.",
                "This sentence has no final stop at all", ">>> print(1) and more words here."):
        assert not S.is_prose(bad)


def test_build_is_deterministic_on_a_given_tree(tmp_path):
    root = tmp_path / "lib"
    (root / "pkg").mkdir(parents=True)
    (root / "b.py").write_text('"""Module b says something long enough here."""\n# A comment that reads as\n'
                               '# one sentence over two lines.\nx = 1\n')
    (root / "pkg" / "a.py").write_text('def f():\n    """Function f returns nothing useful at all."""\n')
    (root / "site-packages").mkdir()
    (root / "site-packages" / "c.py").write_text('"""Never read from installed packages here."""\n')
    (root / "broken.py").write_text("def (:\n")
    out = S.build_corpus(root, progress=False)
    assert out[:3] == ["Module b says something long enough here.", "A comment that reads as one sentence over two lines.",
                       "Function f returns nothing useful at all."]
    assert out == S.build_corpus(root, progress=False) and len(out) == len(set(out))
    path = S.write_corpus(tmp_path / "out" / "s.txt", root, progress=False)
    assert S.read_corpus(path) == out and "s.txt" in (path.parent / "README.md").read_text()
    assert not list(path.parent.glob("*.tmp"))


def test_bad_corpus_files_say_how_to_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing: restore it with `git checkout -- data/sentences`"):
        S.SentencesTask(path=tmp_path / "nope.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match="is empty .*pass path="):
        S.read_corpus(empty)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("Café au lait is a drink.\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"not UTF-8 \(byte 3.*re-save it as UTF-8"):
        S.SentencesTask(path=latin)


def test_task_batches_for_the_training_loop(tok):
    task = S.SentencesTask(tok, limit=40, max_length=16)
    b = task.collate("train", [0, 1, 2])
    ids = task.encoded("train")[0]
    assert b.input_ids.shape == (3, max(len(ids[i]) for i in range(3)))
    assert b.attention_mask.sum(1).tolist() == [len(ids[i]) for i in range(3)]
    assert torch.equal(b.labels == -100, b.attention_mask == 0)
    assert (b.input_ids[:, 0] == tok.cls_token_id).all() and b.input_ids.shape[1] <= 16
    assert task.decode_target(ids[0]).lower()[:5] == task.sentences("train")[0].lower()[:5]
    batches = task.batches("train", 8, shuffle=True, seed=1, epoch=0)
    assert sorted(i for bb in batches for i in bb) == list(range(40))
    with pytest.raises(ValueError, match="has no tokenizer: pass SentencesTask"):
        S.SentencesTask(limit=5).collate("dev", [0])
    with pytest.raises(NotImplementedError, match="mtlab.embedding"):
        task.score(["a"], ["a"])
