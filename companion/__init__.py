"""Companion package of 《大规模语言模型：从理论到实践》: everything the book runs, importable on its own.

Shape notation used throughout the package (torchtune style):
    B batch, T time/sequence, S source length, H heads, G key/value groups, D head dim,
    C model width, V vocabulary.
"""

from companion._meta import REPOSITORY_URL, __version__
from companion.data import DataChecksumError, DataError, data_path, load_manifest
from companion.runtime import (
    Precision,
    choose_device,
    choose_precision,
    environment_report,
    seed_everything,
    set_deterministic,
    set_threads,
    setup_notebook,
)

__all__ = [
    "REPOSITORY_URL",
    "__version__",
    "DataChecksumError",
    "DataError",
    "data_path",
    "load_manifest",
    "Precision",
    "choose_device",
    "choose_precision",
    "environment_report",
    "seed_everything",
    "set_deterministic",
    "set_threads",
    "setup_notebook",
]
