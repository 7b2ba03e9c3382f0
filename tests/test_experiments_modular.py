"""The modular study in the smoke profile: the table's columns, budgets and ratios are what it claims."""
import pytest

from mtlab.experiments.modular import COLUMNS, method_budget, modular_table
from mtlab.modular.replacing import sample_tilings


@pytest.fixture(scope="module")
def table():
    return modular_table("smoke", progress=False)


def test_table_has_every_method_and_the_promised_columns(table):
    assert list(table.columns[: len(COLUMNS)]) == COLUMNS
    assert set(table.method) == {"teacher", "modules", "layer_drop", "sft", "layerdrop", "block_influence"}
    assert set(table[table.method == "modules"].strategy) == {"size_first", "speed_first", "screened"}
    assert table.attrs["config"]["profile"]["steps"] == 20


def test_teacher_row_is_the_reference(table):
    t = table.iloc[0]
    assert t.method == "teacher" and t.plan == "e=111111 d=111111"
    assert t.ratio == 1 and t.ratio_model == 1 and t.ideal_speedup == 1 and t.speedup_b1 == 1


def test_ratios_follow_the_parameters(table):
    teacher = table.iloc[0]
    assert (table.ratio_model - teacher.params / table.params).abs().max() < 1e-9
    m = table[table.method == "modules"]
    assert m.ratio.min() > 1 and m.ratio.max() == pytest.approx(6, rel=1e-3)  # 6x: one module per stack
    assert (m.ideal_speedup > 1).all()
    size = m[m.strategy == "size_first"]
    assert size.ratio.is_monotonic_increasing


def test_one_module_run_covers_every_ratio_and_baselines_pay_per_ratio(table):
    b = method_budget(table).set_index("method")
    assert b.loc["modules", "train_runs"] == 1 and b.loc["modules", "models"] >= 10
    assert b.loc["layer_drop", "train_runs"] == b.loc["layer_drop", "models"]
    assert b.loc["sft", "train_runs"] == b.loc["sft", "models"]
    assert b.loc["layerdrop", "train_runs"] == 1


def test_second_call_reads_the_cache(table):
    again = modular_table("smoke", progress=False)
    assert again.attrs["cache"] == table.attrs["cache"]
    assert again[COLUMNS[:4]].equals(table[COLUMNS[:4]])


def test_screened_rows_are_the_dev_screen_s_best_plans_within_each_budget(table):
    from mtlab.experiments.explore import screen_table
    from mtlab.experiments.modular import SCREEN_METRIC, head_to_head

    screen = screen_table("smoke", progress=False).set_index("plan")
    mods = table[table.method == "modules"]
    picked = mods[mods.strategy == "screened"]
    assert len(picked) >= 3
    for r in picked.itertuples():  # nothing within its budget scores better on the dev screen
        ratio = screen.loc[r.plan, "ratio"]
        target = max(t for t in (1.1, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0) if t <= ratio + 1e-6)
        within = screen[screen.ratio >= target - 1e-6]
        assert screen.loc[r.plan, SCREEN_METRIC] == within[SCREEN_METRIC].max()
    h = head_to_head(table)
    for s in ("size_first", "speed_first", "screened"):
        assert {f"{s}_plan", f"{s}_test_wer", f"{s}_test_per"} <= set(h.columns)
    rule = mods[mods.strategy.isin(["size_first", "speed_first"])]
    for r in h.itertuples():  # the modules columns read the rule-based ladders only, as before
        at = rule[(rule.ratio - r.ratio).abs() < 0.01]
        assert r.modules_test_wer == at.test_wer.min()


def test_every_step_swaps_in_at_least_one_module():
    import random

    rng = random.Random(0)
    for _ in range(200):
        t = sample_tilings({"encoder": 6, "decoder": 6}, {"encoder": (2, 3), "decoder": (2, 3)}, 0.0, rng)
        assert sum(k > 1 for v in t.values() for k in v) == 1
        assert all(sum(v) == 6 for v in t.values())


def test_learning_curves_put_every_run_on_the_same_words_with_the_teacher_line(table):
    import pandas as pd

    from mtlab.experiments import artifacts
    from mtlab.experiments.modular import learning_curves, plot_learning_curves, teacher_curve_score

    planted = pd.DataFrame({"step": [10, 20], "dev_wer_3x": [90.0, 80.0], "dev_per_3x": [40.0, 30.0]})
    curves = learning_curves("smoke", baseline_logs={"sft-2": planted}, progress=False)
    assert curves.attrs["words"] == artifacts.CURVE_WORDS
    teacher = curves[curves.method == "teacher"]
    t = teacher_curve_score()
    assert len(teacher) >= 3 and (teacher.dev_wer == t["dev_wer"]).all()  # one line, the same in every panel
    base = curves[(curves.source == "final model") & (curves.method != "modules")]
    from mtlab.profiles import get_profile

    steps = get_profile("smoke").modular.baseline_steps
    assert {"sft", "layer_drop", "layerdrop"} <= set(base.method) and (base.step == steps).all()
    assert set(curves[curves.method == "modules"].ratio) >= {"1.5x", "2x", "3x"}
    log = curves[curves.run == "sft-2"]
    assert log.step.tolist() == [10, 20] and log.dev_wer.tolist() == [90.0, 80.0] and (log.ratio == "3x").all()
    fig = plot_learning_curves(curves)
    assert len(fig.axes) == len(set(curves.ratio))
    again = learning_curves("smoke", baseline_logs={"sft-2": planted}, progress=False)
    assert again.attrs["cache"] == curves.attrs["cache"]
