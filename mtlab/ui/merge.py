"""The merge-set explorer: FF windows per stack scored on demand (on a worker thread, newest state
first, a burst of control changes drawn once for its last state), keyed by their exact specs so a result
for an older state never reaches the screen, next to the original model and layer pruning at the
closest size not larger, with a verdict; every number is before recovery. The merge on screen can be
pinned, compared and exported."""
from __future__ import annotations

import html
import itertools
import threading
from dataclasses import dataclass
from typing import Callable, Mapping

import pandas as pd

from ..merging.methods import get_merge_method, merge_methods
from ..merging.spec import MergeSpec, PruneSpec
from .explorer import Explorer, PlotFigure, wrap_layout
from .latest import LatestWorker
from .readout import BUSY, INVALID, fmt_metric, fmt_params, fmt_size, lower_is_better, metric_keys, metric_label, table

DEBOUNCE = 0.25   # seconds without a newer control change before the worker draws a state
BEFORE_RECOVERY = ["before recovery: the merged and the pruned model as built,",
                   "not fine-tuned (recovery, notebook 04, changes both)"]
UPDATING = "updating\u2026 (the controls changed)"
_INVALID = "invalid"   # the worker's request for an invalid state: draw the plot without outline


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


class MergeExplorer(Explorer):
    """Pick, per stack, a window of layers whose FF sublayers merge (anchor, method); see the
    CKA heatmap with the window outlined, the merged model's size and quality next to the original
    model's, and layer pruning at the closest size not larger than the merged model.

    `similarity`: {stack: square DataFrame of layer-by-layer similarity (e.g. CKA of FF outputs)};
    `evaluate(specs) -> dict` scores a list of merge/prune specs ([] is the original model): params,
    metrics named SPLIT_METRIC (dev_per, dev_wer, ...) and n (words scored); results are memoised by
    the exact spec list. `params(specs) -> int`: the parameter count of a spec list without scoring
    it, used to pick the pruning comparison (without it: `prune_blocks(stack, a, b)` blocks per
    window, default b - a, and the read-out says when that is larger than the merge).
    `background=True` draws and scores on a worker thread (the notebook's choice; tests call `wait()`):
    a control change only marks the read-out and the outline as updating, and the worker draws once no
    newer change came for `delay` seconds, so a burst is drawn once, for its last state, and no
    intermediate spec reaches the read-out. `build(specs) -> model` (optional) makes the Export button
    work (`task`: its tokenizer is exported too); `code(specs, folder) -> str` is the code shown after it."""

    def __init__(self, similarity: Mapping[str, pd.DataFrame], depths: Mapping[str, int],
                 evaluate: Callable[[list[str]], dict], prune_blocks: Callable[[str, int, int], int] | None = None,
                 *, params: Callable[[list[str]], int] | None = None, background: bool = False,
                 similarity_label: str = "CKA of FF outputs", build: Callable[[list[str]], object] | None = None,
                 task=None, code: Callable[[list[str], str], str] | None = None, delay: float = DEBOUNCE):
        import ipywidgets as W

        self.FIGSIZE = (0.9 + 3.9 * len(similarity), 3.6)   # one heatmap per stack, a colour bar
        self.similarity, self.depths, self.similarity_label = dict(similarity), dict(depths), similarity_label
        self.evaluate_fn, self.prune_blocks, self.params_fn = evaluate, prune_blocks or (lambda s, a, b: b - a), params
        self.memo: dict[tuple, dict] = {}
        self._sizes: dict[tuple, int] = {}
        self._eval_lock = threading.Lock()
        self.build, self.task, self.code = build, task, code
        self.worker = LatestWorker(self._work, "mtlab-merge-explorer", delay=delay) if background else None
        self.shown: MergeState | None = None   # the state the read-out, plot and outline show
        self.controls = {}
        rows = []
        for s, n in self.depths.items():
            on = W.Checkbox(value=False, description=f"merge {s}", indent=False, layout=W.Layout(width="140px"))
            rng = W.IntRangeSlider(value=(max(0, n - 3), n - 1), min=0, max=n - 1, description="layers",
                                   continuous_update=False)
            anchor = W.Dropdown(options=["first", "middle", "last"], value="middle", description="anchor",
                                layout=W.Layout(width="180px"))
            methods = merge_methods()  # every registered merge method (mtlab.merging.methods)
            method = W.Dropdown(options=list(methods), value="permute" if "permute" in methods else methods[0],
                                description="method",
                                layout=W.Layout(width="200px"))
            for w, cls in ((on, "mtlab-merge-on"), (rng, "mtlab-merge-range"), (anchor, "mtlab-anchor"),
                           (method, "mtlab-method")):
                w.add_class(cls)
                w.observe(lambda ch: self._update(), names="value")
            self.controls[s] = {"on": on, "range": rng, "anchor": anchor, "method": method}
            rows.append(W.HBox([on, rng, anchor, method]))
        self._outputs()
        self.export_dir.value = "exports/merge"
        self.widget = self._live(W.VBox([*rows, self.error, self.status,
                                         W.HBox([self.readout, self.plot], layout=wrap_layout()), *self._actions(),
                                         self.history_view]))
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
            out.append(str(MergeSpec(s, tuple(range(a, b + 1)), c["anchor"].value, c["method"].value)))
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
            return tuple(str(PruneSpec(s, b - n, b)) for (s, (a, b)), n in zip(wins.items(), ns)), "blocks by prune_blocks"
        target, best = self.size(self.specs(wins)), None
        for ns in itertools.product(*[range(b - a + 1) for a, b in wins.values()]):
            cand = tuple(str(PruneSpec(s, b - n, b)) for (s, (a, b)), n in zip(wins.items(), ns) if n)
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

    def _work(self, st: MergeState | str) -> None:
        """The worker's job: draw `st` (unless a newer state replaced it), then score what it needs."""
        with self._lock:
            if (st is _INVALID and self.shown is not None) or (st is not _INVALID and st != self.shown):
                return   # the controls moved on: their own request is queued
        try:
            fig = self.figure(selected=False) if st is _INVALID else \
                self.figure(windows={s: (a, b) for s, a, b in st.windows})   # slow: outside the lock
        except Exception as e:  # noqa: BLE001 - shown in the error line, never lost in a thread
            with self._lock:
                self._message(f"drawing failed: {type(e).__name__}: {e}")
            return
        with self._lock:
            if (st is _INVALID and self.shown is not None) or (st is not _INVALID and st != self.shown):
                return
            self._show(fig)
            if st is _INVALID:
                return
            if self._land_now(st):
                return
        self._compute(st)

    def _compute(self, st: MergeState) -> None:
        """Score what `st` needs; draw each part as soon as it is known, if `st` is still the state on screen."""
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
        and method; the anchor of a method that aligns nothing (vanilla averaging: every layer gets the
        same average), i.e. one that does not need correlations to an anchor."""
        for c in self.controls.values():
            off = not c["on"].value
            c["range"].disabled = c["method"].disabled = off
            c["anchor"].disabled = off or not get_merge_method(c["method"].value).needs_correlations

    def _update(self) -> None:
        """Any control changed. Without a worker: draw the new state at once (outline; read-out from the
        memo or "computing"). With one: mark the read-out and outline as updating (no spec: the state may
        be an intermediate one of a burst) and let the worker draw the latest state."""
        with self._lock:
            self._sync_controls()
            self.error.value = ""
            try:
                st = self.state()
            except (ValueError, KeyError) as e:
                self.shown = None
                if self.worker is None:
                    self._invalid(str(e.args[0] if e.args else e))
                    return
                self._message(str(e.args[0] if e.args else e))
                self.readout.value = f"<i>{INVALID}</i>"
                self.status.value, self._key = "", None
                self.caption.value = "<small>outlined: updating\u2026</small>"
                self.worker.submit(_INVALID)
                return
            self.shown = st
            if self.worker is not None:
                self._key = None
                self.readout.value = table({"merge": UPDATING})
                self.caption.value = "<small>outlined: updating\u2026</small>"
                self.status.value = f"<span class='mtlab-busy' style='color:#a60'>&#9203; {UPDATING}</span>"
                self.worker.submit(st)
                return
            self._show(self.figure(windows={s: (a, b) for s, a, b in st.windows}))
            if self._land_now(st):
                return
        self._compute(st)

    def _land_now(self, st: MergeState) -> bool:
        """Show `st`'s read-out from the memo (lock held); True when nothing is left to score."""
        if not st.merge:
            self.readout.value = table({"merge": "nothing selected: tick a stack"})
            self.status.value = ""
            return True
        self._land(st)
        if all(k in self.memo for k in st.keys()):
            return True
        self.status.value = _busy_line(st.merge)
        return False

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
        unit = next((r["n_unit"] for r in (o, m, p) if r is not None and r.get("n_unit")), "words")
        label = {k: metric_label(k, words, unit) for k in metrics}
        ref = o["params"] if o is not None else None

        def rows(name: str, r: dict | None) -> dict:
            if r is None:
                return {f"{name} parameters": BUSY}
            out = {f"{name} parameters": fmt_size(r["params"], None if r is o else ref)}
            out.update({f"{name} {label[k]}": fmt_metric(r.get(k), None if r is o else (o or {}).get(k))
                        for k in metrics})
            return out

        out: dict[str, str | list[str]] = {"merge": list(st.merge), "numbers": BEFORE_RECOVERY}
        out.update(rows("original", o))
        out.update(rows("merged", m))
        if not st.prune:
            out["layer pruning"] = st.prune_note or "none"
            out["verdict (before recovery)"] = "none: no layer pruning inside the windows to compare with"
            return out
        out["layer pruning"] = list(st.prune)
        out["pruning compared at"] = st.prune_note
        out.update(rows("pruned", p))
        if m is not None and p is not None and p["params"] > m["params"]:
            out["pruned parameters"] += f" - LARGER than the merged model ({fmt_params(m['params'])})"
        out["verdict (before recovery)"] = verdict(o, m, p, metrics, label).split("; ") if m is not None and p is not None \
            else BUSY
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

    # ---- acting on a pick ----------------------------------------------------------------------
    def pick(self) -> list[str]:
        with self._lock:
            if self.shown is None or not self.shown.merge:
                raise ValueError("the controls show no merge: tick a stack and choose a window of 2 or more layers")
            return list(self.shown.merge)

    def pick_text(self, specs) -> str:
        return "; ".join(specs)

    def export_code(self, specs, directory: str) -> str:
        if self.code is not None:
            return self.code(list(specs), directory)
        return super().export_code(list(specs), directory)

    def export_note(self) -> str:
        return " (before recovery: the merged model as built, not fine-tuned; tied FF sublayers are written as copies)"

    def static_copy(self):
        """The read-out (scored now, blocking) and the heatmap as a rendered page shows them; hidden in
        JupyterLab while this explorer is live."""
        st = self.state()
        if not st.merge:
            return super().static_copy(readout={"merge": "nothing selected: tick a stack"})
        for key in st.keys():
            self.scores(key)
        return super().static_copy(readout=self._readouts(st))

    @staticmethod
    def _caption(wins) -> str:
        return "outlined: " + ("; ".join(f"{s} {a}-{b}" for s, (a, b) in wins.items()) if wins else "nothing")

    def figure(self, selected: bool = True, windows: Mapping[str, tuple[int, int]] | None = None):
        """Similarity heatmap per stack (layers on both axes, one colour bar), each valid window of the
        controls (or of `windows`) outlined (`selected=False`: none). Same size whatever the state."""
        import seaborn as sns
        from matplotlib.patches import Rectangle

        stacks = list(self.similarity)
        fig = PlotFigure(figsize=self.FIGSIZE)   # not pyplot's: see Explorer
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


__all__ = ["MergeExplorer", "MergeState"]


def verdict(o: dict | None, m: dict, p: dict, metrics: list[str], label: Mapping[str, str]) -> str:
    """Merge against layer pruning on the first metric (lower is better for error rates): which is better
    by how much, and the parameters each removes (pruning is chosen at the closest size not larger)."""
    if not metrics:
        return "no metric to compare"
    k = metrics[0]
    a, b = m.get(k), p.get(k)
    if a is None or b is None:
        return "no score to compare"
    gap = (b - a) if lower_is_better(k) else (a - b)   # > 0: the merge is better
    name = label.get(k, k)
    if round(abs(gap), 2) == 0:
        text = f"tie on {name} ({a:.2f} both)"
    else:
        text = f"{'merge' if gap > 0 else 'layer pruning'} better by {abs(gap):.2f} on {name} ({a:.2f} merged, {b:.2f} pruned)"
    if o and o.get("params"):
        rm, rp = (100 * (1 - r["params"] / o["params"]) for r in (m, p))
        text += f"; parameters removed: merge {rm:.1f}%, pruning {rp:.1f}%"
        if p["params"] > m["params"]:
            text += " (pruning removes fewer: not an equal-size comparison)"
    return text
