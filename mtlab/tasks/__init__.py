"""Seq2seq tasks: the shared task interface, the bundled CMUdict G2P task, and users' own text pairs."""
from .base import Seq2SeqTask
from .g2p import G2PTask
from .pairs import PairsTask
from .split import split_by_hash

__all__ = ["Seq2SeqTask", "G2PTask", "PairsTask", "split_by_hash"]
