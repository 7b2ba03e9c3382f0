"""How explorer read-outs are written: metric names with unit, split and word count, differences to
the original model, parameter counts with the share removed, HTML tables that never break a spec
mid-word, figures as fixed-size PNGs."""
from __future__ import annotations

import html
import io
import math
from typing import Mapping, Sequence

# metric key (after the split prefix) -> (name, unit); unknown metrics are shown upper-cased, no unit
METRICS = {"per": ("PER", "%"), "wer": ("WER", "%"), "cer": ("CER", "%"), "bleu": ("BLEU", ""),
           "chrf": ("chrF", ""), "nll": ("token NLL", "nats"), "token_acc": ("token accuracy", "%"),
           "tf_word_acc": ("word accuracy (teacher-forced)", "%"), "acc": ("accuracy", "%")}
SPLITS = ("dev", "test", "train", "valid")
BUSY = "computing\u2026"
DPI = 90   # explorer plots: FIGSIZE inches x DPI = the image's pixels
INVALID = "no read-out: the controls are in an invalid state (see the message above)"


def metric_label(key: str, words: int | None = None, counted: str = "words") -> str:
    """'dev_per' -> 'dev PER % (n=32 words)': what, in which unit, on which split and how many words
    (or `counted`: tokens for a text task, sentences for pairs)."""
    split, _, name = key.partition("_")
    if not name or split not in SPLITS:
        split, name = "", key
    what, unit = METRICS.get(name, (name.replace("_", " ").upper(), ""))
    n = f" (n={words:,} {counted})" if words else ""
    return " ".join(p for p in (split, what, unit) if p) + n


def metric_keys(result: Mapping) -> list[str]:
    """The metric entries of an evaluation result (numbers other than params / n / seconds)."""
    skip = {"params", "n", "words", "seconds"}
    return [k for k, v in result.items() if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool)]


def fmt_params(n: float) -> str:
    return f"{n / 1e6:.2f}M" if abs(n) >= 1e5 else f"{int(n):,}"


def fmt_size(n: float, original: float | None) -> str:
    """'2.51M (-0.26M, 9.4% removed)' against the original model's parameter count."""
    if not original:
        return fmt_params(n)
    d = n - original
    return f"{fmt_params(n)} ({'-' if d < 0 else '+'}{fmt_params(abs(d))}, {100 * -d / original:.1f}% removed)"


def fmt_metric(v: float, original: float | None = None, digits: int = 2) -> str:
    """'23.40 (original 20.30, +3.10)'."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if original is None:
        return f"{v:.{digits}f}"
    return f"{v:.{digits}f} (original {original:.{digits}f}, {v - original:+.{digits}f})"


def table(items: Mapping[str, str | Sequence[str]], css: str = "mtlab-table") -> str:
    """Two-column HTML table; a list value is one line per item, and no item is broken inside a word."""
    rows = []
    for k, v in items.items():
        lines = [v] if isinstance(v, str) else list(v) or [""]
        cell = "<br>".join(f"<span style='white-space:nowrap'>{html.escape(x)}</span>" for x in lines)
        key = f"<b>{html.escape(k)}</b>"
        rows.append(f"<tr><td style='padding-right:1em;vertical-align:top;white-space:nowrap'>{key}</td>"
                    f"<td style='vertical-align:top'>{cell}</td></tr>")
    return f"<table class='{css}'>{''.join(rows)}</table>"


def header(column: str) -> str:
    """A history column's heading: 'prune_dev_per' -> 'pruned dev PER %', 'removed_%' -> 'removed %'."""
    prefix = ""
    if column.startswith("prune_"):
        prefix, column = "pruned ", column[len("prune_"):]
    known = column in METRICS or column.partition("_")[0] in SPLITS
    return prefix + (metric_label(column) if known else column.replace("_", " "))


def separating_digits(values, start: int = 2, most: int = 6) -> int:
    """The fewest decimals (at least `start`) at which distinct values also print distinct: two picks whose
    NLL differs in the 4th decimal never read the same."""
    vals = sorted({float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))})
    for d in range(start, most + 1):
        if len({f"{v:.{d}f}" for v in vals}) == len(vals):
            return d
    return most


def cell_text(v, digits: int = 2) -> str:
    """A table cell: floats with `digits` decimals, integers with thousands separators, NaN/None empty."""
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:,.{digits}f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return "" if v is None else str(v)


def frame_html(df, caption: str, digits: Mapping[str, int] | None = None) -> str:
    """A small DataFrame as an HTML table with a caption (the explorers' history): headed by `header`,
    floats with `digits[column]` decimals (default 2), more where two distinct values would print the same,
    a list of specs one per line, nothing broken inside a word. Headings wrap, so the table stays narrow."""
    if df is None or not len(df):
        return ""
    digits = digits or {}
    places = {c: separating_digits(df[c], digits.get(c, 2)) if df[c].dtype.kind == "f" else 0 for c in df.columns}

    def cell(v, c) -> str:
        lines = [html.escape(x) for x in cell_text(v, places[c]).split("; ")]
        return "<td style='white-space:nowrap;padding:0 .5em;vertical-align:top'>" + "<br>".join(lines) + "</td>"

    head = "".join(f"<th style='padding:0 .5em;vertical-align:bottom;max-width:9em'>{html.escape(header(c))}</th>"
                   for c in df.columns)
    rows = "".join("<tr>" + "".join(cell(v, c) for v, c in zip(r, df.columns)) + "</tr>"
                   for r in df.itertuples(index=False))
    return (f"<div style='font-size:90%;overflow-x:auto'><b>{html.escape(caption)}</b>"
            f"<table><tr>{head}</tr>{rows}</table></div>")


#: metrics where lower is better (error rates, losses); every other metric: higher is better
LOWER_IS_BETTER = {"per", "wer", "cer", "nll", "loss", "ppl", "perplexity"}


def lower_is_better(key: str) -> bool:
    """'dev_per' -> True, 'dev_bleu' -> False."""
    split, _, name = key.partition("_")
    return (name if name and split in SPLITS else key) in LOWER_IS_BETTER


def figure_png(fig, dpi: int = DPI) -> bytes:
    """The figure as PNG at its own size, never cropped to a tight bounding box (whatever rcParams or
    the notebook's backend say), so the image keeps its size from state to state."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches=fig.bbox_inches, pad_inches=0)
    return buf.getvalue()
