"""Build the tiny GPT-2 this example compresses: a word-level tokenizer of the example text, a
4-layer GPT-2 from a config, a few hundred steps of language modelling, saved with save_pretrained
(`mtlab.experiments.your_model.tiny_causal_lm`).

    python examples/tiny_gpt2/make_model.py            # writes examples/tiny_gpt2/tiny-gpt2/
    python examples/tiny_gpt2/make_model.py OUT --steps 50

Any decoder-only model folder works in a recipe; this one only avoids a download.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from transformers import AutoModelForCausalLM

from mtlab.experiments.your_model import tiny_causal_lm
from mtlab.tasks.causal_lm import CausalLMTask

HERE = Path(__file__).resolve().parent
TEXT = HERE.parent.parent / "tests" / "data" / "text_small.txt"


def make(out: Path, steps: int = 200, text: Path = TEXT) -> Path:
    tiny_causal_lm(out, text, steps=steps, positions=64, block_size=32)
    task = CausalLMTask.from_file(text, out, block_size=32)
    ppl = task.evaluate(AutoModelForCausalLM.from_pretrained(out), "dev", progress=False)["ppl"]
    print(f"dev perplexity after {steps} steps: {ppl:.1f}")
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", nargs="?", default=str(HERE / "tiny-gpt2"), help="model folder to write")
    p.add_argument("--steps", type=int, default=200, help="language-modelling steps")
    a = p.parse_args()
    print(f"wrote {make(Path(a.out), a.steps)}")
