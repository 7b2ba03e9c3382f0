"""The assembly explorer: a plan per span position, by strategy and target ratio, or the best screened
plan at a speed-up, read against a screened table: the whole assembly space (instant: no model is run),
or, for a space too large to screen whole, the searched frontier and a sample, with any other plan
screened on demand. The plan on screen can be pinned, compared and exported."""
from __future__ import annotations

import base64
import html
import math
from itertools import product
from typing import Callable, Mapping

import pandas as pd

from ..modular.plan import Plan, PlanError, ladders, size_first, stack_ratio, strategies, tilings
from .explorer import Explorer, PlotFigure, wrap_layout
from .readout import fmt_metric, fmt_size, table

CUSTOM = "custom"   # the strategy of a plan set by hand (span controls, the custom box, best at a speed-up)
COVERED = "·"   # a position inside a module span started below it
PLOT_POINTS = 2000   # most plans drawn: beyond it, the frontier, the teacher, the plan and a sample
ON_DEMAND = "on demand"   # `source` of a plan screened when it was chosen
SPEED_DIGITS = 2     # speed-ups are shown to 2 decimals; "best at a speed-up" compares what is shown
RING_PT = math.sqrt(260) / 2   # radius (points) of the ring `frontier_plot` draws round the selected plan


def strategy_options() -> tuple[str, ...]:
    """The registered assembly strategies (`mtlab.modular.plan.strategies`) and "custom"."""
    return (*strategies(), CUSTOM)


def ratio_options(depths: Mapping[str, int], granularities: Mapping[str, tuple[int, ...]],
                  block_params: Mapping[str, int]) -> list[tuple[str, float]]:
    """Every layer-stack compression ratio a plan of the space has, as (label, ratio), smallest first:
    a ratio depends only on the number of blocks per stack. Labels have 2 decimals, more where two
    ratios would read the same (so a reader never picks 1.50 and gets 1.4958)."""
    counts = [sorted({len(t) for t in tilings(n, tuple(granularities.get(s, ())))}) for s, n in depths.items()]
    full = sum(n * block_params[s] for s, n in depths.items())
    values = sorted({round(full / sum(c * block_params[s] for s, c in zip(depths, combo)), 12)
                     for combo in product(*counts)})
    out = []
    for i, v in enumerate(values):
        d = 2
        while d < 6 and any(f"{v:.{d}f}" == f"{w:.{d}f}" for w in values[max(0, i - 1):i + 2] if w != v):
            d += 1
        out.append((f"{v:.{d}f}", v))
    return out


def parse_plan(text: str, depths: Mapping[str, int]) -> Plan:
    """`Plan.parse`, also reading a stack typed as one module of 10 or more layers: 'e=12' for a 12-layer
    encoder means the one 12-module here (`Plan.parse` alone reads spans 1 and 2; `str(Plan)` writes 'e=12,')."""
    plan = Plan.parse(text, depths)
    spans = dict(plan.spans)
    for item in text.replace(";", " ").split():
        name, _, body = item.partition("=")
        stack = Plan.parse(f"{name}=1").stacks[0]
        n = depths.get(stack)
        if n and body.isdigit() and len(body) > 1 and int(body) == n and sum(map(int, body)) != n:
            spans[stack] = (n,)
    return Plan.of(spans)


def plan_slug(plan: str) -> str:
    """'e=33 d=1122' -> 'e33_d1122': a folder name."""
    return "_".join(part.replace("=", "") for part in str(plan).split())


class AssemblyExplorer(Explorer):
    """Pick a plan per span position, by strategy and target ratio, or as the best screened plan at a
    FLOP-ideal speed-up; see its size, speed-up, screened quality next to the original model's and its
    place among every screened plan (hover a point of the plot for its plan); pin two picks to compare
    them; export the pick.

    `screen`: one row per plan (`mtlab.explore.screen.screen`: plan, params, ratio,
    ideal_speedup, nll, token_acc, tf_word_acc, words), optionally `source` (e.g. "searched",
    "sample": the plot's legend); `frontier` (optional): decoded candidates (plan, test_wer,
    speedup_b64, ...) whose numbers are shown when the plan is one of them. `score` (optional)
    screens a plan missing from the table (a row dict; it joins the table as "on demand"), so a
    partial table (`mtlab.experiments.explore.searched_explorer`) serves any plan. The read-out says
    how many of the space's plans are screened. `build(plan) -> model` (optional) makes the Export
    button work (`task`: its tokenizer is exported too); `code(plan, folder) -> str` is the Python
    code shown after an export, doing the same.

    The strategies are the registered ones (`mtlab.modular.plan.strategies`): size-first picks the
    least disruptive plan reaching the target ratio; any other strategy, the least compressed plan of
    its ladder that reaches it. The target ratio snaps to the ratios the space has."""

    DIGITS = {"screened_nll": 4}

    def __init__(self, screen: pd.DataFrame, depths: Mapping[str, int], granularities: Mapping[str, tuple[int, ...]],
                 block_params: Mapping[str, int], frontier: pd.DataFrame | None = None,
                 score: Callable[[Plan], Mapping] | None = None, *, build: Callable[[Plan], object] | None = None,
                 task=None, code: Callable[[str, str], str] | None = None):
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
        self.build, self.task, self.code = build, task, code
        self._busy = False
        self._chosen: tuple[str, list[str]] | None = None   # (plan, how it was chosen) for "best at a speed-up"
        self.current = Plan.teacher(self.depths)

        self.strategy = W.Dropdown(options=strategy_options(), value=strategy_options()[0], description="strategy")
        self.strategy.add_class("mtlab-strategy")
        self.ratios = ratio_options(self.depths, self.granularities, self.block_params)
        start = next((v for _, v in self.ratios if v >= 2.0 - 1e-9), self.ratios[-1][1])
        self.ratio = W.SelectionSlider(options=self.ratios, value=start, description="target ratio",
                                       continuous_update=False, layout=W.Layout(width="660px"),
                                       style={"description_width": "80px"})
        self.ratio.add_class("mtlab-ratio")
        self.custom = W.Text(description="custom plan", placeholder="e.g. e=1122 d=33", continuous_update=False,
                             layout=W.Layout(width="360px"), style={"description_width": "90px"})
        self.custom.add_class("mtlab-custom")
        fastest = float(self.screen.ideal_speedup.max())
        self.speedup = W.BoundedFloatText(value=min(1.5, round(fastest, 2)), min=1.0, max=round(fastest, 2) + 0.005,
                                          step=0.05, description="min speed-up", layout=W.Layout(width="190px"),
                                          style={"description_width": "90px"})
        self.best = W.Button(description="best plan at this speed-up", layout=W.Layout(width="210px"),
                             tooltip="the screened plan with the lowest screened NLL among those at least this "
                                     "fast (FLOP-ideal speed-up as shown, 2 decimals)")
        self.speedup.add_class("mtlab-speedup")
        self.best.add_class("mtlab-best")
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
        self.speedup.observe(lambda ch: self._on_best(), names="value")
        self.best.on_click(lambda _: self._on_best())
        self._auto_dir = ""
        self.widget = self._live(W.VBox([
            W.HBox([self.strategy, self.ratio], layout=W.Layout(flex_flow="row wrap")),
            W.HBox([self.custom, self.speedup, self.best], layout=W.Layout(flex_flow="row wrap")),
            *rows, self.error, W.HBox([self.readout, self.plot], layout=wrap_layout()), *self._actions(),
            self.history_view]))
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

    def plan_ratio(self, plan: Plan) -> float:
        return stack_ratio(dict(plan.spans), self.block_params)

    def set_plan(self, plan: Plan | str) -> None:
        """Show `plan` in the span controls and the custom box (raises PlanError for an invalid plan); in
        custom mode the disabled ratio slider shows the plan's own compression ratio."""
        plan = parse_plan(plan, self.depths) if isinstance(plan, str) else plan
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
            self.custom.value = str(plan)   # the box always shows the plan in force
            if self.strategy.value == CUSTOM:
                r = self.plan_ratio(plan)
                self.ratio.value = min((v for _, v in self.ratios), key=lambda v: abs(v - r))
            if self.export_dir.value.strip() in ("", self._auto_dir):   # follow the plan until the user types one
                self._auto_dir = self.export_dir.value = f"exports/{plan_slug(plan)}"
        finally:
            self._busy = False
        self._refresh()

    def target_plan(self) -> Plan:
        """The plan the strategy and the target ratio choose (custom: the plan in the custom box)."""
        s, t = self.strategy.value, self.ratio.value
        if s == CUSTOM:
            return parse_plan(self.custom.value or str(self.plan), self.depths)
        if s == "size_first":   # per target, not only its default ladder's rungs
            plans = size_first(self.depths, self.granularities, self.block_params, [t])
        else:
            ladder = [p for _, p in ladders(self.depths, self.granularities, self.block_params, names=[s])]
            plans = sorted((p for p in ladder if self.plan_ratio(p) >= t - 1e-9), key=self.plan_ratio)[:1]
        if not plans:
            raise PlanError(f"no {s.replace('_', '-')} plan reaches a ratio of {t:.2f}: lower the target")
        return plans[0]

    def best_at_speedup(self, speedup: float) -> str:
        """The screened plan with the lowest screened NLL among those whose FLOP-ideal speed-up, as shown
        (2 decimals), is at least `speedup` (ties: the faster one). Only screened plans count."""
        shown = self.screen.ideal_speedup.round(SPEED_DIGITS)
        fast = self.screen[shown >= round(float(speedup), SPEED_DIGITS)]
        if not len(fast):
            raise PlanError(f"no screened plan reaches {speedup:.2f}x FLOP-ideal speed-up (the fastest screened: "
                            f"{self.screen.ideal_speedup.max():.2f}x): lower the speed-up")
        return str(fast.assign(neg=-fast.ideal_speedup).sort_values(["nll", "neg"]).index[0])

    # ---- events ---------------------------------------------------------------------------
    def _on_strategy(self) -> None:
        if self._busy:
            return
        self._chosen = None
        self.ratio.disabled = self.strategy.value == CUSTOM
        self._guard(lambda: self.set_plan(self.target_plan()))

    def _to_custom(self) -> None:
        self._busy = True
        self.strategy.value = CUSTOM
        self.ratio.disabled = True
        self._busy = False

    def _on_custom(self) -> None:
        if self._busy:
            return
        self._chosen = None
        self._to_custom()
        self._guard(lambda: self.set_plan(parse_plan(self.custom.value, self.depths)))

    def _on_best(self) -> None:
        """Best plan at the typed speed-up: shown as a custom plan, the read-out says how it was chosen."""
        def pick():
            s = float(self.speedup.value)
            plan = self.best_at_speedup(s)
            self._chosen = (plan, [f"lowest screened NLL at >= {s:.2f}x FLOP-ideal speed-up",
                                   f"(among the {len(self.screen):,} screened plans)"])
            self.set_plan(plan)

        self._to_custom()
        self._guard(pick)

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
        self._chosen = None
        self._to_custom()
        self._guard(lambda: self.set_plan(plan))

    # ---- read-outs ------------------------------------------------------------------------
    def _refresh(self) -> None:
        out = self.readouts()          # raises KeyError for an unscreened plan: the guard clears the read-out
        self.readout.value = table(out)
        self._show(self.figure())
        r = self.screen.loc[str(self.plan)]
        row = {"plan": str(self.plan), "params": int(r.params), "ratio": float(r.ratio),
               "ideal_speedup": float(r.ideal_speedup), "screened_nll": float(r.nll),
               "screened_token_acc_%": 100 * float(r.token_acc)}
        if "tf_word_acc" in r and pd.notna(r.tf_word_acc):
            row["screened_tf_word_acc_%"] = 100 * float(r.tf_word_acc)
        self._record(str(self.plan), row)

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

    def readouts(self) -> dict[str, str | list[str]]:
        """The current plan's numbers, each next to the original model's (the teacher's row of the screen)."""
        plan = self.plan
        key = str(plan)
        r = self.row(plan)
        t = self.screen.loc[str(Plan.teacher(self.depths))] if str(Plan.teacher(self.depths)) in self.screen.index \
            else None
        unit = next((u for u in ("words", "sentences", "tokens") if u in r and pd.notna(r[u])), None)  # the task's
        n = f" (dev, n={int(r[unit]):,} {unit})" if unit else " (dev)"
        out = {"plan": key}
        if self._chosen is not None and self._chosen[0] == key:
            out["chosen as"] = self._chosen[1]
        out.update({"parameters": fmt_size(r.params, t.params if t is not None else None),
                    "stack compression": f"{r.ratio:.2f}x", "FLOP-ideal speed-up": f"{r.ideal_speedup:.2f}x",
                    f"screened token NLL{n}": fmt_metric(r.nll, t.nll if t is not None else None, 4)})
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
        plan ringed (`selected=False`: none, for an invalid state), the "teacher" label placed clear of the
        ring. Same size whatever the state. `fig.mtlab_points`: (x px, y px, plan, tooltip) per plan."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        from ..explore.frontier import frontier_plot

        plan = str(self.plan) if selected else None
        d = self.plotted(plan)
        fig = PlotFigure(figsize=self.FIGSIZE)   # not pyplot's: see Explorer
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        frontier_plot(d, "ideal_speedup", "nll", ax=ax, highlight=plan)
        ax.set(xlabel="FLOP-ideal speed-up (x)", ylabel="screened token NLL (dev, nats)",
               title=plan if selected else "no valid plan selected")
        fig.subplots_adjust(left=0.14, right=0.97, bottom=0.13, top=0.91)
        ax.get_xlim(), ax.get_ylim()   # settle the autoscaled limits: data -> pixels is fixed from here
        h = fig.bbox.height
        xy = ax.transData.transform(d[["ideal_speedup", "nll"]].to_numpy(float))
        fig.mtlab_points = [(float(x), float(h - y), p, f"{p} · {r:.2f}x stack compression · {s:.2f}x FLOP-ideal "
                             f"speed-up · screened NLL {nll:.4f}")
                            for (x, y), p, r, s, nll in zip(xy, d.plan, d.ratio, d.ideal_speedup, d.nll)]
        ring = next(((x, y) for x, y, p, _ in fig.mtlab_points if p == plan), None)
        _place_teacher_label(fig, ax, ring)
        fig.mtlab_selected = plan
        return fig

    # ---- the plot with hover targets -------------------------------------------------------
    def _image_widget(self, w: int, h: int):
        import ipywidgets as W

        return W.HTML(layout=W.Layout(width=f"{w}px", height=f"{h}px", margin="0", overflow="visible"))

    def _paint(self, fig) -> None:
        """The PNG with a transparent hover target over each plan: the browser's tooltip names the plan
        (works offline and without a round trip to the kernel)."""
        w, h = (int(round(v)) for v in fig.bbox.size)
        img = base64.b64encode(self.png).decode()
        selected = getattr(fig, "mtlab_selected", None)
        pts = sorted(getattr(fig, "mtlab_points", []), key=lambda p: p[2] == selected)   # the ringed one on top
        dots = "".join(f"<i class='mtlab-pt{' mtlab-pt-selected' if p == selected else ''}' "
                       f"data-plan='{html.escape(p)}' title='{html.escape(tip)}' "
                       f"style='left:{x:.1f}px;top:{y:.1f}px'></i>" for x, y, p, tip in pts)
        self.image.value = (
            "<style>.mtlab-pt{position:absolute;width:12px;height:12px;margin:-6px 0 0 -6px;border-radius:50%;"
            "cursor:help}.mtlab-pt:hover{outline:1px solid #555}</style>"
            f"<div class='mtlab-picture' style='position:relative;width:{w}px;height:{h}px;line-height:0'>"
            f"<img src='data:image/png;base64,{img}' width='{w}' height='{h}' style='display:block' "
            f"alt='{html.escape(self._caption(selected))}'>{dots}</div>")

    # ---- export ----------------------------------------------------------------------------
    def pick(self) -> Plan:
        if self._key is None:
            raise ValueError("the controls show no valid plan: fix the plan first (see the message above)")
        return self.plan

    def export_code(self, plan, directory: str) -> str:
        if self.code is not None:
            return self.code(str(plan), directory)
        return super().export_code(str(plan), directory)


def _place_teacher_label(fig, ax, ring) -> None:
    """Move `frontier_plot`'s "teacher" label to the first offset whose text box is clear of the ring
    round the selected plan (at `ring`, pixels from the top left) and inside the axes."""
    label = next((t for t in ax.texts if t.get_text() == "teacher"), None)
    if label is None:
        return
    xy = label.xy
    label.remove()
    renderer = fig.canvas.get_renderer()
    h = fig.bbox.height
    r = RING_PT * fig.dpi / 72 + 3   # the ring's radius and line, pixels
    box = ax.get_window_extent(renderer)
    offsets = [(4, 4), (10, 9), (10, -16), (-46, 9), (-46, -16), (16, 20), (16, -28), (-46, 22), (24, 2)]
    for k, off in enumerate(offsets):
        t = ax.annotate("teacher", xy, textcoords="offset points", xytext=off, fontsize=8)
        e = t.get_window_extent(renderer)
        clear = ring is None or _clear(e, (ring[0], h - ring[1]), r)
        inside = e.x0 >= box.x0 and e.x1 <= box.x1 and e.y0 >= box.y0 and e.y1 <= box.y1
        if (clear and inside) or k == len(offsets) - 1:
            return
        t.remove()


def _clear(extent, centre, radius: float) -> bool:
    """Whether a text box (display pixels) keeps out of a circle."""
    cx = min(max(centre[0], extent.x0), extent.x1)
    cy = min(max(centre[1], extent.y0), extent.y1)
    return math.hypot(cx - centre[0], cy - centre[1]) > radius


__all__ = ["AssemblyExplorer", "CUSTOM", "COVERED", "ON_DEMAND", "PLOT_POINTS", "strategy_options", "ratio_options",
           "plan_slug"]
