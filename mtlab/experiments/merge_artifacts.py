"""The teacher's combined FF-merging candidates, recovered at a real budget and shipped under data/merging.

A 1,000-step recovery of four candidates does not fit in `make report`, so `make merges`
(`python -m mtlab merges [--only NAME ...]`, `merge_training`) does it once, as `make baselines` does for the
baselines: the window search of the shipping profile (`default`, cached like the study's), the
combined candidates of `experiments.merging.candidates` (permute and vanilla tying 4 of 12 FF
sublayers, layer pruning at equal FF sublayers and at equal parameters), EACH recovered with the
same budget (`combined_recovery_config`: steps, batch, lr, seed) in runs/merging/<name>
(resumable), then exported with a card: spec, method, what is held equal, budget, teacher hash,
scores on the full dev and test splits before and after recovery, the command. The weights are
bf16 (scored after the round trip, as the teacher is): a tied model in `save_merged`'s compact
format, a pruned one as a plain transformers folder (`mtlab.export`).

With `MergingProfile.shipped`, `teacher_merge_table` reads these cards (`shipped_stages`, after
`shipped.verify`) instead of recovering in the cache; `load_merge` returns the model itself.

The control (issue 22, item 10): `original-control` is the teacher itself fine-tuned with the same
`combined_recovery_config` (steps, batch, lr, seed: the same batches), scored on the same words, so
that a recovered candidate's gap to the original splits into what the merge did and what the
fine-tune alone did (`train_control`, `load_control`, `shipped_control`; `make merges` trains it too).
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import torch

from ..cache import teacher_hash
from ..candidate import Budget, Candidate
from ..merging.build import check_ties
from ..merging.merge import MERGES_NAME, load_merged
from ..merging.methods import merge_methods
from ..profiles import MergingProfile
from ..shipped import ArtifactMismatch, verify
from ..teacher import ROOT
from .merge_recipe import ANCHOR, COMBINED_SIZE, CONTROL, combined_recovery_config

MERGE_DIR = ROOT / "data" / "merging"
MERGE_WORK = ROOT / "runs" / "merging"
MERGE_COMMAND = "make merges"
MERGE_PROFILE = "default"          # the profile whose search and budget are shipped (the report's)
NOT_SHIPPED = "not shipped: make merges"
COMPARE = {"equal FF sublayers": "equal-ff", "equal params": "equal-params"}
SEARCH_FIELDS = ("align_tokens", "select_limit", "window_sizes", "window_starts")  # what picks the windows

CONTROL_NAME = "original-control"  # the teacher fine-tuned like the combined candidates (the control)

__all__ = ["MERGE_DIR", "MERGE_COMMAND", "NOT_SHIPPED", "load_merge", "merge_card_config", "merge_name", "merge_names",
           "shipped_stages", "shipped_summary", "shipped_teacher", "CONTROL_NAME", "control_card_config", "load_control",
           "shipped_control"]  # training them: mtlab.experiments.merge_training


def merge_name(c: Candidate) -> str:
    """The shipped folder of a combined candidate: METHOD-equal-ff or METHOD-equal-params."""
    return f"{c.method}-{COMPARE[c.info['compare']]}"


def merge_names() -> list[str]:
    """Every name a combined candidate can ship under (which exist depends on the search)."""
    return [f"{m}-equal-ff" for m in (*merge_methods(), "layer_prune")] + ["layer_prune-equal-params", CONTROL_NAME]


def merge_card_config(c: Candidate, m: MergingProfile) -> dict:
    """What a shipped candidate must match: its recovery recipe, its spec and the search settings."""
    return {"recovery": asdict(combined_recovery_config(m)), "spec": c.label, "anchor": ANCHOR,
            "combined_size": COMBINED_SIZE, "search": {k: getattr(m, k) for k in SEARCH_FIELDS}}


def _verified(c: Candidate, m: MergingProfile, root: str | Path | None) -> tuple[Path, dict]:
    path = Path(root or MERGE_DIR) / merge_name(c)
    remake = f"{MERGE_COMMAND} (or python -m mtlab merges --only {merge_name(c)})"
    return path, verify(path, teacher_hash=teacher_hash(), config=merge_card_config(c, m), remake=remake)


def shipped_stages(c: Candidate, m: MergingProfile, root: str | Path | None = None) -> list[dict] | None:
    """A shipped candidate's rows of the merge table (before and after recovery, full splits, from
    its verified card); None when it is not shipped yet. A card from another teacher or recipe raises."""
    try:
        _, card = _verified(c, m, root)
    except ArtifactMismatch:
        if (Path(root or MERGE_DIR) / merge_name(c)).exists():
            raise
        print(f"merge candidate {merge_name(c)} is not shipped yet (`{MERGE_COMMAND}` recovers it); its row "
              "stays empty", flush=True)
        return None
    size = {k: card[k] for k in ("params", "ff_removed", "blocks_removed")}
    return [{**size, "recovery_steps": 0, **card["before"]},
            {**size, "recovery_steps": card["steps"], "recovery_seconds": card["train_seconds"], **card["after"]}]


def shipped_teacher(c: Candidate, root: str | Path | None = None) -> dict | None:
    """The teacher's scores on the words a shipped candidate was scored on (its card's `teacher`:
    dev_*/test_* with dev_n/test_n, the same scorer and splits as its `before`/`after`), so that the
    candidate is compared with the original on the same words; None when it is not shipped."""
    from ..shipped import read_card

    path = Path(root or MERGE_DIR) / merge_name(c)
    if not (path / "card.json").exists():
        return None
    teacher = dict(read_card(path).get("teacher") or {})
    return teacher if "test_n" in teacher else None


def load_merge(c: Candidate, m: MergingProfile, root: str | Path | None = None) -> Candidate:
    """The shipped, recovered model of combined candidate `c` (float32, eval mode), with its test and
    dev scores and budget from the card, after `shipped.verify` (teacher hash, recipe, spec, files)."""
    from transformers import AutoModelForSeq2SeqLM

    path, card = _verified(c, m, root)
    model_dir = path / "model"
    if (model_dir / MERGES_NAME).exists():
        net = load_merged(model_dir).float().eval()
        check_ties(net)
    else:
        net = AutoModelForSeq2SeqLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return Candidate(c.method, c.spec, net, card["compare"], Budget(1, card["steps"], card["train_seconds"]),
                     provenance="shipped", scores=dict(card["after"]), info=dict(c.info))


def control_card_config(m: MergingProfile) -> dict:
    """What the shipped control must match: the combined candidates' recovery recipe, on the teacher itself."""
    return {"recovery": asdict(combined_recovery_config(m)), "spec": "original", "control": CONTROL}


def _control_verified(m: MergingProfile, root: str | Path | None) -> tuple[Path, dict]:
    path = Path(root or MERGE_DIR) / CONTROL_NAME
    remake = f"{MERGE_COMMAND} (or python -m mtlab merges --only {CONTROL_NAME})"
    return path, verify(path, teacher_hash=teacher_hash(), config=control_card_config(m), remake=remake)


def load_control(m: MergingProfile, root: str | Path | None = None) -> Candidate:
    """The shipped control: the teacher fine-tuned with `combined_recovery_config(m)` (float32, eval
    mode), with its scores and budget from the card, after `shipped.verify` (teacher hash, recipe, files)."""
    from transformers import AutoModelForSeq2SeqLM

    path, card = _control_verified(m, root)
    net = AutoModelForSeq2SeqLM.from_pretrained(path / "model", dtype=torch.float32).eval()
    return Candidate("control", "original", net, CONTROL, Budget(1, card["steps"], card["train_seconds"]),
                     provenance="shipped", scores=dict(card["after"]), info={"kind": "control"})


def shipped_control(m: MergingProfile, root: str | Path | None = None) -> dict | None:
    """The control's row after recovery (full splits, from its verified card: steps, seconds, dev_*/test_*
    with dev_n/test_n); None when it is not shipped yet. A card from another teacher or recipe, or a
    modified weights file, raises `ArtifactMismatch`."""
    try:
        _, card = _control_verified(m, root)
    except ArtifactMismatch:
        if (Path(root or MERGE_DIR) / CONTROL_NAME).exists():
            raise
        print(f"the control {CONTROL_NAME} is not shipped yet (`{MERGE_COMMAND}` fine-tunes it); its row stays "
              "empty", flush=True)
        return None
    return {"params": card["params"], "ff_removed": 0, "blocks_removed": 0, "recovery_steps": card["steps"],
            "recovery_seconds": card["train_seconds"], **card["after"]}


def shipped_summary(root: str | Path | None = None) -> pd.DataFrame:
    """One row per shipped candidate (from the cards, not verified): spec, parameters removed, budget,
    test PER/WER and relative word accuracy before and after recovery; `attrs["target"]` says whether
    permute at 4 of 12 FF sublayers keeps relative word accuracy >= .99 and beats layer pruning at
    equal parameters (test WER after recovery)."""
    from ..shipped import read_card

    root = Path(root or MERGE_DIR)
    cards = [read_card(p.parent) for p in sorted(root.glob("*/card.json"))] if root.is_dir() else []
    df = pd.DataFrame([{"name": c["name"], "method": c["method"], "compare": c["compare"], "spec": c["spec"],
                        "params_removed_frac": c["params_removed_frac"], "steps": c["steps"], "batch_size": c["batch_size"],
                        "train_seconds": c["train_seconds"], "words": c["words"],
                        **{f"test_{m}@{stage}": c[key][f"test_{m}"] for stage, key in (("0", "before"), ("after", "after"))
                           for m in ("per", "wer")},
                        "rel_word_acc@0": c["relative"]["before"]["rel_word_acc"],
                        "rel_word_acc@after": c["relative"]["after"]["rel_word_acc"]} for c in cards])
    by = df.set_index("name") if len(df) else df
    target = {}
    if "permute-equal-ff" in by.index:
        target["permute_rel_word_acc"] = float(by.at["permute-equal-ff", "rel_word_acc@after"])
        target["permute_keeps_99"] = target["permute_rel_word_acc"] >= 0.99
        if "layer_prune-equal-params" in by.index:
            target["permute_beats_prune_at_equal_params"] = bool(
                by.at["permute-equal-ff", "test_wer@after"] < by.at["layer_prune-equal-params", "test_wer@after"])
    df.attrs["target"] = target
    return df


def render_merge_card(card: dict, log: pd.DataFrame) -> str:
    cols = ["per", "wer", "len_ratio", "eos_rate", "sub", "ins", "del", "n"]
    control = card.get("compare") == "control"  # the teacher fine-tuned: "as built" is the teacher itself
    stages = (("teacher", "teacher"), *(() if control else (("as built", "before"),)),
              (f"after {card['steps']:,} steps", "after"))
    rows = [{"model": label, "split": s, **{c: card[key].get(f"{s}_{c}") for c in cols}}
            for label, key in stages for s in ("dev", "test")]
    curve = log[[c for c in ("step", "loss", "lr", "seconds") if c in log]].astype({"step": int}).astype({"step": str})
    rel = card["relative"]
    return f"""# mtlab merge {'control' if control else 'candidate'} `{card['name']}` for the bundled teacher

- {card['what']}.
- Spec: `{card['spec']}`; {card['ff_removed']} FF sublayers and {card['blocks_removed']} blocks removed:
  {card['params']:,} parameters, {100 * card['params_removed_frac']:.1f}% of the teacher's removed.
- Teacher: `data/teacher` (weights hash `{card['teacher_hash']}`); refused for any other.
- Budget: {card['steps']:,} recovery steps at batch {card['batch_size']} = {card['examples_seen']:,} examples, lr
  {card['lr']}, {card['train_seconds'] / 60:.1f} minutes on {card['machine']}; the same for every combined candidate.
- Relative word accuracy on test ((100 - WER) / (100 - teacher WER)): {rel['before']['rel_word_acc']:.3f} as built,
  {rel['after']['rel_word_acc']:.3f} after recovery.
- Recovery config: `{json.dumps(card['config']['recovery'])}`
- Weights: {card['format']}; the scores are of these weights.
- Reproduce: `{card['command']}` (or `python -m mtlab merges --only {card['name']}`; resumable).

## Greedy decoding ({card['words']} words per split; PER, WER, substitutions/insertions/deletions in %)

{pd.DataFrame(rows).to_markdown(index=False, floatfmt='.3f')}

## Training log

{curve.to_markdown(index=False, floatfmt='.4f')}
"""
