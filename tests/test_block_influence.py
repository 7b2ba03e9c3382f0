"""Depth pruning by measured block scores (mtlab.block_influence): ShortGPT's block influence and
Gromov et al.'s angular distance, on tiny random models where one block is made the identity."""
from __future__ import annotations

import pytest
import torch
import transformers as T

from mtlab import anatomy as A
from mtlab.block_influence import (block_influence, block_scores, calibration_batches, choose_kept,
                                   prune_by_score)

torch.set_num_threads(1)


def _make_identity(layer: A.Layer) -> None:
    """Zero every output projection of a pre-norm block (self- and cross-attention, FF): x -> x."""
    with torch.no_grad():
        for m in layer.block.modules():
            if m is layer.attn_out or m is layer.ff.w_out or type(m).__name__ == "T5Attention":
                target = m.o if type(m).__name__ == "T5Attention" else m
                target.weight.zero_()
                if getattr(target, "bias", None) is not None:
                    target.bias.zero_()


def _teacher(g2p_task, layers=4):
    from mtlab.teacher import TeacherConfig, build_teacher

    torch.manual_seed(0)
    return build_teacher(g2p_task.tokenizer, TeacherConfig(d_model=16, d_ff=32, num_heads=2, num_layers=layers,
                                                           num_decoder_layers=layers)).eval()


def _gpt2(n_layer=4):
    torch.manual_seed(0)
    return T.GPT2LMHeadModel(T.GPT2Config(n_embd=16, n_layer=n_layer, n_head=2, vocab_size=40, n_positions=32)).eval()


def _lm_batches(n=3):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 40, (4, 9), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 6:] = 0
        mask[3, 3:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def test_an_identity_block_scores_zero_and_is_dropped_first_in_every_stack(g2p_task):
    teacher = _teacher(g2p_task)
    an = A.anatomy(teacher)
    _make_identity(an.stack("encoder").layer(2))
    _make_identity(an.stack("decoder").layer(1))
    scores = block_scores(teacher, calibration_batches(g2p_task, batch_size=16), max_tokens=400)
    assert list(scores.columns) == ["stack", "layer", "n", "bi", "angular", "tokens"]
    assert len(scores) == 2 * (4 * 5 // 2) and (scores.tokens == 400).all()  # every span of both stacks
    bi = block_influence(teacher, calibration_batches(g2p_task, batch_size=16), max_tokens=400)
    assert list(bi.columns) == ["stack", "layer", "bi", "angular", "tokens"] and len(bi) == 8
    by = bi.set_index(["stack", "layer"])
    for s, i in (("encoder", 2), ("decoder", 1)):
        assert abs(by.loc[(s, i), "bi"]) < 1e-9 and by.loc[(s, i), "angular"] < 1e-6
    others = bi[~bi.set_index(["stack", "layer"]).index.isin([("encoder", 2), ("decoder", 1)])]
    assert (others.bi > 1e-4).all() and (others.angular > 1e-3).all()
    assert (scores.bi.between(0, 2)).all() and (scores.angular.between(0, 1)).all()
    # BI picks the identity block first; the angular rule's 1-block span is the same block
    assert choose_kept(scores, {"encoder": 3, "decoder": 3}, "bi") == {"encoder": [0, 1, 3], "decoder": [0, 2, 3]}
    assert choose_kept(scores, {"encoder": 3}, "angular") == {"encoder": [0, 1, 3]}
    two = choose_kept(scores, {"encoder": 2}, "angular")["encoder"]  # a contiguous span of 2 is dropped
    dropped = sorted(set(range(4)) - set(two))
    assert len(dropped) == 2 and dropped[1] == dropped[0] + 1
    assert choose_kept(scores, {"encoder": 4}, "bi") == {"encoder": [0, 1, 2, 3]}


def test_block_zero_is_scored_from_its_input():
    model = _gpt2()
    _make_identity(A.anatomy(model).stack("layers").layer(0))
    bi = block_influence(model, _lm_batches())
    assert abs(bi.bi.iloc[0]) < 1e-9 and (bi.bi.iloc[1:] > 1e-4).all()
    assert bi.tokens.iloc[0] == 3 * (4 * 9 - 3 - 6)  # padding left out
    pruned = prune_by_score(model, block_scores(model, _lm_batches()), {"layers": 2}, "bi")
    assert len(A.anatomy(pruned).stack("layers")) == 2 and len(model.transformer.h) == 4
    with torch.no_grad():
        assert torch.isfinite(pruned(**_lm_batches(1)[0]).logits).all()


def test_bad_input_names_the_fix(g2p_task):
    model = _gpt2()
    scores = block_scores(model, _lm_batches(1))
    with pytest.raises(ValueError, match="unknown rule.*'bi'"):
        choose_kept(scores, {"layers": 2}, "cosine")
    with pytest.raises(ValueError, match="depth 5 impossible.*1 <= depth <= 4"):
        choose_kept(scores, {"layers": 5}, "bi")
    with pytest.raises(ValueError, match="no scores for stack 'encoder'"):
        choose_kept(scores, {"encoder": 2}, "bi")
    with pytest.raises(ValueError, match="block_scores"):
        choose_kept(scores.drop(columns="n"), {"layers": 2}, "bi")
    with pytest.raises(ValueError, match="test split is reserved"):
        calibration_batches(g2p_task, "test")
    with pytest.raises(KeyError, match="no stack 'decoder'"):
        block_scores(model, _lm_batches(1), stacks=["decoder"])


def test_the_baseline_is_registered_and_builds_pruned_students(g2p_task, tmp_path):
    from mtlab.baselines import BaselineBudget, baselines, build_baselines
    from mtlab.train import TrainConfig

    assert "block_influence" in baselines()
    teacher = _teacher(g2p_task)
    _make_identity(A.anatomy(teacher).stack("encoder").layer(3))
    budget = BaselineBudget(TrainConfig(steps=2, batch_size=8, log_every=1, ckpt_every=2), depths=(3, 2),
                            run_dir=lambda name, key: tmp_path / name / str(sorted(key.items())), progress=False)
    rows = build_baselines(teacher, g2p_task, budget, ["block_influence"])
    assert [(r.method, r.strategy) for r in rows] == [("block_influence", "bi")] * 2
    assert [r.budget.steps for r in rows] == [2, 2]
    three, two = rows
    assert three.info["dropped"].startswith("encoder:3 decoder:")  # the identity block goes first
    assert three.label.startswith("e=0,1,2 ")
    for row, depth in ((three, 3), (two, 2)):
        m = row.model
        assert m.config.num_layers == depth and m.config.num_decoder_layers == depth
        assert len(m.encoder.block) == depth and len(m.decoder.block) == depth
        b = g2p_task.collate("dev", [0, 1])
        with torch.no_grad():
            out = m.generate(b.input_ids, attention_mask=b.attention_mask, max_new_tokens=4, do_sample=False)
        assert out.shape[0] == 2
    assert len(teacher.encoder.block) == 4  # the teacher is untouched
