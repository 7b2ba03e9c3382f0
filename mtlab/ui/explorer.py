"""What the notebook explorers share (`mtlab.widgets`): a read-out, an error line, a busy line, a
fixed-size plot with a caption saying what it marks, the history of states tried, two picks pinned side
by side, an Export button (the pick written through `mtlab.export.export`, with the Python code that
does the same), a static copy for rendered pages that hides itself while the live explorer is on the
page, and a guard that turns an invalid state into a message and a cleared read-out, never a traceback
or a stale read-out."""
from __future__ import annotations

import base64
import html
import itertools
import threading
from pathlib import Path
from typing import Callable, Mapping

import pandas as pd
from matplotlib.figure import Figure

from .readout import DPI, INVALID, cell_text, figure_png, frame_html, header, separating_digits, table

HISTORY_ROWS = 8  # states listed under an explorer (history() has them all)
PINS = 2          # picks compared side by side
_TOKENS = itertools.count(1)


class PlotFigure(Figure):
    """An explorer plot: a plain Figure (outside pyplot) that a notebook displays as the same PNG the
    widget shows, whether or not pyplot's inline backend is set up (static copies in reports). Its dpi is
    the PNG's, so data coordinates map to the PNG's pixels (the assembly plot's hover targets)."""

    def __init__(self, *args, **kw):
        kw.setdefault("dpi", DPI)
        super().__init__(*args, **kw)

    def _repr_png_(self) -> bytes:
        return figure_png(self)


def wrap_layout():
    import ipywidgets as W

    return W.Layout(flex_flow="row wrap", align_items="flex-start")   # the plot goes below a long read-out


class StaticCopy:
    """The explorer's plot (and read-out) as plain HTML for a rendered page, which has no kernel to draw
    the live widget. In JupyterLab, while the live explorer it copies is on the page, a CSS rule hides it
    (it would show an older state than the live one) and shows a line saying so instead."""

    def __init__(self, token: str, png: bytes, caption: str, readout: str = ""):
        self.token, self.png, self.caption, self.readout = token, png, caption, readout

    def html(self) -> str:
        t = self.token
        img = base64.b64encode(self.png).decode()
        style = (f"<style>.mtlab-static-note-{t}{{display:none}}"
                 f".jp-Notebook:has(.mtlab-live-{t}) .mtlab-static-{t}{{display:none}}"
                 f".jp-Notebook:has(.mtlab-live-{t}) .mtlab-static-note-{t}{{display:block}}</style>")
        return (f"{style}<div class='mtlab-static mtlab-static-{t}'>{self.readout}"
                f"<img src='data:image/png;base64,{img}' alt='{html.escape(self.caption)}'>"
                f"<div><small>{html.escape(self.caption)}</small></div></div>"
                f"<div class='mtlab-static-note mtlab-static-note-{t}'><i>The static copy of this explorer for "
                "rendered pages is hidden here: the live explorer above shows the state in force.</i></div>")

    def _repr_mimebundle_(self, include=None, exclude=None):
        return {"text/html": self.html(), "text/plain": f"static copy of an explorer ({self.caption})"}


class Explorer:
    """What both explorers share: read-outs, an inline error line, a busy line, a fixed-size plot,
    the history of states tried, pinned picks, export, and a guard that turns any invalid state into a
    message in the error line (and a cleared read-out) instead of a traceback.

    Plots are `matplotlib.figure.Figure` objects, never pyplot figures: ipykernel 7 runs widget
    callbacks on a subshell thread, and pyplot's global figure list let the inline backend (main
    thread) crop a figure to its tight box while it was being saved here.

    Subclasses set `build` (pick -> model, or None: no export), `task` (its tokenizer is exported too)
    and implement `pick()` (the current plan or spec list), `pick_text(pick)`, `export_code(pick, dir)`."""

    FIGSIZE = (5.5, 3.8)
    DIGITS: Mapping[str, int] = {}   # history column -> decimals shown (at least)
    build: Callable | None = None
    task = None

    def _outputs(self) -> None:
        import ipywidgets as W

        self.token = f"x{next(_TOKENS)}"   # ties the static copy to this live explorer (StaticCopy)
        self.readout = W.HTML(layout=W.Layout(flex="0 0 auto", margin="0 1em 0 0"))   # as wide as its lines
        self.error, self.status, self.history_view = W.HTML(), W.HTML(), W.HTML()
        w, h = (int(DPI * x) for x in self.FIGSIZE)
        self.image = self._image_widget(w, h)
        self.caption = W.HTML()   # the plot's selection in words: what a reader (or a browser test) can check
        self.plot = W.VBox([self.image, self.caption], layout=W.Layout(width=f"{w + 4}px", min_width=f"{w + 4}px"))
        self.png = b""
        # pins: two picks side by side
        self.pin_button = W.Button(description="pin for comparison", layout=W.Layout(width="170px"),
                                   tooltip=f"keep the current pick; the last {PINS} pinned are compared side by side")
        self.compare_view = W.HTML()
        self.pins: list[dict] = []
        self.pin_button.on_click(lambda _: self._guarded_pin())
        # export
        self.export_dir = W.Text(description="export to", placeholder="a folder (new or empty)",
                                 layout=W.Layout(width="380px"), style={"description_width": "65px"})
        self.export_button = W.Button(description="Export", icon="download", layout=W.Layout(width="100px"),
                                      tooltip="write the pick as a Hugging Face folder (mtlab.export.export)")
        self.export_out = W.HTML()
        self.export_button.on_click(lambda _: self.export())
        for widget, cls in ((self.readout, "mtlab-readout"), (self.error, "mtlab-error"), (self.plot, "mtlab-plot"),
                            (self.status, "mtlab-status"), (self.history_view, "mtlab-history"),
                            (self.caption, "mtlab-caption"), (self.pin_button, "mtlab-pin"),
                            (self.compare_view, "mtlab-compare"), (self.export_dir, "mtlab-export-dir"),
                            (self.export_button, "mtlab-export"), (self.export_out, "mtlab-export-out")):
            widget.add_class(cls)
        self.renders = 0
        self._rows: dict[str, dict] = {}   # history: key -> row, the latest shown last
        self._key: str | None = None       # the history key of the state on screen (None: none valid)
        self._lock = threading.RLock()     # one snapshot of the controls is drawn at a time

    def _actions(self):
        """The row under the plot: pin, export folder, Export; then the export message and the comparison."""
        import ipywidgets as W

        return [W.HBox([self.pin_button, self.export_dir, self.export_button],
                       layout=W.Layout(flex_flow="row wrap")), self.export_out, self.compare_view]

    def _live(self, widget):
        """Mark the top widget: while it is on the page, this explorer's static copies hide themselves."""
        widget.add_class("mtlab-explorer")
        widget.add_class(f"mtlab-live-{self.token}")
        return widget

    def _image_widget(self, w: int, h: int):
        import ipywidgets as W

        return W.Image(format="png", layout=W.Layout(width=f"{w}px", height=f"{h}px"))

    def _paint(self, fig) -> None:
        self.image.value = self.png

    def _show(self, fig) -> None:
        self.png = figure_png(fig)
        self._paint(fig)
        self.drawn = getattr(fig, "mtlab_selected", None)   # what the plot on screen marks
        self.caption.value = f"<small>{html.escape(self._caption(self.drawn))}</small>"
        self.renders += 1

    def _message(self, text: str) -> None:
        self.error.value = f"<span style='color:#b00'>{html.escape(text)}</span>"

    def _invalid(self, text: str) -> None:
        """An invalid state: say why, clear the read-out and draw the plot without any selection."""
        self._message(text)
        self.readout.value = f"<i>{INVALID}</i>"
        self.status.value = ""
        self._key = None
        self._show(self.figure(selected=False))

    def _guard(self, fn: Callable[[], None]) -> None:
        with self._lock:
            try:
                self.error.value = ""
                fn()
            except (ValueError, KeyError) as e:   # PlanError is a ValueError
                self._invalid(str(e.args[0] if e.args else e))

    def _record(self, key: str, row: dict) -> None:
        self._rows.pop(key, None)
        self._rows[key] = row
        self._key = key
        self.history_view.value = frame_html(self.history().tail(HISTORY_ROWS),
                                             f"states tried ({len(self._rows)}; explorer.history() has them all)",
                                             self.DIGITS)

    def history(self) -> pd.DataFrame:
        """Every valid state shown so far (the latest last), one row each, with its numbers."""
        return pd.DataFrame(list(self._rows.values()))

    # ---- two picks side by side ----------------------------------------------------------------
    def pin(self) -> list[dict]:
        """Pin the state on screen (its history row); the last PINS pinned are compared side by side."""
        if self._key is None or self._key not in self._rows:
            raise ValueError("nothing to pin: the controls show no scored pick yet (fix the state, or wait for "
                             "its scores)")
        row = self._rows[self._key]
        self.pins = [p for p in self.pins if p is not row and p != row][-(PINS - 1):] + [row]
        self.compare_view.value = self._compare_html()
        return self.pins

    def _guarded_pin(self) -> None:
        try:
            self.pin()
        except ValueError as e:
            self._message(str(e))

    def compare(self) -> pd.DataFrame:
        """The pinned picks side by side: one row per quantity, one column per pick, and their difference."""
        if not self.pins:
            return pd.DataFrame()
        cols = list(dict.fromkeys(c for p in self.pins for c in p))
        df = pd.DataFrame({f"pick {i + 1}": [p.get(c) for c in cols] for i, p in enumerate(self.pins)}, index=cols)
        if len(self.pins) == 2:
            a, b = self.pins
            df["2 - 1"] = pd.Series([b[c] - a[c] if all(isinstance(x.get(c), (int, float)) and not isinstance(x.get(c), bool)
                                                        for x in (a, b)) else None for c in cols], index=cols, dtype=object)
        return df

    def _compare_html(self) -> str:
        df = self.compare()
        if not len(df):
            return ""
        rows = []
        for c, r in df.iterrows():
            nums = [v for v in r if isinstance(v, float)]
            d = separating_digits(nums[:2], self.DIGITS.get(c, 2)) if nums else 2
            cells = "".join(f"<td style='padding:0 .6em;white-space:nowrap'>"
                            f"{'<br>'.join(html.escape(x) for x in cell_text(v, d).split('; '))}</td>" for v in r)
            rows.append(f"<tr><th style='text-align:left;padding-right:1em'>{html.escape(header(c))}</th>{cells}</tr>")
        head = "".join(f"<th style='padding:0 .6em'>{html.escape(c)}</th>" for c in df.columns)
        return (f"<div style='font-size:90%'><b>pinned picks, side by side</b> (explorer.compare())"
                f"<table><tr><th></th>{head}</tr>{''.join(rows)}</table></div>")

    # ---- export ----------------------------------------------------------------------------------
    def pick(self):
        """The state on screen as something `build` turns into a model (raises ValueError if invalid)."""
        raise NotImplementedError

    def pick_text(self, pick) -> str:
        return str(pick)

    def export_code(self, pick, directory: str) -> str:
        return (f"from mtlab.export import export\n\n"
                f"export(build({pick!r}), {directory!r}, task=task)  # build: the function this explorer was given")

    def export(self, directory: str | Path | None = None) -> Path | None:
        """Write the current pick to `directory` (default: the folder box) with `mtlab.export.export` (a
        standard Hugging Face folder, checked by reloading it); the message line says where, how to reload
        it and shows the Python code that does the same. A folder export refuses (not empty, not an
        earlier export of the same kind) is refused here too, with export's message. Returns the folder."""
        from ..export import ExportTargetError, read_export_record
        from ..export import export as write

        directory = str(directory if directory is not None else self.export_dir.value).strip()
        if not directory:
            return self._export_message("type a folder to export to in the box (a new or empty folder)", error=True)
        if self.build is None:
            return self._export_message("this explorer was made without a model to build, so it cannot export: make "
                                        "it with build=... (mtlab.experiments.explore.assembly_explorer and "
                                        "merge_explorer do)", error=True)
        try:
            with self._lock:
                pick = self.pick()
            code = self.export_code(pick, directory)
            self.export_out.value = f"<i>exporting {html.escape(self.pick_text(pick))}\u2026</i>"
            model = self.build(pick)
            write(model, directory, task=self.task)
        except ExportTargetError as e:
            return self._export_message(f"not exported: {e}", error=True)
        except Exception as e:  # noqa: BLE001 - shown next to the button, never lost
            return self._export_message(f"not exported: {type(e).__name__}: {e}", error=True)
        record = read_export_record(directory) or {}
        reload = record.get("reload_with", "transformers.AutoModel.from_pretrained")
        self._export_message(f"exported {self.pick_text(pick)} to {directory}{self.export_note()}; reload it with "
                             f"{reload}({directory!r}). The same in Python:", code=code)
        self.exported = Path(directory)
        return self.exported

    def export_note(self) -> str:
        return ""

    def _export_message(self, text: str, error: bool = False, code: str | None = None) -> None:
        colour = "#b00" if error else "#060"
        out = f"<div style='color:{colour}'>{html.escape(text)}</div>"
        if code:
            out += f"<pre class='mtlab-export-code' style='font-size:85%;margin:2px 0'>{html.escape(code)}</pre>"
        self.export_out.value = out
        return None

    # ---- static copy for rendered pages ------------------------------------------------------------
    def static_copy(self, readout: Mapping[str, str] | None = None) -> StaticCopy:
        """The plot (and `readout`) as a rendered page shows it; hidden in JupyterLab while this explorer is live."""
        fig = self.figure()
        return StaticCopy(self.token, figure_png(fig), self._caption(getattr(fig, "mtlab_selected", None)),
                          table(readout) if readout else "")

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)


__all__ = ["Explorer", "PlotFigure", "StaticCopy", "wrap_layout", "HISTORY_ROWS", "PINS"]
