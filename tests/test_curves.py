"""mtlab.curves: recovery curves (quality every N recovery steps, per method, at equal parameters
removed), smoke-sized: real MiniLM, a few sentences, 4 steps scored every 2; resumable after a kill;
methods added by name; crossings computed from the table."""
from __future__ import annotations

from dataclasses import replace

import pandas as pd
import pytest

from mtlab import curves
from mtlab.curves import (CURVE_COLUMNS, STUDIES, CurveSettings, crossing_sentence, crossings, curve_table,
                          minilm_context, register_curve_method, run_curves)
from mtlab.minilm import load_minilm
from mtlab.profiles import get_profile
from mtlab.tasks.sentences import SentencesTask

SMOKE = CurveSettings(steps=4, every=2)


@pytest.fixture(scope="module")
def ctx():
    model, tok = load_minilm()
    m = replace(get_profile("default").minilm, align_tokens=200, select_limit=12, batch_size=4)
    task = SentencesTask(tok, limit={"train": 48, "dev": 12, "test": 16}, max_length=24)
    return minilm_context(model=model, tokenizer=tok, task=task, m=m, progress=False)


def test_permute_vs_prune_curves(ctx, tmp_path):
    csv = tmp_path / "minilm_curves.csv"
    table = run_curves("minilm", SMOKE, only=["permute-10", "layer_prune-10"], ctx=ctx, work=tmp_path / "w",
                       csv=csv, progress=False)
    assert list(table.columns) == CURVE_COLUMNS
    assert sorted(table.method.unique()) == ["layer_prune", "permute"]
    for _, g in table.groupby("method"):
        assert g.step.tolist() == [0, 2, 4]  # as built, then every 2 steps, on the same test sentences
        assert g[["mean_cos", "recall_at_10", "sim_spearman"]].notna().all().all()
        assert (g.mean_cos < 1).all() and (g.mean_cos > 0).all()
    perm = table[table.method == "permute"]
    assert perm.params_removed_frac.round(3).unique().tolist() == [0.104]
    pd.testing.assert_frame_equal(pd.read_csv(csv), table, check_dtype=False)
    log = (tmp_path / "w" / "progress.log").read_text()
    assert "permute-10: built layers:" in log and "permute-10: step 2/4: mean_cos" in log
    assert "permute-10: step 4/4: mean_cos" in log and "finished at step 4/4" in log
    assert "steps" in crossing_sentence(table)
    fig = curves.curve_figure(table)
    assert len(fig.axes) == 3
    shipped = curves.ship_curves("minilm", root=tmp_path / "shipped", work=tmp_path / "w", settings=SMOKE)
    view = curves.recovery_curves("minilm", root=shipped)  # what notebook 06 shows
    pd.testing.assert_frame_equal(view.table, table, check_dtype=False)
    assert "mean_cos: at ~10% removed" in view.sentence and view.figure() is not None
    card = (shipped / "README.md").read_text()
    assert "permute-10" in card and "Where the curves cross" in card and "make minilm-curves" in card


def test_no_curves_yet_names_the_command(tmp_path, monkeypatch):
    monkeypatch.setattr(STUDIES["minilm"], "csv", tmp_path / "none.csv")
    view = curves.recovery_curves("minilm", root=tmp_path / "nothing")
    assert view.table.empty and list(view.table.columns) == CURVE_COLUMNS
    assert "make minilm-curves" in view.sentence and view.figure() is None


def test_resume_after_a_kill_and_methods_by_name(ctx, tmp_path, monkeypatch):
    from mtlab.baselines import keep_only

    built = []

    def drop_last(c, point):
        built.append(point.label)
        net = keep_only(c.base, {"layers": [0, 1, 2, 3, 4]})
        return net, {"spec": "keep layers 0-4", "params_removed_frac": 0.08}

    register_curve_method("minilm", "droplast", drop_last)
    try:
        score = STUDIES["minilm"].score
        calls = []

        def flaky(c, net):
            calls.append(1)
            if len(calls) == 3:  # the evaluation at step 4: after the checkpoint at step 2
                raise KeyboardInterrupt("killed")
            return score(c, net)

        monkeypatch.setattr(STUDIES["minilm"], "score", flaky)
        with pytest.raises(KeyboardInterrupt):
            run_curves("minilm", SMOKE, only=["droplast-10"], ctx=ctx, work=tmp_path, csv=tmp_path / "c.csv",
                       progress=False)
        partial = curve_table(STUDIES["minilm"], tmp_path)
        assert partial.step.tolist() == [0, 2]
        table = run_curves("minilm", SMOKE, only=["droplast-10"], ctx=ctx, work=tmp_path, csv=tmp_path / "c.csv",
                           progress=False)
        assert built == ["10"]  # the candidate is built once; the resumed run trains the saved one
        assert table.step.tolist() == [0, 2, 4] and table.method.unique().tolist() == ["droplast"]
        assert table.mean_cos.iloc[1] == partial.mean_cos.iloc[1]
        log = (tmp_path / "progress.log").read_text()
        assert "resuming" in log and log.count("droplast-10: step 4/4") == 1 and log.count("droplast-10: step 2/4") == 1
    finally:
        STUDIES["minilm"].builders.pop("droplast", None)


def test_bad_input_names_the_fix(ctx, tmp_path):
    with pytest.raises(ValueError, match="unknown curve method 'nope'.*choose from.*permute"):
        run_curves("minilm", SMOKE, only=["nope-10"], ctx=ctx, work=tmp_path)
    with pytest.raises(ValueError, match=r"POINT in \['10', '20'\]"):
        run_curves("minilm", SMOKE, only=["permute-15"], ctx=ctx, work=tmp_path)
    with pytest.raises(ValueError, match="does not divide"):
        run_curves("minilm", CurveSettings(steps=5, every=2), ctx=ctx, work=tmp_path)
    with pytest.raises(ValueError, match="may not contain"):
        register_curve_method("minilm", "a-b", lambda c, p: None)
    assert not list(tmp_path.iterdir())  # refused before any work


def test_crossings_from_the_table():
    rows = []
    for step, a, b in [(0, 0.90, 0.95), (500, 0.94, 0.96), (1000, 0.97, 0.965), (1500, 0.98, 0.97)]:
        rows += [{"method": "permute", "params_removed_frac": 0.104, "step": step, "mean_cos": a},
                 {"method": "layer_prune", "params_removed_frac": 0.099, "step": step, "mean_cos": b}]
    rows += [{"method": "permute", "params_removed_frac": 0.2, "step": s, "mean_cos": 0.8 + s / 1e4} for s in (0, 500)]
    rows += [{"method": "layer_prune", "params_removed_frac": 0.21, "step": s, "mean_cos": 0.9 + s / 1e4}
             for s in (0, 500)]
    table = pd.DataFrame(rows)
    cr = crossings(table)
    assert cr.crossings.tolist() == [[1000], []]
    assert cr.ahead_at_end.tolist() == ["permute", "layer_prune"]
    text = crossing_sentence(table)
    assert "cross 1 time(s) (between steps 500 and 1000)" in text and "do not cross; layer_prune stays ahead" in text
    assert "nothing to compare" in crossing_sentence(table[table.method == "permute"])


def test_t5_study_records_per_wer_and_relative_word_accuracy(tiny_t5, g2p_task, tmp_path):
    from mtlab.baselines import keep_only
    from mtlab.merging.merge import tie_ffs

    ctx = curves.t5_context(model=tiny_t5, task=g2p_task, profile="smoke", progress=False)
    t5 = STUDIES["t5"]
    assert "permute" in curves.curve_methods(t5) and "layer_prune" in curves.curve_methods(t5)

    def tied(c, point):
        return tie_ffs(__import__("copy").deepcopy(c.model), ["encoder:0-1@first/vanilla"]), {
            "spec": "encoder:0-1 tied", "params_removed_frac": 0.1}

    def pruned(c, point):
        return keep_only(c.model, {"encoder": [0]}), {"spec": "keep encoder 0", "params_removed_frac": 0.1}

    register_curve_method("t5", "tied", tied)
    register_curve_method("t5", "pruned", pruned)
    try:
        table = run_curves("t5", SMOKE, only=["tied-ff4", "pruned-ff4"], ctx=ctx, work=tmp_path,
                           csv=tmp_path / "t5.csv", progress=False)
    finally:
        t5.builders.pop("tied", None)
        t5.builders.pop("pruned", None)
    assert list(table.columns) == ["method", "params_removed_frac", "step", "test_per", "test_wer", "rel_word_acc"]
    assert sorted(table.groupby("method").step.apply(list).tolist()) == [[0, 2, 4], [0, 2, 4]]
    assert table[["test_per", "test_wer", "rel_word_acc"]].notna().all().all()


def test_cli_refuses_bad_runs_before_any_work():
    from mtlab.cli import main

    with pytest.raises(SystemExit, match="does not divide"):
        main(["minilm-curves", "--steps", "5", "--every", "2"])
    with pytest.raises(SystemExit, match="unknown curve method 'nope'"):
        main(["minilm-curves", "--only", "nope-10"])
    with pytest.raises(SystemExit, match=r"POINT in \['ff4'\]"):
        main(["t5-curves", "--only", "permute-10"])


def test_original_is_the_control_curve_of_both_studies(ctx, tiny_t5, g2p_task, tmp_path):
    """Issue 22, item 10: `original-POINT` is the original (0 parameters removed) recovered the same way, so
    a method's curve can be read against what the fine-tune alone does; not a default method (runs on request)."""
    from mtlab.curves import CONTROL_METHOD, run_names

    assert CONTROL_METHOD == "original"
    for name, point in (("minilm", "10"), ("t5", "ff4")):
        s = STUDIES[name]
        assert "original" in curves.curve_methods(s) and "original" not in s.methods
        assert f"original-{point}" not in run_names(s)
    before = {k: v.clone() for k, v in ctx.model.state_dict().items()}
    table = run_curves("minilm", SMOKE, only=["original-10"], ctx=ctx, work=tmp_path / "m", csv=tmp_path / "m.csv",
                       progress=False)
    assert table.method.unique().tolist() == ["original"] and (table.params_removed_frac == 0).all()
    assert table.step.tolist() == [0, 2, 4]
    assert table.mean_cos.iloc[0] == pytest.approx(1.0, abs=1e-5)  # as built: the original itself
    assert all((before[k] == v).all() for k, v in ctx.model.state_dict().items())  # the original is left as it was
    t5ctx = curves.t5_context(model=tiny_t5, task=g2p_task, profile="smoke", progress=False)
    t5 = run_curves("t5", SMOKE, only=["original-ff4"], ctx=t5ctx, work=tmp_path / "t", csv=tmp_path / "t.csv",
                    progress=False)
    assert t5.method.unique().tolist() == ["original"] and t5.step.tolist() == [0, 2, 4]
    assert (t5.params_removed_frac == 0).all()
    assert t5.test_wer.iloc[0] == pytest.approx(t5ctx.baseline["test_wer"])  # as built: the teacher itself


def test_ahead_means_better_for_error_rates_too():
    """A lower PER is better: the curve with the lower PER at the end is the one ahead (was reported backwards)."""
    import pandas as pd

    from mtlab.curves import crossing_sentence, crossings, higher_is_better

    rows = [("permute", 0.19, s, per) for s, per in ((0, 12.4), (500, 12.0))] + \
           [("layer_prune", 0.19, s, per) for s, per in ((0, 27.4), (500, 12.2))]
    t = pd.DataFrame(rows, columns=["method", "params_removed_frac", "step", "test_per"])
    assert not higher_is_better("test_per") and not higher_is_better("dev_ppl") and higher_is_better("mean_cos")
    assert crossings(t, "test_per").ahead_at_end.iloc[0] == "permute"
    assert "permute stays ahead" in crossing_sentence(t, "test_per")
    assert crossings(t.assign(test_per=-t.test_per), "test_per", higher=True).ahead_at_end.iloc[0] == "permute"


def test_the_control_curve_is_read_beside_the_methods():
    import pandas as pd

    from mtlab.curves import control_sentence

    t = pd.DataFrame([("permute", 0.19, 500, 12.0), ("layer_prune", 0.19, 500, 12.2), ("original", 0.0, 500, 11.8)],
                     columns=["method", "params_removed_frac", "step", "test_per"])
    text = control_sentence(t, ["test_per"])
    assert "step 500" in text and "original 11.8" in text and "permute 12" in text
    assert control_sentence(t[t.method != "original"], ["test_per"]) == ""


def test_the_card_names_the_command_with_its_settings_and_runs():
    from mtlab.curves import STUDIES, CurveSettings, reproduce_command, run_names

    s = STUDIES["minilm"]
    assert reproduce_command(s, CurveSettings()) == s.command
    assert reproduce_command(s, CurveSettings(steps=2000, every=250), ["permute-10", "original-10"]) == \
        f'{s.command} STEPS=2000 EVERY=250 ONLY="permute-10 original-10"'
    assert reproduce_command(s, CurveSettings(), run_names(s)) == s.command
