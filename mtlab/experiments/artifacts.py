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

from ..cache import teacher_hash
from ..modular import ModuleBank, ReplacingConfig, assemble, train_modules
from ..shipped import verify, write_artifact
from ..teacher import ROOT, load_teacher
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
    from .modular import ladders

    cfg = cfg or bank_recipe()
    teacher, task = load_teacher()
    t0 = time.time()
    bank, log = train_modules(teacher, task, cfg, work, max_seconds=max_seconds, progress=progress,
                              evaluate=curve_evaluator(task))
    if not len(log) or int(log.step.max()) < cfg.train.steps:
        print(f"stopped at step {int(log.step.max()) if len(log) else 0}/{cfg.train.steps}; rerun `{BANK_COMMAND}` to resume")
        return log
    bank.eval()
    rows, scored = [], {}
    for strategy, plan in ladders(teacher, bank):
        if str(plan) in scored:  # a plan on both ladders is decoded once
            rows.append({**scored[str(plan)], "strategy": strategy})
            continue
        model = assemble(teacher, bank, plan)
        row = scored[str(plan)] = {"strategy": strategy, "plan": str(plan)}
        for split in ("dev", "test"):
            pred = task.predict(model, split, limit=ladder_words, progress=progress)
            s = task.score(pred.hypothesis.tolist(), pred.reference.tolist())
            row.update({f"{split}_per": round(s["per"], 3), f"{split}_wer": round(s["wer"], 3),
                        f"{split}_len_ratio": round(length_ratio(pred), 4)})
        rows.append(row)
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


def render_bank_card(card: dict, log: pd.DataFrame) -> str:
    cfg = card["config"]["replacing"]
    ladder = pd.DataFrame(card["ladders"])
    curve_cols = ["step", "seconds"] + [c for c in log.columns if c.startswith("dev_")]
    curve = log.dropna(subset=[c for c in curve_cols if c.startswith("dev_")][:1]) if len(curve_cols) > 2 else log.iloc[0:0]
    return f"""# mtlab module bank for the bundled teacher

Modules of granularities {cfg['granularities']} for both stacks of `data/teacher`, trained in ONE
module-replacing run with distillation (logit KD, hidden-state MSE at span boundaries, local span MSE).

- Teacher: `data/teacher` (weights hash `{card['teacher_hash']}`); the bank is refused for any other.
- Budget: {card['steps']:,} steps at batch {card['batch_size']} = {card['examples_seen']:,} examples,
  {card['train_seconds'] / 60:.1f} minutes on {card['machine']}.
- Reproduce: `{card['command']}` (resumable; `nohup make modules > runs/modules.log 2>&1 &`).
- Config: `{json.dumps(cfg)}`

## Every ladder rung, greedy decoding ({card['ladder_words']} words per split)

{ladder.to_markdown(index=False, floatfmt='.2f')}

## Learning curve (first {CURVE_WORDS} dev words: PER, WER in %, output/reference length)

{curve[[c for c in curve_cols if c in curve]].to_markdown(index=False, floatfmt='.3g')}
"""


def load_bank(cfg: ReplacingConfig, teacher, path: str | Path = BANK_DIR) -> tuple[ModuleBank, dict]:
    """The shipped bank, after `shipped.verify` (teacher hash, recipe, file hashes)."""
    card = verify(path, teacher_hash=teacher_hash(), config=bank_card_config(cfg), remake=BANK_COMMAND)
    return ModuleBank.load(Path(path) / "bank", teacher), card


__all__ = ["BANK_DIR", "bank_recipe", "curve_evaluator", "length_ratio", "load_bank", "train_bank"]
