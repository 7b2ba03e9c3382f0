"""Artifacts trained once and shipped under data/: written with a card, verified when loaded.

A shipped artifact (the module bank, a baseline) is a folder with its weights as
safetensors, `card.json` and a human `README.md`. The card records the teacher's weight
hash, the exact training config, the budget, the scores and the command that reproduces it,
plus a SHA-256 of every weights file. `verify` refuses a folder whose teacher, config or
weights do not match what the caller is about to use, and names the field and the fix:
an artifact from another teacher or recipe is never loaded silently.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .checkpoint import CheckpointError, atomic_dir, write_json

CARD = "card.json"


class ArtifactMismatch(CheckpointError):
    """A shipped artifact was made from another teacher or config, or its files are damaged."""


def _shown(path: Path) -> str:
    """The path relative to the working directory when it lies below it (messages carry no machine path)."""
    try:
        return str(path.absolute().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()



def shipped_state(root: str | Path, names=None) -> dict[str, str]:
    """{name: SHA-256 of its card, or "missing"} for the artifacts `names` under `root` (every
    folder with a card when `names` is None). The card names every weights file by hash, so this
    is a cache key that changes when an artifact is shipped, re-shipped or removed: a table made
    before is not reused."""
    root = Path(root)
    if names is None:
        names = sorted(p.parent.name for p in root.glob(f"*/{CARD}")) if root.is_dir() else []
    return {n: sha256(root / n / CARD) if (root / n / CARD).exists() else "missing" for n in names}

def _flat(obj, prefix: str = "") -> dict[str, str]:
    if isinstance(obj, dict):
        out: dict[str, str] = {}
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): json.dumps(obj, default=str)}


def config_diff(old: dict, new: dict) -> list[str]:
    """Dotted names of the fields that differ between two JSON-able configs (tuples read as lists)."""
    a, b = _flat(json.loads(json.dumps(old, default=str))), _flat(json.loads(json.dumps(new, default=str)))
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def write_artifact(final: str | Path, write_files, card: dict, readme: str) -> Path:
    """Write an artifact atomically: `write_files(tmp_dir)` puts the weights there, then the card
    (with SHA-256 of each .safetensors file) and README are added; nothing half-written survives."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(final) as tmp:
        write_files(tmp)
        files = {p.relative_to(tmp).as_posix(): sha256(p) for p in sorted(tmp.rglob("*.safetensors"))}
        if not files:
            raise ValueError("an artifact must hold at least one .safetensors file")
        write_json(tmp / CARD, {**card, "files": files})
        (tmp / "README.md").write_text(readme)
    return final


def read_card(path: str | Path) -> dict:
    path = Path(path)
    try:
        return json.loads((path / CARD).read_text())
    except FileNotFoundError as e:
        raise ArtifactMismatch(f"{path} has no {CARD}: the artifact is missing or was not written completely") from e
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactMismatch(f"{path}/{CARD} is unreadable ({e})") from e


def verify(path: str | Path, *, teacher_hash: str, config: dict, remake: str) -> dict:
    """The card of the artifact at `path`, after checking that it was made from this teacher
    (weights hash) with this config, and that every weights file is the one the card names.
    `remake` is the command that rebuilds the artifact, quoted in every error."""
    path = Path(path)
    where = _shown(path)
    fix = f"rebuild it with `{remake}` (or restore {where} from git)"
    if not path.is_dir():
        raise ArtifactMismatch(f"{where} does not exist: {fix}")
    card = read_card(path)
    if card.get("teacher_hash") != teacher_hash:
        raise ArtifactMismatch(f"{where} was made from another teacher (weights hash {card.get('teacher_hash')}, "
                               f"this teacher is {teacher_hash}): {fix}")
    diff = config_diff(card.get("config", {}), config)
    if diff:
        shown = ", ".join(diff[:8]) + (f" (+{len(diff) - 8} more)" if len(diff) > 8 else "")
        raise ArtifactMismatch(f"{where} was trained with another config (fields differ: {shown}): {fix}")
    for name, digest in card.get("files", {}).items():
        f = path / name
        if not f.exists():
            raise ArtifactMismatch(f"{where}/{name} is missing: {fix}")
        if sha256(f) != digest:
            raise ArtifactMismatch(f"{where}/{name} does not match the hash in its card (truncated or modified): {fix}")
    if not card.get("files"):
        raise ArtifactMismatch(f"{where}/{CARD} lists no weights files: {fix}")
    return card


__all__ = ["ArtifactMismatch", "CARD", "config_diff", "read_card", "sha256", "shipped_state", "verify",
           "write_artifact"]
