"""Layer sensitivity: quantize one weight slot at a time (or all but one) and measure the effect.

For each weight that :func:`quant.quantize_model` quantizes (:func:`quant.layerops.weight_slots`,
in the model's order) two models are built with :class:`quant.QuantPlan` ``skip`` patterns:

* only this slot quantized (every other slot skipped): its *drop* against the float model;
* only this slot kept float (every other slot quantized): its *gain* against the whole
  model quantized.

Both are paired differences on the evaluation samples, at the fine level and at one level k
of the learned hierarchy, with standard errors (:mod:`hiercluster.evaluation.sensitivity`).
The float model runs once (or its cached logits are read); each quantized model once.
Weights are rounded to nearest (no calibration data), so that a slot's quantized weight is
the same whichever other slots are quantized. It is a measurement: nothing is chosen from it.
"""

from __future__ import annotations

import csv
import io
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

import quant
from hiercluster.errors import HierclusterError, short_repr
from hiercluster.evaluation.inference import collect_logits
from hiercluster.evaluation.sensitivity import (
    Correctness,
    LayerSensitivity,
    additivity,
    early_layers_verdict,
    layer_sensitivity,
    paired_difference,
)
from hiercluster.run.config import RunConfig
from hiercluster.run.grid import grid_spec
from hiercluster.run.prepare import Prepared, prepare
from hiercluster.run.rundir import RUN_FILE, read_run_info, sensitivity_paths
from quant._files import write_text_atomic
from quant.layerops import weight_slots
from quant.spec import SCHEMES, bits_range

# fnmatch's special characters; a layer name holding one is matched literally through "[c]".
_FNMATCH_SPECIAL = "*?[]"


def literal_pattern(name: str) -> str:
    """An fnmatch pattern that matches exactly ``name`` (``*``, ``?``, ``[`` and ``]`` bracketed).

    Examples
    --------
    >>> literal_pattern("blocks[0].fc*")
    'blocks[[]0[]].fc[*]'
    """
    return "".join(f"[{c}]" if c in _FNMATCH_SPECIAL else c for c in name)


def only_quantized_plan(target: str, names: Iterable[str]) -> quant.QuantPlan:
    """A plan that keeps every slot of ``names`` float except ``target``."""
    return quant.QuantPlan(name=f"only {target}", skip=tuple(literal_pattern(n) for n in names if n != target))


def only_float_plan(target: str) -> quant.QuantPlan:
    """A plan that quantizes every slot except ``target``."""
    return quant.QuantPlan(name=f"all but {target}", skip=(literal_pattern(target),))


@dataclass
class SensitivityResult:
    """Everything ``hiercluster sensitivity`` prints and saves; accuracies are fractions, effects pp."""

    spec: quant.QuantSpec
    k: int
    n_samples: int
    float_acc: dict[str, float]  # {"fine": ..., "k": ...}
    whole_acc: dict[str, float]  # every slot quantized
    whole_drop: dict[str, float]  # float minus whole-model quantized, pp
    whole_drop_se: dict[str, float]
    rows: list[LayerSensitivity]
    verdict: dict[str, Any] = field(default_factory=dict)
    additivity: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    def to_csv(self) -> str:
        """The rows as CSV text, one line per slot (columns: :attr:`LayerSensitivity.COLUMNS`)."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(LayerSensitivity.COLUMNS)
        for row in self.rows:
            writer.writerow([f"{v:.6g}" if isinstance(v, float) else v for v in row.row()])
        return buffer.getvalue()


def _quantized_correctness(
    model: nn.Module, spec: quant.QuantSpec, plan: quant.QuantPlan | None, loader: Any, assignment: np.ndarray, reduction: str
) -> Correctness:
    qmodel, _ = quant.quantize_model(model, spec, plan)
    logits, labels = collect_logits(qmodel, loader)
    return Correctness.of(logits, labels, assignment, reduction)


def layer_sensitivities(
    model: nn.Module,
    spec: quant.QuantSpec,
    loader: Any,
    assignment: np.ndarray,
    *,
    reduction: str = "prob_sum",
    float_logits: tuple[torch.Tensor, torch.Tensor] | None = None,
    progress: bool = False,
) -> SensitivityResult:
    """Each weight slot's drop (only it quantized) and gain (only it float), fine and at ``assignment``'s level.

    Parameters
    ----------
    model : nn.Module
        The float model (not modified).
    spec : quant.QuantSpec
        The weight quantizer; rounded to nearest.
    loader : iterable of (x, y)
        The evaluation batches, in the same order on every pass.
    assignment : array (C,)
        Group id of each class at the chosen level k.
    reduction : str
        How the merged head scores a group (:data:`hiercluster.evaluation.heads.REDUCTIONS`).
    float_logits : (logits, labels), optional
        The float model's kept logits on ``loader``; computed when omitted.
    progress : bool
        A progress bar over the slots.

    Returns
    -------
    SensitivityResult
    """
    t0 = time.perf_counter()
    assignment = np.asarray(assignment, dtype=np.int64)
    logits, labels = float_logits if float_logits is not None else collect_logits(model, loader)
    reference = Correctness.of(logits, labels, assignment, reduction)
    slots = [(s.name, s.weight.numel()) for s in weight_slots(model)]
    if not slots:
        raise HierclusterError(f"{type(model).__name__} has no weight to quantize (no Conv/Linear layer)")
    names = [name for name, _ in slots]
    whole = _quantized_correctness(model, spec, None, loader, assignment, reduction)  # its warnings are shown once
    rows = []
    steps: Iterable[tuple[str, int]] = slots
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(slots, desc="layers", leave=False, unit="layer")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the whole model's pass already showed what quantize_model warns about
        for name, params in steps:
            only_quant = _quantized_correctness(model, spec, only_quantized_plan(name, names), loader, assignment, reduction)
            # With a single slot, "all but it quantized" is the float model.
            only_float = (
                _quantized_correctness(model, spec, only_float_plan(name), loader, assignment, reduction)
                if len(slots) > 1 else reference
            )
            rows.append(layer_sensitivity(name, params, reference, whole, only_quant, only_float))
    drop_fine, drop_k = paired_difference(reference.fine, whole.fine), paired_difference(reference.grouped, whole.grouped)
    whole_drop = {"fine": drop_fine[0], "k": drop_k[0]}
    return SensitivityResult(
        spec=spec,
        k=int(assignment.max()) + 1,
        n_samples=len(labels),
        float_acc={"fine": float(reference.fine.mean()), "k": float(reference.grouped.mean())},
        whole_acc={"fine": float(whole.fine.mean()), "k": float(whole.grouped.mean())},
        whole_drop=whole_drop,
        whole_drop_se={"fine": drop_fine[1], "k": drop_k[1]},
        rows=rows,
        verdict=early_layers_verdict(rows),
        additivity=additivity(rows, whole_drop),
        seconds=time.perf_counter() - t0,
    )


# --- the command's side: config, flags, files ---------------------------------------------


def sensitivity_spec(cfg: RunConfig, bits: int, scheme: str | None = None) -> quant.QuantSpec:
    """The config's first scheme (or ``scheme``), clipping and granularity at ``bits``; bad flags are one line."""
    scheme = scheme or cfg.quant.schemes[0]
    if scheme not in SCHEMES:
        raise HierclusterError(f"--scheme {short_repr(scheme)} is not a scheme; allowed: {', '.join(SCHEMES)}")
    lo, hi = bits_range(scheme)
    if not lo <= bits <= hi:
        raise HierclusterError(f"--bits {bits} is outside {lo}..{hi}, the widths scheme {scheme} allows")
    try:
        return grid_spec(cfg, scheme, bits, cfg.quant.clipping[0], cfg.quant.granularity[0])
    except ValueError as exc:
        raise HierclusterError(f"config section quant: {exc}") from None


def default_k(prep: Prepared) -> int:
    """The smallest k > 1 among the run's learned levels, else 2."""
    ks = [level.k for level in prep.levels.values() if level.kind == "learned" and level.k > 1]
    return min(ks) if ks else 2


def check_k(k: int, n_classes: int | None = None) -> None:
    """``k`` must split the classes into 2..C-1 groups (k = 1 and k = C say nothing beyond the fine level).

    Without ``n_classes`` (before the data load) only the lower end is checked.
    """
    if k < 2 or (n_classes is not None and k > n_classes - 1):
        top = "C-1" if n_classes is None else str(n_classes - 1)
        classes = "classes" if n_classes is None else f"{n_classes} classes"
        raise HierclusterError(
            f"--k {k} is outside 2..{top}: a level needs more than one group and fewer groups than the {classes}"
        )


def sensitivity_tree(prep: Prepared, out_dir: Path, k: int) -> Any:
    """The tree whose cut at ``k`` the sensitivity groups by: the one the run in ``out_dir`` chose for k.

    A run with several trees records its choice per k (run.json ``tree_selection``, made on
    held-out training images); without such a run, or for a k it did not choose, the first
    tree of ``hierarchy.embedding``.
    """
    if len(prep.trees) < 2 or not (out_dir / RUN_FILE).is_file():
        return prep.hierarchy
    choice = (read_run_info(out_dir).get("tree_selection") or {}).get("by_k", {}).get(str(k))
    return prep.trees.get(choice["tree"], prep.hierarchy) if choice else prep.hierarchy


def run_sensitivity(
    cfg: RunConfig, out_dir: Path, bits: int, k: int | None = None, scheme: str | None = None, progress: bool = True
) -> tuple[SensitivityResult, Prepared, Path]:
    """Measure every slot's sensitivity on the config's evaluation split; write the CSV into ``out_dir``.

    Every flag is checked before the float model runs. The float logits come from the run
    directory's cache when it matches (never written here). Returns the result, the
    prepared run (levels, data limit) and the CSV path.
    """
    spec = sensitivity_spec(cfg, bits, scheme)
    if k is not None:
        check_k(k)  # refused before the data loads; the upper end needs the class count
    prep = prepare(cfg, out_dir, progress=progress, float_logits=False)
    n_classes = len(prep.class_names)
    if n_classes < 3:
        raise HierclusterError(f"the data have {n_classes} classes: a grouped level needs at least 3")
    k = default_k(prep) if k is None else k
    check_k(k, n_classes)
    prep.evaluate_float(progress=progress)
    result = layer_sensitivities(
        prep.model, spec, prep.loader(), sensitivity_tree(prep, out_dir, k).cut(k=k), reduction=cfg.eval.reduction,
        float_logits=(prep.float_logits, prep.labels), progress=progress,
    )
    csv_path, _ = sensitivity_paths(out_dir, spec.tag, k)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(csv_path, result.to_csv())
    return result, prep, csv_path
