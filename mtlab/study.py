"""One study for any model: the report's analysis from a recipe, as four tables and one page.

`study(recipe)` (CLI: `mtlab study RECIPE --out DIR`) builds every candidate the recipe asks for
through the recipe runner (module ladders of every registered strategy, merges and the layer
pruning they are compared with, before and after the same recovery, the control, the registered
baselines at every depth), scores each on the SAME examples with the task's own metric, times
each against the original in one interleaved run, and writes:

    similarity.csv  layer x layer linear CKA of FF and attention outputs (long format)
    modular.csv     the original, every module plan and every baseline: size, ratios, quality,
                    speed-ups, training budget (`method_budget.csv` sums it per method)
    merge.csv       merges, layer pruning and the control, with params removed and the stage
    frontier.csv    every candidate: quality against measured speed-up and parameters
    index.html      each table's conclusion and a compact view of it

Which metric, and whether higher is better, is the task's (`task.primary_metric`,
`task.higher_is_better`), never the study's. The output folder is keyed like a recipe's
(`mtlab.recipe.check_output`): a folder of another model, data or recipe is refused.
"""
from __future__ import annotations

import html
import json
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from .candidate import Candidate
from .explore.frontier import pareto_mask, trusted_speed
from .measure import count_params, encoder_latency, latency, speed_columns, stack_params

__all__ = ["study", "StudyResult", "similarity_table", "score_table", "speed_table", "modular_table",
           "merge_table", "frontier_table", "conclusions", "TABLES"]

TABLES = ("similarity", "modular", "merge", "frontier")


@dataclass
class StudyResult:
    """The study's folder, its tables by name, and one conclusion per table."""
    out: Path
    tables: dict[str, pd.DataFrame]
    conclusions: dict[str, str]
    metric: str

    def _repr_html_(self) -> str:
        return page_html(self, title="mtlab study")


# ---------------------------------------------------------------------------
# the analyses, each on candidates already built

def similarity_table(model, task, *, tokens: int = 2000, exclude="special", progress: bool = False) -> pd.DataFrame:
    """Linear CKA of FF outputs and attention outputs, every pair of layers of each stack, on `tokens`
    train tokens (special tokens left out): columns measure, point, row, col, value, tokens."""
    from .similarity import cka_matrix

    def batches():
        return task.iter_batches("train", 16, shuffle=True, seed=0)

    parts = []
    for point in ("ff_out", "attn_out"):
        df = cka_matrix(model, batches, point, max_tokens=tokens, progress=progress, exclude=exclude)
        counted = df.attrs["config"].get("tokens", {})
        parts.append(pd.DataFrame([{"measure": "cka", "point": point, "row": r, "col": c, "value": df.at[r, c],
                                    "tokens": counted.get(r.rsplit(".", 1)[0])}
                                   for r in df.index for c in df.columns]))
    out = pd.concat(parts, ignore_index=True)
    out.attrs["config"] = {"tokens": tokens, "exclude": str(exclude) if isinstance(exclude, str) else "given"}
    return out


def score_table(cands: dict[str, Candidate], task, *, split: str = "test", limit: int | None = None,
                batch_size: int = 32, progress: bool = False) -> pd.DataFrame:
    """One row per candidate (the first is the original): its columns (`Candidate.row`), parameters,
    `params_ratio` (whole model, original / this), `stack_ratio` (layer stacks only),
    `params_removed_frac`, and the task's scores on the first `limit` examples of `split`, the same
    examples for every row (`{split}_n` says how many)."""
    models = [c.model for c in cands.values() if c.model is not None]
    if not models:
        raise ValueError("no candidate has a model to score")
    n0, s0 = count_params(models[0]), stack_params(models[0])
    rows = []
    for name, c in tqdm(cands.items(), desc="score candidates", disable=not progress):
        row = {"name": name, **c.row()}
        if c.model is None:
            row.setdefault("note", "no model: " + (c.note or "not built"))
            rows.append(row)
            continue
        n = count_params(c.model)
        got = task.evaluate(c.model, split, limit=limit, batch_size=batch_size, progress=False)
        row.update(params=n, params_ratio=n0 / n, stack_ratio=s0 / max(stack_params(c.model), 1),
                   params_removed_frac=1 - n / n0, **{f"{split}_n": int(got.get("n", 0))})
        row.update({f"{split}_{k}": float(v) for k, v in got.items()
                    if k not in ("split", "n", "seconds") and isinstance(v, (int, float)) and not isinstance(v, bool)})
        rows.append(row)
    df = pd.DataFrame(rows)
    df.attrs["config"] = {"split": split, "limit": limit, "batch_size": batch_size}
    return df


def _generates(task) -> bool:
    """Seq2seq tasks are timed by greedy generation; causal LMs and encoders by one forward pass."""
    from .tasks.causal_lm import CausalLMTask
    from .tasks.sentences import SentencesTask

    return not isinstance(task, (CausalLMTask, SentencesTask))


def speed_table(cands: dict[str, Candidate], task, *, batch_sizes=(1, 16), seconds: float = 1.0, rounds: int = 3,
                split: str = "dev") -> pd.DataFrame:
    """Measured speed-up of every candidate over the first (the original), all timed in one
    interleaved run (`mtlab.measure`): `speedup_b{n}` per batch size, with `speed_noisy` marks."""
    models = {name: c.model for name, c in cands.items() if c.model is not None}
    if _generates(task):
        lat = latency(models, task, batch_sizes=tuple(batch_sizes), split=split, min_run_time=seconds, rounds=rounds)
    else:
        order = task.batches(split, max(batch_sizes), shuffle=True, seed=0)[0]
        inputs = {}
        for bs in batch_sizes:
            b = task.collate(split, order[:bs])
            inputs[bs] = {"input_ids": b.input_ids, "attention_mask": b.attention_mask}
        with torch.no_grad():
            lat = encoder_latency(models, inputs, min_run_time=seconds, rounds=rounds)
    rows = [{"name": name, **speed_columns(lat, name)} for name in models]
    df = pd.DataFrame(rows)
    df.attrs["config"] = {"batch_sizes": list(batch_sizes), "seconds": seconds, "rounds": rounds,
                          "timed": "generate" if _generates(task) else "forward", "threads": torch.get_num_threads()}
    return df


def _metric(task, split: str) -> tuple[str, bool]:
    return f"{split}_{task.primary_metric}", bool(task.higher_is_better)


def modular_table(scored: pd.DataFrame) -> pd.DataFrame:
    """The original, every module plan and every baseline (kinds original / modules / baseline), by ratio."""
    t = scored[scored.kind.isin(["original", "modules", "baseline"])].copy()
    return t.sort_values(["stack_ratio", "kind", "method", "plan"], kind="stable").reset_index(drop=True)


def method_budget(modular: pd.DataFrame) -> pd.DataFrame:
    """Training runs, steps and seconds per method, and how many ratios each covers: one module run
    serves every plan, a baseline trains once per depth."""
    t = modular[modular.kind != "original"]
    if not len(t):
        return pd.DataFrame(columns=["method", "models", "ratios", "train_runs", "train_steps", "train_seconds"])
    for col in ("train_runs", "train_steps", "train_seconds"):
        if col not in t:
            t = t.assign(**{col: 0})
    return (t.groupby("method").agg(models=("plan", "nunique"), ratios=("stack_ratio", lambda s: s.round(2).nunique()),
                                    train_runs=("train_runs", "sum"), train_steps=("train_steps", "sum"),
                                    train_seconds=("train_seconds", "sum")).reset_index())


def merge_table(scored: pd.DataFrame) -> pd.DataFrame:
    """Merges and layer pruning (before and after recovery) and the control, by parameters removed."""
    t = scored[scored.kind.isin(["original", "merge", "prune", "control"])].copy()
    if "stage" not in t:
        t["stage"] = "as built"
    return t.sort_values(["params_removed_frac", "kind", "stage"], kind="stable").reset_index(drop=True)


def frontier_table(scored: pd.DataFrame, speed: pd.DataFrame, metric: str, higher_is_better: bool) -> pd.DataFrame:
    """Every candidate with its measured speed-ups; `on_frontier` (quality vs the largest batch's
    speed-up, noisy speed-ups never on it) and `on_frontier_params` (quality vs parameters)."""
    t = scored.merge(speed, on="name", how="left")
    t = t[t[metric].notna()].reset_index(drop=True) if metric in t else t
    cols = sorted((c for c in t.columns if c.startswith("speedup_b") and not c.endswith("_spread")),
                  key=lambda c: int(c[len("speedup_b"):]))
    if metric not in t or not cols:
        return t.assign(on_frontier=False, on_frontier_params=False)
    fast = cols[-1]
    t["on_frontier"] = pareto_mask(trusted_speed(t, fast), fast, metric, y_lower=not higher_is_better)
    t["on_frontier_params"] = pareto_mask(t, "params", metric, x_higher=False, y_lower=not higher_is_better)
    t.attrs["config"] = {"metric": metric, "speed": fast}
    return t


# ---------------------------------------------------------------------------
# conclusions: sentences computed from the tables

def _fmt(v: float) -> str:
    return f"{v:.4g}"


def conclusions(tables: dict[str, pd.DataFrame], metric: str, higher_is_better: bool) -> dict[str, str]:
    """One short paragraph per table, computed from it (never written by hand)."""
    better = "higher" if higher_is_better else "lower"
    out = {}
    sim = tables.get("similarity")
    if sim is not None and len(sim):
        off = sim[(sim.point == "ff_out") & (sim.row != sim.col)].dropna(subset=["value"])
        if len(off):
            top = off.sort_values("value", ascending=False).iloc[0]
            out["similarity"] = (f"Most similar pair of FF outputs: {top.row} and {top.col} (CKA {top.value:.3f}); "
                                 f"median over pairs {off.value.median():.3f}.")
    mod = tables.get("modular")
    if mod is not None and metric in mod and (mod.kind != "original").any():
        orig = mod[mod.kind == "original"][metric].iloc[0]
        lines = [f"Original: {metric} {_fmt(orig)} ({better} is better)."]
        for ratio, grp in mod[mod.kind != "original"].groupby(mod.stack_ratio.round(1)):
            g = grp.dropna(subset=[metric]).sort_values(metric, ascending=not higher_is_better)
            if len(g):
                b = g.iloc[0]
                lines.append(f"At {ratio:.1f}x: best {b.method} `{b.plan}` {_fmt(b[metric])} (of {len(g)}).")
        out["modular"] = " ".join(lines)
    mer = tables.get("merge")
    if mer is not None and metric in mer and mer.kind.isin(["merge", "prune"]).any():
        done = mer[mer.stage.isin(["recovered", "as built"])]
        parts = []
        for kind in ("merge", "prune", "control"):
            g = done[done.kind == kind].dropna(subset=[metric]).sort_values(metric, ascending=not higher_is_better)
            if len(g):
                b = g.iloc[0]
                parts.append(f"best {kind}: `{b.plan}` {_fmt(b[metric])} with {b.params_removed_frac:.1%} of the "
                             f"parameters removed")
        out["merge"] = "; ".join(parts) + "."
    fr = tables.get("frontier")
    if fr is not None and "on_frontier" in fr and fr.on_frontier.any():
        speed = fr.attrs.get("config", {}).get("speed", "speedup")
        on = fr[fr.on_frontier.astype(bool)].sort_values(speed)
        out["frontier"] = "On the quality/speed frontier: " + ", ".join(
            f"{r.method} `{r.plan}` ({getattr(r, speed):.2f}x, {_fmt(getattr(r, metric))})" for r in on.itertuples()) + "."
    return out


# ---------------------------------------------------------------------------
# the page

SHOWN = {"similarity": ["point", "row", "col", "value"],
         "modular": ["kind", "method", "strategy", "plan", "params", "stack_ratio", "params_ratio"],
         "merge": ["kind", "method", "plan", "stage", "params_removed_frac"],
         "frontier": ["kind", "method", "plan", "params", "on_frontier", "on_frontier_params"]}


def page_html(result: StudyResult, title: str = "mtlab study") -> str:
    """index.html: each table's conclusion, a compact view (the columns the conclusion uses) and its CSV."""
    from .ui.tables import table_html  # formatting only

    parts = []
    for name in TABLES:
        t = result.tables.get(name)
        head = f"<h2>{html.escape(name)}</h2>"
        if t is None or not len(t):
            parts.append(head + f"<p class='missing'>Not part of this study ({name}.csv not written).</p>")
            continue
        view = t[t.point == "ff_out"].nlargest(12, "value") if name == "similarity" else t
        cols = [c for c in SHOWN[name] if c in view] + [c for c in view.columns
                                                       if c.startswith(("speedup_b", result.metric)) and
                                                       not c.endswith("_spread")][:3]
        parts.append(head + f"<p>{html.escape(result.conclusions.get(name, ''))}</p>"
                     + table_html(view, list(dict.fromkeys(cols))) + f"<p><a href='{name}.csv'>{name}.csv</a></p>")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
            "body{font-family:sans-serif;max-width:70em;margin:2em auto;padding:0 1em}table{border-collapse:collapse}"
            "td,th{border-bottom:1px solid #ddd;padding:.2em .6em}.missing{color:#a33}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><p>Metric <b>{html.escape(result.metric)}</b>.</p>{''.join(parts)}"
            "</body></html>")


# ---------------------------------------------------------------------------
# the study

def study(source, *, out: str | Path | None = None, progress: bool = True, fresh: bool = False) -> StudyResult:
    """Run a recipe's study (see the module docstring) and write its tables and page to `out` (default:
    the recipe's output folder). Rerunning resumes every training run; `fresh` starts over."""
    from . import recipe as rc
    from .checkpoint import write_csv
    from .train import run_identity

    r = source if isinstance(source, rc.Recipe) else rc.load_recipe(source)
    if out is not None:
        r = r.model_copy(update={"output": Path(out)})
    teacher, task = rc.load_model_and_task(r)
    rc.check_recipe(r, teacher, task, output=False)
    record = json.loads(r.model_dump_json())
    folder = rc.prepare_output(r, record, run_identity(teacher, task), fresh)
    t0 = time.perf_counter()
    cands, side = rc.build_candidates(r, teacher, task, folder / "work", progress, pruning=True, before=True)
    s = r.study
    tables = {"similarity": similarity_table(teacher, task, tokens=s.cka_tokens, progress=progress)}
    scored = score_table(cands, task, split=r.eval.split, limit=r.eval.limit, batch_size=r.eval.batch_size,
                         progress=progress)
    # a model before its recovery has the architecture (so the speed) of the recovered one: timed once, off the frontier
    final = {n: c for n, c in cands.items() if c.info.get("stage") != "before recovery"}
    speed = speed_table(final, task, batch_sizes=s.speed_batch_sizes, seconds=s.speed_seconds, rounds=s.speed_rounds)
    metric, higher = _metric(task, r.eval.split)
    tables["modular"] = modular_table(scored)
    tables["merge"] = merge_table(scored)
    tables["frontier"] = frontier_table(scored[scored.name.isin(list(final))], speed, metric, higher)
    extra = {"method_budget": method_budget(tables["modular"]), **side}
    for name, t in {**tables, **extra}.items():
        t.attrs["config"] = {**t.attrs.get("config", {}), "recipe": record}
        write_csv(folder / f"{name}.csv", t)
    result = StudyResult(folder, tables, conclusions(tables, metric, higher), metric)
    (folder / "index.html").write_text(page_html(result, title=f"mtlab study: {Path(str(r.model)).name}, "
                                                             f"{task.name}, {time.perf_counter() - t0:.0f} s"))
    return result
