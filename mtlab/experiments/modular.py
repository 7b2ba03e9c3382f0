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
from dataclasses import asdict, replace

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from ..baselines import BaselineBudget, build_baselines
from ..cache import artifact_dir, cached_frame, teacher_hash
from ..candidate import Budget, Candidate
from ..measure import generate_flops, latency, speed_columns, stack_params
from ..modular import ModuleBank, ReplacingConfig, assemble, teacher_ladders, train_modules
from ..modular.plan import Plan, using_screen
from ..profiles import ModularProfile, get_profile
from ..shipped import ArtifactMismatch, shipped_state
from ..explore.screen import screen
from ..tasks.diagnosis import score_splits
from ..teacher import load_teacher
from ..train import TrainConfig
from . import artifacts
from .artifacts import bank_recipe, baseline_recipe, curve_evaluator, load_bank, load_baseline

COLUMNS = ["method", "strategy", "plan", "params", "ratio", "ratio_model", "ideal_speedup", "speedup_b1",
           "speedup_b64", "dev_per", "dev_wer", "test_per", "test_wer", "train_runs", "train_steps",
           "train_seconds"]


EXTRA = ["rel_word_acc", "rel_per_acc", "len_ratio", "eos_rate", "train_examples"]
QUALITY = ("dev_per", "dev_wer", "test_per", "test_wer", "test_len_ratio", "test_eos_rate")
VERSION = 5   # bump when a code change changes what the table holds (3: diagnosis columns, shipped artifacts; 4: speed spread, speed_noisy; 5: screened strategy rows)


def replacing_config(p: ModularProfile) -> ReplacingConfig:
    """The module run of a profile: the shipped bank's recipe at the profile's budget."""
    return bank_recipe(p.steps, p.batch_size, p.granularities, eval_every=p.curve_every)


def baseline_config(p: ModularProfile) -> TrainConfig:
    """The per-run budget of every baseline: the module run's steps and batch, a fine-tuning rate."""
    return baseline_recipe(p.baseline_steps, p.batch_size)


def shipped_key(p: ModularProfile, baselines: bool = True) -> dict:
    """The cards of the shipped bank (and baselines) that a shipped profile reads ({} otherwise):
    part of a cache key, so a table made before `make modules` or `make baselines` shipped (or
    re-shipped) a run is not reused."""
    if not p.shipped:
        return {}
    bank = artifacts.BANK_DIR
    key = {"bank": shipped_state(bank.parent, [bank.name])}
    if baselines:
        key["baselines"] = shipped_state(artifacts.BASELINE_DIR, artifacts.baseline_names(p.baseline_depths))
    return {"shipped": key}


def trained_bank(profile=None, teacher=None, task=None, progress: bool = True) -> tuple[ModuleBank, pd.DataFrame]:
    """The module bank of a profile: the shipped one (verified against this recipe and teacher), or
    trained once in the cache (resumable) and read from there afterwards."""
    p = get_profile(profile).modular
    if teacher is None:
        teacher, task = load_teacher()
    cfg = replacing_config(p)
    if p.shipped:
        return load_bank(cfg, teacher)
    d = artifact_dir("modules", {"teacher": teacher_hash(), "replacing": asdict(cfg)})
    bank, log = train_modules(teacher, task, cfg, d, progress=progress,
                              evaluate=curve_evaluator(task) if cfg.train.eval_every else None)
    log.attrs["config"] = asdict(cfg)
    log.attrs["dir"] = str(d)
    return bank, log


ladders = teacher_ladders  # (strategy, plan) of every registered strategy, teacher first

#: the screen's metric the "screened" strategy ranks plans by: words with every token right under
#: teacher forcing on dev (the screen's closest kin of word accuracy)
SCREEN_METRIC = "tf_word_acc"
SCREEN_TIEBREAK = "nll"  # ties in word accuracy (common on few words) go to the lower token NLL
RULE_STRATEGIES = ("size_first", "speed_first")


SCREEN_VERSION = 4  # the screen cache's key version (it was experiments.explore's VERSION 4)


def bank_key(prof) -> dict:
    """What a table built on the profile's module bank depends on: the teacher, the replacing recipe, the shipped bank."""
    return {"teacher": teacher_hash(), "replacing": asdict(replacing_config(prof.modular)),
            **shipped_key(prof.modular, baselines=False)}


def teacher_task_bank(prof, teacher=None, task=None, bank=None, progress=True):
    """(teacher, task, bank) of the profile: the given ones, else the bundled teacher and its trained bank."""
    if teacher is None:
        teacher, task = load_teacher()
    if bank is None:
        bank, _ = trained_bank(prof, teacher, task, progress)
    return teacher, task, bank


def screen_table(profile=None, teacher=None, task=None, bank=None, *, progress: bool = True) -> pd.DataFrame:
    """The whole assembly space screened on dev (see `mtlab.explore.screen.screen`), cached."""
    prof = get_profile(profile)
    e = prof.explore

    def compute():
        t, tk, b = teacher_task_bank(prof, teacher, task, bank, progress)
        df = screen(t, b, tk, split="dev", limit=e.screen_limit, batch_size=e.screen_batch, progress=progress)
        df["block_evals"], df["seconds"] = df.attrs["block_evals"], df.attrs["seconds"]
        return df

    key = {"version": SCREEN_VERSION, "bank": bank_key(prof), "limit": e.screen_limit, "batch": e.screen_batch}
    return cached_frame("screen", key, compute)


def screened_ladder(prof, teacher, bank, task, progress: bool = True) -> list[tuple[str, Plan]]:
    """("screened", plan) for each target ratio: the plan with the best `SCREEN_METRIC` within the
    ratio's size budget, read from the profile's screen of the bank's whole assembly space on dev
    (`mtlab.experiments.explore.screen_table`, cached; test held out)."""
    from ..modular.bank import block_params
    from ..modular.plan import ladders as plan_ladders
    from ..surgery import stack_depths
    scores = screen_table(prof, teacher, task, bank, progress=progress)
    with using_screen(scores, metric=SCREEN_METRIC, then=SCREEN_TIEBREAK) as name:
        return [(s, p) for s, p in plan_ladders(stack_depths(teacher), bank.granularities, block_params(teacher),
                                                names=[name]) if s != "teacher"]


def trained_baselines(profile=None, teacher=None, task=None, progress: bool = True) -> list[Candidate]:
    """Every registered baseline's candidates with their training budget: the shipped runs (with
    their scores from the cards; a run not shipped yet has model None and a note), or trained in
    the cache."""
    p = get_profile(profile).modular
    if teacher is None:
        teacher, task = load_teacher()
    if p.shipped:
        return shipped_baselines(p)
    key = {"teacher": teacher_hash(), "train": asdict(baseline_config(p))}
    budget = BaselineBudget(baseline_config(p), tuple(p.baseline_depths), progress=progress,
                            run_dir=lambda name, k: artifact_dir(name, {**key, **k}))
    return build_baselines(teacher, task, budget)


def shipped_baselines(p: ModularProfile) -> list[Candidate]:
    """The baseline runs shipped under data/baselines, verified against this profile's budget."""
    out = []
    for name in artifacts.baseline_names(p.baseline_depths):
        try:
            out += load_baseline(name, baseline_config(p))
        except ArtifactMismatch:
            if (artifacts.BASELINE_DIR / name).exists():
                raise
            print(f"baseline {name} is not shipped yet (`make baselines` trains it); its row stays empty", flush=True)
            out.append(Candidate(name.partition("-")[0], name, budget=Budget(), provenance="missing", note="not shipped: make baselines"))
    return out


def modular_table(profile=None, *, progress: bool = True, refresh: bool = False) -> pd.DataFrame:
    """One row per model (teacher, each ladder plan, each baseline); columns `COLUMNS`.

    `ratio` is the layer-stack compression (teacher stack parameters / the model's),
    `ratio_model` the whole model's; `ideal_speedup` the FLOP ratio of greedy generation
    at a fixed length; `speedup_b1/_b64` measured generation speed-ups in the same run.
    Modules rows share ONE training run: it is counted on the teacher-free first module row
    (`train_runs` 1) and as 0 on the others, so column sums give each method's total cost."""
    prof = get_profile(profile)
    key = {"version": VERSION, "teacher": teacher_hash(), "profile": asdict(prof.modular),
           "replacing": asdict(replacing_config(prof.modular)), "baselines": asdict(baseline_config(prof.modular)),
           "screen": {"limit": prof.explore.screen_limit, "batch": prof.explore.screen_batch, "metric": SCREEN_METRIC,
                      "then": SCREEN_TIEBREAK},
           **shipped_key(prof.modular)}
    return cached_frame("modular_table", key, lambda: _modular_table(prof, progress), refresh=refresh)


def _modular_table(prof, progress: bool) -> pd.DataFrame:
    p = prof.modular
    torch.manual_seed(0)
    teacher, task = load_teacher()
    bank, log = trained_bank(prof, teacher, task, progress)
    module_seconds = float(log.seconds.max()) if len(log) else 0.0
    provenance = "shipped" if p.shipped else "cache"
    # the shipped bank's card holds every ladder rung scored on the full splits: not decoded again
    card_scores = {r["plan"]: {k: v for k, v in r.items() if k.startswith(("dev_", "test_"))}
                   for r in log.attrs.get("card", {}).get("ladders", [])}
    cands, seen = [], {}
    for strategy, plan in ladders(teacher, bank) + screened_ladder(prof, teacher, bank, task, progress):
        first = not any(c.method == "modules" for c in cands)
        method = "teacher" if strategy == "teacher" else "modules"
        if str(plan) in seen:  # a plan on both ladders is evaluated once, listed under both
            cands.append(replace(seen[str(plan)], strategy=strategy, budget=Budget()))
            continue
        cost = Budget(1, p.steps, module_seconds) if method == "modules" and first else Budget()
        c = Candidate(method, plan, assemble(teacher, bank, plan), strategy, cost, provenance=provenance,
                      scores=card_scores.get(str(plan), {}))
        cands.append(c)
        seen[str(plan)] = c
    cands += trained_baselines(prof, teacher, task, progress)
    return evaluate_candidates(cands, teacher, task, p, progress)


def evaluate_candidates(cands: list[Candidate], teacher: nn.Module, task, p: ModularProfile,
                        progress: bool = True) -> pd.DataFrame:
    """Quality, size, FLOPs and measured speed of every candidate's model, in one run (the first
    candidate is the reference of the ratios). A candidate that already carries QUALITY (decoded on
    the same `eval_limit` words elsewhere) is not decoded again; one without a model is an empty row."""
    t_stack, t_all = stack_params(teacher), sum(x.numel() for x in teacher.parameters())
    order = task.batches("dev", p.latency_words, shuffle=True, seed=0)[0]
    b = task.collate("dev", order)
    new = task.max_target_len(int(b.attention_mask.sum(1).max()))
    flops0 = generate_flops(teacher, b.input_ids, b.attention_mask, max_new_tokens=new, min_new_tokens=new)
    evaluated: dict[int, dict] = {}
    rows = [c.row() for c in cands]
    for c, r in zip(tqdm(cands, desc="evaluate models", disable=not progress), rows):
        m = c.model
        if m is None:  # an artifact that is not there yet: an empty row, with its note
            continue
        if id(m) not in evaluated:
            t0 = time.perf_counter()
            q = dict(c.scores)
            if not all(k in q for k in QUALITY):  # not decoded yet (shipped rows carry their scores)
                q = score_splits(m, task, limit=p.eval_limit)
            f = generate_flops(m, b.input_ids, b.attention_mask, max_new_tokens=new, min_new_tokens=new)
            evaluated[id(m)] = {**q, "params": sum(x.numel() for x in m.parameters()),
                                "ratio": t_stack / stack_params(m),
                                "ideal_speedup": flops0 / f, "eval_seconds": time.perf_counter() - t0}
        r.update(evaluated[id(m)])
        r["ratio_model"] = t_all / r["params"]
    models = {id(c.model): c.model for c in cands if c.model is not None}
    lat = latency({str(k): m for k, m in models.items()}, task, batch_sizes=tuple(p.latency_batches),
                  max_new_tokens=new, min_run_time=p.latency_seconds, rounds=p.latency_rounds,
                  ideal={str(k): evaluated[k]["ideal_speedup"] for k in models})  # teacher first
    for c, r in zip(cands, rows):  # speed-ups with their spread; `speed_noisy` ones stay out of frontiers
        r.update(speed_columns(lat, str(id(c.model))) if c.model is not None else {"speed_noisy": False})
    df = pd.DataFrame(rows)
    for col in COLUMNS:
        if col not in df:
            df[col] = float("nan")
    df["rel_word_acc"] = (100 - df.test_wer) / (100 - df.test_wer.iloc[0])
    df["rel_per_acc"] = (100 - df.test_per) / (100 - df.test_per.iloc[0])
    df["len_ratio"], df["eos_rate"] = df.test_len_ratio, df.test_eos_rate
    df["train_examples"] = df.train_steps * p.batch_size
    lead = COLUMNS + EXTRA
    return df[lead + [c for c in df.columns if c not in lead]]


def diagnosis_table(table: pd.DataFrame, split: str = "test") -> pd.DataFrame:
    """Why each model errs: output/reference length, share of outputs that end with EOS, share
    looping into the length cap, and the PER split into substitutions, insertions, deletions."""
    cols = ["per", "wer", "len_ratio", "eos_rate", "loops", "sub", "ins", "del"]
    t = table.drop_duplicates("plan")
    return t[["method", "plan", "ratio"] + [f"{split}_{c}" for c in cols]].rename(
        columns={f"{split}_{c}": c for c in cols}).reset_index(drop=True)


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


TARGETS = {1.1: 0.99, 1.5: 0.95, 2.0: 0.93, 3.0: 0.80}  # relative word accuracy the study aims for (issue #12)


def head_to_head(table: pd.DataFrame, ratios=(1.5, 2.0, 3.0), methods=None,
                 strategies=RULE_STRATEGIES + ("screened",)) -> pd.DataFrame:
    """At each ratio: the module plan of the rule-based ladders and the best baseline (lowest test
    WER) of that ratio, among `methods` (every baseline when None); then, for each assembly strategy
    in `strategies` (the two rule-based ladders and the one that reads the dev screen), the plan it
    assembles for that ratio (its rung of the smallest ratio reaching it) and its test WER and PER:
    columns `{strategy}_plan`, `{strategy}_test_wer`, `{strategy}_test_per`. A table without a
    `strategy` column (written before strategies were recorded) counts its module rows as rule-based."""
    if "strategy" not in table:
        table = table.assign(strategy=RULE_STRATEGIES[0])
    rows = []
    for r in ratios:
        at = table[(table.ratio - r).abs() < 0.01]
        mods = at[(at.method == "modules") & at.strategy.isin(RULE_STRATEGIES)].sort_values("test_wer")
        base = at[~at.method.isin(["modules", "teacher"])] if methods is None else at[at.method.isin(methods)]
        base = base.dropna(subset=["test_wer"]).sort_values("test_wer")
        if not len(mods):
            continue
        m = mods.iloc[0]
        row = {"ratio": r, "modules_plan": m.plan, "modules_test_wer": m.test_wer, "modules_test_per": m.test_per}
        if len(base):
            b = base.iloc[0]
            row.update(baseline=f"{b.method} {b.plan}", baseline_test_wer=b.test_wer, baseline_test_per=b.test_per,
                       wer_gap=m.test_wer - b.test_wer, per_gap=m.test_per - b.test_per)
        for s in strategies:
            rung = table[(table.method == "modules") & (table.strategy == s) & (table.ratio >= r - 0.01)]
            if len(rung):
                x = rung.sort_values(["ratio", "plan"]).iloc[0]
                row.update({f"{s}_plan": x.plan, f"{s}_test_wer": x.test_wer, f"{s}_test_per": x.test_per})
        rows.append(row)
    return pd.DataFrame(rows)


STEP_COST_TARGET = 1.5  # a module-replacing step over a plain fine-tuning step, same batch (issue #12)
LENGTH_TOLERANCE = 0.1  # output/reference length of every module plan within 0.9-1.1: no runaway decoding


def targets(table: pd.DataFrame, step_cost: dict | None = None) -> pd.DataFrame:
    """Each target of the study (issue #12) with the value reached and whether it holds: relative
    word accuracy per ratio (`TARGETS`), modules against the best baseline in test WER and PER at
    1.5x, 2x and 3x, the length ratio of every module plan, and (given `step_cost_ratio()`) the
    cost of a module-replacing step."""
    rows = []
    mods = table[table.method == "modules"]
    for ratio, need in TARGETS.items():
        at = mods[(mods.ratio - ratio).abs() < 0.06]
        if len(at):
            rows.append({"target": "rel_word_acc >=", "ratio": ratio, "need": need,
                         "reached": float(at.rel_word_acc.max()), "ok": bool(at.rel_word_acc.max() >= need)})
    for r in head_to_head(table).itertuples():
        if pd.notna(getattr(r, "baseline", float("nan"))):
            for m in ("wer", "per"):
                gap = getattr(r, f"{m}_gap")
                rows.append({"target": f"modules - best baseline, test {m.upper()} <=", "ratio": r.ratio, "need": 0.0,
                             "reached": float(gap), "ok": bool(gap <= 0), "detail": r.baseline})
    plans = mods.drop_duplicates("plan").dropna(subset=["len_ratio"])
    if len(plans):
        worst = plans.loc[(plans.len_ratio - 1).abs().idxmax()]
        rows.append({"target": "worst |length ratio - 1| of a module plan <=", "ratio": float(worst.ratio),
                     "need": LENGTH_TOLERANCE, "reached": abs(float(worst.len_ratio) - 1),
                     "ok": bool(abs(worst.len_ratio - 1) <= LENGTH_TOLERANCE),
                     "detail": f"{worst.plan}: {worst.len_ratio:.2f}"})
    if step_cost:
        rows.append({"target": "replacing step / fine-tuning step <=", "ratio": float("nan"), "need": STEP_COST_TARGET,
                     "reached": float(step_cost["ratio"]), "ok": bool(step_cost["ratio"] <= STEP_COST_TARGET),
                     "detail": f"batch {step_cost['batch_size']}"})
    out = pd.DataFrame(rows, columns=["target", "ratio", "need", "reached", "ok", "detail"])
    out.attrs.update(targets=dict(TARGETS), step_cost_target=STEP_COST_TARGET, length_tolerance=LENGTH_TOLERANCE)
    return out


def _verdict(r) -> str:
    """beat / lose to / tie with, from a head_to_head row's WER and PER gaps (both must agree)."""
    return "beat" if r.wer_gap < 0 and r.per_gap < 0 else "lose to" if r.wer_gap > 0 and r.per_gap > 0 else "tie with"


def conclusion(table: pd.DataFrame) -> str:
    """A short written result of the modular table, computed from it (markdown)."""
    lines = []
    teacher = table[table.method == "teacher"].iloc[0]
    lines.append(f"The teacher scores {teacher.test_wer:.1f}% WER / {teacher.test_per:.1f}% PER on "
                 f"{int(teacher.get('test_n', 0)) or 'the'} test words.")
    for r in head_to_head(table).itertuples():
        if not hasattr(r, "baseline") or pd.isna(getattr(r, "baseline", float("nan"))):
            lines.append(f"At {r.ratio:g}x the modules ({r.modules_plan}) reach {r.modules_test_wer:.1f}% WER; "
                         "no baseline of that ratio is available.")
            continue
        lines.append(f"At {r.ratio:g}x the modules ({r.modules_plan}) {_verdict(r)} the best baseline ({r.baseline}): "
                     f"{r.modules_test_wer:.1f} vs {r.baseline_test_wer:.1f}% WER, "
                     f"{r.modules_test_per:.1f} vs {r.baseline_test_per:.1f}% PER.")
    budget = method_budget(table)
    for m in budget[(budget.train_runs == 1) & (budget.models > 1) & (budget.method != "modules")].method:
        pairs = [r for r in head_to_head(table, methods=[m]).itertuples() if pd.notna(getattr(r, "baseline", float("nan")))]
        if pairs:
            lines.append(f"Against {m}, which also trains ONCE for every ratio: " + "; ".join(
                f"at {r.ratio:g}x the modules {_verdict(r)} it ({r.modules_test_wer:.1f} vs {r.baseline_test_wer:.1f}% WER, "
                f"{r.modules_test_per:.1f} vs {r.baseline_test_per:.1f}% PER)" for r in pairs) + ".")
    for t in targets(table).itertuples():
        if t.target.startswith("rel_word_acc"):
            lines.append(f"Relative word accuracy at {t.ratio:g}x: {t.reached:.3f} (target {t.need:.2f}: "
                         f"{'met' if t.ok else 'missed'}).")
    mods = table[table.method == "modules"]
    out = mods[(mods.len_ratio - 1).abs() > LENGTH_TOLERANCE].drop_duplicates("plan")
    if len(out):
        worst = out.loc[(out.len_ratio - 1).abs().idxmax()]
        lines.append(f"{len(out)} module plan(s) have an output/reference length ratio outside 0.9-1.1 "
                     f"(worst {worst.plan}: {worst.len_ratio:.2f}, {100 * worst.get('test_loops', 0):.1f}% of words loop "
                     "into the length cap).")
    else:
        lines.append("Every module plan's output/reference length ratio is inside 0.9-1.1: no decoder collapses.")
    return "\n".join(f"- {x}" for x in lines)


# ---- learning curves on the same dev words (issue #25 item 3) --------------------------------

CURVE_VERSION = 2  # 2: models cut from one shared run (LayerDrop) sit at that run's steps
CURVE_RATIOS = {"1.5x": 1.5, "2x": 2.0, "3x": 3.0, "6x": 6.0}


def _curve_scores(model, task, words: int) -> dict[str, float]:
    """PER and WER of greedy decoding on the first `words` dev words: what the bank's run logs."""
    from .artifacts import length_ratio

    pred = task.predict(model, "dev", limit=words, progress=False)
    s = task.score(pred.hypothesis.tolist(), pred.reference.tolist())
    return {"dev_per": s["per"], "dev_wer": s["wer"], "dev_len": length_ratio(pred)}


def _ratio_tag(ratio: float) -> str | None:
    tag = min(CURVE_RATIOS, key=lambda t: abs(CURVE_RATIOS[t] - ratio))
    return tag if abs(CURVE_RATIOS[tag] - ratio) < 0.06 else None


def learning_curves(profile=None, *, baseline_logs: dict[str, pd.DataFrame] | None = None, progress: bool = True,
                    refresh: bool = False) -> pd.DataFrame:
    """Dev scores against training steps on the SAME dev words (the first `CURVE_WORDS`, those the
    bank's run logs every `curve_every` steps), long format: method, run, ratio (tag), step, dev_per,
    dev_wer, dev_len, source.

    - modules: the bank's logged curve (`source` "log") and, at its last step, its size-first plan
      at 1.5x decoded on those words (the log holds 2x, 3x and 6x only);
    - every baseline: its trained model decoded on those words at its step count (`source` "final
      model"); a baseline's own log with `dev_wer_<tag>` columns (`baseline_logs`, {run: log}) adds its
      curve (the shipped baselines were trained without evaluations: they have no curve);
    - teacher: its score on the same words (`step` NaN, one row per ratio): the line to read the
      curves against. Cached (the teacher's score too), keyed by the shipped cards."""
    prof = get_profile(profile)
    words = artifacts.CURVE_WORDS
    logs = {k: v.to_dict("list") for k, v in (baseline_logs or {}).items()}
    key = {"version": CURVE_VERSION, "teacher": teacher_hash(), "profile": asdict(prof.modular), "words": words,
           "replacing": asdict(replacing_config(prof.modular)), "baselines": asdict(baseline_config(prof.modular)),
           "logs": logs, **shipped_key(prof.modular)}
    return cached_frame("learning_curves", key, lambda: _learning_curves(prof, words, baseline_logs or {}, progress),
                        refresh=refresh)


def teacher_curve_score(words: int | None = None) -> dict[str, float]:
    """The teacher's dev PER and WER on the first `words` (default `CURVE_WORDS`) dev words, cached."""
    words = words or artifacts.CURVE_WORDS

    def compute() -> pd.DataFrame:
        teacher, task = load_teacher()
        return pd.DataFrame([_curve_scores(teacher, task, words)])

    return cached_frame("teacher_curve_score", {"teacher": teacher_hash(), "words": words}, compute).iloc[0].to_dict()


def _log_rows(log: pd.DataFrame, method: str, run: str) -> list[dict]:
    """The logged evaluations of a training log (`dev_wer_<tag>`, `dev_per_<tag>`, `dev_len_<tag>`)."""
    rows = []
    for tag in CURVE_RATIOS:
        if f"dev_wer_{tag}" not in log:
            continue
        for _, r in log.dropna(subset=[f"dev_wer_{tag}"]).iterrows():
            rows.append({"method": method, "run": run, "ratio": tag, "step": int(r["step"]),
                         **{m: float(r.get(f"{m}_{tag}", float("nan"))) for m in ("dev_per", "dev_wer", "dev_len")},
                         "source": "log"})
    return rows


def _learning_curves(prof, words: int, baseline_logs: dict, progress: bool) -> pd.DataFrame:
    from ..modular.plan import size_first
    from ..modular.bank import block_params
    from ..surgery import stack_depths

    teacher, task = load_teacher()
    bank, log = trained_bank(prof, teacher, task, progress)
    rows = _log_rows(log, "modules", "bank") if len(log) else []
    last = int(log.step.max()) if len(log) else prof.modular.steps
    logged = {r["ratio"] for r in rows}
    t_stack = stack_params(teacher)
    for plan in size_first(stack_depths(teacher), bank.granularities, block_params(teacher)):
        model = assemble(teacher, bank, plan)
        tag = _ratio_tag(t_stack / stack_params(model))
        if tag and tag not in logged and abs(CURVE_RATIOS[tag] - t_stack / stack_params(model)) < 0.01:
            rows.append({"method": "modules", "run": "bank", "ratio": tag, "step": last,
                         **_curve_scores(model.eval(), task, words), "source": "final model", "plan": str(plan)})
            logged.add(tag)
    for c in trained_baselines(prof, teacher, task, progress):
        if c.model is None:
            continue
        tag = _ratio_tag(t_stack / stack_params(c.model))
        if tag is None:
            continue
        info = c.row()  # method, plan (the spec's text) and train_steps, whatever the candidate's fields
        rows.append({"method": info["method"], "run": f"{info['method']} {info['plan']}", "ratio": tag,
                     "step": info.get("train_steps", float("nan")), **_curve_scores(c.model.eval(), task, words),
                     "source": "final model", "plan": info["plan"]})
    for r in rows:  # a model cut from a run counted on another row (train_steps 0): at that run's steps
        if r["source"] == "final model" and r["method"] != "modules" and not r["step"] > 0:
            r["step"] = max((x["step"] for x in rows if x["method"] == r["method"] and x["step"] > 0), default=r["step"])
    for run, blog in baseline_logs.items():
        rows += _log_rows(blog, run.partition("-")[0], run)
    t = teacher_curve_score(words)
    rows += [{"method": "teacher", "run": "teacher", "ratio": tag, "step": float("nan"), **t, "source": "teacher"}
             for tag in sorted({r["ratio"] for r in rows}, key=CURVE_RATIOS.get)]
    df = pd.DataFrame(rows)
    df.attrs.update(words=words, teacher=t)
    return df


def plot_learning_curves(curves: pd.DataFrame, metric: str = "dev_wer"):
    """One panel per ratio: the bank's curve, each baseline's curve or final point, and the
    teacher's score on the same dev words as a dashed line."""
    import matplotlib.pyplot as plt

    if curves is None or not len(curves) or metric not in curves:
        raise ValueError(f"plot_learning_curves: no {metric!r} to plot; pass the table learning_curves() returned")
    tags = [t for t in CURVE_RATIOS if t in set(curves.ratio) and (curves[curves.ratio == t].method != "teacher").any()]
    fig, axes = plt.subplots(1, len(tags), figsize=(4.2 * len(tags), 3.6), squeeze=False, sharey=True)
    words = curves.attrs.get("words", artifacts.CURVE_WORDS)
    for ax, tag in zip(axes[0], tags):
        at = curves[curves.ratio == tag]
        for (method, run), g in at[at.method != "teacher"].groupby(["method", "run"], sort=False):
            g = g.sort_values("step")
            style = "-o" if len(g) > 1 else "o"
            ax.plot(g.step, g[metric], style, ms=5, label=run if method != "modules" else "modules (one run)")
        teach = at[at.method == "teacher"]
        if len(teach):
            v = float(teach[metric].iloc[0])
            ax.axhline(v, ls="--", color="k", lw=1, label=f"teacher ({v:.1f})")
        ax.set_xlim(0, 1.05 * float(curves.step.max()))
        ax.set(title=f"{tag}", xlabel="training step", ylabel=f"{metric.replace('_', ' ')} % (first {words} dev words)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


# ---- what notebook 02 shows (issue 27 item 4): compact views of the tables; modular.csv keeps every column ----

TABLE_VIEW = ["method", "strategy", "plan", "params", "ratio", "speedup_b64", "test_wer", "test_per", "test_n",
              "rel_word_acc", "len_ratio"]  # what the conclusion reads, and the size and speed of each row
HEAD_TO_HEAD_VIEW = ["ratio", "modules_plan", "modules_test_wer", "modules_test_per", "baseline", "baseline_test_wer",
                     "baseline_test_per", "wer_gap", "per_gap"]
ABLATION_VIEW = ["variant", "steps", "batch_size"] + [f"dev_{m}_{r}" for r in ("1.5x", "2x", "3x", "6x")
                                                       for m in ("per", "wer")] + ["len_ratio_6x"]


def strategy_view(h2h: pd.DataFrame, strategies=RULE_STRATEGIES + ("screened",)) -> list[str]:
    """The columns of `head_to_head` that compare the assembly strategies: per ratio, each strategy's
    plan and its test WER and PER (the verdict against the baselines is HEAD_TO_HEAD_VIEW)."""
    cols = ["ratio"] + [f"{s}_{c}" for s in strategies for c in ("plan", "test_wer", "test_per")]
    return [c for c in cols if c in h2h.columns]
