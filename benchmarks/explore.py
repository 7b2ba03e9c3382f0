"""Claims of the exploration study on the bundled teacher:

- prefix-shared screening of the WHOLE assembly space needs far fewer block evaluations and
  less wall time than screening plan by plan, with identical numbers (both measured here, in
  the same run, on `bench_limit` dev words);
- the whole space is screened in about 2 minutes (`screen_limit` dev words, `screen_seconds`);
- the screened quality ranks the frontier's module candidates as decoding does (Spearman of
  screened token NLL against decoded dev WER).

Writes reports/explore_bench.csv (plans, block_evals_per_plan, block_evals_shared,
seconds_per_plan, seconds_shared, max_abs_diff, ratios, space sizes, screen_seconds, spearman)
and reports/frontier.csv (`mtlab.experiments.explore.frontier_table`). The screen and the
frontier come from (and go to) the shared artifact cache; the per-plan comparison always runs.

    .venv/bin/python benchmarks/explore.py [--profile default] [--out reports]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import torch

from mtlab.experiments.explore import frontier_table, rank_agreement, screen_table, screening_bench
from mtlab.profiles import NAMES, get_profile


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="default", choices=NAMES)
    ap.add_argument("--out", default="reports")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    profile = get_profile(a.profile)
    bench = screening_bench(profile)
    screen = screen_table(profile)
    frontier = frontier_table(profile)
    bench["screen_words"] = profile.explore.screen_limit
    bench["screen_seconds"] = float(screen.seconds.iloc[0])
    bench["spearman_nll_dev_wer"] = rank_agreement(frontier)
    bench["spearman_word_acc_dev_wer"] = -rank_agreement(frontier, "screen_tf_word_acc")
    bench["frontier_candidates"] = int((frontier.kind == "modules").sum() + 1)
    bench["profile"] = profile.name
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    bench.to_csv(out / "explore_bench.csv", index=False)
    frontier.to_csv(out / "frontier.csv", index=False)
    pd.set_option("display.width", 220)
    print(bench.T.to_string(header=False))
    print(f"wrote {out / 'explore_bench.csv'} and {out / 'frontier.csv'}")


if __name__ == "__main__":
    main()
