"""mtlab: flexible compression of pretrained Transformers (modular assembly, FF merging)."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mtlab")
except PackageNotFoundError:  # a source checkout that was never installed
    __version__ = "0+unknown"
