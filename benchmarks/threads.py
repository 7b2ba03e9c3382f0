"""Threads and the OpenMP wait policy, idle and next to one busy process (issue #23).

Times mtlab's CPU hot paths under four settings, each in a FRESH worker process (OpenMP reads its
environment once, when `import torch` loads it):

- `1thread`           OMP_NUM_THREADS=1
- `2threads`          2 threads, OpenMP's own wait policy (no OMP_WAIT_POLICY: libgomp spins a while
                      before it sleeps): what mtlab did before issue #23
- `2threads_passive`  2 threads, OMP_WAIT_POLICY=PASSIVE (waiting workers sleep)
- `2threads_spin10k`, `2threads_spin30k`  2 threads, libgomp spinning 10,000 / 30,000 times
                      (GOMP_SPINCOUNT; its default is 300,000) before it sleeps
- `default`           a clean environment and `import mtlab` before torch: what mtlab does now
                      (mtlab/runtime.py, MTLAB_THREADS: torch's threads, fewer while other
                      processes hold cores, checked from the loops)

and two loads: `idle`, and `busy` with ONE competing CPU-bound process that this script starts and
stops itself (by default a small torch training loop with torch's own thread and wait settings:
another researcher's job; two spinning OpenMP runtimes on 2 cores are the worst case; `--competitor
python` is a pure-Python busy loop instead). Rounds interleave loads and settings (the order of
the settings rotates each round), so a slow spell of the machine hits every setting.

Hot paths (set-up is not timed; each is run once to warm up, then `reps` times; a worker reports
the median): `decode` (teacher greedy decoding of N dev words, `task.predict`), `train_step` (one
module-replacing step at batch 64 with its AdamW update), `cka` (linear CKA of the teacher's FF
outputs, `cka_matrix`), `screen` (teacher-forced screening of the ladder plans, `explore.screen`),
`minilm_encode` (all-MiniLM-L6-v2 embeddings of N sentences).

Writes reports/threads.csv, one row per path and setting: path, setting, idle_s, busy_s (medians
over rounds), busy_over_idle (the slowdown one busy process causes), idle_over_2threads (idle time
against `2threads` idle, i.e. against mtlab before this issue), busy_over_2threads_idle, idle_iqr /
busy_iqr (interquartile range over median, across rounds), rounds, threads, wait_policy.

    .venv/bin/python benchmarks/threads.py [--out reports] [--rounds 3] [--quick]

Run it on an otherwise idle machine: the `busy` load is the one this script makes. `--quick` is a
smoke run (one round, small inputs) that only checks the script works.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PATHS = ("decode", "train_step", "cka", "screen", "minilm_encode")
STRIP = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MTLAB_THREADS", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "MKL_NUM_THREADS")
SETTINGS = {
    "1thread": {"MTLAB_THREADS": "off", "OMP_NUM_THREADS": "1"},
    "2threads": {"MTLAB_THREADS": "off", "OMP_NUM_THREADS": "2"},
    "2threads_passive": {"MTLAB_THREADS": "off", "OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"},
    # libgomp spins 300,000 times before sleeping when no policy is set; a short spin keeps back-to-back
    # parallel regions fast and stops a parked sibling from costing a whole spin
    "2threads_spin10k": {"MTLAB_THREADS": "off", "OMP_NUM_THREADS": "2", "GOMP_SPINCOUNT": "10000"},
    "2threads_spin30k": {"MTLAB_THREADS": "off", "OMP_NUM_THREADS": "2", "GOMP_SPINCOUNT": "30000"},
    "default": {},
}
SCALE = {  # words decoded, train batch, CKA tokens, screened words, sentences encoded, timed repeats
    "quick": {"words": 32, "batch": 16, "tokens": 500, "screen": 16, "sentences": 32, "reps": 1},
    "full": {"words": 256, "batch": 64, "tokens": 2000, "screen": 64, "sentences": 256, "reps": 3},
}
COMPETITORS = {
    # another torch job: short parallel regions (small matmuls, as mtlab's own models), torch's defaults
    "torch": "import torch\n"
             "m = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 256))\n"
             "opt = torch.optim.AdamW(m.parameters())\nx = torch.randn(64, 256)\n"
             "while True:\n    m(x).square().mean().backward(); opt.step(); opt.zero_grad()\n",
    "python": "x = 0\nwhile True:\n    x = (x * 31 + 7) % 1000003\n",
}


def clean_env(extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in STRIP}
    return {**env, **extra, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


# ---------------------------------------------------------------------------
# the worker: one setting, every path, in this fresh process

def _hot_paths(paths, s: dict) -> dict:
    """{path: callable} with the set-up done (not timed)."""
    import torch

    from mtlab.teacher import load_teacher

    torch.manual_seed(0)
    teacher, task = load_teacher()
    teacher.eval()
    out = {}
    bank = None
    if {"train_step", "screen"} & set(paths):
        from mtlab.modular import ModuleBank

        bank = ModuleBank.build(teacher, (2, 3, 6))
    if "decode" in paths:
        out["decode"] = lambda: task.predict(teacher, "dev", limit=s["words"], progress=False)
    if "train_step" in paths:
        from mtlab.modular import ReplacingConfig
        from mtlab.modular.replacing import Replacer, replacing_loss
        from mtlab.runtime import fit_threads
        from mtlab.train import TrainConfig

        cfg = ReplacingConfig(granularities=(2, 3, 6), train=TrainConfig(steps=1000, batch_size=s["batch"]))
        replacer = Replacer(teacher, bank).train()
        params = [p for p in bank.parameters() if p.requires_grad] or list(bank.parameters())
        opt = torch.optim.AdamW(params, lr=1e-4)
        loss_fn = replacing_loss(cfg)
        batches = [task.collate("train", i) for i in task.batches("train", s["batch"], shuffle=True)[:4]]
        state = {"i": 0}

        def step():  # what one step of mtlab.train's loop runs, its per-step thread check included
            fit_threads()
            b = batches[state["i"] % len(batches)]
            state["i"] += 1
            loss, _ = loss_fn(replacer, b, 900)  # late in the curriculum: p near its end value
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        out["train_step"] = step
    if "cka" in paths:
        from mtlab.similarity import cka_matrix

        def train_batches():  # as the merging study's alignment batches (shuffled train split, batch 64)
            return task.iter_batches("train", 64, shuffle=True, seed=0)

        out["cka"] = lambda: cka_matrix(teacher, train_batches, "ff_out", max_tokens=s["tokens"], progress=False)
    if "screen" in paths:
        from mtlab.explore.screen import screen
        from mtlab.modular import teacher_ladders

        plans = list(dict.fromkeys(str(p) for _, p in teacher_ladders(teacher, bank)))
        out["screen"] = lambda: screen(teacher, bank, task, plans, split="dev", limit=s["screen"],
                                       batch_size=s["screen"], progress=False)
    if "minilm_encode" in paths:
        try:
            from mtlab.minilm import embed, load_minilm, sentences

            mini, tok = load_minilm()
            texts = sentences(n=s["sentences"])["test"]
            out["minilm_encode"] = lambda: embed(mini, tok, texts, batch_size=64)
        except (ImportError, FileNotFoundError) as e:  # the [minilm] extra is not installed: no row values
            print(f"minilm_encode skipped: {e}", file=sys.stderr)
    return out


def worker(setting: str, paths, scale: str) -> None:
    import mtlab  # noqa: F401  (first, as every mtlab entry point: `default` is what it sets up)
    import torch

    s = SCALE[scale]
    fns = _hot_paths(paths, s)
    times = {}
    for name, fn in fns.items():
        grad = torch.enable_grad() if name == "train_step" else torch.no_grad()
        with grad:
            fn()  # warm-up
            t = []
            for _ in range(s["reps"]):
                t0 = time.perf_counter()
                fn()
                t.append(time.perf_counter() - t0)
        times[name] = sorted(t)[len(t) // 2]
    print("RESULT " + json.dumps({"setting": setting, "times": times, "threads": torch.get_num_threads(),
                                  "wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset (OpenMP default)")}))


# ---------------------------------------------------------------------------
# the orchestrator: rounds x loads x settings, each setting a fresh worker

def run_worker(setting: str, paths, scale: str, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", setting, "--scale", scale, "--paths", *paths]
    out = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(SETTINGS[setting]), timeout=timeout)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if out.returncode != 0 or line is None:
        raise RuntimeError(f"worker {setting} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


class Competitor:
    """One busy CPU-bound process, started and stopped by this script (only the process it started)."""

    def __init__(self, kind: str):
        self.kind, self.proc = kind, None

    def __enter__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", COMPETITORS[self.kind]], env=clean_env({}),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(3.0 if self.kind == "torch" else 0.5)  # torch imported, its loop running
        if self.proc.poll() is not None:
            raise RuntimeError(f"the {self.kind} competitor exited at once (code {self.proc.returncode})")
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _iqr(v) -> float:
    import numpy as np

    v = np.asarray(v, float)
    if len(v) < 2:
        return float("nan")
    q1, q3 = np.percentile(v, [25, 75])
    return float((q3 - q1) / np.median(v))


def summarise(raw) -> "pd.DataFrame":
    """reports/threads.csv from the workers' results (one row per path, setting, load, round)."""
    import pandas as pd

    df = pd.DataFrame(raw)
    g = df.groupby(["path", "setting", "load"]).seconds
    med, iqr = g.median().unstack("load"), g.agg(_iqr).unstack("load")
    out = pd.DataFrame({"idle_s": med.get("idle"), "busy_s": med.get("busy"),
                        "idle_iqr": iqr.get("idle"), "busy_iqr": iqr.get("busy")}).reset_index()
    out["busy_over_idle"] = out.busy_s / out.idle_s
    today = out[out.setting == "2threads"].set_index("path").idle_s
    out["idle_over_2threads"] = out.idle_s / out.path.map(today)
    out["busy_over_2threads_idle"] = out.busy_s / out.path.map(today)
    meta = df.groupby("setting").agg(threads=("threads", "first"), wait_policy=("wait_policy", "first"),
                                     rounds=("round", "nunique"))
    out = out.join(meta, on="setting")
    order = {p: i for i, p in enumerate(PATHS)}, {s: i for i, s in enumerate(SETTINGS)}
    out = out.sort_values(["path", "setting"], key=lambda c: c.map(order[0] if c.name == "path" else order[1]))
    cols = ["path", "setting", "idle_s", "busy_s", "busy_over_idle", "idle_over_2threads", "busy_over_2threads_idle",
            "idle_iqr", "busy_iqr", "rounds", "threads", "wait_policy"]
    return out[cols].reset_index(drop=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="reports")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3; --quick: 1)")
    ap.add_argument("--paths", nargs="*", default=list(PATHS), choices=PATHS)
    ap.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--competitor", default="torch", choices=list(COMPETITORS))
    ap.add_argument("--quick", action="store_true", help="a smoke run: one round, small inputs")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--scale", default="full", choices=list(SCALE), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a.worker, a.paths, a.scale)

    import pandas as pd
    from tqdm.auto import tqdm

    scale = "quick" if a.quick else "full"
    rounds = a.rounds or (1 if a.quick else 3)
    if rounds < 1:
        ap.error("--rounds must be at least 1")
    settings = list(a.settings)
    raw = []
    t0 = time.perf_counter()
    with tqdm(total=rounds * 2 * len(settings), desc="threads benchmark") as bar:
        for r in range(rounds):
            k = r % len(settings)
            order = settings[k:] + settings[:k]  # rotate, so no setting always runs first after a load change
            for load in (("idle", "busy") if r % 2 == 0 else ("busy", "idle")):
                ctx = Competitor(a.competitor) if load == "busy" else None
                if ctx:
                    ctx.__enter__()
                try:
                    for setting in order:
                        bar.set_postfix_str(f"round {r + 1} {load} {setting}")
                        res = run_worker(setting, a.paths, scale, timeout=1800)
                        raw += [{"path": p, "setting": setting, "load": load, "round": r, "seconds": sec,
                                 "threads": res["threads"], "wait_policy": res["wait_policy"]}
                                for p, sec in res["times"].items()]
                        bar.update()
                finally:
                    if ctx:
                        ctx.__exit__(None, None, None)
    table = summarise(raw)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "threads.csv", index=False)
    pd.DataFrame(raw).to_csv(out / "threads_raw.csv", index=False)
    pd.set_option("display.width", 220)
    print(table.round(3).to_string(index=False))
    print(f"{rounds} round(s), {scale} inputs, competitor {a.competitor}, {time.perf_counter() - t0:.0f} s; "
          f"wrote {out / 'threads.csv'} (and threads_raw.csv: every worker's times)")


if __name__ == "__main__":
    main()
