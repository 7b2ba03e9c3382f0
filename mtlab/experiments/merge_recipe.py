"""The FF-merging study's fixed recipe: alignment batches, the merge anchor, the combined candidate's
size, the recovery budgets and the control's fine-tune. One module read by the study
(`experiments.merging`), the shipped artifacts' cards (`merge_artifacts`) and `make merges`
(`merge_training`) alike, so none of them imports another to learn how the others were made."""
from __future__ import annotations

import copy
from dataclasses import replace

from ..merging.recover import recover
from ..profiles import MergingProfile
from ..train import TrainConfig

__all__ = ["ALIGN_BATCH", "SEED", "ANCHOR", "COMBINED_SIZE", "CONTROL", "align_batches", "recovery_config",
           "combined_recovery_config", "fine_tuned_control"]

ALIGN_BATCH, SEED = 64, 0        # alignment batches: shuffled train split, as window_search builds them
ANCHOR = "middle"
COMBINED_SIZE = 3                # the combined candidate: one 3-layer set per stack (4 of 12 FF for 6+6)
CONTROL = "original (fine-tuned)"  # the method of the control row: the original fine-tuned like the recovered rows


def align_batches(task):
    return lambda: task.iter_batches("train", ALIGN_BATCH, shuffle=True, seed=SEED)


def recovery_config(m: MergingProfile) -> TrainConfig:
    """ONE recovery budget for every method: same steps, batch, lr schedule and data order (seed)."""
    steps = m.recovery_steps
    return TrainConfig(steps=steps, batch_size=m.recovery_batch_size, lr=m.recovery_lr, warmup=steps // 10,
                       label_smoothing=0.1, precision="no", seed=SEED, log_every=max(1, steps // 5),
                       ckpt_every=max(1, steps))


def fine_tuned_control(model, task, cfg: TrainConfig, out_dir, *, progress: bool = False, save: bool = False):
    """The control of a recovery: a trainable copy of the original (left as it is) fine-tuned by `recover`
    with the recovery config `cfg` of the merges it is compared with (same steps, batch, lr, seed:
    the same batches), resumable in `out_dir`. Returns (model in eval mode, log)."""
    return recover(copy.deepcopy(model).train().requires_grad_(True), task, cfg, out_dir, progress=progress, save=save)


def combined_recovery_config(m: MergingProfile) -> TrainConfig:
    """The recovery budget of the combined candidates: `combined_recovery_steps` (None: the windows'
    `recovery_config`), same batch, lr and seed; a checkpoint every 100 steps at most, so a long
    run resumes (the shipped ones: `make merges`, mtlab/experiments/merge_artifacts.py)."""
    if m.combined_recovery_steps is None:
        return recovery_config(m)
    cfg = recovery_config(replace(m, recovery_steps=m.combined_recovery_steps))
    return replace(cfg, ckpt_every=min(cfg.ckpt_every, 100))
