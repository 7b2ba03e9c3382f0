"""Tiny models built from configs and saved with their tokenizer, shared by the tests that need a model folder."""
from __future__ import annotations

from pathlib import Path

TEXT = Path(__file__).resolve().parent / "data" / "text_small.txt"


def tiny_llama(tmp: Path, layers: int = 4, name: str = "llama") -> Path:
    """A Llama (grouped-query attention: 2 heads, 1 KV head) of `layers` layers with a word-level tokenizer of
    the small text, saved to tmp/name."""
    import torch
    import transformers as T

    from mtlab.tasks.causal_lm import word_tokenizer

    tok = word_tokenizer(TEXT.read_text().splitlines())
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                                             num_attention_heads=2, num_key_value_heads=1, vocab_size=len(tok),
                                             max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
                                             pad_token_id=0))
    model.save_pretrained(tmp / name)
    tok.save_pretrained(tmp / name)
    return tmp / name
