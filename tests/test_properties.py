"""Property tests (hypothesis) on tiny random models of every registered family: a random plan or
merge spec either builds a model that runs and has the promised parameter count, or raises a
ValueError naming the problem; never another exception, never a changed model after an error."""
from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_anatomy import CASES

from mtlab.anatomy import anatomy
from mtlab.merging.merge import merge_ffs
from mtlab.modular import ModuleBank, assemble, tilings
from mtlab.modular.bank import block_params

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
MERGE_FAMILIES = ["t5", "t5-gated", "bart", "marian", "gpt2", "bert", "vit", "llama"]
PLAN_FAMILIES = ["t5", "bart", "gpt2", "llama"]


@functools.lru_cache(maxsize=None)
def _model(case: str):
    torch.manual_seed(0)
    return CASES[case][0]().eval()


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _run(model, case):
    with torch.no_grad():
        return model(**CASES[case][1])[0]


def _ff_numel(model, stack: str) -> int:
    return sum(p.numel() for p in anatomy(model).stack(stack).layer(0).ff.params())


def _build_or_refuse(build, model):
    """build() -> the built model, or None after a ValueError that names the problem and left
    `model` exactly as it was."""
    before = _state(model)
    try:
        out = build()
    except ValueError as e:
        event("refused")
        assert str(e)  # names the problem
        after = model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before), "model changed after an error"
        return None
    event("built")
    return out


@pytest.mark.parametrize("case", MERGE_FAMILIES)
@SETTINGS
@given(data=st.data())
def test_random_merge_specs_build_or_raise_value_error(case, data):
    import copy

    base = _model(case)
    stacks = {s: len(v) for s, v in anatomy(base).stacks.items()}
    if data.draw(st.booleans()):  # a valid window, half of the time
        stack = data.draw(st.sampled_from(sorted(stacks)))
        k = data.draw(st.integers(2, stacks[stack]))
        start = data.draw(st.integers(0, stacks[stack] - k))
        layers, anchor = list(range(start, start + k)), data.draw(st.sampled_from(["first", "middle", "last"]))
    else:  # anything: out of range, one layer, duplicates, unknown stack or anchor
        stack = data.draw(st.sampled_from(sorted(stacks) + ["nowhere"]))
        depth = stacks.get(stack, 2)
        layers = data.draw(st.lists(st.integers(-1, depth + 1), min_size=1, max_size=depth + 1))
        anchor = data.draw(st.sampled_from(["first", "middle", "last", "sideways"]))
    text = f"{stack}:{','.join(map(str, layers))}@{anchor}/vanilla"
    model = copy.deepcopy(base)
    n_before = sum(p.numel() for p in model.parameters())
    merged = _build_or_refuse(lambda: merge_ffs(model, [text]), model)
    if merged is None:
        return
    k = len(set(layers))
    assert sum(p.numel() for p in merged.parameters()) == n_before - (k - 1) * _ff_numel(base, stack)
    assert torch.isfinite(_run(merged, case)).all()


@pytest.mark.parametrize("case", PLAN_FAMILIES)
@SETTINGS
@given(data=st.data())
def test_random_plans_assemble_or_raise_value_error(case, data):
    teacher = _model(case)
    depths = {s: len(v) for s, v in anatomy(teacher).stacks.items()}
    bank = _bank(case)
    if data.draw(st.booleans()):  # a valid tiling of every stack, half of the time
        spans = {s: list(data.draw(st.sampled_from(tilings(n, bank.granularities[s])))) for s, n in depths.items()}
    else:  # anything: gaps, overlaps, misaligned or untrained spans, zero
        spans = {s: data.draw(st.lists(st.integers(0, n + 1), min_size=1, max_size=n + 1)) for s, n in depths.items()}
    text = " ".join(f"{s}={','.join(map(str, v))}" for s, v in spans.items())
    model = _build_or_refuse(lambda: assemble(teacher, bank, text), teacher)
    if model is None:
        return
    bp = block_params(teacher)
    removed = sum((sum(v) - len(v)) * bp[s] for s, v in spans.items())
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in teacher.parameters()) - removed
    assert torch.isfinite(_run(model, case)).all()


@functools.lru_cache(maxsize=None)
def _bank(case: str):
    teacher = _model(case)
    depths = {s: len(v) for s, v in anatomy(teacher).stacks.items()}
    return ModuleBank.build(teacher, {s: tuple(k for k in (2, 3) if k <= n) for s, n in depths.items()})
