"""Class embeddings from a trained classifier: what makes two classes "similar".

Three methods (DESIGN.md, "Class hierarchy"):

* ``fc_weights``: rows of the final linear layer, L2-normalized (no data needed);
* ``centroids``: mean penultimate feature of each class over a data split;
* ``confusion``: the model's mean softmax per true class, symmetrized ``(S + S^T) / 2``;
  a similarity, turned into a distance by :func:`confusion_distance` (``1 - S``).

The pure functions work on arrays or tensors and return float64 numpy arrays;
:func:`class_embeddings` walks a model (and a loader, one pass) and calls them.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
import torch.nn as nn

from hiercluster.errors import HierclusterError
from hiercluster.models.zoo import classifier_layer, forward_features
from quant.device import model_device, to_device

METHODS = ("fc_weights", "centroids", "confusion")
NEEDS_DATA = ("centroids", "confusion")


def _to_numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def fc_weight_embeddings(weight: torch.Tensor | np.ndarray) -> np.ndarray:
    """Rows of a classifier's weight matrix ``(C, D)``, each scaled to unit L2 norm.

    Examples
    --------
    >>> fc_weight_embeddings(np.array([[3.0, 4.0], [0.0, 2.0]]))
    array([[0.6, 0.8],
           [0. , 1. ]])
    """
    w = _to_numpy(weight)
    if w.ndim != 2:
        raise HierclusterError(f"a classifier weight must be 2-D (classes x features), got shape {w.shape}")
    norms = np.linalg.norm(w, axis=1, keepdims=True)
    zero = np.flatnonzero(norms[:, 0] == 0)
    if len(zero):
        raise HierclusterError(
            f"classifier weight rows of classes {zero.tolist()} are all zero; they have no direction"
        )
    return w / norms


class ClassMeans:
    """Streaming per-class mean of row vectors (float64), fed batch by batch.

    Examples
    --------
    >>> acc = ClassMeans(2)
    >>> acc.add(np.array([[1.0], [3.0], [5.0]]), np.array([0, 0, 1]))
    >>> acc.mean()
    array([[2.],
           [5.]])
    """

    def __init__(self, num_classes: int) -> None:
        if num_classes < 1:
            raise HierclusterError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.sums: np.ndarray | None = None
        self.counts = np.zeros(num_classes, dtype=np.int64)

    def add(self, values: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> None:
        v = _to_numpy(values)
        y = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
        if v.ndim != 2 or y.ndim != 1 or len(v) != len(y):
            raise HierclusterError(f"need values (N, D) and labels (N,), got {v.shape} and {y.shape}")
        if y.size and (y.min() < 0 or y.max() >= self.num_classes):
            bad = int(y.min()) if y.min() < 0 else int(y.max())
            raise HierclusterError(
                f"label {bad} is outside 0..{self.num_classes - 1} (the model has {self.num_classes} classes)"
            )
        y = y.astype(np.int64)
        if self.sums is None:
            self.sums = np.zeros((self.num_classes, v.shape[1]))
        np.add.at(self.sums, y, v)
        self.counts += np.bincount(y, minlength=self.num_classes)

    def mean(self) -> np.ndarray:
        empty = np.flatnonzero(self.counts == 0)
        if self.sums is None or len(empty):
            ids = empty.tolist() if self.sums is not None else list(range(self.num_classes))
            raise HierclusterError(
                f"classes {ids} have no samples; a per-class mean needs at least one sample of every class "
                "(use a split that holds all classes)"
            )
        return self.sums / self.counts[:, None]


def centroid_embeddings(
    features: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray, num_classes: int
) -> np.ndarray:
    """Mean feature vector of each class: ``(N, D)``, ``(N,)`` -> ``(C, D)``.

    Examples
    --------
    >>> centroid_embeddings(np.array([[0.0, 2.0], [2.0, 0.0], [4.0, 4.0]]), np.array([0, 0, 1]), 2)
    array([[1., 1.],
           [4., 4.]])
    """
    acc = ClassMeans(num_classes)
    acc.add(features, labels)
    return acc.mean()


def _symmetrize(s: np.ndarray) -> np.ndarray:
    return (s + s.T) / 2


def confusion_similarity(
    logits: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray, num_classes: int
) -> np.ndarray:
    """Mean softmax per true class, symmetrized: ``S = (M + M^T) / 2`` with ``M[i, j]`` the
    mean probability the model gives class j on samples of class i.

    Examples
    --------
    >>> z = np.log(np.array([[0.8, 0.2], [0.4, 0.6]]))
    >>> confusion_similarity(z, np.array([0, 1]), 2)
    array([[0.8, 0.3],
           [0.3, 0.6]])
    """
    probs = torch.softmax(torch.as_tensor(_to_numpy(logits)), dim=1)
    return _symmetrize(centroid_embeddings(probs, labels, num_classes))


def confusion_distance(similarity: np.ndarray) -> np.ndarray:
    """``1 - similarity`` with a zero diagonal (a class is at distance 0 from itself).

    Examples
    --------
    >>> confusion_distance(np.array([[0.8, 0.3], [0.3, 0.6]]))
    array([[0. , 0.7],
           [0.7, 0. ]])
    """
    s = _to_numpy(similarity)
    if s.ndim != 2 or s.shape[0] != s.shape[1]:
        raise HierclusterError(f"a similarity matrix must be square, got shape {s.shape}")
    d = 1.0 - s
    np.fill_diagonal(d, 0.0)
    return d


def class_embeddings(
    model: nn.Module, method: str = "fc_weights", loader: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None
) -> np.ndarray:
    """Class embeddings of a trained classifier.

    Parameters
    ----------
    model : torch.nn.Module
        Any model whose last ``nn.Linear`` is its classifier (the small ResNets and
        torchvision classifiers).
    method : {"fc_weights", "centroids", "confusion"}
        See the module docstring.
    loader : iterable of (x, y), optional
        Needed by ``centroids`` and ``confusion``; read once, in inference mode. Inputs
        are moved to the model's device; the sums are kept on the CPU in float64.

    Returns
    -------
    numpy.ndarray
        ``(C, D)`` vectors for ``fc_weights`` and ``centroids``; the ``(C, C)``
        symmetric similarity for ``confusion`` (use :func:`confusion_distance`).

    Examples
    --------
    >>> from hiercluster.models.zoo import build_model
    >>> class_embeddings(build_model("resnet8", num_classes=10, in_channels=1)).shape
    (10, 64)
    """
    if method not in METHODS:
        raise HierclusterError(f"unknown embedding method {method!r}; choose one of {', '.join(METHODS)}")
    _, fc = classifier_layer(model)
    if method == "fc_weights":
        return fc_weight_embeddings(fc.weight)
    if loader is None:
        raise HierclusterError(f"embedding method {method!r} needs data: pass a loader of (x, y) batches")
    acc = ClassMeans(fc.out_features)
    device = model_device(model)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for x, y in loader:
                features, logits = forward_features(model, to_device(x, device))
                # On the CPU before float64: MPS has none, and the sums are numpy's anyway.
                acc.add(features.cpu() if method == "centroids" else torch.softmax(logits.cpu().double(), dim=1), y)
    finally:
        model.train(was_training)
    means = acc.mean()
    return means if method == "centroids" else _symmetrize(means)


__all__ = [
    "METHODS",
    "ClassMeans",
    "centroid_embeddings",
    "class_embeddings",
    "confusion_distance",
    "confusion_similarity",
    "fc_weight_embeddings",
]
