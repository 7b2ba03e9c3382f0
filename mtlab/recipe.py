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

Relative paths in a recipe are read relative to the recipe file's folder. See `examples/`.
"""
from __future__ import annotations

import copy
import difflib
import html
import json
import re
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args, get_origin

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .train import RunMismatchError

if TYPE_CHECKING:
    from .candidate import Candidate

__all__ = ["Recipe", "RecipeError", "RecipeRunMismatch", "load_recipe", "run_recipe", "check_recipe",
           "load_model_and_data"]


def _registered(names, known, what: str):
    """`names` when every one is registered; otherwise the error lists the unknown and the known."""
    bad = [n for n in names if n not in known]
    if bad:
        raise ValueError(f"unknown {what} {bad}; use some of {list(known)}")
    return names


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the field and the fix."""


class RecipeRunMismatch(RecipeError, RunMismatchError):
    """The output folder holds the run of another recipe, model (weights) or data: resuming its work/
    would return that run's models. The message names the differing fields and how to proceed."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TaskSpec(_Strict):
    """The data: the bundled G2P task, a file of text pairs (seq2seq), or a text file (decoder-only LMs)."""
    kind: Literal["g2p", "pairs", "text"] = Field(description="g2p (bundled CMUdict), pairs (tsv/csv/jsonl), text")
    path: Path | None = Field(None, description="the pairs or text file (not for g2p)")
    block_size: int | None = Field(64, ge=1, description="text: tokens per example; null: one example per line")
    metric: str | None = Field(None, description="pairs: a registered task metric (mtlab.tasks.metrics: bleu, chrf, "
                               "rouge, ...); null: chrf when the median target has under 4 words, else bleu")
    source_col: str | int | None = Field(None, description="pairs: the source column (header name, JSONL key or "
                                         "index); null: 'source', or the first of a header-less 2-column file")
    target_col: str | int | None = Field(None, description="pairs: the target column; null: 'target', or the second")
    max_target_len: int | None = Field(None, ge=1, description="pairs: target tokens trained on and decoded at most; "
                                       "null: 256, cut to the model's position table (e.g. BART's positions)")
    dev_fraction: float = Field(0.05, gt=0, lt=0.5)
    test_fraction: float = Field(0.05, gt=0, lt=0.5)

    @field_validator("metric")
    @classmethod
    def _metric(cls, v):
        from .tasks.metrics import get_metric

        return None if v is None else get_metric(v).name

    @model_validator(mode="after")
    def _path_fits_kind(self):
        if self.kind == "g2p" and self.path is not None:
            raise ValueError("the g2p task is bundled: remove path (or use kind: pairs for your own file)")
        if self.kind != "g2p" and self.path is None:
            raise ValueError(f"kind {self.kind!r} needs the data file, e.g. path: data/train.txt")
        pairs_only = [k for k in ("source_col", "target_col", "max_target_len") if getattr(self, k) is not None]
        if self.kind != "pairs" and pairs_only:
            raise ValueError(f"{', '.join(pairs_only)}: only for kind: pairs; remove "
                             f"{'them' if len(pairs_only) > 1 else 'it'}")
        return self


class ModulesSpec(_Strict):
    """Module training (multi-grained module replacing) and the plans assembled from the bank."""
    granularities: tuple[int, ...] = Field((2, 3, 6), description="span sizes a module replaces (each >= 2)")
    steps: int = Field(200, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(5e-4, gt=0)
    plans: list[str] | Literal["ladders"] = Field("ladders", description="plan texts, or every registered strategy")
    screen: bool = Field(True, description="screen the whole assembly space on dev (teacher forcing)")
    screen_limit: int | None = Field(64, ge=1, description="dev examples the screen reads")

    @field_validator("granularities")
    @classmethod
    def _ks(cls, v):
        if not v or any(k < 2 for k in v):
            raise ValueError(f"each granularity is a span of >= 2 layers, got {list(v)}; e.g. granularities: [2, 3]")
        return tuple(sorted(set(v)))

    @field_validator("plans")
    @classmethod
    def _plans(cls, v):
        from .modular.plan import Plan, PlanError

        if isinstance(v, list):
            for text in v:
                try:
                    Plan.parse(text)
                except PlanError as e:
                    raise ValueError(str(e)) from None
        return v


class WindowSearchSpec(_Strict):
    sizes: tuple[int, ...] = Field((2,), description="window sizes (layers merged into one FF)")
    methods: tuple[str, ...] = Field(("permute",), description="registered merge methods")
    starts: tuple[int, ...] | None = Field(None, description="only windows starting here (null: all)")
    select_limit: int | None = Field(64, ge=1, description="dev examples each window is scored on")

    @field_validator("methods")
    @classmethod
    def _methods(cls, v):
        from .merging.methods import merge_methods

        return _registered(v, merge_methods(), "merge method(s)")


class RecoverySpec(_Strict):
    steps: int = Field(0, ge=0, description="recovery fine-tune steps per merged model (0: none)")
    batch_size: int = Field(16, ge=1)
    lr: float = Field(3e-4, gt=0)


class MergeSection(_Strict):
    """FF merging: explicit merge sets and/or a window search (its best window per size and method)."""
    sets: list[str] = Field(default_factory=list,
                            description="merge specs, each one model, e.g. layers:1-2@middle/permute")
    window_search: WindowSearchSpec | None = None
    align_tokens: int = Field(2000, ge=1, description="train tokens for the FF correlations")
    recovery: RecoverySpec = Field(default_factory=RecoverySpec)

    @field_validator("sets")
    @classmethod
    def _sets(cls, v):
        from .merging.methods import merge_methods
        from .merging.spec import MergeSpec

        for text in v:
            try:
                spec = MergeSpec.parse(text)
            except ValueError as e:
                raise ValueError(f"{text!r}: {e}") from None
            if spec.method not in merge_methods():
                raise ValueError(f"{text!r}: unknown method {spec.method!r}; use one of {list(merge_methods())}")
        return v

    @model_validator(mode="after")
    def _something(self):
        if not self.sets and self.window_search is None:
            raise ValueError("merge: give sets (e.g. sets: ['layers:1-2@middle/permute']) or window_search: {}")
        return self


class BaselinesSpec(_Strict):
    names: list[str] = Field(["sft"], description="registered baselines (mtlab.baselines.baselines())")
    depths: tuple[int, ...] = Field(..., description="per-stack depths the baselines are cut to")
    steps: int = Field(100, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(5e-4, gt=0)

    @field_validator("names")
    @classmethod
    def _names(cls, v):
        from .baselines import baselines

        return _registered(v, baselines(), "baseline(s)")


class EvalSpec(_Strict):
    split: Literal["dev", "test"] = "test"
    limit: int | None = Field(None, ge=1, description="examples scored per model (null: the whole split)")
    batch_size: int = Field(32, ge=1)


class Recipe(_Strict):
    """What to compress (model, task), how (modules, merge, baselines), and where to (output)."""
    model: str = Field(..., description="a from_pretrained folder (or hub name), or 'bundled' (the G2P teacher)")
    tokenizer: str | None = Field(None, description="tokenizer path (default: the model's folder)")
    task: TaskSpec
    output: Path = Field(..., description="folder for models/, results.csv, summary.html")
    modules: ModulesSpec | None = None
    merge: MergeSection | None = None
    baselines: BaselinesSpec | None = None
    eval: EvalSpec = Field(default_factory=EvalSpec)
    seed: int = 0

    @model_validator(mode="after")
    def _fits(self):
        if self.task.kind == "g2p" and self.model != "bundled":
            raise ValueError("model: the g2p task needs the bundled teacher's G2P tokenizer; set model: bundled")
        if self.model == "bundled" and self.task.kind != "g2p":
            raise ValueError("task.kind: the bundled teacher reads G2P tokens; use kind: g2p (or your own model)")
        if not (self.modules or self.merge or self.baselines):
            raise ValueError("nothing to do: add at least one of modules, merge, baselines")
        return self


# ---- reading and checking ------------------------------------------------------------------

def _field_names(model: type[BaseModel], loc: tuple) -> list[str]:
    """The valid keys at `loc` (for 'did you mean')."""
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        f = model.model_fields.get(part)
        ann = getattr(f, "annotation", None)
        args = (ann,) if get_origin(ann) is None else get_args(ann)
        sub = next((a for a in args if get_origin(a) is None and isinstance(a, type) and issubclass(a, BaseModel)),
                   None)
        if sub is None:
            return []
        model = sub
    return list(model.model_fields)


def _explain(e: ValidationError, source: str) -> RecipeError:
    lines = []
    for err in e.errors():
        loc = tuple(err["loc"])
        where = ".".join(str(p) for p in loc) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            valid = _field_names(Recipe, loc)
            near = difflib.get_close_matches(str(loc[-1]), valid, n=1)
            msg = f"unknown key; {'did you mean ' + repr(near[0]) + '? ' if near else ''}valid keys: {', '.join(valid)}"
        elif err["type"] == "missing":
            msg = "required; add it (see examples/ for a complete recipe)"
        lines.append(f"  {where}: {msg}")
    return RecipeError(f"{source}: the recipe is not valid:\n" + "\n".join(lines))


def load_recipe(source: str | Path | dict, base: Path | None = None) -> Recipe:
    """A validated Recipe from a YAML file (or a dict); relative paths resolve against the file's folder."""
    import yaml

    if isinstance(source, dict):
        data, name, base = source, "recipe", base or Path.cwd()
    else:
        path = Path(source)
        if not path.is_file():
            raise RecipeError(f"no recipe at {path}: give a YAML file (see examples/*/recipe.yaml)")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise RecipeError(f"{path} is not valid YAML: {e}") from None
        name, base = str(path), base or path.resolve().parent
        if not isinstance(data, dict):
            raise RecipeError(f"{path}: a recipe is a mapping (model: ..., task: ..., output: ...), "
                              f"got {type(data).__name__}")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise _explain(e, name) from None
    return _resolve_paths(recipe, base)


def _resolve_paths(r: Recipe, base: Path) -> Recipe:
    def rel(p):
        return p if p is None or Path(p).is_absolute() else base / p

    model = r.model
    if model != "bundled" and (base / model).exists() and not Path(model).is_absolute():
        model = str(base / model)
    tokenizer = r.tokenizer
    if tokenizer is not None and not Path(tokenizer).is_absolute() and (base / tokenizer).exists():
        tokenizer = str(base / tokenizer)
    task = r.task.model_copy(update={"path": rel(r.task.path)})
    return r.model_copy(update={"model": model, "tokenizer": tokenizer, "task": task, "output": rel(r.output)})


def load_model_and_task(r: Recipe):
    """(model, task) the recipe names, with errors that say what to fix."""
    return _load(r.model, r.tokenizer, r.task)


class _TaskOnly(_Strict):
    task: TaskSpec


def load_model_and_data(model: str | Path | None, kind: str, path: str | Path | None = None, *,
                        tokenizer: str | None = None, **task) -> tuple:
    """(model, task) from a model folder (or 'bundled') and a data file, checked as a recipe's are:
    `kind` and `task` keywords are the recipe's `task` section (block_size, metric, source_col, target_col,
    max_target_len, dev_fraction, test_fraction). The g2p task needs the bundled teacher (model None or 'bundled')."""
    try:
        spec = _TaskOnly.model_validate({"task": {"kind": kind, "path": path, **task}}).task
    except ValidationError as e:
        raise _explain(e, "load_model_and_data") from None
    model = "bundled" if model is None and spec.kind == "g2p" else model
    if model is None:
        raise RecipeError("model: give a model folder written by save_pretrained (or 'bundled' with kind g2p)")
    model = str(model)
    if (spec.kind == "g2p") != (model == "bundled"):
        raise RecipeError("task.kind: the bundled teacher reads G2P tokens and the g2p task needs it; use "
                          "kind 'g2p' with model 'bundled', or your own model with kind 'pairs' or 'text'")
    return _load(model, tokenizer, spec)


def _load(name: str, tokenizer: str | None, spec: TaskSpec):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    if spec.path is not None and not spec.path.is_file():
        raise RecipeError(f"task.path: no file at {spec.path}; fix the path (relative paths start at the "
                          "recipe's folder)")
    if name == "bundled":
        from .teacher import load_teacher

        return load_teacher()
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise RecipeError(f"model: cannot load {name!r} ({str(e).splitlines()[0]}); give a folder written by "
                          "save_pretrained (config.json + weights) or 'bundled'") from None
    seq2seq = bool(getattr(config, "is_encoder_decoder", False))
    if spec.kind == "text" and seq2seq:
        raise RecipeError(f"task.kind: {name} is an encoder-decoder model; a text task needs a decoder-only LM, "
                          "or use kind: pairs")
    from .tasks.guards import ENCODER_FIX, check_causal, check_head_loaded, describe, generation_cap, model_role

    role = model_role(config)
    if spec.kind == "pairs" and not seq2seq:
        raise RecipeError(f"task.kind: {name} is {describe(config)}, not an encoder-decoder; " +
                          (ENCODER_FIX if role == "encoder" else "use kind: text (a text file) with it"))
    if spec.kind == "text" and role == "encoder":
        raise RecipeError(f"task.kind: {name} is {describe(config)}, not a decoder-only LM: kind text would load "
                          f"it with a language-model head initialised at random; {ENCODER_FIX}")
    positions = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    if spec.kind == "text" and positions and spec.block_size and spec.block_size > positions:
        raise RecipeError(f"task.block_size: {spec.block_size} tokens, but the model reads at most {positions}; "
                          f"set block_size: {positions} or less")
    model, info = (AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM).from_pretrained(
        name, output_loading_info=True)
    model = model.float().eval()
    try:  # no head initialised at random; a text model that does not see later tokens
        check_head_loaded(name, model, info, spec.kind)
        if spec.kind == "text":
            check_causal(model)
    except ValueError as e:
        raise RecipeError(f"model: {e}") from None
    cap = generation_cap(model) if spec.kind == "pairs" else None
    if cap is not None and spec.max_target_len is not None and spec.max_target_len > cap:
        raise RecipeError(f"task.max_target_len: {spec.max_target_len} tokens, but the model's position table holds "
                          f"{cap + 1} positions (max_position_embeddings; the decoder start token takes one); set "
                          f"max_target_len: {cap} or less")
    try:
        task = _task(spec, tokenizer or name)
        if spec.kind == "pairs":
            task.fit_positions(model)  # sources and targets cut to the position table, before any training
    except (ValueError, KeyError, TypeError) as e:  # the tasks' own errors name the problem and the fix
        raise RecipeError(f"task: {e}") from None
    return model, task


def _task(spec: TaskSpec, tokenizer: str):
    from .tasks.causal_lm import load_tokenizer

    tok = load_tokenizer(tokenizer)
    if spec.kind == "text":
        from .tasks.causal_lm import CausalLMTask

        return CausalLMTask.from_file(spec.path, tok, block_size=spec.block_size,
                                      dev_fraction=spec.dev_fraction, test_fraction=spec.test_fraction)
    from .tasks.pairs import PairsTask

    cols = {k: v for k, v in (("source_col", spec.source_col), ("target_col", spec.target_col),
                              ("max_target_len", spec.max_target_len)) if v is not None}
    return PairsTask.from_file(spec.path, tok, metric=spec.metric, dev_fraction=spec.dev_fraction,
                               test_fraction=spec.test_fraction, **cols)


def check_recipe(r: Recipe, model, task=None, *, output: bool = True) -> None:
    """Everything that can be checked against the model before any training: depths, granularities,
    plans, merge sets and windows, baseline depths; and (`output`) that the output folder is new or
    holds this recipe's run of this model and data (`check_output`: what the run itself refuses)."""
    from .anatomy import UnsupportedArchitectureError, anatomy
    from .merging.spec import MergeSpec
    from .modular.plan import Plan, PlanError
    from .modular.replacing import ReplacingConfig
    from .surgery import stack_depths

    try:
        depths = stack_depths(model)
    except UnsupportedArchitectureError as e:
        first = str(e).splitlines()[0].split(". To support it")[0].rstrip(". ")
        raise RecipeError(f"model: {first}; register its layout with mtlab.anatomy.register(ArchSpec(...)) "
                          "in Python before running the recipe, or use a model of a registered family") from None
    try:
        if r.modules is not None:
            ReplacingConfig(granularities=r.modules.granularities).granularities_for(depths)
            for text in r.modules.plans if isinstance(r.modules.plans, list) else ():
                Plan.parse(text, depths).validate(depths, {s: r.modules.granularities for s in depths})
    except (ValueError, PlanError) as e:
        fix = re.sub(r"ReplacingConfig\(granularities=\(([\d, ]*)\)\)", r"granularities: [\1]", str(e))
        raise RecipeError(f"modules.{'plans' if isinstance(e, PlanError) else 'granularities'}: {fix}") from None
    if r.merge is not None:
        an = anatomy(model)
        for text in r.merge.sets:
            try:
                MergeSpec.parse(text).validate(an)
            except (ValueError, KeyError) as e:
                raise RecipeError(f"merge.sets: {text!r}: {e}") from None
        ws = r.merge.window_search
        if ws is not None:
            from .merging.windows import windows

            fits = [(s, a, k) for s, n in depths.items() if n >= 2
                    for a, k in windows(n, [k for k in ws.sizes if k <= n]) if ws.starts is None or a in ws.starts]
            if not fits:
                raise RecipeError(f"merge.window_search: no window of sizes {list(ws.sizes)} starting at "
                                  f"{list(ws.starts or []) or 'any layer'} fits the stacks {depths}; use smaller "
                                  "sizes or other starts")
    if r.baselines is not None:
        bad = [d for d in r.baselines.depths if not 1 <= d < min(depths.values())]
        if bad:
            raise RecipeError(f"baselines.depths: {bad} do not shrink the model's stacks {depths}; use depths from 1 "
                              f"to {min(depths.values()) - 1}")
    if output:
        check_output(r, model, task)


#: what a run writes in its output folder (deleted by a fresh run; anything else there is kept)
RUN_FILES = ("work", "models", "results.csv", "summary.html", "screen.csv", "window_search.csv", "run.json",
             "recipe.json")


def check_output(r: Recipe, model, task=None, identity: dict | None = None) -> None:
    """Raise RecipeError if `r.output` holds files of its own, and RecipeRunMismatch naming each field
    if it holds the run of another recipe, model weights or training data (`run.json`); a new or
    empty folder passes. `identity` (`mtlab.train.run_identity`) is computed when needed (`task`
    built from the recipe when not given)."""
    from .train import config_diff, run_identity

    out = r.output
    if not out.exists() or not any(out.iterdir()):
        return
    seen = out / "recipe.json"
    if not seen.is_file():
        raise RecipeError(f"output: {out} exists and holds other files; choose a new folder or empty it")
    diffs = config_diff(json.loads(seen.read_text()), json.loads(r.model_dump_json()), prefix="recipe.",
                        ignore=("output",), was="recorded")  # output: this folder, however it was named
    if identity is None:
        identity = run_identity(model, task if task is not None else load_model_and_task(r)[1])
    ran = out / "run.json"
    old = json.loads(ran.read_text()) if ran.is_file() else {k: "(not recorded: an older mtlab)" for k in identity}
    diffs = config_diff(old, identity, was="recorded") + diffs
    if diffs:
        raise RecipeRunMismatch(
            f"output: {out} holds the results of another recipe, model or data; rerunning there would resume its "
            "work/ and return that run's models. Differences:\n  " + "\n  ".join(diffs) +
            f"\nRerun with --fresh (run_recipe(..., fresh=True)) to delete its results and work/ and start over, "
            f"delete {out}, or choose a new folder with --output")


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
    from .candidate import Candidate
    from .explore import screen
    from .modular import ReplacingConfig, assemble, teacher_ladders, train_modules
    from .modular.plan import Plan
    from .surgery import stack_depths

    m = r.modules
    cfg = ReplacingConfig(granularities=m.granularities, train=_train_cfg(m.steps, m.batch_size, m.lr, r.seed))
    bank, _ = train_modules(copy.deepcopy(teacher), task, cfg, work / "modules", progress=progress)
    depths = stack_depths(teacher)
    if m.plans == "ladders":
        plans = list(dict.fromkeys(p for _, p in teacher_ladders(teacher, bank)))
    else:
        plans = [Plan.parse(t, depths) for t in m.plans]
    plans = [p for p in plans if p != Plan.teacher(depths)]
    out = {f"modules {p}": Candidate("modules", p, assemble(teacher, bank, p), info={"kind": "modules"})
           for p in plans}
    tables = {}
    if m.screen:
        tables["screen"] = screen(teacher, bank, task, split="dev", limit=m.screen_limit, batch_size=m.batch_size,
                                  progress=progress)
    return out, tables


def _merges(r: Recipe, teacher, task, work: Path, progress: bool) -> Built:
    from .candidate import Budget, Candidate, apply, parse_spec
    from .merging.correlations import CorrelationCache
    from .merging.recover import recover
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
    for text in specs:
        spec = parse_spec(text)
        model = apply(teacher, spec, cache=cache).requires_grad_(True)
        budget = Budget()
        if mg.recovery.steps:
            cfg = _train_cfg(mg.recovery.steps, mg.recovery.batch_size, mg.recovery.lr, r.seed)
            model, log = recover(model.train(), task, cfg, work / "recover" / _slug(text), progress=progress, save=False)
            budget = Budget(1, mg.recovery.steps, log.attrs.get("config", {}).get("train_seconds"))
        out[f"merge {text}"] = Candidate("merge", spec, model.eval(), budget=budget, info={"kind": "merge"})
    if mg.recovery.steps and specs:  # the control: the original fine-tuned exactly as the merges were recovered
        cfg = _train_cfg(mg.recovery.steps, mg.recovery.batch_size, mg.recovery.lr, r.seed)
        model, log = recover(copy.deepcopy(teacher).train().requires_grad_(True), task, cfg,
                             work / "recover" / "control_original", progress=progress, save=False)
        out[CONTROL] = Candidate("control", f"original fine-tuned {mg.recovery.steps} steps like the merges' recovery",
                                 model.eval(), budget=Budget(1, mg.recovery.steps,
                                                             log.attrs.get("config", {}).get("train_seconds")),
                                 info={"kind": "control"})
    return out, tables


def _baselines(r: Recipe, teacher, task, work: Path, progress: bool) -> Built:
    from .baselines import BaselineBudget, build_baselines, default_run_dir

    b = r.baselines
    budget = BaselineBudget(train=_train_cfg(b.steps, b.batch_size, b.lr, r.seed), depths=b.depths, progress=progress,
                            run_dir=lambda name, key: work / default_run_dir(name, key))
    return {f"{c.method} {c.label}": replace(c, info={"kind": "baseline"})
            for c in build_baselines(teacher, task, budget, b.names)}, {}


def export_model(model, directory: Path, task) -> str:
    """A folder plain transformers loads: `mtlab.export.export` when this mtlab has it, else
    `save_pretrained` of an untied copy (merged FFs get their own weights), plus the tokenizer."""
    from .export import export

    export(model, directory, task=task)
    return "mtlab.export"


def _prepare_output(r: Recipe, record: dict, identity: dict, fresh: bool = False) -> Path:
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
    check_recipe(r, teacher, task, output=False)  # the output folder: _prepare_output, by the same check_output
    record = json.loads(r.model_dump_json())
    out = _prepare_output(r, record, run_identity(teacher, task), fresh)
    work, t0 = out / "work", time.perf_counter()
    from .candidate import Candidate

    cands = {"original": Candidate("original", "", teacher, provenance="given", info={"kind": "original"})}
    tables: dict[str, pd.DataFrame] = {}
    for section, build in (("modules", _modules), ("merge", _merges), ("baselines", _baselines)):
        if getattr(r, section) is not None:
            built, side = build(r, teacher, task, work, progress)
            cands.update(built)
            tables.update(side)
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
