"""Every notebook runs top to bottom in the smoke profile; a cell error fails the test.

The notebooks run once per session through make report's engine (the `smoke_report` fixture of
conftest.py: papermill, then the rendered pages that test_pages.py checks); a notebook's test fails
with the status run_notebooks recorded for it (the failing cell is on its page)."""
from pathlib import Path

import pandas as pd
import pytest

# the tables each notebook writes to OUT (make report's reports/)
WRITES = {"02_train_modules": ["modular.csv"], "04_merge_ffs": ["merge.csv"], "05_frontier": ["frontier.csv"],
          "06_minilm": ["minilm.csv"],
          "07_your_model": [f"your_model_{t}.csv" for t in ("ladder", "merge", "screen", "export")]}
REPO = Path(__file__).parent.parent
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


@pytest.mark.timeout(3600)  # the first test to ask for smoke_report runs every notebook
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_in_smoke_profile(path, smoke_report):
    runs = pd.read_csv(smoke_report / "notebooks.csv").set_index("notebook")
    assert path.stem in runs.index, f"{path.name} was not run"
    status = runs.loc[path.stem, "status"]
    assert status == "ok", f"{path.name} {status} (the failing cell is on {smoke_report / path.stem}.html)"
    for name in WRITES.get(path.stem, []):
        assert (smoke_report / name).stat().st_size > 0, f"{path.name} did not write {name}"


def test_notebooks_are_committed_without_outputs():
    import json

    for path in NOTEBOOKS:
        cells = json.loads(path.read_text())["cells"]
        assert not any(c.get("outputs") for c in cells if c["cell_type"] == "code"), f"{path.name} has outputs"


@pytest.mark.timeout(3600)
def test_your_model_notebook_renders_clean_and_exports_plain_folders(smoke_report):
    """Notebook 07 through make report's engine (smoke, the demo model): exported folders that plain
    transformers loads, and a page without machine paths, warnings or load/save progress bars."""
    from transformers import AutoModelForCausalLM

    from mtlab.cache import cache_root

    tmp_path = smoke_report
    page = (tmp_path / "07_your_model.html").read_text()
    for root in (str(REPO.resolve()), str(tmp_path), str(cache_root())):
        assert root not in page, f"{root} shown in the rendered notebook"
    for noise in ("PosixPath", "Warning", "[transformers]", "Loading weights", "Writing model shards"):
        assert noise not in page, f"{noise!r} in the rendered notebook"
    assert "Conclusion" in page and "plain transformers reloads them" in page
    # issue 27 item 9: the merged model's tied weights are stored as copies; both counts are shown
    assert ">unique params (M)</th>" in page and ">params as stored (M)</th>" in page
    assert "tied weights are written as copies" in page and "unique parameters" in page
    assert "07_your_model.html" in (tmp_path / "index.html").read_text()
    exported = sorted(p for p in (tmp_path / "your_model").iterdir() if p.is_dir())
    assert len(exported) == 2 and all(type(AutoModelForCausalLM.from_pretrained(p)).__name__ == "GPT2LMHeadModel"
                                      for p in exported)
