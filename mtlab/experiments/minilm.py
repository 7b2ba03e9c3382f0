"""FF merging on all-MiniLM-L6-v2 as the paper does it (Verma, Murray, Duh 2025), at equal
parameters removed, before and after one recovery budget.

For each target share of parameters removed (default ~10% and ~20%):

* merges: a window of k adjacent layers whose FF sublayers are tied into one (k-1 FF sublayers
  removed), k chosen so that the share removed is closest to the target; permute and vanilla;
* layer pruning: a window whose first block is kept and the b blocks after it dropped, b chosen
  the same way (blocks also carry attention, so b < k-1; the actual shares are reported);
* every window is scored on dev sentences by mean cosine to the original embeddings
  (`mtlab.merging.search.window_search`), the best window per method is kept;
* each kept model is scored on the test sentences, then fine-tuned with the SAME recovery budget
  (steps, batch, lr, seed: `mtlab.embedding.recover_embeddings`, distilling the original's
  embeddings on the train split) and scored on test again.

Data: `mtlab.tasks.sentences` (train: alignment statistics and recovery; dev: window selection;
test: only the final numbers of the kept models).
"""
from __future__ import annotations

import tempfile
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from ..anatomy import anatomy
from ..embedding import embed_split, embedding_scores, recover_embeddings
from ..merging.search import CorrelationCache, build_candidate, count_params, window_search
from ..train import TrainConfig

__all__ = ["equal_removal_plan", "minilm_ff_merging", "RECOVERY"]

STACK = "layers"
RECOVERY = TrainConfig(steps=300, batch_size=32, lr=5e-5, warmup=30, log_every=50, ckpt_every=100, eval_every=0)


def equal_removal_plan(model: nn.Module, targets=(0.10, 0.20), stack: str = STACK) -> pd.DataFrame:
    """Per target share: merge window size (k-1 FF sublayers tied away) and pruning window size
    (b+1, b blocks dropped), each the count closest to the target, with the shares they remove."""
    st = anatomy(model).stack(stack)
    total = count_params(model)
    ff = sum(p.numel() for p in st.layer(0).ff.params())
    block = sum(p.numel() for p in st.layer(0).block.parameters())
    depth = len(st)
    rows = []
    for t in targets:
        if not 0 < t < 1:
            raise ValueError(f"targets are shares of the parameters, in (0, 1); got {t}")
        n_ff = max(1, round(t * total / ff))
        n_blocks = max(1, round(t * total / block))
        if n_ff > depth - 1 or n_blocks > depth - 1:
            most = (depth - 1) * ff / total
            raise ValueError(f"removing {t:.0%} of the parameters needs {n_ff} FF sublayers / {n_blocks} blocks but "
                             f"stack {stack!r} has {depth} layers: at most {most:.1%} by merging; lower the target")
        rows.append({"target": t, "merge_size": n_ff + 1, "merge_share": n_ff * ff / total,
                     "prune_size": n_blocks + 1, "prune_share": n_blocks * block / total})
    return pd.DataFrame(rows)


def _search(model, task, size: int, prune_size: int, methods, cache, select_limit, progress) -> pd.DataFrame:
    """Dev window search of the merges at `size` and of pruning at `prune_size`; best rows only."""
    ref = embed_split(model, task, "dev", select_limit)

    def score(m):
        return embedding_scores(ref, embed_split(m, task, "dev", select_limit))

    common = dict(score_fn=score, metric="mean_cos", higher_is_better=True, cache=cache, progress=progress,
                  align_batches=cache.batches_fn, include_original=False)
    parts = []
    if methods:
        parts.append(window_search(model, None, STACK, sizes=(size,), methods=methods, include_pruning=False,
                                   **common))
    parts.append(window_search(model, None, STACK, sizes=(prune_size,), methods=(), include_pruning=True, **common))
    df = pd.concat(parts, ignore_index=True)
    return df[df.best].rename(columns={c: f"dev_{c}" for c in ("mean_cos", "recall_at_10", "spearman")})


def _test_row(base: dict, stage: str, scores: dict, steps: int) -> dict:
    return {**base, "stage": stage, "recovery_steps": steps, **{f"test_{k}": v for k, v in scores.items()}}


def minilm_ff_merging(model: nn.Module | None = None, tokenizer=None, task=None, *, targets=(0.10, 0.20),
                      methods=("permute", "vanilla"), recovery: TrainConfig = RECOVERY, align_tokens: int = 10_000,
                      select_limit: int | None = 500, eval_limit: int | None = None, hidden_weight: float = 0.0,
                      out_dir: str | Path | None = None, progress: bool = True) -> pd.DataFrame:
    """Permute vs vanilla merging vs layer pruning at equal parameters removed (see the module doc).

    One row per (target, method, stage): stage "selected" (test scores of the dev-chosen window)
    and "recovered" (after `recovery`, the same for every method), plus the original. Columns:
    target, method, spec, layers, params, params_removed_share, stage, recovery_steps,
    dev_mean_cos (selection), test_mean_cos, test_recall_at_10, test_spearman.
    `model`/`tokenizer` default to all-MiniLM-L6-v2, `task` to the full sentence corpus;
    recovery runs live in `out_dir` (default: a temporary directory) and resume from it."""
    from ..minilm import load_minilm
    from ..tasks.sentences import SentencesTask

    if model is None or tokenizer is None:
        model, tokenizer = load_minilm()
    task = task or SentencesTask(tokenizer)
    plan = equal_removal_plan(model, targets)
    cache = CorrelationCache(model, lambda: task.iter_batches("train", 64, shuffle=True, seed=0),
                             max_tokens=align_tokens)
    ref_test = embed_split(model, task, "test", eval_limit)
    n0 = count_params(model)
    rows = [_test_row({"target": 0.0, "method": "original", "spec": "original", "layers": "", "params": n0,
                       "params_removed_share": 0.0, "dev_mean_cos": 1.0}, "original",
                      embedding_scores(ref_test, ref_test), 0)]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(out_dir) if out_dir is not None else Path(tmp)
        for p in plan.itertuples():
            best = _search(model, task, p.merge_size, p.prune_size, list(methods), cache, select_limit, progress)
            for r in best.itertuples():
                cand = build_candidate(model, r.spec, cache=cache)
                base = {"target": p.target, "method": r.method, "spec": r.spec, "layers": r.layers,
                        "params": r.params, "params_removed_share": r.params_removed_share,
                        "dev_mean_cos": r.dev_mean_cos}
                rows.append(_test_row(base, "selected", _scores(cand, task, ref_test, eval_limit), 0))
                run = root / f"{p.target:.2f}_{r.method}"
                cand, _ = recover_embeddings(cand, model, task, recovery, run, hidden_weight=hidden_weight,
                                             eval_limit=select_limit, progress=progress, save=out_dir is not None)
                rows.append(_test_row(base, "recovered", _scores(cand, task, ref_test, eval_limit), recovery.steps))
                del cand
    df = pd.DataFrame(rows)
    df.attrs["config"] = {"targets": list(targets), "plan": plan.to_dict("records"), "methods": list(methods),
                          "recovery": asdict(recovery), "hidden_weight": hidden_weight, "align_tokens": align_tokens,
                          "select_limit": select_limit, "eval_limit": eval_limit, "task": task.source,
                          "sentences": task.sizes(), "selected_on": "dev mean_cos", "original_params": n0}
    return df


def _scores(model: nn.Module, task, ref_test: torch.Tensor, limit: int | None) -> dict:
    return embedding_scores(ref_test, embed_split(model, task, "test", limit))
