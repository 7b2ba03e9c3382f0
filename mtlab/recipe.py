"""Recipes: one YAML file that says which model to compress, on what data, how, and where the results go.

In the manner of mergekit's configs, `python -m mtlab run recipe.yaml` (or `mtlab run ...`) reads a
recipe, validates ALL of it up front (typed pydantic schema, then against the model: depths,
granularities, plans, merge sets, baseline depths), and only then trains and builds. The output
folder receives:

- `models/NAME/`: every compressed model, a folder that plain transformers loads
  (`mtlab.export.export` where available, else `save_pretrained` with merged FFs untied), with
  its tokenizer;
- `results.csv`: one row per model (kind, spec, params, compression, scores on the eval split); with
  a merge recovery, also the control row "original + same fine-tune (control)" (kind control): the
  original fine-tuned with the same recovery config on the same data, so a recovered merge's score
  splits into what the merge did and what the fine-tune did;
- `summary.html`: the same table and the recipe; `screen.csv` / `window_search.csv` when run;
- `recipe.json`: the validated recipe; `work/`: checkpoints (rerun the same recipe to resume);
  `run.json`: the weights hash of the model and the hash of its training data. A rerun after the
  recipe, the model's weights or the data changed is refused (`RecipeRunMismatch`, naming the
  field; `mtlab run --check` says the same), never resumed: `--fresh` starts over.

Relative paths in a recipe are read relative to the recipe file's folder. See `examples/`. The schema
(pydantic) is `mtlab.recipe_schema`; loading and checking against the model, `mtlab.recipe_load`.
"""
from __future__ import annotations

import copy
import html
import json
import re
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

# the schema and the checks live in their own modules; their names stay importable from here
from .recipe_load import (RUN_FILES, RecipeRunMismatch, check_output, check_recipe, load_model_and_data,  # noqa: F401
                          load_model_and_task)
from .recipe_schema import (BaselinesSpec, EvalSpec, MergeSection, ModulesSpec, Recipe, RecipeError,  # noqa: F401
                            RecoverySpec, TaskSpec, WindowSearchSpec, load_recipe)

if TYPE_CHECKING:
    from .candidate import Candidate

__all__ = ["Recipe", "RecipeError", "RecipeRunMismatch", "load_recipe", "run_recipe", "check_recipe",
           "load_model_and_data"]


# ---- running -------------------------------------------------------------------------------

CONTROL = "original + same fine-tune (control)"  # a results row wherever recovered merges are compared


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")


def _train_cfg(steps: int, batch_size: int, lr: float, seed: int):
    from .train import TrainConfig

    # a checkpoint about every fifth of the run (at most every 500 steps): a killed short run resumes
    return TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup=max(1, steps // 10), seed=seed,
                       log_every=max(1, min(50, steps)), ckpt_every=max(1, min(500, -(-steps // 5))))


Built = "tuple[dict[str, Candidate], dict[str, pd.DataFrame]]"   # a section's candidates and side tables


def _modules(r: Recipe, teacher, task, work: Path, progress: bool) -> Built:
    from .candidate import Budget, Candidate
    from .explore import screen
    from .modular import ReplacingConfig, assemble, teacher_ladders, train_modules
    from .modular.plan import Plan
    from .surgery import stack_depths

    m = r.modules
    train = _train_cfg(m.steps, m.batch_size, m.lr, r.seed)
    if _embeds(task):  # an encoder: modules distil the original's sentence embeddings and hidden states
        from .modular.embedding_replacing import EmbeddingReplacingConfig, train_embedding_modules

        bank, log = train_embedding_modules(copy.deepcopy(teacher), task, EmbeddingReplacingConfig(
            granularities=m.granularities, train=train), work / "modules", progress=progress)
    else:
        cfg = ReplacingConfig(granularities=m.granularities, train=train)
        bank, log = train_modules(copy.deepcopy(teacher), task, cfg, work / "modules", progress=progress)
    depths = stack_depths(teacher)
    strategies: dict = {}  # plan -> the strategies whose ladder holds it ("custom": listed in the recipe)
    if m.plans == "ladders":
        for strategy, p in teacher_ladders(teacher, bank):
            strategies.setdefault(p, []).append(strategy)
    else:
        strategies = {Plan.parse(t, depths): ["custom"] for t in m.plans}
    plans = [p for p in strategies if p != Plan.teacher(depths)]
    seconds = float(log["seconds"].max()) if "seconds" in log and len(log) else None
    # one training run serves every plan: its cost is counted once, on the first plan
    out = {f"modules {p}": Candidate("modules", p, assemble(teacher, bank, p), ", ".join(strategies[p]),
                                     Budget(1, m.steps, seconds) if i == 0 else Budget(), info={"kind": "modules"})
           for i, p in enumerate(plans)}
    tables = {}
    if m.screen:
        tables["screen"] = screen(teacher, bank, task, split="dev", limit=m.screen_limit, batch_size=m.batch_size,
                                  progress=progress)
    return out, tables


def _embeds(task) -> bool:
    """An encoder's sentence embeddings: trained by distilling the original's, not by cross-entropy."""
    from .tasks.sentences import SentencesTask

    return isinstance(task, SentencesTask)


def _recover(model, teacher, task, cfg, out: Path, progress: bool):
    """The recovery fine-tune of every kind of task (embeddings: distilling the original's)."""
    if _embeds(task):
        from .embedding import recover_embeddings

        return recover_embeddings(model, teacher, task, cfg, out, eval_limit=None, progress=progress, save=False)
    from .merging.recover import recover

    return recover(model, task, cfg, out, progress=progress, save=False)


def _merges(r: Recipe, teacher, task, work: Path, progress: bool, *, pruning: bool = False,
            before: bool = False) -> Built:
    """The merges of the recipe (its sets and the window search's best window per size and method),
    each recovered, and the control. `pruning`: also the window search's best layer-pruning windows,
    recovered the same way (kind "prune"); `before`: also every merge and pruning as built, before
    recovery (stage "before recovery"), so a study splits a recovered score into edit and fine-tune."""
    from .candidate import Budget, Candidate, apply, parse_spec
    from .merging.correlations import CorrelationCache
    from .merging.windows import window_search

    mg = r.merge
    batches = lambda: task.iter_batches("train", 16, shuffle=True, seed=r.seed)  # noqa: E731
    cache = CorrelationCache(teacher, batches, max_tokens=mg.align_tokens)
    specs, out, tables = list(mg.sets), {}, {}
    if mg.window_search is not None:
        ws = mg.window_search
        df = window_search(teacher, task, None, sizes=ws.sizes, methods=list(ws.methods), starts=ws.starts,
                           select_limit=ws.select_limit, align_tokens=mg.align_tokens, cache=cache, seed=r.seed,
                           eval_kw={"batch_size": r.eval.batch_size}, progress=progress)
        tables["window_search"] = df
        specs += [s for s in df[df.best & (df.kind == "merge")].spec if s not in specs]
        if pruning:
            specs += [s for s in df[df.best & (df.kind == "prune")].spec if s not in specs]
    for text in specs:
        spec = parse_spec(text)
        kind = "prune" if text.startswith("prune") else "merge"
        method = "layer_prune" if kind == "prune" else spec.method
        model = apply(teacher, spec, cache=cache).requires_grad_(True)
        budget, stage = Budget(), "as built"
        if mg.recovery.steps:
            if before:
                out[f"{kind} {text} (before recovery)"] = Candidate(
                    method, spec, copy.deepcopy(model).eval(), budget=Budget(),
                    info={"kind": kind, "stage": "before recovery", "recovery_steps": 0})
            cfg = _train_cfg(mg.recovery.steps, mg.recovery.batch_size, mg.recovery.lr, r.seed)
            model, log = _recover(model.train(), teacher, task, cfg, work / "recover" / _slug(text), progress)
            budget, stage = Budget(1, mg.recovery.steps, log.attrs.get("config", {}).get("train_seconds")), "recovered"
        out[f"{kind} {text}"] = Candidate(method, spec, model.eval(), budget=budget,
                                          info={"kind": kind, "stage": stage, "recovery_steps": mg.recovery.steps})
    if mg.recovery.steps and specs:  # the control: the original fine-tuned exactly as the merges were recovered
        cfg = _train_cfg(mg.recovery.steps, mg.recovery.batch_size, mg.recovery.lr, r.seed)
        model, log = _recover(copy.deepcopy(teacher).train().requires_grad_(True), teacher, task, cfg,
                              work / "recover" / "control_original", progress)
        out[CONTROL] = Candidate("control", f"original fine-tuned {mg.recovery.steps} steps like the merges' recovery",
                                 model.eval(), budget=Budget(1, mg.recovery.steps,
                                                             log.attrs.get("config", {}).get("train_seconds")),
                                 info={"kind": "control", "stage": "recovered",
                                       "recovery_steps": mg.recovery.steps})
    return out, tables


def _baselines(r: Recipe, teacher, task, work: Path, progress: bool) -> Built:
    from .baselines import BaselineBudget, build_baselines, default_run_dir

    b = r.baselines
    if _embeds(task):
        return _encoder_baselines(r, teacher, task, work, progress), {}
    budget = BaselineBudget(train=_train_cfg(b.steps, b.batch_size, b.lr, r.seed), depths=b.depths, progress=progress,
                            run_dir=lambda name, key: work / default_run_dir(name, key))
    return {f"{c.method} {c.label}": replace(c, info={"kind": "baseline"})
            for c in build_baselines(teacher, task, budget, b.names)}, {}


def build_candidates(r: Recipe, teacher, task, work: Path, progress: bool = True, *, pruning: bool = False,
                     before: bool = False) -> Built:
    """Every model the recipe asks for, the original first (kind "original"), then its modules,
    merges (with `pruning` and `before`, see `_merges`) and baselines, trained in `work` (resumed
    there), with the side tables (screen, window_search): the one path of `mtlab run` and `mtlab study`."""
    from .candidate import Candidate

    cands = {"original": Candidate("original", "", teacher, provenance="given", info={"kind": "original"})}
    tables: dict[str, pd.DataFrame] = {}
    for section, build in (("modules", _modules), ("merge", _merges), ("baselines", _baselines)):
        if getattr(r, section) is not None:
            kw = {"pruning": pruning, "before": before} if section == "merge" else {}
            built, side = build(r, teacher, task, work, progress, **kw)
            cands.update(built)
            tables.update(side)
    return cands, tables


def _encoder_baselines(r: Recipe, teacher, task, work: Path, progress: bool) -> dict:
    """An encoder's baselines: each registered baseline with a layer rule (`keep_rule`: sft keeps
    layers spread over the stack, layer_drop alternate ones) cut to every depth, then fine-tuned to
    the original's embeddings with the baseline budget; one without a rule is a row saying so."""
    from .baselines import BASELINES
    from .candidate import Budget, Candidate
    from .layer_rules import keep_layers, keep_only
    from .surgery import stack_depths

    b, out = r.baselines, {}
    cfg = _train_cfg(b.steps, b.batch_size, b.lr, r.seed)
    (stack, n), = stack_depths(teacher).items()
    for name in b.names:
        rule = BASELINES.entry(name).extra.get("keep_rule")
        if rule is None:
            out[name] = Candidate(name, "", note=f"{name} has no layer rule for an encoder (it prunes after one "
                                  "fine-tune of the whole model); left out", info={"kind": "baseline"})
            continue
        for depth in b.depths:
            keep = keep_layers(rule, depth, n)
            student = keep_only(teacher, {stack: keep}).train().requires_grad_(True)  # a copy
            student, log = _recover(student, teacher, task, cfg, work / "baselines" / f"{name}-{depth}", progress)
            spent = Budget(1, b.steps, log.attrs.get("config", {}).get("train_seconds"))
            out[f"{name} {stack}={','.join(map(str, keep))}"] = Candidate(
                name, f"{stack}={','.join(map(str, keep))}", student.eval(), rule, spent, info={"kind": "baseline"})
    return out


def export_model(model, directory: Path, task) -> str:
    """A folder plain transformers loads: `mtlab.export.export` when this mtlab has it, else
    `save_pretrained` of an untied copy (merged FFs get their own weights), plus the tokenizer."""
    from .export import export

    export(model, directory, task=task)
    return "mtlab.export"


def prepare_output(r: Recipe, record: dict, identity: dict, fresh: bool = False) -> Path:
    """The output folder: new, or one this same recipe wrote from the same model and data (then its
    work/ resumes); `check_output` refuses any other. `fresh`: first delete what an earlier run of a
    recipe wrote there (RUN_FILES; other files stay)."""
    import shutil

    out = r.output
    if fresh and (out / "recipe.json").is_file():
        for name in RUN_FILES:
            p = out / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    check_output(r, None, identity=identity)
    out.mkdir(parents=True, exist_ok=True)
    from .checkpoint import write_json

    write_json(out / "recipe.json", record)
    write_json(out / "run.json", identity)
    return out


def _score(name: str, c: Candidate, task, r: Recipe, n0: int, progress: bool) -> dict:
    from .measure import count_params

    n = count_params(c.model)
    scores = task.evaluate(c.model, r.eval.split, limit=r.eval.limit, batch_size=r.eval.batch_size,
                           progress=progress)
    scores = {k: v for k, v in scores.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    spec = f"{c.strategy}: {c.label}" if c.info["kind"] == "baseline" else c.label
    return {"name": name, "kind": c.info["kind"], "spec": spec, "params": n, "compression": n0 / n,
            **{f"{r.eval.split}_{k}": v for k, v in scores.items()}}


def run_recipe(source: str | Path | dict | Recipe, *, output: str | Path | None = None,
               progress: bool = True, fresh: bool = False) -> pd.DataFrame:
    """Validate a recipe, run it, write the output folder (see the module docstring); returns results.csv's
    table, with the recipe in `attrs["recipe"]`. `output` overrides the recipe's output folder. An output
    folder holding the run of another recipe, model or data raises RecipeRunMismatch naming the field;
    `fresh=True` deletes that run's results and work/ first and starts over."""
    from .checkpoint import write_csv
    from .train import run_identity

    r = source if isinstance(source, Recipe) else load_recipe(source)
    if output is not None:
        r = r.model_copy(update={"output": Path(output)})
    teacher, task = load_model_and_task(r)
    check_recipe(r, teacher, task, output=False)  # the output folder: prepare_output, by the same check_output
    record = json.loads(r.model_dump_json())
    out = prepare_output(r, record, run_identity(teacher, task), fresh)
    t0 = time.perf_counter()
    cands, tables = build_candidates(r, teacher, task, out / "work", progress)
    for name, table in tables.items():
        write_csv(out / f"{name}.csv", table)
    from .measure import count_params

    n0 = count_params(teacher)
    rows = []
    for name, c in cands.items():
        row = _score(name, c, task, r, n0, progress)
        if c.info["kind"] not in ("original", "control"):  # the control is a yardstick, not a compressed model
            path = out / "models" / _slug(name)
            row["saved_with"] = export_model(c.model, path, task)
            row["path"] = str(path.relative_to(out))
        rows.append(row)
    df = pd.DataFrame(rows)
    df.attrs["recipe"] = record
    write_csv(out / "results.csv", df)
    _write_summary(out / "summary.html", df, record, tables, task, time.perf_counter() - t0)
    return df


def _write_summary(path: Path, df: pd.DataFrame, record: dict, tables: dict, task, seconds: float) -> None:
    """A small self-contained HTML page: the results, the recipe, the tables written alongside."""
    metric = next((c for c in df.columns if c.endswith("_" + task.primary_metric)), None)
    best = "" if metric is None else (f"<p>Primary metric <b>{html.escape(metric)}</b> "
                                      f"({'higher' if task.higher_is_better else 'lower'} is better).</p>")
    links = "".join(f'<li><a href="{html.escape(n)}.csv">{html.escape(n)}.csv</a> ({len(t)} rows)</li>'
                    for n, t in tables.items())
    table = df.to_html(index=False, float_format=lambda x: f"{x:.4g}", escape=True, border=0)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>mtlab recipe results</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:70em}}table{{border-collapse:collapse}}
td,th{{padding:.25em .6em;border-bottom:1px solid #ddd;text-align:right}}pre{{background:#f6f6f6;padding:1em}}</style>
</head><body><h1>mtlab recipe results</h1>
<p>{len(df)} models, task <b>{html.escape(task.name)}</b>, {seconds:.0f} s. Models are in <code>models/</code>;
the table is <a href="results.csv">results.csv</a>.</p>{best}{table}
<h2>Other tables</h2><ul>{links or '<li>none</li>'}</ul>
<h2>Recipe</h2><pre>{html.escape(json.dumps(record, indent=2, default=str))}</pre></body></html>
"""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(page)
    tmp.replace(path)
