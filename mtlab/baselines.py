"""Baselines measured on the same teacher: structural primitives shared by every baseline.

`drop_layers` is layer dropping / layer pruning (Sajjad et al.; the FF-merging paper's
baseline): the kept blocks are copied, renumbered and the config depth updated, so the
result is a plain model of the teacher's class.
"""
from __future__ import annotations

import copy
from typing import Iterable

from torch import nn

from .anatomy import anatomy, set_stack_layers


def drop_layers(model: nn.Module, drop: dict[str, Iterable[int]]) -> nn.Module:
    """A copy of `model` without the given layers, e.g. {"decoder": [4, 5]}.

    Raises ValueError naming the problem for unknown stacks, out-of-range or duplicate
    indices, or a stack left empty. The input model is never modified."""
    ana = anatomy(model)
    plan = {}
    for stack, idx in drop.items():
        st = ana.stack(stack)
        idx = list(idx)
        n = len(st)
        bad = [i for i in idx if not 0 <= i < n]
        if bad:
            raise ValueError(f"{stack}: layers {bad} out of range: valid layers are 0-{n - 1}")
        if len(set(idx)) != len(idx):
            raise ValueError(f"{stack}: duplicate layers in {idx}")
        if len(set(idx)) >= n:
            raise ValueError(f"{stack}: dropping {sorted(idx)} would leave no layer; keep at least one")
        plan[stack] = sorted(set(idx))
    out = copy.deepcopy(model)
    out_ana = anatomy(out)
    for stack, idx in plan.items():
        layers = out_ana.stack(stack).layers
        kept = [layers[i] for i in range(len(layers)) if i not in idx]
        if 0 in idx and len(kept):
            _hand_over_first_block_state(layers[0], kept[0])
        set_stack_layers(out, stack, kept)
    return out


def _hand_over_first_block_state(first: nn.Module, new_first: nn.Module) -> None:
    """Some families keep stack-wide state in block 0 (T5's relative position bias). When block 0
    is dropped, the new first block must own it: copy block 0's extra submodules and flags over."""
    extra = set(dict(first.named_parameters())) - set(dict(new_first.named_parameters()))
    if not extra:
        return
    for name in sorted({n.rsplit(".", 1)[0] for n in extra}):
        parent_name, _, attr = name.rpartition(".")
        src_parent = first.get_submodule(parent_name) if parent_name else first
        dst_parent = new_first.get_submodule(parent_name) if parent_name else new_first
        setattr(dst_parent, attr, copy.deepcopy(getattr(src_parent, attr)))
        for flag, value in vars(src_parent).items():  # e.g. has_relative_attention_bias
            if isinstance(value, bool) and getattr(dst_parent, flag, None) is not value:
                setattr(dst_parent, flag, value)
