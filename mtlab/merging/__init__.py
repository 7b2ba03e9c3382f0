"""Merging feed-forward sublayers (Verma et al. 2025): statistics, alignment, merge + tie, search."""
