"""The registry of merge methods: how the non-anchor layers of a merge set are aligned
to the anchor before their FF weights are averaged and tied.

A method is one function, registered with a decorator:

    @merge_method("permute", needs_correlations=True)
    def permute(ffs, anchor, correlations):
        return {i: match(c) for i, c in correlations.items()}

It receives the set's FF sublayers `{layer: FF}`, the anchor's layer index and, for a
method that `needs_correlations`, the checked anchor-vs-layer correlation matrices of
every non-anchor layer (computed by `mtlab.merging.correlations.CorrelationCache` or passed to
`merge_ffs`); it returns `{layer: perm or None}` for the non-anchor layers (None: as is;
`perm` in the `mtlab.merging.align` convention). Averaging, tying, recording and saving are
the same for every method. Everything that lists methods (MergeSpec validation,
`window_search`, the experiments) reads `merge_methods()`.

A method may also take OPTIONS, written after its name in a spec ("permute_lowrank:r=8"):
`options={"r": 8}` names each option with its default (whose type the value takes), and
`MergeSpec` fills in the defaults so a spec's text always says them. Two hooks let a method keep
more than the tied average: `check(spec, ffs)` refuses a set before anything is touched
(ValueError naming the fix), and `extend(spec, ffs, aligned)` runs on the aligned weights
`{layer: {role: (weight (out, in), bias)}}` just before they are averaged and tied (to add
per-layer modules, e.g. the low-rank deltas of `mtlab.merging.lowrank`); `load_merged` calls
`extend(spec, ffs, None)` to rebuild those modules empty before the saved values are loaded.
`searched=False` keeps a method out of the default method list of `window_search`
(`merge_methods(searched=True)`); naming it still works everywhere.

The registry is `METHODS` (`mtlab.registry.Registry`): each entry also carries the metadata the
studies read (kind "merge", rank: the reading order of a merge table's rows, label, description).
`permute_lowrank` registers itself in `mtlab.merging.lowrank`, which `mtlab.merging` imports.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from ..anatomy import FF
from ..registry import Registry
from .align import match

__all__ = ["METHODS", "MergeMethod", "merge_method", "merge_methods", "get_merge_method", "find_merge_method",
           "unregister_merge_method"]

AlignFn = Callable[[Mapping[int, FF], int, Mapping[int, torch.Tensor] | None], Mapping[int, object]]
CheckFn = Callable[[object, Mapping[int, FF]], None]
ExtendFn = Callable[[object, Mapping[int, FF], Mapping[int, Mapping[str, tuple]] | None], None]


@dataclass(frozen=True)
class MergeMethod:
    name: str
    align: AlignFn
    needs_correlations: bool = False
    options: Mapping[str, object] = field(default_factory=dict)  # option name -> default value
    check: CheckFn | None = None
    extend: ExtendFn | None = None
    searched: bool = True

    def option_values(self, given: Mapping[str, object], where: str = "") -> dict[str, object]:
        """`given` options checked and converted to the defaults' types, the defaults filled in
        (ValueError naming the method's options)."""
        where = where or f"merge method {self.name!r}"
        unknown = sorted(set(given) - set(self.options))
        if unknown:
            if not self.options:
                raise ValueError(f"{where}: method {self.name!r} takes no options, got {unknown}; write it as "
                                 f"'/{self.name}' without ':...'")
            raise ValueError(f"{where}: method {self.name!r} has no option(s) {unknown}; its options are "
                             f"{_options_text(self.name, self.options)}")
        out = dict(self.options)
        for k, v in given.items():
            want = type(self.options[k])
            try:
                if isinstance(v, bool) or (want is int and isinstance(v, float) and not v.is_integer()):
                    raise ValueError
                out[k] = want(v)
            except (TypeError, ValueError):
                raise ValueError(f"{where}: option {k}={v!r} of method {self.name!r} must be a {want.__name__}, "
                                 f"e.g. {_options_text(self.name, self.options)}") from None
        return out


def _options_text(name: str, options: Mapping[str, object]) -> str:
    return f"'{name}:" + ",".join(f"{k}={v}" for k, v in options.items()) + "'"


def _key(name: str) -> str:
    return str(name).partition(":")[0].strip().lower()


def _check_name(key: str) -> None:
    if not key.isidentifier():
        raise ValueError(f"merge method name {key!r} must be a word (letters, digits, _): it is the METHOD "
                         "of a merge spec 'STACK:LAYERS@ANCHOR/METHOD'")


#: every merge method, with what the studies read: label, kind ("merge": the frontier's group), rank
#: (reading order of a merge table's rows), the task kinds it works for (all: it only aligns FF weights)
METHODS: Registry[MergeMethod] = Registry("merge method", "@mtlab.merging.methods.merge_method(name)",
                                          key=_key, check_name=_check_name)


def merge_method(name: str, *, needs_correlations: bool = False, options: Mapping[str, object] | None = None,
                 check: CheckFn | None = None, extend: ExtendFn | None = None,
                 searched: bool = True, label: str | None = None, rank: int | None = None,
                 description: str | None = None, **meta) -> Callable[[AlignFn], AlignFn]:
    """Decorator: register `fn(ffs, anchor, correlations) -> {layer: perm | None}` as merge method
    `name` (lower case; the METHOD of a merge spec). Registering a name again replaces it.
    `options` ({name: default}), `check`, `extend` and `searched`: see the module docstring; `label`,
    `rank`, `description` and any other keyword: the entry's metadata in `METHODS` (kind "merge")."""
    _check_name(str(name).strip().lower())
    key = _key(name)
    for k in options or {}:
        if not str(k).isidentifier():
            raise ValueError(f"option name {k!r} of merge method {name!r} must be a word (letters, digits, _)")

    def register(fn: AlignFn) -> AlignFn:
        doc = (fn.__doc__ or "").strip().split("\n")[0]
        METHODS.add(key, MergeMethod(key, fn, bool(needs_correlations), dict(options or {}), check, extend,
                                     bool(searched)),
                    label=label or key, kind="merge", rank=rank, trains_per_depth=False,
                    description=description or doc, searched=bool(searched),
                    needs_correlations=bool(needs_correlations), **meta)
        return fn

    return register


def merge_methods(searched: bool = False) -> tuple[str, ...]:
    """The registered method names, in registration order (built in: permute, vanilla,
    permute_lowrank); `searched=True`: only those a window search runs by default."""
    return METHODS.names(searched=True) if searched else METHODS.names()


def get_merge_method(name: str) -> MergeMethod:
    """The registered method `name` (options after a colon are ignored: "permute_lowrank:r=8");
    an unknown name raises a ValueError listing the registered ones and how to register one."""
    return METHODS.get(name)


def find_merge_method(name: str) -> MergeMethod | None:
    """The registered method `name` (options after ':' ignored), or None when there is none."""
    found = METHODS.find(name)
    return None if found is None else found.value


def unregister_merge_method(name: str) -> None:
    """Remove a method (e.g. one a test registered)."""
    METHODS.unregister(name)


@merge_method("permute", needs_correlations=True, rank=1, profiles=("smoke", "default", "scratch", "full"))
def permute(ffs, anchor, correlations):
    """Verma et al.: align each layer's neurons to the anchor's by a linear assignment on their
    feature correlations."""
    return {i: match(c) for i, c in correlations.items()}


@merge_method("vanilla", rank=2, profiles=("default", "scratch", "full"))
def vanilla(ffs, anchor, correlations):
    """Plain averaging, no alignment (the paper's ablation)."""
    return {i: None for i in ffs if i != anchor}

