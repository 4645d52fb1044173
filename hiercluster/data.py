"""Datasets that work offline, with class names and standard normalization.

:func:`load_dataset` is the one entry point. Small image sets (Fashion-MNIST, MNIST,
scikit-learn's digits, CIFAR-10/100) are read whole into memory as uint8 tensors and
returned as :class:`ImageTensorDataset`, which :func:`make_loader` batches by slicing
(no per-sample Python calls). ``imagefolder`` uses torchvision's ``ImageFolder``.

Nothing is downloaded unless ``download=True`` is passed explicitly.
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from hiercluster.errors import HierclusterError, quote_path, short_repr

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
    name: str, root: str | Path | None = None, split: str = "test", download: bool = False, augment: bool = False
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

    Returns
    -------
    torch.utils.data.Dataset
        With ``classes`` (names). In-memory sets are :class:`ImageTensorDataset`.

    Raises
    ------
    HierclusterError
        Unknown name or split; data not found (the message lists the places searched and
        how to get the data); a damaged file; a split that holds no images.

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
    if name == "digits":
        dataset: Dataset = _load_digits(split)
    elif name in ("fashion_mnist", "mnist"):
        dataset = _load_idx_dataset(name, root, split, download)
    elif name in ("cifar10", "cifar100"):
        dataset = _load_cifar(name, root, split, download)
    else:
        dataset = _load_imagefolder(root, split, augment)
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


# --- ImageNet-style folders ---------------------------------------------------------


def _load_imagefolder(root: str | Path | None, split: str, augment: bool) -> Dataset:
    if root is None:
        raise HierclusterError("dataset imagefolder needs a root (data.root): a folder with one sub-folder per class")
    import torchvision
    from torchvision import transforms as T

    root = Path(root)
    subdirs = ["train"] if split == "train" else ["val", "test"]
    base = next((root / s for s in subdirs if (root / s).is_dir()), root)
    if not base.is_dir():
        raise HierclusterError(f"imagefolder root {root} is not a folder")
    mean, std = NORMALIZATION["imagefolder"]
    if augment:
        tf = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])
    else:
        tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(mean, std)])
    try:
        return torchvision.datasets.ImageFolder(str(base), transform=tf)
    except (FileNotFoundError, RuntimeError) as exc:
        raise HierclusterError(f"cannot use {base} as an image folder: {' '.join(str(exc).split())[:300]}") from None


def dataset_info(dataset: Dataset) -> dict[str, Any]:
    """Class names, channel count and image size of a dataset from :func:`load_dataset`."""
    if isinstance(dataset, ImageTensorDataset):
        return {"classes": dataset.classes, "in_channels": dataset.in_channels, "image_size": list(dataset.image_size)}
    x, _ = dataset[0]
    return {"classes": list(dataset.classes), "in_channels": int(x.shape[0]), "image_size": list(x.shape[1:])}


__all__ = [
    "DATASETS",
    "ImageTensorDataset",
    "TensorBatchLoader",
    "cifar100_coarse_groups",
    "dataset_info",
    "load_dataset",
    "make_loader",
    "read_idx",
]
