"""Tables formatted for reading: one number format and one label per quantity, wherever shown.

A raw DataFrame prints 15.829528 and `params_removed_frac`; a report wants "15.8" under
"test WER (%)". `fmt(df)` returns a pandas Styler that formats each column by what it holds
(recognised from its name, the same names every CSV of mtlab uses) and keeps the table inside
the page (it scrolls sideways instead of running off it). The notebooks display their tables
through it and `mtlab.notebooks.write_index` builds the headline tables with `table_html`.
"""
from __future__ import annotations

import re

import pandas as pd

FIT = "display:block; max-width:100%; overflow-x:auto; border-collapse:collapse; font-size:0.9em"

# metric names spelled as in the papers
ACRONYMS = {"per": "PER", "wer": "WER", "nll": "NLL", "cka": "CKA", "ff": "FF", "b1": "batch 1", "b64": "batch 64",
            "acc": "accuracy", "tf": "teacher-forced", "cos": "cosine", "n": "n", "len": "length", "eos": "EOS"}
LABELS = {"params": "params (M)", "params_removed": "params removed (M)", "params_removed_frac": "params removed (%)",
          "ratio": "ratio (x)", "ideal_speedup": "ideal speed-up (x)", "speedup_b1": "speed-up, batch 1 (x)",
          "speedup_b64": "speed-up, batch 64 (x)", "speedup_b1_spread": "speed-up spread, batch 1 (IQR/median)",
          "speedup_b64_spread": "speed-up spread, batch 64 (IQR/median)", "speed_noisy": "speed noisy",
          "recall_at_10": "recall@10", "test_recall_at_10": "test recall@10",
          "on_frontier": "on frontier", "on_frontier_params": "on params frontier", "mean_cos": "mean cosine",
          "len_ratio": "length ratio", "rel_word_acc": "relative word accuracy", "n": "words",
          "params_ratio": "params ratio, whole model (x)", "parameters": "parameters (M)",
          "params_unique": "unique params (M)", "params_stored": "params as stored (M)", "sec_per_step": "seconds per step", "stack_ratio": "stack ratio (x)"}


_AT_RATIO = re.compile(r"_\d+(?:\.\d+)?x$")  # `dev_per_1.5x`: a metric of the model at that ratio


def kind_of(column: str) -> str:
    """What a column holds, from its name: percent, fraction (shown as percent), params, ratio,
    count, lr (learning rate), seconds, points (a gap in percentage points), sci (tiny differences,
    as 1.2e-06) or other. A suffix `@N` (before/after N recovery steps) is ignored."""
    name = _AT_RATIO.sub("", str(column).split("@")[0].lower())
    if name in ("lr", "learning_rate") or name.endswith(("_lr", "_learning_rate")):
        return "lr"
    if name in ("seconds", "s") or name.endswith(("_seconds", "_s")) or name.startswith("sec_per"):
        return "seconds"
    if name.endswith(("_frac", "_share", "_rate", "_loops")) or name in ("loops", "share"):
        return "fraction"
    if name in ("per", "wer", "sub", "ins", "del") or name.endswith(("_per", "_wer", "_pct", "_sub", "_ins", "_del")):
        return "percent"
    if name.endswith(("wer_gap", "per_gap")):
        return "points"
    if name.endswith(("_diff", "_err", "_tol")):
        return "sci"
    if name in ("params", "params_removed", "parameters", "params_unique", "params_stored"):
        return "params"
    if "speedup" in name or "ratio" in name or name.startswith("rel_") or name.endswith("_len"):
        return "ratio"
    if name in ("n", "words", "step", "steps", "tokens", "layers_removed", "models") or name.endswith(
            ("_steps", "_n", "_runs", "_removed", "_words", "_evals", "_tokens", "_sentences")):
        return "count"
    return "other"


def label(column: str, kind: str | None = None) -> str:
    """A readable label of a column name: `test_wer` -> "test WER (%)", `params_removed_frac` ->
    "params removed (%)", `test_per@200` -> "test PER (%) @200". `kind` overrides `kind_of(column)`."""
    base, at, steps = str(column).partition("@")
    suffix = _AT_RATIO.search(base)
    if suffix:
        base = base[:suffix.start()]
    if base in LABELS:
        text = LABELS[base]
    else:
        text = " ".join(ACRONYMS.get(w, w) for w in base.split("_"))
        kind = kind or kind_of(base)
        if kind in ("percent", "fraction"):
            text += " (%)"
        elif kind == "points":
            text += " (points)"
        elif kind == "ratio" and "ratio" not in base:
            text += " (x)"
        elif kind == "params":
            text += " (M)"
        elif kind == "seconds" and not text.endswith(("seconds", " s")):
            text += " (s)"
    if suffix:
        text += f" at {suffix.group()[1:]}"
    return f"{text} @{steps}" if at else text


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


def lr_text(v: float) -> str:
    """A learning rate as it is written in a config: 1e-4, 2.5e-4 (never 0.000)."""
    mantissa, exp = f"{float(v):.1e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exp)}" if v else "0"


def seconds_text(v: float) -> str:
    """Seconds with the digits that matter: 1,234 / 56 / 3.2 / 0.25 / 0.004."""
    v = float(v)
    a = abs(v)
    return (f"{v:,.0f}" if a >= 10 else f"{v:.1f}" if a >= 1 else f"{v:.2f}" if a >= 0.01 or a == 0
            else f"{v:.1g}")


def _isna(v) -> bool:
    return v is None or (not isinstance(v, (str, list, tuple, dict)) and bool(pd.isna(v)))


def _is_flag(series: pd.Series) -> bool:
    """A yes/no column: bool dtype, or objects that are all True/False where present (NaN-padded)."""
    if pd.api.types.is_bool_dtype(series):
        return True
    present = series.dropna()
    return series.dtype == object and len(present) > 0 and all(isinstance(v, bool) for v in present)


def _formatter(kind: str, series: pd.Series):
    """The text of a non-missing value of a column of this kind."""
    if kind == "percent":
        return lambda v: f"{float(v):.1f}"
    if kind == "fraction":
        return lambda v: f"{100 * float(v):.1f}"
    if kind == "params":
        return lambda v: f"{float(v) / 1e6:.2f}"
    if kind == "ratio":
        return lambda v: f"{float(v):.2f}"
    if kind == "points":
        return lambda v: f"{float(v):+.1f}"
    if kind == "sci":
        return lambda v: f"{float(v):.1e}" if v else "0"
    if kind == "lr":
        return lr_text
    if kind == "seconds":
        return seconds_text
    if _is_flag(series):
        return lambda v: "yes" if v is True or v == 1 else "no"
    if kind == "count" or pd.api.types.is_integer_dtype(series):
        return lambda v: f"{int(round(float(v))):,}"
    if pd.api.types.is_float_dtype(series):
        return lambda v: f"{float(v):.3f}"
    return _plain


def _plain(v) -> str:
    """Objects: floats to 3 decimals, sequences joined, everything else as str."""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3f}".rstrip("0").rstrip(".") if v != int(v) else f"{int(v):,}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_plain(x) for x in v)
    return str(v)


def missing_reason(column: str) -> str:
    """Why a cell of this column is empty, when the table does not say: a speed-up that was not
    timed, a score that was not computed, a run that was not trained; else "n/a" (does not apply)."""
    if "@" in str(column):
        return "not run"  # a score after N recovery steps of a row recovered with another budget
    name = str(column).lower()
    if name in ("note", "notes", "detail", "comment") or name.endswith("_note"):
        return ""  # no note is no missing value
    if "speedup" in name:
        return "not timed"
    if name.startswith("train_"):
        return "not trained"
    if name in ("params", "params_removed", "params_ratio", "stack_ratio", "ratio", "ideal_speedup"):
        return "not built"
    if (kind_of(name) in ("percent", "fraction") or name.startswith(("dev_", "test_"))
            or any(m in name for m in ("cos", "recall", "nll", "acc", "spearman"))):
        return "not scored"
    return "n/a"


def _with_missing(f, reason: str):
    return lambda v: v if isinstance(v, str) else reason if _isna(v) else f(v)


def _reasons(df: pd.DataFrame, missing) -> dict[str, str]:
    """Per column, the text of its missing cells: `missing` (one text, or a dict by column) over
    `df.attrs["missing"]` over `missing_reason`."""
    given = dict(df.attrs.get("missing") or {})
    if isinstance(missing, str):
        given.update({c: missing for c in df.columns})
    elif missing:
        given.update(missing)
    return {c: given.get(c, missing_reason(c)) for c in df.columns}


def fmt(df: pd.DataFrame | pd.Series, columns: list[str] | None = None, *, index: bool = False,
        missing: str | dict | None = None, csv: str | None = None, max_rows: int | None = None,
        units: dict | None = None):
    """`df` as a Styler: percent to one decimal, fractions as percent, parameters in millions to two
    decimals, ratios and speed-ups to two decimals, learning rates as 1e-4, seconds with sensible
    digits, counts as integers, other floats to three; units in the readable labels; a missing value
    shown as its reason (`missing`, `df.attrs["missing"]`, else `missing_reason`), never "NaN";
    headers that wrap so the table fits the page. `columns` keeps only those (in order); `csv` names
    the file that holds every row and column (a caption links it); `max_rows` keeps the first rows;
    `units` (or `df.attrs["units"]`) gives a column's kind where its name does not say it
    ({"target": "fraction"}; kinds as `kind_of` returns them)."""
    if isinstance(df, pd.Series):
        df = df.to_frame()
        index = True
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"fmt needs a pandas DataFrame or Series, got {type(df).__name__}")
    total_rows, total_cols = df.shape
    df = mark_noisy_speed(df)  # before columns are dropped: `speed_noisy` may not be among them
    if columns is not None:
        absent = [c for c in columns if c not in df.columns]
        if absent:
            raise KeyError(f"fmt: no column(s) {absent} in the table; it has {list(df.columns)}")
        df = df[list(columns)]
    if max_rows is not None:
        df = df.head(max_rows)
    df = df.copy()
    df.columns = [str(c) for c in df.columns]
    reasons = _reasons(df, missing)
    given = {**(df.attrs.get("units") or {}), **(units or {})}
    kinds = {c: given.get(c) or kind_of(c) for c in df.columns}
    styler = df.style.format({c: _with_missing(_formatter(kinds[c], df[c]), reasons[c]) for c in df.columns})
    styler = styler.relabel_index([label(c, given.get(c)) for c in df.columns], axis="columns")
    # words read from the left; short labels (plans, methods) stay on one line
    styles = []
    for i, c in enumerate(df.columns):
        if kinds[c] == "other" and (df[c].dtype == object or pd.api.types.is_string_dtype(df[c])) and not _is_flag(df[c]):
            short = df[c].astype(str).str.len().max() <= 24
            styles += [{"selector": f"td.col{i}", "props": "text-align:left" + ("; white-space:nowrap" if short else "")},
                       {"selector": f"th.col{i}", "props": "text-align:left"}]
    if index:
        styler = styler.format_index(lambda v: "n/a" if _isna(v) else _plain(v), axis="index")
    else:
        styler = styler.hide(axis="index")
    if csv:
        shown = f"{len(df)} of {total_rows} rows, {df.shape[1]} of {total_cols} columns"
        styler = styler.set_caption(f"{shown}; every row and column: <a href='{csv}'>{csv}</a>")
    return (styler.set_table_attributes(f'style="{FIT}"')
            .set_table_styles([{"selector": "th", "props": "text-align:right; padding:2px 6px; vertical-align:bottom;"
                                                           "white-space:normal; min-width:3em; max-width:9em"},
                               {"selector": "td", "props": "text-align:right; padding:2px 6px"},
                               {"selector": "caption", "props": "caption-side:bottom; text-align:left; font-size:0.85em"},
                               *styles]))


def settings(values, name: str = "value"):
    """A config (a dataclass, a dict, a Series) as a two-column table, setting and value, each value
    formatted by its setting's name (a learning rate as 3e-4, seconds, counts): the page shows this
    instead of a `pd.Series` dump."""
    import dataclasses

    if dataclasses.is_dataclass(values):
        values = dataclasses.asdict(values)
    items = dict(values.items())
    text = {}
    for k, v in items.items():
        kind = kind_of(k)
        if _isna(v):
            text[k] = "none"
        elif isinstance(v, bool) or not isinstance(v, (int, float)):
            text[k] = _plain(v)
        else:
            text[k] = _formatter(kind if kind not in ("percent", "params", "fraction") else "other",
                                 pd.Series([v]))(v)
    table = pd.DataFrame({"setting": list(text), name: list(text.values())})
    return fmt(table).set_table_styles([{"selector": "td", "props": "text-align:left; padding:2px 8px"}],
                                       overwrite=False)


def present(df: pd.DataFrame, columns) -> list[str]:
    """Those of `columns` the table has, in order (a view that also reads older tables)."""
    return [c for c in columns if c in df.columns]


def table_html(df: pd.DataFrame, columns: list[str] | None = None, **kw) -> str:
    """`fmt(df, columns, **kw)` as an HTML fragment (its own scoped <style>, nothing fetched)."""
    return fmt(df, [c for c in columns if c in df.columns] if columns else None, **kw).to_html()


__all__ = ["fmt", "table_html", "settings", "present", "label", "kind_of", "missing_reason", "lr_text", "seconds_text"]
