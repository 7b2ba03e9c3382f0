"""The decoding diagnosis: edits add up to PER, lengths and stopping are what the outputs show."""
import pandas as pd
import pytest

from mtlab.tasks.diagnosis import diagnose, looping_share
from mtlab.tasks.g2p import per_wer


def frame(refs, hyps, ended=None):
    return pd.DataFrame({"reference": refs, "hypothesis": hyps, "ended": ended or [True] * len(refs)})


def test_edit_rates_add_up_to_per():
    refs = ["HH AH0 L OW1", "K AE1 T", "D AO1 G"]
    hyps = ["HH AH0 L OW1 OW1", "K AE1", "B AO1 G"]
    d = diagnose(frame(refs, hyps))
    per = per_wer([h.split() for h in hyps], [r.split() for r in refs])["per"]
    assert d["sub"] + d["ins"] + d["del"] == pytest.approx(per)
    assert d["ins"] == pytest.approx(100 / 10) and d["del"] == pytest.approx(100 / 10) and d["sub"] == pytest.approx(100 / 10)
    assert d["len_ratio"] == pytest.approx(10 / 10) and d["eos_rate"] == 1.0


def test_empty_hypothesis_is_all_deletions_and_empty_reference_is_refused():
    d = diagnose(frame(["K AE1 T"], [""], [False]))
    assert d["del"] == pytest.approx(100.0) and d["len_ratio"] == 0 and d["eos_rate"] == 0
    with pytest.raises(ValueError, match="empty"):
        diagnose(frame([""], ["K"]))
    with pytest.raises(ValueError, match="empty"):
        diagnose(frame([], []))


def test_looping_share_counts_outputs_stuck_in_a_repeat():
    f = frame(["A B", "A B", "A B"], ["A B C D C D C D", "A B C D C D C D", "A B"], [False, True, False])
    assert looping_share(f) == pytest.approx(1 / 3)  # the second ended with EOS: not stuck


def test_predict_reports_whether_each_output_ended(g2p_task):
    from mtlab.teacher import load_teacher

    teacher, task = load_teacher()
    pred = task.predict(teacher, "dev", limit=16, progress=False, ended=True)
    assert pred.ended.all()
    short = task.predict(teacher, "dev", limit=16, progress=False, max_new_tokens=2, ended=True)
    assert not short.ended.any() and diagnose(short)["eos_rate"] == 0
