"""Reports read like a results section: formatted tables, computed conclusions, a headline index,
no machine paths in rendered notebooks."""
import re
from pathlib import Path

import pandas as pd
import pytest

from mtlab.ui.tables import fmt, label

REPO = Path(__file__).resolve().parent.parent


def cells(styler) -> list[list[str]]:
    """The displayed text of each body row of a Styler's HTML."""
    page = styler.to_html()
    rows = re.findall(r"<tr>(.*?)</tr>", page, flags=re.S)
    return [re.findall(r"<td[^>]*>([^<]*)</td>", r) for r in rows if "<td" in r]


def test_fmt_formats_by_quantity_and_labels_columns():
    df = pd.DataFrame({"method": ["permute", "layer_prune"], "params": [2769280, 1234567],
                       "params_removed_frac": [0.10437, 0.2], "test_wer": [15.829528, 7.0], "speedup_b64": [1.2345, 2.0],
                       "recovery_steps": [0.0, 200.0], "mean_cos": [0.987654, 0.5]})
    s = fmt(df)
    assert cells(s) == [["permute", "2.77", "10.4", "15.8", "1.23", "0", "0.988"],
                        ["layer_prune", "1.23", "20.0", "7.0", "2.00", "200", "0.500"]]
    page = s.to_html()
    for text in ("params (M)", "params removed (%)", "test WER (%)", "speed-up, batch 64 (x)", "recovery steps"):
        assert f">{text}</th>" in page, text
    assert "overflow-x:auto" in page and "max-width:100%" in page
    assert label("test_per@200") == "test PER (%) @200"


def test_fmt_keeps_only_the_columns_asked_and_names_a_missing_one():
    df = pd.DataFrame({"a": [1], "test_wer": [3.14159]})
    assert cells(fmt(df, ["test_wer"])) == [["3.1"]]
    with pytest.raises(KeyError, match="nope"):
        fmt(df, ["nope"])


def test_fmt_formats_every_unit_and_says_why_a_value_is_missing():
    """Issue 27 item 4: learning rates as 1e-4 (not 0.000), seconds with the digits that matter, shares
    (EOS rate, loops) as percent, WER gaps in points, metrics of a ratio (`dev_per_1.5x`) as percent, and a
    missing value as its reason, never "NaN" or blank."""
    df = pd.DataFrame({"plan": ["a", "b"], "recovery_lr": [1e-4, 2.5e-4], "train_seconds": [1234.5, 0.25],
                       "eos_rate": [0.9375, 1.0], "wer_gap": [2.34, -0.5], "dev_per_1.5x": [14.47, float("nan")],
                       "speedup_b64": [float("nan"), 1.5], "test_wer@50": [41.0, float("nan")],
                       "max_logit_diff": [1.2e-6, 0.0], "params_stored": [280000, 280000]})
    assert cells(fmt(df)) == [["a", "1e-4", "1,234", "93.8", "+2.3", "14.5", "not timed", "41.0", "1.2e-06", "0.28"],
                              ["b", "2.5e-4", "0.25", "100.0", "-0.5", "not scored", "1.50", "not run", "0", "0.28"]]
    page = fmt(df).to_html()
    for text in ("recovery lr", "EOS rate (%)", "WER gap (points)", "dev PER (%) at 1.5x", "params as stored (M)"):
        assert f">{text}</th>" in page, text
    assert cells(fmt(df[["plan", "speedup_b64"]], missing="timing skipped")) == [["a", "timing skipped"], ["b", "1.50"]]
    assert cells(fmt(pd.DataFrame({"target": [0.1]}), units={"target": "fraction"})) == [["10.0"]]
    shown = fmt(df, ["plan", "recovery_lr"], csv="x.csv").to_html()
    assert "2 of 2 rows, 2 of 10 columns" in shown and "<a href='x.csv'>x.csv</a>" in shown


def test_settings_replace_a_series_dump():
    from mtlab.profiles import get_profile
    from mtlab.ui.tables import settings

    page = settings(get_profile("smoke").merging, name="profile smoke").to_html()
    assert "dtype" not in page and "NaN" not in page and ">profile smoke</th>" in page
    assert ">3e-4<" in page or ">1e-4<" in page or ">5e-4<" in page  # recovery_lr as written in a config


def test_export_table_and_conclusion_show_unique_and_stored_parameters():
    """Issue 27 item 9: a merged model exported as plain transformers stores its tied FF weights as copies;
    the table and the conclusion give both counts instead of the stored one alone."""
    import torch

    from mtlab.experiments import your_model as ym

    class Task:
        primary_metric, higher_is_better = "ppl", False

    ladder = pd.DataFrame({"plan": ["layers=4"], "params": [280000], "params_ratio": [1.0], "stack_ratio": [1.0],
                           "ideal_speedup": [1.0], "dev_ppl": [10.0], "dev_tokens": [707]})
    table = pd.DataFrame({"model": ["original", "merged"], "params": [280000, 263500], "recovery_steps": [0, 0],
                          "dev_ppl": [10.0, 12.0]})
    merge = ym.MergeResult("layers:0-1@middle/permute", pd.DataFrame(), table, torch.nn.Linear(1, 1), pd.DataFrame())
    exported = pd.DataFrame({"model": ["merged layers:0-1"], "reload_with": ["GPT2LMHeadModel"],
                             "params_unique": [263500], "params_stored": [280000], "dev_ppl": [12.0],
                             "dev_ppl_reloaded": [12.0], "max_logit_diff": [0.0]})
    text = ym.conclusion(ladder, merge, pd.DataFrame({"plan": ["layers=4"], "on_frontier": [True]}), exported, Task())
    assert "tied weights are written as copies, so the folder holds 0.28 M parameters" in text
    assert "0.26 M unique parameters (5.9% fewer)" in text
    assert label("params_unique") == "unique params (M)" and label("params_stored") == "params as stored (M)"


def test_every_csv_names_the_share_removed_params_removed_frac():
    from mtlab.experiments import merging

    assert "params_removed_frac" in merging.COLUMNS
    raw = pd.DataFrame({"kind": ["original", "merge"], "size": [0, 2], "method": ["none", "permute"], "best": [False, True],
                        "layers": [None, "1-2"], "params_removed_frac": [0.0, 0.1], "cosine": [1.0, 0.9],
                        "test_cosine": [1.0, 0.8], "test_recall_at_10": [1.0, 0.7]})
    assert "params_removed_frac" in merging.minilm_chosen(raw).columns
    for path in [*(REPO / "mtlab").rglob("*.py"), *(REPO / "notebooks").glob("*.ipynb")]:
        named = [line for line in path.read_text().splitlines()
                 if re.search(r"[\"']params_removed_share[\"']", line) and "rename" not in line]
        assert not named, f"{path.name} names a column params_removed_share: {named}"


# ---------------------------------------------------------------------------
# conclusions from synthetic tables

def merge_table() -> pd.DataFrame:
    rows = [("teacher", "original", "-", "-", 0.0, 200, 10.0, 3.0, None),
            ("teacher", "permute", "encoder", "1-3", 0.10, 200, 12.0, 3.5, None),
            ("teacher", "vanilla", "encoder", "1-3", 0.10, 200, 14.0, 4.0, None),
            ("teacher", "layer_prune", "encoder", "1-3", 0.15, 200, 20.0, 6.0, None),
            ("teacher", "permute", "encoder", "1-3", 0.10, 0, 30.0, 9.0, None),
            ("minilm", "original", "-", "-", 0.0, 0, None, None, 1.0),
            ("minilm", "permute", "layers", "2-4", 0.10, 0, None, None, 0.80),
            ("minilm", "layer_prune", "layers", "2-4", 0.25, 0, None, None, 0.90)]
    return pd.DataFrame(rows, columns=["model", "method", "stack", "layers", "params_removed_frac", "recovery_steps",
                                       "test_wer", "test_per", "mean_cos"]).assign(test_n=1000)


def test_merge_conclusion_names_the_winner_and_the_margin():
    from mtlab.experiments.merging import conclusion

    text = conclusion(merge_table())
    assert "**permute** wins with 12.0% WER" in text and "2.0 points better" in text and "vanilla 14.0%" in text
    assert "layer pruning keeps the embeddings closer to the original than merging" in text
    assert "0.900 vs permute 0.800" in text
    flipped = merge_table().assign(mean_cos=lambda d: d.mean_cos.where(d.method != "layer_prune", 0.5))
    assert "**permute** merging keeps the embeddings closer" in conclusion(flipped)


def test_frontier_conclusion_names_the_best_kind_per_speedup():
    from mtlab.experiments.explore import conclusion

    f = pd.DataFrame({"kind": ["teacher", "modules", "layer_drop", "merge"], "plan": ["t", "e=22 d=22", "e=0,2", "m"],
                      "speedup_b64": [1.0, 2.1, 2.4, 1.2], "test_wer": [10.0, 15.0, 25.0, 11.0],
                      "on_frontier": [True, True, True, True]})
    text = conclusion(f, speedups=(2.0, 5.0))
    assert "At 2x or more, **modules** decodes best" in text and "10.0 points better than layer_drop" in text
    assert "No candidate reaches 5x" in text


def test_verdicts_use_the_speedups_and_wers_as_shown():
    """Issue 27 item 3: a plan whose ideal speed-up shows as "1.50" (1.4958) counts at 1.5x, as the reader
    sees it; two WERs that show the same are a tie, and a gap is the gap of the numbers shown."""
    from mtlab.experiments.explore import conclusion, screen_conclusion

    screen = pd.DataFrame({"plan": ["e=111111 d=111111", "e=2211 d=1122", "e=21111 d=222", "e=222 d=222"],
                           "ideal_speedup": [1.0, 1.4958, 1.52, 2.0], "nll": [0.10, 0.20, 0.25, 0.40],
                           "tf_word_acc": [0.9, 0.8, 0.78, 0.6]})
    text = screen_conclusion(screen, speedups=(1.5,))
    assert "best plan is **e=2211 d=1122** (1.50x)" in text and "e=21111 d=222" not in text
    f = pd.DataFrame({"kind": ["teacher", "modules", "sft"], "plan": ["t", "a", "b"],
                      "speedup_b64": [1.0, 1.996, 2.3], "test_wer": [10.0, 12.04, 12.16],
                      "on_frontier": [True, True, True]})
    text = conclusion(f, speedups=(2.0,))
    assert "**modules** decodes best (a, 2.00x): 12.0% test WER, 0.2 points better than sft (12.2%)" in text
    assert "tied with modules" in conclusion(f.assign(test_wer=[10.0, 12.04, 12.02]), speedups=(2.0,))
    shown_apart = conclusion(f.assign(test_wer=[10.0, 12.04, 12.06]), speedups=(2.0,))  # 12.0 vs 12.1: no tie
    assert "0.1 points better than sft (12.1%)" in shown_apart


def test_the_teacher_curve_leaves_the_backend_alone(monkeypatch):
    """Issue 27 item 5: `learning_curve_figure` switched matplotlib to Agg, so the inline backend of
    00_teacher's kernel never showed the curve (an empty "Training curve" section)."""
    import matplotlib
    import matplotlib.pyplot as plt

    from mtlab.report import learning_curve_figure
    from mtlab.teacher import TEACHER_DIR

    def no_switch(*a, **k):
        raise AssertionError("learning_curve_figure switched the matplotlib backend")

    monkeypatch.setattr(matplotlib, "use", no_switch)
    fig = learning_curve_figure(pd.read_csv(TEACHER_DIR / "training_log.csv"))
    assert len(fig.axes) == 2 and fig.axes[0].get_lines()
    plt.close(fig)


def test_explorers_say_they_are_live_in_a_kernel(monkeypatch):
    """Issue 27 item 5: on a rendered page the explorers are blank; the library says so in the cell's output."""
    import IPython
    import IPython.display

    from mtlab.experiments.explore import live_note

    assert live_note("assembly explorer") is None  # no kernel: nothing shown
    shown = []

    class Shell:
        kernel = object()

    monkeypatch.setattr(IPython, "get_ipython", lambda: Shell())
    monkeypatch.setattr(IPython.display, "display", lambda obj: shown.append(obj.data))
    text = live_note("merge-set explorer")
    assert shown == [text] and "live" in text and "JupyterLab" in text and "static copy" in text
    assert "merge-set explorer" in text


def test_similarity_screen_and_teacher_conclusions():
    from mtlab.experiments.explore import screen_conclusion
    from mtlab.experiments.merging import similarity_conclusion
    from mtlab.experiments.teacher import conclusion

    summary = pd.DataFrame({"model": "teacher", "measure": "cka", "point": ["ff_out", "attn_out"],
                            "stack": "encoder", "adjacent_mean": [0.8, 0.4], "all_pairs_mean": [0.6, 0.2]})
    assert "in 1 of 1 stacks" in similarity_conclusion(summary) and "0.80 vs attention outputs 0.40" in \
        similarity_conclusion(summary)
    screen = pd.DataFrame({"plan": ["e=11 d=11", "e=2 d=2", "e=2 d=11"], "ideal_speedup": [1.0, 2.0, 1.4],
                           "nll": [0.1, 0.5, 0.2], "tf_word_acc": [0.9, 0.5, 0.8]})
    assert "best plan is **e=2 d=2**" in screen_conclusion(screen, speedups=(2.0,))
    scores = pd.DataFrame({"split": ["dev", "test"], "n": [100, 120], "per": [3.0, 3.2], "wer": [12.0, 12.5]})
    text = conclusion(scores, {"train": 1000, "dev": 100, "test": 120}, 2769280)
    assert "2.77 M parameters" in text and "test: 3.2% PER, 12.5% WER on 120 words" in text
    assert "train 1,000" in text


# ---------------------------------------------------------------------------
# the index page

def test_index_opens_with_the_headline_tables_and_fetches_nothing(tmp_path):
    from mtlab.notebooks import write_index

    merge_table().to_csv(tmp_path / "merge.csv", index=False)
    pd.DataFrame({"kind": ["teacher", "modules"], "plan": ["t", "e=22 d=22"], "params": [2769280, 1500000],
                  "speedup_b64": [1.0, 2.0], "speedup_b1": [1.0, 1.8], "test_wer": [10.0, 15.0],
                  "test_per": [3.0, 4.0], "on_frontier": [True, True]}).to_csv(tmp_path / "frontier.csv", index=False)
    runs = pd.DataFrame([{"notebook": "04_merge_ffs", "seconds": 3.0, "status": "ok"}])
    page = write_index(tmp_path, runs, "smoke").read_text()
    assert page.index("Merging FF sublayers") < page.index("04_merge_ffs.html")  # results above the links
    assert "**permute** wins" not in page and "<b>permute</b> wins" in page
    assert ">test WER (%)</th>" in page and ">1.50</td>" in page  # frontier params in M
    assert "No modular.csv" in page  # a missing CSV degrades to a line, not an error
    assert "http" not in page


# ---------------------------------------------------------------------------
# one notebook rendered in the smoke profile through make report's engine

@pytest.mark.timeout(3600)
def test_smoke_rendered_notebook_shows_no_machine_path(smoke_report):
    from mtlab.cache import cache_root

    tmp_path = smoke_report  # every notebook rendered once per session (conftest.py)
    page = (tmp_path / "00_teacher.html").read_text()
    curve = page[page.index("Training curve"):page.index("Phone and word error rates")]
    assert "<img" in curve, "the training curve is not shown"  # issue 27 item 5
    assert "## Conclusion" not in page and "Conclusion" in page and "Words per split" in page
    for root in (str(REPO), str(tmp_path), str(cache_root())):
        assert root not in page, f"{root} shown in the rendered notebook"
    assert "PosixPath" not in page and "Warning" not in page


def modular_rows() -> pd.DataFrame:
    """A modular table with the shipped bank's and baselines' test numbers (README, issue #12)."""
    rows = [("teacher", "e=111111 d=111111", 1.0, 39.9, 10.7, 1.000, 1.00),
            ("modules", "e=111111 d=11112", 1.1, 40.6, 10.9, 0.988, 1.00),
            ("modules", "e=1122 d=1122", 1.5, 42.4, 11.8, 0.959, 1.00),
            ("modules", "e=222 d=222", 2.0, 43.3, 12.0, 0.943, 1.00),
            ("modules", "e=33 d=33", 3.0, 47.2, 14.5, 0.879, 1.00),
            ("modules", "e=33 d=6", 4.2, 53.3, 28.6, 0.777, 1.07),
            ("sft", "4 per stack", 1.5, 40.1, 10.8, 0.997, 1.00),
            ("layer_drop", "3 per stack", 2.0, 41.8, 11.4, 0.969, 1.00),
            ("sft", "2 per stack", 3.0, 46.2, 13.1, 0.895, 1.00),
            ("layerdrop", "4 per stack", 1.5, 42.3, 11.7, 0.961, 1.00),
            ("layerdrop", "every other layer", 2.0, 47.3, 14.0, 0.877, 0.99)]
    df = pd.DataFrame(rows, columns=["method", "plan", "ratio", "test_wer", "test_per", "rel_word_acc", "len_ratio"])
    runs = [0, 1, 0, 0, 0, 0, 1, 1, 1, 0, 1]  # modules and layerdrop: one run each, counted on one row
    return df.assign(train_runs=runs, train_steps=[20000 * r for r in runs], train_seconds=[60.0 * r for r in runs])


def test_modular_targets_say_what_is_met_and_missed():
    from mtlab.experiments.modular import conclusion, targets

    t = targets(modular_rows(), {"ratio": 1.10, "batch_size": 64})
    acc = t[t.target.str.startswith("rel_word_acc")].set_index("ratio")
    assert acc.ok.to_dict() == {1.1: False, 1.5: True, 2.0: True, 3.0: True}
    assert acc.loc[1.1, "reached"] == pytest.approx(0.988) and acc.loc[1.1, "need"] == 0.99
    gaps = t[t.target.str.startswith("modules - best baseline")]
    assert len(gaps) == 6 and not gaps.ok.any()
    assert gaps.set_index(["ratio", "target"]).loc[(2.0, "modules - best baseline, test WER <="), "reached"] == \
        pytest.approx(1.5)
    assert set(gaps.detail) == {"sft 4 per stack", "layer_drop 3 per stack", "sft 2 per stack"}
    length = t[t.target.str.startswith("worst |length")].iloc[0]
    assert length.ok and length.reached == pytest.approx(0.07) and length.detail == "e=33 d=6: 1.07"
    assert t[t.target.str.startswith("replacing step")].iloc[0].ok
    assert not targets(modular_rows().assign(len_ratio=1.2)).iloc[-1].ok
    text = conclusion(modular_rows())
    assert "At 2x the modules (e=222 d=222) lose to the best baseline (layer_drop 3 per stack)" in text
    assert "Relative word accuracy at 1.1x: 0.988 (target 0.99: missed)." in text
    assert "no decoder collapses" in text
    assert ("Against layerdrop, which also trains ONCE for every ratio: at 1.5x the modules lose to it (42.4 vs 42.3% WER, "
            "11.8 vs 11.7% PER); at 2x the modules beat it (43.3 vs 47.3% WER, 12.0 vs 14.0% PER).") in text
    assert "Against sft" not in text
