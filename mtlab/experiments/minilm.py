"""FF merging on all-MiniLM-L6-v2 as the paper does it (Verma, Murray, Duh 2025), at equal
parameters removed, before and after one recovery budget.

For each target share of parameters removed (default ~10% and ~20%):

* merges: a window of k adjacent layers whose FF sublayers are tied into one (k-1 FF sublayers
  removed), k chosen so that the share removed is closest to the target; permute and vanilla;
* layer pruning: a window whose first block is kept and the b blocks after it dropped, b chosen
  the same way (blocks also carry attention, so b < k-1; the actual shares are reported);
* every window is scored on dev sentences by mean cosine to the original embeddings
  (`mtlab.merging.windows.window_search`), the best window per method is kept;
* each kept model is scored on the test sentences, then fine-tuned with the SAME recovery budget
  (steps, batch, lr, seed: `mtlab.embedding.recover_embeddings`, distilling the original's
  embeddings on the train split) and scored on test again.

Data: `mtlab.tasks.sentences` (train: alignment statistics and recovery; dev: window selection;
test: only the final numbers of the kept models).

Both methods (notebook 06, sized by the profile's `minilm` section, tables cached): one
module-replacing run (`mtlab.modular.embedding_replacing`) assembled along the size-first ladder
(`minilm_module_table`), layer dropping and shrink-and-fine-tune per ratio with the module run's
steps and batch (`minilm_baseline_table`), this study's merges with the same budget
(`minilm_merge_study`), and every candidate scored on the same test sentences and timed in one
run (`minilm_frontier`; `minilm_csv` is reports/minilm.csv, `minilm_conclusion` reads it).
With `MiniLMProfile.shipped` (the `default` profile) the trained runs are not trained here but read
from data/minilm (`mtlab.experiments.minilm_artifacts`, `make minilm`), verified against the profile;
one not shipped yet is a row without scores whose `note` says so.
"""
from __future__ import annotations

import tempfile
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from ..anatomy import anatomy
from ..baselines import BASELINES
from ..embedding import embed_split, embedding_scores, recover_embeddings
from ..candidate import apply
from ..measure import count_params
from ..merging.correlations import CorrelationCache
from ..merging.methods import METHODS
from ..merging.windows import window_search
from ..train import TrainConfig
from . import minilm_artifacts as shipped
from .minilm_artifacts import (NOT_SHIPPED, STACK, depth_for, original,  # noqa: F401 (the study's names)
                               shipped_status)

__all__ = ["equal_removal_plan", "minilm_ff_merging", "RECOVERY", "study_key", "original", "fresh_copy", "study_task",
           "module_config", "finetune_config", "test_scores", "train_bank", "ladder_rows", "depth_for",
           "baseline_student", "baseline_rows", "merge_rows", "minilm_modules", "minilm_module_table",
           "minilm_baseline_table", "minilm_merge_study", "latency_inputs", "candidate_models", "minilm_frontier",
           "minilm_csv", "ladder_vs_baselines", "minilm_conclusion", "CSV_COLUMNS", "trainable", "student_rows",
           "reference_embeddings", "CONTROL", "control_student", "control_row", "merge_view"]

RECOVERY = TrainConfig(steps=300, batch_size=32, lr=5e-5, warmup=30, log_every=50, ckpt_every=100, eval_every=0)


def equal_removal_plan(model: nn.Module, targets=(0.10, 0.20), stack: str = STACK) -> pd.DataFrame:
    """Per target share: merge window size (k-1 FF sublayers tied away) and pruning window size
    (b+1, b blocks dropped), each the count closest to the target, with the shares they remove."""
    st = anatomy(model).stack(stack)
    total = count_params(model)
    ff = sum(p.numel() for p in st.layer(0).ff.params())
    block = sum(p.numel() for p in st.layer(0).block.parameters())
    depth = len(st)
    rows = []
    for t in targets:
        if not 0 < t < 1:
            raise ValueError(f"targets are shares of the parameters, in (0, 1); got {t}")
        n_ff = max(1, round(t * total / ff))
        n_blocks = max(1, round(t * total / block))
        if n_ff > depth - 1 or n_blocks > depth - 1:
            most = (depth - 1) * ff / total
            raise ValueError(f"removing {t:.0%} of the parameters needs {n_ff} FF sublayers / {n_blocks} blocks but "
                             f"stack {stack!r} has {depth} layers: at most {most:.1%} by merging; lower the target")
        rows.append({"target": t, "merge_size": n_ff + 1, "merge_share": n_ff * ff / total,
                     "prune_size": n_blocks + 1, "prune_share": n_blocks * block / total})
    return pd.DataFrame(rows)


def _search(model, task, size: int, prune_size: int, methods, cache, select_limit, progress) -> pd.DataFrame:
    """Dev window search of the merges at `size` and of pruning at `prune_size`; best rows only."""
    ref = embed_split(model, task, "dev", select_limit)

    def score(m):
        return embedding_scores(ref, embed_split(m, task, "dev", select_limit))

    common = dict(score_fn=score, metric="mean_cos", higher_is_better=True, cache=cache, progress=progress,
                  align_batches=cache.batches_fn, include_original=False)
    parts = []
    if methods:
        parts.append(window_search(model, None, STACK, sizes=(size,), methods=methods, include_pruning=False,
                                   **common))
    parts.append(window_search(model, None, STACK, sizes=(prune_size,), methods=(), include_pruning=True, **common))
    df = pd.concat(parts, ignore_index=True)
    return df[df.best].rename(columns={c: f"dev_{c}" for c in ("mean_cos", "recall_at_10", "spearman")})


def _test_row(base: dict, stage: str, scores: dict, steps: int) -> dict:
    return {**base, "stage": stage, "recovery_steps": steps, **{f"test_{k}": v for k, v in scores.items()}}


def minilm_ff_merging(model: nn.Module | None = None, tokenizer=None, task=None, *, targets=(0.10, 0.20),
                      methods=("permute", "vanilla"), recovery: TrainConfig = RECOVERY, align_tokens: int = 10_000,
                      select_limit: int | None = 500, eval_limit: int | None = None, hidden_weight: float = 0.0,
                      out_dir: str | Path | None = None, progress: bool = True) -> pd.DataFrame:
    """Permute vs vanilla merging vs layer pruning at equal parameters removed (see the module doc).

    One row per (target, method, stage): stage "selected" (test scores of the dev-chosen window)
    and "recovered" (after `recovery`, the same for every method), plus the original. Columns:
    target, method, spec, layers, params, params_removed_frac, stage, recovery_steps,
    dev_mean_cos (selection), test_mean_cos, test_recall_at_10, test_spearman.
    `model`/`tokenizer` default to all-MiniLM-L6-v2, `task` to the full sentence corpus;
    recovery runs live in `out_dir` (default: a temporary directory) and resume from it."""
    from ..minilm import load_minilm
    from ..tasks.sentences import SentencesTask

    if model is None or tokenizer is None:
        model, tokenizer = load_minilm()
    task = task or SentencesTask(tokenizer)
    plan = equal_removal_plan(model, targets)
    cache = CorrelationCache(model, lambda: task.iter_batches("train", 64, shuffle=True, seed=0),
                             max_tokens=align_tokens)
    ref_test = embed_split(model, task, "test", eval_limit)
    n0 = count_params(model)
    rows = [_test_row({"target": 0.0, "method": "original", "spec": "original", "layers": "", "params": n0,
                       "params_removed_frac": 0.0, "dev_mean_cos": 1.0}, "original",
                      embedding_scores(ref_test, ref_test), 0)]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(out_dir) if out_dir is not None else Path(tmp)
        for p in plan.itertuples():
            best = _search(model, task, p.merge_size, p.prune_size, list(methods), cache, select_limit, progress)
            for r in best.itertuples():
                cand = apply(model, r.spec, cache=cache)
                base = {"target": p.target, "method": r.method, "spec": r.spec, "layers": r.layers,
                        "params": r.params, "params_removed_frac": r.params_removed_frac,
                        "dev_mean_cos": r.dev_mean_cos}
                rows.append(_test_row(base, "selected", _scores(cand, task, ref_test, eval_limit), 0))
                run = root / f"{p.target:.2f}_{r.method}"
                cand, _ = recover_embeddings(cand, model, task, recovery, run, hidden_weight=hidden_weight,
                                             eval_limit=select_limit, progress=progress, save=out_dir is not None)
                rows.append(_test_row(base, "recovered", _scores(cand, task, ref_test, eval_limit), recovery.steps))
                del cand
    df = pd.DataFrame(rows)
    df.attrs["config"] = {"targets": list(targets), "plan": plan.to_dict("records"), "methods": list(methods),
                          "recovery": asdict(recovery), "hidden_weight": hidden_weight, "align_tokens": align_tokens,
                          "select_limit": select_limit, "eval_limit": eval_limit, "task": task.source,
                          "sentences": task.sizes(), "selected_on": "dev mean_cos", "original_params": n0}
    return df


def _scores(model: nn.Module, task, ref_test: torch.Tensor, limit: int | None) -> dict:
    return embedding_scores(ref_test, embed_split(model, task, "test", limit))


# ---------------------------------------------------------------------------
# both methods on MiniLM: Modular Transformers against the baselines, one frontier
#
# One module-replacing run (granularities {2, 3, 6}, the original frozen; the loss of
# `mtlab.modular.embedding_replacing`) gives the size-first ladder; layer dropping ("alternate")
# and shrink-and-fine-tune ("spread") are trained per ratio with embedding distillation and the
# SAME steps and batch as the module run, as are the FF-merge/prune recoveries of
# `minilm_ff_merging`. Every candidate is scored on the same test sentences and timed in one run.
# Sized by the profile's `minilm` section; tables cached (`mtlab.cache`), runs resumable.

STUDY_VERSION = 1
# the registered baselines trained once per depth with a layer rule (sft: spread, layer_drop: alternate)
BASELINE_RULES = BASELINES.meta("keep_rule", trains_per_depth=True)
CONTROL = "original (fine-tuned)"  # the control: the original fine-tuned like the merges' recovery (issue 22, item 10)
KIND = {"original": "teacher", "modules": "modules", **METHODS.meta("kind"), "layer_prune": "layer_prune",
        **{b: BASELINES.entry(b).kind for b in BASELINE_RULES}, CONTROL: "control"}  # from the registries
CSV_COLUMNS = ["method", "plan", "params", "params_removed_frac", "recovery_steps", "train_steps", "mean_cos",
               "recall_at_10", "sim_spearman", "speedup_b1", "speedup_b64"]


def _profile(profile):
    from ..profiles import get_profile

    p = get_profile(profile)
    return p, p.minilm


def study_key(profile=None) -> dict:
    """Cache key of the study: the profile's minilm section, the weights' and the corpus' hashes."""
    from ..cache import file_hash
    from ..tasks.sentences import CORPUS
    from .merging import minilm_hash

    _, m = _profile(profile)
    key = {"version": STUDY_VERSION, "minilm": asdict(m), "weights": minilm_hash(), "corpus": file_hash(CORPUS)}
    if m.shipped:  # a table made before an artifact was shipped (or re-shipped) is not reused
        key["shipped"] = shipped_status(m)
    return key


_LOADED: dict = {}


def fresh_copy(model: nn.Module) -> nn.Module:
    """A trainable copy (every parameter requires grad; eval mode until a loop trains it)."""
    import copy

    out = copy.deepcopy(model)
    for p in out.parameters():
        p.requires_grad_(True)
    return out.eval()


def trainable(model: nn.Module, m) -> nn.Module:
    """`fresh_copy`, with the token embedding table frozen when the profile says so (the shipped
    recipe: a fine-tuned MiniLM then differs from the original only in its layers, which is what ships)."""
    out = fresh_copy(model)
    if m.freeze_word_embeddings:
        out.get_input_embeddings().weight.requires_grad_(False)
    return out


def study_task(m, tokenizer):
    """The sentence corpus cut to the profile: train for every run, dev for choices, test for scores."""
    from ..tasks.sentences import SentencesTask

    return SentencesTask(tokenizer, limit={"train": m.train_sentences, "dev": m.select_limit, "test": m.eval_limit},
                         max_length=m.max_length)


def module_config(m):
    """The ONE module-replacing run of the profile."""
    from ..modular.embedding_replacing import EmbeddingReplacingConfig

    return EmbeddingReplacingConfig(granularities=tuple(m.granularities), train=TrainConfig(
        steps=m.steps, batch_size=m.batch_size, lr=m.module_lr, warmup=max(1, m.steps // 10),
        log_every=max(1, min(50, m.steps)), ckpt_every=max(1, min(250, m.steps))))


def finetune_config(m) -> TrainConfig:
    """Every per-ratio baseline and every recovery: the module run's steps and batch."""
    return TrainConfig(steps=m.steps, batch_size=m.batch_size, lr=m.finetune_lr, warmup=max(1, m.steps // 10),
                       log_every=max(1, min(50, m.steps)), ckpt_every=max(1, min(250, m.steps)), eval_every=0)


def test_scores(model: nn.Module, task, ref: torch.Tensor) -> dict:
    """mean_cos, recall_at_10, sim_spearman of `model` against the original's test embeddings `ref`."""
    s = embedding_scores(ref, embed_split(model, task, "test"))
    return {"mean_cos": s["mean_cos"], "recall_at_10": s["recall_at_10"], "sim_spearman": s["spearman"]}


def train_bank(teacher: nn.Module, task, m, run: Path, progress: bool = True):
    """The module bank of the profile: read from run/bank when finished, else trained (resumably)
    on a frozen copy of `teacher`. Returns (bank, log)."""
    from ..modular import ModuleBank
    from ..modular.embedding_replacing import train_embedding_modules

    if (run / "bank").exists():
        return ModuleBank.load(run / "bank", teacher), pd.read_csv(run / "log.csv")
    return train_embedding_modules(fresh_copy(teacher), task, module_config(m), run, progress=progress)


def ladder_rows(teacher: nn.Module, bank, task, ref: torch.Tensor, steps: int) -> list[dict]:
    """The original and every rung of the size-first ladder, assembled and scored on test."""
    from ..modular import assemble, teacher_ladders
    from ..modular.plan import stack_ratio

    n0 = count_params(teacher)
    rows = []
    for strategy, plan in teacher_ladders(teacher, bank):
        if strategy not in ("teacher", "size_first"):
            continue
        model = assemble(teacher, bank, plan)
        n = count_params(model)
        spans = dict(plan.spans)
        rows.append({"method": "original" if strategy == "teacher" else "modules", "plan": str(plan),
                     "layers": sum(len(v) for v in spans.values()),
                     "ratio": stack_ratio(spans, {s: 1 for s in spans}), "params": n,
                     "params_removed_frac": 1 - n / n0, "recovery_steps": 0,
                     "train_steps": 0 if strategy == "teacher" else steps, **test_scores(model, task, ref)})
    return rows


def baseline_student(teacher: nn.Module, task, method: str, keep: list[int], cfg: TrainConfig, run: Path,
                     select_limit: int | None = None, progress: bool = True, *,
                     freeze_embeddings: bool = False) -> nn.Module:
    """Layer dropping (`method` "layer_drop") or shrink-and-fine-tune ("sft"): the kept layers of
    `teacher`, fine-tuned by embedding distillation (`recover_embeddings`, resumable from run);
    saved to run/student as a plain model (`save_encoder`) and read back from there once done."""
    from transformers import AutoModel

    from ..baselines import keep_only
    from ..embedding import save_encoder

    if method not in BASELINE_RULES:
        raise ValueError(f"unknown baseline {method!r}; use one of {sorted(BASELINE_RULES)}")
    if (run / "student").exists():
        return AutoModel.from_pretrained(str(run / "student"), local_files_only=True).eval()
    student = fresh_copy(keep_only(teacher, {STACK: keep}))
    if freeze_embeddings:
        student.get_input_embeddings().weight.requires_grad_(False)
    student, log = recover_embeddings(student, teacher, task, cfg, run, eval_limit=select_limit, progress=progress,
                                      save=False)
    if len(log) and int(log.step.max()) >= cfg.steps:
        save_encoder(student, run / "student", task)
    return student


def student_rows(teacher: nn.Module, task, method: str, keep: list[int], ref: torch.Tensor, steps: int,
                 student: nn.Module | None, note: str = "") -> list[dict]:
    """A baseline's two rows: as dropped (recovery_steps 0) and fine-tuned for `steps` (`student`;
    None: a row without scores that carries `note`)."""
    from ..baselines import keep_only

    n0, depth = count_params(teacher), len(anatomy(teacher).stack(STACK))
    dropped = keep_only(teacher, {STACK: keep})
    n = count_params(dropped)
    base = {"method": method, "plan": f"keep {','.join(map(str, keep))}", "layers": len(keep),
            "ratio": depth / len(keep), "params": n, "params_removed_frac": 1 - n / n0}
    done = test_scores(student, task, ref) if student is not None else {"note": note}
    return [{**base, "recovery_steps": 0, "train_steps": 0, **test_scores(dropped, task, ref)},
            {**base, "recovery_steps": steps, "train_steps": steps, **done}]


def baseline_rows(teacher: nn.Module, task, m, ref: torch.Tensor, root: Path,
                  progress: bool = True, student=None) -> list[dict]:
    """Per ratio of the profile and baseline: test scores as dropped (recovery_steps 0) and after
    the fine-tune with the module run's budget. `student(method, keep)` gives (fine-tuned model or
    None, note); by default the run is trained in root/METHOD_KEPT."""
    from ..baselines import keep_layers

    depth = len(anatomy(teacher).stack(STACK))
    cfg, rows = finetune_config(m), []
    for ratio in m.ratios:
        d = depth_for(ratio, depth)
        for method, rule in BASELINE_RULES.items():
            keep = keep_layers(rule, d, depth)
            if student is None:
                run = root / f"{method}_{'-'.join(map(str, keep))}"
                model, note = baseline_student(teacher, task, method, keep, cfg, run, m.select_limit, progress,
                                               freeze_embeddings=m.freeze_word_embeddings), ""
            else:
                model, note = student(method, keep)
            rows += student_rows(teacher, task, method, keep, ref, cfg.steps, model, note)
    return rows


def control_student(teacher: nn.Module, task, m, run: Path, progress: bool = True, *, save: bool = True):
    """The control of the merges' recovery: a trainable copy of the original (`trainable`: the profile's
    frozen embeddings too) fine-tuned by embedding distillation with the SAME `finetune_config(m)` as
    every merge and prune recovery (same steps, batch, lr, seed, data), resumable in `run`.
    Returns (model in eval mode, log)."""
    return recover_embeddings(trainable(teacher, m), teacher, task, finetune_config(m), run, eval_limit=m.select_limit,
                              progress=progress, save=save)


def control_row(teacher: nn.Module, task, m, ref: torch.Tensor, model: nn.Module | None, note: str = "") -> dict:
    """The control's row of the merge table (`minilm_ff_merging`'s columns): the original fine-tuned
    `m.steps` steps, scored on the same test sentences as the merges (`model` None: no scores, `note`)."""
    row = {"target": 0.0, "method": CONTROL, "spec": "original", "layers": "", "params": count_params(teacher),
           "params_removed_frac": 0.0, "stage": "recovered", "recovery_steps": m.steps}
    if model is None:
        return {**row, "note": note}
    s = test_scores(model, task, ref)
    return {**row, "test_mean_cos": s["mean_cos"], "test_recall_at_10": s["recall_at_10"],
            "test_spearman": s["sim_spearman"]}


def merge_rows(table: pd.DataFrame) -> pd.DataFrame:
    """`minilm_ff_merging`'s table in the study's columns (one row per candidate and stage)."""
    t = table[table.method != "original"]
    extra = {"note": t.note} if "note" in t else {}
    return pd.DataFrame({"method": t.method.replace({"prune": "layer_prune"}), "plan": t.spec, "params": t.params,
                         "params_removed_frac": t.params_removed_frac, "recovery_steps": t.recovery_steps,
                         "train_steps": t.recovery_steps, "mean_cos": t.test_mean_cos,
                         "recall_at_10": t.test_recall_at_10, "sim_spearman": t.test_spearman,
                         "target": t.target, **extra}).reset_index(drop=True)


# ---- cached tables (notebook 06) --------------------------------------------------------

def _runs(profile) -> Path:
    from ..cache import artifact_dir

    return artifact_dir("minilm_runs", study_key(profile))


def _table(kind: str, profile, compute) -> pd.DataFrame:
    from ..cache import cached_frame

    return cached_frame(kind, {"kind": kind, **study_key(profile)}, compute)


def reference_embeddings(task) -> torch.Tensor:
    """The original's test embeddings of the study: what every candidate is scored against."""
    return embed_split(original()[0], task, "test")


_reference = reference_embeddings


def minilm_modules(profile=None, *, progress: bool = True):
    """(bank, log) of the profile's ONE module-replacing run on MiniLM: the shipped one (verified;
    None, None when it is not shipped yet), or trained once in the cache and read afterwards."""
    _, m = _profile(profile)
    if m.shipped:
        if shipped.missing("modules", m):
            print(f"MiniLM modules: {shipped.NOT_SHIPPED}; their rows stay empty", flush=True)
            return None, None
        return shipped.load_modules(m)
    model, tok = original()
    return train_bank(model, study_task(m, tok), m, _runs(profile) / "modules", progress)


def minilm_module_table(profile=None, *, progress: bool = True) -> pd.DataFrame:
    """The original and the size-first ladder of the module run, scored on test (a module run not
    shipped yet: the original and one row with the note)."""
    _, m = _profile(profile)

    def compute():
        model, tok = original()
        task = study_task(m, tok)
        bank, _ = minilm_modules(profile, progress=progress)
        ref = _reference(task)
        if bank is None:
            rows = [{"method": "original", "plan": f"{STACK}=111111", "layers": 6, "ratio": 1.0,
                     "params": count_params(model), "params_removed_frac": 0.0, "recovery_steps": 0,
                     "train_steps": 0, **test_scores(model, task, ref)},
                    {"method": "modules", "plan": "", "recovery_steps": 0, "train_steps": m.steps,
                     "note": NOT_SHIPPED}]
            return pd.DataFrame(rows)
        return pd.DataFrame(ladder_rows(model, bank, task, ref, m.steps))

    return _table("minilm_module_table", profile, compute)


def minilm_baseline_table(profile=None, *, progress: bool = True) -> pd.DataFrame:
    """Layer dropping and shrink-and-fine-tune at each ratio of the profile, before and after
    their fine-tune (the module run's steps and batch), scored on test."""
    _, m = _profile(profile)

    def compute():
        model, tok = original()
        task = study_task(m, tok)
        student = _shipped_student(m) if m.shipped else None
        return pd.DataFrame(baseline_rows(model, task, m, _reference(task), _runs(profile) / "baselines",
                                          progress, student=student))

    return _table("minilm_baseline_table", profile, compute)


def _shipped_student(m):
    """student(method, keep) for `baseline_rows`: the shipped run (verified), or None and the note."""
    def student(method: str, keep: list[int]):
        name = f"{method}-{len(keep)}"
        if shipped.missing(name, m):
            print(f"MiniLM baseline {name}: {shipped.NOT_SHIPPED}; its row stays empty", flush=True)
            return None, shipped.NOT_SHIPPED
        return shipped.load_student(name, m)[0], ""

    return student


MERGE_COLUMNS = ["target", "method", "spec", "layers", "params", "params_removed_frac", "stage", "recovery_steps",
                 "dev_mean_cos", "test_mean_cos", "test_recall_at_10", "test_spearman", "note"]


def _shipped_merges(m) -> pd.DataFrame:
    """`minilm_ff_merging`'s table read from the shipped merge-P cards (a target not shipped yet:
    one row per method with the note)."""
    parts = []
    for t in m.merge_targets:
        name = f"merge-{round(t * 100)}"
        if shipped.missing(name, m):
            print(f"MiniLM {name}: {shipped.NOT_SHIPPED}; its rows stay empty", flush=True)
            parts.append(pd.DataFrame([{"target": t, "method": meth, "spec": "", "stage": "recovered",
                                        "recovery_steps": m.steps, "note": shipped.NOT_SHIPPED}
                                       for meth in (*m.merge_methods, "prune")]).reindex(columns=MERGE_COLUMNS))
        else:
            parts.append(shipped.load_merges(name, m)[0])
    df = pd.concat(parts, ignore_index=True)
    return pd.concat([df[df.method == "original"].head(1), df[df.method != "original"]], ignore_index=True)


def _shipped_control(m) -> tuple[nn.Module | None, str]:
    """(the shipped control, "") after `verify`, or (None, the note) when it is not shipped yet."""
    if shipped.missing(shipped.CONTROL_NAME, m):
        print(f"MiniLM {shipped.CONTROL_NAME}: {shipped.NOT_SHIPPED}; its row stays empty", flush=True)
        return None, shipped.NOT_SHIPPED
    return shipped.load_control(m)[0], ""


def minilm_merge_study(profile=None, *, progress: bool = True) -> pd.DataFrame:
    """`minilm_ff_merging` at the profile's targets, recovery = the module run's steps and batch,
    on the study's sentences; recovered models kept in the run directory for the frontier. The last
    row is the CONTROL: the original fine-tuned with the same recovery (`control_student`), scored on
    the same test sentences, so a recovered merge or prune is read against it, not only the original."""
    _, m = _profile(profile)

    def compute():
        model, tok = original()
        task = study_task(m, tok)
        if m.shipped:
            table = _shipped_merges(m)
            control = _shipped_control(m)
        else:
            table = minilm_ff_merging(trainable(model, m), tok, task, targets=tuple(m.merge_targets),
                                      methods=tuple(m.merge_methods), recovery=finetune_config(m),
                                      align_tokens=m.align_tokens, select_limit=m.select_limit, eval_limit=None,
                                      out_dir=_runs(profile) / "merging", progress=progress)
            control = (control_student(model, task, m, _runs(profile) / "merging" / "control", progress)[0], "")
        row = control_row(model, task, m, _reference(task), *control)
        out = pd.concat([table, pd.DataFrame([row])], ignore_index=True)
        out.attrs = table.attrs
        return out

    return _table("minilm_merge_study", profile, compute)


def merge_view(merges: pd.DataFrame, metric: str = "test_mean_cos") -> pd.DataFrame:
    """`minilm_merge_study` as notebook 06 shows it: one row per target and method with `metric` as built
    (`mean_cos@0`) and after recovery (`mean_cos@N`), and `vs_control`: after recovery minus the CONTROL's
    (the original fine-tuned the same N steps, same test sentences; NaN where there is no control)."""
    short = metric.removeprefix("test_")
    wide = merges.groupby(["target", "method", "params_removed_frac", "recovery_steps"], sort=False,
                          dropna=False)[metric].first().unstack("recovery_steps")  # a row without scores stays
    wide = wide[sorted(wide.columns)]
    wide.columns = [f"{short}@{s:g}" for s in wide.columns]
    wide = wide.reset_index()
    ref = {int(x.recovery_steps): x[metric] for _, x in merges[merges.method == CONTROL].dropna(subset=[metric]).iterrows()}
    steps = [int(c.split("@")[1]) for c in wide.columns if "@" in str(c)]
    gaps = []
    for _, r in wide.iterrows():
        after = [(n, r[f"{short}@{n}"]) for n in steps if n > 0 and n in ref and pd.notna(r[f"{short}@{n}"])]
        gaps.append(after[-1][1] - ref[after[-1][0]] if after and r.method != CONTROL else float("nan"))
    wide["vs_control"] = gaps
    rank = {"original": 0, CONTROL: 1}
    return wide.sort_values(["target", "method"], key=lambda col: col.map(rank).fillna(2) if col.name == "method"
                            else col, kind="stable").reset_index(drop=True)


def latency_inputs(task, batch_sizes, split: str = "test") -> dict[int, dict]:
    """{batch size: encoder inputs} of the split's first sentences (cycled when the split is smaller)."""
    n = task.sizes()[split]
    out = {}
    for bs in batch_sizes:
        b = task.collate(split, [i % n for i in range(bs)])
        out[bs] = {"input_ids": b.input_ids, "attention_mask": b.attention_mask}
    return out


def candidate_models(profile, rows: pd.DataFrame, bank) -> dict[str, nn.Module]:
    """One model per architecture of the frontier rows (`arch`): the original, each assembled plan,
    each recovered baseline and each recovered merge, read from the shipped runs (`minilm.shipped`)
    or from the profile's runs in the cache. A row with a note (not shipped) gets no model."""
    from ..modular import assemble

    _, m = _profile(profile)
    model, _ = original()
    trained = _shipped_loader(m, model) if m.shipped else _cache_loader(profile)
    out: dict[str, nn.Module] = {}
    live = rows[rows["note"].isna()] if "note" in rows else rows
    for r in live.drop_duplicates("arch").itertuples():
        if r.method == "original":
            out[r.arch] = model
        elif r.method == CONTROL:  # the original's architecture: timed as the original (see minilm_frontier)
            continue
        elif r.method == "modules":
            out[r.arch] = assemble(model, bank, r.plan)
        else:
            out[r.arch] = trained(r)
    return out


def _cache_loader(profile):
    """A row's recovered baseline (plain AutoModel) or merge (load_merged) from the cache's runs."""
    from transformers import AutoModel

    from ..merging.merge import load_merged

    runs = _runs(profile)

    def trained(r) -> nn.Module:
        if r.method in BASELINE_RULES:
            keep = r.plan.removeprefix("keep ").replace(",", "-")
            path = _saved(runs / "baselines" / f"{r.method}_{keep}" / "student", r.arch)
            return AutoModel.from_pretrained(str(path), local_files_only=True).eval()
        name = "prune" if r.method == "layer_prune" else r.method
        return load_merged(_saved(runs / "merging" / f"{r.target:.2f}_{name}" / "model", r.arch)).eval()
    return trained


def _shipped_loader(m, model: nn.Module):
    """A row's model from data/minilm; a baseline not shipped yet is timed on its untrained
    architecture (its row carries the note and no scores)."""
    from ..baselines import keep_only
    merged = {}
    for t in m.merge_targets:
        name = f"merge-{round(t * 100)}"
        if not shipped.missing(name, m):
            merged.update({(round(t, 4), meth): net for meth, net in shipped.load_merges(name, m)[1].items()})

    def trained(r) -> nn.Module:
        if r.method in BASELINE_RULES:
            keep = [int(i) for i in r.plan.removeprefix("keep ").split(",")]
            name = f"{r.method}-{len(keep)}"
            return keep_only(model, {STACK: keep}) if shipped.missing(name, m) else shipped.load_student(name, m)[0]
        return merged[round(r.target, 4), "prune" if r.method == "layer_prune" else r.method]
    return trained


def _saved(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{what}: its trained model {path} is missing although its table is cached (a run "
                                f"directory was deleted); delete {path.parent.parent.parent} and the cached "
                                f"minilm_* tables to retrain, or use another $MTLAB_CACHE")
    return path


def minilm_frontier(profile=None, *, progress: bool = True) -> pd.DataFrame:
    """Every candidate (the ladder, the baselines, the FF-merge/prune candidates) with its test
    scores and its measured encode speed-up over the original at each latency batch size
    (`mtlab.measure.encoder_latency`, all models in one run; a candidate before and after its
    recovery has one architecture, timed once). Adds kind, cos_gap = 1 - mean_cos and the frontier
    marks of `mtlab.explore.frontier.mark_frontiers` (quality cos_gap vs speedup_b64 and params)."""
    from ..explore.frontier import mark_frontiers
    from ..measure import encoder_latency

    _, m = _profile(profile)
    modules = minilm_module_table(profile, progress=progress)
    baselines = minilm_baseline_table(profile, progress=progress)
    merges = merge_rows(minilm_merge_study(profile, progress=progress))

    def compute():
        rows = pd.concat([modules, baselines, merges], ignore_index=True)
        rows["arch"] = rows.method + " " + rows.plan.fillna("")
        first = rows.arch[rows.method == "original"]
        if len(first):  # the control has the original's architecture: one timing
            rows.loc[rows.method == CONTROL, "arch"] = first.iloc[0]
        bank, _ = minilm_modules(profile, progress=progress)
        models = candidate_models(profile, rows, bank)
        _, tok = original()
        lat = encoder_latency(models, latency_inputs(study_task(m, tok), m.latency_batches),
                              min_run_time=m.latency_seconds, rounds=m.latency_rounds)
        for bs in m.latency_batches:
            per = lat[lat.batch_size == bs].set_index("model")
            rows[f"speedup_b{bs}"] = rows.arch.map(per.speedup_vs_first)
            rows[f"speedup_b{bs}_spread"] = rows.arch.map(per.speedup_spread)
        rows["speed_noisy"] = rows.arch.map(lat.groupby("model").speed_noisy.any()).fillna(False).astype(bool)
        rows["kind"] = rows.method.map(KIND)
        rows["cos_gap"] = 1 - rows.mean_cos
        speed = f"speedup_b{max(m.latency_batches)}"
        ctl = rows.method == CONTROL  # a yardstick, not a compressed model: never on a frontier
        marked = mark_frontiers(rows[~ctl], quality="cos_gap", speed=speed)
        flags = {c: False for c in ("on_frontier", "on_frontier_params", "on_frontier_any")}
        return pd.concat([marked, rows[ctl].assign(**flags)]).loc[rows.index]

    return _table("minilm_frontier", profile, compute)


def minilm_csv(frontier: pd.DataFrame) -> pd.DataFrame:
    """The rows of reports/minilm.csv (exactly CSV_COLUMNS)."""
    return frontier.reindex(columns=CSV_COLUMNS)


def ladder_vs_baselines(frontier: pd.DataFrame, metric: str = "mean_cos") -> pd.DataFrame:
    """`metric` per number of layers (rows) and method (columns): the module ladder against the
    trained baselines (after their fine-tune), the original on top."""
    keep = frontier.method.isin(["original", "modules"]) | (
        frontier.method.isin(list(BASELINE_RULES)) & (frontier.recovery_steps > 0))
    t = frontier[keep]
    return t.pivot_table(index="layers", columns="method", values=metric).sort_index(ascending=False)


def _best(df: pd.DataFrame) -> pd.Series:
    return df.loc[df.mean_cos.idxmax()]


def _against_control(mb, pb, ctl: pd.DataFrame) -> str:
    """The end of a merge-vs-prune sentence: both recovered rows against the control (the original fine-tuned
    the same steps on the same sentences), or a flag that there is none."""
    c = ctl[ctl.recovery_steps == mb.recovery_steps]
    if c.empty:
        return ("; **no control** (the original fine-tuned the same way), so what the recovery gained cannot be "
                "told from what the fine-tune alone does.")
    c = c.iloc[0]
    return (f"; the original fine-tuned the same {int(c.recovery_steps)} steps on the same data, the control, scores "
            f"{c.mean_cos:.3f}: the recovered merge is {mb.mean_cos - c.mean_cos:+.3f} and layer pruning "
            f"{pb.mean_cos - c.mean_cos:+.3f} against it.")


def minilm_conclusion(frontier: pd.DataFrame) -> str:
    """A few sentences computed from the frontier table: merge against pruning after recovery at
    each target, each against the CONTROL (the original fine-tuned the same way), the best method at each
    number of layers, and who sits on the speed frontier."""
    out = []
    if "note" in frontier and frontier.note.notna().any():
        gone = frontier[frontier.note.notna()]
        out.append(f"Not shipped yet ({gone.note.iloc[0].split(': ', 1)[-1]} trains them), rows left empty: "
                   + ", ".join(sorted(set(gone.method))) + ".")
    rec = frontier[frontier.method.isin(["permute", "vanilla", "layer_prune"]) & (frontier.recovery_steps > 0)]
    rec = rec.dropna(subset=["mean_cos"])
    ctl = frontier[frontier.method == CONTROL].dropna(subset=["mean_cos"]) if "method" in frontier else frontier
    for target, g in rec.groupby("target"):
        merges, prune = g[g.method != "layer_prune"], g[g.method == "layer_prune"]
        if merges.empty or prune.empty:
            continue
        mb, pb = _best(merges), _best(prune)
        verdict = "beats" if mb.mean_cos > pb.mean_cos else "does not beat"
        out.append(f"At ~{target:.0%} of the parameters removed, after {int(mb.recovery_steps)} recovery steps, "
                   f"merging ({mb.method}, {mb.params_removed_frac:.1%} removed) {verdict} layer pruning "
                   f"({pb.params_removed_frac:.1%} removed): mean cosine {mb.mean_cos:.3f} vs {pb.mean_cos:.3f}"
                   + _against_control(mb, pb, ctl))
    table = ladder_vs_baselines(frontier)
    for layers, row in table.drop(index=table.index.max(), errors="ignore").iterrows():
        row = row.dropna()
        if len(row) > 1:
            out.append(f"With {int(layers)} layers, {row.idxmax()} wins (mean cosine {row.max():.3f}; "
                       + ", ".join(f"{k} {v:.3f}" for k, v in row.drop(row.idxmax()).items()) + ").")
    on = frontier[frontier.on_frontier & (frontier.method != "original")]
    if len(on):
        out.append("On the quality/speed-up frontier: " + ", ".join(f"{r.method} {r.plan}" for r in on.itertuples())
                   + ".")
    return " ".join(out) or "Nothing to compare: the tables hold no recovered candidates."
