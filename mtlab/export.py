"""Export any model mtlab makes as a standard Hugging Face folder, checked by reloading it.

Assemblies (`mtlab.modular.assemble`), pruned models (`mtlab.baselines`), FF-merged models
(`mtlab.merging.merge_ffs`) and combinations of them all leave `export(model, dir)` as a folder
that plain `transformers.AutoModelFor*.from_pretrained(dir)` loads to the same outputs:

- FF sublayers tied by a merge are written as plain copies (transformers' `save_pretrained`
  refuses parameters shared outside its own tied embeddings, and its `from_pretrained` would
  silently re-initialise what a de-duplicated file lacks). Disk size is that of the unmerged
  widths; use `mtlab.merging.save_merged` for the compact, mtlab-only format.
- An encoder-decoder whose decoder is deeper than its encoder gets a config entry that makes
  transformers size its default KV cache from the decoder (T5 sizes it from the encoder
  otherwise, and plain `generate()` fails with an IndexError).
- The task's tokenizer is written beside the weights when it can be saved.

The folder is written to a temporary sibling folder, reloaded with plain transformers and
compared with the in-memory model (forward outputs, and greedy `generate()` for models that
generate) before it is put in place: a mismatch (or any other failure) raises and leaves the
target as it was, with no half-written folder.

What export writes and removes
------------------------------
Every export writes `mtlab_export.json` (the record), which lists the files export wrote
("files"). The target folder decides what happens:

- missing or empty: the checked folder is renamed into place.
- an earlier export of the same thing, i.e. a folder whose record lists every file in it and
  names the same model class (`type(model).__name__`): replaced as a whole (the old folder is
  renamed aside, the new one renamed into place, then the old one's listed files deleted).
  Re-running an export (a recipe, a notebook) therefore needs no flag.
- anything else (a user's files, a model folder of their own, an export of another model class,
  or an earlier export with files added to it): `ExportTargetError` before any work, naming
  `overwrite=True`.
- with `overwrite=True`: the files listed in the folder's record (if it has one) are deleted and
  the new export is written beside everything else (file by file, the record last; a failure
  half-way puts the folder back as it was). A file mtlab did not write is never deleted or
  replaced: if the export would write a file of the same name (e.g. config.json in a copy of the
  user's model folder) it raises `ExportTargetError` and changes nothing.

A folder written by an mtlab before records listed their files counts as not an mtlab export:
delete it yourself or choose another folder.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .anatomy import anatomy
from .checkpoint import write_json
from .tasks.base import cache_kwargs, check_finite

__all__ = ["export", "ExportError", "ExportTargetError", "AUTO_CLASSES", "EXPORT_RECORD", "read_export_record"]

#: tried in order: the first whose mapping gives the model's own class reloads it
AUTO_CLASSES = ("AutoModelForSeq2SeqLM", "AutoModelForCausalLM", "AutoModelForMaskedLM",
                "AutoModelForSequenceClassification", "AutoModelForTokenClassification",
                "AutoModelForQuestionAnswering", "AutoModelForImageClassification", "AutoModel")
EXPORT_RECORD = "mtlab_export.json"
#: the record's "format": an export whose record lists the files it wrote
EXPORT_FORMAT = "mtlab-export-2"
PARTIAL_MARK = ".mtlab-export-partial"  # marks a temporary folder export is still writing


class ExportError(RuntimeError):
    """The exported folder does not reload to the in-memory model's outputs."""


def export(model: nn.Module, directory: str | Path, *, task=None, atol: float = 1e-5,
           max_new_tokens: int = 8, overwrite: bool = False) -> Path:
    """Write `model` to `directory` as a standard Hugging Face folder and verify it (see module docstring).

    `task` (a mtlab Seq2SeqTask, optional): its tokenizer is saved too, its token ids are checked
    against the model, and a few of its dev examples are the check's inputs (otherwise fixed
    synthetic inputs). Outputs must agree to `atol` (absolute, scaled by the output's magnitude
    when that exceeds 1). Returns the directory.

    The target folder (see "What export writes and removes" in the module docstring): a missing or
    empty folder, or an earlier mtlab export of a model of the same class that holds nothing but
    the files its `mtlab_export.json` lists, is (re)written. Anything else raises
    `ExportTargetError` before any work, unless `overwrite=True`: then export removes only the
    files an earlier export listed in `mtlab_export.json` and writes its own beside the rest, and
    still refuses if one of its files would replace a file mtlab did not write.
    """
    directory = Path(directory)
    where = directory.resolve()  # a symlinked folder: its target is written; '.' has a name
    target = inspect_target(where, type(model).__name__, overwrite)  # refuse before any work
    check_finite(model)
    if task is not None:
        task.check_model(model)
    state = untied_state_dict(model)
    where.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(where)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(where), dir=where.parent))
    try:
        (tmp / PARTIAL_MARK).touch()
        original = model.config
        model.config = export_config(model)  # save_pretrained validates and writes model.config
        try:
            model.save_pretrained(tmp, state_dict=state)
        finally:
            model.config = original
        tokenizer = _save_tokenizer(task, tmp)
        auto, report = check_reload(model, tmp, task=task, atol=atol, max_new_tokens=max_new_tokens)
        files = sorted(f for f in folder_entries(tmp) if f not in (PARTIAL_MARK, EXPORT_RECORD))
        write_json(tmp / EXPORT_RECORD, {
            "format": EXPORT_FORMAT, "model_class": type(model).__name__,
            "reload_with": f"transformers.{auto}.from_pretrained",
            "untied_merges": list(getattr(model.config, "mtlab_merges", None) or []),
            "tokenizer": tokenizer, "check": report, "files": files})
        place_export(tmp, where, target, files)
        _remove_stale_temporaries(where)
    finally:
        if tmp.exists():  # a temporary folder of this call: everything in it was written by export
            shutil.rmtree(tmp, ignore_errors=True)
    return directory


def untied_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with every tensor shared inside a layer stack (FF merges) replaced by its own
    copy; transformers' own ties (embeddings, LM head) stay shared for save_pretrained to handle."""
    full = model.state_dict(keep_vars=True)
    prefixes = tuple(f"{s.path}." for s in anatomy(model).stacks.values())
    groups: dict[int, list[str]] = {}
    for k, v in full.items():
        groups.setdefault(id(v), []).append(k)
    out = {k: v.detach() for k, v in full.items()}
    for keys in groups.values():
        if len(keys) > 1:
            for k in keys:
                if k.startswith(prefixes):  # HF state-dict keys are the module paths anatomy reports
                    out[k] = out[k].clone()
    from .merging.lowrank import fold_state_dict  # low-rank deltas folded into each layer's own weights

    return fold_state_dict(model, out)


def export_config(model: nn.Module):
    """A copy of the model's config, fixed for plain transformers: no `mtlab_merges` (the weights are
    untied), and the decoder's depth where transformers reads it to size the KV cache."""
    config = copy.deepcopy(model.config)
    if hasattr(config, "mtlab_merges"):
        del config.mtlab_merges
    stacks = anatomy(model).stacks
    if isinstance(getattr(config, "layer_types", None), list) and "layers" in stacks:
        config.layer_types = _layer_types(stacks["layers"].layers, config.layer_types)
    if getattr(config, "is_encoder_decoder", False) and "decoder" in stacks:
        depth = len(stacks["decoder"])
        if config.get_text_config(decoder=True).num_hidden_layers != depth:
            # transformers maps a flat config's `decoder_layers` to the decoder's num_hidden_layers
            config.decoder_layers = depth
        got = config.get_text_config(decoder=True).num_hidden_layers
        if got != depth:
            raise ExportError(f"{type(config).__name__}: transformers reads a decoder depth of {got} from the config, "
                              f"but the decoder has {depth} blocks, and no config key fixes it in this "
                              "transformers version; generate with **mtlab.tasks.base.cache_kwargs(model)")
    return config


def _layer_types(blocks, old: list) -> list:
    """Per-block attention types (Qwen2-style `config.layer_types`) of a re-tiled stack: each block's
    own (its attention module records the type it was built with); the config's list must match
    the depth or the config does not validate."""
    types = []
    for block in blocks:
        found = next((getattr(m, a) for m in block.modules() for a in ("layer_type", "attention_type")
                      if isinstance(getattr(m, a, None), str)), None)
        types.append(found)
    if all(t is not None for t in types):
        return types
    if len(old) == len(blocks):
        return old
    raise ExportError(f"config.layer_types lists {len(old)} layers but the stack has {len(blocks)} blocks, and "
                      "the blocks do not record their attention type; set model.config.layer_types to one entry "
                      "per block before exporting")


def _save_tokenizer(task, directory: Path) -> str | None:
    tokenizer = getattr(task, "tokenizer", None)
    if tokenizer is None:
        return None
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(directory)
    elif hasattr(tokenizer, "save"):
        tokenizer.save(directory)
    else:
        return None
    return type(tokenizer).__name__


def auto_class(model: nn.Module) -> str:
    """Name of the first transformers Auto class that builds exactly the model's class from its config."""
    import transformers

    for name in AUTO_CLASSES:
        try:
            if getattr(transformers, name)._model_mapping[type(model.config)] is type(model):
                return name
        except (KeyError, AttributeError):
            continue
    raise ExportError(f"no transformers Auto class builds {type(model).__name__} from a {type(model.config).__name__}; "
                      f"checked {', '.join(AUTO_CLASSES)}. Export works for transformers models only")


def check_inputs(model: nn.Module, task=None, n: int = 4) -> dict[str, torch.Tensor]:
    """Inputs for the reload check: a few dev examples of the task, else fixed synthetic ones."""
    if task is not None:
        split = "dev" if "dev" in task.splits else next(iter(task.splits))
        return task.collate(split, list(range(min(n, len(task.texts(split)[0]))))).model_inputs()
    g = torch.Generator().manual_seed(0)
    config = model.config
    if getattr(model, "main_input_name", "input_ids") == "pixel_values":
        size = config.image_size
        return {"pixel_values": torch.randn(2, getattr(config, "num_channels", 3), size, size, generator=g)}
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(3, vocab, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if getattr(config, "is_encoder_decoder", False):
        out["decoder_input_ids"] = torch.randint(3, vocab, (2, 5), generator=g)
    return out


def check_reload(model: nn.Module, directory: Path, *, task=None, atol: float = 1e-5,
                 max_new_tokens: int = 8) -> tuple[str, dict]:
    """Reload `directory` with plain transformers and compare it with `model`; ExportError if they differ.
    Returns (Auto class used, {"max_abs_diff", "generate_checked"})."""
    import transformers

    name = auto_class(model)
    param = next(model.parameters())
    # the attention kernel is a runtime choice, not part of the folder: use the model's (eager vs sdpa
    # round differently); everything else (dtype included) comes from the folder alone
    kw = {"attn_implementation": model.config._attn_implementation} if getattr(
        model.config, "_attn_implementation", None) else {}
    reloaded, info = getattr(transformers, name).from_pretrained(str(directory), output_loading_info=True, **kw)
    bad = {k: sorted(v)[:5] for k, v in info.items() if k != "error_msgs" and v}
    if bad:
        raise ExportError(f"plain {name}.from_pretrained({directory}) did not read every weight: {bad}")
    got = next(reloaded.parameters()).dtype
    if got != param.dtype:
        raise ExportError(f"plain {name}.from_pretrained({directory}) loads {got} weights, the model has {param.dtype}")
    reloaded.to(param.device).eval()
    inputs = {k: v.to(param.device) for k, v in check_inputs(model, task).items()}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            diff = _max_diff(model(**inputs), reloaded(**inputs), atol, name, directory)
            generated = _check_generate(model, reloaded, inputs, max_new_tokens, name, directory)
    finally:
        model.train(was_training)
    return name, {"max_abs_diff": diff, "generate_checked": generated, "inputs": "task dev" if task else "synthetic"}


def _max_diff(ref, got, atol: float, name: str, directory: Path) -> float:
    worst = 0.0
    for key, a in ref.items():
        b = got.get(key) if hasattr(got, "get") else None
        if not isinstance(a, torch.Tensor) or not a.is_floating_point():
            continue
        if not isinstance(b, torch.Tensor) or b.shape != a.shape:
            raise ExportError(f"reloaded model ({name}) gives no {key!r} of shape {tuple(a.shape)}; the folder "
                              f"{directory} does not reproduce the model")
        d = (a.float() - b.float()).abs().max().item()
        scale = max(1.0, a.float().abs().max().item())
        if not d <= atol * scale:
            raise ExportError(f"reloaded model ({name}) differs from the in-memory model: {key} max |diff| {d:.3g} "
                              f"(allowed {atol * scale:.3g}); nothing was written. Report this with the model's "
                              "class and config")
        worst = max(worst, d)
    return worst


def _check_generate(model, reloaded, inputs: dict, max_new_tokens: int, name: str, directory: Path) -> bool:
    """Greedy generate() of the reloaded model with transformers' DEFAULT cache equals mtlab's
    (a fresh cache that grows with the decoder)."""
    if not (hasattr(model, "can_generate") and model.can_generate()):
        return False
    gen = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "pixel_values")}
    config = model.config
    room = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    if room and not getattr(config, "is_encoder_decoder", False) and "input_ids" in gen:
        # a prompt that fills the context (a block of block_size == n_positions) leaves no room to generate
        gen = {k: v[:, :max(1, room - max_new_tokens)] for k, v in gen.items()}
    kw = dict(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens)
    pad = model.generation_config.pad_token_id
    if pad is None:
        eos = model.generation_config.eos_token_id
        pad = (eos[0] if isinstance(eos, list) else eos) if eos is not None else 0
    kw["pad_token_id"] = pad
    ours = model.generate(**gen, **kw, **cache_kwargs(model))
    try:
        plain = reloaded.generate(**gen, **kw)
    except Exception as e:  # noqa: BLE001 - any failure of plain generate() is an export failure
        raise ExportError(f"plain generate() of the reloaded model ({name}) fails: {type(e).__name__}: {e}") from e
    if not torch.equal(ours, plain):
        raise ExportError(f"plain generate() of the reloaded model ({name}) differs from mtlab's; nothing was "
                          f"written to {directory}")
    return True


# ---------------------------------------------------------------------------
# the target folder: what export may replace, and putting the checked folder in place

class ExportTargetError(FileExistsError):
    """The target folder holds files mtlab did not write (or an export of another model class)."""


@dataclass
class _Target:
    mode: str  # "new": missing or empty; "replace": swap the whole folder; "beside": keep the user's files
    ours: list[str] = field(default_factory=list)  # entries an earlier export wrote (listed in its record)
    theirs: list[str] = field(default_factory=list)  # entries mtlab did not write: never removed or replaced


#: what `model.save_pretrained` writes: checked against a folder's own files before any work
_MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json")


def _tmp_prefix(directory: Path) -> str:
    return f".{directory.name}.mtlab-export-"


def folder_entries(folder: Path) -> list[str]:
    """Every file (and symlink) under `folder` as a relative POSIX path, and every empty directory
    (ending in '/')."""
    out = []
    for root, dirs, files in os.walk(folder):
        rel = Path(root).relative_to(folder)
        out += [(rel / f).as_posix() for f in files]
        out += [(rel / d).as_posix() for d in dirs if (Path(root) / d).is_symlink()]
        if not files and not dirs and rel != Path("."):
            out.append(rel.as_posix() + "/")
    return sorted(out)


def read_export_record(directory: str | Path) -> dict | None:
    """The `mtlab_export.json` record of an earlier export in `directory`, or None when there is
    none (or it is not a JSON object). Its "files" entry is None when it does not list files
    safely (an export by an mtlab before file lists, or paths outside the folder)."""
    path = Path(directory) / EXPORT_RECORD
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    files = record.get("files")
    ok = isinstance(files, list) and all(
        isinstance(f, str) and f and not f.startswith("/") and "\\" not in f
        and not any(part in ("", ".", "..") for part in f.split("/")) for f in files)
    return {**record, "files": list(files) if ok else None}


def _shown(entries: list[str], n: int = 5) -> str:
    more = f" and {len(entries) - n} more" if len(entries) > n else ""
    return ", ".join(entries[:n]) + more


def _collisions(new: list[str], theirs: list[str]) -> list[str]:
    """The files export would write that would replace (or need to replace) an entry it did not write."""
    theirs_set = set(theirs)
    bad = []
    for f in new:
        parts = f.split("/")
        parents = ["/".join(parts[:i]) for i in range(1, len(parts))]
        if f in theirs_set or f"{f}/" in theirs_set or any(p in theirs_set for p in parents) \
                or any(t.startswith(f"{f}/") for t in theirs):
            bad.append(f)
    return bad


_OVERWRITE = (f"overwrite=True removes only the files an earlier mtlab export listed in its {EXPORT_RECORD}, "
              "writes the export beside everything else, and never deletes or replaces a file mtlab did not write")


def inspect_target(directory: Path, model_class: str, overwrite: bool) -> _Target:
    """What export may do in `directory`; ExportTargetError (before any work) when it may not."""
    if directory.exists() and not directory.is_dir():
        raise ExportTargetError(f"export: {directory} is a file, not a folder; give a folder path (export never "
                                "replaces a file mtlab did not write, overwrite=True included)")
    entries = folder_entries(directory) if directory.exists() else []
    if not entries:
        return _Target("new")
    record = read_export_record(directory)
    listed = record["files"] if record is not None else None
    if listed is None:
        ours = [EXPORT_RECORD] if record is not None else []
        theirs = [e for e in entries if e not in ours]
        what = (f"an export by an earlier mtlab whose {EXPORT_RECORD} does not list the files it wrote"
                if record is not None else "not an earlier mtlab export")
        if not overwrite:
            raise ExportTargetError(
                f"export: {directory} is not empty and is {what} (it holds {_shown(theirs)}). Choose a new or empty "
                f"folder, or pass overwrite=True to write the export beside these files: {_OVERWRITE}")
        clash = _collisions(list(_MODEL_FILES), theirs)
        if clash:
            raise ExportTargetError(
                f"export: {directory} holds {_shown(clash)}, which mtlab did not write and the export would "
                "replace; overwrite=True never replaces such files. Choose a new or empty folder (or move "
                "those files out)")
        return _Target("beside", ours, theirs)
    ours_set = set(listed) | {EXPORT_RECORD}
    ours = [e for e in entries if e in ours_set]
    theirs = [e for e in entries if e not in ours_set]
    other = record.get("model_class")
    if other == model_class and not theirs:
        return _Target("replace", ours)  # an earlier export of the same thing: replaced as a whole
    if not overwrite:
        why = (f"an earlier mtlab export of a {other}, not of a {model_class}" if other != model_class else
               f"an earlier mtlab export plus files it did not write ({_shown(theirs)})")
        raise ExportTargetError(f"export: {directory} holds {why}. Choose another folder, or pass overwrite=True "
                                f"to replace the earlier export: {_OVERWRITE}")
    clash = _collisions(list(_MODEL_FILES), theirs)
    if clash:
        raise ExportTargetError(f"export: {directory} holds {_shown(clash)}, which mtlab did not write and the export "
                                "would replace; overwrite=True never replaces such files. Move them out or choose "
                                "another folder")
    return _Target("replace", ours) if not theirs else _Target("beside", ours, theirs)


def _remove_listed(folder: Path, files: list[str], keep: frozenset = frozenset()) -> list[str]:
    """Delete the listed files under `folder`, then the directories that held them once empty
    (except those in `keep`); returns what is left in `folder`."""
    for f in files:
        p = folder / f
        if p.is_symlink() or p.is_file():
            p.unlink()
    _prune_dirs(folder, files, keep)
    return folder_entries(folder) if folder.exists() else []


def _prune_dirs(folder: Path, files: list[str], keep: frozenset = frozenset()) -> None:
    """Remove the (now empty) directories that held `files`, deepest first, except those in `keep`."""
    parents = {a for f in files for a in Path(f).parents if a != Path(".")}
    for d in sorted(parents - set(keep), key=lambda p: len(p.parts), reverse=True):
        try:
            (folder / d).rmdir()
        except OSError:  # not empty (holds something else) or gone
            pass


def _dirs(folder: Path) -> frozenset:
    return frozenset(Path(root).relative_to(folder) for root, _, _ in os.walk(folder))


def place_export(tmp: Path, directory: Path, target: _Target, files: list[str]) -> None:
    """Put the checked folder `tmp` at `directory`: a rename when the target is missing, empty or an
    earlier export alone (the old one is moved aside first, then its listed files deleted); file by
    file beside the user's entries otherwise (see _place_beside)."""
    if target.mode == "beside":
        _place_beside(tmp, directory, target, files)
        return
    (tmp / PARTIAL_MARK).unlink()
    if target.mode == "new":
        if directory.exists():
            directory.rmdir()  # empty when inspected; raises (and leaves it) if something appeared since
        os.replace(tmp, directory)
        return
    old = directory.with_name(f"{_tmp_prefix(directory)}old-{uuid.uuid4().hex[:8]}")
    os.replace(directory, old)
    try:
        os.replace(tmp, directory)
    except BaseException:
        os.replace(old, directory)
        raise
    left = _remove_listed(old, target.ours)
    if not left:
        old.rmdir()
    else:  # something was added to the old folder while this export ran: keep it
        warnings.warn(f"export: {directory} was replaced, but files added to it meanwhile ({_shown(left)}) were "
                      f"kept in {old}", stacklevel=3)


def _place_beside(tmp: Path, directory: Path, target: _Target, files: list[str]) -> None:
    """overwrite=True into a folder with entries mtlab did not write: the earlier export's listed
    files are moved aside, the new files renamed in one by one, the record last; any failure moves
    the new files out and the old ones back (the folder is as it was), success deletes the old ones.
    The user's entries are never moved, replaced or deleted."""
    ours = [f for f in target.ours if not f.endswith("/")]
    theirs = [e for e in folder_entries(directory) if e not in set(ours)]
    clash = _collisions([*files, EXPORT_RECORD], theirs)
    if clash:
        raise ExportTargetError(f"export: {directory} holds {_shown(clash)}, which mtlab did not write and the "
                                "export would replace; nothing was changed there. Move them out or choose "
                                "another folder")
    existing = _dirs(directory)
    aside = directory.with_name(f"{_tmp_prefix(directory)}old-{uuid.uuid4().hex[:8]}")
    aside.mkdir()
    moved, placed = [], []
    try:
        for f in ours:
            (aside / f).parent.mkdir(parents=True, exist_ok=True)
            os.replace(directory / f, aside / f)
            moved.append(f)
        for f in [*files, EXPORT_RECORD]:  # the record last: a complete export only once all is in place
            (directory / f).parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp / f, directory / f)
            placed.append(f)
    except BaseException:
        _remove_listed(directory, placed, keep=existing)  # files this call put there
        for f in moved:
            (directory / f).parent.mkdir(parents=True, exist_ok=True)
            os.replace(aside / f, directory / f)
        shutil.rmtree(aside, ignore_errors=True)  # only directories left: its files went back
        raise
    _prune_dirs(directory, ours, keep=frozenset(Path(f).parent for f in placed))
    shutil.rmtree(aside, ignore_errors=True)  # the earlier export's listed files, nothing else


def _remove_stale_temporaries(directory: Path) -> None:
    """Leftovers of an export into `directory` that was killed: a temporary folder (marked partial,
    everything in it written by export) or an earlier export moved aside (only its listed files)."""
    if not directory.parent.is_dir():
        return
    prefix = _tmp_prefix(directory)
    for p in directory.parent.iterdir():
        if not (p.name.startswith(prefix) and p.is_dir() and not p.is_symlink()):
            continue
        if (p / PARTIAL_MARK).is_file():
            shutil.rmtree(p, ignore_errors=True)
            continue
        record = read_export_record(p)
        if record is not None and record["files"] is not None and directory.exists():
            if not _remove_listed(p, [*record["files"], EXPORT_RECORD]):
                p.rmdir()
