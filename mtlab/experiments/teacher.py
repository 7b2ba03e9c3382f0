"""The bundled teacher's study (notebook 00): its data and scores as tables, and the written result.

Notebook 00 shows the words per split as a table (not only in a profile print-out) and ends with
`conclusion`, computed from the scores it measured.
"""
from __future__ import annotations

import pandas as pd


def split_table(task) -> pd.DataFrame:
    """Words per split of the teacher's task (`task.sizes()`), one row per split with its share."""
    sizes = pd.Series(task.sizes(), name="words")
    return pd.DataFrame({"split": sizes.index, "words": sizes.values, "words_frac": sizes.values / sizes.sum()})


def conclusion(scores: pd.DataFrame, sizes: dict[str, int] | None = None, parameters: int | None = None) -> str:
    """What the teacher evaluation says (markdown bullets): PER/WER per split on how many words, and
    the gap between dev and test, from `scores` (one row per split: split, n, per, wer)."""
    missing = {"split", "per", "wer"} - set(scores.columns)
    if missing:
        raise ValueError(f"conclusion needs the columns {sorted(missing)} (task.evaluate rows, one per split)")
    lines = []
    if parameters:
        lines.append(f"The teacher has {parameters / 1e6:.2f} M parameters.")
    if sizes:
        lines.append("Words per split: " + ", ".join(f"{k} {v:,}" for k, v in sizes.items()) + ".")
    by = scores.set_index("split")
    for split, r in by.iterrows():
        n = f" on {int(r['n']):,} words" if "n" in by.columns and pd.notna(r["n"]) else ""
        lines.append(f"{split}: {r.per:.1f}% PER, {r.wer:.1f}% WER{n} (greedy decoding).")
    if {"dev", "test"} <= set(by.index):
        gap = by.loc["test", "wer"] - by.loc["dev", "wer"]
        lines.append(f"Test WER is {abs(gap):.1f} points {'above' if gap > 0 else 'below'} dev WER"
                     + (": dev is a fair guide for choosing models." if abs(gap) < 2 else
                        ": choices made on dev may not carry over exactly."))
    return "\n".join(f"- {x}" for x in lines)


__all__ = ["split_table", "conclusion"]
