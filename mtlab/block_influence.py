"""Depth pruning by a measured score: which blocks change the hidden states least.

Two scores, both measured on calibration data (the task's train split; never test) with
`mtlab.capture`'s hook points, averaged over non-padding tokens. For a stack of n blocks let
h_0 be the input of block 0 and h_{l+1} the output of block l (`<stack>.<l>.block_out`), so
block l maps h_l to h_{l+1}:

- block influence (ShortGPT, Men et al. 2024): BI_l = 1 - mean_tokens cos(h_l, h_{l+1}).
  An identity block scores 0. Rule "bi" drops the n - depth blocks of lowest BI (ties: the
  higher block first), wherever they are.
- angular distance of a span (Gromov et al. 2024, "The unreasonable ineffectiveness of the
  deeper layers"): d(l, k) = mean_tokens arccos(cos(h_l, h_{l+k})) / pi, the span of k blocks
  l .. l+k-1. Rule "angular" drops the contiguous span of k = n - depth blocks of smallest
  d(l, k) (ties: the lower start).

`block_scores` returns every span's scores as a DataFrame (stack, layer = the span's first block,
n = its length, bi = 1 - mean cos, angular = mean angle / pi, tokens); `block_influence` the
single blocks (n = 1). `choose_kept` turns scores into the kept layers per stack, `prune_by_score`
into a pruned copy. The registered baseline "block_influence" (`mtlab.baselines`) drops the blocks
chosen by BI at each of the budget's depths, then gives the student the same distillation
fine-tune as layer_drop and sft (`mtlab.baselines.layer_drop` with the chosen layers).
`mtlab.baselines.score_recipe("angular")` makes the same recipe with the angular rule, to register
under another name (`baseline("angular_distance")(score_recipe("angular"))`). This module imports
no baseline code (`mtlab.baselines` imports it), so the two form no import cycle.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import pandas as pd
import torch
from torch import nn

from .anatomy import anatomy
from .capture import BatchConsumer, Capture
from .layer_rules import keep_only

__all__ = ["RULES", "block_scores", "block_influence", "choose_kept", "prune_by_score",
           "calibration_batches", "CALIBRATION_TOKENS", "CALIBRATION_BATCH"]

RULES = ("bi", "angular")
CALIBRATION_TOKENS = 10_000  # non-padding tokens per stack the scores are averaged over
CALIBRATION_BATCH = 64
SCORE_COLUMNS = ["stack", "layer", "n", "bi", "angular", "tokens"]
_INPUT = "input"  # the name of a stack's block-0 input among the captured rows


class _WithInputs(Capture):
    """A Capture that also hands over each captured stack's block-0 input as '<stack>.input'
    (same rows, same padding removal as the block outputs)."""

    def _install(self) -> list:
        handles = super()._install()  # block 0's enter hook is registered first: _active is set when ours runs
        for s in self.stacks:
            block = self.anatomy.stack(s).layer(0).block
            key, name = (s, 0), f"{s}.{_INPUT}"

            def pre(mod, args, kwargs, key=key, name=name):
                if self._active == key:
                    h = args[0] if args else kwargs.get("hidden_states")
                    self._emit([name], key[0], h)

            handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
        return handles


class _SpanSums(BatchConsumer):
    """Per stack, for every span (l, k): the summed cos(h_l, h_{l+k}) and angle / pi over tokens."""

    def __init__(self, depths: Mapping[str, int]):
        super().__init__()
        self.depths = dict(depths)
        self.cos = {s: torch.zeros(n + 1, n + 1, dtype=torch.float64) for s, n in depths.items()}
        self.ang = {s: torch.zeros(n + 1, n + 1, dtype=torch.float64) for s, n in depths.items()}
        self.tokens = {s: 0 for s in depths}

    def process(self, feats: dict[str, torch.Tensor]) -> None:
        for s, n in self.depths.items():
            names = [f"{s}.{_INPUT}"] + [f"{s}.{i}.block_out" for i in range(n)]
            if not all(k in feats for k in names):
                continue
            h = torch.stack([feats[k].double() for k in names])  # [n+1, tokens, d]
            h = h / h.norm(dim=-1, keepdim=True).clamp_min(1e-30)
            cos = torch.einsum("atd,btd->abt", h, h).clamp(-1.0, 1.0)  # [n+1, n+1, tokens]
            self.cos[s] += cos.sum(-1).cpu()
            self.ang[s] += (torch.arccos(cos) / math.pi).sum(-1).cpu()
            self.tokens[s] += h.shape[1]


def calibration_batches(task, split: str = "train", batch_size: int = CALIBRATION_BATCH, seed: int = 0):
    """The batches the scores are measured on: the task's `split`, shuffled (train; test is refused)."""
    if split == "test":
        raise ValueError("split='test': the test split is reserved for final numbers; measure block scores on "
                         "'train' (or 'dev')")
    return task.iter_batches(split, batch_size, shuffle=True, seed=seed)


def block_scores(model: nn.Module, batches: Iterable, *, stacks: Iterable[str] | None = None,
                 max_tokens: int | None = CALIBRATION_TOKENS, progress: bool = False) -> pd.DataFrame:
    """Every contiguous span's scores (see the module docstring) on `batches` (mtlab Batches or dicts
    of model inputs; a seq2seq decoder runs with teacher forcing on the batch's labels), at most
    `max_tokens` non-padding tokens per stack. One row per (stack, layer, n): the span of blocks
    layer .. layer+n-1; bi = 1 - mean cos(input, output), angular = mean arccos(cos) / pi."""
    an = anatomy(model)
    names = list(an.stacks) if stacks is None else list(stacks)
    for s in names:
        an.stack(s)  # KeyError naming the valid stacks
    depths = {s: len(an.stacks[s]) for s in names}
    points = [f"{s}.{i}.block_out" for s, n in depths.items() for i in range(n)]
    sums = _SpanSums(depths)
    _WithInputs(model, points, [sums]).run(batches, max_tokens=max_tokens, progress=progress, desc="block scores")
    rows = []
    for s, n in depths.items():
        t = sums.tokens[s]
        if t == 0:
            raise ValueError(f"no tokens of stack {s!r} reached the scores: the batches are empty or all padding; "
                             "pass batches of the task's train split")
        for k in range(1, n + 1):
            for l in range(n - k + 1):
                rows.append({"stack": s, "layer": l, "n": k, "bi": 1.0 - sums.cos[s][l, l + k].item() / t,
                             "angular": sums.ang[s][l, l + k].item() / t, "tokens": t})
    df = pd.DataFrame(rows, columns=SCORE_COLUMNS)
    df.attrs["config"] = {"max_tokens": max_tokens, "depths": depths}
    return df


def block_influence(model: nn.Module, batches: Iterable, **kw) -> pd.DataFrame:
    """ShortGPT's block influence of every block: `block_scores` rows with n == 1 (stack, layer, bi,
    angular, tokens)."""
    df = block_scores(model, batches, **kw)
    return df[df.n == 1].drop(columns="n").reset_index(drop=True)


def choose_kept(scores: pd.DataFrame, depths: Mapping[str, int], rule: str = "bi") -> dict[str, list[int]]:
    """The kept layers of each stack named in `depths` ({stack: target depth}) by `rule` ("bi": drop the
    lowest-BI blocks; "angular": drop the contiguous span of smallest angular distance), from
    `block_scores` (all spans; "bi" needs only n == 1)."""
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; use one of {RULES} ('bi': ShortGPT's block influence, "
                         "'angular': Gromov et al.'s angular distance of a span)")
    missing = [c for c in ("stack", "layer", "n", rule) if c not in scores]
    if missing:
        raise ValueError(f"scores lack column(s) {missing}: pass the DataFrame of mtlab.block_influence.block_scores")
    out = {}
    for s, depth in depths.items():
        one = scores[(scores["stack"] == s) & (scores.n == 1)]
        if one.empty:
            raise ValueError(f"no scores for stack {s!r}; scored stacks: {sorted(set(scores['stack']))}")
        n = len(one)
        if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= n:
            raise ValueError(f"{s}: depth {depth!r} impossible for a {n}-layer stack; choose 1 <= depth <= {n}")
        k = n - depth
        if k == 0:
            drop: list[int] = []
        elif rule == "bi":
            ranked = one.sort_values(["bi", "layer"], ascending=[True, False], kind="stable")
            drop = ranked.layer.head(k).tolist()
        else:
            spans = scores[(scores["stack"] == s) & (scores.n == k)]
            if spans.empty:
                raise ValueError(f"{s}: no angular scores of {k}-block spans; score every span with block_scores")
            start = int(spans.sort_values(["angular", "layer"], kind="stable").layer.iloc[0])
            drop = list(range(start, start + k))
        out[s] = [i for i in range(n) if i not in set(drop)]
    return out


def prune_by_score(model: nn.Module, scores: pd.DataFrame, depths: Mapping[str, int], rule: str = "bi") -> nn.Module:
    """A pruned copy of `model` keeping `choose_kept(scores, depths, rule)` (no training)."""
    return keep_only(model, choose_kept(scores, depths, rule))
