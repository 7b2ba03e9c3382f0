"""Modular Transformers: plans, bank, assembly invariants, export, replacing training."""
import pytest
import torch

from mtlab.modular import ModuleBank, Plan, PlanError, ReplacingConfig, assemble, enumerate_plans, size_first, speed_first, train_modules
from mtlab.modular.replacing import sample_tiling
from mtlab.train import TrainConfig

DEPTHS = {"encoder": 6, "decoder": 6}
KS = {"encoder": (2, 3, 6), "decoder": (2, 3, 6)}


@pytest.fixture
def teacher6(g2p_task):
    from mtlab.teacher import TeacherConfig, build_teacher

    torch.manual_seed(0)
    return build_teacher(g2p_task.tokenizer, TeacherConfig(d_model=16, d_ff=32, num_heads=2, num_layers=6,
                                                           num_decoder_layers=6, dropout=0.0)).eval()


def outputs(model, batch):
    with torch.no_grad():
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).logits


def test_plan_text_round_trip_and_validation():
    p = Plan.parse("e=1,1,2,2 d=33")
    assert str(p) == "e=1122 d=33" and Plan.parse(str(p)) == p
    p.validate(DEPTHS, KS)
    assert p.modules_used() == [("encoder", 2, 1), ("encoder", 2, 2), ("decoder", 3, 0), ("decoder", 3, 1)]
    with pytest.raises(PlanError, match="gap"):
        Plan.parse("e=1,1,2 d=6").validate(DEPTHS, KS)
    with pytest.raises(PlanError, match="run.* past the top|cover 7 layers"):
        Plan.parse("e=1,2,2,2 d=6").validate(DEPTHS, KS)
    with pytest.raises(PlanError, match="misaligned"):
        Plan.parse("e=1,2,1,2 d=6").validate(DEPTHS, KS)
    with pytest.raises(PlanError, match="no trained module of granularity 4"):
        Plan.parse("e=4,1,1 d=6").validate(DEPTHS, KS)
    with pytest.raises(PlanError, match="leaves stack 'decoder' out"):
        Plan.parse("e=6").validate(DEPTHS, KS)
    with pytest.raises(PlanError, match="unknown stack"):
        Plan.parse("x=6")
    for spans in ((12,), (6, 12), (1, 1, 10)):  # a span of 10+ layers reads back as itself, never as digits
        q = Plan.of({"encoder": spans, "decoder": (1,)})
        assert Plan.parse(str(q)) == q, str(q)
    with pytest.raises(PlanError, match="overlaps"):
        Plan.from_ranges({"encoder": [(0, 2), (1, 3), (3, 6)]}, DEPTHS)
    with pytest.raises(PlanError, match="gap: layers 2-2"):
        Plan.from_ranges({"encoder": [(0, 2), (3, 6)]}, DEPTHS)


def test_space_and_ladders():
    space = enumerate_plans(DEPTHS, KS)
    assert len(space) == 14 * 14 and len(set(space)) == len(space)
    for p in space:
        p.validate(DEPTHS, KS)
    speed = speed_first(DEPTHS, KS)
    assert [p.depth("decoder") for p in speed[:5]] == [5, 4, 3, 2, 1] and all(p.depth("encoder") == 6 for p in speed[:5])
    assert str(speed[-1]) == "e=6 d=6"
    size = size_first(DEPTHS, KS, {"encoder": 100, "decoder": 130})
    blocks = [p.depth("encoder") + p.depth("decoder") for p in size]
    assert blocks == sorted(blocks, reverse=True) and str(size[-1]) == "e=6 d=6"


def test_sampled_tilings_are_valid_and_follow_p():
    import random

    rng = random.Random(0)
    for p in (0.0, 0.5, 1.0):
        for _ in range(50):
            t = sample_tiling(6, (2, 3, 6), p, rng)
            Plan.of({"encoder": t, "decoder": (1,) * 6}).validate(DEPTHS, KS)
            if p == 0.0:
                assert t == (1,) * 6
            if p == 1.0:
                assert 1 not in t[:1]


def test_full_plan_equals_teacher_exactly_and_modules_assemble(g2p_task, teacher6):
    bank = ModuleBank.build(teacher6, (2, 3, 6))
    batch = g2p_task.collate("dev", list(range(8)))
    same = assemble(teacher6, bank, Plan.teacher(DEPTHS))
    assert torch.equal(outputs(same, batch), outputs(teacher6, batch))
    small = assemble(teacher6, bank, "e=6 d=2,2,2")
    assert len(small.encoder.block) == 1 and len(small.decoder.block) == 3
    assert small.config.num_layers == 1 and small.config.num_decoder_layers == 3
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in teacher6.parameters())
    # the first block of every assembly owns T5's relative position bias
    assert small.encoder.block[0].layer[0].SelfAttention.has_relative_attention_bias
    assert small.decoder.block[0].layer[0].SelfAttention.has_relative_attention_bias
    assert outputs(small, batch).shape == outputs(teacher6, batch).shape


def test_exported_assembly_reloads_without_mtlab(g2p_task, teacher6, tmp_path):
    from transformers import AutoModelForSeq2SeqLM

    bank = ModuleBank.build(teacher6, (2, 3, 6), init="last")
    model = assemble(teacher6, bank, "e=1,1,2,2 d=3,3")
    model.save_pretrained(tmp_path)
    again = AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval()
    batch = g2p_task.collate("dev", list(range(8)))
    assert torch.equal(outputs(again, batch), outputs(model, batch))
    gen = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(again.generate(**gen), model.generate(**gen))


def test_bank_save_load_and_wrong_teacher(teacher6, tmp_path, g2p_task):
    from mtlab.checkpoint import CheckpointError
    from mtlab.teacher import TeacherConfig, build_teacher

    bank = ModuleBank.build(teacher6, (2, 3))
    with torch.no_grad():
        next(bank.parameters()).add_(1.0)
    bank.save(tmp_path / "bank")
    again = ModuleBank.load(tmp_path / "bank", teacher6)
    assert all(torch.equal(a, b) for a, b in zip(bank.state_dict().values(), again.state_dict().values()))
    other = build_teacher(g2p_task.tokenizer, TeacherConfig(d_model=16, d_ff=32, num_heads=2, num_layers=4, num_decoder_layers=4))
    with pytest.raises(CheckpointError, match="another teacher"):
        ModuleBank.load(tmp_path / "bank", other)


def test_replacing_trains_only_modules_and_brings_assemblies_closer_to_the_teacher(g2p_task, teacher6, tmp_path):
    import torch.nn.functional as F

    batch = g2p_task.collate("dev", list(range(32)))
    target = F.log_softmax(outputs(teacher6, batch), -1)

    def gap(bank):  # KL(teacher || uniform-k2 assembly) on a fixed dev batch
        got = F.log_softmax(outputs(assemble(teacher6, bank, "e=222 d=222"), batch), -1)
        return F.kl_div(got, target, log_target=True, reduction="batchmean").item()

    before = {k: v.clone() for k, v in teacher6.state_dict().items()}
    untrained = gap(ModuleBank.build(teacher6, (2, 3, 6)))
    cfg = ReplacingConfig(granularities=(2, 3, 6), p_start=1.0, train=TrainConfig(
        steps=24, batch_size=32, lr=3e-3, warmup=2, log_every=8, ckpt_every=24, precision="no"))
    bank, log = train_modules(teacher6, g2p_task, cfg, tmp_path, progress=False)
    after = teacher6.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # teacher frozen and restored
    assert {"ce", "kd", "hidden_mse", "local_mse", "p"} <= set(log.columns)
    assert log.attrs["config"]["granularities"] == (2, 3, 6)
    assert gap(bank) < untrained
    assert (tmp_path / "bank" / "modules.safetensors").exists()
    assert ModuleBank.load(tmp_path / "bank", teacher6).state_dict().keys() == bank.state_dict().keys()


@pytest.fixture
def bart4(g2p_task):
    import transformers as T

    torch.manual_seed(0)
    n = len(g2p_task.tokenizer)
    return T.BartForConditionalGeneration(T.BartConfig(
        d_model=16, encoder_layers=4, decoder_layers=4, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=32, decoder_ffn_dim=32, vocab_size=n, max_position_embeddings=64, dropout=0.0,
        pad_token_id=0, bos_token_id=1, eos_token_id=1, decoder_start_token_id=0, forced_eos_token_id=None,
        init_std=0.3)).eval()  # large weights: every layer matters, so a span cannot be skipped for free


def test_bart_teacher_modules_assemble_export_and_train(g2p_task, bart4, tmp_path):
    """The same code serves a BART-family teacher through the registry."""
    import torch.nn.functional as F
    from transformers import AutoModelForSeq2SeqLM

    batch = g2p_task.collate("dev", list(range(16)))
    bank = ModuleBank.build(bart4, (2, 4))
    assert torch.equal(outputs(assemble(bart4, bank, "e=1111 d=1111"), batch), outputs(bart4, batch))
    small = assemble(bart4, bank, "e=22 d=4")
    assert len(small.model.encoder.layers) == 2 and len(small.model.decoder.layers) == 1
    small.save_pretrained(tmp_path / "export")
    again = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "export").eval()
    assert torch.equal(outputs(again, batch), outputs(small, batch))

    target = F.log_softmax(outputs(bart4, batch), -1)

    def gap(b):
        got = F.log_softmax(outputs(assemble(bart4, b, "e=22 d=22"), batch), -1)
        return F.kl_div(got, target, log_target=True, reduction="batchmean").item()

    cfg = ReplacingConfig(granularities=(2, 4), p_start=1.0, train=TrainConfig(
        steps=24, batch_size=32, lr=3e-3, warmup=2, log_every=8, ckpt_every=24, precision="no"))
    untrained = gap(bank)
    trained, log = train_modules(bart4, g2p_task, cfg, tmp_path / "run", progress=False)
    assert gap(trained) < untrained


def test_plans_refuse_gaps_overlaps_misalignment_and_untrained_modules(teacher6):
    bank = ModuleBank.build(teacher6, (2, 3))
    for text, why in [("e=11111 d=111111", "gap"), ("e=1111111 d=111111", "past the top"),
                      ("e=1221 d=111111", "misaligned"), ("e=6 d=111111", "no trained module"),
                      ("x=111111", "unknown stack")]:
        with pytest.raises(PlanError, match=why):
            assemble(teacher6, bank, text)
    with pytest.raises(PlanError, match="overlaps"):
        Plan.from_ranges({"encoder": [(0, 2), (1, 3), (3, 6)]}, DEPTHS)


def test_attention_distillation_is_optional_and_finite(g2p_task, teacher6, tmp_path):
    cfg = ReplacingConfig(granularities=(2, 3), p_start=1.0, w_attn=1.0, train=TrainConfig(
        steps=4, batch_size=16, lr=1e-3, warmup=1, log_every=2, ckpt_every=4, precision="no"))
    _, log = train_modules(teacher6, g2p_task, cfg, tmp_path, progress=False)
    assert "attn_kl" in log and (log.attn_kl >= 0).all() and log.attn_kl.notna().all()


def test_plan_table_reports_ratios_and_measures_on_request(g2p_task, teacher6):
    from mtlab.modular import plan_table

    bank = ModuleBank.build(teacher6, (2, 3, 6))
    df = plan_table(teacher6, bank, ["e=111111 d=111111", "e=222 d=33", "e=6 d=6"], g2p_task, measure=True,
                    batch_sizes=(1, 4), min_run_time=0.01)
    assert df.ratio.tolist()[0] == 1 and df.ratio.tolist()[2] == pytest.approx(6)
    assert df.ideal_speedup.is_monotonic_increasing and df.speedup_b1.notna().all() and df.speedup_b4.notna().all()
    with pytest.raises(PlanError, match="misaligned"):
        plan_table(teacher6, bank, ["e=1221 d=111111"], g2p_task)


def test_local_loss_is_zero_for_a_module_that_reproduces_its_span(g2p_task, teacher6):
    """A 1-layer 'span' check of the plumbing: a k=2 module holding the weights of layer 0 and fed
    layer 0's exact input reproduces layer 0's output, so regressing layer 1's output is the only error."""
    import copy

    from mtlab.modular.replacing import Replacer, local_loss, _capture

    bank = ModuleBank.build(teacher6, (2,))
    rep = Replacer(teacher6, bank)
    batch = g2p_task.collate("dev", list(range(8)))
    masks = {"encoder": batch.attention_mask.bool(), "decoder": batch.labels != -100}
    t_hidden = {s: [None] * 6 for s in ("encoder", "decoder")}
    span_inputs = {}
    hooks = [h for s in t_hidden for h in _capture(rep.originals[s], t_hidden[s])]
    hooks += [rep.originals[s][i].register_forward_pre_hook(
        lambda m, a, kw, key=(s, i): span_inputs.__setitem__(key, (a, kw)), with_kwargs=True)
        for s in t_hidden for i in (0, 2, 4)]
    with torch.no_grad():
        teacher6(**batch.model_inputs(), use_cache=False)  # as in replacing_loss
    for h in hooks:
        h.remove()
    # make every module's target its own first layer's output: then the local loss is exactly 0
    for s in t_hidden:
        for j in range(3):
            t_hidden[s][2 * j + 1] = t_hidden[s][2 * j]
            bank.blocks[f"{s}_k2_j{j}"].load_state_dict(copy.deepcopy(rep.originals[s][2 * j].state_dict()))
    bank.eval()
    assert local_loss(rep, span_inputs, t_hidden, masks).item() < 1e-10


def _planted_screen(seed=0):
    import random

    import pandas as pd

    from mtlab.modular.plan import enumerate_plans

    rng = random.Random(seed)
    plans = enumerate_plans({"encoder": 6, "decoder": 6}, {"encoder": (2, 3, 6), "decoder": (2, 3, 6)})
    df = pd.DataFrame({"plan": [str(p) for p in plans], "tf_word_acc": [rng.random() for _ in plans]})
    df.attrs["config"] = {"split": "dev"}
    return df


def test_screened_strategy_picks_the_best_scored_plan_within_each_size_budget():
    from mtlab.modular.plan import DEFAULT_TARGETS, screened, stack_ratio

    depths, grans, bp = {"encoder": 6, "decoder": 6}, {"encoder": (2, 3, 6), "decoder": (2, 3, 6)}, \
        {"encoder": 100, "decoder": 150}
    df = _planted_screen()
    ratio = {p: stack_ratio(dict(Plan.parse(p).spans), bp) for p in df.plan}
    # plant: the best score of all sits on a plan just ABOVE the 2x budget (ratio < 2): never picked at 2x
    over = max((p for p in df.plan if ratio[p] < 2.0), key=lambda p: ratio[p])
    df.loc[df.plan == over, "tf_word_acc"] = 2.0
    picks = screened(df)(depths, grans, bp)
    for t in DEFAULT_TARGETS:
        ok = df[[ratio[p] >= t - 1e-9 for p in df.plan]]
        best = ok.sort_values("tf_word_acc", ascending=False).plan.iloc[0]
        assert Plan.parse(best) in picks  # the best-scoring plan under the budget
        assert ratio[best] >= t - 1e-9
    for t in DEFAULT_TARGETS:  # one target at a time: exactly the best plan within the budget, never above it
        (pick,) = screened(df, targets=(t,))(depths, grans, bp)
        assert stack_ratio(dict(pick.spans), bp) >= t - 1e-9
        assert str(pick) == df[[ratio[p] >= t - 1e-9 for p in df.plan]].sort_values("tf_word_acc").plan.iloc[-1]
    assert screened(df, targets=(2.0,))(depths, grans, bp) != [Plan.parse(over)]
    assert screened(df, targets=(ratio[over],))(depths, grans, bp) == [Plan.parse(over)]
    # lower-is-better metrics (nll) pick the minimum
    nll = df.rename(columns={"tf_word_acc": "nll"})
    assert screened(nll, "nll")(depths, grans, bp)[0] == Plan.parse(
        nll[[ratio[p] >= 1.1 for p in nll.plan]].sort_values("nll").plan.iloc[0])
    # ties on the metric go to the better NLL, then to the smaller plan
    tied = df.assign(tf_word_acc=0.5, nll=[float(i) for i in range(len(df))])
    (pick,) = screened(tied, targets=(2.0,))(depths, grans, bp)
    assert str(pick) == tied[[ratio[p] >= 2.0 - 1e-9 for p in tied.plan]].sort_values("nll").plan.iloc[0]
    (pick,) = screened(tied, targets=(2.0,), then=None)(depths, grans, bp)
    assert stack_ratio(dict(pick.spans), bp) == max(ratio.values())


def test_screened_strategy_on_an_8_layer_lm_prefers_the_better_plan_at_2x():
    import pandas as pd

    from mtlab.modular.plan import screened

    df = pd.DataFrame({"plan": ["layers=2222", "layers=1124", "layers=11111111"], "nll": [6.4, 4.85, 4.0]})
    picks = screened(df, "nll")({"layers": 8}, {"layers": (2, 4)}, {"layers": 10}, )
    assert Plan.parse("layers=1124") in picks and Plan.parse("layers=11111111") not in picks


def test_screened_strategy_registers_refuses_test_scores_and_foreign_plans():
    import pandas as pd

    from mtlab.modular.plan import ladders, screened, strategies, using_screen

    depths, grans, bp = {"encoder": 6, "decoder": 6}, {"encoder": (2, 3, 6), "decoder": (2, 3, 6)}, \
        {"encoder": 100, "decoder": 150}
    df = _planted_screen()
    with using_screen(df) as name:
        assert name == "screened" and "screened" in strategies()
        got = [p for s, p in ladders(depths, grans, bp, names=["screened"]) if s == "screened"]
        assert got == screened(df)(depths, grans, bp)
    assert "screened" not in strategies()  # gone after the block: the card's ladders are unchanged
    test = df.copy()
    test.attrs["config"] = {"split": "test"}
    with pytest.raises(ValueError, match="held out"):
        screened(test)
    with pytest.raises(ValueError, match="held out"):
        screened(df.rename(columns={"tf_word_acc": "test_wer"}), "test_wer")
    with pytest.raises(ValueError, match="higher_is_better"):
        screened(df.rename(columns={"tf_word_acc": "score"}), "score")
    with pytest.raises(ValueError, match="lack the column"):
        screened(df, "dev_wer")
    with pytest.raises(PlanError, match="assembly space"):
        screened(pd.DataFrame({"plan": ["e=44 d=222"], "nll": [1.0]}), "nll")(depths, grans, bp)
