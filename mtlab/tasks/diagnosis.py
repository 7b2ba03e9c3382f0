"""Why a decoder fails, not just how much: output length, stopping, and the kinds of edits.

A collapsed decoder shows up here before it shows up in a score: outputs much longer than
the references (insertions dominate the error), and outputs that never emit end-of-sequence
(they run into the length cap, usually looping). The edit operations come from jiwer, over
whitespace tokens (phones for G2P), so substitutions + insertions + deletions = PER.
"""
from __future__ import annotations

import jiwer
import pandas as pd


def diagnose(pred: pd.DataFrame) -> dict[str, float]:
    """Length ratio, share of outputs that end with EOS, and the edit rates (% of reference tokens)
    of a `Seq2SeqTask.predict` frame (columns reference, hypothesis, ended)."""
    if not len(pred):
        raise ValueError("nothing to diagnose: the prediction frame is empty")
    refs = pred.reference.tolist()
    if any(not r.strip() for r in refs):
        raise ValueError("a reference is empty: edit rates are undefined; drop empty targets from the data")
    hyps = [h if h.strip() else "" for h in pred.hypothesis.tolist()]
    ops = jiwer.process_words(refs, hyps)
    n_ref = sum(len(r.split()) for r in refs)
    n_hyp = sum(len(h.split()) for h in hyps)
    return {
        "len_ratio": n_hyp / n_ref,
        "eos_rate": float(pred.ended.mean()) if "ended" in pred else float("nan"),
        "sub": 100.0 * ops.substitutions / n_ref,
        "ins": 100.0 * ops.insertions / n_ref,
        "del": 100.0 * ops.deletions / n_ref,
    }


def looping_share(pred: pd.DataFrame, repeats: int = 3) -> float:
    """Share of outputs that never ended and end in the same n-gram repeated `repeats` times."""
    def loops(h: str) -> bool:
        t = h.split()
        for n in range(1, 5):
            tail = t[-n * repeats:]
            if len(tail) == n * repeats and all(tail[i] == tail[i % n] for i in range(len(tail))):
                return True
        return False

    stuck = ~pred.ended if "ended" in pred else pd.Series(True, index=pred.index)
    return float((stuck & pred.hypothesis.map(loops)).mean())



def score_splits(model, task, splits=("dev", "test"), *, limit: int | None = None, progress: bool = False) -> dict:
    """Greedy-decode each split once: the task's scores plus the diagnosis, as
    {split}_{metric} (e.g. test_per, test_len_ratio, test_eos_rate, test_ins)."""
    out: dict[str, float] = {}
    for split in splits:
        pred = task.predict(model, split, limit=limit, progress=progress, ended=True)
        scores = task.score(pred.hypothesis.tolist(), pred.reference.tolist())
        out.update({f"{split}_{k}": v for k, v in {**scores, **diagnose(pred)}.items()})
        out[f"{split}_loops"] = looping_share(pred)
        out[f"{split}_n"] = len(pred)
    return out


__all__ = ["diagnose", "looping_share", "score_splits"]
