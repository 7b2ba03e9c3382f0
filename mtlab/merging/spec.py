"""Typed specs of the FF-merging study, each with its text form (parsed and written here only).

    MergeSpec   STACK ":" LAYERS ["@" ANCHOR] ["/" METHOD [":" OPTION=VALUE {"," OPTION=VALUE}]]
                e.g. "encoder:2-4@middle/permute", "encoder:3-5@middle/permute_lowrank:r=8"
    PruneSpec   "prune" STACK ":" START "-" END                e.g. "prune encoder:2-4"

LAYERS are comma-separated indices and inclusive ranges ("2-4", "0,2,5"); ANCHOR is first |
middle | last | a layer of the set (default first; "middle" of an even-sized set is the lower
middle); METHOD is a registered merge method (`mtlab.merging.methods`; default permute), with
its options after a colon (a registered method's defaults are filled in, so "permute_lowrank" reads
"permute_lowrank:r=8"). `str(spec)` writes the canonical form and `parse(str(spec)) == spec`. A pruning spec names the
WINDOW: its first block is kept and the blocks after it are dropped.
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from ..anatomy import Anatomy, anatomy
from .methods import find_merge_method, get_merge_method, merge_methods

__all__ = ["MergeSpec", "PruneSpec", "as_merge_spec", "candidate_spec", "layer_runs", "ANCHORS"]

ANCHORS = ("first", "middle", "last")
_SPEC_RE = re.compile(r"^(?P<stack>[A-Za-z_][\w.]*):(?P<layers>[^@/]+)(?:@(?P<anchor>[^@/]+))?"
                      r"(?:/(?P<method>\w+)(?::(?P<options>[^@/:]*))?)?$")
_SYNTAX = ("STACK:LAYERS[@ANCHOR][/METHOD], e.g. 'encoder:2-4@middle/permute' or 'layers:0,1' "
           "(LAYERS: indices and inclusive ranges; ANCHOR: first|middle|last|a layer of the set; "
           "METHOD: a registered merge method, e.g. permute|vanilla|permute_lowrank:r=8)")


def layer_runs(layers: Iterable[int]) -> str:
    """Layer indices as sorted runs: [2, 3, 4, 6] -> "2-4,6" (the LAYERS of a spec)."""
    out, items = [], sorted(layers)
    i = 0
    while i < len(items):
        j = i
        while j + 1 < len(items) and items[j + 1] == items[j] + 1:
            j += 1
        out.append(str(items[i]) if i == j else f"{items[i]}-{items[j]}")
        i = j + 1
    return ",".join(out)


@dataclass(frozen=True)
class MergeSpec:
    """One merge set: `layers` of `stack` merged into one tied FF sublayer (see module docstring).

    `layers` is kept sorted; duplicates are kept so that `validate` can report them.
    `anchor` is "first", "middle", "last", or an int layer index inside the set.
    """
    stack: str
    layers: tuple[int, ...]
    anchor: str | int = "first"
    method: str = "permute"
    options: tuple[tuple[str, object], ...] = ()  # the method's options, sorted by name (a dict is accepted)

    def __post_init__(self):
        try:
            layers = tuple(sorted(int(i) for i in self.layers))
        except (TypeError, ValueError):
            raise ValueError(f"MergeSpec.layers must be layer indices (ints), got {self.layers!r}") from None
        object.__setattr__(self, "layers", layers)
        anchor = self.anchor
        if isinstance(anchor, str):
            anchor = anchor.strip().lower()
            if anchor.lstrip("-").isdigit():
                anchor = int(anchor)
        elif isinstance(anchor, bool) or not isinstance(anchor, int):
            raise ValueError(f"MergeSpec.anchor must be one of {ANCHORS} or a layer index, got {self.anchor!r}")
        object.__setattr__(self, "anchor", anchor)
        method, _, text = str(self.method).strip().lower().partition(":")
        object.__setattr__(self, "method", method)
        object.__setattr__(self, "options", _options(self.options, text, method))

    # -- string form
    @classmethod
    def parse(cls, text: str) -> MergeSpec:
        """Read the short form STACK:LAYERS[@ANCHOR][/METHOD] (see the module docstring)."""
        if isinstance(text, MergeSpec):
            return text
        s = re.sub(r"\s+", "", str(text))
        m = _SPEC_RE.match(s)
        if not m:
            raise ValueError(f"cannot parse merge spec {text!r}: expected {_SYNTAX}")
        layers: list[int] = []
        for part in m["layers"].split(","):
            r = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
            if not r:
                raise ValueError(f"cannot parse layers {part!r} in merge spec {text!r}: expected {_SYNTAX}")
            lo, hi = int(r[1]), int(r[2] if r[2] is not None else r[1])
            if hi < lo:
                raise ValueError(f"empty layer range {part!r} in merge spec {text!r}: write it low-high, "
                                 f"e.g. {hi}-{lo}")
            layers.extend(range(lo, hi + 1))
        return cls(stack=m["stack"], layers=tuple(layers), anchor=m["anchor"] or "first",
                   method=(m["method"] or "permute") + (f":{m['options']}" if m["options"] is not None else ""))

    def __str__(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options)
        return f"{self.stack}:{layer_runs(self.layers)}@{self.anchor}/{self.method}" + (f":{opts}" if opts else "")

    def option(self, name: str):
        """The value of one of the method's options (defaults filled in for a registered method)."""
        return dict(self.options)[name]

    # -- meaning
    def anchor_layer(self) -> int:
        """The anchor's layer index ("middle" of an even-sized set is the lower middle)."""
        if isinstance(self.anchor, int):
            return self.anchor
        if not self.layers:
            raise ValueError(f"merge spec {self}: no layers")
        k = len(self.layers)
        return {"first": self.layers[0], "middle": self.layers[(k - 1) // 2], "last": self.layers[-1]}[self.anchor]

    def others(self) -> tuple[int, ...]:
        """The non-anchor layers, to be aligned to the anchor."""
        a = self.anchor_layer()
        return tuple(i for i in self.layers if i != a)

    def validate(self, model_or_anatomy: nn.Module | Anatomy) -> None:
        """Check the spec against a model: ValueError naming the problem and the fix."""
        an = model_or_anatomy if isinstance(model_or_anatomy, Anatomy) else anatomy(model_or_anatomy)
        where = f"merge spec {str(self)!r}"
        if self.stack not in an.stacks:
            raise ValueError(f"{where}: {type(an.model).__name__} ({an.family}) has no stack {self.stack!r}; "
                             f"use one of {list(an.stacks)}")
        n = len(an.stacks[self.stack])
        if len(self.layers) < 2:
            raise ValueError(f"{where}: a merge set needs at least 2 layers, got {list(self.layers)}; "
                             f"name 2 or more layers of {self.stack!r} (0-{n - 1})")
        dup = sorted({i for i in self.layers if self.layers.count(i) > 1})
        if dup:
            raise ValueError(f"{where}: layer(s) {dup} listed more than once; list each layer once")
        bad = [i for i in self.layers if not 0 <= i < n]
        if bad:
            raise ValueError(f"{where}: layer(s) {bad} out of range for stack {self.stack!r} with {n} layers; "
                             f"valid layers are 0-{n - 1}")
        if isinstance(self.anchor, int):
            if self.anchor not in self.layers:
                raise ValueError(f"{where}: anchor layer {self.anchor} is not in the merge set "
                                 f"{list(self.layers)}; pick one of them or first/middle/last")
        elif self.anchor not in ANCHORS:
            raise ValueError(f"{where}: unknown anchor {self.anchor!r}; use one of {ANCHORS} or a layer of the set")
        if self.method not in merge_methods():
            raise ValueError(f"{where}: unknown method {self.method!r}; use one of {merge_methods()} (or register "
                             "one with @mtlab.merging.methods.merge_method)")
        get_merge_method(self.method).option_values(dict(self.options), where)


def _options(given, text: str, method: str) -> tuple[tuple[str, object], ...]:
    """A spec's options as sorted (name, value) pairs: `given` (pairs or a dict) and the text after
    the method's colon ("r=8,b=2"); a registered method's defaults filled in and values converted
    (unknown options are kept, for `validate` to name)."""
    try:
        opts = dict(given.items() if isinstance(given, dict) else given or ())
    except (TypeError, ValueError):
        raise ValueError(f"MergeSpec.options must be a dict or (name, value) pairs, got {given!r}") from None
    for part in filter(None, text.split(",")):
        k, eq, v = part.partition("=")
        if not eq or not k.isidentifier() or not v:
            raise ValueError(f"cannot read option {part!r} of method {method!r}: write OPTION=VALUE, e.g. "
                             f"'{method}:r=8'")
        opts[k] = v
    m = find_merge_method(method)
    if m is not None and not set(opts) - set(m.options):
        opts = m.option_values(opts, f"merge method '{method}'")
    return tuple(sorted(opts.items()))


def as_merge_spec(s) -> MergeSpec:
    """A MergeSpec, or its string form parsed."""
    if isinstance(s, MergeSpec):
        return s
    if isinstance(s, str):
        return MergeSpec.parse(s)
    raise ValueError(f"expected a MergeSpec or its string form ({_SYNTAX}), got {type(s).__name__}")



@dataclass(frozen=True)
class PruneSpec:
    """One layer-pruning candidate: the window `start..end` (inclusive) of `stack`, whose first block
    is kept and whose other blocks are dropped. Text form "prune STACK:START-END", e.g.
    "prune encoder:2-4" (layers 3 and 4 disappear); `PruneSpec.parse(str(p)) == p`."""
    stack: str
    start: int
    end: int

    _RE = re.compile(r"^prune\s+(?P<stack>[A-Za-z_][\w.]*):(?P<a>\d+)-(?P<b>\d+)$")

    @classmethod
    def window(cls, stack: str, start: int, size: int) -> PruneSpec:
        return cls(stack, int(start), int(start) + int(size) - 1)

    @staticmethod
    def is_prune(text) -> bool:
        """Whether `text` is meant as a pruning spec (it starts with "prune")."""
        return isinstance(text, PruneSpec) or (isinstance(text, str) and text.strip().startswith("prune"))

    @classmethod
    def parse(cls, text: str | PruneSpec) -> PruneSpec:
        if isinstance(text, PruneSpec):
            return text
        m = cls._RE.match(str(text).strip())
        if not m:
            raise ValueError(f"cannot parse {text!r}: a pruning spec reads 'prune STACK:START-END', e.g. "
                             "'prune encoder:2-4'")
        return cls(m["stack"], int(m["a"]), int(m["b"]))

    def __str__(self) -> str:
        return f"prune {self.stack}:{self.start}-{self.end}"

    @property
    def size(self) -> int:
        return self.end - self.start + 1

    def dropped(self) -> list[int]:
        """The blocks that disappear: every block of the window after its first."""
        return list(range(self.start + 1, self.end + 1))


def candidate_spec(text: str | MergeSpec | PruneSpec) -> MergeSpec | PruneSpec:
    """A `window_search` row's spec (or one part of a candidate) as its typed spec."""
    if isinstance(text, MergeSpec):
        return text
    return PruneSpec.parse(text) if PruneSpec.is_prune(text) else MergeSpec.parse(text)


