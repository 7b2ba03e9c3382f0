"""Targets of the Modular Transformers study on the bundled teacher (issue #12), 2-core CPU:

- at 1.5x, 2x and 3x the modules (one run for every ratio) reach the best baseline trained with
  the same steps and batch per run, in test WER and PER (reports/modular.csv, one row per model);
- relative word accuracy (100-WER)/(100-WER_teacher) >= .99 at 1.1x, .95 at 1.5x, .93 at 2x,
  .80 at 3x; every module plan's output/reference length within 0.9-1.1;
- a module-replacing step costs <= 1.5x a plain fine-tuning step at the same batch
  (reports/modular_step_cost.csv, the two timed alternately in one run).

Writes reports/modular_targets.csv: each target, the value reached, and whether it holds.

    .venv/bin/python benchmarks/modular.py [--profile default] [--out reports]

Trained modules and baselines come from (and go to) the shared artifact cache, so after
`make report` this only re-reads them.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from mtlab.experiments.modular import method_budget, modular_table, step_cost_ratio, targets
from mtlab.profiles import NAMES, get_profile


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="default", choices=NAMES)
    ap.add_argument("--out", default="reports")
    ap.add_argument("--skip-step-cost", action="store_true")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    table = modular_table(get_profile(a.profile))
    table.to_csv(out / "modular.csv", index=False)
    pd.set_option("display.width", 200)
    cols = ["method", "strategy", "plan", "ratio", "ideal_speedup", "speedup_b64", "test_per", "test_wer", "rel_word_acc"]
    print(table[[c for c in cols if c in table]].round(3).to_string(index=False))
    print(method_budget(table).to_string(index=False))
    cost = None
    if not a.skip_step_cost:
        cost = step_cost_ratio(batch_size=get_profile(a.profile).modular.batch_size)
        pd.DataFrame([cost]).to_csv(out / "modular_step_cost.csv", index=False)
    reached = targets(table, cost)
    reached.to_csv(out / "modular_targets.csv", index=False)
    print(reached.round(4).to_string(index=False))


if __name__ == "__main__":
    main()
