"""Class embeddings: hand-computed tiny cases, and the module walk on small ResNets and torchvision."""

import doctest

import numpy as np
import pytest
import torch

import hiercluster.hierarchy.embeddings as embeddings
from hiercluster.hierarchy.embeddings import (
    centroid_embeddings,
    class_embeddings,
    confusion_distance,
    confusion_similarity,
    fc_weight_embeddings,
)
from hiercluster.errors import HierclusterError
from hiercluster.models.zoo import build_model, forward_features


def test_docstring_examples():
    assert doctest.testmod(embeddings).failed == 0


def test_fc_weight_rows_are_unit_vectors_in_the_same_direction():
    w = torch.tensor([[3.0, 0.0, 4.0], [0.0, -2.0, 0.0], [1.0, 1.0, 1.0]])
    e = fc_weight_embeddings(w)
    np.testing.assert_allclose(e[0], [0.6, 0.0, 0.8])
    np.testing.assert_allclose(e[1], [0.0, -1.0, 0.0])
    np.testing.assert_allclose(e[2], np.full(3, 1 / np.sqrt(3)))
    with pytest.raises(HierclusterError, match=r"classes \[1\] are all zero"):
        fc_weight_embeddings(np.array([[1.0, 0.0], [0.0, 0.0]]))


def test_centroids_by_hand():
    features = np.array([[1.0, 0.0], [3.0, 2.0], [10.0, 10.0], [0.0, 0.0], [5.0, 1.0]])
    labels = np.array([0, 0, 2, 1, 2])
    np.testing.assert_allclose(centroid_embeddings(features, labels, 3), [[2.0, 1.0], [0.0, 0.0], [7.5, 5.5]])


def test_a_class_without_samples_is_a_clear_error():
    with pytest.raises(HierclusterError, match=r"classes \[1, 3\] have no samples"):
        centroid_embeddings(np.ones((2, 2)), np.array([0, 2]), 4)
    with pytest.raises(HierclusterError, match="label 5 is outside 0..3"):
        centroid_embeddings(np.ones((2, 2)), np.array([0, 5]), 4)


def test_confusion_similarity_by_hand():
    # Softmax rows chosen so the class means are easy: class 0 -> [0.7, 0.2, 0.1] (mean of two rows)
    probs = np.array([[0.6, 0.3, 0.1], [0.8, 0.1, 0.1], [0.2, 0.6, 0.2], [0.0 + 1e-12, 0.5, 0.5]])
    probs = probs / probs.sum(1, keepdims=True)
    labels = np.array([0, 0, 1, 2])
    s = confusion_similarity(np.log(probs), labels, 3)
    m = np.array([[0.7, 0.2, 0.1], [0.2, 0.6, 0.2], [0.0, 0.5, 0.5]])
    np.testing.assert_allclose(s, (m + m.T) / 2, atol=1e-9)
    np.testing.assert_allclose(s, s.T)
    d = confusion_distance(s)
    np.testing.assert_allclose(np.diag(d), 0.0)
    assert d[0, 1] == pytest.approx(1 - 0.2) and d[1, 2] == pytest.approx(1 - 0.35)


def _loader(n_per_class, num_classes, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(num_classes).repeat(n_per_class)
    x = torch.randn(len(y), *shape, generator=g)
    return [(x[i : i + 4], y[i : i + 4]) for i in range(0, len(y), 4)]


def test_small_resnet_embeddings_match_direct_computation():
    torch.manual_seed(0)
    model = build_model("resnet8", num_classes=5, in_channels=1)
    loader = _loader(3, 5, (1, 12, 12))

    fc = class_embeddings(model, "fc_weights")
    np.testing.assert_allclose(fc, (model.fc.weight / model.fc.weight.norm(dim=1, keepdim=True)).detach().double().numpy(), rtol=1e-6)

    with torch.no_grad():
        feats, logits = zip(*(forward_features(model, x) for x, _ in loader))
    feats, logits = torch.cat(feats).double().numpy(), torch.cat(logits).double()
    labels = torch.cat([y for _, y in loader]).numpy()
    manual = np.stack([feats[labels == c].mean(0) for c in range(5)])
    np.testing.assert_allclose(class_embeddings(model, "centroids", loader), manual, rtol=1e-5, atol=1e-6)

    p = torch.softmax(logits, 1).numpy()
    m = np.stack([p[labels == c].mean(0) for c in range(5)])
    np.testing.assert_allclose(class_embeddings(model, "confusion", loader), (m + m.T) / 2, rtol=1e-5, atol=1e-7)
    assert not model.training


def test_torchvision_resnet18_at_small_input_size():
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=4, in_channels=3)
    loader = _loader(2, 4, (3, 32, 32))
    assert class_embeddings(model, "fc_weights").shape == (4, 512)
    cents = class_embeddings(model, "centroids", loader)
    assert cents.shape == (4, 512) and np.all(np.isfinite(cents))
    sim = class_embeddings(model, "confusion", loader)
    assert sim.shape == (4, 4)
    np.testing.assert_allclose(sim, sim.T)
    # every row of the un-symmetrized matrix is a probability vector, so rows of S sum to 1 on average
    assert sim.sum() == pytest.approx(4.0)


def test_embedding_errors():
    model = build_model("resnet8", num_classes=3, in_channels=1)
    with pytest.raises(HierclusterError, match="'centroids' needs data"):
        class_embeddings(model, "centroids")
    with pytest.raises(HierclusterError, match="'confusion' needs data"):
        class_embeddings(model, "confusion", None)
    with pytest.raises(HierclusterError, match="fc_weights, centroids, confusion"):
        class_embeddings(model, "weights")
    only_two_classes = [(torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 0, 1]))]
    with pytest.raises(HierclusterError, match=r"classes \[2\] have no samples"):
        class_embeddings(model, "centroids", only_two_classes)
