"""hiercluster.report.plots: the dendrogram and prediction-share PNGs, headless, into folders they create."""

import doctest

import numpy as np
import pytest

import hiercluster.report.plots as plots
from hiercluster.errors import HierclusterError
from hiercluster.hierarchy.clustering import ClassHierarchy
from hiercluster.report.plots import plot_dendrogram, plot_prediction_share

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _is_png(path):
    data = path.read_bytes()
    return data.startswith(PNG_SIGNATURE) and len(data) > 1000


def test_docstring_examples():
    assert doctest.testmod(plots).failed == 0


def test_dendrogram_png(tmp_path):
    names = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    h = ClassHierarchy().fit(np.random.default_rng(0).normal(size=(10, 4)), names)
    path = plot_dendrogram(h, tmp_path / "new" / "folder" / "tree.png")
    assert path == tmp_path / "new" / "folder" / "tree.png" and _is_png(path)
    ref = ClassHierarchy.from_groups([[0, 2, 4, 6], [1], [3], [5, 7, 9], [8]], names)
    assert _is_png(plot_dendrogram(ref, tmp_path / "ref.png", title="reference"))
    with pytest.raises(HierclusterError, match="fitted"):
        plot_dendrogram(ClassHierarchy(), tmp_path / "x.png")


def test_prediction_share_png(tmp_path):
    path = plot_prediction_share([0.1] * 10, [0.5, 0.3] + [0.025] * 8, [f"c{i}" for i in range(10)], tmp_path / "s" / "share.png",
                                 title="float vs 2-bit")
    assert _is_png(path)
    with pytest.raises(HierclusterError, match="one value per class"):
        plot_prediction_share([0.5, 0.5], [1.0], ["a", "b"], tmp_path / "bad.png")
