"""Where mtlab's files live: the repository root, the bundled teacher, the artifact cache, and how a
path is shown in messages and reports. A leaf module (standard library only), so the cache, the
teacher and the training loop all read it without importing each other."""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["ROOT", "TEACHER_DIR", "cache_root", "shown"]

ROOT = Path(__file__).resolve().parent.parent
TEACHER_DIR = ROOT / "data" / "teacher"


def cache_root() -> Path:
    """The artifact cache: `$MTLAB_CACHE`, default `cache/` at the repository root."""
    return Path(os.environ.get("MTLAB_CACHE", ROOT / "cache"))


def shown(path: str | Path) -> str:
    """A path as messages and reports show it: `cache/<kind>/<hash>/...` under the cache root, relative
    to the repository under it (so reports carry no machine path); a path the caller chose elsewhere
    is shown as given."""
    p = Path(path).absolute()
    for root, prefix in ((cache_root(), "cache"), (ROOT, "")):
        try:
            return str(Path(prefix, p.relative_to(Path(root).absolute())))
        except ValueError:
            continue
    return str(path)
