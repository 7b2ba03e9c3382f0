"""The artifacts of the bundled teacher that are trained once and shipped under data/.

`make modules` trains the module bank at a real budget (`BANK_RECIPE`): resumable in
runs/modules, exported atomically to data/modules/ with a card (config, budget, wall time,
learning curve, scores of every ladder rung, the command). The report loads it through
`load_bank`, which verifies the teacher's hash, the recipe and the weights' hashes first.
"""
from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import torch

from ..baselines import BASELINES
from ..cache import teacher_hash
from ..candidate import Budget, Candidate
from ..modular import ModuleBank, Plan, ReplacingConfig, assemble, teacher_ladders, train_modules
from ..shipped import verify, write_artifact
from ..teacher import ROOT, load_teacher
from ..tasks.diagnosis import score_splits
from ..baselines import BaselineBudget, baselines, build_baselines
from ..train import TrainConfig, on_main_process

BANK_DIR = ROOT / "data" / "modules"
BANK_WORK = ROOT / "runs" / "modules"
BANK_COMMAND = "make modules"
#: plans decoded on the first CURVE_WORDS dev words at every evaluation of the bank's run
CURVE_PLANS = {"2x": "e=222 d=222", "3x": "e=33 d=33", "6x": "e=6 d=6"}
CURVE_WORDS = 300


def bank_recipe(steps: int = 20_000, batch_size: int = 64, granularities=(2, 3, 6), eval_every: int = 2000) -> ReplacingConfig:
    """The module-replacing recipe of the shipped bank (and of any profile that retrains it)."""
    return ReplacingConfig(granularities=tuple(granularities), train=TrainConfig(
        steps=steps, batch_size=batch_size, lr=1e-3, warmup=max(1, min(200, steps // 10)), precision="no",
        log_every=max(1, min(50, steps // 10)), ckpt_every=250, eval_every=eval_every))


def length_ratio(pred: pd.DataFrame) -> float:
    """Output length over reference length (units: whitespace tokens, phones for G2P)."""
    hyp = pred.hypothesis.str.split().str.len().sum()
    ref = pred.reference.str.split().str.len().sum()
    return float(hyp / max(1, ref))


def curve_evaluator(task, plans: dict[str, str] = CURVE_PLANS, words: int = CURVE_WORDS):
    """evaluate(replacer) for the training log: PER, WER and length ratio of a few assemblies."""

    def evaluate(replacer) -> dict[str, float]:
        out = {}
        for tag, plan in plans.items():
            spans = Plan.parse(plan, replacer.bank.depths)
            if any(k > 1 and k not in replacer.bank.granularities.get(s, ()) for s, ks in spans.spans for k in ks):
                continue  # a plan this bank has no modules for
            model = assemble(replacer.teacher, replacer.bank, plan)
            pred = task.predict(model, "dev", limit=words, progress=False)
            s = task.score(pred.hypothesis.tolist(), pred.reference.tolist())
            out.update({f"per_{tag}": s["per"], f"wer_{tag}": s["wer"], f"len_{tag}": length_ratio(pred)})
        return out

    return evaluate


def bank_card_config(cfg: ReplacingConfig) -> dict:
    return {"replacing": asdict(cfg)}


def train_bank(cfg: ReplacingConfig | None = None, out: str | Path = BANK_DIR, work: str | Path = BANK_WORK,
               *, max_seconds: float | None = None, progress: bool = True, ladder_words: int | None = None):
    """Train (or resume) the shipped bank in `work`, then score every ladder rung on the full
    dev and test splits and export bank + card to `out`. Returns the training log."""
    cfg = cfg or bank_recipe()
    teacher, task = load_teacher()
    t0 = time.time()
    bank, log = train_modules(teacher, task, cfg, work, max_seconds=max_seconds, progress=progress,
                              evaluate=curve_evaluator(task) if cfg.train.eval_every else None)
    if not len(log) or int(log.step.max()) < cfg.train.steps:
        print(f"stopped at step {int(log.step.max()) if len(log) else 0}/{cfg.train.steps}; rerun `{BANK_COMMAND}` to resume")
        return log
    bank.eval()
    rows, scored = [], {}
    for strategy, plan in teacher_ladders(teacher, bank):
        if str(plan) not in scored:  # a plan on both ladders is decoded once
            model = assemble(teacher, bank, plan)
            scored[str(plan)] = _rounded(score_splits(model, task, limit=ladder_words, progress=progress))
        rows.append({"strategy": strategy, "plan": str(plan), **scored[str(plan)]})
    card = {
        "what": "module bank of the bundled teacher (Modular Transformers, multi-grained module replacing + KD)",
        "teacher_hash": teacher_hash(), "config": bank_card_config(cfg),
        "steps": int(log.step.max()), "batch_size": cfg.train.batch_size,
        "examples_seen": int(log.step.max()) * cfg.train.batch_size,
        "train_seconds": float(log.seconds.max()),
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
        "ladder_words": ladder_words or "all", "ladders": rows, "command": BANK_COMMAND,
    }

    def files(tmp: Path) -> None:
        bank.save(tmp / "bank", {"config": asdict(cfg)})
        log.to_csv(tmp / "training_log.csv", index=False)

    on_main_process(lambda: write_artifact(out, files, card, render_bank_card(card, log)))
    print(f"exported the bank to {out} ({(time.time() - t0) / 60:.1f} min)")
    return log


def _rounded(d: dict) -> dict:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in d.items()}


def render_bank_card(card: dict, log: pd.DataFrame) -> str:
    cfg = card["config"]["replacing"]
    cols = ["strategy", "plan"] + [f"{s}_{m}" for s in ("dev", "test")
                                   for m in ("per", "wer", "len_ratio", "eos_rate", "sub", "ins", "del")]
    ladder = pd.DataFrame(card["ladders"])[cols]
    curve_cols = ["step", "minutes"] + [c for c in log.columns if c.startswith("dev_")]
    curve = (log.dropna(subset=curve_cols[2:3]).assign(step=lambda d: d.step.astype(int).astype(str), minutes=lambda d: d.seconds / 60)
             if len(curve_cols) > 2 else log.iloc[0:0].assign(minutes=[]))
    return f"""# mtlab module bank for the bundled teacher

Modules of granularities {cfg['granularities']} for both stacks of `data/teacher`, trained in ONE
module-replacing run with distillation (logit KD, hidden-state MSE at span boundaries, local span MSE).

- Teacher: `data/teacher` (weights hash `{card['teacher_hash']}`); the bank is refused for any other.
- Budget: {card['steps']:,} steps at batch {card['batch_size']} = {card['examples_seen']:,} examples,
  {card['train_seconds'] / 60:.1f} minutes on {card['machine']}.
- Reproduce: `{card['command']}` (resumable; `nohup make modules > runs/modules.log 2>&1 &`).
- Config: `{json.dumps(cfg)}`

## Every ladder rung, greedy decoding ({card['ladder_words']} words per split)

PER, WER, and the PER's substitutions / insertions / deletions in % of reference phones;
output length over reference length; share of outputs that end with end-of-sequence.

{ladder.to_markdown(index=False, floatfmt='.2f')}

## Learning curve (first {CURVE_WORDS} dev words: PER, WER in %, output/reference length)

{curve[[c for c in curve_cols if c in curve]].to_markdown(index=False, floatfmt='.2f')}
"""


def load_bank(cfg: ReplacingConfig, teacher, path: str | Path | None = None) -> tuple[ModuleBank, pd.DataFrame]:
    """The shipped bank (default `BANK_DIR`) and its training log, with the card in `log.attrs`,
    after `shipped.verify` (teacher hash, recipe, file hashes)."""
    path = Path(path or BANK_DIR)
    card = verify(path, teacher_hash=teacher_hash(), config=bank_card_config(cfg), remake=BANK_COMMAND)
    log = pd.read_csv(path / "training_log.csv")
    log.attrs.update(config=asdict(cfg), card=card, dir=path.name)
    return ModuleBank.load(path / "bank", teacher), log




# ---- baselines: one run per method and depth, each with the module run's steps and batch ----

BASELINE_DIR = ROOT / "data" / "baselines"
BASELINE_WORK = ROOT / "runs" / "baselines"
BASELINE_COMMAND = "make baselines"
BASELINE_DEPTHS = (4, 3, 2)  # per-stack depths: 1.5x, 2x, 3x of a 6+6 teacher


def baseline_recipe(steps: int = 20_000, batch_size: int = 64, lr: float = 3e-4) -> TrainConfig:
    """The per-run budget of every baseline: the module run's steps and batch, a fine-tuning rate
    (3e-4: the better of 3e-4 and 1e-3 for shrink-and-fine-tune at 3,000 steps, leads.md)."""
    return TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup=max(1, min(200, steps // 10)),
                       precision="no", log_every=max(1, min(50, steps // 10)), ckpt_every=250)


def baseline_names(depths=BASELINE_DEPTHS) -> list[str]:
    """One shipped run each: sft-D and layer_drop-D for each depth D (a run per ratio), and the one
    LayerDrop run that every depth is cut from."""
    per_depth = BASELINES.names(bundled=True, trains_per_depth=True, by_rank=True)
    return [f"{m}-{d}" for d in depths for m in per_depth] + list(
        BASELINES.names(bundled=True, trains_per_depth=False, by_rank=True))


def _budget_of(name: str, cfg: TrainConfig, work: Path, progress: bool) -> tuple[str, BaselineBudget]:
    """The registered recipe behind a shipped run's name, and the budget that makes exactly that run."""
    method, _, depth = name.partition("-")
    if name not in baseline_names() or method not in baselines():
        raise ValueError(f"unknown baseline {name!r}: use one of {baseline_names()}")
    depths = (int(depth),) if depth else BASELINE_DEPTHS
    return method, BaselineBudget(cfg, depths, run_dir=lambda recipe, key: work, progress=progress)


def train_baseline(name: str, cfg: TrainConfig | None = None, out_root: str | Path = BASELINE_DIR,
                   work_root: str | Path = BASELINE_WORK, *, progress: bool = True, words: int | None = None) -> list[Candidate]:
    """Train (or resume) one shipped baseline run with its registered recipe (`mtlab.baselines`),
    then export every model it yields (bf16, scored after the round trip, as the teacher is)
    with a card to out_root/name. Returns the recipe's candidates."""
    cfg = cfg or baseline_recipe()
    teacher, task = load_teacher()
    method, budget = _budget_of(name, cfg, Path(work_root) / name, progress)
    cands = build_baselines(teacher, task, budget, names=[method])
    done = max(c.budget.steps for c in cands)
    if done < cfg.steps:
        print(f"{name}: stopped at step {done}/{cfg.steps}; rerun `{BASELINE_COMMAND}` to resume")
        return cands
    entries = []
    for i, c in enumerate(cands):
        c.model = c.model.to(torch.bfloat16).to(torch.float32).eval()  # score exactly what ships
        entries.append({**c.row(), "dir": f"models/{i}",
                        **_rounded(score_splits(c.model, task, limit=words, progress=progress))})
    card = {"what": f"baseline {name} of the bundled teacher (recipe {method!r} of mtlab.baselines)",
            "teacher_hash": teacher_hash(), "config": {"train": asdict(cfg), "name": name},
            "steps": done, "batch_size": cfg.batch_size, "examples_seen": done * cfg.batch_size,
            "train_seconds": sum(c.budget.seconds for c in cands),
            "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
            "words": words or "all", "models": entries, "command": BASELINE_COMMAND}

    def files(tmp: Path) -> None:
        for e, c in zip(entries, cands):
            c.model.to(torch.bfloat16).save_pretrained(tmp / e["dir"], safe_serialization=True)
            c.model.to(torch.float32)
            (tmp / e["dir"] / "README.md").write_text(model_pointer(name, e))

    on_main_process(lambda: write_artifact(Path(out_root) / name, files, card, render_baseline_card(card)))
    return cands


def model_pointer(name: str, entry: dict) -> str:
    """The README beside one shipped baseline model: what it is, and where its card is."""
    return (f"# {entry['method']} ({entry['strategy']}): {entry['plan']}\n\nOne model of the shipped baseline run "
            f"`{name}`; its config, budget, scores and the command that rebuilds it are in `../../README.md` and "
            f"`../../card.json`. Plain `transformers` loads this folder (bf16 weights).\n")


def render_baseline_card(card: dict) -> str:
    cols = ["method", "strategy", "plan", "train_runs"] + [f"{s}_{m}" for s in ("dev", "test")
                                                          for m in ("per", "wer", "len_ratio", "eos_rate")]
    scores = pd.DataFrame(card["models"])[cols]
    return f"""# mtlab baseline `{card['config']['name']}` for the bundled teacher

- {card['what']}.
- Teacher: `data/teacher` (weights hash `{card['teacher_hash']}`); refused for any other.
- Budget: {card['steps']:,} steps at batch {card['batch_size']} = {card['examples_seen']:,} examples (the module
  run's budget), {card['train_seconds'] / 60:.1f} minutes on {card['machine']}.
- Training config: `{json.dumps(card['config']['train'])}`
- Reproduce: `{card['command']}` (resumable). Weights: bf16 safetensors; scores are of the bf16 weights.

## Greedy decoding ({card['words']} words per split; PER and WER in %)

{scores.to_markdown(index=False, floatfmt='.2f')}
"""


def load_baseline(name: str, cfg: TrainConfig, root: str | Path | None = None) -> list[Candidate]:
    """The candidates of a shipped baseline run (model in float32, scores and budget from the card),
    after `shipped.verify`; default root `BASELINE_DIR`."""
    from transformers import AutoModelForSeq2SeqLM

    path = Path(root or BASELINE_DIR) / name
    card = verify(path, teacher_hash=teacher_hash(), config={"train": asdict(cfg), "name": name},
                  remake=BASELINE_COMMAND)
    return [Candidate(e["method"], e["plan"], AutoModelForSeq2SeqLM.from_pretrained(path / e["dir"], dtype=torch.float32).eval(),
                      e["strategy"], Budget(e["train_runs"], e["train_steps"], e["train_seconds"]), provenance="shipped",
                      scores={k: v for k, v in e.items() if k.startswith(("dev_", "test_"))})
            for e in card["models"]]


__all__ = ["BANK_DIR", "BASELINE_DIR", "baseline_names", "baseline_recipe", "bank_recipe", "curve_evaluator",
           "length_ratio", "load_bank", "load_baseline", "train_bank", "train_baseline"]
