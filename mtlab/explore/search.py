"""Frontier search over assembly spaces too large to screen whole.

Exhaustive screening (`mtlab.explore.screen`) is exact but builds a trie over every plan: past
~1e5 plans it is unusable (a 24+24 model with granularities {2,3,4,6,8,12} has 8.3e9 plans).
`frontier_search` finds the screened quality-vs-cost frontier without enumerating the space:

1. **Per-stack beam over the prefix trie.** One stack at a time, the other kept as the teacher
   (the decoder reads the teacher encoder's output, the encoder is read by the teacher decoder).
   Prefixes grow one span at a time; each extension runs ONE block on its parent's output. A plan's
   cost depends only on how many blocks each stack keeps, so prefixes are grouped by (layers
   covered, blocks used) and each group keeps its `beam` best. A group is ranked only when it holds
   more than `beam` prefixes, by `prefix_score`: "hidden" (default) is the relative squared
   distance to the teacher's hidden state at the same layer boundary (no extra blocks); "nll" is the
   screened prefix, completed by the teacher's remaining layers and scored by teacher-forced token
   NLL (costs the completion). Complete tilings are always scored by NLL. A decoder-only LM (one
   stack, "layers") has one such beam, its complete tilings scored by the LM's NLL.
2. **Combination.** Encoder and decoder candidates are paired (one stack: its tilings are the
   candidates); pairs are ordered by proxy Pareto
   layer (additive proxy: nll_enc + nll_dec - nll_teacher, against FLOPs and against parameters),
   then by rank inside their cost cell, and added while the exact screen of the chosen set
   (prefix-shared, its cost known before it runs) fits in what is left of the budget.
3. **Exact screening** of the chosen plans with `mtlab.explore.screen`: every reported score is the
   score exhaustive screening gives that plan.

Memory holds at most `beam` prefixes per (layer, blocks) group of one stack and at most
`MAX_PAIRS` candidate pairs: nothing grows with the number of plans. Both phases' block
counts are known before anything runs, so the largest beam that fits the budget is chosen up front.
"""
from __future__ import annotations

import bisect
import itertools
import time
from typing import Mapping

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from ..measure import count_params
from ..modular.bank import ModuleBank, block_params, plan_stats, stack_block_flops
from ..modular.plan import Plan
from ..surgery import stack_depths
from ..tasks.causal_lm import check_aligned
from .frontier import pareto_mask
from .screen import (BlockRunner, block_hidden, eval_mode, max_abs_diff, require_screenable, screen,
                     token_metrics)
from .space import AssemblySpace

MAX_BEAM = 64
MAX_PAIRS = 100_000  # candidate pairs ordered at once (the bound on memory of the combination)


class BudgetError(ValueError):
    """The block-evaluation budget cannot reach a complete plan; the message gives the minimum."""


def spans_at(pos: int, depth: int, ks) -> list[int]:
    """Span sizes that may start at layer `pos`: an original layer, or an aligned module that fits."""
    return [1] + [k for k in ks if k > 1 and pos % k == 0 and pos + k <= depth]


def stack_beam_evals(depth: int, ks, beam: int, score_cost) -> int:
    """Blocks one batch costs the per-stack beam (mirrors `_stack_beam` exactly): every extension
    runs one block, every scored prefix at layer q costs `score_cost(q)` blocks."""
    kept = {(0, 0): 1}
    total = 0
    for q in range(1, depth + 1):
        incoming: dict[int, int] = {}
        for (p, n), c in kept.items():
            for k in spans_at(p, depth, ks):
                if p + k == q:
                    incoming[n + 1] = incoming.get(n + 1, 0) + c
        for n, c in incoming.items():
            total += c
            if c > beam or q == depth:
                total += c * score_cost(q)
            kept[(q, n)] = min(c, beam)
    return total


def stack_candidates(depth: int, ks, beam: int) -> int:
    """Complete tilings the per-stack beam hands to the combination (at most `beam` per block count)."""
    kept = {(0, 0): 1}
    for q in range(1, depth + 1):
        for (p, n), c in list(kept.items()):
            for k in spans_at(p, depth, ks):
                if p + k == q:
                    kept[(q, n + 1)] = kept.get((q, n + 1), 0) + c
        for key in [key for key in kept if key[0] == q]:
            kept[key] = min(kept[key], beam)
    return sum(c for (q, _), c in kept.items() if q == depth)


def pairs_bound(space: AssemblySpace, beam: int) -> int:
    """The most one batch's exact screen of EVERY candidate combination can cost: each stack's trie
    of candidates, the later stack's once per candidate of the stacks before it."""
    total, mult = 0, 1
    for s in space.stacks:
        c = stack_candidates(space.depths[s], space.granularities.get(s, ()), beam)
        total += mult * min(c * space.depths[s], space.prefixes(s))
        mult *= c
    return total


PREFIX_SCORES = ("nll", "hidden")


def search_evals(space: AssemblySpace, beam: int, prefix_score: str = "hidden") -> int:
    """Blocks one batch costs phase 1 for every stack. Encoder-decoder: the teacher encoder once,
    and with prefix_score="hidden" the teacher decoder once (its hidden states are the targets).
    A decoder-only stack ("layers"): the teacher's layers once for "hidden" (the targets)."""
    if prefix_score not in PREFIX_SCORES:
        raise ValueError(f"prefix_score must be one of {PREFIX_SCORES}, got {prefix_score!r}")
    cheap = prefix_score == "hidden"
    if space.stacks == ["layers"]:
        d = space.depths["layers"]
        return stack_beam_evals(d, space.granularities.get("layers", ()), beam,
                                lambda q: 0 if cheap else d - q) + (d if cheap else 0)
    de, dd = space.depths["encoder"], space.depths["decoder"]
    enc = stack_beam_evals(de, space.granularities.get("encoder", ()), beam,
                           lambda q: dd if q == de else 0 if cheap else de - q + dd)
    dec = stack_beam_evals(dd, space.granularities.get("decoder", ()), beam, lambda q: 0 if cheap else dd - q)
    return de + enc + dec + (dd if cheap else 0)


def _check_space(space: AssemblySpace) -> None:
    for s, n in space.depths.items():
        bad = [k for k in space.granularities.get(s, ()) if not 2 <= k <= n]
        if bad:
            raise ValueError(f"{s}: granularities {bad} cannot tile a {n}-layer stack (a module spans 2..{n} "
                             f"layers); drop them or train modules of sizes 2..{n}")
    if len(space) <= 1:
        raise ValueError(f"the assembly space has one plan (the teacher; granularities {dict(space.granularities)}): "
                         "nothing to search. Train modules (mtlab.modular.train_modules with granularities "
                         "that fit the stacks, e.g. (2, 3)) or screen the teacher alone with mtlab.explore.screen")


def _restrict(bank: ModuleBank, granularities: Mapping[str, tuple[int, ...]] | None, depths) -> AssemblySpace:
    if granularities is None:
        return AssemblySpace(depths, dict(bank.granularities) if bank is not None else {})
    space = AssemblySpace(depths, {s: tuple(sorted(set(ks))) for s, ks in granularities.items()})
    _check_space(space)
    for s, ks in space.granularities.items():
        missing = sorted(set(ks) - set(bank.granularities.get(s, ()) if bank is not None else ()))
        if missing:
            raise ValueError(f"{s}: the bank has no modules of granularities {missing} (it has "
                             f"{bank.granularities.get(s, ()) if bank is not None else 'none'}); train them or leave them out")
    return space


def choose_beam(space: AssemblySpace, budget: int, batches: int, share: float, beam: int | None,
                prefix_score: str = "hidden") -> int:
    """The largest beam whose phase 1 fits `share` of the budget (or `beam`, checked)."""
    one_plan = sum(space.depths.values())  # the most one plan's exact screen can cost
    need = {b: (search_evals(space, b, prefix_score) + one_plan) * batches for b in range(1, MAX_BEAM + 1)}
    if budget < min(need.values()):
        raise BudgetError(f"a budget of {budget} block evaluations cannot reach a complete plan: the smallest "
                          f"search ({batches} batch(es), one plan screened) needs {min(need.values())}; raise budget "
                          f"to at least {min(need.values())} or screen fewer words (limit)")
    if beam is not None:
        if beam < 1 or need.get(beam, (search_evals(space, beam, prefix_score) + one_plan) * batches) > budget:
            raise BudgetError(f"beam {beam} does not fit the budget {budget} (stack search and one plan need "
                              f"{need.get(beam, 'more')}); use a beam >= 1 that fits, or None to fit the budget")
        return beam
    fits = [b for b, n in need.items() if n <= budget and n - one_plan * batches <= share * budget]
    # a wider beam keeps a superset of candidates: take it too when ALL its pairs fit the budget
    whole = [b for b in need if (search_evals(space, b, prefix_score) + pairs_bound(space, b)) * batches <= budget]
    return max(fits + whole) if fits + whole else min(need, key=need.get)


class _StackSearch:
    """Phase 1 for one stack over every batch: `run` returns {blocks: [(nll, tiling), ...]}, best first.
    `targets` (per batch, the teacher's hidden state at each layer boundary) switches intermediate
    scores to the relative squared distance to the teacher there (no extra blocks)."""

    def __init__(self, runners: list[BlockRunner], stack: str, space: AssemblySpace, beam: int, enc_outs=None,
                 targets=None):
        self.runners, self.stack, self.beam, self.targets = runners, stack, beam, targets
        self.depth, self.ks = space.depths[stack], space.granularities.get(stack, ())
        self.enc_outs = enc_outs or [None] * len(runners)
        self.teacher_dec = (1,) * space.depths["decoder"] if stack == "encoder" else None

    def score(self, prefix: tuple[int, ...], states) -> float:
        """With targets, below the top: the prefix's distance to the teacher's hidden state (no
        blocks run); otherwise its NLL (`nll`)."""
        if self.targets is not None and sum(prefix) < self.depth:
            return self.distance(prefix, states)
        return self.nll(prefix, states)

    def distance(self, prefix: tuple[int, ...], states) -> float:
        """Relative squared distance to the teacher's hidden state at the prefix's layer boundary."""
        q, num, den = sum(prefix), 0.0, 0.0
        for r, (out, _), t in zip(self.runners, states, self.targets):
            mask = (r.batch.labels != -100 if self.stack == "decoder" else r.batch.attention_mask).unsqueeze(-1)
            num += float((((block_hidden(out) - t[q]) ** 2) * mask).sum())
            den += float(((t[q] ** 2) * mask).sum())
        return num / den

    def nll(self, prefix: tuple[int, ...], states) -> float:
        """Teacher-forced token NLL of the prefix completed by the teacher's remaining layers."""
        total = {"nll_sum": 0.0, "tokens": 0}
        for r, (out, call), enc in zip(self.runners, states, self.enc_outs):
            if self.stack == "encoder":
                enc_final = r.complete("encoder", prefix, out, call)
                logits = r.outputs("decoder", [self.teacher_dec], enc_final)[self.teacher_dec]
            else:  # the decoder, or a decoder-only stack ("layers"): its output is the logits
                logits = r.complete(self.stack, prefix, out, call, enc)
            m = token_metrics(logits, r.batch.labels)
            total["nll_sum"] += m["nll_sum"]
            total["tokens"] += m["tokens"]
        return total["nll_sum"] / total["tokens"]

    def ranked(self, group, score) -> list:
        """(score, tiling, states) of the group's `beam` best by `score`."""
        return sorted(((score(t, st), t, st) for t, st in group), key=lambda x: (x[0], x[1]))[:self.beam]

    def extend(self, prefix, states, k):
        return [r.step(self.stack, prefix, out, call, k, enc)
                for r, (out, call), enc in zip(self.runners, states, self.enc_outs)]

    def run(self, bar) -> dict[int, list[tuple[float, tuple[int, ...]]]]:
        kept = {(0, 0): [((), [(None, r.root_call(self.stack, e)) for r, e in zip(self.runners, self.enc_outs)])]}
        done: dict[int, list] = {}
        for q in range(1, self.depth + 1):
            incoming: dict[int, list] = {}
            for (p, n) in [key for key in kept if key[0] < q]:
                for prefix, states in kept[(p, n)]:
                    for k in spans_at(p, self.depth, self.ks):
                        if p + k == q:
                            incoming.setdefault(n + 1, []).append((prefix + (k,), self.extend(prefix, states, k)))
            for key in [key for key in kept if key[0] + max(spans_at(key[0], self.depth, self.ks)) <= q]:
                del kept[key]  # no span from there reaches past q: free its hidden states
            for n, group in incoming.items():
                if len(group) > self.beam or q == self.depth:
                    ranked = self.ranked(group, self.score)
                    group = [(t, st) for _, t, st in ranked]
                    if q == self.depth:
                        done[n] = [(s, t) for s, t, _ in ranked]
                kept[(q, n)] = group
            bar.update(1)
        return done


def pareto_layers(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-dominated sorting of points minimising both x and y (layer 0 is the Pareto front),
    O(n log n): sweep by x, each layer remembers its lowest y so far."""
    order = np.lexsort((y, x))
    lows: list[float] = []
    out = np.empty(len(x), int)
    prev = None
    for i in order:
        if prev is not None and x[i] == x[prev] and y[i] == y[prev]:  # a duplicate: same layer
            out[i] = out[prev]
            continue
        prev = i
        L = bisect.bisect_right(lows, y[i])  # first layer whose lowest y is above y[i]
        if L == len(lows):
            lows.append(y[i])
        else:
            lows[L] = y[i]
        out[i] = L
    return out


def _cell_costs(teacher, inputs) -> dict:
    return {"n": count_params(teacher), "bparams": block_params(teacher), "flops": stack_block_flops(teacher, inputs)}


def _pair_depth(cands: dict, cap: int) -> int:
    """How many of each block count's best candidates to combine so that at most `cap` combinations
    exist (memory stays bounded whatever the beam), at least 1."""
    def combos(r):
        return int(np.prod([sum(min(r, len(v)) for v in c.values()) for c in cands.values()]))
    r = max([len(v) for c in cands.values() for v in c.values()] + [1])
    while r > 1 and combos(r) > cap:
        r -= 1
    return r


def _combine(cands: dict, costs: dict, depths: Mapping[str, int], teacher_nll: float) -> list[Plan]:
    """Candidate combinations (one tiling per stack), most promising first: proxy Pareto layer (the
    better of FLOPs and params), then rank inside the cost cell, then proxy NLL. The proxy adds
    the stacks' NLL increases over the teacher (one stack: its own NLL)."""
    r = _pair_depth(cands, MAX_PAIRS)
    stacks = list(cands)
    per = [[(s, i, t) for group in cands[st].values() for i, (s, t) in enumerate(group[:r])] for st in stacks]
    rows = []
    for combo in itertools.product(*per):
        rows.append((sum(c[0] for c in combo) - (len(combo) - 1) * teacher_nll, sum(c[1] for c in combo),
                     Plan.of({st: c[2] for st, c in zip(stacks, combo)})))
    proxy = np.array([r[0] for r in rows])
    plans = [r[2] for r in rows]
    stats = {}
    for p in plans:
        key = tuple(p.depth(st) for st in stacks)
        if key not in stats:
            s = plan_stats(p, costs["n"], costs["bparams"], costs["flops"])
            stats[key] = (1 / s["ideal_speedup"], s["params"])
    cost = np.array([stats[tuple(p.depth(st) for st in stacks)] for p in plans])
    layer = np.minimum(pareto_layers(cost[:, 0], proxy), pareto_layers(cost[:, 1], proxy))
    order = sorted(range(len(rows)), key=lambda i: (layer[i], rows[i][1], proxy[i], str(plans[i])))
    return [plans[i] for i in order]


def _fit(plans: list[Plan], room: int) -> list[Plan]:
    """The longest greedy selection (in order, skipping what does not fit) whose prefix-shared screen
    costs at most `room` blocks per batch (as `screen` counts: a stack's trie runs once per
    combination of the tilings of the stacks before it)."""
    seen: set = set()
    chosen, used = [], 0
    for p in plans:
        new, before = set(), ()
        for st in p.stacks:
            t = p.stack(st)
            new |= {(st, before, t[:i]) for i in range(1, len(t) + 1)} - seen
            before += (t,)
        if used + len(new) > room:
            continue
        used += len(new)
        seen |= new
        chosen.append(p)
    return chosen


@torch.no_grad()
def frontier_search(teacher: nn.Module, bank: ModuleBank, task, *, budget: int, beam: int | None = None,
                    granularities: Mapping[str, tuple[int, ...]] | None = None, split: str = "dev",
                    limit: int | None = 256, batch_size: int = 64, stack_share: float = 0.5,
                    prefix_score: str = "hidden", progress: bool = True) -> pd.DataFrame:
    """The screened quality-vs-cost frontier of the assembly space within `budget` block evaluations
    (counted as `screen` counts them: one block on one batch), without enumerating the space.

    Returns the `screen` table of every plan it screened exactly, with `on_frontier` (nll against
    ideal_speedup), `on_frontier_params` (nll against params) and `on_frontier_any`. `beam` (None:
    the largest whose stack search fits `stack_share` of the budget); `granularities` restricts the
    bank's. attrs: config, block_evals (all phases), block_evals_stacks, block_evals_screen, beam,
    batches, plans_in_space, exhaustive_block_evals, seconds."""
    require_screenable(teacher)
    if split == "test":
        raise ValueError("the search chooses models: use the dev split (test is read only for final numbers)")
    if not 0 < stack_share < 1:
        raise ValueError(f"stack_share is the budget's share for the per-stack search, in (0, 1); got {stack_share}")
    space = _restrict(bank, granularities, stack_depths(teacher))
    _check_space(space)
    index = task.batches(split, batch_size, limit=limit)
    if not index:
        raise ValueError(f"split {split!r} has no examples to search on (limit={limit})")
    t0 = time.perf_counter()
    if beam is None and space.screen_block_evals() * len(index) <= budget:  # the exact answer fits: take it
        return _mark(screen(teacher, bank, task, list(space), split=split, limit=limit, batch_size=batch_size, progress=progress),
                     space, budget, stack_share, prefix_score, 0, None, len(index), t0, "exhaustive (fits the budget)")
    beam = choose_beam(space, int(budget), len(index), stack_share, beam, prefix_score)
    with eval_mode(teacher, bank):
        cands, evals, teacher_nll = _stack_searches(teacher, bank, task, space, beam, split, index, progress,
                                                     prefix_score)
        inputs = _flop_inputs(task.collate(split, index[0]), space)
        ordered = _combine(cands, _cell_costs(teacher, inputs), space.depths, teacher_nll)
        chosen = _fit(ordered, (int(budget) - evals) // len(index))
    df = screen(teacher, bank, task, chosen, split=split, limit=limit, batch_size=batch_size, progress=progress)
    return _mark(df, space, budget, stack_share, prefix_score, evals, beam, len(index), t0, "frontier-search")


def _flop_inputs(batch, space: AssemblySpace) -> dict:
    """The forward that per-block FLOPs are counted on (as `screen` counts them): a decoder-only
    LM reads no labels (they are aligned with its logits, checked)."""
    inputs = batch.model_inputs()
    if space.stacks == ["layers"]:
        check_aligned(batch.input_ids, batch.labels)
        inputs.pop("labels")
    return inputs


def _mark(df, space, budget, stack_share, prefix_score, evals, beam, batches, t0, method) -> pd.DataFrame:
    """Frontier flags and the search's attrs on a screen table."""
    df["on_frontier"] = pareto_mask(df, "ideal_speedup", "nll")
    df["on_frontier_params"] = pareto_mask(df, "params", "nll", x_higher=False)
    df["on_frontier_any"] = df.on_frontier | df.on_frontier_params
    df.attrs["config"].update(budget=int(budget), stack_share=stack_share, granularities=dict(space.granularities),
                              prefix_score=prefix_score)
    df.attrs.update(block_evals_stacks=evals, block_evals_screen=df.attrs["block_evals"],
                    block_evals=evals + df.attrs["block_evals"], beam=beam, batches=batches,
                    plans_in_space=len(space), exhaustive_block_evals=space.screen_block_evals() * batches,
                    seconds=time.perf_counter() - t0, method=method)
    return df


def _teacher_path(r: BlockRunner, stack: str, depth: int, enc_out=None) -> tuple[dict, object]:
    """The teacher's hidden state at each layer boundary 1..depth, and its last block's output."""
    out, call, hs = None, r.root_call(stack, enc_out), {}
    for q in range(depth):
        out, call = r.step(stack, (1,) * q, out, call, 1, enc_out)
        hs[q + 1] = block_hidden(out)
    return hs, out


def _stack_searches(teacher, bank, task, space, beam, split, index, progress, prefix_score):
    """Phase 1 for every stack: (candidates per stack, blocks run, the teacher's NLL)."""
    runners = [BlockRunner(teacher, bank, task.collate(split, idx)) for idx in index]
    hidden = prefix_score == "hidden"
    if space.stacks == ["layers"]:
        cands = _single_search(runners, space, beam, progress, hidden)
    else:
        cands = _pair_search(runners, space, beam, progress, hidden)
    first = space.stacks[0]
    teacher_nll = next(s for s, t in cands[first][space.depths[first]] if t == (1,) * space.depths[first])
    expected = search_evals(space, beam, prefix_score) * len(index)
    evals = sum(r.blocks_run for r in runners)
    if evals != expected:
        raise RuntimeError(f"stack search ran {evals} blocks, its cost model says {expected}: a bug in mtlab")
    return cands, evals, teacher_nll


def _single_search(runners, space, beam, progress, hidden) -> dict:
    """A decoder-only LM: one beam over its one stack ("layers")."""
    d = space.depths["layers"]
    targets = [_teacher_path(r, "layers", d)[0] for r in runners] if hidden else None
    with tqdm(total=d, desc=f"search (beam {beam})", disable=not progress) as bar:
        return {"layers": _StackSearch(runners, "layers", space, beam, targets=targets).run(bar)}


def _pair_search(runners, space, beam, progress, hidden) -> dict:
    """An encoder-decoder: the encoder's beam under the teacher decoder, then the decoder's beam
    reading the teacher encoder's output."""
    de, dd = space.depths["encoder"], space.depths["decoder"]
    enc_paths = [_teacher_path(r, "encoder", de) for r in runners]
    enc_outs = [r.finish("encoder", [last])[0] for r, (_, last) in zip(runners, enc_paths)]
    dec_targets = [_teacher_path(r, "decoder", dd, e)[0] for r, e in zip(runners, enc_outs)] if hidden else None
    with tqdm(total=de + dd, desc=f"search (beam {beam})", disable=not progress) as bar:
        enc = _StackSearch(runners, "encoder", space, beam, targets=[h for h, _ in enc_paths] if hidden else None).run(bar)
        dec = _StackSearch(runners, "decoder", space, beam, enc_outs, targets=dec_targets).run(bar)
    return {"encoder": enc, "decoder": dec}


def hypervolume(x, y, ref: tuple[float, float]) -> float:
    """Area dominated by points (minimising x and y) inside the box up to `ref`: a sorted sweep."""
    pts = sorted((float(a), float(b)) for a, b in zip(x, y) if a < ref[0] and b < ref[1])
    area, best_y = 0.0, ref[1]
    for i, (a, b) in enumerate(pts):
        best_y = min(best_y, b)
        right = pts[i + 1][0] if i + 1 < len(pts) else ref[0]
        area += (right - a) * (ref[1] - best_y)
    return area


AXES = {"flops": ("flop_ratio", "nll"), "params": ("params", "nll")}


def compare_to_exhaustive(found: pd.DataFrame, full: pd.DataFrame) -> dict:
    """How well a search's screened plans cover the exhaustive screen's frontier:
    frontier_recall (share of plans on either exhaustive frontier that the search reports with the
    same score), hypervolume_ratio (the lower of the two axes' ratios; reference point: the worst
    cost and NLL of the whole space plus 1% of their range), hv_flops, hv_params, max_abs_diff
    (largest score difference on the plans both screened) and block_evals_ratio."""
    diff = max_abs_diff(found[["plan", "nll", "token_acc", "tf_word_acc"]],
                        full[full.plan.isin(set(found.plan))])
    full = full.assign(flop_ratio=1 / full.ideal_speedup)
    found = found.assign(flop_ratio=1 / found.ideal_speedup)
    on = pareto_mask(full, "flop_ratio", "nll", x_higher=False) | pareto_mask(full, "params", "nll", x_higher=False)
    front = set(full.plan[on])
    out = {"frontier_plans": len(front), "frontier_recall": len(front & set(found.plan)) / len(front),
           "max_abs_diff": diff}
    for name, (x, y) in AXES.items():
        ref = tuple(full[c].max() + 0.01 * (full[c].max() - full[c].min()) for c in (x, y))
        out[f"hv_{name}"] = hypervolume(found[x], found[y], ref) / hypervolume(full[x], full[y], ref)
    out["hypervolume_ratio"] = min(out["hv_flops"], out["hv_params"])
    if "block_evals" in found.attrs and "block_evals" in full.attrs:
        out["block_evals_ratio"] = found.attrs["block_evals"] / full.attrs["block_evals"]
    return out
