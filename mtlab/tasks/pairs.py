"""Users' own (source, target) text pairs as a Seq2SeqTask.

The data comes from a local file (``PairsTask.from_file``: TSV, CSV or JSONL) or
from memory (``PairsTask.from_dataset``: a Hugging Face ``datasets.Dataset`` /
``DatasetDict``, a pandas DataFrame, or a plain dict of split -> list of
``(source, target)`` pairs). Text is turned into ids by the model's own Hugging
Face tokenizer, exactly as that tokenizer does it (special tokens, EOS,
truncation), and decoded with ``skip_special_tokens=True``.

Splits: ``train``, ``dev`` and ``test``. Names are normalised (``validation``,
``valid``, ``val`` -> ``dev``; ``training`` -> ``train``; ``testing`` -> ``test``).
When the data has no split information, or has a train split but lacks dev
and/or test, the missing splits are carved out of train by a stable SHA-1 hash
of the source text (as ``g2p.split_of`` does), so the split is identical on
every machine and identical sources never straddle two splits.

Scores (all computed by the reference libraries, never by hand):

* ``metric=None`` (default): picked from the data, "chrf" when the median target has
  fewer than 4 words (BLEU's n-gram order: it would be 0.0 for every model), else "bleu".
* ``metric="bleu"``: ``{"bleu", "chrf"}`` from ``sacrebleu.corpus_bleu``
  and ``sacrebleu.corpus_chrf``, on sacrebleu's 0-100 scale; primary metric BLEU.
  On targets under 4 words it warns (``ShortTargetsWarning``) and names "chrf".
* ``metric="chrf"``: ``{"chrf"}`` from ``sacrebleu.corpus_chrf``; primary chrF.
* ``metric="rouge"``: ``{"rouge1", "rouge2", "rougeL"}``, the mean over examples of
  the per-example F1 from ``rouge_score.rouge_scorer`` (Porter stemming on by
  default), multiplied by 100 so that all mtlab text metrics share the 0-100 scale
  (identical texts score 100.0, not 1.0); primary metric ROUGE-L.
  Note that rouge-score's default tokenizer keeps only ``[a-z0-9]`` runs, so it is
  meant for English-like text.
"""
from __future__ import annotations

import csv
import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterable, Sequence

from .base import SPLITS, Batch, ModelMismatchError, Seq2SeqTask, pad
from .guards import generation_cap, position_limit
from .metrics import BLEU_ORDER, ShortTargetsWarning, default_metric, get_metric, median_words, short_targets_message
from .split import split_by_hash

SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "dev": "dev", "development": "dev", "validation": "dev", "valid": "dev", "val": "dev",
    "test": "test", "testing": "test",
}
FILE_FORMATS = {".tsv": "tsv", ".tab": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
DEFAULT_SOURCE_COL, DEFAULT_TARGET_COL = "source", "target"
DEFAULT_MAX_LEN = 256
#: column names that mark a first line as a header (compared in lower case, digits and _-. suffixes ignored)
HEADER_WORDS = frozenset("""
src tgt source target sources targets input inputs output outputs text texts label labels prompt prompts
completion completions response responses question questions answer answers query queries sentence sentences
translation translations original reference references hypothesis id idx index split lang language
""".split())
_ENCODE_CHUNK = 1024

Pairs = tuple[list[str], list[str]]


def split_of(source: str, dev_fraction: float = 0.05, test_fraction: float = 0.05) -> str:
    """"train", "dev" or "test" from the first 8 bytes of the source text's SHA-1.

    Deterministic across machines and Python versions (no ``hash()`` salt).
    """
    return split_by_hash(source, dev_fraction, test_fraction)


def _check_fractions(dev_fraction: float, test_fraction: float) -> None:
    for name, f in (("dev_fraction", dev_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= f < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {f!r}")
    if dev_fraction + test_fraction >= 1.0:
        raise ValueError(f"dev_fraction + test_fraction must be < 1 so train is not empty, got {dev_fraction} + {test_fraction}")


def _normalise_split(name: Any, where: str) -> str:
    key = str(name).strip().lower()
    if key not in SPLIT_ALIASES:
        raise ValueError(f"{where}: unknown split {name!r}; expected one of train, dev, test "
                         f"(aliases: {', '.join(sorted(k for k in SPLIT_ALIASES if k not in SPLITS))})")
    return SPLIT_ALIASES[key]


def _text(value: Any, what: str) -> str:
    if value is None or (isinstance(value, float) and value != value):  # None or NaN
        raise ValueError(f"{what} is missing (got {value!r})")
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return str(value)
    raise ValueError(f"{what} must be text, got {type(value).__name__}: {value!r}")


def _lookup(row: Mapping, col: str, what: str) -> Any:
    """row[col], or a nested row["a"]["b"] for col="a.b" (e.g. "translation.en")."""
    if col in row:
        return row[col]
    if "." in col:
        head, _, rest = col.partition(".")
        if head in row and isinstance(row[head], Mapping):
            return _lookup(row[head], rest, what)
    raise ValueError(f"{what}: unknown column {col!r}; columns present: {list(row)}")


def _assemble(parts: Mapping[str, Pairs], *, carve: bool, dev_fraction: float, test_fraction: float) -> dict[str, Pairs]:
    """Carve missing dev/test out of train by hash (when `carve`); splits that end up empty are left out."""
    splits = {s: (list(a), list(b)) for s, (a, b) in parts.items()}
    missing = [s for s in ("dev", "test") if s not in splits]
    if carve and "train" in splits and missing:
        fractions = {"dev": dev_fraction if "dev" in missing else 0.0, "test": test_fraction if "test" in missing else 0.0}
        src, tgt = splits.pop("train")
        out: dict[str, Pairs] = {"train": ([], [])}
        out.update({s: ([], []) for s in missing})
        for s, t in zip(src, tgt):
            b = out[split_of(s, fractions["dev"], fractions["test"])]
            b[0].append(s)
            b[1].append(t)
        empty = [s for s in missing if not out[s][0]]
        for s in empty:  # an empty split is left out, so using it fails with a clear KeyError
            del out[s]
        if any(fractions[s] > 0 for s in empty):
            names = " and ".join(empty)
            warnings.warn(f"the hash split of {len(src)} pairs left the {names} split(s) empty "
                          f"({', '.join(f'{s}_fraction={fractions[s]}' for s in empty)}), so the task has no {names} split; "
                          "use more data or larger fractions", stacklevel=3)
        splits.update(out)
    return {s: splits[s] for s in SPLITS if s in splits}


# ---- reading files ----------------------------------------------------------------------------------------------
def _read_table(path: Path, fmt: str, source_col, target_col, split_col, header: bool | None) -> list[tuple[str, str, Any]]:
    with path.open("r", encoding="utf-8-sig", newline="") as f:
        if fmt == "csv":
            rows = [(i, r) for i, r in enumerate(csv.reader(f), 1) if r and any(c.strip() for c in r)]
        else:  # TSV: plain tab split, quotes are ordinary characters
            rows = [(i, line.rstrip("\r\n").split("\t")) for i, line in enumerate(f, 1) if line.strip()]
    if not rows:
        raise ValueError(f"{path} is empty: no (source, target) pairs")
    first = rows[0][1]
    names = [c for c in (source_col, target_col, split_col) if isinstance(c, str)]
    if header is None:
        header = any(n in first for n in names)
        if not header and _looks_like_header(first):
            raise ValueError(
                f"{path}: the first line {first} looks like a header naming other columns than the ones asked for "
                f"(source_col={source_col!r}, target_col={target_col!r}); read as data it would become a training "
                f"pair. Name its columns, e.g. source_col={_guess(first, _SOURCE_WORDS, 0)!r}, "
                f"target_col={_guess(first, _TARGET_WORDS, 1)!r} (in a recipe: task.source_col / task.target_col), "
                "or pass header=False if that line is data")
    if header:
        columns, rows = first, rows[1:]

        def resolve(col, what):
            if isinstance(col, int):
                return col
            if col not in columns:
                raise ValueError(f"{path}: unknown {what} column {col!r}; columns present: {columns}")
            return columns.index(col)
    else:
        columns = None

        def resolve(col, what):
            if isinstance(col, int):
                return col
            default = {"source": (DEFAULT_SOURCE_COL, 0), "target": (DEFAULT_TARGET_COL, 1)}.get(what)
            if default and col == default[0] and len(first) == 2:
                return default[1]
            raise ValueError(f"{path}: unknown {what} column {col!r}: the first line is not a header naming it; "
                             f"columns present (first line, {len(first)} fields): {first}. Add a header line, "
                             f"use a 2-column file (source, target), or pass integer column indices")

    si, ti = resolve(source_col, "source"), resolve(target_col, "target")
    pi = None if split_col is None else resolve(split_col, "split")
    width = len(columns) if columns is not None else len(first)
    for col in (si, ti) + (() if pi is None else (pi,)):
        if not -width <= col < width:
            raise ValueError(f"{path}: column index {col} is out of range for {width} columns")
    out = []
    for lineno, r in rows:
        if len(r) != width:
            raise ValueError(f"{path}, line {lineno}: {len(r)} fields, expected {width} "
                             f"({'as in the header' if columns is not None else 'as on the first line'}); "
                             f"stray tab/comma or missing field?")
        out.append((r[si], r[ti], None if pi is None else r[pi]))
    return out


_SOURCE_WORDS = ("src", "source", "input", "prompt", "question", "query", "original", "text", "sentence")
_TARGET_WORDS = ("tgt", "target", "output", "label", "completion", "response", "answer", "translation", "reference")


def _guess(fields: list[str], words: Sequence[str], fallback: int) -> str:
    """The first header field that starts with one of `words` (e.g. 'src_text' for the source), else fields[fallback]."""
    return next((f for w in words for f in fields if f.strip().lower().startswith(w)), fields[fallback])


def _looks_like_header(fields: list[str]) -> bool:
    """Every field of a line is a column-like name (`src`, `tgt`, `source_text`, `input1`, ...)."""
    import re

    def name(f: str) -> bool:
        stem = re.sub(r"[\s_.-]*\d*$", "", f.strip().lower())
        parts = [p for p in re.split(r"[\s_.-]+", stem) if p]
        return bool(parts) and len(f) <= 40 and any(p in HEADER_WORDS for p in parts)

    return len(fields) >= 2 and all(name(f) for f in fields)


def _read_jsonl(path: Path, source_col, target_col, split_col) -> list[tuple[str, str, Any]]:
    out = []
    with path.open("r", encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {lineno}: not valid JSON ({e})") from e
            if not isinstance(row, Mapping):
                raise ValueError(f"{path}, line {lineno}: expected a JSON object per line, got {type(row).__name__}")
            where = f"{path}, line {lineno}"
            src = _text(_lookup(row, source_col, where), f"{where}: source {source_col!r}")
            tgt = _text(_lookup(row, target_col, where), f"{where}: target {target_col!r}")
            out.append((src, tgt, None if split_col is None else _lookup(row, split_col, where)))
    return out


# ---- reading in-memory data -------------------------------------------------------------------------------------
def _column(data, col: str, what: str) -> list:
    """A whole column of a datasets.Dataset (column_names) or pandas.DataFrame (columns); supports "a.b"."""
    present = list(getattr(data, "column_names", None) or list(getattr(data, "columns", [])))
    if col in present:
        values = data[col]
        return values.tolist() if hasattr(values, "tolist") else list(values)
    head, _, rest = col.partition(".")
    if rest and head in present:
        return [_lookup(v, rest, f"{what}, column {head!r}") for v in _column(data, head, what)]
    raise ValueError(f"{what}: unknown column {col!r}; columns present: {present}")


def _records(data, source_col: str, target_col: str, split_col: str | None, what: str) -> tuple[list, list, list | None]:
    if hasattr(data, "column_names") or (hasattr(data, "columns") and hasattr(data, "iloc")):
        src, tgt = _column(data, source_col, what), _column(data, target_col, what)
        spl = None if split_col is None else _column(data, split_col, what)
    elif isinstance(data, Mapping):  # {column: [values]}
        src, tgt = _column(_Columns(data), source_col, what), _column(_Columns(data), target_col, what)
        spl = None if split_col is None else _column(_Columns(data), split_col, what)
    elif isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
        raise TypeError(f"{what}: expected a Dataset, DataFrame, dict of columns or list of (source, target) pairs, "
                        f"got {type(data).__name__}")
    else:  # sequence of (source, target) pairs
        src, tgt = [], []
        for i, pair in enumerate(data):
            if isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence) or len(pair) != 2:
                raise ValueError(f"{what}, item {i}: expected a (source, target) pair, got {pair!r}")
            src.append(pair[0])
            tgt.append(pair[1])
        spl = None
    if len(src) != len(tgt):
        raise ValueError(f"{what}: {len(src)} sources but {len(tgt)} targets")
    src = [_text(v, f"{what}, item {i}: source") for i, v in enumerate(src)]
    tgt = [_text(v, f"{what}, item {i}: target") for i, v in enumerate(tgt)]
    return src, tgt, spl


class _Columns:
    """A dict of columns seen through the Dataset interface."""

    def __init__(self, d: Mapping):
        self.d = d
        self.column_names = list(d)

    def __getitem__(self, col):
        return list(self.d[col])


def _group(rows: Iterable[tuple[str, str, Any]], where: str) -> dict[str, Pairs]:
    parts: dict[str, Pairs] = {}
    for src, tgt, split in rows:
        s = _normalise_split(split, where)
        a, b = parts.setdefault(s, ([], []))
        a.append(src)
        b.append(tgt)
    return parts


class PairsTask(Seq2SeqTask):
    """(source, target) text pairs, tokenized by the model's own Hugging Face tokenizer.

    ``splits`` maps split name -> (sources, targets). Prefer the constructors
    ``from_file`` and ``from_dataset``, which also do the hash split.
    """

    name = "pairs"

    def __init__(
        self,
        splits: Mapping[str, tuple[Sequence[str], Sequence[str]]],
        tokenizer,
        *,
        max_source_len: int = DEFAULT_MAX_LEN,
        max_target_len: int = DEFAULT_MAX_LEN,
        metric: str | None = None,
        rouge_use_stemmer: bool = True,
        bleu_tokenize: str | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__()
        m = get_metric(metric) if metric is not None else None  # an unknown name fails before the data is read
        self.rouge_use_stemmer = rouge_use_stemmer
        self.bleu_tokenize = bleu_tokenize
        if name:
            self.name = name
        for what, n in (("max_source_len", max_source_len), ("max_target_len", max_target_len)):
            if not isinstance(n, int) or n < 1:
                raise ValueError(f"{what} must be a positive integer, got {n!r}")
        self.max_source_length = max_source_len
        self.max_target_length = max_target_len

        if tokenizer is None or not callable(tokenizer) or not hasattr(tokenizer, "decode"):
            raise TypeError(f"tokenizer must be a Hugging Face tokenizer (PreTrainedTokenizerBase), got {type(tokenizer).__name__}")
        if getattr(tokenizer, "pad_token_id", None) is None:
            raise ValueError(f"the tokenizer ({type(tokenizer).__name__}) has no pad token: set tokenizer.pad_token "
                             "(e.g. tokenizer.pad_token = tokenizer.eos_token, or add a '<pad>' token and resize the "
                             "model's embeddings) before building the task")
        self.tokenizer = tokenizer
        self.pad_id = int(tokenizer.pad_token_id)

        normalised: dict[str, Pairs] = {}
        for split, value in splits.items():
            s = _normalise_split(split, "splits")
            if s in normalised:
                raise ValueError(f"split {split!r} duplicates {s!r} (after normalising split names)")
            if not isinstance(value, (tuple, list)) or len(value) != 2:
                raise ValueError(f"split {split!r} must be a (sources, targets) pair of lists")
            src, tgt = list(value[0]), list(value[1])
            if len(src) != len(tgt):
                raise ValueError(f"split {split!r} has {len(src)} sources but {len(tgt)} targets")
            normalised[s] = ([_text(x, f"split {split!r}, item {i}: source") for i, x in enumerate(src)],
                             [_text(x, f"split {split!r}, item {i}: target") for i, x in enumerate(tgt)])
        if not any(src for src, _ in normalised.values()):
            raise ValueError("no (source, target) pairs: every split is empty")
        self.splits = {s: normalised[s] for s in SPLITS if s in normalised}
        targets = [t for _, tgt in self.splits.values() for t in tgt]
        if m is None:  # from the data: chrF where BLEU's 4-grams cannot match
            m = get_metric(default_metric(targets))
        elif m.name == "bleu" and median_words(targets) < BLEU_ORDER:
            warnings.warn(short_targets_message(median_words(targets)), ShortTargetsWarning, stacklevel=2)
        self.metric = m.name
        self.metric_keys, self.primary_metric, self.higher_is_better = m.keys, m.primary, m.higher_is_better

    # ---- constructors ---------------------------------------------------------------------------------------
    @classmethod
    def from_file(
        cls,
        path: str | Path,
        tokenizer,
        *,
        source_col: str | int = DEFAULT_SOURCE_COL,
        target_col: str | int = DEFAULT_TARGET_COL,
        split_col: str | int | None = None,
        dev_fraction: float = 0.05,
        test_fraction: float = 0.05,
        max_source_len: int = DEFAULT_MAX_LEN,
        max_target_len: int = DEFAULT_MAX_LEN,
        metric: str | None = None,
        header: bool | None = None,
        **kw,
    ) -> "PairsTask":
        """Read a local .tsv/.tab, .csv or .jsonl/.ndjson file (format chosen by extension).

        TSV/CSV: a header line naming the columns, or (``header=None`` auto-detects)
        a header-less 2-column file of source<TAB>target. A first line that names other
        columns (``src<TAB>tgt``) is refused, naming ``source_col``/``target_col``, rather than
        read as a training pair. Integer column indices are
        accepted too. TSV fields are split on tabs only (quotes are plain text); CSV
        uses standard quoting. JSONL: one object per line; "a.b" reads nested fields.
        Values of ``split_col`` must be train/dev/test (or validation/valid/val); with
        no split column the split is a stable hash of the source text.
        """
        _check_fractions(dev_fraction, test_fraction)
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"pairs file not found: {path}")
        if not path.is_file():
            raise ValueError(f"{path} is not a file")
        fmt = FILE_FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise ValueError(f"{path}: unsupported extension {path.suffix!r}; supported: {', '.join(FILE_FORMATS)}")
        if fmt == "jsonl":
            if isinstance(source_col, int) or isinstance(target_col, int) or isinstance(split_col, int):
                raise ValueError(f"{path}: JSONL columns are named by key, not by index")
            rows = _read_jsonl(path, source_col, target_col, split_col)
        else:
            rows = _read_table(path, fmt, source_col, target_col, split_col, header)
        if not rows:
            raise ValueError(f"{path} holds no (source, target) pairs")
        if split_col is None:
            parts = {"train": ([r[0] for r in rows], [r[1] for r in rows])}
        else:
            parts = _group(rows, f"{path}, split column {split_col!r}")
        splits = _assemble(parts, carve=True, dev_fraction=dev_fraction, test_fraction=test_fraction)
        return cls(splits, tokenizer, max_source_len=max_source_len, max_target_len=max_target_len, metric=metric,
                   name=kw.pop("name", f"pairs:{path.name}"), **kw)

    @classmethod
    def from_dataset(
        cls,
        data,
        tokenizer,
        *,
        source_col: str = DEFAULT_SOURCE_COL,
        target_col: str = DEFAULT_TARGET_COL,
        split_col: str | None = None,
        dev_fraction: float = 0.05,
        test_fraction: float = 0.05,
        max_source_len: int = DEFAULT_MAX_LEN,
        max_target_len: int = DEFAULT_MAX_LEN,
        metric: str | None = None,
        **kw,
    ) -> "PairsTask":
        """From memory; ``datasets`` is not needed (objects are duck-typed).

        ``data`` is either one table (a ``datasets.Dataset`` or a pandas DataFrame,
        split by ``split_col`` or else by hash), or a mapping split -> data, where each
        value is a Dataset/DataFrame, a dict of columns, or a list of (source, target)
        pairs (e.g. a ``DatasetDict``, or ``{"train": [("hi", "salut"), ...]}``).
        Nested columns are read with "a.b" (``source_col="translation.de"``). Splits
        missing from a mapping that has train (dev, test, or both) are hash-carved
        from train with the given fractions.
        """
        _check_fractions(dev_fraction, test_fraction)
        is_table = hasattr(data, "column_names") or (hasattr(data, "columns") and hasattr(data, "iloc"))
        if is_table:
            src, tgt, spl = _records(data, source_col, target_col, split_col, "dataset")
            parts = {"train": (src, tgt)} if spl is None else _group(zip(src, tgt, spl), f"dataset, split column {split_col!r}")
        elif isinstance(data, Mapping):
            if split_col is not None:
                raise ValueError("split_col is for a single table; a mapping is already split -> data")
            parts = {}
            for split, value in data.items():
                s = _normalise_split(split, "dataset")
                if s in parts:
                    raise ValueError(f"dataset split {split!r} duplicates {s!r} (after normalising split names)")
                src, tgt, _ = _records(value, source_col, target_col, None, f"dataset split {split!r}")
                parts[s] = (src, tgt)
        else:
            raise TypeError(f"from_dataset expects a datasets.Dataset/DatasetDict, a pandas DataFrame or a dict of "
                            f"split -> list of (source, target) pairs; got {type(data).__name__}")
        if not any(p[0] for p in parts.values()):
            raise ValueError("the dataset holds no (source, target) pairs")
        splits = _assemble(parts, carve=True, dev_fraction=dev_fraction, test_fraction=test_fraction)
        return cls(splits, tokenizer, max_source_len=max_source_len, max_target_len=max_target_len, metric=metric, **kw)

    # ---- codec ----------------------------------------------------------------------------------------------
    def encode_source(self, text: str) -> list[int]:
        return list(self.tokenizer(text, truncation=True, max_length=self.max_source_length)["input_ids"])

    def encode_target(self, text: str) -> list[int]:
        return list(self.tokenizer(text_target=text, truncation=True, max_length=self.max_target_length)["input_ids"])

    def decode_target(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids if int(i) >= 0]  # tolerate -100 label padding
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def encoded(self, split: str) -> tuple[list[list[int]], list[list[int]]]:
        """Same ids as encode_source/encode_target per text, tokenized in chunks (much faster for fast tokenizers)."""
        if split not in self._encoded:
            src, tgt = self.texts(split)
            self._encoded[split] = (self._encode_many(src, target=False), self._encode_many(tgt, target=True))
        return self._encoded[split]

    def _encode_many(self, texts: list[str], *, target: bool) -> list[list[int]]:
        out: list[list[int]] = []
        n = self.max_target_length if target else self.max_source_length
        for i in range(0, len(texts), _ENCODE_CHUNK):
            chunk = texts[i : i + _ENCODE_CHUNK]
            enc = self.tokenizer(text_target=chunk, truncation=True, max_length=n) if target else \
                self.tokenizer(chunk, truncation=True, max_length=n)
            out += [list(ids) for ids in enc["input_ids"]]
        return out

    def collate(self, split: str, index: Sequence[int]) -> Batch:
        # attention mask from true lengths, not `!= pad_id`: correct even when pad_token == eos_token
        src, tgt = self.encoded(split)
        seqs = [src[i] for i in index]
        input_ids = pad(seqs, self.pad_id)
        lengths = [len(s) for s in seqs]
        mask = pad([[1] * n for n in lengths], 0)
        return Batch(input_ids, mask, pad([tgt[i] for i in index], -100), list(index))

    def max_target_len(self, source_len: int) -> int:
        return self.max_target_length

    # ---- the model's position table ---------------------------------------------------------------------------
    def fit_positions(self, model) -> "PairsTask":
        """Cap the source and target lengths at what `model`'s absolute position table holds
        (`max_position_embeddings`, e.g. a BART with 64 positions; relative or rotary positions, as in
        T5, have no bound), so training and decoding never index past it. Warns when data gets cut."""
        limit = position_limit(model)
        if limit is None:
            return self
        src_cap, tgt_cap = limit, generation_cap(model)
        if self.max_source_length <= src_cap and self.max_target_length <= tgt_cap:
            return self
        self.max_source_length = min(self.max_source_length, src_cap)
        self.max_target_length = min(self.max_target_length, tgt_cap)
        self._encoded.clear()
        src, tgt = self.encoded("train") if "train" in self.splits else ([], [])
        cut = sum(len(s) >= self.max_source_length for s in src) + sum(len(t) >= self.max_target_length for t in tgt)
        if cut:
            warnings.warn(f"the model's position table holds {limit} positions, so sources are cut to "
                          f"{self.max_source_length} tokens and targets to {self.max_target_length} (the decoder start "
                          f"token takes one); {cut} train text(s) reach that length and may be cut", stacklevel=2)
        return self

    def check_model(self, model, splits: Sequence[str] | None = None) -> None:
        """The vocabulary checks of every task, and that the encoded texts fit the model's position table."""
        super().check_model(model, splits)
        limit = position_limit(model)
        if limit is None:
            return
        for split in splits if splits is not None else list(self.splits):
            src, tgt = self.encoded(split)
            longest_src, longest_tgt = max(map(len, src), default=0), max(map(len, tgt), default=0)
            if longest_src > limit or longest_tgt > generation_cap(model):
                raise ModelMismatchError(
                    f"split {split!r} holds sources of up to {longest_src} tokens and targets of up to {longest_tgt}, "
                    f"but the model's position table holds {limit} positions (max_position_embeddings; a target "
                    f"also needs the decoder start token): build the task with max_source_len={limit} and "
                    f"max_target_len={generation_cap(model)} or less, or call task.fit_positions(model)")

    def predict(self, model, split: str, *, max_new_tokens: int | None = None, **kw):
        """`Seq2SeqTask.predict`, decoding at most as many tokens as the model's position table holds."""
        cap = generation_cap(model)
        if cap is not None:
            if max_new_tokens is not None and max_new_tokens > cap:
                raise ValueError(f"max_new_tokens={max_new_tokens}, but the model's position table holds "
                                 f"{cap + 1} positions (with the decoder start token): use max_new_tokens={cap} "
                                 "or less")
            max_new_tokens = max_new_tokens or min(self.max_target_length, cap)
        return super().predict(model, split, max_new_tokens=max_new_tokens, **kw)

    # ---- scoring --------------------------------------------------------------------------------------------
    def score(self, hypotheses: list[str], references: list[str]) -> dict[str, float]:
        options = {"bleu": {"tokenize": self.bleu_tokenize}, "rouge": {"use_stemmer": self.rouge_use_stemmer}}
        return get_metric(self.metric)(hypotheses, references, **options.get(self.metric, {}))

    def sizes(self) -> dict[str, int]:
        return {s: len(v[0]) for s, v in self.splits.items()}
