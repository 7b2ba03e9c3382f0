"""Tasks: the shared interface, the bundled CMUdict G2P task, users' own text pairs, and English
sentences for embedding models."""
from .base import Seq2SeqTask
from .g2p import G2PTask
from .pairs import PairsTask
from .sentences import SentencesTask
from .split import split_by_hash

__all__ = ["Seq2SeqTask", "G2PTask", "PairsTask", "SentencesTask", "split_by_hash"]
