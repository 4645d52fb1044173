"""Result rows as the report shows them: grid dimensions, spec labels, number formats.

Shared by the tables (:mod:`hiercluster.report.markdown`), the figures
(:mod:`hiercluster.report.figures`) and the claims (:mod:`hiercluster.report.claims`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hiercluster.run.store import row_method

# The grid dimensions of a result row as (row column, label), in the order of a spec's tag.
# Headings and tables are built from this list: a dimension is named wherever the run's rows
# hold more than one value of it, so a new grid option needs only a line here.
DIMS: tuple[tuple[str, str], ...] = (
    ("scheme", "scheme"),
    ("bits", "bits"),
    ("clipping", "clipping"),
    ("granularity", "granularity"),
    ("plan", "plan"),
    ("method", "method"),
    ("activation_bits", "activations"),
)
# A float model this close to chance (pp) or below has nothing for quantization to lose:
# its drops and fewest bits are noise, so the report and the terminal warn.
CHANCE_MARGIN_PP = 2.0
# Superclass names are cut here in the headline, so that a row stays one readable line.
MAX_GROUPS_CHARS = 90
# Tags listed by name when a table leaves specs out; more are counted (the CSV has them all).
MAX_LISTED_TAGS = 3
# The shape of run.json's optional evaluation subset (``data.limit``); older runs lack it.
DATA_LIMIT_SPEC = {"limit": int, "of": int}


def fmt_number(value: float, digits: int = 2, signed: bool = False) -> str:
    """``value`` with ``digits`` decimals; what rounds to zero prints as zero without a sign.

    The one number format of the report, so that no table shows ``-0.00``.

    Examples
    --------
    >>> fmt_number(-0.001), fmt_number(-0.001, signed=True), fmt_number(0.37, signed=True), fmt_number(-1.25, 1)
    ('0.00', '0.00', '+0.37', '-1.2')
    """
    text = f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"
    return f"{0:.{digits}f}" if float(text) == 0 else text  # "-0.00", "+0.00": zero after rounding


def fewest_bits_cell(bits: float, lowest: float | None) -> str:
    """The headline's answer: ``"4"``, ``"1.997"`` (an average), or ``"≤ 3 (lowest tested)"`` when
    no narrower width was tried.

    Examples
    --------
    >>> fewest_bits_cell(4, 3), fewest_bits_cell(3, 3), fewest_bits_cell(1.99712, 1.0)
    ('4', '≤ 3 (lowest tested)', '1.997')
    """
    text = f"{float(bits):.4g}"
    return f"≤ {text} (lowest tested)" if bits == lowest else text


def interval_cell(value: float, lo: float | None, hi: float | None, digits: int = 2) -> str:
    """``"+0.88 [+0.53, +1.20]"``: a figure in pp and its 95% interval, or the figure alone without one.

    Examples
    --------
    >>> interval_cell(0.88, 0.53, 1.2), interval_cell(0.88, None, None)
    ('+0.88 [+0.53, +1.20]', '+0.88')
    """
    head = fmt_number(value, digits, signed=True)
    if lo is None or hi is None:
        return head
    return f"{head} [{fmt_number(lo, digits, signed=True)}, {fmt_number(hi, digits, signed=True)}]"


def p_cell(p: float | None) -> str:
    """The rank p with three decimals, ``-`` when absent.

    Examples
    --------
    >>> p_cell(1 / 101), p_cell(None)
    ('0.010', '-')
    """
    return "-" if p is None else f"{p:.3f}"


def dim_value(row: dict[str, Any], column: str) -> str:
    """The value of the grid dimension ``column`` in a result row, as tables show it.

    ``method`` includes BN re-estimation (``"gptq+bn"``); ``activation_bits`` reads
    ``"a4"``, or ``"float"`` when the activations were not quantized.
    """
    if column == "method":
        return row_method(row)
    value = row.get(column)
    if column == "activation_bits":
        return "float" if value is None else f"a{value}"
    return "-" if value is None else str(value)


def dim_values(rows: Sequence[dict[str, Any]], column: str) -> list[str]:
    """The distinct values of dimension ``column`` in ``rows``, in order of first appearance."""
    return list(dict.fromkeys(dim_value(r, column) for r in rows))


def varying_dims(rows: Sequence[dict[str, Any]], skip: Sequence[str] = ()) -> list[tuple[str, str]]:
    """The dimensions of :data:`DIMS` (except ``skip``) that take more than one value in ``rows``."""
    return [(c, label) for c, label in DIMS if c not in skip and len(dim_values(rows, c)) > 1]


def dims_label(row: dict[str, Any], dims: Sequence[tuple[str, str]]) -> str:
    """``"granularity per_tensor, clipping mse"``: the row's values of ``dims``."""
    return ", ".join(f"{label} {dim_value(row, c)}" for c, label in dims)


def subset_note(shown: Sequence[dict[str, Any]], hidden: Sequence[dict[str, Any]], why: str) -> str:
    """One sentence saying which specs a table leaves out and where they are; ``""`` when none.

    The left-out specs are described by the dimension values the shown ones lack (``"plan
    first8"``), else listed by tag.

    Examples
    --------
    >>> shown = [{"spec_key": "a", "tag": "t4", "plan": "full", "bits": 4}]
    >>> hidden = [{"spec_key": "b", "tag": "t2f", "plan": "first8", "bits": 2}]
    >>> subset_note(shown, hidden, "mixed precision")
    'Not shown: 1 spec with mixed precision (plan first8); results.csv has every spec.'
    """
    keys = list(dict.fromkeys(r["spec_key"] for r in hidden))
    if not keys:
        return ""
    parts = []
    for column, label in DIMS:
        present = set(dim_values(shown, column))
        extra = [v for v in dim_values(hidden, column) if v not in present]
        if extra and column != "bits":
            parts.append(f"{label} {', '.join(extra)}")
    if not parts:
        tags = list(dict.fromkeys(r["tag"] for r in hidden))
        parts = [", ".join(f"`{t}`" for t in tags[:MAX_LISTED_TAGS]) + (f" and {len(tags) - MAX_LISTED_TAGS} more"
                                                                          if len(tags) > MAX_LISTED_TAGS else "")]
    n = len(keys)
    return f"Not shown: {n} spec{'s' if n > 1 else ''} with {why} ({'; '.join(parts)}); results.csv has every spec."


def uniform_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of specs with every weight at the nominal bit width (no partial plan), else all rows.

    Uniform means the average bits per weight equal the spec's bits: a plan that keeps
    layers float or at other widths, or adds residual terms, changes the average. The
    rows keep every method; a table or plot of them groups by :func:`row_method`.
    """
    uniform = [r for r in rows if abs(r["avg_bits"] - r["bits"]) < 1e-9]
    return uniform or list(rows)


def rtn_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of plain round-to-nearest specs (no calibration), else all rows.

    The analyses that show one spec per scheme (bias, weight quartiles) describe the
    data-free quantizer when the run has it, rather than mixing in calibrated methods.
    """
    plain = [r for r in rows if row_method(r) == "rtn"]
    return plain or list(rows)


def bias_choice(rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The spec shown in the bias analysis: the lowest bit width, first scheme, uniform precision.

    Round-to-nearest specs are preferred when the run has them (the bias of the
    data-free quantizer is what the analysis is about); else any method.
    """
    candidates = uniform_rows(rtn_rows(rows))
    if not candidates:
        return None
    low = min(r["bits"] for r in candidates)
    return next(r for r in candidates if r["bits"] == low)
