"""Logit distillation from a frozen teacher, as a loss_fn for `mtlab.train.train`.

    loss = w_ce * CE(student, labels) + w_kd * T^2 * KL(teacher_T || student_T)

over the non-padding label positions (labels != -100), where `_T` is the softmax at
temperature T. `logit_kd` is also the KD term of `mtlab.modular.replacing.replacing_loss`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .tasks.base import Batch


@dataclass
class DistillConfig:
    w_ce: float = 1.0          # task cross-entropy on the labels
    w_kd: float = 1.0          # logit distillation (KL at temperature T, times T^2)
    temperature: float = 2.0

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}; the usual choice is 1-4 (default 2.0)")
        if self.w_ce < 0 or self.w_kd < 0:
            raise ValueError(f"loss weights must be >= 0, got w_ce={self.w_ce}, w_kd={self.w_kd}")
        if self.w_ce == 0 and self.w_kd == 0:
            raise ValueError("w_ce and w_kd are both 0: nothing to train on; set at least one > 0")


def logit_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, keep: torch.Tensor,
             temperature: float) -> torch.Tensor:
    """KL(teacher || student) at temperature T, times T^2, averaged over the `keep` positions."""
    T = temperature
    return F.kl_div(F.log_softmax(student_logits.float()[keep] / T, -1),
                    F.log_softmax(teacher_logits.float()[keep] / T, -1),
                    log_target=True, reduction="batchmean") * T * T


def teacher_logits(teacher: nn.Module, inputs: dict) -> torch.Tensor:
    """Logits of the frozen teacher: eval mode (dropout off), no grad; its train/eval flag is restored.
    The teacher is moved to the inputs' device on first use (train() only moves the student)."""
    device = inputs["input_ids"].device
    if next(teacher.parameters()).device != device:
        teacher.to(device)
    was_training = teacher.training
    teacher.eval()
    try:
        with torch.no_grad():
            return teacher(**inputs).logits
    finally:
        teacher.train(was_training)


def distill_loss(teacher: nn.Module, cfg: DistillConfig | None = None):
    """loss_fn(model, batch, step) -> (loss, {"ce", "kd"}) for mtlab.train: the student (`model`)
    against `teacher`, which is never trained (its forward runs without grad, in eval mode).
    With w_kd == 0 the teacher is not run at all (plain fine-tuning)."""
    cfg = cfg or DistillConfig()

    def loss_fn(model: nn.Module, batch: Batch, step: int):
        inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels,
                      use_cache=False)
        t_logits = teacher_logits(teacher, inputs) if cfg.w_kd else None
        s_logits = model(**inputs).logits
        labels = batch.labels
        keep = labels != -100
        ce = F.cross_entropy(s_logits.float()[keep], labels[keep])
        kd = logit_kd(s_logits, t_logits, keep, cfg.temperature) if t_logits is not None else ce.new_zeros(())
        loss = cfg.w_ce * ce + cfg.w_kd * kd
        return loss, {"ce": ce.item(), "kd": kd.item()}

    return loss_fn
