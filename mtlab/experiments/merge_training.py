"""`make merges` (`python -m mtlab merges [--only NAME ...]`): recover the combined FF-merging candidates
of the shipping profile's window search and the control at the real budget, and ship each under
data/merging with its card (`merge_artifacts` reads and verifies them; the recipe they share is
`merge_recipe`). Each run checkpoints in runs/merging/<name>: stop it any time, rerun to resume."""
from __future__ import annotations

import json
import platform
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch

from ..candidate import Candidate, apply
from ..export import export
from ..measure import count_params
from ..merging.build import check_ties
from ..merging.correlations import CorrelationCache
from ..merging.merge import merged_specs, save_merged
from ..merging.recover import recover
from ..profiles import get_profile
from ..shipped import ArtifactMismatch, write_artifact
from ..tasks.diagnosis import score_splits
from ..teacher import load_teacher
from ..train import on_main_process
from . import merge_artifacts as store  # read at call time: tests point MERGE_DIR elsewhere
from .merge_artifacts import MERGE_PROFILE
from .merge_recipe import CONTROL, align_batches, combined_recovery_config, fine_tuned_control
from .merging import candidates, teacher_window_search

__all__ = ["shippable", "train_merge", "train_control", "train_merges"]


def shippable(search: pd.DataFrame) -> dict[str, Candidate]:
    """The combined candidates of a window search, by shipped name."""
    return {store.merge_name(c): c for c in candidates(search) if c.info["kind"] == "combined"}


def _rounded(d: dict) -> dict:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in d.items()}


def _before(net, task, work: Path, spec: str, words: int | None, progress: bool) -> dict:
    """Scores of the candidate as built, kept in `work` so that a resumed run does not decode again."""
    path = work / "before.json"
    if path.exists():
        kept = json.loads(path.read_text())
        if kept.get("spec") == spec and kept.get("words") == words:
            return kept["scores"]
    scores = _rounded(score_splits(net, task, limit=words, progress=progress))
    work.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"spec": spec, "words": words, "scores": scores}, indent=1))
    tmp.replace(path)
    return scores


def _rel(scores: dict, teacher: dict, split: str = "test") -> dict:
    """Relative word and phone accuracy against the teacher on the same words."""
    return {"rel_word_acc": round((100 - scores[f"{split}_wer"]) / (100 - teacher[f"{split}_wer"]), 4),
            "rel_per_acc": round((100 - scores[f"{split}_per"]) / (100 - teacher[f"{split}_per"]), 4)}


FORMATS = {True: "save_merged (tied FF sublayers stored once; load with mtlab.merging.merge.load_merged), bf16",
           False: "plain transformers folder (mtlab.export; AutoModelForSeq2SeqLM.from_pretrained), bf16"}


def _save(net, path: Path) -> None:
    """bf16 weights: tied sublayers stored once (save_merged), a plain model as a transformers folder."""
    net.to(torch.bfloat16)
    try:
        save_merged(net, path) if merged_specs(net) else export(net, path)
    finally:
        net.to(torch.float32)


def train_merge(name: str, profile=MERGE_PROFILE, out_root: str | Path | None = None,
                work_root: str | Path | None = None, *, search: pd.DataFrame | None = None,
                teacher_scores: dict | None = None, words: int | None = None,
                progress: bool = True) -> Candidate | None:
    """Recover (or resume) one combined candidate of `profile`'s search with its combined budget in
    work_root/name, score it on `words` words of dev and test (None: the full splits) before and
    after, and ship it with a card to out_root/name. Returns the shipped candidate (model in float32,
    exactly the shipped weights), or None when the run stopped before its last step."""
    p = get_profile(profile)
    m = p.merging
    rcfg = combined_recovery_config(m)
    out_root, work = Path(out_root or store.MERGE_DIR), Path(work_root or store.MERGE_WORK) / name
    search = teacher_window_search(p, progress=progress) if search is None else search
    cands = shippable(search)
    if name not in cands:
        raise ValueError(f"no combined merge candidate {name!r} in the search of profile {p.name!r}: "
                         f"it yields {sorted(cands)}")
    c = cands[name]
    try:
        return store.load_merge(c, m, out_root)  # already shipped with this recipe: nothing to do
    except ArtifactMismatch:
        pass
    teacher, task = load_teacher()
    net = apply(teacher, c.spec, cache=CorrelationCache(teacher, align_batches(task), max_tokens=m.align_tokens))
    before = _before(net, task, work, c.label, words, progress)
    net, log = recover(net.train(), task, rcfg, work, progress=progress, save=False)
    done = int(log.step.max()) if len(log) else 0
    if done < rcfg.steps:
        print(f"{name}: stopped at step {done}/{rcfg.steps}; rerun `{store.MERGE_COMMAND}` to resume")
        return None
    net.to(torch.bfloat16).to(torch.float32).eval()  # score exactly what ships
    check_ties(net)
    after = _rounded(score_splits(net, task, limit=words, progress=progress))
    if teacher_scores is None:
        teacher_scores = _rounded(score_splits(teacher, task, limit=words, progress=progress))
    n0, n = count_params(teacher), count_params(net)
    ff, blocks = c.spec.removed()
    card = {"what": f"{c.method} candidate of the bundled teacher's FF-merging study ({c.info['compare']}), "
                    "recovered", "name": name, "spec": c.label, "method": c.method, "compare": c.info["compare"],
            "stack": c.info["stack"], "layers": c.info["layers"], "teacher_hash": store.teacher_hash(),
            "config": store.merge_card_config(c, m), "profile": p.name, "steps": done, "batch_size": rcfg.batch_size,
            "lr": rcfg.lr, "examples_seen": done * rcfg.batch_size, "train_seconds": round(float(log.seconds.max()), 1),
            "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
            "words": words or "all", "params": n, "params_removed": n0 - n, "params_removed_frac": round((n0 - n) / n0, 6),
            "ff_removed": ff, "blocks_removed": blocks, "teacher": teacher_scores, "before": before, "after": after,
            "relative": {"before": _rel(before, teacher_scores), "after": _rel(after, teacher_scores)},
            "format": FORMATS[bool(merged_specs(net))], "command": store.MERGE_COMMAND}

    def files(tmp: Path) -> None:
        _save(net, tmp / "model")
        log.to_csv(tmp / "training_log.csv", index=False)

    on_main_process(lambda: write_artifact(out_root / name, files, card, store.render_merge_card(card, log)))
    return replace(store.load_merge(c, m, out_root), model=net)


def train_control(profile=MERGE_PROFILE, out_root: str | Path | None = None, work_root: str | Path | None = None, *,
                  teacher_scores: dict | None = None, words: int | None = None, progress: bool = True) -> Candidate | None:
    """The control of the combined candidates: the teacher fine-tuned (or resumed) in work_root/original-control
    with the same `combined_recovery_config` as they are, scored on `words` words of dev and test (None: the
    full splits), shipped with a card to out_root/original-control (bf16, a plain transformers folder).
    Returns the shipped control, or None when the run stopped before its last step."""
    p = get_profile(profile)
    m = p.merging
    rcfg = combined_recovery_config(m)
    out_root, work = Path(out_root or store.MERGE_DIR), Path(work_root or store.MERGE_WORK) / store.CONTROL_NAME
    try:
        return store.load_control(m, out_root)  # already shipped with this recipe: nothing to do
    except ArtifactMismatch:
        pass
    teacher, task = load_teacher()
    if teacher_scores is None:
        teacher_scores = _rounded(score_splits(teacher, task, limit=words, progress=progress))
    net, log = fine_tuned_control(teacher, task, rcfg, work, progress=progress)
    done = int(log.step.max()) if len(log) else 0
    if done < rcfg.steps:
        print(f"{store.CONTROL_NAME}: stopped at step {done}/{rcfg.steps}; rerun `{store.MERGE_COMMAND}` to resume")
        return None
    net.to(torch.bfloat16).to(torch.float32).eval()  # score exactly what ships
    after = _rounded(score_splits(net, task, limit=words, progress=progress))
    n = count_params(net)
    card = {"what": "the control of the bundled teacher's FF-merging study: the teacher itself fine-tuned with the "
                    "combined candidates' recovery config (same steps, batch, lr, seed, data)",
            "name": store.CONTROL_NAME, "spec": "original", "method": CONTROL, "compare": "control", "stack": "-",
            "layers": "-", "teacher_hash": store.teacher_hash(), "config": store.control_card_config(m), "profile": p.name,
            "steps": done, "batch_size": rcfg.batch_size, "lr": rcfg.lr, "examples_seen": done * rcfg.batch_size,
            "train_seconds": round(float(log.seconds.max()), 1),
            "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
            "words": words or "all", "params": n, "params_removed": 0, "params_removed_frac": 0.0, "ff_removed": 0,
            "blocks_removed": 0, "teacher": teacher_scores, "before": teacher_scores, "after": after,
            "relative": {"before": _rel(teacher_scores, teacher_scores), "after": _rel(after, teacher_scores)},
            "format": FORMATS[False], "command": store.MERGE_COMMAND}

    def files(tmp: Path) -> None:
        _save(net, tmp / "model")
        log.to_csv(tmp / "training_log.csv", index=False)

    on_main_process(lambda: write_artifact(out_root / store.CONTROL_NAME, files, card, store.render_merge_card(card, log)))
    return replace(store.load_control(m, out_root), model=net)


def train_merges(names: list[str] | None = None, profile=MERGE_PROFILE, *, progress: bool = True) -> list[str]:
    """`make merges`: every combined candidate of the profile's search (or `names`), one after the
    other with the same budget, and the control (`train_control`: the teacher fine-tuned the same way);
    the teacher is scored once on the full splits. Returns the names shipped."""
    p = get_profile(profile)
    search = None if names == [store.CONTROL_NAME] else teacher_window_search(p, progress=progress)
    names = [*shippable(search), store.CONTROL_NAME] if names is None else names
    teacher, task = load_teacher()
    teacher_scores = _rounded(score_splits(teacher, task, progress=progress))
    shipped = []
    for name in names:
        t0 = time.time()
        if name == store.CONTROL_NAME:
            net = train_control(p, teacher_scores=teacher_scores, progress=progress)
        else:
            net = train_merge(name, p, search=search, teacher_scores=teacher_scores, progress=progress)
        if net is not None:
            shipped.append(name)
        print(f"{name}: done in {time.time() - t0:.0f}s", flush=True)
    summary = store.shipped_summary()
    if len(summary):
        print(summary.to_string(index=False), "\ntarget:", summary.attrs["target"], flush=True)
    return shipped
