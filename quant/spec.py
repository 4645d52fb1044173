"""`QuantSpec`: how one tensor is quantized (scheme, bits, granularity, clipping)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from quant import _validate as check

SCHEMES = ("asymmetric", "symmetric", "pow2")
GRANULARITIES = ("per_tensor", "per_channel")
CLIPPINGS = ("minmax", "mse", "percentile", "coherent")
MIN_BITS, MAX_BITS = 2, 16
DEFAULT_PERCENTILE = 99.99
POW2_MAX_BITS = 8  # exponents 2^0..2^-126 already span float32's normal range


def bits_range(scheme: str) -> tuple[int, int]:
    """``(lowest, highest)`` code width that ``scheme`` allows: 2..16, and 2..8 for ``pow2``.

    Examples
    --------
    >>> bits_range("pow2"), bits_range("asymmetric")
    ((2, 8), (2, 16))
    """
    check.one_of("QuantSpec", "scheme", scheme, SCHEMES)
    return MIN_BITS, POW2_MAX_BITS if scheme == "pow2" else MAX_BITS


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize a tensor; validates itself on construction.

    Parameters
    ----------
    scheme : {"asymmetric", "symmetric", "pow2"}, default "asymmetric"
        ``asymmetric``: uniform grid with an integer zero point; ``symmetric``: uniform
        grid centred on 0; ``pow2``: levels ``{0} U {+-a*2^-j}`` (see DESIGN.md).
    bits : int, default 8
        Code width, 2..16 (2..8 for ``pow2``: 8 bits already reach ``a*2^-126``).
    granularity : {"per_tensor", "per_channel"}, default "per_channel"
        One scale for the whole tensor, or one per slice along axis 0 (output channels).
    clipping : {"minmax", "mse", "percentile", "coherent"}, default "minmax"
        How the range is chosen: the full min/max, the shrink ratio minimizing the
        squared error, the ``percentile`` of the values, or ``coherent``: the scale and
        integer zero point whose rounding error is least coherent (mean and gain
        errors weighted up; data-free, HQQ-like; see :mod:`quant.coherent_grid`).
    narrow_range : bool, default True
        Symmetric only: codes ``[-(2^(b-1)-1), 2^(b-1)-1]``; False adds the code ``-2^(b-1)``.
    pow2_scale : bool, default False
        Pow2 only: round the largest level ``a`` up to a power of two.
    percentile : float, default 99.99
        For ``clipping="percentile"``: the percentile of the values (of ``|x|`` for the
        symmetric schemes) used as the range end, in (0, 100].

    Options that do not apply to the chosen scheme or clipping are validated, then
    stored at their defaults: specs that quantize alike are equal and share a tag.

    Raises
    ------
    ValueError
        Naming the field, the value and what is allowed.

    Examples
    --------
    >>> spec = QuantSpec(bits=4, clipping="mse")
    >>> spec.tag
    'asymmetric-4b-mse-per_channel'
    >>> QuantSpec.from_dict(spec.to_dict()) == spec
    True
    >>> QuantSpec(bits=1)
    Traceback (most recent call last):
    ...
    ValueError: QuantSpec.bits=1 is invalid; allowed: an integer in [2, 16]
    """

    scheme: str = "asymmetric"
    bits: int = 8
    granularity: str = "per_channel"
    clipping: str = "minmax"
    narrow_range: bool = True
    pow2_scale: bool = False
    percentile: float = DEFAULT_PERCENTILE

    def __post_init__(self) -> None:
        owner = "QuantSpec"
        check.one_of(owner, "scheme", self.scheme, SCHEMES)
        check.int_in(owner, "bits", self.bits, MIN_BITS, MAX_BITS)
        check.one_of(owner, "granularity", self.granularity, GRANULARITIES)
        check.one_of(owner, "clipping", self.clipping, CLIPPINGS)
        check.boolean(owner, "narrow_range", self.narrow_range)
        check.boolean(owner, "pow2_scale", self.pow2_scale)
        # Normalize to float so that 99 and 99.0 give equal specs and equal tags.
        object.__setattr__(
            self, "percentile", check.number_in(owner, "percentile", self.percentile, 0.0, 100.0, lo_open=True, hi_open=False)
        )
        lowest, highest = bits_range(self.scheme)
        if not lowest <= self.bits <= highest:
            # pow2: 8 bits already reach a*2^-126; wider codes would only add levels that underflow to 0.
            raise ValueError(
                f"QuantSpec.bits={self.bits} is invalid for scheme={self.scheme!r}; allowed: an integer in [{lowest}, {highest}]"
            )
        # Options that do not apply are stored at their defaults, so that specs behaving
        # alike compare equal and share a tag (a config may set them for a whole grid).
        if self.scheme != "symmetric":
            object.__setattr__(self, "narrow_range", True)
        if self.scheme != "pow2":
            object.__setattr__(self, "pow2_scale", False)
        if self.clipping != "percentile":
            object.__setattr__(self, "percentile", DEFAULT_PERCENTILE)

    @property
    def tag(self) -> str:
        """Short stable label, e.g. ``"symmetric-4b-mse-per_tensor"``; non-default options add a suffix."""
        parts = [self.scheme, f"{self.bits}b", self.clipping, self.granularity]
        if not self.narrow_range:
            parts.append("fullrange")
        if self.pow2_scale:
            parts.append("pow2scale")
        if self.clipping == "percentile":
            parts.append(f"p{self.percentile:g}")
        return "-".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field (JSON/YAML friendly)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuantSpec:
        """Build from a dict such as :meth:`to_dict` returns; missing keys take defaults.

        Raises
        ------
        ValueError
            For an unknown key (naming it and listing the valid ones) or an invalid value.
        """
        check.known_keys("QuantSpec", data, [f.name for f in fields(cls)])
        return cls(**dict(data))

    def replace(self, **changes: Any) -> QuantSpec:
        """A copy with some fields changed (validated again).

        Examples
        --------
        >>> QuantSpec(bits=4).replace(bits=8).bits
        8
        """
        return QuantSpec.from_dict({**self.to_dict(), **changes})
