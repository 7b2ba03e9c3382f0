"""Merge sets beyond one window: greedy forward selection over non-overlapping FF windows.

The set space grows fast (1,023 window sets for a 6+6 model with every size, far more deeper),
so scoring every set is out of reach past small models. `greedy_merge_sets` starts from the
unmerged model and, one window at a time, adds the window (any stack, not overlapping the
windows already chosen in its stack) whose merged model scores best on dev: correlations come
from the train split (aligned once per (stack, anchor, layer) pair and cached), scores from dev
(teacher-forced token NLL). `every_merge_set` scores each set of a given size, the reference the
greedy choice is compared with on small models (`greedy_vs_exhaustive`).
"""
from __future__ import annotations

import time
from typing import Iterable, Mapping

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from ..measure import count_params
from ..merging.build import merge_model
from ..merging.correlations import CorrelationCache
from ..surgery import stack_depths
from .screen import token_metrics
from .space import MergeSpace, merge_specs

Windows = Mapping[str, tuple[tuple[int, int], ...]]


def _batches(task, split: str, words: int | None, batch_size: int):
    index = task.batches(split, batch_size, limit=words)
    if not index:
        raise ValueError(f"split {split!r} has no examples (limit={words})")
    return [task.collate(split, i) for i in index]


@torch.no_grad()
def dev_nll(model: nn.Module, batches) -> float:
    """Teacher-forced mean token NLL of a model on fixed batches."""
    model.eval()
    nll, tokens = 0.0, 0
    for b in batches:
        m = token_metrics(model(**b.model_inputs(), use_cache=False).logits, b.labels)
        nll, tokens = nll + m["nll_sum"], tokens + m["tokens"]
    return nll / tokens


class _Scorer:
    """Merged copies of one model, scored on dev, correlations from train shared across sets."""

    def __init__(self, model, task, *, split, limit, align_split, align_words, align_tokens, anchor, method,
                 batch_size):
        if split == "test" or align_split == "test":
            raise ValueError("merge sets are aligned on 'train' and chosen on 'dev'; the test split is reserved "
                             "for final numbers")
        self.model, self.anchor, self.method = model, anchor, method
        self.dev = _batches(task, split, limit, batch_size)
        align = _batches(task, align_split, align_words, batch_size)
        self.cache = CorrelationCache(model, align, max_tokens=align_tokens)
        self.evals = 0

    def __call__(self, windows: Windows) -> dict:
        specs = merge_specs({s: ws for s, ws in windows.items() if ws}, self.anchor, self.method)
        merged = merge_model(self.model, specs, cache=self.cache) if specs else self.model
        self.evals += 1
        return {"specs": " ".join(specs) or "(none)", "windows": sum(len(w) for w in windows.values()),
                "nll": dev_nll(merged, self.dev), "params": count_params(merged)}


def _free(chosen: Windows, stack: str, window: tuple[int, int]) -> bool:
    a, k = window
    return all(a + k <= b or b + kb <= a for b, kb in chosen.get(stack, ()))


def greedy_merge_sets(model: nn.Module, task, *, steps: int = 3, sizes: Iterable[int] = (2, 3), anchor: str = "middle",
                      method: str = "permute", split: str = "dev", limit: int | None = 64, align_split: str = "train",
                      align_words: int | None = 256, align_tokens: int | None = 5000, batch_size: int = 64,
                      progress: bool = True) -> pd.DataFrame:
    """Forward selection: row i is the best set of i+1 windows found by adding one window to row i-1's
    set. Columns: step, specs, windows, nll (dev), params, evaluations (merged models scored so far).
    attrs: config, seconds, teacher_nll."""
    space = MergeSpace(stack_depths(model), tuple(sizes))
    cands = [(s, w) for s in space.depths for w in space.windows(s)]
    if not cands:
        raise ValueError(f"no FF window of sizes {tuple(sizes)} fits stacks {dict(space.depths)}; use sizes >= 2 "
                         "that are at most a stack's depth")
    score = _Scorer(model, task, split=split, limit=limit, align_split=align_split, align_words=align_words,
                    align_tokens=align_tokens, anchor=anchor, method=method, batch_size=batch_size)
    t0, rows, chosen = time.perf_counter(), [], {s: () for s in space.depths}
    teacher = score(chosen)["nll"]
    for step in tqdm(range(steps), desc="greedy merge sets", disable=not progress):
        trials = [(s, w) for s, w in cands if _free(chosen, s, w)]
        if not trials:
            break
        scored = [(score({**chosen, s: tuple(sorted(chosen[s] + (w,)))}), s, w) for s, w in trials]
        best, s, w = min(scored, key=lambda x: (x[0]["nll"], x[0]["specs"]))
        chosen = {**chosen, s: tuple(sorted(chosen[s] + (w,)))}
        rows.append({"step": step + 1, **best, "evaluations": score.evals})
    df = pd.DataFrame(rows)
    df.attrs.update(config={"steps": steps, "sizes": tuple(sizes), "anchor": anchor, "method": method, "split": split,
                            "limit": limit, "align_split": align_split, "align_words": align_words,
                            "align_tokens": align_tokens}, seconds=time.perf_counter() - t0, teacher_nll=teacher)
    return df


def every_merge_set(model: nn.Module, task, *, windows: int = 2, sizes: Iterable[int] = (2, 3), progress: bool = True,
                    **kw) -> pd.DataFrame:
    """Every set of exactly `windows` non-overlapping windows, scored as `greedy_merge_sets` scores
    (same data, same alignment): the reference for small models."""
    space = MergeSpace(stack_depths(model), tuple(sizes))
    sets = [ws for ws in space if sum(len(w) for w in ws.values()) == windows]
    if not sets:
        raise ValueError(f"no set of {windows} windows of sizes {tuple(sizes)} fits stacks {dict(space.depths)}")
    score = _Scorer(model, task, **{"split": "dev", "limit": 64, "align_split": "train", "align_words": 256,
                                    "align_tokens": 5000, "anchor": "middle", "method": "permute",
                                    "batch_size": 64, **kw})
    return pd.DataFrame([score(ws) for ws in tqdm(sets, desc=f"every {windows}-window set", disable=not progress)])


def greedy_vs_exhaustive(greedy: pd.DataFrame, every: pd.DataFrame) -> dict:
    """Where the greedy set of the same size ranks among every set: rank (1 = best), NLL gap to the
    best, and the evaluations each needed."""
    n = int(every.windows.iloc[0])
    row = greedy[greedy.windows == n]
    if row.empty:
        raise ValueError(f"the greedy run has no {n}-window set; run it with steps >= {n}")
    g = row.iloc[0]
    return {"windows": n, "sets": len(every), "greedy_nll": float(g.nll), "best_nll": float(every.nll.min()),
            "gap": float(g.nll - every.nll.min()), "rank": int((every.nll < g.nll - 1e-9).sum() + 1),
            "greedy_is_best": bool(g.specs == every.loc[every.nll.idxmin(), "specs"]),
            "evals_greedy": int(g.evaluations), "evals_exhaustive": len(every)}
