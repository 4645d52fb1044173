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
    "class_embeddings": "hiercluster.hierarchy.embeddings",
    "ClassHierarchy": "hiercluster.hierarchy.clustering",
    "build_hierarchy": "hiercluster.hierarchy.clustering",
    "read_groups": "hiercluster.hierarchy.clustering",
    "GroupedHead": "hiercluster.evaluation.heads",
    "as_assignment": "hiercluster.hierarchy.groupings",
    "group_names": "hiercluster.hierarchy.groupings",
    "merge_head": "hiercluster.evaluation.heads",
    "remap_labels": "hiercluster.hierarchy.groupings",
    "collect_logits": "hiercluster.evaluation.inference",
    "grouped_metrics": "hiercluster.evaluation.metrics",
    "random_groupings": "hiercluster.evaluation.metrics",
    "random_baseline": "hiercluster.evaluation.metrics",
    "drop": "hiercluster.evaluation.metrics",
    "advantage": "hiercluster.evaluation.metrics",
    "min_bits": "hiercluster.evaluation.metrics",
    "evaluate_levels": "hiercluster.evaluation.metrics",
    "prediction_share": "hiercluster.evaluation.metrics",
    "bias_report": "hiercluster.evaluation.metrics",
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
