import os
import tempfile

import pytest

import mtlab  # noqa: F401  (before torch: sets the OpenMP wait policy, mtlab/runtime.py)
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# one fresh artifact cache for the whole session: experiment tests and the smoke notebooks
# share it (the notebook kernels inherit the environment), and nothing lands in ./cache
# (MTLAB_TEST_CACHE points it elsewhere, e.g. `make figures` reuses the report's cache/)
os.environ["MTLAB_CACHE"] = os.environ.get("MTLAB_TEST_CACHE") or tempfile.mkdtemp(prefix="mtlab-test-cache-")
THREADS = os.environ.get("MTLAB_TEST_THREADS", "1")
torch.set_num_threads(int(THREADS))
# notebook kernels (separate processes) inherit this: one thread each, as the suite itself runs
os.environ.setdefault("OMP_NUM_THREADS", THREADS)


@pytest.fixture(scope="session")
def g2p_task():
    from mtlab.tasks.g2p import G2PTask

    return G2PTask()


@pytest.fixture
def tiny_t5(g2p_task):
    """A 2+2-layer T5 of the teacher's shape family, random weights, for fast loop tests."""
    from mtlab.teacher import TeacherConfig, build_teacher

    torch.manual_seed(0)
    return build_teacher(g2p_task.tokenizer, TeacherConfig(d_model=16, d_ff=32, num_heads=2, num_layers=2,
                                                           num_decoder_layers=2, dropout=0.1))


@pytest.fixture(scope="session")
def smoke_report(tmp_path_factory):
    """Every notebook run and rendered ONCE per session in the smoke profile by make report's engine
    (reports/*.html, index.html, notebooks.csv with each notebook's status), shared by test_notebooks.py,
    test_pages.py and test_report_format.py. MTLAB_SMOKE_REPORT=DIR reuses a report already rendered there."""
    from pathlib import Path

    from mtlab.notebooks import ReportError, run_notebooks

    if os.environ.get("MTLAB_SMOKE_REPORT"):
        return Path(os.environ["MTLAB_SMOKE_REPORT"])
    out = tmp_path_factory.mktemp("smoke-report")
    try:
        run_notebooks(out, "smoke")
    except ReportError:
        pass  # each notebook's test reads its status from notebooks.csv and fails there
    return out
