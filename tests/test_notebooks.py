"""Every notebook runs top to bottom in the smoke profile (papermill); a cell error fails the test."""
from pathlib import Path

import pytest

# the tables each notebook writes to OUT (make report's reports/)
WRITES = {"02_train_modules": ["modular.csv"], "04_merge_ffs": ["merge.csv"], "05_frontier": ["frontier.csv"],
          "06_minilm": ["minilm.csv"]}
NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


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
