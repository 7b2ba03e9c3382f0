"""Kill -9 and resume, in real processes: module training and the FF-merging recovery fine-tune.

Each run (tests/scripts/tiny_run.py: 20 steps, a checkpoint every 2, dropout on so the saved RNG
state matters) is killed with SIGKILL at a random step after its first checkpoint, then rerun
to completion in a new process: its final weights, optimizer state, RNG state and log must equal
those of an uninterrupted run bit for bit. The killed runs write each checkpoint file in two
halves with a pause between (`--pace`, a slow disk); the recovery run is killed in such a pause,
so the checkpoint it was writing is truncated: it lies under checkpoint.tmp, which nothing
loads, and the previous checkpoint is complete. The killed module run's checkpoint is then
moved to checkpoint.old: what a kill between atomic_dir's two renames leaves, from which the
run must resume too.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mtlab.checkpoint import CheckpointError, latest_dir, load_tensors

SCRIPT = Path(__file__).parent / "scripts" / "tiny_run.py"
KINDS = ["modules", "recover"]
ARGS = ["--steps", "20", "--ckpt-every", "2", "--dropout", "0.1"]
WAIT = 180  # seconds: bound on every wait (3 processes share 2 cores at first)


def _start(root: Path, *kinds_and_args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(SCRIPT), str(root), *kinds_and_args, *ARGS],
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=WAIT)
    assert proc.returncode == 0, out[-3000:]
    return out


def _logged_step(run: Path) -> int:
    lines = (run / "log.csv").read_text().split("\n")[1:-1] if (run / "log.csv").exists() else []  # complete rows
    return int(lines[-1].split(",")[0]) if lines else 0


def _kill_when(proc: subprocess.Popen, ready, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before {what}: {proc.stdout.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(uninterrupted root, killed-and-resumed root, {kind: step it was killed after})."""
    ref_root, root = tmp_path_factory.mktemp("uninterrupted"), tmp_path_factory.mktemp("killed")
    procs = {"uninterrupted": _start(ref_root, *KINDS)}
    procs.update({kind: _start(root, kind, "--pace", "0.1") for kind in KINDS})
    try:
        killed = _kill(procs, root)
        latest_dir(root / "modules" / "checkpoint").rename(root / "modules" / "checkpoint.old")
        procs["resumed"] = _start(root, *KINDS)
        out = _finish(procs["resumed"])
        _finish(procs["uninterrupted"])
    finally:
        for proc in procs.values():
            if proc.poll() is None:  # after a failed or timed-out wait: leave nothing running
                proc.kill()
                proc.wait()
    for kind, ckpt in [("modules", "checkpoint.old"), ("recover", "checkpoint")]:
        assert f"resuming from {root / kind / ckpt} at step" in out, f"{kind} did not resume: {out[-2000:]}"
    return ref_root, root, killed


def _kill(procs: dict, root: Path) -> dict[str, int]:
    """SIGKILL module training at a random step, the recovery in a checkpoint write after a random step."""
    rng = random.Random()
    killed = {}
    k = rng.randint(3, 17)  # step 2's checkpoint exists before step 3 starts
    _kill_when(procs["modules"], lambda: _logged_step(root / "modules") >= k, f"modules step {k}")
    killed["modules"] = _logged_step(root / "modules")
    k = rng.randint(3, 17)
    writing = root / "recover" / "checkpoint.tmp" / "weights.safetensors"
    _kill_when(procs["recover"], lambda: _logged_step(root / "recover") >= k and writing.exists(),
               f"a checkpoint write after recovery step {k}")
    killed["recover"] = _logged_step(root / "recover")
    print(f"killed after steps {killed}")
    _check_after_kill(root / "modules", killed["modules"])
    assert _check_after_kill(root / "recover", killed["recover"]), "the recovery run was not killed mid-write"
    return killed


def _check_after_kill(run: Path, step: int) -> bool:
    """Every checkpoint file outside the temporary directory loads fully, and the checkpoint
    resume will use is complete; returns whether checkpoint.tmp holds a half-written one
    (a truncated file, or no state.json yet)."""
    found = latest_dir(run / "checkpoint")
    assert found is not None, f"no checkpoint after being killed at step {step}"
    state = json.loads((found / "state.json").read_text())
    assert 2 <= state["step"] <= step and state["step"] % 2 == 0
    tmp = run / "checkpoint.tmp"
    half_written = tmp.exists() and not (tmp / "state.json").exists()
    for f in run.rglob("*.safetensors"):
        if f.parent.name == "checkpoint.tmp":
            try:
                load_tensors(f)
            except CheckpointError:
                half_written = True
        else:
            assert load_tensors(f)
    return half_written


@pytest.mark.parametrize("kind", KINDS)
def test_killed_run_resumes_to_identical_weights(runs, kind):
    ref_root, root, killed = runs
    ref, run = ref_root / kind, root / kind
    outputs = sorted(f.relative_to(ref) for f in ref.rglob("*.safetensors"))
    # checkpoint weights + optimizer (moments, RNG), and the bank or the merged model
    assert len(outputs) == 3 and outputs == sorted(f.relative_to(run) for f in run.rglob("*.safetensors"))
    for f in outputs:
        a, b = load_tensors(ref / f), load_tensors(run / f)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), f"{f} differs after a kill at step {killed[kind]}"
    drop_seconds = lambda text: [row.rsplit(",", 1)[0] for row in text.splitlines()]  # noqa: E731
    assert drop_seconds((ref / "log.csv").read_text()) == drop_seconds((run / "log.csv").read_text())

