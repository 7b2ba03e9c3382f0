"""Language modelling on plain text, for decoder-only models (GPT-2, Llama, ...), scored by perplexity.

The unit of data is a line of text (a paragraph, a document): lines are split into train / dev /
test by hash (`split_by_hash`), so a split never changes when the file grows, and a line never
straddles two splits. Each split is then cut into examples, either

- fixed-length blocks (`block_size=N`, the usual LM recipe): the split's lines joined with the
  end-of-text token, cut into windows of N + 1 tokens that overlap by one, so every token but
  the first is predicted exactly once; or
- one example per line (`block_size=None`): BOS (if the tokenizer has one) + line + EOS,
  truncated to `max_length`.

One convention makes the task fit mtlab's training loop, distillation, module replacing and
screening unchanged: `Batch.labels` is ALIGNED with the logits (labels[t] is the token that
position t must predict), i.e. the causal shift is done here, once, and `input_ids` is the
window without its last token. So the token cross-entropy of `mtlab.train` is the LM loss, and
`evaluate` reports the mean token NLL and its exponential, the perplexity.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..runtime import adaptive
from .base import SPLITS, Batch, Seq2SeqTask, check_finite, pad
from .guards import check_causal
from .split import split_by_hash

__all__ = ["CausalLMTask", "load_tokenizer", "word_tokenizer"]


def load_tokenizer(tokenizer):
    """A tokenizer object as is, or `AutoTokenizer.from_pretrained(path)` for a path or hub name."""
    if isinstance(tokenizer, (str, Path)):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(tokenizer))
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot load a tokenizer from {str(tokenizer)!r} ({str(e).splitlines()[0]}): give the "
                             "model's folder (with tokenizer.json or the tokenizer files) or a tokenizer object") from e
    if not hasattr(tokenizer, "encode") or not hasattr(tokenizer, "decode"):
        raise TypeError(f"tokenizer must be a Hugging Face tokenizer, a path to one, or an object with encode() and "
                        f"decode(); got {type(tokenizer).__name__}")
    return tokenizer


def word_tokenizer(lines: Iterable[str], *, eos_token: str = "<|endoftext|>", unk_token: str = "<unk>"):
    """A word-level `PreTrainedTokenizerFast` whose vocabulary is the words of `lines` (sorted, so
    deterministic): for tiny models built from configs, in tests and examples, without a download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Whitespace()
    words = sorted({w for line in lines for w, _ in pre.pre_tokenize_str(line)})
    vocab = {t: i for i, t in enumerate([eos_token, unk_token, *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=unk_token))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos_token, bos_token=eos_token,
                                   unk_token=unk_token, pad_token=eos_token)


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"no text file at {path}: give a UTF-8 text file with one paragraph or document "
                                "per line")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e}); convert it, e.g. `iconv -t utf-8`") from e
    return [line.strip() for line in text.splitlines() if line.strip()]


class CausalLMTask(Seq2SeqTask):
    """Next-token prediction on lines of text, scored by perplexity (lower is better).

    `splits` holds each split's lines (as (lines, lines)); `encoded(split)` holds the examples:
    (input token ids, aligned target ids) of each block or line."""

    name = "causal_lm"
    primary_metric = "ppl"
    higher_is_better = False

    def __init__(self, lines: Sequence[str], tokenizer, *, block_size: int | None = 128, max_length: int = 1024,
                 dev_fraction: float = 0.05, test_fraction: float = 0.05, name: str | None = None) -> None:
        super().__init__()
        if block_size is not None and (not isinstance(block_size, int) or block_size < 1):
            raise ValueError(f"block_size must be a positive integer (tokens per example) or None (one example "
                             f"per line), got {block_size!r}")
        if not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an integer >= 2, got {max_length!r}")
        self.tokenizer = load_tokenizer(tokenizer)
        self.block_size, self.max_length = block_size, max_length
        if name:
            self.name = name
        eos = getattr(self.tokenizer, "eos_token_id", None)
        self.eos_id = None if eos is None else int(eos)
        bos = getattr(self.tokenizer, "bos_token_id", None)
        self.bos_id = None if bos is None else int(bos)
        pad_id = getattr(self.tokenizer, "pad_token_id", None)
        self.pad_id = int(pad_id if pad_id is not None else self.eos_id if self.eos_id is not None else 0)
        lines = [str(t).strip() for t in lines if str(t).strip()]
        by_split: dict[str, list[str]] = {s: [] for s in SPLITS}
        for line in lines:
            by_split[split_by_hash(line, dev_fraction, test_fraction)].append(line)
        self.splits = {s: (v, v) for s, v in by_split.items()}
        empty = [s for s in SPLITS if not by_split[s]]
        if empty:
            raise ValueError(f"splits {empty} got no lines out of {len(lines)} non-empty lines: give more text "
                             f"(a few hundred lines at least) or larger dev_fraction/test_fraction")
        self._examples: dict[str, tuple[list[list[int]], list[list[int]]]] = {}

    @classmethod
    def from_file(cls, path: str | Path, tokenizer, **kw) -> "CausalLMTask":
        """One line of a UTF-8 text file = one unit of the hash split (empty lines are skipped)."""
        path = Path(path)
        return cls(_read_lines(path), tokenizer, **{"name": path.stem, **kw})

    @classmethod
    def from_dataset(cls, dataset, tokenizer, *, text_field: str = "text", split: str = "train",
                     config: str | None = None, **kw) -> "CausalLMTask":
        """From a Hugging Face `datasets` dataset (object, or name/path for `datasets.load_dataset`);
        its rows' `text_field` are the lines. Needs the optional `datasets` package."""
        if isinstance(dataset, (str, Path)):
            try:
                import datasets
            except ImportError as e:
                raise ImportError("loading a dataset by name needs the `datasets` package: pip install datasets "
                                  "(or pass a text file to CausalLMTask.from_file)") from e
            dataset = datasets.load_dataset(str(dataset), config, split=split)
        if text_field not in getattr(dataset, "column_names", [text_field]):
            raise KeyError(f"the dataset has no column {text_field!r}; its columns are {dataset.column_names}: "
                           "pass text_field=...")
        return cls([row[text_field] for row in dataset], tokenizer, **kw)

    # ---- codec ------------------------------------------------------------------------------
    def tokens(self, text: str) -> list[int]:
        """Token ids of `text` without special tokens (BOS/EOS are placed by the task)."""
        try:
            ids = self.tokenizer.encode(text, add_special_tokens=False)
        except TypeError:  # a plain tokenizer object: encode(text) only
            ids = self.tokenizer.encode(text)
        return [int(i) for i in ids]

    def encode_source(self, text: str) -> list[int]:
        return self.tokens(text)

    def encode_target(self, text: str) -> list[int]:
        return self.tokens(text)

    def decode_target(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def _windows(self, lines: list[str]) -> list[list[int]]:
        """Token windows of one split: blocks of block_size + 1 tokens overlapping by one, or lines."""
        ends = [self.eos_id] if self.eos_id is not None else []
        if self.block_size is None:
            start = [self.bos_id] if self.bos_id is not None else []
            wins = [(start + self.tokens(line) + ends)[: self.max_length] for line in lines]
            return [w for w in wins if len(w) >= 2]
        stream = [self.bos_id] if self.bos_id is not None else []
        stream += [t for line in lines for t in self.tokens(line) + ends]
        n = self.block_size
        wins = [stream[i: i + n + 1] for i in range(0, max(1, len(stream) - 1), n)]
        return [w for w in wins if len(w) >= 2]

    def encoded(self, split: str) -> tuple[list[list[int]], list[list[int]]]:
        """(inputs, targets) of each example: a window without its last token, and shifted by one."""
        if split not in self._examples:
            wins = self._windows(self.texts(split)[0])
            if not wins:
                raise ValueError(f"split {split!r} has no example of 2 or more tokens: give more text")
            self._examples[split] = ([w[:-1] for w in wins], [w[1:] for w in wins])
        return self._examples[split]

    def collate(self, split: str, index: Sequence[int]) -> Batch:
        """Right-padded batch; the attention mask comes from the lengths (the pad id may be EOS)."""
        src, tgt = self.encoded(split)
        rows = [src[i] for i in index]
        input_ids = pad(rows, self.pad_id)
        mask = torch.zeros_like(input_ids)
        for r, s in enumerate(rows):
            mask[r, : len(s)] = 1
        return Batch(input_ids, mask, pad([tgt[i] for i in index], -100), list(index))

    # ---- scoring ------------------------------------------------------------------------------
    def score(self, hypotheses: list[str], references: list[str]) -> dict[str, float]:
        raise NotImplementedError("a language-modelling task is scored by perplexity on its own text: "
                                  "use task.evaluate(model, split)")

    def predict(self, model, split: str, **kw):
        raise NotImplementedError("CausalLMTask scores by teacher-forced perplexity (task.evaluate); to sample text "
                                  "use model.generate on task.collate(split, [i]).input_ids")

    @torch.no_grad()
    def evaluate(self, model, split: str, *, limit: int | None = None, batch_size: int = 32,
                 progress: bool = True) -> dict[str, float]:
        """Mean token NLL and perplexity of `split` (the first `limit` examples) under teacher forcing.
        Refuses a model that is not causal (`mtlab.tasks.guards.check_causal`)."""
        self.check_model(model, [split])  # token ids fit the model, no NaN/inf weight: stop before the first batch
        check_finite(model)
        check_causal(model)  # a model that sees later tokens (BERT without is_decoder) has a meaningless perplexity
        t0 = time.perf_counter()
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        nll, tokens, n = 0.0, 0, 0
        try:
            for index in adaptive(tqdm(self.batches(split, batch_size, limit=limit), desc=f"perplexity {split}",
                                       disable=not progress, leave=False)):
                b = self.collate(split, index).to(device)
                logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits
                check_aligned(logits, b.labels)
                keep = b.labels != -100
                nll += float(F.cross_entropy(logits.float()[keep], b.labels[keep], reduction="sum"))
                tokens += int(keep.sum())
                n += len(index)
        finally:
            model.train(was_training)
        mean = nll / max(1, tokens)
        return {"split": split, "n": n, "nll": mean, "ppl": math.exp(min(mean, 700.0)), "tokens": tokens,
                "seconds": time.perf_counter() - t0}


def check_aligned(logits: torch.Tensor, labels: torch.Tensor) -> None:
    """Raise a clear error when the labels do not line up with the logits (a seq2seq task's
    labels fed to a decoder-only model)."""
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"labels {tuple(labels.shape)} do not line up with the logits {tuple(logits.shape[:2])}: "
                         "a decoder-only model needs a task whose labels are its inputs shifted by one; use "
                         "mtlab.tasks.CausalLMTask (text) rather than a seq2seq task (pairs, G2P)")
