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
LOWER_IS_BETTER = {"per", "wer", "cer", "nll"}
BUSY = "computing\u2026"
INVALID = "no read-out: the controls are in an invalid state (see the message above)"


def metric_label(key: str, words: int | None = None) -> str:
    """'dev_per' -> 'dev PER % (n=32 words)': what, in which unit, on which split and how many words."""
    split, _, name = key.partition("_")
    if not name or (split not in ("dev", "test", "train", "valid")):
        split, name = "", key
    what, unit = METRICS.get(name, (name.replace("_", " ").upper(), ""))
    n = f" (n={words:,} words)" if words else ""
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
        rows.append(f"<tr><td style='padding-right:1em;vertical-align:top;white-space:nowrap'><b>{html.escape(k)}</b></td>"
                    f"<td style='vertical-align:top'>{cell}</td></tr>")
    return f"<table class='{css}'>{''.join(rows)}</table>"


def frame_html(df, caption: str) -> str:
    """A small DataFrame as an HTML table with a caption (the explorers' history)."""
    if df is None or not len(df):
        return ""
    body = df.to_html(index=False, border=0, float_format=lambda x: f"{x:.2f}", na_rep="")
    return f"<div style='font-size:90%'><b>{html.escape(caption)}</b>{body}</div>"


def figure_png(fig, dpi: int = 90) -> bytes:
    """The figure as PNG at its own size, never cropped to a tight bounding box (whatever rcParams or
    the notebook's backend say), so the image keeps its size from state to state."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches=fig.bbox_inches, pad_inches=0)
    return buf.getvalue()
