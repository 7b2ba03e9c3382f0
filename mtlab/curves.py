"""Recovery curves: quality against recovery steps, per compression method, at equal parameters
removed (issue #26: "does permute merging beat pruning after recovery, and from how many steps?").

One run per (method, point): the candidate is built once (e.g. the best permute-merge window at
~10% of the parameters removed, chosen on dev), saved as it was built, scored on the test
sentences (step 0), then recovered with one budget for every method and scored on the SAME test
sentences every `every` steps. Runs checkpoint (`mtlab.train`) and resume: kill the process any
time and rerun the same command. Progress goes to a tqdm bar and, one line per evaluation, to
`<work>/progress.log`.

Studies (`STUDIES`):

* `minilm`: all-MiniLM-L6-v2 (`mtlab.experiments.minilm`): targets ~10% and ~20% of the
  parameters removed (`equal_removal_plan`), recovery by embedding distillation
  (`mtlab.embedding.recover_embeddings`) at the shipped recipe's batch and lr; scores mean_cos,
  recall_at_10, sim_spearman against the original's test embeddings. Table:
  reports/minilm_curves.csv, shipped copy data/minilm/curves/ (curves.csv, card.json, README.md).
* `t5`: the bundled G2P teacher (`mtlab.experiments.merging`): permute merging of 4 of 12 FF
  sublayers (a 3-layer window per stack) against layer pruning at (nearly) equal parameters;
  recovery by token cross-entropy (`mtlab.merging.recover.recover`); scores test_per, test_wer and
  rel_word_acc (word accuracy relative to the teacher's). Table: reports/t5_merge_curves.csv,
  shipped copy data/merging_curves/ (not under data/merging, whose cards key the merge tables' cache).

Each study also has the method `original` (not among its default methods; run it with `--only
original-10` / `--only original-ff4`): the CONTROL curve, the original itself (0 parameters removed)
recovered the same way, so what a method's recovery gains can be told from what the fine-tune alone
does (issue 22, item 10).

Methods are looked up by name: a study's own builders (`register_curve_method(study, name,
build)`, e.g. block-influence pruning), else any registered FF-merge method
(`mtlab.merging.methods.merge_methods()`, e.g. a low-rank-delta merge) as a merge window of the
point's size. `build(ctx, point) -> (model, info)` returns the candidate (trainable, not yet
recovered) and a dict with at least "spec" and "params_removed_frac".
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from .checkpoint import atomic_dir, write_csv, write_json
from .teacher import ROOT
from .train import TrainConfig

__all__ = ["CURVE_COLUMNS", "CurveStudy", "CurveSettings", "STUDIES", "register_curve_method", "curve_methods",
           "run_names", "run_curves", "curve_table", "crossings", "crossing_sentence", "curve_figure",
           "ship_curves", "read_curves", "recovery_curves", "CurvesView", "cli", "minilm_study", "t5_study",
           "CONTROL_METHOD"]

#: the MiniLM table's columns (issue #26)
CURVE_COLUMNS = ["method", "params_removed_frac", "step", "mean_cos", "recall_at_10", "sim_spearman"]
START, RUN, START_JSON, PROGRESS = "start", "run", "start.json", "progress.log"
CONTROL_METHOD = "original"  # the control curve's method: the original recovered the same way (not a default)


@dataclass
class CurveSettings:
    """One budget for every run of a study: steps, evaluation cadence, batch, lr (None: the study's)."""

    steps: int = 4000
    every: int = 500
    batch_size: int | None = None
    lr: float | None = None
    seed: int = 0

    def check(self) -> None:
        if self.steps < 1 or self.every < 1:
            raise ValueError(f"steps and every must be >= 1, got steps={self.steps}, every={self.every}")
        if self.steps % self.every:
            raise ValueError(f"every={self.every} does not divide steps={self.steps}: the last point would not be "
                             f"scored; use e.g. --steps {self.steps - self.steps % self.every or self.every}")

    def train_config(self, batch_size: int, lr: float) -> TrainConfig:
        """Checkpoints at least every 100 steps (and at every evaluation), so a killed run loses little."""
        self.check()
        return TrainConfig(steps=self.steps, batch_size=self.batch_size or batch_size, lr=self.lr or lr,
                           warmup=max(1, min(50, self.steps // 10)), seed=self.seed, log_every=min(50, self.every),
                           ckpt_every=math.gcd(self.every, 100), eval_every=self.every)


Builder = Callable[["object", "Point"], "tuple[nn.Module, dict]"]


@dataclass(frozen=True)
class Point:
    """Where methods are compared: a label (run names end in it) and the target share removed."""

    label: str
    target: float | None = None


@dataclass
class CurveStudy:
    """What a study needs: its points and default methods, a context (`setup(settings, progress)`: the
    original, data, reference scores), builders by method name, `load_start(ctx, path)` (the saved
    candidate, trainable), `train(ctx, model, cfg, out_dir, evaluate, progress)` -> log and
    `score(ctx, model)` -> {metric: value} on the test set."""

    name: str
    metrics: tuple[str, ...]
    points: tuple[Point, ...]
    methods: tuple[str, ...]
    setup: Callable
    load_start: Callable
    train: Callable
    score: Callable
    csv: Path
    shipped: Path
    work: Path
    command: str
    builders: dict[str, Builder] = field(default_factory=dict)
    merge_builder: Callable | None = None  # (method) -> Builder, for any registered FF-merge method
    describe: Callable | None = None       # (ctx, settings) -> dict for the card

    @property
    def columns(self) -> list[str]:
        return ["method", "params_removed_frac", "step", *self.metrics]


STUDIES: dict[str, CurveStudy] = {}


def register_curve_method(study: str, name: str, build: Builder) -> None:
    """Make `name` a method of `study`'s curves: `build(ctx, point) -> (candidate, info)`."""
    if study not in STUDIES:
        raise ValueError(f"unknown curve study {study!r}: choose from {sorted(STUDIES)}")
    if "-" in name:
        raise ValueError(f"curve method names may not contain '-' (run names are METHOD-POINT): {name!r}")
    STUDIES[study].builders[name] = build


def curve_methods(study: CurveStudy) -> list[str]:
    """Every method the study can build: its own builders, then the registered FF-merge methods."""
    from .merging.methods import merge_methods

    merges = list(merge_methods()) if study.merge_builder is not None else []
    return list(dict.fromkeys([*study.builders, *merges]))


def _builder(study: CurveStudy, method: str) -> Builder:
    if method in study.builders:
        return study.builders[method]
    if study.merge_builder is not None:
        from .merging.methods import merge_methods

        if method in merge_methods():
            return study.merge_builder(method)
    raise ValueError(f"unknown curve method {method!r} for study {study.name!r}: choose from "
                     f"{curve_methods(study)} (or register one with mtlab.curves.register_curve_method)")


def run_names(study: CurveStudy, methods: Sequence[str] | None = None, points: Sequence[Point] | None = None
              ) -> list[str]:
    """METHOD-POINT for every method (default the study's) and point."""
    return [f"{m}-{p.label}" for p in (points or study.points) for m in (methods or study.methods)]


def _split_name(study: CurveStudy, name: str, points: Sequence[Point]) -> tuple[str, Point]:
    method, _, label = name.rpartition("-")
    by_label = {p.label: p for p in points}
    if not method or label not in by_label:
        raise ValueError(f"unknown curve run {name!r}: runs are METHOD-POINT with POINT in {sorted(by_label)}, "
                         f"e.g. {run_names(study, points=points)[:4]}")
    _builder(study, method)  # an unknown method names the choices
    return method, by_label[label]


def _log_line(work: Path, text: str) -> None:
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    work.mkdir(parents=True, exist_ok=True)
    with open(work / PROGRESS, "a") as f:
        f.write(f"{stamp} {text}\n")


def _shown(scores: dict) -> str:
    return " ".join(f"{k} {v:.4f}" for k, v in scores.items())


def run_curve(study: CurveStudy, ctx, name: str, settings: CurveSettings, work: Path, points: Sequence[Point],
              progress: bool = True) -> pd.DataFrame:
    """One run: build (or reload) the candidate, score it at step 0, recover with evaluations every
    `settings.every` steps. Returns its rows of the curve table."""
    method, point = _split_name(study, name, points)
    run = work / name
    start = run / START_JSON
    if start.exists():
        info = json.loads(start.read_text())
        model = study.load_start(ctx, run / START)
        _log_line(work, f"{name}: resuming ({info['spec']})")
    else:
        t0 = time.perf_counter()
        model, info = _builder(study, method)(ctx, point)
        missing = {"spec", "params_removed_frac"} - set(info)
        if missing:
            raise ValueError(f"curve method {method!r}: its builder's info lacks {sorted(missing)}")
        scores = study.score(ctx, model)
        from .merging.merge import save_merged

        with atomic_dir(run / START) as tmp:  # the candidate as built: a resumed run trains exactly it
            save_merged(model, tmp)
        info = {**{k: v for k, v in info.items() if _plain(v)}, "method": method, "point": point.label,
                "target": point.target, "scores": scores, "build_seconds": round(time.perf_counter() - t0, 1)}
        write_json(start, info)  # last: marks the start complete
        _log_line(work, f"{name}: built {info['spec']} ({info['params_removed_frac']:.1%} removed), step 0: "
                        f"{_shown(scores)}")
        model = study.load_start(ctx, run / START)  # what a resume would train: one path for both

    evaluations = [_checkpoint_step(run / RUN) // settings.every]  # mtlab.train evaluates every `every` steps

    def evaluate(m):
        t = time.perf_counter()
        s = study.score(ctx, m)
        evaluations[0] += 1
        _log_line(work, f"{name}: step {evaluations[0] * settings.every}/{settings.steps}: {_shown(s)} "
                        f"({time.perf_counter() - t:.0f}s to score)")
        return s

    log = study.train(ctx, model, settings, run / RUN, evaluate, progress)
    rows = _rows(study, info, log)
    last = int(log.step.max()) if len(log) else 0
    _log_line(work, f"{name}: {'finished' if last >= settings.steps else 'stopped'} at step {last}/{settings.steps}")
    return rows


def _checkpoint_step(out: Path) -> int:
    """The step a run in `out` resumes from (0: none)."""
    from .checkpoint import latest_dir

    found = latest_dir(out / "checkpoint")
    try:
        return int(json.loads((found / "state.json").read_text()).get("step", 0)) if found else 0
    except (OSError, ValueError):
        return 0  # mtlab.train reports a corrupt checkpoint itself


def _plain(v) -> bool:
    return isinstance(v, (str, int, float, bool)) or v is None


def _rows(study: CurveStudy, info: dict, log: pd.DataFrame) -> pd.DataFrame:
    base = {"method": info["method"], "params_removed_frac": info["params_removed_frac"]}
    rows = [{**base, "step": 0, **{k: info["scores"].get(k) for k in study.metrics}}]
    cols = [f"dev_{k}" for k in study.metrics]  # mtlab.train logs evaluate()'s dict with a dev_ prefix
    if len(log) and all(c in log for c in cols):
        for r in log.dropna(subset=cols).itertuples(index=False):
            d = r._asdict()
            rows.append({**base, "step": int(d["step"]), **{k: d[f"dev_{k}"] for k in study.metrics}})
    return pd.DataFrame(rows, columns=study.columns)


def curve_table(study: CurveStudy, work: Path | None = None, names: Sequence[str] | None = None) -> pd.DataFrame:
    """The curve table of the runs in `work` (all of them, or `names`), from their start.json and
    log.csv: rows sorted by point, method, step; a run still in progress contributes what it logged."""
    from .train import read_log

    work = Path(work or study.work)
    parts = []
    for run in sorted(p for p in work.iterdir() if (p / START_JSON).exists()) if work.exists() else []:
        if names is not None and run.name not in names:
            continue
        info = json.loads((run / START_JSON).read_text())
        log = read_log(run / RUN / "log.csv") if (run / RUN / "log.csv").exists() else pd.DataFrame()
        parts.append(_rows(study, info, log).assign(_point=info.get("target") or 0.0))
    if not parts:
        return pd.DataFrame(columns=study.columns)
    df = pd.concat(parts, ignore_index=True).sort_values(["_point", "method", "step"], kind="stable")
    return df.drop(columns="_point").drop_duplicates(["method", "params_removed_frac", "step"], keep="last") \
        .reset_index(drop=True)


def run_curves(study: str | CurveStudy = "minilm", settings: CurveSettings | None = None, *,
               only: Sequence[str] | None = None, methods: Sequence[str] | None = None,
               points: Sequence[Point] | None = None, ctx=None, work: str | Path | None = None,
               csv: str | Path | None = None, progress: bool = True) -> pd.DataFrame:
    """Run (or resume) every curve run of `study` (or the runs named in `only`, METHOD-POINT), one
    after another; after each, the table of all runs in `work` is written to `csv` (default the
    study's reports CSV). Returns that table. `ctx` (tests): a context from `study.setup`."""
    study = STUDIES[study] if isinstance(study, str) else study
    settings = settings or CurveSettings()
    settings.check()
    points = tuple(points or study.points)
    work = Path(work or study.work)
    names = list(only) if only else run_names(study, methods, points)
    for name in names:
        _split_name(study, name, points)  # every name checked before any work
    ctx = ctx if ctx is not None else study.setup(settings, progress)
    csv = Path(csv or study.csv)
    _log_line(work, f"{study.name} curves: {len(names)} runs ({', '.join(names)}), {settings.steps} steps, scored "
                    f"every {settings.every}")
    for name in names:
        t0 = time.perf_counter()
        run_curve(study, ctx, name, settings, work, points, progress)
        table = curve_table(study, work)
        csv.parent.mkdir(parents=True, exist_ok=True)
        write_csv(csv, table)
        _log_line(work, f"{name}: done in {time.perf_counter() - t0:.0f}s; {csv} has {len(table)} rows")
    table = curve_table(study, work)
    table.attrs["config"] = {"study": study.name, "steps": settings.steps, "every": settings.every}
    return table


# ---------------------------------------------------------------------------
# reading the curves: crossings, sentence, figure

LOWER_IS_BETTER = ("per", "wer", "ppl", "nll", "loss", "cer")  # metric name parts where less is better


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of `metric` is better: not for error rates, perplexity or losses (by name)."""
    return not any(part in LOWER_IS_BETTER for part in metric.lower().split("_"))


def crossings(table: pd.DataFrame, metric: str = "mean_cos", a: str = "permute", b: str = "layer_prune",
              higher: bool | None = None) -> pd.DataFrame:
    """Per params_removed_frac group of methods `a` and `b` (matched by point: the rows of one
    target), the steps both were scored at, the sign of a - b at each, and every step where the
    sign changes (a crossing between two evaluations: the later step is reported). `ahead_at_end`
    is the better one at the last step: higher values are better unless the metric is an error rate,
    a perplexity or a loss (`higher_is_better`; `higher` overrides)."""
    higher = higher_is_better(metric) if higher is None else higher
    rows = []
    ta, tb = table[table.method == a], table[table.method == b]
    for (fa, ga), (fb, gb) in _pairs(ta, tb):
        m = ga.set_index("step")[metric].to_frame("a").join(gb.set_index("step")[metric].to_frame("b"),
                                                            how="inner").sort_index().dropna()
        if m.empty:
            continue
        diff = m.a - m.b
        sign = diff.apply(lambda d: 0 if abs(d) < 1e-12 else (1 if d > 0 else -1))
        cross = [int(s) for s, prev, cur in zip(m.index[1:], sign.iloc[:-1], sign.iloc[1:]) if prev * cur < 0]
        rows.append({"a": a, "b": b, "metric": metric, "a_removed": fa, "b_removed": fb,
                     "steps": list(map(int, m.index)), "a_minus_b": diff.round(6).tolist(),
                     "first_step": int(m.index[0]), "last_step": int(m.index[-1]),
                     "ahead_at_end": _better(diff.iloc[-1], higher, a, b),
                     "crossings": cross})
    return pd.DataFrame(rows)


def _better(a_minus_b: float, higher: bool, a: str, b: str) -> str:
    """The name of the better of a and b given a - b and the metric's direction ("tie" when equal)."""
    if abs(a_minus_b) < 1e-12:
        return "tie"
    return a if (a_minus_b > 0) == higher else b


def _pairs(ta: pd.DataFrame, tb: pd.DataFrame):
    """Groups of a and b at the same point: each a-group paired with the b-group of nearest share removed."""
    ga = list(ta.groupby("params_removed_frac"))
    gb = list(tb.groupby("params_removed_frac"))
    used = set()
    for fa, da in ga:
        if not gb:
            return
        j = min((i for i in range(len(gb)) if i not in used), key=lambda i: abs(gb[i][0] - fa), default=None)
        if j is None:
            return
        used.add(j)
        yield (fa, da), gb[j]


def crossing_sentence(table: pd.DataFrame, metric: str | None = None, a: str = "permute", b: str = "layer_prune"
                      ) -> str:
    """Where (if anywhere) the curves of `a` and `b` cross, per share removed, computed from the table."""
    if metric is None:
        metric = "mean_cos" if "mean_cos" in table else next(c for c in table.columns
                                                              if c not in ("method", "params_removed_frac", "step"))
    cr = crossings(table, metric, a, b)
    if cr.empty:
        return (f"No curves of both {a} and {b} in the table yet (run `make minilm-curves`); nothing to compare.")
    out = []
    for r in cr.itertuples():
        where = (f"at ~{r.a_removed:.0%} removed ({a} {r.a_removed:.1%}, {b} {r.b_removed:.1%}), "
                 f"steps {r.first_step}-{r.last_step}")
        start = r.a_minus_b[0]
        lead0 = _better(start, higher_is_better(metric), a, b).replace("tie", "neither")
        end = r.a_minus_b[-1]
        if r.crossings:
            steps = ", ".join(f"between steps {r.steps[r.steps.index(s) - 1]} and {s}" for s in r.crossings)
            out.append(f"{where}: the {metric} curves cross {len(r.crossings)} time(s) ({steps}); {r.ahead_at_end} "
                       f"is ahead at step {r.last_step} by {abs(end):.4f}.")
        else:
            out.append(f"{where}: the {metric} curves do not cross; {lead0} stays ahead (by {abs(start):.4f} at "
                       f"step {r.first_step}, {abs(end):.4f} at step {r.last_step}).")
    return " ".join(out)


def curve_figure(table: pd.DataFrame, metrics: Sequence[str] | None = None, title: str = "Recovery curves"):
    """Quality against recovery steps: one panel per metric, one line per (method, share removed)."""
    import matplotlib.pyplot as plt

    metrics = list(metrics or [c for c in table.columns if c not in ("method", "params_removed_frac", "step")])
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6), squeeze=False)
    styles = ["-", "--", ":", "-."]
    fracs = sorted(table.params_removed_frac.round(3).unique())
    for ax, metric in zip(axes[0], metrics):
        for (method, frac), g in table.groupby(["method", table.params_removed_frac.round(3)]):
            g = g.sort_values("step")
            ax.plot(g.step, g[metric], styles[fracs.index(frac) % len(styles)], marker="o", ms=3,
                    label=f"{method} ({frac:.1%} removed)")
        ax.set_xlabel("recovery steps")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------
# shipping the table

def ship_curves(study: str | CurveStudy = "minilm", table: pd.DataFrame | None = None, root: str | Path | None = None,
                settings: CurveSettings | None = None, work: str | Path | None = None) -> Path:
    """Write the table with a card (card.json, README.md) to the study's shipped folder, atomically."""
    study = STUDIES[study] if isinstance(study, str) else study
    work = Path(work or study.work)
    table = curve_table(study, work) if table is None else table
    root = Path(root or study.shipped)
    card = {"study": study.name, "columns": study.columns, "rows": len(table),
            "runs": {name: {k: v for k, v in s.items() if k != "scores"} for name, s in
                     ((p.name, json.loads((p / START_JSON).read_text())) for p in
                      (sorted(q for q in work.iterdir() if (q / START_JSON).exists()) if work.exists() else []))},
            "steps": int(table.step.max()) if len(table) else 0, "settings": settings.__dict__ if settings else None,
            "machine": f"{torch.get_num_threads()} threads, torch {torch.__version__}",
            "crossings": crossing_sentence(table), "command": reproduce_command(study, settings, card_runs(work))}
    root.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(root) as tmp:
        write_csv(tmp / "curves.csv", table)
        write_json(tmp / "card.json", card)
        (tmp / "README.md").write_text(_render(study, card, table))
    return root


def card_runs(work: Path) -> list[str]:
    """The run names in a curves work folder (each has its start record)."""
    return sorted(q.name for q in work.iterdir() if (q / START_JSON).exists()) if work.exists() else []


def reproduce_command(study: CurveStudy, settings: CurveSettings | None, runs=()) -> str:
    """The make command that reproduces the shipped table: the study's target, with the steps and
    cadence when they differ from the defaults, and the runs when they are not the default methods'."""
    default = CurveSettings()
    parts = [study.command]
    if settings is not None and (settings.steps, settings.every) != (default.steps, default.every):
        parts.append(f"STEPS={settings.steps} EVERY={settings.every}")
    if runs and sorted(runs) != sorted(run_names(study)):
        parts.append(f'ONLY="{" ".join(runs)}"')
    return " ".join(parts)


def _render(study: CurveStudy, card: dict, table: pd.DataFrame) -> str:
    runs = "\n".join(f"- `{n}`: {r.get('spec')} ({r.get('params_removed_frac', 0):.1%} of the parameters removed)"
                     for n, r in card["runs"].items())
    return f"""# mtlab recovery curves: `{study.name}`

- Quality against recovery steps, one recovery run per method and share of parameters removed, scored
  on the same test examples at every evaluation (step 0: as built, before recovery).
- Runs:
{runs}
- Up to step {card['steps']:,}; settings `{json.dumps(card['settings'])}`; {card['machine']}.
- Reproduce: `{card['command']}` (resumable: rerun the same command).
- Where the curves cross: {card['crossings']}

{table.to_markdown(index=False, floatfmt='.4f') if len(table) else '(no rows yet)'}
"""


def read_curves(study: str = "minilm", root: str | Path | None = None) -> pd.DataFrame:
    """The shipped table (data/minilm/curves/curves.csv for minilm), or the reports CSV when nothing
    is shipped yet; FileNotFoundError naming the command otherwise."""
    s = STUDIES[study]
    for path in (Path(root or s.shipped) / "curves.csv", s.csv):
        if path.exists():
            return pd.read_csv(path)
    raise FileNotFoundError(f"no {study} recovery curves yet ({Path(root or s.shipped) / 'curves.csv'} and {s.csv} "
                            f"are missing): run `{s.command}` (resumable; long: see the Makefile)")


@dataclass
class CurvesView:
    """A study's curve table (empty when no run has been made), the sentence on where the curves of
    permute merging and layer pruning cross, computed from it, and the figure."""

    study: str
    table: pd.DataFrame
    sentence: str
    source: str

    def figure(self):
        if self.table.empty:
            return None
        return curve_figure(self.table, title=f"Recovery curves ({self.study}; {self.source})")


def recovery_curves(study: str = "minilm", root: str | Path | None = None) -> CurvesView:
    """The shipped curves of `study` (`read_curves`), with `crossing_sentence` on every metric; a
    study with no curves yet gives an empty table and a sentence naming the command."""
    s = STUDIES[study]
    try:
        table = read_curves(study, root)
    except FileNotFoundError as e:
        return CurvesView(study, pd.DataFrame(columns=s.columns), str(e), "none")
    shipped = Path(root or s.shipped) / "curves.csv"
    source = str(shipped.relative_to(ROOT)) if shipped.exists() and shipped.is_relative_to(ROOT) else \
        str(shipped if shipped.exists() else s.csv)
    text = " ".join(f"{m}: {crossing_sentence(table, m)}" for m in s.metrics)
    return CurvesView(study, table, text + control_sentence(table, s.metrics), source)


def control_sentence(table: pd.DataFrame, metrics: Sequence[str]) -> str:
    """Where the control (method "original": the original recovered the same way) ends, per metric,
    beside the methods at the same step; "" when the table has no control curve."""
    ctrl = table[table.method == "original"]
    if ctrl.empty:
        return ""
    last = int(ctrl.step.max())
    at = table[table.step == last].groupby("method")
    parts = [f"{m}: " + ", ".join(f"{name} {g[m].iloc[0]:.4g}" for name, g in at if m in g and g[m].notna().any())
             for m in metrics if m in table]
    return f" At step {last}, the control (the original recovered the same way) and the methods: " + "; ".join(parts) + "."


# ---------------------------------------------------------------------------
# the MiniLM study

@dataclass
class MiniLMContext:
    model: nn.Module            # the original, read-only (the distillation teacher)
    base: nn.Module             # a trainable copy candidates are built from
    tokenizer: object
    task: object
    m: object                   # the profile's minilm section
    ref_test: torch.Tensor
    cache: object = None
    progress: bool = True
    plan: pd.DataFrame | None = None
    _ref_dev: torch.Tensor | None = None

    def ref_dev(self) -> torch.Tensor:
        from .embedding import embed_split

        if self._ref_dev is None:
            self._ref_dev = embed_split(self.model, self.task, "dev", self.m.select_limit)
        return self._ref_dev

    def plan_for(self, point: Point):
        from .experiments.minilm import equal_removal_plan

        p = equal_removal_plan(self.model, (point.target,)).iloc[0]
        return int(p.merge_size), int(p.prune_size)


def minilm_context(settings: CurveSettings | None = None, *, model=None, tokenizer=None, task=None, m=None,
                   progress: bool = True) -> MiniLMContext:
    """The original (default all-MiniLM-L6-v2), the study's sentences (default profile's minilm
    section) and the original's test embeddings."""
    from .experiments.minilm import original, study_task, trainable
    from .merging.correlations import CorrelationCache
    from .profiles import get_profile

    m = m or get_profile("default").minilm
    if model is None or tokenizer is None:
        model, tokenizer = original()
    task = task or study_task(m, tokenizer)
    base = trainable(model, m)
    cache = CorrelationCache(base, lambda: task.iter_batches("train", 64, shuffle=True, seed=0),
                             max_tokens=m.align_tokens)
    from .embedding import embed_split

    return MiniLMContext(model, base, tokenizer, task, m, embed_split(model, task, "test"), cache, progress)


def _minilm_score(ctx: MiniLMContext, net: nn.Module) -> dict:
    from .experiments.minilm import test_scores

    return test_scores(net, ctx.task, ctx.ref_test)


def _minilm_window(ctx: MiniLMContext, method: str | None, size: int) -> tuple[nn.Module, dict]:
    """The dev-best window of `size` for a merge `method` (None: layer pruning), built from ctx.base."""
    from .candidate import apply
    from .embedding import embed_split, embedding_scores
    from .experiments.minilm import STACK
    from .merging.windows import window_search

    ref = ctx.ref_dev()

    def score(net):
        return embedding_scores(ref, embed_split(net, ctx.task, "dev", ctx.m.select_limit))

    df = window_search(ctx.base, None, STACK, sizes=(size,), methods=(method,) if method else (),
                       include_pruning=method is None, score_fn=score, metric="mean_cos", higher_is_better=True,
                       cache=ctx.cache, progress=ctx.progress, align_batches=ctx.cache.batches_fn,
                       include_original=False)
    best = df[df.best].iloc[0]
    net = apply(ctx.base, best.spec, cache=ctx.cache)
    return net, {"spec": best.spec, "params_removed_frac": float(best.params_removed_frac),
                 "layers": str(best.layers), "dev_mean_cos": float(best.mean_cos), "params": int(best.params)}


def _minilm_original(ctx: MiniLMContext, point: Point):
    """The control curve: a trainable copy of the original (0 parameters removed), recovered like the others."""
    import copy

    from .measure import count_params

    return copy.deepcopy(ctx.base), {"spec": "original", "params_removed_frac": 0.0, "layers": "",
                                     "dev_mean_cos": 1.0, "params": count_params(ctx.base)}


def _minilm_merge(method: str) -> Builder:
    def build(ctx: MiniLMContext, point: Point):
        return _minilm_window(ctx, method, ctx.plan_for(point)[0])
    return build


def _minilm_prune(ctx: MiniLMContext, point: Point):
    return _minilm_window(ctx, None, ctx.plan_for(point)[1])


def _minilm_load_start(ctx: MiniLMContext, path: Path) -> nn.Module:
    from .merging.merge import load_merged

    net = load_merged(path)
    for p in net.parameters():
        p.requires_grad_(True)
    if ctx.m.freeze_word_embeddings:
        net.get_input_embeddings().weight.requires_grad_(False)
    return net.eval()


def _minilm_train(ctx: MiniLMContext, net, settings: CurveSettings, out: Path, evaluate, progress: bool):
    from .embedding import recover_embeddings

    cfg = settings.train_config(ctx.m.batch_size, ctx.m.finetune_lr)
    _, log = recover_embeddings(net, ctx.model, ctx.task, cfg, out, evaluate=evaluate, progress=progress)
    return log


def minilm_study() -> CurveStudy:
    return CurveStudy(
        name="minilm", metrics=("mean_cos", "recall_at_10", "sim_spearman"),
        points=(Point("10", 0.10), Point("20", 0.20)), methods=("permute", "layer_prune"),
        setup=lambda settings, progress=True: minilm_context(settings, progress=progress), load_start=_minilm_load_start, train=_minilm_train,
        score=_minilm_score, csv=ROOT / "reports" / "minilm_curves.csv",
        shipped=ROOT / "data" / "minilm" / "curves", work=ROOT / "runs" / "minilm_curves",
        command="make minilm-curves", builders={"layer_prune": _minilm_prune, CONTROL_METHOD: _minilm_original},
        merge_builder=_minilm_merge)


# ---------------------------------------------------------------------------
# the T5 merge study (the bundled G2P teacher)

@dataclass
class T5Context:
    model: nn.Module
    task: object
    m: object                   # the profile's merging section
    profile: object
    cache: object
    baseline: dict
    progress: bool = True
    _cands: list | None = None

    def candidates(self):
        from .experiments.merging import candidates, window_table

        if self._cands is None:
            self._cands = candidates(window_table(self.profile, self.model, self.task, self.cache, self.progress))
        return self._cands


def t5_context(settings: CurveSettings | None = None, *, model=None, task=None, profile=None,
               progress: bool = True) -> T5Context:
    from .experiments.merging import align_batches
    from .merging.correlations import CorrelationCache
    from .profiles import get_profile
    from .teacher import load_teacher

    p = get_profile(profile or "default")
    if model is None or task is None:
        model, task = load_teacher()
    cache = CorrelationCache(model, align_batches(task), max_tokens=p.merging.align_tokens)
    ctx = T5Context(model, task, p.merging, p, cache, {}, progress)
    ctx.baseline = _t5_raw(ctx, model)
    return ctx


def _t5_raw(ctx: T5Context, net) -> dict:
    s = ctx.task.evaluate(net, "test", limit=ctx.m.eval_limit, progress=False)
    return {f"test_{k}": float(v) for k, v in s.items() if k in ("per", "wer")}


def _t5_score(ctx: T5Context, net) -> dict:
    s = _t5_raw(ctx, net)
    base = ctx.baseline.get("test_wer", 0.0)
    s["rel_word_acc"] = (100.0 - s["test_wer"]) / max(1e-9, 100.0 - base)
    return s


def _t5_pick(ctx: T5Context, method: str, compare: str):
    from .measure import count_params

    for c in ctx.candidates():
        if c.method == method and c.info["kind"] == "combined" and c.info["compare"] == compare:
            from .candidate import apply

            net = apply(ctx.model, c.spec, cache=ctx.cache)
            n0 = count_params(ctx.model)
            return net, {"spec": c.label, "params_removed_frac": (n0 - count_params(net)) / n0,
                         "layers": str(c.info["layers"]), "params": count_params(net)}
    raise ValueError(f"the T5 merge study has no combined {method} candidate ({compare}); its profile's window_sizes "
                     "must include 3 (mtlab.experiments.merging.candidates)")


def _t5_original(ctx: T5Context, point: Point):
    """The control curve: a trainable copy of the teacher (0 parameters removed), recovered like the others."""
    import copy

    from .measure import count_params

    net = copy.deepcopy(ctx.model).requires_grad_(True)
    return net, {"spec": "original", "params_removed_frac": 0.0, "layers": "-", "params": count_params(net)}


def _t5_merge(method: str) -> Builder:
    def build(ctx: T5Context, point: Point):
        return _t5_pick(ctx, method, "equal FF sublayers")
    return build


def _t5_prune(ctx: T5Context, point: Point):
    try:
        return _t5_pick(ctx, "layer_prune", "equal params")
    except ValueError:
        return _t5_pick(ctx, "layer_prune", "equal FF sublayers")


def _t5_load_start(ctx: T5Context, path: Path) -> nn.Module:
    from .merging.merge import load_merged

    net = load_merged(path)
    for p in net.parameters():
        p.requires_grad_(True)
    return net.eval()


def _t5_train(ctx: T5Context, net, settings: CurveSettings, out: Path, evaluate, progress: bool):
    from dataclasses import replace

    from .experiments.merging import recovery_config
    from .merging.recover import recover

    base = recovery_config(ctx.m)
    cfg = settings.train_config(base.batch_size, base.lr)
    cfg = replace(cfg, label_smoothing=base.label_smoothing)
    _, log = recover(net, ctx.task, cfg, out, evaluate=evaluate, progress=progress)
    return log


def t5_study() -> CurveStudy:
    return CurveStudy(
        name="t5", metrics=("test_per", "test_wer", "rel_word_acc"), points=(Point("ff4", None),),
        methods=("permute", "layer_prune"),
        setup=lambda settings, progress=True: t5_context(settings, progress=progress),
        load_start=_t5_load_start, train=_t5_train, score=_t5_score,
        csv=ROOT / "reports" / "t5_merge_curves.csv", shipped=ROOT / "data" / "merging_curves",
        work=ROOT / "runs" / "t5_curves", command="make t5-curves",
        builders={"layer_prune": _t5_prune, CONTROL_METHOD: _t5_original}, merge_builder=_t5_merge)


STUDIES["minilm"] = minilm_study()
STUDIES["t5"] = t5_study()


# ---------------------------------------------------------------------------
# command line (`python -m mtlab minilm-curves` / `t5-curves`)

def cli(study: str, steps: int, every: int, only: Sequence[str] | None = None, device: str | None = None,
        ship: bool = True, progress: bool = True) -> int:
    """Run (or resume) the study's curves, write its reports CSV, then ship the table with its card."""
    import os

    if device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # mtlab.train uses CUDA whenever it sees it
    elif device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible; drop --device (or use --device cpu)")
    settings = CurveSettings(steps=steps, every=every)
    s = STUDIES[study]
    t0 = time.time()
    try:
        settings.check()
        for name in only or ():
            _split_name(s, name, s.points)
    except ValueError as e:
        raise SystemExit(f"mtlab {study}-curves: {e}") from None
    table = run_curves(s, settings, only=only, progress=progress)
    print(table.to_string(index=False))
    print(crossing_sentence(table))
    done = {n: _finished(s.work / n, steps) for n in (only or run_names(s))}
    if ship and all(done.values()):
        print(f"shipped {ship_curves(s, table, settings=settings)}")
    elif ship:
        print(f"not shipped: unfinished runs {[n for n, d in done.items() if not d]}; rerun to resume")
    print(f"done in {time.time() - t0:.0f}s; progress log {s.work / PROGRESS}")
    return 0


def _finished(run: Path, steps: int) -> bool:
    from .train import read_log

    log = run / RUN / "log.csv"
    return log.exists() and len(df := read_log(log)) > 0 and int(df.step.max()) >= steps
