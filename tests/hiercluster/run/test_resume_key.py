"""The resume key covers everything that changes a spec's result, and nothing that does not.

Every leaf of the config is classified below; a config key added without a decision
fails :func:`test_every_config_key_is_classified`, so the key cannot silently miss it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import hiercluster
from hiercluster.run import sweep, versions
from hiercluster.run.config import MethodConfig, RunConfig, load_config
from hiercluster.run.grid import expand_grid
from hiercluster.run.records import Level

# Config keys that are in the key themselves, with another value for each.
IN_KEY: dict[str, Any] = {
    "data.dataset": "mnist",
    "data.root": "/elsewhere",
    "data.eval_split": "train",
    "data.limit": 500,
    "quant.narrow_range": False,
    "quant.pow2_scale": True,
    "quant.percentile": 99.0,
    "quant.activation_bits": 8,
    "quant.activation_calibration_batches": 3,
    "calibration.split": "test",
    "calibration.samples": 256,
    "calibration.batch_size": 64,
    "calibration.seed": 7,
    "eval.reduction": "mean_logit",
    "eval.random_seeds": 5,
    "eval.seed": 3,
    "eval.bootstrap": 200,
}
# The grid's own axes: each spec's values of them are its spec, plan and method, all in its key.
GRID_AXES = {
    "quant.schemes", "quant.bits", "quant.clipping", "quant.granularity", "quant.plans", "quant.methods",
    "quant.bn_reestimate",
    # mixed precision: each budget point's budget and candidate widths are in its key ("budget")
    "quant.budgets", "quant.candidate_bits",
}
# Keys whose effect reaches the result through something the key holds (tested below, one test each).
COVERED = {
    "model.arch": "checkpoint", "model.checkpoint": "checkpoint", "model.width": "checkpoint",
    "hierarchy.embedding": "levels", "hierarchy.linkage": "levels", "hierarchy.metric": "levels",
    "hierarchy.split": "levels", "hierarchy.levels": "levels", "hierarchy.reference": "levels",
    "hierarchy.names": "levels",
    # select: auto with several trees holds out images of hierarchy.split, whose drops each spec stores
    "hierarchy.select": "holdout", "hierarchy.holdout": "holdout",
    "data.image_size": "data options", "data.channels": "data options", "data.mean": "data options",
    "data.std": "data options", "data.resize": "data options",
    "runtime.device": "device",
}
# Keys that change speed, permissions or the report, never a spec's numbers.
NOT_RESULTS = {
    "data.batch_size", "data.download", "runtime.threads", "runtime.workers",
    "calibration.allow_eval_split", "eval.tolerance", "output.dir", "output.export_models",
    # `hiercluster train` only: the sweep reads a trained checkpoint (its bytes are in the key)
    *(f"train.{f.name}" for f in dataclasses.fields(load_config(None).train)),
}


def _leaves(cfg: RunConfig) -> set[str]:
    return {f"{section}.{key}" for section, values in cfg.to_dict().items() for key in values}


def test_every_config_key_is_classified() -> None:
    leaves = _leaves(load_config(None))
    classified = set(IN_KEY) | GRID_AXES | set(COVERED) | NOT_RESULTS
    assert leaves - classified == set(), "config keys the resume key makes no decision about"
    assert classified - leaves == set(), "classified keys that the config no longer has"


def _prep(cfg: RunConfig, **changes: Any) -> SimpleNamespace:
    labels = torch.arange(30) % 3
    levels = {
        "k=3": Level.of("k=3", [0, 1, 2], ["a", "b", "c"], "learned"),
        "k=2": Level.of("k=2", [0, 0, 1], ["ab", "c"], "learned"),
    }
    base = dict(
        cfg=cfg, checkpoint_digest="d" * 64, labels=labels, levels=levels, data_options=None, device=torch.device("cpu"),
        holdout_set=None,
    )
    return SimpleNamespace(**{**base, **changes})


def _config(**sections: dict[str, Any]) -> RunConfig:
    cfg = load_config(None)
    cfg = dataclasses.replace(cfg, quant=dataclasses.replace(cfg.quant, bits=(4,), schemes=("asymmetric",)))
    for section, values in sections.items():
        cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **values)})
    return cfg


def _key(cfg: RunConfig, method: str = "rtn", **prep_changes: Any) -> str:
    """The key of the config's first spec of ``method`` (a calibrated method uses the calibration settings)."""
    if method != "rtn":
        cfg = dataclasses.replace(cfg, quant=dataclasses.replace(cfg.quant, methods=(MethodConfig(name=method),)))
    point = expand_grid(cfg)[0]
    return sweep.resume_key(point, _prep(cfg, **prep_changes))


@pytest.mark.parametrize("dotted", sorted(IN_KEY))
def test_a_setting_in_the_key_reruns_the_spec(dotted: str) -> None:
    section, key = dotted.split(".")
    method = "gptq" if section == "calibration" else "rtn"
    # Either split may then be either value: the evaluation split's check is not what this tests.
    base = _config(calibration={"allow_eval_split": True})
    if key == "eval_split":  # one tree from the fc weights: no tree is fitted on (or chosen with) the train split
        base = _config(calibration={"allow_eval_split": True}, hierarchy={"embedding": ("fc_weights",)})
    if key == "activation_calibration_batches":
        base = _config(quant={"activation_bits": 8})
    if key in ("percentile", "pow2_scale"):  # only specs that use them carry them: pick such a spec
        scheme, clipping = ("pow2", "mse") if key == "pow2_scale" else ("asymmetric", "percentile")
        base = _config(quant={"schemes": (scheme,), "clipping": (clipping,)}, calibration={"allow_eval_split": True})
    if key == "narrow_range":  # asymmetric grids have no narrow range: a symmetric spec carries it
        base = _config(quant={"schemes": ("symmetric",)}, calibration={"allow_eval_split": True})
    changed = dataclasses.replace(base, **{section: dataclasses.replace(getattr(base, section), **{key: IN_KEY[dotted]})})
    assert _key(changed, method) != _key(base, method)


def test_calibration_settings_do_not_rerun_round_to_nearest() -> None:
    """Round to nearest reads no calibration image: its key ignores them (no needless recompute)."""
    assert _key(_config(calibration={"seed": 9})) == _key(_config())


@pytest.mark.parametrize("what", ["checkpoint", "levels", "data options", "device", "labels", "holdout", "no holdout"])
def test_what_covers_the_other_settings_reruns_the_spec(what: str) -> None:
    cfg = _config()
    changes = {
        "checkpoint": {"checkpoint_digest": "e" * 64},
        "levels": {"levels": {"k=2": Level.of("k=2", [0, 1, 1], ["a", "bc"], "learned")}},
        "data options": {"data_options": SimpleNamespace(to_dict=lambda: {"image_size": [32, 32]})},
        "device": {"device": torch.device("cuda")},  # a device object needs no GPU
        "labels": {"labels": torch.arange(30) % 2},
        "holdout": {"holdout_set": list(range(12))},
        "no holdout": {"holdout_set": list(range(10))},
    }[what]
    if what == "holdout":  # another number of held-out images than 10
        assert _key(cfg, **changes) != _key(cfg, holdout_set=list(range(10)))
    assert _key(cfg, **changes) != _key(cfg)


def test_covered_settings_name_something_tested() -> None:
    assert set(COVERED.values()) <= {"checkpoint", "levels", "data options", "device", "holdout"}


@pytest.mark.parametrize(
    "patch",
    [
        (hiercluster, "__version__", "99.0"),
        (torch, "__version__", "0.0.1"),
        (versions, "SCHEMA_VERSION", 999),
        (versions, "code_digest", lambda: "another source"),
    ],
    ids=["package version", "torch version", "schema version", "source"],
)
def test_the_code_version_reruns_the_spec(monkeypatch: pytest.MonkeyPatch, patch: tuple[Any, str, Any]) -> None:
    before = _key(_config())
    monkeypatch.setattr(*patch)
    assert _key(_config()) != before


@pytest.mark.parametrize("dotted", sorted(NOT_RESULTS - {f"train.{f.name}" for f in dataclasses.fields(load_config(None).train)}))
def test_settings_that_change_no_result_keep_the_key(dotted: str) -> None:
    section, key = dotted.split(".")
    base = _config()
    value = getattr(getattr(base, section), key)
    if isinstance(value, bool):
        other: Any = not value
    elif isinstance(value, str):
        other = value + "-elsewhere"
    else:
        other = (value or 0) + 3  # None (threads: all cores) or a count
    changed = dataclasses.replace(base, **{section: dataclasses.replace(getattr(base, section), **{key: other})})
    assert _key(changed) == _key(base)
    assert _key(changed, "gptq") == _key(base, "gptq")


def test_the_key_is_stable() -> None:
    """The same config and prepared state give the same key in another call (no clock, no address)."""
    assert _key(_config()) == _key(_config())
    assert len(_key(_config())) == 20 and int(_key(_config()), 16) >= 0


def test_the_source_digest_changes_with_a_source_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """code_digest reads the bytes of the code that computes results, and only those."""
    import shutil

    import quant

    base = tmp_path / "tree"
    for root in ("quant", "hiercluster"):
        shutil.copytree(
            Path(quant.__file__).resolve().parent.parent / root, base / root,
            ignore=shutil.ignore_patterns("__pycache__"),
        )
    monkeypatch.setattr(quant, "__file__", str(base / "quant" / "__init__.py"))
    versions.code_digest.cache_clear()
    first = versions.code_digest()
    def edit(relative: str) -> str:
        path = base / relative
        path.write_text(path.read_text() + "\n# changed\n")
        versions.code_digest.cache_clear()
        return versions.code_digest()

    # the report, the CLI and the store only move results around: editing them re-runs nothing
    assert edit("hiercluster/cli.py") == first
    assert edit("hiercluster/report/markdown.py") == first
    changed = edit("quant/spec.py")
    assert changed != first
    assert edit("hiercluster/run/sweep.py") != changed
    versions.code_digest.cache_clear()
