"""Deterministic train/dev/test splits by hashing the example's text (the one place mtlab does it).

The SHA-1 of the UTF-8 text decides, so a split is the same on every machine and Python
version (no `hash()` salt), and an example never moves when the data set grows.
"""
from __future__ import annotations

import hashlib

__all__ = ["split_by_hash", "SCHEMES"]

SCHEMES = ("unit", "percent")


def split_by_hash(text: str, dev_fraction: float = 0.05, test_fraction: float = 0.05, *, scheme: str = "unit") -> str:
    """"train", "dev" or "test" for `text`: train below 1 - dev - test, then dev, then test.

    scheme "unit": the first 8 bytes of the SHA-1 read as a number in [0, 1) (any fractions).
    scheme "percent": the first 4 bytes modulo 100 (whole-percent fractions only), the split of
    the bundled G2P data and of MiniLM's sentences."""
    if scheme == "unit":
        u = int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "big") / 2.0**64
        if u < 1.0 - dev_fraction - test_fraction:
            return "train"
        return "dev" if u < 1.0 - test_fraction else "test"
    if scheme == "percent":
        dev, test = round(dev_fraction * 100), round(test_fraction * 100)
        if abs(dev - dev_fraction * 100) > 1e-9 or abs(test - test_fraction * 100) > 1e-9:
            raise ValueError(f"scheme 'percent' needs whole-percent fractions, got dev={dev_fraction}, "
                             f"test={test_fraction}; round them or use scheme='unit'")
        h = int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:4], "big") % 100
        return "train" if h < 100 - dev - test else "dev" if h < 100 - test else "test"
    raise ValueError(f"unknown split scheme {scheme!r}; use one of {SCHEMES}")
