"""Files that come in: IDX and CIFAR datasets, checkpoints and their metadata (issue 9, groups 2, 3, 10, 11).

Most cases go through ``evaluate-checkpoint``, which reads the metadata, then the
dataset, then the weights: a dataset case needs only metadata that fits, a checkpoint
case a dataset (digits, built in) that fits the metadata. The files are tiny and
synthetic; the bombs are a few MB on disk.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bad_input_cases import Case, copy_checkpoint, digits_config

FM_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
IMAGES, LABELS = "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"


# --- builders -----------------------------------------------------------------------


def idx_bytes(shape: tuple[int, ...], payload: bytes | None = None) -> bytes:
    """An unsigned-byte IDX file: header for ``shape``, then ``payload`` (zeros of the right size by default)."""
    header = struct.pack(">HBB", 0, 0x08, len(shape)) + struct.pack(f">{len(shape)}I", *shape)
    return header + (bytes(int(np.prod(shape))) if payload is None else payload)


def fm_folder(tmp: Path, images: bytes | None = None, labels: bytes | None = None, images_name: str = IMAGES + ".gz") -> Path:
    """``tmp/fm`` holding a Fashion-MNIST test split of 5 images: valid unless ``images``/``labels`` are given.

    Both files are always present, so the search never falls through to a real copy elsewhere.
    """
    folder = tmp / "fm"
    folder.mkdir(exist_ok=True)
    if images is None:
        images = gzip.compress(idx_bytes((5, 28, 28)))
    (folder / images_name).write_bytes(images)
    (folder / LABELS).write_bytes(idx_bytes((5,), bytes([0, 1, 2, 3, 4])) if labels is None else labels)
    return folder


def metadata(**changes: object) -> dict[str, object]:
    """Metadata of a resnet8 trained on digits, as ``hiercluster train`` writes it, with ``changes``."""
    meta: dict[str, object] = {
        "arch": "resnet8", "width": 16, "num_classes": 10, "in_channels": 1,
        "classes": [str(i) for i in range(10)], "dataset": "digits",
    }  # fmt: skip
    meta.update(changes)
    return meta


def model_files(tmp: Path, weights: bytes = b"never read: an earlier step refuses", meta: object = None) -> Path:
    """``tmp/model.pt`` with ``weights`` and ``tmp/model.json`` with ``meta`` (a dict is written as JSON, a str as is)."""
    ckpt = tmp / "model.pt"
    ckpt.write_bytes(weights)
    meta = metadata() if meta is None else meta
    ckpt.with_suffix(".json").write_text(meta if isinstance(meta, str) else json.dumps(meta))
    return ckpt


def evaluate_fm(tmp: Path, **fm: object) -> list[str]:
    """``evaluate-checkpoint`` of a Fashion-MNIST model on ``fm_folder(tmp, **fm)``."""
    ckpt = model_files(tmp, meta=metadata(dataset="fashion_mnist", classes=FM_CLASSES))
    return ["evaluate-checkpoint", str(ckpt), "--root", str(fm_folder(tmp, **fm))]  # type: ignore[arg-type]


def evaluate_digits(tmp: Path, weights: bytes) -> list[str]:
    """``evaluate-checkpoint`` of a digits model whose weights file holds ``weights``."""
    return ["evaluate-checkpoint", str(model_files(tmp, weights)), "--dataset", "digits"]


def torch_saved(obj: object) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


class Reduces:
    """Unpickles as ``func(*args)``: how a malicious pickle runs code."""

    def __init__(self, func: object, *args: object) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return (self.func, self.args)


def shell_that_changes(tmp: Path) -> Reduces:
    """``os.system`` appending to a file that exists before the command: the harness would see it run."""
    victim = tmp / "victim.txt"
    victim.write_text("unchanged\n")
    return Reduces(os.system, f"echo ran >> {victim}")


# --- IDX datasets -------------------------------------------------------------------

# 8 MiB of zeros, gzip-compressed once (8 KB); gzip members concatenate into one stream.
_ZEROS_MEMBER: list[bytes] = []
BOMB_MEMBERS = 800  # 800 x 8 MiB = 6.25 GiB inflated, more than the harness's 6 GiB limit


def _gzip_bomb(tmp: Path) -> list[str]:
    if not _ZEROS_MEMBER:
        _ZEROS_MEMBER.append(gzip.compress(bytes(8 * 1024 * 1024), compresslevel=6))
    images = gzip.compress(idx_bytes((5, 28, 28)), compresslevel=1) + _ZEROS_MEMBER[0] * BOMB_MEMBERS
    return evaluate_fm(tmp, images=images)


def _absurd_dims(tmp: Path) -> list[str]:
    return evaluate_fm(tmp, images=idx_bytes((2**31, 2**31, 2**31), b""), images_name=IMAGES)


def _truncated_gz(tmp: Path) -> list[str]:
    return evaluate_fm(tmp, images=gzip.compress(idx_bytes((5, 28, 28))[:-100]))


def _truncated_raw(tmp: Path) -> list[str]:
    return evaluate_fm(tmp, images=idx_bytes((5, 28, 28))[:-100], images_name=IMAGES)


def _zero_images(tmp: Path) -> list[str]:
    return evaluate_fm(tmp, images=gzip.compress(idx_bytes((0, 28, 28))), labels=idx_bytes((0,)))


def _zero_labels(tmp: Path) -> list[str]:
    return evaluate_fm(tmp, labels=idx_bytes((0,)))


def _bad_magic(tmp: Path) -> list[str]:
    return evaluate_fm(tmp, images=gzip.compress(b"\x00\x00\x0d\x03" + bytes(100)))


def _gzip_without_suffix(tmp: Path) -> list[str]:
    return evaluate_fm(tmp, images=gzip.compress(idx_bytes((5, 28, 28))), images_name=IMAGES)


def _corrupt_gzip(tmp: Path) -> list[str]:
    payload = np.random.default_rng(0).integers(0, 256, 5 * 28 * 28, dtype=np.uint8).tobytes()
    data = bytearray(gzip.compress(idx_bytes((5, 28, 28), payload)))
    data[-60:-20] = b"\xff" * 40  # damage the end of the deflate stream: the header still reads
    return evaluate_fm(tmp, images=bytes(data))


def _count_mismatch(tmp: Path) -> list[str]:
    return evaluate_fm(tmp, labels=idx_bytes((4,), bytes([0, 1, 2, 3])))


def _label_out_of_range(tmp: Path) -> list[str]:
    return evaluate_fm(tmp, labels=idx_bytes((5,), bytes([0, 1, 2, 3, 12])))


def _images_2d(tmp: Path) -> list[str]:
    return evaluate_fm(tmp, images=gzip.compress(idx_bytes((5, 784))))


def _zero_images_in_a_run(tmp: Path) -> list[str]:
    folder = fm_folder(tmp, images=gzip.compress(idx_bytes((0, 28, 28))), labels=idx_bytes((0,)))
    config = digits_config(tmp, data={"dataset": "fashion_mnist", "root": str(folder)})
    return ["run", str(config), "--out", str(tmp / "run")]


# --- CIFAR --------------------------------------------------------------------------


def evaluate_cifar(tmp: Path, batch: dict[bytes, object]) -> list[str]:
    """``evaluate-checkpoint`` of a CIFAR-10 model on a test batch ``batch`` (written at protocol 2, as Python 3 can)."""
    base = tmp / "c10" / "cifar-10-batches-py"
    base.mkdir(parents=True)
    for name, obj in [("test_batch", batch), ("batches.meta", {b"label_names": [c.encode() for c in "abcdefghij"]})]:
        with open(base / name, "wb") as fh:
            pickle.dump(obj, fh, protocol=2)
    ckpt = model_files(tmp, meta=metadata(dataset="cifar10", in_channels=3, classes=list("abcdefghij")))
    return ["evaluate-checkpoint", str(ckpt), "--root", str(tmp / "c10")]


def _cifar_malicious(tmp: Path) -> list[str]:
    return evaluate_cifar(tmp, {b"data": np.zeros((1, 3072), np.uint8), b"labels": [shell_that_changes(tmp)]})


def _cifar_codecs_other_encoding(tmp: Path) -> list[str]:
    import codecs

    return evaluate_cifar(tmp, {b"data": np.zeros((1, 3072), np.uint8), b"labels": [Reduces(codecs.encode, "x", "rot13")]})


def _cifar_label_bomb(tmp: Path) -> list[str]:
    # A million references to one 10,000-item list: 2 MB on disk, 80 GB once numpy converts it.
    row = list(range(10_000))
    return evaluate_cifar(tmp, {b"data": np.zeros((1, 3072), np.uint8), b"labels": [row] * 1_000_000})


def _cifar_label_out_of_range(tmp: Path) -> list[str]:
    return evaluate_cifar(tmp, {b"data": np.zeros((2, 3072), np.uint8), b"labels": [3, 10]})


def _cifar_no_images(tmp: Path) -> list[str]:
    return evaluate_cifar(tmp, {b"data": np.zeros((0, 3072), np.uint8), b"labels": []})


# --- checkpoints --------------------------------------------------------------------


def _resnet8_state() -> dict[str, object]:
    from hiercluster.models.zoo import build_model

    return build_model("resnet8", 10, 1).state_dict()


def _empty_checkpoint(tmp: Path) -> list[str]:
    return evaluate_digits(tmp, b"")


def _text_checkpoint(tmp: Path) -> list[str]:
    return evaluate_digits(tmp, b"arch: resnet8\nweights: see elsewhere\n")


def _malicious_checkpoint(tmp: Path) -> list[str]:
    return evaluate_digits(tmp, torch_saved({"fc.weight": shell_that_changes(tmp)}))


def _truncated_checkpoint(tmp: Path) -> list[str]:
    return evaluate_digits(tmp, torch_saved(_resnet8_state())[:5000])


def _checkpoint_of_a_list(tmp: Path) -> list[str]:
    return evaluate_digits(tmp, torch_saved([1, 2, 3]))


def _checkpoint_integer_weights(tmp: Path) -> list[str]:
    state = _resnet8_state()
    state["fc.weight"] = state["fc.weight"].long()  # type: ignore[union-attr]
    return evaluate_digits(tmp, torch_saved(state))


def _checkpoint_is_a_folder(tmp: Path) -> list[str]:
    (tmp / "model.pt").mkdir()
    (tmp / "model.json").write_text(json.dumps(metadata()))
    return ["evaluate-checkpoint", str(tmp / "model.pt"), "--dataset", "digits"]


def _checkpoint_for_another_dataset(tmp: Path) -> list[str]:
    ckpt = copy_checkpoint(tmp)
    return ["evaluate-checkpoint", str(ckpt), "--dataset", "fashion_mnist", "--root", str(fm_folder(tmp))]


# --- metadata -----------------------------------------------------------------------


def evaluate_with_metadata(meta: object) -> Callable[[Path], list[str]]:
    """A case builder: ``evaluate-checkpoint`` of a checkpoint whose metadata is ``meta``."""

    def make(tmp: Path) -> list[str]:
        return ["evaluate-checkpoint", str(model_files(tmp, meta=meta)), "--dataset", "digits"]

    return make


CASES: dict[str, Case] = {
    # IDX
    "gzip bomb in the dataset folder": Case(_gzip_bomb, "but the file holds more", bomb=True),
    "IDX header with absurd dimensions": Case(_absurd_dims, "bytes of data, larger than the 4 GiB this tool reads"),
    "IDX .gz shorter than its header says": Case(_truncated_gz, "file holds 3,820"),
    "raw IDX shorter than its header says": Case(_truncated_raw, "file holds 3,820"),
    "IDX with zero images": Case(_zero_images, "is empty: its header declares shape (0, 28, 28)"),
    "IDX labels with zero entries": Case(_zero_labels, "is empty: its header declares shape (0,)"),
    "IDX with a bad magic number": Case(_bad_magic, "bad magic number 0x00000d03"),
    "gzip-compressed IDX without .gz": Case(_gzip_without_suffix, "it looks gzip-compressed: name it with .gz"),
    "IDX .gz with a damaged deflate stream": Case(_corrupt_gzip, "cannot read IDX file"),
    "IDX images and labels of different counts": Case(_count_mismatch, "do not match: images (5, 28, 28), labels (4,)"),
    "IDX label beyond the class count": Case(_label_out_of_range, "has label 12, but fashion_mnist has 10 classes"),
    "IDX images of two dimensions": Case(_images_2d, "do not match: images (5, 784)"),
    "run on an IDX dataset with zero images": Case(_zero_images_in_a_run, "is empty: its header declares shape (0, 28, 28)"),
    # CIFAR
    "CIFAR pickle that runs a command": Case(_cifar_malicious, f"refusing to load {os.system.__module__}.system"),
    "CIFAR pickle encoding with rot13": Case(
        _cifar_codecs_other_encoding, "refusing to call _codecs.encode with encoding 'rot13'"
    ),
    "CIFAR labels as a reference bomb": Case(_cifar_label_bomb, "'labels' is not a list of integers", bomb=True),
    "CIFAR label beyond the class count": Case(_cifar_label_out_of_range, "'labels' holds label 10, but there are 10 classes"),
    "CIFAR batch with no images": Case(_cifar_no_images, "dataset cifar10 (test split) under"),
    # checkpoints
    "empty checkpoint": Case(_empty_checkpoint, "is not a torch checkpoint (the file is empty)"),
    "text file as checkpoint": Case(_text_checkpoint, "is not a torch checkpoint (not a zip or pickle file"),
    "checkpoint that runs a command": Case(
        _malicious_checkpoint, f"holds a forbidden object (GLOBAL {os.system.__module__}.system) and was not loaded"
    ),
    "truncated checkpoint": Case(_truncated_checkpoint, "cannot read checkpoint"),
    "checkpoint holding a list": Case(_checkpoint_of_a_list, "does not hold a state_dict of tensors"),
    "checkpoint with integer weights": Case(_checkpoint_integer_weights, "fc.weight: file torch.int64 vs model torch.float32"),
    "checkpoint that is a folder": Case(_checkpoint_is_a_folder, "is a folder"),
    "checkpoint for another dataset": Case(_checkpoint_for_another_dataset, "does not fit the data"),
    # metadata
    'metadata "num_classes": "ten"': Case(
        evaluate_with_metadata(metadata(num_classes="ten")), "key 'num_classes': expected an integer, got 'ten'"
    ),
    'metadata "in_channels": null': Case(
        evaluate_with_metadata(metadata(in_channels=None)), "key 'in_channels': expected an integer, got None"
    ),
    'metadata "arch": 5': Case(evaluate_with_metadata(metadata(arch=5)), "key 'arch': expected a string, got 5"),
    "metadata num_classes of a billion": Case(
        evaluate_with_metadata(metadata(num_classes=10**9)), "expected an integer in [1, 100,000]"
    ),
    "metadata with 11 class names for 10 classes": Case(
        evaluate_with_metadata(metadata(classes=[str(i) for i in range(11)])), "11 class names but num_classes 10"
    ),
    "metadata not an object": Case(evaluate_with_metadata("[1, 2, 3]"), "expected an object, got [1, 2, 3]"),
    "metadata not JSON": Case(evaluate_with_metadata('{"arch": "resnet8",'), "is not valid JSON"),
    "metadata nested too deep": Case(
        evaluate_with_metadata("[" * 100_000 + "]" * 100_000), "is not usable JSON: RecursionError"
    ),
}
