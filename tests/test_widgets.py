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
    e.ratio.value = 6.0
    assert str(e.plan) == "e=6 d=6" and e.error.value == "" and e.custom.value == "e=6 d=6"


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
from mtlab.ui.merge import UPDATING  # noqa: E402
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
    assert "1-5" not in m.readout.value and "2-5" not in m.readout.value   # updating: no spec of the burst
    assert UPDATING in m.readout.value and "updating" in m.caption.value
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
    assert m.wait(30) and "encoder:1-5@middle/permute" in m.readout.value
    assert BUSY not in _row(m, "merged parameters") and BUSY not in m.readout.value
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
    assert e.ratio.disabled and e.ratio.value == pytest.approx(r) and e.ratio.label == f"{r:.2f}"
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
        asm = {Image.open(io.BytesIO(e.png)).size}         # the assembly plot: this PNG in HTML, with hover targets
        e.custom.value = "e=1221 d=111111"
        asm.add(Image.open(io.BytesIO(e.png)).size)
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


# ---- issue #27: state in force, snapping ratios, acting on a pick -------------------------------------

import re  # noqa: E402

from mtlab.ui.assembly import ratio_options, strategy_options  # noqa: E402


def test_custom_box_always_shows_the_plan_in_force(explorer):
    e = explorer
    e.custom.value = "e=2211 d=1122"
    assert e.custom.value == str(e.plan) == "e=2211 d=1122"
    e.strategy.value = "size_first"          # a strategy sets another plan: the box follows
    assert e.custom.value == str(e.plan) != "e=2211 d=1122"
    e.strategy.value = "speed_first"
    assert e.custom.value == str(e.plan)
    e.spans["encoder"][0].value = "6"        # a span control
    assert e.custom.value == str(e.plan) and e.plan.stack("encoder") == (6,)
    e.speedup.value = 2.0                    # best plan at a speed-up
    assert e.custom.value == str(e.plan)
    e.custom.value = "e=33 d=9"              # an invalid typed plan stays as typed, with the reason
    assert e.custom.value == "e=33 d=9" and e.error.value and INVALID in e.readout.value


def test_ratio_slider_snaps_to_the_ratios_of_the_space(explorer):
    e = explorer
    every = {round(e.plan_ratio(p), 9) for p in AssemblySpace(DEPTHS, KS)}
    assert {round(v, 9) for _, v in e.ratios} == every                   # exactly the ratios plans have
    labels = [lb for lb, _ in e.ratios]
    assert len(set(labels)) == len(labels) and "3.00" in labels
    assert int(e.ratio.layout.width.rstrip("px")) >= 400 and e.ratio.label in labels
    e.strategy.value = "size_first"
    e.ratio.value = dict(e.ratios)["3.00"]                              # 3, not 3.01
    assert e.ratio.value == 3.0 and str(e.plan) == "e=33 d=33" and e.plan_ratio(e.plan) == pytest.approx(3.0)
    e.custom.value = "e=33 d=222"                                       # custom: the slider shows the plan's ratio
    assert e.ratio.value == pytest.approx(e.plan_ratio(e.plan)) and e.ratio.disabled


def test_ratio_labels_separate_ratios_that_round_alike():
    depths, ks = {"encoder": 6, "decoder": 6}, {"encoder": (2, 3, 6), "decoder": (2, 3, 6)}
    opts = ratio_options(depths, ks, {"encoder": 1000, "decoder": 1003})
    labels = [lb for lb, _ in opts]
    assert len(set(labels)) == len(labels)
    for label, v in opts:
        assert float(label) == pytest.approx(v, abs=0.5 * 10 ** -len(label.split(".")[1]))


def test_strategies_are_the_registered_ones():
    from mtlab.modular.plan import ladders, strategies, using_screen

    e = AssemblyExplorer(_screen(), DEPTHS, KS, BP)
    assert e.strategy.options == strategy_options() == (*strategies(), "custom")
    with using_screen(_screen(), metric="nll", name="screened_test"):
        e = AssemblyExplorer(_screen(), DEPTHS, KS, BP)
        assert "screened_test" in e.strategy.options
        e.strategy.value = "screened_test"
        e.ratio.value = dict(e.ratios)["2.00"]
        ladder = [p for n, p in ladders(DEPTHS, KS, BP, names=["screened_test"])[1:]]
        want = min((p for p in ladder if e.plan_ratio(p) >= 2.0 - 1e-9), key=e.plan_ratio)
        assert e.plan == want and e.error.value == "" and e.custom.value == str(want)


def test_best_plan_at_a_speedup_is_the_lowest_screened_nll_as_shown(explorer):
    e = explorer
    e.speedup.value = 2.0
    df = _screen()
    best = df[df.ideal_speedup.round(2) >= 2.0].sort_values("nll").plan.iloc[0]
    assert str(e.plan) == best and e.strategy.value == "custom" and e.error.value == ""
    assert "chosen as" in e.readout.value and "at &gt;= 2.00x" in e.readout.value
    assert e.best_at_speedup(1.0) == df.sort_values("nll").plan.iloc[0]
    e.speedup.value = 1.5
    e.best.click()                          # the button does the same
    assert str(e.plan) == df[df.ideal_speedup.round(2) >= 1.5].sort_values("nll").plan.iloc[0]
    with pytest.raises(ValueError, match="lower the speed-up"):
        e.best_at_speedup(99)


def test_history_separates_close_nlls_and_two_picks_compare_side_by_side(explorer):
    from mtlab.ui.readout import frame_html, separating_digits

    assert separating_digits([1.23442, 1.23444], 2) == 5 and separating_digits([1.2, 1.3], 4) == 4
    html_ = frame_html(pd.DataFrame({"plan": ["a", "b"], "screened_nll": [1.23442, 1.23444]}), "t", {"screened_nll": 4})
    assert "1.23442" in html_ and "1.23444" in html_
    e = explorer
    with pytest.raises(ValueError, match="nothing to pin"):
        e.custom.value = "e=1221 d=111111"   # invalid: nothing to pin
        e.pin()
    e.custom.value = "e=33 d=33"
    e.pin_button.click()
    e.custom.value = "e=222 d=6"
    e.pin()
    c = e.compare()
    assert list(c.columns) == ["pick 1", "pick 2", "2 - 1"] and list(c.loc["plan"][:2]) == ["e=33 d=33", "e=222 d=6"]
    assert c.loc["screened_nll", "2 - 1"] == pytest.approx(c.loc["screened_nll", "pick 2"] - c.loc["screened_nll", "pick 1"])
    nll = e.screen.loc["e=33 d=33", "nll"]
    assert f"{nll:.4f}" in e.compare_view.value and f"{nll:.4f}" in e.history_view.value   # NLL at 4+ digits
    e.custom.value = "e=111111 d=111111"
    e.pin()                                  # a third pin: the oldest goes
    assert [p["plan"] for p in e.pins] == ["e=222 d=6", "e=111111 d=111111"]


def test_hover_targets_sit_on_the_plotted_plans(explorer):
    import base64
    import io

    import numpy as np
    from PIL import Image

    e = explorer
    e.custom.value = "e=33 d=33"
    html_ = e.image.value
    targets = re.findall(r"<i class='mtlab-pt( mtlab-pt-selected)?' data-plan='([^']+)' title='([^']+)' "
                         r"style='left:([\d.]+)px;top:([\d.]+)px'>", html_)
    assert len(targets) == len(e.plotted(str(e.plan)))
    sel = [t for t in targets if t[0]]
    assert len(sel) == 1 and sel[0][1] == "e=33 d=33" and sel[0][2].startswith("e=33 d=33 · 3.00x")
    png = Image.open(io.BytesIO(base64.b64decode(re.search(r"base64,([^']+)'", html_)[1]))).convert("RGB")
    a = np.asarray(png).astype(int)
    x, y = float(sel[0][3]), float(sel[0][4])
    yy, xx = np.mgrid[: a.shape[0], : a.shape[1]]
    ring = np.abs(np.hypot(xx - x, yy - y) - 10) < 3          # the red ring drawn round the selected plan
    red = (a[..., 0] > 200) & (a[..., 1] < 90) & (a[..., 2] < 90)
    assert (red & ring).sum() > 20, "the selected hover target is not on the ring"


def test_teacher_label_keeps_clear_of_the_ring():
    from mtlab.ui.assembly import RING_PT, _clear

    e = AssemblyExplorer(_screen(), DEPTHS, KS, BP)
    near = _screen().sort_values("ideal_speedup").plan.iloc[:4]     # the teacher and its neighbours
    for plan in near:
        e.custom.value = plan
        fig = e.figure()
        ax = fig.axes[0]
        label = next(t for t in ax.texts if t.get_text() == "teacher")
        x, y = next((x, y) for x, y, p, _ in fig.mtlab_points if p == plan)
        ext = label.get_window_extent(fig.canvas.get_renderer())
        assert _clear(ext, (x, fig.bbox.height - y), RING_PT * fig.dpi / 72), plan


def test_merge_burst_is_drawn_once_for_its_last_state():
    m = _merge(background=True, delay=0.05)
    assert m.wait(30)
    seen, captions = [], []
    m.readout.observe(lambda ch: seen.append(ch["new"]), names="value")
    m.caption.observe(lambda ch: captions.append(ch["new"]), names="value")
    renders, c = m.renders, m.controls
    with m._lock:                            # the worker cannot draw while the burst arrives
        for v in [(1, 5), (2, 5), (2, 4), (0, 4)]:
            c["encoder"]["range"].value = v
        c["decoder"]["on"].value = True
        c["decoder"]["method"].value = "vanilla"
    assert m.wait(30)
    final = ["encoder:0-4@middle/permute", "decoder:3-5@middle/vanilla"]
    assert m.specs() == final and m.renders == renders + 1        # one drawing, of the last state
    for text in seen:                                            # the read-out never showed another spec
        assert set(re.findall(r"(?:encoder|decoder):\d-\d@\w+/\w+", text)) <= set(final), text
    assert all("1-5" not in x and "2-4" not in x for x in captions)
    _assert_shows_controls(m)


def test_latest_worker_with_a_delay_computes_a_burst_once():
    done = []
    w = LatestWorker(done.append, delay=0.3)
    for x in range(5):
        w.submit(x)
    assert w.wait(30) and done == [4]


def test_merge_readout_says_before_recovery_and_gives_a_verdict():
    def evaluate(specs):
        pruned = any(s.startswith("prune") for s in specs)
        return {"params": _size(specs), "dev_per": 10.0 + (5.0 if pruned else 1.5 * len(specs)), "n": 32}

    m = _merge(evaluate=evaluate)
    text = m.readout.value
    assert "before recovery" in _row(m, "numbers")
    v = _row(m, "verdict (before recovery)")
    assert "merge better by 3.50 on dev PER %" in v and "parameters removed: merge 4.0%, pruning 6.0%" in v
    from mtlab.ui.merge import verdict
    assert verdict({"params": 100}, {"params": 90, "dev_bleu": 20.0}, {"params": 90, "dev_bleu": 25.0},
                   ["dev_bleu"], {}).startswith("layer pruning better by 5.00")   # higher BLEU is better
    assert "LARGER" not in text


def test_static_copies_hide_while_their_live_explorer_is_on_the_page(explorer):
    e = explorer
    copy = e.static_copy()
    html_ = copy._repr_mimebundle_()["text/html"]
    assert f".jp-Notebook:has(.mtlab-live-{e.token}) .mtlab-static-{e.token}{{display:none}}" in html_
    assert f"mtlab-live-{e.token}" in e.widget._dom_classes and "data:image/png;base64," in html_
    m = _merge()
    assert m.token != e.token and f"mtlab-live-{m.token}" in m.widget._dom_classes
    mc = m.static_copy()._repr_mimebundle_()["text/html"]
    assert "encoder:3-5@middle/permute" in mc and "before recovery" in mc and f"mtlab-static-{m.token}" in mc


def test_export_without_a_model_or_folder_says_why(explorer, tmp_path):
    e = explorer
    e.export_dir.value = ""
    assert e.export() is None and "type a folder" in e.export_out.value
    assert e.export(tmp_path / "x") is None and "build=" in e.export_out.value and not (tmp_path / "x").exists()


def test_a_stack_that_is_one_module_of_ten_or_more_layers_reads_back():
    """str(Plan) writes one 12-module as 'e=12,' (it reads back as itself); a user typing 'e=12' for a 12-layer
    stack also means the one module (Plan.parse alone reads spans 1 and 2): the explorer reads both."""
    from mtlab.modular.plan import Plan
    from mtlab.ui.assembly import parse_plan

    depths, ks = {"encoder": 12, "decoder": 12}, {"encoder": (2, 3, 4, 6, 12), "decoder": (2, 3, 4, 6, 12)}
    plan = Plan.of({"encoder": (12,), "decoder": (3, 1, 4, 2, 1, 1)})
    assert str(plan) == "e=12, d=314211" and parse_plan(str(plan), depths) == plan == Plan.parse(str(plan))
    assert parse_plan("e=12 d=314211", depths) == plan
    assert parse_plan("e=1,2,1,8 d=111111111111", depths).stack("encoder") == (1, 2, 1, 8)
    rows = [{"plan": str(p), "params": 1, "ratio": 1.0, "ideal_speedup": x, "nll": x, "token_acc": 0.5}
            for p, x in ((Plan.teacher(depths), 1.0), (plan, 3.0))]
    e = AssemblyExplorer(pd.DataFrame(rows), depths, ks, {"encoder": 10, "decoder": 10})
    e.best.click()
    assert e.plan == plan and e.error.value == "" and e.custom.value == "e=12, d=314211"
