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

The folder is written atomically (temporary folder, then rename), reloaded with plain
transformers and compared with the in-memory model (forward outputs, and greedy `generate()`
for models that generate) before it is put in place: a mismatch raises `ExportError` and
leaves nothing behind.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from .anatomy import anatomy
from .checkpoint import atomic_dir, write_json
from .tasks.base import cache_kwargs, check_finite

__all__ = ["export", "ExportError", "AUTO_CLASSES", "EXPORT_RECORD"]

#: tried in order: the first whose mapping gives the model's own class reloads it
AUTO_CLASSES = ("AutoModelForSeq2SeqLM", "AutoModelForCausalLM", "AutoModelForMaskedLM",
                "AutoModelForSequenceClassification", "AutoModelForTokenClassification",
                "AutoModelForQuestionAnswering", "AutoModelForImageClassification", "AutoModel")
EXPORT_RECORD = "mtlab_export.json"


class ExportError(RuntimeError):
    """The exported folder does not reload to the in-memory model's outputs."""


def export(model: nn.Module, directory: str | Path, *, task=None, atol: float = 1e-5,
           max_new_tokens: int = 8) -> Path:
    """Write `model` to `directory` as a standard Hugging Face folder and verify it (see module docstring).

    `task` (a mtlab Seq2SeqTask, optional): its tokenizer is saved too, its token ids are checked
    against the model, and a few of its dev examples are the check's inputs (otherwise fixed
    synthetic inputs). Outputs must agree to `atol` (absolute, scaled by the output's magnitude
    when that exceeds 1). Returns the directory.
    """
    directory = Path(directory)
    check_finite(model)
    if task is not None:
        task.check_model(model)
    state = untied_state_dict(model)
    directory.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(directory) as tmp:
        original = model.config
        model.config = export_config(model)  # save_pretrained validates and writes model.config
        try:
            model.save_pretrained(tmp, state_dict=state)
        finally:
            model.config = original
        tokenizer = _save_tokenizer(task, tmp)
        auto, report = check_reload(model, tmp, task=task, atol=atol, max_new_tokens=max_new_tokens)
        write_json(tmp / EXPORT_RECORD, {
            "model_class": type(model).__name__, "reload_with": f"transformers.{auto}.from_pretrained",
            "untied_merges": list(getattr(model.config, "mtlab_merges", None) or []),
            "tokenizer": tokenizer, "check": report})
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
    return out


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
