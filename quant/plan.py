"""`QuantPlan`: which layers get which bit width (partial and residual quantization)."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from quant import _validate as check
from quant.errors import QuantError
from quant.spec import BINARY_BITS, MAX_BITS, QuantSpec, bits_range, width_allowed

FLOAT_BITS = 32


@dataclass(frozen=True)
class QuantPlan:
    """Per-layer choices on top of a :class:`quant.QuantSpec`; validates itself.

    A layer's bit width is decided in this order (first rule that applies wins):

    1. ``skip``: a name matching one of these fnmatch patterns stays float.
    2. ``layer_bits``: the first pattern (in the given order) matching the name.
    3. ``first_layer_bits`` / ``last_layer_bits``: the first / last Conv or Linear
       layer in ``model.named_modules()`` order (the stem conv and the classifier in
       the usual models; the seeds' "partial quantization" keeps them wider).
    4. otherwise the spec's ``bits``.

    Width 1 means the binary grid ``{-a, +a}`` for that layer whatever the spec's
    scheme (at the spec's granularity, ``a = mean|w|``; :func:`quant.spec.spec_for_width`),
    so that mixed precision can mix 1-bit layers with wider ones.

    Residual quantization ``W ~= Q1(W) + Q2(W - Q1(W))`` is applied to the layers whose
    single-pass SQNR is below ``residual_sqnr_db`` and/or to the worst
    ``ceil(residual_fraction * n)`` of the ``n`` quantized layers by SQNR (the union if
    both are given); such layers count twice their bits.

    Parameters
    ----------
    name : str, default "default"
        Label used in reports.
    first_layer_bits, last_layer_bits : int or None
        Bit width (1..16; 1 is binary) of the first / last quantizable layer; None keeps
        the spec's. Every width must also suit the spec's scheme (1 or 2..8 for ``pow2``,
        only 1 for ``binary``): see :meth:`check`.
    skip : sequence of str
        fnmatch patterns of layer names left float (e.g. ``"fc"``, ``"layer1.*"``).
    layer_bits : mapping of str to int
        fnmatch pattern -> bit width.
    residual_sqnr_db : float or None
        SQNR threshold (dB) below which a layer gets a residual pass.
    residual_fraction : float or None
        Fraction in [0, 1] of quantized layers (the worst by SQNR) that get a residual pass.

    Examples
    --------
    >>> plan = QuantPlan(name="partial", first_layer_bits=8, skip=("fc",))
    >>> plan.bits_for("conv1", default=4, first=True, last=False)
    8
    >>> plan.bits_for("fc", default=4, first=False, last=True) is None
    True
    >>> QuantPlan.from_dict(plan.to_dict()) == plan
    True
    """

    name: str = "default"
    first_layer_bits: int | None = None
    last_layer_bits: int | None = None
    skip: tuple[str, ...] = ()
    layer_bits: tuple[tuple[str, int], ...] = field(default=())
    residual_sqnr_db: float | None = None
    residual_fraction: float | None = None

    def __post_init__(self) -> None:
        owner = "QuantPlan"
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"{owner}.name={self.name!r} is invalid; allowed: a non-empty string")
        for key in ("first_layer_bits", "last_layer_bits"):
            value = getattr(self, key)
            if value is not None:
                check.int_in(owner, key, value, BINARY_BITS, MAX_BITS)
        if isinstance(self.skip, str) or not isinstance(self.skip, Sequence) or not all(isinstance(p, str) for p in self.skip):
            raise ValueError(f"{owner}.skip={self.skip!r} is invalid; allowed: a list of fnmatch patterns (strings)")
        object.__setattr__(self, "skip", tuple(self.skip))
        # Stored as pairs so that the dataclass stays hashable; order is significant.
        pairs = self.layer_bits.items() if isinstance(self.layer_bits, Mapping) else self.layer_bits
        try:
            pairs = tuple((p, b) for p, b in pairs)
        except (TypeError, ValueError):
            raise ValueError(
                f"{owner}.layer_bits={self.layer_bits!r} is invalid; allowed: a mapping of fnmatch pattern to bits"
            ) from None
        for pattern, bits in pairs:
            if not isinstance(pattern, str):
                raise ValueError(f"{owner}.layer_bits key {pattern!r} is invalid; allowed: a string pattern")
            check.int_in(owner, f"layer_bits[{pattern!r}]", bits, BINARY_BITS, MAX_BITS)
        object.__setattr__(self, "layer_bits", pairs)
        if self.residual_sqnr_db is not None:
            value = check.number_in(owner, "residual_sqnr_db", self.residual_sqnr_db, -math.inf, math.inf, lo_open=True, hi_open=True)
            object.__setattr__(self, "residual_sqnr_db", value)
        if self.residual_fraction is not None:
            value = check.number_in(owner, "residual_fraction", self.residual_fraction, 0.0, 1.0, lo_open=False, hi_open=False)
            object.__setattr__(self, "residual_fraction", value)

    def is_skipped(self, layer: str) -> bool:
        """Whether ``layer`` matches a ``skip`` pattern."""
        return any(fnmatch.fnmatchcase(layer, p) for p in self.skip)

    def bits_for(self, layer: str, default: int, *, first: bool, last: bool) -> int | None:
        """Bit width of ``layer`` under this plan, or None when it stays float."""
        return self.rule_for(layer, default, first=first, last=last)[0]

    def rule_for(self, layer: str, default: int, *, first: bool, last: bool) -> tuple[int | None, str]:
        """:meth:`bits_for` and the field that decided it (``"skip"``, ``"layer_bits['conv*']"``,
        ``"first_layer_bits"``, ``"last_layer_bits"``, or ``"default"`` for the spec's bits).

        Examples
        --------
        >>> QuantPlan(layer_bits={"conv*": 6}).rule_for("conv1", 4, first=True, last=False)
        (6, "layer_bits['conv*']")
        """
        if self.is_skipped(layer):
            return None, "skip"
        for pattern, bits in self.layer_bits:
            if fnmatch.fnmatchcase(layer, pattern):
                return bits, f"layer_bits[{pattern!r}]"
        if first and self.first_layer_bits is not None:
            return self.first_layer_bits, "first_layer_bits"
        if last and self.last_layer_bits is not None:
            return self.last_layer_bits, "last_layer_bits"
        return default, "default"

    def bit_widths(self) -> list[tuple[str, int]]:
        """``(field, bits)`` for every width this plan sets: first/last layer and each ``layer_bits`` entry."""
        widths = [(key, getattr(self, key)) for key in ("first_layer_bits", "last_layer_bits")]
        widths += [(f"layer_bits[{pattern!r}]", bits) for pattern, bits in self.layer_bits]
        return [(key, bits) for key, bits in widths if bits is not None]

    def check(self, spec: QuantSpec) -> None:
        """Raise :class:`quant.QuantError` if a width of this plan does not suit ``spec``'s scheme.

        Width 1 (binary) suits every scheme; the others must lie in the scheme's
        :func:`quant.spec.bits_range` (so a ``binary`` spec takes no wider layer).
        Every width the plan sets is checked (``first_layer_bits``, ``last_layer_bits`` and
        each ``layer_bits`` entry, whether or not it will match a layer), so a grid of
        plans and specs can be validated before any model is touched.
        :func:`quant.quantize_model` checks the widths its layers actually get.

        Examples
        --------
        >>> QuantPlan(name="wide", first_layer_bits=12).check(QuantSpec(scheme="asymmetric"))
        >>> QuantPlan(name="wide", first_layer_bits=12).check(QuantSpec(scheme="pow2"))
        Traceback (most recent call last):
        ...
        quant.errors.QuantError: plan 'wide': first_layer_bits=12, but scheme 'pow2' allows 2..8 bits
        """
        if not isinstance(spec, QuantSpec):
            raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
        bad = [f"{key}={bits}" for key, bits in self.bit_widths() if not width_allowed(spec.scheme, bits)]
        if bad:
            raise QuantError(f"plan {self.name!r}: {', '.join(bad)}, but {allowed_widths(spec.scheme)}")

    def unmatched_patterns(self, layers: Sequence[str]) -> list[str]:
        """Patterns of ``skip`` and ``layer_bits`` that match none of ``layers`` (likely typos)."""
        patterns = list(self.skip) + [p for p, _ in self.layer_bits]
        return [p for p in patterns if not any(fnmatch.fnmatchcase(name, p) for name in layers)]

    def residual_layers(self, sqnr_db: Mapping[str, float]) -> set[str]:
        """Names that get a residual pass, given each quantized layer's single-pass SQNR.

        Ties in SQNR are broken by the order of ``sqnr_db`` so the choice is deterministic.
        """
        chosen: set[str] = set()
        if self.residual_sqnr_db is not None:
            chosen |= {name for name, db in sqnr_db.items() if db < self.residual_sqnr_db}
        if self.residual_fraction:
            count = math.ceil(self.residual_fraction * len(sqnr_db) - 1e-9)
            order = sorted(sqnr_db, key=lambda name: sqnr_db[name])  # stable sort keeps layer order on ties
            chosen |= set(order[:count])
        return chosen

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (``layer_bits`` as a mapping, ``skip`` as a list)."""
        return {
            "name": self.name,
            "first_layer_bits": self.first_layer_bits,
            "last_layer_bits": self.last_layer_bits,
            "skip": list(self.skip),
            "layer_bits": dict(self.layer_bits),
            "residual_sqnr_db": self.residual_sqnr_db,
            "residual_fraction": self.residual_fraction,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuantPlan:
        """Build from a dict such as :meth:`to_dict` returns; unknown keys raise ValueError."""
        check.known_keys("QuantPlan", data, [f.name for f in fields(cls)])
        return cls(**dict(data))


def allowed_widths(scheme: str) -> str:
    """The end of a message about a plan width ``scheme`` does not allow: which ones it does.

    Examples
    --------
    >>> allowed_widths("pow2")
    "scheme 'pow2' allows 2..8 bits"
    >>> allowed_widths("binary")
    "scheme 'binary' allows 1 bit only (give the wider layers a spec of another scheme and the binary ones width 1)"
    """
    lowest, highest = bits_range(scheme)
    if scheme == "binary":
        return f"scheme {scheme!r} allows 1 bit only (give the wider layers a spec of another scheme and the binary ones width 1)"
    return f"scheme {scheme!r} allows {lowest}..{highest} bits"
