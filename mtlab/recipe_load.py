"""A recipe against its model: loading the model and data it names, and every check before training.

`load_model_and_data` (also notebook 07's loader) builds (model, task) from a model folder and a
data file, refusing a task kind that does not fit the model, a block size past its context, a head
that would be initialised at random; `check_recipe` checks depths, granularities, plans, merge sets
and windows and baseline depths; `check_output` refuses an output folder that holds the run of
another recipe, model (weights) or data (`RecipeRunMismatch`, naming the field). The schema is
`mtlab.recipe_schema`; the runner `mtlab.recipe`.
"""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

from pydantic import ValidationError

from .recipe_schema import Recipe, RecipeError, TaskSpec, TaskOnly, explain
from .train import RunMismatchError

__all__ = ["RecipeRunMismatch", "load_model_and_task", "load_model_and_data", "check_recipe", "check_output",
           "RUN_FILES"]


class RecipeRunMismatch(RecipeError, RunMismatchError):
    """The output folder holds the run of another recipe, model (weights) or data: resuming its work/
    would return that run's models. The message names the differing fields and how to proceed."""


def load_model_and_task(r: Recipe):
    """(model, task) the recipe names, with errors that say what to fix."""
    return _load(r.model, r.tokenizer, r.task)


def load_model_and_data(model: str | Path | None, kind: str, path: str | Path | None = None, *,
                        tokenizer: str | None = None, **task) -> tuple:
    """(model, task) from a model folder (or 'bundled') and a data file, checked as a recipe's are:
    `kind` and `task` keywords are the recipe's `task` section (block_size, metric, source_col, target_col,
    max_target_len, dev_fraction, test_fraction). The g2p task needs the bundled teacher (model None or 'bundled')."""
    try:
        spec = TaskOnly.model_validate({"task": {"kind": kind, "path": path, **task}}).task
    except ValidationError as e:
        raise explain(e, "load_model_and_data") from None
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
    if spec.kind == "sentences":
        return _encoder(name, tokenizer, spec, config, role)
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


def _encoder(name: str, tokenizer: str | None, spec: TaskSpec, config, role: str):
    """(encoder, SentencesTask) with the encoder as the task's reference: every model is scored by how
    well its sentence embeddings match the original's."""
    from transformers import AutoModel

    from .tasks.causal_lm import load_tokenizer
    from .tasks.guards import describe
    from .tasks.sentences import SentencesTask

    if role != "encoder":
        raise RecipeError(f"task.kind: {name} is {describe(config)}, not an encoder; kind sentences compresses a "
                          "sentence encoder (BERT-style, e.g. all-MiniLM-L6-v2): use kind text or pairs for it")
    model = AutoModel.from_pretrained(name).float().eval()
    try:
        task = SentencesTask(load_tokenizer(tokenizer or name), path=spec.path, max_length=spec.max_length or 128)
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise RecipeError(f"task: {e}") from None
    task.reference = copy.deepcopy(model).requires_grad_(False)  # a frozen copy: training never moves it
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
             "recipe.json", "similarity.csv", "modular.csv", "merge.csv", "frontier.csv", "method_budget.csv",
             "index.html")  # mtlab run's files, then mtlab study's


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

