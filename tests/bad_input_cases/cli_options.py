"""Issue 10's command-line options: --threads, --limit, evaluate-checkpoint's --arch/--width/--num-classes/
--config/--batch-size, evaluate's saved table, and the hierarchy checks made before any evaluation."""

from __future__ import annotations

from pathlib import Path

from bad_input_cases import Case, copy_checkpoint, digits_config


def _evaluate_checkpoint(*flags: str):
    """A case builder: ``evaluate-checkpoint`` of the session's digits checkpoint (with metadata) and ``flags``."""

    def make(tmp: Path) -> list[str]:
        return ["evaluate-checkpoint", str(copy_checkpoint(tmp)), *flags]

    return make


def _plain_state_dict(tmp: Path) -> Path:
    """The session's digits weights (resnet8, width 8) without their metadata JSON."""
    ckpt = copy_checkpoint(tmp)
    ckpt.with_suffix(".json").unlink()
    return ckpt


def _plain(*flags: str):
    """A case builder: ``evaluate-checkpoint`` of a plain state_dict with ``flags``."""

    def make(tmp: Path) -> list[str]:
        return ["evaluate-checkpoint", str(_plain_state_dict(tmp)), *flags]

    return make


def _whole_model_pickle(tmp: Path) -> list[str]:
    import torch

    from hiercluster.models.zoo import build_model

    path = tmp / "whole.pt"
    torch.save(build_model("resnet8", 10, 1, width=8), path)  # the model object, not its state_dict
    return ["evaluate-checkpoint", str(path), "--arch", "resnet8", "--width", "8", "--dataset", "digits"]


def _run(*overrides: str, flags: tuple[str, ...] = ()):
    """A case builder: ``run`` of the digits config on the session's checkpoint, with ``--set`` overrides and flags."""

    def make(tmp: Path) -> list[str]:
        copy_checkpoint(tmp)
        config = digits_config(tmp, model={"checkpoint": "model.pt"})
        sets = [arg for o in overrides for arg in ("--set", o)]
        return ["run", str(config), "--out", str(tmp / "run"), "--quiet", *sets, *flags]

    return make


def _evaluate_into(blocker: str):
    """A case builder: ``evaluate`` whose table would be saved where ``blocker`` already is ("file" or "folder")."""

    def make(tmp: Path) -> list[str]:
        import quant

        from hiercluster.models.zoo import load_checkpoint

        ckpt = copy_checkpoint(tmp)
        config = digits_config(tmp, model={"checkpoint": ckpt.name})
        model, _ = load_checkpoint(ckpt)
        qmodel, report = quant.quantize_model(model, quant.QuantSpec(bits=4))
        packed = quant.save_packed(tmp / "m4.hcq", qmodel, report)
        run = tmp / "run"
        (run / "hierarchy.json").parent.mkdir()
        (run / "hierarchy.json").write_text("{}")  # marks the folder as a run directory
        if blocker == "file":
            (run / "evaluations").write_text("a user's file where the evaluations folder would go")
        else:
            (run / "evaluations" / "m4.json").mkdir(parents=True)
        return ["evaluate", str(config), "--packed", str(packed), "--out", str(run), "--quiet"]

    return make


def _missing_config(tmp: Path) -> list[str]:
    return ["evaluate-checkpoint", str(copy_checkpoint(tmp)), "--config", str(tmp / "nope.yaml")]


def _config_with_an_unknown_arch(tmp: Path) -> list[str]:
    config = digits_config(tmp, model={"arch": "resnet9", "width": 8})
    return ["evaluate-checkpoint", str(_plain_state_dict(tmp)), "--config", str(config)]


def _name_matching_no_cluster(tmp: Path) -> list[str]:
    """``run`` with a superclass name for two classes that are no cluster of the checkpoint's tree.

    The pair is found on the tree itself, so the case holds whatever the session's model learned.
    """
    from hiercluster.hierarchy.clustering import build_hierarchy
    from hiercluster.models.zoo import load_checkpoint

    ckpt = copy_checkpoint(tmp)
    model, meta = load_checkpoint(ckpt)
    tree = build_hierarchy(model, "fc_weights", class_names=meta["classes"]).tree_
    clusters = {frozenset(tree.nodes[n]["members"]) for n in tree.nodes}
    pair = next([a, b] for a in range(10) for b in range(a + 1, 10) if frozenset((a, b)) not in clusters)
    config = digits_config(tmp, model={"checkpoint": ckpt.name}, hierarchy={"names": {"Odd": [str(c) for c in pair]}})
    return ["run", str(config), "--out", str(tmp / "run"), "--quiet"]


CASES: dict[str, Case] = {
    # --threads and --limit: whole numbers in range, refused by the parser before anything loads
    "--threads 0": Case(
        _evaluate_checkpoint("--threads", "0"), "argument --threads: expected a whole number from 1 to 1,024, got '0'"
    ),
    "--threads of 5,000 digits": Case(
        _run(flags=("--threads", "9" * 5000)), "argument --threads: expected a whole number from 1 to 1,024, got '9999"
    ),
    "--threads two": Case(_run(flags=("--threads", "two")), "argument --threads: expected a whole number"),
    "--limit 0 on run": Case(_run(flags=("--limit", "0")), "argument --limit: expected a whole number from 1 to 100,000,000"),
    "--limit -5 on evaluate-checkpoint": Case(_evaluate_checkpoint("--limit", "-5"), "argument --limit: expected a whole number"),
    "--limit larger than the split": Case(
        _evaluate_checkpoint("--limit", "451"), "(--limit) is 451, more than the 450 images of the test split of digits"
    ),
    "run --limit larger than the split": Case(
        _run(flags=("--limit", "100000")), "(--limit) is 100,000, more than the 450 images of the test split of digits"
    ),
    "--batch-size 0": Case(_evaluate_checkpoint("--batch-size", "0"), "argument --batch-size: expected a whole number"),
    # evaluate-checkpoint of a plain state_dict
    "plain state_dict without --arch": Case(
        _plain("--dataset", "digits"), "has no metadata file model.json beside it: pass its architecture with --arch NAME"
    ),
    "plain state_dict without --dataset": Case(
        _plain("--arch", "resnet8", "--width", "8"), "it has no metadata naming its dataset; pass --dataset NAME"
    ),
    "plain state_dict with the wrong --width": Case(
        _plain("--arch", "resnet8", "--dataset", "digits"), "(built as --arch resnet8 --width 16, 10 classes)"
    ),
    "plain state_dict with another --arch": Case(
        _plain("--arch", "resnet20", "--width", "8", "--dataset", "digits"), "missing keys layer1.1.conv1.weight"
    ),
    "plain state_dict with an unknown --arch": Case(_plain("--arch", "resnet9", "--dataset", "digits"), "unknown arch 'resnet9'"),
    "plain state_dict with --num-classes of another count": Case(
        _plain("--arch", "resnet8", "--width", "8", "--dataset", "digits", "--num-classes", "7"),
        "--num-classes 7: the data has 10 classes",
    ),
    "--width 4096": Case(
        _plain("--arch", "resnet8", "--width", "4096"), "argument --width: expected a whole number from 1 to 1,024"
    ),
    "whole pickled model with --arch": Case(
        _whole_model_pickle, "holds a whole pickled model (GLOBAL hiercluster.models.zoo.CifarResNet), not a state_dict; "
        "save model.state_dict() instead",
    ),
    "--arch contradicting the metadata": Case(
        _evaluate_checkpoint("--arch", "resnet20"), "--arch 'resnet20' contradicts the metadata of"
    ),
    "--width contradicting the metadata": Case(_evaluate_checkpoint("--width", "16"), "--width 16 contradicts the metadata"),
    "--num-classes contradicting the metadata": Case(
        _evaluate_checkpoint("--num-classes", "100"), "--num-classes 100 contradicts the metadata"
    ),
    "evaluate-checkpoint --config not found": Case(_missing_config, "nope.yaml"),
    "evaluate-checkpoint --config with an unknown arch": Case(_config_with_an_unknown_arch, "unknown arch 'resnet9'"),
    # evaluate's saved table
    "evaluate where the evaluations folder is a file": Case(_evaluate_into("file"), "run/evaluations is a file"),
    "evaluate where its table is a folder": Case(_evaluate_into("folder"), "its evaluation record"),
    # hierarchy checks, before any evaluation
    "a level above the class count": Case(
        _run("hierarchy.levels=[1000]"), "config key hierarchy.levels: k=1000 is outside 1..10 (the number of classes)"
    ),
    "a superclass name that matches no cluster": Case(
        _name_matching_no_cluster, "config section hierarchy: superclass name 'Odd' ('"
    ),
}
