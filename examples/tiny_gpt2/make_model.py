"""Build the tiny GPT-2 this example compresses: a word-level tokenizer of the example text, a
4-layer GPT-2 from a config, a few hundred steps of language modelling, saved with save_pretrained.

    python examples/tiny_gpt2/make_model.py            # writes examples/tiny_gpt2/tiny-gpt2/
    python examples/tiny_gpt2/make_model.py OUT --steps 50

Any decoder-only model folder works in a recipe; this one only avoids a download.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from mtlab.tasks.causal_lm import CausalLMTask, word_tokenizer
from mtlab.train import TrainConfig, train

HERE = Path(__file__).resolve().parent
TEXT = HERE.parent.parent / "tests" / "data" / "text_small.txt"


def make(out: Path, steps: int = 200, text: Path = TEXT) -> Path:
    lines = [line for line in text.read_text().splitlines() if line.strip()]
    tok = word_tokenizer(lines)
    torch.manual_seed(0)
    config = GPT2Config(n_embd=64, n_layer=4, n_head=4, n_inner=128, vocab_size=len(tok), n_positions=64,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = GPT2LMHeadModel(config)
    task = CausalLMTask(lines, tok, block_size=32)
    with tempfile.TemporaryDirectory() as work:
        train(model, task, TrainConfig(steps=steps, batch_size=16, lr=3e-3, warmup=20, log_every=50), work,
              progress=False)
    print(f"dev perplexity after {steps} steps: {task.evaluate(model, 'dev', progress=False)['ppl']:.1f}")
    model.eval().save_pretrained(out)
    tok.save_pretrained(out)
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", nargs="?", default=str(HERE / "tiny-gpt2"), help="model folder to write")
    p.add_argument("--steps", type=int, default=200, help="language-modelling steps")
    a = p.parse_args()
    print(f"wrote {make(Path(a.out), a.steps)}")
