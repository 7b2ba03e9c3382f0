"""Artifacts keyed by a hash of the config that made them, written atomically.

Notebooks, benchmarks and `make report` share one cache directory (`$MTLAB_CACHE`, default
`cache/` at the repository root), so modules are trained once and tables computed once. The
key includes everything that changes the result (the teacher's weights by content hash, the
profile section, the code's config fields): an artifact from another teacher or config is
never silently reused, it simply lives under another key. The hash and the config diff are
`mtlab.keys`' (the one of each); the paths are `mtlab.paths`' (re-exported here).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pandas as pd

from .checkpoint import atomic_dir, write_csv, write_json
from .keys import changed_fields, config_hash, file_hash
from .paths import ROOT, TEACHER_DIR, cache_root, shown


def teacher_hash() -> str:
    """Content hash of the bundled teacher's weights: the part of every cache key that ties an
    artifact to the teacher it was made from."""
    return file_hash(TEACHER_DIR / "model.safetensors")


def artifact_dir(kind: str, config: dict) -> Path:
    """The directory for an artifact of `kind` made from `config` (created, with config.json)."""
    d = cache_root() / kind / config_hash(config)
    d.mkdir(parents=True, exist_ok=True)
    meta = d / "config.json"
    if not meta.exists():
        write_json(meta, config)
    return d


def stale_note(kind: str, config: dict) -> str | None:
    """Why an existing artifact of `kind` is not reused: which config fields differ from the
    newest one (another teacher's weights, another profile, newer code). None if there is none."""
    here = config_hash(config)
    others = sorted((p for p in (cache_root() / kind).glob("*/config.json") if p.parent.name != here),
                    key=lambda p: p.stat().st_mtime)
    if not others:
        return None
    try:
        old = json.loads(others[-1].read_text())
    except (OSError, json.JSONDecodeError):
        return None
    diff = changed_fields(old, config)
    fields = ", ".join(diff[:6]) + (f" (+{len(diff) - 6} more)" if len(diff) > 6 else "")
    return (f"cache: {kind} for this config ({here}) is new; the cached one in {shown(others[-1].parent)} differs in "
            f"{fields or 'nothing readable'}, so it is kept but not reused")


def cached_frame(kind: str, config: dict, compute: Callable[[], pd.DataFrame], *, refresh: bool = False) -> pd.DataFrame:
    """`compute()` once per config; later calls read the CSV. The config rides in `df.attrs`.
    When only tables of other configs exist, says what differs (`stale_note`) before computing."""
    d = artifact_dir(kind, config)
    path = d / "table.csv"
    if path.exists() and not refresh:
        df = pd.read_csv(path)
    else:
        note = None if refresh else stale_note(kind, config)
        if note:
            print(note, flush=True)
        df = compute()
        write_csv(path, df)
    df.attrs["config"] = config
    df.attrs["cache"] = str(path)
    return df


__all__ = ["ROOT", "cache_root", "config_hash", "stale_note", "teacher_hash", "file_hash", "artifact_dir", "cached_frame",
           "atomic_dir", "shown"]
