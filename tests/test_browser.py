"""The explorers in a real browser: headless JupyterLab + Debian's Chromium driven by Playwright.

Opens notebooks/03_assembly_explorer.ipynb (a tmp copy, so autosave never writes outputs into the repo),
runs every cell in the smoke profile, waits for the explorer widget, changes the strategy dropdown and
the ratio slider and a span position, and checks that the read-out and the frontier plot change each time
and no error is shown. Then the merge explorer: tick a stack, drag a window, change the method, fire
two changes at once, untick both stacks at once, make the window invalid; after each, once nothing is
computing, the read-out, the plot's outline (its caption) and the error line must agree with the
controls as the browser shows them. No console error, failed request or HTTP error may occur.

Acting on a pick (issue #27): the custom-plan box always shows the plan in force (after span controls,
a strategy, best-at-a-speed-up); the ratio slider, dragged with the mouse to 3, lands on 3.00 (its options
are the space's ratios); the hover target under the ring names the ringed plan; two pinned picks compare
side by side and the tables fit without horizontal scrolling; the static copies under the live explorers
are hidden while those are on the page; Export writes the plan to a folder that plain transformers
`from_pretrained` reloads and generates with, shows the code that does the same, and refuses a folder of
someone else's files with export's message. In the merge explorer a burst of changes never puts an
intermediate spec in the read-out, which says its numbers are before recovery and gives a verdict.
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
BUDGET = float(os.environ.get("MTLAB_BROWSER_BUDGET", "600"))  # seconds for the whole test, server start to last check

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
CUSTOM_INPUT, RATIO_READOUT = ".mtlab-custom input", ".mtlab-ratio .widget-readout"
SPEC = r"\b(?:encoder|decoder):\d+-\d+@\w+/\w+"
# the read-out's rows as {label: value}
READOUT_ROWS = """root => Object.fromEntries(Array.from(root.querySelectorAll('.mtlab-readout tr')).map(
  tr => [tr.cells[0].innerText.trim(), tr.cells[1].innerText.trim()]))"""
# the hover target under the centre of the ringed plan's target, and where it is against the plot image
HOVER = """root => { const t = root.querySelector('.mtlab-pt-selected'), img = root.querySelector('.mtlab-plot img');
  if (!t || !img) return null;
  const b = t.getBoundingClientRect(), i = img.getBoundingClientRect();
  const x = b.left + b.width / 2, y = b.top + b.height / 2, hit = document.elementFromPoint(x, y);
  return {plan: t.dataset.plan, title: t.title, hit: hit && hit.dataset ? hit.dataset.plan : null,
          inside: x > i.left && x < i.right && y > i.top && y < i.bottom}; }"""
NO_HSCROLL = """el => Array.from(el.querySelectorAll('div')).filter(d => d.scrollWidth > d.clientWidth + 1).length === 0"""
# every text the merge read-out shows, recorded in the page from now on
RECORD_READOUT = """root => { const r = root.querySelector('.mtlab-readout'); window.__mtlabReadouts = [r.innerText];
  new MutationObserver(() => window.__mtlabReadouts.push(r.innerText)).observe(r, {subtree: true, childList: true,
  characterData: true}); }"""
# a burst of changes in one go: the decoder's anchor to "first", the encoder window's upper handle down and up
# again, its lower handle one step up (noUiSlider handles answer arrow keys with a change event each)
BURST = """root => {
  const rows = Array.from(root.querySelectorAll('.mtlab-merge-on')).map(on => on.parentElement);
  const sel = rows[1].querySelector('.mtlab-anchor select');
  sel.selectedIndex = Array.from(sel.options).findIndex(o => o.textContent.trim() === 'first');
  sel.dispatchEvent(new Event('change', {bubbles: true}));
  const key = (h, k) => h.dispatchEvent(new KeyboardEvent('keydown', {key: k, bubbles: true}));
  const up = rows[0].querySelector('.noUi-handle-upper'), lo = rows[0].querySelector('.noUi-handle-lower');
  key(up, 'ArrowLeft'); key(up, 'ArrowRight'); key(lo, 'ArrowRight');
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
    assert {"size_first", "speed_first", "custom"} <= set(names), f"strategy options: {labels}"
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
    _act_on_picks(page, explorer, readout, error, strategy, names, deadline, shots, expect, lab)


def _quiet(page, readout, deadline, polls: int = 4):
    """Wait until the kernel is idle and the read-out has stayed the same for `polls` polls in a row (a burst
    of changes, each answered in turn, is over)."""
    import time

    same, last = 0, None
    while same < polls:
        if deadline.left() < 1:
            raise AssertionError("the explorer never settled")
        text = readout.inner_text()
        same = same + 1 if text == last and page.evaluate(KERNEL_IDLE) else 0
        last = text
        time.sleep(0.4)  # poll interval, not a wait for a result


def _plan_in_force(explorer) -> str:
    rows = explorer.evaluate(READOUT_ROWS)
    box = explorer.locator(CUSTOM_INPUT).first.input_value()
    assert box == rows["plan"], f"the custom-plan box shows {box!r} while the plan in force is {rows['plan']!r}"
    return rows["plan"]


def _act_on_picks(page, explorer, readout, error, strategy, names, deadline, shots, expect, lab):
    """Issue #27 items 6-8 on the assembly explorer (see the module docstring)."""
    import transformers

    # the static copy under the live explorer is hidden (it would show an older state), a note says so
    static = page.locator(".mtlab-static").first
    assert static.count() and static.is_hidden(), "the static copy shows under the live explorer"
    expect(page.locator(".mtlab-static-note").first).to_be_visible(timeout=deadline.ms(10))

    # 6. the custom box follows the plan in force: a span control set a custom plan; a strategy sets another
    custom = _plan_in_force(explorer)
    _expect_change(explorer, readout, error, deadline, expect, lambda: strategy.select_option(label=names["size_first"]),
                   "strategy -> size_first")
    assert _plan_in_force(explorer) != custom

    # 7. drag the ratio slider to 3 with the mouse: it lands on 3.00 (its options are the ratios of the space)
    handle = explorer.locator(RATIO_HANDLE).first
    base = explorer.locator(".mtlab-ratio .noUi-base").first
    options = int(float(handle.get_attribute("aria-valuemax"))) + 1
    width = base.bounding_box()["width"]
    assert width >= 400, f"the target-ratio slider is {width:.0f} px wide"
    label = explorer.locator(RATIO_READOUT).first

    def drag_to(i: int) -> str:
        """Drag the handle with the mouse to option i; the label the slider lands on."""
        handle.evaluate("e => e.scrollIntoView({block: 'center'})")   # the mouse needs the slider on screen
        bb, hb = base.bounding_box(), handle.bounding_box()
        page.mouse.move(hb["x"] + hb["width"] / 2, hb["y"] + hb["height"] / 2)
        page.mouse.down()
        page.mouse.move(bb["x"] + bb["width"] * i / (options - 1), hb["y"] + hb["height"] / 2, steps=6)
        page.mouse.up()
        return int(round(float(handle.get_attribute("aria-valuenow")))), label.inner_text().strip()

    lo, hi, landed = 0, options - 1, None   # drag until the read-out says 3 (the labels rise with the index)
    for _ in range(2 * options.bit_length() + 2):
        at, landed = drag_to((lo + hi) // 2)
        if float(landed) == 3.0 or lo >= hi:
            break
        lo, hi = (at + 1, hi) if float(landed) < 3.0 else (lo, at - 1)
    assert landed == "3.00", f"the ratio slider has no 3.00 (it landed on {landed})"
    # every probe of the search was a change: wait for the read-out of the last one (a plan at 3x or more)
    _quiet(page, readout, deadline)
    plan = _plan_in_force(explorer)
    ratio = float(explorer.evaluate(READOUT_ROWS)["stack compression"].rstrip("x"))
    assert ratio >= 3.0 and error.inner_text().strip() == "", (plan, ratio, error.inner_text())
    if options < 40:   # the bundled 6+6 teacher
        assert plan == "e=33 d=33", f"size-first at 3.00 chose {plan}"
    _snapshot(explorer, shots, "explorer-ratio-3")

    # 8a. hover: the target under the ring names the ringed plan, and sits on the plot
    hover = explorer.evaluate(HOVER)
    assert hover and hover["plan"] == plan and hover["hit"] == plan and hover["inside"], hover
    assert hover["title"].startswith(plan), hover

    # 8b. best plan at a speed-up: a custom plan, chosen by screened NLL, and the box shows it
    text = readout.inner_text()
    box = explorer.locator(".mtlab-speedup input").first
    box.fill("1.5")
    box.press("Tab")
    explorer.locator("button.mtlab-best").first.click()   # the box may hold 1.5 already: the button picks anyway
    expect(readout).to_contain_text("chosen as", timeout=deadline.ms(60))
    page.wait_for_function(KERNEL_IDLE, timeout=deadline.ms(60), polling=250)
    best = _plan_in_force(explorer)
    speed = float(explorer.evaluate(READOUT_ROWS)["FLOP-ideal speed-up"].rstrip("x"))
    assert speed >= 1.5 and readout.inner_text() != text

    # 8c. pin two picks (the second: the best plan faster than the first): side by side, the tables fit
    # without horizontal scrolling
    explorer.locator(".mtlab-pin").first.click()
    box.fill(f"{speed + 0.01:.2f}")
    box.press("Enter")
    page.wait_for_function(f"([root, b]) => {{ const rows = ({READOUT_ROWS})(root); "
                           "return rows.plan && rows.plan !== b && 'chosen as' in rows; }",
                           arg=[explorer.element_handle(), best], timeout=deadline.ms(60), polling=250)
    page.wait_for_function(KERNEL_IDLE, timeout=deadline.ms(60), polling=250)
    second = _plan_in_force(explorer)
    explorer.locator(".mtlab-pin").first.click()
    compare = explorer.locator(".mtlab-compare").first
    expect(compare).to_contain_text("pick 2", timeout=deadline.ms(30))
    assert second != best and best in compare.inner_text() and second in compare.inner_text(), compare.inner_text()
    for sel in (".mtlab-compare", ".mtlab-history"):
        assert explorer.locator(sel).first.evaluate(NO_HSCROLL), f"{sel} needs horizontal scrolling"
    _snapshot(explorer, shots, "explorer-pinned")
    for sel, name in ((".mtlab-compare", "explorer-compare"), (".mtlab-history", "explorer-history")):
        explorer.locator(sel).first.scroll_into_view_if_needed()
        explorer.locator(sel).first.screenshot(path=str(shots / f"{name}.png"))

    # 8d. export: plain transformers reloads the folder and generates; the code that does the same is shown
    out = explorer.locator(".mtlab-export-out").first
    target = lab.root.parent / "exported"
    explorer.locator(".mtlab-export-dir input").first.fill(str(target))
    explorer.locator(".mtlab-export-dir input").first.press("Enter")
    explorer.locator("button.mtlab-export").first.click()
    expect(out).to_contain_text(f"exported {second} to", timeout=deadline.ms(180))
    assert "export(assemble(" in explorer.locator(".mtlab-export-code").first.inner_text()
    import torch

    net = transformers.AutoModelForSeq2SeqLM.from_pretrained(target).eval()   # plain transformers, no mtlab
    gen = net.generate(input_ids=torch.tensor([[5, 6, 7, 8]]), max_new_tokens=5)
    assert gen.shape[0] == 1 and gen.shape[1] > 1
    _snapshot(explorer, shots, "explorer-exported")
    # a folder of someone else's files is refused with export's message, and left as it was
    foreign = lab.root.parent / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    explorer.locator(".mtlab-export-dir input").first.fill(str(foreign))
    explorer.locator(".mtlab-export-dir input").first.press("Enter")
    explorer.locator("button.mtlab-export").first.click()
    expect(out).to_contain_text("not exported", timeout=deadline.ms(60))
    assert "overwrite" in out.inner_text() and [p.name for p in foreign.iterdir()] == ["notes.txt"]


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
    if BUSY in status or BUSY in text or "updating" in status or "updating" in snap["caption"]:
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
    statics = page.locator(".mtlab-static")
    assert statics.count() == 2 and all(statics.nth(i).is_hidden() for i in range(2)), "a static copy shows"
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
    snap = _merge_settle(explorer, deadline, "choosing vanilla for the encoder", sizes)
    _snapshot(explorer, shots, "merge-vanilla")

    # 4. a burst: the decoder's anchor, then the encoder window's upper handle down and up, the lower one up:
    # the read-out never shows a spec of an intermediate state
    final_before = snap
    explorer.evaluate(RECORD_READOUT)
    explorer.evaluate(BURST)   # all at once, as fast as the page can send them
    snap = _merge_settle(explorer, deadline, "a burst of changes", sizes)
    assert snap["controls"][1]["anchor"] == "first", snap["controls"]
    final = set(_merge_expectation(snap["controls"])[1])
    before = set(_merge_expectation(final_before["controls"])[1])
    for text in page.evaluate("() => window.__mtlabReadouts"):
        shown = set(re.findall(SPEC, text))
        assert shown <= final or shown == before, f"an intermediate state reached the read-out: {shown} (final {final})"
    rows = explorer.evaluate(READOUT_ROWS)
    assert "before recovery" in rows.get("numbers", ""), rows
    assert re.search(r"(merge|layer pruning) better by|tie on|none:", rows.get("verdict (before recovery)", "")), rows
    _snapshot(explorer, shots, "merge-burst")

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
