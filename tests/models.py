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


def tiny_gpt2_example(root: Path, steps: int = 40) -> Path:
    """examples/tiny_gpt2 copied into a tmp tree `root` that keeps its relative paths, with its model built
    (`make_model.make`, `steps` steps); returns the copied example folder."""
    import shutil
    import sys

    repo = Path(__file__).resolve().parents[1]
    example = root / "examples" / "tiny_gpt2"
    shutil.copytree(repo / "examples" / "tiny_gpt2", example)
    (root / "tests" / "data").mkdir(parents=True)
    shutil.copy(TEXT, root / "tests" / "data" / TEXT.name)
    sys.path.insert(0, str(example))
    try:
        import make_model
    finally:
        sys.path.pop(0)
    make_model.make(example / "tiny-gpt2", steps=steps, text=root / "tests" / "data" / TEXT.name)
    return example
