"""Figures for the modular study: training curves and quality-versus-compression ladders.

Each function takes the DataFrame an experiment returned and gives back a matplotlib
Figure, so every figure can be regenerated from its table alone.
"""
from __future__ import annotations

import pandas as pd

MARKERS = {"teacher": "*", "modules": "o", "layer_drop": "s", "sft": "^", "layerdrop": "D"}


def _require(df: pd.DataFrame, cols: list[str], what: str) -> None:
    if df is None or not len(df):
        raise ValueError(f"{what}: the table is empty; run the experiment first (it returns the table to plot)")
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ValueError(f"{what}: the table lacks columns {missing}; pass the DataFrame the experiment returned")


def loss_curves(log: pd.DataFrame, parts=("loss", "ce", "kd", "hidden_mse")):
    """Per-step losses of a training log (mtlab.train CSV), with the replacement probability."""
    import matplotlib.pyplot as plt

    _require(log, ["step"], "loss_curves")
    parts = [p for p in parts if p in log]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.2))
    for p in parts:
        ax[0].plot(log.step, log[p], label=p)
    ax[0].set(xlabel="step", ylabel="loss", yscale="log", title="module replacing: losses")
    ax[0].legend()
    if "p" in log:
        ax[1].plot(log.step, log.p, label="replacement probability p")
    if "modules_in" in log:
        ax[1].plot(log.step, log.modules_in, label="modules swapped in (mean)")
    ax[1].set(xlabel="step", title="curriculum")
    ax[1].legend()
    fig.tight_layout()
    return fig


def ladder(table: pd.DataFrame, x: str = "ratio", y: str = "test_wer"):
    """Quality against compression (or speed-up) for every method; modules as lines per strategy."""
    import matplotlib.pyplot as plt

    _require(table, ["method", "strategy", x, y], "ladder")
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for (method, strategy), g in table.groupby(["method", "strategy"], sort=False):
        g = g.sort_values(x)
        style = "-" if method == "modules" else ""
        ax.plot(g[x], g[y], style, marker=MARKERS.get(method, "x"), label=f"{method} ({strategy})",
                ms=12 if method == "teacher" else 6)
    labels = {"ratio": "layer-stack compression (x)", "speedup_b64": "measured speed-up, batch 64 (x)",
              "speedup_b1": "measured speed-up, batch 1 (x)", "ideal_speedup": "FLOP-ideal speed-up (x)",
              "test_wer": "test WER %", "test_per": "test PER %", "dev_wer": "dev WER %", "dev_per": "dev PER %"}
    ax.set(xlabel=labels.get(x, x), ylabel=labels.get(y, y))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
