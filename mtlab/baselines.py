"""Baselines measured on the same teacher, each a plain HF model of the teacher's class.

Every trained baseline returns (student, log) with its training budget in
`log.attrs["config"]` (steps, batch_size, train_runs = 1 per call, train_seconds), is
resumable from `out_dir/checkpoint` (rerun the same call) and saves the finished model
with `save_pretrained` under `out_dir/student` (LayerDrop: `out_dir/model`). A run folder
records what it is of (`out_dir/baseline.json`: method, kept layers, the teacher's weights hash;
the checkpoint: the student's starting weights, the data and the config): one holding a run of
another teacher, data or layer choice raises `mtlab.train.RunMismatchError` naming the field,
and is never resumed (`fresh=True` deletes it first). The teacher
is never modified (it may be moved to the training device).

- `drop_layers` / `keep_only`: layer dropping / layer pruning (Sajjad et al.; the FF-merging
  paper's baseline): the kept blocks are copied, renumbered and the config depth updated.
- `layer_drop`: drop layers by a rule, then fine-tune the whole student with distillation
  (`mtlab.distill`) from the teacher.
- `shrink_and_finetune`: SFT (DistilBART): a shallower student initialised from evenly
  spaced teacher layers, then the same distillation fine-tune. It is `layer_drop` with the
  "spread" rule; only the layer choice differs.
- `layerdrop_finetune` + `layerdrop_prune`: LayerDrop (Fan et al.; fairseq): fine-tune the
  teacher ONCE with structured layer dropout, then prune to any depth with no further training.

Each baseline is also a registered recipe (`@baseline(name, ...)`: layer_drop, sft, layerdrop, and
block_influence: ShortGPT's depth pruning by `mtlab.block_influence` scores, `score_recipe`) turning
a teacher, a task and a `BaselineBudget` into `Candidate`s; `build_baselines` runs them all. The
registry `BASELINES` (`mtlab.registry.Registry`) carries what the studies read: label, kind, rank,
trains_per_depth, task kinds, keep_rule, bundled. Layer surgery (dropping blocks, transient
installs) is `mtlab.surgery`'s.

Layer choice rules ("top", "alternate", "spread"), `keep_only` and `resolve_keep` are
`mtlab.layer_rules`' (re-exported here).
"""
from __future__ import annotations

import copy
import json
import random
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

import pandas as pd
from torch import nn

from .block_influence import RULES as SCORE_RULES, block_scores, calibration_batches, choose_kept
from .candidate import Budget, Candidate
from .checkpoint import atomic_dir, write_json
from .distill import DistillConfig, distill_loss
from .keys import config_hash, weights_hash
from .layer_rules import (KEEP_RULES, drop_layers, keep_alternate, keep_bottom, keep_for_depth, keep_layers,  # noqa: F401
                          keep_only, resolve_keep)
from .measure import count_params
from .merging.spec import layer_runs
from .modular.plan import Plan
from .registry import Registry
from .surgery import first_block_state_lent, stack_blocks, stack_depths, swapped
from .tasks.base import Seq2SeqTask
from .train import EvalFn, RunMismatchError, TrainConfig, config_diff, on_main_process, train


# ---------------------------------------------------------------------------
# Fine-tuning with distillation (layer dropping, SFT)

def _budget(log: pd.DataFrame, cfg: TrainConfig, **meta) -> dict:
    done = int(log.step.max()) if len(log) and "step" in log else 0
    seconds = float(log.seconds.max()) if len(log) and "seconds" in log else 0.0
    return {**meta, "train": asdict(cfg), "steps": cfg.steps, "steps_done": done, "batch_size": cfg.batch_size,
            "train_runs": 1, "train_seconds": seconds, "complete": done >= cfg.steps}


def _claim(out: Path, meta: dict, teacher: nn.Module, fresh: bool = False) -> None:
    """Refuse to resume a checkpoint written for a different baseline, layer choice or teacher
    (RunMismatchError naming the fields); record this run's in out/baseline.json."""
    meta = json.loads(json.dumps({**meta, "teacher_hash": weights_hash(teacher)}))
    tag = out / "baseline.json"
    if not fresh and (out / "checkpoint").exists() and tag.exists():
        old = json.loads(tag.read_text())
        if "teacher_hash" not in old:  # written before runs recorded their teacher: compare the rest
            old["teacher_hash"] = meta["teacher_hash"]
        diffs = config_diff(old, meta)
        if diffs:
            raise RunMismatchError(
                f"{out} holds a checkpoint of another baseline run (another teacher, method or layer choice); "
                "resuming it would return that run's weights. Differences:\n  " + "\n  ".join(diffs) +
                "\nUse a fresh out_dir, delete this one, or pass fresh=True to delete the old run")
    out.mkdir(parents=True, exist_ok=True)
    on_main_process(lambda: write_json(tag, meta))


def _save(model: nn.Module, path: Path) -> None:
    def write():
        with atomic_dir(path) as tmp:
            model.save_pretrained(tmp)

    on_main_process(write)


def _trainable_copy(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(True)
    return model.train()


def _finetune_student(method: str, rule: str, teacher: nn.Module, task: Seq2SeqTask, kept: dict[str, list[int]],
                      cfg: TrainConfig, distill: DistillConfig | None, out_dir, max_seconds, progress,
                      evaluate, fresh: bool = False) -> tuple[nn.Module, pd.DataFrame]:
    distill = distill or DistillConfig()
    out = Path(out_dir)
    meta = {"method": method, "rule": rule, "keep": kept, "teacher_depths": stack_depths(teacher),
            "distill": asdict(distill)}
    _claim(out, meta, teacher, fresh)
    student = _trainable_copy(keep_only(teacher, kept))
    log = train(student, task, cfg, out, loss_fn=distill_loss(teacher, distill), evaluate=evaluate,
                max_seconds=max_seconds, progress=progress, fresh=fresh)
    student.eval()
    log.attrs["config"] = _budget(log, cfg, **meta, student_depths=stack_depths(student),
                                  params=count_params(student), teacher_params=count_params(teacher))
    if log.attrs["config"]["complete"]:
        _save(student, out / "student")
    return student, log


def layer_drop(teacher: nn.Module, task: Seq2SeqTask, keep, cfg: TrainConfig, distill: DistillConfig | None = None,
               out_dir: str | Path = "runs/layer_drop", *, depths: Mapping[str, int] | None = None,
               max_seconds: float | None = None, progress: bool = True,
               evaluate: EvalFn | None = None, fresh: bool = False) -> tuple[nn.Module, pd.DataFrame]:
    """Layer dropping + distillation fine-tune of the whole student.

    keep: "top" or "alternate" (or "spread") with `depths` = target depth per stack, or
    {stack: [kept layers]}. Stacks not named keep all layers. Resumable from out_dir (a run of
    another teacher, data or config there is refused; `fresh=True` deletes it first)."""
    if depths is not None and not isinstance(keep, str):
        raise ValueError("depths goes with a rule name (keep='top' or 'alternate'); with explicit layers "
                         "per stack, leave depths out")
    kept = resolve_keep(teacher, keep, depths)
    rule = keep if isinstance(keep, str) else "explicit"
    return _finetune_student("layer_drop", rule, teacher, task, kept, cfg, distill, out_dir, max_seconds,
                             progress, evaluate, fresh)


def shrink_and_finetune(teacher: nn.Module, task: Seq2SeqTask, depths: Mapping[str, int], cfg: TrainConfig,
                        distill: DistillConfig | None = None, out_dir: str | Path = "runs/sft", *,
                        max_seconds: float | None = None, progress: bool = True,
                        evaluate: EvalFn | None = None, fresh: bool = False) -> tuple[nn.Module, pd.DataFrame]:
    """SFT (DistilBART): `depths[s]` layers per stack copied from evenly spaced teacher layers
    (the "spread" rule: first and last always kept, 6 -> 3 is [0, 2, 5]), then fine-tuned with
    distillation. Same code as layer_drop; only the layer choice rule differs."""
    if not isinstance(depths, Mapping) or not depths:
        raise ValueError("depths must name the target depth per stack, e.g. {'encoder': 3, 'decoder': 3}")
    kept = resolve_keep(teacher, "spread", depths)
    return _finetune_student("sft", "spread", teacher, task, kept, cfg, distill, out_dir, max_seconds,
                             progress, evaluate, fresh)


# ---------------------------------------------------------------------------
# LayerDrop

@contextmanager
def transient_keep(model: nn.Module, keep: Mapping[str, list[int]]):
    """Run `model` with only the kept layers of each named stack (same block objects, no copy:
    gradients reach the model's own parameters); everything is restored on exit. When block 0
    is skipped, the new first block borrows its stack-wide state, as drop_layers would copy it."""
    originals = stack_blocks(model)
    for s in keep:
        if s not in originals:
            raise KeyError(f"{type(model).__name__} has no stack {s!r}; valid: {list(originals)}")
    new = {s: [originals[s][i] for i in idx] for s, idx in keep.items() if list(idx) != list(range(len(originals[s])))}
    with ExitStack() as lent:
        for s, blocks in new.items():
            if keep[s][0] != 0:
                lent.enter_context(first_block_state_lent(originals[s][0], blocks[0]))
        with swapped(model, new):
            yield model


def sample_layerdrop(n: int, p: float, rng: random.Random) -> list[int]:
    """Kept layers of one stack: each is skipped with probability p; at least one always runs
    (if all were skipped, one chosen uniformly is kept)."""
    kept = [i for i in range(n) if rng.random() >= p]
    return kept or [rng.randrange(n)]


def layerdrop_loss(student: nn.Module, teacher: nn.Module, distill: DistillConfig, p: float, seed: int = 0):
    """loss_fn for mtlab.train: per step, sample the kept layers of every stack of `student` from
    (seed, step) only (so a resumed run samples exactly the same), install them transiently and
    compute the distillation loss. Skipped layers get no gradient: mtlab.train handles that
    under N processes too (a parameter unused on every process keeps grad None)."""
    base = distill_loss(teacher, distill)
    depths = stack_depths(student)

    def loss_fn(model: nn.Module, batch, step: int):
        rng = random.Random(seed * 1_000_003 + step)
        kept = {s: sample_layerdrop(n, p, rng) for s, n in depths.items()}
        with transient_keep(student, kept):
            loss, parts = base(model, batch, step)
        return loss, {**parts, "layers_skipped": sum(depths[s] - len(k) for s, k in kept.items())}

    return loss_fn


def layerdrop_finetune(teacher: nn.Module, task: Seq2SeqTask, cfg: TrainConfig, distill: DistillConfig | None = None,
                       out_dir: str | Path = "runs/layerdrop", p: float = 0.2, *, max_seconds: float | None = None,
                       progress: bool = True, evaluate: EvalFn | None = None,
                       fresh: bool = False) -> tuple[nn.Module, pd.DataFrame]:
    """LayerDrop: fine-tune a copy of the teacher ONCE with structured layer dropout (each step,
    each layer of each stack skipped with probability p) and distillation from the frozen original
    teacher. Returns the full-depth model; cut it to any depth with `layerdrop_prune`."""
    if not isinstance(p, (int, float)) or not 0 <= p < 1:
        raise ValueError(f"p={p!r}: the layer drop probability must be in [0, 1); LayerDrop uses 0.1-0.5 (default 0.2)")
    distill = distill or DistillConfig()
    out = Path(out_dir)
    meta = {"method": "layerdrop", "p": float(p), "teacher_depths": stack_depths(teacher), "distill": asdict(distill)}
    _claim(out, meta, teacher, fresh)
    model = _trainable_copy(copy.deepcopy(teacher))
    log = train(model, task, cfg, out, loss_fn=layerdrop_loss(model, teacher, distill, float(p), cfg.seed),
                evaluate=evaluate, max_seconds=max_seconds, progress=progress, fresh=fresh)
    model.eval()
    log.attrs["config"] = _budget(log, cfg, **meta, params=count_params(model),
                                  students="layerdrop_prune(model, keep): no further training")
    if log.attrs["config"]["complete"]:
        _save(model, out / "model")
    return model, log


def layerdrop_prune(model: nn.Module, keep="every_other") -> nn.Module:
    """A plain, pruned copy of a LayerDrop-trained model, no training.

    keep: "every_other" (fairseq's inference rule: layers 0, 2, 4, ... of every stack), a modular
    Plan (or its text) or {stack: depth} (evenly spaced layers, `keep_for_depth`), or
    {stack: [layers]}. Stacks not named keep all layers."""
    if isinstance(keep, str):
        if keep in ("every_other", "alternate"):
            keep = {s: list(range(0, n, 2)) for s, n in stack_depths(model).items()}
        else:
            keep = Plan.parse(keep, stack_depths(model))
    return keep_only(model, keep).eval()


# ---------------------------------------------------------------------------
# The baseline registry: recipes turning a teacher, a task and a budget into models

def default_run_dir(name: str, key: dict) -> Path:
    """runs/NAME/HASH, HASH naming `key` (so different depths never share a checkpoint). The key
    holds the depths only: the same folder for another model or data is refused when it is reused
    (each run records its teacher's and its student's weights hashes and its data's hash, and raises
    `mtlab.train.RunMismatchError` naming the field), never resumed."""
    return Path("runs") / name / config_hash(key, algorithm="sha256")


@dataclass(frozen=True)
class BaselineBudget:
    """What every baseline recipe gets: the per-run training budget, the target depths (each applied
    to every stack), and `run_dir(recipe, key) -> Path`, where a run keyed by `key` lives (resumable;
    the experiments pass the artifact cache)."""
    train: TrainConfig
    depths: tuple[int, ...]
    run_dir: Callable[[str, dict], Path] = field(default_factory=lambda: default_run_dir)
    progress: bool = True


Recipe = Callable[[nn.Module, Seq2SeqTask, BaselineBudget], list[Candidate]]

#: every baseline recipe, with what the studies read: label, kind (the frontier's group: the name), rank
#: (reading order: shipped run names and table rows), trains_per_depth (one run per target depth, or one
#: run cut to every depth), the task kinds it trains on, `keep_rule` (a fixed layer choice rule of
#: KEEP_RULES, which an embedding study re-trains with its own loss), `bundled` (shipped for the bundled
#: teacher under data/baselines)
BASELINES: Registry[Recipe] = Registry("baseline", "@mtlab.baselines.baseline(name)")


def baseline(name: str, *, label: str | None = None, rank: int | None = None, trains_per_depth: bool = True,
             tasks=("seq2seq", "causal_lm"), description: str | None = None, **meta) -> Callable[[Recipe], Recipe]:
    """Decorator: register `recipe(teacher, task, budget) -> [Candidate, ...]` as baseline `name`: each
    candidate has its method, strategy, spec (the kept layers as text), model and `Budget` (a run shared
    by several models counts once). `build_baselines` and the experiments run every registered recipe.
    The keywords are the entry's metadata in `BASELINES` (kind: the name; see `mtlab.registry.Entry`)."""
    def register(fn: Recipe) -> Recipe:
        doc = (fn.__doc__ or "").strip().split("\n")[0]
        BASELINES.add(name, fn, label=label or name, kind=name, rank=rank, trains_per_depth=bool(trains_per_depth),
                      tasks=tasks, description=description or doc, **meta)
        return fn

    return register


def baselines() -> tuple[str, ...]:
    """The registered baselines, in registration order (built in: layer_drop, sft, layerdrop, block_influence)."""
    return BASELINES.names()


def unregister_baseline(name: str) -> None:
    BASELINES.unregister(name)


def build_baselines(teacher: nn.Module, task: Seq2SeqTask, budget: BaselineBudget,
                    names: Iterable[str] | None = None) -> list[Candidate]:
    """The candidates of every registered baseline recipe (`names`, default all), in registry order."""
    names = baselines() if names is None else BASELINES.check(names, "baseline")
    return [row for n in names for row in BASELINES.get(n)(teacher, task, budget)]


def run_cost(log: pd.DataFrame) -> Budget:
    """The budget of one finished baseline run (its log's config): one run, its steps and seconds."""
    c = log.attrs["config"]
    return Budget(runs=1, steps=c["steps_done"], seconds=c["train_seconds"])


def kept_text(log: pd.DataFrame) -> str:
    """The kept layers of a run as plan-like text, e.g. "e=0,2,4 d=0,2,4"."""
    keep = log.attrs["config"]["keep"]
    return " ".join(f"{s[0]}={','.join(map(str, v))}" for s, v in keep.items())


@baseline("layer_drop", label="layer dropping + fine-tune", rank=2, trains_per_depth=True, keep_rule="alternate",
          bundled=True)
def _layer_drop_recipe(teacher, task, budget: BaselineBudget) -> list[Candidate]:
    """Sajjad et al.'s alternate dropping to each depth, then a distillation fine-tune."""
    out = []
    for depth in budget.depths:
        want = {s: depth for s in stack_depths(teacher)}
        m, log = layer_drop(teacher, task, "alternate", budget.train, depths=want, progress=budget.progress,
                            out_dir=budget.run_dir("layer_drop", {"depths": want}))
        out.append(Candidate("layer_drop", kept_text(log), m, "alternate", run_cost(log)))
    return out


@baseline("sft", label="shrink and fine-tune", rank=1, trains_per_depth=True, keep_rule="spread", bundled=True)
def _sft_recipe(teacher, task, budget: BaselineBudget) -> list[Candidate]:
    """DistilBART's shrink and fine-tune to each depth."""
    out = []
    for depth in budget.depths:
        want = {s: depth for s in stack_depths(teacher)}
        m, log = shrink_and_finetune(teacher, task, want, budget.train, progress=budget.progress,
                                     out_dir=budget.run_dir("sft", {"depths": want}))
        out.append(Candidate("sft", kept_text(log), m, "spread", run_cost(log)))
    return out


@baseline("layerdrop", label="LayerDrop", rank=3, trains_per_depth=False, bundled=True)
def _layerdrop_recipe(teacher, task, budget: BaselineBudget) -> list[Candidate]:
    """LayerDrop: ONE fine-tune, pruned to every other layer and to each depth (counted once)."""
    d = stack_depths(teacher)
    full, log = layerdrop_finetune(teacher, task, budget.train, progress=budget.progress,
                                   out_dir=budget.run_dir("layerdrop", {}))
    out = [Candidate("layerdrop", "every other layer", layerdrop_prune(full, "every_other"), "every_other",
                     run_cost(log))]
    for depth in budget.depths:
        if depth * 2 == max(d.values()):
            continue  # same model as every_other for a 6-layer stack
        out.append(Candidate("layerdrop", f"{depth} per stack", layerdrop_prune(full, {s: depth for s in d}),
                             "spread", Budget()))  # the shared run is counted once, on every_other
    return out


# ---------------------------------------------------------------------------
# Depth pruning by a measured score (mtlab.block_influence), then the same fine-tune

def score_recipe(rule: str = "bi", name: str | None = None) -> Recipe:
    """A baseline recipe: score the teacher's blocks on the task's train split
    (`mtlab.block_influence.block_scores`), keep the layers `rule` chooses at each of the budget's
    depths (every stack), and fine-tune each student with the same distillation as layer_drop and sft
    (one run per depth). Register another rule under its own name, e.g.
    `baseline("angular_distance", rank=5)(score_recipe("angular"))`."""
    if rule not in SCORE_RULES:
        raise ValueError(f"unknown rule {rule!r}; use one of {SCORE_RULES}")
    method = name or {"bi": "block_influence", "angular": "angular_distance"}[rule]

    def recipe(teacher, task, budget):
        scores = block_scores(teacher, calibration_batches(task, seed=budget.train.seed), progress=budget.progress)
        out = []
        for depth in budget.depths:
            want = {s: depth for s in stack_depths(teacher)}
            kept = choose_kept(scores, want, rule)
            m, log = layer_drop(teacher, task, kept, budget.train, progress=budget.progress,
                                out_dir=budget.run_dir(method, {"depths": want, "rule": rule, "keep": kept}))
            log.attrs["config"]["scores"] = scores.to_dict("records")
            dropped = {s: [i for i in range(n) if i not in kept[s]] for s, n in stack_depths(teacher).items()}
            text = " ".join(f"{s}:{layer_runs(v)}" for s, v in dropped.items() if v)
            out.append(Candidate(method, kept_text(log), m, rule, run_cost(log), info={"rule": rule, "dropped": text}))
        return out

    recipe.__name__ = f"_{method}_recipe"
    what = "block influence (ShortGPT)" if rule == "bi" else "angular distance (Gromov et al.)"
    recipe.__doc__ = f"Depth pruning by {what}, then a distillation fine-tune."
    return recipe


baseline("block_influence", label="block influence (ShortGPT) + fine-tune", rank=4, trains_per_depth=True,
         score_rule="bi", bundled=False)(score_recipe("bi"))
