"""`QuantSpec`: how one tensor is quantized (scheme, bits, granularity, clipping)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from quant import _validate as check

SCHEMES = ("asymmetric", "symmetric", "pow2", "binary")
GRANULARITIES = ("per_tensor", "per_channel")
CLIPPINGS = ("minmax", "mse", "percentile", "coherent")
#: Code widths of the multi-level schemes (asymmetric, symmetric, pow2).
MIN_BITS, MAX_BITS = 2, 16
#: The one width of ``binary``; a plan may give it to a layer under any scheme.
BINARY_BITS = 1
#: Clippings a ``binary`` spec accepts: both mean the least-squares ``a = mean|x|``.
BINARY_CLIPPINGS = ("minmax", "mse")
DEFAULT_PERCENTILE = 99.99
POW2_MAX_BITS = 8  # exponents 2^0..2^-126 already span float32's normal range


def bits_range(scheme: str) -> tuple[int, int]:
    """``(lowest, highest)`` code width that ``scheme`` allows: 2..16, 2..8 for ``pow2``, 1..1 for ``binary``.

    A :class:`quant.QuantPlan` may also give width 1 to a layer under any scheme
    (:func:`width_allowed`): that layer is quantized with the binary grid.

    Examples
    --------
    >>> bits_range("pow2"), bits_range("asymmetric"), bits_range("binary")
    ((2, 8), (2, 16), (1, 1))
    """
    check.one_of("QuantSpec", "scheme", scheme, SCHEMES)
    if scheme == "binary":
        return BINARY_BITS, BINARY_BITS
    return MIN_BITS, POW2_MAX_BITS if scheme == "pow2" else MAX_BITS


def width_allowed(scheme: str, bits: int) -> bool:
    """Whether a plan may give a layer ``bits`` under a spec of ``scheme``: 1 (binary) or a width of ``bits_range``.

    Examples
    --------
    >>> width_allowed("pow2", 1), width_allowed("pow2", 8), width_allowed("pow2", 9), width_allowed("binary", 4)
    (True, True, False, False)
    """
    lowest, highest = bits_range(scheme)
    return bits == BINARY_BITS or lowest <= bits <= highest


def spec_for_width(spec: QuantSpec, bits: int) -> QuantSpec:
    """The spec of a layer that a plan gives ``bits``: ``spec`` itself, ``spec`` at ``bits``, or binary.

    Width 1 means the binary grid ``{-a, +a}`` whatever ``spec``'s scheme (mixed precision
    mixes 1-bit layers into an asymmetric spec), at ``spec``'s granularity; its ``a`` is
    the least-squares ``mean|x|`` whatever ``spec``'s clipping (a percentile or coherent
    range has no meaning for two levels, and the MSE optimum is the closed form).

    Raises
    ------
    ValueError
        If ``bits`` is not a width ``spec.scheme`` allows (:func:`width_allowed`).

    Examples
    --------
    >>> spec_for_width(QuantSpec(bits=4, clipping="mse"), 1).tag
    'binary-1b-minmax-per_channel'
    >>> spec_for_width(QuantSpec(bits=4), 8).tag
    'asymmetric-8b-minmax-per_channel'
    """
    if bits == spec.bits:
        return spec
    if bits == BINARY_BITS:
        return QuantSpec(scheme="binary", bits=BINARY_BITS, granularity=spec.granularity)
    return spec.replace(bits=bits)


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize a tensor; validates itself on construction.

    Parameters
    ----------
    scheme : {"asymmetric", "symmetric", "pow2", "binary"}, default "asymmetric"
        ``asymmetric``: uniform grid with an integer zero point; ``symmetric``: uniform
        grid centred on 0; ``pow2``: levels ``{0} U {+-a*2^-j}`` (see DESIGN.md);
        ``binary``: the two levels ``{-a, +a}`` (1 bit; code 0 is ``-a``, code 1 is
        ``+a``; ``sign(0) := +1``, so 0 maps to ``+a``).
    bits : int, default 8
        Code width, 2..16 (2..8 for ``pow2``: 8 bits already reach ``a*2^-126``); 1 for
        ``binary``, and only for it.
    granularity : {"per_tensor", "per_channel"}, default "per_channel"
        One scale for the whole tensor, or one per slice along axis 0 (output channels).
    clipping : {"minmax", "mse", "percentile", "coherent"}, default "minmax"
        How the range is chosen: the full min/max, the shrink ratio minimizing the
        squared error, the ``percentile`` of the values, or ``coherent``: the scale and
        integer zero point whose rounding error is least coherent (mean and gain
        errors weighted up; data-free, HQQ-like; see :mod:`quant.coherent_grid`).
        For ``binary``, ``minmax`` means the closed form ``a = mean|x|`` per channel (or
        per tensor), the ``a`` of least squared error for the codes ``sign(x)``; ``mse``
        finds that same ``a`` and is stored as ``minmax``; ``percentile`` and
        ``coherent`` set a range end that two levels do not have, and are refused.
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
    ValueError: QuantSpec.bits=1 needs scheme 'binary' (levels {-a, +a}); scheme='asymmetric' allows an integer in [2, 16]
    >>> QuantSpec(scheme="binary", bits=1, clipping="mse").tag
    'binary-1b-minmax-per_channel'
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
        self._check_bits()
        check.one_of(owner, "granularity", self.granularity, GRANULARITIES)
        check.one_of(owner, "clipping", self.clipping, CLIPPINGS)
        check.boolean(owner, "narrow_range", self.narrow_range)
        check.boolean(owner, "pow2_scale", self.pow2_scale)
        # Normalize to float so that 99 and 99.0 give equal specs and equal tags.
        object.__setattr__(
            self, "percentile", check.number_in(owner, "percentile", self.percentile, 0.0, 100.0, lo_open=True, hi_open=False)
        )
        if self.scheme == "binary":
            if self.clipping not in BINARY_CLIPPINGS:
                raise ValueError(
                    f"QuantSpec.clipping={self.clipping!r} is invalid for scheme='binary'; allowed: 'minmax', 'mse' "
                    "(both give the least-squares a = mean|x|; two levels have no range end to clip)"
                )
            # The MSE search over a ends at the closed form: the same grid, so the same spec and tag.
            object.__setattr__(self, "clipping", "minmax")
        # Options that do not apply are stored at their defaults, so that specs behaving
        # alike compare equal and share a tag (a config may set them for a whole grid).
        if self.scheme != "symmetric":
            object.__setattr__(self, "narrow_range", True)
        if self.scheme != "pow2":
            object.__setattr__(self, "pow2_scale", False)
        if self.clipping != "percentile":
            object.__setattr__(self, "percentile", DEFAULT_PERCENTILE)

    def _check_bits(self) -> None:
        """``bits`` against the scheme: 1 for ``binary`` only, 2..16 (2..8 for ``pow2``) otherwise."""
        owner, bits = "QuantSpec", self.bits
        is_int = isinstance(bits, int) and not isinstance(bits, bool)
        if self.scheme == "binary":
            if not (is_int and bits == BINARY_BITS):
                raise ValueError(f"QuantSpec.bits={check.short_repr(bits)} is invalid for scheme='binary'; allowed: 1")
            return
        lowest, highest = bits_range(self.scheme)
        if is_int and bits == BINARY_BITS:
            raise ValueError(
                f"QuantSpec.bits=1 needs scheme 'binary' (levels {{-a, +a}}); scheme={self.scheme!r} allows an integer "
                f"in [{lowest}, {highest}]"
            )
        check.int_in(owner, "bits", bits, MIN_BITS, MAX_BITS)
        if not lowest <= bits <= highest:
            # pow2: 8 bits already reach a*2^-126; wider codes would only add levels that underflow to 0.
            raise ValueError(
                f"QuantSpec.bits={bits} is invalid for scheme={self.scheme!r}; allowed: an integer in [{lowest}, {highest}]"
            )

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
