"""Cross-layer similarity: linear CKA and neuron matching, streamed over data.

Linear CKA (Kornblith et al. 2019) between features X [n, d1], Y [n, d2] of
the same n tokens:

    CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)),   K = X X^T, L = Y Y^T
        = ||Cxy||_F^2 / (||Cxx||_F ||Cyy||_F)          (biased HSIC; C = centred cross-covariance)

Estimators offered by `cka_matrix` (`estimator=`):

"minibatch" (default) - Nguyen, Raghu & Kornblith (2021), "Do wide and deep
    networks learn the same things?": the tokens are cut into chunks of at
    most `chunk_tokens` (512); per chunk, for every layer, the token Gram
    matrix K_l (n_c x n_c) is formed, and the UNBIASED HSIC_1 estimator of
    Song et al. (2012) is accumulated for every pair of layers; then
    CKA_ij = sum_c HSIC_ij / sqrt(sum_c HSIC_ii * sum_c HSIC_jj).
    Why the default: memory is bounded by L * chunk^2 Gram entries (plus one
    batch), whatever d and the number of tokens, so a 36-layer x 3072-wide
    layer x layer matrix costs ~75 MB, where exact feature-space accumulation
    needs L^2/2 * d^2 cross-products (~50 GB there). Each chunk's HSIC_1 is
    unbiased for the population HSIC, so the ratio is a consistent estimate
    of the population CKA, free of the upward bias of the plug-in estimate at
    small n (independent features give ~0 rather than ~d/n). It is NOT equal
    to the full-data plug-in CKA; it is exactly the chunk-sum of textbook
    HSIC_1 values (`hsic1`), which is what the tests check.
"exact" - feature-space accumulation in float64 of the column sums and of
    X_i^T X_j for every pair i <= j: the centred Cxy = X^T Y - s_x s_y^T / n
    are exact, so the result equals the textbook full-data `linear_cka` on
    the concatenated tokens. Memory L(L+1)/2 * d^2 * 8 bytes, checked
    against `max_bytes` before running.

Neuron matching (`matching_matrix`): for two layers' `ff_pre` features, the
Pearson correlation of every neuron pair (streamed exactly,
`mtlab.stats.CorrelationStats`), a maximum-weight one-to-one
assignment (scipy linear_sum_assignment), and the mean correlation of the
matched pairs: 1 for layers that are permutations of each other.

Encoder and decoder layers see different tokens, so cross-stack entries are
undefined: a matrix over several stacks is block-diagonal with NaN outside
the blocks (drawn blank by `heatmap`). Padding is excluded and tokens are
counted per stack (`mtlab.capture`).

Special tokens are LEFT OUT by default (`exclude="special"`, the one switch of
`cka_matrix` and `matching_matrix`): in BERT-style encoders [CLS] and [SEP] carry
activations far larger than the other tokens in a few dimensions and dominate
linear CKA (MiniLM's layers 0-3 read 0.99-1.00 over all tokens). The ids are
the special tokens of the model's tokenizer (`special_ids`: the tokenizer saved
beside the model, found through `model.name_or_path`; else the special ids its
config names, with a warning), left out of the input positions (every stack but
a decoder, which keeps all its tokens). `exclude=None` keeps every token;
a tokenizer, a list of ids, a boolean mask or a callable choose others
(`mtlab.capture`). The choice is recorded in `df.attrs["config"]`
(`tokens_left_out`, `special_ids`, `special_ids_from`, `excluded_tokens`).
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pandas as pd
from torch import nn

from .anatomy import anatomy, out_features
from .capture import Capture
from .stats import (CorrelationFeed, CorrelationStats, FeatureCKA, MinibatchCKA, assign, hsic1, linear_cka,
                    linear_cka_features, matching_score, neuron_correlation, unbiased_cka)

__all__ = ["linear_cka", "linear_cka_features", "hsic1", "unbiased_cka", "MinibatchCKA", "FeatureCKA",
           "neuron_correlation", "match_neurons", "matching_score", "cka_matrix", "matching_matrix", "heatmap",
           "SPECIAL", "special_ids", "resolve_exclude"]


# ---------------------------------------------------------------------------
# neuron matching

match_neurons = assign  # (perm, mean matched correlation); the one assignment lives in mtlab.stats


# ---------------------------------------------------------------------------
# model-level matrices

def _stacks(model, stack: str | None) -> list:
    an = anatomy(model)
    return [an.stack(stack)] if stack is not None else list(an.stacks.values())


def _frame(labels: list[str], blocks: dict[str, tuple[list[int], np.ndarray]]) -> pd.DataFrame:
    M = np.full((len(labels), len(labels)), np.nan)
    for idx, mat in blocks.values():
        M[np.ix_(idx, idx)] = mat
    return pd.DataFrame(M, index=labels, columns=labels)


SPECIAL = "special"  # the default of `exclude`: the special tokens of the model's tokenizer
CONFIG_SPECIAL_FIELDS = ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id",
                         "mask_token_id", "unk_token_id")


def _tokenizer_ids(path: str) -> list[int] | None:
    """all_special_ids of the tokenizer saved at `path` (a folder, or a name in the local HF cache), or None."""
    folder = Path(path)
    if folder.is_dir():
        from .tasks.g2p import SPECIALS, TOKENIZER_FILE

        if (folder / TOKENIZER_FILE).is_file():  # the bundled G2P teacher's own tokenizer
            return list(range(len(SPECIALS)))
    try:
        from transformers import AutoTokenizer
        from transformers.utils import logging

        level = logging.get_verbosity()
        logging.set_verbosity_error()
        try:
            tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        finally:
            logging.set_verbosity(level)
    except Exception:  # noqa: BLE001 - no tokenizer there: the caller falls back and says so
        return None
    return sorted({int(i) for i in tok.all_special_ids})


def special_ids(model: nn.Module) -> tuple[list[int], str]:
    """(ids, where they came from): the special token ids of the model's tokenizer, found beside the model
    (`model.name_or_path`: a save_pretrained folder with its tokenizer, or the G2P teacher's folder), else
    the special ids its config names (pad, bos, eos, sep, cls, mask, unk). ([], reason) if neither."""
    path = getattr(model, "name_or_path", "") or getattr(getattr(model, "config", None), "_name_or_path", "")
    if path:
        ids = _tokenizer_ids(str(path))
        if ids is not None:
            return ids, f"the tokenizer saved with the model ({Path(str(path)).name or path})"
    cfg = getattr(model, "config", None)
    named = {f: getattr(cfg, f, None) for f in CONFIG_SPECIAL_FIELDS}
    named = {f: v for f, v in named.items() if isinstance(v, int) and not isinstance(v, bool) and v >= 0}
    if named:
        return sorted(set(named.values())), "the model config (" + ", ".join(f"{k}={v}" for k, v in named.items()) + ")"
    return [], "no tokenizer beside the model and no special token ids in its config"


def _reads_token_ids(model: nn.Module) -> bool:
    try:
        return isinstance(model.get_input_embeddings(), nn.Embedding)
    except (AttributeError, NotImplementedError):
        return getattr(getattr(model, "config", None), "vocab_size", None) is not None


def resolve_exclude(model: nn.Module, exclude, caller: str = "cka_matrix") -> tuple[object, dict]:
    """`exclude` as `mtlab.capture` takes it, and what to record about it in a result's config:
    "special" (the default) becomes the special token ids of the model's tokenizer (`special_ids`)."""
    if isinstance(exclude, str):
        if exclude != SPECIAL:
            raise ValueError(f"{caller}: exclude={exclude!r} is not a choice; use exclude='special' (the default: "
                             "leave the tokenizer's special tokens out), exclude=None (keep every token), a "
                             "tokenizer, a list of token ids, or a boolean mask")
        if not _reads_token_ids(model):
            return None, {"tokens_left_out": "none (the model reads no token ids)"}
        ids, source = special_ids(model)
        if not ids:
            raise ValueError(f"{caller} leaves the tokenizer's special tokens out by default, but found {source} "
                             f"(name_or_path {getattr(model, 'name_or_path', '')!r}): pass exclude=tokenizer (or a "
                             "list of special token ids), or exclude=None to keep every token")
        if source.startswith("the model config"):
            warnings.warn(f"{caller}: no tokenizer found beside the model, so only the special token ids named in "
                          f"{source} are left out; pass exclude=tokenizer to leave out all of its special tokens "
                          "(e.g. [CLS], [SEP]), or exclude=None to keep every token", UserWarning, stacklevel=3)
        return ids, {"tokens_left_out": "special tokens", "special_ids": ids, "special_ids_from": source}
    if exclude is None:
        return None, {"tokens_left_out": "none"}
    if hasattr(exclude, "all_special_ids"):
        ids = sorted({int(i) for i in exclude.all_special_ids})
        return exclude, {"tokens_left_out": "special tokens", "special_ids": ids, "special_ids_from": "exclude=tokenizer"}
    if isinstance(exclude, (list, tuple, set, frozenset)) and all(isinstance(i, int) for i in exclude):
        return exclude, {"tokens_left_out": "token ids", "special_ids": sorted(int(i) for i in exclude),
                         "special_ids_from": "exclude=ids"}
    return exclude, {"tokens_left_out": "positions of a mask (exclude=mask)"}


def _resolve_batches(batches, passes: int = 1):
    if callable(batches):
        return batches
    if passes > 1 and iter(batches) is batches:
        raise ValueError(f"this needs {passes} passes over the data, but batches is a one-shot iterator: "
                         "pass a list, or a callable returning a fresh iterator")
    return lambda: batches


def cka_matrix(model: nn.Module, batches: Iterable | Callable[[], Iterable], point: str = "ff_out",
               stack: str | None = None, max_tokens: int | None = 10_000, estimator: str = "minibatch",
               chunk_tokens: int = 512, max_bytes: float = 2 * 2**30, progress: bool = True,
               exclude="special") -> pd.DataFrame:
    """Layer x layer linear CKA of one hook point kind (default: FF sublayer outputs).
    `exclude`: positions to leave out; default "special", the special tokens of the model's tokenizer
    (see the module doc); None keeps every token; or a tokenizer, token ids, a mask (`mtlab.capture`).

    One capture pass; at most `max_tokens` non-padding tokens per stack. Rows/columns are
    "<stack>.<layer>"; with stack=None all stacks are included and cross-stack entries are
    NaN (different tokens). `df.attrs["config"]` records point, estimator, tokens per stack.
    """
    if estimator not in ("minibatch", "exact"):
        raise ValueError(f"estimator must be 'minibatch' or 'exact', got {estimator!r}")
    exclude, left_out = resolve_exclude(model, exclude, "cka_matrix")
    stacks = _stacks(model, stack)
    labels, blocks, consumers, points = [], {}, {}, []
    for st in stacks:
        names = [f"{st.name}.{i}.{point}" for i in range(len(st))]
        idx = list(range(len(labels), len(labels) + len(names)))
        labels += [f"{st.name}.{i}" for i in range(len(st))]
        consumers[st.name] = (MinibatchCKA(names, chunk_tokens) if estimator == "minibatch"
                              else FeatureCKA(names, max_bytes))
        blocks[st.name] = (idx, None)
        points += names
    res = Capture(model, points, list(consumers.values()), exclude).run(
        _resolve_batches(batches)(), max_tokens=max_tokens, progress=progress, desc=f"CKA {point}")
    for name, c in consumers.items():
        blocks[name] = (blocks[name][0], c.matrix())
    df = _frame(labels, blocks)
    cfg = {"measure": "linear CKA", "point": point, "estimator": estimator, "tokens": res.tokens,
           "max_tokens": max_tokens, "batches": res.batches, **left_out, "excluded_tokens": res.excluded}
    if estimator == "minibatch":
        cfg.update(chunk_tokens=chunk_tokens, chunks={k: c.chunks for k, c in consumers.items()},
                   skipped_tokens={k: c.skipped_tokens for k, c in consumers.items()})
    df.attrs["config"] = cfg
    return df


def _width(layer, point: str) -> int:
    return out_features(layer.ff.w_in if point in ("ff_pre", "ff_gate", "ff_act") else layer.ff.w_out)


def matching_matrix(model: nn.Module, batches: Iterable | Callable[[], Iterable], point: str = "ff_pre",
                    stack: str | None = None, max_tokens: int | None = 10_000, max_bytes: float = 2**30,
                    progress: bool = True, exclude="special") -> pd.DataFrame:
    """Layer x layer neuron-matching score: mean correlation of matched neurons (see module doc).

    The d x d float64 cross-products for all pairs may not fit: pairs are packed into
    capture passes of at most `max_bytes` of statistics each; several passes need
    `batches` to be a list or a callable returning a fresh iterator. Diagonal = 1.
    `exclude`: positions to leave out, as in `cka_matrix` (default: the tokenizer's special tokens).
    """
    exclude, left_out = resolve_exclude(model, exclude, "matching_matrix")
    stacks = _stacks(model, stack)
    labels, items = [], []  # items: (stack, anchor, [others], bytes)
    offsets = {}
    for st in stacks:
        offsets[st.name] = len(labels)
        labels += [f"{st.name}.{i}" for i in range(len(st))]
        widths = [_width(st.layer(i), point) for i in range(len(st))]
        for a in range(len(st) - 1):
            group, size = [], 0
            for j in range(a + 1, len(st)):
                cost = 8 * widths[a] * widths[j]
                if cost > max_bytes:
                    raise MemoryError(f"one pair needs {cost / 2**30:.2f} GiB of statistics > max_bytes")
                if group and size + cost > max_bytes:
                    items.append((st.name, a, group, size))
                    group, size = [], 0
                group.append(j)
                size += cost
            items.append((st.name, a, group, size))
    passes, cur, size = [], [], 0
    for it in items:
        if cur and size + it[3] > max_bytes:
            passes.append(cur)
            cur, size = [], 0
        cur.append(it)
        size += it[3]
    if cur:
        passes.append(cur)
    M = np.full((len(labels), len(labels)), np.nan)
    for st in stacks:
        for i in range(len(st)):
            M[offsets[st.name] + i, offsets[st.name] + i] = 1.0
    get = _resolve_batches(batches, len(passes))
    tokens: dict[str, int] = {}
    excluded: dict[str, int] = {}
    for k, items_k in enumerate(passes):
        feeds, points = [], []
        for sname, a, others, _ in items_k:
            names = {j: f"{sname}.{j}.{point}" for j in others}
            ap = f"{sname}.{a}.{point}"
            stats = CorrelationStats(anchor=a)
            feeds.append((sname, a, stats, CorrelationFeed(stats, ap, names)))
            points += [ap, *names.values()]
        res = Capture(model, list(dict.fromkeys(points)), [f[3] for f in feeds], exclude).run(
            get(), max_tokens=max_tokens, progress=progress, desc=f"matching {point} pass {k + 1}/{len(passes)}")
        tokens.update(res.tokens)
        excluded.update(res.excluded)
        for sname, a, stats, _ in feeds:
            o = offsets[sname]
            for j in stats.layers:
                score = match_neurons(stats.correlation(j))[1]
                M[o + a, o + j] = M[o + j, o + a] = score
    df = pd.DataFrame(M, index=labels, columns=labels)
    df.attrs["config"] = {"measure": "neuron matching (mean matched Pearson correlation)", "point": point,
                          "tokens": tokens, "max_tokens": max_tokens, "passes": len(passes), **left_out,
                          "excluded_tokens": excluded}
    return df


# ---------------------------------------------------------------------------
# drawing

def heatmap(df: pd.DataFrame, ax=None, title: str | None = None, **kw):
    """Seaborn heatmap of a layer x layer matrix (NaN cells blank); returns the Axes."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    if not isinstance(df, pd.DataFrame):
        raise ValueError(f"heatmap needs a pandas DataFrame, got {type(df).__name__}")
    if df.empty:
        raise ValueError("heatmap: the DataFrame is empty (no layers)")
    if df.shape[0] != df.shape[1]:
        raise ValueError(f"heatmap: expected a square layer x layer matrix, got shape {df.shape}")
    if ax is None:
        n = df.shape[0]
        _, ax = plt.subplots(figsize=(min(3 + 0.35 * n, 16), min(2.5 + 0.35 * n, 15)))
    cfg = df.attrs.get("config", {})
    opts = dict(vmin=0.0, vmax=1.0, cmap="viridis", square=True,
                cbar_kws={"label": cfg.get("measure", "similarity")})
    opts.update(kw)
    sns.heatmap(df.astype(float), ax=ax, **opts)
    if title is None and cfg:
        tok = ", ".join(f"{k} {v}" for k, v in cfg.get("tokens", {}).items())
        title = f"{cfg.get('measure', '')} of {cfg.get('point', '')}" + (f" ({tok} tokens)" if tok else "")
        if cfg.get("tokens_left_out") == "special tokens":
            title += ", special tokens left out"
    if title:
        ax.set_title(title)
    return ax
