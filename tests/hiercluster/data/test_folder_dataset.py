"""Image folders that fit the model (size, channels, normalization, resizing, class order) and data.limit.

The equivalence the issue asks for: the shipped Fashion-MNIST model on a folder of PNGs
written from the IDX files gives the IDX loader's logits on the same images.
"""

import json
import urllib.parse
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import hiercluster.data.datasets as data
from hiercluster.cli import main
from hiercluster.run.config import DataConfig, load_config
from hiercluster.data.datasets import (
    FolderOptions,
    NORMALIZATION,
    dataset_info,
    folder_statistics,
    limit_dataset,
    load_dataset,
    make_loader,
    resolve_folder_options,
    stratified_indices,
    subset,
)
from hiercluster.errors import HierclusterError
from hiercluster.evaluation.inference import accuracy, collect_logits
from hiercluster.models.zoo import load_checkpoint
from hiercluster.run.prepare import _cache_id, data_variant
from hiercluster.run.versions import code_version
from hiercluster.run.sweep import resume_key
from hiercluster.run.grid import expand_grid

REPO = Path(__file__).resolve().parents[3]
CHECKPOINT = REPO / "data" / "checkpoints" / "fashion_mnist_resnet20.pt"
N_PNG = 500  # test images written as PNGs: every class, and seconds to evaluate


def folder_name(class_name: str) -> str:
    """The folder of a class: its name percent-encoded, so that ``T-shirt/top`` becomes ``T-shirt%2Ftop``."""
    return urllib.parse.quote(class_name, safe=" ")


def write_png_folder(dataset, indices, split_dir: Path) -> None:
    """The images of an in-memory dataset at ``indices`` as lossless PNGs, one folder per class."""
    for i in indices:
        label = int(dataset.targets[i])
        folder = split_dir / folder_name(dataset.classes[label])
        folder.mkdir(parents=True, exist_ok=True)
        pixels = dataset.images[i].permute(1, 2, 0).squeeze(-1).numpy()
        Image.fromarray(pixels).save(folder / f"{int(i):05d}.png")


@pytest.fixture(scope="module")
def fashion_pngs(tmp_path_factory):
    """500 Fashion-MNIST test images (a stratified subset) as ``ROOT/test/<class>/<index>.png``.

    Returns the root and a function giving the IDX loader's images in a folder dataset's order.
    """
    idx_test = load_dataset("fashion_mnist", split="test")
    root = tmp_path_factory.mktemp("fashion-png")
    write_png_folder(idx_test, stratified_indices(idx_test.targets, N_PNG), root / "test")

    def same_images(folder):
        return subset(idx_test, [int(Path(path).stem) for path, _ in folder.samples])

    return root, same_images


def shipped_options():
    _, meta = load_checkpoint(CHECKPOINT)
    cfg = DataConfig(dataset="imagefolder", channels=1, image_size=28, resize="none")
    return resolve_folder_options("imagefolder", cfg, meta)


def test_shipped_model_on_a_png_folder_matches_the_idx_loader(fashion_pngs):
    torch.set_num_threads(1)
    root, same_images = fashion_pngs
    model, meta = load_checkpoint(CHECKPOINT)
    folder = load_dataset("imagefolder", root, "test", options=shipped_options())
    idx_subset = same_images(folder)
    # The folder's classes are the checkpoint's, in its order ("T-shirt%2Ftop" holds "T-shirt/top").
    assert folder.classes == meta["classes"] and len(folder) == N_PNG
    assert folder.targets == idx_subset.targets.tolist()
    x_folder, _ = next(iter(make_loader(folder, N_PNG)))
    x_idx, _ = idx_subset.batch(slice(None))
    torch.testing.assert_close(x_folder, x_idx, rtol=0, atol=1e-6)  # PNG is lossless; normalization is the same
    logits_folder, labels_folder = collect_logits(model, make_loader(folder, 250))
    logits_idx, labels_idx = collect_logits(model, make_loader(idx_subset, 250))
    assert torch.equal(labels_folder, labels_idx)
    torch.testing.assert_close(logits_folder, logits_idx, rtol=0, atol=1e-5)
    assert accuracy(logits_folder, labels_folder) == accuracy(logits_idx, labels_idx) > 0.9


def test_run_on_the_png_folder_with_a_limit(fashion_pngs, tmp_path):
    torch.set_num_threads(1)
    root, same_images = fashion_pngs
    cfg = {
        "data": {"dataset": "imagefolder", "root": str(root), "channels": 1, "image_size": 28, "resize": "none"},
        "model": {"checkpoint": str(CHECKPOINT)},
        "hierarchy": {"levels": [5, 2], "embedding": "fc_weights"},  # the folder has no train/ to fit others on
        "quant": {"schemes": ["asymmetric"], "bits": [8], "clipping": ["minmax"]},
        "eval": {"random_seeds": 2},
    }
    path = tmp_path / "folder.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    assert main(["run", str(path), "--out", str(out), "--quiet", "--set", "data.limit=100"]) == 0
    info = json.loads((out / "run.json").read_text())
    assert info["data_limit"] == {"limit": 100, "of": N_PNG} and info["n_eval"] == 100
    cached = torch.load(out / "float_logits.pt", weights_only=True)
    folder = load_dataset("imagefolder", root, "test", options=shipped_options())
    chosen = same_images(folder.subset(stratified_indices(folder.targets, 100)))
    model, _ = load_checkpoint(CHECKPOINT)
    expected, labels = collect_logits(model, make_loader(chosen, 100))
    torch.testing.assert_close(cached["logits"], expected, rtol=0, atol=1e-5)
    assert torch.equal(cached["labels"], labels) and torch.bincount(labels).tolist() == [10] * 10  # stratified
    assert info["float_accuracy"] == accuracy(expected, labels)


# --- class names and order ------------------------------------------------------------


def _folder(root: Path, spec: dict[str, list[tuple[int, int]]], mode="L", value=100) -> Path:
    """``root/<class>/<i>.png`` for each ``(width, height)`` listed under a class."""
    for cls, sizes in spec.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i, size in enumerate(sizes):
            Image.new(mode, size, value if mode == "L" else (value, value // 2, 255 - value)).save(root / cls / f"{i}.png")
    return root


def test_class_order_follows_the_checkpoint_when_the_names_match(tmp_path):
    _folder(tmp_path / "val", {"b%2Fx": [(8, 8)], "a": [(8, 8)], "c": [(8, 8)]})
    default = load_dataset("imagefolder", tmp_path, "test")
    assert default.classes == ["a", "b/x", "c"]  # sorted folders, names percent-decoded
    ordered = load_dataset("imagefolder", tmp_path, "test", options=FolderOptions(classes=("c", "b/x", "a")))
    assert ordered.classes == ["c", "b/x", "a"]
    assert [ordered.classes[t] for t in ordered.targets] == ["a", "b/x", "c"]  # each file keeps its class
    other = load_dataset("imagefolder", tmp_path, "test", options=FolderOptions(classes=("a", "b", "c")))
    assert other.classes == ["a", "b/x", "c"]  # another set of names: the folders' order (check_fits_data refuses it)


def test_a_class_folder_decoding_to_a_control_character_is_refused(tmp_path):
    _folder(tmp_path, {"a%0Ab": [(8, 8)]})
    with pytest.raises(HierclusterError, match="line break or control character"):
        load_dataset("imagefolder", tmp_path, "test")


# --- size, channels, resizing, normalization ---------------------------------------------


def test_grayscale_and_resize_modes(tmp_path):
    _folder(tmp_path, {"a": [(40, 30)]}, mode="RGB", value=200)
    img = Image.open(next((tmp_path / "a").iterdir())).convert("L")
    base = dict(image_size=(28, 28), channels=1, mean=(0.0,), std=(1.0,))
    exact = load_dataset("imagefolder", tmp_path, "test", options=FolderOptions(**base, resize="exact"))[0][0]
    want = torch.from_numpy(np.asarray(img.resize((28, 28), Image.BILINEAR), dtype=np.float32) / 255)
    assert exact.shape == (1, 28, 28)
    torch.testing.assert_close(exact[0], want, atol=1 / 255, rtol=0)
    crop = load_dataset("imagefolder", tmp_path, "test", options=FolderOptions(**base, resize="shorter_side"))[0][0]
    assert crop.shape == (1, 28, 28)  # shorter side 30 -> round(28 * 256 / 224) = 32, then a 28x28 center crop
    rgb = load_dataset("imagefolder", tmp_path, "test")[0][0]
    assert rgb.shape == (3, 224, 224)  # ImageNet's defaults
    mean, std = NORMALIZATION["imagefolder"]
    torch.testing.assert_close(rgb[:, 100, 100], (torch.tensor([200, 100, 55]) / 255 - torch.tensor(mean)) / torch.tensor(std))


def test_resize_none_refuses_the_first_image_of_another_size(tmp_path):
    _folder(tmp_path / "val", {"a": [(28, 28), (28, 28)], "b": [(28, 28), (32, 28)]})
    options = FolderOptions(image_size=(28, 28), channels=1, mean=(0.5,), std=(0.5,), resize="none")
    with pytest.raises(HierclusterError) as err:
        load_dataset("imagefolder", tmp_path, "test", options=options)
    msg = str(err.value)
    assert str(tmp_path / "val" / "b" / "1.png") in msg and "32x28 pixels" in msg and "takes 28x28" in msg
    assert "\n" not in msg


def test_a_damaged_image_is_named(tmp_path):
    _folder(tmp_path, {"a": [(8, 8)]})
    (tmp_path / "a" / "bad.png").write_bytes(b"not a png")
    ds = load_dataset("imagefolder", tmp_path, "test", options=FolderOptions(image_size=(8, 8), resize="exact"))
    with pytest.raises(HierclusterError, match="cannot read image .*bad.png"):
        [ds[i] for i in range(len(ds))]


# --- mean/std: auto ----------------------------------------------------------------------


def test_auto_statistics_read_only_the_training_split(tmp_path, monkeypatch):
    _folder(tmp_path / "train", {"a": [(8, 8)] * 3}, value=51)  # 0.2
    _folder(tmp_path / "train", {"b": [(8, 8)]}, value=255)  # 1.0
    _folder(tmp_path / "val", {"a": [(8, 8)], "b": [(8, 8)]}, value=0)  # would pull the mean down if read
    data._STATISTICS.clear()
    read = []
    real = data._read_image
    monkeypatch.setattr(data, "_read_image", lambda path, options: read.append(path) or real(path, options))
    options = FolderOptions(image_size=(8, 8), channels=1, mean="auto", std="auto", resize="exact")
    ds = load_dataset("imagefolder", tmp_path, "test", options=options)
    assert read and all(Path(p).parent.parent == tmp_path / "train" for p in read)  # no evaluation image read
    assert len(read) == 4
    pixels = np.array([0.2] * 3 + [1.0])
    assert ds.mean == pytest.approx((pixels.mean(),)) and ds.std == pytest.approx((pixels.std(),))
    assert ds.options.mean == "auto" and dataset_info(ds)["mean"] == list(ds.mean)
    x, _ = ds[1]  # the val image of class b (value 0)
    torch.testing.assert_close(x, torch.full((1, 8, 8), -pixels.mean() / pixels.std(), dtype=torch.float32))
    read.clear()
    assert folder_statistics(tmp_path / "train", options) == (ds.mean, ds.std) and read == []  # cached


def test_auto_statistics_are_bounded_and_deterministic(tmp_path, monkeypatch):
    for i in range(10):  # 6 images of class a, 4 of b, each of another gray
        folder = tmp_path / "train" / ("a" if i < 6 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("L", (8, 8), 20 * i).save(folder / f"{i}.png")
    monkeypatch.setattr(data, "MAX_AUTO_STATS_IMAGES", 5)
    options = FolderOptions(image_size=(8, 8), channels=1, mean="auto", std="auto", resize="exact")
    data._STATISTICS.clear()
    read = []
    real = data._read_image
    monkeypatch.setattr(data, "_read_image", lambda path, opts: read.append(path) or real(path, opts))
    first = folder_statistics(tmp_path / "train", options)
    assert len(read) == 5  # a stratified sample of 5: 3 of a, 2 of b
    data._STATISTICS.clear()
    assert folder_statistics(tmp_path / "train", options) == first


def test_auto_statistics_refuse_a_constant_channel(tmp_path):
    _folder(tmp_path / "train", {"a": [(8, 8)]}, value=7)
    _folder(tmp_path / "val", {"a": [(8, 8)]}, value=7)
    data._STATISTICS.clear()
    with pytest.raises(HierclusterError, match="std 0"):
        load_dataset("imagefolder", tmp_path, "test", options=FolderOptions(channels=1, mean="auto", std="auto"))


# --- options: config > metadata > ImageNet ----------------------------------------------


def test_resolution_precedence():
    meta = {"dataset": "fashion_mnist", "in_channels": 1, "image_size": [28, 28], "classes": ["x", "y"]}
    from_meta = resolve_folder_options("imagefolder", DataConfig(dataset="imagefolder"), meta)
    assert from_meta == FolderOptions((28, 28), 1, NORMALIZATION["fashion_mnist"][0], NORMALIZATION["fashion_mnist"][1],
                                      "exact", ("x", "y"))
    stored = resolve_folder_options("imagefolder", None, {**meta, "mean": [0.1], "std": [0.2]})
    assert (stored.mean, stored.std) == ((0.1,), (0.2,))  # the metadata's own normalization first
    cfg = DataConfig(dataset="imagefolder", image_size=32, mean=(0.5,), std=(0.25,), resize="shorter_side")
    mixed = resolve_folder_options("imagefolder", cfg, meta)
    assert (mixed.image_size, mixed.channels, mixed.mean, mixed.resize) == ((32, 32), 1, (0.5,), "shorter_side")
    assert resolve_folder_options("imagefolder") == FolderOptions()  # ImageNet's
    gray = resolve_folder_options("imagefolder", DataConfig(dataset="imagefolder", channels=1))
    assert gray.mean == data.GRAY_IMAGENET_NORMALIZATION[0] and gray.resize == "shorter_side"
    assert resolve_folder_options("digits", DataConfig(dataset="digits"), meta) is None
    with pytest.raises(HierclusterError, match="data.resize applies to image folders only"):
        resolve_folder_options("digits", DataConfig(dataset="digits", resize="exact"))


def test_resolution_refuses_a_mean_of_the_wrong_length_and_bad_metadata():
    meta = {"dataset": "fashion_mnist", "in_channels": 1}
    with pytest.raises(HierclusterError, match=r"data.mean has 3 values .* 1 channel \(the checkpoint's in_channels\)"):
        resolve_folder_options("imagefolder", DataConfig(dataset="imagefolder", mean=(0.1,) * 3, std=(0.2,) * 3), meta)
    with pytest.raises(HierclusterError, match="m.json, key 'std'"):
        resolve_folder_options("imagefolder", None, {**meta, "mean": [0.1], "std": [0]}, "m.json")
    with pytest.raises(HierclusterError, match="key 'image_size'"):
        resolve_folder_options("imagefolder", None, {**meta, "image_size": [28, 28, 28]}, "m.json")


@pytest.mark.parametrize(
    "keys, expected",
    [
        ({"channels": 2}, "data.channels: 2 is not one of 1, 3"),
        ({"mean": [0.5]}, "data.mean is set but data.std is not"),
        ({"mean": "average", "std": "auto"}, "'average' is not auto"),
        ({"mean": [0.5], "std": [0]}, "data.std[0]: must be > 0"),
        ({"channels": 3, "mean": [0.5], "std": [0.5]}, "data.mean has 1 values [0.5], but data.channels is 3"),
        ({"mean": "auto", "std": "auto", "eval_split": "train"}, "data.eval_split is train"),
    ],
)
def test_config_refuses_bad_folder_keys(keys, expected):
    sections = {"data": {"dataset": "imagefolder", **keys}, "calibration": {"split": "test"}}
    with pytest.raises(HierclusterError) as err:
        load_config(None, [f"{s}.{k}={json.dumps(v)}" for s, values in sections.items() for k, v in values.items()])
    assert expected in str(err.value)


def test_training_metadata_records_the_normalization():
    from hiercluster.run.config import TrainConfig
    from hiercluster.run.train import checkpoint_metadata

    train_set = load_dataset("digits", split="train")
    meta = checkpoint_metadata("digits", "resnet8", 8, train_set, TrainConfig(epochs=1), {"wall_time_s": [0.0]}, 0.5)
    assert (meta["mean"], meta["std"]) == tuple(list(v) for v in NORMALIZATION["digits"])
    options = resolve_folder_options("imagefolder", None, meta)
    assert (options.mean, options.std, options.image_size, options.resize) == (*NORMALIZATION["digits"], (8, 8), "exact")


# --- data.limit ----------------------------------------------------------------------------


def test_stratified_indices_are_fixed_proportional_and_sorted():
    targets = np.repeat(np.arange(4), [50, 30, 15, 5])
    chosen = stratified_indices(targets, 20)
    assert np.array_equal(chosen, stratified_indices(targets, 20)) and np.all(np.diff(chosen) > 0)
    assert np.bincount(targets[chosen]).tolist() == [10, 6, 3, 1]
    rare = np.repeat(np.arange(3), [1000, 1, 1])
    assert np.bincount(rare[stratified_indices(rare, 3)]).tolist() == [1, 1, 1]  # at least one per class
    assert np.bincount(rare[stratified_indices(rare, 2)], minlength=3).tolist() == [2, 0, 0]  # fewer than classes
    assert len(stratified_indices(targets, 100)) == 100 and len(stratified_indices(targets, 0)) == 0
    with pytest.raises(ValueError):
        stratified_indices(targets, 101)


def test_limit_dataset_keeps_the_kind_and_refuses_more_than_the_split():
    test_set = load_dataset("digits", split="test")
    small = limit_dataset(test_set, 30, "the test split of digits")
    assert len(small) == 30 and small.classes == test_set.classes and small.mean == test_set.mean
    assert torch.bincount(small.targets).tolist() == [3] * 10
    with pytest.raises(HierclusterError) as err:
        limit_dataset(test_set, 10_000, "the test split of digits")
    assert "data.limit (--limit) is 10,000, more than the 450 images of the test split of digits" in str(err.value)


def test_the_default_trees_on_a_folder_without_train_is_one_clear_error(fashion_pngs, tmp_path, capsys):
    root, _ = fashion_pngs
    path = tmp_path / "folder.yaml"
    path.write_text(yaml.safe_dump({
        "data": {"dataset": "imagefolder", "root": str(root), "channels": 1, "image_size": 28, "resize": "none"},
        "model": {"checkpoint": str(CHECKPOINT)},
    }))
    assert main(["run", str(path), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "hierarchy.embedding lists confusion" in err and "no train/ folder" in err
    assert "hierarchy.embedding: fc_weights" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "float_logits.pt").exists()


def test_a_limited_run_never_shares_a_full_runs_cache_or_keys():
    full = load_config(None, ["data.dataset=digits"])
    limited = load_config(None, ["data.dataset=digits", "data.limit=450"])  # all 450 test images: same n
    cpu = torch.device("cpu")
    assert _cache_id(full, 450, "d", None, cpu) != _cache_id(limited, 450, "d", None, cpu)
    point = expand_grid(full)[0]
    prep = SimpleNamespace(
        cfg=full, checkpoint_digest="d", labels=torch.zeros(450), levels={}, data_options=None, device=torch.device("cpu"),
        holdout_set=None,
    )
    key = resume_key(point, prep)
    assert resume_key(point, SimpleNamespace(**{**vars(prep), "cfg": limited})) != key
    assert data_variant(full, None) == {}  # a full run's ids are what they were before data.limit
    assert _cache_id(full, 450, "d", None, cpu) == json.dumps(
        {"checkpoint": "d", "code": code_version(), "dataset": "digits", "device": "cpu", "n": 450, "root": None,
         "split": "test"},
        sort_keys=True,
    )
    # float logits of another device type are never reused
    assert _cache_id(full, 450, "d", None, torch.device("cuda")) != _cache_id(full, 450, "d", None, cpu)
    folder = load_config(None, ["data.dataset=imagefolder", "data.channels=1"])
    assert data_variant(folder, resolve_folder_options("imagefolder", folder.data))["images"]["channels"] == 1
