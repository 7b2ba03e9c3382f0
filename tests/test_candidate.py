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
