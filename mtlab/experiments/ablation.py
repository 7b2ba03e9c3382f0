"""Which change to the module-replacing recipe moves quality: one row per variant, one budget.

Each variant is a registered function that edits the shipped recipe (`bank_recipe`); every
variant is trained with the same steps and batch (in the artifact cache, resumable) and its
assemblies are decoded on the same dev words at 1.5x, 2x, 3x and 6x, with the output/reference
length ratio at 6x, where a collapsing decoder shows first. `make ablation` writes the table to
data/ablation/modular_ablation.csv; the report copies it to reports/modular_ablation.csv.
"""
from __future__ import annotations

from dataclasses import asdict, replace
from typing import Callable

import pandas as pd
from tqdm.auto import tqdm

from ..cache import artifact_dir, cached_frame, teacher_hash
from ..modular import ReplacingConfig, assemble, train_modules
from ..tasks.diagnosis import score_splits
from ..teacher import ROOT, load_teacher
from .artifacts import bank_recipe

ABLATION_CSV = ROOT / "data" / "ablation" / "modular_ablation.csv"
PLANS = {"1.5x": "e=1122 d=1122", "2x": "e=222 d=222", "3x": "e=33 d=33", "6x": "e=6 d=6"}
VARIANTS: dict[str, Callable[[ReplacingConfig], ReplacingConfig]] = {}


def variant(name: str):
    """Register a recipe variant: a function from the shipped recipe to the changed one."""
    def register(fn):
        if name in VARIANTS:
            raise ValueError(f"recipe variant {name!r} is already registered")
        VARIANTS[name] = fn
        return fn
    return register


@variant("recipe")
def _recipe(cfg):
    return cfg


@variant("no_local_loss")
def _no_local(cfg):
    return replace(cfg, w_local=0.0)


@variant("no_hidden_loss")
def _no_hidden(cfg):
    return replace(cfg, w_hidden=0.0)


@variant("half_run_at_p1")
def _long_p1(cfg):
    return replace(cfg, ramp=0.5)


@variant("init_first_layer")
def _init_first(cfg):
    return replace(cfg, init="first")


@variant("kd_temperature_1")
def _t1(cfg):
    return replace(cfg, temperature=1.0)


def variant_row(name: str, steps: int, batch_size: int, words: int, progress: bool = True) -> pd.DataFrame:
    """Train one variant (cached) and score its assemblies on the first `words` dev words."""
    cfg = VARIANTS[name](bank_recipe(steps, batch_size, eval_every=0))
    key = {"teacher": teacher_hash(), "replacing": asdict(cfg), "words": words, "plans": PLANS}

    def compute() -> pd.DataFrame:
        teacher, task = load_teacher()
        d = artifact_dir("modules", {"teacher": key["teacher"], "replacing": key["replacing"]})
        bank, log = train_modules(teacher, task, cfg, d, progress=progress)
        bank.eval()
        row = {"variant": name, "steps": steps, "batch_size": batch_size, "words": words,
               "train_seconds": float(log.seconds.max())}
        for tag, plan in PLANS.items():
            s = score_splits(assemble(teacher, bank, plan), task, ("dev",), limit=words)
            row.update({f"dev_per_{tag}": s["dev_per"], f"dev_wer_{tag}": s["dev_wer"]})
            if tag == "6x":
                row.update(len_ratio_6x=s["dev_len_ratio"], eos_rate_6x=s["dev_eos_rate"], loops_6x=s["dev_loops"])
        return pd.DataFrame([row])

    return cached_frame("ablation_row", key, compute)


def ablation_table(steps: int = 3000, batch_size: int = 64, words: int = 1000, variants=None,
                   progress: bool = True) -> pd.DataFrame:
    """One row per recipe variant (all registered ones by default), same budget for each."""
    names = list(variants or VARIANTS)
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        raise ValueError(f"unknown recipe variant(s) {unknown}: registered are {sorted(VARIANTS)}")
    rows = [variant_row(n, steps, batch_size, words, progress) for n in tqdm(names, desc="ablation", disable=not progress)]
    df = pd.concat(rows, ignore_index=True)
    df.attrs["config"] = {"steps": steps, "batch_size": batch_size, "words": words, "plans": PLANS}
    return df


__all__ = ["ABLATION_CSV", "PLANS", "VARIANTS", "ablation_table", "variant", "variant_row"]
