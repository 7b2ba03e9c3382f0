"""`mtlab <command>` (or `python -m mtlab <command>`): run a compression recipe, and what the Makefile runs."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    return _dispatch(p, a)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .profiles import NAMES

    p = argparse.ArgumentParser(prog="mtlab", description=__doc__, epilog=_REGISTERED, formatter_class=_Help)
    p.add_argument("--version", action="version", version=f"mtlab {__version__}", help="print the version and exit")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="run a recipe: compress your own model end to end (see examples/)")
    run.add_argument("recipe", help="the recipe YAML file (model, task, what to do, output)")
    run.add_argument("--output", default=None, help="output folder (overrides the recipe's output)")
    run.add_argument("--check", action="store_true", help="only validate the recipe against the model; run nothing")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.add_argument("--fresh", action="store_true", help="delete the results and work/ of an earlier run in the "
                     "output folder (of another recipe, model or data) and start over")
    st = sub.add_parser("study", help="the report's whole analysis for your model: similarity, modules and baselines "
                        "at every ratio, merges against pruning, the speed frontier (four CSVs and index.html)")
    st.add_argument("recipe", help="the recipe YAML file; its `study:` section sets similarity tokens and timing")
    st.add_argument("--out", default=None, help="output folder (overrides the recipe's output)")
    st.add_argument("--no-progress", action="store_true", help="no progress bars")
    st.add_argument("--fresh", action="store_true", help="delete an earlier run's results and work/ in the output "
                    "folder (of another recipe, model or data) and start over")
    t = sub.add_parser("teacher", help="train (or resume) the bundled teacher and export it to data/teacher")
    t.add_argument("--out", default=None, help="export directory (default data/teacher)")
    t.add_argument("--work", default=None, help="checkpoint/log directory (default runs/teacher)")
    t.add_argument("--steps", type=int, default=None, help="override the number of training steps")
    t.add_argument("--max-minutes", type=float, default=None, help="stop after this long (resume by rerunning)")
    m = sub.add_parser("modules", help="train (or resume) the shipped module bank and export it to data/modules")
    m.add_argument("--steps", type=int, default=None, help="override the number of training steps")
    m.add_argument("--max-minutes", type=float, default=None, help="stop after this long (resume by rerunning)")
    b = sub.add_parser("baselines", help="train (or resume) the shipped baselines and export them to data/baselines")
    b.add_argument("--only", nargs="*", default=None, help="these runs only (e.g. sft-3 layerdrop)")
    b.add_argument("--steps", type=int, default=None, help="override the number of training steps")
    mg = sub.add_parser("merges", help="recover the combined FF-merge candidates at the real budget and export "
                        "them to data/merging")
    mg.add_argument("--only", nargs="*", default=None, help="these candidates only (e.g. permute-equal-ff)")
    mg.add_argument("--steps", type=int, default=None, help="override the recovery steps (the report then refuses them)")
    ml = sub.add_parser("minilm", help="train (or resume) the MiniLM study's runs and export them to data/minilm")
    ml.add_argument("--only", nargs="*", default=None, help="these artifacts only (e.g. modules sft-3 merge-10)")
    ml.add_argument("--steps", type=int, default=None, help="override the steps of every run (the report then "
                                                             "refuses the artifacts: they no longer match it)")
    for name, what in (("minilm-curves", "MiniLM: permute merging vs layer pruning at ~10%%/~20%% removed"),
                       ("t5-curves", "the T5 merge study: permute vs layer pruning at 4 of 12 FF sublayers")):
        cv = sub.add_parser(name, help=f"recovery curves (resumable), {what}: quality every --every steps")
        cv.add_argument("--steps", type=int, default=4000, help="recovery steps per run")
        cv.add_argument("--every", type=int, default=500, help="score on the test sentences every this many steps")
        cv.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda when available")
        cv.add_argument("--only", nargs="*", default=None, help="these runs only (METHOD-POINT, e.g. permute-10)")
        cv.add_argument("--no-ship", action="store_true", help="write the reports CSV only, not the shipped copy")
    ab = sub.add_parser("ablation", help="train every recipe variant at one budget; write data/ablation/modular_ablation.csv")
    ab.add_argument("--steps", type=int, default=3000, help="steps per variant (batch 64)")
    ab.add_argument("--words", type=int, default=1000, help="dev words each assembly is decoded on")
    ab.add_argument("--only", nargs="*", default=None, help="these variants only (their rows are added to the "
                    "table or replace their earlier rows; the other rows are kept)")
    ab.add_argument("--device", default=None, choices=("cpu", "cuda"), help="train on this device (default: cuda "
                    "when available); recorded in the row and the cache key")
    ab.add_argument("--seed", type=int, default=0, help="training seed (data order, sampling); recorded in the row")
    ab.add_argument("--equal-time", action="store_true", help="train each variant for the steps that cost what the "
                    "recipe's --steps run cost on this device (read from the table's rows)")
    r = sub.add_parser("report", help="evaluate the bundled teacher, run every notebook, write reports/")
    r.add_argument("--out", default="reports", help="report directory (default reports)")
    r.add_argument("--teacher", default=None, help="teacher directory (default data/teacher)")
    r.add_argument("--limit", type=int, default=None, help="decode only the first N words of each split")
    r.add_argument("--profile", default="default", choices=NAMES, help="how much work (see mtlab/profiles.py)")
    r.add_argument("--only", nargs="*", default=None, help="run only these notebooks (e.g. 02 04)")
    r.add_argument("--no-notebooks", action="store_true", help="only the teacher evaluation")
    f = sub.add_parser("figures", help="redraw the README's figures from the artifact cache")
    f.add_argument("--out", default="docs/img", help="figure directory (default docs/img)")
    f.add_argument("--profile", default="default", choices=NAMES, help="whose cached artifacts to draw")
    return p


_REGISTERED = "(the registered merge methods, baselines, strategies and task kinds)"


class _Help(argparse.RawDescriptionHelpFormatter):
    """Help that lists every registry's entries (`mtlab.registries`), read only when help is printed
    (so other commands start without importing the registries)."""

    def _format_text(self, text: str) -> str:
        if text == _REGISTERED:
            from .registries import registered_text

            text = registered_text()
        return super()._format_text(text)


def _dispatch(p: argparse.ArgumentParser, a: argparse.Namespace) -> int:
    if a.cmd == "run":
        return _run(a.recipe, a.output, a.check, not a.no_progress, a.fresh)
    if a.cmd == "study":
        return _study(a.recipe, a.out, not a.no_progress, a.fresh)
    if a.cmd == "teacher":
        from .teacher import ROOT, TEACHER_DIR, TeacherConfig, train_teacher

        cfg = TeacherConfig()
        if a.steps:
            cfg.train.steps = a.steps
        t0 = time.time()
        log = train_teacher(a.out or TEACHER_DIR, a.work or ROOT / "runs" / "teacher", cfg,
                            max_seconds=a.max_minutes * 60 if a.max_minutes else None)
        print(log.tail(5).to_string(index=False))
        print(f"done in {time.time() - t0:.0f}s")
    elif a.cmd == "modules":
        from .experiments.artifacts import bank_recipe, train_bank

        cfg = bank_recipe(**({"steps": a.steps} if a.steps else {}))
        t0 = time.time()
        train_bank(cfg, max_seconds=a.max_minutes * 60 if a.max_minutes else None)
        print(f"done in {time.time() - t0:.0f}s")
    elif a.cmd == "baselines":
        from .experiments.artifacts import baseline_names, baseline_recipe, train_baseline

        names = a.only or baseline_names()
        bad = sorted(set(names) - set(baseline_names()))
        if bad:
            p.error(f"unknown baseline(s) {bad}: choose from {baseline_names()}")
        cfg = baseline_recipe(**({"steps": a.steps} if a.steps else {}))
        for name in names:
            t0 = time.time()
            train_baseline(name, cfg)  # each run checkpoints: stop it any time, rerun to resume
            print(f"{name}: done in {time.time() - t0:.0f}s", flush=True)
    elif a.cmd == "minilm":
        return _minilm(p, a.only, a.steps)
    elif a.cmd == "merges":
        return _merges(p, a.only, a.steps)
    elif a.cmd in ("minilm-curves", "t5-curves"):
        from .curves import cli

        return cli(a.cmd.split("-")[0], a.steps, a.every, a.only, a.device, ship=not a.no_ship)
    elif a.cmd == "ablation":
        from .experiments.ablation import ABLATION_CSV, VARIANTS, ablation_table, resolve_device, write_rows

        bad = sorted(set(a.only or ()) - set(VARIANTS))
        if bad:
            p.error(f"unknown variant(s) {bad}: choose from {sorted(VARIANTS)}")
        try:
            device = resolve_device(a.device)
        except ValueError as e:
            p.error(str(e))
        table = ablation_table(a.steps, words=a.words, variants=a.only, seed=a.seed, device=device,
                               equal_time=a.equal_time, skip_done=a.only is None)  # no --only: new rows only
        write_rows(table, ABLATION_CSV)  # merged: rows of other variants, seeds and devices are kept
        print(table.to_string(index=False))
    elif a.cmd == "report":
        from .notebooks import run_notebooks
        from .profiles import get_profile
        from .report import teacher_report

        get_profile(a.profile)  # fail fast on a typo
        t0 = time.time()
        teacher_report(Path(a.out), a.teacher, a.limit)
        if not a.no_notebooks:
            from .notebooks import ReportError

            try:
                print(run_notebooks(a.out, a.profile, a.only).to_string(index=False))
            except ReportError as e:
                print(f"make report: {e}", file=sys.stderr)
                return 2
        print(f"report done in {time.time() - t0:.0f}s: open {Path(a.out) / 'index.html'}")
    elif a.cmd == "figures":
        from .figures import write_figures

        for path in write_figures(a.out, a.profile):
            print(f"wrote {path}")
    return 0


def _merges(p: argparse.ArgumentParser, only: list[str] | None, steps: int | None) -> int:
    """`mtlab merges`: recover and ship the combined FF-merge candidates (data/merging), resumable."""
    from .experiments.merge_artifacts import MERGE_PROFILE, merge_names
    from .experiments.merge_training import train_merges
    from .profiles import get_profile, replace

    bad = sorted(set(only or ()) - set(merge_names()))
    if bad:
        p.error(f"unknown merge candidate(s) {bad}: choose from {merge_names()}")
    prof = get_profile(MERGE_PROFILE)
    if steps:
        prof = replace(prof, merging=replace(prof.merging, combined_recovery_steps=steps))
    t0 = time.time()
    train_merges(only, prof)  # each run checkpoints: stop it any time, rerun to resume
    print(f"done in {time.time() - t0:.0f}s")
    return 0


def _minilm(p: argparse.ArgumentParser, only: list[str] | None, steps: int | None) -> int:
    """`mtlab minilm`: every shipped MiniLM run at the default profile's recipe, one after another;
    each checkpoints, so stop any time and rerun to resume."""
    from dataclasses import replace

    from .experiments.minilm_artifacts import MINILM_DIR, artifact_names
    from .experiments.minilm_training import ship
    from .profiles import get_profile

    m = get_profile("default").minilm
    if steps:
        m = replace(m, steps=steps)
    names = only or artifact_names(m)
    bad = sorted(set(names) - set(artifact_names(m)))
    if bad:
        p.error(f"unknown MiniLM artifact(s) {bad}: choose from {artifact_names(m)}")
    for name in names:
        t0 = time.time()
        done = ship(name, m)
        print(f"{name}: {'exported' if done else 'unfinished'} in {time.time() - t0:.0f}s", flush=True)
    size = sum(f.stat().st_size for f in MINILM_DIR.rglob("*") if f.is_file())
    print(f"{MINILM_DIR.name}: {size / 1e6:.1f} MB shipped in all")
    return 0


def _run(recipe: str, output: str | None, check: bool, progress: bool, fresh: bool = False) -> int:
    """`mtlab run`: a recipe error is one clear message and exit status 2, not a traceback."""
    from .recipe import RecipeError, check_recipe, load_model_and_task, load_recipe, run_recipe

    try:
        r = load_recipe(recipe)
        if output is not None:  # --check looks at the folder the run would use
            r = r.model_copy(update={"output": Path(output)})
        if check:
            check_recipe(r, *load_model_and_task(r), output=not fresh)
            print(f"{recipe}: valid")
            return 0
        t0 = time.time()
        df = run_recipe(r, output=output, progress=progress, fresh=fresh)
    except RecipeError as e:
        print(f"mtlab run: {e}", file=sys.stderr)
        return 2
    print(df.to_string(index=False))
    out = Path(output) if output else r.output
    print(f"done in {time.time() - t0:.0f}s: models in {out / 'models'}, open {out / 'summary.html'}")
    return 0


def _study(recipe: str, out: str | None, progress: bool, fresh: bool) -> int:
    """`mtlab study`: like `mtlab run`, a recipe error is one message and exit status 2."""
    from .recipe import RecipeError
    from .study import study

    t0 = time.time()
    try:
        res = study(recipe, out=out, progress=progress, fresh=fresh)
    except RecipeError as e:
        print(f"mtlab study: {e}", file=sys.stderr)
        return 2
    for name, text in res.conclusions.items():
        print(f"{name}: {text}")
    print(f"done in {time.time() - t0:.0f}s: tables and index.html in {res.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
