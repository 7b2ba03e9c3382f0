"""Run every notebook of `notebooks/` with papermill under a profile and render it to HTML.

This is the main job's engine (`make report`): notebooks run in name order, each with the
parameters PROFILE and OUT (the reports directory, where notebooks write their CSVs),
sharing the artifact cache (`mtlab.cache`) so none recomputes another's work. Each
executed notebook becomes reports/NAME.html; reports/index.html links them with the
profile, git revision, machine, torch threads / OpenMP wait policy and wall time of each.

The kernels are separate processes started by jupyter_client with this process's environment,
so they inherit MTLAB_THREADS and any OMP_* setting; each kernel's mtlab adapts its own
thread count to the free cores (mtlab/runtime.py). Notebooks run one after another, not side by side: 05_frontier reuses
the tables of 02-04 (module table, screen, merge candidates) from the shared cache, and two
kernels computing the same cached table at once would both compute it.
"""
from __future__ import annotations

import html
import os
import platform
import re
import sys
import time
from pathlib import Path

import pandas as pd

from .cache import ROOT
from .profiles import get_profile

NOTEBOOKS = ROOT / "notebooks"


def notebook_paths(only: list[str] | None = None) -> list[Path]:
    paths = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if only:
        paths = [p for p in paths if any(p.stem.startswith(o) or p.stem == o for o in only)]
        if not paths:
            raise ValueError(f"no notebook matches {only}; have {[p.stem for p in sorted(NOTEBOOKS.glob('*.ipynb'))]}")
    return paths


REQUIRED = ("papermill", "nbconvert", "nbformat", "ipykernel", "ipywidgets", "matplotlib", "seaborn", "scipy")


class ReportError(RuntimeError):
    """`make report` cannot run or did not finish; the message says what to do."""


def check_dependencies(kernel: str = "python3", required=REQUIRED) -> None:
    """Fail before running anything when a notebook dependency or the Jupyter kernel is missing."""
    import importlib.util

    missing = [m for m in required if importlib.util.find_spec(m) is None]
    if missing:
        raise ReportError(f"the notebooks need {', '.join(missing)}, which this Python ({sys.executable}) lacks: "
                          "run `make venv` (or `pip install -e '.[test]'`) and retry")
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec(kernel)
    except NoSuchKernel:
        raise ReportError(f"no Jupyter kernel named {kernel!r}: run `{sys.executable} -m ipykernel install --user "
                          f"--name {kernel}` and retry") from None


def run_notebooks(out: str | Path = "reports", profile: str = "default", only: list[str] | None = None,
                  kernel: str = "python3") -> pd.DataFrame:
    """Execute and render each notebook; returns (and writes) reports/notebooks.csv.

    Interrupt it at any point and run it again: training runs resume from their last checkpoint
    and finished tables are read back from the artifact cache."""
    check_dependencies(kernel)
    import nbformat
    import papermill

    prof = get_profile(profile)
    out = Path(out).resolve()
    (out / "executed").mkdir(parents=True, exist_ok=True)
    rows = []
    for path in notebook_paths(only):
        print(f"== {path.name} (profile {prof.name})", flush=True)
        executed = out / "executed" / path.name
        t0 = time.perf_counter()
        status = "ok"
        try:
            papermill.execute_notebook(str(path), str(executed), parameters={"PROFILE": prof.name, "OUT": str(out)},
                                       kernel_name=kernel, cwd=str(path.parent), progress_bar=True,
                                       log_output=False)
        except papermill.PapermillExecutionError as e:
            status = f"failed: {e.ename}: {e.evalue}"[:300]
        except KeyboardInterrupt:
            print(f"\ninterrupted in {path.name}: run the same command again to resume (finished training runs "
                  "and tables are cached; an unfinished run restarts from its last checkpoint)", flush=True)
            raise
        seconds = time.perf_counter() - t0
        if executed.exists():
            nb = without_machine_paths(nbformat.read(executed, as_version=4), prof.name)
            (out / f"{path.stem}.html").write_text(render_html(nb))
        rows.append({"notebook": path.stem, "profile": prof.name, "seconds": round(seconds, 1), "status": status})
        print(f"   {status} in {seconds:.0f}s", flush=True)
    df = pd.DataFrame(rows)
    df.to_csv(out / "notebooks.csv", index=False)
    write_index(out, df, prof.name)
    failed = df[df.status != "ok"]
    if len(failed):
        raise ReportError(f"{len(failed)} notebook(s) failed: {failed.notebook.tolist()}; see {out}/<name>.html "
                           "for the cell that failed")
    return df


def without_machine_paths(nb, profile: str):
    """The executed notebook as the report shows it: papermill's injected parameters cell (which holds
    OUT, an absolute path of this machine) becomes a line naming the profile, and OUT is the page's folder."""
    import nbformat

    for i, cell in enumerate(nb.cells):
        if "injected-parameters" in cell.get("metadata", {}).get("tags", []):
            nb.cells[i] = nbformat.v4.new_markdown_cell(
                f"*Run by `make report` with `PROFILE = {profile!r}`; `OUT` is the folder of this page, where the "
                "notebook wrote its tables.*")
    return nb


# JupyterLab's HTML template, less everything it fetches from a CDN: require.js and MathJax (math stays
# as its TeX source), mermaid.js and the widget renderer (widget views cannot run without a kernel; the
# notebooks follow each explorer with a static copy of its plot).
OFFLINE_TEMPLATE = """{%- extends 'index.html.j2' -%}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{% block jupyter_widgets %}{% endblock jupyter_widgets %}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
"""
_EXTERNAL = re.compile(r"<(?:script|link|img|iframe)\b[^>]*?\b(?:src|href)\s*=\s*[\"']?((?:https?:)?//[^\"'\s>]+)"
                       r"|url\(\s*[\"']?((?:https?:)?//[^\"')\s]+)", re.I)


def external_resources(page: str) -> list[str]:
    """URLs a page would fetch from elsewhere (script/link/img/iframe src or href): a report must have none."""
    return [a or b for a, b in _EXTERNAL.findall(page)]


def render_html(nb) -> str:
    """A self-contained HTML page of an executed notebook (nbformat node) that opens offline:
    JupyterLab's look, images inline, no script or style fetched from a CDN."""
    from jinja2 import DictLoader
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(template_name="lab", template_file="mtlab_offline.html.j2",
                            extra_loaders=[DictLoader({"mtlab_offline.html.j2": OFFLINE_TEMPLATE})])
    page, _ = exporter.from_notebook_node(nb)
    return page


# headline tables of reports/index.html: (csv, title, columns, rows kept, conclusion function "module:name")
HEADLINES = (
    ("modular.csv", "Modular Transformers: the ladders against the baselines",
     ["method", "plan", "ratio", "test_wer", "test_per", "speedup_b64"],
     lambda t: t.drop_duplicates(["method", "plan"]), "mtlab.experiments.modular:conclusion"),
    ("merge.csv", "Merging FF sublayers against layer pruning",
     ["model", "method", "stack", "layers", "params_removed_frac", "recovery_steps", "test_wer", "test_per", "test_n",
      "mean_cos", "recall_at_10"],
     lambda t: t[(t.model != "teacher") | (t.recovery_steps == t[t.model == "teacher"].recovery_steps.max())],
     "mtlab.experiments.merging:conclusion"),
    ("frontier.csv", "Quality against speed: the frontier of every method",
     ["kind", "plan", "params", "speedup_b64", "speedup_b1", "test_wer", "test_per"],
     lambda t: t[t.on_frontier.astype(bool)].sort_values("speedup_b64"), "mtlab.experiments.explore:conclusion"),
)


def markdown_html(text: str) -> str:
    """The conclusions' small markdown (`- ` bullets, **bold**, `code`) as HTML, escaped."""
    items = [html.escape(line[2:] if line.startswith("- ") else line) for line in text.splitlines() if line.strip()]
    items = [re.sub(r"`([^`]+)`", r"<code>\1</code>", re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", i)) for i in items]
    return "<ul>" + "".join(f"<li>{i}</li>" for i in items) + "</ul>"


def headline_section(out: Path, name: str, title: str, columns: list[str], rows, conclude: str) -> str:
    """One headline of the index: the conclusion and the compact table of OUT/name, or a line saying
    that the CSV is missing or unreadable (the page is written either way)."""
    import importlib

    from .ui.tables import table_html

    head = f"<h2>{html.escape(title)}</h2>"
    path = out / name
    if not path.exists():
        return head + f"<p class='missing'>No {name}: its notebook did not write it (see its status below).</p>"
    try:
        table = pd.read_csv(path)
    except (OSError, ValueError) as e:
        return head + f"<p class='missing'>{name} cannot be read ({html.escape(str(e))}): rerun its notebook.</p>"
    try:
        module, func = conclude.split(":")
        text = markdown_html(getattr(importlib.import_module(module), func)(table))
    except Exception as e:  # a table of another shape: show it, and say why there is no conclusion
        text = f"<p class='missing'>No conclusion from {name}: {html.escape(f'{type(e).__name__}: {e}')}</p>"
    try:
        shown = table_html(rows(table), columns)
    except Exception as e:
        shown = f"<p class='missing'>{name} cannot be tabulated here ({html.escape(str(e))}); open the CSV.</p>"
    return head + text + shown + f"<p><a href='{name}'>{name}</a> (all rows and columns)</p>"


def figure_html(path: Path, alt: str) -> str:
    """An image embedded in the page (base64), so the index opens offline and alone; '' when absent."""
    import base64

    if not path.exists():
        return ""
    data = base64.b64encode(path.read_bytes()).decode()
    return f"<img alt='{html.escape(alt)}' style='max-width:100%' src='data:image/png;base64,{data}'>"


def headlines(out: Path) -> str:
    """The headline results of a report directory, each with its conclusion sentence."""
    parts = [headline_section(out, *h) for h in HEADLINES]
    parts[-1] += figure_html(out / "frontier.png", "test WER against speed-up and parameters, every method")
    return "\n".join(parts)


def write_index(out: Path, runs: pd.DataFrame, profile: str) -> Path:
    """reports/index.html: the headline results read from the CSVs the notebooks wrote (each with its
    conclusion), then the notebooks' links, wall times and status. Self-contained: nothing fetched."""
    from .report import git_revision
    from .runtime import describe

    out = Path(out)
    links = "\n".join(
        f"<tr><td><a href='{r.notebook}.html'>{html.escape(r.notebook)}</a></td><td>{r.seconds:.0f}</td>"
        f"<td>{html.escape(r.status)}</td></tr>" for r in runs.itertuples())
    csvs = "\n".join(f"<li><a href='{p.name}'>{p.name}</a></li>" for p in sorted(out.glob("*.csv")))
    extra = "<li><a href='teacher.html'>teacher.html</a> (bundled teacher: dev/test PER/WER)</li>" \
        if (out / "teacher.html").exists() else ""
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>mtlab reports</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.2em .6em}} .missing{{color:#a33}}</style></head><body>
<h1>mtlab reports</h1>
<p>Profile <b>{html.escape(profile)}</b> · git {git_revision()} · {html.escape(platform.node())}
({platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; torch: {html.escape(describe())})
· total {runs.seconds.sum():.0f} s</p>
{headlines(out)}
<h2>Notebooks</h2>
<table><tr><th>notebook</th><th>seconds</th><th>status</th></tr>
{links}</table>
<h2>Tables</h2><ul>{extra}{csvs}</ul></body></html>"""
    path = out / "index.html"
    path.write_text(page)
    return path
