"""Checks that a model can serve a task at all, before any training: what it is (encoder,
decoder, encoder-decoder), whether the head the task needs came from its checkpoint or was
initialised at random, whether a "causal LM" really is causal, and how many positions its
position table holds (so decoding never runs past it inside torch).

Each check raises ValueError with the problem and the fix; `mtlab.recipe` turns them into
RecipeErrors for `mtlab run` and `--check`.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["model_role", "describe", "check_head_loaded", "check_causal", "position_limit", "generation_cap",
           "cap_new_tokens", "ENCODER_FIX"]

#: what an encoder-only model (BERT, MiniLM, RoBERTa) is compressed as in mtlab
ENCODER_FIX = ("an encoder is compressed as a sentence-embedding model: use task kind: sentences (scored "
               "against the original's embeddings; path: one sentence a line, or none for the bundled corpus), or "
               "the Python API mtlab.tasks.SentencesTask and mtlab.embedding, as notebook 06 does for all-MiniLM-L6-v2")


def model_role(config) -> str:
    """'encoder-decoder', 'decoder' (decoder-only LM), 'encoder' (BERT-like) or 'unknown', from the config."""
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder"
    if getattr(config, "is_decoder", False):
        return "decoder"
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    model_type = getattr(config, "model_type", None)
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:  # BERT-likes (some also have a causal class)
        return "encoder"
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "decoder"
    return "unknown"


def describe(config) -> str:
    """'an encoder-only model (BertModel)' and the like, for messages."""
    role = model_role(config)
    arch = ", ".join(getattr(config, "architectures", None) or []) or getattr(config, "model_type", "?")
    what = {"encoder-decoder": "an encoder-decoder model", "decoder": "a decoder-only model",
            "encoder": "an encoder-only model"}.get(role, "a model")
    return f"{what} ({arch})"


def check_head_loaded(name: str, model: nn.Module, loading_info: dict, kind: str) -> None:
    """Refuse a model some of whose weights transformers initialised at random (its `missing_keys`):
    typically an encoder checkpoint loaded for a causal LM task, whose LM head then is noise and whose
    every score (perplexity, BLEU) is meaningless."""
    missing = sorted(loading_info.get("missing_keys") or ())
    if not missing:
        return
    config = model.config
    shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
    role = model_role(config)
    if role == "encoder":
        fix = ENCODER_FIX
    elif role == "decoder" and kind != "text":
        fix = "use kind: text (a text file) with a decoder-only model"
    elif role == "encoder-decoder" and kind != "pairs":
        fix = "use kind: pairs (a TSV/CSV/JSONL of source, target pairs) with an encoder-decoder model"
    else:
        fix = (f"give a checkpoint that holds these weights (one saved from {type(model).__name__}, e.g. after "
               "fine-tuning it for the task)")
    raise ValueError(f"{name} is {describe(config)}: loading it as {type(model).__name__} for kind {kind!r} "
                     f"initialises {len(missing)} weight(s) at random ({shown}), so its scores would be "
                     f"meaningless; {fix}")


@torch.no_grad()
def check_causal(model: nn.Module) -> None:
    """Refuse a model for language modelling whose output at a position depends on LATER tokens
    (a BERT-like loaded as a causal LM without `is_decoder`): its perplexity would be meaningless."""
    vocab = getattr(model.config, "vocab_size", None) or model.get_input_embeddings().num_embeddings
    if vocab < 3:
        return
    device = next(model.parameters()).device
    ids = torch.tensor([[1, 2, 1], [1, 2, 2]], device=device) % vocab
    was = model.training
    model.eval()
    try:
        raw = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
    finally:
        model.train(was)
    logits = raw.float()  # the two rows differ only after position 1: the same sums, up to rounding
    tol = 64 * torch.finfo(raw.dtype).eps * max(1.0, float(logits.abs().max()))
    if not torch.allclose(logits[0, :2], logits[1, :2], atol=tol, rtol=0):
        raise ValueError(f"{type(model).__name__} is not causal: its prediction at a position changes with the "
                         "tokens after it (bidirectional attention, e.g. a BERT-like without is_decoder=True), so "
                         f"its perplexity would be meaningless; a text task needs a decoder-only LM. If it is an "
                         f"encoder: {ENCODER_FIX}")


def _position_tables(model: nn.Module) -> Iterable[str]:
    for name, m in model.named_modules():
        last = name.rsplit(".", 1)[-1].lower()
        if isinstance(m, nn.Embedding) and ("position" in last or last == "wpe"):
            yield name


def position_limit(model: nn.Module) -> int | None:
    """How many positions the model's (learned or fixed) absolute position table holds:
    `n_positions` / `max_position_embeddings` of its config when it has such a table (GPT-2, BART,
    BERT, Marian), None when positions are relative or rotary (T5, Llama) and have no hard bound."""
    config = getattr(model, "config", None)
    n = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    if not n or not any(True for _ in _position_tables(model)):
        return None
    return int(n)


def generation_cap(model: nn.Module, prompt_len: int = 0) -> int | None:
    """The most new tokens `generate` can add without running past the position table: the whole
    decoded sequence (an encoder-decoder's decoder start token, or a decoder-only LM's prompt of
    `prompt_len` tokens, plus the new tokens) must fit. None: no bound."""
    limit = position_limit(model)
    if limit is None:
        return None
    used = 1 if getattr(model.config, "is_encoder_decoder", False) else prompt_len
    return max(0, limit - used)


def cap_new_tokens(models: dict[str, nn.Module], prompt_len: int, new: int, *, explicit: bool = False) -> int:
    """`new` tokens, or fewer where a model's position table cannot hold them (the same number for
    every model, so timings stay comparable). An `explicit` request that does not fit is refused."""
    caps = {name: c for name, m in models.items() if (c := generation_cap(m, prompt_len)) is not None}
    if not caps or new <= min(caps.values()):
        return new
    name = min(caps, key=caps.get)
    cap, model = caps[name], models[name]
    if explicit or cap < 1:
        taken = 1 if getattr(model.config, "is_encoder_decoder", False) else prompt_len
        fix = f"use max_new_tokens={cap} or less" if cap >= 1 else "use shorter inputs"
        raise ValueError(f"{new} new tokens do not fit model {name!r}: its position table holds "
                         f"{position_limit(model)} positions and {taken} are taken before the first new token; {fix}")
    return cap
