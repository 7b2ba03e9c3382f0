"""How mtlab runs torch on the CPU: threads that follow the free cores, set from the hot loops.

torch's CPU kernels run on OpenMP worker threads, one per core by default, and an idle worker
SPINS for a while waiting for the next parallel region. When another process holds a core, the
scheduler parks a sibling thread and every short parallel region (mtlab's models are small:
d_model 128-384) waits for it while the other spins. `benchmarks/threads.py` measured it on 2
cores (reports/threads.csv; idle, then next to one busy torch process): torch's 2 threads are
the fastest idle and 3-8x slower busy; 1 thread is 1.1-1.6x slower idle and the fastest busy;
OMP_WAIT_POLICY=PASSIVE sits between and costs 1.1-1.7x idle. No fixed setting is right both ways.

So by default (`MTLAB_THREADS` unset or `auto`) mtlab leaves the OpenMP settings alone and, from
its long loops (training steps, decoding, CKA statistics, screening, embedding: `fit_threads`,
`adaptive`), sets torch's thread count to the cores that other processes leave free: it reads
the machine's busy CPU time (/proc/stat) minus its own over the last second or more, at most once
a second. Idle it keeps torch's own count; next to a busy process it drops to what is free (at
least 1). Timed measurements (`mtlab.measure`) set their own thread count and are not adapted.

Override with the environment variable ``MTLAB_THREADS``:

- unset or ``auto``: adaptive thread count as above (off where /proc/stat is missing, or when you
  set ``OMP_NUM_THREADS`` yourself: your count wins);
- ``N`` (a positive integer): N threads, fixed (``OMP_NUM_THREADS=N`` for this process and its
  children, ``torch.set_num_threads(N)`` if torch is already loaded);
- ``passive``: torch's thread count with ``OMP_WAIT_POLICY=PASSIVE`` (waiting workers sleep; read
  once when torch loads, so import mtlab first);
- ``off``: mtlab touches nothing (torch's defaults).
"""
from __future__ import annotations

import os
import sys
import time
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
    if v == "passive":
        return "passive"
    try:
        n = int(v)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"{ENV}={value!r} is not understood: set it to auto (the default: torch's "
                         "threads, fewer while other processes hold cores), a positive number of threads (e.g. 1), passive, or off "
                         f"(torch's defaults), or unset it")
    return n


def configure(environ: MutableMapping[str, str] | None = None, *, torch_loaded: bool | None = None) -> dict:
    """Apply `MTLAB_THREADS` (see the module doc) to `environ` (default os.environ) and, when a
    thread count is asked for and torch is loaded, to torch. Returns what was decided (also kept
    for `settings()`): mode, wait_policy, policy_source ("mtlab", "user" or "torch default"),
    threads (None: torch's choice), adaptive (whether `fit_threads` follows the free cores) and
    effective (False when the wait policy was set after torch loaded)."""
    env = os.environ if environ is None else environ
    loaded = ("torch" in sys.modules) if torch_loaded is None else torch_loaded
    mode = parse(env.get(ENV))
    state = {"mode": mode, "threads": None, "wait_policy": env.get("OMP_WAIT_POLICY"), "effective": True,
             "adaptive": mode == "auto" and not env.get("OMP_NUM_THREADS") and os.path.exists(PROC_STAT)}
    state["policy_source"] = "user" if state["wait_policy"] else "torch default"
    if mode == "passive" and not env.get("OMP_WAIT_POLICY"):
        env["OMP_WAIT_POLICY"] = POLICY
        state.update(wait_policy=POLICY, policy_source="mtlab", effective=not loaded)
    if isinstance(mode, int):
        env["OMP_NUM_THREADS"] = str(mode)
        state["threads"] = mode
        if loaded and environ is None:
            import torch

            torch.set_num_threads(mode)
    if environ is None:
        if state["adaptive"]:  # the first window starts now: the first loop after loading a model can decide
            _FIT.clear()
            _FIT["sample"] = cpu_seconds()
        warned = _STATE.get("warned")
        _STATE.clear()
        _STATE.update(state, warned=warned)
        if not state["effective"] and not warned:
            _STATE["warned"] = True
            warnings.warn(
                "torch was imported before mtlab, so MTLAB_THREADS=passive cannot reach OpenMP (it reads "
                "OMP_WAIT_POLICY once, when torch loads). Import mtlab before torch, or set OMP_WAIT_POLICY=PASSIVE "
                f"in the environment before starting Python; unset {ENV} for the adaptive default.",
                ThreadSettingWarning, stacklevel=3)
    return state


# ---------------------------------------------------------------------------
# the adaptive thread count

PROC_STAT = "/proc/stat"
INTERVAL = 1.0  # seconds between two decisions: shorter windows see scheduler noise, not load
_FIT: dict = {}


def cpu_seconds() -> tuple[float, float, float]:
    """(machine busy CPU seconds, this process's CPU seconds, wall seconds) now: /proc/stat's
    user+nice+system+irq+softirq+steal over all cores, `time.process_time`, `time.monotonic`."""
    with open(PROC_STAT) as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7]
    return busy / os.sysconf("SC_CLK_TCK"), time.process_time(), time.monotonic()


def free_cores(before: tuple[float, float, float], after: tuple[float, float, float], cores: int) -> int:
    """Cores other processes left free between two `cpu_seconds` samples: all cores minus the
    others' average use (rounded: 0.6 of a core counts as taken), at least 1."""
    wall = after[2] - before[2]
    if wall <= 0:
        return cores
    others = max(0.0, (after[0] - before[0]) - (after[1] - before[1])) / wall
    return max(1, cores - int(others + 0.4))


def fit_threads(*, sample=None) -> int | None:
    """In the default mode, set torch's thread count to the cores other processes leave free
    (never above torch's own count when mtlab first looked), at most once per `INTERVAL`; call it
    from long loops. Returns the count set, or None when nothing was decided (other modes, no
    /proc/stat, torch not loaded, too soon). `sample` replaces `cpu_seconds` (tests)."""
    if not _STATE:
        configure()
    if not _STATE.get("adaptive") or "torch" not in sys.modules:
        return None
    torch = sys.modules["torch"]
    if "threads" in _FIT and torch.get_num_threads() != _FIT["threads"]:  # the user set a count: theirs wins
        _STATE["adaptive"] = False
        return None
    last = _FIT.get("sample")
    if sample is None and last is not None and time.monotonic() - last[2] < INTERVAL:
        return None  # checked before reading /proc/stat: a loop calls this every item
    now = (sample or cpu_seconds)()
    if last is None or now[2] - last[2] < INTERVAL:
        _FIT.setdefault("sample", now)
        _FIT.setdefault("max", torch.get_num_threads())
        return None
    _FIT["sample"] = now
    n = min(_FIT.setdefault("max", torch.get_num_threads()), free_cores(last, now, os.cpu_count() or 1))
    if n != torch.get_num_threads():
        torch.set_num_threads(n)
    _FIT["threads"] = n
    return n


def adaptive(iterable):
    """`iterable`, calling `fit_threads()` before each item: wrap a long loop's iterator (a tqdm bar)."""
    for item in iterable:
        fit_threads()
        yield item


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
    adapt = "; adaptive: fewer threads while other processes hold cores" if s.get("adaptive") else ""
    policy = s.get("wait_policy") or "OpenMP default (spin)"
    note = "" if s.get("effective", True) else " (set after torch loaded: not in effect)"
    return f"{threads} threads, OpenMP wait policy {policy}{note}{adapt}"


__all__ = ["configure", "settings", "describe", "parse", "fit_threads", "adaptive", "free_cores", "cpu_seconds", "ENV",
           "POLICY", "ThreadSettingWarning"]
