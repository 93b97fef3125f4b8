import importlib.metadata as _metadata

try:
    __version__ = _metadata.version("trio-sync")
except _metadata.PackageNotFoundError:  # run from a checkout that was never installed
    __version__ = "unknown"
