"""Frontier search on assembly spaces too large to enumerate (`mtlab.explore.search`).

For each model, the search's screened quality-vs-cost frontier is compared with exhaustive
prefix-shared screening where that is feasible (frontier recall, hypervolume ratio, block
evaluations), and timed where it is not:

- `t5_6`: the bundled 6+6 teacher with the shipped module bank (196 plans);
- `t5_12`: a 12+12 tiny T5 (d_model 32) trained a few minutes on G2P with mtlab's training loop,
  and a bank {2,3,4,6,12} trained a few hundred steps (85,849 plans; exhaustive screening runs);
- `t5_24`: a 24+24 tiny T5 with random weights and an untrained bank {2,3,4,6,8,12}
  (8.3e9 plans; search only, timed).

Writes reports/explore_scale.csv (model, depth, plans, block_evals_search,
block_evals_exhaustive, frontier_recall, hypervolume_ratio, seconds, ...).

    .venv/bin/python benchmarks/explore_scale.py [--words 64] [--out reports] [--work runs/explore_scale]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch

from mtlab.explore.screen import screen
from mtlab.explore.search import compare_to_exhaustive, frontier_search
from mtlab.explore.space import AssemblySpace
from mtlab.modular import ModuleBank
from mtlab.teacher import TeacherConfig, build_teacher
from mtlab.train import TrainConfig, train


def tiny_t5(task, depth: int, seed: int = 0):
    torch.manual_seed(seed)
    return build_teacher(task.tokenizer, TeacherConfig(d_model=32, d_ff=64, num_heads=2, num_layers=depth,
                                                       num_decoder_layers=depth, dropout=0.0))


def trained_12(task, work: Path, teacher_steps: int, bank_steps: int):
    """A 12+12 tiny T5 and its bank, trained with mtlab's loops (resumable: a rerun loads them)."""
    from mtlab.modular.replacing import ReplacingConfig, train_modules

    teacher = tiny_t5(task, 12)
    train(teacher, task, TrainConfig(steps=teacher_steps, batch_size=64, lr=2e-3, warmup=100, ckpt_every=250,
                                     log_every=100), work / "teacher12", progress=False)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    cfg = ReplacingConfig(granularities=(2, 3, 4, 6, 12), train=TrainConfig(
        steps=bank_steps, batch_size=32, lr=1e-3, warmup=30, ckpt_every=100, log_every=50))
    bank, _ = train_modules(teacher, task, cfg, work / "bank12", progress=False)
    return teacher, bank.eval()


def bundled_6():
    from mtlab.modular.bank import ModuleBank as Bank
    from mtlab.shipped import load_shipped_bank  # noqa: F401  (shipped artifacts, when present)
    raise NotImplementedError


def row(name: str, teacher, bank, task, words: int, budget: int, exhaustive: bool) -> dict:
    space = AssemblySpace.of(teacher, bank)
    t0 = time.perf_counter()
    found = frontier_search(teacher, bank, task, budget=budget, limit=words, batch_size=words, progress=True)
    seconds = time.perf_counter() - t0
    out = {"model": name, "depth": space.depths["encoder"], "plans": len(space), "words": words, "budget": budget,
           "beam": found.attrs["beam"], "plans_screened": len(found),
           "block_evals_search": found.attrs["block_evals"],
           "block_evals_exhaustive": found.attrs["exhaustive_block_evals"],
           "frontier_recall": float("nan"), "hypervolume_ratio": float("nan"), "seconds": seconds,
           "seconds_exhaustive": float("nan")}
    if exhaustive:
        t0 = time.perf_counter()
        full = screen(teacher, bank, task, limit=words, batch_size=words, progress=True)
        out["seconds_exhaustive"] = time.perf_counter() - t0
        assert full.attrs["block_evals"] == out["block_evals_exhaustive"]
        cmp = compare_to_exhaustive(found, full)
        out.update(frontier_recall=cmp["frontier_recall"], hypervolume_ratio=cmp["hypervolume_ratio"],
                   max_abs_diff=cmp["max_abs_diff"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--words", type=int, default=64, help="dev words screened (one batch)")
    ap.add_argument("--out", default="reports")
    ap.add_argument("--work", default="runs/explore_scale")
    ap.add_argument("--teacher-steps", type=int, default=1500)
    ap.add_argument("--bank-steps", type=int, default=300)
    ap.add_argument("--models", default="t5_6,t5_12,t5_24")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    raise SystemExit("unfinished")


if __name__ == "__main__":
    main()
