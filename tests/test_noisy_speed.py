"""Timings that know when they are wrong (issue #23): a planted noisy timer makes speed-ups whose
rounds disagree, or that are implausible against their FLOP-ideal, which are measured again, and if
they stay suspect are marked `speed_noisy`, kept off the frontier and out of the conclusions, and
never printed as a plain number. No real timing is asserted: the clock is scripted."""
from __future__ import annotations

import copy
import itertools
import re
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from mtlab import measure
from mtlab.explore.frontier import mark_frontiers, noisy_speed
from mtlab.ui.tables import fmt


def plant_clock(monkeypatch, scripts: dict) -> dict:
    """Replace the timer measure.py uses: each model's `blocked_autorange` returns the next seconds of
    its script (keyed by the Timer's sub_label, the model's name). Returns the calls per model."""
    clocks = {k: iter(v) for k, v in scripts.items()}
    calls = dict.fromkeys(scripts, 0)

    class Timer:
        def __init__(self, stmt=None, globals=None, sub_label=None, **kw):
            self.name = sub_label

        def blocked_autorange(self, min_run_time=0.2):
            calls[self.name] += 1
            t = next(clocks[self.name])
            return SimpleNamespace(median=t, times=[t])

    monkeypatch.setattr(measure, "benchmark", SimpleNamespace(Timer=Timer))
    return calls


SCRIPTS = {
    "teacher": itertools.repeat(1.0),
    "steady": itertools.repeat(0.5),                          # 2.0x, rounds agree
    "noisy": itertools.cycle([0.5, 0.1, 2.0, 0.3]),           # rounds never agree
    "implausible": itertools.repeat(0.1),                     # 10x, FLOPs allow 4.1x
    "burst": itertools.chain([0.5, 2.0, 0.5], itertools.repeat(0.5)),  # one slow round, then quiet
}
IDEAL = {"teacher": 1.0, "steady": 2.2, "noisy": 2.2, "implausible": 4.1, "burst": 2.2}


@pytest.fixture
def noisy_latency(monkeypatch, g2p_task):
    calls = plant_clock(monkeypatch, dict(SCRIPTS))
    models = {name: torch.nn.Linear(1, 1) for name in SCRIPTS}
    lat = measure.latency(models, g2p_task, batch_sizes=(1, 4), max_new_tokens=3, rounds=3, ideal=IDEAL)
    return lat, calls


def test_suspect_speedups_are_remeasured_and_marked(noisy_latency):
    lat, calls = noisy_latency
    b1 = lat[lat.batch_size == 1].set_index("model")
    assert not b1.loc["steady"].speed_noisy and b1.loc["steady"].speedup_vs_first == pytest.approx(2.0)
    assert b1.loc["steady"].attempts == 1 and b1.loc["steady"].speedup_spread == 0
    assert b1.loc["noisy"].speed_noisy and b1.loc["noisy"].speedup_spread > measure.NOISY_SPREAD
    assert b1.loc["noisy"].attempts == 1 + measure.RETRIES and "rounds disagree" in b1.loc["noisy"].speed_note
    assert b1.loc["implausible"].speed_noisy and "4.10x FLOP-ideal" in b1.loc["implausible"].speed_note
    assert "quiet machine" in b1.loc["implausible"].speed_note
    # a burst in one pass: measured again, the quiet pass kept, not marked
    assert not b1.loc["burst"].speed_noisy and b1.loc["burst"].attempts == 2
    assert b1.loc["burst"].speedup_vs_first == pytest.approx(2.0)
    assert not lat[lat.model == "teacher"].speed_noisy.any()
    assert lat.speedup_spread.notna().all()
    # steady models were timed in the first pass only (3 rounds x 2 batch sizes)
    assert calls["steady"] == 6 and calls["noisy"] == 2 * 3 * (1 + measure.RETRIES)


def frontier_rows(lat) -> pd.DataFrame:
    wer = {"teacher": 10.0, "steady": 14.0, "noisy": 11.0, "implausible": 12.0, "burst": 15.0}
    rows = [{"kind": "teacher" if n == "teacher" else "modules", "plan": n, "params": 100 - i, "test_wer": wer[n],
             **measure.speed_columns(lat, n)} for i, n in enumerate(SCRIPTS)]
    return mark_frontiers(pd.DataFrame(rows), speed="speedup_b4")


def test_noisy_rows_stay_off_the_frontier_and_out_of_conclusions(noisy_latency):
    from mtlab.experiments.explore import conclusion

    lat, _ = noisy_latency
    f = frontier_rows(lat).set_index("plan")
    assert list(noisy_speed(f.reset_index())) == [False, False, True, True, False]
    assert f.speed_noisy.loc["noisy"] and "batch 1" in f.speed_note.loc["noisy"]
    # both noisy rows decode better than `steady` at a claimed higher speed: without the mark they would lead
    assert not f.on_frontier.loc["noisy"] and not f.on_frontier.loc["implausible"] and f.on_frontier.loc["steady"]
    text = conclusion(f.reset_index(), speedups=(2.0,), speed="speedup_b4")
    assert "decodes best (steady" in text
    assert "too noisy to compare (2): modules noisy, modules implausible" in text and "quiet machine" in text


def _cells(html: str) -> list[list[str]]:
    return [re.findall(r"<td[^>]*>(.*?)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", html, re.S)[1:]]


def test_a_noisy_speedup_is_never_printed_as_a_plain_number(noisy_latency):
    lat, _ = noisy_latency
    f = frontier_rows(lat)
    cells = {row[0]: row[1:] for row in _cells(fmt(f, ["plan", "speedup_b4", "speedup_b1"]).to_html())}
    number = re.compile(r"^-?\d+(\.\d+)?$")
    for plan in ("noisy", "implausible"):
        assert all(not number.match(c) and c.startswith("noisy") for c in cells[plan]), cells[plan]
    assert cells["implausible"][0] == "noisy (10.00?)"
    assert cells["steady"] == ["2.00", "2.00"]


def test_the_modular_table_marks_a_noisy_row(monkeypatch, g2p_task, tiny_t5):
    from mtlab.candidate import Candidate
    from mtlab.experiments.modular import QUALITY, evaluate_candidates
    from mtlab.profiles import ModularProfile

    twin, other = copy.deepcopy(tiny_t5), copy.deepcopy(tiny_t5)   # same FLOPs: FLOP-ideal 1.0x
    scores = dict.fromkeys(QUALITY, 1.0)
    cands = [Candidate("teacher", "t", tiny_t5, scores=scores), Candidate("modules", "fast?", twin, scores=scores),
             Candidate("modules", "same", other, scores=scores)]
    plant_clock(monkeypatch, {str(id(tiny_t5)): itertools.repeat(1.0), str(id(twin)): itertools.repeat(0.1),
                              str(id(other)): itertools.repeat(1.0)})
    p = ModularProfile(latency_batches=(1, 4), latency_words=4, latency_seconds=0.01, latency_rounds=3, eval_limit=4)
    t = evaluate_candidates(cands, tiny_t5, g2p_task, p, progress=False).set_index("plan")
    assert t.speed_noisy.loc["fast?"] and not t.speed_noisy.loc["same"] and not t.speed_noisy.loc["t"]
    assert "1.00x FLOP-ideal" in t.speed_note.loc["fast?"]
    assert {"speedup_b1_spread", "speedup_b4_spread"} <= set(t.columns)
    shown = fmt(t.reset_index(), ["plan", "speedup_b4"]).to_html()
    assert "noisy (10.00?)" in shown and ">10.00<" not in shown
