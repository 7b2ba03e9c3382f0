"""English sentences, offline and deterministic: a corpus cut from the Python standard library,
and a task holding its train/dev/test splits for sentence-embedding models.

The corpus ships as `data/sentences/sentences.txt` (one sentence a line, UTF-8, ~1.6 MB; card
in `data/sentences/README.md`), so it is identical on every machine whatever Python runs mtlab.
It was cut once by `write_corpus` from CPython's own text: the docstrings and comments of
every `.py` file of the standard library (files in sorted path order; docstrings via `ast`,
comment blocks via `tokenize`), then the language-reference topics of `pydoc_data.topics`
(sorted by topic), split into sentences by one fixed regular expression, kept when they read
as English prose (`is_prose`: capitalised, end in . ! or ?, 5-40 words, mostly alphabetic,
no code-like characters outside short double-quoted names), de-duplicated keeping the first.

Splits: a sentence's split is a stable hash of its text (`split_of`: SHA-256, 80/10/10), so
a sentence never leaks across splits and every machine gets the same ones; within a split
sentences are ordered by that hash, so any prefix (`limit=`) is an unbiased sample.
"""
from __future__ import annotations

import ast
import io
import re
import sysconfig
import time
import tokenize
from collections.abc import Iterator, Sequence
from pathlib import Path

from tqdm.auto import tqdm

from ..embedding import embed_split, embedding_scores
from ..keys import digest, text_hash
from ..paths import ROOT
from .base import SPLITS, Batch, Seq2SeqTask, pad
from .split import split_by_hash

CORPUS_DIR = ROOT / "data" / "sentences"
CORPUS = CORPUS_DIR / "sentences.txt"
MIN_WORDS, MAX_WORDS = 5, 40
SHARES = {"train": 80, "dev": 10, "test": 10}  # percent, by hash
FIX = ("restore it with `git checkout -- data/sentences`, rebuild it with `python -m mtlab.tasks.sentences`, "
       "or pass path= a UTF-8 text file with one sentence a line")

__all__ = ["CORPUS", "SentencesTask", "split_of", "split_corpus", "read_corpus", "build_corpus", "write_corpus",
           "split_sentences", "is_prose"]


# ---------------------------------------------------------------------------
# cutting sentences (fixed rules: changing them changes the corpus)

_BOUNDARY = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_EMPHASIS = re.compile(r"\*([A-Za-z][^*]*?)\*")            # *word* in the reference topics
_ABBREVIATION = re.compile(r"\b(e\.g\.|i\.e\.|etc\.|vs\.)")
_QUOTED = re.compile(r'"[^"]{1,40}"')                      # a short quoted name reads as one word
_VERSION = re.compile(r"\d+(\.\d+)+")
_CODE = re.compile(r">>>|->|::|[{}\\|<>=_`*#@$\[\]~^]|\.\.\.|\w\.\w|\w\(")


def split_sentences(text: str) -> Iterator[str]:
    """Sentences of `text`: paragraphs at blank lines, whitespace collapsed, cut after . ! ?
    followed by a capital letter."""
    text = _EMPHASIS.sub(r"\1", text)
    for para in re.split(r"\n\s*\n", text):
        yield from _BOUNDARY.split(" ".join(para.split()))


def is_prose(sentence: str, min_words: int = MIN_WORDS, max_words: int = MAX_WORDS) -> bool:
    """Whether a sentence reads as English prose rather than code, a heading or a fragment."""
    if not sentence[:1].isupper() or sentence[-1:] not in (".", "!", "?"):
        return False
    s = _VERSION.sub("N", _QUOTED.sub("Q", _ABBREVIATION.sub("", sentence)))
    if _CODE.search(s):
        return False
    words = s.split()
    if not min_words <= len(words) <= max_words:
        return False
    return sum(w.strip(".,;:()'\"!?").isalpha() for w in words) >= 0.85 * len(words)


def _docstrings(src: str) -> Iterator[str]:
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                yield doc


def _comment_blocks(src: str) -> Iterator[str]:
    """Runs of comments on consecutive lines, joined into one text each."""
    block: list[str] = []
    last = -2
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type != tokenize.COMMENT:
            continue
        if tok.start[0] != last + 1 and block:
            yield " ".join(block)
            block = []
        block.append(tok.string.lstrip("#").strip())
        last = tok.start[0]
    if block:
        yield " ".join(block)


def stdlib_sources(root: str | Path | None = None) -> list[Path]:
    """The standard library's .py files (site-packages excluded), in sorted path order."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts)


def build_corpus(root: str | Path | None = None, progress: bool = True) -> list[str]:
    """The corpus, cut from this Python's standard library (see the module doc)."""
    from pydoc_data.topics import topics

    seen: set[str] = set()
    out: list[str] = []

    def add(text: str) -> None:
        for s in split_sentences(text):
            if s not in seen and is_prose(s):
                seen.add(s)
                out.append(s)

    for path in tqdm(stdlib_sources(root), desc="stdlib sources", disable=not progress):
        try:
            src = path.read_text(encoding="utf-8")
            texts = [*_docstrings(src), *_comment_blocks(src)]
        except (UnicodeDecodeError, SyntaxError, ValueError, tokenize.TokenError):
            continue  # a deliberately broken test file: skipped, the same way everywhere
        for text in texts:
            add(text)
    for key in sorted(topics):
        add(topics[key])
    return out


def write_corpus(path: str | Path = CORPUS, root: str | Path | None = None, progress: bool = True) -> Path:
    """Cut the corpus and write it (one sentence a line) and its card README.md next to it, atomically."""
    import platform

    path = Path(path)
    sents = build_corpus(root, progress)
    text = "".join(s + "\n" for s in sents)
    sizes = {k: len(v) for k, v in split_corpus(sents).items()}
    card = CARD.format(n=len(sents), python=platform.python_version(), files=len(stdlib_sources(root)),
                       mb=len(text.encode()) / 1e6, sha=text_hash(text, "sha256"),
                       min_words=MIN_WORDS, max_words=MAX_WORDS, path=path.name, **sizes)
    path.parent.mkdir(parents=True, exist_ok=True)
    for target, content in ((path, text), (path.with_name("README.md"), card)):
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(content, encoding="utf-8")
        tmp.replace(target)
    return path


CARD = """# English sentences from the Python standard library

`{path}`: {n} English sentences, one a line, UTF-8 ({mb:.1f} MB, SHA-256 `{sha}`).
Used by `mtlab.tasks.sentences.SentencesTask` (sentence-embedding recovery and scoring of
all-MiniLM-L6-v2 in mtlab).

- **Source**: the text of CPython {python}'s standard library, which ships with the pinned
  toolchain: docstrings and comments of its {files} `.py` files (including `test/`, excluding
  `site-packages`), then the language-reference topics of `pydoc_data.topics`.
- **License**: Python Software Foundation License 2.0 (permissive; the text is PSF's).
- **How it was cut** (`mtlab.tasks.sentences.write_corpus`, deterministic): files in sorted
  path order; docstrings via `ast`, runs of comment lines via `tokenize`; topics sorted by name;
  one fixed sentence splitter (paragraphs at blank lines, cut after . ! ? before a capital);
  kept if capitalised, ending in . ! or ?, {min_words}-{max_words} words, >= 85% alphabetic words and no
  code-like characters (short double-quoted names allowed); exact duplicates dropped (first kept).
- **Splits**: by SHA-256 of the sentence (80/10/10): train {train}, dev {dev}, test {test}.
  Within a split, sentences are ordered by the hash, so a prefix is an unbiased sample.
- **Caveats**: technical English about programming (APIs, tests, the language); short
  quoted identifiers occur; comments may name contributors or projects, as the
  source does. Rebuilding with another Python version gives
  another corpus: the shipped file is the reference.
"""


# ---------------------------------------------------------------------------
# reading and splitting

def read_corpus(path: str | Path = CORPUS) -> list[str]:
    """Non-blank lines of a UTF-8 corpus file, stripped, duplicates dropped (first kept)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sentence corpus {path} is missing: {FIX}")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"sentence corpus {path} is not UTF-8 (byte {e.start}: {e.reason}): re-save it as "
                         f"UTF-8 (e.g. `iconv -f latin1 -t utf-8`), or {FIX}") from None
    sents = list(dict.fromkeys(line.strip() for line in text.splitlines() if line.strip()))
    if not sents:
        raise ValueError(f"sentence corpus {path} is empty (no non-blank line): {FIX}")
    return sents


def _digest(sentence: str) -> bytes:
    return digest(sentence, "sha256")


def split_of(sentence: str) -> str:
    """train (80%), dev (10%) or test (10%), from the SHA-256 of the sentence: the same everywhere
    (`mtlab.tasks.split`'s scheme "percent_sha256")."""
    return split_by_hash(sentence, SHARES["dev"] / 100, SHARES["test"] / 100, scheme="percent_sha256")


def split_corpus(sentences: Sequence[str]) -> dict[str, list[str]]:
    """{"train", "dev", "test"}: each sentence in its `split_of` split, ordered by hash."""
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    for s in sorted(dict.fromkeys(sentences), key=_digest):
        out[split_of(s)].append(s)
    return out


# ---------------------------------------------------------------------------
# the task

class SentencesTask(Seq2SeqTask):
    """Splits of English sentences for an embedding model: `collate` gives mtlab Batches
    (input_ids, attention_mask, and labels = the input ids with -100 at padding, so that
    `mtlab.train` weighs batches by tokens), tokenised by `tokenizer` up to `max_length`.

    `sentences`: your own list instead of the corpus file at `path`; `limit`: at most this
    many sentences per split (an int, or a dict per split). Scores are not computed from
    hypotheses but against the original model: see `mtlab.embedding`.
    """

    name = "sentences"
    primary_metric = "mean_cos"
    higher_is_better = True

    def __init__(self, tokenizer=None, *, path: str | Path | None = None, sentences: Sequence[str] | None = None,
                 limit: int | dict[str, int] | None = None, max_length: int = 128):
        super().__init__()
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.source = "given list" if sentences is not None else str(Path(path or CORPUS))
        splits = split_corpus(sentences if sentences is not None else read_corpus(path or CORPUS))
        if limit is not None:
            per = limit if isinstance(limit, dict) else dict.fromkeys(SPLITS, limit)
            splits = {k: v[:per[k]] if per.get(k) is not None else v for k, v in splits.items()}
        self.splits = {k: (v, v) for k, v in splits.items()}
        self.pad_id = getattr(tokenizer, "pad_token_id", None) or 0
        self.reference = None  # the original encoder `evaluate` scores against
        self._reference_emb: dict = {}

    def sentences(self, split: str) -> list[str]:
        return self.texts(split)[0]

    def sizes(self) -> dict[str, int]:
        return {k: len(v[0]) for k, v in self.splits.items()}

    def _tok(self):
        if self.tokenizer is None:
            raise ValueError("this SentencesTask has no tokenizer: pass SentencesTask(tokenizer=...) to encode "
                             "sentences (e.g. the tokenizer of mtlab.minilm.load_minilm())")
        return self.tokenizer

    def encoded(self, split: str) -> tuple[list[list[int]], list[list[int]]]:
        """Token ids of a split, tokenised in one call (targets are the same lists)."""
        if split not in self._encoded:
            ids = self._tok()(self.sentences(split), truncation=True, max_length=self.max_length)["input_ids"]
            self._encoded[split] = (ids, ids)
        return self._encoded[split]

    def encode_source(self, text: str) -> list[int]:
        return self._tok()(text, truncation=True, max_length=self.max_length)["input_ids"]

    encode_target = encode_source

    def decode_target(self, ids: Sequence[int]) -> str:
        return self._tok().decode(list(ids), skip_special_tokens=True)

    def collate(self, split: str, index: Sequence[int]) -> Batch:
        """A padded Batch; the attention mask comes from the lengths, not from the pad id."""
        ids = [self.encoded(split)[0][i] for i in index]
        input_ids = pad(ids, self.pad_id)
        lengths = [len(s) for s in ids]
        mask = (pad([[1] * n for n in lengths], 0)).long()
        return Batch(input_ids, mask, input_ids.masked_fill(mask == 0, -100), list(index))

    def evaluate(self, model, split: str, *, limit: int | None = None, batch_size: int = 64, progress: bool = False,
                 **_) -> dict:
        """The task interface of every kind: `model`'s sentence embeddings of a split's first `limit`
        sentences scored against `self.reference`'s (the original model, set by whoever loads the pair,
        e.g. a recipe): mean cos, recall@10 of neighbours, Spearman of pairwise similarities; plus n."""
        if self.reference is None:
            raise ValueError("this SentencesTask has no reference model to score embeddings against: set "
                             "task.reference = the original encoder (a recipe with task kind sentences does)")
        t0 = time.perf_counter()
        key = (split, limit)
        if key not in self._reference_emb:
            self._reference_emb[key] = embed_split(self.reference, self, split, limit, batch_size, progress)
        got = embed_split(model, self, split, limit, batch_size, progress)
        return {"split": split, "n": int(got.shape[0]), **embedding_scores(self._reference_emb[key], got),
                "seconds": time.perf_counter() - t0}

    def score(self, hypotheses: list[str], references: list[str]) -> dict[str, float]:
        raise NotImplementedError("sentence embeddings are scored against the original model, not from "
                                  "decoded text: use mtlab.embedding.embedding_scores / evaluate_embeddings")


if __name__ == "__main__":
    print(write_corpus())
