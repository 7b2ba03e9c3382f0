"""ipywidgets explorers of the assembly and merge-set spaces; the logic lives here, notebooks display.

Both explorers read precomputed tables (the screened assembly space, the similarity matrices)
and call injected functions for anything new, so they respond at once in JupyterLab and can be
unit-tested by setting widget values in Python. An invalid state is explained in the `error`
read-out, never raised. CSS classes (`mtlab-*`) name the parts for browser tests.
"""
from __future__ import annotations

import html
from typing import Callable, Mapping

import pandas as pd

from .modular.plan import Plan, PlanError, size_first, speed_first, stack_ratio, tilings, uniform

STRATEGIES = ("size_first", "speed_first", "uniform", "custom")
COVERED = "·"   # a position inside a module span started below it


def _fmt_params(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{int(n):,}"


def _table(items: Mapping[str, str]) -> str:
    rows = "".join(f"<tr><td style='padding-right:1em'><b>{html.escape(k)}</b></td><td>{html.escape(v)}</td></tr>"
                   for k, v in items.items())
    return f"<table>{rows}</table>"


class _Explorer:
    """What both explorers share: read-outs, an inline error line, a plot, and a guard that turns
    any invalid state into a message in the error line instead of a traceback."""

    def _outputs(self) -> None:
        import ipywidgets as W

        self.readout, self.error, self.plot = W.HTML(), W.HTML(), W.Output()
        for w, cls in ((self.readout, "mtlab-readout"), (self.error, "mtlab-error"), (self.plot, "mtlab-plot")):
            w.add_class(cls)
        self.renders = 0

    def _guard(self, fn: Callable[[], None]) -> None:
        try:
            self.error.value = ""
            fn()
        except (ValueError, KeyError) as e:   # PlanError is a ValueError
            self.error.value = f"<span style='color:#b00'>{html.escape(str(e.args[0] if e.args else e))}</span>"

    def _refresh(self) -> None:
        from IPython.display import display

        self.readout.value = _table(self.readouts())
        fig = self.figure()
        with self.plot:
            self.plot.clear_output(wait=True)
            display(fig)
        self.renders += 1

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)


class AssemblyExplorer(_Explorer):
    """Pick a plan per span position or by strategy and target ratio; see its size, FLOP-ideal
    speed-up, screened quality and its place among every screened plan.

    `screen`: one row per plan (`mtlab.explore.screen.screen`: plan, params, ratio,
    ideal_speedup, nll, token_acc, tf_word_acc); `frontier` (optional): decoded candidates
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
        self.ratio = W.FloatSlider(value=min(2.0, top), min=1.0, max=round(top, 2), step=0.05,
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
                              W.HBox([self.readout, self.plot])])
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
        """Show `plan` in the span controls (raises PlanError for an invalid plan)."""
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
            self.error.value = ("<span style='color:#b00'>· marks a layer inside a module that starts below it; "
                                "pick 1 (original) or a module size</span>")
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
    def readouts(self) -> dict[str, str]:
        plan = self.plan
        key = str(plan)
        if key not in self.screen.index:
            raise KeyError(f"plan {key} is not in the screened table: screen it with mtlab.explore.screen")
        r = self.screen.loc[key]
        out = {"plan": key, "parameters": _fmt_params(r.params), "stack compression": f"{r.ratio:.2f}x",
               "FLOP-ideal speed-up": f"{r.ideal_speedup:.2f}x", "screened token NLL": f"{r.nll:.4f}",
               "screened token accuracy": f"{100 * r.token_acc:.2f}%"}
        if "tf_word_acc" in r:
            out["screened word accuracy (teacher-forced)"] = f"{100 * r.tf_word_acc:.1f}%"
        if self.frontier is not None and key in self.frontier.index:
            f = self.frontier.loc[key]
            f = f.iloc[0] if isinstance(f, pd.DataFrame) else f
            out["decoded test WER"] = f"{f.test_wer:.1f}%"
            if "speedup_b64" in f:
                out["measured speed-up (batch 1 / 64)"] = f"{f.speedup_b1:.2f}x / {f.speedup_b64:.2f}x"
        rank = int((self.screen.nll < r.nll).sum()) + 1
        out["rank by screened NLL"] = f"{rank} of {len(self.screen)}"
        return out

    def figure(self):
        """Every screened plan (FLOP-ideal speed-up vs token NLL), the screened frontier, this plan ringed."""
        import matplotlib.pyplot as plt

        from .explore.frontier import frontier_plot

        d = self.screen.reset_index()
        teacher = str(Plan.teacher(self.depths))
        d["kind"] = ["teacher" if p == teacher else "modules" for p in d.plan]
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        frontier_plot(d, "ideal_speedup", "nll", ax=ax, highlight=str(self.plan))
        ax.set(xlabel="FLOP-ideal speed-up", ylabel="screened token NLL (dev)", title=str(self.plan))
        fig.tight_layout()
        plt.close(fig)
        return fig

def _valid(plan: Plan, depths, granularities) -> bool:
    try:
        plan.validate(depths, granularities)
        return True
    except PlanError:
        return False


class MergeExplorer(_Explorer):
    """Pick, per stack, a window of layers whose FF sublayers merge (anchor, method); see the
    CKA heatmap with the window outlined, the merged model's size and quality, and layer pruning
    at (nearly) the same size.

    `similarity`: {stack: square DataFrame of layer-by-layer similarity (e.g. CKA of FF outputs)};
    `evaluate(specs) -> dict` scores a list of merge/prune specs (params, dev_per, dev_wer, ...);
    results are memoised, so moving back to a window is instant."""

    def __init__(self, similarity: Mapping[str, pd.DataFrame], depths: Mapping[str, int],
                 evaluate: Callable[[list[str]], dict], prune_blocks: Callable[[str, int, int], int] | None = None):
        import ipywidgets as W

        self.similarity, self.depths = dict(similarity), dict(depths)
        self.evaluate_fn, self.prune_blocks = evaluate, prune_blocks or (lambda s, a, b: b - a)
        self.memo: dict[tuple, dict] = {}
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
                w.observe(lambda ch: self._guard(self._refresh), names="value")
            self.controls[s] = {"on": on, "range": rng, "anchor": anchor, "method": method}
            rows.append(W.HBox([on, rng, anchor, method]))
        self._outputs()
        self.widget = W.VBox([*rows, self.error, W.HBox([self.readout, self.plot])])
        first = next(iter(self.depths))
        self.controls[first]["on"].value = True   # triggers the first refresh

    def windows(self) -> dict[str, tuple[int, int]]:
        return {s: c["range"].value for s, c in self.controls.items() if c["on"].value}

    def specs(self) -> list[str]:
        out = []
        for s, (a, b) in self.windows().items():
            if b <= a:
                raise ValueError(f"{s}: a merge needs a window of 2 or more layers; widen the range "
                                 f"(now {a}-{b})")
            c = self.controls[s]
            out.append(f"{s}:{a}-{b}@{c['anchor'].value}/{c['method'].value}")
        return out

    def prune_specs(self) -> list[str]:
        """Layer pruning at (nearly) the merges' size: per window, the number of blocks
        `prune_blocks(stack, a, b)` says, dropped from the top of the window."""
        out = []
        for s, (a, b) in self.windows().items():
            n = max(1, min(b - a, self.prune_blocks(s, a, b)))
            out.append(f"prune {s}:{b - n}-{b}")
        return out

    def scores(self, specs: list[str]) -> dict:
        key = tuple(specs)
        if key not in self.memo:
            self.memo[key] = dict(self.evaluate_fn(list(specs)))
        return self.memo[key]

    def readouts(self) -> dict[str, str]:
        specs = self.specs()
        if not specs:
            return {"merge": "nothing selected: tick a stack"}
        m, p = self.scores(specs), self.scores(self.prune_specs())
        out = {"merge": "; ".join(specs), "merged parameters": _fmt_params(m["params"])}
        out.update({f"merged {k}": f"{v:.2f}" for k, v in m.items() if k != "params"})
        out["layer pruning"] = "; ".join(self.prune_specs())
        out["pruned parameters"] = _fmt_params(p["params"])
        out.update({f"pruned {k}": f"{v:.2f}" for k, v in p.items() if k != "params"})
        return out

    def figure(self):
        import matplotlib.pyplot as plt
        import seaborn as sns
        from matplotlib.patches import Rectangle

        stacks = list(self.similarity)
        fig, axes = plt.subplots(1, len(stacks), figsize=(4.2 * len(stacks), 3.6), squeeze=False)
        wins = self.windows()
        for ax, s in zip(axes[0], stacks):
            sns.heatmap(self.similarity[s], vmin=0, vmax=1, cmap="viridis", square=True, ax=ax, cbar=s == stacks[-1])
            ax.set_title(f"{s}: CKA of FF outputs")
            if s in wins and wins[s][1] > wins[s][0]:   # a 1-layer "window" merges nothing
                a, b = wins[s]
                ax.add_patch(Rectangle((a, a), b - a + 1, b - a + 1, fill=False, edgecolor="red", lw=2.5))
        fig.tight_layout()
        plt.close(fig)
        return fig


__all__ = ["AssemblyExplorer", "MergeExplorer", "STRATEGIES"]
