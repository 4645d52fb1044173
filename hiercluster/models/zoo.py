"""Model zoo with one way to reach every model's classifier and penultimate features.

Two families:

* CIFAR-style ResNets for 28/32 px inputs (``resnet8``, ``resnet14``, ``resnet20``,
  ``resnet32``, ``resnet44``, ``resnet56``): three stages of basic blocks with
  ``width``, ``2*width``, ``4*width`` channels and BatchNorm, as in He et al. (2016), Sec. 4.2.
* every torchvision classification model by name (``resnet18``, ``mobilenet_v2``, ...),
  built without pretrained weights (nothing is downloaded); the first convolution is
  rebuilt when ``in_channels`` is not 3.

Whatever the architecture, :func:`classifier_layer` returns the final ``nn.Linear`` and
:func:`forward_features` returns (penultimate features, logits) from one forward pass,
by hooking the input of that layer.

Checkpoints are plain ``state_dict`` files read with ``torch.load(..., weights_only=True)``;
a JSON file beside each (``model.pt`` -> ``model.json``) records how to rebuild the model.
"""

from __future__ import annotations

import difflib
import json
import pickle
import pickletools
import re
import stat
import sys
import unicodedata
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from hiercluster.errors import HierclusterError, quote_path, read_text, short_repr
from hiercluster.limits import MAX_CLASSES, MAX_WIDTH
from quant._files import file_kind, save_torch_atomic, write_text_atomic
from quant._validate import check_json

# How torch's weights-only unpickler names an object it refuses, e.g. "GLOBAL posix.system".
_FORBIDDEN_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since 1.6
# torch.save's legacy format starts with its magic number 0x1950a86a20f9469cfc6c, pickled at protocol 2.
_TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19"
# Bytes of a checkpoint read to say what it is when torch could not load it: the pickle opcodes
# that name the top-level object come first.
_HEAD_BYTES = 4096
# Modules whose classes are models: a checkpoint pickling one holds a whole model, not a state_dict.
_MODEL_MODULES = ("torch.nn.", "torchvision.models.", "hiercluster.models")

# The largest metadata JSON read: a real one is a few KB (its training history grows by a
# few numbers per epoch); anything near this is not a metadata file.
MAX_METADATA_BYTES = 16 * 1024 * 1024
# Upper bounds on the numbers that size the rebuilt model, so that a damaged metadata file
# is refused instead of allocating without bound: 100,000 classes is above ImageNet-21k's
# 21,841 (limits.MAX_CLASSES, which also bounds hierarchy.levels); 1,024 input channels is
# above hyperspectral images'; a width of 1,024 makes a small ResNet of hundreds of millions
# of parameters (the usual width is 16).
MAX_NUM_CLASSES = MAX_CLASSES
MAX_IN_CHANNELS = 1024
# The longest name a metadata file may give (arch, dataset, each class): torchvision's longest
# model name has 22 characters and ImageNet's longest class name 121; a longer one is damage,
# and would fill every message that quotes it.
MAX_NAME_CHARS = 200

# depth -> blocks per stage is (depth - 2) / 6 for the CIFAR ResNet family.
SMALL_RESNET_DEPTHS = {"resnet8": 8, "resnet14": 14, "resnet20": 20, "resnet32": 32, "resnet44": 44, "resnet56": 56}


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv-BN projection) shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for small images: stem conv, three stages (stride 1, 2, 2), global pool, ``fc``.

    Parameters
    ----------
    depth : int
        6n + 2 (8, 14, 20, ...); n basic blocks per stage.
    num_classes : int
        Size of the final linear layer.
    in_channels : int, default 3
        1 for grayscale data such as Fashion-MNIST.
    width : int, default 16
        Channels of the first stage; the later stages have 2x and 4x.

    Examples
    --------
    >>> model = CifarResNet(20, num_classes=10, in_channels=1)
    >>> model(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
    """

    def __init__(self, depth: int, num_classes: int, in_channels: int = 3, width: int = 16) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise HierclusterError(f"CIFAR ResNet depth must be 6n+2 (8, 14, 20, ...), got {depth}")
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        planes = [width, 2 * width, 4 * width]
        layers = []
        in_planes = width
        for stage, p in enumerate(planes):
            stride = 1 if stage == 0 else 2
            stage_blocks = []
            for b in range(blocks):
                stage_blocks.append(BasicBlock(in_planes, p, stride if b == 0 else 1))
                in_planes = p
            layers.append(nn.Sequential(*stage_blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def torchvision_classifiers() -> list[str]:
    """Names of torchvision's classification models (``torchvision.models.list_models``)."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def available_archs() -> list[str]:
    """Every architecture name :func:`build_model` accepts."""
    return sorted(SMALL_RESNET_DEPTHS) + torchvision_classifiers()


def build_model(
    arch: str,
    num_classes: int,
    in_channels: int = 3,
    weights: str | Path | None = None,
    width: int = 16,
) -> nn.Module:
    """Build a classifier by name, optionally loading weights from a local file.

    Parameters
    ----------
    arch : str
        A small ResNet (``resnet8``, ``resnet20``, ...) or any torchvision classification
        model (``resnet18``, ``mobilenet_v2``, ...).
    num_classes : int
        Number of output classes.
    in_channels : int, default 3
        Input channels; torchvision models get their first convolution rebuilt when not 3.
    weights : path, optional
        A ``state_dict`` file; loaded with ``weights_only=True`` and checked against the model.
    width : int, default 16
        Base width of the small ResNets (ignored for torchvision models).

    Returns
    -------
    torch.nn.Module
        The model in eval mode.

    Examples
    --------
    >>> m = build_model("resnet8", num_classes=10, in_channels=1)
    >>> classifier_layer(m)[0]
    'fc'
    """
    if num_classes < 1:
        raise HierclusterError(f"num_classes must be >= 1, got {num_classes}")
    if in_channels < 1:
        raise HierclusterError(f"in_channels must be >= 1, got {in_channels}")
    if arch in SMALL_RESNET_DEPTHS:
        model: nn.Module = CifarResNet(SMALL_RESNET_DEPTHS[arch], num_classes, in_channels, width)
    else:
        names = torchvision_classifiers()
        if arch not in names:
            # arch[:100]: difflib's cost grows with the square of the length, and no arch name is that long
            close = difflib.get_close_matches(arch[:100], available_archs(), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise HierclusterError(
                f"unknown arch {short_repr(arch)}{hint} Small ResNets: {', '.join(sorted(SMALL_RESNET_DEPTHS))}; "
                "or any torchvision classification model name."
            )
        import torchvision

        kwargs: dict[str, Any] = {"weights": None, "num_classes": num_classes}
        if arch in ("googlenet", "inception_v3"):
            kwargs["aux_logits"] = False
            kwargs["init_weights"] = True
        model = torchvision.models.get_model(arch, **kwargs)
        if in_channels != 3:
            _rebuild_first_conv(model, in_channels)
    if weights is not None:
        load_weights(model, weights)
    return model.eval()


def _rebuild_first_conv(model: nn.Module, in_channels: int) -> None:
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            new = nn.Conv2d(
                in_channels,
                module.out_channels,
                module.kernel_size,
                stride=module.stride,
                padding=module.padding,
                dilation=module.dilation,
                groups=1,
                bias=module.bias is not None,
                padding_mode=module.padding_mode,
            )
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, new)
            return
    raise HierclusterError(f"{type(model).__name__} has no Conv2d whose input channels could be set")


def classifier_layer(model: nn.Module) -> tuple[str, nn.Linear]:
    """The final linear layer: ``(qualified name, module)``.

    It is the last ``nn.Linear`` registered in the model, which is the classifier for the
    small ResNets and for torchvision's classification models.
    """
    last: tuple[str, nn.Linear] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = (name, module)
    if last is None:
        raise HierclusterError(f"{type(model).__name__} has no nn.Linear layer to use as its classifier")
    return last


def forward_features(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass returning ``(penultimate features, logits)``.

    The features are the (flattened) input of :func:`classifier_layer`, captured by a
    forward pre-hook, so any architecture works without knowing its internals.
    """
    _, fc = classifier_layer(model)
    captured: list[torch.Tensor] = []

    def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        captured.append(inputs[0])

    handle = fc.register_forward_pre_hook(hook)
    try:
        logits = model(x)
    finally:
        handle.remove()
    return torch.flatten(captured[-1], 1), logits


def metadata_path(checkpoint: str | Path) -> Path:
    """The JSON metadata file that sits beside a checkpoint (``x.pt`` -> ``x.json``)."""
    return Path(checkpoint).with_suffix(".json")


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    _check_checkpoint_file(path)
    try:
        with warnings.catch_warnings():  # torch warns (3 lines) about a pickle protocol it did not write
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged or non-torch file
        raise HierclusterError(_load_failure(path, exc)) from None
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) and v.layout == torch.strided and not v.is_meta
        for k, v in state.items()
    ):
        raise HierclusterError(
            f"checkpoint {path} does not hold a state_dict of tensors (names -> dense tensors, as "
            "torch.save(model.state_dict(), path) writes)"
        )
    return state


def _check_checkpoint_file(path: Path) -> None:
    """Refuse a checkpoint path that is missing or not a regular file (torch.load would hang on a FIFO).

    Other ``OSError`` (a symbolic link loop, a name too long) propagate: the CLI names them.
    """
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise HierclusterError(f"checkpoint not found: {quote_path(path)}") from None
    if stat.S_ISDIR(mode):
        raise HierclusterError(f"checkpoint {path} is a folder; give the .pt file inside it")
    if not stat.S_ISREG(mode):
        raise HierclusterError(f"checkpoint {path} is {file_kind(mode)}, not a file; give a .pt file")


def _load_failure(path: Path, exc: Exception) -> str:
    """One line saying why ``torch.load(path, weights_only=True)`` failed, in the tool's words.

    torch's own message for a refused object spans lines, suggests re-running with
    ``weights_only=False`` and, cut short, reads as if the tool did so. This says what
    the file holds instead: a whole pickled model, another forbidden object (named), a
    plain Python pickle (of which type), or not a torch checkpoint at all.
    """
    if isinstance(exc, OSError):
        return f"cannot read checkpoint {path}: {exc.strerror or exc}"
    try:
        with open(path, "rb") as fh:
            head = fh.read(_HEAD_BYTES)
    except OSError as err:
        return f"cannot read checkpoint {path}: {err.strerror or err}"
    text = str(exc)
    forbidden = _FORBIDDEN_GLOBAL.search(text) if "Weights only load failed" in text else None
    if forbidden:
        name = forbidden.group(1)
        if _is_module_class(name):
            return (
                f"checkpoint {path} holds a whole pickled model (GLOBAL {name}), not a state_dict; "
                "save model.state_dict() instead (torch.save(model.state_dict(), path))"
            )
        return (
            f"checkpoint {path} holds a forbidden object (GLOBAL {name}) and was not loaded; "
            "only state_dicts of tensors are read (weights_only=True)"
        )
    if not head:
        return f"{path} is not a torch checkpoint (the file is empty); expected a state_dict saved with torch.save"
    if not head.startswith(_ZIP_MAGIC) and not head.startswith(_TORCH_LEGACY_MAGIC):
        pickled = _pickled_type(head)
        if pickled is not None and _is_module_class(pickled):
            return (
                f"{path} is a plain Python pickle of a whole model ({pickled}), not a state_dict; "
                "save model.state_dict() with torch.save instead"
            )
        if pickled is not None:
            return (
                f"{path} is a plain Python pickle (of {pickled}), not a torch checkpoint; "
                "expected a state_dict saved with torch.save(model.state_dict(), path)"
            )
        return (
            f"{path} is not a torch checkpoint (not a zip or pickle file: it starts with {short_repr(head[:4])}); "
            "expected a state_dict saved with torch.save"
        )
    if "Weights only load failed" in text:
        return (
            f"checkpoint {path} holds an object that is not a tensor and was not loaded ({_weights_only_detail(text)}); "
            "only state_dicts of tensors are read (weights_only=True)"
        )
    first = " ".join(text.split())[:200] or "no detail"
    return (
        f"cannot read checkpoint {path} (damaged or truncated? copy it again): {type(exc).__name__}: {first}. "
        "Expected a state_dict saved with torch.save (loaded with weights_only=True)."
    )


def _is_module_class(name: str) -> bool:
    """Whether the pickled global ``name`` (``module.Class``) is a model class (an ``nn.Module``).

    Nothing is imported for this: the class is looked up among modules already loaded,
    and torch's, torchvision's and this package's model modules count by name.
    """
    module_name, _, cls_name = name.rpartition(".")
    cls = getattr(sys.modules.get(module_name), cls_name, None)
    if isinstance(cls, type):
        return issubclass(cls, nn.Module)
    return module_name.startswith(_MODEL_MODULES)


def _weights_only_detail(text: str) -> str:
    """The cause in torch's weights-only message ("Unsupported operand 100"), on one line."""
    _, _, cause = text.partition("WeightsUnpickler error:")
    lines = [line.strip() for line in cause.splitlines() if line.strip() and not line.startswith("Check the doc")]
    detail = lines[0] if lines else "no detail"
    return short_repr(detail, 120).strip("'\"")


# The pickle opcodes that open the top-level object, and what it is then.
_PICKLE_TYPES = {
    "EMPTY_DICT": "a dict", "DICT": "a dict", "EMPTY_LIST": "a list", "LIST": "a list",
    "EMPTY_TUPLE": "a tuple", "TUPLE": "a tuple", "TUPLE1": "a tuple", "TUPLE2": "a tuple", "TUPLE3": "a tuple",
    "EMPTY_SET": "a set", "FROZENSET": "a frozenset", "NONE": "None", "NEWTRUE": "a bool", "NEWFALSE": "a bool",
}  # fmt: skip


def _pickled_type(head: bytes) -> str | None:
    """The type of the object a pickle starting with ``head`` holds, read from its opcodes (nothing is run).

    ``"a dict"``, ``"a list"``, ``"hiercluster.models.CifarResNet"`` (a class instance), or
    ``"an object"`` when a pickle's first opcodes do not say; None when ``head`` does not
    start like a pickle (protocol 2 and later start with PROTO, 0 and 1 with a container
    or a class).
    """
    binary = head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= pickle.HIGHEST_PROTOCOL
    if not binary and head[:1] not in (b"(", b"}", b"]", b")", b"c"):
        return None
    strings: list[str] = []
    try:
        for opcode, arg, _ in pickletools.genops(head):
            name = opcode.name
            if name in ("PROTO", "FRAME", "MARK") or name.endswith(("PUT", "MEMOIZE")):
                continue
            if name in _PICKLE_TYPES:
                return _PICKLE_TYPES[name]
            if name in ("GLOBAL", "INST"):
                return short_repr(str(arg).replace(" ", "."), 80).strip("'")
            if name == "STACK_GLOBAL" and len(strings) >= 2:
                return short_repr(f"{strings[-2]}.{strings[-1]}", 80).strip("'")
            if isinstance(arg, str) and "UNICODE" in name:
                strings.append(arg)
                continue
            break
    except (ValueError, EOFError, UnicodeDecodeError):  # cut at the head's end, or no pickle after all
        pass
    return "an object" if binary else None


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a ``state_dict`` file into ``model``; a mismatch names the keys, shapes and dtypes."""
    path = Path(path)
    state = _read_state_dict(path)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ] + [  # load_state_dict would cast integer or complex values into float weights without a word
        f"{k}: file {state[k].dtype} vs model {v.dtype}"
        for k, v in expected.items()
        if k in state and v.is_floating_point() and not state[k].is_floating_point()
    ]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append("shape or type mismatch " + "; ".join(shapes[:5]) + (" ..." if len(shapes) > 5 else ""))
        if missing:
            parts.append("missing keys " + ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))
        if unexpected:
            parts.append("unexpected keys " + ", ".join(unexpected[:5]) + (" ..." if len(unexpected) > 5 else ""))
        raise HierclusterError(
            f"checkpoint {path} does not fit {type(model).__name__}: " + "; ".join(parts)
            + ". Is it for another arch, class count or input channels?"
        )
    model.load_state_dict(state)
    return model


def save_checkpoint(model: nn.Module, path: str | Path, metadata: dict[str, Any], overwrite: bool = False) -> Path:
    """Write ``model.state_dict()`` to ``path`` and ``metadata`` to the JSON file beside it.

    ``metadata`` must hold ``arch``, ``num_classes`` and ``in_channels`` (and ``width``
    for the small ResNets) so that :func:`load_checkpoint` can rebuild the model.
    Refuses to replace existing files unless ``overwrite``.
    """
    path = Path(path)
    meta_file = metadata_path(path)
    for key in ("arch", "num_classes", "in_channels"):
        if key not in metadata:
            raise HierclusterError(f"checkpoint metadata needs {key!r}")
    if not overwrite:
        for p in (path, meta_file):
            if p.exists():
                raise HierclusterError(f"{p} exists; choose another path or pass overwrite (--overwrite)")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Each file whole or not at all: with --overwrite, a full disk must not leave the old model half-replaced.
    save_torch_atomic(path, model.state_dict())
    write_text_atomic(meta_file, json.dumps(metadata, indent=2, sort_keys=True) + "\n")
    return path


def read_metadata(checkpoint: str | Path) -> dict[str, Any]:
    """The metadata JSON beside a checkpoint, checked for the keys and types that rebuild the model.

    Raises
    ------
    HierclusterError
        The file is missing, not UTF-8, larger than :data:`MAX_METADATA_BYTES`, not JSON,
        not an object, or a key has the wrong type or an out-of-range value.
    """
    meta_file = metadata_path(checkpoint)
    try:
        meta_file.lstat()  # other errors (a name too long, a path under a file) are the CLI's to name
    except FileNotFoundError:
        raise HierclusterError(
            f"no metadata file {meta_file} beside checkpoint {checkpoint} (hiercluster train writes one); "
            "without it the architecture must be given (config key model.arch)"
        ) from None
    text = read_text(meta_file, "metadata file", max_bytes=MAX_METADATA_BYTES)
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as exc:
        raise HierclusterError(f"metadata file {meta_file} is not valid JSON: {exc}") from None
    except (ValueError, RecursionError) as exc:  # an integer of over 4,300 digits; nesting deeper than the stack
        raise HierclusterError(f"metadata file {meta_file} is not usable JSON: {type(exc).__name__}") from None
    _check_metadata(meta, meta_file)
    return meta


# What read_metadata needs of a metadata file; other keys (history, versions, ...) are free.
_METADATA_SPEC: dict[str, Any] = {
    "arch": str,
    "num_classes": int,
    "in_channels": int,
    "width?": int,
    "classes?": [str],
    "dataset?": (str, None),
}
_METADATA_RANGES = {"num_classes": MAX_NUM_CLASSES, "in_channels": MAX_IN_CHANNELS, "width": MAX_WIDTH}


def _check_metadata(meta: Any, meta_file: Path) -> None:
    """Refuse metadata of the wrong shape with one line naming the file and the key."""
    check_json(meta, {}, f"metadata file {meta_file}", error=HierclusterError)  # {}: "an object"
    for key, spec in _METADATA_SPEC.items():
        name = key.rstrip("?")
        if name not in meta:
            if key.endswith("?"):
                continue
            raise HierclusterError(f"metadata file {meta_file} lacks {name!r} (hiercluster train writes it)")
        check_json(meta[name], spec, f"metadata file {meta_file}, key {name!r}", error=HierclusterError)
    for name, highest in _METADATA_RANGES.items():
        if name in meta and not 1 <= meta[name] <= highest:
            raise HierclusterError(
                f"metadata file {meta_file}, key {name!r}: expected an integer in [1, {highest:,}], got {short_repr(meta[name])}"
            )
    for name in ("arch", "dataset"):
        if isinstance(meta.get(name), str):
            _check_name(meta[name], f"metadata file {meta_file}, key {name!r}")
    for i, class_name in enumerate(meta.get("classes", ())):
        _check_name(class_name, f"metadata file {meta_file}, key 'classes'[{i}]")
    if "classes" in meta and len(meta["classes"]) != meta["num_classes"]:
        raise HierclusterError(
            f"metadata file {meta_file} is inconsistent: {len(meta['classes'])} class names but num_classes "
            f"{meta['num_classes']}"
        )


def _check_name(name: str, where: str) -> None:
    """Refuse a name over :data:`MAX_NAME_CHARS` characters or holding a line break or control character."""
    if len(name) > MAX_NAME_CHARS:
        raise HierclusterError(
            f"{where}: a name of {len(name):,} characters ({short_repr(name, 40)}); at most {MAX_NAME_CHARS} are allowed"
        )
    if any(unicodedata.category(c) in _CONTROL_CATEGORIES for c in name):
        raise HierclusterError(
            f"{where}: {short_repr(name, 60)} holds a line break or control character; names are one line of text"
        )


# Unicode categories that break a message's single line or hide text: control characters
# (\n, \r, \x1b, ...) and the line and paragraph separators.
_CONTROL_CATEGORIES = {"Cc", "Zl", "Zp"}


def check_fits_data(
    meta: dict[str, Any], checkpoint: str | Path, dataset: str, class_names: list[str], in_channels: int
) -> None:
    """Refuse to evaluate a checkpoint on data other than the kind it was trained on.

    Compares the metadata's input channels, class count, class names and dataset name
    (not for ``imagefolder``, whose name says nothing) with the evaluation data.
    """
    problems = []
    if int(meta["in_channels"]) != in_channels:
        problems.append(f"it takes {meta['in_channels']}-channel images, the data has {in_channels} channels")
    if int(meta["num_classes"]) != len(class_names):
        problems.append(f"it has {meta['num_classes']} classes, the data has {len(class_names)}")
    elif meta.get("classes") and list(meta["classes"]) != list(class_names):
        problems.append(f"its classes are {_first_names(meta['classes'])}, the data's are {_first_names(class_names)}")
    if meta.get("dataset") and dataset != "imagefolder" and meta["dataset"] != dataset:
        problems.append(f"it was trained on {short_repr(meta['dataset'], 40)}, the data is {short_repr(dataset, 40)}")
    if problems:
        raise HierclusterError(
            f"checkpoint {checkpoint} does not fit the data: " + "; ".join(problems)
            + ". Evaluate it on the dataset it was trained on, or use another checkpoint."
        )


def _first_names(names: list[str]) -> str:
    """The first class names, each quoted short (an image folder's names are the user's folder names)."""
    return ", ".join(short_repr(n, 30) for n in names[:4]) + (", ..." if len(names) > 4 else "")


def load_checkpoint(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model from a checkpoint and its metadata JSON; returns ``(model, metadata)``."""
    meta = read_metadata(path)
    model = build_model(
        meta["arch"], int(meta["num_classes"]), int(meta["in_channels"]), weights=path, width=int(meta.get("width", 16))
    )
    return model, meta


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (weights and biases, not BN running statistics)."""
    return sum(p.numel() for p in model.parameters())
