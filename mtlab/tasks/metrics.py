"""The registry of task metrics: how decoded texts are scored against their references.

A metric is one decorated function, `@task_metric(name, keys, primary, higher_is_better)`, that
maps (hypotheses, references, **options) to a dict holding `keys` on a 0-100 scale. Tasks look
metrics up by name (`PairsTask(metric="rouge")`, a recipe's `task.metric`), so a new metric is
usable everywhere (tasks, recipes, studies, read-outs) once registered. Built in:

- "bleu": corpus BLEU and chrF (sacrebleu); primary BLEU. Option `tokenize` (sacrebleu's).
  BLEU counts word n-grams up to 4, so it is 0.0 for any output when the references are shorter
  than 4 words: scoring such references warns (`ShortTargetsWarning`) and names "chrf".
- "chrf": corpus chrF (sacrebleu, character n-grams): the metric for short targets (single words,
  names, a few tokens). `default_metric(references)` picks it when the median target has fewer
  than 4 words, else "bleu".
- "rouge": mean ROUGE-1/2/L F-measure over examples (rouge_score) x 100; primary ROUGE-L.
  Option `use_stemmer` (default True).
- "per_wer": phone error rate (total edit distance / reference phones, editdistance) and word
  error rate (share of outputs not exactly right), over space-separated tokens; primary PER.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import editdistance

from ..registry import Registry

__all__ = ["METRICS", "Metric", "task_metric", "get_metric", "task_metrics", "unregister_metric", "per_wer", "default_metric",
           "median_words", "ShortTargetsWarning", "BLEU_ORDER"]

#: the n-gram order of sacrebleu's BLEU: references shorter than this many words score 0.0
BLEU_ORDER = 4


class ShortTargetsWarning(UserWarning):
    """BLEU on targets too short for its 4-gram order: every model scores (close to) 0.0."""

ScoreFn = Callable[..., dict]


@dataclass(frozen=True)
class Metric:
    name: str
    keys: tuple[str, ...]        # the scores it reports
    primary: str                 # the one the studies rank by
    higher_is_better: bool
    fn: ScoreFn

    def __call__(self, hypotheses: Sequence[str], references: Sequence[str], **options) -> dict[str, float]:
        if len(hypotheses) != len(references):
            raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
        if not references:
            raise ValueError("nothing to score: empty reference list")
        return self.fn([str(h) for h in hypotheses], [str(r) for r in references], **options)


#: every task metric (`mtlab.registry.Registry`: names in registration order, lower case), each entry
#: with its kind (the task kind it scores: "seq2seq", decoded text against references)
METRICS: Registry[Metric] = Registry("metric", "@mtlab.tasks.metrics.task_metric(name, keys, primary, higher_is_better)",
                                     key=lambda name: str(name).strip().lower())


def task_metric(name: str, keys: Sequence[str], primary: str, higher_is_better: bool,
                **meta) -> Callable[[ScoreFn], ScoreFn]:
    """Decorator: register `fn(hypotheses, references, **options) -> {key: score}` as metric `name`
    (any keyword: the entry's metadata, e.g. label=, description=)."""
    if primary not in keys:
        raise ValueError(f"metric {name!r}: the primary score {primary!r} must be one of its keys {list(keys)}")

    def register(fn: ScoreFn) -> ScoreFn:
        key = str(name).strip().lower()
        METRICS.add(key, Metric(key, tuple(keys), primary, higher_is_better, fn),
                    **{"kind": "seq2seq", "tasks": ("seq2seq",), "primary": primary,
                       "higher_is_better": bool(higher_is_better), **meta})
        return fn

    return register


def get_metric(name: str) -> Metric:
    """The metric `name` (any case); an unknown name raises a ValueError listing the registered ones."""
    return METRICS.get(name)


def task_metrics() -> tuple[str, ...]:
    """The registered metric names, in registration order."""
    return METRICS.names()


def unregister_metric(name: str) -> None:
    METRICS.unregister(name)


def median_words(texts: Sequence[str]) -> float:
    """The median number of whitespace-separated words of `texts` (0.0 for none)."""
    import statistics

    return float(statistics.median(len(str(t).split()) for t in texts)) if texts else 0.0


def default_metric(references: Sequence[str]) -> str:
    """The metric that can rank models on these references: "chrf" when the median reference has
    fewer than 4 words (BLEU would be 0.0 for every model), else "bleu"."""
    return "chrf" if median_words(references) < BLEU_ORDER else "bleu"


def short_targets_message(words: float) -> str:
    return (f"BLEU counts word n-grams up to {BLEU_ORDER}, so it is 0.0 for every output when the targets are shorter "
            f"than {BLEU_ORDER} words; the median target here has {words:g} word(s), so BLEU cannot tell models apart. "
            "Use metric 'chrf' (character n-grams): PairsTask(metric='chrf'), or task.metric: chrf in a recipe "
            "(leaving the metric unset picks it from the data)")


def warn_short_targets(references: Sequence[str], stacklevel: int = 3) -> None:
    """Warn (ShortTargetsWarning) when BLEU cannot score these references."""
    import warnings

    words = median_words(references)
    if references and words < BLEU_ORDER:
        warnings.warn(short_targets_message(words), ShortTargetsWarning, stacklevel=stacklevel)


@task_metric("bleu", ("bleu", "chrf"), "bleu", higher_is_better=True)
def _bleu(hyps: list[str], refs: list[str], tokenize: str | None = None) -> dict[str, float]:
    import sacrebleu

    warn_short_targets(refs, stacklevel=4)
    kw = {} if tokenize is None else {"tokenize": tokenize}
    return {"bleu": float(sacrebleu.corpus_bleu(hyps, [refs], **kw).score),
            "chrf": float(sacrebleu.corpus_chrf(hyps, [refs]).score)}


@task_metric("rouge", ("rouge1", "rouge2", "rougeL"), "rougeL", higher_is_better=True)
def _rouge(hyps: list[str], refs: list[str], use_stemmer: bool = True) -> dict[str, float]:
    from rouge_score import rouge_scorer

    keys = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(keys), use_stemmer=use_stemmer)
    totals = dict.fromkeys(keys, 0.0)
    for h, r in zip(hyps, refs):
        scores = scorer.score(r, h)  # (target, prediction)
        for k in keys:
            totals[k] += scores[k].fmeasure
    return {k: 100.0 * v / len(refs) for k, v in totals.items()}


def per_wer(hypotheses: Sequence[Sequence[str]], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """PER = total phone edit distance / total reference phones; WER = share of words not exactly right."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    if not references:
        raise ValueError("nothing to score: empty reference list")
    edits = sum(editdistance.eval(list(h), list(r)) for h, r in zip(hypotheses, references))
    phones = sum(len(r) for r in references)
    wrong = sum(list(h) != list(r) for h, r in zip(hypotheses, references))
    return {"per": 100.0 * edits / phones, "wer": 100.0 * wrong / len(references)}


@task_metric("per_wer", ("per", "wer"), "per", higher_is_better=False)
def _per_wer(hyps: list[str], refs: list[str]) -> dict[str, float]:
    return per_wer([h.split() for h in hyps], [r.split() for r in refs])


@task_metric("chrf", ("chrf",), "chrf", higher_is_better=True)
def _chrf(hyps: list[str], refs: list[str]) -> dict[str, float]:
    import sacrebleu

    return {"chrf": float(sacrebleu.corpus_chrf(hyps, [refs]).score)}
