"""The G2P task: data, split, tokenizer, batching, metrics."""
import pytest
import torch

from mtlab.tasks.g2p import EOS, PAD, G2PTokenizer, per_wer, split_of


def test_split_is_deterministic_disjoint_and_about_90_5_5(g2p_task):
    sizes = g2p_task.sizes()
    total = sum(sizes.values())
    assert total > 100_000
    assert abs(sizes["train"] / total - 0.90) < 0.01
    assert abs(sizes["dev"] / total - 0.05) < 0.005 and abs(sizes["test"] / total - 0.05) < 0.005
    words = {s: set(g2p_task.texts(s)[0]) for s in ("train", "dev", "test")}
    assert not (words["train"] & words["dev"]) and not (words["train"] & words["test"]) and not (words["dev"] & words["test"])
    # stable across machines: a fixed word always lands in the same split (hash-based, not random)
    assert [split_of(w) for w in ("hello", "world", "phoneme", "zebra")] == [split_of(w) for w in ("hello", "world", "phoneme", "zebra")]
    assert split_of("hello") == "train" and split_of("aardvark") == "train"


def test_entries_are_alphabetic_with_stressed_phones(g2p_task):
    src, tgt = g2p_task.texts("train")
    assert all(w.isalpha() and w.islower() for w in src[:5000])
    i = src.index("hello")
    assert tgt[i] == "HH AH0 L OW1"  # first pronunciation in CMUdict
    assert any(p[-1].isdigit() for p in tgt[i].split())


def test_tokenizer_round_trip_and_save_load(tmp_path, g2p_task):
    tok = g2p_task.tokenizer
    ids = tok.encode_phones("HH AH0 L OW1".split())
    assert ids[-1] == EOS and tok.decode_phones([PAD] + ids + [PAD]) == ["HH", "AH0", "L", "OW1"]
    assert tok.encode_word("hi")[-1] == EOS and len(tok.encode_word("hi")) == 3
    tok.save(tmp_path)
    again = G2PTokenizer.load(tmp_path)
    assert again.vocab == tok.vocab
    (tmp_path / "g2p_tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid G2P tokenizer"):
        G2PTokenizer.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="must hold its tokenizer"):
        G2PTokenizer.load(tmp_path / "nowhere")


def test_batches_pad_and_cover_split_once(g2p_task):
    batches = g2p_task.batches("dev", 64, shuffle=True, seed=3, epoch=1)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(g2p_task.sizes()["dev"]))
    assert batches == g2p_task.batches("dev", 64, shuffle=True, seed=3, epoch=1)
    assert batches != g2p_task.batches("dev", 64, shuffle=True, seed=3, epoch=2)
    b = g2p_task.collate("dev", batches[0])
    assert b.input_ids.shape[0] == len(batches[0])
    assert torch.equal(b.attention_mask, (b.input_ids != PAD).long())
    assert (b.labels == -100).any() or b.labels.shape[1] == min(int((b.labels != -100).sum(1).min()), 99)
    assert ((b.labels == -100) | (b.labels > PAD)).all()  # no PAD id inside labels


def test_per_wer_on_hand_checked_examples():
    refs = [["K", "AE1", "T"], ["D", "AO1", "G"]]
    assert per_wer(refs, refs) == {"per": 0.0, "wer": 0.0}
    # one substitution in 6 phones, one of two words wrong
    m = per_wer([["K", "AE1", "T"], ["D", "AO1", "K"]], refs)
    assert m["per"] == pytest.approx(100 / 6) and m["wer"] == 50.0
    # deletion + insertion: "K T" vs "K AE1 T" (1 edit), "D AO1 G Z" vs "D AO1 G" (1 edit)
    m = per_wer([["K", "T"], ["D", "AO1", "G", "Z"]], refs)
    assert m["per"] == pytest.approx(200 / 6) and m["wer"] == 100.0
    # stress digits matter: AE0 vs AE1 is an error
    assert per_wer([["K", "AE0", "T"]], [refs[0]])["per"] == pytest.approx(100 / 3)
    with pytest.raises(ValueError, match="empty"):
        per_wer([], [])


def test_greedy_and_beam_decoding_run_through_generate(g2p_task, tiny_t5):
    greedy = g2p_task.evaluate(tiny_t5, "dev", limit=8, progress=False)
    beam = g2p_task.evaluate(tiny_t5, "dev", limit=8, num_beams=3, progress=False)
    for m in (greedy, beam):
        assert set(m) == {"split", "n", "per", "wer", "seconds"} and m["n"] == 8
        assert m["per"] >= 0 and 0 <= m["wer"] <= 100
    pred = g2p_task.predict(tiny_t5, "dev", limit=8, progress=False)
    assert list(pred.columns) == ["source", "reference", "hypothesis"]
    assert pred.source.tolist() == g2p_task.texts("dev", 8)[0]
