"""The exploration study on the bundled teacher: screen every assembly, decode and time a
frontier of candidates from every method, in one run.

1. `screen_table`: the whole assembly space of the profile's module bank (196 plans for 6+6
   with {2, 3, 6}), teacher-forced on `screen_limit` dev words, prefix-shared.
2. `frontier_table`: candidates decoded greedily (dev and test, `eval_limit` words each) and
   timed (batch 1 and 64 generation, one run, ratios to the teacher):
   - modules: both ladders, plus `picks` plans spread along the screened frontier;
   - combined: size-first assemblies with one permute merge of the top (up to) 3 blocks' FF
     sublayers per stack, recovered with the FF-merging budget;
   - merge / layer_prune: the FF-merging study's combined candidates (chosen on dev), recovered;
   - layer_drop / sft / layerdrop: the Modular Transformers baselines (their cached runs).
   `on_frontier` marks test WER vs measured batch-64 speed-up, `on_frontier_params` test WER vs
   parameters.
Everything is cached under keys that hold the teacher's hash and the profile.
"""
from __future__ import annotations

from dataclasses import asdict, replace

import numpy as np
import pandas as pd
import torch

from ..cache import artifact_dir, cached_frame, teacher_hash
from ..candidate import Budget, Candidate, CompressionSpec, apply
from ..explore.frontier import mark_frontiers, pareto_mask, spearman
from ..explore.screen import block_evals_per_plan, max_abs_diff, screen, screen_per_plan
from ..explore.space import AssemblySpace, space_sizes
from ..merging.merge import MergeSpec
from ..modular import Plan, assemble
from ..modular.bank import block_params, teacher_ladders
from ..surgery import stack_depths
from ..modular.plan import size_first
from ..profiles import get_profile
from ..shipped import shipped_state
from ..teacher import load_teacher
from .modular import bank_key, screen_table, teacher_task_bank  # noqa: F401 (the screen lives beside the bank it reads)
from .modular import (QUALITY, evaluate_candidates, modular_table, replacing_config, shipped_key, trained_bank,
                      trained_baselines)

VERSION = 4   # 2: speed-ups are medians of per-round ratios (measure.latency rounds); 3: every row decoded on the same words; 4: speed spread, speed_noisy
COLUMNS = ["kind", "strategy", "plan", "params", "ratio", "ratio_model", "ideal_speedup", "speedup_b1", "speedup_b64",
           "dev_per", "dev_wer", "test_per", "test_wer", "screen_nll", "screen_token_acc", "screen_tf_word_acc",
           "on_frontier", "on_frontier_params", "train_runs", "train_seconds"]
COMBINED_TARGETS = (1.5, 2.0, 3.0, 1.25)   # size-first rungs that get FF merges, in this order
COMBINED_WINDOW = 3                        # blocks per stack whose FF sublayers are merged (top of the stack)


def picks(screen_df: pd.DataFrame, n: int, exclude=()) -> list[str]:
    """`n` plans spread along the screened frontier (ideal speed-up vs token NLL), skipping `exclude`."""
    on = screen_df[pareto_mask(screen_df, "ideal_speedup", "nll")]
    on = on[~on.plan.isin(set(exclude))].sort_values("ideal_speedup")
    if n <= 0 or not len(on):
        return []
    idx = np.unique(np.linspace(0, len(on) - 1, min(n, len(on))).round().astype(int))
    return list(on.plan.iloc[idx])


def _align(task):
    from .merging import align_batches

    return align_batches(task)


def _recovered(build_net, task, rcfg, d, progress: bool):
    """`build_net()` (a merged model) recovered with the FF-merging budget `rcfg` in the cache
    directory `d`; a rerun (or a candidate notebook 04 already recovered) loads it instead."""
    from ..merging.merge import load_merged
    from ..merging.recover import recover

    if (d / "model").exists():
        return load_merged(d / "model")
    net = build_net()
    for p in net.parameters():
        p.requires_grad_(True)
    recover(net.train(), task, rcfg, d, progress=progress)
    for p in net.parameters():
        p.requires_grad_(False)
    return net.eval()


def merge_rows(prof, teacher, task, progress: bool = True) -> list[Candidate]:
    """The FF-merging study's combined candidates (same search, chosen on dev), recovered: the
    shipped models of `make merges` where the profile reads them (`merging.shipped`), otherwise
    recovered with the windows' budget in the cache."""
    from ..merging.correlations import CorrelationCache
    from .merging import candidates, recovery_config, recovery_dir, spec_texts, teacher_window_search

    rcfg = recovery_config(prof.merging)
    search = teacher_window_search(prof, progress=progress)
    cache = CorrelationCache(teacher, _align(task), max_tokens=prof.merging.align_tokens)
    out = []
    for c in candidates(search):
        if c.info["kind"] != "combined":
            continue
        kind = "layer_prune" if c.method == "layer_prune" else "merge"
        shipped = _shipped_merge(c, prof.merging)
        if shipped is not None:
            out.append(replace(shipped, method=kind, strategy=f"{c.method} ({c.info['compare']})",
                               info={"kind": kind}))
            continue
        net = _recovered(lambda c=c: apply(teacher, c.spec, cache=cache), task, rcfg,
                         recovery_dir(spec_texts(c), rcfg), progress)
        out.append(Candidate(kind, c.spec, net, f"{c.method} ({c.info['compare']})", Budget(1, rcfg.steps, None),
                             provenance="cache", info={"kind": kind}))
    return out


def _shipped_merge(c: Candidate, m) -> Candidate | None:
    """The shipped recovered model of combined candidate `c` (None where the profile does not read
    shipped candidates or `make merges` has not shipped it yet; one from another recipe raises)."""
    if not m.shipped:
        return None
    from .merge_artifacts import MERGE_DIR, load_merge, merge_name

    if not (MERGE_DIR / merge_name(c) / "card.json").exists():
        return None
    return load_merge(c, m)


def combined_specs(plan: Plan, window: int = COMBINED_WINDOW) -> list[MergeSpec]:
    """One permute merge per stack over its top `window` blocks (fewer in a shallower stack)."""
    out = []
    for s in plan.stacks:
        d = plan.depth(s)
        w = min(window, d)
        if w >= 2:
            out.append(MergeSpec(s, tuple(range(d - w, d)), "middle", "permute"))
    return out


def combined_rows(prof, teacher, task, bank, progress: bool = True) -> list[Candidate]:
    """Assemblies of the size-first ladder with FF merges inside, recovered."""
    from .merging import recovery_config

    rcfg = recovery_config(prof.merging)
    ladder = size_first(stack_depths(teacher), bank.granularities, block_params(teacher), COMBINED_TARGETS)
    out = []
    for plan in ladder[: prof.explore.combined]:
        merges = combined_specs(plan)
        if not merges:
            continue
        spec = CompressionSpec(plan, tuple(merges))
        d = artifact_dir("recovered", {"bank": bank_key(prof), "plan": str(plan), "specs": list(map(str, merges)),
                                       "recovery": asdict(rcfg)})
        net = _recovered(lambda spec=spec: apply(teacher, spec, bank=bank, batches_fn=_align(task),
                                                 max_tokens=prof.merging.align_tokens), task, rcfg, d, progress)
        out.append(Candidate("combined", spec, net, "size_first + permute", Budget(1, rcfg.steps, None), provenance="cache",
                             info={"kind": "combined"}))
    return out


def frontier_table(profile=None, *, progress: bool = True) -> pd.DataFrame:
    """Every candidate decoded and timed in one run, frontiers marked (columns `COLUMNS` + more)."""
    prof = get_profile(profile)
    explore = {k: v for k, v in asdict(prof.explore).items() if k != "bench_limit"}  # the benchmark's own knob
    key = {"version": VERSION, "bank": bank_key(prof), "modular": asdict(prof.modular),
           "merging": asdict(prof.merging), "explore": explore, **shipped_key(prof.modular)}
    if prof.merging.shipped:
        from .merge_artifacts import MERGE_DIR

        key["shipped_merges"] = shipped_state(MERGE_DIR)  # a candidate shipped by `make merges` makes a new frontier
    return cached_frame("frontier", key, lambda: _frontier(prof, progress))


def _frontier(prof, progress: bool) -> pd.DataFrame:
    torch.manual_seed(0)
    teacher, task, bank = teacher_task_bank(prof, progress=progress)
    scr = screen_table(prof, teacher, task, bank, progress=progress).set_index("plan")
    cands, seen = [], set()
    for strategy, plan in teacher_ladders(teacher, bank):
        if str(plan) in seen:
            continue
        seen.add(str(plan))
        kind = "teacher" if strategy == "teacher" else "modules"
        cands.append(Candidate(kind, plan, assemble(teacher, bank, plan), strategy, info={"kind": kind}))
    for p in picks(scr.reset_index(), prof.explore.picks, exclude=seen):
        plan = Plan.parse(p, stack_depths(teacher))
        cands.append(Candidate("modules", plan, assemble(teacher, bank, plan), "screened", info={"kind": "modules"}))
    cands += combined_rows(prof, teacher, task, bank, progress)
    cands += merge_rows(prof, teacher, task, progress)
    for b in trained_baselines(prof, teacher, task, progress):
        if b.model is not None:  # a baseline not shipped yet has no model to place
            cands.append(replace(b, info={"kind": b.method}))
    e = prof.explore
    if e.eval_limit is not None:  # shipped scores (cards) are on the full splits: decode everyone on the same words
        for c in cands:
            c.scores = {}
    if prof.modular.eval_limit == e.eval_limit:  # same models, same words: reuse notebook 02's decoding
        known = modular_table(prof, progress=progress).drop_duplicates(["method", "plan"]).set_index(["method", "plan"])
        for c in cands:
            if (c.method, c.label) in known.index:
                c.scores = {**c.scores, **known.loc[(c.method, c.label), list(QUALITY)].to_dict()}
    df = evaluate_candidates(cands, teacher, task, replace(prof.modular, eval_limit=e.eval_limit), progress)
    for c in ("nll", "token_acc", "tf_word_acc"):
        df[f"screen_{c}"] = df.plan.map(scr[c])
    df = mark_frontiers(df)
    return df[COLUMNS + [c for c in df.columns if c not in COLUMNS]]


def rank_agreement(frontier: pd.DataFrame, screened: str = "screen_nll", decoded: str = "dev_wer") -> float:
    """Spearman correlation between screened quality and decoded WER over the module candidates
    (the teacher included): how well the cheap screen orders what decoding would."""
    m = frontier[frontier.kind.isin(["teacher", "modules"])]
    return spearman(m[screened], m[decoded])


def screening_bench(profile=None, *, repeats: int = 3, progress: bool = True) -> pd.DataFrame:
    """Per-plan vs prefix-shared screening of the whole assembly space in the same run
    (`bench_limit` dev words): block evaluations, seconds, largest difference. The two
    alternate `repeats` times (after a warm-up) and each keeps its median time, so a slow
    spell of a shared machine does not decide the ratio."""
    import statistics

    prof = get_profile(profile)
    teacher, task, bank = teacher_task_bank(prof, progress=progress)
    plans = list(AssemblySpace.of(teacher, bank))
    kw = dict(split="dev", limit=prof.explore.bench_limit, batch_size=prof.explore.screen_batch, progress=progress)
    screen(teacher, bank, task, plans[:2], **{**kw, "limit": prof.explore.screen_batch})   # warm-up
    runs = [(screen(teacher, bank, task, plans, **kw), screen_per_plan(teacher, bank, task, plans, **kw))
            for _ in range(repeats)]
    shared, plain = runs[-1]
    shared.attrs["seconds"] = statistics.median(a.attrs["seconds"] for a, _ in runs)
    plain.attrs["seconds"] = statistics.median(b.attrs["seconds"] for _, b in runs)
    sizes = space_sizes(teacher, bank, prof.merging.window_sizes)
    return pd.DataFrame([{
        "plans": len(plans), "words": prof.explore.bench_limit,
        "batches": plain.attrs["block_evals"] // block_evals_per_plan(plans),
        "block_evals_per_plan": plain.attrs["block_evals"], "block_evals_shared": shared.attrs["block_evals"],
        "block_eval_ratio": plain.attrs["block_evals"] / shared.attrs["block_evals"],
        "seconds_per_plan": plain.attrs["seconds"], "seconds_shared": shared.attrs["seconds"],
        "time_ratio": plain.attrs["seconds"] / shared.attrs["seconds"],
        "max_abs_diff": max(max_abs_diff(a, b) for a, b in runs), "repeats": repeats,
        "threads": torch.get_num_threads(), **sizes}])


LIVE_NOTE = ("*The {what} below is live: in JupyterLab, with this notebook's kernel running, it answers its controls "
             "(its Export button writes the pick as a Hugging Face folder). A rendered page (`make report`'s HTML) has "
             "no kernel, so it cannot draw it and the space stays blank; the static copy after it stands in there "
             "(in JupyterLab that copy hides itself while the live explorer is on the page).*")


def live_note(what: str) -> str | None:
    """Display (in a notebook kernel) the line saying that an explorer is live in JupyterLab and blank on a
    rendered page, where the static copy stands in; returns the text (None outside a kernel, where
    nothing is shown). The explorers' functions call it, so no notebook cell carries it."""
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    shell = get_ipython()
    if shell is None or not hasattr(shell, "kernel"):
        return None
    from IPython.display import Markdown, display

    text = LIVE_NOTE.format(what=what)
    display(Markdown(text))
    return text


EXPLORER_MODELS = ("bundled", "tiny-12+12")   # assembly_explorer(model=...), $MTLAB_EXPLORER
SEARCH_SHARE = 0.03   # the searched explorer's budget: this share of the exhaustive screen's block evaluations
SEARCH_WORDS = 256    # at most this many dev words screened by the searched explorer (one batch)


def tiny_12x12(task, seed: int = 0):
    """A 12+12 tiny T5 built from config (d_model 32, random weights) and an untrained bank
    {2,3,4,6,12} (85,849 plans): the explorer at T5-base depth, with no training."""
    from ..modular.bank import ModuleBank
    from ..teacher import TeacherConfig, build_teacher

    torch.manual_seed(seed)
    teacher = build_teacher(task.tokenizer, TeacherConfig(d_model=32, d_ff=64, num_heads=2, num_layers=12,
                                                          num_decoder_layers=12, dropout=0.0)).eval()
    return teacher, ModuleBank.build(teacher, (2, 3, 4, 6, 12)).eval()


def assembly_code(profile_name: str | None = None, *, tiny: bool = False):
    """The Python code an assembly explorer shows after an export: the same plan assembled and exported
    (`code(plan, folder) -> str`), from the bundled teacher and the profile's cached bank, or from the
    12+12 T5 built from config (`tiny`)."""
    def code(plan: str, folder: str) -> str:
        head = ("from mtlab.export import export\nfrom mtlab.modular import Plan, assemble\n"
                "from mtlab.teacher import load_teacher\n")
        if tiny:
            body = ("from mtlab.experiments.explore import tiny_12x12\n\nteacher, task = load_teacher()\n"
                    "model, bank = tiny_12x12(task)  # the 12+12 T5 built from config (seed 0), untrained modules\n")
            model = "model"
        else:
            body = ("from mtlab.experiments.modular import trained_bank\nfrom mtlab.profiles import get_profile\n\n"
                    "teacher, task = load_teacher()\n"
                    f"bank, _ = trained_bank(get_profile({profile_name!r}), teacher, task)  # cached by notebook 02\n")
            model = "teacher"
        return head + body + f"export(assemble({model}, bank, Plan.parse({plan!r})), {folder!r}, task=task)"

    return code


def merge_code(align_tokens: int):
    """The Python code a merge explorer shows after an export: the same merge built and exported."""
    def code(specs: list[str], folder: str) -> str:
        return ("from mtlab.candidate import CompressionSpec, apply\nfrom mtlab.experiments.merging import align_batches\n"
                "from mtlab.export import export\nfrom mtlab.teacher import load_teacher\n\n"
                "teacher, task = load_teacher()\n"
                f"model = apply(teacher, CompressionSpec(None, {tuple(specs)!r}), batches_fn=align_batches(task), "
                f"max_tokens={align_tokens})\n"
                f"export(model, {folder!r}, task=task)  # before recovery (notebook 04 recovers merges)")

    return code


def searched_explorer(teacher, bank, task, *, budget: int | None = None, sample: int = 200, limit: int = 64,
                      seed: int = 0, progress: bool = False, code=None):
    """The assembly explorer on a space too large to screen whole: the plans `frontier_search`
    screened within `budget` block evaluations (default SEARCH_SHARE of the exhaustive screen's),
    the teacher and `sample` plans drawn uniformly, all on the same `limit` dev words (one batch);
    a plan the controls reach outside them is screened on demand on those words. `.search` holds
    the search's table (attrs: block evaluations, beam). Its Export button assembles the plan from
    `teacher` and `bank` (`code(plan, folder)`: the code it shows)."""
    from ..explore.search import frontier_search
    from ..widgets import AssemblyExplorer

    space = AssemblySpace.of(teacher, bank)
    budget = int(SEARCH_SHARE * space.screen_block_evals()) if budget is None else budget
    kw = dict(split="dev", limit=limit, batch_size=limit)
    found = frontier_search(teacher, bank, task, budget=budget, progress=progress, **kw)
    have = set(found.plan)
    extra = [p for p in [Plan.teacher(space.depths), *space.sample(sample, seed)] if str(p) not in have]
    parts = [found.assign(source="searched")]
    if extra:
        parts.append(screen(teacher, bank, task, extra, progress=progress, **kw).assign(source="sample"))

    def score(plan: Plan) -> dict:
        return screen(teacher, bank, task, [plan], progress=False, **kw).iloc[0].to_dict()

    e = AssemblyExplorer(pd.concat(parts, ignore_index=True), stack_depths(teacher), bank.granularities,
                         block_params(teacher), score=score, build=lambda plan: assemble(teacher, bank, plan), task=task,
                         code=code)
    e.search = found
    return e


def assembly_explorer(profile=None, *, with_frontier: bool = True, progress: bool = False, model: str | None = None):
    """The assembly explorer over the profile's screened space (and its decoded frontier). `model`
    (None: $MTLAB_EXPLORER, else "bundled"): "tiny-12+12" explores `tiny_12x12` through
    `searched_explorer` instead (on the profile's screen words, at most SEARCH_WORDS). In a notebook it
    first shows `live_note` (live in JupyterLab; blank on a rendered page, where the static copy stands in)."""
    import os

    from ..widgets import AssemblyExplorer

    prof = get_profile(profile)
    model = model or os.environ.get("MTLAB_EXPLORER") or "bundled"
    if model not in EXPLORER_MODELS:
        raise ValueError(f"unknown explorer model {model!r}: use one of {EXPLORER_MODELS} (or unset MTLAB_EXPLORER)")
    if model == "tiny-12+12":
        _, task = load_teacher()
        limit = min(prof.explore.screen_limit or SEARCH_WORDS, SEARCH_WORDS)
        explorer = searched_explorer(*tiny_12x12(task), task, limit=limit, progress=progress,
                                     code=assembly_code(tiny=True))
        live_note("assembly explorer")
        return explorer
    teacher, task, bank = teacher_task_bank(prof, progress=progress)
    scr = screen_table(prof, teacher, task, bank, progress=progress)
    fr = frontier_table(prof, progress=progress) if with_frontier else None
    live_note("assembly explorer")
    return AssemblyExplorer(scr, stack_depths(teacher), bank.granularities, block_params(teacher), fr,
                            build=lambda plan: assemble(teacher, bank, plan), task=task, code=assembly_code(prof.name))


def merge_explorer(profile=None, *, progress: bool = False, background: bool = True):
    """The merge-set explorer on the teacher: CKA of FF outputs per stack, merges scored on the
    merging study's dev words (`select_limit`) on a background thread, correlations computed once
    per layer pair, layer pruning compared at the closest size not larger than the merge. In a notebook
    it first shows `live_note` (live in JupyterLab; blank on a rendered page)."""
    from ..merging.correlations import CorrelationCache
    from ..measure import count_params
    from ..ui.spec_sizes import SpecSizes
    from ..widgets import MergeExplorer
    from .merging import similarity_frames, similarity_matrix

    prof = get_profile(profile)
    m = prof.merging
    teacher, task = load_teacher()
    M = similarity_matrix(similarity_frames(prof, progress=progress), "teacher", "cka", "ff_out")
    sims = {}
    for s in stack_depths(teacher):
        idx = [r for r in M.index if r.rsplit(".", 1)[0] == s]
        sims[s] = M.loc[idx, idx].rename(index=lambda r: r.rsplit(".", 1)[1], columns=lambda r: r.rsplit(".", 1)[1])
    cache = CorrelationCache(teacher, _align(task), max_tokens=m.align_tokens)

    def evaluate(specs: list[str]) -> dict:
        net = apply(teacher, CompressionSpec(None, tuple(specs)), cache=cache) if specs else teacher
        r = task.evaluate(net, "dev", limit=m.select_limit, progress=False)
        return {"params": count_params(net), "dev_per": r["per"], "dev_wer": r["wer"], "n": r["n"]}

    live_note("merge-set explorer")
    def build(specs: list[str]):
        return apply(teacher, CompressionSpec(None, tuple(specs)), cache=cache)

    return MergeExplorer(sims, stack_depths(teacher), evaluate, params=SpecSizes(teacher), background=background,
                         similarity_label="CKA of FF outputs (train tokens)", build=build, task=task,
                         code=merge_code(m.align_tokens))


__all__ = ["assembly_explorer", "assembly_code", "merge_code", "searched_explorer", "tiny_12x12", "EXPLORER_MODELS", "merge_explorer", "screen_table", "frontier_table", "picks", "combined_specs", "rank_agreement", "screening_bench", "screen_conclusion", "conclusion", "COLUMNS", "as_shown", "live_note"]


# ---------------------------------------------------------------------------
# written conclusions, computed from the tables (notebooks 03 and 05, reports/index.html)

SPEEDUPS = (1.5, 2.0, 3.0)   # the speed-ups at which the conclusions compare methods
SPEED_DIGITS = 2             # speed-ups are shown to 2 decimals, and the verdicts compare what is shown
WER_DIGITS = 1               # WER is shown to 1 decimal: two WERs that show the same tie


def as_shown(values, digits: int = SPEED_DIGITS):
    """Values rounded as the tables show them (a speed-up of 1.4958 reads "1.50" and counts as 1.5x), so a
    verdict never turns on digits the reader cannot see."""
    return values.round(digits) if hasattr(values, "round") else round(float(values), digits)


def screen_conclusion(screen_df: pd.DataFrame, speedups=SPEEDUPS) -> str:
    """What the screen says (markdown bullets): how many plans, how many on the speed/NLL frontier,
    and the best screened plan (lowest NLL) at each FLOP-ideal speed-up next to the teacher. A plan
    reaches a speed-up when its speed-up as shown (2 decimals, `as_shown`) does."""
    teacher = screen_df.loc[screen_df.ideal_speedup.idxmin()]
    front = pareto_mask(screen_df, "ideal_speedup", "nll")
    lines = [f"{len(screen_df)} plans screened; {int(front.sum())} are on the speed/NLL frontier. The teacher "
             f"({teacher.plan}) has token NLL {teacher.nll:.3f} and teacher-forced word accuracy {100 * teacher.tf_word_acc:.1f}%."]
    for s in speedups:
        fast = screen_df[as_shown(screen_df.ideal_speedup) >= s]
        if not len(fast):
            lines.append(f"No plan reaches {s:g}x ideal speed-up (fastest: {screen_df.ideal_speedup.max():.2f}x).")
            continue
        b = fast.loc[fast.nll.idxmin()]
        lines.append(f"At {s:g}x or more ideal speed-up the best plan is **{b.plan}** ({b.ideal_speedup:.2f}x): NLL "
                     f"{b.nll:.3f}, word accuracy {100 * b.tf_word_acc:.1f}% ({100 * (b.tf_word_acc - teacher.tf_word_acc):+.1f} "
                     "points against the teacher).")
    return "\n".join(f"- {x}" for x in lines)


def conclusion(frontier: pd.DataFrame, speedups=SPEEDUPS, speed: str = "speedup_b64") -> str:
    """A short written result of the frontier (`frontier_table`, reports/frontier.csv), computed from it
    (markdown bullets): which kinds are on the frontier, and per speed-up which kind decodes best
    (test WER) among the candidates at least that fast (as shown, 2 decimals), by how much over the next
    kind (the gap of the WERs as shown, 1 decimal)."""
    missing = {"kind", "plan", speed, "test_wer", "on_frontier"} - set(frontier.columns)
    if missing:
        raise ValueError(f"conclusion needs the frontier columns {sorted(missing)}; pass frontier_table(profile)")
    from ..explore.frontier import noisy_speed
    from ..measure import QUIET

    f = frontier.dropna(subset=[speed, "test_wer"])
    lines, bad = [], noisy_speed(f)
    noisy, f = f[bad], f[~bad]  # a speed-up whose rounds disagreed (or implausible against its FLOPs) decides nothing
    teacher = f[f.kind == "teacher"]
    if len(teacher):
        lines.append(f"The teacher scores {teacher.test_wer.iloc[0]:.1f}% test WER.")
    on = f[f.on_frontier.astype(bool)]
    counts = on.kind.value_counts()
    lines.append(f"{len(on)} of {len(f)} candidates are on the WER/speed frontier (batch 64): "
                 + ", ".join(f"{k} {n}" for k, n in counts.items()) + ".")
    for s in speedups:
        fast = f[(as_shown(f[speed]) >= s) & (f.kind != "teacher")]
        if not len(fast):
            lines.append(f"No candidate reaches {s:g}x (fastest: {f[speed].max():.2f}x).")
            continue
        best = fast.sort_values("test_wer").drop_duplicates("kind")
        w = best.iloc[0]
        text = f"At {s:g}x or more, **{w.kind}** decodes best ({w.plan}, {w[speed]:.2f}x): {w.test_wer:.1f}% test WER"
        if len(best) > 1:
            r = best.iloc[1]
            gap = as_shown(r.test_wer, WER_DIGITS) - as_shown(w.test_wer, WER_DIGITS)  # the gap of the numbers shown
            text += (f", tied with {r.kind} ({r.plan})" if gap < 0.05 else
                     f", {gap:.1f} points better than {r.kind} ({r.test_wer:.1f}%)")
        lines.append(text + ".")
    if len(noisy):
        lines.append(f"Left out, speed-up too noisy to compare ({len(noisy)}): "
                     + ", ".join(f"{r.kind} {r.plan}" for r in noisy.itertuples()) + f"; {QUIET}.")
    return "\n".join(f"- {x}" for x in lines)
