"""mtlab.experiments.merging: the merge.csv rows in the smoke profile, and the artifact cache
(reused on a second call; another teacher or profile gets another key)."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from mtlab.cache import config_hash
from mtlab.experiments import merging as X
from mtlab.profiles import get_profile
from mtlab.teacher import TEACHER_DIR

METHODS = {"original", "permute", "vanilla", "layer_prune"}
STEPS = get_profile("smoke").merging.recovery_steps


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        d = tmp_path_factory.mktemp("cache")
        mp.setenv("MTLAB_CACHE", str(d))
        yield d


@pytest.fixture(scope="module")
def table(cache_dir):
    return X.merge_csv("smoke", progress=False)


def test_merge_csv_has_the_columns_and_methods(table):
    assert list(table.columns) == X.COLUMNS
    assert set(table.model) == {"teacher", "minilm"}
    for model, g in table.groupby("model"):
        assert set(g.method) == METHODS | ({X.CONTROL} if model == "teacher" else set()), model
        assert (g.method == "original").sum() == 1
    t = table[table.model == "teacher"]
    assert set(t.recovery_steps) == {0, STEPS}
    assert t[t.method == X.CONTROL].recovery_steps.tolist() == [STEPS]  # the control of that one budget
    for method in METHODS - {"original"}:  # every method before and after the same recovery budget
        steps = t[t.method == method].groupby(["stack", "layers"]).recovery_steps.apply(set)
        assert all(s == {0, STEPS} for s in steps), method
    combined = t[t["stack"] == "encoder+decoder"]
    assert set(combined.method) == {"permute", "vanilla", "layer_prune"}
    assert (table[table.model == "minilm"].recovery_steps == 0).all()


def test_params_removed_frac_matches_params(table):
    cfg = json.loads((TEACHER_DIR / "config.json").read_text())
    ff = 2 * cfg["d_model"] * cfg["d_ff"]  # ReLU T5 FF: wi and wo, no bias
    for model, g in table.groupby("model"):
        n0 = g.loc[g.method == "original", "params"].item()
        np.testing.assert_allclose(g.params_removed_frac, 1 - g.params / n0, atol=1e-12)
        assert ((g.params_removed_frac >= 0) & (g.params_removed_frac < 1)).all()
        assert (g.loc[~g.method.isin(["original", X.CONTROL]), "params_removed_frac"] > 0).all()
        assert (g.loc[g.method == X.CONTROL, "params_removed_frac"] == 0).all()
    t = table[(table.model == "teacher") & (table["stack"] == "encoder+decoder")]
    n0 = table.loc[(table.model == "teacher") & (table.method == "original"), "params"].item()
    for method in ("permute", "vanilla"):  # the combined candidate ties away 4 of the 12 FF sublayers
        assert set(n0 - t[t.method == method].params) == {4 * ff}
    assert (n0 - t[t.method == "layer_prune"].params > 4 * ff).all()  # pruning drops attention too


def test_quality_columns_are_finite_where_they_apply(table):
    teacher, mini = table[table.model == "teacher"], table[table.model == "minilm"]
    for c in ("dev_per", "dev_wer", "test_per", "test_wer"):
        assert np.isfinite(teacher[c]).all() and (teacher[c] >= 0).all(), c
        assert mini[c].isna().all(), c
    for c in ("mean_cos", "recall_at_10"):
        assert np.isfinite(mini[c]).all() and mini[c].between(-1, 1).all(), c
        assert teacher[c].isna().all(), c
    orig = mini[mini.method == "original"].iloc[0]
    assert math.isclose(orig.mean_cos, 1, abs_tol=1e-5) and orig.recall_at_10 == 1


def test_every_row_says_its_words_and_every_word_set_has_its_original(table):
    """Issue 27: each row carries dev_n/test_n, and the original is scored on every test word set of the
    teacher's rows, so that each comparison has its original on the same words."""
    m = get_profile("smoke").merging
    teacher = table[(table.model == "teacher") & table.test_wer.notna()]
    assert {"dev_n", "test_n"} <= set(table.columns)
    assert teacher.test_n.notna().all() and teacher.dev_n.notna().all()
    assert set(teacher.test_n) == {m.eval_limit} and set(teacher.dev_n) == {m.select_limit}  # smoke: one word set
    for n in set(teacher.test_n):
        assert ((teacher.method == "original") & (teacher.test_n == n)).sum() == 1, n
    assert table[table.model == "minilm"].test_n.notna().all()
    text = X.conclusion(table)
    assert f"on {m.eval_limit:,} test words" in text and "Merge against layer pruning, the baseline" in text


def test_every_recovered_row_has_its_control_on_the_same_words(table):
    """Issue 22, item 10: the table has the original fine-tuned with the recovery config of its recovered rows,
    scored on the same dev and test words, and `vs_control` is each recovered row's test WER minus the control's."""
    t = table[table.model == "teacher"]
    ctl = t[t.method == X.CONTROL]
    assert len(ctl) == 1 and ctl.recovery_steps.item() == STEPS
    rec = t[(t.recovery_steps > 0) & (t.method != X.CONTROL)]
    assert set(rec.test_n) == set(ctl.test_n) and set(rec.dev_n) == set(ctl.dev_n)
    assert X.missing_controls(t).empty
    np.testing.assert_allclose(rec.vs_control, rec.test_wer - ctl.test_wer.item())
    assert t[t.recovery_steps == 0].vs_control.isna().all() and ctl.vs_control.isna().all()
    assert table[table.model == "minilm"].vs_control.isna().all()
    assert X.teacher_merge_table("smoke").attrs["details"]["recovery"]["steps"] == STEPS
    assert "the original fine-tuned the same way" in X.conclusion(table)


def test_the_original_is_added_on_the_shipped_cards_words(cache_dir, monkeypatch):
    """A shipped candidate (full splits) brings the teacher's scores on its words from its card: the table
    gets a second original row on those words, and the shipped rows keep theirs."""
    from mtlab.experiments import merge_artifacts as A

    full = {"dev_per": 11.0, "dev_wer": 39.4, "dev_n": 5839, "test_per": 10.7, "test_wer": 39.9, "test_n": 5836}

    def stages(c, m, root=None):
        return [{"params": 1, "ff_removed": 4, "blocks_removed": 0, "recovery_steps": s,
                 **{k: v + 1 for k, v in full.items() if not k.endswith("_n")}, "dev_n": 5839, "test_n": 5836}
                for s in (0, 1000)]

    monkeypatch.setattr(A, "shipped_stages", lambda c, m, root=None: stages(c, m) if c.info["kind"] == "combined"
                        else None)
    monkeypatch.setattr(A, "shipped_teacher", lambda c, root=None: dict(full))
    monkeypatch.setattr(A, "shipped_control", lambda m, root=None: None)  # the control: not shipped here
    monkeypatch.setattr("mtlab.shipped.shipped_state", lambda d: "planted")
    from dataclasses import replace

    smoke = get_profile("smoke")
    t = X.teacher_merge_table(replace(smoke, merging=replace(smoke.merging, shipped=True)), progress=False)
    orig = t[t.method == "original"].set_index("test_n")
    assert sorted(orig.index) == [get_profile("smoke").merging.eval_limit, 5836]
    assert orig.at[5836, "test_wer"] == 39.9 and orig.at[5836, "dev_n"] == 5839
    assert set(t[t.kind == "combined"].test_n) == {5836}


def test_second_call_reads_the_cache(table, cache_dir, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("recomputed although the table is cached")

    monkeypatch.setattr(X, "load_teacher", boom)
    monkeypatch.setattr(X, "window_search", boom)
    monkeypatch.setattr("mtlab.minilm.minilm_merge_vs_prune", boom)
    again = X.merge_csv("smoke", progress=False)
    pd.testing.assert_frame_equal(again, table)
    assert again.attrs["config"] == table.attrs["config"]
    assert str(cache_dir) in again.attrs["cache"]
    assert X.teacher_merge_table("smoke").attrs["details"]["recovery"]["steps"] == STEPS


def test_other_teacher_or_profile_gets_another_key(table, monkeypatch):
    base = X.config_for("teacher_merge", "smoke", teacher=X.teacher_hash())
    assert config_hash(base) != config_hash(X.config_for("teacher_merge", "smoke", teacher="0" * 12))
    assert config_hash(base) != config_hash(X.config_for("teacher_merge", "default", teacher=X.teacher_hash()))

    class Recomputed(Exception):
        pass

    def load(*a, **k):
        raise Recomputed

    monkeypatch.setattr(X, "load_teacher", load)
    monkeypatch.setattr(X, "teacher_hash", lambda: "0" * 12)  # other weights: the cached table is not reused
    with pytest.raises(Recomputed):
        X.teacher_merge_table("smoke", progress=False)


def test_equal_params_pruning_picks_the_closest_removal():
    rows = [("-", 0, "original", "none", 0, False)]
    for stack, removed in (("encoder", 400), ("decoder", 520)):
        rows += [(stack, 3, "1-3", m, 260, True) for m in ("permute", "vanilla")]
        rows += [(stack, 3, "1-3", "prune", removed, True)]
    search = pd.DataFrame(rows, columns=["stack", "size", "layers", "method", "params_removed", "best"])
    search["kind"] = search.method.map({"none": "original", "prune": "prune"}).fillna("merge")
    search["spec"] = [f"{m} {s}" if m == "prune" else f"{s}:1-3@middle/{m}" for s, m in zip(search["stack"], search.method)]
    search.loc[search.method == "prune", "spec"] = ["prune encoder:1-3", "prune decoder:1-3"]
    cands = X.candidates(search)
    equal = [c for c in cands if c.info["compare"] == "equal params"]
    assert len(equal) == 1 and X.spec_texts(equal[0]) == ["prune decoder:1-3"]  # 520 is closest to 2 x 260
    assert {c.method for c in cands if c.info["kind"] == "combined"} == {"permute", "vanilla", "layer_prune"}
