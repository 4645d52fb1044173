"""Data layer: readers on files the tests write themselves, digits split, loaders, errors."""

import codecs
import doctest
import gzip
import os
import pickle
import pickletools
import re
import struct
import tracemalloc

import numpy as np
import pytest
import torch

import hiercluster.data.datasets as datasets
from hiercluster.data.datasets import (
    FASHION_MNIST_CLASSES,
    NORMALIZATION,
    ImageTensorDataset,
    cifar100_coarse_groups,
    load_dataset,
    make_loader,
    read_idx,
    subset,
)
from hiercluster.errors import HierclusterError


def test_docstring_examples():
    assert doctest.testmod(datasets).failed == 0


def write_idx(path, array, compress):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        payload = gzip.compress(payload)
    path.write_bytes(payload)


@pytest.fixture
def idx_root(tmp_path):
    rng = np.random.default_rng(0)
    for split, (img, lbl), n in [
        ("train", ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"), 12),
        ("test", ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"), 7),
    ]:
        write_idx(tmp_path / f"{img}.gz", rng.integers(0, 256, (n, 28, 28)), compress=True)
        write_idx(tmp_path / lbl, rng.integers(0, 10, (n,)), compress=False)  # raw works too
    return tmp_path


def test_idx_reader_roundtrip(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", arr, compress=True)
    write_idx(tmp_path / "b", arr, compress=False)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), arr)
    np.testing.assert_array_equal(read_idx(tmp_path / "b"), arr)


def test_fashion_mnist_from_root(idx_root):
    ds = load_dataset("fashion_mnist", root=idx_root, split="test")
    assert len(ds) == 7 and ds.classes == FASHION_MNIST_CLASSES
    raw = read_idx(idx_root / "t10k-images-idx3-ubyte.gz")
    x, y = ds[3]
    mean, std = NORMALIZATION["fashion_mnist"]
    expected = (torch.from_numpy(raw[3].astype(np.float32)) / 255 - mean[0]) / std[0]
    torch.testing.assert_close(x[0], expected)
    assert y == int(read_idx(idx_root / "t10k-labels-idx1-ubyte")[3])
    assert len(load_dataset("fashion_mnist", root=idx_root, split="train")) == 12


def test_truncated_idx_is_a_clear_error(idx_root):
    path = idx_root / "t10k-images-idx3-ubyte.gz"
    data = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(data[:-100]))
    with pytest.raises(HierclusterError, match="damaged") as err:
        load_dataset("fashion_mnist", root=idx_root, split="test")
    assert str(path) in str(err.value)


def test_corrupt_gzip_is_a_clear_error(idx_root):
    path = idx_root / "t10k-images-idx3-ubyte.gz"
    data = bytearray(path.read_bytes())
    data[20:60] = b"\xff" * 40  # damage the deflate stream, keep the gzip header
    path.write_bytes(bytes(data))
    with pytest.raises(HierclusterError, match="damaged") as err:
        load_dataset("fashion_mnist", root=idx_root, split="test")
    assert str(path) in str(err.value)


def test_not_idx_is_a_clear_error(tmp_path):
    (tmp_path / "x").write_bytes(b"hello world, not idx")
    with pytest.raises(HierclusterError, match="magic"):
        read_idx(tmp_path / "x")


def test_missing_dataset_names_places_and_remedy(tmp_path, monkeypatch):
    monkeypatch.setenv("HIERCLUSTER_DATA", str(tmp_path / "env"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(HierclusterError) as err:
        load_dataset("mnist", root=tmp_path / "nowhere", split="train")
    msg = str(err.value)
    assert str(tmp_path / "nowhere") in msg and str(tmp_path / "env") in msg and "; to get it: copy" in msg
    assert "\n" not in msg  # one line: the places are listed with commas


def test_missing_cifar_is_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("HIERCLUSTER_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datasets, "_PROJECT_DATA", tmp_path / "project")
    with pytest.raises(HierclusterError) as err:
        load_dataset("cifar10", root=tmp_path / "nowhere", split="test")
    msg = str(err.value)
    assert f"in any of {tmp_path / 'nowhere' / 'cifar-10-batches-py'}, {tmp_path / 'nowhere'}, " in msg
    assert "; to get it: extract" in msg and "\n" not in msg


def test_a_huge_dataset_or_split_name_is_quoted_short():
    for kwargs in ({"name": "x" * 1_000_000}, {"name": "digits", "split": "s" * 1_000_000}):
        with pytest.raises(HierclusterError) as err:
            load_dataset(**kwargs)
        assert "'xxx" in str(err.value) or "'sss" in str(err.value)
        assert len(str(err.value)) < 300


def test_unknown_names_suggest():
    with pytest.raises(HierclusterError, match="did you mean 'fashion_mnist'"):
        load_dataset("fashion-mnist")
    with pytest.raises(HierclusterError, match="split"):
        load_dataset("digits", split="validation")


def test_digits_split_is_fixed_stratified_and_disjoint():
    train, test = load_dataset("digits", split="train"), load_dataset("digits", split="test")
    assert len(train) + len(test) == 1797 and len(test) == 450
    assert train.images.shape[1:] == (1, 8, 8) and train.classes == [str(i) for i in range(10)]
    from sklearn.datasets import load_digits

    per_class = np.bincount(load_digits().target, minlength=10)
    counts = np.bincount(test.targets.numpy(), minlength=10)
    assert np.all(np.abs(counts - 0.25 * per_class) <= 1)  # stratified: a quarter of each class
    again = load_dataset("digits", split="test")
    assert torch.equal(again.images, test.images)
    train_rows = {row.tobytes() + bytes([t]) for row, t in zip(train.images.numpy(), train.targets.numpy())}
    overlap = sum(row.tobytes() + bytes([t]) in train_rows for row, t in zip(test.images.numpy(), test.targets.numpy()))
    assert overlap < 5  # digits holds a few duplicate images; the split itself is disjoint by index


def test_tensor_loader_covers_every_sample_once_and_is_seeded():
    ds = ImageTensorDataset(
        torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1), torch.arange(10), [str(i) for i in range(10)], (0.0,), (1.0,)
    )
    labels = torch.cat([y for _, y in make_loader(ds, 3, shuffle=True, seed=5)])
    assert sorted(labels.tolist()) == list(range(10))
    again = torch.cat([y for _, y in make_loader(ds, 3, shuffle=True, seed=5)])
    assert torch.equal(labels, again)
    assert len(make_loader(ds, 3)) == 4 and len(make_loader(ds, 3, drop_last=True)) == 3


def _dump(path, obj):
    with open(path, "wb") as fh:
        pickle.dump(obj, fh)


def test_cifar10_reader(tmp_path):
    rng = np.random.default_rng(1)
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batches[name] = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, 4))}
        _dump(base / name, batches[name])
    _dump(base / "batches.meta", {b"label_names": [c.encode() for c in "a b c d e f g h i j".split()]})
    train = load_dataset("cifar10", root=tmp_path, split="train")
    test = load_dataset("cifar10", root=tmp_path, split="test")
    assert len(train) == 20 and len(test) == 4 and test.classes[0] == "a"
    data = batches["test_batch"][b"data"]
    # CIFAR rows are channel-major: 1024 red, 1024 green, 1024 blue values, each row-major 32x32.
    assert int(test.images[2, 1, 5, 7]) == int(data[2, 1024 + 5 * 32 + 7])
    assert test.targets.tolist() == [int(v) for v in batches["test_batch"][b"labels"]]


def test_cifar100_reader_with_coarse_labels(tmp_path):
    base = tmp_path / "cifar-100-python"
    base.mkdir()
    fine = [0, 1, 2, 3, 0, 2]
    coarse = [0, 1, 0, 1, 0, 0]
    for split in ("train", "test"):
        _dump(base / split, {b"data": np.zeros((6, 3072), np.uint8), b"fine_labels": fine, b"coarse_labels": coarse})
    _dump(base / "meta", {b"fine_label_names": [b"apple", b"bus", b"pear", b"train"], b"coarse_label_names": [b"fruit", b"vehicle"]})
    ds = load_dataset("cifar100", root=tmp_path, split="test")
    assert ds.classes == ["apple", "bus", "pear", "train"]
    assert cifar100_coarse_groups(ds) == {"fruit": ["apple", "pear"], "vehicle": ["bus", "train"]}
    part = subset(ds, [5, 1])  # a subset (data.limit) keeps each image's coarse label with it
    assert part.targets.tolist() == [2, 1] and part.extras["coarse_targets"].tolist() == [0, 1]
    assert part.extras["coarse_classes"] == ["fruit", "vehicle"] and (part.mean, part.std) == (ds.mean, ds.std)


def test_cifar_reader_refuses_code_in_pickles(tmp_path):
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    for name in ["test_batch", "batches.meta"]:
        _dump(base / name, Evil())
    with pytest.raises(HierclusterError, match="refusing to load builtins.print"):
        load_dataset("cifar10", root=tmp_path, split="test")


def test_imagefolder(tmp_path):
    from PIL import Image

    for cls in ("cat", "dog"):
        (tmp_path / "val" / cls).mkdir(parents=True)
        Image.new("RGB", (40, 30), color=(10, 20, 30)).save(tmp_path / "val" / cls / "a.png")
    ds = load_dataset("imagefolder", root=tmp_path, split="test")
    assert ds.classes == ["cat", "dog"] and ds[0][0].shape == (3, 224, 224)
    with pytest.raises(HierclusterError, match="needs a root"):
        load_dataset("imagefolder")


def write_idx_header(path, shape, payload=b"", compress=False):
    data = struct.pack(">HBB", 0, 0x08, len(shape)) + struct.pack(f">{len(shape)}I", *shape) + payload
    path.write_bytes(gzip.compress(data) if compress else data)


def test_gzip_bomb_is_refused_without_inflating_it(tmp_path):
    path = tmp_path / "bomb.gz"
    zeros = gzip.compress(bytes(64 * 1024 * 1024), compresslevel=1)  # 64 MiB of zeros in ~0.3 MB
    header = struct.pack(">HBB", 0, 0x08, 3) + struct.pack(">3I", 2, 3, 4)
    path.write_bytes(gzip.compress(header + bytes(24)) + zeros)  # gzip members concatenate into one stream
    tracemalloc.start()
    try:
        with pytest.raises(HierclusterError, match=r"header says shape \(2, 3, 4\) \(24 bytes of data\), but the file holds more"):
            read_idx(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024 * 1024  # the old reader held all 64 MiB


def test_absurd_idx_header_is_refused_with_a_positive_byte_count(tmp_path):
    path = tmp_path / "huge"
    write_idx_header(path, (2**32 - 1,) * 3)
    with pytest.raises(HierclusterError) as err:
        read_idx(path)
    msg = str(err.value)
    assert f"{(2**32 - 1) ** 3:,} bytes of data, larger than the 4 GiB this tool reads" in msg and str(path) in msg


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize(
    "payload, expected",
    [(bytes(5), r"\(6 bytes of data\), file holds 5"), (bytes(7), r"\(6 bytes of data\)(, file holds 7|, but the file holds more)")],
    ids=["short", "long"],
)
def test_idx_data_shorter_or_longer_than_declared(tmp_path, compress, payload, expected):
    path = tmp_path / ("x.gz" if compress else "x")
    write_idx_header(path, (2, 3), payload, compress)
    with pytest.raises(HierclusterError, match="damaged: header says shape \\(2, 3\\) " + expected):
        read_idx(path)


@pytest.mark.parametrize("shape", [(0, 28, 28), (0,), (5, 0, 28)])
def test_empty_idx_is_refused(tmp_path, shape):
    path = tmp_path / "x"
    write_idx_header(path, shape)
    with pytest.raises(HierclusterError, match=f"is empty: its header declares shape {re.escape(str(shape))}"):
        read_idx(path)


def test_gzip_file_without_gz_suffix_is_named(tmp_path):
    write_idx(tmp_path / "x", np.zeros((2, 2)), compress=True)
    with pytest.raises(HierclusterError, match="bad magic number 0x1f8b.*it looks gzip-compressed: name it with .gz"):
        read_idx(tmp_path / "x")


def test_idx_dataset_with_no_images_is_refused(idx_root):
    write_idx_header(idx_root / "t10k-images-idx3-ubyte.gz", (0, 28, 28), compress=True)
    write_idx_header(idx_root / "t10k-labels-idx1-ubyte", (0,))
    with pytest.raises(HierclusterError, match="t10k-images-idx3-ubyte.gz is empty"):
        load_dataset("fashion_mnist", root=idx_root, split="test")


def _cifar10_files(base, data, labels, protocol=pickle.DEFAULT_PROTOCOL):
    base.mkdir(exist_ok=True)
    with open(base / "test_batch", "wb") as fh:
        pickle.dump({b"data": data, b"labels": labels}, fh, protocol=protocol)
    with open(base / "batches.meta", "wb") as fh:
        pickle.dump({b"label_names": [c.encode() for c in "abcdefghij"]}, fh, protocol=protocol)


def test_cifar_written_at_protocol_2_loads(tmp_path):
    data = np.random.default_rng(2).integers(0, 256, (3, 3072), dtype=np.uint8)
    _cifar10_files(tmp_path / "cifar-10-batches-py", data, [1, 2, 3], protocol=2)
    with open(tmp_path / "cifar-10-batches-py" / "batches.meta", "wb") as fh:  # b"" is stored as bytes() at protocol 2
        pickle.dump({b"label_names": [c.encode() for c in "abcdefghij"], b"note": b""}, fh, protocol=2)
    ops = {arg for op, arg, _ in pickletools.genops((tmp_path / "cifar-10-batches-py" / "test_batch").read_bytes())}
    assert "_codecs encode" in ops  # how Python 3 stores bytes at protocol 2
    meta_ops = {arg for op, arg, _ in pickletools.genops((tmp_path / "cifar-10-batches-py" / "batches.meta").read_bytes())}
    assert "__builtin__ bytes" in meta_ops
    ds = load_dataset("cifar10", root=tmp_path, split="test")
    assert ds.classes[:2] == ["a", "b"] and ds.targets.tolist() == [1, 2, 3]
    assert torch.equal(ds.images, torch.from_numpy(data.reshape(3, 3, 32, 32)))


class _Reduces:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


@pytest.mark.parametrize(
    "evil, expected",
    [
        (_Reduces(codecs.encode, "abc", "rot13"), "refusing to call _codecs.encode with encoding 'rot13'"),
        (_Reduces(codecs.encode, b"abc", "latin1"), "refusing to call _codecs.encode"),
        (_Reduces(os.system, "true"), f"refusing to load {os.system.__module__}.system"),
        (_Reduces(bytes, 10**12), "refusing to call bytes with arguments"),
    ],
    ids=["encode rot13", "encode of bytes", "os.system", "bytes of a terabyte"],
)
def test_cifar_reader_refuses_other_calls(tmp_path, evil, expected):
    _cifar10_files(tmp_path / "cifar-10-batches-py", np.zeros((1, 3072), np.uint8), [evil], protocol=2)
    with pytest.raises(HierclusterError, match=re.escape(expected)):
        load_dataset("cifar10", root=tmp_path, split="test")


@pytest.mark.parametrize(
    "data, labels, expected",
    [
        ([[0] * 3072], [1], "'data' is not a uint8 array of rows of 3072 pixels (found list)"),
        (np.zeros((1, 3072), np.float32), [1], "(found float32 array of shape (1, 3072))"),
        (np.zeros((1, 3071), np.uint8), [1], "(found uint8 array of shape (1, 3071))"),
        (np.zeros((1, 3072), np.uint8), [[1] * 10] * 1000, "'labels' is not a list of integers"),
        (np.zeros((1, 3072), np.uint8), [10], "'labels' holds label 10, but there are 10 classes"),
        (np.zeros((1, 3072), np.uint8), [-1], "'labels' holds label -1"),
        (np.zeros((1, 3072), np.uint8), [2**70], f"'labels' holds label {2**70}"),
        (np.zeros((2, 3072), np.uint8), [1], "hold 2 images but 1 labels"),
        (np.zeros((0, 3072), np.uint8), [], "dataset cifar10 (test split) under"),
    ],
    ids=["data a list", "data float", "rows too short", "nested labels", "label too big", "label negative",
         "label beyond int64", "count mismatch", "no images"],
)
def test_damaged_cifar_files_are_named(tmp_path, data, labels, expected):
    _cifar10_files(tmp_path / "cifar-10-batches-py", data, labels)
    with pytest.raises(HierclusterError) as err:
        load_dataset("cifar10", root=tmp_path, split="test")
    assert expected in str(err.value)
