"""hiercluster: how few bits can a classifier's weights have, and at which label granularity?

The package builds on :mod:`quant` (data-free quantization). Public entry points are
re-exported here as they are written; see the README for examples. They are imported
on first use, so ``import hiercluster`` stays light (no torch until needed).
"""

from __future__ import annotations

import importlib
from typing import Any

from hiercluster.errors import HierclusterError

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "class_embeddings": "hiercluster.embeddings",
    "ClassHierarchy": "hiercluster.hierarchy",
    "build_hierarchy": "hiercluster.hierarchy",
    "read_groups": "hiercluster.hierarchy",
    "GroupedHead": "hiercluster.heads",
    "as_assignment": "hiercluster.heads",
    "group_names": "hiercluster.heads",
    "merge_head": "hiercluster.heads",
    "remap_labels": "hiercluster.heads",
    "collect_logits": "hiercluster.evaluate",
    "grouped_metrics": "hiercluster.evaluate",
    "random_groupings": "hiercluster.evaluate",
    "random_baseline": "hiercluster.evaluate",
    "drop": "hiercluster.evaluate",
    "advantage": "hiercluster.evaluate",
    "min_bits": "hiercluster.evaluate",
    "evaluate_levels": "hiercluster.evaluate",
    "prediction_share": "hiercluster.evaluate",
    "bias_report": "hiercluster.evaluate",
}

__all__ = ["HierclusterError", "__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hiercluster' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
