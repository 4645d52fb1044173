"""The quant grid of a run: every spec x plan x method x activation setting as one :class:`GridPoint`."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

import quant
from quant.spec import bits_range
from hiercluster.errors import HierclusterError, short_repr
from hiercluster.run.config import RunConfig
from hiercluster.run.store import method_label

PLAN_NAME = re.compile(r"[A-Za-z0-9_+\-][A-Za-z0-9_.+\-]{0,63}")


@dataclass(frozen=True)
class GridPoint:
    """One weight-quantization setting of the sweep.

    Examples
    --------
    >>> spec, plan = quant.QuantSpec(scheme="asymmetric", bits=2, clipping="mse"), quant.QuantPlan(name="full")
    >>> GridPoint(spec, plan, method="gptq", bn_reestimate=True).tag
    'asymmetric-2b-mse-per_channel+full+gptq+bn'
    >>> GridPoint(spec, plan).tag  # round to nearest without BN re-estimation: no suffix
    'asymmetric-2b-mse-per_channel+full'
    """

    spec: quant.QuantSpec
    plan: quant.QuantPlan
    activation: quant.QuantSpec | None = None
    method: str = "rtn"
    bn_reestimate: bool = False
    # Mixed precision: the average bits per weight the plan's widths are chosen for (None: the
    # spec's bits everywhere the plan does not say otherwise).
    budget: float | None = None
    candidate_bits: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.method not in quant.METHODS:
            raise ValueError(f"GridPoint method {short_repr(self.method)} is not one of {', '.join(quant.METHODS)}")

    @property
    def method_label(self) -> str:
        """``"gptq+bn"``, ``"rtn"``, ...: the method and whether BN statistics were re-estimated."""
        return method_label(self.method, self.bn_reestimate)

    @property
    def needs_calibration(self) -> bool:
        """Whether quantizing this point fits anything on calibration data."""
        return (
            self.activation is not None or self.budget is not None
            or quant.needs_calibration(self.method, self.bn_reestimate)
        )

    @property
    def calibration_user(self) -> str:
        """What in this point needs calibration data, for error messages."""
        if self.method != "rtn":
            return f"method {short_repr(self.method)}"
        if self.budget is not None:
            return "mixed precision (quant.budgets)"
        if self.bn_reestimate:
            return "BN re-estimation (quant.bn_reestimate)"
        return "activation quantization (quant.activation_bits)"

    @property
    def calibration_use(self) -> str:
        """What is fitted on calibration data, as a short label (``"gptq+bn"``, ``"a8"``, ``"gptq+a8"``)."""
        parts = [self.method_label] if self.method_label != "rtn" else []
        parts += ["mixed"] if self.budget is not None else []
        return "+".join(parts + ([f"a{self.activation.bits}"] if self.activation else []))

    @property
    def tag(self) -> str:
        spec_tag = self.spec.tag
        if self.budget is not None:  # the spec's own width is not the model's: the plan's name says the budget
            spec_tag = spec_tag.replace(f"-{self.spec.bits}b-", "-mixed-", 1)
        tag = f"{spec_tag}+{self.plan.name}"
        if self.method_label != "rtn":
            tag += f"+{self.method_label}"
        return tag + (f"+a{self.activation.bits}" if self.activation else "")


def grid_spec(cfg: RunConfig, scheme: str, bits: int, clipping: str, granularity: str) -> quant.QuantSpec:
    """A weight spec with the grid's scheme-specific options (``quant.narrow_range``, ...)."""
    q = cfg.quant
    return quant.QuantSpec(
        scheme=scheme,
        bits=bits,
        granularity=granularity,
        clipping=clipping,
        narrow_range=q.narrow_range,
        pow2_scale=q.pow2_scale,
        percentile=q.percentile,
    )


def budget_plan_name(budget: float) -> str:
    """The plan name of a mixed-precision point: ``"mp2.5"``.

    Examples
    --------
    >>> budget_plan_name(2.5), budget_plan_name(2.0)
    ('mp2.5', 'mp2')
    """
    return f"mp{budget:g}"


def _check_budgets(cfg: RunConfig, budgets: Sequence[float], schemes: Sequence[str], where: str) -> None:
    """Each budget reachable by the candidate widths, and each width one every scheme can represent."""
    candidates = cfg.quant.candidate_bits
    low = min(candidates)
    for budget in budgets:
        if budget < low:
            raise HierclusterError(
                f"config key {where}: budget {budget:g} is below the smallest candidate width {low} "
                f"(quant.candidate_bits {list(candidates)}): no allocation can meet it; use at least {low}"
            )
    for scheme in schemes:
        if scheme == "binary":
            raise HierclusterError(
                f"config key {where}: a bit budget needs a multi-bit scheme to mix widths in; scheme binary has only "
                "1 bit (width 1 in candidate_bits is binary under any scheme): use asymmetric or symmetric"
            )
        lo, hi = bits_range(scheme)
        bad = [b for b in candidates if b != 1 and not lo <= b <= hi]
        if bad:
            raise HierclusterError(
                f"config key quant.candidate_bits: {', '.join(map(str, bad))} bits cannot be represented by scheme "
                f"{scheme} ({lo}..{hi}; 1 is binary under any scheme)"
            )


def check_methods(cfg: RunConfig) -> None:
    """Every ``quant.methods`` item names a known method and existing plans."""
    plan_names = [p.name for p in cfg.quant.plans]
    for i, m in enumerate(cfg.quant.methods):
        if m.name not in quant.METHODS:
            raise HierclusterError(
                f"config key quant.methods[{i}]: unknown method {short_repr(m.name)}; allowed: {', '.join(quant.METHODS)}"
            )
        missing = [p for p in m.plans if p not in plan_names]
        if missing:
            raise HierclusterError(
                f"config key quant.methods[{i}].plans: no plan named {', '.join(map(repr, missing))} in quant.plans "
                f"(names: {', '.join(plan_names)})"
            )


def expand_grid(cfg: RunConfig) -> list[GridPoint]:
    """Every grid point of ``cfg.quant``, without duplicates, in a fixed order.

    The order is method item, BN re-estimation, plan, scheme, clipping, granularity,
    bits: round to nearest (listed first by default) finishes before the slower
    calibrated methods start. A method item's non-empty lists replace the grid's.
    """
    q = cfg.quant
    points: list[GridPoint] = []
    seen: set[tuple[str, str, str, bool]] = set()
    activation = None
    names = [p.name for p in q.plans]
    for i, name in enumerate(names):
        # Plan names become file names (exported models): no path separators, no leading dot.
        if not PLAN_NAME.fullmatch(name):
            raise HierclusterError(
                f"config key quant.plans[{i}].name: {short_repr(name, 40)} is not allowed; use letters, digits and _ - + . "
                "(not starting with a dot), at most 64 characters"
            )
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise HierclusterError(f"config key quant.plans: plan names must be unique; repeated: {', '.join(repeated)}")
    check_methods(cfg)
    try:
        if q.activation_bits is not None:
            activation = quant.QuantSpec(
                scheme="asymmetric", bits=q.activation_bits, granularity="per_tensor", clipping="minmax"
            )
        plans = {p.name: quant.QuantPlan.from_dict(p.quant_plan_dict()) for p in q.plans}
        for m in q.methods:
            for bn in dict.fromkeys(m.bn_reestimate or q.bn_reestimate):
                for plan_cfg in q.plans:
                    if m.plans and plan_cfg.name not in m.plans:
                        continue
                    plan = plans[plan_cfg.name]
                    for scheme in m.schemes or q.schemes:
                        if plan_cfg.schemes and scheme not in plan_cfg.schemes:
                            continue
                        for clipping in m.clipping or q.clipping:
                            for granularity in q.granularity:
                                for bits in m.bits or q.bits:
                                    if plan_cfg.bits and bits not in plan_cfg.bits:
                                        continue
                                    if (scheme == "binary") != (bits == 1):
                                        continue  # binary has 1 bit and 1 bit is binary: the pairs mean nothing else
                                    spec = grid_spec(cfg, scheme, bits, clipping, granularity)
                                    plan.check(spec)
                                    ident = (json.dumps(spec.to_dict(), sort_keys=True), plan_cfg.name, m.name, bn)
                                    if ident not in seen:
                                        seen.add(ident)
                                        points.append(GridPoint(spec, plan, activation, m.name, bn))
        for i, m in enumerate(q.methods):
            points += _budget_points(cfg, m, i, activation, seen)
    except ValueError as exc:
        if isinstance(exc, HierclusterError):
            raise
        raise HierclusterError(f"config section quant: {exc}") from None
    if not points:
        raise HierclusterError(
            "config section quant: the grid is empty (check quant.bits, quant.schemes, plan and method filters)"
        )
    return points


def _budget_points(
    cfg: RunConfig, m: Any, index: int, activation: quant.QuantSpec | None, seen: set[Any]
) -> list[GridPoint]:
    """The mixed-precision points of one method item: one per budget x BN x scheme x clipping x granularity."""
    q = cfg.quant
    budgets = m.budgets or q.budgets
    if not budgets:
        return []
    schemes = m.schemes or q.schemes
    where = f"quant.methods[{index}].budgets" if m.budgets else "quant.budgets"
    _check_budgets(cfg, budgets, schemes, where)
    points = []
    for bn in dict.fromkeys(m.bn_reestimate or q.bn_reestimate):
        for scheme in schemes:
            # The spec's own width is the widest candidate it can represent: the allocation sets every layer.
            lo, hi = bits_range(scheme)
            top = max(b for b in q.candidate_bits if b == 1 or lo <= b <= hi)
            for clipping in m.clipping or q.clipping:
                for granularity in q.granularity:
                    spec = grid_spec(cfg, scheme, max(top, lo), clipping, granularity)
                    for budget in budgets:
                        plan = quant.QuantPlan(name=budget_plan_name(budget))
                        ident = (json.dumps(spec.to_dict(), sort_keys=True), plan.name, m.name, bn)
                        if ident not in seen:
                            seen.add(ident)
                            points.append(
                                GridPoint(spec, plan, activation, m.name, bn, budget, tuple(q.candidate_bits))
                            )
    return points


def calibration_settings(cfg: RunConfig) -> dict[str, Any]:
    """The settings of section ``calibration`` that change which images are used."""
    c = cfg.calibration
    return {"split": c.split, "samples": c.samples, "batch_size": c.batch_size, "seed": c.seed}


def check_plans_fit(model: nn.Module, grid: Sequence[GridPoint], model_name: str | None = None) -> None:
    """Refuse a plan of the grid that leaves every weight of ``model`` float, before any work on it.

    Such a plan quantizes nothing (``quant.quantize_model`` refuses it), and finding that
    out after the float evaluation, halfway through a sweep, wastes the run. A plan's
    ``skip`` patterns decide alone which weights stay float (:meth:`quant.QuantPlan.rule_for`).
    The weights are the ones ``quant.quantize_model`` quantizes
    (:func:`quant.layerops.weight_slots`): every Conv/Linear layer and the attention
    projection weights, named like their parameter (``"encoder.0.self_attn.in_proj_weight"``),
    so a plan that skips every Conv/Linear layer of a transformer still quantizes those.
    """
    from quant.layerops import weight_slots

    names = [slot.name for slot in weight_slots(model)]
    what = f"model {model_name}" if model_name else f"the {type(model).__name__} model"
    if grid and not names:
        raise HierclusterError(f"{what} has no Conv or Linear layer and no attention projection weight to quantize")
    for plan in dict.fromkeys(p.plan for p in grid):
        if all(plan.is_skipped(name) for name in names):
            raise HierclusterError(
                f"config key quant.plans: plan {short_repr(plan.name)} leaves every layer of {what} float (skip patterns "
                f"{short_repr(list(plan.skip))} match all {len(names)} of its weights, Conv/Linear layers and "
                "attention projections): nothing to quantize; narrow its skip patterns or remove the plan"
            )
