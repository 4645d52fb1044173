"""The one exception type of :mod:`quant` for a user's mistake that is not a bad setting."""

from __future__ import annotations


class QuantError(ValueError):
    """A user-facing problem with the data given to :mod:`quant`.

    Raised for a NaN or Inf in a weight (the message names the layer), an empty
    tensor, a damaged or foreign packed file, a packed file written for another
    architecture, or a :class:`quant.QuantPlan` whose bit widths the spec's scheme does
    not allow (``first_layer_bits=12`` with ``pow2``). Invalid settings (a
    :class:`quant.QuantSpec` field out of range) raise a plain :class:`ValueError` instead. Being a ``ValueError``, it is caught by
    code that already handles bad values.

    Examples
    --------
    >>> try:
    ...     raise QuantError("layer 'fc': weight contains NaN")
    ... except ValueError as err:
    ...     print(err)
    layer 'fc': weight contains NaN
    """
