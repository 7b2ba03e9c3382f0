"""Tables formatted for reading: one number format and one label per quantity, wherever shown.

A raw DataFrame prints 15.829528 and `params_removed_frac`; a report wants "15.8" under
"test WER (%)". `fmt(df)` returns a pandas Styler that formats each column by what it holds
(recognised from its name, the same names every CSV of mtlab uses) and keeps the table inside
the page (it scrolls sideways instead of running off it). The notebooks display their tables
through it and `mtlab.notebooks.write_index` builds the headline tables with `table_html`.
"""
from __future__ import annotations


import pandas as pd

FIT = "display:block; max-width:100%; overflow-x:auto; border-collapse:collapse; font-size:0.9em"

# metric names spelled as in the papers
ACRONYMS = {"per": "PER", "wer": "WER", "nll": "NLL", "cka": "CKA", "ff": "FF", "b1": "batch 1", "b64": "batch 64",
            "acc": "accuracy", "tf": "teacher-forced", "cos": "cosine", "n": "n"}
LABELS = {"params": "params (M)", "params_removed": "params removed (M)", "params_removed_frac": "params removed (%)",
          "ratio": "ratio (x)", "ideal_speedup": "ideal speed-up (x)", "speedup_b1": "speed-up, batch 1 (x)",
          "speedup_b64": "speed-up, batch 64 (x)", "speedup_b1_spread": "speed-up spread, batch 1 (IQR/median)",
          "speedup_b64_spread": "speed-up spread, batch 64 (IQR/median)", "speed_noisy": "speed noisy",
          "recall_at_10": "recall@10", "test_recall_at_10": "test recall@10",
          "on_frontier": "on frontier", "on_frontier_params": "on params frontier", "mean_cos": "mean cosine",
          "len_ratio": "length ratio", "rel_word_acc": "relative word accuracy", "n": "words",
          "params_ratio": "params ratio, whole model (x)", "stack_ratio": "stack ratio (x)"}


def kind_of(column: str) -> str:
    """What a column holds, from its name: percent, fraction (shown as percent), params, ratio,
    count or other. A suffix `@N` (before/after N recovery steps) is ignored."""
    name = str(column).split("@")[0].lower()
    if name.endswith(("_frac", "_share")):
        return "fraction"
    if name in ("per", "wer") or name.endswith(("_per", "_wer", "_pct")):
        return "percent"
    if name in ("params", "params_removed"):
        return "params"
    if "speedup" in name or "ratio" in name or name.startswith("rel_"):
        return "ratio"
    if name in ("n", "words", "steps", "tokens", "layers_removed") or name.endswith(
            ("_steps", "_n", "_runs", "_removed", "_words", "_evals", "_tokens", "_sentences")):
        return "count"
    return "other"


def label(column: str) -> str:
    """A readable label of a column name: `test_wer` -> "test WER (%)", `params_removed_frac` ->
    "params removed (%)", `test_per@200` -> "test PER (%) @200"."""
    base, at, steps = str(column).partition("@")
    if base in LABELS:
        text = LABELS[base]
    else:
        text = " ".join(ACRONYMS.get(w, w) for w in base.split("_"))
        if kind_of(base) in ("percent", "fraction"):
            text += " (%)"
        elif kind_of(base) == "ratio" and "ratio" not in base:
            text += " (x)"
    return f"{text} @{steps}" if at else text


def _number(fmt: str):
    return lambda v: v if isinstance(v, str) else ("" if pd.isna(v) else fmt.format(v))


def mark_noisy_speed(df: pd.DataFrame) -> pd.DataFrame:
    """Measured speed-ups of rows marked `speed_noisy` (rounds that disagreed: `mtlab.measure`) as text,
    "noisy (0.14?)", never a plain number; other cells and tables without the column are unchanged."""
    if "speed_noisy" not in df.columns:
        return df
    bad = df["speed_noisy"].map(lambda v: v is True or str(v).strip().lower() in ("true", "1", "1.0")).astype(bool)
    cols = [c for c in df.columns if "speedup" in str(c) and "ideal" not in str(c) and not str(c).endswith("_spread")]
    if not bad.any() or not cols:
        return df
    df = df.copy()
    for c in cols:
        df[c] = df[c].astype(object)
        df.loc[bad, c] = [f"noisy ({v:.2f}?)" if isinstance(v, (int, float)) and pd.notna(v) else "noisy"
                          for v in df.loc[bad, c]]
    return df


def _formatter(kind: str, series: pd.Series):
    if kind == "percent":
        return _number("{:.1f}")
    if kind == "fraction":
        return lambda v: "" if pd.isna(v) else f"{100 * v:.1f}"
    if kind == "params":
        return lambda v: "" if pd.isna(v) else f"{v / 1e6:.2f}"
    if kind == "ratio":
        return _number("{:.2f}")
    if kind == "count" or pd.api.types.is_integer_dtype(series):
        return lambda v: "" if pd.isna(v) else f"{int(round(float(v))):,}"
    if pd.api.types.is_bool_dtype(series):
        return lambda v: "yes" if v is True or v == 1 else ""
    if pd.api.types.is_float_dtype(series):
        return _number("{:.3f}")
    return lambda v: "" if v is None or (not isinstance(v, str) and pd.isna(v)) else str(v)


def fmt(df: pd.DataFrame | pd.Series, columns: list[str] | None = None, *, index: bool = False):
    """`df` as a Styler: percent to one decimal, fractions as percent, parameters in millions to two
    decimals, ratios and speed-ups to two decimals, counts as integers, other floats to three,
    readable labels, and a table that scrolls inside the page. `columns` keeps only those (in order)."""
    if isinstance(df, pd.Series):
        df = df.to_frame()
        index = True
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"fmt needs a pandas DataFrame or Series, got {type(df).__name__}")
    df = mark_noisy_speed(df)  # before columns are dropped: `speed_noisy` may not be among them
    if columns is not None:
        missing = [c for c in columns if c not in df.columns]
        if missing:
            raise KeyError(f"fmt: no column(s) {missing} in the table; it has {list(df.columns)}")
        df = df[list(columns)]
    df = df.copy()
    df.columns = [str(c) for c in df.columns]
    styler = df.style.format({c: _formatter(kind_of(c), df[c]) for c in df.columns})
    styler = styler.relabel_index([label(c) for c in df.columns], axis="columns")
    if not index:
        styler = styler.hide(axis="index")
    return (styler.set_table_attributes(f'style="{FIT}"')
            .set_table_styles([{"selector": "th", "props": "text-align:right; padding:2px 8px; white-space:nowrap"},
                               {"selector": "td", "props": "text-align:right; padding:2px 8px"}]))


def table_html(df: pd.DataFrame, columns: list[str] | None = None) -> str:
    """`fmt(df, columns)` as an HTML fragment (its own scoped <style>, nothing fetched)."""
    return fmt(df, [c for c in columns if c in df.columns] if columns else None).to_html()



__all__ = ["fmt", "table_html", "label", "kind_of"]
