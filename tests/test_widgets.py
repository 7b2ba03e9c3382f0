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


# ---- explorers never show a previous state; read-outs a researcher can use ----------------------------

import threading  # noqa: E402

from mtlab.ui.latest import LatestWorker  # noqa: E402
from mtlab.ui.readout import BUSY, INVALID, metric_label  # noqa: E402

FF, BLOCK, TOTAL = 20, 30, 1000   # toy sizes: a merge removes FF per extra layer, pruning BLOCK per block


def _size(specs):
    removed = 0
    for s in specs:
        a, b = (int(x) for x in s.split(":")[1].split("@")[0].split("-"))
        removed += (b - a) * (BLOCK if s.startswith("prune") else FF)
    return TOTAL - removed


class Scorer:
    """A toy evaluate: params from _size, metrics from the spec text, n words; optionally gated so a
    test decides when each evaluation finishes (to hold a slow result back)."""

    def __init__(self, gated=False):
        self.calls, self.gate, self.entered = [], threading.Event(), threading.Event()
        if not gated:
            self.gate.set()

    def __call__(self, specs):
        self.calls.append(tuple(specs))
        self.entered.set()
        assert self.gate.wait(30), "test gate never opened"
        return {"params": _size(specs), "dev_per": 10.0 + len(specs), "dev_wer": 30.0 + len("".join(specs)) / 10,
                "n": 32}


def _merge(**kw):
    sim = {s: pd.DataFrame(np.eye(6) * 0.5 + 0.5) for s in DEPTHS}
    return MergeExplorer(sim, DEPTHS, kw.pop("evaluate", None) or Scorer(), params=_size, **kw)


def _assert_shows_controls(m):
    """The read-out, outline and error line agree with the controls (invariant of every state)."""
    try:
        st = m.state()
    except ValueError:
        assert m.error.value and INVALID in m.readout.value and m.drawn == {} and "outlined: nothing" in m.caption.value
        return
    assert m.error.value == "" and m.shown == st
    assert m.drawn == {s: (a, b) for s, a, b in st.windows}
    assert m.caption.value.count("-") == len(st.windows) and all(f"{s} {a}-{b}" in m.caption.value for s, a, b in st.windows)
    for spec in st.merge + st.prune:
        assert spec in m.readout.value
    for spec in {s for key in m.memo for s in key} - set(st.merge + st.prune):   # no other state's spec appears
        assert spec not in m.readout.value


def _row(m, label):
    import re

    return re.search(rf"<b>{re.escape(label)}</b></td><td[^>]*>(.*?)</td>", m.readout.value)[1]


def test_metric_labels_say_unit_split_and_words():
    assert metric_label("dev_per", 32) == "dev PER % (n=32 words)"
    assert metric_label("test_wer") == "test WER %"
    assert metric_label("bleu", 1000) == "BLEU (n=1,000 words)"


def test_merge_controls_fired_in_quick_succession_end_on_the_last_state():
    m = _merge()
    c = m.controls
    for action in [lambda: c["encoder"]["range"].__setattr__("value", (1, 5)),
                   lambda: c["decoder"]["on"].__setattr__("value", True),
                   lambda: c["decoder"]["method"].__setattr__("value", "vanilla"),
                   lambda: c["encoder"]["range"].__setattr__("value", (2, 4)),
                   lambda: c["encoder"]["on"].__setattr__("value", False),
                   lambda: c["decoder"]["on"].__setattr__("value", False),   # both unticked
                   lambda: c["decoder"]["on"].__setattr__("value", True)]:
        action()
        _assert_shows_controls(m)
    assert m.specs() == ["decoder:3-5@middle/vanilla"]
    text = m.readout.value
    assert "encoder:" not in text and BUSY not in text and m.status.value == ""
    c["decoder"]["on"].value = False
    assert "nothing selected" in m.readout.value and "pruned parameters" not in m.readout.value
    assert m.drawn == {}


def test_readout_has_original_differences_share_removed_and_pruning_not_larger():
    m = _merge()
    m.controls["decoder"]["on"].value = True
    text = m.readout.value
    assert "dev PER % (n=32 words)" in text and "original parameters" in text
    assert "(original 10.00, +2.00)" in text            # merged PER (two specs) vs the original's
    st = m.state()
    merged, pruned = _size(st.merge), _size(st.prune)
    assert f"{100 * (TOTAL - merged) / TOTAL:.1f}% removed" in text
    # pruning is the largest model inside the windows that is NOT larger than the merge, and says so
    assert pruned <= merged and "closest size not larger" in text
    every = [[f"prune {s}:{5 - n}-5" for s, n in (("encoder", i), ("decoder", j)) if n] for i in range(3) for j in range(3)]
    assert not [p for p in every if p and pruned < _size(p) <= merged]
    assert "LARGER" not in text


def test_controls_that_do_nothing_are_disabled():
    m = _merge()
    enc, dec = m.controls["encoder"], m.controls["decoder"]
    assert not enc["anchor"].disabled and dec["range"].disabled and dec["anchor"].disabled   # decoder unticked
    enc["method"].value = "vanilla"
    assert enc["anchor"].disabled and not enc["range"].disabled
    enc["method"].value = "permute"
    assert not enc["anchor"].disabled


def test_invalid_state_clears_readout_and_outline_then_recovers():
    m = _merge()
    before = m.readout.value
    m.controls["encoder"]["range"].value = (1, 1)
    assert "2 or more layers" in m.error.value
    assert INVALID in m.readout.value and "merged parameters" not in m.readout.value and before != m.readout.value
    assert m.drawn == {} and m.shown is None
    m.controls["encoder"]["range"].value = (1, 2)
    _assert_shows_controls(m)
    assert "encoder:1-2@middle/permute" in m.readout.value


def test_a_slow_result_for_an_old_state_never_lands():
    score = Scorer()
    m = _merge(evaluate=score, background=True)
    assert m.wait(30) and "merged parameters" in m.readout.value
    score.gate.clear()                                   # evaluations now hang until the test opens the gate
    score.entered.clear()
    n0 = len(score.calls)
    c = m.controls["encoder"]
    c["range"].value = (1, 5)                            # the worker starts scoring 1-5 (and blocks)
    assert score.entered.wait(30)
    assert "encoder:1-5@middle/permute" in m.readout.value and BUSY in m.readout.value and BUSY in m.status.value
    old = m.shown
    c["range"].value = (2, 5)                            # quick changes while 1-5 is being scored
    c["method"].value = "vanilla"
    assert "encoder:2-5@middle/vanilla" in m.readout.value and "1-5" not in m.readout.value
    assert BUSY in m.readout.value
    score.gate.set()
    assert m.wait(30)
    assert ("encoder:1-5@middle/permute",) in m.memo                # the old result was kept ...
    _assert_shows_controls(m)                                        # ... but did not land
    assert "1-5" not in m.readout.value and BUSY not in m.readout.value and m.status.value == ""
    # scored: the old merge (already running), then the latest state, not the state replaced while queued
    # (2-5 permute)
    assert score.calls[n0:] == [("encoder:1-5@middle/permute",), ("encoder:2-5@middle/vanilla",)]  # pruning: memoised
    m._land(old)                                                     # a late result for an old state is dropped
    assert "1-5" not in m.readout.value and not m.worker.errors
    c["method"].value = "permute"
    c["range"].value = (1, 5)                                        # back to the old state: its merge is known
    assert "encoder:1-5@middle/permute" in m.readout.value and BUSY not in _row(m, "merged parameters")
    assert m.wait(30) and BUSY not in m.readout.value
    _assert_shows_controls(m)


def test_scoring_error_shows_in_the_error_line_and_clears_the_readout():
    def evaluate(specs):
        if any("1-5" in s for s in specs):
            raise RuntimeError("out of memory")
        return Scorer()(specs)

    m = _merge(evaluate=evaluate)
    m.controls["encoder"]["range"].value = (1, 5)
    assert "out of memory" in m.error.value and INVALID in m.readout.value


def test_history_lists_states_tried_as_a_dataframe():
    m = _merge()
    m.controls["encoder"]["method"].value = "vanilla"
    m.controls["encoder"]["method"].value = "permute"     # tried again: moves to the end, not a new row
    h = m.history()
    assert list(h["merge"]) == ["encoder:3-5@middle/vanilla", "encoder:3-5@middle/permute"]
    assert {"params", "removed_%", "dev_per", "dev_wer", "prune", "prune_params", "prune_dev_per"} <= set(h.columns)
    assert h.attrs["original"]["params"] == TOTAL and (h.params < TOTAL).all()
    assert "states tried (2" in m.history_view.value


def test_merge_readouts_for_a_static_report_are_strings():
    out = _merge().readouts()
    assert all(isinstance(v, str) for v in out.values()) and out["merge"] == "encoder:3-5@middle/permute"


def test_latest_worker_computes_only_the_newest_waiting_request():
    started, gate, done = threading.Event(), threading.Event(), []

    def fn(x):
        started.set()
        assert gate.wait(30)
        done.append(x)

    w = LatestWorker(fn)
    w.submit(1)
    assert started.wait(30)
    for x in (2, 3, 4):
        w.submit(x)
    gate.set()
    assert w.wait(30) and done == [1, 4] and w.idle()


def test_assembly_invalid_custom_plan_clears_the_readout(explorer):
    e = explorer
    shown = str(e.plan)
    e.custom.value = "e=1221 d=111111"
    assert "misaligned" in e.error.value and INVALID in e.readout.value and shown not in e.readout.value
    e.custom.value = "e=33 d=222"
    assert e.error.value == "" and "e=33 d=222" in e.readout.value


def test_assembly_custom_mode_ratio_slider_shows_the_plans_ratio(explorer):
    e = explorer
    e.custom.value = "e=33 d=222"
    r = e.screen.loc["e=33 d=222", "ratio"]
    assert e.ratio.disabled and e.ratio.value == pytest.approx(round(r, 2))
    assert f"{r:.2f}x" in e.readout.value


def test_assembly_readout_compares_with_the_original_and_keeps_a_history(explorer):
    e = explorer
    e.custom.value = "e=33 d=222"
    text = e.readout.value
    assert "original" in text and "% removed" in text
    assert list(e.history().plan)[-1] == "e=33 d=222" and len(e.history()) >= 2


def test_plots_keep_their_size_and_label_their_axes():
    from PIL import Image
    import io

    import matplotlib

    with matplotlib.rc_context({"savefig.bbox": "tight"}):   # a notebook backend may crop figures; ours must not
        m = _merge()
        sizes = {Image.open(io.BytesIO(m.image.value)).size}
        m.controls["decoder"]["on"].value = True
        m.controls["encoder"]["range"].value = (0, 5)
        sizes.add(Image.open(io.BytesIO(m.image.value)).size)
        m.controls["encoder"]["range"].value = (5, 5)      # invalid: drawn without outline, same size
        assert m.drawn == {}
        sizes.add(Image.open(io.BytesIO(m.image.value)).size)
        e = AssemblyExplorer(_screen(), DEPTHS, KS, BP)
        asm = {Image.open(io.BytesIO(e.image.value)).size}
        e.custom.value = "e=1221 d=111111"
        asm.add(Image.open(io.BytesIO(e.image.value)).size)
    assert len(sizes) == 1 and len(asm) == 1
    fig = m.figure()
    assert fig.axes[0].get_xlabel() == "encoder layer" and fig.axes[0].get_ylabel() == "encoder layer"
    assert fig.axes[-1].get_ylabel()    # the colour bar says what it measures
    # a returned figure displays (static copies in reports) as the widget's own PNG, without pyplot
    assert fig._repr_png_()[:8] == b"\x89PNG\r\n\x1a\n"
    assert Image.open(io.BytesIO(fig._repr_png_())).size in sizes


def test_figure_png_is_never_cropped():
    import io

    import matplotlib
    import matplotlib.pyplot as plt
    from PIL import Image

    from mtlab.ui.readout import figure_png

    fig, ax = plt.subplots(figsize=(4, 3))
    ax.set_title("a title far above the axes", y=1.4)      # outside the figure: a tight box would grow
    with matplotlib.rc_context({"savefig.bbox": "tight"}):
        assert Image.open(io.BytesIO(figure_png(fig, dpi=50))).size == (200, 150)
    plt.close(fig)


def test_explorer_figures_stay_out_of_pyplot(monkeypatch):
    """Widget callbacks run on another thread than the inline backend's: a figure in pyplot's global
    list could be cropped by it while being saved, so explorers never create pyplot figures."""
    import matplotlib.pyplot as plt

    def refuse(*a, **k):
        raise AssertionError("explorer figures must not be pyplot figures")

    monkeypatch.setattr(plt, "figure", refuse)
    m = _merge()
    m.controls["decoder"]["on"].value = True
    m.controls["encoder"]["range"].value = (5, 5)     # the invalid state's plot too
    e = AssemblyExplorer(_screen(), DEPTHS, KS, BP)
    e.ratio.value = 1.5
    assert m.error.value and m.figure().axes and e.figure().axes and e.error.value == ""


def test_spec_sizes_match_the_built_models(tiny_t5):
    from mtlab.candidate import CompressionSpec, apply
    from mtlab.measure import count_params
    from mtlab.ui.spec_sizes import SpecSizes

    def build(model, specs, cache):
        return apply(model, CompressionSpec(None, tuple(specs)), cache=cache) if specs else model

    sizes = SpecSizes(tiny_t5)
    for specs in ([], ["encoder:0-1@first/vanilla"], ["decoder:0-1@last/vanilla", "prune encoder:0-1"],
                  ["prune decoder:0-1"]):
        assert sizes(specs) == count_params(build(tiny_t5, specs, None)), specs
    assert sizes(["encoder:0-1@first/permute"]) == sizes(["encoder:0-1@first/vanilla"]) < sizes([])
    with pytest.raises(ValueError, match="no layer encoder.5"):
        sizes(["prune encoder:4-5"])


# ---- the assembly explorer on a space too large to screen whole (12+12) -------------------------------

def test_assembly_explorer_on_a_12_plus_12_space_reads_out_screens_of_the_chosen_plan(g2p_task, monkeypatch):
    import re

    import mtlab.ui.assembly as assembly
    from mtlab.experiments.explore import searched_explorer, tiny_12x12
    from mtlab.explore.screen import screen

    teacher, bank = tiny_12x12(g2p_task)
    e = searched_explorer(teacher, bank, g2p_task, budget=3000, sample=40, limit=8)
    assert e.plans_in_space == 85_849 and [len(b) for b in e.spans.values()] == [12, 12]  # one control a position
    assert e.search.attrs["method"] == "frontier-search" and e.search.attrs["block_evals"] <= 3000
    assert len(e.search) + 40 <= len(e.screen) <= len(e.search) + 42    # searched, sample, teacher, first plan
    target = next(p for p in AssemblySpace(e.depths, e.granularities).sample(60, seed=1)
                  if str(p) not in e.screen.index and any(k > 1 for k in p.stack("decoder")))
    e.custom.value = "e=111111111111 d=111111111111"   # the teacher, then the span controls, one module each
    for s, boxes in e.spans.items():
        for start, k in target.blocks(s):
            if k > 1:
                boxes[start].value = str(k)
    assert e.plan == target and e.error.value == ""
    ref = screen(teacher, bank, g2p_task, [e.plan], limit=8, batch_size=8, progress=False).iloc[0]
    row = e.screen.loc[str(e.plan)]
    assert row.source == "on demand" and row.nll == pytest.approx(ref.nll, abs=1e-6)
    assert f"{ref.nll:.4f}" in e.readout.value
    n = len(e.screen)
    assert re.search(rf"screened {n:,} of 85,849 plans \(\d\.\d%\)", e.readout.value)
    searched = e.search.sort_values("nll").plan.iloc[0]    # a searched plan: read from the table, as screened
    e.custom.value = searched
    assert len(e.screen) == n and e.error.value == "" and str(e.plan) == searched
    ref = screen(teacher, bank, g2p_task, [searched], limit=8, batch_size=8, progress=False).iloc[0]
    assert e.screen.loc[searched].nll == pytest.approx(ref.nll, abs=1e-5)
    assert {"searched", "sample", "on demand", "teacher"} <= set(e.plotted(searched).kind)
    monkeypatch.setattr(assembly, "PLOT_POINTS", 30)     # past it: the frontier, teacher, plan and a sample
    shown = e.plotted(searched)
    assert searched in set(shown.plan) and len(shown) < n and (shown.kind == "teacher").sum() == 1
    assert e.figure().axes[0].get_title() == searched
