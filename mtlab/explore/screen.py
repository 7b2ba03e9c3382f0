"""Screening the whole assembly space with teacher-forced metrics, sharing common prefixes.

Plans that start with the same blocks compute the same hidden states until they part ways.
`screen` walks a trie over each stack's block sequences: every trie node (a distinct prefix)
runs ONE block on its parent's output, and the decoder's trie runs once per distinct encoder
output (a decoder block reads the encoder through cross-attention, so nothing is shared across
encoder plans); a decoder-only LM (one stack, "layers") has one trie per batch. `screen_per_plan`
is the plain way, one full forward per plan; both return the same numbers (tested to 1e-5) and
count the blocks they ran.

How a block is run outside its stack, for any HF encoder-decoder or decoder-only LM: the stack itself is
asked to call a stand-in block (`_Catch`) that records the exact arguments it receives (masks, T5's
position bias from whatever block came first, cross-attention inputs) and stops the forward.
A stand-in that returns a stored output (`_Replay`) lets the stack finish (final layer norm,
LM head) from a trie leaf. No architecture-specific code.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from functools import cached_property
from typing import Iterable, Iterator

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..anatomy import anatomy
from ..runtime import adaptive
from ..measure import count_params
from ..modular.bank import ModuleBank, block_params, plan_stats, stack_block_flops
from ..modular.plan import Plan
from ..tasks.causal_lm import check_aligned
from ..surgery import Swapper, span_block, stack_blocks, stack_depths
from .space import AssemblySpace

METRICS = ("nll", "token_acc", "tf_word_acc")
FINISH_ELEMENTS = 2 ** 24   # numbers in the stack outputs finished at once (64 MB of float32)


class _Stop(Exception):
    """Raised by _Catch to end a forward once the arguments of a block are known."""


class _Catch(nn.Module):
    def forward(self, *args, **kwargs):
        self.call = (args, kwargs)
        raise _Stop


class _Replay(nn.Module):
    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, *args, **kwargs):
        return self.out


def _hidden(out):
    return out[0] if isinstance(out, tuple) else out


def block_hidden(out) -> torch.Tensor:
    """The hidden states in a block's output (a tensor, or the first item of a tuple)."""
    return _hidden(out)


def _with_hidden(call, h):
    args, kwargs = call
    return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})


def _require_supported(model: nn.Module) -> None:
    """Encoder-decoder models (stacks encoder, decoder) and decoder-only LMs (one stack "layers",
    logits aligned with the labels, e.g. with mtlab.tasks.CausalLMTask) can be screened."""
    names = list(anatomy(model).stacks)
    if names == ["encoder", "decoder"] and hasattr(model, "get_encoder"):
        return
    generates = getattr(model, "can_generate", lambda: False)()
    if names == ["layers"] and generates and not getattr(model.config, "is_encoder_decoder", False):
        return
    raise ValueError(f"screening needs an encoder-decoder model (stacks encoder, decoder) or a decoder-only LM "
                     f"(one stack, layers, with an LM head, e.g. *ForCausalLM); this one has {names}. Evaluate "
                     "its assemblies with mtlab.modular.assemble and the task's own metric")


def require_screenable(model: nn.Module) -> None:
    """Refuses a model that screening (and frontier search) cannot run: neither an encoder-decoder
    nor a decoder-only LM; the message names what to use instead."""
    _require_supported(model)


def token_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Sums over the batch: nll_sum, correct, tokens, words_right, words (add them over batches)."""
    return _metrics(logits, labels)


def require_seq2seq(model: nn.Module) -> None:
    """Refuses a model without an encoder and a decoder, naming what to use instead."""
    names = list(anatomy(model).stacks)
    if names != ["encoder", "decoder"] or not hasattr(model, "get_encoder"):
        raise ValueError(f"this needs an encoder-decoder model (stacks encoder, decoder); this one has {names}. "
                         "For a decoder-only LM screen its assembly space with mtlab.explore.screen")


def _metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Sums over the batch: token NLL, correct tokens, tokens, words with every token right, words."""
    mask = labels != -100
    logp = F.log_softmax(logits.float(), -1)
    nll = -logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    right = (logits.argmax(-1) == labels) | ~mask
    return {"nll_sum": float(nll[mask].sum()), "correct": int((right & mask).sum()), "tokens": int(mask.sum()),
            "words_right": int(right.all(-1).sum()), "words": int(labels.shape[0])}


class BlockRunner:
    """Runs the teacher's stacks for one batch with any block list swapped in, and single blocks of
    any prefix (`root_call`, `step`, `complete`: what `mtlab.explore.search` builds on)."""

    def __init__(self, teacher: nn.Module, bank: ModuleBank | None, batch):
        self.model, self.bank, self.batch = teacher, bank, batch
        self.swap = Swapper(teacher)
        self.originals = stack_blocks(teacher)
        self.blocks_run = 0

    def block(self, stack: str, start: int, k: int) -> nn.Module:
        return span_block(self.originals, self.bank, stack, start, k)

    def run(self, stack: str, enc_out=None):
        """The stack's forward: encoder output, or the decoder's logits given the encoder output
        (teacher forcing: the decoder reads the labels shifted right)."""
        b = self.batch
        if stack == "layers":  # a decoder-only LM: the logits, read against labels aligned with them
            return self.model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits
        if stack == "encoder":
            return self.model.get_encoder()(input_ids=b.input_ids, attention_mask=b.attention_mask).last_hidden_state
        return self.model(encoder_outputs=(enc_out,), attention_mask=b.attention_mask,
                          decoder_input_ids=self.decoder_input_ids, use_cache=False).logits

    @cached_property
    def decoder_input_ids(self) -> torch.Tensor:
        return self.model.prepare_decoder_input_ids_from_labels(labels=self.batch.labels)

    def caught(self, stack: str, blocks: list[nn.Module], enc_out=None):
        """The arguments the stack passes to the block after `blocks`."""
        catch = _Catch()
        with self.swap(stack, [*blocks, catch]):
            try:
                self.run(stack, enc_out)
            except _Stop:
                return catch.call
        raise RuntimeError(f"{stack}: the stack never called its blocks")

    def finish(self, stack: str, outs: list, enc_out=None) -> list[torch.Tensor]:
        """The stack's outputs (after its final norm, and the LM head for the decoder) for several
        last-block outputs at once: they are stacked along the batch, which nothing after the
        last block mixes."""
        first = outs[0]
        h = torch.cat([_hidden(o) for o in outs])
        with self.swap(stack, [_Replay((h, *first[1:]) if isinstance(first, tuple) else h)]):
            return list(self.run(stack, enc_out).split(_hidden(first).shape[0]))

    def outputs(self, stack: str, tilings: Iterable[tuple[int, ...]], enc_out=None) -> dict[tuple, torch.Tensor]:
        """{tiling: stack output} for every tiling (all held at once: `iter_outputs` streams them)."""
        return dict(self.iter_outputs(stack, tilings, enc_out))

    def iter_outputs(self, stack: str, tilings: Iterable[tuple[int, ...]], enc_out=None,
                     max_elements: int = FINISH_ELEMENTS) -> Iterator[tuple[tuple[int, ...], torch.Tensor]]:
        """(tiling, stack output) for every tiling, finished in chunks whose outputs hold at most
        `max_elements` numbers (the first alone, to learn its size): memory stays bounded however
        many tilings and however large the vocabulary."""
        chunk, pending = 1, []
        for leaf in self.walk(stack, tilings, enc_out):
            pending.append(leaf)
            if len(pending) >= chunk:
                outs = self.finish(stack, [o for _, o in pending], enc_out)
                yield from zip([t for t, _ in pending], outs)
                chunk, pending = max(1, max_elements // max(1, outs[0].numel())), []
        if pending:
            yield from zip([t for t, _ in pending], self.finish(stack, [o for _, o in pending], enc_out))

    def walk(self, stack: str, tilings: Iterable[tuple[int, ...]], enc_out=None) -> Iterator[tuple[tuple[int, ...], object]]:
        """(tiling, output of its last block) for every tiling; each distinct prefix runs one block."""
        ends = set(tilings)
        children: dict[tuple, list[int]] = {}
        for t in ends:
            for i in range(len(t)):
                kids = children.setdefault(t[:i], [])
                if t[i] not in kids:
                    kids.append(t[i])

        def visit(prefix, out, call):
            if prefix in ends:
                yield prefix, out
            for k in sorted(children.get(prefix, ())):
                yield from visit(prefix + (k,), *self.step(stack, prefix, out, call, k, enc_out))

        yield from visit((), None, self.root_call(stack, enc_out))

    def root_call(self, stack: str, enc_out=None):
        """The call the stack makes to its first block (the `call` of the empty prefix)."""
        return self.caught(stack, [], enc_out)

    def step(self, stack: str, prefix: tuple[int, ...], out, call, k: int, enc_out=None):
        """Runs the block of span `k` after `prefix` (whose last block returned `out`; `call` is what
        the stack passes to the next block, `root_call` for the empty prefix). Returns the block's
        output and the call for the block after it. Counts one block."""
        block = self.block(stack, sum(prefix), k)
        if prefix:
            args, kwargs = _with_hidden(call, _hidden(out))
            o, rest = block(*args, **kwargs), call
        else:  # the first block may make state the others read (T5's position bias)
            o = block(*call[0], **call[1])
            rest = self.caught(stack, [_Replay(o)], enc_out)
        self.blocks_run += 1
        return o, rest

    def complete(self, stack: str, prefix: tuple[int, ...], out, call, enc_out=None) -> torch.Tensor:
        """The stack's output when original layers follow `prefix` to the top (a screened prefix)."""
        depth = len(self.originals[stack])
        while sum(prefix) < depth:
            out, call = self.step(stack, prefix, out, call, 1, enc_out)
            prefix = prefix + (1,)
        return self.finish(stack, [out], enc_out)[0]


def _plan_rows(sums: dict, stats: dict) -> pd.DataFrame:
    rows = []
    for plan, s in sums.items():
        rows.append({**stats.get(plan, {"plan": plan}), "nll": s["nll_sum"] / s["tokens"],
                     "token_acc": s["correct"] / s["tokens"], "tf_word_acc": s["words_right"] / s["words"],
                     "tokens": s["tokens"], "words": s["words"]})
    return pd.DataFrame(rows)


def _add(sums: dict, key: str, m: dict) -> None:
    acc = sums.setdefault(key, dict.fromkeys(m, 0))
    for k, v in m.items():
        acc[k] += v


def _setup(teacher, bank, task, plans, split, limit, batch_size):
    _require_supported(teacher)
    if split == "test":
        raise ValueError("screening chooses models: use the dev split (test is read only for final numbers)")
    d = stack_depths(teacher)
    space = AssemblySpace.of(teacher, bank)
    plans = list(space) if plans is None else [Plan.parse(p, d) if isinstance(p, str) else p for p in plans]
    for p in plans:
        p.validate(d, bank.granularities if bank is not None else {s: () for s in d})
    if not plans:
        raise ValueError("no plans to screen")
    index = task.batches(split, batch_size, limit=limit)
    if not index:
        raise ValueError(f"split {split!r} has no examples to screen on (limit={limit})")
    first = task.collate(split, index[0])
    inputs = first.model_inputs()
    if list(d) == ["layers"]:  # decoder-only: labels must line up with the inputs (and so the logits)
        check_aligned(first.input_ids, first.labels)
        inputs.pop("labels")
    n = count_params(teacher)
    costs, bparams = stack_block_flops(teacher, inputs), block_params(teacher)
    stats = {str(p): plan_stats(p, n, bparams, costs) for p in plans}
    for s in stats.values():
        s.pop("blocks")
    return plans, index, stats


@contextmanager
def eval_mode(*modules):
    """Dropout off in the teacher AND the bank (a bank fresh from training is in train mode),
    restored afterwards."""
    modules = [m for m in modules if m is not None]
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


_eval_mode = eval_mode  # the old private name


@torch.no_grad()
def screen(teacher: nn.Module, bank: ModuleBank | None, task, plans: Iterable[Plan | str] | None = None, *,
           split: str = "dev", limit: int | None = 1000, batch_size: int = 64, progress: bool = True) -> pd.DataFrame:
    """Teacher-forced quality of every plan (default: the whole assembly space) on `limit` words
    of `split`, prefix-shared. One row per plan: plan, params, ratio, ratio_model,
    ideal_speedup (forward FLOPs), nll (mean token NLL), token_acc, tf_word_acc (words whose
    every token is the argmax under teacher forcing), tokens, words. `attrs`: config, block_evals,
    seconds."""
    plans, index, stats = _setup(teacher, bank, task, plans, split, limit, batch_size)
    with eval_mode(teacher, bank):
        return _screen(teacher, bank, task, plans, index, stats, split, limit, batch_size, progress)


def _screen(teacher, bank, task, plans, index, stats, split, limit, batch_size, progress) -> pd.DataFrame:
    if plans[0].stacks == ["layers"]:
        return _screen_single(teacher, bank, task, plans, index, stats, split, limit, batch_size, progress)
    by_enc: dict[tuple, set] = {}
    for p in plans:
        by_enc.setdefault(p.stack("encoder"), set()).add(p.stack("decoder"))
    names = {(p.stack("encoder"), p.stack("decoder")): str(p) for p in plans}
    sums: dict[str, dict] = {}
    t0, evals = time.perf_counter(), 0
    for idx in adaptive(tqdm(index, desc=f"screen {len(plans)} plans", disable=not progress)):
        r = BlockRunner(teacher, bank, task.collate(split, idx))
        for enc, enc_out in r.iter_outputs("encoder", by_enc):
            for dec, logits in r.iter_outputs("decoder", by_enc[enc], enc_out):
                _add(sums, names[enc, dec], _metrics(logits, r.batch.labels))
        evals += r.blocks_run
    df = _plan_rows(sums, stats)
    df.attrs.update(config={"split": split, "limit": limit, "batch_size": batch_size, "plans": len(plans)},
                    block_evals=evals, seconds=time.perf_counter() - t0, method="prefix-shared")
    return df


def _screen_single(teacher, bank, task, plans, index, stats, split, limit, batch_size, progress) -> pd.DataFrame:
    """`_screen` for a single-stack LM: one trie over the stack's tilings per batch."""
    names = {p.stack("layers"): str(p) for p in plans}
    sums: dict[str, dict] = {}
    t0, evals = time.perf_counter(), 0
    for idx in adaptive(tqdm(index, desc=f"screen {len(plans)} plans", disable=not progress)):
        r = BlockRunner(teacher, bank, task.collate(split, idx))
        for tiling, logits in r.iter_outputs("layers", names):
            check_aligned(logits, r.batch.labels)
            _add(sums, names[tiling], _metrics(logits, r.batch.labels))
        evals += r.blocks_run
    df = _plan_rows(sums, stats)
    df.attrs.update(config={"split": split, "limit": limit, "batch_size": batch_size, "plans": len(plans)},
                    block_evals=evals, seconds=time.perf_counter() - t0, method="prefix-shared")
    return df


@torch.no_grad()
def screen_per_plan(teacher: nn.Module, bank: ModuleBank | None, task, plans: Iterable[Plan | str] | None = None, *,
                    split: str = "dev", limit: int | None = 1000, batch_size: int = 64,
                    progress: bool = True) -> pd.DataFrame:
    """The same table as `screen`, computed the plain way: each plan's blocks swapped into the
    teacher and one full forward per plan and batch (the reference `screen` must match)."""
    plans, index, stats = _setup(teacher, bank, task, plans, split, limit, batch_size)
    with eval_mode(teacher, bank):
        return _screen_per_plan(teacher, bank, task, plans, index, stats, split, limit, batch_size, progress)


def _screen_per_plan(teacher, bank, task, plans, index, stats, split, limit, batch_size, progress) -> pd.DataFrame:
    r0 = BlockRunner(teacher, bank, None)
    sums: dict[str, dict] = {}
    t0, evals = time.perf_counter(), 0
    for idx in adaptive(tqdm(index, desc=f"screen {len(plans)} plans one by one", disable=not progress)):
        b = task.collate(split, idx)
        inputs = b.model_inputs() if "decoder" in r0.originals else {"input_ids": b.input_ids,
                                                                          "attention_mask": b.attention_mask}
        for p in plans:
            with r0.swap.many({s: [r0.block(s, a, k) for a, k in p.blocks(s)] for s in p.stacks}):
                logits = teacher(**inputs, use_cache=False).logits
            check_aligned(logits, b.labels)
            evals += sum(p.depth(s) for s in p.stacks)
            _add(sums, str(p), _metrics(logits, b.labels))
    df = _plan_rows(sums, stats)
    df.attrs.update(config={"split": split, "limit": limit, "batch_size": batch_size, "plans": len(plans)},
                    block_evals=evals, seconds=time.perf_counter() - t0, method="per-plan")
    return df


def max_abs_diff(a: pd.DataFrame, b: pd.DataFrame, cols: Iterable[str] = METRICS) -> float:
    """Largest difference between two screens of the same plans (matched by plan)."""
    m = a[["plan", *cols]].merge(b[["plan", *cols]], on="plan", how="outer", suffixes=("", "_b"))
    if m.isna().any().any():
        raise ValueError("the two screens cover different plans")
    return float(max((m[c] - m[f"{c}_b"]).abs().max() for c in cols))


def screen_block_evals(plans: Iterable[Plan]) -> int:
    """Blocks one batch costs `screen` (distinct encoder prefixes, plus the distinct decoder prefixes
    under each distinct encoder tiling), without running anything."""
    enc: set = set()
    dec: dict[tuple, set] = {}
    for p in plans:
        e, d = p.stack("encoder"), p.stack("decoder")
        enc.update(e[:i] for i in range(1, len(e) + 1))
        dec.setdefault(e, set()).update(d[:i] for i in range(1, len(d) + 1))
    return len(enc) + sum(map(len, dec.values()))


def block_evals_per_plan(plans: Iterable[Plan]) -> int:
    """Blocks one batch costs when every plan runs its own forward."""
    return sum(sum(p.depth(s) for s in p.stacks) for p in plans)

