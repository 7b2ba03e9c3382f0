"""Baselines: layer choice rules, distillation loss, layer dropping, SFT, LayerDrop (resume, pruning)."""
import copy

import pytest
import torch

from mtlab.baselines import (keep_alternate, keep_bottom, keep_for_depth, keep_layers, keep_only, layer_drop,
                             layerdrop_finetune, layerdrop_prune, shrink_and_finetune, transient_keep)
from mtlab.distill import DistillConfig, distill_loss
from mtlab.modular import Plan
from mtlab.train import RunMismatchError, TrainConfig, cross_entropy_loss


def cfg(**kw):
    base = dict(steps=4, batch_size=32, lr=3e-3, warmup=2, log_every=2, ckpt_every=2)
    return TrainConfig(**{**base, **kw})


@pytest.fixture
def teacher6(g2p_task):
    from mtlab.teacher import TeacherConfig, build_teacher

    torch.manual_seed(0)
    return build_teacher(g2p_task.tokenizer, TeacherConfig(d_model=16, d_ff=32, num_heads=2, num_layers=6,
                                                           num_decoder_layers=6, dropout=0.1)).eval()


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).logits


def test_layer_choice_rules():
    assert keep_bottom(3, 6) == keep_layers("top", 3, 6) == [0, 1, 2]
    assert keep_alternate(3, 6) == [0, 2, 4] and keep_alternate(4, 6) == [0, 1, 2, 4] and keep_alternate(2, 6) == [0, 4]
    # SFT / "spread": floor(i*(n-1)/(d-1)): 6 -> 3 is [0, 2, 5] (DistilBART's table for 6-layer teachers)
    assert keep_for_depth(3, 6) == [0, 2, 5] and keep_for_depth(4, 6) == [0, 1, 3, 5] and keep_for_depth(2, 6) == [0, 5]
    assert keep_for_depth(1, 6) == [0] and keep_for_depth(6, 6) == list(range(6))
    for n in range(2, 13):
        for d in range(2, n + 1):
            k = keep_for_depth(d, n)
            assert len(k) == d and k[0] == 0 and k[-1] == n - 1 and k == sorted(set(k))
            a = keep_alternate(d, n)
            assert len(a) == d and a[0] == 0 and a == sorted(set(a))
    for bad in (0, 7):
        with pytest.raises(ValueError, match="1 <= depth <= 6"):
            keep_for_depth(bad, 6)


def test_distill_loss_teacher_against_itself_has_zero_kd(g2p_task, teacher6):
    batch = g2p_task.collate("dev", list(range(16)))
    loss_fn = distill_loss(teacher6, DistillConfig(temperature=2.0))
    for student in (teacher6, copy.deepcopy(teacher6)):
        loss, parts = loss_fn(student, batch, 0)
        assert abs(parts["kd"]) < 1e-6
        assert parts["ce"] == pytest.approx(cross_entropy_loss()(student, batch, 0)[1]["ce"], rel=1e-5)
    other = keep_only(teacher6, {"decoder": 3}).train()
    before = weights(teacher6)
    loss, parts = loss_fn(other, batch, 0)
    loss.backward()
    assert parts["kd"] > 1e-3 and all(p.grad is None for p in teacher6.parameters())
    assert same(before, weights(teacher6)) and not teacher6.training
    with pytest.raises(ValueError, match="temperature"):
        DistillConfig(temperature=0)


def test_layer_drop_top_alternate_and_sft(g2p_task, teacher6, tmp_path):
    before = weights(teacher6)
    # the student starts as exactly the kept teacher layers
    init = keep_only(teacher6, {"encoder": [0, 1, 2, 3], "decoder": [0, 1, 2]})
    q = lambda m, i: m.decoder.block[i].layer[0].SelfAttention.q.weight  # noqa: E731
    assert torch.equal(q(init, 2), q(teacher6, 2))

    student, log = layer_drop(teacher6, g2p_task, "top", cfg(), DistillConfig(), tmp_path / "top",
                              depths={"encoder": 4, "decoder": 3}, progress=False)
    c = log.attrs["config"]
    assert c["keep"] == {"encoder": [0, 1, 2, 3], "decoder": [0, 1, 2]}
    assert (student.config.num_layers, student.config.num_decoder_layers) == (4, 3)
    assert (len(student.encoder.block), len(student.decoder.block)) == (4, 3)
    assert type(student) is type(teacher6) and not same(weights(student), weights(init))
    assert c["train_runs"] == 1 and c["steps"] == c["steps_done"] == 4 and c["batch_size"] == 32
    assert c["train_seconds"] > 0 and c["complete"] and log.step.tolist() == [2, 4]
    assert {"ce", "kd"} <= set(log.columns)
    assert same(before, weights(teacher6))
    assert g2p_task.evaluate(student, "dev", limit=8, progress=False)["n"] == 8
    # plain HF model: save_pretrained / from_pretrained round trip (the finished run saved it)
    reloaded = type(teacher6).from_pretrained(tmp_path / "top" / "student")
    batch = g2p_task.collate("dev", list(range(8)))
    assert torch.allclose(logits(student, batch), logits(reloaded, batch), atol=1e-6)

    _, log = layer_drop(teacher6, g2p_task, "alternate", cfg(steps=2), None, tmp_path / "alt",
                        depths={"encoder": 3, "decoder": 3}, progress=False)
    assert log.attrs["config"]["keep"] == {"encoder": [0, 2, 4], "decoder": [0, 2, 4]}

    sft, log = shrink_and_finetune(teacher6, g2p_task, {"decoder": 3}, cfg(steps=2), None, tmp_path / "sft",
                                   progress=False)
    c = log.attrs["config"]
    assert c["method"] == "sft" and c["keep"] == {"encoder": list(range(6)), "decoder": [0, 2, 5]}
    assert (sft.config.num_layers, sft.config.num_decoder_layers) == (6, 3) and c["train_runs"] == 1
    # a finished run is not retrained: the same call returns the saved result at once
    again, log2 = shrink_and_finetune(teacher6, g2p_task, {"decoder": 3}, cfg(steps=2), None, tmp_path / "sft",
                                      progress=False)
    assert same(weights(sft), weights(again)) and log2.step.tolist() == log.step.tolist()
    with pytest.raises(RunMismatchError,
                       match=r"(?s)another baseline run.*keep\.decoder.*rule: checkpoint 'spread', now 'top'"):
        layer_drop(teacher6, g2p_task, "top", cfg(steps=2), None, tmp_path / "sft", depths={"decoder": 3},
                   progress=False)


def test_bad_inputs_name_the_fix(g2p_task, teacher6, tmp_path):
    def ld(keep, **kw):
        return layer_drop(teacher6, g2p_task, keep, cfg(), None, tmp_path / "x", progress=False, **kw)

    with pytest.raises(ValueError, match="1 <= depth <= 6"):
        ld("top", depths={"decoder": 0})
    with pytest.raises(ValueError, match="1 <= depth <= 6"):
        shrink_and_finetune(teacher6, g2p_task, {"encoder": 7}, cfg(), None, tmp_path / "x", progress=False)
    with pytest.raises(ValueError, match="unknown stack.*'encoder', 'decoder'"):
        ld("top", depths={"middle": 2})
    with pytest.raises(ValueError, match="unknown layer rule 'bottom'"):
        ld("bottom", depths={"decoder": 2})
    with pytest.raises(ValueError, match="needs target depths"):
        ld("alternate")
    with pytest.raises(ValueError, match="out of range"):
        ld({"decoder": [0, 6]})
    with pytest.raises(ValueError, match="keep at least one"):
        ld({"decoder": []})
    for p in (1.0, -0.1):
        with pytest.raises(ValueError, match=r"must be in \[0, 1\)"):
            layerdrop_finetune(teacher6, g2p_task, cfg(), None, tmp_path / "x", p=p, progress=False)
    with pytest.raises(ValueError, match="1 <= depth <= 6"):
        layerdrop_prune(teacher6, {"decoder": 0})
    assert not (tmp_path / "x").exists()  # validated before anything is written


def test_layerdrop_is_resumable_and_prunes_to_any_depth(g2p_task, teacher6, tmp_path):
    before = weights(teacher6)
    c = cfg(steps=6)
    straight, log = layerdrop_finetune(teacher6, g2p_task, c, DistillConfig(), tmp_path / "a", p=0.3, progress=False)
    assert log.attrs["config"]["train_runs"] == 1 and log.attrs["config"]["steps"] == 6
    assert log.attrs["config"]["p"] == 0.3 and log.layers_skipped.sum() > 0
    # max_seconds=0 stops after every step (with a checkpoint); each call resumes where the last stopped
    for _ in range(10):
        resumed, log_b = layerdrop_finetune(teacher6, g2p_task, c, DistillConfig(), tmp_path / "b", p=0.3,
                                            max_seconds=0, progress=False)
        if log_b.attrs["config"]["complete"]:
            break
    assert log_b.attrs["config"]["steps_done"] == 6 and log_b.step.tolist() == [2, 4, 6]
    assert same(weights(straight), weights(resumed))
    assert same(before, weights(teacher6)) and not same(before, weights(straight))
    assert len(straight.encoder.block) == 6 and straight.config.num_decoder_layers == 6

    batch = g2p_task.collate("dev", list(range(8)))
    every = layerdrop_prune(straight, "every_other")
    assert [len(every.encoder.block), len(every.decoder.block)] == [3, 3] and every.config.num_layers == 3
    plan = Plan.parse("e=111111 d=33")  # a modular plan with a 2-block decoder -> layers [0, 5]
    by_plan = layerdrop_prune(straight, plan)
    assert by_plan.config.num_decoder_layers == 2 and by_plan.config.num_layers == 6
    assert torch.equal(by_plan.decoder.block[1].layer[0].SelfAttention.q.weight,
                       straight.decoder.block[5].layer[0].SelfAttention.q.weight)
    assert layerdrop_prune(straight, {"decoder": 4}).config.num_decoder_layers == 4
    # block 0 dropped: the new first block owns the relative position bias; generate works; the pruned
    # model computes exactly what training ran when it skipped the same layers (transient install)
    odd = {"encoder": [1, 3, 5], "decoder": [1, 3, 5]}
    pruned = layerdrop_prune(straight, odd)
    assert pruned.encoder.block[0].layer[0].SelfAttention.has_relative_attention_bias
    assert pruned.decoder.block[0].layer[0].SelfAttention.has_relative_attention_bias
    with transient_keep(straight, odd):
        during = logits(straight, batch)
    assert torch.allclose(logits(pruned, batch), during, atol=1e-6)
    assert not hasattr(straight.encoder.block[1].layer[0].SelfAttention, "relative_attention_bias")
    assert len(straight.encoder.block) == 6 and same(weights(straight), weights(resumed))
    for m in (every, by_plan, pruned):
        assert type(m) is type(teacher6)
        assert g2p_task.evaluate(m, "dev", limit=8, progress=False)["n"] == 8
    pruned.save_pretrained(tmp_path / "pruned")
    reloaded = type(teacher6).from_pretrained(tmp_path / "pruned")
    assert torch.allclose(logits(pruned, batch), logits(reloaded, batch), atol=1e-6)
