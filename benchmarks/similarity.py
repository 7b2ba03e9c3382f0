"""Claims of mtlab's similarity and merging statistics at paper scale (d_ff 3072), on this CPU:

- all-pairs linear CKA (minibatch estimator, `MinibatchCKA`) of 24 sublayers x 10,000 tokens x
  width 3072 on synthetic activations: <= 20 s;
- correlation (`CorrelationStats`, float64) + alignment (linear assignment) + merge and tie
  (`merge_ffs`) of one 3-layer set at d_ff 3072 on 10,000 tokens of synthetic activations,
  in a 3-layer BERT of BERT-base width: <= 10 s. The other layers' features are the anchor's
  neurons shuffled plus noise, so `recovered` (share of the planted permutation found) checks it;
- capture + CKA (`cka_matrix`, FF outputs of the bundled teacher's 12 sublayers, train split):
  peak memory at 100,000 tokens within 10% of the peak at 10,000 tokens.

Every case runs in its own subprocess, so cases cannot inflate each other's peak. `peak_mb` is
what the case itself needed: the peak resident memory during the case (Linux VmHWM, reset via
/proc/self/clear_refs right before it) minus the resident memory before it. `seconds` times the
statistics only: generating synthetic activations is not timed (their batch buffers do count in
memory). Writes reports/similarity_bench.csv: case, point, tokens, sublayers, d_ff, seconds,
peak_mb, target, ok (and `recovered` for the merge case).

    .venv/bin/python benchmarks/similarity.py [--profile default] [--out reports] [--threads N]
"""
from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from mtlab.profiles import NAMES

BATCH = 1000  # synthetic tokens per batch (what a capture would hand over at once)
SCALE = {  # tokens per case; smoke only checks that the script runs
    "smoke": {"cka": 2000, "merge": 2000, "memory": (1000, 5000), "d": 768},
    "default": {"cka": 10_000, "merge": 10_000, "memory": (10_000, 100_000), "d": 3072},
    "full": {"cka": 10_000, "merge": 10_000, "memory": (10_000, 100_000), "d": 3072},
}


# ---------------------------------------------------------------------------
# memory of this process (Linux)

def _status(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} not in /proc/self/status: peak memory needs Linux")


def _measure(body) -> dict:
    """Run body() -> dict; add peak_mb (peak RSS during it minus RSS before) and rss_before_mb."""
    gc.collect()
    before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    out = body()
    return {**out, "peak_mb": _status("VmHWM") - before, "rss_before_mb": before}


# ---------------------------------------------------------------------------
# cases (each runs in a fresh process)

def case_cka(tokens: int, d: int, layers: int = 24) -> dict:
    import torch

    from mtlab.similarity import MinibatchCKA

    g = torch.Generator().manual_seed(0)
    mix = torch.randn(layers, 64, d, generator=g) / 8  # shared latent -> every layer, so CKA is not ~0
    names = [f"layers.{i}.ff_out" for i in range(layers)]

    def body():
        cka, seconds = MinibatchCKA(names), 0.0
        for _ in range(tokens // BATCH):
            z = torch.randn(BATCH, 64, generator=g)
            for i, name in enumerate(names):
                cka.update(name, z @ mix[i] + torch.randn(BATCH, d, generator=g))
            t0 = time.perf_counter()
            cka.end_batch()
            seconds += time.perf_counter() - t0
        t0 = time.perf_counter()
        M = cka.matrix()
        seconds += time.perf_counter() - t0
        return {"seconds": seconds, "mean_offdiag_cka": float((M.sum() - layers) / (layers * (layers - 1)))}

    return {"case": "all-pairs CKA", "point": "synthetic", "tokens": tokens, "sublayers": layers, "d_ff": d,
            **_measure(body)}


def case_merge(tokens: int, d: int) -> dict:
    import torch
    import transformers as T

    from mtlab.anatomy import anatomy
    from mtlab.merging.merge import merge_ffs
    from mtlab.merging.stats import CorrelationStats

    model = T.BertModel(T.BertConfig(vocab_size=64, hidden_size=d // 4, intermediate_size=d, num_hidden_layers=3,
                                     num_attention_heads=12, max_position_embeddings=64)).eval()
    g = torch.Generator().manual_seed(0)
    perms = {i: torch.randperm(d, generator=g) for i in (0, 2)}  # planted: layer i's neuron perm[j] ~ anchor's j
    mix = torch.randn(32, d, generator=g)

    def body():
        stats, seconds = CorrelationStats(anchor=1), 0.0
        for _ in range(tokens // BATCH):
            a = torch.randn(BATCH, 32, generator=g) @ mix + torch.randn(BATCH, d, generator=g)
            others = {}
            for i, p in perms.items():
                x = torch.empty_like(a)
                x[:, p] = a + 0.5 * torch.randn(BATCH, d, generator=g)
                others[i] = x
            t0 = time.perf_counter()
            stats.update(a, others)
            seconds += time.perf_counter() - t0
        t0 = time.perf_counter()
        corr = {("layers", i): stats.correlation(i) for i in perms}
        merge_ffs(model, ["layers:0-2@middle/permute"], correlations=corr)
        seconds += time.perf_counter() - t0
        from mtlab.merging.align import match

        found = sum(float((match(corr["layers", i]) == p).float().mean()) for i, p in perms.items()) / len(perms)
        tied = anatomy(model).stack("layers").layer(0).ff.w_in.weight is anatomy(model).stack("layers").layer(1).ff.w_in.weight
        return {"seconds": seconds, "recovered": found, "tied": tied}

    return {"case": "correlation + alignment + merge (3 layers)", "point": "synthetic ff_pre", "tokens": tokens,
            "sublayers": 3, "d_ff": d, **_measure(body)}


def case_memory(tokens: int) -> dict:
    import torch

    from mtlab.similarity import cka_matrix
    from mtlab.teacher import load_teacher

    model, task = load_teacher()
    task.encoded("train")  # the split's token ids are data, not the case's memory

    def body():
        t0 = time.perf_counter()
        df = cka_matrix(model, lambda: task.iter_batches("train", 64, shuffle=True, seed=0), "ff_out",
                        max_tokens=tokens, progress=False)
        return {"seconds": time.perf_counter() - t0, "tokens_used": df.attrs["config"]["tokens"]}

    with torch.no_grad():
        return {"case": "capture + CKA (teacher ff_out)", "point": "ff_out", "tokens": tokens, "sublayers": 12,
                "d_ff": model.config.d_ff, **_measure(body)}


# ---------------------------------------------------------------------------

def _child(case: str, tokens: int, d: int, threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)
    run = {"cka": lambda: case_cka(tokens, d), "merge": lambda: case_merge(tokens, d),
           "memory": lambda: case_memory(tokens)}[case]
    print("RESULT " + json.dumps(run(), default=str))


def _spawn(case: str, tokens: int, d: int, threads: int | None) -> dict:
    cmd = [sys.executable, __file__, "--case", case, "--tokens", str(tokens), "--d", str(d)]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"case {case} ({tokens} tokens) failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="default", choices=NAMES)
    ap.add_argument("--out", default="reports")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per case (default: torch's)")
    ap.add_argument("--case", choices=["cka", "merge", "memory"], help=argparse.SUPPRESS)
    ap.add_argument("--tokens", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--d", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.case:
        return _child(a.case, a.tokens, a.d, a.threads)

    s = SCALE[a.profile]
    from tqdm.auto import tqdm

    jobs = [("cka", s["cka"]), ("merge", s["merge"]), *[("memory", n) for n in s["memory"]]]
    rows = [_spawn(case, n, s["d"], a.threads) for case, n in tqdm(jobs, desc="similarity benchmark")]
    df = pd.DataFrame(rows)
    small, large = df[df.case.str.startswith("capture")].peak_mb.tolist()
    df["target"] = ["seconds <= 20", "seconds <= 10", "reference", f"peak within 10% of {small:.0f} MB"]
    df["ok"] = [rows[0]["seconds"] <= 20, rows[1]["seconds"] <= 10, True, large <= 1.1 * small]
    df["threads"] = a.threads or __import__("torch").get_num_threads()
    first = ["case", "point", "tokens", "sublayers", "d_ff", "seconds", "peak_mb", "target", "ok"]
    df = df[first + [c for c in df.columns if c not in first]]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "similarity_bench.csv", index=False)
    pd.set_option("display.width", 220)
    print(df.round(3).to_string(index=False))


if __name__ == "__main__":
    main()
