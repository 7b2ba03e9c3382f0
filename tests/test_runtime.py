"""Threads (mtlab/runtime.py): by default torch's count, lowered from the long loops to the cores other
processes leave free; MTLAB_THREADS=N / passive / off and the user's own OMP_* settings win."""
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


def test_default_leaves_openmp_alone_and_adapts():
    env = {}
    s = runtime.configure(env, torch_loaded=False)
    assert env == {} and s["adaptive"] and s["threads"] is None and s["policy_source"] == "torch default"
    s = runtime.configure({"OMP_NUM_THREADS": "2"}, torch_loaded=False)
    assert not s["adaptive"]  # the user's own count wins


def test_passive_sets_the_wait_policy():
    env = {"MTLAB_THREADS": "passive"}
    s = runtime.configure(env, torch_loaded=False)
    assert env["OMP_WAIT_POLICY"] == "PASSIVE" and s["policy_source"] == "mtlab" and not s["adaptive"]


@pytest.mark.parametrize("others, want", [(0.0, 2), (0.3, 2), (0.7, 1), (1.0, 1), (1.9, 1)])
def test_free_cores_count_what_other_processes_leave(others, want):
    before = (100.0, 10.0, 0.0)
    own = 0.8  # this process used 0.8 CPU seconds of the 2 s window: never counted as another's
    after = (100.0 + (others + own / 2) * 2, 10.0 + own, 2.0)
    assert runtime.free_cores(before, after, 2) == want


def test_fit_threads_follows_the_load_at_most_once_per_interval(monkeypatch):
    import torch

    monkeypatch.setattr(runtime, "_STATE", {"mode": "auto", "adaptive": True})
    monkeypatch.setattr(runtime, "_FIT", {})
    monkeypatch.setattr(runtime.os, "cpu_count", lambda: 2)
    start = torch.get_num_threads()
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(n))
    monkeypatch.setattr(torch, "get_num_threads", lambda: calls[-1] if calls else 2)
    calls = []
    clock = {"t": 0.0, "busy": 0.0}

    def sample():
        return clock["busy"], 0.0, clock["t"]

    assert runtime.fit_threads(sample=sample) is None  # the first look only starts a window
    clock.update(t=0.5, busy=1.0)
    assert runtime.fit_threads(sample=sample) is None  # too soon
    clock.update(t=2.0, busy=4.0)  # another process held 2 cores (4 s over 2 s): 1 thread left
    assert runtime.fit_threads(sample=sample) == 1 and calls == [1]
    clock.update(t=3.0, busy=4.1)  # it stopped: back to the count torch had
    assert runtime.fit_threads(sample=sample) == 2 and calls == [1, 2]
    calls.append(3)  # the user set their own count: theirs wins from now on
    clock.update(t=5.0, busy=8.0)
    assert runtime.fit_threads(sample=sample) is None and calls == [1, 2, 3]
    assert start >= 1


def test_other_modes_never_adapt(monkeypatch):
    for mode in ("off", "1", "passive"):
        monkeypatch.setattr(runtime, "_STATE", runtime.configure({"MTLAB_THREADS": mode}, torch_loaded=True))
        assert runtime.fit_threads(sample=lambda: (0.0, 0.0, 0.0)) is None


def test_the_long_loops_check_the_threads():
    import importlib
    import inspect

    for name in ("train", "tasks.base", "capture", "embedding", "tasks.causal_lm", "explore.screen", "minilm"):
        assert "adaptive(" in inspect.getsource(importlib.import_module(f"mtlab.{name}")), name


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
    assert env == {"MTLAB_THREADS": "1", "OMP_NUM_THREADS": "1"} and s["threads"] == 1 and not s["adaptive"]


@pytest.mark.parametrize("bad", ["two", "-1", "0", "1.5"])
def test_a_bad_value_names_the_fix(bad):
    with pytest.raises(ValueError, match="MTLAB_THREADS=.*positive number of threads.*or off"):
        runtime.configure({"MTLAB_THREADS": bad}, torch_loaded=False)


def test_passive_set_after_torch_is_not_effective():
    s = runtime.configure({"MTLAB_THREADS": "passive"}, torch_loaded=True)
    assert s["wait_policy"] == "PASSIVE" and not s["effective"]


def test_passive_reaches_openmp_and_child_processes_when_mtlab_comes_first():
    out = _py("""
        import os, subprocess, sys
        import mtlab
        import torch
        from mtlab import runtime
        s = runtime.settings()
        child = subprocess.run([sys.executable, "-c", "import os; print(os.environ['OMP_WAIT_POLICY'])"],
                               capture_output=True, text=True).stdout.strip()
        print(s["wait_policy"], s["effective"], child)
    """, MTLAB_THREADS="passive")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["PASSIVE", "True", "PASSIVE"]
    assert "ThreadSettingWarning" not in out.stderr


def test_torch_first_needs_no_warning_by_default():
    out = _py("import torch, mtlab; from mtlab import runtime; print(runtime.settings()['adaptive'])")
    assert out.returncode == 0 and out.stdout.strip() == "True" and "ThreadSettingWarning" not in out.stderr


def test_mtlab_threads_n_sets_torch_threads_even_after_torch():
    out = _py("import torch, mtlab; print(torch.get_num_threads())", MTLAB_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    assert out.returncode == 0 and out.stdout.strip() == "1", out.stderr[-2000:]


def test_torch_first_warns_once_with_the_fix():
    out = _py("""
        import torch, importlib
        import mtlab
        from mtlab import runtime
        runtime.configure()   # a second call must not warn again
    """, MTLAB_THREADS="passive")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stderr.count("ThreadSettingWarning") == 1
    assert "Import mtlab before torch" in out.stderr and "unset MTLAB_THREADS" in out.stderr


def test_a_bad_value_stops_the_cli_with_the_fix():
    out = subprocess.run([sys.executable, "-m", "mtlab", "--version"], capture_output=True, text=True, timeout=300,
                         env={**CLEAN, "MTLAB_THREADS": "many"}, cwd=ROOT)
    assert out.returncode != 0 and "MTLAB_THREADS='many' is not understood" in out.stderr


def test_the_test_runner_and_make_set_it_before_torch():
    s = runtime.settings()   # this process: conftest imports mtlab before torch
    assert s["effective"]
    make = (ROOT / "Makefile").read_text()
    assert "MTLAB_THREADS" in make and "OMP_WAIT_POLICY ?=" not in make  # nothing forced on every target


def test_describe_names_threads_and_policy():
    assert "threads, OpenMP wait policy" in runtime.describe()


def test_the_report_index_names_threads_and_wait_policy(tmp_path):
    import pandas as pd

    from mtlab.notebooks import write_index

    runs = pd.DataFrame([{"notebook": "00_teacher", "profile": "smoke", "seconds": 1.0, "status": "ok"}])
    page = write_index(tmp_path, runs, "smoke").read_text()
    assert "threads, OpenMP wait policy" in page
