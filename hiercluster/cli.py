"""Command-line interface: ``hiercluster SUBCOMMAND ...``.

Exit codes: 0 success, 2 bad input (one line on stderr naming what is wrong),
1 failure (an unexpected error, with its traceback), 130 interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import os
import sqlite3
import stat
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from hiercluster.errors import HierclusterError, path_problem, quote_path, short_repr
from hiercluster.limits import MAX_CLASSES, MAX_WIDTH

if TYPE_CHECKING:  # torch loads only when a command needs it
    import torch

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


# The longest argparse message printed: it quotes the user's argument ("invalid int value:
# 'xxx...'"), which may be as long as the system allows (128 KiB).
_MAX_USAGE_MESSAGE = 300


class _Parser(argparse.ArgumentParser):
    """argparse that exits with 2 and one line on a usage error (argparse's own exit code).

    argparse prints the whole usage block first; here the line points to ``--help`` instead.
    """

    def error(self, message: str) -> None:  # type: ignore[override]
        message = " ".join(message.split())
        if len(message) > _MAX_USAGE_MESSAGE:
            message = message[: _MAX_USAGE_MESSAGE - 3] + "..."
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# Caps of the numeric flags: the same as their config keys' (hiercluster.run.config), so that a flag
# and the key it overrides accept the same values.
_MAX_THREADS = 1024  # runtime.threads: more threads than any machine has cores
_MAX_LIMIT = 100_000_000  # data.limit: more images than any evaluation split has
_MAX_BATCH = 65_536  # data.batch_size: far above any batch a CNN is evaluated with
# Where ``evaluate`` saves each packed model's table, inside the run directory.


class _Version(argparse.Action):
    """``--version``: hiercluster's version and torch's, read without importing torch (which takes seconds)."""

    def __init__(self, option_strings: Sequence[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        print(version_text())
        parser.exit(EXIT_OK)


def version_text() -> str:
    """``hiercluster 0.1.0 (torch 2.3.1, Python 3.11.7)``."""
    import platform
    from importlib import metadata

    import hiercluster

    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = "not installed"
    return f"hiercluster {hiercluster.__version__} (torch {torch_version}, Python {platform.python_version()})"


def _count(highest: int):
    """An argparse ``type`` for a whole number from 1 to ``highest``, with a message that names the range."""

    def parse(text: str) -> int:
        refusal = f"expected a whole number from 1 to {highest:,}, got {short_repr(text)}"
        try:
            value = int(text)
        except ValueError:  # also a number of more than 4,300 digits, which int() refuses
            raise argparse.ArgumentTypeError(refusal) from None
        if not 1 <= value <= highest:
            raise argparse.ArgumentTypeError(refusal)
        return value

    parse.__name__ = "count"  # argparse names the type in some messages
    return parse


def _add_threads(p: argparse.ArgumentParser, config: bool = True) -> None:
    where = "overrides config key runtime.threads; " if config else ""
    p.add_argument(
        "--threads", type=_count(_MAX_THREADS), metavar="N",
        help=f"torch threads for this command ({where}default: the cores this process may use)",
    )


def _device_name(text: str) -> str:
    """An argparse ``type`` for ``--device``: the spelling only (no torch); availability is checked when the command starts."""
    from hiercluster.models.device import check_device_name

    try:
        return check_device_name(text, "--device")
    except HierclusterError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--device: ")) from None


def _add_device(p: argparse.ArgumentParser, config: bool = True) -> None:
    where = "overrides config key runtime.device; " if config else ""
    p.add_argument(
        "--device", type=_device_name, metavar="NAME",
        help=f"where the models run: auto (a CUDA GPU if there is one, else the CPU), cpu, cuda, "
        f"cuda:N or mps (experimental) ({where}default: auto); data stay on the CPU and each batch is moved there",
    )


def command_device(args: argparse.Namespace, cfg=None) -> torch.device:
    """The ``torch.device`` a command runs its models on: ``--device``, else config key runtime.device, else auto.

    Resolved when the command starts, so that a device this machine lacks is one line
    (exit 2) before any data or model loads.
    """
    from hiercluster.models.device import resolve_device

    if getattr(args, "device", None) is not None:
        return resolve_device(args.device, "--device")
    return resolve_device(cfg.runtime.device if cfg is not None else "auto")


def _add_limit(p: argparse.ArgumentParser, config: bool = True) -> None:
    where = "sets config key data.limit; " if config else ""
    p.add_argument(
        "--limit", type=_count(_MAX_LIMIT), metavar="N",
        help=f"evaluate a fixed, stratified subset of N images of the evaluation split, for trying things out "
        f"({where}every output says so)",
    )


def available_cores() -> int:
    """The number of cores this process may run on (its CPU affinity where the system has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def apply_threads(threads: int | None) -> int:
    """Set torch's threads to ``threads`` (None: :func:`available_cores`); returns the number set.

    torch's own default may exceed the cores a container or ``taskset`` grants, and on a
    shared machine oversubscription slows evaluation several times (issue 10 measured 86 s
    with torch's default against 12 s with one thread).
    """
    import torch

    n = threads or available_cores()
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(n)
    except RuntimeError:  # allowed once per process, before any parallel work; a later command in it keeps the first
        pass
    return n


def _load_config(args: argparse.Namespace):
    """The command's config with its flags applied (``--threads``, ``--device``, ``--limit``), and torch's threads set.

    A ``--device`` (or runtime.device) that this machine does not have is refused here.
    """
    import dataclasses

    from hiercluster.run.config import load_config

    cfg = load_config(args.config, args.overrides)
    if getattr(args, "threads", None) is not None:
        cfg = dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, threads=args.threads))
    if getattr(args, "device", None) is not None:
        command_device(args)  # named as --device when it is refused
        cfg = dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, device=args.device))
    else:
        command_device(args, cfg)
    if getattr(args, "limit", None) is not None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, limit=args.limit))
    apply_threads(cfg.runtime.threads)
    return cfg


def _warn_at_chance(command: str, accuracy: float, n_classes: int) -> None:
    """One warning line on stderr when the float model is within 2 pp of chance (or below): its results say nothing."""
    from hiercluster.report.markdown import chance_warning

    message = chance_warning(accuracy, n_classes)
    if message:
        sys.stdout.flush()  # the warning follows the accuracy it is about
        print(f"hiercluster {command}: warning: {_one_line(message)}", file=sys.stderr)


def subset_note(limit: dict | None, split: str) -> str:
    """``500 of 10,000 test images, a stratified subset`` for a limited evaluation; empty for a whole split.

    ``limit`` is run.json's ``data_limit`` record, ``{"limit": n, "of": N}``, or None.
    """
    if not limit:
        return ""
    return f"{int(limit['limit']):,} of {int(limit['of']):,} {split} images, a stratified subset"


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config value (YAML syntax), e.g. --set train.epochs=5; repeatable",
    )


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from hiercluster.data.datasets import load_dataset, make_loader
    from hiercluster.evaluation.inference import accuracy, collect_logits
    from hiercluster.models.zoo import (
        build_model,
        count_parameters,
        metadata_path,
        save_checkpoint,
    )
    from hiercluster.run.config import data_root, resolve_path
    from hiercluster.run.prepare import data_options
    from hiercluster.run.rundir import check_output_file
    from hiercluster.run.train import checkpoint_metadata, train_model

    cfg = _load_config(args)
    if not cfg.model.arch:
        raise HierclusterError(f"{args.config}: config key model.arch is required for training")
    out = Path(args.out) if args.out else (resolve_path(cfg.model.checkpoint, cfg.source) if cfg.model.checkpoint else None)
    if out is None:
        raise HierclusterError("where to save? set config key model.checkpoint or pass --out PATH")
    # Checked before training: the weights and their metadata must be two different files.
    if out.is_dir():
        raise HierclusterError(f"--out {out} is a folder; give a checkpoint file name such as {out / 'model.pt'}")
    if metadata_path(out) == out:
        raise HierclusterError(
            f"--out {out}: the metadata JSON would be written over the weights; use a name ending in .pt"
        )
    check_output_file(out)  # under a file, or over a run directory's own files (results.sqlite, run.json)
    check_output_file(metadata_path(out), f"--out {out}: its metadata")
    if not args.overwrite:
        for p in (out, metadata_path(out)):
            if p.exists():
                raise HierclusterError(f"{p} exists; pass --overwrite to replace it, or --out another path")
    root = data_root(cfg)
    options = data_options(cfg, from_checkpoint=False)  # the checkpoint to be written does not describe the data
    train_set = load_dataset(cfg.data.dataset, root, "train", cfg.data.download, augment=True, options=options)
    test_set = load_dataset(cfg.data.dataset, root, "test", cfg.data.download, options=options)
    device = command_device(args, cfg)
    torch.manual_seed(cfg.train.seed)
    info_x, _ = train_set[0]
    model = build_model(cfg.model.arch, len(train_set.classes), int(info_x.shape[0]), width=cfg.model.width)
    model = model.to(device)  # built on the CPU with the seeded initial weights, then moved: the same start everywhere
    print(
        f"training {cfg.model.arch} ({count_parameters(model):,} parameters) on {cfg.data.dataset} "
        f"({len(train_set)} train / {len(test_set)} test images) for {cfg.train.epochs} epochs on {device}"
    )
    history = train_model(model, train_set, cfg.train, eval_set=test_set if args.eval_every_epoch else None)
    acc = accuracy(*collect_logits(model, make_loader(test_set, cfg.data.batch_size)))
    meta = checkpoint_metadata(
        cfg.data.dataset, cfg.model.arch, cfg.model.width, train_set, cfg.train, history, acc, device=device
    )
    meta["config"] = cfg.to_dict()
    save_checkpoint(model.cpu(), out, meta, overwrite=args.overwrite)  # a checkpoint holds CPU tensors, loadable anywhere
    print(f"test accuracy {acc * 100:.2f}% after {meta['wall_time_s']:.0f} s; saved {out} and {metadata_path(out)}")
    return EXIT_OK


def cmd_evaluate_checkpoint(args: argparse.Namespace) -> int:
    from hiercluster.data.datasets import dataset_info, make_loader
    from hiercluster.evaluation.inference import accuracy, collect_logits
    from hiercluster.models.zoo import check_fits_data

    cfg = _load_config(args) if args.config else None
    if cfg is None:
        apply_threads(args.threads)
    device = command_device(args, cfg)
    checkpoint = Path(args.checkpoint)
    meta = _checkpoint_metadata(checkpoint)
    arch, width = _checkpoint_arch(args, cfg, meta, checkpoint)
    dataset = args.dataset or (cfg.data.dataset if cfg else None) or (meta or {}).get("dataset")
    if not dataset:
        why = "its metadata names no dataset" if meta is not None else "it has no metadata naming its dataset"
        raise HierclusterError(f"which data to evaluate {checkpoint} on? {why}; pass --dataset NAME")
    split = args.split or (cfg.data.eval_split if cfg else "test")
    test_set, limited = _checkpoint_eval_set(args, cfg, meta, dataset, split)
    info = dataset_info(test_set)
    classes, in_channels = list(info["classes"]), int(info["in_channels"])
    if meta is not None:
        check_fits_data(meta, checkpoint, dataset, classes, in_channels)
    model = _checkpoint_model(checkpoint, meta, arch, width, args.num_classes, len(classes), in_channels).to(device)
    batch_size = args.batch_size or (cfg.data.batch_size if cfg else 128)
    start = time.perf_counter()
    acc = accuracy(*collect_logits(model, make_loader(test_set, batch_size)))
    elapsed = time.perf_counter() - start
    images = subset_note(limited, split) or f"{split} split, {len(test_set):,} images"
    print(f"{checkpoint}: {arch} on {dataset} ({images}): accuracy {acc * 100:.2f}% ({elapsed:.1f} s)")
    _warn_at_chance("evaluate-checkpoint", acc, len(classes))
    return EXIT_OK


def _checkpoint_metadata(checkpoint: Path) -> dict | None:
    """The checkpoint's metadata JSON (checked), or None when there is none beside it (a plain state_dict)."""
    from hiercluster.models.zoo import metadata_path, read_metadata

    if not (checkpoint.exists() or checkpoint.is_symlink()):  # a dangling link is named by the loader
        raise HierclusterError(f"checkpoint not found: {quote_path(checkpoint)}")
    meta_file = metadata_path(checkpoint)
    if not (meta_file.exists() or meta_file.is_symlink()):
        return None
    return read_metadata(checkpoint)


def _checkpoint_arch(args: argparse.Namespace, cfg, meta: dict | None, checkpoint: Path) -> tuple[str, int]:
    """``(arch, width)`` of the checkpoint's model: from its metadata, else ``--arch``/``--width`` (or the config).

    Flags that contradict the metadata are refused: the metadata describes the weights.
    """
    from hiercluster.models.zoo import metadata_path

    arch = args.arch or (cfg.model.arch if cfg else None)
    width = args.width or (cfg.model.width if cfg else 16)
    if meta is None:
        if not arch:
            raise HierclusterError(
                f"checkpoint {checkpoint} has no metadata file {metadata_path(checkpoint).name} beside it: pass its "
                "architecture with --arch NAME (and --width N for a small ResNet not of width 16)"
            )
        return arch, width
    for flag, given, saved in (
        ("--arch", args.arch, meta["arch"]),
        ("--width", args.width, meta.get("width", 16)),
        ("--num-classes", args.num_classes, meta["num_classes"]),
    ):
        if given is not None and given != saved:
            raise HierclusterError(
                f"{flag} {short_repr(given)} contradicts the metadata of {checkpoint} ({saved}); leave {flag} out"
            )
    return meta["arch"], int(meta.get("width", 16))


def _checkpoint_eval_set(args: argparse.Namespace, cfg, meta: dict | None, dataset: str, split: str):
    """``(evaluation set, subset record or None)`` for ``evaluate-checkpoint``."""
    from hiercluster.data.datasets import (
        limit_dataset,
        load_dataset,
        resolve_folder_options,
    )
    from hiercluster.models.zoo import metadata_path
    from hiercluster.run.config import data_root

    if args.root and not Path(args.root).exists():
        raise HierclusterError(f"--root {args.root}: folder not found")
    root = args.root or (data_root(cfg) if cfg else None)
    options = resolve_folder_options(dataset, cfg.data if cfg else None, meta, metadata_path(args.checkpoint))
    test_set = load_dataset(dataset, root, split, cfg.data.download if cfg else False, options=options)
    limit = cfg.data.limit if cfg else args.limit
    if limit is None:
        return test_set, None
    limited = limit_dataset(test_set, limit, f"the {split} split of {dataset}")
    return limited, {"limit": len(limited), "of": len(test_set)}


def _checkpoint_model(
    checkpoint: Path,
    meta: dict | None,
    arch: str,
    width: int,
    num_classes: int | None,
    n_classes: int,
    in_channels: int,
):
    """The checkpoint's model: rebuilt from its metadata, or built from ``arch``/``width`` with its weights loaded."""
    from hiercluster.models.zoo import build_model, load_checkpoint

    if meta is not None:
        return load_checkpoint(checkpoint)[0]
    if num_classes is not None and num_classes != n_classes:
        raise HierclusterError(
            f"--num-classes {num_classes}: the data has {n_classes} classes; "
            "a model is evaluated on data of its own classes"
        )
    try:
        return build_model(arch, n_classes, in_channels, weights=checkpoint, width=width)
    except HierclusterError as exc:
        raise HierclusterError(f"{exc} (built as --arch {arch} --width {width}, {n_classes} classes)") from None


def _run_dir(args: argparse.Namespace, cfg) -> Path:
    """``--out``, else config key output.dir; kept in ``args.out`` so that an error can name the run's database."""
    args.out = args.out or cfg.output.dir
    return Path(args.out)


def _command_line(args: argparse.Namespace) -> str:
    """``hiercluster run CONFIG``: how a command holding a run directory's lock is named to the others."""
    target = getattr(args, "config", None) or getattr(args, "run_dir", None) or ""
    return f"hiercluster {args.command} {target}".strip()


def _print_levels_table(rows: list[dict], title: str) -> None:
    print(title)
    print(f"  {'level':<10} {'k':>3} {'float %':>8} {'quant %':>8} {'drop pp':>8} {'random drop':>12} {'advantage':>10}")
    for r in rows:
        print(
            f"  {r['level']:<10} {r['k']:>3} {100 * r['acc_float']:>8.2f} {100 * r['acc_quant']:>8.2f} {r['drop']:>+8.2f} "
            f"{r['random_drop_mean']:>+7.2f}±{r['random_drop_std']:<4.2f} {r['advantage']:>+10.2f}"
        )


def cmd_run(args: argparse.Namespace) -> int:
    from hiercluster.report.markdown import format_headline, write_report
    from hiercluster.run.executors import make_executor
    from hiercluster.run.pipeline import run_pipeline
    from hiercluster.run.rundir import DB_FILE

    executor = make_executor(args.executor, args.address)
    cfg = _load_config(args)
    out = _run_dir(args, cfg)
    start = time.perf_counter()
    try:
        summary = run_pipeline(
            cfg, out, progress=not args.quiet, force=args.force, command=_command_line(args), then=write_report,
            executor=executor,
        )
    except KeyboardInterrupt:
        print(
            f"hiercluster run: interrupted; finished specs are saved in {out / DB_FILE}. "
            "Run the same command again to resume.",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    names = {name: lv["names"] for name, lv in summary["levels"].items()}
    t = summary["timings"]
    subset = subset_note(summary.get("data_limit"), cfg.data.eval_split)
    print(
        f"\nfloat accuracy {100 * summary['float_accuracy']:.2f}%{f' (on {subset})' if subset else ''}; "
        f"{t['specs_run']} of {t['specs_total']} specs run in {time.perf_counter() - start:.1f} s"
    )
    _warn_at_chance("run", summary["float_accuracy"], len(summary["class_names"]))
    print()
    print(format_headline(summary["headline"], names, cfg.eval.tolerance, len(summary["class_names"])))
    print(f"\nreport: {summary['then']}")
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from hiercluster.evaluation.metrics import headline
    from hiercluster.evaluation.selection import headline_rows
    from hiercluster.report.markdown import format_headline, load_run, write_report
    from hiercluster.run.rundir import RunLock, check_is_run

    apply_threads(args.threads)
    check_is_run(Path(args.run_dir))  # before the lock, which would create a missing folder
    with RunLock(args.run_dir, _command_line(args), other_out=False):
        path = write_report(args.run_dir)
        info, rows, store = load_run(args.run_dir)
        store.close()
    names = {name: lv["names"] for name, lv in info["levels"].items()}
    table = headline(headline_rows(info, rows), info["tolerance"])
    print(format_headline(table, names, info["tolerance"], len(info["class_names"])))
    _warn_at_chance("report", info["float_accuracy"], len(info["class_names"]))
    print(f"\nreport: {path}")
    return EXIT_OK


def cmd_hierarchy(args: argparse.Namespace) -> int:
    from hiercluster.report.plots import plot_dendrogram
    from hiercluster.run.pipeline import write_hierarchy_files
    from hiercluster.run.prepare import prepare
    from hiercluster.run.rundir import (
        DENDROGRAM_FILE,
        HIERARCHY_FILE,
        LEVELS_DIR,
        TREES_DIR,
        RunLock,
        check_run_dir,
        check_same_hierarchy,
    )

    cfg = _load_config(args)
    out = _run_dir(args, cfg)
    check_run_dir(out)
    with RunLock(out, _command_line(args)):
        prep = prepare(cfg, out, progress=not args.quiet, float_logits=False)  # a tree needs no float logits
        check_same_hierarchy(prep, out)
        write_hierarchy_files(prep, out)
        plot_dendrogram(prep.hierarchy, out / DENDROGRAM_FILE)
    for name, tree in prep.trees.items():
        print(f"class hierarchy from {name} ({tree.linkage} linkage, {tree.metric} metric):")
        for level in prep.levels.values():
            if level.kind == "learned" and level.tree in ("", name):
                print(f"  k={level.k}: " + "; ".join(level.names))
        if prep.reference_groups is not None:
            cmp_ = tree.compare(prep.reference_groups)
            print(f"  vs reference {cfg.hierarchy.reference}: ARI {cmp_['ari']:.3f}, NMI {cmp_['nmi']:.3f}")
    more = f", {out / TREES_DIR}/*.json" if len(prep.trees) > 1 else ""
    print(f"wrote {out / HIERARCHY_FILE}{more}, {out / LEVELS_DIR}/k*.yaml and {out / DENDROGRAM_FILE}")
    return EXIT_OK


def _spec_from_args(args: argparse.Namespace, cfg):
    from hiercluster.run.grid import grid_spec

    q = cfg.quant
    try:
        return grid_spec(
            cfg, args.scheme or q.schemes[0], args.bits, args.clipping or q.clipping[0], args.granularity or q.granularity[0]
        )
    except ValueError as exc:
        raise HierclusterError(str(exc)) from None


def _plan_from_args(args: argparse.Namespace, cfg):
    import quant

    plans = {p.name: p for p in cfg.quant.plans}
    if args.plan is None:  # like --scheme and --clipping: the grid's first plan (the default grid's "full")
        if not plans:
            return quant.QuantPlan(name="full")
        name = next(iter(plans))
    elif args.plan not in plans:
        names = ", ".join(short_repr(name, 40) for name in list(plans)[:10]) + (", ..." if len(plans) > 10 else "")
        raise HierclusterError(f"--plan {short_repr(args.plan)} is not in config key quant.plans (names: {names})")
    else:
        name = args.plan
    try:
        return quant.QuantPlan.from_dict(plans[name].quant_plan_dict())
    except ValueError as exc:  # a plan setting out of range (layer_bits: {conv1: 99}); QuantError is one too
        raise HierclusterError(f"config section quant: {exc}") from None


def cmd_quantize(args: argparse.Namespace) -> int:
    import json

    import quant
    from hiercluster.data.datasets import dataset_info, load_dataset
    from hiercluster.models.zoo import metadata_path
    from hiercluster.run.config import data_root, resolve_path
    from hiercluster.run.grid import GridPoint, calibration_settings, check_plans_fit
    from hiercluster.run.prepare import data_options, load_calibration, load_float_model
    from hiercluster.run.rundir import check_output_file
    from quant._files import write_text_atomic

    cfg = _load_config(args)
    if args.method not in quant.METHODS:
        raise HierclusterError(f"--method {short_repr(args.method)} is not a method; allowed: {', '.join(quant.METHODS)}")
    out = Path(args.out)
    report_file = out.with_name(out.name + ".json")
    check_output_file(out)
    if out.suffix in (".json", ".pt", ".pth", ".yaml"):
        raise HierclusterError(f"--out {out}: use a name ending in .hcq for the packed model (not {out.suffix})")
    check_output_file(report_file, f"--out {out}: its report")
    if not args.overwrite:
        for p in (out, report_file):
            if p.exists():
                raise HierclusterError(f"{p} exists; pass --overwrite to replace it, or --out another path")
    spec, plan = _spec_from_args(args, cfg), _plan_from_args(args, cfg)
    if cfg.model.checkpoint:
        ckpt_path = resolve_path(cfg.model.checkpoint, cfg.source)
        protected = {ckpt_path.resolve(), metadata_path(ckpt_path).resolve()}
        for p in (out, report_file):
            if p.resolve() in protected:
                raise HierclusterError(f"--out {out} would write {p}, which belongs to the checkpoint; choose another name")
    eval_set = load_dataset(cfg.data.dataset, data_root(cfg), cfg.data.eval_split, cfg.data.download, options=data_options(cfg))
    info = dataset_info(eval_set)
    model, ckpt = load_float_model(cfg, list(info["classes"]), info["in_channels"])
    model = model.to(command_device(args, cfg))  # calibration batches stay on the CPU; quant moves each one
    point = GridPoint(spec, plan, method=args.method, bn_reestimate=args.bn_reestimate)
    check_plans_fit(model, [point], str(ckpt))  # before calibration data is loaded
    calibration = load_calibration(cfg, point.calibration_user) if point.needs_calibration else None
    try:
        qmodel, report = quant.quantize_model(
            model, spec, plan, method=point.method, bn_reestimate=point.bn_reestimate, calibration=calibration,
            seed=cfg.calibration.seed,
        )
    except quant.QuantError as exc:
        raise HierclusterError(str(exc)) from None
    sizes = quant.model_size(qmodel, report)
    out.parent.mkdir(parents=True, exist_ok=True)
    quant.save_packed(out, qmodel, report, overwrite=args.overwrite)
    write_text_atomic(
        report_file,
        json.dumps({"checkpoint": str(ckpt), "spec": spec.to_dict(), "plan": plan.to_dict(), "method": point.method,
                    "bn_reestimate": point.bn_reestimate,
                    "calibration": calibration_settings(cfg) if calibration is not None else None,
                    "sizes": sizes, "report": report.to_dict()}, indent=2, default=str) + "\n"
    )
    fitted = ""
    if calibration is not None:
        fitted = f", {point.method_label} on {sum(len(b) for b in calibration)} {cfg.calibration.split} images"
    print(f"{spec.tag} (plan {plan.name}{fitted}) of {ckpt}: average {report.avg_bits:.3f} bits per weight")
    print(
        f"  fp32 {sizes['fp32_bytes'] / 1024:.1f} KB -> packed {sizes['packed_bytes'] / 1024:.1f} KB "
        f"(gzip {sizes['gzip_bytes'] / 1024:.1f} KB, xz {sizes['xz_bytes'] / 1024:.1f} KB)"
    )
    print(f"wrote {out} and {report_file}")
    return EXIT_OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    import quant
    from hiercluster.evaluation.inference import collect_logits
    from hiercluster.run.prepare import prepare
    from hiercluster.run.rundir import (
        RunLock,
        check_output_file,
        check_run_dir,
        evaluation_path,
        write_json,
    )
    from hiercluster.run.sweep import level_metrics, sweep_context

    cfg = _load_config(args)
    packed = Path(args.packed)
    if packed.is_dir():
        raise HierclusterError(f"--packed {packed} is a folder; give a packed model file (.hcq, from `hiercluster quantize`)")
    out = _run_dir(args, cfg)
    check_run_dir(out)
    record = evaluation_path(out, packed)
    check_output_file(record, f"--packed {packed}: its evaluation record")
    try:
        quant.read_packed_header(packed)  # its header is checked before the data and the model are loaded
    except quant.QuantError as exc:
        raise HierclusterError(str(exc)) from None
    with RunLock(out, _command_line(args)):
        prep = prepare(cfg, out, progress=not args.quiet, float_logits=False)
        try:
            qmodel = quant.load_packed(packed, prep.model)
        except quant.QuantError as exc:
            raise HierclusterError(str(exc)) from None
        prep.evaluate_float(progress=not args.quiet)  # after the packed model is known to fit
        qlogits, _ = collect_logits(qmodel, prep.loader())
        rows = [
            {**dataclasses.asdict(row), "names": list(prep.levels[row.level].names)}
            for row in level_metrics(sweep_context(prep), qlogits)
        ]
        limited = prep.data_limit
        record.parent.mkdir(parents=True, exist_ok=True)
        write_json(record, _evaluation_record(packed, cfg, prep, rows, limited))
    subset = subset_note(limited, cfg.data.eval_split)
    _print_levels_table(
        rows,
        f"{packed} against merged heads ({cfg.eval.reduction}, {cfg.eval.random_seeds} random groupings"
        f"{f'; on {subset}' if subset else ''}):",
    )
    print(f"\nsaved {record}")
    return EXIT_OK


def _evaluation_record(packed: Path, cfg, prep, rows: list[dict], limited: dict | None) -> dict:
    """What ``evaluate`` saves: the packed model, the data and settings it was scored with, and every level's row."""
    from hiercluster.evaluation.inference import accuracy

    return {
        "packed": str(packed),
        "config": cfg.source,
        "checkpoint_sha256": prep.checkpoint_digest,
        "dataset": cfg.data.dataset,
        "eval_split": cfg.data.eval_split,
        "n_eval": len(prep.labels),
        "data_limit": limited,
        "float_accuracy": accuracy(prep.float_logits, prep.labels),
        "reduction": cfg.eval.reduction,
        "random_seeds": cfg.eval.random_seeds,
        "tolerance": cfg.eval.tolerance,
        "levels": rows,
    }


def _print_sensitivity(result, prep, cfg) -> None:
    """The table of ``hiercluster sensitivity``, its verdict line and the non-additivity warning."""
    subset = subset_note(prep.data_limit, cfg.data.eval_split)
    k = result.k
    print(
        f"layer sensitivity at {result.spec.tag} (round to nearest) on {result.n_samples:,} samples"
        f"{f' ({subset})' if subset else ''}; pp with ±1 SE (paired):"
    )
    print(f"  float {100 * result.float_acc['fine']:.2f}% fine, {100 * result.float_acc['k']:.2f}% at k={k}; "
          f"whole model quantized {100 * result.whole_acc['fine']:.2f}% / {100 * result.whole_acc['k']:.2f}%")
    width = max([len("layer")] + [len(r.layer) for r in result.rows])
    print(f"  {'layer':<{width}} {'params':>9} {'drop fine':>14} {f'drop k={k}':>14} {'gain fine':>14} {f'gain k={k}':>14}")
    for r in result.rows:
        cells = [(r.drop_fine, r.se_drop_fine), (r.drop_k, r.se_drop_k), (r.gain_fine, r.se_gain_fine), (r.gain_k, r.se_gain_k)]
        print(f"  {r.layer:<{width}} {r.params:>9,} " + " ".join(f"{f'{v:+.2f}±{se:.2f}':>14}" for v, se in cells))
    v, a = result.verdict, result.additivity
    early = v["early"]
    print(
        f"\nverdict: \"the initial layers matter most\" {v['verdict']}: the first {len(early)} of {len(result.rows)} "
        f"layers drop {v['mean_early']:.2f} pp on average when quantized alone, the other {len(result.rows) - len(early)} "
        f"{v['mean_rest']:.2f} pp (difference {v['mean_early'] - v['mean_rest']:+.2f} ± {v['se']:.2f} pp); "
        f"most sensitive: {v['most_sensitive']}"
    )
    print(f"  ({v['rule']})")
    print(
        f"warning: effects are not additive: the {len(result.rows)} single-layer drops sum to {a['sum_fine']:.1f} pp, "
        f"the whole model quantized drops {a['whole_fine']:.1f} pp (fine); at k={k}: {a['sum_k']:.1f} pp against "
        f"{a['whole_k']:.1f} pp"
    )


def cmd_sensitivity(args: argparse.Namespace) -> int:
    from hiercluster.report.sensitivity_plot import plot_sensitivity
    from hiercluster.run.rundir import RunLock, check_run_dir, sensitivity_paths
    from hiercluster.run.sensitivity import run_sensitivity

    cfg = _load_config(args)
    out = _run_dir(args, cfg)
    check_run_dir(out)
    with RunLock(out, _command_line(args)):
        result, prep, csv_path = run_sensitivity(cfg, out, args.bits, args.k, args.scheme, progress=not args.quiet)
        png = plot_sensitivity(
            result.rows, sensitivity_paths(out, result.spec.tag, result.k)[1], result.k,
            title=f"layer sensitivity, {result.spec.tag}, {result.n_samples:,} samples",
        )
    _print_sensitivity(result, prep, cfg)
    print(f"\nwrote {csv_path} and {png} ({result.seconds:.1f} s)")
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from hiercluster.run.onnx import check_export_packages, export_level
    from hiercluster.run.rundir import check_is_run, check_output_file

    apply_threads(args.threads)
    check_export_packages()
    out = Path(args.out)
    if out.suffix != ".onnx":
        raise HierclusterError(f"--out {out}: use a name ending in .onnx for the ONNX model")
    check_output_file(out)
    if out.exists() and not args.overwrite:
        raise HierclusterError(f"{out} exists; pass --overwrite to replace it, or --out another path")
    check_is_run(Path(args.run_dir))
    result = export_level(
        args.run_dir, args.level, out, spec=args.spec, fine_logits=args.fine_logits, checkpoint=args.checkpoint
    )
    _print_export(result)
    return EXIT_OK


def _print_export(result) -> None:
    """What ``export`` wrote: the level and spec, the check in ONNX Runtime, the weight types, the sizes."""
    from collections import Counter

    row, info = result.row, result.info
    print(
        f"level {result.level}: {result.k} superclasses ({result.reduction}), spec {row['tag']}, "
        f"{row['avg_bits']:.2f} average bits per weight, weights from {result.source}"
    )
    print(f"  superclasses: {'; '.join(result.superclasses)}")
    subset = subset_note(result.data_limit, "evaluation")
    print(
        f"  ONNX Runtime {info['onnxruntime']} on {result.n_checked:,} images{f' ({subset})' if subset else ''}: "
        f"superclass argmax agrees with PyTorch on {100 * result.agreement:.2f}%, max abs score difference "
        f"{result.max_abs_diff:.2g}; superclass accuracy {100 * result.onnx_accuracy:.2f}% "
        f"(the run measured {100 * row['acc_quant']:.2f}%)"
    )
    types = Counter(layer["onnx_type"] for layer in info["layers"])
    print(f"  opset {info['opset']}; weights: " + ", ".join(f"{n} x {t}" for t, n in sorted(types.items())))
    sizes = result.sizes()
    labels = ("fp32", "packed", "gzip", "xz", "onnx")
    print("  " + " ".join(f"{label + ' KB':>10}" for label in labels))
    print("  " + " ".join(f"{'-' if v is None else f'{v / 1024:.1f}':>10}" for v in sizes.values()))
    print(f"wrote {info['path']}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="hiercluster",
        description="How few bits can a classifier's weights have, and at which granularity of labels does it still work?",
    )
    parser.add_argument("--version", action=_Version, help="print the versions of hiercluster and torch, and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("train", help="train a baseline from a config; saves checkpoint + metadata JSON",
                       description="Train the model of a config (sections data, model, train) and save "
                       "model.checkpoint with a metadata JSON beside it.")
    p.add_argument("config", help="YAML config file")
    _add_set(p)
    p.add_argument("--out", help="checkpoint path (default: config key model.checkpoint)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint")
    p.add_argument("--eval-every-epoch", action="store_true", help="print test accuracy after each epoch")
    _add_threads(p)
    _add_device(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate-checkpoint", help="print a checkpoint's accuracy on its dataset's test split",
                       description="Load a checkpoint and print its accuracy. With a metadata JSON beside it (as "
                       "`hiercluster train` writes) the model is rebuilt from that; a plain state_dict needs --arch. "
                       "Flags override --config; the data defaults to the metadata's dataset.")
    p.add_argument("checkpoint", help="a .pt state_dict, with or without a .json metadata file beside it")
    p.add_argument("--config", help="YAML config whose data and model sections apply (dataset, root, image "
                   "folder options, arch, width, limit, threads, device)")
    p.add_argument("--dataset", help="dataset name (default: config key data.dataset, else the metadata's)")
    p.add_argument("--root", help="dataset folder (default: config key data.root, else the usual places)")
    p.add_argument("--split", choices=["train", "test"],
                   help="which split to evaluate on (default: config key data.eval_split, else test)")
    p.add_argument("--batch-size", type=_count(_MAX_BATCH), metavar="N",
                   help="images per forward pass; only speed and memory depend on it (default: config key "
                   "data.batch_size, else 128)")
    p.add_argument("--arch", help="architecture of a plain state_dict without metadata, e.g. resnet20 or resnet18 "
                   "(default: config key model.arch)")
    p.add_argument("--width", type=_count(MAX_WIDTH), metavar="N",
                   help="base width of a small ResNet given by --arch (default: config key model.width, else 16)")
    p.add_argument("--num-classes", type=_count(MAX_CLASSES), metavar="N",
                   help="output classes of the state_dict's model; must equal the data's (default: the data's)")
    _add_limit(p, config=False)
    _add_threads(p, config=False)
    _add_device(p, config=False)
    p.set_defaults(func=cmd_evaluate_checkpoint, overrides=[])

    def run_like(name: str, help_: str, description: str, func) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=description)
        p.add_argument("config", help="YAML config file")
        _add_set(p)
        p.add_argument("--out", help="run directory (default: config key output.dir)")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        _add_threads(p)
        _add_device(p)
        p.set_defaults(func=func)
        return p

    p = run_like(
        "run", "everything: float logits, hierarchy, the quantization sweep, results and report",
        "Evaluate the float model once, build the class hierarchy, quantize and evaluate every spec of the "
        "config's quant grid against every level and its random baseline, store results in DIR/results.sqlite "
        "(re-running resumes), and write DIR/report.md with plots. Prints the headline table.",
        cmd_run,
    )
    _add_limit(p)
    p.add_argument(
        "--force", action="store_true",
        help="run into a directory that holds a run of another grid (its report then describes only this grid)",
    )
    p.add_argument(
        "--executor", choices=("serial", "ray"), default="serial",
        help="who runs the specs: serial (default, one after another here) or ray (each spec as a Ray task; "
        "needs pip install 'hiercluster[ray]'); this process alone writes DIR, so either resumes the other's run",
    )
    p.add_argument(
        "--address", metavar="ADDR",
        help="with --executor ray: the Ray cluster to use (auto, HOST:6379 or ray://HOST:10001; "
        "`ray status` on the head node prints it), checked before the run starts; "
        "default: a local Ray instance with this machine's CPUs",
    )
    run_like(
        "hierarchy", "build and save the class hierarchy, its levels and dendrogram",
        "Build the class hierarchy of the config's model (section hierarchy) and write DIR/hierarchy.json, "
        "DIR/levels/k*.yaml and DIR/dendrogram.png.",
        cmd_hierarchy,
    )
    p = sub.add_parser("quantize", help="quantize the model with one spec; write the bit-packed model and size report",
                       description="Quantize the config's model with one spec and method and write the bit-packed "
                       "model (OUT) and a JSON size and per-layer report beside it (OUT.json, e.g. model-4b.hcq.json). "
                       "Calibrated methods fit on the config's section calibration (never the evaluation split).")
    p.add_argument("config", help="YAML config file")
    _add_set(p)
    p.add_argument("--bits", type=int, required=True, help="weight bits, 2..16")
    p.add_argument("--scheme", help="asymmetric, symmetric, pow2 or binary (1 bit; default: first of quant.schemes)")
    p.add_argument("--clipping", help="weight range setting, e.g. minmax or mse (default: first of quant.clipping)")
    p.add_argument("--granularity", help="per_channel or per_tensor (default: first of quant.granularity)")
    p.add_argument("--plan", help="name of a plan in quant.plans (default: first of quant.plans; the default "
                   "config's is 'full', every layer quantized)")
    p.add_argument("--method", default="rtn",
                   help="rtn (round to nearest, no data), gptq or adaround (fit on the config's calibration section)")
    p.add_argument("--bn-reestimate", action="store_true",
                   help="re-estimate BN statistics after rounding, on the config's calibration section")
    p.add_argument("--out", required=True, help="packed model file to write, e.g. model-4b.hcq")
    p.add_argument("--overwrite", action="store_true", help="replace existing files")
    _add_threads(p)
    _add_device(p)
    p.set_defaults(func=cmd_quantize)

    p = run_like(
        "evaluate", "evaluate one bit-packed model against every level's merged head",
        "Evaluate a bit-packed model (from `hiercluster quantize`) against the merged heads of every level of "
        "the hierarchy and their random baselines; prints a table and saves it as DIR/evaluations/NAME.json "
        "(NAME: the packed file's name without its suffix).",
        cmd_evaluate,
    )
    p.add_argument("--packed", required=True, help="bit-packed model file")
    _add_limit(p)

    p = run_like(
        "sensitivity", "per layer: the drop when only it is quantized, the gain when only it stays float",
        "For every quantizable weight, quantize only it (and, separately, everything but it) at --bits with the "
        "config's first scheme, clipping and granularity (round to nearest), and measure the fine and level-k "
        "accuracy change on the evaluation split against the float model (and against the whole model quantized), "
        "with paired standard errors. Writes DIR/sensitivity/TAG-kK.csv and .png, prints a table, a verdict on "
        "\"the initial layers matter most\" and the sum of single-layer drops against the whole model's drop.",
        cmd_sensitivity,
    )
    p.add_argument("--bits", type=int, required=True, help="weight bits (2..16; 2..8 for pow2)")
    p.add_argument("--k", type=int, help="the grouped level: k superclasses of the learned hierarchy, 2..C-1 "
                   "(default: the smallest k > 1 of config key hierarchy.levels, else 2)")
    p.add_argument("--scheme", help="asymmetric, symmetric, pow2 or binary (1 bit; default: first of quant.schemes)")
    _add_limit(p)

    p = sub.add_parser("report", help="rebuild the report of a run directory",
                       description="Rebuild DIR/report.md and its plots from DIR/run.json and DIR/results.sqlite.")
    p.add_argument("run_dir", help="a run directory written by `hiercluster run`")
    _add_threads(p, config=False)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("export", help="write one level's quantized model with its merged head as ONNX",
                       description="Write the quantized model of one level of a run (its headline winner, or --spec) "
                       "as an ONNX file: integer weights with DequantizeLinear, the merged head of the run's reduction "
                       "in the graph (output 'scores', one per superclass), superclass names, grouping, spec, average "
                       "bits and the run's accuracies in its metadata. Checked in ONNX Runtime on the run's evaluation "
                       "set before it is written. Needs pip install 'hiercluster[export]'.")
    p.add_argument("run_dir", help="a run directory written by `hiercluster run`")
    p.add_argument("--level", required=True, help="a level of the run, e.g. k=5 (with several trees, k=5 is the "
                   "tree chosen for k=5; or k=5 confusion), or reference")
    p.add_argument("--spec", help="a spec tag of the run's grid (default: the level's headline winner)")
    p.add_argument("--out", required=True, help="ONNX file to write, e.g. model.onnx")
    p.add_argument("--fine-logits", action="store_true", help="also output the fine logits ('logits')")
    p.add_argument("--checkpoint", help="the run's float checkpoint, when its recorded path does not lead to it "
                   "from here (checked against the run's sha256)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    _add_threads(p, config=False)
    p.set_defaults(func=cmd_export)
    return parser


# A full disk (or a file-size limit) and a read-only file system are the user's to fix.
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_NOT_WRITABLE = {errno.EROFS}
_PERMISSION = {errno.EACCES, errno.EPERM}


def storage_problem(exc: BaseException, command: str, db_file: Path | None = None) -> str | None:
    """One line for a full disk, an unwritable folder or a results database that cannot be used, or None.

    ``OSError`` carries an errno; SQLite says the same things in words
    ("database or disk is full", "attempt to write a readonly database", "disk I/O error",
    "database is locked"). ``db_file`` is the run's results database, when the command has
    one: SQLite's errors do not name their file. Work that finished is never undone by
    such an error: results are committed per spec and files are replaced atomically, so
    the advice is to fix the cause and re-run.
    """
    resume = "finished specs are saved; " if command in ("run", "evaluate", "hierarchy") else ""
    if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
        where = f" writing {quote_path(exc.filename)}" if exc.filename else ""
        return f"no space left on the device{where} ({os.strerror(exc.errno)}); {resume}free space and re-run"
    if isinstance(exc, OSError) and (exc.errno in _NOT_WRITABLE or (exc.errno in _PERMISSION and _denied_writing(exc))):
        where = quote_path(exc.filename) if exc.filename else "a file"
        return f"cannot write {where} ({os.strerror(exc.errno)}); {resume}make it writable or choose another --out, and re-run"
    if isinstance(exc, sqlite3.OperationalError):
        return _database_problem(str(exc), resume, db_file)
    return None


def _denied_writing(exc: OSError) -> bool:
    """Whether permission was denied to write: the file's folder is not writable (``os.access``).

    A file that exists and cannot be read, or a case ``os.access`` cannot tell (root),
    is left to :func:`hiercluster.errors.path_problem`, whose words fit reading too.
    """
    if exc.filename is None:
        return True  # SQLite and other writers that do not say which file
    path = os.fsdecode(exc.filename)
    if os.path.lexists(path) and not os.access(path, os.R_OK):
        return False
    parent = os.path.dirname(os.path.abspath(path))
    return os.path.isdir(parent) and not os.access(parent, os.W_OK)


def _database_problem(text: str, resume: str, db_file: Path | None) -> str | None:
    """One line for an SQLite error that is not damage: full, read-only, not a file, or in use."""
    name = f"the results database {quote_path(db_file)}" if db_file is not None else "the results database"
    kind = _file_kind_of(db_file)
    if kind is not None:
        return f"{name} is {kind}, not a database file; move it away and re-run"
    if "locked" in text:
        return (
            f"{name} is in use by another program (SQLite: {text}); {resume}"
            "close that program (or wait for it) and re-run"
        )
    if "full" in text or "disk I/O error" in text:
        return f"{name} could not be written (SQLite: {text}); {resume}free space and re-run"
    if "readonly" in text or "unable to open database file" in text:
        return (
            f"{name} could not be written (SQLite: {text}); {resume}"
            "make the run directory writable or choose another --out, and re-run"
        )
    return None


def _file_kind_of(path: Path | None) -> str | None:
    """What ``path`` is when it exists and is not a regular file ("a named pipe (FIFO)"), else None."""
    from quant._files import file_kind

    if path is None:
        return None
    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    return None if stat.S_ISREG(mode) else file_kind(mode)


def _results_database(args: argparse.Namespace) -> Path | None:
    """The results database of the command's run directory, when it has one (see :func:`_run_dir`)."""
    folder = getattr(args, "run_dir", None) or getattr(args, "out", None)
    if folder is None or args.command not in ("run", "evaluate", "hierarchy", "report", "export"):
        return None
    from hiercluster.run.rundir import DB_FILE

    return Path(folder) / DB_FILE


def _problem(exc: BaseException, args: argparse.Namespace) -> str | None:
    """The one line for an ``OSError``, SQLite or pathlib error the user can fix, or None (a bug)."""
    return storage_problem(exc, args.command, _results_database(args)) or path_problem(exc)


def _one_line(message: str) -> str:
    """``message`` with line breaks and control characters escaped (``\\n``), so that it prints as one line.

    Messages are written as one line; what they quote may still hold a line break (a
    file name may, on Linux), and one line is what a user's scripts and the tests rely on.
    """
    if message.isprintable():
        return message
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in message)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace | int:
    """The parsed command line, or the exit code of ``--help`` or of a usage error (already printed)."""
    try:
        return build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse exits; main returns its code, so that callers and tests see it
        return exc.code if isinstance(exc.code, int) else EXIT_BAD_INPUT


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    if isinstance(args, int):
        return args
    from hiercluster.interrupt import check, handle_interrupts, requested

    with handle_interrupts():
        try:
            check()  # a Ctrl-C while torch loaded
            code = args.func(args)
        except HierclusterError as exc:
            print(f"hiercluster {args.command}: error: {_one_line(str(exc))}", file=sys.stderr)
            code = EXIT_BAD_INPUT
        except KeyboardInterrupt:
            print(f"hiercluster {args.command}: interrupted", file=sys.stderr)
            code = EXIT_INTERRUPTED
        except (OSError, sqlite3.Error, RuntimeError) as exc:  # RuntimeError: pathlib's "Symlink loop from ..."
            problem = _problem(exc, args)
            if problem is None:
                raise
            print(f"hiercluster {args.command}: error: {_one_line(problem)}", file=sys.stderr)
            code = EXIT_BAD_INPUT
        if requested() and code != EXIT_INTERRUPTED:  # Ctrl-C during a step that had no check left
            print(f"hiercluster {args.command}: interrupted", file=sys.stderr)
            code = EXIT_INTERRUPTED
    return code


if __name__ == "__main__":
    sys.exit(main())
