"""Deterministic splits by hashing the example's text (the one place mtlab does it).

A digest of the UTF-8 text (`mtlab.keys.digest`) decides, so a split is the same on every machine
and Python version (no `hash()` salt), and an example never moves when the data set grows. Three
schemes, each the split some shipped data was made with (changing one would move its examples):

- "unit": the first 8 bytes of the SHA-1 read as a number in [0, 1) (any fractions): pairs, text.
- "percent": the first 4 bytes of the SHA-1 modulo 100 (whole-percent fractions): the bundled G2P
  data, and MiniLM's align/dev/test sentences (`names=("align", "dev", "test")`, 25% + 25%).
- "percent_sha256": the first 8 bytes of the SHA-256 modulo 100: the sentence corpus (80/10/10).
"""
from __future__ import annotations

from ..keys import digest

__all__ = ["split_by_hash", "SCHEMES"]

#: scheme -> (hash algorithm, bytes read, mode): "unit" reads a fraction of 2**64, "percent" a remainder of 100
SCHEMES = {"unit": ("sha1", 8, "unit"), "percent": ("sha1", 4, "percent"),
           "percent_sha256": ("sha256", 8, "percent")}


def split_by_hash(text: str, dev_fraction: float = 0.05, test_fraction: float = 0.05, *, scheme: str = "unit",
                  names: tuple[str, str, str] = ("train", "dev", "test")) -> str:
    """"train", "dev" or "test" (or the three `names`) for `text`: train below 1 - dev - test, then
    dev, then test, by `scheme` (see the module docstring)."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown split scheme {scheme!r}; use one of {tuple(SCHEMES)}")
    algorithm, nbytes, mode = SCHEMES[scheme]
    train, dev, test = names
    n = int.from_bytes(digest(text, algorithm)[:nbytes], "big")
    if mode == "unit":
        u = n / 2.0 ** (8 * nbytes)
        if u < 1.0 - dev_fraction - test_fraction:
            return train
        return dev if u < 1.0 - test_fraction else test
    d, t = round(dev_fraction * 100), round(test_fraction * 100)
    if abs(d - dev_fraction * 100) > 1e-9 or abs(t - test_fraction * 100) > 1e-9:
        raise ValueError(f"scheme {scheme!r} needs whole-percent fractions, got dev={dev_fraction}, "
                         f"test={test_fraction}; round them or use scheme='unit'")
    h = n % 100
    return train if h < 100 - d - t else dev if h < 100 - t else test
