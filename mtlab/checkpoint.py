"""Safe, atomic checkpoints: tensors in safetensors, everything else in JSON, never pickle.

A checkpoint is a directory written under a temporary name and renamed into
place, so an interrupted write never leaves something that loads as valid.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


class CheckpointError(RuntimeError):
    """A checkpoint or model file is missing, truncated or does not fit the model."""


def atomic_dir(final: str | Path):
    """Context manager: yields a temp directory that replaces `final` only if the block succeeds."""
    return _AtomicDir(Path(final))


class _AtomicDir:
    def __init__(self, final: Path):
        self.final = final
        self.tmp = final.with_name(final.name + ".tmp")

    def __enter__(self) -> Path:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        old = self.final.with_name(self.final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if self.final.exists():
            os.replace(self.final, old)
        os.replace(self.tmp, self.final)
        shutil.rmtree(old, ignore_errors=True)
        return False


def latest_dir(final: str | Path) -> Path | None:
    """`final`, or None if there is none; if a kill fell between atomic_dir's two renames, `final`
    is missing but its previous version is complete under `final.old`: that one (read-only, the
    next atomic_dir replaces it)."""
    final = Path(final)
    old = final.with_name(final.name + ".old")
    return final if final.exists() else old if old.exists() else None


def write_json(path: str | Path, obj) -> None:
    """Write JSON atomically (temp file + rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


def write_csv(path: str | Path, df) -> Path:
    """Write a DataFrame as CSV (no index) atomically (temp file + rename): a kill leaves the old
    file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    df.to_csv(tmp, index=False)
    os.replace(tmp, path)
    return path


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file with an error that says what to do when it is missing or corrupt."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is corrupt or truncated ({e}); delete it and re-create it "
                              "(rerun the command that wrote it, or restore it from git)") from e


def named_trainable(model: torch.nn.Module, params: list[torch.nn.Parameter]) -> dict[str, torch.nn.Parameter]:
    wanted = {id(p) for p in params}
    return {n: p for n, p in model.named_parameters() if id(p) in wanted}


def save_training_state(directory: Path, model, params, optimizer, step: int, extra: dict | None = None) -> None:
    """Weights of the trained parameters, optimizer moments and RNG state, as safetensors + JSON."""
    named = named_trainable(model, params)
    save_file({n: p.detach().contiguous().cpu() for n, p in named.items()}, str(directory / "weights.safetensors"))
    opt = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in opt["state"].items():
        for key, val in state.items():
            if torch.is_tensor(val):
                tensors[f"{idx}.{key}"] = val.contiguous().cpu()
            else:
                scalars[f"{idx}.{key}"] = val
    tensors["__rng__"] = torch.get_rng_state()
    save_file(tensors, str(directory / "optimizer.safetensors"))
    write_json(directory / "state.json", {"step": step, "param_groups": opt["param_groups"],
                                          "scalars": scalars, "param_names": list(named), **(extra or {})})


def load_training_state(directory: Path, model, params, optimizer) -> dict:
    """Inverse of save_training_state; returns the JSON state (step, extras)."""
    try:
        state = json.loads((directory / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{directory}/state.json is unreadable ({e}); delete {directory} to restart training") from e
    named = named_trainable(model, params)
    if list(named) != state["param_names"]:
        raise CheckpointError(f"checkpoint {directory} was written for different trainable parameters; "
                              "delete it or point the run at a fresh output directory")
    weights = load_tensors(directory / "weights.safetensors")
    with torch.no_grad():
        for n, p in named.items():
            p.copy_(weights[n])
    tensors = load_tensors(directory / "optimizer.safetensors")
    torch.set_rng_state(tensors.pop("__rng__"))
    opt_state: dict = {}
    for key, val in list(tensors.items()) + list(state["scalars"].items()):
        idx, name = key.split(".", 1)
        opt_state.setdefault(int(idx), {})[name] = val
    groups = state["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    return state
