"""Building blocks of the notebook explorers (`mtlab.widgets`): read-out formatting, a worker that
computes only the latest request, cheap parameter counts of merge/prune specs."""
