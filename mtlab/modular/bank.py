"""The module bank: every trained module, and assembling a plain HF model from a plan.

Module m(stack, k, j) is one block of the teacher's own layer class that replaces the
aligned span of teacher layers [j*k, (j+1)*k). Because modules are ordinary blocks, an
assembled model is an ordinary model of the teacher's class with fewer layers:
`save_pretrained` / `from_pretrained` work without mtlab.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Iterable, Mapping

import torch
from safetensors.torch import save_file
from torch import nn

from ..anatomy import anatomy
from ..measure import count_params, latency
from ..surgery import replace_blocks, span_block, stack_blocks, stack_depths
from ..checkpoint import CheckpointError, atomic_dir, load_tensors, write_json
from ..keys import weights_hash  # noqa: F401  (re-exported: callers read it from here)
from .plan import Plan, PlanError, ladders

INITS = ("first", "middle", "last")


depths = stack_depths  # kept for callers of mtlab.modular.bank.depths


def module_key(stack: str, k: int, j: int) -> str:
    return f"{stack}_k{k}_j{j}"


class ModuleBank(nn.Module):
    """Modules per (stack, granularity, span index), built from and trained against one teacher."""

    def __init__(self, blocks: Mapping[str, nn.Module], granularities: Mapping[str, tuple[int, ...]],
                 depths: Mapping[str, int], init: str = "first"):
        super().__init__()
        self.blocks = nn.ModuleDict(dict(blocks))
        self.granularities = {s: tuple(sorted(ks)) for s, ks in granularities.items()}
        self.depths = dict(depths)
        self.init = init

    @classmethod
    def build(cls, teacher: nn.Module, granularities: Iterable[int] | Mapping[str, Iterable[int]] = (2, 3, 6),
              init: str = "first") -> "ModuleBank":
        """One module per aligned span and granularity, initialised from a teacher layer of its span.

        A span starting at layer 0 copies the structure of block 0 (which in T5 owns the
        relative-position bias, so whatever block comes first in an assembly owns it), then
        takes the weights of its init layer."""
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        ana = anatomy(teacher)
        ks = granularities if isinstance(granularities, Mapping) else {s: tuple(granularities) for s in ana.stacks}
        blocks, kept = {}, {}
        for s, stack in ana.stacks.items():
            n = len(stack)
            kept[s] = tuple(sorted(k for k in ks.get(s, ()) if 2 <= k <= n))
            bad = [k for k in ks.get(s, ()) if not 2 <= k <= n]
            if bad:
                raise ValueError(f"{s}: granularities {bad} impossible for a {n}-layer stack (need 2 <= k <= {n})")
            for k in kept[s]:
                for j in range(n // k):
                    src = j * k + {"first": 0, "middle": (k - 1) // 2, "last": k - 1}[init]
                    block = copy.deepcopy(stack.layers[0] if j == 0 else stack.layers[src])
                    if j == 0 and src != 0:
                        block.load_state_dict(stack.layers[src].state_dict(), strict=False)
                    for p in block.parameters():
                        p.requires_grad_(True)
                    blocks[module_key(s, k, j)] = block
        return cls(blocks, kept, {s: len(st) for s, st in ana.stacks.items()}, init)

    def get(self, stack: str, k: int, j: int) -> nn.Module:
        key = module_key(stack, k, j)
        if key not in self.blocks:
            raise PlanError(f"no trained module for {stack} granularity {k} span {j}; "
                            f"trained granularities: {self.granularities.get(stack, ())}")
        return self.blocks[key]

    # ---- persistence: safetensors + JSON, atomic ------------------------------------------
    def save(self, path: str | Path, extra: dict | None = None, *, teacher: nn.Module | None = None) -> Path:
        """Write the modules and bank.json, with the hash of the teacher's weights (`teacher`, or the
        `teacher_hash` the bank was given by train_modules / load) so `load` refuses another teacher."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        digest = weights_hash(teacher) if teacher is not None else getattr(self, "teacher_hash", None)
        with atomic_dir(path) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()},
                      str(tmp / "modules.safetensors"))
            write_json(tmp / "bank.json", {"granularities": self.granularities, "depths": self.depths,
                                           "init": self.init, "keys": list(self.blocks),
                                           **({"teacher_hash": digest} if digest else {}), **(extra or {})})
        return path

    @classmethod
    def load(cls, path: str | Path, teacher: nn.Module) -> "ModuleBank":
        """Read a saved bank for `teacher`; CheckpointError if it was trained against another teacher
        (other stack depths, or other weights when the bank recorded their hash)."""
        path = Path(path)
        try:
            meta = json.loads((path / "bank.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}/bank.json is missing or unreadable ({e}); retrain the modules") from e
        if meta["depths"] != depths(teacher):
            raise CheckpointError(f"modules in {path} were trained for stacks {meta['depths']}, "
                                  f"but this teacher has {depths(teacher)}: they belong to another teacher")
        digest = weights_hash(teacher)
        if meta.get("teacher_hash") not in (None, digest):
            raise CheckpointError(f"modules in {path} were trained against a teacher with weights hash "
                                  f"{meta['teacher_hash']}, but this teacher's is {digest}: they belong to another "
                                  "teacher. Load the teacher they were trained for, or retrain the modules "
                                  "(mtlab.modular.train_modules) for this one")
        bank = cls.build(teacher, {s: tuple(v) for s, v in meta["granularities"].items()}, meta["init"])
        tensors = load_tensors(path / "modules.safetensors")
        try:
            bank.load_state_dict(tensors, strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"{path}/modules.safetensors does not fit this teacher ({str(e)[:200]})") from e
        bank.teacher_hash = digest
        return bank


def assemble(teacher: nn.Module, bank: ModuleBank | None, plan: Plan | str) -> nn.Module:
    """A new model of the teacher's class: each span of the plan becomes the original
    layer(s) or the trained module. The teacher and the bank are left untouched."""
    d = depths(teacher)
    plan = Plan.parse(plan, d) if isinstance(plan, str) else plan
    plan.validate(d, bank.granularities if bank is not None else {s: () for s in d})
    originals = stack_blocks(teacher)
    # copy the teacher without the stacks the plan replaces (each becomes an empty ModuleList, filled below)
    memo = {id(st.layers): nn.ModuleList() for s, st in anatomy(teacher).stacks.items() if s in plan.stacks}
    model = copy.deepcopy(teacher, memo)
    for s in plan.stacks:
        blocks = [copy.deepcopy(span_block(originals, bank, s, start, k)) for start, k in plan.blocks(s)]
        replace_blocks(model, s, blocks)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    return model


def block_params(model: nn.Module) -> dict[str, int]:
    """Parameters of one block of each stack (the cost of one span in an assembly)."""
    return {s: count_params(st.layers[-1]) for s, st in anatomy(model).stacks.items()}


def teacher_ladders(teacher: nn.Module, bank: ModuleBank) -> list[tuple[str, Plan]]:
    """(strategy, plan) of every registered assembly strategy for this teacher and bank, teacher first."""
    return ladders(stack_depths(teacher), bank.granularities, block_params(teacher))


def stack_block_flops(teacher: nn.Module, inputs: dict) -> dict[str, float]:
    """Mean FLOPs of one block of each stack in a teacher-forced forward (flop_counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    ana = anatomy(teacher)
    counter = FlopCounterMode(display=False, depth=None)
    with torch.no_grad(), counter:
        teacher(**inputs)
    counts = counter.get_flop_counts()
    out = {}
    for s, st in ana.stacks.items():
        per = [sum(v.values()) for k, v in counts.items()
               if k.rsplit(".", 1)[0].endswith(st.path) and k.rsplit(".", 1)[-1].isdigit()]
        out[s] = sum(per) / max(1, len(per))
    out["total"] = counter.get_total_flops()
    return out


def plan_stats(plan: Plan, teacher_params: int, bparams: Mapping[str, int], bflops: Mapping[str, float]) -> dict:
    """Parameters, compression ratios and FLOP-ideal speed-up of a plan, from per-block costs."""
    removed = {s: sum(v) - len(v) for s, v in plan.spans}
    params = teacher_params - sum(removed[s] * bparams[s] for s in removed)
    stack_full = sum(sum(v) * bparams[s] for s, v in plan.spans)
    stack_now = sum(len(v) * bparams[s] for s, v in plan.spans)
    flops = bflops["total"] - sum(removed[s] * bflops[s] for s in removed)
    return {"plan": str(plan), "params": params, "ratio": stack_full / stack_now,
            "ratio_model": teacher_params / params, "ideal_speedup": bflops["total"] / flops,
            "blocks": {s: len(v) for s, v in plan.spans}}


def plan_table(teacher: nn.Module, bank: ModuleBank | None, plans, task, *, measure: bool = False,
               batch_sizes=(1, 64), min_run_time: float = 0.5):
    """plan_stats of each plan (str or Plan) as a DataFrame; with `measure`, the measured greedy
    generation speed-up over the teacher at each batch size (`speedup_b{n}`), timed in one run."""
    import pandas as pd


    d = depths(teacher)
    plans = [Plan.parse(p, d) if isinstance(p, str) else p for p in plans]
    inputs = task.collate("dev", task.batches("dev", 64)[0]).model_inputs()
    costs, bparams = stack_block_flops(teacher, inputs), block_params(teacher)
    n = count_params(teacher)
    df = pd.DataFrame([plan_stats(p.validate(d, bank.granularities if bank else {}), n, bparams, costs)
                       for p in plans])
    if measure:
        models = {"teacher": teacher, **{str(p): assemble(teacher, bank, p) for p in plans}}
        lat = latency(models, task, batch_sizes=batch_sizes, min_run_time=min_run_time)
        for bs in batch_sizes:
            sp = lat[lat.batch_size == bs].set_index("model").speedup_vs_first
            df[f"speedup_b{bs}"] = df.plan.map(sp)
    return df
