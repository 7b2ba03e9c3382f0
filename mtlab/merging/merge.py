"""Merge and tie feed-forward sublayers (Verma, Murray, Duh 2025), and save/load the tied model.

A merge set is described by a `MergeSpec` (`mtlab.merging.spec`, re-exported here), written
as a short string STACK:LAYERS[@ANCHOR][/METHOD], e.g. "encoder:2-4@middle/permute",
"layers:3-7@last/vanilla", "decoder:0,2,4@2". Merge methods are registered in
`mtlab.merging.methods` (built in: permute, vanilla).

`merge_ffs(model, specs, correlations)`: for each set, every non-anchor layer is aligned
to the anchor by the set's method ("permute": the permutation from a linear assignment on the
anchor-vs-layer correlation of FF pre-activation features; "vanilla": no alignment), the aligned w_in,
w_gate, w_out weights and biases are averaged into the anchor, and then TIED.

Tying: every non-anchor layer's FF projection modules are re-pointed to the anchor's
Parameter objects (`module.weight = anchor_module.weight`, same for bias; "weight"/"bias"
are the torch attributes of nn.Linear and GPT-2 Conv1D, not HF names). The modules stay
distinct, so every HF forward runs unchanged, per-layer hooks (feature capture) still
tell the layers apart, `model.parameters()` (and `measure.param_table`) counts the
shared weights once, and training updates the one shared copy (its gradient sums over
the tied layers). Sharing whole modules instead would break per-layer hooks and, in
BART/BERT-like blocks where the FF lives directly in the block, would need block surgery.

The applied specs are recorded as `model.config.mtlab_merges` (a list of spec strings),
which `save_merged` persists and `load_merged` replays to re-tie. transformers 5.23's
`save_pretrained` refuses to save such a model ("shared tensors ... which are not properly
defined"), and older versions silently dropped the aliases; so `save_merged` writes the
state dict itself: one safetensors file where every shared tensor is stored once (HF's own
tied embeddings are de-duplicated the way save_pretrained does it), `config.json` (+
`generation_config.json`), and `mtlab_merges.json` naming the merges and every dropped
alias. Load it with `load_merged`. A plain `from_pretrained` would leave the non-anchor FF
weights missing (randomly initialised), so in a folder with merges `config.json` carries
`model_type` and `dtype` values that make every transformers loader raise, each naming
`mtlab.merging.load_merged` in the error (the real ones are kept in `mtlab_merges.json`), a
`mtlab_load_with` field names it too, and a README.md says to use `load_merged`, or
`mtlab.export.export` for a standard folder.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..anatomy import FF, FF_ROLES, Anatomy, anatomy, set_weight_oi, sync_cache_depth, weight_oi
from ..checkpoint import CheckpointError, atomic_dir, load_tensors, write_json
from ..surgery import tie_params
from .align import check_correlation, ff_width, permuted_weights
from .methods import get_merge_method, merge_methods
from .spec import ANCHORS, MergeSpec, as_merge_spec

__all__ = ["MergeSpec", "validate_specs", "merge_ffs", "tie_ffs", "merged_specs", "save_merged",
           "load_merged", "ANCHORS", "METHODS", "WEIGHTS_NAME", "MERGES_NAME"]

WEIGHTS_NAME = "model.safetensors"
MERGES_NAME = "mtlab_merges.json"
README_NAME = "README.md"
# written to config.json of a folder with merges: plain transformers raises on either and prints
# the value, so each says what to do (AutoConfig/AutoModel* print the model_type, a model class's
# from_pretrained the dtype); LOAD_WITH_KEY is a plain field saying the same to a reader of config.json
LOAD_WITH = "mtlab.merging.load_merged(folder)"
GUARD_MODEL_TYPE = (f"mtlab-compact-merged (not a plain transformers folder, do not upgrade transformers for it: "
                    f"load it with {LOAD_WITH}, or write a plain folder with mtlab.export.export; see its README.md)")
GUARD_DTYPE = f"mtlab compact merged folder: load it with {LOAD_WITH} (see its README.md)"
LOAD_WITH_KEY = "mtlab_load_with"
_FORMAT = 1

Correlations = Mapping[tuple[str, int], object] | Callable[["MergeSpec"], Mapping[int, object]]

# ---------------------------------------------------------------------------
# MergeSpec (in mtlab.merging.spec) and the merges applied to a model

def __getattr__(name: str):
    if name == "METHODS":  # the registered merge methods, read when asked (mtlab.merging.methods)
        return merge_methods()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def merged_specs(model: nn.Module) -> list[MergeSpec]:
    """The merges already applied to `model` (recorded in model.config.mtlab_merges)."""
    recorded = getattr(getattr(model, "config", None), "mtlab_merges", None) or []
    return [MergeSpec.parse(s) for s in recorded]


def validate_specs(specs: Iterable[MergeSpec | str], model_or_anatomy: nn.Module | Anatomy,
                   existing: Iterable[MergeSpec | str] = ()) -> list[MergeSpec]:
    """Validate each spec, and that no two sets (nor a set and an `existing` merge) share a layer
    of the same stack. Returns the specs as MergeSpec objects."""
    an = model_or_anatomy if isinstance(model_or_anatomy, Anatomy) else anatomy(model_or_anatomy)
    specs = [as_merge_spec(s) for s in specs]
    for s in specs:
        s.validate(an)
    taken: dict[tuple[str, int], tuple[MergeSpec, bool]] = {}
    for s in [as_merge_spec(e) for e in existing]:
        for i in s.layers:
            taken[s.stack, i] = (s, True)
    for s in specs:
        for i in s.layers:
            if (s.stack, i) in taken:
                other, old = taken[s.stack, i]
                common = sorted(set(s.layers) & set(other.layers))
                if old:
                    raise ValueError(f"merge spec {str(s)!r} overlaps the merge {str(other)!r} already applied "
                                     f"to this model at {s.stack} layer(s) {common}; a layer can be tied once: "
                                     "choose layers outside that set (or start from the unmerged model)")
                raise ValueError(f"merge specs {str(other)!r} and {str(s)!r} overlap at {s.stack} layer(s) "
                                 f"{common}; each layer can belong to one merge set: make the sets disjoint "
                                 "(or write them as one set)")
        for i in s.layers:
            taken[s.stack, i] = (s, False)
    return specs


# ---------------------------------------------------------------------------
# merging


def _set_ffs(an: Anatomy, spec: MergeSpec) -> dict[int, FF]:
    stack = an.stacks[spec.stack]
    return {i: stack.layer(i).ff for i in spec.layers}


def _signature(ff: FF) -> tuple:
    sig = []
    for role in FF_ROLES:
        m = getattr(ff, role)
        if m is None:
            sig.append((role, None))
            continue
        w, b = weight_oi(m), getattr(m, "bias", None)
        sig.append((role, type(m).__name__, tuple(w.shape), w.dtype, w.device.type,
                    None if b is None else tuple(b.shape)))
    return tuple(sig)


def _check_compatible(spec: MergeSpec, ffs: dict[int, FF]) -> None:
    a = spec.anchor_layer()
    ref = _signature(ffs[a])
    for i, ff in ffs.items():
        if _signature(ff) != ref:
            raise ValueError(f"merge spec {str(spec)!r}: the FF sublayer of {spec.stack} layer {i} does not have "
                             f"the shape of the anchor's (layer {a}): {_signature(ff)} vs {ref}; only FF "
                             "sublayers of identical shape can be merged")


def _correlations_for(spec: MergeSpec, correlations, d_ff: int) -> dict[int, torch.Tensor]:
    """Anchor-vs-layer correlation matrices for every non-anchor layer, checked."""
    where = f"merge spec {str(spec)!r} (method {spec.method})"
    if correlations is None:
        raise ValueError(f"{where}: missing correlations; pass correlations={{(stack, layer): d_ff x d_ff "
                         "anchor-vs-layer matrix}} or a callable spec -> {layer: matrix}, or use method vanilla "
                         f"('{replace(spec, method='vanilla', options=())}')")
    if callable(correlations):
        got = correlations(spec)
        if not isinstance(got, Mapping):
            raise ValueError(f"{where}: the correlate callable must return a dict {{layer: matrix}}, "
                             f"got {type(got).__name__}")

        def lookup(i):
            return got.get(i, got.get((spec.stack, i)))
    elif isinstance(correlations, Mapping):
        def lookup(i):
            return correlations.get((spec.stack, i))
    else:
        raise ValueError(f"correlations must be a dict {{(stack, layer): matrix}} or a callable, "
                         f"got {type(correlations).__name__}")
    out = {}
    for i in spec.others():
        c = lookup(i)
        if c is None:
            raise ValueError(f"{where}: missing correlation matrix for {spec.stack} layer {i} "
                             f"(vs anchor layer {spec.anchor_layer()}); provide correlations[({spec.stack!r}, {i})]")
        out[i] = check_correlation(c, d_ff, what=f"correlation of {spec.stack} layer {i} vs anchor "
                                                 f"{spec.anchor_layer()} in {where}")
    return out


def _tie(an: Anatomy, spec: MergeSpec) -> None:
    ffs = _set_ffs(an, spec)
    anchor = ffs[spec.anchor_layer()]
    for i in spec.others():
        for role in FF_ROLES:
            m = getattr(ffs[i], role)
            if m is not None:
                tie_params(m, getattr(anchor, role))


def _record(model: nn.Module, specs: list[MergeSpec]) -> None:
    config = getattr(model, "config", None)
    if config is None:
        return
    config.mtlab_merges = list(getattr(config, "mtlab_merges", None) or []) + [str(s) for s in specs]


def merge_ffs(model: nn.Module, specs: Iterable[MergeSpec | str], correlations: Correlations | None = None) -> nn.Module:
    """Merge the FF sublayers of each set into its anchor and tie them (in place; returns model).

    `correlations` (needed by "permute" sets): a dict {(stack, layer): corr} with corr the
    d_ff x d_ff correlation of the anchor's FF pre-activation features (rows) with that
    layer's (columns), or a callable `correlate(spec) -> {layer: corr}` (e.g. built on
    mtlab.merging.stats). Anchors need no entry. Everything (specs, overlaps with each
    other and with merges already applied, FF shapes, correlations, assignments) is
    checked before the model is touched, so on ValueError the model is unchanged; a
    callable is therefore called for every set on the unmerged model.
    """
    specs = list(specs) if not isinstance(specs, (MergeSpec, str)) else [specs]
    an = anatomy(model)
    specs = validate_specs(specs, an, existing=merged_specs(model))
    plans = []
    for spec in specs:
        ffs = _set_ffs(an, spec)
        _check_compatible(spec, ffs)
        method = get_merge_method(spec.method)
        if method.check is not None:
            method.check(spec, ffs)
        corrs = (_correlations_for(spec, correlations, ff_width(ffs[spec.anchor_layer()]))
                 if method.needs_correlations else None)
        perms: dict[int, torch.Tensor | None] = {i: None for i in spec.layers}
        perms.update(method.align(ffs, spec.anchor_layer(), corrs))
        plans.append((spec, ffs, perms))

    with torch.no_grad():
        for spec, ffs, perms in plans:
            aligned = [permuted_weights(ffs[i], perms[i]) for i in spec.layers]
            extend = get_merge_method(spec.method).extend
            if extend is not None:  # per-layer extras (e.g. low-rank deltas) from the aligned weights
                extend(spec, ffs, dict(zip(spec.layers, aligned)))
            anchor = ffs[spec.anchor_layer()]
            for role, (w0, b0) in aligned[0].items():
                w = torch.stack([a[role][0].double() for a in aligned]).mean(0)
                b = None if b0 is None else torch.stack([a[role][1].double() for a in aligned]).mean(0)
                m = getattr(anchor, role)
                set_weight_oi(m, w.to(w0.dtype), bias=None if b is None else b.to(b0.dtype))
            _tie(an, spec)
    _record(model, specs)
    return model


def tie_ffs(model: nn.Module, specs: Iterable[MergeSpec | str]) -> nn.Module:
    """Only TIE each set's FF sublayers to the anchor's Parameters (no averaging): the anchor's
    values win. Used to re-establish the tying of a saved merged model; records the specs."""
    an = anatomy(model)
    specs = validate_specs(specs, an, existing=merged_specs(model))
    for spec in specs:
        _check_compatible(spec, _set_ffs(an, spec))
    for spec in specs:
        _tie(an, spec)
        extend = get_merge_method(spec.method).extend
        if extend is not None:  # per-layer extras rebuilt empty, for the saved values
            extend(spec, _set_ffs(an, spec), None)
    _record(model, specs)
    return model


# ---------------------------------------------------------------------------
# saving and loading

def _dedup_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict with every shared tensor stored once, and {dropped key: kept key}.

    FF ties keep the anchor's key. Other sharing (HF's tied embeddings) is handed to
    transformers' own `remove_tied_weights_from_state_dict` where available, so the file
    keeps the key a plain `from_pretrained` expects; otherwise the first key wins.
    """
    full = model.state_dict(keep_vars=True)
    groups: dict[int, list[str]] = {}
    for k, v in full.items():
        if isinstance(v, torch.Tensor):
            groups.setdefault(id(v), []).append(k)
    module_names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    preferred = set()
    an = anatomy(model)
    for spec in merged_specs(model):
        ff = an.stacks[spec.stack].layer(spec.anchor_layer()).ff
        for role in FF_ROLES:
            m = getattr(ff, role)
            if m is not None:
                preferred |= {f"{module_names[id(m)]}.{p}" for p in ("weight", "bias")}
    aliases: dict[str, str] = {}
    for keys in groups.values():
        if len(keys) > 1:
            keep = next((k for k in keys if k in preferred), None)
            if keep is not None:
                aliases.update({k: keep for k in keys if k != keep})
    sd = {k: v.detach() for k, v in full.items() if k not in aliases}
    try:
        from transformers.modeling_utils import remove_tied_weights_from_state_dict
    except ImportError:  # other transformers versions: keep the first key of each group
        remove_tied_weights_from_state_dict = None
    hf_done = False
    if remove_tied_weights_from_state_dict is not None and hasattr(model, "_tied_weights_keys"):
        try:
            sd = remove_tied_weights_from_state_dict(dict(sd), model)
            hf_done = True
        except RuntimeError:  # sharing transformers does not know about (e.g. ties made by hand)
            pass
    if not hf_done:
        for keys in groups.values():
            kept = [k for k in keys if k not in aliases]
            for k in kept[1:]:
                sd.pop(k, None)
    key_of = {id(full[k]): k for k in sd}
    for k, v in full.items():
        if k not in sd and k not in aliases:
            keep = key_of.get(id(v))
            if keep is None:
                raise RuntimeError(f"state dict entry {k} was dropped as a duplicate but no kept entry shares it")
            aliases[k] = keep
    return {k: v.contiguous().cpu() for k, v in sd.items()}, aliases


def save_merged(model: nn.Module, path: str | Path) -> Path:
    """Save a (merged) model atomically in mtlab's compact format: `model.safetensors` with each
    shared tensor once, `config.json` (with mtlab_merges), `generation_config.json` if any, and
    `mtlab_merges.json` (format, model class, merges, the dropped aliases {key: stored key}, dtype).
    With merges, plain transformers is made to refuse the folder (see the module docstring) and a
    README.md explains why; `mtlab.export.export` writes a standard folder instead."""
    path = Path(path)
    tensors, aliases = _dedup_state_dict(model)
    dtypes = sorted({str(t.dtype) for t in tensors.values() if t.is_floating_point()})
    record = {"format": _FORMAT, "model_class": type(model).__name__,
              "merges": [str(s) for s in merged_specs(model)], "weights": WEIGHTS_NAME,
              "aliases": dict(sorted(aliases.items())), "dtypes": dtypes}
    with atomic_dir(path) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        config = getattr(model, "config", None)
        if hasattr(config, "save_pretrained"):
            config.save_pretrained(tmp)
            if record["merges"]:
                record["config_fields"] = _guard_config(tmp / "config.json")
                (tmp / README_NAME).write_text(_compact_readme(type(model).__name__, record["merges"]))
        gen = getattr(model, "generation_config", None)
        if gen is not None and hasattr(gen, "save_pretrained"):
            gen.save_pretrained(tmp)
        write_json(tmp / MERGES_NAME, record)
    return path


def _guard_config(config_path: Path) -> dict:
    """Write the guard values into config.json; returns the real ones, for load_merged."""
    fields = json.loads(config_path.read_text())
    real = {k: fields.get(k) for k in ("model_type", "dtype")}
    write_json(config_path, {LOAD_WITH_KEY: LOAD_WITH, **fields, "model_type": GUARD_MODEL_TYPE,
                             "dtype": GUARD_DTYPE})
    return real


def _read_config(path: Path, record: dict):
    """The transformers config of a save_merged folder, with the guarded fields restored."""
    from transformers import CONFIG_MAPPING

    try:
        fields = json.loads((path / "config.json").read_text())
        fields.pop(LOAD_WITH_KEY, None)
        for k, v in record.get("config_fields", {}).items():
            if v is None:
                fields.pop(k, None)
            else:
                fields[k] = v
        return CONFIG_MAPPING[fields["model_type"]].from_dict(fields)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}/config.json is missing or unreadable ({e!r}); save the model again") from e


def _compact_readme(model_class: str, merges: list[str]) -> str:
    return f"""# A merged model in mtlab's compact format (not a plain Hugging Face folder)

{model_class} with tied feed-forward sublayers ({', '.join(merges)}): each tied weight is stored
once in `{WEIGHTS_NAME}`. Plain `transformers` would load this folder with the tied layers
re-initialised at random (wrong outputs), so `config.json` carries a `model_type` and a `dtype`
that make every transformers loader raise (upgrading transformers does not help), and names the
loader in `{LOAD_WITH_KEY}`. The real values are in `{MERGES_NAME}`.

- Load it with mtlab: `from mtlab.merging import load_merged; model = load_merged("<this folder>")`.
- For a folder that plain transformers loads: `from mtlab.export import export; export(model, "<new folder>")`
  (tied weights written as plain copies; the outputs are checked after reloading).
"""


def load_merged(path: str | Path, model_class: type[nn.Module] | None = None) -> nn.Module:
    """Load a directory written by `save_merged`: build the model from its config.json
    (`model_class`, default the saved transformers class), re-tie the recorded merges, then
    load the weights (aliases filled from the stored tensor). Returns the model in eval mode.
    Missing, corrupt or mismatching files raise mtlab.checkpoint.CheckpointError."""
    path = Path(path)
    try:
        record = json.loads((path / MERGES_NAME).read_text())
        merges, aliases = list(record["merges"]), dict(record["aliases"])
        weights_name = record.get("weights", WEIGHTS_NAME)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path / MERGES_NAME} is missing or unreadable ({e}); {path} is not a complete "
                              "save_merged directory: save the model again") from e
    if record.get("format", _FORMAT) > _FORMAT:
        raise CheckpointError(f"{path} was written by a newer mtlab (format {record['format']}); upgrade mtlab")
    if model_class is None:
        import transformers
        model_class = getattr(transformers, record.get("model_class", ""), None)
        if model_class is None:
            raise CheckpointError(f"{path}: model class {record.get('model_class')!r} is not a transformers class; "
                                  "pass model_class=")
    config = _read_config(path, record)
    config.mtlab_merges = []
    tensors = load_tensors(path / weights_name)
    model = model_class(config)
    floats = {t.dtype for t in tensors.values() if t.is_floating_point()}
    if len(floats) == 1:
        model.to(floats.pop())
    try:
        tie_ffs(model, merges)
    except ValueError as e:
        raise CheckpointError(f"{path}: the recorded merges do not fit the model built from config.json ({e})") from e
    for k, src in aliases.items():
        if src not in tensors:
            raise CheckpointError(f"{path}: alias {k} -> {src}, but {src} is not in {weights_name}; save the model again")
        tensors[k] = tensors[src]
    expected = set(model.state_dict())
    missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or extra:
        raise CheckpointError(f"{path}/{weights_name} does not fit {model_class.__name__}: missing {missing[:5]}, "
                              f"unexpected {extra[:5]}; was it written for another model?")
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}/{weights_name} does not fit {model_class.__name__} ({e})") from e
    sync_cache_depth(model)  # a folder saved before the decoder's depth was written for the KV cache
    return model.eval()
