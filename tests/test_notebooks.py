"""Every notebook runs top to bottom in the smoke profile (papermill); a cell error fails the test."""
from pathlib import Path

import pytest

# the tables each notebook writes to OUT (make report's reports/)
WRITES = {"02_train_modules": ["modular.csv"], "04_merge_ffs": ["merge.csv"], "05_frontier": ["frontier.csv"],
          "06_minilm": ["minilm.csv"],
          "07_your_model": [f"your_model_{t}.csv" for t in ("ladder", "merge", "screen", "export")]}
REPO = Path(__file__).parent.parent
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_in_smoke_profile(path, tmp_path):
    import papermill

    papermill.execute_notebook(str(path), str(tmp_path / path.name), parameters={"PROFILE": "smoke", "OUT": str(tmp_path / "out")},
                               kernel_name="python3", cwd=str(path.parent), progress_bar=False)
    for name in WRITES.get(path.stem, []):
        assert (tmp_path / "out" / name).stat().st_size > 0, f"{path.name} did not write {name}"


def test_notebooks_are_committed_without_outputs():
    import json

    for path in NOTEBOOKS:
        cells = json.loads(path.read_text())["cells"]
        assert not any(c.get("outputs") for c in cells if c["cell_type"] == "code"), f"{path.name} has outputs"


def test_your_model_notebook_renders_clean_and_exports_plain_folders(tmp_path):
    """Notebook 07 through make report's engine (smoke, the demo model): exported folders that plain
    transformers loads, and a page without machine paths, warnings or load/save progress bars."""
    from transformers import AutoModelForCausalLM

    from mtlab.cache import cache_root
    from mtlab.notebooks import run_notebooks

    run_notebooks(tmp_path, "smoke", only=["07_your_model"])
    page = (tmp_path / "07_your_model.html").read_text()
    for root in (str(REPO.resolve()), str(tmp_path), str(cache_root())):
        assert root not in page, f"{root} shown in the rendered notebook"
    for noise in ("PosixPath", "Warning", "[transformers]", "Loading weights", "Writing model shards"):
        assert noise not in page, f"{noise!r} in the rendered notebook"
    assert "Conclusion" in page and "plain transformers reloads them" in page
    assert "07_your_model.html" in (tmp_path / "index.html").read_text()
    exported = sorted(p for p in (tmp_path / "your_model").iterdir() if p.is_dir())
    assert len(exported) == 2 and all(type(AutoModelForCausalLM.from_pretrained(p)).__name__ == "GPT2LMHeadModel"
                                      for p in exported)
