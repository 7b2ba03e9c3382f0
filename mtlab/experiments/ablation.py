"""Which change to the module-replacing recipe moves quality: one row per variant, one budget.

Each variant is a registered function that edits the shipped recipe (`bank_recipe`); every
variant is trained with the same steps and batch (in the artifact cache, resumable) and its
assemblies are decoded on the same dev words at 1.1x, 1.5x, 2x, 3x and 6x, with the
output/reference length ratio at 6x, where a collapsing decoder shows first. `make ablation`
writes the table to data/ablation/modular_ablation.csv (`write_rows` merges new rows into it:
`mtlab ablation --only NAME` adds or replaces that variant's row and keeps the others); the
report copies it to reports/modular_ablation.csv.

Each row records its seed, the device it trained on and its step cost (`sec_per_step`), so a
variant that costs more per step (several plans per step) can be compared at equal wall time:
`equal_time_steps` gives the steps that cost what the reference's run cost.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

import pandas as pd
from tqdm.auto import tqdm

from ..cache import artifact_dir, cached_frame, teacher_hash
from ..modular import ReplacingConfig, assemble, train_modules
from ..tasks.diagnosis import score_splits
from ..teacher import ROOT, load_teacher
from .artifacts import bank_recipe

ABLATION_CSV = ROOT / "data" / "ablation" / "modular_ablation.csv"
PLANS = {"1.1x": "e=111111 d=11112", "1.5x": "e=1122 d=1122", "2x": "e=222 d=222", "3x": "e=33 d=33", "6x": "e=6 d=6"}
#: the columns that name a row: a rerun with the same values replaces it, any other is appended
ROW_ID = ["variant", "steps", "batch_size", "words", "seed", "device"]
DEVICES = ("cpu", "cuda")
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


# ---- plan-aware sampling (issue #25): which plans a step trains; see modular.replacing.SAMPLERS ----

@variant("ladder_plans")
def _ladder_plans(cfg):
    """Every step one plan drawn uniformly from the size-first and speed-first ladders (no teacher)."""
    return cfg.with_sampling("ladder")


@variant("space_uniform")
def _space_uniform(cfg):
    """Every step one plan drawn uniformly from the whole assembly space (no teacher)."""
    return cfg.with_sampling("space")


@variant("sandwich")
def _sandwich(cfg):
    """Every step three plans, losses summed: the most compressed, a ladder rung, a granular draw."""
    return cfg.with_sampling("sandwich")


@variant("mix_ladder")
def _mix_ladder(cfg):
    """Every step two plans, losses summed: the recipe's granular draw AND a ladder rung."""
    return cfg.with_sampling("mix")


@variant("ladder_final_phase")
def _ladder_final(cfg):
    """The recipe, then the last 20% of the steps on ladder rungs (one per step)."""
    return cfg.with_sampling("ladder_final", final_phase=0.2)


def resolve_device(device: str | None) -> str:
    """"cpu" or "cuda" (None: cuda when available); asking for cuda without it is an error."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in DEVICES:
        raise ValueError(f"device {device!r} is unknown: use one of {DEVICES}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for, but torch sees no CUDA device here (torch.cuda.is_available() "
                         "is False): use --device cpu, or run on a machine with a GPU and a CUDA build of torch")
    return device


@contextmanager
def training_device(device: str):
    """Training (mtlab.train, through accelerate) on `device`: ACCELERATE_USE_CPU set for "cpu",
    unset for "cuda", restored afterwards."""
    old = os.environ.get("ACCELERATE_USE_CPU")
    if device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "1"
    else:
        os.environ.pop("ACCELERATE_USE_CPU", None)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("ACCELERATE_USE_CPU", None)
        else:
            os.environ["ACCELERATE_USE_CPU"] = old


def variant_config(name: str, steps: int, batch_size: int, seed: int = 0) -> ReplacingConfig:
    """The recipe of a registered variant at this budget and seed."""
    if name not in VARIANTS:
        raise ValueError(f"unknown recipe variant {name!r}: registered are {sorted(VARIANTS)}")
    cfg = VARIANTS[name](bank_recipe(steps, batch_size, eval_every=0))
    return replace(cfg, train=replace(cfg.train, seed=seed))


def variant_row(name: str, steps: int, batch_size: int, words: int, progress: bool = True, *, seed: int = 0,
                device: str | None = None) -> pd.DataFrame:
    """Train one variant (cached, on `device`, with `seed`) and score its assemblies on the first
    `words` dev words."""
    device = resolve_device(device)
    cfg = variant_config(name, steps, batch_size, seed)
    key = {"teacher": teacher_hash(), "replacing": asdict(cfg), "words": words, "plans": PLANS, "device": device}

    def compute() -> pd.DataFrame:
        teacher, task = load_teacher()
        # a CPU run keeps the cache folder it always had; a GPU run (other numerics) gets its own
        d = artifact_dir("modules", {"teacher": key["teacher"], "replacing": key["replacing"],
                                     **({"device": device} if device != "cpu" else {})})
        with training_device(device):
            bank, log = train_modules(teacher, task, cfg, d, progress=progress)
        used = next(bank.parameters()).device.type
        if used != device:
            raise RuntimeError(f"variant {name!r} trained on {used}, not on the {device} asked for: accelerate was "
                               f"already set up for {used} in this process; run each device in its own process")
        bank.eval()
        seconds = float(log.seconds.max())
        row = {"variant": name, "steps": steps, "batch_size": batch_size, "words": words, "seed": seed,
               "device": device, "train_seconds": seconds, "sec_per_step": seconds / steps}
        for tag, plan in PLANS.items():
            s = score_splits(assemble(teacher, bank, plan), task, ("dev",), limit=words)
            row.update({f"dev_per_{tag}": s["dev_per"], f"dev_wer_{tag}": s["dev_wer"]})
            if tag == "6x":
                row.update(len_ratio_6x=s["dev_len_ratio"], eos_rate_6x=s["dev_eos_rate"], loops_6x=s["dev_loops"])
        return pd.DataFrame([row])

    return cached_frame("ablation_row", key, compute)


def ablation_table(steps: int = 3000, batch_size: int = 64, words: int = 1000, variants=None,
                   progress: bool = True, *, seed: int = 0, device: str | None = None,
                   equal_time: bool = False, csv: str | Path | None = None, skip_done: bool = False) -> pd.DataFrame:
    """One row per recipe variant (all registered ones by default), same budget for each.

    `equal_time`: each variant instead trains for the steps that cost the reference recipe's
    `steps`-step run on this device (`equal_time_steps`, from the rows in `csv`, default the
    shipped table: both full-budget rows must be there). `skip_done`: leave out the variants that
    already have a row of this budget, seed and device in `csv` (what `make ablation` does, so a
    rerun only trains new variants); the table may then be empty."""
    names = list(variants or VARIANTS)
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        raise ValueError(f"unknown recipe variant(s) {unknown}: registered are {sorted(VARIANTS)}")
    device = resolve_device(device)
    if equal_time:
        done = read_rows(csv or ABLATION_CSV)
        budgets = {n: equal_time_steps(done, n, steps, batch_size=batch_size, words=words, device=device)
                   for n in names}
    else:
        budgets = dict.fromkeys(names, steps)
    if skip_done:
        done = read_rows(csv or ABLATION_CSV)
        have = set(map(tuple, done[ROW_ID].astype(str).values))
        names = [n for n in names if tuple(map(str, (n, budgets[n], batch_size, words, seed, device))) not in have]
    rows = [variant_row(n, budgets[n], batch_size, words, progress, seed=seed, device=device)
            for n in tqdm(names, desc="ablation", disable=not progress)]
    df = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=ROW_ID)
    df.attrs["config"] = {"steps": steps, "batch_size": batch_size, "words": words, "plans": PLANS, "seed": seed,
                          "device": device, "equal_time": equal_time}
    return df


def equal_time_steps(table: pd.DataFrame, name: str, steps: int = 3000, reference: str = "recipe", *,
                     batch_size: int = 64, words: int = 1000, device: str = "cpu") -> int:
    """The steps of `name` that cost what `reference`'s `steps`-step run cost (mean seconds per
    step of their rows at that budget on `device`, over seeds)."""
    def cost(n: str) -> float:
        at = table[(table.variant == n) & (table.steps == steps) & (table.batch_size == batch_size)
                   & (table.words == words) & (table.device == device)]
        if not len(at) or at.sec_per_step.isna().all():
            raise ValueError(f"no {steps}-step row of {n!r} on {device} (batch {batch_size}, {words} words) to read "
                             f"its step cost from: run `mtlab ablation --only {n} --steps {steps} --device {device}` "
                             "first")
        return float(at.sec_per_step.mean())

    return max(1, int(round(steps * cost(reference) / cost(name))))


def step_costs(names=None, batch_size: int = 64, step: int = 2900, steps: int = 3000, min_run_time: float = 3.0,
               device: str | None = None) -> pd.DataFrame:
    """Seconds per training step (loss, backward) of each variant's loss at step `step` of a
    `steps`-step run, all measured in ONE process on the same batches, one after another
    (torch.utils.benchmark), with the ratio to the recipe's: the step cost without the noise of
    runs made at different times on a shared machine. Untrained modules: the cost, not the quality."""
    import torch
    from torch.utils import benchmark

    from ..modular import ModuleBank
    from ..modular.replacing import Replacer, replacing_loss

    names = list(names or VARIANTS)
    device = resolve_device(device)
    teacher, task = load_teacher()
    teacher.to(device)
    batches = [task.collate("train", i).to(device) for i in task.batches("train", batch_size, shuffle=True)[:8]]
    rows = []
    for name in ["recipe"] + [n for n in names if n != "recipe"]:
        cfg = variant_config(name, steps, batch_size)
        model = Replacer(teacher, ModuleBank.build(teacher, cfg.granularities, cfg.init).to(device))
        fn, state = replacing_loss(cfg, cfg.train.seed), {"i": 0}

        def run(model=model, fn=fn, state=state):
            b = batches[state["i"] % len(batches)]
            state["i"] += 1
            loss, _ = fn(model, b, step)
            loss.backward()
            model.bank.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()

        t = benchmark.Timer("run()", globals={"run": run}, num_threads=torch.get_num_threads())
        rows.append({"variant": name, "device": device, "batch_size": batch_size, "step": step,
                     "sec_per_step": t.blocked_autorange(min_run_time=min_run_time).median})
    df = pd.DataFrame(rows)
    df["vs_recipe"] = df.sec_per_step / df.sec_per_step.iloc[0]
    return df


def read_rows(path: str | Path = ABLATION_CSV) -> pd.DataFrame:
    """The ablation table on disk (empty if none), rows from before the seed, device and step-cost
    columns completed: seed 0 and the CPU (the shipped rows were trained on the 2-core machine),
    sec_per_step = train_seconds / steps."""
    path = Path(path)
    if not path.exists() or not path.stat().st_size:
        return pd.DataFrame(columns=ROW_ID)
    df = pd.read_csv(path)
    for col, value in (("seed", 0), ("device", "cpu")):
        df[col] = df[col].fillna(value) if col in df else value
    df["seed"] = df.seed.astype(int)
    per = df.train_seconds / df.steps
    df["sec_per_step"] = df.sec_per_step.fillna(per) if "sec_per_step" in df else per
    return df


def order_columns(df: pd.DataFrame) -> pd.DataFrame:
    lead = ROW_ID + ["train_seconds", "sec_per_step"]
    scores = [f"dev_{m}_{tag}" for tag in PLANS for m in ("per", "wer")] + ["len_ratio_6x", "eos_rate_6x", "loops_6x"]
    cols = [c for c in lead + scores if c in df] + [c for c in df if c not in lead + scores]
    return df[cols]


def write_rows(rows: pd.DataFrame, path: str | Path = ABLATION_CSV) -> pd.DataFrame:
    """Merge `rows` into the table at `path` (atomically): a row with the same `ROW_ID` values is
    replaced, any other appended; every other row is kept. Returns the whole table."""
    path = Path(path)
    old = read_rows(path)
    new = rows.copy()
    for col, value in (("seed", 0), ("device", "cpu")):
        if col not in new:
            new[col] = value
    if len(old):
        ids = set(map(tuple, new[ROW_ID].astype(str).values))
        old = old[[tuple(r) not in ids for r in old[ROW_ID].astype(str).values]]
    out = order_columns(pd.concat([old, new], ignore_index=True) if len(old) else new.reset_index(drop=True))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    out.to_csv(tmp, index=False)
    tmp.replace(path)
    return out


__all__ = ["ABLATION_CSV", "DEVICES", "PLANS", "ROW_ID", "VARIANTS", "ablation_table", "equal_time_steps", "read_rows",
           "resolve_device", "step_costs", "variant", "variant_config", "variant_row", "write_rows"]
