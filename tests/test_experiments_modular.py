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
    assert set(table[table.method == "modules"].strategy) == {"size_first", "speed_first"}
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


def test_every_step_swaps_in_at_least_one_module():
    import random

    rng = random.Random(0)
    for _ in range(200):
        t = sample_tilings({"encoder": 6, "decoder": 6}, {"encoder": (2, 3), "decoder": (2, 3)}, 0.0, rng)
        assert sum(k > 1 for v in t.values() for k in v) == 1
        assert all(sum(v) == 6 for v in t.values())
