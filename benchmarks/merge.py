"""Claims of the FF-merging study (Verma, Murray, Duh 2025) on the bundled teacher and MiniLM:

- permute merging beats vanilla merging at equal parameters, before and after recovery;
- merging beats layer pruning at equal parameters removed (after the same recovery budget);
- MiniLM: permute keeps embeddings closer to the original than vanilla (test mean cosine, recall@10).

Writes reports/merge.csv (`mtlab.experiments.merging.merge_csv`: model, method, stack, layers,
params, params_removed_frac, recovery_steps, dev/test PER/WER for the teacher, mean_cos and
recall_at_10 for MiniLM) and prints the wall time. Tables come from (and go to) the shared
artifact cache, so after `make report` this only re-reads them.

    .venv/bin/python benchmarks/merge.py [--profile default] [--out reports]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd

from mtlab.experiments.merging import merge_csv, minilm_merge_table, teacher_merge_table
from mtlab.profiles import NAMES, get_profile


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="default", choices=NAMES)
    ap.add_argument("--out", default="reports")
    a = ap.parse_args()
    profile = get_profile(a.profile)
    t0 = time.perf_counter()
    teacher_merge_table(profile)
    t1 = time.perf_counter()
    minilm_merge_table(profile)
    t2 = time.perf_counter()
    df = merge_csv(profile)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "merge.csv", index=False)
    pd.set_option("display.width", 220)
    print(df.round(4).to_string(index=False))
    print(f"teacher table {t1 - t0:.0f}s, MiniLM table {t2 - t1:.0f}s (0s: read from the cache); "
          f"wrote {out / 'merge.csv'}")


if __name__ == "__main__":
    main()
