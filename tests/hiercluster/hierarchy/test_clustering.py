"""ClassHierarchy: cuts against scipy fcluster and scikit-learn, the tree, files, errors."""

import doctest
import json
import math
from pathlib import Path

import networkx as nx
import numpy as np
import pytest
import torch
import yaml
from scipy.cluster.hierarchy import fcluster, is_valid_linkage
from scipy.cluster.hierarchy import linkage as scipy_linkage
from sklearn.cluster import AgglomerativeClustering

import hiercluster.hierarchy.clustering as hierarchy_module
from hiercluster.errors import HierclusterError
from hiercluster.hierarchy.groupings import canonical_assignment
from hiercluster.hierarchy.clustering import ClassHierarchy, build_hierarchy, read_groups
from hiercluster.models.zoo import build_model

ROOT = Path(__file__).resolve().parents[3]
FASHION = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def test_docstring_examples():
    assert doctest.testmod(hierarchy_module).failed == 0


def _embeddings(seed, c=14, d=6):
    return np.random.default_rng(seed).normal(size=(c, d))


def _same_partition(a, b):
    return np.array_equal(canonical_assignment(np.asarray(a)), canonical_assignment(np.asarray(b)))


# --- cuts against independent references ------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("linkage", ["ward", "average", "complete", "single", "weighted"])
def test_cut_matches_scipy_fcluster_maxclust_at_every_k(seed, linkage):
    x = _embeddings(seed)
    h = ClassHierarchy(linkage=linkage, metric="euclidean").fit(x)
    z = scipy_linkage(x, method=linkage)  # computed here, not taken from the estimator
    assert len(np.unique(z[:, 2])) == len(z)  # tie-free, so maxclust gives exactly k
    for k in range(1, len(x) + 1):
        ref = fcluster(z, k, criterion="maxclust")
        assert len(np.unique(ref)) == k
        ours = h.cut(k=k)
        assert ours.max() + 1 == k
        assert _same_partition(ours, ref), (linkage, seed, k)


@pytest.mark.parametrize("seed", range(4))
def test_cut_matches_sklearn_ward_at_every_k(seed):
    x = _embeddings(seed)
    h = ClassHierarchy(linkage="ward", metric="euclidean").fit(x)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    hc = ClassHierarchy(linkage="ward", metric="cosine").fit(x)  # ward on normalized vectors
    for k in range(1, len(x) + 1):
        ref = AgglomerativeClustering(n_clusters=k, linkage="ward").fit_predict(x)
        assert _same_partition(h.cut(k=k), ref), k
        ref_unit = AgglomerativeClustering(n_clusters=k, linkage="ward").fit_predict(unit)
        assert _same_partition(hc.cut(k=k), ref_unit), k


@pytest.mark.parametrize("seed", range(3))
def test_average_cosine_matches_sklearn_at_every_k(seed):
    x = _embeddings(seed)
    h = ClassHierarchy(linkage="average", metric="cosine").fit(x)
    for k in range(1, len(x) + 1):
        ref = AgglomerativeClustering(n_clusters=k, linkage="average", metric="cosine").fit_predict(x)
        assert _same_partition(h.cut(k=k), ref), k


def test_precomputed_distances_match_sklearn():
    x = _embeddings(7)
    d = np.linalg.norm(x[:, None] - x[None], axis=-1)
    h = ClassHierarchy(linkage="complete", metric="precomputed").fit(d)
    for k in range(1, len(x) + 1):
        ref = AgglomerativeClustering(n_clusters=k, linkage="complete", metric="precomputed").fit_predict(d)
        assert _same_partition(h.cut(k=k), ref), k


def test_cut_by_threshold_matches_fcluster_distance():
    x = _embeddings(3)
    h = ClassHierarchy(linkage="average", metric="euclidean").fit(x)
    z = scipy_linkage(x, method="average")
    heights = np.concatenate([[0.0], z[:, 2], [z[-1, 2] + 1]])
    for t in (heights[:-1] + heights[1:]) / 2:
        assert _same_partition(h.cut(threshold=t), fcluster(z, t, criterion="distance"))
    assert h.cut(threshold=-1.0).tolist() == list(range(len(x)))


def test_cut_returns_exactly_k_groups_when_heights_tie():
    # Four identical embeddings and two identical others: many merges at height 0.
    x = np.array([[1.0, 0.0]] * 4 + [[0.0, 1.0]] * 2 + [[5.0, 5.0]])
    h = ClassHierarchy(linkage="average", metric="euclidean").fit(x)
    for k in range(1, 8):
        a = h.cut(k=k)
        assert a.max() + 1 == k and a[0] == 0
    # maxclust cannot split the tie: it returns fewer than 6 groups for k=6
    assert len(np.unique(fcluster(h.linkage_matrix_, 6, criterion="maxclust"))) < 6


def test_levels_are_nested_and_canonical():
    h = ClassHierarchy().fit(_embeddings(0, c=9))
    levels = h.levels()
    assert list(levels) == list(range(9, 0, -1))
    for k, a in levels.items():
        assert a.dtype == np.int64 and a.max() + 1 == k and np.array_equal(a, canonical_assignment(a))
        assert np.array_equal(a, h.cut(k=k))
    for k in range(9, 1, -1):  # each coarser level merges whole groups of the finer one
        fine, coarse = levels[k], levels[k - 1]
        assert all(len(np.unique(coarse[fine == g])) == 1 for g in range(k))


# --- the tree ------------------------------------------------------------------------


def test_tree_mirrors_the_linkage_matrix():
    names = [f"c{i}" for i in range(8)]
    h = ClassHierarchy(linkage="ward", metric="cosine").fit(_embeddings(2, c=8), names)
    z, t = h.linkage_matrix_, h.tree_
    assert is_valid_linkage(z) and h.n_classes_ == 8 and h.class_names_ == names
    assert nx.is_arborescence(t) and t.number_of_nodes() == 15 and t.number_of_edges() == 14
    for i, name in enumerate(names):
        assert t.nodes[i]["name"] == name and t.out_degree(i) == 0
    for r, (a, b, height, count) in enumerate(z):
        node = 8 + r
        assert set(t.successors(node)) == {int(a), int(b)}
        assert t.nodes[node]["height"] == height
        assert t.nodes[node]["members"] == sorted(nx.descendants(t, node) & set(range(8)))
        assert len(t.nodes[node]["members"]) == count
    assert t.nodes[14]["members"] == list(range(8))


def test_json_round_trip_keeps_the_tree_identical(tmp_path):
    h = ClassHierarchy(linkage="average", metric="cosine").fit(_embeddings(5, c=10), FASHION)
    shoes = next(members for members in h.groups(3).values() if len(members) > 1)  # names must match a cluster
    h.set_names({"Shoes": shoes})
    path = h.to_json(tmp_path / "sub" / "tree.json")
    back = ClassHierarchy.from_json(path)
    assert set(back.tree_.nodes) == set(h.tree_.nodes)
    assert set(back.tree_.edges) == set(h.tree_.edges)
    assert dict(back.tree_.nodes(data=True)) == dict(h.tree_.nodes(data=True))
    assert np.array_equal(back.linkage_matrix_, h.linkage_matrix_)
    assert back.class_names_ == FASHION and back.n_classes_ == 10
    assert (back.linkage, back.metric) == ("average", "cosine")
    assert back.names == {"Shoes": shoes}
    for k in range(1, 11):
        assert np.array_equal(back.cut(k=k), h.cut(k=k))
        assert back.superclass_names(k) == h.superclass_names(k)
    # plain networkx reads the same file
    g = nx.node_link_graph(json.loads(path.read_text()), edges="edges")
    assert set(g.edges) == set(h.tree_.edges)


def test_damaged_json_files_are_clear_errors(tmp_path):
    h = ClassHierarchy().fit(_embeddings(1, c=5))
    path = h.to_json(tmp_path / "h.json")
    data = json.loads(path.read_text())
    data["edges"] = data["edges"][:-1]
    (tmp_path / "edited.json").write_text(json.dumps(data))
    with pytest.raises(HierclusterError, match="does not match its linkage matrix"):
        ClassHierarchy.from_json(tmp_path / "edited.json")
    (tmp_path / "other.json").write_text('{"nodes": []}')
    with pytest.raises(HierclusterError, match="not a hierarchy written by"):
        ClassHierarchy.from_json(tmp_path / "other.json")
    with pytest.raises(HierclusterError, match="not found"):
        ClassHierarchy.from_json(tmp_path / "missing.json")


def _edited(data, path, value):
    """``data`` with the item at ``path`` (a tuple of keys and indices) set to ``value``."""
    import copy

    data = copy.deepcopy(data)
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return data


@pytest.mark.parametrize(
    "path, value, message",
    [
        (("graph", "hiercluster", "linkage_matrix", 0, 2), "far", "graph.hiercluster.linkage_matrix[0][2]: expected a number, got 'far'"),
        (("graph", "hiercluster", "linkage_matrix", 0), [0, 1], "graph.hiercluster.linkage_matrix: every row must hold 4 numbers"),
        (("graph", "hiercluster", "class_names", 1), 7, "graph.hiercluster.class_names[1]: expected a string, got 7"),
        (("graph", "hiercluster", "class_names", 1), "0", "class names must be unique"),
        (("graph", "hiercluster", "defined_levels"), [9], "graph.hiercluster.defined_levels: expected levels in 1..5, got [9]"),
        (("graph", "hiercluster", "names"), {"x": "0"}, "graph.hiercluster.names.x: expected a list of a string, got '0'"),
        (("graph", "hiercluster", "names"), {"x": ["nope"]}, "is damaged: superclass 'x'"),
        (("graph", "hiercluster", "linkage"), 5, "graph.hiercluster.linkage: expected a string or null, got 5"),
        (("nodes", 0, "members"), 0, "nodes[0].members: expected a list of an integer, got 0"),
        (("nodes", 2), "node", "nodes[2]: expected an object, got 'node'"),
        (("edges", 0, "source"), None, "edges[0].source: expected an integer, got None"),
        (("directed",), "yes", "directed: expected true or false, got 'yes'"),
    ],
)
def test_json_of_wrong_shape_is_named_damaged(tmp_path, path, value, message):
    h = ClassHierarchy().fit(_embeddings(1, c=5))
    data = json.loads(h.to_json(tmp_path / "h.json").read_text())
    (tmp_path / "bad.json").write_text(json.dumps(_edited(data, path, value)))
    with pytest.raises(HierclusterError) as info:
        ClassHierarchy.from_json(tmp_path / "bad.json")
    assert str(info.value).startswith(f"hierarchy file {tmp_path / 'bad.json'} is damaged: ")
    assert message in str(info.value) and len(str(info.value)) < 300


def test_json_that_is_not_a_hierarchy_or_too_deep(tmp_path):
    for text in ("[" * 100_000, "[1, 2]", '{"graph": 5}', "1" * 5000):
        (tmp_path / "x.json").write_text(text)
        with pytest.raises(HierclusterError, match="is not a hierarchy written by ClassHierarchy.to_json"):
            ClassHierarchy.from_json(tmp_path / "x.json")
    monkey = hierarchy_module.MAX_HIERARCHY_BYTES
    try:
        hierarchy_module.MAX_HIERARCHY_BYTES = 10
        with pytest.raises(HierclusterError, match="larger than"):
            ClassHierarchy.from_json(tmp_path / "x.json")
    finally:
        hierarchy_module.MAX_HIERARCHY_BYTES = monkey


def test_yaml_level_round_trip(tmp_path):
    h = ClassHierarchy().fit(_embeddings(4, c=10), FASHION)
    path = h.to_yaml(tmp_path / "k4.yaml", 4)
    groups = yaml.safe_load(path.read_text())
    assert list(groups) == h.superclass_names(4)
    assert sorted(sum(groups.values(), [])) == sorted(FASHION)
    assert np.array_equal(ClassHierarchy.from_groups(path, FASHION).cut(k=4), h.cut(k=4))


# --- names, hand-made groupings, comparison ------------------------------------------------


def test_superclass_names_join_members_unless_named():
    x = np.array([[0.0, 0.0], [0.0, 0.1], [10.0, 0.0], [10.0, 1.0]])
    h = ClassHierarchy(linkage="ward", metric="euclidean").fit(x, ["cat", "dog", "car", "bus"])
    assert h.superclass_names(2) == ["cat+dog", "car+bus"]
    assert h.superclass_names(4) == ["cat", "dog", "car", "bus"]
    h.set_names({"pets": ["dog", "cat"]})
    assert h.superclass_names(2) == ["pets", "car+bus"]
    assert h.groups(3) == {"pets": ["cat", "dog"], "car": ["car"], "bus": ["bus"]}
    with pytest.raises(HierclusterError, match="'cats'"):
        h.set_names({"pets": ["cats"]})


def test_from_groups_is_a_flat_two_level_hierarchy():
    ref = ClassHierarchy.from_groups(ROOT / "configs" / "hierarchies" / "fashion_mnist.yaml", FASHION)
    assert ref.defined_levels_ == [10, 5, 1]
    assert ref.cut(k=5).tolist() == [0, 1, 0, 2, 0, 3, 0, 3, 4, 3]
    assert ref.superclass_names(5) == ["tops", "bottoms", "dresses", "footwear", "bags"]
    assert ref.cut(k=10).tolist() == list(range(10)) and ref.cut(k=1).tolist() == [0] * 10
    assert ref.cut(threshold=1.5).tolist() == ref.cut(k=5).tolist()
    assert is_valid_linkage(ref.linkage_matrix_)
    assert sorted(ref.levels()) == [1, 5, 10]
    with pytest.raises(HierclusterError, match="defines only the levels k = 10, 5, 1"):
        ref.cut(k=3)


def test_shipped_reference_groupings_are_valid():
    from hiercluster.data.datasets import CIFAR10_CLASSES

    fm = read_groups(ROOT / "configs" / "hierarchies" / "fashion_mnist.yaml")
    assert ClassHierarchy.from_groups(fm, FASHION).cut(k=5).max() == 4
    c10 = ClassHierarchy.from_groups(ROOT / "configs" / "hierarchies" / "cifar10.yaml", CIFAR10_CLASSES)
    assert c10.groups(2) == {
        "vehicles": ["airplane", "automobile", "ship", "truck"],
        "animals": ["bird", "cat", "deer", "dog", "frog", "horse"],
    }


def test_user_grouping_errors_name_the_class(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("tops: [T-shirt/top, Pullover, Coat, Shirt]\nrest: [Trouser, Dress, Sandal, Sneaker, Ankle boot]\n")
    with pytest.raises(HierclusterError, match="misses class 'Bag'"):
        ClassHierarchy.from_groups(bad, FASHION)
    bad.write_text("a: [T-shirt/top, Trouser, Pullover, Dress, Coat]\nb: [Sandal, Shirt, Sneaker, Bag, Ankle boot, Coat]\n")
    with pytest.raises(HierclusterError, match="'Coat' .* appears in 'a' and 'b'"):
        ClassHierarchy.from_groups(bad, FASHION)
    bad.write_text("a: [T-shirt/top, Trouser, Pullover, Dress, Coat]\nb: [Sandal, Shirt, Sneaker, Bag, Ankle-boot]\n")
    with pytest.raises(HierclusterError, match="unknown class 'Ankle-boot'"):
        ClassHierarchy.from_groups(bad, FASHION)
    bad.write_text("[a, b]\n")
    with pytest.raises(HierclusterError, match="must hold a mapping"):
        ClassHierarchy.from_groups(bad, FASHION)


def test_compare_by_hand():
    # cut(3) = {a,b} {c} {d} vs reference {a} {b} {c,d}: the 4 x 4 pairs table gives
    # sum C(n_ij,2) = 0, sum C(a_i,2) = sum C(b_j,2) = 1, C(4,2) = 6, so
    # ARI = (0 - 1/6) / (1 - 1/6) = -0.2; entropies 1.5 ln2 each, joint 2 ln2 -> MI = ln2, NMI = 2/3.
    x = np.array([[0.0, 0.0], [0.0, 0.1], [10.0, 0.0], [10.0, 1.0]])
    h = ClassHierarchy(linkage="ward", metric="euclidean").fit(x, ["a", "b", "c", "d"])
    assert h.cut(k=3).tolist() == [0, 0, 1, 2]
    out = h.compare({"a": ["a"], "b": ["b"], "cd": ["c", "d"]})
    assert out["k"] == 3
    assert out["ari"] == pytest.approx(-0.2)
    assert out["nmi"] == pytest.approx(2 / 3)
    assert h.compare([[0, 1], [2, 3]]) == {"k": 2, "ari": pytest.approx(1.0), "nmi": pytest.approx(1.0)}
    # hand: reference {0,1}{2,3} vs ours at k=2 identical -> 1; vs {0,2}{1,3}: ARI = -0.5
    assert h.compare([[0, 2], [1, 3]])["ari"] == pytest.approx(-0.5)
    assert h.compare([[0, 2], [1, 3]])["nmi"] == pytest.approx(0.0, abs=1e-12)
    assert math.isfinite(h.compare(np.array([0, 0, 0, 1]))["nmi"])


# --- errors ---------------------------------------------------------------------------


def test_parameter_and_input_errors():
    x = _embeddings(0, c=5)
    with pytest.raises(HierclusterError, match="'ward' needs embedding vectors.*use linkage 'average'"):
        ClassHierarchy(linkage="ward", metric="precomputed").fit(np.zeros((3, 3)))
    with pytest.raises(HierclusterError, match="unknown linkage 'centroid'"):
        ClassHierarchy(linkage="centroid").fit(x)
    with pytest.raises(HierclusterError, match="unknown metric 'manhattan'"):
        ClassHierarchy(metric="manhattan").fit(x)
    with pytest.raises(HierclusterError, match="4 class names given for 5 classes"):
        ClassHierarchy().fit(x, list("abcd"))
    with pytest.raises(HierclusterError, match="not symmetric"):
        ClassHierarchy(linkage="average", metric="precomputed").fit(np.array([[0, 1.0], [2.0, 0]]))
    with pytest.raises(HierclusterError, match="zero diagonal"):
        ClassHierarchy(linkage="average", metric="precomputed").fit(np.array([[1.0, 1.0], [1.0, 1.0]]))
    with pytest.raises(HierclusterError, match=r"\['b'\] have all-zero embeddings"):
        ClassHierarchy().fit(np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]]), ["a", "b", "c"])
    with pytest.raises(HierclusterError, match="not fitted"):
        ClassHierarchy().cut(k=2)
    with pytest.raises(HierclusterError, match="unknown class 'Z'"):
        ClassHierarchy(names={"n": ["Z"]}).fit(x, list("abcde"))


@pytest.mark.parametrize("k", [0, 6, -1, 2.0, True])
def test_k_out_of_range_is_a_clear_error(k):
    h = ClassHierarchy().fit(_embeddings(0, c=5))
    with pytest.raises(HierclusterError, match="k must be"):
        h.cut(k=k)


def test_cut_needs_exactly_one_of_k_and_threshold():
    h = ClassHierarchy().fit(_embeddings(0, c=5))
    with pytest.raises(HierclusterError, match="exactly one of k"):
        h.cut()
    with pytest.raises(HierclusterError, match="exactly one of k"):
        h.cut(k=2, threshold=0.5)


# --- from a model ----------------------------------------------------------------------


def test_build_hierarchy_defaults_per_method():
    torch.manual_seed(0)
    model = build_model("resnet8", num_classes=6, in_channels=1)
    h = build_hierarchy(model, "fc_weights", class_names=list("abcdef"))
    w = model.fc.weight.detach().double().numpy()
    ref = ClassHierarchy(linkage="ward", metric="cosine").fit(w, list("abcdef"))
    assert (h.linkage, h.metric) == ("ward", "cosine")
    np.testing.assert_allclose(h.linkage_matrix_, ref.linkage_matrix_, rtol=1e-9)
    assert all(np.array_equal(h.cut(k=k), ref.cut(k=k)) for k in range(1, 7))
    y = torch.arange(6).repeat(2)
    loader = [(torch.randn(12, 1, 10, 10), y)]
    hc = build_hierarchy(model, "confusion", loader)
    assert (hc.linkage, hc.metric) == ("average", "precomputed") and hc.n_classes_ == 6
    with pytest.raises(HierclusterError, match="metric must be 'precomputed'"):
        build_hierarchy(model, "confusion", loader, metric="cosine")


# --- the shipped checkpoint ---------------------------------------------------------------

CHECKPOINT = ROOT / "data" / "checkpoints" / "fashion_mnist_resnet20.pt"


def test_shipped_checkpoint_fc_weight_hierarchy_keeps_footwear_together():
    """The issue's check: the k=2 cut keeps Sandal, Sneaker and Ankle boot together.

    Observed on the shipped checkpoint (resnet20, test accuracy 0.9392), default ward on
    normalized fc rows, before this test was written: k=2 is
    {T-shirt/top, Pullover, Dress, Coat, Shirt} | {Trouser, Sandal, Sneaker, Bag, Ankle boot};
    footwear becomes its own superclass from k=3 on (Sneaker+Ankle boot merge first).
    The k=5 cut agrees with configs/hierarchies/fashion_mnist.yaml at ARI 0.603, NMI 0.860.
    Only the footwear property is asserted; nothing was tuned to make it hold.
    """
    from hiercluster.models.zoo import load_checkpoint

    model, _ = load_checkpoint(CHECKPOINT)
    h = build_hierarchy(model, "fc_weights", class_names=FASHION)
    two = h.cut(k=2)
    footwear = [FASHION.index(c) for c in ("Sandal", "Sneaker", "Ankle boot")]
    assert len(set(two[footwear].tolist())) == 1


def test_a_name_that_matches_no_cluster_is_refused_naming_the_closest():
    x = np.array([[0.0, 0.0], [0.0, 0.1], [10.0, 0.0], [10.0, 1.0]])
    classes = ["cat", "dog", "car", "bus"]
    h = ClassHierarchy(linkage="ward", metric="euclidean").fit(x, classes)
    with pytest.raises(HierclusterError, match=r"'pets' \('cat\+dog\+car'\) matches no cluster.*closest is "
                       r"'cat\+dog\+car\+bus' \(with 'bus'\)"):
        h.set_names({"pets": ["dog", "cat", "car"]})
    assert h.names is None  # a refused set_names leaves the names as they were
    with pytest.raises(HierclusterError, match=r"'odd' \('cat\+car'\) matches no cluster"):
        ClassHierarchy(linkage="ward", metric="euclidean", names={"odd": ["car", "cat"]}).fit(x, classes)
    assert h.set_names({"pets": ["dog", "cat"], "bus": ["bus"]}).superclass_names(3) == ["pets", "car", "bus"]
