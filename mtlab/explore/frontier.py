"""Pareto frontiers of quality against speed or size, and their plots.

A candidate is on the frontier when no other candidate is at least as good on both axes and
strictly better on one. The helpers take any DataFrame with the named columns (decoded
candidates, screened plans), so modules, merges, combined candidates and baselines share one
chart; they refuse an empty or inconsistent table with a message that says what is missing.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

KIND_ORDER = ("teacher", "modules", "combined", "merge", "layer_prune", "layer_drop", "sft", "layerdrop")


def _check(df: pd.DataFrame, cols: Sequence[str], what: str) -> None:
    if df is None or len(df) == 0:
        raise ValueError(f"{what}: the table is empty; compute it first (e.g. mtlab.experiments.explore.frontier_table)")
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ValueError(f"{what}: the table has no column(s) {missing}; it has {list(df.columns)}")
    bad = [c for c in cols if df[c].isna().all()]
    if bad:
        raise ValueError(f"{what}: column(s) {bad} hold no values")


def pareto_mask(df: pd.DataFrame, x: str, y: str, *, x_higher: bool = True, y_lower: bool = True) -> pd.Series:
    """True for rows not dominated on (x, y); rows with a missing x or y are never on it."""
    _check(df, [x, y], "pareto_mask")
    xs = df[x].to_numpy(float) * (1 if x_higher else -1)
    ys = df[y].to_numpy(float) * (-1 if y_lower else 1)   # both axes: higher is better now
    ok = ~(np.isnan(xs) | np.isnan(ys))
    on = np.zeros(len(df), bool)
    for i in np.flatnonzero(ok):
        dominated = ok & (xs >= xs[i]) & (ys >= ys[i]) & ((xs > xs[i]) | (ys > ys[i]))
        on[i] = not dominated.any()
    return pd.Series(on, index=df.index)


def noisy_speed(df: pd.DataFrame) -> pd.Series:
    """True for rows whose measured speed-up is marked `speed_noisy` (its rounds disagreed, or it was
    implausible against its FLOP-ideal, even after re-measuring: `mtlab.measure.checked_speedups`);
    all False for a table without that column. Such speed-ups are left out of frontiers and conclusions."""
    if "speed_noisy" not in df.columns:
        return pd.Series(False, index=df.index)
    return df["speed_noisy"].map(lambda v: v is True or str(v).strip().lower() in ("true", "1", "1.0")).astype(bool)


def trusted_speed(df: pd.DataFrame, speed: str) -> pd.DataFrame:
    """`df` with the measured speed-up column `speed` blanked (NaN) where it is `noisy_speed`: such a
    row can never be on a speed frontier. Columns that are not measured (`ideal_speedup`) are kept."""
    bad = noisy_speed(df)
    if speed == "ideal_speedup" or "speedup" not in speed or not bad.any():
        return df
    out = df.copy()
    out.loc[bad, speed] = np.nan
    return out


def mark_frontiers(df: pd.DataFrame, quality: str = "test_wer", speed: str = "speedup_b64") -> pd.DataFrame:
    """Adds `on_frontier` (quality vs measured speed-up; a `speed_noisy` row is never on it),
    `on_frontier_params` (quality vs parameters) and `on_frontier_any`."""
    out = df.copy()
    out["on_frontier"] = pareto_mask(trusted_speed(out, speed), speed, quality)
    out["on_frontier_params"] = pareto_mask(out, "params", quality, x_higher=False)
    out["on_frontier_any"] = out.on_frontier | out.on_frontier_params
    return out


def frontier_plot(df: pd.DataFrame, x: str = "speedup_b64", y: str = "test_wer", *, hue: str = "kind",
                  x_higher: bool = True, ax=None, highlight: str | None = None, label: str = "plan"):
    """Scatter of every candidate coloured by `hue`, its Pareto frontier as a step line, the
    teacher marked; `highlight` names one candidate (by its `label` column) to ring. Rows whose
    measured speed-up is `speed_noisy` are drawn hollow (grey ring) and stay off the frontier."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    _check(df, [x, y, hue], "frontier_plot")
    if ax is None:
        _, ax = plt.subplots(figsize=(6.5, 4.2))
    kinds = [k for k in KIND_ORDER if k in set(df[hue])] + sorted(set(df[hue]) - set(KIND_ORDER))
    sns.scatterplot(data=df, x=x, y=y, hue=hue, hue_order=kinds, style=hue, style_order=kinds, s=55, ax=ax)
    bad = noisy_speed(df)
    if bad.any() and x in df.columns and "speedup" in x and x != "ideal_speedup":
        ax.scatter(df.loc[bad, x], df.loc[bad, y], s=140, facecolors="none", edgecolors="grey", linewidths=1,
                   label="speed noisy (not on frontier)")
    on = df[pareto_mask(trusted_speed(df, x), x, y, x_higher=x_higher)].sort_values(x)
    ax.step(on[x], on[y], where="post" if x_higher else "pre", color="black", lw=1, alpha=0.6, label="frontier")
    if "teacher" in set(df[hue]):
        t = df[df[hue] == "teacher"].iloc[0]
        ax.axhline(t[y], color="grey", ls="--", lw=1)
        ax.annotate("teacher", (t[x], t[y]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if highlight is not None and label in df.columns and (df[label] == highlight).any():
        h = df[df[label] == highlight].iloc[0]
        ax.scatter([h[x]], [h[y]], s=260, facecolors="none", edgecolors="red", linewidths=2, label="selected")
    ax.set(xlabel=x.replace("_", " "), ylabel=f"{y.replace('_', ' ')} (lower is better)")
    ax.legend(fontsize=7, loc="best")
    return ax


def spearman(a: pd.Series, b: pd.Series) -> float:
    """Rank correlation of two aligned columns (scipy), NaN-free rows only."""
    from scipy.stats import spearmanr

    m = pd.concat([a, b], axis=1).dropna()
    if len(m) < 3:
        raise ValueError(f"spearman needs at least 3 paired values, got {len(m)}")
    return float(spearmanr(m.iloc[:, 0], m.iloc[:, 1]).statistic)
