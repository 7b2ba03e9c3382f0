"""What the notebook explorers share (`mtlab.widgets`): a read-out, an error line, a busy line, a
fixed-size plot with a caption saying what it marks, the history of states tried, and a guard that
turns an invalid state into a message and a cleared read-out, never a traceback or a stale read-out."""
from __future__ import annotations

import html
import threading
from typing import Callable

import pandas as pd
from matplotlib.figure import Figure

from .readout import DPI, INVALID, figure_png, frame_html

HISTORY_ROWS = 8  # states listed under an explorer (history() has them all)


class PlotFigure(Figure):
    """An explorer plot: a plain Figure (outside pyplot) that a notebook displays as the same PNG the
    widget shows, whether or not pyplot's inline backend is set up (static copies in reports)."""

    def _repr_png_(self) -> bytes:
        return figure_png(self)


def wrap_layout():
    import ipywidgets as W

    return W.Layout(flex_flow="row wrap", align_items="flex-start")   # the plot goes below a long read-out


class Explorer:
    """What both explorers share: read-outs, an inline error line, a busy line, a fixed-size plot,
    the history of states tried, and a guard that turns any invalid state into a message in the
    error line (and a cleared read-out) instead of a traceback.

    Plots are `matplotlib.figure.Figure` objects, never pyplot figures: ipykernel 7 runs widget
    callbacks on a subshell thread, and pyplot's global figure list let the inline backend (main
    thread) crop a figure to its tight box while it was being saved here."""

    FIGSIZE = (5.5, 3.8)

    def _outputs(self) -> None:
        import ipywidgets as W

        self.readout = W.HTML(layout=W.Layout(flex="0 0 auto", margin="0 1em 0 0"))   # as wide as its lines
        self.error, self.status, self.history_view = W.HTML(), W.HTML(), W.HTML()
        w, h = (int(DPI * x) for x in self.FIGSIZE)
        self.image = W.Image(format="png", layout=W.Layout(width=f"{w}px", height=f"{h}px"))
        self.caption = W.HTML()   # the plot's selection in words: what a reader (or a browser test) can check
        self.plot = W.VBox([self.image, self.caption], layout=W.Layout(width=f"{w + 4}px", min_width=f"{w + 4}px"))
        for widget, cls in ((self.readout, "mtlab-readout"), (self.error, "mtlab-error"), (self.plot, "mtlab-plot"),
                            (self.status, "mtlab-status"), (self.history_view, "mtlab-history"),
                            (self.caption, "mtlab-caption")):
            widget.add_class(cls)
        self.renders = 0
        self._rows: dict[str, dict] = {}   # history: key -> row, the latest shown last
        self._lock = threading.RLock()     # one snapshot of the controls is drawn at a time

    def _show(self, fig) -> None:
        self.image.value = figure_png(fig)
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
        self.history_view.value = frame_html(self.history().tail(HISTORY_ROWS),
                                             f"states tried ({len(self._rows)}; explorer.history() has them all)")

    def history(self) -> pd.DataFrame:
        """Every valid state shown so far (the latest last), one row each, with its numbers."""
        return pd.DataFrame(list(self._rows.values()))

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)


__all__ = ["Explorer", "PlotFigure", "wrap_layout", "HISTORY_ROWS"]
