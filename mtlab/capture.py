"""Activation capture through named hook points, streamed to consumers.

Every transformer block exposes hook points named TransformerLens-style
``"<stack>.<layer>.<kind>"``, e.g. ``"encoder.3.ff_pre"`` or
``"layers.0.block_out"``. Stacks and modules come from `mtlab.anatomy`, so
every registered family works the same way. Kinds:

========== ===============================================================
ff_pre     output of the FF input projection w_in, before the nonlinearity.
           For a gated (GLU) FF this is the *linear* branch (Llama
           ``up_proj``, gated T5 ``wi_1``), following the anatomy convention
           ``y = w_out(act(w_gate(x)) * w_in(x))``; the activated branch's
           pre-activation is available as ``ff_gate``.
ff_gate    output of w_gate (gated FFs only), before the activation.
ff_act     input of w_out: act(w_in x), or act(w_gate x) * w_in x if gated.
ff_out     output of w_out (before any dropout / residual add).
attn_out   output of the self-attention output projection.
block_out  the block's output hidden states (T5 blocks return tuples: [0]).
========== ===============================================================

`capture` runs the model over batches (no grad, eval mode) and hands each
``(point_name, features)`` to consumers, ``features`` being a detached
``[n_valid_tokens, d]`` tensor with PADDING REMOVED:

* encoder points (stack "encoder") and single-stack models ("layers") use
  the batch's ``attention_mask`` (no mask, e.g. ViT pixels: every position
  counts);
* decoder points use ``decoder_attention_mask`` if the batch has one, else
  ``labels != -100``; labels are passed to the model so that it runs the
  decoder with teacher forcing (HF shifts them right).

Positions can be LEFT OUT as well as padding (``exclude=``, applied to the
positions of ``input_ids``, i.e. every stack but the decoder): in BERT-style
encoders a few special tokens ([CLS], [SEP]) carry activations orders of
magnitude larger than the rest in some dimensions and dominate variance-
weighted statistics such as linear CKA. ``exclude`` is one of

* a tokenizer (anything with ``all_special_ids``) or a collection of token ids:
  every position holding one of them (the default of the MiniLM heatmaps);
* a boolean tensor [batch, positions] (True = leave out), for every batch;
* a callable ``inputs -> bool tensor [batch, positions]``;

and a batch may carry its own ``"exclude_mask"`` (combined with ``exclude``).
A mask of the wrong shape or dtype is an error naming what was expected.
Left-out non-padding positions are counted per stack (``result.excluded``).

Token counts are kept per stack (encoder and decoder separately) and
returned. ``max_tokens`` caps each stack's count exactly: the last batch is
truncated to the first valid tokens in row-major order, the same tokens for
every point of a stack, so consumers always see aligned rows.

Memory is bounded by one batch whatever the number of tokens: the capture
keeps nothing between batches; consumers accumulate statistics. A consumer
is either a callable ``f(point, feats)`` or an object with
``update(point, feats)`` and optionally ``end_batch()``, called once all
points of a batch have been delivered (for statistics that need several
points' rows of the same tokens at once, see `BatchConsumer`).

Modules shared between layers (tied FF sublayers after a merge) are handled:
a hook only records while its own block is running. The forward pass stops
right after the last block that has a requested point.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .anatomy import Anatomy, anatomy
from .runtime import adaptive

KINDS = ("ff_pre", "ff_gate", "ff_act", "ff_out", "attn_out", "block_out")
DECODER = "decoder"
EXCLUDE_KEY = "exclude_mask"  # a batch's own positions to leave out (True = leave out)


@dataclass(frozen=True)
class Point:
    name: str    # as the user wrote it
    stack: str
    layer: int   # non-negative
    kind: str


def parse_point(model_or_anatomy, name: str) -> Point:
    """Validate a point name against the model's stacks and layers."""
    an = model_or_anatomy if isinstance(model_or_anatomy, Anatomy) else anatomy(model_or_anatomy)
    parts = name.rsplit(".", 2)
    if len(parts) != 3:
        raise ValueError(f"point {name!r} is not '<stack>.<layer>.<kind>' (e.g. 'encoder.0.ff_out')")
    stack_name, idx, kind = parts
    if kind not in KINDS:
        raise ValueError(f"point {name!r}: unknown kind {kind!r}; valid kinds: {list(KINDS)}")
    stack = an.stack(stack_name)
    try:
        i = int(idx)
    except ValueError:
        raise ValueError(f"point {name!r}: layer {idx!r} is not an integer") from None
    layer = stack.layer(i)  # IndexError with the valid range
    if kind == "ff_gate" and not layer.ff.gated:
        raise ValueError(f"point {name!r}: this FF is not gated, it has no ff_gate")
    return Point(name, stack_name, layer.index, kind)


def point_names(model, kind: str = "ff_out", stack: str | None = None) -> list[str]:
    """All point names of one kind, in execution order (encoder before decoder)."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; valid kinds: {list(KINDS)}")
    an = anatomy(model)
    stacks = [an.stack(stack)] if stack is not None else list(an.stacks.values())
    return [f"{s.name}.{i}.{kind}" for s in stacks for i in range(len(s))]


@dataclass
class CaptureResult:
    tokens: dict[str, int]  # valid tokens delivered per stack
    batches: int
    excluded: dict[str, int] = field(default_factory=dict)  # non-padding positions left out, per stack


# ---------------------------------------------------------------------------
# positions to leave out

def special_token_mask(input_ids: torch.Tensor, special_ids) -> torch.Tensor:
    """True where `input_ids` holds one of `special_ids` (e.g. a tokenizer's `all_special_ids`)."""
    ids = torch.as_tensor(sorted({int(i) for i in special_ids}), dtype=input_ids.dtype, device=input_ids.device)
    return torch.isin(input_ids, ids)


def exclusion(exclude) -> Callable[[dict], torch.Tensor] | None:
    """Normalise `exclude` (see the module doc) to a function inputs -> bool mask, or None."""
    if exclude is None:
        return None
    if hasattr(exclude, "all_special_ids"):
        exclude = list(exclude.all_special_ids)
    if isinstance(exclude, torch.Tensor):
        fixed = exclude
        return lambda inputs: fixed
    if callable(exclude):
        return exclude
    if isinstance(exclude, (list, tuple, set, frozenset)) and all(isinstance(i, int) for i in exclude):
        ids = frozenset(exclude)

        def special(inputs: dict) -> torch.Tensor:
            if "input_ids" not in inputs:
                raise ValueError("leaving special tokens out needs input_ids in the batch; pass a boolean "
                                 "mask (exclude=tensor or a batch 'exclude_mask') instead")
            return special_token_mask(inputs["input_ids"], ids)

        return special
    raise TypeError(f"exclude must be None, a tokenizer, a collection of token ids, a boolean tensor or a "
                    f"callable returning one; got {type(exclude).__name__}")


def _checked_mask(mask, positions: tuple[int, ...] | None, what: str) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise ValueError(f"{what} must be a boolean tensor [batch, positions] (True = leave out), got "
                         f"{type(mask).__name__} {getattr(mask, 'dtype', '')}; convert it with .bool()")
    if positions is not None and tuple(mask.shape) != positions:
        raise ValueError(f"{what} has shape {tuple(mask.shape)} but the batch has (batch, positions) "
                         f"{positions}: expected shape {positions}, got {tuple(mask.shape)}; pass one boolean "
                         "per input position (True = leave out)")
    return mask


class _StopForward(Exception):
    """Raised by a hook after the last block with a requested point."""


class BatchConsumer:
    """Base class for consumers that need all points of a batch together (same token rows):
    `update` only buffers; `end_batch` calls `process({point: feats})` and drops the buffer."""

    def __init__(self) -> None:
        self._buf: dict[str, torch.Tensor] = {}

    def update(self, point: str, feats: torch.Tensor) -> None:
        self._buf[point] = feats

    def end_batch(self) -> None:
        buf, self._buf = self._buf, {}
        if buf:
            self.process(buf)

    def process(self, feats: dict[str, torch.Tensor]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


# ---------------------------------------------------------------------------
# batches -> model inputs and masks

def _as_dict(batch: Any) -> dict[str, Any]:
    if isinstance(batch, Mapping):
        return dict(batch)
    if hasattr(batch, "model_inputs"):  # mtlab.tasks.base.Batch
        return dict(batch.model_inputs())
    if hasattr(batch, "__dict__"):
        return {k: v for k, v in vars(batch).items() if isinstance(v, torch.Tensor)}
    raise TypeError(f"a batch must be a mapping of tensors or an mtlab Batch, got {type(batch).__name__}")


def _shift_right(labels: torch.Tensor, config) -> torch.Tensor:
    """Teacher-forcing decoder inputs from labels, as HF seq2seq heads build them."""
    start = getattr(config, "decoder_start_token_id", None)
    pad = getattr(config, "pad_token_id", None)
    if start is None or pad is None:
        raise ValueError("cannot build decoder_input_ids from labels: the config lacks "
                         "decoder_start_token_id or pad_token_id; pass decoder_input_ids in the batch")
    out = labels.new_full(labels.shape, pad)
    out[:, 1:] = labels[:, :-1]
    out[:, 0] = start
    return out.masked_fill(out == -100, pad)


def _inputs_and_masks(batch: Any, an: Anatomy, device, takes_labels: bool = True
                      ) -> tuple[dict, dict[str, torch.Tensor | None]]:
    b = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in _as_dict(batch).items()}
    b = {k: v for k, v in b.items() if isinstance(v, torch.Tensor)}
    enc_dec = DECODER in an.stacks
    if not enc_dec:
        b.pop("labels", None)  # no loss needed; heads disagree on what labels mean
    elif "decoder_input_ids" in b:
        b.pop("labels", None)
    elif "labels" in b and not takes_labels:  # a bare encoder-decoder (e.g. BartModel)
        labels = b.pop("labels")
        b["decoder_input_ids"] = _shift_right(labels, an.model.config)
        b["decoder_attention_mask"] = (labels != -100).long()
    am = b.get("attention_mask")
    masks: dict[str, torch.Tensor | None] = {name: am for name in an.stacks if name != DECODER}
    if enc_dec:
        if "decoder_attention_mask" in b:
            masks[DECODER] = b["decoder_attention_mask"]
        elif "labels" in b:
            masks[DECODER] = b["labels"] != -100
        elif "decoder_input_ids" in b:
            masks[DECODER] = None
        else:
            masks[DECODER] = "missing"  # type: ignore[assignment]  # error only if decoder points are used
    return b, masks


# ---------------------------------------------------------------------------
# the capture

class Capture:
    """Hooks for a fixed set of points; `run` streams batches through the model.

    >>> cap = Capture(model, ["encoder.0.ff_pre", "decoder.1.ff_out"], [consumer])
    >>> result = cap.run(batches, max_tokens=10_000)   # result.tokens == {"encoder": ..., "decoder": ...}
    """

    def __init__(self, model: nn.Module, points: Iterable[str],
                 consumers: Iterable | Callable | None = None, exclude=None):
        self.model = model
        self._exclude = exclusion(exclude)
        self.anatomy = anatomy(model)
        self.points = [parse_point(self.anatomy, p) for p in points]
        if not self.points:
            raise ValueError("no points to capture")
        if consumers is None:
            consumers = []
        elif callable(consumers) or hasattr(consumers, "update"):
            consumers = [consumers]
        self.consumers = list(consumers)
        self._deliver = [c.update if hasattr(c, "update") else c for c in self.consumers]
        self._end = [c.end_batch for c in self.consumers if hasattr(c, "end_batch")]
        self.stacks = [s for s in self.anatomy.stacks if any(p.stack == s for p in self.points)]
        try:
            self._takes_labels = "labels" in inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            self._takes_labels = True
        # state of the batch being processed
        self._active: tuple[str, int] | None = None
        self._base_masks: dict[str, Any] = {}
        self._masks: dict[str, torch.Tensor | None] = {}
        self._budget: dict[str, int | None] = {}
        self.tokens: dict[str, int] = {}
        self.excluded: dict[str, int] = {}

    # -- hooks --------------------------------------------------------------
    def _mask(self, stack: str, shape: torch.Size, device) -> torch.Tensor:
        """The (possibly truncated) boolean mask of `stack` for this batch; counted once."""
        if stack in self._masks:
            m = self._masks[stack]
        else:
            base = self._base_masks.get(stack)
            m = torch.ones(shape, dtype=torch.bool, device=device) if base is None else base.bool()
            left = self._budget.get(stack)
            if left is not None:
                if left <= 0:
                    m = torch.zeros_like(m)
                elif int(m.sum()) > left:
                    flat = m.reshape(-1)
                    m = (flat & (torch.cumsum(flat.long(), 0) <= left)).reshape(m.shape)
            n = int(m.sum())
            self.tokens[stack] = self.tokens.get(stack, 0) + n
            if left is not None:
                self._budget[stack] = left - n
            self._masks[stack] = m
        if tuple(m.shape) != tuple(shape):
            raise ValueError(f"{stack}: activations have (batch, positions) {tuple(shape)} but the mask "
                             f"has {tuple(m.shape)}")
        return m

    def _emit(self, names: list[str], stack: str, out: Any) -> None:
        if isinstance(out, (tuple, list)):
            out = out[0]
        if not isinstance(out, torch.Tensor) or out.dim() < 3:
            raise ValueError(f"{names}: expected [batch, positions, d] activations, got "
                             f"{type(out).__name__} {tuple(getattr(out, 'shape', ()))}")
        m = self._mask(stack, out.shape[:2], out.device)
        if not bool(m.any()):
            return
        feats = out.detach()[m]
        for name in names:
            for deliver in self._deliver:
                deliver(name, feats)

    def _install(self) -> list:
        handles = []
        by_layer: dict[tuple[str, int], list[Point]] = {}
        for p in self.points:
            by_layer.setdefault((p.stack, p.layer), []).append(p)
        order = {s: k for k, s in enumerate(self.anatomy.stacks)}
        last = max(by_layer, key=lambda sl: (order[sl[0]], sl[1]))

        for (stack_name, i), pts in by_layer.items():
            layer = self.anatomy.stack(stack_name).layer(i)
            key = (stack_name, i)
            modules = {"ff_pre": layer.ff.w_in, "ff_gate": layer.ff.w_gate, "ff_out": layer.ff.w_out,
                       "attn_out": layer.attn_out}
            kinds: dict[str, list[str]] = {}
            for p in pts:
                kinds.setdefault(p.kind, []).append(p.name)

            def post(mod, args, out, names, key=key):
                if self._active == key:
                    self._emit(names, key[0], out)

            def pre(mod, args, names, key=key):
                if self._active == key:
                    self._emit(names, key[0], args[0])

            for kind, names in kinds.items():
                if kind in modules:
                    handles.append(modules[kind].register_forward_hook(
                        lambda m, a, o, names=names, f=post: f(m, a, o, names)))
                elif kind == "ff_act":
                    handles.append(layer.ff.w_out.register_forward_pre_hook(
                        lambda m, a, names=names, f=pre: f(m, a, names)))

            def enter(mod, args, key=key):
                self._active = key

            def leave(mod, args, out, key=key, names=kinds.get("block_out"), stop=(key == last)):
                if self._active != key:
                    return
                try:
                    if names:
                        self._emit(names, key[0], out)
                finally:
                    self._active = None
                if stop:
                    raise _StopForward

            handles.append(layer.block.register_forward_pre_hook(enter))
            handles.append(layer.block.register_forward_hook(leave))
        return handles

    # -- running ------------------------------------------------------------
    @torch.no_grad()
    def run(self, batches: Iterable, max_tokens: int | None = None, progress: bool = True,
            desc: str = "capture") -> CaptureResult:
        """Stream `batches` through the model; stop once every captured stack has `max_tokens`."""
        if max_tokens is not None and max_tokens <= 0:
            raise ValueError("max_tokens must be positive (or None for all tokens)")
        model = self.model
        device = next(model.parameters()).device
        was_training = model.training
        self.tokens = {s: 0 for s in self.stacks}
        self.excluded = {s: 0 for s in self.stacks if s != DECODER}
        self._budget = {s: max_tokens for s in self.stacks}
        n_batches = 0
        handles = self._install()
        try:
            model.eval()
            total = len(batches) if hasattr(batches, "__len__") else None
            for batch in adaptive(tqdm(batches, total=total, desc=desc, disable=not progress, leave=False)):
                inputs, self._base_masks = _inputs_and_masks(batch, self.anatomy, device, self._takes_labels)
                if DECODER in self.stacks and isinstance(self._base_masks.get(DECODER), str):
                    raise ValueError("decoder points need the batch to have labels (or decoder_input_ids "
                                     "and decoder_attention_mask): the decoder runs with teacher forcing "
                                     "and its mask comes from them")
                self._leave_out(inputs)
                self._masks, self._active = {}, None
                try:
                    model(**inputs)
                except _StopForward:
                    pass
                finally:
                    self._active, self._masks, self._base_masks = None, {}, {}
                n_batches += 1
                for end in self._end:
                    end()
                if max_tokens is not None and all(self._budget[s] <= 0 for s in self.stacks):
                    break
        finally:
            for h in handles:
                h.remove()
            self._active, self._masks, self._base_masks = None, {}, {}
            model.train(was_training)
        return CaptureResult(tokens=dict(self.tokens), batches=n_batches, excluded=dict(self.excluded))

    def _leave_out(self, inputs: dict) -> None:
        """Fold `exclude` and the batch's own exclude_mask into the masks of the input-position stacks."""
        own = inputs.pop(EXCLUDE_KEY, None)
        if self._exclude is None and own is None:
            return
        ref = inputs.get("input_ids", inputs.get("attention_mask"))
        positions = tuple(ref.shape) if ref is not None else None
        out = torch.zeros(positions or (), dtype=torch.bool, device=ref.device if ref is not None else None)
        if self._exclude is not None:
            out = out | _checked_mask(self._exclude(inputs), positions, "the exclude mask").to(out.device)
        if own is not None:
            out = out | _checked_mask(own, positions, f"the batch's {EXCLUDE_KEY!r}").to(out.device)
        for stack in self.excluded:
            base = self._base_masks.get(stack)
            keep = torch.ones_like(out) if base is None else base.bool().to(out.device)
            if keep.shape != out.shape:
                raise ValueError(f"the exclude mask has shape {tuple(out.shape)} but attention_mask has "
                                 f"{tuple(keep.shape)}: expected shape {tuple(keep.shape)}")
            self.excluded[stack] += int((keep & out).sum())
            self._base_masks[stack] = keep & ~out


def capture(model: nn.Module, batches: Iterable, points: Iterable[str], consumers,
            max_tokens: int | None = None, progress: bool = True, desc: str = "capture",
            exclude=None) -> CaptureResult:
    """Run `batches` through `model`, handing each (point, feats[n_valid, d]) to `consumers`
    (positions in `exclude` left out, see the module doc)."""
    return Capture(model, points, consumers, exclude).run(batches, max_tokens=max_tokens, progress=progress,
                                                          desc=desc)


@dataclass
class _Collector:
    out: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    def update(self, point: str, feats: torch.Tensor) -> None:
        self.out.setdefault(point, []).append(feats.float().cpu())


def collect(model: nn.Module, batches: Iterable, points: Iterable[str], max_tokens: int | None = None,
            progress: bool = False, exclude=None) -> dict[str, torch.Tensor]:
    """Small-data convenience: {point: float32 CPU tensor [n_tokens, d]} (rows aligned within a stack).
    Keeps every token: use consumers (`capture`) for anything large."""
    points = list(points)
    col = _Collector()
    capture(model, batches, points, col, max_tokens=max_tokens, progress=progress, desc="collect", exclude=exclude)
    return {p: torch.cat(col.out[p]) if p in col.out else torch.empty(0, 0) for p in points}
