"""One word set per comparison: rows compared with each other must be scored on the same words.

A table of mtlab carries, per row, how many words (sentences, for MiniLM) each split was scored
on (`dev_n`, `test_n`, or `split` and `n`). A comparison (a line in a plot, a gap in a conclusion)
between rows of different n compares different test sets: the original teacher scores 41.9% WER
on the first 1,000 test words and 39.9% on all 5,836, so a merge scored on all of them would look
better than the original when it is worse. `check_same_words` refuses such a comparison.
"""
from __future__ import annotations

import pandas as pd

__all__ = ["check_same_words", "word_sets"]


def check_same_words(df: pd.DataFrame, cols=("test_n",), *, what: str = "this comparison") -> pd.DataFrame:
    """`df` unchanged when every row has the same value in each of `cols` (the number of words it was
    scored on; rows with no score, NaN, are ignored); otherwise a ValueError naming the values, the
    rows of each, and the fix. A missing column raises too: a row that does not say on how many
    words it was scored cannot be compared."""
    if isinstance(cols, str):
        cols = [cols]
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ValueError(f"{what} needs the column(s) {missing} (how many words each row was scored on), and the "
                         f"table has {list(df.columns)}: build it with the functions of mtlab.experiments, which "
                         "write dev_n/test_n on every row")
    for c in cols:
        values = df[c].dropna()
        if values.nunique() > 1:
            where = "; ".join(f"{c}={v:,.0f}: {len(g)} row(s)" + (f" ({', '.join(map(str, g['method'].head(4)))})"
                                                                 if "method" in g else "")
                              for v, g in df.loc[values.index].groupby(c))
            raise ValueError(f"{what} mixes rows scored on different words ({where}): compare only rows of the same "
                             f"{c} (group by it, or score the other rows on the same words, e.g. the original on the "
                             "full split as the shipped cards are)")
    return df


def word_sets(df: pd.DataFrame, col: str = "test_n") -> list:
    """The distinct word counts of `col` in `df`, largest first (NaN left out)."""
    return sorted(df[col].dropna().unique(), reverse=True) if col in df.columns else []
