"""Tiny mtlab training runs in a real process, for the multi-process and kill-and-resume tests.

    python tiny_run.py OUT KIND [KIND ...] [--batch-size B] [--steps S] ...
    accelerate launch --multi_gpu --num_processes 2 tiny_run.py OUT KIND ...   (gloo on a CPU-only machine)

KIND is `train` (plain cross-entropy training of a 2+2-layer T5, as the teacher is trained),
`modules` (train_modules on a 4+4-layer teacher), `modules_kd` (the same with only its token-mean
losses, cross-entropy and logit KD) or `recover` (the recovery fine-tune of an FF-merged 4+4-layer
T5). Each run writes its checkpoint and log.csv to OUT/KIND, exactly as a user's run would.
`--pace S` sleeps S seconds per step and writes each checkpoint file in two halves S seconds
apart (a slow disk), so a test can kill the process mid-step or mid-write.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's mtlab, however launched
from mtlab import checkpoint  # noqa: E402
from mtlab.modular import ReplacingConfig, train_modules  # noqa: E402
from mtlab.merging.build import merge_model  # noqa: E402
from mtlab.merging.recover import recover  # noqa: E402
from mtlab.tasks.g2p import G2PTask  # noqa: E402
from mtlab.teacher import TeacherConfig, build_teacher  # noqa: E402
from mtlab.train import TrainConfig, train  # noqa: E402

MERGE = ["encoder:0-2@middle/vanilla", "decoder:1-2/vanilla"]


def tiny_task(words: int) -> G2PTask:
    """The G2P task cut to its first `words` training words: encoding all 100k takes a second per process."""
    task = G2PTask()
    src, tgt = task.splits["train"]
    task.splits["train"] = (src[:words], tgt[:words])
    return task


def t5(task, layers: int, dropout: float):
    torch.manual_seed(0)
    return build_teacher(task.tokenizer, TeacherConfig(d_model=16, d_ff=32, num_heads=2, num_layers=layers,
                                                       num_decoder_layers=layers, dropout=dropout))


def pace(task: G2PTask, seconds: float) -> None:
    """Sleep before each batch the loop takes, and halfway through writing each checkpoint file."""
    collate = task.collate

    def slow_collate(split, index):
        time.sleep(seconds)
        return collate(split, index)

    def slow_save_file(tensors, path, metadata=None):
        data = save(tensors, metadata)
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            time.sleep(seconds)
            f.write(data[len(data) // 2:])

    task.collate = slow_collate
    checkpoint.save_file = slow_save_file


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("kinds", nargs="+", choices=["train", "modules", "modules_kd", "recover"])
    p.add_argument("--batch-size", type=int, default=16, help="per process")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--ckpt-every", type=int, default=3)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--words", type=int, default=2000)
    p.add_argument("--pace", type=float, default=0.0)
    a = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    task = tiny_task(a.words)
    if a.pace:
        pace(task, a.pace)
    cfg = TrainConfig(steps=a.steps, batch_size=a.batch_size, lr=a.lr, warmup=2, label_smoothing=0.1,
                      log_every=1, ckpt_every=a.ckpt_every)
    for kind in a.kinds:
        out = Path(a.out) / kind
        if kind == "train":
            train(t5(task, 2, a.dropout), task, cfg, out, progress=False)
        elif kind.startswith("modules"):
            losses = dict(w_hidden=0.0, w_local=0.0) if kind == "modules_kd" else {}
            train_modules(t5(task, 4, a.dropout), task, ReplacingConfig(granularities=(2, 4), train=cfg, **losses),
                          out, progress=False)
        else:
            recover(merge_model(t5(task, 4, a.dropout), MERGE), task, cfg, out, progress=False)


if __name__ == "__main__":
    main()
