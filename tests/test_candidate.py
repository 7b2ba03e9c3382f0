"""Typed compression specs, `apply`, and the Candidate rows every study shares."""
import pytest
import torch

from mtlab.candidate import Budget, Candidate, CompressionSpec, apply, parse_spec
from mtlab.merging.build import merge_model, prune_model
from mtlab.merging.spec import MergeSpec, PruneSpec
from mtlab.modular import ModuleBank, Plan, assemble
from mtlab.teacher import TeacherConfig, build_teacher


@pytest.fixture(scope="module")
def t5_44(g2p_task):
    torch.manual_seed(0)
    return build_teacher(g2p_task.tokenizer, TeacherConfig(d_model=16, d_ff=32, num_heads=2, num_layers=4,
                                                           num_decoder_layers=4)).eval()


@pytest.mark.parametrize("text", ["e=1122 d=22", "encoder:1-3@middle/permute",
                                  "prune decoder:1-2", "encoder:0-1@first/vanilla; prune decoder:1-2",
                                  "e=22 d=1111 + decoder:1-3@middle/permute; prune encoder:0-1"])
def test_every_spec_text_round_trips(text):
    spec = CompressionSpec.parse(text)
    assert str(spec) == text and CompressionSpec.parse(str(spec)) == spec
    assert str(parse_spec(text)) == text


def test_parse_spec_gives_the_narrowest_type():
    assert isinstance(parse_spec("e=22 d=22"), Plan)
    assert isinstance(parse_spec("encoder:1-2"), MergeSpec)
    assert isinstance(parse_spec("prune encoder:1-2"), PruneSpec)
    assert isinstance(parse_spec("encoder:1-2; prune decoder:0-1"), CompressionSpec)
    assert CompressionSpec.parse("encoder:0-2; prune decoder:1-3").removed() == (4, 2)


def test_bad_specs_name_the_form_to_write():
    with pytest.raises(ValueError, match="empty compression spec"):
        CompressionSpec()
    with pytest.raises(ValueError, match="prune STACK:START-END"):
        CompressionSpec.parse("prune encoder:1")
    with pytest.raises(ValueError, match="no edits"):
        CompressionSpec.parse("e=22 d=22 + ")


def test_apply_equals_the_functions_it_composes(t5_44, g2p_task):
    batch = g2p_task.collate("dev", list(range(4)))
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "labels": batch.labels}

    def logits(m):
        with torch.no_grad():
            return m(**inputs).logits

    align = lambda: g2p_task.iter_batches("train", 8, shuffle=True, seed=0)  # noqa: E731
    assert torch.equal(logits(apply(t5_44, "e=1111 d=1111")), logits(t5_44))  # all originals: the teacher
    pruned = apply(t5_44, "prune decoder:1-2")
    assert torch.equal(logits(pruned), logits(prune_model(t5_44, "decoder", 1, 2)))
    both = apply(t5_44, "encoder:1-2@first/vanilla; prune decoder:1-2")
    manual = prune_model(merge_model(t5_44, ["encoder:1-2@first/vanilla"]), "decoder", 1, 2)
    assert torch.equal(logits(both), logits(manual))
    bank = ModuleBank.build(t5_44, (2,))
    spec = "e=22 d=1111 + decoder:0-2@middle/permute"
    got = apply(t5_44, spec, bank=bank, batches_fn=align, max_tokens=200)
    want = merge_model(assemble(t5_44, bank, "e=22 d=1111"), ["decoder:0-2@middle/permute"], align, 200)
    assert torch.allclose(logits(got), logits(want), atol=1e-6)
    assert len(t5_44.encoder.block) == 4  # the model itself is untouched
    with pytest.raises(ValueError, match="pass the module bank"):
        apply(t5_44, "e=22 d=1111")


def test_a_candidate_row_holds_its_spec_text_budget_and_scores(t5_44):
    c = Candidate("modules", Plan.parse("e=22 d=22"), t5_44, "size_first", Budget(1, 100, 9.5),
                  scores={"test_wer": 40.0}, info={"kind": "modules"})
    assert c.row() == {"kind": "modules", "method": "modules", "strategy": "size_first", "plan": "e=22 d=22",
                       "train_runs": 1, "train_steps": 100, "train_seconds": 9.5, "test_wer": 40.0}
    unaccounted = Candidate("merge", CompressionSpec.parse("encoder:0-1"), budget=Budget(1, 50, None))
    assert "train_seconds" not in unaccounted.row() and unaccounted.row()["train_steps"] == 50
    assert "train_runs" not in Candidate("teacher", "x").row()
    assert Candidate("sft", "sft-4", note="not shipped: make baselines").row()["note"].endswith("make baselines")


# ---- issue 22: every model apply/assemble/prune returns generates with plain transformers; edit indices


@pytest.fixture(scope="module")
def teacher():
    from mtlab.teacher import load_teacher

    return load_teacher()[0]


@pytest.mark.parametrize("spec", ["e=33 d=1122", "e=6 d=111111", "e=6 d=222", "prune encoder:0-2",
                                  "e=33 d=111111 + prune encoder:0-1"])
def test_the_teacher_with_a_deeper_decoder_generates_plainly(teacher, spec, tmp_path):
    """transformers 5.x sized plain generate()'s cache from T5's encoder depth: IndexError in memory
    and after a plain save_pretrained/from_pretrained (issue 22, item 2)."""
    import transformers as T

    from mtlab.tasks.base import cache_kwargs

    model = apply(teacher, spec, bank=ModuleBank.build(teacher, (2, 3, 6)))
    assert len(model.decoder.block) > len(model.encoder.block)
    ids = torch.tensor([[5, 6, 7, 8, 9, 1], [10, 11, 12, 1, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        want = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, **cache_kwargs(model))
        assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6), want)
        model.save_pretrained(tmp_path)
        again = T.T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
        assert torch.equal(again.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6), want)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, labels=ids[:, :4]).logits


@pytest.mark.parametrize("spec,kept,tied", [
    ("encoder:3-4@first/vanilla; prune encoder:0-1", [0, 2, 3, 4, 5], [2, 3]),
    ("encoder:3-5@middle/permute; prune encoder:0-2", [0, 3, 4, 5], [1, 2, 3]),
    ("prune encoder:3-4; encoder:0-1@last/vanilla", [0, 1, 2, 3, 5], [0, 1]),
])
def test_a_merge_and_a_prune_tie_the_same_layers_after_save_merged(teacher, g2p_task, spec, kept, tied, tmp_path):
    """The merge record was not renumbered when blocks were dropped: load_merged tied other layers
    (logits off by up to 2.4) or raised IndexError (issue 22, item 3)."""
    from mtlab.merging import load_merged, save_merged

    align = lambda: g2p_task.iter_batches("train", 8, shuffle=True, seed=0)  # noqa: E731
    model = apply(teacher, spec, batches_fn=align, max_tokens=200)
    for new, old in enumerate(kept):  # the kept blocks are the teacher's (attention untouched by a merge)
        assert torch.equal(model.encoder.block[new].layer[0].SelfAttention.q.weight,
                           teacher.encoder.block[old].layer[0].SelfAttention.q.weight)
    w = [model.encoder.block[i].layer[-1].DenseReluDense.wi.weight for i in tied]
    assert all(x is w[0] for x in w)
    ids = torch.tensor([[5, 6, 7, 8, 9, 1]])
    again = load_merged(save_merged(model, tmp_path / "m"))
    assert torch.equal(_logits(again, ids), _logits(model, ids))
    w = [again.encoder.block[i].layer[-1].DenseReluDense.wi.weight for i in tied]
    assert all(x is w[0] for x in w)


def test_two_prunes_drop_the_layers_they_name_in_any_order(teacher):
    """Every edit's indices refer to the model the edits start from: "prune encoder:0-1; prune
    encoder:3-4" drops teacher layers 1 and 4 (it dropped 1 and 5), whatever the order (item 4)."""
    ids = torch.tensor([[5, 6, 7, 8, 9, 1]])
    want = prune_model(prune_model(teacher, "encoder", 3, 2), "encoder", 0, 2)  # top window first: no shift
    for spec in ("prune encoder:0-1; prune encoder:3-4", "prune encoder:3-4; prune encoder:0-1"):
        got = apply(teacher, spec)
        assert len(got.encoder.block) == 4
        assert torch.equal(_logits(got, ids), _logits(want, ids))
    a = apply(teacher, "encoder:4-5@first/vanilla; prune encoder:0-2")
    b = apply(teacher, "prune encoder:0-2; encoder:4-5@first/vanilla")
    assert torch.equal(_logits(a, ids), _logits(b, ids)) and a.config.mtlab_merges == ["encoder:2-3@first/vanilla"]


@pytest.mark.parametrize("spec,msg", [
    ("prune encoder:0-2; prune encoder:2-3", r"overlap at encoder layer\(s\) \[2\]"),
    ("encoder:2-3@first/vanilla; prune encoder:1-2", r"both merged .* and dropped"),
    ("prune encoder:4-6", "does not fit stack 'encoder' with 6 layers"),
    ("prune layers:0-1", "has no stack 'layers'"),
])
def test_edits_that_contradict_each_other_are_refused(teacher, spec, msg):
    with pytest.raises(ValueError, match=msg):
        apply(teacher, spec)
