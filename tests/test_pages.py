"""Every page of the smoke report reads as a results section, not a dump (issue 27 item 4).

The pages are those `make report` writes (mtlab.notebooks.run_notebooks), rendered once per session in the
smoke profile by the `smoke_report` fixture of conftest.py (test_notebooks.py reads the same run). Each page
fails on the text "NaN" (a missing value must say why it is missing), on a `pd.Series` dump ("dtype:"),
and, measured in Debian's headless Chromium at a 1280 px wide window, on a table whose full width (the
columns behind a horizontal scroll bar included) does not fit in the window, or a page that scrolls
sideways. Screenshots of the index and of each notebook page go to $MTLAB_ARTIFACTS/pages/ (default:
test-artifacts/pages/), as the browser test writes its own to test-artifacts/browser/.

Why a browser: a table's width depends on its text, fonts and the page's CSS (JupyterLab's template wraps
outputs in a flex layout with a prompt column); no count of columns or characters predicts it reliably.
Without /usr/bin/chromium the width test FAILS; MTLAB_SKIP_BROWSER=1 skips it (the text checks still run).
"""
import os
import re
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("MTLAB_CHROMIUM", "/usr/bin/chromium")
WIDTH = 1280
PAGES = ["index"] + [p.stem for p in sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))]

# every table's full width (scrollWidth: the columns hidden behind a scroll bar count) and right edge
MEASURE = """() => {
  const tables = Array.from(document.querySelectorAll('table')).map(t => {
    const r = t.getBoundingClientRect();
    // a table styled display:block fills its box: its rows say how wide its content is
    const rows = Array.from(t.rows, row => row.getBoundingClientRect().width);
    const width = Math.max(t.scrollWidth, ...rows, t.style.display === 'block' ? 0 : r.width);
    const before = t.style.width;  // the width its content asks for, for the log
    t.style.width = 'max-content';
    const natural = t.getBoundingClientRect().width;
    t.style.width = before;
    return {left: Math.round(r.left + window.scrollX), width: Math.round(width), natural: Math.round(natural),
            hidden: t.scrollWidth > t.clientWidth + 1, head: t.innerText.trim().slice(0, 60).replace(/\\s+/g, ' ')};
  });
  return {tables, page: document.documentElement.scrollWidth};
}"""


def visible_text(page: str) -> str:
    """The page's text as a reader sees it: no <style>/<script> bodies, no tags or attributes (the
    inline images' base64 may hold any letters)."""
    page = re.sub(r"<(style|script)\b.*?</\1>", " ", page, flags=re.S | re.I)
    return re.sub(r"<[^>]+>", " ", page)


def text_problems(page: str) -> list[str]:
    """What a page must not show: "NaN" (a missing value says why) or a pandas Series dump."""
    text = visible_text(page)
    out = []
    for pattern, what in ((r"\bNaN\b", "NaN"), (r"\bdtype:", "a pd.Series dump (dtype:)"),
                          (r"\bName: \w+, dtype", "a pd.Series dump (Name: ..., dtype)")):
        for m in re.finditer(pattern, text):
            out.append(f"{what}: ...{' '.join(text[max(0, m.start() - 80):m.end() + 40].split())}...")
    return out


def wide_tables(measured: dict, width: int = WIDTH) -> list[str]:
    """Tables (and a page) wider than the window, from MEASURE's result."""
    out = [f"table of {t['width']} px at x={t['left']}{' (columns behind a scroll bar)' if t['hidden'] else ''}: "
           f"{t['head']!r}" for t in measured["tables"] if t["hidden"] or t["left"] + t["width"] > width]
    if measured["page"] > width:
        out.append(f"the page is {measured['page']} px wide")
    return out


def _page(report: Path, name: str) -> Path:
    path = report / f"{name}.html"
    if not path.exists():
        pytest.fail(f"{path.name} was not rendered; the smoke report's status: "
                    f"{(report / 'notebooks.csv').read_text() if (report / 'notebooks.csv').exists() else 'none'}")
    return path


# ---------------------------------------------------------------------------
# the checks themselves, on made-up pages (fast, no notebook)

def test_text_checks_catch_nan_and_series_dumps():
    import pandas as pd

    dump = f"<pre>{pd.Series({'steps': 20}, name='default')!s}</pre>"
    assert any("Series dump" in p for p in text_problems(dump))
    assert text_problems("<td>NaN</td>") and not text_problems("<td>not scored</td><td>NaNometer</td>")
    assert not text_problems("<img src='data:image/png;base64,AANaNx'><style>x{a:NaN}</style>")


def test_fmt_tables_show_reasons_not_nan():
    import numpy as np
    import pandas as pd

    from mtlab.ui.tables import fmt, settings

    df = pd.DataFrame({"plan": ["a", "b"], "test_wer": [1.0, np.nan], "speedup_b64": [np.nan, 2.0],
                       "recovery_lr": [1e-4, 3e-4], "train_seconds": [1234.5, 0.25]})
    page = fmt(df, csv="t.csv").to_html()
    assert not text_problems(page)
    assert ">not scored<" in page and ">not timed<" in page and ">1e-4<" in page and ">1,234<" in page
    assert "<a href='t.csv'>t.csv</a>" in page
    from dataclasses import dataclass

    @dataclass
    class Cfg:
        recovery_lr: float = 3e-4
        window_sizes: tuple = (2, 3)
        eval_limit: int | None = None

    shown = settings(Cfg()).to_html()
    assert ">3e-4<" in shown and ">2, 3<" in shown and ">none<" in shown and not text_problems(shown)


# ---------------------------------------------------------------------------
# every page of the smoke report

@pytest.mark.timeout(3600)
@pytest.mark.parametrize("name", PAGES)
def test_page_shows_no_nan_or_series_dump(smoke_report, name):
    problems = text_problems(_page(smoke_report, name).read_text())
    assert not problems, f"{name}.html: " + "\n".join(problems[:10])


def _artifact_dir() -> Path:
    base = os.environ.get("MTLAB_ARTIFACTS")
    return (Path(base) if base else REPO / "test-artifacts") / "pages"


@pytest.mark.timeout(3600)
def test_every_table_fits_1280px(smoke_report):
    if os.environ.get("MTLAB_SKIP_BROWSER") == "1":
        pytest.skip("MTLAB_SKIP_BROWSER=1")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} not found: the page test needs Debian's Chromium (`apt-get install -y chromium`). "
                    "Set MTLAB_SKIP_BROWSER=1 to skip it.", pytrace=False)
    from playwright.sync_api import sync_playwright

    shots = _artifact_dir()
    shutil.rmtree(shots, ignore_errors=True)
    shots.mkdir(parents=True)
    failures, widths = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": WIDTH, "height": 900})
            for name in PAGES:
                path = _page(smoke_report, name)
                page.goto(path.as_uri(), wait_until="load")
                measured = page.evaluate(MEASURE)
                widths.append(f"{name}: {len(measured['tables'])} tables, right edges at most "
                              f"{max([t['left'] + t['width'] for t in measured['tables']], default=0)} px; "
                              f"widths without wrapping: {[t['natural'] for t in measured['tables']]}")
                failures += [f"{name}.html: {w}" for w in wide_tables(measured)]
                page.screenshot(path=str(shots / f"{name}.png"), full_page=True)
        finally:
            browser.close()
    (shots / "widths.txt").write_text("\n".join(widths + failures) + "\n")
    assert not failures, "\n".join(failures)
