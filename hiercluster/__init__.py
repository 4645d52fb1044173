"""hiercluster: how few bits can a classifier's weights have, and at which label granularity?

The package builds on :mod:`quant` (data-free quantization). Public entry points are
re-exported here as they are written; see the README for examples.
"""

from hiercluster.errors import HierclusterError

__version__ = "0.1.0"

__all__ = ["HierclusterError", "__version__"]
