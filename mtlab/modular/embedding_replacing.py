"""Modular Transformers for a sentence-embedding encoder (all-MiniLM-L6-v2): module replacing
with distillation, without the seq2seq terms.

The recipe is `mtlab.modular.replacing`'s (Theseus + KD, every granularity in ONE run, the
original frozen): each step a tiling is sampled per stack (`sample_tilings`, replacement
probability rising linearly), the sampled mix of modules and original layers runs through
the frozen teacher's own embeddings (`surgery.swapped`), and only the modules train. An
encoder has no labels and no logits, so the loss is

* `w_emb` x (1 - cos) between the mean-pooled sentence embeddings (`embedding.mean_pool`,
  the sentence-transformers recipe) of the sampled mix and of the original;
* `w_hidden` x relative MSE (`relative_mse`) to the original's hidden state at each span
  boundary of the sampled tiling, padding excluded;
* `w_local` x `local_loss`: modules of one granularity, drawn per step, fed the original's
  input to their span, regress the original's output of the span.

Assemble with `mtlab.modular.assemble` (plain model of the teacher's class, fewer layers).
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from ..embedding import mean_pool
from ..train import TrainConfig, on_main_process, train
from .bank import ModuleBank
from .replacing import Replacer, local_loss, relative_mse, student_pass, teacher_pass, token_share

__all__ = ["EmbeddingReplacingConfig", "embedding_replacing_loss", "train_embedding_modules"]


@dataclass
class EmbeddingReplacingConfig:
    granularities: tuple[int, ...] = (2, 3, 6)
    init: str = "last"               # teacher layer of its span a module starts from (as replacing.py)
    p_start: float = 0.1             # replacement probability at step 0 ...
    p_end: float = 1.0               # ... rising linearly to p_end at ramp * steps
    ramp: float = 0.8
    w_emb: float = 1.0               # 1 - cos of the mean-pooled sentence embeddings
    w_hidden: float = 1.0            # relative MSE to the original's hidden state at each span boundary
    w_local: float = 1.0             # span-local regression of one granularity's modules per step
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=3000, batch_size=64, lr=3e-4, warmup=100, log_every=50, ckpt_every=250))

    def p_at(self, step: int) -> float:
        t = min(1.0, step / max(1, self.ramp * self.train.steps))
        return self.p_start + (self.p_end - self.p_start) * t


def embedding_replacing_loss(cfg: EmbeddingReplacingConfig, seed: int = 0):
    """loss_fn for mtlab.train: teacher pass (targets), sampled mixed pass, weighted loss
    (see the module doc). Sampling depends on (seed, step) only, so a resumed run is identical."""
    if min(cfg.w_emb, cfg.w_hidden, cfg.w_local) < 0 or cfg.w_emb + cfg.w_hidden + cfg.w_local == 0:
        raise ValueError(f"loss weights must be >= 0 and not all 0, got w_emb={cfg.w_emb}, w_hidden={cfg.w_hidden}, "
                         f"w_local={cfg.w_local}")

    def loss_fn(model: Replacer, batch, step: int):
        rng = random.Random(seed * 1_000_003 + step)
        stacks = list(model.originals)
        share = token_share(batch)  # relative MSEs are ratios over the global batch (replacing.relative_mse)
        mask = batch.attention_mask.bool()
        inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        t_out, t_hidden, span_inputs = teacher_pass(model, inputs, local=cfg.w_local > 0)
        e_t = mean_pool(t_out.last_hidden_state, inputs["attention_mask"])
        p = cfg.p_at(step)
        s_out, tilings, plan_blocks, s_hidden = student_pass(model, inputs, p, rng)
        cos = F.cosine_similarity(mean_pool(s_out.last_hidden_state, batch.attention_mask), e_t, dim=-1)
        emb = (1 - cos).mean()
        terms = [relative_mse(out.float()[mask], t_hidden[s][end].float()[mask], share)
                 for s in stacks for out, end in zip(s_hidden[s], plan_blocks[s][1])]
        hidden = torch.stack(terms).mean()
        loss = cfg.w_emb * emb + cfg.w_hidden * hidden
        parts = {"emb_cos": cos.mean().item(), "hidden_mse": hidden.item()}
        if cfg.w_local > 0:
            ks = {s: (rng.choice(model.bank.granularities[s]),) for s in stacks if model.bank.granularities.get(s)}
            local = local_loss(model, span_inputs, t_hidden, {s: mask for s in stacks}, ks, share)
            loss = loss + cfg.w_local * local
            parts["local_mse"] = local.item()
        return loss, {**parts, "p": p, "modules_in": sum(k > 1 for t in tilings.values() for k in t)}

    return loss_fn


def train_embedding_modules(teacher: nn.Module, task, cfg: EmbeddingReplacingConfig, out_dir: str | Path, *,
                            max_seconds: float | None = None, progress: bool = True,
                            evaluate=None) -> tuple[ModuleBank, pd.DataFrame]:
    """Build the bank from `teacher` (an encoder returning last_hidden_state, e.g. BertModel) and
    train every module in ONE run on `task`'s `cfg.train.split` (a `SentencesTask`); the teacher
    is frozen in place (requires_grad off). Resumable from out_dir/checkpoint; the finished bank
    is saved to out_dir/bank. Returns (bank, per-step log with the config in attrs)."""
    out = Path(out_dir)
    bank = ModuleBank.build(teacher, cfg.granularities, cfg.init)
    model = Replacer(teacher, bank)
    log = train(model, task, cfg.train, out, params=list(bank.parameters()),
                loss_fn=embedding_replacing_loss(cfg, cfg.train.seed), max_seconds=max_seconds, progress=progress,
                evaluate=evaluate)
    bank.eval()
    if len(log) and int(log.step.max()) >= cfg.train.steps:
        on_main_process(lambda: bank.save(out / "bank", {"config": asdict(cfg)}))
    log.attrs["config"] = asdict(cfg)
    return bank, log
