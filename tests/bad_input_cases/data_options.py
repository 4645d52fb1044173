"""Image folder options (size, channels, normalization, resizing, class folders) and data.limit."""

from __future__ import annotations

import json
import shutil
import urllib.parse
from pathlib import Path

from bad_input_cases import REPO, Case, digits_config

SHIPPED = REPO / "data" / "checkpoints" / "fashion_mnist_resnet20.pt"
FASHION_CLASSES = json.loads(SHIPPED.with_suffix(".json").read_text())["classes"]


def _folder(root: Path, classes: list[str], size: tuple[int, int] = (28, 28), odd: str | None = None) -> Path:
    """``root/<class>/0.png`` (gray, ``size``) for each class, folder names percent-encoded; ``odd``: one more file."""
    from PIL import Image

    for name in classes:
        folder = root / urllib.parse.quote(name, safe=" ")
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("L", size, 100).save(folder / "0.png")
    if odd == "size":
        Image.new("L", (size[0] + 4, size[1]), 100).save(root / urllib.parse.quote(classes[-1], safe=" ") / "1.png")
    elif odd == "damaged":
        (root / urllib.parse.quote(classes[-1], safe=" ") / "1.png").write_bytes(b"not a png")
    return root


def _folder_run(tmp: Path, data: dict, checkpoint: Path | None = SHIPPED, *overrides: str) -> list[str]:
    """``hiercluster run`` on an image folder under ``tmp/folder`` with the shipped Fashion-MNIST model."""
    config = {
        "data": {"dataset": "imagefolder", "root": str(tmp / "folder"), **data},
        "model": {"checkpoint": str(checkpoint)},
        "hierarchy": {"embedding": "fc_weights"},  # these folders have no train/ to fit a data-based tree on
        "quant": {"schemes": ["asymmetric"], "bits": [8]},
    }
    path = tmp / "config.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    argv = ["run", str(path), "--out", str(tmp / "run"), "--quiet"]
    for text in overrides:
        argv += ["--set", text]
    return argv


def _mixed_sizes(tmp: Path) -> list[str]:
    _folder(tmp / "folder" / "val", FASHION_CLASSES, odd="size")
    return _folder_run(tmp, {"channels": 1, "image_size": 28, "resize": "none"})


def _damaged_image(tmp: Path) -> list[str]:
    _folder(tmp / "folder" / "val", FASHION_CLASSES, odd="damaged")
    return _folder_run(tmp, {})  # the checkpoint's metadata supplies 1 channel, 28x28, exact resizing


def _auto_without_train(tmp: Path) -> list[str]:
    _folder(tmp / "folder" / "val", FASHION_CLASSES)
    return _folder_run(tmp, {"mean": "auto", "std": "auto"})


def _mean_longer_than_metadata_channels(tmp: Path) -> list[str]:
    _folder(tmp / "folder" / "val", FASHION_CLASSES)
    return _folder_run(tmp, {"mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2]})


def _metadata_with_bad_std(tmp: Path) -> list[str]:
    _folder(tmp / "folder" / "val", FASHION_CLASSES)
    ckpt = tmp / "model.pt"
    shutil.copy(SHIPPED, ckpt)
    meta = json.loads(SHIPPED.with_suffix(".json").read_text())
    ckpt.with_suffix(".json").write_text(json.dumps({**meta, "mean": [0.3], "std": [0]}))
    return _folder_run(tmp, {}, ckpt)


def _control_character_class(tmp: Path) -> list[str]:
    _folder(tmp / "folder" / "val", ["a\nb", "c"])  # quoted: the folder is named a%0Ab
    return _folder_run(tmp, {})


def _set(*overrides: str):
    """The digits config with these ``--set`` overrides."""

    def make(tmp: Path) -> list[str]:
        argv = ["run", str(digits_config(tmp)), "--out", str(tmp / "run")]
        for text in overrides:
            argv += ["--set", text]
        return argv

    return make


def _folder_set(*overrides: str):
    """An image folder config (no files needed: the config itself is refused) with these overrides."""

    def make(tmp: Path) -> list[str]:
        (tmp / "folder").mkdir()
        return _folder_run(tmp, {}, SHIPPED, *overrides)

    return make


CASES: dict[str, Case] = {
    "data.channels 2": Case(_folder_set("data.channels=2"), "config key data.channels: 2 is not one of 1, 3"),
    "data.std 0": Case(_folder_set("data.mean=[0.5]", "data.std=[0]"), "config key data.std[0]: must be > 0"),
    "data.mean of 2 values": Case(_folder_set("data.mean=[0.5, 0.5]", "data.std=[0.2, 0.2]"), "data.mean has 2 values"),
    "data.mean of 3 values, data.channels 1": Case(
        _folder_set("data.channels=1", "data.mean=[0.5, 0.5, 0.5]", "data.std=[0.2, 0.2, 0.2]"),
        "data.mean has 3 values [0.5, 0.5, 0.5], but data.channels is 1",
    ),
    "data.mean of 3 values, checkpoint of 1 channel": Case(
        _mean_longer_than_metadata_channels, "data.mean has 3 values [0.5, 0.5, 0.5], but the images have 1 channel"
    ),
    "data.mean without data.std": Case(_folder_set("data.mean=[0.5]"), "data.mean is set but data.std is not"),
    "data.mean neither auto nor a list": Case(_folder_set("data.mean=automatic", "data.std=auto"), "'automatic' is not auto"),
    "data.mean auto on the evaluation split": Case(
        _folder_set("data.mean=auto", "data.std=auto", "data.eval_split=train", "calibration.split=test"),
        "data.mean is auto, computed on the training split, but data.eval_split is train",
    ),
    "data.mean auto without train/": Case(_auto_without_train, "has no train/ folder"),
    "data.image_size on digits": Case(_set("data.image_size=16"), "config key data.image_size applies to image folders only"),
    "data.resize none, mixed sizes": Case(_mixed_sizes, "1.png is 32x28 pixels, but data.resize is 'none'"),
    "damaged image in a folder": Case(_damaged_image, "cannot read image"),
    "metadata std 0": Case(_metadata_with_bad_std, "key 'std': expected 1 to 4 finite numbers, each > 0"),
    "class folder with a control character": Case(_control_character_class, "line break or control character"),
    "data.limit over the split": Case(
        _set("data.limit=5000"), "config key data.limit (--limit) is 5,000, more than the 450 images of the test split"
    ),
    "data.limit 0": Case(_set("data.limit=0"), "config key data.limit: must be > 0"),
}
