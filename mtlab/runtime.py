"""How mtlab runs torch on the CPU: the OpenMP wait policy and thread count, set before torch loads.

torch's CPU kernels run on OpenMP worker threads. By default an idle worker SPINS for a while
waiting for the next parallel region; when another process holds a core, the scheduler parks a
sibling thread and every short parallel region (mtlab's models are small: d_model 128-384) waits
for it while the other spins. Measured on a 2-core machine with one other CPU-bound torch job
running: greedy decoding of 256 dev words took 7-30 s with torch's default 2 threads, 1.7-2.4 s
with 1 thread and 2.2-2.9 s with 2 threads and ``OMP_WAIT_POLICY=PASSIVE``; idle, PASSIVE cost
nothing (0.88-1.05 s against 0.94-1.08 s). See ``benchmarks/threads.py`` (reports/threads.csv)
for every hot path.

So mtlab puts ``OMP_WAIT_POLICY=PASSIVE`` (workers sleep instead of spinning) into the environment
when the package is imported. OpenMP reads it ONCE, when the runtime loads with ``import torch``,
so it takes effect when mtlab is imported first: the CLI (``mtlab ...``, ``python -m mtlab``),
the Makefile (which also exports it), the test runner (tests/conftest.py imports mtlab before
torch) and the notebook kernels of ``make report`` (they inherit this environment). A process
that imported torch before mtlab keeps its policy; mtlab then warns once, naming the fix.

Override with the environment variable ``MTLAB_THREADS``:

- unset or ``auto``: wait policy PASSIVE (unless ``OMP_WAIT_POLICY`` is already set: a user's own
  value wins), thread count left to torch (or to your ``OMP_NUM_THREADS``);
- ``N`` (a positive integer): as ``auto``, and N threads (``OMP_NUM_THREADS=N`` for this process
  and its children, ``torch.set_num_threads(N)`` if torch is already loaded);
- ``off``: mtlab touches nothing (torch's defaults, spin-waiting included).
"""
from __future__ import annotations

import os
import sys
import warnings
from typing import MutableMapping

ENV = "MTLAB_THREADS"
POLICY = "PASSIVE"
_STATE: dict = {}


class ThreadSettingWarning(RuntimeWarning):
    """torch was loaded before mtlab could set the OpenMP wait policy."""


def parse(value: str | None) -> str | int:
    """`MTLAB_THREADS` as "auto", "off" or a positive thread count; a clear error otherwise."""
    v = (value or "auto").strip().lower()
    if v in ("auto", "", "default"):
        return "auto"
    if v in ("off", "none"):
        return "off"
    try:
        n = int(v)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"{ENV}={value!r} is not understood: set it to auto (the default: PASSIVE OpenMP wait "
                         "policy, torch's thread count), a positive number of threads (e.g. 1), or off (torch's "
                         f"defaults), or unset it")
    return n


def configure(environ: MutableMapping[str, str] | None = None, *, torch_loaded: bool | None = None) -> dict:
    """Apply `MTLAB_THREADS` (see the module doc) to `environ` (default os.environ) and, when a
    thread count is asked for and torch is loaded, to torch. Returns what was decided (also kept
    for `settings()`): mode, wait_policy, policy_source ("mtlab", "user" or "torch default"),
    threads (None: torch's choice) and effective (False when torch loaded before the policy was set)."""
    env = os.environ if environ is None else environ
    loaded = ("torch" in sys.modules) if torch_loaded is None else torch_loaded
    mode = parse(env.get(ENV))
    state = {"mode": mode, "threads": None, "wait_policy": env.get("OMP_WAIT_POLICY"), "effective": True}
    if mode == "off":
        state["policy_source"] = "user" if state["wait_policy"] else "torch default"
    else:
        if env.get("OMP_WAIT_POLICY"):
            state["policy_source"] = "user"
        else:
            env["OMP_WAIT_POLICY"] = POLICY
            state.update(wait_policy=POLICY, policy_source="mtlab", effective=not loaded)
        if isinstance(mode, int):
            env["OMP_NUM_THREADS"] = str(mode)
            state["threads"] = mode
            if loaded and environ is None:
                import torch

                torch.set_num_threads(mode)
    if environ is None:
        _STATE.clear()
        _STATE.update(state)
        if not state["effective"] and not _STATE.get("warned"):
            _STATE["warned"] = True
            warnings.warn(
                "torch was imported before mtlab, so its OpenMP threads keep spin-waiting, which slows torch 3-15x "
                "when another process uses a core. Import mtlab before torch, or set OMP_WAIT_POLICY=PASSIVE (or "
                f"{ENV}=1) in the environment before starting Python; {ENV}=off silences this.",
                ThreadSettingWarning, stacklevel=3)
    return state


def settings() -> dict:
    """What `configure` decided for this process, plus torch's current thread count if torch is loaded."""
    out = dict(_STATE) if _STATE else configure(dict(os.environ), torch_loaded="torch" in sys.modules)
    out.pop("warned", None)
    if "torch" in sys.modules:
        out["torch_threads"] = sys.modules["torch"].get_num_threads()
    return out


def describe() -> str:
    """One line for reports: threads and wait policy of this process."""
    s = settings()
    threads = s.get("torch_threads", s.get("threads") or "torch default")
    policy = s.get("wait_policy") or "OpenMP default (spin)"
    note = "" if s.get("effective", True) else " (set after torch loaded: not in effect)"
    return f"{threads} threads, OpenMP wait policy {policy}{note}"


__all__ = ["configure", "settings", "describe", "parse", "ENV", "POLICY", "ThreadSettingWarning"]
