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
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from hiercluster.errors import HierclusterError, read_text, short_repr
from quant._files import save_torch_atomic, write_text_atomic
from quant._validate import check_json

# How torch's weights-only unpickler names an object it refuses, e.g. "GLOBAL posix.system".
_FORBIDDEN_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since 1.6
_PICKLE_MAGIC = b"\x80"  # the legacy format: a pickle, protocol 2 or later

# The largest metadata JSON read: a real one is a few KB (its training history grows by a
# few numbers per epoch); anything near this is not a metadata file.
MAX_METADATA_BYTES = 16 * 1024 * 1024
# Upper bounds on the numbers that size the rebuilt model, so that a damaged metadata file
# is refused instead of allocating without bound: 100,000 classes is above ImageNet-21k's
# 21,841; 1,024 input channels is above hyperspectral images'; a width of 1,024 makes a
# small ResNet of hundreds of millions of parameters (the usual width is 16).
MAX_NUM_CLASSES = 100_000
MAX_IN_CHANNELS = 1024
MAX_WIDTH = 1024

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
            close = difflib.get_close_matches(arch, available_archs(), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise HierclusterError(
                f"unknown arch {arch!r}{hint} Small ResNets: {', '.join(sorted(SMALL_RESNET_DEPTHS))}; "
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
    if path.is_dir():
        raise HierclusterError(f"checkpoint {path} is a folder; give the .pt file inside it")
    if not path.is_file():
        raise HierclusterError(f"checkpoint not found: {path}")
    try:
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


def _load_failure(path: Path, exc: Exception) -> str:
    """One line saying why ``torch.load(path, weights_only=True)`` failed, in the tool's words.

    torch's own message for a refused object suggests re-running with
    ``weights_only=False``; cut short, it reads as if the tool did so. This names the
    forbidden object instead, or says that the file is not a torch checkpoint at all.
    """
    text = str(exc)
    if isinstance(exc, OSError):
        return f"cannot read checkpoint {path}: {exc.strerror or text}"
    if "Weights only load failed" in text:
        forbidden = _FORBIDDEN_GLOBAL.search(text)
        if forbidden:
            return (
                f"checkpoint {path} holds a forbidden object (GLOBAL {forbidden.group(1)}) and was not loaded; "
                "only state_dicts of tensors are read (weights_only=True)"
            )
        detail = next(
            (line.strip() for line in text.splitlines()[1:] if line.strip() and not line.startswith("Check the doc")),
            "",
        )
        return (
            f"checkpoint {path} holds an object that is not a tensor and was not loaded ({detail[:200]}); "
            "only state_dicts of tensors are read (weights_only=True)"
        )
    with open(path, "rb") as fh:
        head = fh.read(4)
    if not head:
        return f"{path} is not a torch checkpoint (the file is empty); expected a state_dict saved with torch.save"
    if not (head.startswith(_ZIP_MAGIC) or head.startswith(_PICKLE_MAGIC)):
        return (
            f"{path} is not a torch checkpoint (not a zip or pickle file: it starts with {short_repr(head)}); "
            "expected a state_dict saved with torch.save"
        )
    first = text.strip().splitlines()[0][:200] if text.strip() else "no detail"
    return (
        f"cannot read checkpoint {path} (damaged or truncated? copy it again): {type(exc).__name__}: {first}. "
        "Expected a state_dict saved with torch.save (loaded with weights_only=True)."
    )


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
    if not meta_file.is_file():
        raise HierclusterError(
            f"no metadata file {meta_file} beside checkpoint {checkpoint} (hiercluster train writes one); "
            "without it the architecture must be given (config key model.arch)"
        )
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
    if "classes" in meta and len(meta["classes"]) != meta["num_classes"]:
        raise HierclusterError(
            f"metadata file {meta_file} is inconsistent: {len(meta['classes'])} class names but num_classes "
            f"{meta['num_classes']}"
        )


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
        problems.append(f"its classes are {', '.join(meta['classes'][:4])}, ..., the data's are {', '.join(class_names[:4])}, ...")
    if meta.get("dataset") and dataset != "imagefolder" and meta["dataset"] != dataset:
        problems.append(f"it was trained on {meta['dataset']!r}, the data is {dataset!r}")
    if problems:
        raise HierclusterError(
            f"checkpoint {checkpoint} does not fit the data: " + "; ".join(problems)
            + ". Evaluate it on the dataset it was trained on, or use another checkpoint."
        )


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
