"""Frontier search on assembly spaces too large to enumerate (`mtlab.explore.search`).

For each model, the search's screened quality-vs-cost frontier is compared with exhaustive
prefix-shared screening where that is feasible (frontier recall, hypervolume ratio, block
evaluations), and timed where it is not:

- `t5_6`: the bundled 6+6 teacher with the shipped module bank (196 plans);
- `t5_12`: a 12+12 tiny T5 (d_model 32) trained a few minutes on G2P with mtlab's training loop,
  and a bank {2,3,4,6,12} trained a few hundred steps (85,849 plans; exhaustive screening runs);
- `t5_24`: a 24+24 tiny T5 with random weights and an untrained bank {2,3,4,6,8,12}
  (8.3e9 plans; search only, timed);
- `gpt2_32`: a 32-layer decoder-only tiny GPT-2 (d_model 32) with random weights and an untrained
  bank {2,4,8} (456,976 plans), language modelling on the first 2,000 sentences of
  data/sentences (word-level tokenizer, blocks of 32 tokens; search only, timed).

Writes reports/explore_scale.csv (model, depth, plans, block_evals_search,
block_evals_exhaustive, frontier_recall, hypervolume_ratio, seconds, ...) and
reports/merge_sets.csv (greedy forward selection of FF windows on the bundled teacher against
every 2-window set). The trained 12+12 model, the banks and the exhaustive screens are kept
in --work (a rerun reads them). A first run on a shared 2-core machine takes about 30 minutes
(12+12 teacher ~7 min, banks ~3 min, the 12+12 exhaustive screen ~13 min); a rerun about 8.
`--only gpt2_32` (or any comma-separated models) runs just those and keeps the other models'
rows of an existing reports/explore_scale.csv.

    .venv/bin/python benchmarks/explore_scale.py [--words 64] [--out reports] [--work runs/explore_scale]
    .venv/bin/python benchmarks/explore_scale.py --only gpt2_32
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch

from mtlab.checkpoint import write_csv
from mtlab.explore.mergesets import every_merge_set, greedy_merge_sets, greedy_vs_exhaustive
from mtlab.explore.screen import screen
from mtlab.explore.search import compare_to_exhaustive, frontier_search
from mtlab.explore.space import AssemblySpace
from mtlab.modular import ModuleBank
from mtlab.teacher import TeacherConfig, build_teacher
from mtlab.train import TrainConfig, train


def tiny_t5(task, depth: int, seed: int = 0):
    torch.manual_seed(seed)
    return build_teacher(task.tokenizer, TeacherConfig(d_model=32, d_ff=64, num_heads=2, num_layers=depth,
                                                       num_decoder_layers=depth, dropout=0.0))


def tiny_gpt2(depth: int, seed: int = 0, block_size: int = 32, lines: int = 2000):
    """A decoder-only tiny GPT-2 (random weights) and a language-modelling task on the first `lines`
    sentences of data/sentences, with a word-level tokenizer built from them (no download; 3,222
    words: at d_model 32 the LM head dominates a forward, so the whole corpus's 13k-word vocabulary
    would time the head rather than the search)."""
    import transformers as T

    from mtlab.tasks import CausalLMTask
    from mtlab.tasks.causal_lm import word_tokenizer

    text = Path(__file__).resolve().parent.parent / "data" / "sentences" / "sentences.txt"
    sentences = text.read_text(encoding="utf-8").splitlines()[:lines]
    tok = word_tokenizer(sentences)
    task = CausalLMTask(sentences, tok, block_size=block_size, name="sentences")
    torch.manual_seed(seed)
    lm = T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_layer=depth, n_head=2, vocab_size=len(tok),
                                        n_positions=block_size, bos_token_id=tok.eos_token_id,
                                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    return lm.eval(), task


def trained_12(task, work: Path, teacher_steps: int, bank_steps: int):
    """A 12+12 tiny T5 and its bank, trained with mtlab's loops (resumable: a rerun loads them)."""
    from mtlab.modular.replacing import ReplacingConfig, train_modules

    teacher = tiny_t5(task, 12)
    train(teacher, task, TrainConfig(steps=teacher_steps, batch_size=64, lr=2e-3, warmup=100, ckpt_every=250,
                                     log_every=100), work / "teacher12", progress=False)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    cfg = ReplacingConfig(granularities=(2, 3, 4, 6, 12), train=TrainConfig(
        steps=bank_steps, batch_size=32, lr=1e-3, warmup=30, ckpt_every=100, log_every=50))
    bank, _ = train_modules(teacher, task, cfg, work / "bank12", progress=False)
    return teacher, bank.eval()


def bundled_6(work: Path, bank_steps: int):
    """The bundled 6+6 teacher and a bank {2,3,6} trained `bank_steps` steps (resumable)."""
    from mtlab.modular.replacing import ReplacingConfig, train_modules
    from mtlab.teacher import load_teacher

    teacher, task = load_teacher()
    for p in teacher.parameters():
        p.requires_grad_(False)
    cfg = ReplacingConfig(granularities=(2, 3, 6), train=TrainConfig(
        steps=bank_steps, batch_size=32, lr=1e-3, warmup=30, ckpt_every=100, log_every=50))
    bank, _ = train_modules(teacher, task, cfg, work / "bank6", progress=False)
    return teacher, bank.eval(), task


def exhaustive_screen(name: str, teacher, bank, task, words: int, work: Path) -> pd.DataFrame:
    """The whole space screened once per (model, words), kept in the work dir (CSV)."""
    path = work / f"exhaustive_{name}_{words}.csv"
    if path.exists():
        full = pd.read_csv(path)
        full.attrs.update(block_evals=int(full.block_evals.iloc[0]), seconds=float(full.seconds.iloc[0]))
        return full
    full = screen(teacher, bank, task, limit=words, batch_size=words, progress=True)
    write_csv(path, full.assign(block_evals=full.attrs["block_evals"], seconds=full.attrs["seconds"]))
    return full


def merge_sets(teacher, task, words: int, out: Path) -> None:
    """Greedy forward selection of FF windows (sizes 2, 3; aligned on train, chosen on dev) against
    every 2-window set of the bundled teacher: reports/merge_sets.csv."""
    kw = dict(sizes=(2, 3), limit=words, align_words=4 * words)
    t0 = time.perf_counter()
    greedy = greedy_merge_sets(teacher, task, steps=3, **kw)
    g_seconds = time.perf_counter() - t0
    every = every_merge_set(teacher, task, windows=2, **kw)
    cmp = greedy_vs_exhaustive(greedy, every)
    rows = greedy.assign(kind="greedy", seconds=g_seconds, teacher_nll=greedy.attrs["teacher_nll"])
    best = every.nsmallest(5, "nll").assign(kind="every_2_window_set_top5", evaluations=len(every),
                                           seconds=time.perf_counter() - t0 - g_seconds)
    table = pd.concat([rows, best], ignore_index=True)
    for k, v in cmp.items():
        table[f"cmp_{k}"] = v
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "merge_sets.csv", table)
    print(table.to_string(index=False), flush=True)


def row(name: str, teacher, bank, task, words: int, budget: int, full: pd.DataFrame | None, **kw) -> dict:
    space = AssemblySpace.of(teacher, bank)
    t0 = time.perf_counter()
    found = frontier_search(teacher, bank, task, budget=budget, limit=words, batch_size=words, progress=True, **kw)
    seconds = time.perf_counter() - t0
    a = found.attrs
    out = {"model": name, "depth": max(space.depths.values()), "plans": len(space), "words": words, "budget": budget,
           "prefix_score": a["config"]["prefix_score"], "beam": a["beam"], "plans_screened": len(found),
           "block_evals_search": a["block_evals"], "block_evals_exhaustive": a["exhaustive_block_evals"],
           "search_share": a["block_evals"] / a["exhaustive_block_evals"],
           "frontier_recall": float("nan"), "hypervolume_ratio": float("nan"), "seconds": seconds,
           "seconds_exhaustive": float("nan"), "frontier_plans_search": int(found.on_frontier_any.sum())}
    if full is not None:
        assert full.attrs["block_evals"] == a["exhaustive_block_evals"]
        cmp = compare_to_exhaustive(found, full)
        assert cmp["max_abs_diff"] < 1e-5, cmp
        out.update(frontier_plans_exhaustive=cmp["frontier_plans"], frontier_recall=cmp["frontier_recall"], hypervolume_ratio=cmp["hypervolume_ratio"],
                   hv_flops=cmp["hv_flops"], hv_params=cmp["hv_params"], max_abs_diff=cmp["max_abs_diff"],
                   seconds_exhaustive=full.attrs["seconds"])
    print(out, flush=True)
    return out


def merged(path: Path, new: pd.DataFrame) -> pd.DataFrame:
    """This run's rows, after the rows of models it did not run from an existing CSV (a partial rerun
    replaces only its own models' rows)."""
    if not path.exists():
        return new
    old = pd.read_csv(path)
    return pd.concat([old[~old.model.isin(set(new.model))], new], ignore_index=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--words", type=int, default=32, help="dev words screened (one batch)")
    ap.add_argument("--out", default="reports")
    ap.add_argument("--work", default="runs/explore_scale")
    ap.add_argument("--teacher-steps", type=int, default=1500)
    ap.add_argument("--bank-steps", type=int, default=300)
    ap.add_argument("--budget-24", type=int, default=40_000)
    ap.add_argument("--budget-32", type=int, default=40_000)
    ap.add_argument("--models", "--only", dest="models", default="t5_6,merge_sets,t5_12,t5_24,gpt2_32",
                    help="models to run (comma-separated); rows of other models in an existing CSV are kept")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: blocks this small gain nothing from more)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    work, models, rows = Path(a.work), a.models.split(","), []
    from mtlab.tasks.g2p import G2PTask

    task = G2PTask()
    if "t5_6" in models:
        teacher, bank, task6 = bundled_6(work, a.bank_steps)
        full = exhaustive_screen("t5_6", teacher, bank, task6, a.words, work)
        for share in (0.5, 0.67, 0.8):
            for score in ("hidden", "nll"):
                rows.append(row("t5_6", teacher, bank, task6, a.words, int(share * full.attrs["block_evals"]), full,
                                prefix_score=score))
        if "merge_sets" in models:
            merge_sets(teacher, task6, a.words, Path(a.out))
    if "t5_12" in models:
        teacher, bank = trained_12(task, work, a.teacher_steps, a.bank_steps)
        full = exhaustive_screen("t5_12", teacher, bank, task, a.words, work)
        for share in (0.03, 0.1):
            for score in ("hidden", "nll"):
                rows.append(row("t5_12", teacher, bank, task, a.words, int(share * full.attrs["block_evals"]), full,
                                prefix_score=score))
    if "t5_24" in models:
        teacher = tiny_t5(task, 24)
        bank = ModuleBank.build(teacher, (2, 3, 4, 6, 8, 12))
        rows.append(row("t5_24", teacher.eval(), bank, task, a.words, a.budget_24, None, prefix_score="hidden"))
    if "gpt2_32" in models:
        lm, lm_task = tiny_gpt2(32)
        bank = ModuleBank.build(lm, (2, 4, 8))
        rows.append(row("gpt2_32", lm, bank, lm_task, a.words, a.budget_32, None, prefix_score="hidden"))
    out = Path(a.out)
    df = merged(out / "explore_scale.csv", pd.DataFrame(rows))
    df.attrs["config"] = vars(a)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "explore_scale.csv", df)
    pd.set_option("display.width", 240)
    print(df.to_string(index=False))
    print(f"wrote {out / 'explore_scale.csv'}")


if __name__ == "__main__":
    main()
