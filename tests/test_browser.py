"""The assembly explorer in a real browser: headless JupyterLab + Debian's Chromium driven by Playwright.

Opens notebooks/03_assembly_explorer.ipynb (a tmp copy, so autosave never writes outputs into the repo),
runs every cell in the smoke profile, waits for the explorer widget, changes the strategy dropdown and
the ratio slider and a span position, and checks that the read-out and the frontier plot change each time
and no error is shown. Screenshots, the server log and the browser console go to
$MTLAB_ARTIFACTS/browser/ (default: test-artifacts/browser/).

Needs /usr/bin/chromium (`apt-get install chromium`; .ci/run installs it). Without it the test FAILS;
set MTLAB_SKIP_BROWSER=1 to skip it on a machine without Chromium.
"""
import os
import re
import shutil
from pathlib import Path

import pytest

from browser.lab import Deadline, jupyter_lab

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "notebooks" / "03_assembly_explorer.ipynb"
CHROMIUM = os.environ.get("MTLAB_CHROMIUM", "/usr/bin/chromium")
BUDGET = float(os.environ.get("MTLAB_BROWSER_BUDGET", "300"))  # seconds for the whole test, server start to last check

# the widget contract: CSS classes the notebook sets with widget.add_class(...)
STRATEGY = ".mtlab-strategy select"
RATIO_HANDLE = ".mtlab-ratio .noUi-handle"  # ipywidgets 8 sliders are noUiSlider; the handle carries aria-value*
SPAN = ".mtlab-span select"
READOUT = ".mtlab-readout"
PLOT_IMG = ".mtlab-plot img"
ERROR = ".mtlab-error"

# JS run in the page; window.jupyterapp exists because the server runs with --LabApp.expose_app_in_browser
OPEN_NOTEBOOK = """async (path) => {
  const app = window.jupyterapp;
  await app.started; await app.restored;
  // naming the kernel here means no "Select Kernel" dialog, whatever the notebook's metadata says
  const w = await app.commands.execute('docmanager:open', {path, factory: 'Notebook', kernel: {name: 'python3'}});
  await w.context.ready;
  await w.sessionContext.ready;
  app.shell.activateById(w.id);
  window.__mtlabNotebook = w;
  return w.id;
}"""
KERNEL_IDLE = "() => window.__mtlabNotebook.sessionContext.session?.kernel?.status === 'idle'"
RUN_ALL = """() => {
  const app = window.jupyterapp, w = window.__mtlabNotebook;
  app.shell.activateById(w.id);
  if (app.shell.currentWidget !== w) throw new Error('notebook is not the current widget');
  app.commands.execute('notebook:run-all-cells');  // not awaited: completion is polled below
}"""
# done when every non-empty code cell has an execution count (JupyterLab clears it when a cell is queued and
# sets it from the reply); an error output (or a cell aborted after one) ends the wait early
RUN_STATE = """() => {
  const cells = window.__mtlabNotebook.content.widgets
    .filter(c => c.model.type === 'code' && c.model.sharedModel.getSource().trim());
  const errors = [];
  cells.forEach((c, i) => { for (const o of c.model.outputs.toJSON())
    if (o.output_type === 'error') errors.push(`code cell ${i + 1}: ${o.ename}: ${o.evalue}`); });
  const pending = cells.filter(c => c.model.executionCount === null).length;
  return (errors.length || !pending) ? {errors, pending, cells: cells.length} : null;
}"""
IMG_CHANGED = """([root, sel, before]) => { const i = root.querySelector(sel);
  return !!i && i.complete && i.naturalWidth > 0 && i.src !== before; }"""


def _artifact_dir() -> Path:
    base = os.environ.get("MTLAB_ARTIFACTS")
    return (Path(base) if base else REPO / "test-artifacts") / "browser"


def _require_browser() -> str:
    if os.environ.get("MTLAB_SKIP_BROWSER") == "1":
        pytest.skip("MTLAB_SKIP_BROWSER=1")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} not found: the browser test needs Debian's Chromium "
                    "(`apt-get install -y chromium`; .ci/run installs it). Set MTLAB_SKIP_BROWSER=1 to skip it.",
                    pytrace=False)
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.fail("the Python package playwright is missing: pip install -e '.[test]'", pytrace=False)
    return CHROMIUM


def _option_labels(select) -> tuple[list[str], str]:
    return select.evaluate("s => [Array.from(s.options, o => o.textContent.trim()), s.options[s.selectedIndex]?.textContent.trim()]")


def _norm(label: str) -> str:
    return re.sub(r"[\s-]+", "_", label.strip().lower())


@pytest.mark.timeout(BUDGET + 120)
@pytest.mark.parametrize("notebook", [NOTEBOOK], ids=[NOTEBOOK.stem])
def test_assembly_explorer_in_browser(notebook, tmp_path):
    chromium_path = _require_browser()
    from playwright.sync_api import expect, sync_playwright

    deadline = Deadline(BUDGET)
    root, shots = tmp_path / "lab", tmp_path / "artifacts"
    root.mkdir()
    shots.mkdir()
    nb_name = "03_assembly_explorer.ipynb"
    shutil.copy(notebook, root / nb_name)
    env = {"MTLAB_PROFILE": os.environ.get("MTLAB_BROWSER_PROFILE", "smoke"), "OMP_NUM_THREADS": "1", "MTLAB_CACHE": os.environ["MTLAB_CACHE"]}
    console: list[str] = []
    lab = None
    try:
        with jupyter_lab(root, tmp_path / "jupyter", env, deadline) as lab, sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium_path, headless=True, args=["--disable-dev-shm-usage"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("console", lambda m: console.append(f"[{m.type}] {m.text}"))
            page.on("pageerror", lambda e: console.append(f"[pageerror] {e}"))
            try:
                _drive(page, lab, nb_name, deadline, shots, expect)
            except BaseException:
                _failure_snapshot(page, shots)
                raise
            finally:
                browser.close()
    except BaseException as e:
        if lab is not None and not isinstance(e, pytest.skip.Exception):
            print(f"--- jupyter server log (tail) ---\n{lab.log_tail()}")
        raise
    finally:
        (shots / "console.log").write_text("\n".join(console))
        if lab is not None and lab.log.exists():
            shutil.copy(lab.log, shots / lab.log.name)
        out = _artifact_dir()
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(shots, out)


def _drive(page, lab, nb_name, deadline, shots, expect):
    # 1. JupyterLab loads; open the notebook with a python3 kernel; wait for the kernel
    page.goto(lab.url("lab"), timeout=deadline.ms(60))
    page.wait_for_function("() => window.jupyterapp !== undefined", timeout=deadline.ms(60))
    page.evaluate(OPEN_NOTEBOOK, nb_name)
    page.wait_for_function(KERNEL_IDLE, timeout=deadline.ms(90), polling=250)

    # 2. run all cells; wait until every code cell has run (or one failed)
    page.evaluate(RUN_ALL)
    state = page.wait_for_function(RUN_STATE, timeout=deadline.ms(), polling=500).json_value()
    assert not state["errors"], f"notebook cells raised: {state['errors']}"

    # 3. the explorer rendered: read-out text, a plot image, no error message. Every selector is scoped to
    # the cell output that holds the strategy dropdown (other explorers use the same read-out classes)
    explorer = page.locator(".jp-OutputArea-output").filter(has=page.locator(STRATEGY)).first
    explorer.wait_for(timeout=deadline.ms(60))
    readout, error, strategy = explorer.locator(READOUT).first, explorer.locator(ERROR).first, explorer.locator(STRATEGY).first
    expect(readout).to_have_text(re.compile(r"\S"), timeout=deadline.ms(60))
    root = explorer.element_handle()
    page.wait_for_function(IMG_CHANGED, arg=[root, PLOT_IMG, ""], timeout=deadline.ms(60), polling=250)
    assert error.inner_text().strip() == "", f"explorer shows an error in its initial state: {error.inner_text()!r}"
    assert explorer.locator(SPAN).count() > 0, f"no span dropdowns ({SPAN})"
    _snapshot(explorer, shots, "explorer-initial")

    # 4. change the strategy: the plan changes, so must the read-out and the plot
    labels, current = _option_labels(strategy)
    names = {_norm(lb): lb for lb in labels}
    assert {"size_first", "speed_first", "uniform", "custom"} <= set(names), f"strategy options: {labels}"
    target = next(n for n in ["speed_first", "size_first"] if n != _norm(current or ""))
    _expect_change(explorer, readout, error, deadline, expect, lambda: strategy.select_option(label=names[target]),
                   f"strategy {current!r} -> {names[target]!r}")
    _snapshot(explorer, shots, "explorer-strategy-changed")

    # 5. move the ratio slider to its far end (keyboard on the noUiSlider handle): the plan changes again
    handle = explorer.locator(RATIO_HANDLE).first
    lo, hi, now = (float(handle.get_attribute(a)) for a in ("aria-valuemin", "aria-valuemax", "aria-valuenow"))
    key = "End" if now < (lo + hi) / 2 else "Home"
    _expect_change(explorer, readout, error, deadline, expect, lambda: (handle.focus(), handle.press(key)),
                   f"ratio {now} -> {key}")
    assert float(handle.get_attribute("aria-valuenow")) != now, "the ratio slider did not move"
    _snapshot(explorer, shots, "explorer-ratio-changed")

    # 6. pick another module size at the first span position that is not inside a module: a custom plan
    span = explorer.locator(SPAN + ":enabled").first
    labels, current = _option_labels(span)
    choice = next(lb for lb in labels if lb not in (current, "\u00b7"))  # "·" marks a covered position
    _expect_change(explorer, readout, error, deadline, expect, lambda: span.select_option(label=choice),
                   f"span {current!r} -> {choice!r}")
    _snapshot(explorer, shots, "explorer-span-changed")


def _expect_change(explorer, readout, error, deadline, expect, action, what):
    text, src = readout.inner_text(), explorer.locator(PLOT_IMG).first.get_attribute("src")
    action()
    expect(readout).not_to_have_text(text, timeout=deadline.ms(90))
    explorer.page.wait_for_function(IMG_CHANGED, arg=[explorer.element_handle(), PLOT_IMG, src],
                                    timeout=deadline.ms(90), polling=250)
    assert error.inner_text().strip() == "", f"after {what} the explorer shows an error: {error.inner_text()!r}"


def _snapshot(explorer, shots, name):
    """The whole JupyterLab window with the explorer in view, and the explorer alone."""
    explorer.locator(PLOT_IMG).first.scroll_into_view_if_needed()
    explorer.page.screenshot(path=str(shots / f"{name}.png"))
    explorer.screenshot(path=str(shots / f"{name}-widget.png"))


def _failure_snapshot(page, shots):
    try:
        page.screenshot(path=str(shots / "failure.png"), full_page=True, timeout=10_000)
        dialogs = page.locator(".jp-Dialog")
        if dialogs.count():
            (shots / "failure-dialog.txt").write_text(dialogs.first.inner_text(timeout=5_000))
    except Exception:
        pass
