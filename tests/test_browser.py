"""The explorers in a real browser: headless JupyterLab + Debian's Chromium driven by Playwright.

Opens notebooks/03_assembly_explorer.ipynb (a tmp copy, so autosave never writes outputs into the repo),
runs every cell in the smoke profile, waits for the explorer widget, changes the strategy dropdown and
the ratio slider and a span position, and checks that the read-out and the frontier plot change each time
and no error is shown. Then the merge explorer: tick a stack, drag a window, change the method, fire
two changes at once, untick both stacks at once, make the window invalid; after each, once nothing is
computing, the read-out, the plot's outline (its caption) and the error line must agree with the
controls as the browser shows them. No console error, failed request or HTTP error may occur.
Screenshots, the server log and the browser console go to $MTLAB_ARTIFACTS/browser/ (default:
test-artifacts/browser/). The test runs twice: on the bundled teacher, and with the assembly explorer on a
12+12 T5 built from config (85,849 plans, frontier search + sample, plans screened on demand; artifacts
in browser-tiny-12+12/), where every read-out must say how much of the space is screened.
MTLAB_BROWSER_EXPLORER=bundled (or tiny-12+12) runs one of them only.

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
# the assembly explorer's models (notebook 03): the bundled 6+6 teacher and a 12+12 T5 built from config
EXPLORERS = [os.environ["MTLAB_BROWSER_EXPLORER"]] if os.environ.get("MTLAB_BROWSER_EXPLORER") else ["bundled", "tiny-12+12"]
BUDGET = float(os.environ.get("MTLAB_BROWSER_BUDGET", "480"))  # seconds for the whole test, server start to last check

# the widget contract: CSS classes the notebook sets with widget.add_class(...)
STRATEGY = ".mtlab-strategy select"
RATIO_HANDLE = ".mtlab-ratio .noUi-handle"  # ipywidgets 8 sliders are noUiSlider; the handle carries aria-value*
SPAN = ".mtlab-span select"
READOUT = ".mtlab-readout"
PLOT_IMG = ".mtlab-plot img"
ERROR = ".mtlab-error"
MERGE_ON = ".mtlab-merge-on input[type=checkbox]"
STATUS, CAPTION = ".mtlab-status", ".mtlab-caption"
COVERAGE = re.compile(r"screened [\d,]+ of [\d,]+ plans \([\d.e+-]+%\)")   # the assembly read-out's share screened
BUSY = "computing"
# the merge explorer's controls as the browser shows them, one entry per stack row
MERGE_CONTROLS = """root => Array.from(root.querySelectorAll('.mtlab-merge-on')).map(on => {
  const row = on.parentElement, pick = s => row.querySelector(s);
  const label = sel => sel.options[sel.selectedIndex].textContent.trim();
  const val = h => Math.round(parseFloat(pick('.mtlab-merge-range .noUi-handle-' + h).getAttribute('aria-valuenow')));
  return {stack: on.textContent.trim().split(/\\s+/).pop(), on: on.querySelector('input').checked,
          a: val('lower'), b: val('upper'), anchor: label(pick('.mtlab-anchor select')),
          method: label(pick('.mtlab-method select')), anchor_disabled: pick('.mtlab-anchor select').disabled};
})"""
PLOT_SIZE = """root => { const i = root.querySelector('.mtlab-plot img');
  return i && i.complete && i.naturalWidth ? [i.naturalWidth, i.naturalHeight] : null; }"""

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
@pytest.mark.parametrize("explorer", EXPLORERS)
def test_assembly_explorer_in_browser(explorer, tmp_path):
    notebook = NOTEBOOK
    chromium_path = _require_browser()
    from playwright.sync_api import expect, sync_playwright

    deadline = Deadline(BUDGET)
    root, shots = tmp_path / "lab", tmp_path / "artifacts"
    root.mkdir()
    shots.mkdir()
    nb_name = "03_assembly_explorer.ipynb"
    shutil.copy(notebook, root / nb_name)
    env = {"MTLAB_PROFILE": os.environ.get("MTLAB_BROWSER_PROFILE", "smoke"), "OMP_NUM_THREADS": "1",
           "MTLAB_CACHE": os.environ["MTLAB_CACHE"], "MTLAB_EXPLORER": explorer}
    console: list[str] = []
    failures: list[str] = []   # console errors, page errors, failed requests, HTTP errors
    lab = None
    try:
        with jupyter_lab(root, tmp_path / "jupyter", env, deadline) as lab, sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium_path, headless=True, args=["--disable-dev-shm-usage"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            _record_problems(page, console, failures)
            try:
                _drive(page, lab, nb_name, deadline, shots, expect)
                _drive_merge(page, deadline, shots, expect)
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
        (shots / "problems.log").write_text("\n".join(failures))
        if lab is not None and lab.log.exists():
            shutil.copy(lab.log, shots / lab.log.name)
        out = _artifact_dir() if explorer == "bundled" else _artifact_dir().with_name(f"browser-{explorer}")
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(shots, out)
    assert not failures, f"the page logged errors or failed requests (see {_artifact_dir()}/problems.log): {failures[:10]}"


def _record_problems(page, console, failures):
    def on_console(m):
        console.append(f"[{m.type}] {m.text}")
        if m.type == "error":
            failures.append(f"console error: {m.text}")

    page.on("console", on_console)
    page.on("pageerror", lambda e: (console.append(f"[pageerror] {e}"), failures.append(f"page error: {e}")))
    page.on("requestfailed", lambda r: failures.append(f"request failed: {r.method} {r.url} ({r.failure})"))
    page.on("response", lambda r: r.status >= 400 and failures.append(f"HTTP {r.status}: {r.request.method} {r.url}"))


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
    assert COVERAGE.search(readout.inner_text()), f"the read-out does not say how much is screened: {readout.inner_text()!r}"
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
    assert COVERAGE.search(readout.inner_text()), f"no coverage after a span change: {readout.inner_text()!r}"


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


def _merge_expectation(ctrls):
    """What the merge explorer must show for these controls: (kind, specs, caption)."""
    on = [c for c in ctrls if c["on"]]
    if not on:
        return "nothing", [], "outlined: nothing"
    if any(c["b"] <= c["a"] for c in on):
        return "invalid", [], "outlined: nothing"
    specs = [f"{c['stack']}:{c['a']}-{c['b']}@{c['anchor']}/{c['method']}" for c in on]
    return "merge", specs, "outlined: " + "; ".join(f"{c['stack']} {c['a']}-{c['b']}" for c in on)


def _merge_disagreement(snap) -> str | None:
    """Why the read-out, caption or error line disagree with the controls (None: they agree, nothing runs)."""
    kind, specs, caption = _merge_expectation(snap["controls"])
    text, err, status = snap["readout"], snap["error"], snap["status"]
    if BUSY in status or BUSY in text:
        return "still computing"
    if snap["caption"] != caption:
        return f"caption {snap['caption']!r}, expected {caption!r}"
    for c in snap["controls"]:
        if c["anchor_disabled"] != (not c["on"] or c["method"] == "vanilla"):
            return f"{c['stack']} anchor disabled={c['anchor_disabled']} with method {c['method']}, on={c['on']}"
    shown = sorted(re.findall(r"\b(?:encoder|decoder):\d+-\d+@\w+/\w+", text))
    if kind == "nothing":
        return None if "nothing selected" in text and not err and not shown else f"expected 'nothing selected': {text!r}"
    if kind == "invalid":
        return None if err and "invalid state" in text and not shown else f"expected an error and a cleared read-out: {err!r} {text!r}"
    if err:
        return f"error line {err!r} for a valid state"
    if shown != sorted(specs):
        return f"read-out shows {shown}, controls say {specs}"
    return None if "merged parameters" in text and "pruned parameters" in text else f"incomplete read-out {text!r}"


def _merge_settle(explorer, deadline, what, sizes):
    """Poll until the merge explorer agrees with its controls and is idle; fail with the last mismatch."""
    import time

    root = explorer.element_handle()
    while True:
        snap = {"controls": explorer.evaluate(MERGE_CONTROLS)}
        for name, sel in (("readout", READOUT), ("error", ERROR), ("status", STATUS), ("caption", CAPTION)):
            snap[name] = explorer.locator(sel).first.inner_text().strip()
        why = _merge_disagreement(snap)
        if why is None:
            size = explorer.page.evaluate(PLOT_SIZE, root)
            if size:
                sizes.add(tuple(size))
                return snap
            why = "no plot image"
        if deadline.left() < 1:
            raise AssertionError(f"after {what}: {why}\n{snap}")
        time.sleep(0.25)  # poll interval, not a wait for a result


def _drive_merge(page, deadline, shots, expect):
    explorer = page.locator(".jp-OutputArea-output").filter(has=page.locator(MERGE_ON)).first
    explorer.wait_for(timeout=deadline.ms(60))
    explorer.scroll_into_view_if_needed()
    boxes, sizes = explorer.locator(MERGE_ON), set()
    assert boxes.count() == 2, f"expected an encoder and a decoder row, found {boxes.count()}"
    row = lambda i: explorer.locator(".mtlab-merge-on").nth(i).locator("xpath=..")  # noqa: E731
    snap = _merge_settle(explorer, deadline, "the first render", sizes)
    assert snap["controls"][0]["on"] and not snap["controls"][1]["on"], snap["controls"]
    _snapshot(explorer, shots, "merge-initial")

    # 1. tick the decoder
    boxes.nth(1).check()
    _merge_settle(explorer, deadline, "ticking the decoder", sizes)
    _snapshot(explorer, shots, "merge-decoder-ticked")

    # 2. drag the encoder window's lower handle to layer 1 with the mouse
    enc = row(0)
    enc.evaluate("e => e.scrollIntoView({block: 'center'})")   # the mouse needs the slider on screen
    base, handle = enc.locator(".mtlab-merge-range .noUi-base").first, enc.locator(".noUi-handle-lower").first
    lo = float(handle.get_attribute("aria-valuemin"))
    hi = float(enc.locator(".noUi-handle-upper").first.get_attribute("aria-valuemax"))
    bb, hb = base.bounding_box(), handle.bounding_box()
    page.mouse.move(hb["x"] + hb["width"] / 2, hb["y"] + hb["height"] / 2)
    page.mouse.down()
    page.mouse.move(bb["x"] + bb["width"] * (1 - lo) / (hi - lo), hb["y"] + hb["height"] / 2, steps=8)
    page.mouse.up()
    snap = _merge_settle(explorer, deadline, "dragging the encoder window", sizes)
    assert snap["controls"][0]["a"] == 1, f"the drag did not move the window to layer 1: {snap['controls'][0]}"
    _snapshot(explorer, shots, "merge-encoder-dragged")

    # 3. change the encoder's method: vanilla averaging (its anchor is disabled)
    enc.locator(".mtlab-method select").first.select_option(label="vanilla")
    _merge_settle(explorer, deadline, "choosing vanilla for the encoder", sizes)
    _snapshot(explorer, shots, "merge-vanilla")

    # 4. two changes fired at once: the decoder's anchor, then the encoder window's lower handle one step up
    row(1).locator(".mtlab-anchor select").first.select_option(label="first")
    handle.focus()
    handle.press("ArrowRight")
    snap = _merge_settle(explorer, deadline, "two quick changes", sizes)
    assert snap["controls"][1]["anchor"] == "first", snap["controls"]
    _snapshot(explorer, shots, "merge-two-quick-changes")

    # 5. untick both stacks at once
    boxes.nth(0).uncheck()
    boxes.nth(1).uncheck()
    _merge_settle(explorer, deadline, "unticking both stacks", sizes)
    _snapshot(explorer, shots, "merge-none")

    # 6. an invalid window (one layer), then a valid one again
    boxes.nth(0).check()
    _merge_settle(explorer, deadline, "ticking the encoder again", sizes)   # its window is enabled again
    handle.focus()
    handle.press("End")            # the lower handle meets the upper one: a 1-layer window
    snap = _merge_settle(explorer, deadline, "a one-layer window", sizes)
    assert snap["error"], f"no error for a one-layer window: {snap}"
    _snapshot(explorer, shots, "merge-invalid")
    handle.press("Home")
    _merge_settle(explorer, deadline, "widening the window again", sizes)
    _snapshot(explorer, shots, "merge-final")
    assert len(sizes) == 1, f"the heatmap changed size between updates: {sizes}"
