"""What identifies an artifact: the one hash (of text, files, configs, model weights) and the one
config diff, so every cache key, run folder, split and refusal agrees on what "the same" means.

Every digest is hashlib's: SHA-1 unless a caller fixed another algorithm when its keys were first
shipped (the sentence corpus' split and shipped cards use SHA-256); changing either would move
shipped splits and invalidate shipped keys, so the algorithm is a parameter, not a second function.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

__all__ = ["digest", "text_hash", "config_hash", "file_hash", "weights_hash", "flat", "config_diff",
           "changed_fields"]


def digest(text: str | bytes, algorithm: str = "sha1") -> bytes:
    """The raw digest of `text` (UTF-8) by `algorithm` (a hashlib name: "sha1", "sha256")."""
    return hashlib.new(algorithm, text.encode("utf-8") if isinstance(text, str) else text).digest()


def text_hash(text: str | bytes, algorithm: str = "sha1", length: int | None = None) -> str:
    """The hex digest of `text` (its first `length` characters; None: all)."""
    return digest(text, algorithm).hex()[:length]


def config_hash(config, algorithm: str = "sha1", length: int = 12) -> str:
    """Stable short hash of a JSON-able config (dict keys sorted; tuples read as lists; other objects
    by their str)."""
    return text_hash(json.dumps(config, sort_keys=True, default=str), algorithm, length)


def file_hash(path: str | Path, algorithm: str = "sha1", length: int | None = 12) -> str:
    """Content hash of a file (e.g. a teacher's weights), read in chunks; `length=None`: the whole digest."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:length]


def weights_hash(model) -> str:
    """SHA-1 over the model's state dict (names, dtypes, shapes and bytes, in name order): the
    identity of a model's weights, independent of file format and device."""
    import torch  # the one hash that reads tensors; everything else here is standard library

    h = hashlib.sha1()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def flat(config, prefix: str = "") -> dict:
    """{dotted field: value} of a nested JSON-able config after a JSON round trip (tuples become lists,
    other objects their str); an empty dict is a value of its own."""
    def walk(obj, pre: str, out: dict) -> dict:
        if isinstance(obj, dict) and obj:
            for k, v in obj.items():
                walk(v, f"{pre}{k}.", out)
        elif pre or not isinstance(obj, dict):
            out[pre[:-1]] = obj
        return out

    return walk(json.loads(json.dumps(config if config is not None else {}, default=str)), prefix, {})


def config_diff(old, new, *, ignore=(), prefix: str = "", was: str = "checkpoint") -> list[str]:
    """'field: checkpoint X, now Y' (`was` names the old side) for every (nested, dotted) field that
    differs, after a JSON round trip (tuples become lists; None reads as {}); fields named in
    `ignore` are skipped."""
    a, b = flat(old), flat(new)
    return [f"{prefix}{k}: {was} {a.get(k, '(absent)')!r}, now {b.get(k, '(absent)')!r}"
            for k in sorted(set(a) | set(b)) if not _same(a, b, k) and k not in ignore]


def changed_fields(old, new, *, ignore=()) -> list[str]:
    """The dotted names of the fields that differ between two configs (`config_diff` without values)."""
    a, b = flat(old), flat(new)
    return sorted(k for k in set(a) | set(b) if not _same(a, b, k) and k not in ignore)


def _same(a: dict, b: dict, k: str) -> bool:
    """Field k equal on both sides (an absent field reads as None, so a field added later with a None
    default still resumes old runs; 1 equals 1.0, but True is not 1)."""
    x, y = a.get(k), b.get(k)
    return x == y and isinstance(x, bool) == isinstance(y, bool)
