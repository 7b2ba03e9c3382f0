"""Compact weights of a model fine-tuned from a known original: what ships is the difference.

A MiniLM student, module bank or recovered merge is the original all-MiniLM-L6-v2 (which
every machine has, verified by its hash) plus a small change per tensor. Shipping each in
bf16 would cost 2 bytes per parameter and round every weight; instead each tensor is stored
as the cheapest of:

* `same`:  identical to a tensor of the original (a frozen embedding table): nothing stored;
* `alias`: identical to a tensor stored earlier under another name (tied FF sublayers);
* `delta`: int8 difference to the original tensor of the same shape closest to it, one fp32
  scale per row (absmax / 127): 1 byte per parameter, used only when its error is not larger
  than bf16's (fine-tuned weights: far smaller, since the difference is small);
* `bf16`:  otherwise (a merged FF far from any original one).

Decoding is elementwise fp32 arithmetic, so a packed state decodes to the same bits on every
machine: score the DECODED model, and the scores shipped with it are the ones anyone reloads.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

__all__ = ["pack_state", "unpack_state", "save_packed", "load_packed", "packed_bytes"]

META_KEY = "mtlab_compact"


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(1, -1)


def _quantize(d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes and fp32 per-row scales of a difference tensor."""
    r = _rows(d.float())
    scale = r.abs().amax(1) / 127
    q = torch.round(r / torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(1)).clamp(-127, 127)
    return q.to(torch.int8).reshape(d.shape), scale


def _dequantize(q: torch.Tensor, scale: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    return (base.float() + (_rows(q.float()) * scale.unsqueeze(1)).reshape(base.shape)).contiguous()


def _nearest(t: torch.Tensor, base: Mapping[str, torch.Tensor]) -> str | None:
    """Name of the floating base tensor of t's shape closest to t (None: no such tensor)."""
    same = [k for k, b in base.items() if b.shape == t.shape and b.is_floating_point()]
    return min(same, key=lambda k: float((t.float() - base[k].float()).norm())) if same else None


def pack_state(state: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]
               ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors to store, {name: how it is stored}) of a state dict against the original's `base`
    state dict (see the module doc). `unpack_state` inverts it exactly for the decoded values."""
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, str] = {}
    decoded: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        t = t.detach().cpu()
        if not t.is_floating_point():
            tensors[name], meta[name] = t.contiguous(), "raw"
            continue
        twin = next((k for k, b in base.items() if b.shape == t.shape and torch.equal(b, t)), None)
        alias = next((k for k, d in decoded.items() if d.shape == t.shape and torch.equal(state[k].cpu(), t)), None)
        if twin is not None:
            meta[name] = f"same:{twin}"
            decoded[name] = base[twin].float()
        elif alias is not None:
            meta[name] = f"alias:{alias}"
            decoded[name] = decoded[alias]
        else:
            decoded[name] = _pack_one(name, t.float(), base, tensors, meta)
    return tensors, meta


def _pack_one(name: str, t: torch.Tensor, base, tensors: dict, meta: dict) -> torch.Tensor:
    """Store one tensor as an int8 delta when that is at least as exact as bf16, else as bf16."""
    half = t.to(torch.bfloat16)
    near = _nearest(t, base)
    if near is not None:
        q, scale = _quantize(t - base[near].float())
        dec = _dequantize(q, scale, base[near])
        if float((dec - t).norm()) <= float((half.float() - t).norm()):
            tensors[f"{name}::q"], tensors[f"{name}::scale"] = q, scale
            meta[name] = f"delta:{near}"
            return dec
    tensors[name], meta[name] = half.contiguous(), "bf16"
    return half.float()


def unpack_state(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str],
                 base: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The fp32 state dict that `pack_state` stored (raw tensors keep their dtype)."""
    out: dict[str, torch.Tensor] = {}
    for name, how in meta.items():
        kind, _, ref = how.partition(":")
        if kind in ("same", "delta") and ref not in base:
            raise KeyError(f"{name} is stored against the original's {ref!r}, which this base model lacks: "
                           f"load it over the model it was packed against")
        if kind == "raw":
            out[name] = tensors[name]
        elif kind == "bf16":
            out[name] = tensors[name].float()
        elif kind == "same":
            out[name] = base[ref].float().clone()
        elif kind == "alias":
            out[name] = out[ref]
        elif kind == "delta":
            out[name] = _dequantize(tensors[f"{name}::q"], tensors[f"{name}::scale"], base[ref])
        else:
            raise ValueError(f"{name}: unknown storage {how!r} (written by a newer mtlab?)")
    return out


def save_packed(path: str | Path, state: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]) -> Path:
    """Pack `state` against `base` into one safetensors file (the storage map in its metadata)."""
    tensors, meta = pack_state(state, base)
    if not tensors:  # safetensors needs a tensor; an unchanged model still gets a (tiny) file
        tensors = {"__empty__": torch.zeros(1)}
    save_file(tensors, str(path), metadata={META_KEY: json.dumps(meta)})
    return Path(path)


def load_packed(path: str | Path, base: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The decoded state dict of a `save_packed` file, over the same `base`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get(META_KEY)
    if raw is None:
        raise ValueError(f"{path} is not a packed state (no {META_KEY} metadata): it was not written by save_packed")
    return unpack_state(load_file(str(path)), json.loads(raw), base)


def packed_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())
