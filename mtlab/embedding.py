"""Sentence-embedding models (all-MiniLM-L6-v2 and its compressed versions): pooling, scores
against the original model, and recovery by distilling the original's embeddings.

Embeddings are the mean of the last hidden states over the non-padding tokens, as the
model was trained (sentence-transformers), L2-normalised for scoring. A compressed model is
scored against the ORIGINAL on the same sentences, so no labels are needed:

* mean_cos: mean over sentences of cos(original_i, compressed_i);
* recall_at_k: mean overlap of each sentence's k nearest neighbours (cosine, among the other
  sentences of the set) under the two models;
* spearman: Spearman correlation of all pairwise sentence similarities under the two models
  (scipy), i.e. whether the compressed model ranks sentence pairs alike.

The original against itself scores 1.0 / 1.0 / 1.0.

Recovery (`recover_embeddings`) fine-tunes a merged or pruned model through mtlab's one
training loop (`mtlab.merging.recover.recover` -> `mtlab.train.train`: accelerate, resumable,
progress, CSV log) on a `SentencesTask` train split, with the loss `distillation_loss`:
1 - cos(student, original) of the pooled embeddings, plus optionally `hidden_weight` times the
normalised MSE of hidden states (the last layer's by default, or pairs given by `layer_map`).
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import nn
from tqdm.auto import tqdm

from .runtime import adaptive

__all__ = ["mean_pool", "pooled", "embed_split", "mean_cosine", "neighbour_recall", "pairwise_spearman",
           "embedding_scores", "evaluate_embeddings", "distillation_loss", "recover_embeddings", "save_encoder"]


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[batch, d] float32 mean of `hidden` [batch, positions, d] over the positions where the mask is 1."""
    m = attention_mask.unsqueeze(-1).to(torch.float32)
    return (hidden.float() * m).sum(1) / m.sum(1).clamp_min(1e-9)


def pooled(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
           hidden_states: bool = False):
    """(pooled embeddings [batch, d], hidden states tuple or None) of one batch, with grad if enabled."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=hidden_states)
    return mean_pool(out.last_hidden_state, attention_mask), (out.hidden_states if hidden_states else None)


@torch.no_grad()
def embed_split(model: nn.Module, task, split: str, limit: int | None = None, batch_size: int = 64,
                progress: bool = False) -> torch.Tensor:
    """[n, d] L2-normalised float32 CPU embeddings of a task split's first `limit` sentences, in order."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    index_batches = task.batches(split, batch_size, limit=limit)
    n = sum(len(b) for b in index_batches)
    out = None
    try:
        for index in adaptive(tqdm(index_batches, desc=f"embed {split}", disable=not progress, leave=False)):
            b = task.collate(split, index).to(device)
            e = F.normalize(pooled(model, b.input_ids, b.attention_mask)[0], dim=1).cpu()
            if out is None:
                out = torch.empty(n, e.shape[1])
            out[index] = e
    finally:
        model.train(was_training)
    if out is None:
        raise ValueError(f"split {split!r} has no sentences to embed")
    return out


# ---------------------------------------------------------------------------
# scores against the original

def _pair(original: torch.Tensor, compressed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = torch.as_tensor(original).float(), torch.as_tensor(compressed).float()
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"embeddings must be two [n, d] tensors of one shape, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}: embed the same sentences with both models")
    if a.shape[0] < 2:
        raise ValueError("scores need at least 2 sentences")
    return F.normalize(a, dim=1), F.normalize(b, dim=1)


def mean_cosine(original: torch.Tensor, compressed: torch.Tensor) -> float:
    a, b = _pair(original, compressed)
    return float((a * b).sum(1).mean())


def neighbour_recall(original: torch.Tensor, compressed: torch.Tensor, k: int = 10) -> float:
    """Mean |kNN_orig(i) & kNN_comp(i)| / k over sentences; neighbours among the OTHER sentences
    (k clipped to n-1 for tiny sets)."""
    a, b = _pair(original, compressed)
    kk = min(k, a.shape[0] - 1)

    def knn(e: torch.Tensor) -> torch.Tensor:
        sim = e @ e.T
        sim.fill_diagonal_(float("-inf"))
        return sim.topk(kk, dim=1).indices

    na, nb = knn(a), knn(b)
    return float(((na.unsqueeze(2) == nb.unsqueeze(1)).any(2).sum(1).float() / kk).mean())


def pairwise_spearman(original: torch.Tensor, compressed: torch.Tensor) -> float:
    """Spearman correlation of the n(n-1)/2 pairwise cosine similarities under the two models."""
    a, b = _pair(original, compressed)
    iu = torch.triu_indices(a.shape[0], a.shape[0], offset=1)
    sa, sb = (a @ a.T)[iu[0], iu[1]].double().numpy(), (b @ b.T)[iu[0], iu[1]].double().numpy()
    if np.array_equal(sa, sb):
        return 1.0
    return float(spearmanr(sa, sb).statistic)


def embedding_scores(original: torch.Tensor, compressed: torch.Tensor, k: int = 10) -> dict[str, float]:
    """{"mean_cos", f"recall_at_{k}", "spearman"} of compressed embeddings against the original ones."""
    return {"mean_cos": mean_cosine(original, compressed), f"recall_at_{k}": neighbour_recall(original, compressed, k),
            "spearman": pairwise_spearman(original, compressed)}


def evaluate_embeddings(original: nn.Module | torch.Tensor, model: nn.Module, task, split: str = "test",
                        limit: int | None = None, k: int = 10, batch_size: int = 64,
                        progress: bool = False) -> dict:
    """`embedding_scores` of `model` against `original` (a model, or its embeddings of the same
    sentences) on a task split; plus split and n."""
    ref = original if isinstance(original, torch.Tensor) else embed_split(original, task, split, limit, batch_size,
                                                                          progress)
    got = embed_split(model, task, split, limit, batch_size, progress)
    return {"split": split, "n": got.shape[0], **embedding_scores(ref, got, k)}


# ---------------------------------------------------------------------------
# recovery by distillation

def _hidden_term(hs, ht, mask: torch.Tensor, layer_map: Mapping[int, int] | None) -> torch.Tensor:
    """Mean over layer pairs of MSE(student, teacher) / mean square of the teacher, non-padding tokens."""
    pairs = dict(layer_map) if layer_map else {-1: -1}
    m = mask.bool()
    terms = []
    for s, t in pairs.items():
        try:
            xs, xt = hs[s][m].float(), ht[t][m].float()
        except IndexError:
            raise ValueError(f"layer_map pair {s}: {t} is out of range: the student has {len(hs)} hidden states "
                             f"and the teacher {len(ht)} (embeddings are index 0)") from None
        terms.append(F.mse_loss(xs, xt) / xt.square().mean().clamp_min(1e-12))
    return torch.stack(terms).mean()


def distillation_loss(teacher: nn.Module, hidden_weight: float = 0.0,
                      layer_map: Mapping[int, int] | None = None):
    """A `mtlab.train` loss_fn: 1 - cos(student, teacher) of the mean-pooled sentence embeddings,
    plus `hidden_weight` x normalised hidden-state MSE (`layer_map` {student: teacher} hidden-state
    indices, default the last layer of each). The teacher runs without grad, in eval mode."""
    if hidden_weight < 0:
        raise ValueError(f"hidden_weight must be >= 0, got {hidden_weight}")
    teacher.eval()
    want_hidden = hidden_weight > 0

    def loss_fn(model, batch, step):
        device = batch.input_ids.device
        if next(teacher.parameters()).device != device:
            teacher.to(device)
        with torch.no_grad():
            et, ht = pooled(teacher, batch.input_ids, batch.attention_mask, want_hidden)
        es, hs = pooled(model, batch.input_ids, batch.attention_mask, want_hidden)
        cos = F.cosine_similarity(es, et, dim=-1)
        loss = (1 - cos).mean()
        parts = {"emb_cos": cos.mean().item()}
        if want_hidden:
            h = _hidden_term(hs, ht, batch.attention_mask, layer_map)
            loss = loss + hidden_weight * h
            parts["hidden_mse"] = h.item()
        return loss, parts

    return loss_fn


def recover_embeddings(model: nn.Module, original: nn.Module, task, cfg, out_dir: str | Path, *,
                       hidden_weight: float = 0.0, layer_map: Mapping[int, int] | None = None,
                       eval_limit: int | None = 500, progress: bool = True, save: bool = True,
                       fresh: bool = False, evaluate=None):
    """Fine-tune `model` (merged or pruned; in place) to reproduce `original`'s sentence embeddings
    on `task`'s `cfg.split` (train), through `mtlab.merging.recover.recover` (the one training
    loop; resumable from out_dir). The run records the weights hashes of `model` and `original`,
    the data's hash and the loss settings: an out_dir holding a run of another model, original or
    data raises `mtlab.train.RunMismatchError` naming the field (`fresh=True` deletes it first).
    Logs dev scores on `eval_limit` dev sentences at each evaluation, or `evaluate(model) -> dict`'s
    (e.g. test scores for recovery curves, `mtlab.curves`). Returns (model in eval mode, log DataFrame)."""
    from .merging.recover import recover
    from .modular.bank import weights_hash

    if evaluate is None:
        ref_dev = embed_split(original, task, "dev", eval_limit)

        def evaluate(m):
            return embedding_scores(ref_dev, embed_split(m, task, "dev", eval_limit))

    meta = {"teacher_hash": weights_hash(original), "hidden_weight": float(hidden_weight),
            "layer_map": {str(k): v for k, v in dict(layer_map).items()} if layer_map else None}
    return recover(model, task, cfg, out_dir, loss_fn=distillation_loss(original, hidden_weight, layer_map),
                   evaluate=evaluate, progress=progress, save=save, meta=meta, fresh=fresh)


# ---------------------------------------------------------------------------
# saving a compressed encoder as a plain transformers model

def save_encoder(model: nn.Module, path: str | Path, task=None) -> Path:
    """Save a compressed encoder (layers dropped, modules assembled, FF sublayers merged) so that
    plain `transformers.AutoModel.from_pretrained(path)` loads it and gives the same embeddings:
    `mtlab.export.export` (FF ties written as plain copies, atomic, reload checked on the task's dev
    sentences; the task's tokenizer saved beside the weights)."""
    from .export import export

    return export(model, path, task=task)
