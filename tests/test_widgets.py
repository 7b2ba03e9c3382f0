"""Explorer widgets driven from Python: controls change the plan, read-outs and plot; bad states explain."""
import numpy as np
import pandas as pd
import pytest

from mtlab.explore.space import AssemblySpace
from mtlab.widgets import COVERED, AssemblyExplorer, MergeExplorer

DEPTHS = {"encoder": 6, "decoder": 6}
KS = {"encoder": (2, 3, 6), "decoder": (2, 3, 6)}
BP = {"encoder": 100, "decoder": 150}


def _screen(drop=()):
    rows = []
    for p in AssemblySpace(DEPTHS, KS):
        removed = sum(sum(v) - len(v) for _, v in p.spans)
        ratio = (6 * 100 + 6 * 150) / sum(len(v) * BP[s] for s, v in p.spans)
        rows.append({"plan": str(p), "params": 1000 + sum(len(v) * BP[s] for s, v in p.spans), "ratio": ratio,
                     "ideal_speedup": 12 / (12 - removed), "nll": 0.1 + 0.05 * removed + 0.001 * len(str(p)),
                     "token_acc": 0.9 - 0.01 * removed, "tf_word_acc": 0.6 - 0.02 * removed})
    df = pd.DataFrame(rows)
    return df[~df.plan.isin(drop)]


@pytest.fixture
def explorer():
    return AssemblyExplorer(_screen(), DEPTHS, KS, BP)


def test_strategy_and_ratio_fill_the_plan_and_update_readouts(explorer):
    e = explorer
    assert e.strategy.value == "size_first" and e.plan == e.current
    first, renders = e.readout.value, e.renders
    assert str(e.plan) in first and "FLOP-ideal" in first
    e.ratio.value = 1.2
    assert e.readout.value != first and e.renders == renders + 1
    e.strategy.value = "speed_first"
    e.ratio.value = 1.5
    assert e.plan.stack("encoder") == (1,) * 6 and len(e.plan.stack("decoder")) < 6  # decoder shrinks first
    e.strategy.value = "uniform"
    e.ratio.value = 6.0
    assert str(e.plan) == "e=6 d=6" and e.error.value == ""


def test_span_controls_keep_plans_valid(explorer):
    e = explorer
    e.strategy.value = "custom"
    e.set_plan("e=111111 d=111111")
    e.spans["encoder"][0].value = "6"
    assert e.plan.stack("encoder") == (6,)
    assert all(b.disabled and b.value == COVERED for b in e.spans["encoder"][1:])
    e.spans["encoder"][0].value = "2"           # shrink: freed layers become originals
    assert e.plan.stack("encoder") == (2, 1, 1, 1, 1)
    e.spans["encoder"][3].value = "3"           # a 3-module at 3 swallows nothing, aligned
    assert e.plan.stack("encoder") == (2, 1, 3)
    e.spans["encoder"][2].value = "2"           # overlaps the 3-module: it gives way
    assert e.plan.stack("encoder") == (2, 2, 1, 1)
    before = e.plan
    e.spans["decoder"][4].value = COVERED       # not a choice: reverted and explained
    assert e.plan == before and "module" in e.error.value
    assert e.strategy.value == "custom"


def test_bad_custom_plans_and_unscreened_plans_explain_inline():
    e = AssemblyExplorer(_screen(drop=("e=33 d=33",)), DEPTHS, KS, BP)
    e.custom.value = "e=33 d=9"
    assert "d" in e.error.value and "color" in e.error.value
    e.custom.value = "e=1221 d=111111"
    assert "misaligned" in e.error.value
    e.custom.value = "e=33 d=33"
    assert "not in the screened table" in e.error.value
    e.custom.value = "e=222 d=33"
    assert e.error.value == "" and str(e.plan) == "e=222 d=33"
    fig = e.figure()
    assert fig.axes[0].get_title() == "e=222 d=33"


def test_explorer_refuses_a_table_without_screen_columns():
    with pytest.raises(ValueError, match="nll"):
        AssemblyExplorer(_screen().drop(columns="nll"), DEPTHS, KS, BP)


def test_merge_explorer_scores_merges_and_pruning_and_explains_bad_windows():
    sim = {s: pd.DataFrame(np.eye(6) * 0.5 + 0.5) for s in DEPTHS}
    calls = []

    def evaluate(specs):
        calls.append(tuple(specs))
        return {"params": 1000 - 10 * len(specs), "dev_wer": 40.0 + len(" ".join(specs)) / 100}

    m = MergeExplorer(sim, DEPTHS, evaluate, prune_blocks=lambda s, a, b: 1)
    assert m.specs() == ["encoder:3-5@middle/permute"] and m.prune_specs() == ["prune encoder:4-5"]
    text = m.readout.value
    assert "merged parameters" in text and "pruned" in text
    m.controls["decoder"]["on"].value = True
    m.controls["decoder"]["method"].value = "vanilla"
    assert "decoder:3-5@middle/vanilla" in m.readout.value and m.readout.value != text
    n = len(calls)
    m.controls["decoder"]["anchor"].value = "first"     # a new merge: scored once (pruning is unchanged)
    m.controls["decoder"]["anchor"].value = "middle"    # back: memoised, no new evaluation
    assert len(calls) == n + 1
    m.controls["encoder"]["range"].value = (2, 2)
    assert "2 or more layers" in m.error.value
    fig = m.figure()
    assert len(fig.axes[0].patches) == 0 and len(fig.axes[1].patches) == 1  # encoder window invalid, decoder outlined
