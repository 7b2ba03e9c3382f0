"""Every registry where users extend mtlab: an entry registered in the test with ONE decorated
function is listed and usable where the registry is consumed, and is removed afterwards."""
from __future__ import annotations

import pytest
import torch
import transformers as T

from mtlab import anatomy as A
from mtlab.merging.align import permuted_weights
from mtlab.merging.merge import MergeSpec, merge_ffs
from mtlab.merging.methods import merge_method, merge_methods, unregister_merge_method
from mtlab.merging.windows import window_search

torch.set_num_threads(1)


def _bert(layers=3):
    torch.manual_seed(0)
    return T.BertModel(T.BertConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                                    num_attention_heads=2, vocab_size=40, max_position_embeddings=16)).eval()


def test_a_registered_merge_method_is_listed_validated_merged_and_searched():
    @merge_method("reverse")
    def reverse(ffs, anchor, correlations):  # align every other layer by reversing its neurons
        return {i: torch.arange(32).flip(0) for i in ffs if i != anchor}

    try:
        assert merge_methods()[-1] == "reverse" and {"permute", "vanilla"} <= set(merge_methods())
        model = _bert()
        ffs = {i: A.anatomy(model).stack("layers").layer(i).ff for i in (0, 1)}
        want = (permuted_weights(ffs[0])["w_in"][0] + permuted_weights(ffs[1], torch.arange(32).flip(0))["w_in"][0]) / 2
        merge_ffs(model, ["layers:0-1/reverse"])  # no correlations needed
        assert torch.allclose(A.weight_oi(ffs[1].w_in), want) and ffs[0].w_in.weight is ffs[1].w_in.weight
        assert str(MergeSpec.parse("layers:1-2@last/reverse")) == "layers:1-2@last/reverse"
        g = torch.Generator().manual_seed(0)
        data = [{"input_ids": torch.randint(0, 40, (4, 8), generator=g)}]
        df = window_search(_bert(), score_fn=lambda m: {"one": 1.0}, higher_is_better=True, sizes=[2],
                           align_batches=lambda: data, align_tokens=50, progress=False)
        assert set(df.method) == {"none", "permute", "vanilla", "reverse", "prune"}
    finally:
        unregister_merge_method("reverse")
    assert "reverse" not in merge_methods()
    with pytest.raises(ValueError, match="unknown method 'reverse'"):
        MergeSpec.parse("layers:0-1/reverse").validate(_bert())


def test_a_registered_assembly_strategy_is_listed_and_laddered():
    from mtlab.modular import Plan, assembly_strategy, ladders, size_first, strategies, unregister_strategy

    depths, ks, bparams = {"encoder": 6, "decoder": 6}, {"encoder": (2, 3), "decoder": (2, 3)}, {"encoder": 1, "decoder": 1}

    @assembly_strategy("decoder_only")
    def decoder_only(depths, granularities, block_params):  # every decoder tiling by one module size
        return [Plan.of({"encoder": (1,) * depths["encoder"], "decoder": (k,) * (depths["decoder"] // k)})
                for k in granularities["decoder"]]

    try:
        assert strategies() == ("size_first", "speed_first", "decoder_only")
        got = ladders(depths, ks, bparams)
        assert got[0] == ("teacher", Plan.teacher(depths))
        assert [p for s, p in got if s == "size_first"] == size_first(depths, ks, bparams)
        assert [str(p) for s, p in got if s == "decoder_only"] == ["e=111111 d=222", "e=111111 d=33"]
        assert [s for s, _ in ladders(depths, ks, bparams, ["decoder_only"])] == ["teacher", "decoder_only", "decoder_only"]
    finally:
        unregister_strategy("decoder_only")
    assert strategies() == ("size_first", "speed_first")
    with pytest.raises(ValueError, match="unknown assembly strategy"):
        ladders(depths, ks, bparams, ["decoder_only"])


def test_a_registered_baseline_is_listed_and_built(g2p_task, tmp_path):
    from mtlab.baselines import (BaselineBudget, baseline, baselines, build_baselines, keep_only,
                                 unregister_baseline)
    from mtlab.candidate import Budget, Candidate
    from mtlab.teacher import TeacherConfig, build_teacher
    from mtlab.train import TrainConfig

    torch.manual_seed(0)
    teacher = build_teacher(g2p_task.tokenizer, TeacherConfig(d_model=16, d_ff=32, num_heads=2, num_layers=4,
                                                              num_decoder_layers=4)).eval()
    budget = BaselineBudget(TrainConfig(steps=2, batch_size=8, log_every=1, ckpt_every=2), depths=(2,),
                            run_dir=lambda name, key: tmp_path / name / str(sorted(key.items())), progress=False)

    @baseline("bottom_only")
    def bottom_only(teacher, task, budget):  # no training: keep the bottom layers of every stack
        return [Candidate("bottom_only", f"{d} per stack", keep_only(teacher, {s: list(range(d)) for s in
                                                                         ("encoder", "decoder")}), "top", Budget())
                for d in budget.depths]

    try:
        assert baselines() == ("layer_drop", "sft", "layerdrop", "block_influence", "bottom_only")
        (row,) = build_baselines(teacher, g2p_task, budget, ["bottom_only"])
        assert row.model.config.num_layers == 2 and len(teacher.encoder.block) == 4
        rows = build_baselines(teacher, g2p_task, budget)  # the built-in recipes, trained 2 steps each
        assert [(r.method, r.strategy) for r in rows] == [
            ("layer_drop", "alternate"), ("sft", "spread"), ("layerdrop", "every_other"), ("block_influence", "bi"),
            ("bottom_only", "top")]
        assert rows[0].label == "e=0,2 d=0,2" and rows[1].label == "e=0,3 d=0,3"
        assert [r.budget.steps for r in rows[:3]] == [2, 2, 2]
    finally:
        unregister_baseline("bottom_only")
    assert "bottom_only" not in baselines()
    with pytest.raises(ValueError, match="unknown baseline"):
        build_baselines(teacher, g2p_task, budget, ["bottom_only"])


def test_a_registered_merge_method_is_offered_by_the_merge_explorer():
    import numpy as np
    import pandas as pd

    from mtlab.ui.merge import MergeExplorer

    @merge_method("reverse")
    def reverse(ffs, anchor, correlations):
        return {i: torch.arange(32).flip(0) for i in ffs if i != anchor}

    try:
        depths = {"encoder": 4}
        sim = {"encoder": pd.DataFrame(np.eye(4))}
        m = MergeExplorer(sim, depths, lambda specs: {"params": 1, "dev_per": 1.0, "n": 1}, params=lambda specs: 1)
        c = m.controls["encoder"]
        assert "reverse" in c["method"].options and "permute" in c["method"].options
        c["on"].value = True
        c["method"].value = "reverse"   # aligns nothing to an anchor (needs_correlations=False): anchor off
        assert c["anchor"].disabled
        c["method"].value = "permute"
        assert not c["anchor"].disabled
    finally:
        unregister_merge_method("reverse")


def test_a_registered_task_metric_scores_pairs_tasks_and_recipes(tmp_path):
    from mtlab.recipe import TaskSpec
    from mtlab.tasks.metrics import get_metric, task_metric, task_metrics, unregister_metric
    from mtlab.tasks.pairs import PairsTask

    class Tok:  # the least a PairsTask needs of a tokenizer
        pad_token_id, eos_token_id, vocab_size = 0, 1, 10

        def __call__(self, *a, **k):
            raise NotImplementedError

        def decode(self, ids, **k):
            return ""

    @task_metric("exact", ("exact",), "exact", higher_is_better=True)
    def exact(hyps, refs):
        return {"exact": 100.0 * sum(h == r for h, r in zip(hyps, refs)) / len(refs)}

    try:
        assert task_metrics()[:3] == ("bleu", "rouge", "per_wer") and "exact" in task_metrics()
        task = PairsTask({"train": (["a"], ["b"]), "dev": (["a"], ["b"]), "test": (["a"], ["b"])}, Tok(), metric="exact")
        assert task.primary_metric == "exact" and task.higher_is_better
        assert task.score(["x y", "z"], ["x y", "w"]) == {"exact": 50.0}
        assert TaskSpec(kind="pairs", path=tmp_path / "p.tsv", metric="Exact").metric == "exact"
    finally:
        unregister_metric("exact")
    with pytest.raises(ValueError, match="unknown metric 'exact'.*task_metric"):
        get_metric("exact")
    assert get_metric("per_wer")(["K AE1 T"], ["K AE1 T"]) == {"per": 0.0, "wer": 0.0}


def test_a_registered_strategy_is_an_option_of_the_assembly_explorer():
    """A strategy registered in one function is offered by the assembly explorer, which picks its plan;
    "uniform" (the explorer's old hard-coded option) is registered, out of the default ladders."""
    import pandas as pd

    from mtlab.explore.space import AssemblySpace
    from mtlab.modular import STRATEGIES, Plan, assembly_strategy, ladders, strategies, unregister_strategy, uniform
    from mtlab.ui.assembly import strategy_options
    from mtlab.widgets import AssemblyExplorer

    depths, ks, bp = {"encoder": 6, "decoder": 6}, {"encoder": (2, 3, 6), "decoder": (2, 3)}, {"encoder": 100, "decoder": 150}
    screen = pd.DataFrame([{"plan": str(p), "params": 1, "ratio": 1.0, "ideal_speedup": 1.0, "nll": 0.1, "token_acc": 0.9}
                           for p in AssemblySpace(depths, ks)])
    assert [str(p) for p in STRATEGIES.get("uniform")(depths, ks, bp)] == [str(uniform(depths, 2)), str(uniform(depths, 3))]
    assert "uniform" in strategies(ladder_only=False) and "uniform" not in {s for s, _ in ladders(depths, ks, bp)}

    @assembly_strategy("decoder_threes")
    def decoder_threes(depths, granularities, block_params):
        return [Plan.of({"encoder": (1,) * depths["encoder"], "decoder": (3,) * (depths["decoder"] // 3)})]

    try:
        assert "decoder_threes" in strategy_options()
        e = AssemblyExplorer(screen, depths, ks, bp)
        assert "decoder_threes" in e.strategy.options
        e.strategy.value = "decoder_threes"
        e.ratio.value = min(v for _, v in e.ratio.options if v > 1.01)   # past the teacher; the plan is 1.67x
        assert str(e.target_plan()) == "e=111111 d=33"
    finally:
        unregister_strategy("decoder_threes")
    assert "decoder_threes" not in strategy_options()


def test_a_registered_task_kind_is_listed_and_its_model_kind_checked(capsys):
    from mtlab.cli import main
    from mtlab.tasks import TASKS, Seq2SeqTask, task_kind, task_kinds

    @task_kind("tagging", kind="seq2seq", metric="exact", description="Tag every word.")
    class TaggingTask(Seq2SeqTask):
        name = "tagging"

    try:
        assert task_kinds()[-1] == "tagging" and task_kinds("seq2seq") == ("g2p", "pairs", "tagging")
        e = TASKS.entry("tagging")
        assert (e.value, e.kind, e.tasks, e.extra["metric"], e.extra["needs_path"]) == \
            (TaggingTask, "seq2seq", ("seq2seq",), "exact", True)
        with pytest.raises(SystemExit):
            main(["--help"])
        assert "task kinds: g2p, pairs, text, sentences, tagging" in capsys.readouterr().out
    finally:
        TASKS.unregister("tagging")
    assert "tagging" not in task_kinds()
    with pytest.raises(ValueError, match=r"unknown task kind\(s\) \['vision'\]; use some of \('seq2seq', 'causal_lm'"):
        task_kind("images", kind="vision")
    with pytest.raises(ValueError, match="unknown task kind 'tagging'; valid task kinds: g2p, pairs, text, sentences"):
        TASKS.get("tagging")
