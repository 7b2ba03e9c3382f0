"""The OpenMP wait policy and thread count (mtlab/runtime.py) are set before torch loads, at every
entry point, and the user's own settings (MTLAB_THREADS, OMP_WAIT_POLICY, OMP_NUM_THREADS) win."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mtlab import runtime

ROOT = Path(__file__).resolve().parents[1]
CLEAN = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MTLAB_THREADS")}


def _py(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300, env={**CLEAN, **env}, cwd=ROOT)


def test_default_sets_passive_and_leaves_threads_alone():
    env = {}
    s = runtime.configure(env, torch_loaded=False)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert s["policy_source"] == "mtlab" and s["effective"] and s["threads"] is None


def test_users_own_settings_win():
    env = {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "3"}
    s = runtime.configure(env, torch_loaded=False)
    assert env == {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "3"} and s["policy_source"] == "user"
    env = {"MTLAB_THREADS": "off"}
    runtime.configure(env, torch_loaded=False)
    assert env == {"MTLAB_THREADS": "off"}   # off: nothing touched


def test_a_thread_count_is_passed_on():
    env = {"MTLAB_THREADS": "1"}
    s = runtime.configure(env, torch_loaded=False)
    assert env["OMP_NUM_THREADS"] == "1" and env["OMP_WAIT_POLICY"] == "PASSIVE" and s["threads"] == 1


@pytest.mark.parametrize("bad", ["two", "-1", "0", "1.5"])
def test_a_bad_value_names_the_fix(bad):
    with pytest.raises(ValueError, match="MTLAB_THREADS=.*positive number of threads.*or off"):
        runtime.configure({"MTLAB_THREADS": bad}, torch_loaded=False)


def test_set_after_torch_is_not_effective():
    s = runtime.configure({}, torch_loaded=True)
    assert s["wait_policy"] == "PASSIVE" and not s["effective"]


def test_import_mtlab_before_torch_reaches_openmp_and_child_processes():
    out = _py("""
        import os, subprocess, sys
        import mtlab
        import torch
        from mtlab import runtime
        s = runtime.settings()
        child = subprocess.run([sys.executable, "-c", "import os; print(os.environ['OMP_WAIT_POLICY'])"],
                               capture_output=True, text=True).stdout.strip()
        print(s["wait_policy"], s["effective"], child)
    """)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["PASSIVE", "True", "PASSIVE"]
    assert "ThreadSettingWarning" not in out.stderr


def test_mtlab_threads_n_sets_torch_threads_even_after_torch():
    out = _py("import torch, mtlab; print(torch.get_num_threads())", MTLAB_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    assert out.returncode == 0 and out.stdout.strip() == "1", out.stderr[-2000:]


def test_torch_first_warns_once_with_the_fix():
    out = _py("""
        import torch, importlib
        import mtlab
        from mtlab import runtime
        runtime.configure()   # a second call must not warn again
    """)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stderr.count("ThreadSettingWarning") == 1
    assert "Import mtlab before torch" in out.stderr and "MTLAB_THREADS=off" in out.stderr


def test_a_bad_value_stops_the_cli_with_the_fix():
    out = subprocess.run([sys.executable, "-m", "mtlab", "--version"], capture_output=True, text=True, timeout=300,
                         env={**CLEAN, "MTLAB_THREADS": "many"}, cwd=ROOT)
    assert out.returncode != 0 and "MTLAB_THREADS='many' is not understood" in out.stderr


def test_the_test_runner_and_make_set_it_before_torch():
    s = runtime.settings()   # this process: conftest imports mtlab before torch
    assert s["effective"] and (s["wait_policy"] or s["mode"] == "off")
    make = (ROOT / "Makefile").read_text()
    assert "OMP_WAIT_POLICY ?= PASSIVE" in make and "export OMP_WAIT_POLICY" in make


def test_describe_names_threads_and_policy():
    assert "threads, OpenMP wait policy" in runtime.describe()


def test_the_report_index_names_threads_and_wait_policy(tmp_path):
    import pandas as pd

    from mtlab.notebooks import write_index

    runs = pd.DataFrame([{"notebook": "00_teacher", "profile": "smoke", "seconds": 1.0, "status": "ok"}])
    page = write_index(tmp_path, runs, "smoke").read_text()
    assert "threads, OpenMP wait policy" in page
