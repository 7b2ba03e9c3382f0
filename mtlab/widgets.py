"""ipywidgets explorers of the assembly and merge-set spaces; the logic lives here, notebooks display.

Both explorers read precomputed tables (the screened assembly space, the similarity matrices)
and call injected functions for anything new, so they can be unit-tested by setting widget
values in Python. They never show a previous state: every read-out, plot and outline is drawn
from one snapshot of the controls, an invalid state clears the read-out (the `error` line says
why), and the merge explorer's slow scores are keyed by their exact spec, so a result that
arrives for an older state is kept for later but never displayed. With `background=True` the
merge explorer scores on a worker thread (newest request first), shows "computing..." meanwhile
and keeps the kernel free for the next control change. CSS classes (`mtlab-*`) name the parts
for browser tests.
"""
from __future__ import annotations

import html
import itertools
import threading
from dataclasses import dataclass
from typing import Callable, Mapping

import pandas as pd
from matplotlib.figure import Figure

from .modular.plan import Plan, PlanError, size_first, speed_first, stack_ratio, tilings, uniform
from .ui.latest import LatestWorker
from .ui.readout import (BUSY, DPI, INVALID, figure_png, fmt_metric, fmt_params, fmt_size, frame_html, metric_keys,
                         metric_label, table)

STRATEGIES = ("size_first", "speed_first", "uniform", "custom")
COVERED = "·"   # a position inside a module span started below it
HISTORY_ROWS = 8  # states listed under an explorer (history() has them all)


class PlotFigure(Figure):
    """An explorer plot: a plain Figure (outside pyplot) that a notebook displays as the same PNG the
    widget shows, whether or not pyplot's inline backend is set up (static copies in reports)."""

    def _repr_png_(self) -> bytes:
        return figure_png(self)


def _wrap():
    import ipywidgets as W

    return W.Layout(flex_flow="row wrap", align_items="flex-start")   # the plot goes below a long read-out


class _Explorer:
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


class AssemblyExplorer(_Explorer):
    """Pick a plan per span position or by strategy and target ratio; see its size, FLOP-ideal
    speed-up, screened quality next to the original model's and its place among every screened plan.

    `screen`: one row per plan (`mtlab.explore.screen.screen`: plan, params, ratio,
    ideal_speedup, nll, token_acc, tf_word_acc, words); `frontier` (optional): decoded candidates
    (plan, test_wer, speedup_b64, ...) whose numbers are shown when the plan is one of them."""

    def __init__(self, screen: pd.DataFrame, depths: Mapping[str, int], granularities: Mapping[str, tuple[int, ...]],
                 block_params: Mapping[str, int], frontier: pd.DataFrame | None = None):
        import ipywidgets as W

        for c in ("plan", "params", "ratio", "ideal_speedup", "nll", "token_acc"):
            if c not in screen.columns:
                raise ValueError(f"AssemblyExplorer needs a screened table with column {c!r} "
                                 "(mtlab.experiments.explore.screen_table)")
        self.screen = screen.set_index("plan")
        self.frontier = frontier.set_index("plan") if frontier is not None and len(frontier) else None
        self.depths, self.block_params = dict(depths), dict(block_params)
        self.granularities = {s: tuple(sorted(granularities.get(s, ()))) for s in self.depths}
        self._busy = False
        self.current = Plan.teacher(self.depths)

        self.strategy = W.Dropdown(options=STRATEGIES, value="size_first", description="strategy")
        self.strategy.add_class("mtlab-strategy")
        top = stack_ratio({s: min(tilings(n, self.granularities[s]), key=len) for s, n in self.depths.items()},
                          self.block_params)
        self.ratio = W.FloatSlider(value=min(2.0, top), min=1.0, max=round(top, 2), step=0.01, readout_format=".2f",
                                   description="target ratio", continuous_update=False)
        self.ratio.add_class("mtlab-ratio")
        self.custom = W.Text(description="custom plan", placeholder="e.g. e=1122 d=33", continuous_update=False)
        self.custom.add_class("mtlab-custom")
        self.spans: dict[str, list] = {}
        rows = []
        for s, n in self.depths.items():
            boxes = []
            for i in range(n):
                opts = ["1"] + [str(k) for k in self.granularities[s] if i % k == 0 and i + k <= n]
                dd = W.Dropdown(options=opts + [COVERED], value="1", description=f"{s[:3]} {i}",
                                layout=W.Layout(width="105px"), style={"description_width": "48px"})
                dd.add_class("mtlab-span")
                dd.observe(lambda ch, s=s, i=i: self._on_span(s, i, ch), names="value")
                boxes.append(dd)
            self.spans[s] = boxes
            rows.append(W.HBox(boxes))
        self._outputs()
        for w in (self.strategy, self.ratio):
            w.observe(lambda ch: self._on_strategy(), names="value")
        self.custom.observe(lambda ch: self._on_custom(), names="value")
        self.widget = W.VBox([W.HBox([self.strategy, self.ratio]), self.custom, *rows, self.error,
                              W.HBox([self.readout, self.plot], layout=_wrap()), self.history_view])
        self._on_strategy()

    # ---- state <-> plan -------------------------------------------------------------------
    @property
    def plan(self) -> Plan:
        spans = {}
        for s, boxes in self.spans.items():
            out, pos = [], 0
            while pos < len(boxes):
                k = int(boxes[pos].value) if boxes[pos].value != COVERED else 1
                out.append(k)
                pos += k
            spans[s] = tuple(out)
        return Plan.of(spans)

    def set_plan(self, plan: Plan | str) -> None:
        """Show `plan` in the span controls (raises PlanError for an invalid plan); in custom mode the
        disabled ratio slider shows the plan's own compression ratio."""
        plan = Plan.parse(plan, self.depths) if isinstance(plan, str) else plan
        plan.validate(self.depths, self.granularities)
        self.current = plan
        self._busy = True
        try:
            for s, boxes in self.spans.items():
                covered = set()
                for start, k in plan.blocks(s):
                    boxes[start].value = str(k)
                    covered |= set(range(start + 1, start + k))
                for i in covered:
                    boxes[i].value = COVERED
                for i, b in enumerate(boxes):
                    b.disabled = i in covered
            if self.strategy.value == "custom":
                r = stack_ratio(dict(plan.spans), self.block_params)
                self.ratio.value = min(max(round(r, 2), self.ratio.min), self.ratio.max)
        finally:
            self._busy = False
        self._refresh()

    def target_plan(self) -> Plan:
        """The plan the strategy and the target ratio choose (custom: the typed plan)."""
        s, t = self.strategy.value, self.ratio.value
        if s == "custom":
            return Plan.parse(self.custom.value or str(self.plan), self.depths)
        if s == "size_first":
            plans = size_first(self.depths, self.granularities, self.block_params, [t])
        elif s == "speed_first":
            ladder = [Plan.teacher(self.depths)] + speed_first(self.depths, self.granularities)
            plans = [p for p in ladder if stack_ratio(dict(p.spans), self.block_params) >= t - 1e-9][:1]
        else:
            options = [uniform(self.depths, k) for k in sorted({k for ks in self.granularities.values() for k in ks})]
            options = [p for p in options if _valid(p, self.depths, self.granularities)]
            plans = sorted(options, key=lambda p: abs(stack_ratio(dict(p.spans), self.block_params) - t))[:1]
        if not plans:
            raise PlanError(f"no {s.replace('_', '-')} plan reaches a ratio of {t:.2f}: lower the target")
        return plans[0]

    # ---- events ---------------------------------------------------------------------------
    def _on_strategy(self) -> None:
        if self._busy:
            return
        self.ratio.disabled = self.strategy.value == "custom"
        self._guard(lambda: self.set_plan(self.target_plan()))

    def _on_custom(self) -> None:
        if self._busy:
            return
        self._busy = True
        self.strategy.value = "custom"
        self.ratio.disabled = True
        self._busy = False
        self._guard(lambda: self.set_plan(Plan.parse(self.custom.value, self.depths)))

    def _on_span(self, stack: str, i: int, change) -> None:
        """Position i now starts a span of k: spans it overlaps give way to original layers."""
        if self._busy:
            return
        if change["new"] == COVERED:   # not a choice: put the old value back and explain
            self._busy = True
            self.spans[stack][i].value = change["old"]
            self._busy = False
            self._message("· marks a layer inside a module that starts below it; pick 1 (original) or a module size")
            return
        k, n = int(change["new"]), self.depths[stack]
        spans = {a: m for a, m in self.current.blocks(stack) if a + m <= i or a >= i + k}
        spans[i] = k
        out, pos = [], 0
        while pos < n:
            out.append(spans.get(pos, 1))
            pos += out[-1]
        plan = Plan.of({s: (tuple(out) if s == stack else self.current.stack(s)) for s in self.depths})
        self._busy = True
        self.strategy.value = "custom"
        self.ratio.disabled = True
        self.custom.value = str(plan)
        self._busy = False
        self._guard(lambda: self.set_plan(plan))

    # ---- read-outs ------------------------------------------------------------------------
    def _refresh(self) -> None:
        out = self.readouts()          # raises KeyError for an unscreened plan: the guard clears the read-out
        self.readout.value = table(out)
        self._show(self.figure())
        r = self.screen.loc[str(self.plan)]
        self._record(str(self.plan), {"plan": str(self.plan), "params": int(r.params), "ratio": float(r.ratio),
                                      "ideal_speedup": float(r.ideal_speedup), "screened_nll": float(r.nll),
                                      "screened_token_acc_%": 100 * float(r.token_acc)})

    def readouts(self) -> dict[str, str]:
        """The current plan's numbers, each next to the original model's (the teacher's row of the screen)."""
        plan = self.plan
        key = str(plan)
        if key not in self.screen.index:
            raise KeyError(f"plan {key} is not in the screened table: screen it with mtlab.explore.screen")
        r = self.screen.loc[key]
        t = self.screen.loc[str(Plan.teacher(self.depths))] if str(Plan.teacher(self.depths)) in self.screen.index \
            else None
        words = int(r.words) if "words" in r and pd.notna(r.words) else None
        n = f" (dev, n={words:,} words)" if words else " (dev)"
        out = {"plan": key, "parameters": fmt_size(r.params, t.params if t is not None else None),
               "stack compression": f"{r.ratio:.2f}x", "FLOP-ideal speed-up": f"{r.ideal_speedup:.2f}x",
               f"screened token NLL{n}": fmt_metric(r.nll, t.nll if t is not None else None, 4)}
        acc = [("token_acc", "screened token accuracy %")]
        if "tf_word_acc" in r:
            acc.append(("tf_word_acc", "screened teacher-forced word accuracy %"))
        for c, label in acc:
            out[label + n] = fmt_metric(100 * r[c], 100 * t[c] if t is not None else None, 1)
        if self.frontier is not None and key in self.frontier.index:
            f = self.frontier.loc[key]
            f = f.iloc[0] if isinstance(f, pd.DataFrame) else f
            out["decoded test WER %"] = f"{f.test_wer:.1f}"
            if "speedup_b64" in f:
                out["measured speed-up (batch 1 / 64)"] = f"{f.speedup_b1:.2f}x / {f.speedup_b64:.2f}x"
        rank = int((self.screen.nll < r.nll).sum()) + 1
        out["rank by screened NLL"] = f"{rank} of {len(self.screen)}"
        return out

    @staticmethod
    def _caption(plan: str | None) -> str:
        return f"ringed: {plan}" if plan else "ringed: nothing (no valid plan)"

    def figure(self, selected: bool = True):
        """Every screened plan (FLOP-ideal speed-up vs token NLL), the screened frontier, this plan
        ringed (`selected=False`: none, for an invalid state). Same size whatever the state."""
        from .explore.frontier import frontier_plot

        d = self.screen.reset_index()
        teacher = str(Plan.teacher(self.depths))
        d["kind"] = ["teacher" if p == teacher else "modules" for p in d.plan]
        fig = PlotFigure(figsize=self.FIGSIZE)   # not pyplot's: see _Explorer
        ax = fig.subplots()
        frontier_plot(d, "ideal_speedup", "nll", ax=ax, highlight=str(self.plan) if selected else None)
        ax.set(xlabel="FLOP-ideal speed-up (x)", ylabel="screened token NLL (dev, nats)",
               title=str(self.plan) if selected else "no valid plan selected")
        fig.subplots_adjust(left=0.14, right=0.97, bottom=0.13, top=0.91)
        fig.mtlab_selected = str(self.plan) if selected else None
        return fig


def _valid(plan: Plan, depths, granularities) -> bool:
    try:
        plan.validate(depths, granularities)
        return True
    except PlanError:
        return False


def _busy_line(specs) -> str:
    return f"<span class='mtlab-busy' style='color:#a60'>&#9203; {BUSY} {html.escape('; '.join(specs))}</span>"


@dataclass(frozen=True)
class MergeState:
    """One snapshot of the merge explorer's controls: the merge specs, the layer-pruning specs they are
    compared with (and how those were chosen), the windows to outline. Equal states show equal read-outs."""
    merge: tuple[str, ...]
    prune: tuple[str, ...]
    windows: tuple[tuple[str, int, int], ...]
    prune_note: str = ""

    def keys(self) -> list[tuple[str, ...]]:
        """Every spec list whose scores the read-out needs: the original model, the merge, the pruning."""
        return [(), self.merge] + ([self.prune] if self.prune else [])


class MergeExplorer(_Explorer):
    """Pick, per stack, a window of layers whose FF sublayers merge (anchor, method); see the
    CKA heatmap with the window outlined, the merged model's size and quality next to the original
    model's, and layer pruning at the closest size not larger than the merged model.

    `similarity`: {stack: square DataFrame of layer-by-layer similarity (e.g. CKA of FF outputs)};
    `evaluate(specs) -> dict` scores a list of merge/prune specs ([] is the original model): params,
    metrics named SPLIT_METRIC (dev_per, dev_wer, ...) and n (words scored); results are memoised by
    the exact spec list. `params(specs) -> int`: the parameter count of a spec list without scoring
    it, used to pick the pruning comparison (without it: `prune_blocks(stack, a, b)` blocks per
    window, default b - a, and the read-out says when that is larger than the merge).
    `background=True` scores on a worker thread (the notebook's choice; tests call `wait()`)."""

    def __init__(self, similarity: Mapping[str, pd.DataFrame], depths: Mapping[str, int],
                 evaluate: Callable[[list[str]], dict], prune_blocks: Callable[[str, int, int], int] | None = None,
                 *, params: Callable[[list[str]], int] | None = None, background: bool = False,
                 similarity_label: str = "CKA of FF outputs"):
        import ipywidgets as W

        self.FIGSIZE = (0.9 + 3.9 * len(similarity), 3.6)   # one heatmap per stack, a colour bar
        self.similarity, self.depths, self.similarity_label = dict(similarity), dict(depths), similarity_label
        self.evaluate_fn, self.prune_blocks, self.params_fn = evaluate, prune_blocks or (lambda s, a, b: b - a), params
        self.memo: dict[tuple, dict] = {}
        self._sizes: dict[tuple, int] = {}
        self._eval_lock = threading.Lock()
        self.worker = LatestWorker(self._compute, "mtlab-merge-explorer") if background else None
        self.shown: MergeState | None = None   # the state the read-out, plot and outline show
        self.controls = {}
        rows = []
        for s, n in self.depths.items():
            on = W.Checkbox(value=False, description=f"merge {s}", indent=False, layout=W.Layout(width="140px"))
            rng = W.IntRangeSlider(value=(max(0, n - 3), n - 1), min=0, max=n - 1, description="layers",
                                   continuous_update=False)
            anchor = W.Dropdown(options=["first", "middle", "last"], value="middle", description="anchor",
                                layout=W.Layout(width="180px"))
            method = W.Dropdown(options=["permute", "vanilla"], value="permute", description="method",
                                layout=W.Layout(width="200px"))
            for w, cls in ((on, "mtlab-merge-on"), (rng, "mtlab-merge-range"), (anchor, "mtlab-anchor"),
                           (method, "mtlab-method")):
                w.add_class(cls)
                w.observe(lambda ch: self._update(), names="value")
            self.controls[s] = {"on": on, "range": rng, "anchor": anchor, "method": method}
            rows.append(W.HBox([on, rng, anchor, method]))
        self._outputs()
        self.widget = W.VBox([*rows, self.error, self.status, W.HBox([self.readout, self.plot], layout=_wrap()),
                              self.history_view])
        first = next(iter(self.depths))
        self.controls[first]["on"].value = True   # triggers the first update

    # ---- the state of the controls -----------------------------------------------------------
    def windows(self) -> dict[str, tuple[int, int]]:
        return {s: c["range"].value for s, c in self.controls.items() if c["on"].value}

    def specs(self, windows: Mapping[str, tuple[int, int]] | None = None) -> list[str]:
        out = []
        for s, (a, b) in (self.windows() if windows is None else windows).items():
            if b <= a:
                raise ValueError(f"{s}: a merge needs a window of 2 or more layers; widen the range "
                                 f"(now {a}-{b})")
            c = self.controls[s]
            out.append(f"{s}:{a}-{b}@{c['anchor'].value}/{c['method'].value}")
        return out

    def size(self, specs) -> int:
        """Parameters of the model `specs` build, from `params` (memoised; no scoring)."""
        key = tuple(specs)
        if key not in self._sizes:
            self._sizes[key] = int(self.params_fn(list(key)))
        return self._sizes[key]

    def prune_specs(self, windows: Mapping[str, tuple[int, int]] | None = None) -> list[str]:
        """Layer pruning to compare with the merge: blocks dropped from the top of each merged window
        ("prune STACK:START-END" keeps START). With `params`: the largest pruned model that is not
        larger than the merged one; otherwise `prune_blocks(stack, a, b)` blocks per window."""
        return list(self._prune(self.windows() if windows is None else windows)[0])

    def _prune(self, wins: Mapping[str, tuple[int, int]]) -> tuple[tuple[str, ...], str]:
        wins = {s: w for s, w in wins.items() if w[1] > w[0]}
        if not wins:
            return (), ""
        if self.params_fn is None:
            ns = [max(1, min(b - a, self.prune_blocks(s, a, b))) for s, (a, b) in wins.items()]
            return tuple(f"prune {s}:{b - n}-{b}" for (s, (a, b)), n in zip(wins.items(), ns)), "blocks by prune_blocks"
        target, best = self.size(self.specs(wins)), None
        for ns in itertools.product(*[range(b - a + 1) for a, b in wins.values()]):
            cand = tuple(f"prune {s}:{b - n}-{b}" for (s, (a, b)), n in zip(wins.items(), ns) if n)
            if cand and self.size(cand) <= target and (best is None or self.size(cand) > self.size(best)):
                best = cand
        if best is None:
            return (), "no layer pruning inside the windows is as small as the merged model"
        return best, "the closest size not larger than the merged model"

    def state(self) -> MergeState:
        """A snapshot of the controls (raises ValueError for an invalid one)."""
        wins = self.windows()
        merge = tuple(self.specs(wins))
        prune, note = self._prune(wins)
        return MergeState(merge, prune, tuple((s, a, b) for s, (a, b) in wins.items()), note)

    # ---- scoring -------------------------------------------------------------------------------
    def scores(self, specs) -> dict:
        """evaluate(specs), memoised by the exact spec list; one evaluation at a time."""
        key = tuple(specs)
        with self._eval_lock:
            if key not in self.memo:
                self.memo[key] = dict(self.evaluate_fn(list(key)))
        return self.memo[key]

    def _compute(self, st: MergeState) -> None:
        """Score what `st` needs (the worker's job); draw each part as soon as it is known, if `st` is
        still the state on screen."""
        try:
            for key in st.keys():
                if key not in self.memo:
                    with self._lock:
                        if st != self.shown:   # the controls moved on: their own request is queued
                            return
                        self.status.value = _busy_line(key or ("original model",))
                    self.scores(key)
                self._land(st)
        except Exception as e:  # noqa: BLE001 - shown in the error line, never lost in a thread
            with self._lock:
                if st == self.shown:
                    self._invalid(f"scoring {'; '.join(st.merge)} failed: {type(e).__name__}: {e}")

    def _land(self, st: MergeState) -> None:
        """Show the read-out of `st`, only if the controls still show `st` (a stale result never lands)."""
        with self._lock:
            if st != self.shown:
                return
            done = all(k in self.memo for k in st.keys())
            self.readout.value = table(self._readouts(st))
            if done:
                self.status.value = ""
                self._record("; ".join(st.merge + st.prune), self._history_row(st))

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the background worker is idle (True) or `timeout` seconds passed (False)."""
        return True if self.worker is None else self.worker.wait(timeout)

    # ---- events --------------------------------------------------------------------------------
    def _sync_controls(self) -> None:
        """Controls that change nothing in this state are disabled: an unticked stack's window, anchor
        and method; the anchor of vanilla averaging (every layer gets the same average)."""
        for c in self.controls.values():
            off = not c["on"].value
            c["range"].disabled = c["method"].disabled = off
            c["anchor"].disabled = off or c["method"].value == "vanilla"

    def _update(self) -> None:
        """Any control changed: draw the new state at once (outline; read-out from the memo or "computing")."""
        with self._lock:
            self._sync_controls()
            self.error.value = ""
            try:
                st = self.state()
            except (ValueError, KeyError) as e:
                self.shown = None
                self._invalid(str(e.args[0] if e.args else e))
                return
            self.shown = st
            self._show(self.figure(windows={s: (a, b) for s, a, b in st.windows}))
            if not st.merge:
                self.readout.value = table({"merge": "nothing selected: tick a stack"})
                self.status.value = ""
                return
            self._land(st)
            if all(k in self.memo for k in st.keys()):
                return
            self.status.value = _busy_line(st.merge)
        if self.worker is not None:
            self.worker.submit(st)
        else:
            self._compute(st)

    # ---- read-outs -----------------------------------------------------------------------------
    def readouts(self) -> dict[str, str]:
        """The current state's read-out, scoring whatever is missing now (blocks; for static reports)."""
        st = self.state()
        if not st.merge:
            return {"merge": "nothing selected: tick a stack"}
        for key in st.keys():
            self.scores(key)
        return {k: v if isinstance(v, str) else "; ".join(v) for k, v in self._readouts(st).items()}

    def _readouts(self, st: MergeState) -> dict[str, str | list[str]]:
        """Read-out of `st` from the memo: "computing..." for what is not scored yet."""
        o, m, p = (self.memo.get(k) for k in ((), st.merge, st.prune if st.prune else None))
        known = next((r for r in (o, m, p) if r is not None), None)
        metrics = metric_keys(known) if known is not None else []
        words = next((r.get("n") for r in (o, m, p) if r is not None and r.get("n")), None)
        label = {k: metric_label(k, words) for k in metrics}
        ref = o["params"] if o is not None else None

        def rows(name: str, r: dict | None) -> dict:
            if r is None:
                return {f"{name} parameters": BUSY}
            out = {f"{name} parameters": fmt_size(r["params"], None if r is o else ref)}
            out.update({f"{name} {label[k]}": fmt_metric(r.get(k), None if r is o else (o or {}).get(k))
                        for k in metrics})
            return out

        out: dict[str, str | list[str]] = {"merge": list(st.merge)}
        out.update(rows("original", o))
        out.update(rows("merged", m))
        if not st.prune:
            out["layer pruning"] = st.prune_note or "none"
            return out
        out["layer pruning"] = list(st.prune)
        out["pruning compared at"] = st.prune_note
        out.update(rows("pruned", p))
        if m is not None and p is not None and p["params"] > m["params"]:
            out["pruned parameters"] += f" - LARGER than the merged model ({fmt_params(m['params'])})"
        return out

    def _history_row(self, st: MergeState) -> dict:
        o, m = self.memo[()], self.memo[st.merge]
        row = {"merge": "; ".join(st.merge), "params": m["params"], "removed_%": 100 * (1 - m["params"] / o["params"])}
        row.update({k: m[k] for k in metric_keys(m)})
        if st.prune:
            p = self.memo[st.prune]
            row.update({"prune": "; ".join(st.prune), "prune_params": p["params"],
                        "prune_removed_%": 100 * (1 - p["params"] / o["params"])})
            row.update({f"prune_{k}": p[k] for k in metric_keys(p)})
        return row

    def history(self) -> pd.DataFrame:
        """Every merge state scored so far (the latest last): merged and pruned params, share removed,
        metrics; `attrs["original"]` holds the original model's scores."""
        df = super().history()
        if () in self.memo:
            df.attrs["original"] = dict(self.memo[()])
        return df

    @staticmethod
    def _caption(wins) -> str:
        return "outlined: " + ("; ".join(f"{s} {a}-{b}" for s, (a, b) in wins.items()) if wins else "nothing")

    def figure(self, selected: bool = True, windows: Mapping[str, tuple[int, int]] | None = None):
        """Similarity heatmap per stack (layers on both axes, one colour bar), each valid window of the
        controls (or of `windows`) outlined (`selected=False`: none). Same size whatever the state."""
        import seaborn as sns
        from matplotlib.patches import Rectangle

        stacks = list(self.similarity)
        fig = PlotFigure(figsize=self.FIGSIZE)   # not pyplot's: see _Explorer
        w = 0.78 / len(stacks)
        axes = [fig.add_axes([0.07 + i * (w + 0.02), 0.16, w - 0.04, 0.72]) for i in range(len(stacks))]
        cax = fig.add_axes([0.87, 0.16, 0.018, 0.72])
        wins = self.windows() if windows is None else windows
        wins = {s: w for s, w in wins.items() if w[1] > w[0]} if selected else {}
        for ax, s in zip(axes, stacks):
            sns.heatmap(self.similarity[s], vmin=0, vmax=1, cmap="viridis", square=True, ax=ax, cbar=s == stacks[-1],
                        cbar_ax=cax if s == stacks[-1] else None)
            ax.set(xlabel=f"{s} layer", ylabel=f"{s} layer",
                   title=f"{s}: merge {wins[s][0]}-{wins[s][1]}" if s in wins else f"{s}: no merge")
            if s in wins:   # a 1-layer "window" merges nothing
                a, b = wins[s]
                ax.add_patch(Rectangle((a, a), b - a + 1, b - a + 1, fill=False, edgecolor="red", lw=2.5))
        cax.set_ylabel(self.similarity_label)
        fig.mtlab_selected = wins
        return fig


__all__ = ["AssemblyExplorer", "MergeExplorer", "MergeState", "PlotFigure", "STRATEGIES", "COVERED"]
