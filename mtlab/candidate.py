"""What a compressed model is, how it is described, and what it cost: the one currency of the studies.

A compression is described by a typed spec, never by a hand-built string:

    Plan            "e=1122 d=33"                       an assembly (`mtlab.modular.plan`)
    MergeSpec       "encoder:3-5@middle/permute"        one tied FF merge (`mtlab.merging.spec`)
    PruneSpec       "prune decoder:3-5"                 one layer-pruning window
    CompressionSpec "e=222 d=222 + encoder:3-5@middle/permute; decoder:3-5@middle/permute"

`CompressionSpec` composes them: an optional plan first (assembled from a module bank), then
merges and prunings (edits, separated by "; "). `str` writes the canonical text and
`CompressionSpec.parse(str(s)) == s`. `apply(model, spec, ...)` is the one way to turn a spec
into a model, whatever its type.

Layer indices (docs/methods.md, "Combining edits"): every edit's indices refer to the model the
edits START from (the assembled model when there is a plan, else the model given), never to a
model an earlier edit left behind, so the edits' order does not matter: "prune encoder:0-1; prune
encoder:3-4" drops layers 1 and 4 of that model. All merges are aligned on that model, then the
windows' blocks are dropped at once and the merge record renumbered. Merge sets must be disjoint,
windows must be disjoint, and no layer may be both merged and dropped (ValueError otherwise).

A `Candidate` is one compressed model with its spec, the method that made it, its training
`Budget` and its provenance (shipped artifact, cache or a run just made); baseline recipes, the
modular and merging studies, the frontier, the explorers and the recipe CLI all pass Candidates,
and `Candidate.row()` is the one place their table columns come from.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Union

from torch import nn

from .merging.spec import MergeSpec, PruneSpec, candidate_spec
from .modular.plan import Plan, PlanError

Edit = Union[MergeSpec, PruneSpec]
Spec = Union[Plan, MergeSpec, PruneSpec, "CompressionSpec"]

__all__ = ["Budget", "Candidate", "CompressionSpec", "Edit", "Spec", "apply", "check_edits", "parse_spec"]

_JOIN = " + "   # between the plan and the edits
_SEP = "; "     # between edits


@dataclass(frozen=True)
class CompressionSpec:
    """An optional assembly `plan` followed by FF merges and layer prunings (`edits`); every edit's
    layer indices refer to the model the edits start from (the assembled model's blocks when there
    is a plan), whatever the edits' order (see the module docstring)."""
    plan: Plan | None = None
    edits: tuple[Edit, ...] = ()

    def __post_init__(self):
        edits = tuple(candidate_spec(e) for e in self.edits)
        object.__setattr__(self, "edits", edits)
        if self.plan is None and not edits:
            raise ValueError("an empty compression spec: give a plan (e.g. 'e=222 d=222'), edits "
                             "(e.g. 'encoder:3-5/permute'), or both joined by ' + '")

    @classmethod
    def parse(cls, text: str | Spec, depths=None) -> CompressionSpec:
        """Read "PLAN", "EDIT; EDIT" or "PLAN + EDIT; EDIT" (see the module docstring)."""
        if isinstance(text, CompressionSpec):
            return text
        if isinstance(text, Plan):
            return cls(text)
        if isinstance(text, (MergeSpec, PruneSpec)):
            return cls(None, (text,))
        head, plus, tail = str(text).partition(_JOIN.strip())
        if plus:
            return cls(Plan.parse(head.strip(), depths), _edits(tail))
        if "=" in head and ":" not in head:  # a plan alone: "e=222 d=33" or "layers=2211"
            return cls(Plan.parse(head.strip(), depths))
        return cls(None, _edits(head))

    def __str__(self) -> str:
        edits = _SEP.join(map(str, self.edits))
        if self.plan is None:
            return edits
        return str(self.plan) + (_JOIN + edits if edits else "")

    @property
    def merges(self) -> list[MergeSpec]:
        return [e for e in self.edits if isinstance(e, MergeSpec)]

    @property
    def prunes(self) -> list[PruneSpec]:
        return [e for e in self.edits if isinstance(e, PruneSpec)]

    def removed(self) -> tuple[int, int]:
        """(FF sublayers, blocks) that the edits remove (a plan's savings are counted in parameters)."""
        ff = sum(len(m.layers) - 1 for m in self.merges) + sum(p.size - 1 for p in self.prunes)
        return ff, sum(p.size - 1 for p in self.prunes)


def _edits(text: str) -> tuple[Edit, ...]:
    parts = [p.strip() for p in text.split(_SEP.strip()) if p.strip()]
    if not parts:
        raise ValueError(f"no edits in {text!r}: write merges and prunings separated by '; ', e.g. "
                         "'encoder:3-5/permute; prune decoder:3-5'")
    return tuple(candidate_spec(p) for p in parts)


def parse_spec(text: str | Spec, depths=None) -> Spec:
    """Any spec's text as its narrowest type: Plan, MergeSpec, PruneSpec or CompressionSpec."""
    if not isinstance(text, str):
        return text
    s = CompressionSpec.parse(text, depths)
    if s.plan is not None and not s.edits:
        return s.plan
    if s.plan is None and len(s.edits) == 1:
        return s.edits[0]
    return s


def apply(model: nn.Module, spec: str | Spec, *, bank=None, cache=None, batches_fn=None,
          max_tokens: int | None = 10_000) -> nn.Module:
    """A compressed COPY of `model` (untouched) described by `spec`: the plan assembled from `bank`,
    then the merges (aligned on `cache`, a `CorrelationCache` of the model they apply to, or on
    `batches_fn`) and the prunings. A merge after a plan aligns on the assembled model.

    Every edit names layers of the model the edits start from (the assembled one, or `model`), in
    any order: all edits are checked first (`check_edits`), the merges are made on that model, then
    every window's blocks are dropped at once (`prune_windows`), renumbering the merge record so that
    `save_merged`/`load_merged` and `export` tie the same layers."""
    from .merging.correlations import CorrelationCache
    from .merging.build import merge_model, prune_windows
    from .modular import assemble

    s = CompressionSpec.parse(spec)
    net = model
    if s.plan is not None:
        if bank is None and any(k > 1 for _, v in s.plan.spans for k in v):
            raise PlanError(f"plan {s.plan} uses modules: pass the module bank, apply(model, spec, bank=bank)")
        net = assemble(model, bank, s.plan)
        if s.merges and cache is not None and cache.model is model:
            cache = CorrelationCache(net, cache.batches_fn, max_tokens=cache.max_tokens)
    check_edits(net, s.edits)  # before any work: every edit names layers of `net`
    if s.merges:  # a copy of `model`; an assembly is already one, merged in place
        net = merge_model(net, s.merges, batches_fn, max_tokens, cache=cache, inplace=net is not model)
    if s.prunes:
        net = prune_windows(net, s.prunes, inplace=net is not model)
    return copy.deepcopy(model) if net is model else net


def check_edits(model: nn.Module, edits) -> None:
    """Check edits against the model they start from (every index is one of its layers): merges and
    pruning windows fit their stacks, merge sets are disjoint, windows are disjoint, and no layer is
    both in a merge set and dropped by a window. ValueError naming the edits and the fix."""
    from .merging.build import check_windows
    from .merging.merge import merged_specs, validate_specs

    edits = [candidate_spec(e) for e in edits]
    merges = validate_specs([e for e in edits if isinstance(e, MergeSpec)], model, existing=merged_specs(model))
    prunes = check_windows(model, [e for e in edits if isinstance(e, PruneSpec)])
    for p in prunes:
        for m in merges:
            both = sorted(set(m.layers) & set(p.dropped())) if m.stack == p.stack else []
            if both:
                raise ValueError(f"{p.stack} layer(s) {both} are both merged ('{m}') and dropped ('{p}'): every "
                                 "edit names layers of the model the edits start from, and a layer is either "
                                 "merged or dropped. Move the window or the merge set so they share no dropped layer "
                                 "(a window's first layer is kept and may be merged)")


@dataclass
class Budget:
    """Training that a candidate cost: runs (a run shared by several candidates counts once, on one
    of them), optimizer steps and wall seconds (None: not recorded, e.g. a run read from the cache)."""
    runs: int = 0
    steps: int = 0
    seconds: float | None = 0.0


@dataclass
class Candidate:
    """One compressed model and how it came to be.

    `spec`: its typed spec (a baseline's kept layers are text, e.g. "e=0,2,4 d=0,2,4");
    `method`: the registered method or baseline that made it ("modules", "sft", "permute", ...);
    `strategy`: the variant inside the method ("size_first", "alternate", ...); `provenance`:
    where the model came from ("shipped", "cache", "trained"); `budget` None: not accounted in this
    study (its table leaves the train_* columns empty); `scores`: dev_*/test_* numbers already
    measured on the same words (a shipped card's), so evaluation does not decode again;
    `info`: extra descriptive columns of a study (kept in its table); `note`: why `model` is None."""
    method: str
    spec: Any
    model: nn.Module | None = None
    strategy: str = ""
    budget: Budget | None = None
    provenance: str = "trained"
    scores: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    note: str = ""

    @property
    def label(self) -> str:
        """The spec's text: the `plan` column of the tables."""
        return str(self.spec)

    def row(self) -> dict:
        """The candidate's table columns (no model)."""
        out = {**self.info, "method": self.method, "strategy": self.strategy, "plan": self.label}
        if self.budget is not None:
            cost = {"train_runs": self.budget.runs, "train_steps": self.budget.steps, "train_seconds": self.budget.seconds}
            out.update({k: v for k, v in cost.items() if v is not None})
        out.update(self.scores)
        if self.note:
            out["note"] = self.note
        return out
