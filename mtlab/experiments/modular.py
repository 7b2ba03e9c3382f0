"""The Modular Transformers study on the bundled teacher, as one table.

ONE module-replacing run yields every assembly; the size-first and speed-first ladders are
assembled from it and set beside the baselines, each trained with the same steps and batch
per run: layer dropping (alternate layers, one run per ratio), shrink-and-fine-tune (one run
per ratio) and LayerDrop (one run, pruned to every ratio). Every model is decoded on dev and
test, its generation FLOPs counted and its latency measured in the same run, so speed-ups
are ratios taken on one machine at one time.

Training runs live in the artifact cache (`mtlab.cache`), keyed by the teacher's weights and
the config: notebooks, benchmarks and `make report` share them, and an interrupted run
resumes where it stopped.
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from ..baselines import layer_drop, layerdrop_finetune, layerdrop_prune, shrink_and_finetune
from ..cache import artifact_dir, cached_frame, teacher_hash
from ..measure import generate_flops, latency, stack_params
from ..modular import ModuleBank, Plan, ReplacingConfig, assemble, size_first, speed_first, train_modules
from ..modular.bank import block_params, depths
from ..profiles import ModularProfile, get_profile
from ..teacher import load_teacher
from ..train import TrainConfig

COLUMNS = ["method", "strategy", "plan", "params", "ratio", "ratio_model", "ideal_speedup", "speedup_b1",
           "speedup_b64", "dev_per", "dev_wer", "test_per", "test_wer", "train_runs", "train_steps",
           "train_seconds"]


QUALITY = ("dev_per", "dev_wer", "test_per", "test_wer")
VERSION = 2   # bump when a code change changes what the table holds (2: per-round latency ratios)


def replacing_config(p: ModularProfile) -> ReplacingConfig:
    return ReplacingConfig(granularities=tuple(p.granularities), train=TrainConfig(
        steps=p.steps, batch_size=p.batch_size, lr=1e-3, warmup=max(1, min(200, p.steps // 10)), precision="no",
        log_every=max(1, min(50, p.steps // 10)), ckpt_every=250))


def baseline_config(p: ModularProfile) -> TrainConfig:
    """The per-run budget of every baseline: the module run's steps and batch, a fine-tuning rate."""
    return TrainConfig(steps=p.baseline_steps, batch_size=p.batch_size, lr=3e-4,
                       warmup=max(1, min(200, p.baseline_steps // 10)), precision="no",
                       log_every=max(1, min(50, p.baseline_steps // 10)), ckpt_every=250)


def trained_bank(profile=None, teacher=None, task=None, progress: bool = True) -> tuple[ModuleBank, pd.DataFrame]:
    """The module bank of a profile: trained once (resumable), then read from the cache."""
    p = get_profile(profile).modular
    if teacher is None:
        teacher, task = load_teacher()
    cfg = replacing_config(p)
    d = artifact_dir("modules", {"teacher": teacher_hash(), "replacing": asdict(cfg)})
    bank, log = train_modules(teacher, task, cfg, d, progress=progress)
    log.attrs["config"] = asdict(cfg)
    log.attrs["dir"] = str(d)
    return bank, log


def ladders(teacher: nn.Module, bank: ModuleBank) -> list[tuple[str, Plan]]:
    """(strategy, plan) for the size-first and speed-first ladders, teacher first."""
    d = depths(teacher)
    out = [("teacher", Plan.teacher(d))]
    out += [("size_first", p) for p in size_first(d, bank.granularities, block_params(teacher))]
    out += [("speed_first", p) for p in speed_first(d, bank.granularities)]
    return out


def trained_baselines(profile=None, teacher=None, task=None, progress: bool = True) -> list[dict]:
    """Every baseline model of a profile, with its training budget: dicts of method, strategy,
    plan (kept layers), model, train_runs, train_steps, train_seconds."""
    p = get_profile(profile).modular
    if teacher is None:
        teacher, task = load_teacher()
    cfg = baseline_config(p)
    key = {"teacher": teacher_hash(), "train": asdict(cfg)}
    stacks = list(depths(teacher))
    out = []

    def budget(log):
        c = log.attrs["config"]
        return {"train_runs": 1, "train_steps": c["steps_done"], "train_seconds": c["train_seconds"]}

    for depth in p.baseline_depths:
        want = {s: depth for s in stacks}
        m, log = layer_drop(teacher, task, "alternate", cfg, depths=want, progress=progress,
                            out_dir=artifact_dir("layer_drop", {**key, "depths": want}))
        out.append({"method": "layer_drop", "strategy": "alternate", "plan": _kept(log), "model": m, **budget(log)})
        m, log = shrink_and_finetune(teacher, task, want, cfg, progress=progress,
                                     out_dir=artifact_dir("sft", {**key, "depths": want}))
        out.append({"method": "sft", "strategy": "spread", "plan": _kept(log), "model": m, **budget(log)})
    full, log = layerdrop_finetune(teacher, task, cfg, progress=progress, out_dir=artifact_dir("layerdrop", key))
    b = budget(log)
    b_shared = {**b, "train_runs": 0, "train_steps": 0, "train_seconds": 0.0}  # the one run is counted once
    out.append({"method": "layerdrop", "strategy": "every_other", "plan": "every other layer",
                "model": layerdrop_prune(full, "every_other"), **b})
    for depth in p.baseline_depths:
        if depth * 2 == max(depths(teacher).values()):
            continue  # same model as every_other for a 6-layer stack
        out.append({"method": "layerdrop", "strategy": "spread", "plan": f"{depth} per stack",
                    "model": layerdrop_prune(full, {s: depth for s in stacks}), **b_shared})
    return out


def _kept(log: pd.DataFrame) -> str:
    keep = log.attrs["config"]["keep"]
    return " ".join(f"{s[0]}={','.join(map(str, v))}" for s, v in keep.items())


def modular_table(profile=None, *, progress: bool = True, refresh: bool = False) -> pd.DataFrame:
    """One row per model (teacher, each ladder plan, each baseline); columns `COLUMNS`.

    `ratio` is the layer-stack compression (teacher stack parameters / the model's),
    `ratio_model` the whole model's; `ideal_speedup` the FLOP ratio of greedy generation
    at a fixed length; `speedup_b1/_b64` measured generation speed-ups in the same run.
    Modules rows share ONE training run: it is counted on the teacher-free first module row
    (`train_runs` 1) and as 0 on the others, so column sums give each method's total cost."""
    prof = get_profile(profile)
    key = {"version": VERSION, "teacher": teacher_hash(), "profile": asdict(prof.modular),
           "replacing": asdict(replacing_config(prof.modular)), "baselines": asdict(baseline_config(prof.modular))}
    return cached_frame("modular_table", key, lambda: _modular_table(prof, progress), refresh=refresh)


def _modular_table(prof, progress: bool) -> pd.DataFrame:
    p = prof.modular
    torch.manual_seed(0)
    teacher, task = load_teacher()
    bank, log = trained_bank(prof, teacher, task, progress)
    module_seconds = float(log.seconds.max()) if len(log) else 0.0
    rows, seen = [], {}
    for strategy, plan in ladders(teacher, bank):
        first = not any(r["method"] == "modules" for r in rows)
        method = "teacher" if strategy == "teacher" else "modules"
        if str(plan) in seen:  # a plan on both ladders is evaluated once, listed under both
            rows.append({**seen[str(plan)], "strategy": strategy, "train_runs": 0, "train_steps": 0,
                         "train_seconds": 0.0})
            continue
        cost = ({"train_runs": 1, "train_steps": p.steps, "train_seconds": module_seconds} if method == "modules"
                and first else {"train_runs": 0, "train_steps": 0, "train_seconds": 0.0})
        row = {"method": method, "strategy": strategy, "plan": str(plan), "model": assemble(teacher, bank, plan), **cost}
        rows.append(row)
        seen[str(plan)] = row
    rows += trained_baselines(prof, teacher, task, progress)
    return evaluate_models(rows, teacher, task, p, progress)


def evaluate_models(rows: list[dict], teacher: nn.Module, task, p: ModularProfile, progress: bool = True) -> pd.DataFrame:
    """Quality, size, FLOPs and measured speed of every row's `model`, in one run. A row that
    already carries QUALITY (decoded on the same `eval_limit` words elsewhere) is not decoded again."""
    t_stack, t_all = stack_params(teacher), sum(x.numel() for x in teacher.parameters())
    order = task.batches("dev", p.latency_words, shuffle=True, seed=0)[0]
    b = task.collate("dev", order)
    new = task.max_target_len(int(b.attention_mask.sum(1).max()))
    flops0 = generate_flops(teacher, b.input_ids, b.attention_mask, max_new_tokens=new, min_new_tokens=new)
    evaluated: dict[int, dict] = {}
    for r in tqdm(rows, desc="evaluate models", disable=not progress):
        m = r["model"]
        if id(m) not in evaluated:
            t0 = time.perf_counter()
            q = {k: r[k] for k in QUALITY if k in r}
            if len(q) < len(QUALITY):  # not decoded yet on these words (rows may carry known numbers)
                for split in ("dev", "test"):
                    s = task.evaluate(m, split, limit=p.eval_limit, progress=False)
                    q[f"{split}_per"], q[f"{split}_wer"] = s["per"], s["wer"]
            f = generate_flops(m, b.input_ids, b.attention_mask, max_new_tokens=new, min_new_tokens=new)
            evaluated[id(m)] = {**q, "params": sum(x.numel() for x in m.parameters()),
                                "ratio": t_stack / stack_params(m),
                                "ideal_speedup": flops0 / f, "eval_seconds": time.perf_counter() - t0}
        r.update(evaluated[id(m)])
        r["ratio_model"] = t_all / r["params"]
    models = {}
    for r in rows:
        models.setdefault(id(r["model"]), r["model"])
    lat = latency({str(k): m for k, m in models.items()}, task, batch_sizes=tuple(p.latency_batches),
                  max_new_tokens=new, min_run_time=p.latency_seconds, rounds=p.latency_rounds)  # teacher first
    for bs in p.latency_batches:
        speedup = lat[lat.batch_size == bs].set_index("model").speedup_vs_first
        for r in rows:
            r[f"speedup_b{bs}"] = speedup[str(id(r["model"]))]
    df = pd.DataFrame([{k: v for k, v in r.items() if k != "model"} for r in rows])
    for c in COLUMNS:
        if c not in df:
            df[c] = float("nan")
    df["rel_word_acc"] = (100 - df.test_wer) / (100 - df.test_wer.iloc[0])
    return df[COLUMNS + [c for c in df.columns if c not in COLUMNS]]


def method_budget(table: pd.DataFrame) -> pd.DataFrame:
    """Training runs and compute per method, and how many ratios each covers."""
    t = table[table.method != "teacher"]
    return (t.groupby("method").agg(models=("plan", "nunique"), train_runs=("train_runs", "sum"),
                                    train_steps=("train_steps", "sum"), train_seconds=("train_seconds", "sum"))
            .reset_index())


def step_cost_ratio(batch_size: int = 64, steps: int = 20, granularities=(2, 3, 6)) -> dict:
    """Seconds per module-replacing step over seconds per plain teacher fine-tuning step,
    same batches, measured alternately in one run (torch.utils.benchmark)."""
    from torch.utils import benchmark

    from ..modular.replacing import Replacer, replacing_loss
    from ..train import cross_entropy_loss

    teacher, task = load_teacher()
    student = copy.deepcopy(teacher).train()
    cfg = ReplacingConfig(granularities=tuple(granularities), train=TrainConfig(steps=1000, batch_size=batch_size))
    replacer = Replacer(teacher, ModuleBank.build(teacher, cfg.granularities))
    for x in student.parameters():
        x.requires_grad_(True)
    rep_loss, ce_loss = replacing_loss(cfg), cross_entropy_loss()
    batches = [task.collate("train", i) for i in task.batches("train", batch_size, shuffle=True)[:steps]]
    state = {"i": 0}

    def step(model, fn):
        b = batches[state["i"] % len(batches)]
        state["i"] += 1
        loss, _ = fn(model, b, 900)  # late in the curriculum: p near its end value
        loss.backward()
        model.zero_grad(set_to_none=True)

    out = {}
    for name, model, fn in (("replacing", replacer, rep_loss), ("finetune", student, ce_loss)):
        t = benchmark.Timer("step(model, fn)", globals={"step": step, "model": model, "fn": fn},
                            num_threads=torch.get_num_threads())
        out[f"{name}_seconds"] = t.blocked_autorange(min_run_time=3.0).median
    out["ratio"] = out["replacing_seconds"] / out["finetune_seconds"]
    out["batch_size"] = batch_size
    return out
