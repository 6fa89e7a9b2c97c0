"""srdistill: dataset distillation for image super-resolution (SRDD, MZSR, TripleD) on Ray."""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("srdistill")
except _metadata.PackageNotFoundError:  # a source tree on PYTHONPATH (e.g. a Ray job's working_dir)
    __version__ = "0+unknown"
