"""mtlab: flexible compression of pretrained Transformers (modular assembly, FF merging)."""
# First, before anything can load torch: threads and OpenMP settings (MTLAB_THREADS; mtlab/runtime.py)
from . import runtime as _runtime

_runtime.configure()

from importlib.metadata import PackageNotFoundError, version  # noqa: E402

try:
    __version__ = version("mtlab")
except PackageNotFoundError:  # a source checkout that was never installed
    __version__ = "0+unknown"
