"""One word set per comparison (issue 27 item 1): rows compared with each other are scored on the same
words, and a table that mixes them within one comparison is refused, not silently compared."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from mtlab.ui.compare import check_same_words, word_sets

COLUMNS = ["model", "method", "stack", "layers", "params_removed_frac", "recovery_steps", "test_wer", "test_per",
           "mean_cos", "dev_n", "test_n"]


def issue_table() -> pd.DataFrame:
    """The default report's shape: single windows and the original on the first 1,000 test words, the
    shipped combined candidates on all 5,836, where the original scores 39.9% (41.9% on the 1,000)."""
    rows = [("teacher", "original", "-", "-", 0.0, 0, 41.9, 11.5, None, 300, 1000),
            ("teacher", "original", "-", "-", 0.0, 0, 39.9, 10.7, None, 5839, 5836),
            ("teacher", "permute", "encoder", "1-3", 0.05, 50, 43.0, 12.0, None, 300, 1000),
            ("teacher", "layer_prune", "encoder", "1-3", 0.08, 50, 45.0, 13.0, None, 300, 1000),
            ("teacher", "permute", "encoder+decoder", "encoder:1-3 decoder:1-3", 0.10, 0, 44.0, 12.5, None, 5839, 5836),
            ("teacher", "permute", "encoder+decoder", "encoder:1-3 decoder:1-3", 0.10, 1000, 40.7, 11.0, None, 5839, 5836),
            ("teacher", "vanilla", "encoder+decoder", "encoder:1-3 decoder:1-3", 0.10, 1000, 41.5, 11.2, None, 5839, 5836),
            ("teacher", "layer_prune", "encoder+decoder", "encoder:1-3 decoder:1-3", 0.16, 1000, 42.0, 11.6, None, 5839,
             5836),
            ("minilm", "original", "-", "-", 0.0, 0, None, None, 1.0, 200, 300),
            ("minilm", "permute", "layers", "2-4", 0.10, 0, None, None, 0.80, 200, 300),
            ("minilm", "layer_prune", "layers", "2-4", 0.25, 0, None, None, 0.90, 200, 300)]
    return pd.DataFrame(rows, columns=COLUMNS)


def test_check_same_words_refuses_a_comparison_that_mixes_word_sets():
    t = issue_table()
    teacher = t[t.model == "teacher"]
    with pytest.raises(ValueError, match=r"mixes rows scored on different words.*test_n=1,000.*test_n=5,836"):
        check_same_words(teacher)
    with pytest.raises(ValueError, match="mixes.*dev_n=300.*dev_n=5,839"):
        check_same_words(teacher.assign(test_n=1000), ["test_n", "dev_n"])
    same = teacher[teacher.test_n == 5836]
    assert check_same_words(same) is same
    assert check_same_words(same.assign(test_n=same.test_n.where(same.method != "vanilla"))) is not None  # NaN: unscored
    with pytest.raises(ValueError, match="needs the column.*test_n"):
        check_same_words(teacher.drop(columns="test_n"))
    assert word_sets(teacher) == [5836, 1000]


def test_conclusion_compares_each_candidate_with_the_original_on_its_words():
    from mtlab.experiments.merging import conclusion

    text = conclusion(issue_table())
    lines = text.splitlines()
    assert "41.9% WER / 11.5% PER on 1,000 test words and 39.9% WER / 10.7% PER on 5,836 test words" in lines[0]
    combined = next(x for x in lines if x.startswith("- encoder+decoder, 6 layers"))
    # permute after recovery is 0.8 points WORSE than the original on the same words, not better than 41.9
    assert "5,836 test words" in combined and "+0.8 points against the original's 39.9% on these words" in combined
    assert "41.9" not in combined
    window = next(x for x in lines if x.startswith("- encoder, 3 layers"))
    assert "1,000 test words" in window and "original's 41.9%" in window and "39.9" not in window


def test_conclusion_states_merge_against_layer_pruning_and_how_rows_are_chosen():
    from mtlab.experiments.merging import conclusion

    text = conclusion(issue_table())
    assert "lowest dev PER" in text and "on 300 dev words" in text and "ranked by test WER" in text
    base = [x for x in text.splitlines() if "Merge against layer pruning, the baseline" in x]
    assert len(base) == 2  # one per word set
    full = next(x for x in base if "5,836 test words" in x)
    assert "after 1,000 recovery steps" in full and "**merging** is 1.3 points better" in full
    assert "permute (encoder:1-3 decoder:1-3), 40.7% WER / 11.0% PER" in full and "42.0% / 11.6%" in full
    worse = issue_table()
    worse.loc[(worse.method == "layer_prune") & (worse.test_n == 5836), "test_wer"] = 40.0
    assert "**layer pruning** is 0.7 points better" in conclusion(worse)


def test_conclusion_refuses_a_table_without_word_counts():
    from mtlab.experiments.merging import conclusion

    with pytest.raises(ValueError, match="test_n"):
        conclusion(issue_table().drop(columns="test_n"))


def test_quality_plot_draws_each_original_line_on_its_own_words():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mtlab.experiments.merging import quality_plot

    t = issue_table()
    t = t[t.model == "teacher"]
    fig = quality_plot(t, metrics=("test_wer",))
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == ["5,836 test words", "1,000 test words"]
    dashed = [[ln.get_ydata()[0] for ln in ax.get_lines() if ln.get_linestyle() == "--"] for ax in axes]
    assert dashed == [[39.9], [41.9]]
    plt.close(fig)


def test_shipped_teacher_reads_the_scores_on_the_cards_words(tmp_path):
    from mtlab.candidate import Candidate, CompressionSpec
    from mtlab.experiments.merge_artifacts import shipped_teacher

    c = Candidate("permute", CompressionSpec.parse("encoder:1-3/permute"), info={"compare": "equal FF sublayers"})
    assert shipped_teacher(c, tmp_path) is None
    (tmp_path / "permute-equal-ff").mkdir()
    scores = {"dev_wer": 39.4, "dev_n": 5839, "test_wer": 39.9, "test_per": 10.7, "test_n": 5836}
    (tmp_path / "permute-equal-ff" / "card.json").write_text(json.dumps({"teacher": scores}))
    assert shipped_teacher(c, tmp_path) == scores


def test_minilm_chosen_says_how_many_sentences():
    from mtlab.experiments.merging import minilm_chosen

    raw = pd.DataFrame({"kind": ["original", "merge"], "size": [0, 2], "method": ["none", "permute"], "best": [False, True],
                        "layers": [None, "1-2"], "params_removed_frac": [0.0, 0.1], "cosine": [1.0, 0.9],
                        "test_cosine": [1.0, 0.8], "test_recall_at_10": [1.0, 0.7]})
    raw.attrs["details"] = {"sentences": {"align": 500, "dev": 200, "test": 300}}
    out = minilm_chosen(raw)
    assert list(out.columns) == ["layers", "method", "params_removed_frac", "dev_cosine", "dev_n", "test_cosine",
                                 "test_recall_at_10", "test_n"]
    assert set(out.dev_n) == {200} and set(out.test_n) == {300}
