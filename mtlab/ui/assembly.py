"""The assembly explorer: a plan per span position, or by strategy and target ratio, read against a
screened table: the whole assembly space (instant: no model is run), or, for a space too large to
screen whole, the searched frontier and a sample, with any other plan screened on demand."""
from __future__ import annotations

from typing import Callable, Mapping

import pandas as pd

from ..modular.plan import Plan, PlanError, size_first, speed_first, stack_ratio, tilings, uniform
from .explorer import Explorer, PlotFigure, wrap_layout
from .readout import fmt_metric, fmt_size, table

STRATEGIES = ("size_first", "speed_first", "uniform", "custom")
COVERED = "·"   # a position inside a module span started below it
PLOT_POINTS = 2000   # most plans drawn: beyond it, the frontier, the teacher, the plan and a sample
ON_DEMAND = "on demand"   # `source` of a plan screened when it was chosen


class AssemblyExplorer(Explorer):
    """Pick a plan per span position or by strategy and target ratio; see its size, FLOP-ideal
    speed-up, screened quality next to the original model's and its place among every screened plan.

    `screen`: one row per plan (`mtlab.explore.screen.screen`: plan, params, ratio,
    ideal_speedup, nll, token_acc, tf_word_acc, words), optionally `source` (e.g. "searched",
    "sample": the plot's legend); `frontier` (optional): decoded candidates (plan, test_wer,
    speedup_b64, ...) whose numbers are shown when the plan is one of them. `score` (optional)
    screens a plan missing from the table (a row dict; it joins the table as "on demand"), so a
    partial table (`mtlab.experiments.explore.searched_explorer`) serves any plan. The read-out says
    how many of the space's plans are screened."""

    def __init__(self, screen: pd.DataFrame, depths: Mapping[str, int], granularities: Mapping[str, tuple[int, ...]],
                 block_params: Mapping[str, int], frontier: pd.DataFrame | None = None,
                 score: Callable[[Plan], Mapping] | None = None):
        import ipywidgets as W

        from ..explore.space import AssemblySpace

        for c in ("plan", "params", "ratio", "ideal_speedup", "nll", "token_acc"):
            if c not in screen.columns:
                raise ValueError(f"AssemblyExplorer needs a screened table with column {c!r} "
                                 "(mtlab.experiments.explore.screen_table)")
        self.screen = screen.set_index("plan")
        self.frontier = frontier.set_index("plan") if frontier is not None and len(frontier) else None
        self.depths, self.block_params = dict(depths), dict(block_params)
        self.granularities = {s: tuple(sorted(granularities.get(s, ()))) for s in self.depths}
        self.score_plan, self.plans_in_space = score, len(AssemblySpace(self.depths, self.granularities))
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
            rows.append(W.HBox(boxes, layout=W.Layout(flex_flow="row wrap")))   # any depth: rows wrap
        self._outputs()
        for w in (self.strategy, self.ratio):
            w.observe(lambda ch: self._on_strategy(), names="value")
        self.custom.observe(lambda ch: self._on_custom(), names="value")
        self.widget = W.VBox([W.HBox([self.strategy, self.ratio]), self.custom, *rows, self.error,
                              W.HBox([self.readout, self.plot], layout=wrap_layout()), self.history_view])
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

    def row(self, plan: Plan) -> pd.Series:
        """The plan's screened row; a plan missing from the table is screened now with `score`
        (and kept), or refused with the fix when there is none."""
        key = str(plan)
        if key not in self.screen.index:
            if self.score_plan is None:
                raise KeyError(f"plan {key} is not in the screened table: screen it with mtlab.explore.screen")
            r = dict(self.score_plan(plan))
            r.pop("plan", None)
            r["source"] = ON_DEMAND
            self.screen = pd.concat([self.screen, pd.DataFrame([r], index=pd.Index([key], name="plan"))])
        return self.screen.loc[key]

    def coverage(self) -> str:
        """'screened 1,234 of 85,849 plans (1.4%)': how much of the space the table holds."""
        n, total = len(self.screen), self.plans_in_space
        pct = 100 * n / total
        share = f"{pct:.0f}%" if pct >= 10 else f"{pct:.1f}%" if pct >= 0.1 else f"{pct:.2g}%"
        return f"screened {n:,} of {total:,} plans ({share})"

    def readouts(self) -> dict[str, str]:
        """The current plan's numbers, each next to the original model's (the teacher's row of the screen)."""
        plan = self.plan
        key = str(plan)
        r = self.row(plan)
        t = self.screen.loc[str(Plan.teacher(self.depths))] if str(Plan.teacher(self.depths)) in self.screen.index \
            else None
        unit = next((u for u in ("words", "sentences", "tokens") if u in r and pd.notna(r[u])), None)  # the task's
        n = f" (dev, n={int(r[unit]):,} {unit})" if unit else " (dev)"
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
        out["space"] = self.coverage()
        return out

    @staticmethod
    def _caption(plan: str | None) -> str:
        return f"ringed: {plan}" if plan else "ringed: nothing (no valid plan)"

    def plotted(self, selected: str | None = None) -> pd.DataFrame:
        """The plans drawn, with their `kind`: every screened plan, or past PLOT_POINTS the screened
        frontier, the teacher, the selected plan and a fixed sample of the rest."""
        from ..explore.frontier import pareto_mask

        d = self.screen.reset_index()
        teacher = str(Plan.teacher(self.depths))
        if len(d) > PLOT_POINTS:
            keep = pareto_mask(d, "ideal_speedup", "nll") | d.plan.isin([teacher, selected])
            rest = d[~keep].sample(n=min(PLOT_POINTS, int((~keep).sum())), random_state=0)
            d = pd.concat([d[keep], rest])
        src = d["source"] if "source" in d.columns else pd.Series("modules", index=d.index)
        d["kind"] = ["teacher" if p == teacher else str(k) for p, k in zip(d.plan, src.fillna("modules"))]
        return d

    def figure(self, selected: bool = True):
        """The screened plans (FLOP-ideal speed-up vs token NLL; see `plotted`), their frontier, this
        plan ringed (`selected=False`: none, for an invalid state). Same size whatever the state."""
        from ..explore.frontier import frontier_plot

        d = self.plotted(str(self.plan) if selected else None)
        fig = PlotFigure(figsize=self.FIGSIZE)   # not pyplot's: see Explorer
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


__all__ = ["AssemblyExplorer", "STRATEGIES", "COVERED", "ON_DEMAND", "PLOT_POINTS"]
