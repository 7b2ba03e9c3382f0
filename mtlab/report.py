"""The main job's reports: CSV tables and a small self-contained HTML page under reports/."""
from __future__ import annotations

import base64
import io
import platform
import subprocess
import time
from pathlib import Path

import pandas as pd

from .teacher import TEACHER_DIR, load_teacher, teacher_card


def git_revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def learning_curve_figure(log: pd.DataFrame):
    """The teacher's training curve (loss; dev PER/WER where logged). It leaves the matplotlib backend
    alone: switching to Agg here kept a notebook's inline backend from showing it (00_teacher's empty
    "Training curve"); `teacher_report` picks Agg itself."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(9, 3))
    ax[0].plot(log.step, log.loss)
    ax[0].set(xlabel="step", ylabel="train loss (label-smoothed CE)", title="teacher training")
    if "dev_per" in log:
        ev = log.dropna(subset=["dev_per"])
        ax[1].plot(ev.step, ev.dev_per, "o-", label="PER")
        ax[1].plot(ev.step, ev.dev_wer, "s-", label="WER")
        ax[1].set(xlabel="step", ylabel="% on a dev slice", title="greedy decoding during training")
        ax[1].legend()
    fig.tight_layout()
    return fig


def teacher_report(out: Path, teacher: str | Path | None = None, limit: int | None = None) -> pd.DataFrame:
    """Evaluate the teacher on dev and test; write reports/teacher.csv and reports/teacher.html."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = Path(teacher or TEACHER_DIR)
    t0 = time.time()
    model, task = load_teacher(path)
    rows, examples = [], []
    for split in ("dev", "test"):
        s = time.perf_counter()
        pred = task.predict(model, split, limit=limit)
        rows.append({"split": split, "n": len(pred), **task.score(pred.hypothesis.tolist(), pred.reference.tolist()),
                     "seconds": time.perf_counter() - s})
        if split == "test":
            examples = pred[pred.hypothesis != pred.reference].head(15)
    df = pd.DataFrame(rows)[["split", "n", "per", "wer", "seconds"]]
    df.attrs["config"] = {"teacher": str(path), "limit": limit, "decoding": "greedy"}
    tmp = out / "teacher.csv.tmp"
    df.to_csv(tmp, index=False)
    tmp.replace(out / "teacher.csv")

    card = teacher_card(path)
    log_path = path / "training_log.csv"
    curve = ""
    if log_path.exists():
        import sys

        import matplotlib

        if "ipykernel" not in sys.modules:  # a command line: no display; a kernel keeps its inline backend
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig = learning_curve_figure(pd.read_csv(log_path))
        curve = f'<img alt="learning curve" src="data:image/png;base64,{_png(fig)}">'
        plt.close(fig)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>mtlab: bundled teacher</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.2em .6em;text-align:right}}</style></head><body>
<h1>mtlab report: the bundled teacher</h1>
<p>T5 {card['architecture']['num_layers']}+{card['architecture']['num_decoder_layers']} layers,
d_model {card['architecture']['d_model']}, {card['parameters']:,} parameters, trained {card['steps']} steps
({card['train_seconds']/60:.0f} min) on CMUdict G2P. Greedy decoding{'' if limit is None else f', first {limit} words per split'}.</p>
{df.to_html(index=False, float_format=lambda v: f'{v:.2f}')}
<p>Model card (training-time evaluation): dev PER {card['dev']['per']:.2f} / WER {card['dev']['wer']:.2f},
test PER {card['test']['per']:.2f} / WER {card['test']['wer']:.2f}.</p>
{curve}
<h2>Some test errors</h2>
{examples.to_html(index=False) if len(examples) else '<p>none</p>'}
<p><small>git {git_revision()} · {platform.node()} · {platform.machine()} · {time.time() - t0:.0f} s</small></p>
</body></html>"""
    (out / "teacher.html").write_text(page)
    print(df.to_string(index=False))
    print(f"wrote {out / 'teacher.csv'} and {out / 'teacher.html'}")
    return df
