"""Recovery fine-tuning of a merged (tied) or pruned model: the last step of the FF-merging
recipe (docs/methods.md, section 2), through the one training loop `mtlab.train.train`."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from ..measure import count_params
from .build import check_ties, tie_groups
from .merge import save_merged
from .windows import refuse_test

__all__ = ["recover"]


def recover(model: nn.Module, task, cfg, out_dir: str | Path, *, loss_fn=None, evaluate=None,
            max_seconds: float | None = None, progress: bool = True, save: bool = True,
            meta: dict | None = None, fresh: bool = False):
    """Recovery fine-tune of a merged (tied) or pruned model on `cfg.split` (train) with
    `mtlab.train.train`, in place; resumable: rerun with the same `out_dir` (and a model built
    the same way) to continue from `out_dir/checkpoint`. The checkpoint records the weights hash of
    the model as given, the hash of the training data and the config (plus `meta`, e.g. the hash of
    a distillation teacher): an `out_dir` holding a run of another model, data or config is refused
    with `mtlab.train.RunMismatchError` naming the field, never resumed; `fresh=True` deletes that
    run first. Tied parameters appear once in
    `model.parameters()`, so the optimizer updates one shared copy and the ties hold; this is
    checked after training (AssertionError otherwise), as is the unchanged parameter count.
    When training is complete and `save`, the model is written to `out_dir/model` with
    `save_merged` (load it with `load_merged`). Returns (model in eval mode, log DataFrame).
    The paper's recipe: AdamW, lr ~5e-5, a short run.
    """
    from ..train import on_main_process, train

    refuse_test(cfg.split, "cfg.split")
    check_ties(model)
    before = [(name, [id(p) for p in ps]) for name, ps in tie_groups(model)]
    n0 = count_params(model)
    log = train(model, task, cfg, out_dir, loss_fn=loss_fn, evaluate=evaluate, max_seconds=max_seconds,
                progress=progress, meta=meta, fresh=fresh)
    check_ties(model)
    after = [(name, [id(p) for p in ps]) for name, ps in tie_groups(model)]
    if after != before:
        raise AssertionError("training replaced tied Parameter objects; the merged sets are no longer shared")
    if count_params(model) != n0:
        raise AssertionError(f"parameter count changed during training: {n0} -> {count_params(model)}")
    done = bool(len(log)) and "step" in log and int(log.step.max()) >= cfg.steps
    if save and done:
        on_main_process(lambda: save_merged(model, Path(out_dir) / "model"))
    return model.eval(), log
