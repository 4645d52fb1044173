"""Datasets that work offline, with class names and standard normalization.

:func:`load_dataset` is the one entry point. Small image sets (Fashion-MNIST, MNIST,
scikit-learn's digits, CIFAR-10/100) are read whole into memory as uint8 tensors and
returned as :class:`ImageTensorDataset`, which :func:`make_loader` batches by slicing
(no per-sample Python calls). ``imagefolder`` is read per image as a :class:`FolderDataset`,
whose size, channels, normalization, resizing and class order are a :class:`FolderOptions`
(config keys, else the checkpoint's metadata, else ImageNet's). :func:`limit_dataset`
takes the fixed, stratified subset of ``data.limit`` from either kind.

Nothing is downloaded unless ``download=True`` is passed explicitly.
"""

from __future__ import annotations

import copy
import dataclasses
import gzip
import math
import os
import pickle
import struct
import unicodedata
import urllib.parse
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from hiercluster.errors import HierclusterError, quote_path, short_repr
from quant._validate import check_json

DATASETS = ("fashion_mnist", "mnist", "digits", "cifar10", "cifar100", "imagefolder")
SPLITS = ("train", "test")

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

# Per-channel (mean, std) of the training split, on pixels scaled to [0, 1].
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "mnist": ((0.1307,), (0.3081,)),
    "digits": ((0.3050,), (0.3780,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}

_PROJECT_DATA = Path(__file__).resolve().parent.parent / "data"

# The most IDX data read into memory. MNIST's largest file holds 47 MB and EMNIST's 550 MB;
# a header declaring more is damaged, and refusing it keeps a crafted header from
# allocating (or a gzip bomb from inflating) memory the machine does not have.
MAX_IDX_BYTES = 4 * 1024**3
# Bytes inflated per read: large enough that Python overhead is nil, small next to the data.
_IDX_CHUNK = 16 * 1024 * 1024
_GZIP_MAGIC = b"\x1f\x8b"

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_HOW_TO_GET = {
    "fashion_mnist": "as root on Debian/Ubuntu: apt-get install -y dataset-fashion-mnist "
    "(or `make data`); or copy the four IDX .gz files into data/fashion-mnist/; "
    "or pass download=True (data.download: true) on a machine with network",
    "mnist": "copy the four MNIST IDX files (.gz or raw) into data/mnist/ or a folder named by "
    "$HIERCLUSTER_DATA; or pass download=True on a machine with network",
    "cifar10": "extract cifar-10-python.tar.gz so that ROOT/cifar-10-batches-py/ exists, or pass download=True",
    "cifar100": "extract cifar-100-python.tar.gz so that ROOT/cifar-100-python/ exists, or pass download=True",
}


class ImageTensorDataset(Dataset):
    """Images held in memory as uint8 ``(N, C, H, W)`` with labels and class names.

    Items are ``(normalized float image, label)``. :meth:`batch` does the same for many
    indices at once, which :func:`make_loader` uses.

    Attributes
    ----------
    images : torch.Tensor
        uint8, ``(N, C, H, W)``.
    targets : torch.Tensor
        int64 labels, ``(N,)``.
    classes : list of str
        Class names, indexed by label.
    name : str
        Dataset name (``fashion_mnist``, ...).
    mean, std : tuple of float
        Per-channel normalization applied by :meth:`batch` (pixels scaled to [0, 1] first).
    extras : dict
        Extra label sets from the same files, e.g. CIFAR-100's ``coarse_targets`` and
        ``coarse_classes``.
    """

    def __init__(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        classes: list[str],
        mean: tuple[float, ...],
        std: tuple[float, ...],
        name: str = "",
        extras: dict[str, Any] | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError("images must be uint8 (N, C, H, W)")
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} labels")
        self.images = images
        self.targets = targets.long()
        self.classes = list(classes)
        self.name = name
        self.extras = extras or {}
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(v) for v in std)
        c = images.shape[1]
        self._mean = torch.tensor(mean, dtype=torch.float32).view(1, c, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(1, c, 1, 1)

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def in_channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.images.shape[2]), int(self.images.shape[3])

    def batch(self, index: torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalized images and labels for many indices at once."""
        x = self.images[index].float().div_(255.0)
        return (x - self._mean) / self._std, self.targets[index]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x, y = self.batch(slice(i, i + 1))
        return x[0], int(y[0])


class TensorBatchLoader:
    """Iterate an :class:`ImageTensorDataset` in batches by slicing; optionally shuffled.

    Shuffling uses its own generator seeded with ``seed + epoch`` so that a run is
    reproducible; the epoch counter advances on each full iteration.
    """

    def __init__(
        self, dataset: ImageTensorDataset, batch_size: int, shuffle: bool = False, seed: int = 0, drop_last: bool = False
    ) -> None:
        if batch_size < 1:
            raise HierclusterError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.dataset)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        self.epoch += 1
        for b in range(len(self)):
            lo, hi = b * self.batch_size, min(n, (b + 1) * self.batch_size)
            yield self.dataset.batch(order[lo:hi] if self.shuffle else slice(lo, hi))


def make_loader(
    dataset: Dataset, batch_size: int = 256, shuffle: bool = False, seed: int = 0, num_workers: int = 0, drop_last: bool = False
) -> TensorBatchLoader | DataLoader:
    """A batch iterable of ``(x, y)`` for any dataset from :func:`load_dataset`."""
    if isinstance(dataset, ImageTensorDataset):
        return TensorBatchLoader(dataset, batch_size, shuffle, seed, drop_last)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        drop_last=drop_last,
        generator=torch.Generator().manual_seed(seed),
    )


def load_dataset(
    name: str,
    root: str | Path | None = None,
    split: str = "test",
    download: bool = False,
    augment: bool = False,
    options: FolderOptions | None = None,
) -> Dataset:
    """Load a dataset split with class names and standard normalization.

    Parameters
    ----------
    name : str
        One of ``fashion_mnist``, ``mnist``, ``digits``, ``cifar10``, ``cifar100``, ``imagefolder``.
    root : path, optional
        Where the files are. Fashion-MNIST and MNIST are also searched for in
        ``$HIERCLUSTER_DATA``, ``data/<name>`` and ``/usr/share/datasets/<name>``.
        Required for ``imagefolder``.
    split : {"train", "test"}
        ``imagefolder`` maps ``test`` to ``ROOT/val`` or ``ROOT/test`` when present.
    download : bool, default False
        Let torchvision download a missing dataset (needs network).
    augment : bool, default False
        Random crops and flips per item (``imagefolder`` only; the in-memory sets are
        augmented per batch by the trainer). Evaluation always uses the fixed transform.
    options : FolderOptions, optional
        How an image folder's files become inputs (size, channels, normalization,
        resizing, class order); ``imagefolder`` only. Default: ImageNet's
        (:func:`resolve_folder_options` builds one from a config and a checkpoint's metadata).

    Returns
    -------
    torch.utils.data.Dataset
        With ``classes`` (names). In-memory sets are :class:`ImageTensorDataset`.

    Raises
    ------
    HierclusterError
        Unknown name or split; data not found (the message lists the places searched and
        how to get the data); a damaged file; a split that holds no images; for an image
        folder, ``resize: none`` with an image of another size, or ``mean``/``std`` ``auto``
        without a ``train/`` folder.

    Examples
    --------
    >>> ds = load_dataset("digits", split="test")
    >>> ds.classes[:3], ds.images.shape[1:]
    (['0', '1', '2'], torch.Size([1, 8, 8]))
    """
    if name not in DATASETS:
        import difflib

        close = difflib.get_close_matches(str(name)[:100], DATASETS, n=1)  # [:100]: difflib is quadratic
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise HierclusterError(f"unknown dataset {short_repr(name)}{hint}; known: {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise HierclusterError(f"unknown split {short_repr(split)} for dataset {name!r}; use one of {', '.join(SPLITS)}")
    if options is not None and name != "imagefolder":
        raise ValueError(f"FolderOptions apply to imagefolder only, not to {name!r}")  # a caller's bug, not the user's
    if name == "digits":
        dataset: Dataset = _load_digits(split)
    elif name in ("fashion_mnist", "mnist"):
        dataset = _load_idx_dataset(name, root, split, download)
    elif name in ("cifar10", "cifar100"):
        dataset = _load_cifar(name, root, split, download)
    else:
        dataset = _load_imagefolder(root, split, augment, options or FolderOptions())
    if len(dataset) == 0:  # every later step (training, calibration, accuracy) needs at least one image
        where = f" under {root}" if root is not None else ""
        raise HierclusterError(f"dataset {name} ({split} split){where} holds no images; re-install or re-download it")
    return dataset


# --- IDX (MNIST-format) -------------------------------------------------------------


def _candidate_dirs(name: str, root: str | Path | None) -> list[Path]:
    folder = name.replace("_", "-")
    dirs: list[Path] = []
    if root is not None:
        dirs += [Path(root), Path(root) / folder]
    env = os.environ.get("HIERCLUSTER_DATA")
    if env:
        dirs += [Path(env) / folder, Path(env)]
    dirs += [Path("data") / folder, _PROJECT_DATA / folder, Path("/usr/share/datasets") / folder]
    unique: list[Path] = []
    for d in dirs:
        if d not in unique:
            unique.append(d)
    return unique


def _places(folders: list[Path]) -> str:
    """The folders searched for a dataset, on one line (an error message is one line)."""
    return ", ".join(quote_path(d) for d in folders)


def _find_idx(directory: Path, stem: str) -> Path | None:
    tv_raw = {"fashion_mnist": "FashionMNIST", "mnist": "MNIST"}
    for base in [directory] + [directory / sub / "raw" for sub in tv_raw.values()]:
        for candidate in (base / f"{stem}.gz", base / stem):
            if candidate.is_file():
                return candidate
    return None


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (``.gz`` or raw) into a numpy array of unsigned bytes.

    The data is streamed: the header is read first, the byte count it declares is
    checked against :data:`MAX_IDX_BYTES` (and, for a raw file, against the file's size)
    before anything is allocated, and a ``.gz`` file is never inflated beyond that
    count plus one byte, so a gzip bomb costs no more memory than an honest file.

    Raises
    ------
    HierclusterError
        Naming the file, when it is not IDX, not unsigned-byte data, truncated, longer
        than its header declares, empty (a dimension of 0) or larger than the cap.
    """
    path = Path(path)
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as fh:
            shape, header_bytes = _read_idx_header(fh, path)
            size = _idx_data_bytes(path, shape)
            if path.suffix != ".gz":
                _check_raw_idx_size(path, shape, size, header_bytes)
            data = _read_idx_data(fh, path, shape, size)
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise HierclusterError(f"cannot read IDX file {path} (damaged? re-install or re-download it): {exc}") from None
    return data.reshape(shape)


def _read_idx_header(fh: BinaryIO, path: Path) -> tuple[tuple[int, ...], int]:
    """The shape in an IDX header and the header's length; the stream is left at the data."""
    magic = fh.read(4)
    if len(magic) < 4:
        raise HierclusterError(f"IDX file {path} is truncated ({len(magic)} bytes); re-install or re-download it")
    zero, dtype_code, ndim = struct.unpack(">HBB", magic)
    if zero != 0 or dtype_code != 0x08 or not 1 <= ndim <= 4:
        hint = "; it looks gzip-compressed: name it with .gz" if magic[:2] == _GZIP_MAGIC else ""
        raise HierclusterError(
            f"{path} is not an unsigned-byte IDX file (bad magic number 0x{magic.hex()}, expected 0x0000080N "
            f"with N = 1..4 dimensions){hint}"
        )
    dims = fh.read(4 * ndim)
    if len(dims) < 4 * ndim:
        raise HierclusterError(f"IDX file {path} is truncated (header incomplete); re-install or re-download it")
    return struct.unpack(f">{ndim}I", dims), 4 + 4 * ndim


def _idx_data_bytes(path: Path, shape: tuple[int, ...]) -> int:
    """The byte count ``shape`` declares, refused when empty or over :data:`MAX_IDX_BYTES`."""
    size = math.prod(shape)  # Python ints: an absurd header cannot overflow into a negative count
    if size == 0:
        raise HierclusterError(
            f"IDX file {path} is empty: its header declares shape {shape} (no images or labels); "
            "re-install or re-download it"
        )
    if size > MAX_IDX_BYTES:
        raise HierclusterError(
            f"IDX file {path} declares shape {shape}, {size:,} bytes of data, larger than the "
            f"{MAX_IDX_BYTES // 1024**3} GiB this tool reads; the header is damaged: re-install or re-download it"
        )
    return size


def _check_raw_idx_size(path: Path, shape: tuple[int, ...], size: int, header_bytes: int) -> None:
    """An uncompressed file's size must be exactly header plus data; checked before reading."""
    held = path.stat().st_size - header_bytes
    if held != size:
        raise HierclusterError(
            f"IDX file {path} is damaged: header says shape {shape} ({size:,} bytes of data), "
            f"file holds {held:,}. Re-install or re-download it."
        )


def _read_idx_data(fh: BinaryIO, path: Path, shape: tuple[int, ...], size: int) -> np.ndarray:
    """Exactly ``size`` bytes from ``fh``, then a check that nothing follows them."""
    data = np.empty(size, dtype=np.uint8)  # no page is touched until data arrives
    view = memoryview(data)
    got = 0
    while got < size:
        n = fh.readinto(view[got : got + _IDX_CHUNK])
        if not n:
            break
        got += n
    if got < size:
        raise HierclusterError(
            f"IDX file {path} is damaged: header says shape {shape} ({size:,} bytes of data), "
            f"file holds {got:,}. Re-install or re-download it."
        )
    if fh.read(1):  # one byte past the declared data: a bomb is never inflated further
        raise HierclusterError(
            f"IDX file {path} is damaged: header says shape {shape} ({size:,} bytes of data), "
            "but the file holds more. Re-install or re-download it."
        )
    return data


def _load_idx_dataset(name: str, root: str | Path | None, split: str, download: bool) -> ImageTensorDataset:
    img_stem, lbl_stem = _IDX_FILES[split]
    searched = _candidate_dirs(name, root)
    found: tuple[Path, Path] | None = None
    for d in searched:
        img, lbl = _find_idx(d, img_stem), _find_idx(d, lbl_stem)
        if img and lbl:
            found = (img, lbl)
            break
    if found is None and download:
        import torchvision

        target = Path(root) if root is not None else _PROJECT_DATA / name.replace("_", "-")
        cls = torchvision.datasets.FashionMNIST if name == "fashion_mnist" else torchvision.datasets.MNIST
        try:
            cls(str(target), train=split == "train", download=True)
        except Exception as exc:  # network errors come in many types
            raise HierclusterError(f"downloading {name} into {target} failed: {' '.join(str(exc).split())[:300]}") from None
        img, lbl = _find_idx(target, img_stem), _find_idx(target, lbl_stem)
        found = (img, lbl) if img and lbl else None
    if found is None:
        raise HierclusterError(
            f"{name} ({split} split) not found: no {img_stem}[.gz] and {lbl_stem}[.gz] in any of "
            f"{_places(searched)}; to get it: {_HOW_TO_GET[name]}"
        )
    images, labels = read_idx(found[0]), read_idx(found[1])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise HierclusterError(
            f"{found[0]} and {found[1]} do not match: images {images.shape}, labels {labels.shape}"
        )
    classes = FASHION_MNIST_CLASSES if name == "fashion_mnist" else [str(i) for i in range(10)]
    if labels.size and int(labels.max()) >= len(classes):
        raise HierclusterError(f"{found[1]} has label {int(labels.max())}, but {name} has {len(classes)} classes")
    mean, std = NORMALIZATION[name]
    return ImageTensorDataset(
        torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)), classes, mean, std, name
    )


# --- digits -----------------------------------------------------------------------


def _load_digits(split: str) -> ImageTensorDataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    # Pixel values are 0..16; scale to 0..255 so every dataset shares one uint8 path.
    images = np.clip(np.rint(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    idx = np.arange(len(images))
    train_idx, test_idx = train_test_split(idx, test_size=0.25, random_state=0, stratify=bunch.target)
    chosen = np.sort(train_idx if split == "train" else test_idx)
    mean, std = NORMALIZATION["digits"]
    return ImageTensorDataset(
        torch.from_numpy(images[chosen]).unsqueeze(1),
        torch.from_numpy(bunch.target[chosen].astype(np.int64)),
        [str(i) for i in range(10)],
        mean,
        std,
        "digits",
    )


# --- CIFAR (python pickle batches) ------------------------------------------------


def _latin1_encode(text: Any, encoding: Any = None, *rest: Any) -> bytes:
    """``_codecs.encode`` as pickle protocol 2 uses it for bytes: a str and ``'latin1'``, nothing else.

    Python 3 writes ``bytes`` at protocol 2 as ``_codecs.encode(str, 'latin1')``; this
    is the only call of that function a dataset file may make.
    """
    if rest or not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(
            f"refusing to call _codecs.encode with encoding {short_repr(encoding)} from a dataset file "
            "(only 'latin1', as pickle protocol 2 stores bytes)"
        )
    return text.encode("latin-1")


def _empty_bytes(*args: Any) -> bytes:
    """``bytes()`` as pickle protocol 2 stores ``b""``; with an argument it could allocate at will."""
    if args:
        raise pickle.UnpicklingError("refusing to call bytes with arguments from a dataset file")
    return b""


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickles CIFAR's batch files: dicts, lists, bytes and numpy arrays, nothing else.

    ``_codecs.encode`` and ``bytes`` (how protocol 2 stores bytes and empty bytes) are
    replaced by :func:`_latin1_encode` and :func:`_empty_bytes`, which refuse any other use.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        if (module, name) in (("__builtin__", "bytes"), ("builtins", "bytes")):
            return _empty_bytes
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a dataset file")


def _read_cifar_pickle(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            obj = _ArrayOnlyUnpickler(fh, encoding="bytes").load()
    except (
        OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError, KeyError, IndexError,
        MemoryError, OverflowError,
    ) as exc:  # a damaged pickle fails in any of these; MemoryError: a length field claiming exabytes
        text = str(exc).strip()
        detail = f"{type(exc).__name__}: {text.splitlines()[0][:200]}" if text else type(exc).__name__
        raise HierclusterError(f"cannot read CIFAR batch file {path} (damaged? re-download it): {detail}") from None
    if not isinstance(obj, dict):
        raise HierclusterError(f"CIFAR batch file {path} does not hold a dict")
    return {(k.decode("latin-1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _cifar_images(batches: list[dict[str, Any]], base: Path) -> np.ndarray:
    """Images ``(N, 3, 32, 32)`` from CIFAR batch dicts, each of whose ``data`` is a uint8 ``(n, 3072)`` array."""
    for b in batches:
        data = b.get("data")
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            found = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
            raise HierclusterError(
                f"CIFAR files in {base} are damaged or of another format: 'data' is not a uint8 array of rows of "
                f"3072 pixels (found {found})"
            )
    return np.concatenate([b["data"] for b in batches]).reshape(-1, 3, 32, 32)


def _cifar_labels(batches: list[dict[str, Any]], key: str, n_classes: int, base: Path) -> np.ndarray:
    """The integer labels under ``key`` in every batch, each in ``[0, n_classes)``.

    Checked item by item before numpy sees them: converting anything but a flat list of
    integers (a list of references to one big list, say) could allocate without bound.
    """
    for b in batches:
        labels = b.get(key)
        if not isinstance(labels, (list, np.ndarray)):
            raise HierclusterError(f"CIFAR files in {base} are damaged or of another format: no list of labels under {key!r}")
        for v in labels:
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise HierclusterError(
                    f"CIFAR files in {base} are damaged or of another format: {key!r} is not a list of integers "
                    f"(found {short_repr(v)})"
                )
            if not 0 <= v < n_classes:
                raise HierclusterError(
                    f"CIFAR files in {base} are damaged: {key!r} holds label {short_repr(v)}, but there are {n_classes} classes"
                )
    return np.concatenate([np.asarray(b[key], dtype=np.int64).reshape(-1) for b in batches])


def _cifar_class_names(meta: dict[str, Any], key: str, base: Path, default: list[str] | None = None) -> list[str]:
    names = meta.get(key, default)
    if not isinstance(names, (list, tuple)) or not names:
        raise HierclusterError(f"CIFAR files in {base} are damaged or of another format: no class names under {key!r}")
    try:
        return [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    except UnicodeDecodeError:
        raise HierclusterError(f"CIFAR files in {base} are damaged: a class name under {key!r} is not UTF-8") from None


def _load_cifar(name: str, root: str | Path | None, split: str, download: bool) -> ImageTensorDataset:
    folder = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
    searched = []
    if root is not None:
        searched += [Path(root) / folder, Path(root)]
    env = os.environ.get("HIERCLUSTER_DATA")
    if env:
        searched += [Path(env) / folder]
    searched += [Path("data") / folder, _PROJECT_DATA / folder]
    if name == "cifar10":
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        meta_file = "batches.meta"
    else:
        files, meta_file = [split], "meta"
    base = next((d for d in searched if all((d / f).is_file() for f in files + [meta_file])), None)
    if base is None and download:
        import torchvision

        target = Path(root) if root is not None else _PROJECT_DATA
        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        try:
            cls(str(target), train=split == "train", download=True)
        except Exception as exc:  # network errors come in many types
            raise HierclusterError(f"downloading {name} into {target} failed: {' '.join(str(exc).split())[:300]}") from None
        base = target / folder
    if base is None:
        raise HierclusterError(
            f"{name} ({split} split) not found: no {', '.join(files + [meta_file])} in any of "
            f"{_places(searched)}; to get it: {_HOW_TO_GET[name]}"
        )
    batches = [_read_cifar_pickle(base / f) for f in files]
    meta = _read_cifar_pickle(base / meta_file)
    images = _cifar_images(batches, base)
    extras: dict[str, Any] = {}
    if name == "cifar10":
        classes = _cifar_class_names(meta, "label_names", base, CIFAR10_CLASSES)
        labels = _cifar_labels(batches, "labels", len(classes), base)
    else:
        classes = _cifar_class_names(meta, "fine_label_names", base)
        labels = _cifar_labels(batches, "fine_labels", len(classes), base)
        extras["coarse_classes"] = _cifar_class_names(meta, "coarse_label_names", base)
        coarse = _cifar_labels(batches, "coarse_labels", len(extras["coarse_classes"]), base)
        extras["coarse_targets"] = torch.from_numpy(coarse)
    if len(images) != len(labels):
        raise HierclusterError(f"CIFAR files in {base} hold {len(images)} images but {len(labels)} labels")
    mean, std = NORMALIZATION[name]
    return ImageTensorDataset(torch.from_numpy(images), torch.from_numpy(labels), classes, mean, std, name, extras)


def cifar100_coarse_groups(dataset: ImageTensorDataset) -> dict[str, list[str]]:
    """CIFAR-100's 20 superclasses as ``{coarse name: [fine class names]}`` from the dataset files."""
    if "coarse_targets" not in dataset.extras:
        raise HierclusterError(f"dataset {dataset.name!r} has no coarse labels (only cifar100 does)")
    groups: dict[str, list[str]] = {name: [] for name in dataset.extras["coarse_classes"]}
    pairs = set(zip(dataset.targets.tolist(), dataset.extras["coarse_targets"].tolist()))
    for fine, coarse in sorted(pairs):
        groups[dataset.extras["coarse_classes"][coarse]].append(dataset.classes[fine])
    return groups


# --- image folders ------------------------------------------------------------------

RESIZE_MODES = ("none", "shorter_side", "exact")
# ImageNet's evaluation convention: the shorter side goes to 256 for a 224 center crop; other
# sizes keep that ratio (28 -> 32, 32 -> 37).
SHORTER_SIDE_RATIO = 256 / 224
# A one-channel folder with no other normalization: ImageNet's mean and std averaged over R, G and B.
GRAY_IMAGENET_NORMALIZATION = ((0.449,), (0.226,))
# Images read for ``mean``/``std: auto``. 10,000 images fix a channel's mean and std to about
# 1e-3, far below what changes an accuracy, in seconds for small images and about a minute
# for ImageNet's JPEGs; a larger training split is sampled (stratified, fixed).
MAX_AUTO_STATS_IMAGES = 10_000
# The seed of every fixed subset here (data.limit, the auto statistics' sample): the same images on every run.
SUBSET_SEED = 0
# Datasets whose models were trained on whole images of a fixed size (no crop): an image folder
# evaluated with such a checkpoint is resized to that size by default, not center-cropped.
WHOLE_IMAGE_DATASETS = ("fashion_mnist", "mnist", "digits", "cifar10", "cifar100")
# The largest side a checkpoint's metadata may declare (config key data.image_size has the same cap).
MAX_IMAGE_SIDE = 4096
# Unicode categories a class name may not hold (a line break or terminal escape would break messages).
_CONTROL_CATEGORIES = {"Cc", "Zl", "Zp"}


@dataclass(frozen=True)
class FolderOptions:
    """How the files of an image folder become model inputs; resolved once (:func:`resolve_folder_options`).

    Attributes
    ----------
    image_size : (int, int)
        The model's input size, ``(height, width)``.
    channels : {1, 3}
        1: grayscale (PIL's ``convert("L")``); 3: RGB.
    mean, std : tuple of float, or ``"auto"``
        Per-channel normalization of pixels scaled to [0, 1], one value per channel.
        ``"auto"``: computed on the folder's training split (``ROOT/train``) by
        :func:`folder_statistics`, never on the evaluation split.
    resize : {"shorter_side", "exact", "none"}
        ``shorter_side``: the shorter side to ``round(min(image_size) * 256 / 224)``, then a
        center crop to ``image_size`` (ImageNet's convention); ``exact``: resized to
        ``image_size`` (the aspect ratio is not kept); ``none``: every image must already
        be ``image_size`` (another size is refused, naming the file).
    classes : tuple of str, optional
        A checkpoint's class order. When the folder's class names are exactly these, label i
        is ``classes[i]``; otherwise labels follow the folders' sorted names (as
        torchvision's ``ImageFolder``). A folder's name is its class name percent-decoded
        (``T-shirt%2Ftop`` holds class ``T-shirt/top``: a folder name cannot hold ``/``).
    """

    image_size: tuple[int, int] = (224, 224)
    channels: int = 3
    mean: tuple[float, ...] | str = NORMALIZATION["imagefolder"][0]
    std: tuple[float, ...] | str = NORMALIZATION["imagefolder"][1]
    resize: str = "shorter_side"
    classes: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        # A caller's bug, not the user's: resolve_folder_options names the config key first.
        if self.channels not in (1, 3) or self.resize not in RESIZE_MODES or len(self.image_size) != 2:
            raise ValueError(f"invalid FolderOptions: {self}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value != "auto" and (not isinstance(value, tuple) or len(value) != self.channels):
                raise ValueError(f"FolderOptions.{name} must be 'auto' or {self.channels} numbers, got {short_repr(value)}")
        if self.std != "auto" and min(self.std) <= 0:
            raise ValueError(f"FolderOptions.std must be > 0, got {self.std}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, for the identity of results computed on the folder."""
        listed = {k: (v if isinstance(v, str) else list(v)) for k, v in (("mean", self.mean), ("std", self.std))}
        return {
            "image_size": list(self.image_size),
            "channels": self.channels,
            **listed,
            "resize": self.resize,
            "classes": list(self.classes) if self.classes is not None else None,
        }


def resolve_folder_options(
    dataset: str, data: Any = None, meta: dict[str, Any] | None = None, meta_file: str | Path | None = None
) -> FolderOptions | None:
    """The options of an image folder: config keys first, then a checkpoint's metadata, then ImageNet's.

    Parameters
    ----------
    dataset : str
        The config's ``data.dataset``. Other datasets than ``imagefolder`` have fixed
        images: ``None`` is returned, and any of these keys set for them is refused.
    data : hiercluster.run.config.DataConfig, optional
        Section ``data``: ``image_size``, ``channels``, ``mean``, ``std``, ``resize`` (None: unset).
    meta : dict, optional
        The metadata of the checkpoint to evaluate (:func:`hiercluster.models.read_metadata`):
        ``image_size``, ``in_channels``, ``mean``/``std`` (else the normalization of its
        ``dataset`` when that is a known one) and ``classes`` (the label order).
    meta_file : path, optional
        The metadata's file, named in messages about its values.

    Returns
    -------
    FolderOptions or None
        Unset keys: ``image_size`` 224, 3 channels, ImageNet's mean/std (one channel: their
        average), ``resize: shorter_side``, or ``exact`` for a checkpoint trained on whole
        images (:data:`WHOLE_IMAGE_DATASETS`).

    Raises
    ------
    HierclusterError
        ``data.mean``/``data.std`` with another count of values than the channels; a
        metadata ``image_size``, ``mean`` or ``std`` of the wrong shape; one of the keys
        set for a dataset other than ``imagefolder``.

    Examples
    --------
    >>> meta = {"dataset": "fashion_mnist", "in_channels": 1, "image_size": [28, 28], "classes": ["a", "b"]}
    >>> opts = resolve_folder_options("imagefolder", None, meta)
    >>> opts.image_size, opts.channels, opts.mean, opts.resize
    ((28, 28), 1, (0.286,), 'exact')
    >>> resolve_folder_options("imagefolder").resize
    'shorter_side'
    """
    if dataset != "imagefolder":
        _refuse_folder_keys(dataset, data)
        return None
    meta = meta or {}
    where = f"metadata file {meta_file}" if meta_file is not None else "the checkpoint's metadata"

    def key(name: str) -> Any:
        return getattr(data, name, None) if data is not None else None

    size = key("image_size")
    image_size = (size, size) if size is not None else _metadata_image_size(meta, where) or (224, 224)
    channels = key("channels") or (meta["in_channels"] if meta.get("in_channels") in (1, 3) else 3)
    mean, std = _resolve_normalization(key("mean"), key("std"), channels, meta, where, key("channels") is not None)
    resize = key("resize") or ("exact" if meta.get("dataset") in WHOLE_IMAGE_DATASETS else "shorter_side")
    classes = tuple(meta["classes"]) if meta.get("classes") else None
    return FolderOptions(image_size, channels, mean, std, resize, classes)


def _refuse_folder_keys(dataset: str, data: Any) -> None:
    """The image folder keys set for another dataset would be ignored: refused instead."""
    given = [k for k in ("image_size", "channels", "mean", "std", "resize") if getattr(data, k, None) is not None]
    if given:
        raise HierclusterError(
            f"config key data.{given[0]} applies to image folders only (data.dataset: imagefolder); the images of "
            f"{short_repr(dataset, 30)} have a fixed size, channels and normalization: remove the key"
        )


def _metadata_image_size(meta: dict[str, Any], where: str) -> tuple[int, int] | None:
    """``(height, width)`` from a metadata's ``image_size`` (``[h, w]`` or one number), or None when absent."""
    value = meta.get("image_size")
    if value is None:
        return None
    where = f"{where}, key 'image_size'"
    check_json(value, (int, [int]), where, error=HierclusterError)
    sides = [value, value] if isinstance(value, int) else value
    if len(sides) != 2 or not all(1 <= s <= MAX_IMAGE_SIDE for s in sides):
        raise HierclusterError(f"{where}: expected [height, width], each 1..{MAX_IMAGE_SIDE}, got {short_repr(value)}")
    return int(sides[0]), int(sides[1])


def _resolve_normalization(
    mean: Any, std: Any, channels: int, meta: dict[str, Any], where: str, channels_set: bool
) -> tuple[Any, Any]:
    """``(mean, std)``: the config's (checked against ``channels``), the metadata's, its dataset's, or ImageNet's."""
    if mean is not None or std is not None:  # the config requires both together
        source = "data.channels" if channels_set else ("the checkpoint's in_channels" if meta else "the default, RGB")
        for name, value in (("mean", mean), ("std", std)):
            if value != "auto" and len(value) != channels:
                raise HierclusterError(
                    f"config key data.{name} has {len(value)} value{'s' if len(value) != 1 else ''} "
                    f"{short_repr(list(value))}, but the images have {channels} channel{'s' if channels != 1 else ''} "
                    f"({source}): give one value per channel"
                )
        return (mean if mean == "auto" else tuple(mean)), (std if std == "auto" else tuple(std))
    if "mean" in meta or "std" in meta:
        stored = _metadata_normalization(meta, where)
        if len(stored[0]) == channels:
            return stored
    known = NORMALIZATION.get(meta.get("dataset")) if meta.get("dataset") != "imagefolder" else None
    if known is not None and len(known[0]) == channels:
        return known
    # A checkpoint of other channels than the data falls through to here; check_fits_data names that.
    return NORMALIZATION["imagefolder"] if channels == 3 else GRAY_IMAGENET_NORMALIZATION


def _metadata_normalization(meta: dict[str, Any], where: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """A metadata's ``mean`` and ``std``: equal-length lists of finite numbers, std > 0."""
    for name in ("mean", "std"):
        at = f"{where}, key {name!r}"
        if name not in meta:
            raise HierclusterError(f"{where} has 'mean' or 'std' but not both; hiercluster train writes both")
        check_json(meta[name], [float], at, error=HierclusterError)
        values = meta[name]
        if not 1 <= len(values) <= 4 or not all(math.isfinite(v) for v in values) or (name == "std" and min(values) <= 0):
            raise HierclusterError(
                f"{at}: expected 1 to 4 finite numbers{', each > 0' if name == 'std' else ''}, got {short_repr(values)}"
            )
    if len(meta["mean"]) != len(meta["std"]):
        raise HierclusterError(f"{where}: 'mean' and 'std' have different lengths ({len(meta['mean'])}, {len(meta['std'])})")
    return tuple(float(v) for v in meta["mean"]), tuple(float(v) for v in meta["std"])


class FolderDataset(Dataset):
    """An image folder, one sub-folder per class, read per item with fixed :class:`FolderOptions`.

    Items are ``(normalized float image (C, H, W), label)``.

    Attributes
    ----------
    root : Path
        The split's folder (``ROOT/val``, ...).
    samples : list of (str, int)
        Every image file and its label, in sorted order (class folder, then file name).
    targets : list of int
        The labels of ``samples``.
    classes : list of str
        Class names, indexed by label (see :class:`FolderOptions` for their order and names).
    options : FolderOptions
    mean, std : tuple of float
        The normalization applied (``"auto"`` already computed).
    """

    name = "imagefolder"

    def __init__(
        self,
        root: Path,
        samples: list[tuple[str, int]],
        classes: list[str],
        options: FolderOptions,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        augment: bool = False,
    ) -> None:
        self.root = root
        self.samples = samples
        self.targets = [label for _, label in samples]
        self.classes = classes
        self.options = options
        self.mean, self.std = mean, std
        self.extras: dict[str, Any] = {}
        self.transform = _folder_transform(options, mean, std, augment)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        return self.transform(_read_image(path, self.options)), label

    def subset(self, indices: Any) -> FolderDataset:
        """The same folder restricted to the samples at ``indices``, in that order."""
        part = copy.copy(self)
        part.samples = [self.samples[int(i)] for i in indices]
        part.targets = [label for _, label in part.samples]
        return part

    def check_sizes(self) -> None:
        """With ``resize: none``, refuse the first image whose size is not ``image_size`` (headers only)."""
        from PIL import Image

        for path, _ in self.samples:
            try:
                with Image.open(path) as img:
                    size = img.size
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                raise _unreadable(path, exc) from None
            _check_size(path, size, self.options)


def _unreadable(path: str, exc: BaseException) -> HierclusterError:
    from PIL import UnidentifiedImageError

    if isinstance(exc, UnidentifiedImageError):  # its text only repeats the path
        detail = "not an image of a format PIL reads"
    else:
        detail = " ".join(str(exc).split())[:200] or type(exc).__name__
    return HierclusterError(f"cannot read image {quote_path(path)} (damaged, or not an image?): {detail}")


def _size_fits(size: tuple[int, int], options: FolderOptions) -> bool:
    """Whether an image of ``size`` (PIL's width, height) can be used: any size is resized, except with ``none``."""
    h, w = options.image_size
    return options.resize != "none" or size == (w, h)


def _check_size(path: str, size: tuple[int, int], options: FolderOptions) -> None:
    """``size`` (PIL's width, height) must be ``options.image_size`` when nothing resizes the image."""
    h, w = options.image_size
    if not _size_fits(size, options):
        raise HierclusterError(
            f"image {quote_path(path)} is {size[0]}x{size[1]} pixels, but data.resize is 'none' and the model takes "
            f"{w}x{h} (data.image_size, or the checkpoint's metadata): resize the images, or set data.resize to "
            "exact or shorter_side"
        )


def _read_image(path: str, options: FolderOptions) -> Any:
    """The image at ``path`` as a PIL image of ``options.channels`` (``L`` or ``RGB``), its size checked."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            size = img.size
            converted = img.convert("L" if options.channels == 1 else "RGB") if _size_fits(size, options) else None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise _unreadable(path, exc) from None
    _check_size(path, size, options)
    return converted


def _folder_transform(options: FolderOptions, mean: tuple[float, ...], std: tuple[float, ...], augment: bool) -> Any:
    from torchvision import transforms as T

    h, w = options.image_size
    if augment:  # training: random crops and flips (the in-memory sets are augmented per batch instead)
        steps: list[Any] = [T.RandomResizedCrop((h, w)), T.RandomHorizontalFlip()]
    elif options.resize == "exact":
        steps = [T.Resize((h, w))]
    elif options.resize == "shorter_side":
        steps = [T.Resize(round(min(h, w) * SHORTER_SIDE_RATIO)), T.CenterCrop((h, w))]
    else:
        steps = []
    return T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])


def _is_image_file(path: str) -> bool:
    """An image by its name, and a regular file (a named pipe would block the reader)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    return path.lower().endswith(IMG_EXTENSIONS) and os.path.isfile(path)


def _class_name(folder: str) -> str:
    """A class folder's class name: the folder name percent-decoded (``T-shirt%2Ftop`` -> ``T-shirt/top``)."""
    if "%" not in folder:
        return folder
    name = urllib.parse.unquote(folder)  # an invalid UTF-8 sequence becomes U+FFFD, as in a URL
    if any(unicodedata.category(c) in _CONTROL_CATEGORIES for c in name):
        raise HierclusterError(
            f"class folder {short_repr(folder)} decodes to a name with a line break or control character; rename it"
        )
    return name


def _class_order(folders: list[str], preferred: tuple[str, ...] | None) -> tuple[list[str], dict[str, int]]:
    """Class names in label order, and each folder's label: ``preferred``'s order when the names are the same set."""
    names = [_class_name(f) for f in folders]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise HierclusterError(
            f"two class folders hold class {short_repr(repeated[0])} (a folder name is percent-decoded); rename one"
        )
    order = list(preferred) if preferred is not None and sorted(preferred) == sorted(names) else names
    label = {name: i for i, name in enumerate(order)}
    return order, {folder: label[name] for folder, name in zip(folders, names)}


def _split_folder(root: Path, split: str) -> Path:
    """``ROOT/train`` for the training split; ``ROOT/val`` or ``ROOT/test`` for the other; else ROOT itself."""
    subdirs = ["train"] if split == "train" else ["val", "test"]
    return next((root / s for s in subdirs if (root / s).is_dir()), root)


def _scan_folder(
    base: Path, options: FolderOptions, mean: tuple[float, ...], std: tuple[float, ...], augment: bool
) -> FolderDataset:
    """Every image of ``base``'s class folders; with ``resize: none`` their sizes are checked now."""
    from torchvision.datasets.folder import find_classes, make_dataset

    try:
        folders, _ = find_classes(str(base))
        classes, folder_label = _class_order(folders, options.classes)
        samples = make_dataset(str(base), folder_label, is_valid_file=_is_image_file)
    except (FileNotFoundError, RuntimeError, OSError) as exc:
        raise HierclusterError(f"cannot use {base} as an image folder: {' '.join(str(exc).split())[:300]}") from None
    dataset = FolderDataset(base, samples, classes, options, mean, std, augment)
    if options.resize == "none":
        dataset.check_sizes()  # before any work: a wrong size found mid-evaluation would waste the run
    return dataset


def _load_imagefolder(root: str | Path | None, split: str, augment: bool, options: FolderOptions) -> FolderDataset:
    if root is None:
        raise HierclusterError("dataset imagefolder needs a root (data.root): a folder with one sub-folder per class")
    root = Path(root)
    base = _split_folder(root, split)
    if not base.is_dir():
        raise HierclusterError(f"imagefolder root {root} is not a folder")
    auto = [name for name in ("mean", "std") if getattr(options, name) == "auto"]
    if auto and not (root / "train").is_dir():
        keys = " and ".join(f"data.{name}" for name in auto)
        raise HierclusterError(
            f"config key {keys} {'is' if len(auto) == 1 else 'are'} 'auto', computed on the training split, but image "
            f"folder {quote_path(root)} has no train/ folder; give data.mean and data.std as lists (one number per channel)"
        )
    placeholder = (0.0,) * options.channels, (1.0,) * options.channels
    dataset = _scan_folder(base, options, *placeholder, augment)  # checked before the statistics pass
    mean, std = _auto_normalization(root, options) if auto else (options.mean, options.std)
    dataset.mean, dataset.std = tuple(mean), tuple(std)
    dataset.transform = _folder_transform(options, dataset.mean, dataset.std, augment)
    return dataset


# (training folder, image size, channels, resize) -> (mean, std): one statistics pass per process.
_STATISTICS: dict[tuple[str, tuple[int, int], int, str], tuple[tuple[float, ...], tuple[float, ...]]] = {}


def folder_statistics(train_folder: Path, options: FolderOptions) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of a training folder's images after resizing, for ``mean``/``std: auto``.

    Reads at most :data:`MAX_AUTO_STATS_IMAGES` images (a larger folder: a stratified
    subset fixed by :data:`SUBSET_SEED`), through the evaluation transform without
    normalization, on pixels scaled to [0, 1]. Deterministic; computed once per process
    for each folder and option set. Only ``train_folder`` is read: never an evaluation split.
    """
    key = (str(train_folder.resolve()), options.image_size, options.channels, options.resize)
    if key not in _STATISTICS:
        identity = (0.0,) * options.channels, (1.0,) * options.channels  # pixels in [0, 1], not normalized
        unnormalized = dataclasses.replace(options, mean=identity[0], std=identity[1])
        raw = _scan_folder(train_folder, unnormalized, *identity, False)
        n = len(raw)
        chosen = stratified_indices(raw.targets, MAX_AUTO_STATS_IMAGES) if n > MAX_AUTO_STATS_IMAGES else np.arange(n)
        _STATISTICS[key] = _pixel_moments(raw, chosen)
    return _STATISTICS[key]


def _pixel_moments(dataset: Dataset, indices: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of every pixel of the images at ``indices`` (float64 sums)."""
    total = squares = None
    count = 0
    for i in indices:
        pixels = dataset[int(i)][0].double().flatten(1)  # (channels, pixels)
        total = pixels.sum(1) if total is None else total + pixels.sum(1)
        squares = (pixels * pixels).sum(1) if squares is None else squares + (pixels * pixels).sum(1)
        count += pixels.shape[1]
    if total is None:  # no images: _scan_folder refuses an empty folder before this
        raise ValueError("no images to compute statistics on")
    mean = total / count
    std = (squares / count - mean * mean).clamp_min(0).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


def _auto_normalization(root: Path, options: FolderOptions) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``options``' mean and std with each ``"auto"`` replaced by the training folder's statistics."""
    stats = folder_statistics(root / "train", options)
    mean = stats[0] if options.mean == "auto" else options.mean
    std = stats[1] if options.std == "auto" else options.std
    if options.std == "auto" and min(std) < 1e-6:
        channel = int(np.argmin(std))
        raise HierclusterError(
            f"config key data.std is 'auto', but every pixel of channel {channel} is the same in the training images of "
            f"{quote_path(root / 'train')} (std 0: nothing to divide by); give data.mean and data.std as lists"
        )
    return tuple(mean), tuple(std)


# --- fixed subsets (data.limit) -----------------------------------------------------------


def stratified_indices(targets: Any, n: int, seed: int = SUBSET_SEED) -> np.ndarray:
    """``n`` indices of a labelled set, per class in proportion to its count; the same on every call.

    Each class gets ``n * count / N`` rounded down, at least 1 when ``n`` is at least the
    number of classes; what is left over goes to the largest remainders (ties to the
    lower label). Which images of a class: a permutation seeded by ``seed``. Sorted.

    Examples
    --------
    >>> stratified_indices([0, 0, 0, 0, 1, 1, 1, 1, 2, 2], 5).tolist()
    [0, 2, 6, 7, 9]
    """
    targets = np.asarray(targets, dtype=np.int64)
    if not 0 <= n <= len(targets):
        raise ValueError(f"cannot take {n} of {len(targets)} items")
    labels, counts = np.unique(targets, return_counts=True)
    take = _class_quotas(counts, n)
    by_class = np.split(np.argsort(targets, kind="stable"), np.cumsum(counts)[:-1])
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(members)[:k] for members, k in zip(by_class, take)]
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def _class_quotas(counts: np.ndarray, n: int) -> np.ndarray:
    """How many of each class: proportional to ``counts``, summing to ``n``, at least 1 each when n >= classes."""
    quota = n * counts / max(int(counts.sum()), 1)
    take = np.floor(quota).astype(np.int64)
    if n >= len(counts):
        take = np.maximum(take, 1)
    while (diff := n - int(take.sum())) != 0:  # each round moves every class by at most one
        if diff > 0:
            score = np.where(take < counts, quota - take, -np.inf)
        else:
            score = np.where(take > 1, take - quota, -np.inf)
        order = np.argsort(-score, kind="stable")[: abs(diff)]
        order = order[np.isfinite(score[order])]
        take[order] += 1 if diff > 0 else -1
    return take


def subset(dataset: Dataset, indices: Any) -> Dataset:
    """The images of ``dataset`` at ``indices`` (in that order), as the same kind of dataset."""
    if isinstance(dataset, FolderDataset):
        return dataset.subset(indices)
    if isinstance(dataset, ImageTensorDataset):
        index = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        extras = {
            k: (v[index] if isinstance(v, torch.Tensor) and len(v) == len(dataset) else v) for k, v in dataset.extras.items()
        }
        return ImageTensorDataset(
            dataset.images[index], dataset.targets[index], dataset.classes, dataset.mean, dataset.std, dataset.name, extras
        )
    raise TypeError(f"cannot take a subset of a {type(dataset).__name__}")


def has_split(dataset: str, root: str | Path | None, split: str) -> bool:
    """Whether ``split`` exists as its own data (an image folder without ``train/`` has no training split)."""
    if dataset != "imagefolder" or root is None:
        return True  # the other datasets always come in both splits (a missing file is load_dataset's error)
    subdirs = ["train"] if split == "train" else ["val", "test"]
    return any((Path(root) / s).is_dir() for s in subdirs)


def limit_dataset(dataset: Dataset, limit: int, where: str) -> Dataset:
    """A fixed, stratified subset of ``limit`` images of ``dataset`` (config key ``data.limit``).

    ``where`` names the split in the message when ``limit`` is larger (``"the test split of digits"``).

    Examples
    --------
    >>> small = limit_dataset(load_dataset("digits", split="test"), 50, "the test split of digits")
    >>> len(small), sorted(set(small.targets.tolist())) == list(range(10))
    (50, True)
    """
    n = len(dataset)
    if limit > n:
        raise HierclusterError(
            f"config key data.limit (--limit) is {limit:,}, more than the {n:,} images of {where}; "
            f"use at most {n:,}, or leave it out to evaluate them all"
        )
    return subset(dataset, stratified_indices(dataset.targets, limit))


def dataset_info(dataset: Dataset) -> dict[str, Any]:
    """Class names, channel count, image size and normalization of a dataset from :func:`load_dataset`."""
    if isinstance(dataset, ImageTensorDataset):
        return {
            "classes": dataset.classes,
            "in_channels": dataset.in_channels,
            "image_size": list(dataset.image_size),
            "mean": list(dataset.mean),
            "std": list(dataset.std),
        }
    if isinstance(dataset, FolderDataset):
        o = dataset.options
        return {
            "classes": list(dataset.classes),
            "in_channels": o.channels,
            "image_size": list(o.image_size),
            "mean": list(dataset.mean),
            "std": list(dataset.std),
        }
    x, _ = dataset[0]
    return {"classes": list(dataset.classes), "in_channels": int(x.shape[0]), "image_size": list(x.shape[1:])}


__all__ = [
    "has_split",
    "DATASETS",
    "FolderDataset",
    "FolderOptions",
    "ImageTensorDataset",
    "TensorBatchLoader",
    "cifar100_coarse_groups",
    "dataset_info",
    "folder_statistics",
    "limit_dataset",
    "load_dataset",
    "make_loader",
    "read_idx",
    "resolve_folder_options",
    "stratified_indices",
    "subset",
]
