"""The task interface every seq2seq task in mtlab implements.

A task owns its text splits, how text becomes token ids and back, and how
predictions are scored. Batching, decoding and evaluation are written once
here so the G2P task and users' own text pairs behave identically.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from ..runtime import adaptive

SPLITS = ("train", "dev", "test")


@dataclass
class Batch:
    """A padded batch: labels use -100 where there is padding."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    index: list[int]

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device), self.index)

    def model_inputs(self) -> dict:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "labels": self.labels}


def fresh_cache(model):
    """A KV cache that grows with the decoder it serves.

    transformers 5.x sizes its default cache from `config.num_hidden_layers`, which for T5 and
    BART is the ENCODER depth: an assembly or pruned model whose decoder is deeper than its
    encoder then fails in `generate`. Passing an empty cache (no config) avoids that."""
    from transformers import DynamicCache, EncoderDecoderCache

    if getattr(model.config, "is_encoder_decoder", False):
        return EncoderDecoderCache(DynamicCache(), DynamicCache())
    return DynamicCache()


class ModelMismatchError(ValueError):
    """The model cannot serve this task: its vocabulary or special token ids differ from the task's."""


class NonFiniteWeightsError(ValueError):
    """A model weight is NaN or infinite: every score computed from it would be meaningless."""


def check_finite(model) -> None:
    """Raise NonFiniteWeightsError naming the first parameter (or buffer) with NaN/inf values."""
    named = list(model.named_parameters()) + list(model.named_buffers())
    for name, t in named:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise NonFiniteWeightsError(
                f"{name} holds {bad} NaN/inf value(s) of {t.numel()}: the model is broken, so its scores would be "
                "meaningless. Reload the weights from the last good checkpoint (a training run that diverged "
                "stops with NonFiniteLossError), or lower the learning rate / use precision='no' and retrain")


def _vocab_rows(model) -> int | None:
    try:
        emb = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    return getattr(emb, "num_embeddings", None)


def cache_kwargs(model) -> dict:
    """`generate(**cache_kwargs(model))`: a fresh cache under the keyword this transformers reads
    (`cache` from 5.2x on, where `past_key_values` is deprecated and warns on every call)."""
    try:
        from transformers.generation.utils import ALL_CACHE_NAMES
        name = "cache" if "cache" in ALL_CACHE_NAMES else "past_key_values"
    except ImportError:
        name = "past_key_values"
    return {name: fresh_cache(model)}


def pad(seqs: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out


class Seq2SeqTask:
    """Base class: subclasses fill `self.splits` and implement the four codec/score methods."""

    name = "seq2seq"
    pad_id = 0
    #: the id that ends a target sequence, when the task knows it (checked against the model's)
    eos_id: int | None = None
    #: name of the metric that model selection minimises or maximises, and its direction
    primary_metric = "loss"
    higher_is_better = False

    def __init__(self) -> None:
        self.splits: dict[str, tuple[list[str], list[str]]] = {}
        self._encoded: dict[str, tuple[list[list[int]], list[list[int]]]] = {}

    # ---- to implement -------------------------------------------------------------------
    def encode_source(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_target(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode_target(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def score(self, hypotheses: list[str], references: list[str]) -> dict[str, float]:
        raise NotImplementedError

    # ---- shared ---------------------------------------------------------------------------
    def max_id(self, split: str) -> int:
        """The largest token id in a split's sources and targets."""
        src, tgt = self.encoded(split)
        return max((max(s) for s in (*src, *tgt) if s), default=-1)

    def check_model(self, model, splits: Sequence[str] | None = None) -> None:
        """Refuse a model whose vocabulary or special ids do not match this task's tokenization
        (otherwise torch fails with a bare `index out of range`, or decoding is silently wrong)."""
        tok = getattr(self, "tokenizer", None)
        task_vocab = len(tok) if tok is not None and hasattr(tok, "__len__") else None
        rows = _vocab_rows(model)
        fix = ("build the task with the model's own tokenizer (e.g. AutoTokenizer.from_pretrained(<the model's "
               "folder>)), or load the model that belongs to this tokenizer")
        if rows is not None:
            for split in splits if splits is not None else list(self.splits):
                top = self.max_id(split)
                if top >= rows:
                    raise ModelMismatchError(
                        f"task {self.name!r} produces token id {top} in split {split!r} (tokenizer vocabulary "
                        f"{task_vocab if task_vocab is not None else 'unknown'}), but the model's embedding has "
                        f"only {rows} rows (vocab_size {getattr(model.config, 'vocab_size', '?')}): the tokenizer "
                        f"does not belong to this model; {fix}")
        config = getattr(model, "config", None)
        model_pad = getattr(config, "pad_token_id", None)
        if model_pad is not None and int(model_pad) != int(self.pad_id):
            raise ModelMismatchError(f"the model's pad_token_id is {model_pad} but task {self.name!r} pads with "
                                     f"{self.pad_id} (model vocab {rows}, tokenizer vocab {task_vocab}); {fix}")
        gen = getattr(model, "generation_config", None)
        model_eos = getattr(gen, "eos_token_id", None) if gen is not None else None
        if model_eos is None:
            model_eos = getattr(config, "eos_token_id", None)
        task_eos = self.eos_id if self.eos_id is not None else getattr(tok, "eos_token_id", None)
        if model_eos is not None and task_eos is not None:
            eos = set(model_eos) if isinstance(model_eos, (list, tuple)) else {model_eos}
            if int(task_eos) not in {int(e) for e in eos}:
                raise ModelMismatchError(f"the model ends sequences with eos_token_id {model_eos} but task "
                                         f"{self.name!r} uses {task_eos} (model vocab {rows}, tokenizer vocab "
                                         f"{task_vocab}); {fix}")

    def texts(self, split: str, limit: int | None = None) -> tuple[list[str], list[str]]:
        if split not in self.splits:
            raise KeyError(f"unknown split {split!r}; this task has {sorted(self.splits)}")
        src, tgt = self.splits[split]
        return (src[:limit], tgt[:limit]) if limit else (src, tgt)

    def encoded(self, split: str) -> tuple[list[list[int]], list[list[int]]]:
        if split not in self._encoded:
            src, tgt = self.texts(split)
            self._encoded[split] = ([self.encode_source(s) for s in src], [self.encode_target(t) for t in tgt])
        return self._encoded[split]

    def collate(self, split: str, index: Sequence[int]) -> Batch:
        src, tgt = self.encoded(split)
        input_ids = pad([src[i] for i in index], self.pad_id)
        labels = pad([tgt[i] for i in index], -100)
        return Batch(input_ids, (input_ids != self.pad_id).long(), labels, list(index))

    def batches(
        self,
        split: str,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        epoch: int = 0,
        limit: int | None = None,
    ) -> list[list[int]]:
        """Index lists of length-bucketed batches. Shuffled order depends only on (seed, epoch),
        so a resumed run sees exactly the batches an uninterrupted run would."""
        src, _ = self.encoded(split)
        n = min(len(src), limit) if limit else len(src)
        idx = list(range(n))
        rng = random.Random(seed * 100_003 + epoch)
        if shuffle:
            rng.shuffle(idx)
        # bucket: sort chunks of 50 batches by length so padding stays small
        chunk = batch_size * 50
        out = []
        for c in range(0, n, chunk):
            part = sorted(idx[c : c + chunk], key=lambda i: len(src[i]))
            out += [part[b : b + batch_size] for b in range(0, len(part), batch_size)]
        if shuffle:
            rng.shuffle(out)
        return out

    def iter_batches(self, split: str, batch_size: int, **kw) -> Iterator[Batch]:
        for index in self.batches(split, batch_size, **kw):
            yield self.collate(split, index)

    @torch.no_grad()
    def predict(
        self,
        model,
        split: str,
        *,
        limit: int | None = None,
        batch_size: int = 256,
        num_beams: int = 1,
        max_new_tokens: int | None = None,
        progress: bool = True,
        ended: bool = False,
    ) -> pd.DataFrame:
        """Decode a split with `model.generate` (greedy by default, beam search with num_beams>1).
        First checks that the model fits the task (`check_model`) and has no NaN/inf weight.
        Columns source, reference, hypothesis; with `ended`, also whether each output holds an
        end-of-sequence token (False: it ran into the length cap, see `mtlab.tasks.diagnosis`)."""
        src_text, tgt_text = self.texts(split, limit)
        self.check_model(model, [split])
        check_finite(model)
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        hyps: dict[int, str] = {}
        stopped: dict[int, bool] = {}
        eos = model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, (list, tuple)) else [eos])
        batches = self.batches(split, batch_size, limit=limit)
        for index in adaptive(tqdm(batches, desc=f"decode {split}", disable=not progress, leave=False)):
            b = self.collate(split, index).to(device)
            longest = int(b.attention_mask.sum(1).max())
            out = model.generate(
                input_ids=b.input_ids,
                attention_mask=b.attention_mask,
                num_beams=num_beams,
                do_sample=False,
                max_new_tokens=max_new_tokens or self.max_target_len(longest),
                **cache_kwargs(model),
            )
            for i, ids in zip(index, out.tolist()):
                hyps[i] = self.decode_target(ids)
                stopped[i] = any(t in eos for t in ids[1:])
        model.train(was_training)
        out = pd.DataFrame({"source": src_text, "reference": tgt_text, "hypothesis": [hyps[i] for i in range(len(src_text))]})
        if ended:
            out["ended"] = [stopped[i] for i in range(len(src_text))]
        return out

    def max_target_len(self, source_len: int) -> int:
        return 2 * source_len + 10

    def evaluate(self, model, split: str, **kw) -> dict[str, float]:
        """Decode and score a split; returns the metrics plus n and wall seconds."""
        t0 = time.perf_counter()
        pred = self.predict(model, split, **kw)
        metrics = self.score(pred.hypothesis.tolist(), pred.reference.tolist())
        return {"split": split, "n": len(pred), **metrics, "seconds": time.perf_counter() - t0}
