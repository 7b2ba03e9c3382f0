"""The registry of task kinds: which data a study or recipe can name, the Task class that reads it,
and what the layers above need to know about it (the task kind its model has: "seq2seq",
"causal_lm" or "embedding"; its metric; whether it reads a data file).

A new kind is one decorated class:

    @task_kind("tagging", kind="seq2seq", metric="exact", needs_path=True)
    class TaggingTask(Seq2SeqTask): ...

Recipes and studies list `TASKS` instead of hard-coding names; an unknown name lists the
registered ones.
"""
from __future__ import annotations

from collections.abc import Callable

from ..registry import Registry, checked_task_kinds
from .causal_lm import CausalLMTask
from .g2p import G2PTask
from .pairs import PairsTask
from .sentences import SentencesTask

__all__ = ["TASKS", "task_kind", "task_kinds"]

#: every task kind, each entry with kind (the model's task kind), `metric` (its primary metric; None:
#: chosen from the data), `needs_path` (reads the user's data file) and `model` (what model it fits)
TASKS: Registry[type] = Registry("task kind", "@mtlab.tasks.kinds.task_kind(name, kind=...)",
                               plural="task kinds")


def task_kind(name: str, *, kind: str, metric: str | None = None, needs_path: bool = True, rank: int | None = None,
              label: str | None = None, description: str | None = None, **meta) -> Callable[[type], type]:
    """Decorator: register a Task class as task kind `name`; `kind` is its model's task kind
    ("seq2seq", "causal_lm", "embedding"), the one registered merge methods, baselines and strategies
    declare support for (`mtlab.registry.Entry.tasks`)."""
    (kind,) = checked_task_kinds((kind,), f"task kind {name!r}")

    def register(cls: type) -> type:
        TASKS.add(name, cls, label=label or name, kind=kind, tasks=(kind,), rank=rank, description=description,
                  metric=metric, needs_path=bool(needs_path), **meta)
        return cls

    return register


def task_kinds(kind: str | None = None) -> tuple[str, ...]:
    """The registered task kind names, in registration order (`kind`: only those of that model kind)."""
    return TASKS.names() if kind is None else TASKS.names(kind=kind)


task_kind("g2p", kind="seq2seq", metric="per_wer", needs_path=False, rank=1, model="the bundled T5 teacher",
          description="The bundled CMUdict grapheme-to-phoneme task (PER/WER).")(G2PTask)
task_kind("pairs", kind="seq2seq", metric=None, rank=2, model="an encoder-decoder",
          description="Your (source, target) text pairs (tsv/csv/jsonl); BLEU or chrF by target length.")(PairsTask)
task_kind("text", kind="causal_lm", metric="ppl", rank=3, model="a decoder-only LM",
          description="Your plain text for a decoder-only LM, scored by perplexity.")(CausalLMTask)
task_kind("sentences", kind="embedding", metric="mean_cos", needs_path=False, rank=4, model="a sentence encoder",
          description="English sentences for an embedding model, scored against the original's embeddings.")(SentencesTask)
