"""Class hierarchies by agglomerative clustering of class embeddings.

:class:`ClassHierarchy` follows scikit-learn's estimator conventions: ``__init__``
stores parameters, :meth:`ClassHierarchy.fit` validates the input and returns the
estimator, learned state ends in ``_``. The fitted tree is scipy's linkage matrix
(``linkage_matrix_``) and the same tree as a networkx ``DiGraph`` (``tree_``).

A *level* k is the partition into k superclasses obtained by undoing the last k-1
merges of the tree (k = C .. 1). Groupings are canonical assignment arrays (see
:func:`hiercluster.hierarchy.groupings.as_assignment`). Hand-made groupings become a flat two-level
hierarchy with :meth:`ClassHierarchy.from_groups`.

Examples
--------
>>> rng = np.random.default_rng(0)
>>> emb = np.vstack([rng.normal(0, 0.1, (2, 3)) + [5, 0, 0], rng.normal(0, 0.1, (2, 3)) + [0, 5, 0]])
>>> h = ClassHierarchy(linkage="ward", metric="euclidean").fit(emb, ["cat", "dog", "car", "bus"])
>>> h.cut(k=2)
array([0, 0, 1, 1])
>>> h.superclass_names(2)
['cat+dog', 'car+bus']
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
import yaml
from scipy.cluster.hierarchy import linkage as scipy_linkage
from scipy.spatial.distance import squareform

from hiercluster.errors import HierclusterError, read_text, short_repr
from hiercluster.hierarchy.groupings import (
    Groups,
    _named_sets,
    as_assignment,
    group_names,
)
from hiercluster.yamlio import read_yaml
from quant._files import write_text_atomic
from quant._validate import check_json

LINKAGES = ("ward", "average", "complete", "single", "weighted")
METRICS = ("cosine", "euclidean", "precomputed")
_FORMAT = "hiercluster.ClassHierarchy"
_FORMAT_VERSION = 1
# A tree of 1,000 classes is a few MB (each node lists its members); far more is not a hierarchy file.
MAX_HIERARCHY_BYTES = 64 * 1024 * 1024
# The shape of what to_json writes (check_json's form; "?" marks a key some nodes lack).
_JSON_SPEC = {
    "directed": bool,
    "multigraph": bool,
    "graph": {
        "hiercluster": {
            "format": str,
            "version": int,
            "linkage": (str, None),
            "metric": (str, None),
            "names": (dict, None),
            "class_names": [str],
            "defined_levels": [int],
            "linkage_matrix": [[float]],
        }
    },
    "nodes": [{"id": int, "height": float, "members": [int], "name?": str}],
    "edges": [{"source": int, "target": int}],
}


def read_groups(path: str | Path) -> dict[str, list[Any]]:
    """Read a grouping YAML file ``{superclass name: [class names]}``.

    The classes are checked against a dataset only when the grouping is used (for
    example by :func:`~hiercluster.hierarchy.groupings.as_assignment`).
    """
    path = Path(path)
    data = read_yaml(path, "grouping file")
    if not isinstance(data, dict) or not data:
        raise HierclusterError(f"grouping file {path} must hold a mapping {{superclass name: [class names]}}")
    for name, members in data.items():
        if not isinstance(members, list):
            raise HierclusterError(f"grouping file {path}: superclass {name!r} must map to a list of class names")
    return {str(name): members for name, members in data.items()}


def _as_groups(groups: Groups | str | Path) -> Groups:
    return read_groups(groups) if isinstance(groups, (str, Path)) else groups


def _normalized_names(names: Mapping[Any, Sequence[Any]], class_names: list[str]) -> dict[str, list[str]]:
    """Validated superclass names with members as class names in class-id order."""
    return {name: [class_names[i] for i in sorted(ids)] for ids, name in _named_sets(names, class_names).items()}


def _check_names_match(names: Mapping[Any, Sequence[Any]], class_names: list[str], tree: nx.DiGraph) -> None:
    """Refuse a superclass name whose classes are no cluster of ``tree``, naming the closest cluster.

    A name is shown only where a level has a group with exactly its classes; one that
    matches no cluster would be silently unused, which hides a typo or a wrong guess of the tree.
    """
    clusters = [frozenset(tree.nodes[node]["members"]) for node in sorted(tree.nodes)]
    known = set(clusters)
    for members, name in _named_sets(names, class_names).items():
        if members in known:
            continue
        # Jaccard similarity; ties go to the smaller cluster, then to the first in node order
        closest = max(clusters, key=lambda c: (len(c & members) / len(c | members), -len(c)))
        raise HierclusterError(
            f"superclass name {short_repr(name, 40)} ({_member_list(members, class_names)}) matches no cluster of "
            f"the hierarchy; the closest is {_member_list(closest, class_names)}"
            f"{_difference(members, closest, class_names)}; list exactly the classes of a cluster, or remove the name"
        )


# The most class names quoted when a message lists a cluster: enough to recognize it, short enough for one line.
_MAX_LISTED_CLASSES = 6


def _member_list(members: frozenset[int], class_names: list[str]) -> str:
    """``'Sandal+Sneaker+Ankle boot'``: a cluster's classes in class-id order (the first few), quoted short."""
    ids = sorted(members)
    shown = short_repr("+".join(class_names[i] for i in ids[:_MAX_LISTED_CLASSES]), 100)
    return shown + (f" and {len(ids) - _MAX_LISTED_CLASSES} more" if len(ids) > _MAX_LISTED_CLASSES else "")


def _difference(named: frozenset[int], cluster: frozenset[int], class_names: list[str]) -> str:
    """`` (without Bag; with Sandal)``: what the named classes lack and hold compared with ``cluster``."""
    parts = []
    if named - cluster:
        parts.append(f"without {_member_list(named - cluster, class_names)}")
    if cluster - named:
        parts.append(f"with {_member_list(cluster - named, class_names)}")
    return f" ({'; '.join(parts)})"


def _tree_from_linkage(Z: np.ndarray, class_names: Sequence[str]) -> nx.DiGraph:
    """The linkage matrix as a DiGraph: edges parent -> child, row r creates node C + r."""
    n = len(class_names)
    tree = nx.DiGraph()
    for i, name in enumerate(class_names):
        tree.add_node(i, name=name, height=0.0, members=[i])
    for r, (a, b, height, _count) in enumerate(Z):
        node, a, b = n + r, int(a), int(b)
        members = sorted(tree.nodes[a]["members"] + tree.nodes[b]["members"])
        tree.add_node(node, height=float(height), members=members)
        tree.add_edge(node, a)
        tree.add_edge(node, b)
    return tree


def _check_linkage(Z: np.ndarray, n: int, source: str) -> None:
    if Z.shape != (n - 1, 4) or not np.all(np.isfinite(Z)):
        raise HierclusterError(f"{source}: a linkage matrix for {n} classes must be finite with shape ({n - 1}, 4)")
    if np.any(np.diff(Z[:, 2]) < 0):
        raise HierclusterError(f"{source}: merge heights must not decrease")
    seen: set[int] = set()
    for r, (a, b) in enumerate(Z[:, :2].astype(np.int64)):
        for child in (a, b):
            if not 0 <= child < n + r or child in seen:
                raise HierclusterError(f"{source}: row {r} merges node {child}, which is not an available cluster")
            seen.add(int(child))


def _read_hierarchy_json(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(graph["hiercluster"], whole file)`` of a hierarchy file, with its shape and values checked."""
    text = read_text(path, "hierarchy file", max_bytes=MAX_HIERARCHY_BYTES)
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, a 5,000-digit integer, nesting too deep
        raise HierclusterError(f"{path} is not a hierarchy written by ClassHierarchy.to_json (not JSON: {exc})") from None
    meta = data.get("graph", {}).get("hiercluster") if isinstance(data, dict) and isinstance(data.get("graph"), dict) else None
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        raise HierclusterError(f"{path} is not a hierarchy written by ClassHierarchy.to_json (no {_FORMAT} entry)")
    if meta.get("version") != _FORMAT_VERSION:
        raise HierclusterError(
            f"{path} has hierarchy format version {short_repr(meta.get('version'))}; this version reads {_FORMAT_VERSION}"
        )
    try:
        check_json(data, _JSON_SPEC, "", error=HierclusterError)
        n = len(meta["class_names"])
        if len(set(meta["class_names"])) != n:
            raise HierclusterError(".graph.hiercluster.class_names: class names must be unique")
        if any(len(row) != 4 for row in meta["linkage_matrix"]):
            raise HierclusterError(".graph.hiercluster.linkage_matrix: every row must hold 4 numbers")
        if not meta["defined_levels"] or any(not 1 <= k <= n for k in meta["defined_levels"]):
            raise HierclusterError(f".graph.hiercluster.defined_levels: expected levels in 1..{n}, got "
                                   f"{short_repr(meta['defined_levels'])}")
        for name, members in (meta["names"] or {}).items():
            check_json(members, [str], f".graph.hiercluster.names.{name}", error=HierclusterError)
    except HierclusterError as exc:
        where = str(exc).lstrip(".")
        raise HierclusterError(f"hierarchy file {path} is damaged: {where.lstrip(': ')}") from None
    return meta, data


class ClassHierarchy:
    """Agglomerative class hierarchy (scikit-learn estimator style).

    Parameters
    ----------
    linkage : {"ward", "average", "complete", "single", "weighted"}, default "ward"
        scipy linkage method. ``ward`` needs embedding vectors, not a distance matrix.
    metric : {"cosine", "euclidean", "precomputed"}, default "cosine"
        ``cosine`` with ``ward`` L2-normalizes the rows and runs euclidean ward on them
        (for unit vectors ``||a - b||^2 = 2 (1 - cos(a, b))``, so this is ward on cosine
        geometry: DESIGN's "ward on normalized vectors"). With the other linkages it is
        scipy's cosine distance. ``precomputed``: ``fit`` gets a symmetric C x C distance
        matrix with a zero diagonal.
    names : dict, optional
        ``{superclass name: [class names]}``: names for superclasses with exactly those
        members, used by :meth:`superclass_names` and :meth:`to_yaml`; any other
        superclass is named by its members joined with ``+``. Each entry must be a
        cluster of the fitted tree: one that is not raises :class:`HierclusterError`
        naming the closest cluster (it would never be shown).

    Attributes
    ----------
    linkage_matrix_ : numpy.ndarray
        ``(C-1, 4)`` in scipy format: row r merges clusters ``Z[r, 0]`` and ``Z[r, 1]`` at
        height ``Z[r, 2]`` into cluster ``C + r`` of ``Z[r, 3]`` classes.
    tree_ : networkx.DiGraph
        Edges parent -> child. Leaves ``0..C-1`` carry ``name``; every node carries
        ``height`` (0 for leaves) and ``members`` (sorted class ids); internal node
        ``C + r`` is row r of the linkage matrix, the root is ``2C - 2``.
    class_names_ : list of str
    n_classes_ : int
    defined_levels_ : list of int
        The k that :meth:`cut` accepts, descending: all of ``C..1`` for a fitted tree;
        ``C``, the grouping's k and 1 for :meth:`from_groups`.
    """

    def __init__(
        self,
        linkage: str | None = "ward",
        metric: str | None = "cosine",
        names: Mapping[str, Sequence[Any]] | None = None,
    ) -> None:
        self.linkage = linkage
        self.metric = metric
        self.names = names

    def __repr__(self) -> str:
        return f"ClassHierarchy(linkage={self.linkage!r}, metric={self.metric!r})"

    # --- fitting ----------------------------------------------------------------------

    def fit(self, X: np.ndarray, class_names: Sequence[str] | None = None) -> ClassHierarchy:
        """Cluster classes from embeddings ``(C, D)`` or a distance matrix ``(C, C)``.

        Parameters
        ----------
        X : array-like
            Embedding vectors, one row per class; with ``metric="precomputed"`` a
            symmetric, non-negative distance matrix with a zero diagonal.
        class_names : list of str, optional
            C unique names; default ``"0" .. "C-1"``.

        Returns
        -------
        ClassHierarchy
            ``self``, fitted.
        """
        if self.linkage not in LINKAGES:
            raise HierclusterError(f"unknown linkage {self.linkage!r}; choose one of {', '.join(LINKAGES)}")
        if self.metric not in METRICS:
            raise HierclusterError(f"unknown metric {self.metric!r}; choose one of {', '.join(METRICS)}")
        if self.linkage == "ward" and self.metric == "precomputed":
            raise HierclusterError(
                "linkage 'ward' needs embedding vectors (it is defined on euclidean geometry), not a precomputed "
                "distance matrix; for precomputed distances use linkage 'average', 'complete', 'single' or 'weighted'"
            )
        X = np.asarray(X.detach().cpu().numpy() if hasattr(X, "detach") else X, dtype=np.float64)
        if X.ndim != 2 or len(X) < 2:
            raise HierclusterError(
                f"fit needs a 2-D array with one row per class (at least 2 classes), got shape {X.shape}"
            )
        if not np.all(np.isfinite(X)):
            raise HierclusterError("the embeddings or distances contain NaN or infinite values")
        n = len(X)
        names = [str(i) for i in range(n)] if class_names is None else [str(c) for c in class_names]
        if len(names) != n:
            raise HierclusterError(f"{len(names)} class names given for {n} classes (rows of the input)")
        if len(set(names)) != n:
            raise HierclusterError("class names must be unique")
        if self.metric == "precomputed":
            Z = scipy_linkage(_condensed(X), method=self.linkage)
        elif self.metric == "cosine":
            norms = np.linalg.norm(X, axis=1)
            if np.any(norms == 0):
                zero = [names[i] for i in np.flatnonzero(norms == 0)]
                raise HierclusterError(
                    f"classes {zero} have all-zero embeddings; cosine distance is undefined for them"
                )
            if self.linkage == "ward":
                Z = scipy_linkage(X / norms[:, None], method="ward", metric="euclidean")
            else:
                Z = scipy_linkage(X, method=self.linkage, metric="cosine")
        else:
            Z = scipy_linkage(X, method=self.linkage, metric="euclidean")
        return self._set_fitted(Z, names, list(range(n, 0, -1)))

    def _set_fitted(self, Z: np.ndarray, class_names: list[str], defined_levels: list[int]) -> ClassHierarchy:
        if self.names:
            _named_sets(self.names, class_names)  # validates the class names it mentions
        self.linkage_matrix_ = np.asarray(Z, dtype=np.float64)
        self.class_names_ = list(class_names)
        self.n_classes_ = len(class_names)
        self.defined_levels_ = defined_levels
        self.tree_ = _tree_from_linkage(self.linkage_matrix_, self.class_names_)
        if self.names:
            _check_names_match(self.names, self.class_names_, self.tree_)
        return self

    @classmethod
    def from_groups(cls, groups: Groups | str | Path, class_names: Sequence[str]) -> ClassHierarchy:
        """A hand-made grouping as a flat two-level hierarchy.

        Classes of one superclass merge at height 1 (in class-id order), then the
        superclasses merge at height 2 (in group-id order). The tie-breaking order is
        arbitrary, so only the levels C, k (the grouping) and 1 are defined: :meth:`cut`
        refuses other k. ``linkage`` and ``metric`` are ``None``.

        Parameters
        ----------
        groups : dict, list, assignment array, or path to a YAML file
            Anything :func:`~hiercluster.hierarchy.groupings.as_assignment` accepts; a dict or YAML
            file also names the superclasses.
        class_names : list of str

        Examples
        --------
        >>> ref = ClassHierarchy.from_groups({"pets": ["cat", "dog"], "cars": ["car"]}, ["cat", "car", "dog"])
        >>> ref.cut(2), ref.superclass_names(2), ref.defined_levels_
        (array([0, 1, 0]), ['pets', 'cars'], [3, 2, 1])
        """
        groups = _as_groups(groups)
        names = [str(c) for c in class_names]
        assignment = as_assignment(groups, names)
        n, k = len(names), int(assignment.max()) + 1
        if n < 2:
            raise HierclusterError("a hierarchy needs at least 2 classes")
        rows: list[list[float]] = []
        tops: list[tuple[int, int]] = []  # (cluster id, size) of each superclass
        for g in range(k):
            members = np.flatnonzero(assignment == g)
            cur, size = int(members[0]), 1
            for m in members[1:]:
                size += 1
                rows.append([min(cur, int(m)), max(cur, int(m)), 1.0, size])
                cur = n + len(rows) - 1
            tops.append((cur, size))
        cur, size = tops[0]
        for top, top_size in tops[1:]:
            size += top_size
            rows.append([min(cur, top), max(cur, top), 2.0, size])
            cur = n + len(rows) - 1
        given = _normalized_names(groups, names) if isinstance(groups, Mapping) else None
        hier = cls(linkage=None, metric=None, names=given)
        Z = np.array(rows, dtype=np.float64).reshape(n - 1, 4)
        return hier._set_fitted(Z, names, sorted({n, k, 1}, reverse=True))

    def _check_fitted(self) -> None:
        if not hasattr(self, "linkage_matrix_"):
            raise HierclusterError("this ClassHierarchy is not fitted yet; call fit(embeddings, class_names) first")

    # --- levels -----------------------------------------------------------------------

    def _merge_states(self) -> Iterator[np.ndarray]:
        """Cluster labels after 0, 1, ..., C-1 merges (labels are cluster node ids)."""
        labels = np.arange(self.n_classes_)
        yield labels
        for r in range(self.n_classes_ - 1):
            labels[self.tree_.nodes[self.n_classes_ + r]["members"]] = self.n_classes_ + r
            yield labels

    def _check_k(self, k: Any) -> int:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise HierclusterError(f"k must be an integer number of superclasses, got {k!r}")
        k = int(k)
        if not 1 <= k <= self.n_classes_:
            raise HierclusterError(f"k must be between 1 and {self.n_classes_} (the number of classes), got {k}")
        if k not in self.defined_levels_:
            raise HierclusterError(
                f"this hierarchy comes from a hand-made grouping and defines only the levels "
                f"k = {', '.join(map(str, self.defined_levels_))}; got k = {k}"
            )
        return k

    def cut(self, k: int | None = None, threshold: float | None = None) -> np.ndarray:
        """The partition into superclasses at one level, as a canonical assignment.

        Parameters
        ----------
        k : int, optional
            Number of superclasses, 1..C: undoes the last k-1 merges, so the result has
            exactly k groups even when merge heights tie.
        threshold : float, optional
            Apply every merge whose height is <= threshold (scipy ``fcluster`` with
            ``criterion="distance"``). Give exactly one of ``k`` and ``threshold``.

        Returns
        -------
        numpy.ndarray
            int64, length C, group ids ordered by smallest member class id.
        """
        self._check_fitted()
        if (k is None) == (threshold is None):
            raise HierclusterError("give exactly one of k (number of superclasses) and threshold (merge height)")
        if k is not None:
            merges = self.n_classes_ - self._check_k(k)
        else:
            merges = int(np.count_nonzero(self.linkage_matrix_[:, 2] <= float(threshold)))  # type: ignore[arg-type]
        for done, labels in enumerate(self._merge_states()):
            if done == merges:
                return as_assignment(labels)
        raise AssertionError("unreachable: merges <= C - 1")

    def levels(self) -> dict[int, np.ndarray]:
        """Every defined level: ``{k: assignment}`` for k = C .. 1 (descending)."""
        self._check_fitted()
        wanted = set(self.defined_levels_)
        out = {}
        for done, labels in enumerate(self._merge_states()):
            k = self.n_classes_ - done
            if k in wanted:
                out[k] = as_assignment(labels)
        return out

    # --- names and files ----------------------------------------------------------------

    def set_names(self, names: Mapping[str, Sequence[Any]]) -> ClassHierarchy:
        """Name superclasses ``{name: [class names]}`` (validated; each a cluster of the tree); returns ``self``.

        Examples
        --------
        >>> h = ClassHierarchy.from_groups([[0, 1], [2]], ["Sandal", "Sneaker", "Bag"])
        >>> h.set_names({"Footwear": ["Sandal", "Sneaker"]}).superclass_names(2)
        ['Footwear', 'Bag']
        """
        if hasattr(self, "class_names_"):
            normalized = _normalized_names(names, self.class_names_)
            _check_names_match(normalized, self.class_names_, self.tree_)
            self.names = normalized
        else:
            self.names = dict(names)
        return self

    def superclass_names(self, k: int) -> list[str]:
        """Names of the superclasses of level k in group-id order (user names, else ``a+b+c``)."""
        return group_names(self.cut(k), self.class_names_, self.names)

    def groups(self, k: int) -> dict[str, list[str]]:
        """Level k as ``{superclass name: [class names]}`` (the YAML form)."""
        assignment = self.cut(k)
        names = self.superclass_names(k)
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise HierclusterError(f"two superclasses of level {k} are both named {dup!r}; rename one with set_names")
        return {name: [self.class_names_[i] for i in np.flatnonzero(assignment == g)] for g, name in enumerate(names)}

    def to_yaml(self, path: str | Path, k: int) -> Path:
        """Write level k as YAML ``{superclass name: [class names]}``; returns the path."""
        path = Path(path)
        text = yaml.safe_dump(self.groups(k), sort_keys=False, allow_unicode=True, default_flow_style=None)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, text)
        return path

    def to_json(self, path: str | Path) -> Path:
        """Write the tree as networkx node-link JSON; returns the path.

        The file is readable with ``networkx.node_link_graph(data, edges="edges")``; its
        ``graph["hiercluster"]`` entry holds the parameters, class names and linkage
        matrix that :meth:`from_json` needs.
        """
        self._check_fitted()
        data = nx.node_link_data(self.tree_, edges="edges")
        data["graph"] = dict(data.get("graph", {}))
        data["graph"]["hiercluster"] = {
            "format": _FORMAT,
            "version": _FORMAT_VERSION,
            "linkage": self.linkage,
            "metric": self.metric,
            "names": _normalized_names(self.names, self.class_names_) if self.names else None,
            "class_names": self.class_names_,
            "defined_levels": self.defined_levels_,
            "linkage_matrix": self.linkage_matrix_.tolist(),
        }
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(data, indent=1) + "\n")
        return path

    @classmethod
    def from_json(cls, path: str | Path) -> ClassHierarchy:
        """Read a hierarchy written by :meth:`to_json`.

        The file is validated before use: its size (``MAX_HIERARCHY_BYTES``), its shape
        (every field :meth:`to_json` writes, with its type), the linkage matrix, and that
        the node-link tree is the tree of that matrix. Any problem is one
        :class:`HierclusterError` naming the file and the place in it.
        """
        path = Path(path)
        if not path.is_file():
            raise HierclusterError(f"hierarchy file not found: {path}")
        meta, data = _read_hierarchy_json(path)
        names = meta["class_names"]
        Z = np.asarray(meta["linkage_matrix"], dtype=np.float64).reshape(-1, 4)
        _check_linkage(Z, len(names), str(path))
        hier = cls(linkage=meta["linkage"], metric=meta["metric"], names=meta["names"])
        try:
            hier._set_fitted(Z, names, meta["defined_levels"])
        except HierclusterError as exc:  # superclass names that do not fit the classes
            raise HierclusterError(f"hierarchy file {path} is damaged: {exc}") from None
        tree = nx.node_link_graph(data, directed=True, multigraph=False, edges="edges")
        tree.graph.pop("hiercluster")
        expected = hier.tree_
        if set(tree.edges) != set(expected.edges) or dict(tree.nodes(data=True)) != dict(expected.nodes(data=True)):
            raise HierclusterError(
                f"{path}: the node-link tree does not match its linkage matrix; the file was edited or damaged"
            )
        hier.tree_ = tree
        return hier

    # --- comparison -----------------------------------------------------------------------

    def compare(self, reference_groups: Groups | str | Path) -> dict[str, float]:
        """Agreement of the cut at the reference's k with a reference grouping.

        Returns ``{"k": k, "ari": adjusted Rand index, "nmi": normalized mutual information}``
        (scikit-learn's ``adjusted_rand_score`` and ``normalized_mutual_info_score``).
        """
        from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

        self._check_fitted()
        reference = as_assignment(_as_groups(reference_groups), self.class_names_)
        k = int(reference.max()) + 1
        ours = self.cut(k)
        return {
            "k": k,
            "ari": float(adjusted_rand_score(reference, ours)),
            "nmi": float(normalized_mutual_info_score(reference, ours)),
        }


def _condensed(D: np.ndarray) -> np.ndarray:
    """A validated square distance matrix -> scipy's condensed form."""
    if D.shape[0] != D.shape[1]:
        raise HierclusterError(f"a precomputed distance matrix must be square (C x C), got shape {D.shape}")
    if not np.allclose(D, D.T, rtol=1e-9, atol=1e-12):
        raise HierclusterError("the precomputed distance matrix is not symmetric")
    if np.any(np.abs(np.diag(D)) > 1e-12):
        raise HierclusterError(
            "the precomputed distance matrix must have a zero diagonal (for a similarity S use "
            "hiercluster.hierarchy.embeddings.confusion_distance(S), i.e. 1 - S with zeros on the diagonal)"
        )
    if np.any(D < 0):
        raise HierclusterError("the precomputed distance matrix has negative entries")
    return squareform((D + D.T) / 2, checks=False)


def build_hierarchy(
    model: Any,
    method: str = "fc_weights",
    loader: Any = None,
    class_names: Sequence[str] | None = None,
    linkage: str | None = None,
    metric: str | None = None,
    names: Mapping[str, Sequence[Any]] | None = None,
) -> ClassHierarchy:
    """Embed a model's classes and cluster them in one call.

    Defaults follow DESIGN.md: ``fc_weights`` and ``centroids`` use ward on normalized
    vectors (``linkage="ward", metric="cosine"``); ``confusion`` clusters the distance
    ``1 - similarity`` with ``linkage="average", metric="precomputed"``.

    Parameters
    ----------
    model : torch.nn.Module
    method : {"fc_weights", "centroids", "confusion"}
    loader : iterable of (x, y), optional
        Needed by ``centroids`` and ``confusion``.
    class_names : list of str, optional
        Default ``"0" .. "C-1"``.
    linkage, metric : str, optional
        Override the defaults above.
    names : dict, optional
        Superclass names, as in :class:`ClassHierarchy`.

    Examples
    --------
    >>> from hiercluster.models.zoo import build_model
    >>> h = build_hierarchy(build_model("resnet8", num_classes=4, in_channels=1), "fc_weights")
    >>> sorted(h.levels())
    [1, 2, 3, 4]
    """
    from hiercluster.hierarchy.embeddings import class_embeddings

    return hierarchy_from_embedding(class_embeddings(model, method, loader), method, class_names, linkage, metric, names)


def hierarchy_from_embedding(
    emb: np.ndarray,
    method: str,
    class_names: Sequence[str] | None = None,
    linkage: str | None = None,
    metric: str | None = None,
    names: Mapping[str, Sequence[Any]] | None = None,
) -> ClassHierarchy:
    """Cluster class embeddings that :func:`~hiercluster.hierarchy.embeddings.class_embeddings` computed.

    The second half of :func:`build_hierarchy`, for callers that keep the embedding (a run
    caches the data-based ones); same defaults per ``method``.

    Examples
    --------
    >>> emb = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    >>> hierarchy_from_embedding(emb, "fc_weights").cut(k=2).tolist()
    [0, 0, 1]
    """
    from hiercluster.hierarchy.embeddings import confusion_distance

    if method == "confusion":
        if metric not in (None, "precomputed"):
            raise HierclusterError(
                "method 'confusion' gives a class similarity matrix, clustered as the precomputed distance "
                f"1 - similarity; metric must be 'precomputed' (the default), not {metric!r}"
            )
        X, linkage, metric = confusion_distance(emb), linkage or "average", "precomputed"
    else:
        X, linkage, metric = emb, linkage or "ward", metric or "cosine"
    return ClassHierarchy(linkage=linkage, metric=metric, names=names).fit(X, class_names)


__all__ = ["LINKAGES", "METRICS", "ClassHierarchy", "build_hierarchy", "hierarchy_from_embedding", "read_groups"]
