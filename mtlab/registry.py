"""One registry type for every place users extend mtlab (merge methods, baselines, assembly
strategies, task kinds, task metrics), so each entry carries what the layers above need.

    METHODS = Registry("merge method", "@mtlab.merging.methods.merge_method(name)")

    @METHODS.register("permute", label="permute (Verma et al.)", kind="merge", rank=1)
    def permute(...): ...

An entry is the registered object plus its metadata (`Entry`): a label for tables and plots, a
kind (the group a study's frontier and conclusions put its rows in), a rank (reading order of
rows; unranked entries come after the ranked ones, in registration order), whether it trains once
per target depth, the task kinds it supports ("seq2seq", "causal_lm", "embedding"; empty: all), a
description, and any other field a layer needs (`extra`). Studies, explorers, the CLI and
artifact names read these instead of hard-coding names. Looking up an unknown name raises
`UnknownNameError` (a ValueError and a KeyError) listing the registered names and how to register
one. Iteration is in registration order; registering a name again replaces it in place.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Generic, TypeVar

__all__ = ["Entry", "Registry", "UnknownNameError", "TASK_KINDS", "UNRANKED"]

T = TypeVar("T")

TASK_KINDS = ("seq2seq", "causal_lm", "embedding")   # what a task's model does: the kinds an entry may support
UNRANKED = 9   # the rank of an entry registered without one: after every built-in (the studies' old default)


class UnknownNameError(ValueError, KeyError):
    """A name that is not registered; the message lists the registered names and how to add one."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered object and what the layers above read about it."""
    name: str
    value: T
    label: str = ""
    kind: str = ""
    rank: int = UNRANKED
    trains_per_depth: bool | None = None   # None: not a trained entry (e.g. a merge method's alignment)
    tasks: tuple[str, ...] = ()            # supported task kinds; empty: every kind
    description: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    def supports(self, task_kind: str | None) -> bool:
        """Whether this entry applies to a task of `task_kind` (None: any)."""
        return task_kind is None or not self.tasks or task_kind in self.tasks

    def meta(self) -> dict[str, Any]:
        """The metadata as one flat dict (a row of `Registry.table`)."""
        return {"name": self.name, "label": self.label, "kind": self.kind, "rank": self.rank,
                "trains_per_depth": self.trains_per_depth, "tasks": ",".join(self.tasks) or "all",
                "description": self.description, **self.extra}


_FIELDS = ("label", "kind", "rank", "trains_per_depth", "tasks", "description")


class Registry(Generic[T]):
    """Named objects of one sort, in registration order, each with its `Entry` metadata.

    `what` names the sort in messages ("merge method"; `plural`: default what + "s"); `how` says how
    to register one (shown when a name is unknown); `key` normalises names (e.g. lower case);
    `check_name` refuses a bad name (ValueError naming the fix)."""

    def __init__(self, what: str, how: str, *, key: Callable[[str], str] | None = None,
                 check_name: Callable[[str], None] | None = None, plural: str | None = None):
        self.what, self.how, self.plural = what, how, plural or f"{what}s"
        self._key = key or (lambda name: str(name))
        self._check_name = check_name
        self._entries: dict[str, Entry[T]] = {}

    # ---- registering ------------------------------------------------------------------
    def add(self, name: str, value: T, **meta) -> Entry[T]:
        """Register `value` as `name` with metadata (the `Entry` fields; any other keyword goes to
        `extra`). The label defaults to the name, the description to the value's first doc line."""
        key = self._key(name)
        if self._check_name is not None:
            self._check_name(key)
        known = {k: v for k in _FIELDS if k in meta for v in [meta.pop(k)] if v is not None}  # None: the default
        if "tasks" in known:
            known["tasks"] = checked_task_kinds(known["tasks"], f"{self.what} {key!r}")
        doc = (getattr(value, "__doc__", None) or "").strip().split("\n")[0] if callable(value) else ""
        entry = Entry(key, value, **{"label": key, "description": doc, **known}, extra=dict(meta))
        self._entries[key] = entry
        return entry

    def register(self, name: str, **meta) -> Callable[[T], T]:
        """Decorator: `@registry.register(name, label=..., kind=..., rank=..., ...)` registers the
        decorated object (see `add`) and returns it unchanged."""
        def deco(value: T) -> T:
            self.add(name, value, **meta)
            return value

        return deco

    def unregister(self, name: str) -> None:
        """Remove an entry (e.g. one a test registered); unknown names are ignored."""
        self._entries.pop(self._key(name), None)

    def restore(self, entry: Entry[T] | None, name: str) -> None:
        """Put back `entry` (as `find` returned it) under `name`, or remove `name` when it was None."""
        if entry is None:
            self.unregister(name)
        else:
            self._entries[self._key(name)] = entry

    def update(self, name: str, **meta) -> Entry[T]:
        """Change an entry's metadata (e.g. a rank a study prefers); returns the new entry."""
        old = self.entry(name)
        known = {k: meta.pop(k) for k in _FIELDS if k in meta}
        if "tasks" in known:
            known["tasks"] = checked_task_kinds(known["tasks"], f"{self.what} {old.name!r}")
        new = replace(old, **known, extra={**old.extra, **meta})
        self._entries[old.name] = new
        return new

    # ---- looking up -------------------------------------------------------------------
    def find(self, name: str) -> Entry[T] | None:
        """The entry `name`, or None when there is none."""
        return self._entries.get(self._key(name))

    def entry(self, name: str) -> Entry[T]:
        """The entry `name` (UnknownNameError listing the registered names and how to register one)."""
        found = self.find(name)
        if found is None:
            raise UnknownNameError(f"unknown {self.what} {name!r}; {self._known()}")
        return found

    def get(self, name: str) -> T:
        """The object registered as `name` (UnknownNameError as `entry`)."""
        return self.entry(name).value

    __getitem__ = get

    def check(self, names, what: str | None = None) -> tuple[str, ...]:
        """`names` normalised, when every one is registered; otherwise UnknownNameError naming the
        unknown ones, the registered ones and how to register one."""
        names = tuple(self._key(n) for n in names)
        bad = [n for n in names if n not in self._entries]
        if bad:
            raise UnknownNameError(f"unknown {what or self.what}(s) {bad}; {self._known()}")
        return names

    def _known(self) -> str:
        return f"valid {self.plural}: {', '.join(self) or '(none yet)'} (register one with {self.how})"

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._key(name) in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.what!r}: {', '.join(self)})"

    # ---- listings ---------------------------------------------------------------------
    def entries(self, *, task_kind: str | None = None, by_rank: bool = False, **where) -> list[Entry[T]]:
        """The entries in registration order (`by_rank`: by rank, then registration order), only those
        supporting `task_kind`, and whose metadata equal `where` (an `Entry` field or an `extra` key,
        e.g. `trains_per_depth=True`)."""
        out = [e for e in self._entries.values() if e.supports(task_kind)
               and all(_value(e, k) == v for k, v in where.items())]
        return sorted(out, key=lambda e: e.rank) if by_rank else out

    def names(self, **kw) -> tuple[str, ...]:
        """The names of `entries(**kw)`."""
        return tuple(e.name for e in self.entries(**kw))

    def meta(self, field_name: str, **kw) -> dict[str, Any]:
        """{name: that entry's `field_name`} (an `Entry` field or an `extra` key) over `entries(**kw)`;
        entries without it are left out."""
        missing = object()
        out = {e.name: _value(e, field_name, missing) for e in self.entries(**kw)}
        return {k: v for k, v in out.items() if v is not missing}

    def table(self, **kw):
        """One row of metadata per entry (a pandas DataFrame, `attrs["config"]` naming the registry)."""
        import pandas as pd

        df = pd.DataFrame([e.meta() for e in self.entries(**kw)])
        df.attrs["config"] = {"registry": self.what, "filter": {k: str(v) for k, v in kw.items()}}
        return df


def _value(entry: Entry, name: str, default: Any = None) -> Any:
    if name in _FIELDS or name in ("name", "value"):
        return getattr(entry, name)
    return entry.extra.get(name, default)


def checked_task_kinds(tasks, where: str) -> tuple[str, ...]:
    tasks = (tasks,) if isinstance(tasks, str) else tuple(tasks or ())
    bad = [t for t in tasks if t not in TASK_KINDS]
    if bad:
        raise ValueError(f"{where}: unknown task kind(s) {bad}; use some of {TASK_KINDS} (or none: every kind)")
    return tasks
