"""The README's figures, regenerated from the artifact cache with one command.

    python -m mtlab figures --profile default --out docs/img      (or: make figures)

Each figure is drawn by the same library call its notebook makes, from the same cached tables,
so it matches the rendered report of that profile (computing whatever is not cached yet).
The assembly explorer's screenshot comes from the real-browser test (`make figures` runs it).
"""
from __future__ import annotations

from pathlib import Path


def write_figures(out: str | Path = "docs/img", profile: str = "default") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .experiments.explore import assembly_explorer, frontier_table
    from .experiments.merging import similarity_figure, similarity_frames
    from .explore.frontier import frontier_plot

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name):
        path = out / name
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)

    save(similarity_figure(similarity_frames(profile), "teacher"), "similarity.png")
    frame = frontier_table(profile)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6))
    frontier_plot(frame, "speedup_b64", "test_wer", ax=axes[0]).set_title("test WER vs measured speed-up (batch 64)")
    frontier_plot(frame, "params", "test_wer", x_higher=False, ax=axes[1]).set_title("test WER vs parameters")
    fig.tight_layout()
    save(fig, "frontier.png")
    save(assembly_explorer(profile, with_frontier=False).figure(), "screen.png")
    return written
