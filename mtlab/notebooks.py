"""Run every notebook of `notebooks/` with papermill under a profile and render it to HTML.

This is the main job's engine (`make report`): notebooks run in name order, each with the
parameters PROFILE and OUT (the reports directory, where notebooks write their CSVs),
sharing the artifact cache (`mtlab.cache`) so none recomputes another's work. Each
executed notebook becomes reports/NAME.html; reports/index.html links them with the
profile, git revision, machine and wall time of each.
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
            (out / f"{path.stem}.html").write_text(render_html(nbformat.read(executed, as_version=4)))
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


def write_index(out: Path, runs: pd.DataFrame, profile: str) -> Path:
    from .report import git_revision

    links = "\n".join(
        f"<tr><td><a href='{r.notebook}.html'>{html.escape(r.notebook)}</a></td><td>{r.seconds:.0f}</td>"
        f"<td>{html.escape(r.status)}</td></tr>" for r in runs.itertuples())
    csvs = "\n".join(f"<li><a href='{p.name}'>{p.name}</a></li>" for p in sorted(out.glob("*.csv")))
    extra = "<li><a href='teacher.html'>teacher.html</a> (bundled teacher: dev/test PER/WER)</li>" \
        if (out / "teacher.html").exists() else ""
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>mtlab reports</title>
<style>body{{font-family:sans-serif;max-width:50em;margin:2em auto}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.2em .6em}}</style></head><body>
<h1>mtlab reports</h1>
<p>Profile <b>{html.escape(profile)}</b> · git {git_revision()} · {html.escape(platform.node())}
({platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}) · total {runs.seconds.sum():.0f} s</p>
<table><tr><th>notebook</th><th>seconds</th><th>status</th></tr>
{links}</table>
<h2>Tables</h2><ul>{extra}{csvs}</ul></body></html>"""
    path = out / "index.html"
    path.write_text(page)
    return path
