"""The version of the code that computes a result: part of every resume key and of run.json."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any

import torch

import quant
from hiercluster.run.records import SCHEMA_VERSION

# The source that computes a result (relative to the folder holding quant/ and hiercluster/):
# its bytes are part of every resume key. The CLI, the report, the store and the executors only
# move results around, so editing them does not re-run a sweep.
CODE_PATHS = (
    "quant",
    "hiercluster/data",
    "hiercluster/models",
    "hiercluster/hierarchy",
    "hiercluster/evaluation",
    "hiercluster/yamlio.py",
    "hiercluster/run/config.py",
    "hiercluster/run/grid.py",
    "hiercluster/run/prepare.py",
    "hiercluster/run/records.py",
    "hiercluster/run/sweep.py",
    "hiercluster/run/versions.py",
)


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """SHA-256 of the source in :data:`CODE_PATHS` (every ``.py`` file, by relative path).

    The package version changes only at a release; this changes with any edit of the code
    that computes results, so a run resumed after a quantizer fix never reuses results of
    the code before it.
    """
    base = Path(quant.__file__).resolve().parent.parent
    h = hashlib.sha256()
    for entry in CODE_PATHS:
        path = base / entry
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        for file in files:
            h.update(str(file.relative_to(base)).encode() + b"\0" + file.read_bytes() + b"\0")
    return h.hexdigest()[:20]


def code_version() -> dict[str, Any]:
    """The schema, package and torch versions and the source digest of the code computing results."""
    import hiercluster

    return {
        "schema": SCHEMA_VERSION,
        "hiercluster": hiercluster.__version__,
        # quant ships in the hiercluster distribution; it has a version of its own only if it declares one
        "quant": getattr(quant, "__version__", hiercluster.__version__),
        "torch": torch.__version__,
        "source": code_digest(),
    }


__all__ = ["CODE_PATHS", "code_digest", "code_version"]
