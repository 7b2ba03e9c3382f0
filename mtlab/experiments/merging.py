"""FF-sublayer similarity and merging (Verma, Murray, Duh 2025) as cached tables.

Notebooks 01/04, `benchmarks/merge.py` and `make report` call these functions; each returns a
DataFrame with its config in `df.attrs["config"]`, computed once and then read back from the
artifact cache (`mtlab.cache.cached_frame`). The key holds the weights' content hash (teacher,
MiniLM), the profile's merging section and VERSION, so a table made from other weights, another
budget or older code is never reused.

Data discipline (docs/methods.md, section 2): FF statistics and similarity on the teacher's train split
(MiniLM: its `align` sentences), windows chosen on dev, test read only for the final numbers of
the models chosen on dev. Recovery fine-tunes get one budget (steps, batch, lr, seed) for every
method, so permute, vanilla and layer pruning see the same batches.
"""
from __future__ import annotations

import io
import itertools
import json
import re
import sys
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from ..cache import cached_frame, file_hash, teacher_hash
from ..candidate import Candidate, CompressionSpec, apply
from ..checkpoint import write_csv, write_json
from ..merging.methods import merge_methods
from ..measure import count_params
from ..merging.correlations import CorrelationCache
from ..merging.recover import recover
from ..merging.windows import FIXED_COLUMNS as SEARCH_FIXED  # window_search's non-score columns
from ..merging.windows import final_eval, window_search
from ..profiles import MergingProfile, get_profile
from ..teacher import load_teacher
from ..train import TrainConfig
from . import merge_artifacts as store  # its folder is read at call time (tests point it elsewhere)
from .merge_artifacts import CONTROL_NAME, NOT_SHIPPED
from .merge_recipe import (ALIGN_BATCH, ANCHOR, COMBINED_SIZE, CONTROL, SEED, align_batches,  # noqa: F401 (the study's recipe)
                           combined_recovery_config, fine_tuned_control, recovery_config)

VERSION = 2                      # bump when a change of code changes what a table holds (2: the original on
                                 # every word set of the table, dev_n/test_n in merge.csv); the control rows
                                 # change only teacher_merge and merge_csv: their keys name CONTROL instead
PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"  # MiniLM's sentences come from stdlib docstrings
METHOD = {"none": "original", "prune": "layer_prune"}  # table names; a merge method keeps its registered name
RANK = {"kind": {"original": 0, "control": 0, "window": 1, "merge": 1, "prune": 1, "combined": 2},  # reading order
        "compare": {"-": 0, "single window": 1, "equal FF sublayers": 2, "equal params": 3},
        "stack": {"-": 0, "encoder": 1, "layers": 1, "decoder": 2, "encoder+decoder": 3},
        "method": {"original": 0, "none": 0, "original (fine-tuned)": 0.5, "layer_prune": 3, "prune": 3}}


def method_ranks() -> dict:
    """Reading order of the method column: the original and its control, then every registered merge
    method by its registry rank (read now, so a method registered later takes its place), then pruning."""
    from ..merging.methods import METHODS

    fixed = RANK["method"]
    return {**{k: v for k, v in fixed.items() if v < 1}, **METHODS.meta("rank"),
            **{k: v for k, v in fixed.items() if v >= 1}}
COLUMNS = ["model", "method", "stack", "layers", "params", "params_removed_frac", "recovery_steps",
           "dev_per", "dev_wer", "dev_n", "test_per", "test_wer", "test_n", "vs_control", "mean_cos", "recall_at_10"]
WORDS = ["dev_n", "test_n"]      # how many words (MiniLM: sentences) each row's dev and test scores are on
FIGURE_WIDTH = 12.0              # inches: the width of a figure of three heatmaps (see similarity_figure)
MEASURES = {"cka": "linear CKA", "matching": "neuron matching (mean matched Pearson correlation)"}


# ---------------------------------------------------------------------------
# cache keys

def method_label(method: str) -> str:
    """A search row's method as the tables name it: none -> original, prune -> layer_prune, a merge
    method (any registered one) -> its name."""
    return METHOD.get(method, method)


def minilm_hash() -> str:
    from ..minilm import model_dir

    return file_hash(model_dir() / "model.safetensors")


def recovery_dir(specs: list[str], rcfg: TrainConfig) -> Path:
    """Where a candidate's recovery run and recovered model (`model/`) live in the artifact cache,
    so the frontier (notebook 05) loads what this study trained instead of training it again."""
    from ..cache import artifact_dir

    return artifact_dir("recovered", {"teacher": teacher_hash(), "specs": list(specs), "recovery": asdict(rcfg)})


def config_for(kind: str, profile=None, **weights) -> dict:
    """The cache key of a table: kind, VERSION, the profile's merging section, the weights' hashes."""
    return {"kind": kind, "version": VERSION, "merging": asdict(get_profile(profile).merging), **weights}


def _cached(kind: str, config: dict, compute) -> pd.DataFrame:
    """cached_frame, plus: the computed frame goes through the CSV once, so the first call returns
    exactly what later calls read back; its own attrs["config"] is kept as details.json."""
    details = {}

    def run():
        df = compute()
        details.update(df.attrs.get("config", {}))
        return pd.read_csv(io.StringIO(df.to_csv(index=False)))

    df = cached_frame(kind, config, run)
    path = Path(df.attrs["cache"]).with_name("details.json")
    if details:
        write_json(path, details)
    if path.exists():
        df.attrs["details"] = json.loads(path.read_text())
    return df


def save_csv(df: pd.DataFrame, out: str | Path | None, name: str) -> Path | None:
    """Write `df` to OUT/name when a notebook is given an output directory (None: nothing)."""
    if out is None:
        return None
    path = Path(out) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_csv(path, df)




# ---------------------------------------------------------------------------
# similarity

def _long(model: str, df: pd.DataFrame) -> pd.DataFrame:
    cfg = df.attrs["config"]
    measure = "cka" if "CKA" in cfg["measure"] else "matching"
    return pd.DataFrame([{"model": model, "measure": measure, "point": cfg["point"], "row": r, "col": c,
                          "value": df.at[r, c], "tokens": cfg["tokens"][r.rsplit(".", 1)[0]]}
                         for r in df.index for c in df.columns])


def similarity_frames(profile=None, *, progress: bool = True) -> pd.DataFrame:
    """Layer x layer similarity of the teacher (train-split tokens) and MiniLM (align sentences),
    long format (model, measure, point, row, col, value, tokens): linear CKA of FF outputs
    (`ff_out`) and attention outputs (`attn_out`) on `cka_tokens` tokens per stack, and
    neuron-matching scores of FF pre-activations (`ff_pre`) on `align_tokens`. Cross-stack
    cells are NaN (encoder and decoder see different tokens). MiniLM's maps leave its special
    tokens out (their outsized activations dominate CKA; `mtlab.minilm.special_token_contrast`
    shows both). See `similarity_matrix`."""
    from ..minilm import batches, load_minilm, sentences
    from ..similarity import cka_matrix, matching_matrix

    p = get_profile(profile)
    m = p.merging

    def compute():
        teacher, task = load_teacher()
        mini, tok = load_minilm()
        align = sentences(m.minilm_sentences)["align"]
        models = {"teacher": (teacher, align_batches(task)), "minilm": (mini, lambda: batches(tok, align))}
        exclude = {"teacher": None, "minilm": tok}  # MiniLM: [CLS]/[SEP]/[PAD] left out
        jobs = [(name, kind, point) for name in models for kind, point in
                (("cka", "ff_out"), ("cka", "attn_out"), ("matching", "ff_pre"))]
        parts = []
        for name, kind, point in tqdm(jobs, desc="similarity", disable=not progress):
            net, data = models[name]
            df = (cka_matrix(net, data, point, max_tokens=m.cka_tokens, progress=False, exclude=exclude[name])
                  if kind == "cka" else matching_matrix(net, data, point, max_tokens=m.align_tokens, progress=False,
                                                        exclude=exclude[name]))
            parts.append(_long(name, df))
        return pd.concat(parts, ignore_index=True)

    cfg = config_for("similarity", p, teacher=teacher_hash(), minilm=minilm_hash(), python=PYTHON,
                     minilm_left_out="special tokens")
    return _cached("similarity", cfg, compute)


def minilm_contrast(profile=None, point: str = "ff_out", *, progress: bool = True):
    """MiniLM's CKA map over all tokens next to the map without special tokens, with the sentence
    saying what differs and why (`mtlab.minilm.special_token_contrast`, the profile's sentence
    and token budgets; not cached: seconds). Show it with `.figure()`; summaries use the clean map."""
    from ..minilm import special_token_contrast

    m = get_profile(profile).merging
    return special_token_contrast(point=point, n=m.minilm_sentences, max_tokens=m.cka_tokens, progress=progress)


def similarity_matrix(frames: pd.DataFrame, model: str, measure: str = "cka", point: str = "ff_out") -> pd.DataFrame:
    """One square layer x layer matrix out of `similarity_frames`, ready for `similarity.heatmap`."""
    sel = frames[(frames.model == model) & (frames.measure == measure) & (frames.point == point)]
    if sel.empty:
        have = sorted(set(zip(frames.model, frames.measure, frames.point)))
        raise ValueError(f"no {measure} of {point} for {model!r} in these frames; have {have}")
    order = list(dict.fromkeys(sel.row))
    M = sel.pivot(index="row", columns="col", values="value").reindex(index=order, columns=order)
    M.index.name = M.columns.name = None
    M.attrs["config"] = {"measure": MEASURES[measure], "point": point,
                         "tokens": {r.rsplit(".", 1)[0]: int(t) for r, t in zip(sel.row, sel.tokens)}}
    return M


def similarity_summary(frames: pd.DataFrame) -> pd.DataFrame:
    """Per model, measure, point and stack: mean similarity of adjacent layers and of all pairs
    (the paper's observation: FF outputs stay similar across layers, attention outputs less)."""
    rows = []
    for (model, measure, point), g in frames.groupby(["model", "measure", "point"], sort=False):
        M = similarity_matrix(frames, model, measure, point)
        for stack in dict.fromkeys(r.rsplit(".", 1)[0] for r in M.index):
            idx = [r for r in M.index if r.rsplit(".", 1)[0] == stack]
            S = M.loc[idx, idx].to_numpy()
            pairs = [(i, j) for i in range(len(idx)) for j in range(i + 1, len(idx))]
            rows.append({"model": model, "measure": measure, "point": point, "stack": stack,
                         "adjacent_mean": sum(S[i, i + 1] for i in range(len(idx) - 1)) / max(1, len(idx) - 1),
                         "all_pairs_mean": sum(S[i, j] for i, j in pairs) / max(1, len(pairs))})
    return pd.DataFrame(rows)


def similarity_figure(frames: pd.DataFrame, model: str):
    """Three heatmaps of one model: CKA of FF outputs, CKA of attention outputs, FF neuron matching."""
    import matplotlib.pyplot as plt

    from ..similarity import heatmap

    panels = [("cka", "ff_out"), ("cka", "attn_out"), ("matching", "ff_pre")]
    n = similarity_matrix(frames, model).shape[0]
    # 12 inches at 100 dpi (1200 px) whatever the layer count: shown at a page's width (about 900 px)
    # the 9-point tick labels stay above 9 px; a wider figure would be scaled down until they cannot be read
    fig, axes = plt.subplots(1, 3, figsize=(FIGURE_WIDTH, FIGURE_WIDTH / 3 * 0.95), dpi=100)
    for ax, (measure, point) in zip(axes, panels):
        heatmap(similarity_matrix(frames, model, measure, point), ax=ax, title=f"{model}: {measure} of {point}",
                annot=n <= 6, fmt=".2f", annot_kws={"fontsize": 8})
        ax.tick_params(labelsize=9)
        ax.title.set_fontsize(10)
        ax.collections[0].colorbar.ax.tick_params(labelsize=8)
        ax.collections[0].colorbar.set_label(ax.collections[0].colorbar.ax.get_ylabel(), fontsize=8)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------
# the teacher: window search, candidates, recovery, final numbers



def window_table(p, model=None, task=None, cache=None, progress: bool = True) -> pd.DataFrame:
    m = p.merging

    def compute():
        nonlocal model, task
        if model is None:
            model, task = load_teacher()
        return window_search(model, task, sizes=m.window_sizes, anchor=ANCHOR, align_tokens=m.align_tokens,
                             select_limit=m.select_limit, starts=m.window_starts, batch_size=ALIGN_BATCH, seed=SEED,
                             cache=cache, progress=progress)

    return _cached("teacher_windows", config_for("teacher_windows", p, teacher=teacher_hash()), compute)


def teacher_window_search(profile=None, *, progress: bool = True) -> pd.DataFrame:
    """`window_search` on both stacks of the teacher (window sizes of the profile; permute, vanilla
    and layer pruning; aligned on train, scored on `select_limit` dev words); `best` marks the
    window chosen per (stack, size, method). The share removed is `params_removed_frac`, as in every CSV."""
    return window_table(get_profile(profile), progress=progress)


def candidates(search: pd.DataFrame) -> list[Candidate]:
    """The models of the final table, all chosen on dev: the best window per (stack, size, method);
    per method the combination of its best 3-layer window in every stack (4 of 12 FF sublayers for
    the 6+6 teacher); and layer pruning at (nearly) the merges' parameters removed: the combination
    of best pruning windows (or none) per stack whose removed parameters come closest. Each
    candidate's `info` holds the table's kind, compare, stack and layers columns."""
    best = search[search.best]
    stacks = list(dict.fromkeys(search["stack"][search.kind != "original"]))
    ranked = sorted(best.itertuples(), key=lambda r: (stacks.index(r.stack), r.size, method_ranks().get(r.method, 9)))
    out = [Candidate(method_label(r.method), CompressionSpec.parse(r.spec), provenance="search",
                     info={"kind": "window", "compare": "single window", "stack": r.stack, "layers": r.layers})
           for r in ranked]
    three = best[best["size"] == COMBINED_SIZE]
    if set(three["stack"]) != set(stacks):
        warnings.warn(f"no combined candidate: window size {COMBINED_SIZE} is not searched in every stack; add it "
                      "to the profile's window_sizes", stacklevel=2)
        return out

    def combo(rows, method, compare):
        layers = rows[0].layers if len(rows) == 1 else " ".join(f"{r.stack}:{r.layers}" for r in rows)
        return Candidate(method, CompressionSpec(None, tuple(r.spec for r in rows)), provenance="search",
                         info={"kind": "combined", "compare": compare, "stack": "+".join(r.stack for r in rows),
                               "layers": layers})

    for method in (*merge_methods(), "prune"):
        rows = [r for s in stacks for r in three[(three["stack"] == s) & (three.method == method)].itertuples()]
        if len(rows) == len(stacks):
            out.append(combo(rows, method_label(method), "equal FF sublayers"))
    merged = three[three.method.isin(merge_methods())]
    if len(merged):
        target = merged.groupby("method").params_removed.sum().iloc[0]
        options = [[None, *best[(best["stack"] == s) & (best.method == "prune")].itertuples()] for s in stacks]
        combos = [[r for r in c if r is not None] for c in itertools.product(*options)]
        pick = min((c for c in combos if c), key=lambda c: abs(sum(r.params_removed for r in c) - target))
        if [r.spec for r in pick] != next((spec_texts(c) for c in out if c.info["compare"] == "equal FF sublayers"
                                           and c.method == "layer_prune"), None):
            out.append(combo(pick, "layer_prune", "equal params"))
    return out


def spec_texts(c: Candidate) -> list[str]:
    """The text of each edit of a merging candidate (the key of its recovery run)."""
    return [str(e) for e in c.spec.edits]


def _scores(net, task, m: MergingProfile, searched: dict | None = None) -> dict:
    """dev_* (select_limit words) and test_* (eval_limit words) metrics of a model. `searched`: its
    window_search row, whose dev scores are reused (same model, same words, greedy decoding)."""
    skip = {"split", "n", "seconds", "name", "params", "n_eval", "eval_seconds"}
    if searched is None:
        dev = task.evaluate(net, "dev", limit=m.select_limit, progress=False)
    else:
        dev = {k: v for k, v in searched.items() if k not in SEARCH_FIXED or k == "n_eval"}
        dev["n"] = dev.pop("n_eval")
    test = final_eval({"model": net}, task, "test", limit=m.eval_limit, progress=False).iloc[0].to_dict()
    out = {f"dev_{k}": v for k, v in dev.items() if k not in skip}
    out.update({f"test_{k}": v for k, v in test.items() if k not in skip})
    return {**out, "dev_n": dev["n"], "test_n": test["n_eval"]}


def teacher_merge_table(profile=None, *, progress: bool = True) -> pd.DataFrame:
    """Final numbers of the teacher's merge candidates (see `candidates`), before and after the
    recovery fine-tune: one row per (candidate, stage) with method (original / permute / vanilla /
    layer_prune), stack, layers, spec, params, params_removed(_frac), ff_removed, blocks_removed,
    recovery_steps (0: before), dev_* on `select_limit` dev words, test_* on `eval_limit` test words.
    The combined candidates get `combined_recovery_config`; with `shipped`, their rows are read from
    the cards under data/merging (full dev/test splits, see dev_n/test_n), and one not shipped yet
    is a row whose `note` says `make merges`. For every recovery config the table uses there is a
    CONTROL row (kind "control", method "original (fine-tuned)"): the teacher fine-tuned with that
    config (`fine_tuned_control`; shipped: data/merging/original-control), scored on the same words."""
    p = get_profile(profile)
    m = p.merging
    rcfg = recovery_config(m)

    def compute():
        model, task = load_teacher()
        cache = CorrelationCache(model, align_batches(task), max_tokens=m.align_tokens)
        search = window_table(p, model, task, cache, progress)
        searched = {r["spec"]: r for r in search.to_dict("records")}
        n0 = count_params(model)
        rows = [{"kind": "original", "compare": "-", "method": "original", "stack": "-", "layers": "-",
                 "spec": "original", "params": n0, "ff_removed": 0, "blocks_removed": 0, "recovery_steps": 0,
                 **_scores(model, task, m, searched.get("original"))}]
        done: dict[tuple, list[dict]] = {}
        originals: dict[tuple, dict] = {}  # the teacher scored on the words of shipped rows (their cards)
        recovered: dict[tuple, TrainConfig] = {}  # (steps, shipped) -> the recovery config of recovered rows
        cands = candidates(search)
        bar = tqdm(cands, desc="merge table", disable=not progress)
        for c in bar:
            combined = c.info["kind"] == "combined"
            ccfg = combined_recovery_config(m) if combined else rcfg
            key = (tuple(spec_texts(c)), ccfg.steps, combined and m.shipped)
            bar.set_postfix_str(c.label)
            if key not in done:
                done[key] = _candidate_stages(c, ccfg, model, task, m, cache, searched, shipped=key[-1])
                if key[-1]:

                    t = store.shipped_teacher(c)
                    if t is not None:
                        originals.setdefault((t.get("dev_n"), t.get("test_n")), t)
            info = {"kind": c.info["kind"], "compare": c.info["compare"], "method": c.method, "stack": c.info["stack"],
                    "layers": c.info["layers"]}
            rows += [{**info, "spec": c.label, **s} for s in done[key]]
            if any(s["recovery_steps"] for s in done[key]):
                recovered.setdefault((ccfg.steps, key[-1]), ccfg)
        # the controls: the original fine-tuned with each recovery config the table uses, on the same words
        for (_, shipped), ccfg in recovered.items():
            rows.append({**{k: v for k, v in rows[0].items() if not k.startswith(("dev_", "test_"))},
                         "kind": "control", "method": CONTROL,
                         **_control_stage(ccfg, model, task, m, shipped=shipped, originals=originals)})
        first = (rows[0]["dev_n"], rows[0]["test_n"])
        for i, (words, s) in enumerate(sorted(originals.items(), key=lambda kv: str(kv[0]))):
            if words != first:  # one original row per word set, so every comparison has its original
                rows.insert(1 + i, {**{k: v for k, v in rows[0].items() if not k.startswith(("dev_", "test_"))},
                                    **{k: v for k, v in s.items() if k.startswith(("dev_", "test_"))}})
        df = pd.DataFrame(rows)
        df.insert(df.columns.get_loc("params") + 1, "params_removed", n0 - df.params)
        df.insert(df.columns.get_loc("params_removed") + 1, "params_removed_frac", (n0 - df.params) / n0)
        df.attrs["config"] = {"recovery": asdict(rcfg), "search": search.attrs.get("details", {}),
                              "combined_size": COMBINED_SIZE}
        if m.combined_recovery_steps is not None:
            df.attrs["config"]["combined_recovery"] = asdict(combined_recovery_config(m))
        return df

    extra = {}
    if m.combined_recovery_steps is not None:
        extra["combined_recovery"] = asdict(combined_recovery_config(m))
    if m.shipped:
        from ..shipped import shipped_state

        extra["shipped"] = shipped_state(store.MERGE_DIR)  # a card written (or replaced) by `make merges` makes a new table
    extra["control"] = CONTROL
    cfg = config_for("teacher_merge", p, teacher=teacher_hash(), recovery=asdict(rcfg), **extra)
    return _cached("teacher_merge", cfg, compute)


def _candidate_stages(c: Candidate, rcfg: TrainConfig, model, task, m: MergingProfile, cache, searched: dict, *,
                      shipped: bool) -> list[dict]:
    """One candidate's rows: as built (recovery_steps 0) and after `rcfg`, recovered in the cache,
    or read from its shipped card (`shipped`); a candidate not shipped yet gets a row with a note."""

    if shipped:
        stages = store.shipped_stages(c, m)
        if stages is not None:
            return stages
    key = spec_texts(c)
    net = apply(model, c.spec, cache=cache)
    stages = [{"recovery_steps": 0, **_scores(net, task, m, searched.get("; ".join(key)))}]
    if shipped:
        stages.append({"recovery_steps": rcfg.steps, "note": NOT_SHIPPED})
    elif rcfg.steps > 0:
        t0 = time.perf_counter()
        recover(net, task, rcfg, recovery_dir(key, rcfg), progress=False)
        stages.append({"recovery_steps": rcfg.steps, "recovery_seconds": time.perf_counter() - t0,
                       **_scores(net, task, m)})
    ff, blocks = c.spec.removed()
    return [{"params": count_params(net), "ff_removed": ff, "blocks_removed": blocks, **s} for s in stages]


def _control_stage(rcfg: TrainConfig, model, task, m: MergingProfile, *, shipped: bool,
                   originals: dict) -> dict:
    """The control's scores after `rcfg`: the teacher fine-tuned in the cache (`fine_tuned_control`,
    scored on the table's words), or read from the shipped control's verified card (full splits; the
    teacher's scores on those words go to `originals`); not shipped yet: a row with the note."""

    if shipped:
        stage = store.shipped_control(m)
        if stage is None:
            return {"recovery_steps": rcfg.steps, "note": NOT_SHIPPED}
        from ..shipped import read_card

        t = read_card(store.MERGE_DIR / CONTROL_NAME).get("teacher") or {}
        if "test_n" in t:
            originals.setdefault((t.get("dev_n"), t.get("test_n")), t)
        return stage
    t0 = time.perf_counter()
    net, _ = fine_tuned_control(model, task, rcfg, recovery_dir(["original"], rcfg))
    return {"recovery_steps": rcfg.steps, "recovery_seconds": time.perf_counter() - t0, **_scores(net, task, m)}


def control_gaps(table: pd.DataFrame, metric: str = "test_wer") -> pd.Series:
    """Per row, `metric` minus that of its CONTROL: the original fine-tuned for the same recovery steps,
    scored on the same words (same test_n and dev_n). NaN for rows that were not recovered (and the
    controls); a recovered row with no such control is NaN too, and `missing_controls` names it."""
    def key(r) -> tuple:
        return tuple(None if pd.isna(r.get(k)) else float(r.get(k)) for k in ("recovery_steps", "test_n", "dev_n"))

    ctl = table[table.method == CONTROL].dropna(subset=[metric])
    ref = {key(r): r[metric] for _, r in ctl.iterrows()}
    rec = (table.recovery_steps > 0) & ~table.method.isin(["original", CONTROL])
    return pd.Series([row[metric] - ref[key(row)] if ok and key(row) in ref else float("nan")
                      for ok, (_, row) in zip(rec, table.iterrows())], index=table.index, dtype=float)


def missing_controls(table: pd.DataFrame, metric: str = "test_wer") -> pd.DataFrame:
    """The recovered rows (with scores) that have no control on their words and recovery steps: their
    gain cannot be told from what the fine-tune alone does."""
    rec = (table.recovery_steps > 0) & ~table.method.isin(["original", CONTROL]) & table[metric].notna()
    return table[rec & control_gaps(table, metric).isna()]


def check_controls(table: pd.DataFrame, metric: str = "test_wer", *, what: str = "this comparison") -> pd.DataFrame:
    """`table` unchanged when every recovered row has its control (see `control_gaps`); otherwise a
    ValueError naming the rows and the fix."""
    bad = missing_controls(table, metric)
    if len(bad):
        rows = "; ".join(f"{r.method} {r.layers} after {r.recovery_steps:,.0f} steps on {r.test_n:,.0f} test words"
                         for r in bad.head(4).itertuples())
        raise ValueError(f"{what} has recovered rows without their control ({len(bad)}: {rows}): add the original "
                         f"fine-tuned with the same recovery config, scored on the same words (method {CONTROL!r}; "
                         "teacher_merge_table adds it, and `make merges` ships the combined candidates' one)")
    return table


def before_after(table: pd.DataFrame, metrics=("test_per", "test_wer")) -> pd.DataFrame:
    """Each candidate on one row: its test numbers before and after recovery, side by side, with the
    number of test words they are on (`test_n`; the original once per word set)."""
    idx = ["kind", "compare", "method", "stack", "layers", "params_removed_frac", "test_n"]
    wide = table.pivot_table(index=idx, columns="recovery_steps", values=list(metrics), sort=False)
    wide.columns = [f"{metric}@{steps}" for metric, steps in wide.columns]
    return _ranked(wide.reset_index(), ["kind", "compare", "stack", "method"]).reset_index(drop=True)


def quality_plot(table: pd.DataFrame, metrics=("test_per", "test_wer")):
    """Quality against the share of parameters removed, per method, before/after recovery: one row of
    panels per word set (`test_n`), each with the original scored on those same words as its dashed line
    and the control (the original fine-tuned like the recovered rows, same words) as a dotted line per budget."""
    import matplotlib.pyplot as plt
    import numpy as np
    import seaborn as sns

    from ..ui.compare import check_same_words, word_sets

    ranks = method_ranks()
    hue = sorted(set(table.method) - {CONTROL}, key=lambda k: (ranks.get(k, 9), k))
    d = table.dropna(subset=list(metrics), how="all")
    d = d.assign(removed_pct=100 * d.params_removed_frac,
                 stage=d.recovery_steps.map(lambda s: f"after {s:g} recovery steps" if s else "before recovery"))
    sets = word_sets(d) or [None]
    fig, axes = plt.subplots(len(sets), len(metrics), figsize=(6 * len(metrics), 4 * len(sets)), squeeze=False)
    for row, n in zip(np.atleast_2d(axes), sets):
        g = d if n is None else d[d.test_n == n]
        if "test_n" in g:
            check_same_words(g, what="a panel of the quality plot")
        orig, ctl = g[g.method == "original"], g[g.method == CONTROL]
        for ax, metric in zip(row, metrics):
            sns.scatterplot(data=g[g.method != CONTROL], x="removed_pct", y=metric, hue="method", hue_order=hue,
                            style="stage", s=70, ax=ax)
            if len(orig):
                ax.axhline(orig[metric].iloc[0], color="grey", ls="--", lw=1,
                           label="original" + ("" if n is None else " (same words)"))
            for c, color in zip(ctl.sort_values("recovery_steps").itertuples(), ("black", "tab:brown", "tab:pink")):
                ax.axhline(getattr(c, metric), color=color, ls=":", lw=1.2,
                           label=f"control: original fine-tuned {c.recovery_steps:,.0f} steps")
            ax.legend(fontsize=8)
            ax.set(xlabel="parameters removed (%)", ylabel=f"{metric} (%, lower is better)",
                   title="" if n is None else f"{n:,.0f} test words")
    fig.tight_layout()
    return fig


def search_view(search: pd.DataFrame) -> pd.DataFrame:
    """The window search as notebook 04 shows it: dev PER/WER with the dev words they are on (`dev_n`)
    and `best`, the window kept per (stack, size, method): the lowest dev PER."""
    view = search.rename(columns={"per": "dev_per", "wer": "dev_wer", "n_eval": "dev_n"})
    return view[[c for c in ["stack", "layers", "method", "params_removed_frac", "dev_per", "dev_wer", "dev_n", "best"]
                 if c in view.columns]]


# ---------------------------------------------------------------------------
# MiniLM and the merge.csv report

def minilm_merge_table(profile=None, *, progress: bool = True) -> pd.DataFrame:
    """`minilm_merge_vs_prune` on all-MiniLM-L6-v2 with the profile's window sizes, sentences and
    alignment tokens: every window scored on dev by fidelity to the original embeddings, the best
    per (size, method) and the original measured on test (test_cosine, test_recall_at_10)."""
    from ..minilm import minilm_merge_vs_prune

    p = get_profile(profile)
    m = p.merging

    def compute():
        return minilm_merge_vs_prune(n=m.minilm_sentences, sizes=m.window_sizes, anchor=ANCHOR,
                                     align_tokens=m.align_tokens, starts=m.window_starts, k=10, progress=progress)

    return _cached("minilm_merge", config_for("minilm_merge", p, minilm=minilm_hash(), python=PYTHON), compute)


def minilm_chosen(table: pd.DataFrame) -> pd.DataFrame:
    """The original and the window chosen on dev per (size, method), with dev and test fidelity and the
    number of sentences each is measured on (`dev_n`, `test_n`, where the table's details record them)."""
    cols = ["layers", "method", "params_removed_frac", "cosine", "test_cosine", "test_recall_at_10"]
    chosen = _ranked(table[table.best | (table.kind == "original")], ["kind", "size", "method"])
    out = chosen.assign(method=chosen.method.map(method_label), layers=chosen.layers.fillna("-"))[cols]
    out = out.rename(columns={"cosine": "dev_cosine"})
    n = table.attrs.get("details", table.attrs.get("config", {})).get("sentences", {})
    if n.get("dev") is not None and n.get("test") is not None:
        out.insert(out.columns.get_loc("dev_cosine") + 1, "dev_n", n["dev"])
        out["test_n"] = n["test"]
    return out.reset_index(drop=True)


def _ranked(df: pd.DataFrame, cols: list[str]) -> pd.DataFrame:
    """Rows in reading order: the original first, then by stack, size, and permute, vanilla, layer_prune."""
    return df.sort_values(cols, kind="stable",
                          key=lambda c: c.map(method_ranks() if c.name == "method" else RANK[c.name]).fillna(9)
                          if c.name in RANK else c)


def merge_csv(profile=None, *, progress: bool = True) -> pd.DataFrame:
    """The rows of reports/merge.csv (exactly COLUMNS): teacher candidates before/after recovery with
    dev and test PER/WER, MiniLM's original and best windows with test mean cosine and recall@10.
    Every row says how many words (MiniLM: sentences) its dev and test scores are on (`dev_n`,
    `test_n`); the original has one row per word set, so each candidate has its original on the same words.
    Each recovery budget has its CONTROL row ("original (fine-tuned)": the teacher fine-tuned the same way,
    on the same words), and `vs_control` is a recovered row's test WER minus its control's (points)."""
    p = get_profile(profile)
    teacher = teacher_merge_table(p, progress=progress)
    mini = minilm_merge_table(p, progress=progress)

    def compute():
        t = _ranked(teacher, ["kind", "stack", "method"]).assign(model="teacher")
        mm = _ranked(mini[mini.best | (mini.kind == "original")], ["kind", "size", "method"])
        n = mini.attrs.get("details", mini.attrs.get("config", {})).get("sentences", {})  # MiniLM: sentences, not words
        mm = pd.DataFrame({"model": "minilm", "method": mm.method.map(method_label),
                           "stack": mm["stack"].fillna("-"), "layers": mm.layers.fillna("-").replace("", "-"),
                           "params": mm.params, "params_removed_frac": mm.params_removed_frac, "recovery_steps": 0,
                           "mean_cos": mm.test_cosine, "recall_at_10": mm.test_recall_at_10,
                           "dev_n": n.get("dev"), "test_n": n.get("test")})
        # "equal params" may repeat a window (scored on the same words: one row); on other words it stays
        t = t.drop_duplicates(["method", "stack", "layers", "recovery_steps", "dev_n", "test_n"])
        t = t.assign(vs_control=control_gaps(t))  # test WER points against the control on the same words
        return pd.concat([t, mm], ignore_index=True).reindex(columns=COLUMNS)

    cfg = {"kind": "merge_csv", "version": VERSION, "teacher": teacher.attrs["config"], "minilm": mini.attrs["config"],
           "columns": COLUMNS}
    return _cached("merge_csv", cfg, compute)


# ---------------------------------------------------------------------------
# written conclusions, computed from the tables (notebooks 01 and 04, reports/index.html)

def similarity_conclusion(summary: pd.DataFrame) -> str:
    """What the similarity summary says about the premise of FF merging (markdown bullets): per model
    and stack, linear CKA of adjacent layers' FF outputs against their attention outputs."""
    cka = summary[summary.measure == "cka"]
    ff = cka[cka.point == "ff_out"].set_index(["model", "stack"]).adjacent_mean
    attn = cka[cka.point == "attn_out"].set_index(["model", "stack"]).adjacent_mean
    both = [k for k in ff.index if k in attn.index]
    if not both:
        return "- No stack has both FF and attention CKA: nothing to compare."
    lines = [f"{model} {stack}: adjacent FF outputs {ff[k]:.2f} vs attention outputs {attn[k]:.2f} "
             f"({'FF more similar' if ff[k] > attn[k] else 'attention as or more similar'})"
             for k in both for model, stack in [k]]
    wins = sum(ff[k] > attn[k] for k in both)
    head = (f"Adjacent layers' FF outputs are more similar (linear CKA) than their attention outputs in {wins} of "
            f"{len(both)} stacks" + (": the premise of merging FF sublayers holds here." if wins == len(both) else
                                     "; where they are not, merging FF sublayers has less to work with."))
    return "\n".join(f"- {x}" for x in [head, *lines])


def _span(layers) -> int:
    """How many layers a `layers` cell names ("1-3" -> 3, "0,2" -> 2, "encoder:1-3 decoder:2-4" -> 6)."""
    n = 0
    for part in re.findall(r"\d+(?:-\d+)?", str(layers)):
        a, _, b = part.partition("-")
        n += int(b) - int(a) + 1 if b else 1
    return n


def _words(n, split: str = "test") -> str:
    return f"{split} words of an unknown number" if pd.isna(n) else f"{n:,.0f} {split} words"


def _gap(a: float, b: float) -> float:
    """b - a as the reader computes it from the numbers shown (WER to 1 decimal): 10.04 and 10.06 show
    10.0 and 10.1, a gap of 0.1; a gap under 0.05 is a tie."""
    return round(round(float(b), 1) - round(float(a), 1), 1)


def _where(row) -> str:
    """A row's layers, with its stack unless the layers name it ("encoder:1-3 decoder:1-3")."""
    return str(row.layers) if ":" in str(row.layers) else f"{row['stack']} {row.layers}"


def _stage(steps) -> str:
    return f"after {steps:,.0f} recovery steps" if steps else "without recovery"


def _vs_original(row, orig: pd.DataFrame) -> str:
    """The gap of `row` to the original scored on the same test words (or a line saying there is none)."""
    o = orig[orig.test_n == row.test_n] if pd.notna(row.test_n) else orig.iloc[0:0]
    if not len(o):
        return "no original scored on these words to compare with"
    return f"{_gap(o.test_wer.iloc[0], row.test_wer):+.1f} points against the original's {o.test_wer.iloc[0]:.1f}% on these words"


def _vs_control(row, ctl: pd.DataFrame) -> str:
    """A recovered row against its control (the original fine-tuned the same steps, scored on the same test
    words), as a clause to append; '' for a row that was not recovered."""
    if not row.recovery_steps:
        return ""
    c = ctl[(ctl.recovery_steps == row.recovery_steps) & (ctl.test_n == row.test_n)]
    if not len(c):
        return ("; **no control** on these words (the original fine-tuned the same way): what the merge did cannot "
                "be told from what the fine-tune did")
    c = c.iloc[0]
    return (f"; {row.method} after recovery: {row.test_wer:.1f}% WER, the original fine-tuned the same way: "
            f"{c.test_wer:.1f}% ({_gap(c.test_wer, row.test_wer):+.1f} points against the control)")


def _teacher_lines(t: pd.DataFrame) -> list[str]:
    # every comparison is between rows scored on the same test words (test_n): the original has one row
    # per word set, and each (stack, size) is compared per word set at the longest recovery that two
    # methods have scores after (combined candidates may have a longer, shipped budget than single
    # windows; one not shipped yet has no scores)
    from ..ui.compare import check_same_words

    scored = t.dropna(subset=["test_wer"])
    orig = scored[scored.method == "original"].sort_values("test_n")
    ctl = scored[scored.method == CONTROL].sort_values("test_n")
    cands = scored[~scored.method.isin(["original", CONTROL])]
    lines = []
    if len(orig):
        lines.append("The original teacher scores " + " and ".join(
            f"{o.test_wer:.1f}% WER / {o.test_per:.1f}% PER on {_words(o.test_n)}" for o in orig.itertuples())
            + (": each candidate below is compared with the original on its own words." if len(orig) > 1 else "."))
    if len(ctl):
        lines.append("The control, the original fine-tuned with the same recovery config as the merges (same steps, "
                     "batch, lr, seed, data), scores " + " and ".join(
                         f"{c.test_wer:.1f}% WER / {c.test_per:.1f}% PER after {c.recovery_steps:,.0f} steps on "
                         f"{_words(c.test_n)}" for c in ctl.itertuples())
                     + ": a recovered model is read against it, so the fine-tune's own effect is not credited to "
                       "the merge.")
    dev = orig.dev_n.dropna().min() if "dev_n" in orig and len(orig) else float("nan")
    lines.append("How the rows are chosen: each window is the one with the lowest dev PER (the window search's "
                 f"`best`{'' if pd.isna(dev) else f', on {dev:,.0f} dev words'}); the candidates of one size are "
                 "then ranked by test WER (PER breaks ties).")
    key = [cands["stack"], cands.layers.map(_span), cands.test_n]
    two = cands.groupby([*key, cands.recovery_steps], dropna=False).method.transform("nunique") > 1
    top = cands.recovery_steps.where(two).groupby(key, dropna=False).transform("max")
    final = cands[cands.recovery_steps == top]
    wins: dict[str, int] = {}
    stages = set()
    at = len(lines)
    for (stack, size, n), g in final.groupby([final["stack"], final.layers.map(_span), final.test_n], sort=False,
                                             dropna=False):
        check_same_words(g, what=f"the comparison of {stack}, {size} layers")
        if g.method.nunique() < 2:
            continue
        g = g.sort_values(["test_wer", "test_per"])
        stage = _stage(g.recovery_steps.max())
        best, runner = g.iloc[0], g[g.method != g.iloc[0].method].iloc[0]
        where = f"{stack}, {size} layers ({stage}, {_words(n)})"
        if _gap(best.test_wer, runner.test_wer) < 0.05:
            lines.append(f"{where}: {best.method} and {runner.method} tie at {best.test_wer:.1f}% WER "
                         f"({100 * best.params_removed_frac:.1f}% vs {100 * runner.params_removed_frac:.1f}% of "
                         f"parameters removed; {_vs_original(best, orig)}{_vs_control(best, ctl)}).")
            continue
        wins[best.method] = wins.get(best.method, 0) + 1
        stages.add(stage)
        lines.append(f"{where}: **{best.method}** wins with {best.test_wer:.1f}% WER / {best.test_per:.1f}% PER "
                     f"({100 * best.params_removed_frac:.1f}% of parameters removed) against {runner.method} "
                     f"{runner.test_wer:.1f}% ({100 * runner.params_removed_frac:.1f}% removed), "
                     f"{_gap(best.test_wer, runner.test_wer):.1f} points better; {_vs_original(best, orig)}"
                     f"{_vs_control(best, ctl)}.")
    if wins:
        lines.insert(at, "Teacher, wins per method: " + ", ".join(
            f"{m} {n}" for m, n in sorted(wins.items(), key=lambda kv: -kv[1]))
            + f" (lowest test WER {stages.pop() if len(stages) == 1 else 'after the longest recovery two methods share'}).")
    lines += _baseline_lines(cands, orig, ctl)
    bad = missing_controls(t)
    if len(bad):
        lines.append(f"**{len(bad)} recovered row(s) have no control** on their words (" + ", ".join(
            f"{r.method} {r.layers} after {r.recovery_steps:,.0f} steps" for r in bad.head(4).itertuples())
            + "): their gain against the original may be the fine-tune's; `make merges` ships the control of the "
              "combined candidates.")
    return lines


def _baseline_lines(cands: pd.DataFrame, orig: pd.DataFrame, ctl: pd.DataFrame | None = None) -> list[str]:
    """Merging against layer pruning, the study's baseline, per word set: the best merge (lowest test WER,
    then PER) against the layer pruning row removing the closest share of parameters, after the longest
    recovery both have, on the same test words."""
    from ..ui.compare import check_same_words

    lines = []
    for n, g in cands.groupby(cands.test_n, sort=True, dropna=False):
        merged, pruned = g[g.method != "layer_prune"], g[g.method == "layer_prune"]
        steps = sorted(set(merged.recovery_steps) & set(pruned.recovery_steps))
        if not steps:
            continue
        merged, pruned = merged[merged.recovery_steps == steps[-1]], pruned[pruned.recovery_steps == steps[-1]]
        mg = merged.sort_values(["test_wer", "test_per"]).iloc[0]
        pr = pruned.assign(gap=(pruned.params_removed_frac - mg.params_removed_frac).abs()).sort_values(
            ["gap", "test_wer", "test_per"]).iloc[0]
        check_same_words(pd.DataFrame([mg, pr]), what="merge against layer pruning")
        diff = _gap(mg.test_wer, pr.test_wer)
        verdict = ("merging and layer pruning tie" if abs(diff) < 0.05 else
                   f"**merging** is {diff:.1f} points better" if diff > 0 else f"**layer pruning** is {-diff:.1f} points better")
        lines.append(f"Merge against layer pruning, the baseline ({_words(n)}, {_stage(steps[-1])}): {verdict} — the best "
                     f"merge, {mg.method} ({_where(mg)}), {mg.test_wer:.1f}% WER / {mg.test_per:.1f}% PER "
                     f"with {100 * mg.params_removed_frac:.1f}% of parameters removed, against layer pruning at the "
                     f"closest share removed ({_where(pr)}, {100 * pr.params_removed_frac:.1f}%) "
                     f"{pr.test_wer:.1f}% / {pr.test_per:.1f}%; the merge is {_vs_original(mg, orig)}"
                     f"{'' if ctl is None else _vs_control(mg, ctl)}.")
    return lines


def _minilm_lines(m: pd.DataFrame) -> list[str]:
    lines = []
    m = m[m.method != "original"].dropna(subset=["mean_cos"])
    for size, g in m.groupby(m.layers.map(_span), sort=True):
        merged, pruned = g[g.method != "layer_prune"], g[g.method == "layer_prune"]
        if not len(merged) or not len(pruned):
            continue
        mg, pr = merged.loc[merged.mean_cos.idxmax()], pruned.loc[pruned.mean_cos.idxmax()]
        if pr.mean_cos > mg.mean_cos:
            lines.append(f"MiniLM, {size} layers: layer pruning keeps the embeddings closer to the original than "
                         f"merging (mean cosine {pr.mean_cos:.3f} vs {mg.method} {mg.mean_cos:.3f}), while removing "
                         f"{100 * pr.params_removed_frac:.1f}% of parameters against {100 * mg.params_removed_frac:.1f}%.")
        else:
            lines.append(f"MiniLM, {size} layers: **{mg.method}** merging keeps the embeddings closer than layer pruning "
                         f"(mean cosine {mg.mean_cos:.3f} vs {pr.mean_cos:.3f}; {100 * mg.params_removed_frac:.1f}% "
                         f"vs {100 * pr.params_removed_frac:.1f}% of parameters removed).")
    return lines


def conclusion(merge: pd.DataFrame) -> str:
    """A short written result of the merge table (`merge_csv`, reports/merge.csv), computed from it
    (markdown bullets): how rows are chosen (windows by dev PER, candidates by test WER), which method
    wins at which size on the teacher, by how much, the best merge against layer pruning (the baseline),
    and on MiniLM whether merging or layer pruning keeps the embeddings closer to the original. Every
    comparison is between rows scored on the same test words (`test_n`; `mtlab.ui.compare.check_same_words`),
    each against the original scored on those words."""
    missing = {"model", "method", "stack", "layers", "params_removed_frac", "recovery_steps", "test_n"} - set(merge.columns)
    if missing:
        raise ValueError(f"conclusion needs the merge.csv columns {sorted(missing)}; pass merge_csv(profile)")
    lines = _teacher_lines(merge[merge.model == "teacher"]) if (merge.model == "teacher").any() else []
    lines += _minilm_lines(merge[merge.model == "minilm"])
    return "\n".join(f"- {x}" for x in lines) or "- The merge table has no comparable rows."


__all__ = ["similarity_frames", "similarity_matrix", "similarity_summary", "similarity_figure",
           "teacher_window_search", "candidates", "spec_texts", "teacher_merge_table", "before_after", "quality_plot",
           "minilm_merge_table", "minilm_chosen", "merge_csv", "save_csv", "recovery_config", "config_for", "teacher_hash",
           "minilm_hash", "minilm_contrast", "conclusion", "search_view", "WORDS", "similarity_conclusion", "COLUMNS", "combined_recovery_config",
           "recovery_dir", "CONTROL", "fine_tuned_control", "control_gaps", "missing_controls", "check_controls"]
