"""Claim: bf16 autocast makes a teacher training step faster than fp32 on this CPU, at the same loss.

Times forward+backward+AdamW steps of the bundled teacher's architecture (fresh weights) on
identical G2P batches with torch.utils.benchmark, interleaving the two precisions in one run
so the ratio is fair on a shared machine. Writes reports/bench_precision.csv.

    .venv/bin/python benchmarks/precision.py [--steps 20] [--batch-size 128]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import torch
from torch.utils import benchmark

from mtlab.tasks.g2p import G2PTask
from mtlab.teacher import TeacherConfig, build_teacher
from mtlab.train import cross_entropy_loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--min-run-time", type=float, default=10.0)
    ap.add_argument("--out", default="reports/bench_precision.csv")
    a = ap.parse_args()
    task = G2PTask()
    loss_fn = cross_entropy_loss(0.1)
    batch = task.collate("train", task.batches("train", a.batch_size, shuffle=True, seed=0)[0])
    rows = []
    for precision in ("no", "bf16", "no", "bf16"):  # interleaved twice
        torch.manual_seed(0)
        model = build_teacher(task.tokenizer, TeacherConfig()).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss, _ = loss_fn(model, batch, 0)
            loss.backward()
            opt.step()
            opt.zero_grad()
            return loss.item()

        first_loss = step()
        m = benchmark.Timer("step()", globals={"step": step}, num_threads=torch.get_num_threads(),
                            label="teacher train step", description=precision).blocked_autorange(min_run_time=a.min_run_time)
        rows.append({"precision": precision, "batch_size": a.batch_size, "seconds_per_step": m.median,
                     "iqr": m.iqr, "runs": len(m.times), "first_loss": first_loss, "threads": torch.get_num_threads()})
    df = pd.DataFrame(rows).groupby(["precision", "batch_size", "threads"], as_index=False).agg(
        seconds_per_step=("seconds_per_step", "median"), first_loss=("first_loss", "first"), runs=("runs", "sum"))
    fp32 = df.loc[df.precision == "no", "seconds_per_step"].item()
    df["speedup_vs_fp32"] = fp32 / df.seconds_per_step
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(a.out, index=False)
    print(df.to_string(index=False))


if __name__ == "__main__":
    main()
