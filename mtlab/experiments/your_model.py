"""Notebook 07: the whole path on YOUR model and data, each step one call.

`load` turns the notebook's parameters (a model folder, a data file, the task kind) into
(model, task, work folder) through the recipe's checked loader (`mtlab.recipe.load_model_and_data`);
without a model it builds a tiny demo GPT-2 on the data (or on sentences of the shipped corpus), once,
in the cache.
The work folder (module checkpoints, recovery runs) is keyed by the model's weights, the data file
and the profile's `your_model` section, so a rerun resumes and another model never reuses it.
Every later step takes (model, task) and the profile: similarity, module training with
granularities that fit the depth, the size-first ladder, one FF merge with recovery, the screened
assembly space, both explorers, and export with a plain-transformers reload check.
"""
from __future__ import annotations

import contextlib
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from ..cache import artifact_dir, config_hash, file_hash
from ..checkpoint import atomic_dir
from ..profiles import get_profile
from ..surgery import stack_depths

__all__ = ["tiny_causal_lm", "demo_inputs", "load", "summary", "quiet_transformers", "fit_granularities", "count_unit",
           "CONTROL",
           "replacing_config", "similarity", "ladder_table", "merge_and_recover", "MergeResult", "screen_space", "assembly_explorer_for",
           "merge_explorer_for", "reload_plain", "export_and_reload", "conclusion"]

VERSION = 1
CONTROL = "original + same fine-tune (control)"  # the row that separates what the merge did from the fine-tune
DEMO_LINES = 1000   # sentences of the shipped corpus the demo model reads
SEED = 0


@contextlib.contextmanager
def quiet_transformers():
    """transformers' info/warning messages and its load/save progress bars off (restored after): the
    notebook's output shows mtlab's tables, not 'Loading weights' bars."""
    from transformers.utils import logging

    level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


def _train_config(steps: int, batch_size: int, lr: float):
    from ..train import TrainConfig

    return TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup=max(1, steps // 10), seed=SEED,
                       log_every=max(1, min(50, steps)), ckpt_every=max(1, min(500, steps)))


# ---------------------------------------------------------------------------
# the inputs: your model and data, or the demo

def tiny_causal_lm(out: str | Path, text: str | Path, *, steps: int = 200, layers: int = 4, width: int = 64,
                   positions: int = 64, block_size: int = 32, lr: float = 3e-3, progress: bool = False) -> Path:
    """A tiny GPT-2 built from a config (word-level tokenizer of `text`, `layers` blocks), trained
    `steps` steps on `text` and saved with save_pretrained beside its tokenizer: a model folder
    without a download, for examples and demos."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from ..tasks.causal_lm import CausalLMTask, word_tokenizer
    from ..train import TrainConfig, train

    lines = [line for line in Path(text).read_text(encoding="utf-8").splitlines() if line.strip()]
    tok = word_tokenizer(lines)
    torch.manual_seed(SEED)
    config = GPT2Config(n_embd=width, n_layer=layers, n_head=4, n_inner=2 * width, vocab_size=len(tok),
                        n_positions=positions, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id)
    model = GPT2LMHeadModel(config)
    task = CausalLMTask(lines, tok, block_size=block_size)
    with tempfile.TemporaryDirectory() as work, quiet_transformers():
        train(model, task, TrainConfig(steps=steps, batch_size=16, lr=lr, warmup=min(20, steps), log_every=50),
              work, progress=progress)
    with quiet_transformers():
        model.eval().save_pretrained(out)
        tok.save_pretrained(out)
    return Path(out)


def demo_inputs(profile=None, text: str | Path | None = None, *, progress: bool = False) -> tuple[Path, Path]:
    """(model folder, text file) of the demo: a 4-layer GPT-2 trained `demo_steps` on `text` (None: the
    first DEMO_LINES sentences of the shipped corpus), with a word-level tokenizer of it; built once in
    the cache."""
    from ..tasks.sentences import CORPUS, read_corpus

    steps = get_profile(profile).your_model.demo_steps
    source = {"corpus": file_hash(CORPUS), "lines": DEMO_LINES} if text is None else {"text": file_hash(text)}
    d = artifact_dir("your_model_demo", {"version": VERSION, **source, "steps": steps})
    folder = d / "model"
    if text is None:
        text = d / "sentences.txt"
        if not text.exists():
            tmp = text.with_name(text.name + ".tmp")
            tmp.write_text("\n".join(read_corpus()[:DEMO_LINES]) + "\n", encoding="utf-8")
            tmp.replace(text)
    if not (folder / "config.json").exists():
        with atomic_dir(folder) as tmp:
            tiny_causal_lm(tmp, text, steps=steps, progress=progress)
    return folder, Path(text)


def _model_key(name: str) -> str:
    """The weights of a model folder by content hash (a hub name or 'bundled' as given)."""
    from ..cache import teacher_hash

    if name == "bundled":
        return teacher_hash()
    files = sorted(Path(name).glob("*.safetensors")) + sorted(Path(name).glob("*.bin"))
    return config_hash([file_hash(f) for f in files]) if files else name


def load(model: str | Path | None = None, data: str | Path | None = None, kind: str = "text", profile=None, *,
         progress: bool = False, **task_options):
    """(model, task, work folder) from the notebook's parameters: `model` a save_pretrained folder (None:
    the demo GPT-2 for kind 'text', trained on `data` or on the demo's text; the bundled teacher for
    'g2p'), `data` the pairs or text file, `kind` 'text' | 'pairs' | 'g2p'; `task_options` (None values
    left out) are a recipe's task keys, e.g. max_target_len=64 for pairs (default: 256, cut to the
    model's position table)."""
    task_options = {k: v for k, v in task_options.items() if v is not None}
    from ..recipe import load_model_and_data

    if model is None and kind == "text":
        model, data = demo_inputs(profile, data, progress=progress)
    elif model is None and kind == "pairs":
        raise ValueError("MODEL = None builds the demo GPT-2, which reads text: set TASK = 'text', or give MODEL, "
                         "the folder of an encoder-decoder model (e.g. T5) for your pairs file")
    elif data is None and kind != "g2p":
        raise ValueError(f"TASK = {kind!r} needs DATA, your data file: a text file (one paragraph per line) for "
                         "'text', a TSV/CSV/JSONL of (source, target) pairs for 'pairs'")
    with quiet_transformers():
        net, task = load_model_and_data(model, kind, data, **task_options)
    prof = get_profile(profile)
    work = artifact_dir("your_model", {"version": VERSION, "model": _model_key(str(model or "bundled")),
                                       "kind": kind, "data": file_hash(data) if data is not None else None,
                                       "profile": asdict(prof.your_model),
                                       **({"task": task_options} if task_options else {})})
    return net, task, work


def summary(model: nn.Module, task, profile=None) -> pd.DataFrame:
    """One row: the model's class, parameters and stack depths (`layers`, or `encoder_layers` and
    `decoder_layers`), the task, its examples per split and the model's dev scores (`eval_limit`
    examples; counted in the task's unit, `count_unit`)."""
    from ..measure import count_params

    splits = getattr(task, "splits", None)
    sizes = task.sizes() if hasattr(task, "sizes") else {s: len(v[0]) for s, v in (splits or {}).items()}
    return pd.DataFrame([{"model": type(model).__name__, "params": count_params(model),
                          **{_depth_column(s): n for s, n in stack_depths(model).items()}, "task": task.name,
                          **{f"{s}_examples": n for s, n in sizes.items()},
                          **_dev(model, task, get_profile(profile).your_model.eval_limit)}])


def _depth_column(stack: str) -> str:
    """'layers' for a single stack named layers (not 'layers_layers'), else '<stack>_layers'."""
    return "layers" if stack == "layers" else f"{stack}_layers"


# ---------------------------------------------------------------------------
# similarity, modules, ladder

def fit_granularities(wanted, depths: dict[str, int]) -> tuple[int, ...]:
    """The module sizes of `wanted` that every stack can hold, plus the shallowest stack's whole depth
    (a module for all of it): (2, 3, 6) stays (2, 3, 6) on 6 layers and becomes (2, 3, 4) on 4."""
    n = min(depths.values())
    if n < 2:
        raise ValueError(f"a stack of {n} layer(s) ({depths}) has no span of 2 layers for a module to replace; "
                         "compress this model by FF merging only")
    return tuple(sorted({k for k in wanted if 2 <= k <= n} | {n}))


def replacing_config(model: nn.Module, profile=None):
    """The profile's module-replacing config, its granularities fitted to the model's stacks."""
    from ..modular import ReplacingConfig

    p = get_profile(profile).your_model
    return ReplacingConfig(granularities=fit_granularities(p.granularities, stack_depths(model)),
                           train=_train_config(p.steps, p.batch_size, p.lr))


def _align(task):
    return lambda: task.iter_batches("train", 16, shuffle=True, seed=SEED)


def similarity(model: nn.Module, task, profile=None, *, progress: bool = False, exclude="special") -> pd.DataFrame:
    """Layer x layer linear CKA of the FF outputs on `cka_tokens` train tokens (`mtlab.similarity.cka_matrix`),
    the tokenizer's special tokens left out ([CLS]/[SEP] dominate a BERT-style model's map otherwise):
    `exclude="special"` uses the task's tokenizer (or the G2P teacher's specials), None keeps every token;
    the choice is in `df.attrs["config"]["tokens_left_out"]`."""
    from ..similarity import SPECIAL, cka_matrix

    if isinstance(exclude, str) and exclude == SPECIAL:
        exclude = _task_special_ids(task, model)
    return cka_matrix(model, _align(task), "ff_out", max_tokens=get_profile(profile).your_model.cka_tokens,
                      progress=progress, exclude=exclude)


def _task_special_ids(task, model):
    """The special token ids of the task's tokenizer (a HF tokenizer's all_special_ids, the G2P tokenizer's
    SPECIALS), else "special" (cka_matrix finds them beside the model)."""
    tok = getattr(task, "tokenizer", None)
    if hasattr(tok, "all_special_ids"):
        return tok
    if tok is not None and hasattr(tok, "vocab") and hasattr(tok, "ids"):
        from ..tasks.g2p import SPECIALS

        return [tok.ids[t] for t in SPECIALS if t in tok.ids]
    return "special"


def count_unit(task) -> str:
    """What a task's scores are counted in: 'tokens' for text (perplexity is per token; a block is no
    word), 'words' for G2P (one word per example), 'sentences' for pairs."""
    from ..tasks.causal_lm import CausalLMTask
    from ..tasks.g2p import G2PTask

    if isinstance(task, CausalLMTask):
        return "tokens"
    if isinstance(task, G2PTask):
        return "words"
    return "sentences"


def _dev(model, task, limit) -> dict:
    """dev scores, counted in the task's unit: `dev_tokens` (text), `dev_words` (G2P), `dev_sentences` (pairs)."""
    r = task.evaluate(model, "dev", limit=limit, progress=False)
    unit = count_unit(task)
    out = {f"dev_{k}": v for k, v in r.items()
           if k not in ("split", "seconds", "n", "tokens") and isinstance(v, (int, float)) and not isinstance(v, bool)}
    out[f"dev_{unit}"] = int(r["tokens"] if unit == "tokens" else r["n"])
    return out


def ladder_table(model: nn.Module, bank, task, profile=None, strategy: str = "size_first") -> pd.DataFrame:
    """The original model and each rung of a strategy's ladder: parameters, `params_ratio` (the whole
    model's parameters, original / assembled: embeddings and head included), `stack_ratio` (the
    transformer stacks' parameters only), FLOP-ideal speed-up (`plan_table`) and dev scores of the
    assembled model."""
    from ..modular import assemble, block_params, ladders, plan_table

    plans = [p for _, p in ladders(stack_depths(model), bank.granularities, block_params(model), names=[strategy])]
    with quiet_transformers():  # a FLOP-counting forward with labels: GPT-2 configs warn about loss_type
        df = plan_table(model, bank, plans, task)
    limit = get_profile(profile).your_model.eval_limit
    scores = pd.DataFrame([_dev(assemble(model, bank, p), task, limit) for p in plans])
    df = df.drop(columns="blocks").rename(columns={"ratio": "stack_ratio", "ratio_model": "params_ratio"})
    df = df[["plan", "params", "params_ratio", "stack_ratio", *[c for c in df.columns
                                                              if c not in ("plan", "params", "params_ratio", "stack_ratio")]]]
    df = pd.concat([df, scores], axis=1).assign(strategy=["original"] + [strategy] * (len(plans) - 1))
    df.attrs["config"] = {"strategy": strategy, "eval_limit": limit, "granularities": dict(bank.granularities)}
    return df


# ---------------------------------------------------------------------------
# FF merge + recovery

@dataclass
class MergeResult:
    """One FF merge of the model: the window search it was chosen from, the merged model after recovery,
    and the dev scores of the original, the merged model as built, after recovery, and of the CONTROL:
    the original fine-tuned with the same recovery config (steps, data, batch, lr, seed), so that the
    recovered model's gain or loss against the original splits into what the merge did and what the
    fine-tune did."""
    spec: str
    search: pd.DataFrame
    table: pd.DataFrame
    model: nn.Module
    log: pd.DataFrame


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def merge_and_recover(model: nn.Module, task, work: str | Path, profile=None, *, progress: bool = False) -> MergeResult:
    """Search the profile's window sizes (those that fit) with permute merges and layer pruning on dev,
    merge the best window, and fine-tune it `recovery_steps` (resumable under work/recover/); the
    original is fine-tuned the same way as a control (`CONTROL` row, work/recover/control_original)."""
    import copy

    from ..candidate import apply
    from ..merging.correlations import CorrelationCache
    from ..measure import count_params
    from ..merging.recover import recover
    from ..merging.windows import window_search

    p = get_profile(profile).your_model
    depth = min(stack_depths(model).values())
    sizes = tuple(k for k in p.window_sizes if 2 <= k <= depth)
    if not sizes:
        raise ValueError(f"no FF-merge window of sizes {p.window_sizes} fits a {depth}-layer stack; "
                         "use window sizes from 2 to the depth")
    cache = CorrelationCache(model, _align(task), max_tokens=p.align_tokens)
    search = window_search(model, task, sizes=sizes, methods=["permute"], select_limit=p.eval_limit,
                           align_tokens=p.align_tokens, cache=cache, seed=SEED, progress=progress)
    metric = search.attrs["config"]["metric"]
    merges = search[search.kind == "merge"]
    spec = merges.sort_values(metric, ascending=not task.higher_is_better).spec.iloc[0]
    merged = apply(model, spec, cache=cache).requires_grad_(True)
    rows = [{"model": "original", "spec": "", "recovery_steps": 0, "params": count_params(model),
             **_dev(model, task, p.eval_limit)},
            {"model": "merged", "spec": spec, "recovery_steps": 0, "params": count_params(merged),
             **_dev(merged, task, p.eval_limit)}]
    cfg = _train_config(p.recovery_steps, p.batch_size, p.recovery_lr)
    with quiet_transformers():
        merged, log = recover(merged.train(), task, cfg, Path(work) / "recover" / _slug(spec), progress=progress,
                              save=False)
    rows.append({**rows[1], "recovery_steps": p.recovery_steps, **_dev(merged, task, p.eval_limit)})
    if p.recovery_steps:
        with quiet_transformers():
            control, _ = recover(copy.deepcopy(model).train().requires_grad_(True), task, cfg,
                                 Path(work) / "recover" / "control_original", progress=progress, save=False)
        rows.append({**rows[0], "model": CONTROL, "recovery_steps": p.recovery_steps,
                     **_dev(control.eval(), task, p.eval_limit)})
        del control
    table = pd.DataFrame(rows)
    table.attrs["config"] = {"spec": spec, "chosen_by": f"dev {metric}", "control": CONTROL if p.recovery_steps else None,
                             "recovery": {"steps": cfg.steps, "batch_size": cfg.batch_size, "lr": cfg.lr,
                                          "seed": cfg.seed, "split": cfg.split}, **asdict(p)}
    return MergeResult(spec, search, table, merged.eval(), log)


# ---------------------------------------------------------------------------
# screening, explorers

def screen_space(model: nn.Module, bank, task, profile=None, *, progress: bool = False) -> pd.DataFrame:
    """The assembly space on dev, teacher-forced: every plan (`mtlab.explore.screen`), or with a
    `search_budget`, the plans `frontier_search` screens within that many block evaluations. Flags on_frontier (NLL against ideal speed-up) and on_frontier_params.
    `ratio` is the stacks' compression, `params_ratio` the whole model's; counts and accuracies in the
    task's unit (`count_unit`: no word accuracy for text)."""
    from ..explore import screen
    from ..explore.frontier import pareto_mask
    from ..measure import count_params
    from ..explore.search import frontier_search

    p = get_profile(profile).your_model
    kw = dict(split="dev", limit=p.screen_limit, batch_size=p.batch_size, progress=progress)
    if p.search_budget:
        df = frontier_search(model, bank, task, budget=p.search_budget, **kw)
    else:
        df = screen(model, bank, task, **kw)
        df["on_frontier"] = pareto_mask(df, "ideal_speedup", "nll")
        df["on_frontier_params"] = pareto_mask(df, "params", "nll", x_higher=False)
    if "ratio_model" in df.columns:  # the whole model's ratio, named as in the ladder
        df = df.rename(columns={"ratio_model": "params_ratio"})
    else:
        df["params_ratio"] = count_params(model) / df["params"]
    df = _in_task_units(df, task)
    return df.sort_values("ideal_speedup").reset_index(drop=True)


def _in_task_units(screened: pd.DataFrame, task) -> pd.DataFrame:
    """The screen counts examples as `words` and scores whole examples right as `tf_word_acc`: true for
    G2P only. Text: no word accuracy (an example is a block of tokens), counted in tokens; pairs: sentences."""
    unit = count_unit(task)
    if unit == "tokens":
        return screened.drop(columns=[c for c in ("words", "tf_word_acc") if c in screened.columns])
    if unit == "sentences":
        return screened.rename(columns={"words": "sentences", "tf_word_acc": "tf_sentence_acc"})
    return screened


def assembly_explorer_for(model: nn.Module, bank, screened: pd.DataFrame, task=None):
    """The assembly explorer (`mtlab.widgets.AssemblyExplorer`) over a screened table of this model's bank;
    its Export button assembles the pick (with `task`'s tokenizer when given); in a kernel it first shows
    `live_note` (live in JupyterLab; blank on a rendered page)."""
    from ..modular import assemble, block_params
    from ..widgets import AssemblyExplorer
    from .explore import live_note

    live_note("assembly explorer")
    return AssemblyExplorer(screened, stack_depths(model), bank.granularities, block_params(model),
                            build=lambda plan: assemble(model, bank, plan), task=task)


def _per_stack(matrix: pd.DataFrame, stacks) -> dict[str, pd.DataFrame]:
    out = {}
    for s in stacks:
        idx = [r for r in matrix.index if r.rsplit(".", 1)[0] == s]
        out[s] = matrix.loc[idx, idx].rename(index=lambda r: r.rsplit(".", 1)[1],
                                             columns=lambda r: r.rsplit(".", 1)[1])
    return out


def merge_explorer_for(model: nn.Module, task, cka: pd.DataFrame, profile=None, *, background: bool = True):
    """The merge-set explorer (`mtlab.widgets.MergeExplorer`) on this model: the CKA heatmap per stack
    (`similarity`), merges built on demand with correlations computed once per layer pair, scored on
    `eval_limit` dev examples by the task's primary metric, layer pruning at the closest size; in a kernel
    it first shows `live_note` (live in JupyterLab; blank on a rendered page)."""
    from ..merging.correlations import CorrelationCache
    from ..measure import count_params
    from ..ui.spec_sizes import SpecSizes
    from ..widgets import MergeExplorer
    from ..candidate import CompressionSpec, apply

    p = get_profile(profile).your_model
    cache = CorrelationCache(model, _align(task), max_tokens=p.align_tokens)
    metric = task.primary_metric

    def evaluate(specs: list[str]) -> dict:
        net = apply(model, CompressionSpec(None, tuple(specs)), cache=cache) if specs else model
        r = task.evaluate(net, "dev", limit=p.eval_limit, progress=False)
        unit = count_unit(task)
        return {"params": count_params(net), f"dev_{metric}": r[metric],
                "n": r["tokens"] if unit == "tokens" else r["n"], "n_unit": unit}

    depths = stack_depths(model)
    left_out = cka.attrs.get("config", {}).get("tokens_left_out", "none")
    label = "CKA of FF outputs (train tokens" + (", special tokens left out)" if left_out == "special tokens" else ")")
    from .explore import live_note

    live_note("merge-set explorer")
    return MergeExplorer(_per_stack(cka, depths), depths, evaluate, params=SpecSizes(model), background=background,
                         similarity_label=label, task=task,
                         build=lambda specs: apply(model, CompressionSpec(None, tuple(specs)), cache=cache))


# ---------------------------------------------------------------------------
# export

def reload_plain(directory: str | Path) -> nn.Module:
    """An exported folder loaded by plain transformers, with the Auto class its export record names."""
    import json

    import transformers

    from ..export import EXPORT_RECORD

    record = Path(directory) / EXPORT_RECORD
    if not record.is_file():
        raise FileNotFoundError(f"{directory} has no {EXPORT_RECORD}: write it with mtlab.export.export first")
    auto = json.loads(record.read_text())["reload_with"].split(".")[1]
    return getattr(transformers, auto).from_pretrained(str(directory)).eval()


def export_and_reload(models: dict[str, nn.Module], task, root: str | Path, profile=None) -> pd.DataFrame:
    """Export each model (`mtlab.export.export`) to root/NAME, reload it with plain transformers and
    score both on dev: one row per model with its folder (relative to root), the Auto class, its unique
    parameters (`params_unique`: tied weights once, the saving a merge makes) and the parameters as stored
    (`params_stored`: a plain architecture has no tied FF sublayers, so the export writes each tied weight
    as a copy and the folder holds the original's count), the two scores and the largest logit
    difference on one dev batch."""
    from ..export import export
    from ..measure import count_params

    limit = get_profile(profile).your_model.eval_limit
    metric = f"dev_{task.primary_metric}"
    batch = task.collate("dev", task.batches("dev", 8)[0]).model_inputs()
    rows = []
    for name, net in models.items():
        with quiet_transformers():
            path = export(net, Path(root) / _slug(name), task=task)
            plain = reload_plain(path)
        with torch.no_grad():
            diff = float((net.eval()(**batch).logits - plain(**batch).logits).abs().max())
        unique, stored = count_params(net), count_params(plain)
        rows.append({"model": name, "folder": path.name, "reload_with": type(plain).__name__,
                     "params_unique": unique, "params_stored": stored,
                     "stored_as": "tied weights written as copies" if stored > unique else "as built",
                     metric: _dev(net, task, limit)[metric],
                     f"{metric}_reloaded": _dev(plain, task, limit)[metric], "max_logit_diff": diff})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------
# the written result

def conclusion(ladder: pd.DataFrame, merge: MergeResult, screened: pd.DataFrame, exported: pd.DataFrame,
               task) -> str:
    """What the notebook found (markdown bullets), computed from its tables: the ladder's rungs against
    the original (the whole model's parameter ratio first, the stacks' ratio labelled as such), the merge
    before and after recovery next to the control (the original fine-tuned the same way), the screened
    frontier, the reload check. Counts are in the task's unit (`count_unit`)."""
    m = f"dev_{task.primary_metric}"
    name = f"dev {task.primary_metric.upper()}"
    sign = "higher" if task.higher_is_better else "lower"
    o = ladder.iloc[0]
    unit = next((u for u in ("tokens", "words", "sentences") if f"dev_{u}" in ladder.columns), None)
    on = f" on {int(o[f'dev_{unit}']):,} dev {unit}" if unit and pd.notna(o[f"dev_{unit}"]) else ""
    lines = [f"The original model ({o.params / 1e6:.2f} M parameters) has {name} {o[m]:.3g}{on} ({sign} is better)."]
    rungs = "; ".join(f"**{r.plan}** {r.params_ratio:.2f}x fewer parameters overall ({r.stack_ratio:.2f}x smaller "
                      f"stacks), {r.ideal_speedup:.2f}x FLOP-ideal speed-up, {r[m]:.3g} ({r[m] - o[m]:+.3g})"
                      for _, r in ladder.iloc[1:].iterrows())
    lines.append(f"Size-first ladder: {rungs}." if rungs else "The size-first ladder has no rung below the original.")
    t = merge.table
    first = t.iloc[0]
    built = t[(t.model != CONTROL) & (t.recovery_steps == 0)].iloc[-1]
    done = t[t.model != CONTROL].iloc[-1]
    text = (f"Merging **{merge.spec}** removes {100 * (1 - built.params / first.params):.1f}% of the parameters: "
            f"{name} {built[m]:.3g} as built, {done[m]:.3g} after {int(done.recovery_steps)} recovery steps "
            f"(original {first[m]:.3g}")
    control = t[t.model == CONTROL]
    if len(control):
        c = control.iloc[-1]
        text += (f"; the original fine-tuned the same {int(c.recovery_steps)} steps on the same data, the control, "
                 f"{c[m]:.3g}). Against the control the merge costs {done[m] - c[m]:+.3g}; the fine-tune alone moves "
                 f"the original by {c[m] - first[m]:+.3g}.")
    else:
        text += "; no recovery, so no fine-tuned control)."
    lines.append(text)
    front = screened[screened.on_frontier.astype(bool)]
    shown = ", ".join(front.plan[:8]) + (f" and {len(front) - 8} more" if len(front) > 8 else "")
    lines.append(f"{len(screened)} assemblies screened (teacher-forced NLL); {len(front)} on the speed/NLL frontier: "
                 f"{shown}.")
    copies = exported[exported.params_stored > exported.params_unique] if "params_stored" in exported else exported[:0]
    for r in copies.itertuples():
        lines.append(f"{r.model} is exported as plain {r.reload_with}, which has no shared FF sublayers: the tied "
                     f"weights are written as copies, so the folder holds {r.params_stored / 1e6:.2f} M parameters; "
                     f"the model has {r.params_unique / 1e6:.2f} M unique parameters "
                     f"({100 * (1 - r.params_unique / r.params_stored):.1f}% fewer), the saving of a runtime that "
                     "shares them (mtlab.merging.load_merged).")
    same = (exported[m] - exported[f"{m}_reloaded"]).abs() <= 1e-6 * exported[m].abs().clip(lower=1)
    lines.append(f"{len(exported)} models exported; plain transformers reloads them "
                 f"({', '.join(sorted(set(exported.reload_with)))}) with "
                 + ("the same dev scores" if same.all() else f"DIFFERENT dev scores for {list(exported.model[~same])}")
                 + f" (largest logit difference {exported.max_logit_diff.max():.1e}).")
    return "\n".join(f"- {x}" for x in lines)
