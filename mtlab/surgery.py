"""Layer surgery: replace, drop, tie and swap the blocks of a model's stacks.

Every change of which blocks a stack runs goes through here, built on the one primitive
`mtlab.anatomy.set_stack_layers` (which knows where a stack lives). Permanent changes
(`replace_blocks`, `drop_blocks`) renumber the blocks and write the new depth to the
config; transient ones (`swapped`, `Swapper`) install a block list for the length of a
`with` and always put the stack's original ModuleList back, also when the body raises.

    from mtlab.surgery import drop_blocks, swapped, span_block
    small = drop_blocks(model, {"decoder": [4, 5]})          # a copy, model untouched
    with swapped(model, {"decoder": [b0, b1, b2]}):          # run model with other blocks
        out = model(**inputs)
"""
from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager

from torch import nn

from .anatomy import anatomy, in_features, set_stack_layers

__all__ = ["stack_depths", "stack_blocks", "replace_blocks", "drop_blocks", "hand_over_first_block_state",
           "tie_params", "Swapper", "swapped", "span_block"]


def stack_depths(model: nn.Module) -> dict[str, int]:
    """Number of blocks of each stack, e.g. {"encoder": 6, "decoder": 6}."""
    return {s: len(st) for s, st in anatomy(model).stacks.items()}


def stack_blocks(model: nn.Module) -> dict[str, list[nn.Module]]:
    """The block objects of each stack, bottom first (a list per stack, not a copy of the blocks)."""
    return {s: list(st.layers) for s, st in anatomy(model).stacks.items()}


def replace_blocks(model: nn.Module, stack: str, blocks: Sequence[nn.Module]) -> None:
    """Make `blocks` the stack's blocks for good: renumbered, config depth updated (in place).

    Refuses a stack with FF merges recorded in `config.mtlab_merges`: the new blocks are arbitrary,
    so the record could not say which of them are tied (assemble first, then merge)."""
    merged = [m for m in _recorded_merges(model) if m.stack == stack]
    if merged:
        raise ValueError(f"{stack}: cannot replace the blocks of a stack with FF merges recorded "
                         f"({', '.join(map(str, merged))}): the record would name the wrong layers. Replace "
                         "(assemble) the blocks of the unmerged model first, then merge (a CompressionSpec "
                         "'PLAN + EDITS' does it in that order)")
    set_stack_layers(model, stack, list(blocks))


def span_block(originals: Mapping[str, Sequence[nn.Module]], bank, stack: str, start: int, k: int) -> nn.Module:
    """The block that runs span (stack, start, k) of a plan: the original layer `start` for k = 1,
    else the bank's module replacing layers start..start+k-1 (`bank.get(stack, k, start // k)`)."""
    if k == 1:
        return originals[stack][start]
    if bank is None:
        raise ValueError(f"{stack}: span of {k} layers at {start} needs a trained module, but no bank was given; "
                         "pass the ModuleBank (or use a plan of original layers only)")
    return bank.get(stack, k, start // k)


def drop_blocks(model: nn.Module, drop: Mapping[str, Iterable[int]], *, inplace: bool = False) -> nn.Module:
    """A copy of `model` without the given layers, e.g. {"decoder": [4, 5]}; every index refers to
    `model`'s own layers (all drops happen at once).

    FF merges recorded in `config.mtlab_merges` (which `save_merged`/`load_merged` replay) are
    renumbered to the kept layers; a set that loses layers keeps its survivors tied (still one
    Parameter per projection) and is forgotten once fewer than two remain.
    Raises ValueError naming the problem for unknown stacks, out-of-range or duplicate
    indices, or a stack left empty, before anything changes. The input model is never modified,
    unless `inplace` (for a copy the caller owns): then it is cut and returned."""
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
    out = model if inplace else copy.deepcopy(model)
    out_ana = anatomy(out)
    for stack, idx in plan.items():
        layers = out_ana.stack(stack).layers
        kept = [layers[i] for i in range(len(layers)) if i not in idx]
        if 0 in idx and len(kept):
            hand_over_first_block_state(layers[0], kept[0])
        set_stack_layers(out, stack, kept)
        _renumber_merges(out, stack, [i for i in range(len(layers)) if i not in idx])
    return out


def _recorded_merges(model: nn.Module) -> list:
    from .merging.spec import MergeSpec  # lazy: mtlab.merging builds on this module

    return [MergeSpec.parse(s) for s in getattr(getattr(model, "config", None), "mtlab_merges", None) or []]


def _renumber_merges(model: nn.Module, stack: str, kept: Sequence[int]) -> None:
    """Rewrite `config.mtlab_merges` after the blocks `kept` (old indices, in order) became the stack."""
    from dataclasses import replace

    specs = _recorded_merges(model)
    if not any(s.stack == stack for s in specs):
        return
    new_index = {old: new for new, old in enumerate(kept)}
    out = []
    for spec in specs:
        if spec.stack != stack:
            out.append(spec)
            continue
        layers = tuple(new_index[i] for i in spec.layers if i in new_index)
        if len(layers) < 2:  # one survivor (or none) keeps the merged weights, untied to nothing
            if layers:  # a lone survivor's low-rank delta becomes its own weight: nothing left to replay
                from .merging.lowrank import fold_deltas  # lazy: mtlab.merging builds on this module

                fold_deltas(anatomy(model).stack(stack).layers[layers[0]])
            continue
        if len(layers) == len(spec.layers):  # the whole set kept: order is kept, so first/middle/last hold
            anchor = new_index[spec.anchor] if isinstance(spec.anchor, int) else spec.anchor
        else:  # the set lost layers: name the anchor (any survivor shares the tied Parameters)
            anchor = new_index.get(spec.anchor_layer(), layers[0])
        out.append(replace(spec, layers=layers, anchor=anchor))
    model.config.mtlab_merges = [str(s) for s in out]


def _extra_submodules(first: nn.Module, new_first: nn.Module) -> list[str]:
    """Names of the submodules holding parameters that block 0 has and `new_first` lacks."""
    extra = set(dict(first.named_parameters())) - set(dict(new_first.named_parameters()))
    return sorted({n.rsplit(".", 1)[0] for n in extra})


def hand_over_first_block_state(first: nn.Module, new_first: nn.Module) -> None:
    """Some families keep stack-wide state in block 0 (T5's relative position bias). When block 0
    is dropped, the new first block must own it: copy block 0's extra submodules and flags over."""
    for name in _extra_submodules(first, new_first):
        parent_name, _, attr = name.rpartition(".")
        src_parent = first.get_submodule(parent_name) if parent_name else first
        dst_parent = new_first.get_submodule(parent_name) if parent_name else new_first
        setattr(dst_parent, attr, copy.deepcopy(getattr(src_parent, attr)))
        for flag, value in vars(src_parent).items():  # e.g. has_relative_attention_bias
            if isinstance(value, bool) and getattr(dst_parent, flag, None) is not value:
                setattr(dst_parent, flag, value)


_MISSING = object()


@contextmanager
def first_block_state_lent(first: nn.Module, new_first: nn.Module) -> Iterator[None]:
    """Transient `hand_over_first_block_state`: block 0's extra submodules are SHARED with the new
    first block, not copied (training updates block 0's own state); undone on exit."""
    undo = []
    try:
        for name in _extra_submodules(first, new_first):
            parent_name, _, attr = name.rpartition(".")
            src_parent = first.get_submodule(parent_name) if parent_name else first
            dst_parent = new_first.get_submodule(parent_name) if parent_name else new_first
            old = dst_parent._modules.get(attr, _MISSING)
            setattr(dst_parent, attr, getattr(src_parent, attr))
            undo.append(lambda p=dst_parent, a=attr, o=old: delattr(p, a) if o is _MISSING else setattr(p, a, o))
            for flag, value in vars(src_parent).items():
                if flag != "training" and isinstance(value, bool) and getattr(dst_parent, flag, None) is not value:
                    prev = getattr(dst_parent, flag, _MISSING)
                    setattr(dst_parent, flag, value)
                    undo.append(lambda p=dst_parent, f=flag, o=prev: delattr(p, f) if o is _MISSING else setattr(p, f, o))
        yield
    finally:
        for f in reversed(undo):
            f()


def tie_params(dst: nn.Module, src: nn.Module) -> None:
    """Make projection `dst` use `src`'s weight and bias Parameter objects (both nn.Linear or
    GPT-2 Conv1D): one stored copy, counted once, trained once."""
    in_features(dst), in_features(src)  # type check: nn.Linear or Conv1D
    dst.weight = src.weight
    if getattr(src, "bias", None) is not None:
        dst.bias = src.bias


class Swapper:
    """Installs temporary block lists in a model's stacks and puts the original ModuleList back.

    The stacks' locations are looked up once, so a swap costs two setattr calls (screening
    swaps thousands of times). Blocks may be any modules, e.g. stand-ins that record their
    inputs; the config and the blocks' `layer_idx` are left alone."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.where = {}
        for s, st in anatomy(model).stacks.items():
            parent_path, _, attr = st.path.rpartition(".")
            self.where[s] = (model.get_submodule(parent_path) if parent_path else model, attr)

    @contextmanager
    def __call__(self, stack: str, blocks: Sequence[nn.Module]) -> Iterator[None]:
        if stack not in self.where:
            raise KeyError(f"no stack {stack!r}; valid: {list(self.where)}")
        parent, attr = self.where[stack]
        old = getattr(parent, attr)
        setattr(parent, attr, nn.ModuleList(blocks))
        try:
            yield
        finally:
            setattr(parent, attr, old)

    @contextmanager
    def many(self, blocks: Mapping[str, Sequence[nn.Module]]) -> Iterator[None]:
        """Swap several stacks at once; all are restored on exit."""
        with ExitStack() as stack:
            for s, b in blocks.items():
                stack.enter_context(self(s, b))
            yield


@contextmanager
def swapped(model: nn.Module, blocks: Mapping[str, Sequence[nn.Module]]) -> Iterator[nn.Module]:
    """Run `model` with other blocks in the named stacks (same objects, no copy: gradients reach
    them); the original stacks are back on exit, whatever happens inside."""
    for s, b in blocks.items():
        if not len(b):
            raise ValueError(f"{s}: a stack needs at least one block")
    with Swapper(model).many(blocks):
        yield model
