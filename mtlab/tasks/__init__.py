"""Tasks: the shared interface, the bundled CMUdict G2P task, users' own text pairs, English sentences
for embedding models, and plain text for decoder-only models (perplexity)."""
from .base import Seq2SeqTask
from .causal_lm import CausalLMTask
from .g2p import G2PTask
from .pairs import PairsTask
from .sentences import SentencesTask
from .split import split_by_hash
from .kinds import TASKS, task_kind, task_kinds

__all__ = ["Seq2SeqTask", "CausalLMTask", "G2PTask", "PairsTask", "SentencesTask", "split_by_hash", "TASKS", "task_kind",
           "task_kinds"]
