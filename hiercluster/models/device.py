"""Which device the models run on: ``runtime.device`` / ``--device`` resolved to a ``torch.device``.

Names: ``auto`` (CUDA when available, else the CPU), ``cpu``, ``cuda`` (the current CUDA
device), ``cuda:N`` and ``mps`` (experimental, only when asked for: MPS has no float64). The name is checked
in two steps: its spelling when the config is read (:func:`check_device_name`, which
needs no torch, so that a typo is refused before anything loads), and whether this
machine has that device when a command starts (:func:`resolve_device`).

Moving batches to a model's device is :mod:`quant.device`'s job (``model_device``,
``to_device``); hiercluster uses those helpers rather than its own.
"""

from __future__ import annotations

import difflib
import re
from typing import TYPE_CHECKING

from hiercluster.errors import HierclusterError, short_repr

if TYPE_CHECKING:  # torch loads only when a device is resolved: config checks stay light
    import torch

#: The device words; ``cuda:N`` (N = 0, 1, ...) is also accepted.
DEVICE_WORDS = ("auto", "cpu", "cuda", "mps")
#: The accepted names, in words, for messages.
DEVICE_NAMES = "auto, cpu, cuda, cuda:N (N = 0, 1, ...) or mps"
_CUDA_INDEX = re.compile(r"cuda:(\d{1,4})")  # more than 9,999 GPUs in one process is a typo
# The suggestion that ends every "not available" message.
_USE_CPU = "use --device cpu (config key runtime.device: cpu), or auto to take what is there"


def check_device_name(name: object, where: str = "config key runtime.device") -> str:
    """``name`` when it is a device name (:data:`DEVICE_NAMES`); else one :class:`HierclusterError`.

    Only the spelling is checked (no torch is loaded); whether the machine has the
    device is :func:`resolve_device`'s question. ``where`` names the key or flag.

    Examples
    --------
    >>> check_device_name("cuda:1")
    'cuda:1'
    >>> check_device_name("gpu")
    Traceback (most recent call last):
    ...
    hiercluster.errors.HierclusterError: config key runtime.device: 'gpu' is not a device; choose auto, cpu, cuda, cuda:N (N = 0, 1, ...) or mps (a GPU is cuda)
    """
    if isinstance(name, str) and (name in DEVICE_WORDS or _CUDA_INDEX.fullmatch(name)):
        return name
    hint = ""
    if isinstance(name, str):
        word = name.strip().lower()
        if word.startswith(("gpu", "nvidia")):
            hint = " (a GPU is cuda)"
        elif word.startswith("cuda:"):
            hint = " (cuda:N takes a GPU number: cuda:0, cuda:1, ...)"
        else:
            close = difflib.get_close_matches(word[:100], DEVICE_WORDS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise HierclusterError(f"{where}: {short_repr(name)} is not a device; choose {DEVICE_NAMES}{hint}")


def resolve_device(name: str, where: str = "config key runtime.device") -> torch.device:
    """The ``torch.device`` for a device name, checked against what this machine has.

    Parameters
    ----------
    name : str
        ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
    where : str
        The key or flag the name came from, for the error message (``--device``).

    Returns
    -------
    torch.device
        ``auto`` resolves to ``cuda`` when CUDA is available, else ``cpu``; the others to
        themselves. ``auto`` never picks ``mps``: quant's range search and BN folding use
        float64, which MPS lacks, so ``mps`` is only taken when asked for (experimental).

    Raises
    ------
    HierclusterError
        A name that is no device; ``cuda``/``cuda:N`` without CUDA, or N beyond the
        device count; ``mps`` where MPS is not available. One line, which says what to
        use instead.

    Examples
    --------
    >>> resolve_device("cpu")
    device(type='cpu')
    """
    import torch

    name = check_device_name(name, where)
    if name == "auto":
        if torch.cuda.is_available():
            return _exact_cuda(torch.device("cuda"))
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not _mps_available():
            raise HierclusterError(
                f"{where} is mps, but MPS (Apple's GPU backend) is not available here "
                f"(it needs macOS on Apple silicon and a torch built with MPS); {_USE_CPU}"
            )
        return torch.device("mps")
    if not torch.cuda.is_available():
        built = f"torch {torch.__version__}" + ("" if torch.version.cuda else ", a build without CUDA")
        raise HierclusterError(f"{where} is {name}, but CUDA is not available here ({built}; no usable GPU found); {_USE_CPU}")
    match = _CUDA_INDEX.fullmatch(name)
    if match is None:
        return _exact_cuda(torch.device("cuda"))
    index, count = int(match.group(1)), torch.cuda.device_count()
    if index >= count:
        have = "cuda:0" if count == 1 else f"cuda:0 .. cuda:{count - 1}"
        raise HierclusterError(
            f"{where} is {name}, but this machine has {count} CUDA device{'s' if count != 1 else ''} ({have}); "
            f"use one of those, or --device cpu"
        )
    return _exact_cuda(torch.device("cuda", index))


def _exact_cuda(device: torch.device) -> torch.device:
    """``device``, with TF32 turned off for matmuls and convolutions.

    TF32 keeps 10 bits of mantissa: the float model's logits would then differ from the CPU's by
    more than kernel order does, and a low-bit model's drop would measure TF32 as well as the
    quantizer. Set for the process, as torch's flags are.
    """
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return device


def _mps_available() -> bool:
    import torch

    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


__all__ = ["DEVICE_NAMES", "DEVICE_WORDS", "check_device_name", "resolve_device"]
