"""What the report checks rather than shows: the seed papers' claims, identical widths, per-layer effects.

* :func:`check_claims` and :func:`claims_section`: each claim of the seed papers with a
  verdict ("holds", "holds partly", "does not hold", "not decided") decided by a rule
  stated beside it, from the run's own figures only: ``run.json``, the result rows, the
  specs' details, the headline table and, when ``hiercluster sensitivity`` wrote one into
  the run directory, the latest layer-sensitivity CSV (:func:`latest_sensitivity`).
* :func:`identical_to_lower` and :func:`identical_note`: specs whose quantized logits are
  bit-identical to those of the same spec at fewer bits (pow2 above 4 bits, DESIGN.md).
* :func:`layer_section`: what quantization did to each layer of one spec (QuantReport rows).

Pure functions of plain rows and dicts, except the CSV reader.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hiercluster.evaluation.sensitivity import EARLY_RULE, LayerSensitivity, early_layers_verdict
from hiercluster.report.rows import bias_choice, fmt_number, interval_cell, p_cell
from hiercluster.run.rundir import SENSITIVITY_DIR
from hiercluster.run.store import row_method

HOLDS, PARTLY, NOT_HOLD, UNDECIDED = "holds", "holds partly", "does not hold", "not decided"
# The widths the first two claims are about: 8 bits "as good as float", data-free 3 bits "without loss".
FLOAT_LIKE_BITS = 8
DATA_FREE_BITS = 3
# Chance test of "grouping pushes the limit": rank p at most this (and the advantage's interval above 0).
ALPHA = 0.05
# Fall of the prediction share's normalized entropy H(p) / log(C), float -> low bits: biased ("holds")
# from the first figure, "holds partly" from the second. On 10 classes predicted equally often, a fall of
# 0.10 is one class drawing about 35% of the predictions (the others equal), 0.02 one drawing about 20%.
ENTROPY_FALL_HOLDS = 0.10
ENTROPY_FALL_PARTLY = 0.02
# Levels (or specs) named in one piece of evidence; the rest are counted.
MAX_LISTED = 4
# Layers in the per-layer table; the rest are counted (results.sqlite keeps every layer).
MAX_LAYER_ROWS = 30
# The command the last claim asks for when the run directory holds no sensitivity CSV.
SENSITIVITY_COMMAND = "hiercluster sensitivity CONFIG --bits 2"


@dataclass(frozen=True)
class SensitivityRun:
    """A layer-sensitivity CSV of a run directory: its rows, or why they could not be read."""

    path: Path
    rows: tuple[LayerSensitivity, ...] = ()
    error: str | None = None


# --- the rows the claims read --------------------------------------------------------------


def _specs(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The first row of each spec (its spec columns are the same in every level's row)."""
    first: dict[str, Mapping[str, Any]] = {}
    for r in rows:
        first.setdefault(r["spec_key"], r)
    return list(first.values())


def _uniform(r: Mapping[str, Any]) -> bool:
    """Every weight at the spec's nominal width (the full plan: no layer float, wider or residual)."""
    return abs(r["avg_bits"] - r["bits"]) < 1e-9


def data_free_specs(rows: Sequence[Mapping[str, Any]], bits: int, skip_pow2: bool = False) -> list[Mapping[str, Any]]:
    """Specs at ``bits`` rounded to nearest (no BN re-estimation), every weight at that width, activations float.

    The claims are about weights without data: a calibrated method, a mixed plan or
    quantized activations would test something else.
    """
    return [
        r for r in _specs(rows)
        if r["bits"] == bits and _uniform(r) and row_method(r) == "rtn" and r.get("activation_bits") is None
        and not (skip_pow2 and r["scheme"] == "pow2")
    ]


def fine_drop(info: Mapping[str, Any], r: Mapping[str, Any]) -> float:
    """The spec's fine-level drop in pp: float accuracy minus its fine accuracy."""
    return 100 * (info["float_accuracy"] - r["fine_acc"])


def _fine_cell(info: Mapping[str, Any], r: Mapping[str, Any]) -> str:
    """A spec's fine drop with its interval: ``"`tag` +0.88 [+0.53, +1.20] pp"``."""
    return f"`{r['tag']}` {interval_cell(fine_drop(info, r), r.get('fine_drop_lo'), r.get('fine_drop_hi'))} pp"


def _confident(r: Mapping[str, Any], tolerance: float) -> bool:
    """The fine drop's 95% interval ends within ``tolerance`` (never without an interval)."""
    return r.get("fine_drop_hi") is not None and r["fine_drop_hi"] <= tolerance


def _listed(items: Sequence[str]) -> str:
    """The first :data:`MAX_LISTED` items joined, the rest counted."""
    more = len(items) - MAX_LISTED
    return "; ".join(items[:MAX_LISTED]) + (f"; and {more} more" if more > 0 else "")


def _claim(claim: str, verdict: str, evidence: str, rule: str) -> dict[str, str]:
    return {"claim": claim, "verdict": verdict, "evidence": evidence, "rule": rule}


# --- the claims ------------------------------------------------------------------------------


def claim_8bit(info: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """"8-bit weights are as good as float", from the data-free 8-bit specs' fine drops (pow2 aside)."""
    tol = info["tolerance"]
    rule = (
        f"data-free (rtn) {FLOAT_LIKE_BITS}-bit specs, every weight at {FLOAT_LIKE_BITS} bits, float activations, "
        f"pow2 aside (at {FLOAT_LIKE_BITS} bits it only adds levels below those of its 4 bits): 'holds' if the 95% "
        f"upper end of every one's fine drop is ≤ {tol:g} pp, 'holds partly' if at least one's drop is "
        f"≤ {tol:g} pp, else 'does not hold'"
    )
    name = f"{FLOAT_LIKE_BITS}-bit weights are as good as float"
    specs = data_free_specs(rows, FLOAT_LIKE_BITS, skip_pow2=True)
    if not specs:
        return _claim(name, UNDECIDED, f"the grid has no data-free {FLOAT_LIKE_BITS}-bit spec with float activations "
                      "(pow2 aside)", rule)
    confident = [r for r in specs if _confident(r, tol)]
    within = [r for r in specs if fine_drop(info, r) <= tol]
    # The worst spec decides "every one": the largest upper end (the drop without an interval).
    worst = max(specs, key=lambda r: (r.get("fine_drop_hi") if r.get("fine_drop_hi") is not None
                                      else fine_drop(info, r)))
    evidence = (f"{len(confident)} of {len(specs)} confident within {tol:g} pp, {len(within)} with drop "
                f"≤ {tol:g} pp; worst {_fine_cell(info, worst)}")
    if len(confident) == len(specs):
        verdict = HOLDS
    else:
        verdict = PARTLY if within else NOT_HOLD
        if not any(r.get("fine_drop_hi") is not None for r in specs):
            evidence += " (no intervals: run with eval.bootstrap > 0)"
    return _claim(name, verdict, evidence, rule)


def claim_3bit(
    info: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], headline_levels: set[str]
) -> dict[str, str]:
    """"Data-free 3 bits without loss": the best data-free 3-bit spec, else a coarser learned level of one."""
    tol, n_classes = info["tolerance"], len(info["class_names"])
    rule = (
        f"data-free (rtn) {DATA_FREE_BITS}-bit specs, every weight at {DATA_FREE_BITS} bits, float activations: "
        f"'holds' if one's fine drop has its 95% upper end ≤ {tol:g} pp, 'holds partly' if one's fine drop is "
        f"≤ {tol:g} pp with the upper end above (borderline) or if only a coarser learned level is within "
        f"{tol:g} pp, else 'does not hold'"
    )
    name = f"data-free {DATA_FREE_BITS}-bit weights lose nothing"
    specs = data_free_specs(rows, DATA_FREE_BITS)
    if not specs:
        return _claim(name, UNDECIDED, f"the grid has no data-free {DATA_FREE_BITS}-bit spec with float activations",
                      rule)
    confident = [r for r in specs if _confident(r, tol)]
    if confident:
        best = min(confident, key=lambda r: r["fine_drop_hi"])
        return _claim(name, HOLDS, f"confident: {_fine_cell(info, best)}", rule)
    best = min(specs, key=lambda r: fine_drop(info, r))
    if fine_drop(info, best) <= tol:
        how = "borderline" if best.get("fine_drop_hi") is not None else "within tolerance, no interval"
        return _claim(name, PARTLY, f"{how}: {_fine_cell(info, best)}", rule)
    keys = {r["spec_key"] for r in specs}
    coarser = [
        r for r in rows
        if r["spec_key"] in keys and r["level"] in headline_levels and r.get("grouping") == "learned"
        and 1 < r["k"] < n_classes and r["drop"] <= tol
    ]
    evidence = f"best at the fine level {_fine_cell(info, best)}"
    if not coarser:
        return _claim(name, NOT_HOLD, evidence + f"; no learned level within {tol:g} pp either", rule)
    finest = min(coarser, key=lambda r: (-r["k"], r["drop"]))  # the most groups that still pass
    return _claim(
        name, PARTLY,
        evidence + f"; within {tol:g} pp from {finest['level']} on: `{finest['tag']}` "
        f"{interval_cell(finest['drop'], finest.get('drop_lo'), finest.get('drop_hi'))} pp",
        rule,
    )


def normalized_entropy(share: Sequence[float]) -> float:
    """H(p) / log(C) of a prediction share (1: every class predicted equally often, 0: one class only).

    Examples
    --------
    >>> normalized_entropy([0.25] * 4), normalized_entropy([1.0, 0.0, 0.0]), round(normalized_entropy([0.5, 0.5, 0]), 4)
    (1.0, 0.0, 0.6309)
    """
    p = np.asarray(share, dtype=np.float64)
    p = p / p.sum()
    nz = p[p > 0]
    return float((nz * np.log(1 / nz)).sum() / math.log(len(p)))  # log(1/p): no -0.0 for one class


def claim_bias(
    info: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], details: Mapping[str, Mapping[str, Any]]
) -> dict[str, str]:
    """"Biased inference at low bits": the prediction share's entropy, float vs the bias section's spec."""
    rule = (
        "normalized entropy H(p)/log(C) of the share of images predicted as each class, float model vs the spec of "
        f"the bias section (lowest width, data-free when the grid has it): 'holds' if it falls by ≥ "
        f"{ENTROPY_FALL_HOLDS:.2f}, 'holds partly' if by ≥ {ENTROPY_FALL_PARTLY:.2f}, else 'does not hold'"
    )
    name = "low-bit inference is biased (predictions collapse onto few classes)"
    chosen = bias_choice(rows)
    after = None if chosen is None else details.get(chosen["spec_key"], {}).get("prediction_share")
    names = info["class_names"]
    if after is None or len(names) < 2:
        return _claim(name, UNDECIDED, "no prediction share of a quantized spec" if after is None else "one class only",
                      rule)
    before = info["float_prediction_share"]
    h0, h1 = normalized_entropy(before), normalized_entropy(after)
    fall = h0 - h1
    verdict = HOLDS if fall >= ENTROPY_FALL_HOLDS else PARTLY if fall >= ENTROPY_FALL_PARTLY else NOT_HOLD
    top0, top1 = int(np.argmax(before)), int(np.argmax(after))
    evidence = (
        f"`{chosen['tag']}`: entropy {h0:.3f} → {h1:.3f} (fall {fmt_number(fall, 3, signed=True)}); largest class "
        f"share {100 * before[top0]:.1f}% ({names[top0]}) → {100 * after[top1]:.1f}% ({names[top1]})"
    )
    return _claim(name, verdict, evidence, rule)


def significant(winner: Mapping[str, Any] | None) -> bool:
    """The learned grouping beats chance: rank p ≤ :data:`ALPHA` and, with an interval, advantage_lo > 0.

    Examples
    --------
    >>> significant({"rank_p": 0.01, "advantage_lo": 0.1}), significant({"rank_p": 0.01, "advantage_lo": -0.1})
    (True, False)
    >>> significant({"rank_p": 0.05, "advantage_lo": None}), significant({"rank_p": None})
    (True, False)
    """
    if winner is None or winner.get("rank_p") is None or winner["rank_p"] > ALPHA:
        return False
    return winner.get("advantage_lo") is None or winner["advantage_lo"] > 0


def _advantage_item(t: Mapping[str, Any]) -> str:
    """``"k=4 at 3 bits: advantage +0.45 [+0.20, +0.70] pp, rank p 0.010"``."""
    w = t["winner"]
    return (f"{t['level']} at {w['bits']} bits: advantage "
            f"{interval_cell(w['advantage'], w.get('advantage_lo'), w.get('advantage_hi'))} pp, rank p "
            f"{p_cell(w.get('rank_p'))}")


def claim_grouping(info: Mapping[str, Any], headline_table: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """"Grouping pushes the limit": learned levels reach fewer bits than the fine level, beating chance."""
    n_classes = len(info["class_names"])
    rule = (
        f"learned levels with 2 ≤ k < C of the headline; significant = rank p ≤ {ALPHA:g} and the advantage's 95% "
        "interval above 0. When the fine level needs more than the lowest tested width: 'holds' if a learned level "
        "reaches fewer bits with a significant advantage, 'holds partly' if one reaches fewer bits without; when the "
        "fine level is already within tolerance at the lowest width (fewer bits cannot be shown): 'holds' if the "
        "advantage there is significant at half the learned levels or more, 'holds partly' at fewer; "
        f"else 'does not hold'; 'not decided' when too few random groupings let rank p reach {ALPHA:g}"
    )
    name = "grouping similar classes pushes the bit limit lower"
    fine = next((t for t in headline_table if t["k"] == n_classes), None)
    learned = [t for t in headline_table if t.get("grouping") == "learned" and 2 <= t["k"] < n_classes]
    if fine is None or not learned:
        return _claim(name, UNDECIDED, "no fine level" if fine is None else "no learned level with 2 ≤ k < C", rule)
    n_random = info.get("random_seeds")
    if n_random is not None and 1 / (n_random + 1) > ALPHA:
        return _claim(name, UNDECIDED, f"with {n_random} random groupings the rank p cannot go below "
                      f"{p_cell(1 / (n_random + 1))}: raise eval.random_seeds", rule)
    lowest, fine_bits = fine["lowest_bits"], fine["min_bits"]
    fine_text = f"fine level: {'none in grid' if fine_bits is None else f'{fine_bits} bits'}"
    if fine_bits is not None and fine_bits <= lowest:
        at_lowest = [t for t in learned if t["min_bits"] == lowest]
        sig = [t for t in at_lowest if significant(t["winner"])]
        verdict = HOLDS if sig and 2 * len(sig) >= len(learned) else PARTLY if sig else NOT_HOLD
        shown = sig or at_lowest
        evidence = (f"{fine_text}, the lowest tested; advantage significant at {len(sig)} of {len(learned)} learned "
                    f"levels" + (f": {_listed([_advantage_item(t) for t in shown])}" if shown else ""))
        return _claim(name, verdict, evidence, rule)
    fewer = [t for t in learned if t["min_bits"] is not None and (fine_bits is None or t["min_bits"] < fine_bits)]
    sig = [t for t in fewer if significant(t["winner"])]
    verdict = HOLDS if sig else PARTLY if fewer else NOT_HOLD
    shown = sig or fewer
    evidence = (f"{fine_text}; {len(fewer)} of {len(learned)} learned levels reach fewer bits, {len(sig)} of them "
                "significant" + (f": {_listed([_advantage_item(t) for t in shown])}" if shown else ""))
    return _claim(name, verdict, evidence, rule)


def claim_early_layers(sensitivity: SensitivityRun | None) -> dict[str, str]:
    """"The initial layers matter most", from the run directory's latest layer-sensitivity CSV."""
    rule = EARLY_RULE.removeprefix("rule: ")
    name = "the initial layers matter most"
    if sensitivity is None:
        return _claim(name, UNDECIDED, f"no layer sensitivity in the run directory: run `{SENSITIVITY_COMMAND}` "
                      "with this directory as --out, then `hiercluster report DIR`", rule)
    where = f"{SENSITIVITY_DIR}/{sensitivity.path.name}"
    if sensitivity.error is not None:
        return _claim(name, UNDECIDED, f"{where} unreadable ({sensitivity.error})", rule)
    v = early_layers_verdict(sensitivity.rows)
    if v["verdict"] == UNDECIDED:
        return _claim(name, UNDECIDED, f"{where}: fewer than two layers", rule)
    n_early, n = len(v["early"]), len(sensitivity.rows)
    evidence = (
        f"{where}: mean single-layer fine drop of the first {n_early} of {n} layers "
        f"{fmt_number(v['mean_early'], signed=True)} pp vs {fmt_number(v['mean_rest'], signed=True)} pp for the rest "
        f"(SE of the difference {fmt_number(v['se'])}); most sensitive: {v['most_sensitive']}"
    )
    return _claim(name, str(v["verdict"]), evidence, rule)


def check_claims(
    info: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]],
    details: Mapping[str, Mapping[str, Any]],
    headline_table: Sequence[Mapping[str, Any]],
    sensitivity: SensitivityRun | None = None,
) -> list[dict[str, str]]:
    """Every seed claim with its verdict, evidence and rule (keys ``claim verdict evidence rule``).

    Parameters
    ----------
    info : dict
        ``run.json``: ``class_names``, ``float_accuracy``, ``float_prediction_share``, ``tolerance``.
    rows : sequence of dict
        Result rows, one per spec and level (SpecResult and LevelResult columns).
    details : dict
        Spec key -> its details (``prediction_share``).
    headline_table : sequence of dict
        :func:`hiercluster.evaluation.metrics.headline` of ``rows``; only its levels (and
        the fine level) are read, so levels the headline leaves out never decide a claim.
    sensitivity : SensitivityRun, optional
        The run directory's latest layer-sensitivity CSV (:func:`latest_sensitivity`).
    """
    levels = {t["level"] for t in headline_table}
    return [
        claim_8bit(info, rows),
        claim_3bit(info, rows, levels),
        claim_bias(info, rows, details),
        claim_grouping(info, headline_table),
        claim_early_layers(sensitivity),
    ]


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell (a class name may hold a ``|``)."""
    return text.replace("|", "\\|")


def claims_section(
    info: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]],
    details: Mapping[str, Mapping[str, Any]],
    headline_table: Sequence[Mapping[str, Any]],
    sensitivity: SensitivityRun | None = None,
) -> list[str]:
    """The report's "Seed claims, checked" section as Markdown lines (see :func:`check_claims`)."""
    lines = [
        "## Seed claims, checked",
        "",
        "Each claim of the seed papers, decided by the rule beside it from this run's own figures only. "
        f"Fine drop = float accuracy - quantized accuracy on the fine labels (pp); [lo, hi]: 95% paired bootstrap "
        f"interval; tolerance {info['tolerance']:g} pp. \"not decided\": the run lacks what the rule needs.",
        "",
        "| claim | verdict | evidence | rule |",
        "|---|---|---|---|",
    ]
    for c in check_claims(info, rows, details, headline_table, sensitivity):
        lines.append(f"| {_cell(c['claim'])} | **{c['verdict']}** | {_cell(c['evidence'])} | {_cell(c['rule'])} |")
    return lines + [""]


# --- the layer-sensitivity CSV of a run directory --------------------------------------------


def read_sensitivity_csv(path: str | Path) -> tuple[LayerSensitivity, ...]:
    """The rows of a ``hiercluster sensitivity`` CSV; a file of another shape raises ValueError naming why."""
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in LayerSensitivity.COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"no column {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
        rows = []
        for i, row in enumerate(reader, start=2):
            try:
                values = [float(row[c]) for c in LayerSensitivity.COLUMNS[2:]]
                rows.append(LayerSensitivity(row["layer"], int(row["params"]), *values))
            except (TypeError, ValueError):
                raise ValueError(f"line {i} is not a layer's figures") from None
    if not rows:
        raise ValueError("no layer")
    return tuple(rows)


def latest_sensitivity(run_dir: str | Path) -> SensitivityRun | None:
    """The most recent ``sensitivity/*.csv`` of a run directory (by modification time), read; None without one.

    A file that cannot be read is returned with its ``error``, never raised: the report
    then says the claim is not decided.
    """
    folder = Path(run_dir) / SENSITIVITY_DIR
    try:
        found = [(p.stat().st_mtime_ns, p.name, p) for p in folder.glob("*.csv") if p.is_file()]
    except OSError:
        return None
    if not found:
        return None
    path = max(found)[2]
    try:
        return SensitivityRun(path, read_sensitivity_csv(path))
    except (OSError, UnicodeDecodeError, csv.Error, ValueError) as exc:
        return SensitivityRun(path, error=str(exc) or type(exc).__name__)


# --- identical logits at different widths ----------------------------------------------------

# What a spec shares with its narrower twin: everything but the width.
_TWIN_COLUMNS = ("scheme", "clipping", "granularity", "plan", "method", "bn_reestimate", "activation_bits")


def identical_to_lower(rows: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """``{spec_key: lower_bits}`` for specs whose logits are bit-identical to the same spec at fewer bits.

    Two specs are the same but for the width when every column of ``_TWIN_COLUMNS``
    agrees; identical ``logits_digest`` values mean identical outputs. ``lower_bits``
    is the narrowest such width. Rows without a digest (runs before it was recorded)
    are never flagged.

    Examples
    --------
    >>> base = {"scheme": "pow2", "clipping": "minmax", "granularity": "per_channel", "plan": "full",
    ...         "method": "rtn", "bn_reestimate": False, "activation_bits": None}
    >>> rows = [{**base, "spec_key": k, "bits": b, "logits_digest": d}
    ...         for k, b, d in (("p8", 8, "aa"), ("p5", 5, "aa"), ("p4", 4, "aa"), ("p3", 3, "bb"))]
    >>> identical_to_lower(rows)
    {'p8': 4, 'p5': 4}
    """
    narrowest: dict[tuple[Any, ...], int] = {}
    specs = _specs(rows)
    for r in specs:
        if r.get("logits_digest"):
            key = (*(r.get(c) for c in _TWIN_COLUMNS), r["logits_digest"])
            narrowest[key] = min(narrowest.get(key, r["bits"]), r["bits"])
    flags = {}
    for r in specs:
        if r.get("logits_digest"):
            low = narrowest[(*(r.get(c) for c in _TWIN_COLUMNS), r["logits_digest"])]
            if low < r["bits"]:
                flags[r["spec_key"]] = low
    return flags


def bits_label(bits: int, lower: int | None) -> str:
    """A width as the tables show it: ``"8"``, or ``"8 (= 4 bits)"`` when its logits equal the 4-bit spec's."""
    return str(bits) if lower is None else f"{bits} (= {lower} bits)"


def identical_note(
    rows: Sequence[Mapping[str, Any]], flags: Mapping[str, int], winners: Sequence[Mapping[str, Any] | None] = ()
) -> str:
    """The note under a table with flagged widths; ``""`` without flags.

    ``winners``: the headline's winning rows, to say whether a flagged spec is named there.
    """
    if not flags:
        return ""
    specs = [r for r in _specs(rows) if r["spec_key"] in flags]
    tags = [f"`{r['tag']}` (= {flags[r['spec_key']]} bits)" for r in specs]
    text = (
        f"\"(= N bits)\": the quantized model's logits are bit-identical to those of the same spec at N bits, so "
        f"the extra bits change no output: {_listed(tags)}."
    )
    if any(r["scheme"] == "pow2" for r in specs):
        text += (
            " pow2 at b bits has the levels 0 and ±a·2^-j, j = 0..2^(b-1)-2 (DESIGN.md): each extra bit only adds "
            "levels below the narrower grid's smallest (4 bits reach a·2^-6, 5 bits a·2^-14), which here move no "
            "weight enough to change a logit."
        )
    named = [w["tag"] for w in winners if w is not None and w.get("spec_key") in flags]
    if named:
        listed = ", ".join(f"`{t}`" for t in dict.fromkeys(named))
        text += f" The headline names {listed}: read it at the narrower width."
    return text


# --- per-layer effect of quantization ---------------------------------------------------------


def _num(value: Any) -> float | None:
    """A finite number of a stored layer row, else None (absent in older runs, NaN, inf, not a number)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _small(value: float | None) -> str:
    """A tensor mean in 3 significant digits, as ``-1.23e-03`` (weights' means are tiny), ``-`` when absent."""
    if value is None:
        return "-"
    return "0" if value == 0 else f"{value:.2e}"


def _layer_row(layer: Mapping[str, Any]) -> str:
    """``| name | bits | mean before → after | outliers % | range ratio | SQNR dB |``."""
    bits = layer.get("bits")
    before, after = _num(layer.get("before_mean")), _num(layer.get("after_mean"))
    mean = "-" if before is None and after is None else f"{_small(before)} → {_small(after)}"
    outliers = _num(layer.get("outlier_fraction"))
    median, low = _num(layer.get("range_ratio_ch_median")), _num(layer.get("range_ratio_ch_min"))
    ratio = "-" if median is None else f"{median:.3f}" + ("" if low is None else f" (min {low:.3f})")
    sqnr = _num(layer.get("sqnr_db"))
    float_layer = bits is None or bits >= 32
    return (
        f"| {_cell(str(layer['name']))} | {'float' if float_layer else bits} | {mean} | "
        f"{'-' if outliers is None else fmt_number(100 * outliers, 2)} | {'-' if float_layer else ratio} | "
        f"{'-' if float_layer or sqnr is None else fmt_number(sqnr, 1)} |"
    )


def layer_section(rows: Sequence[Mapping[str, Any]], details: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """"Per-layer effect of quantization" for the bias section's spec, one row per layer (at most
    :data:`MAX_LAYER_ROWS`).

    Columns (whatever the run stored; older runs lack the means, outliers and range ratios):
    the weight's mean before and after (a shifted mean is a bias every output inherits);
    the share of float weights outside Tukey's fences of their quartiles (the tails a
    min-max range must cover); per output channel, (max - min) after over before, median
    over channels and the smallest (clipping or rounding to zero shrank it); the SQNR.
    """
    chosen = bias_choice(rows)
    if chosen is None or not details.get(chosen["spec_key"], {}).get("layers"):
        return []
    layers = list(details[chosen["spec_key"]]["layers"])
    shown = layers[:MAX_LAYER_ROWS]
    cut = (f" Showing the first {len(shown)} of {len(layers)} layers; results.sqlite (table specs, column layers) "
           "has every layer.") if len(layers) > len(shown) else ""
    return [
        f"## Per-layer effect of quantization (`{chosen['tag']}`)",
        "",
        "The spec of the bias section, layer by layer in the model's order. mean: the weight tensor's mean, float → "
        "quantized; outliers: share of the float weights outside Tukey's fences [q1 - 1.5 IQR, q3 + 1.5 IQR]; range "
        "ratio: per output channel, (max - min) quantized / float, median over channels (min in brackets); SQNR: "
        "signal-to-quantization-noise ratio of the weight." + cut,
        "",
        "| layer | bits | mean before → after | outliers % | range ratio after/before | SQNR dB |",
        "|---|---|---|---|---|---|",
        *(_layer_row(layer) for layer in shown),
        "",
    ]
