"""Command-line interface: ``hiercluster SUBCOMMAND ...``.

Exit codes: 0 success, 2 bad input (one line on stderr naming what is wrong),
1 failure (an unexpected error, with its traceback), 130 interrupted.
"""

from __future__ import annotations

import argparse
import errno
import os
import sqlite3
import stat
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from hiercluster.errors import HierclusterError, path_problem, quote_path, short_repr

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

    from hiercluster.config import data_root, load_config, resolve_path
    from hiercluster.data import load_dataset
    from hiercluster.data import make_loader
    from hiercluster.evaluate import accuracy, collect_logits
    from hiercluster.models import build_model, count_parameters, metadata_path, save_checkpoint
    from hiercluster.rundir import check_output_file
    from hiercluster.train import checkpoint_metadata, train_model

    cfg = load_config(args.config, args.overrides)
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
    train_set = load_dataset(cfg.data.dataset, root, "train", cfg.data.download, augment=True)
    test_set = load_dataset(cfg.data.dataset, root, "test", cfg.data.download)
    torch.manual_seed(cfg.train.seed)
    info_x, _ = train_set[0]
    model = build_model(cfg.model.arch, len(train_set.classes), int(info_x.shape[0]), width=cfg.model.width)
    print(
        f"training {cfg.model.arch} ({count_parameters(model):,} parameters) on {cfg.data.dataset} "
        f"({len(train_set)} train / {len(test_set)} test images) for {cfg.train.epochs} epochs"
    )
    history = train_model(model, train_set, cfg.train, eval_set=test_set if args.eval_every_epoch else None)
    acc = accuracy(*collect_logits(model, make_loader(test_set, cfg.data.batch_size)))
    meta = checkpoint_metadata(cfg.data.dataset, cfg.model.arch, cfg.model.width, train_set, cfg.train, history, acc)
    meta["config"] = cfg.to_dict()
    save_checkpoint(model, out, meta, overwrite=args.overwrite)
    print(f"test accuracy {acc * 100:.2f}% after {meta['wall_time_s']:.0f} s; saved {out} and {metadata_path(out)}")
    return EXIT_OK


def cmd_evaluate_checkpoint(args: argparse.Namespace) -> int:
    from hiercluster.data import dataset_info, load_dataset, make_loader
    from hiercluster.evaluate import accuracy, collect_logits
    from hiercluster.models import check_fits_data, load_checkpoint, read_metadata

    meta = read_metadata(args.checkpoint)
    dataset = args.dataset or meta.get("dataset")
    if not dataset:
        raise HierclusterError(f"metadata of {args.checkpoint} names no dataset; pass --dataset NAME")
    if args.root and not Path(args.root).exists():
        raise HierclusterError(f"--root {args.root}: folder not found")
    test_set = load_dataset(dataset, args.root, args.split)
    check_fits_data(meta, args.checkpoint, dataset, list(test_set.classes), dataset_info(test_set)["in_channels"])
    model, _ = load_checkpoint(args.checkpoint)
    start = time.perf_counter()
    acc = accuracy(*collect_logits(model, make_loader(test_set, args.batch_size)))
    elapsed = time.perf_counter() - start
    print(
        f"{args.checkpoint}: {meta['arch']} on {dataset} ({args.split} split, {len(test_set)} images): "
        f"accuracy {acc * 100:.2f}% ({elapsed:.1f} s)"
    )
    return EXIT_OK


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
    from hiercluster.config import load_config
    from hiercluster.pipeline import run_pipeline
    from hiercluster.report import format_headline

    cfg = load_config(args.config, args.overrides)
    out = _run_dir(args, cfg)
    try:
        summary = run_pipeline(cfg, out, progress=not args.quiet, force=args.force, command=_command_line(args))
    except KeyboardInterrupt:
        print(
            f"hiercluster run: interrupted; finished specs are saved in {out / 'results.sqlite'}. "
            "Run the same command again to resume.",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    names = {name: lv["names"] for name, lv in summary["levels"].items()}
    t = summary["timings"]
    print(
        f"\nfloat accuracy {100 * summary['float_accuracy']:.2f}%; {t['specs_run']} of {t['specs_total']} specs run "
        f"in {t['total_s']:.1f} s\n"
    )
    print(format_headline(summary["headline"], names, cfg.eval.tolerance))
    print(f"\nreport: {summary['report']}")
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from hiercluster.report import format_headline, headline, load_run, write_report
    from hiercluster.rundir import RunLock, check_is_run

    check_is_run(Path(args.run_dir))  # before the lock, which would create a missing folder
    with RunLock(args.run_dir, _command_line(args), other_out=False):
        path = write_report(args.run_dir)
        info, rows, store = load_run(args.run_dir)
        store.close()
    names = {name: lv["names"] for name, lv in info["levels"].items()}
    print(format_headline(headline(rows, info["tolerance"]), names, info["tolerance"]))
    print(f"\nreport: {path}")
    return EXIT_OK


def cmd_hierarchy(args: argparse.Namespace) -> int:
    from hiercluster.config import load_config
    from hiercluster.pipeline import prepare, write_hierarchy_files
    from hiercluster.rundir import RunLock, check_run_dir, check_same_hierarchy

    cfg = load_config(args.config, args.overrides)
    out = _run_dir(args, cfg)
    check_run_dir(out)
    with RunLock(out, _command_line(args)):
        prep = prepare(cfg, out, progress=not args.quiet, float_logits=False)  # a tree needs no float logits
        check_same_hierarchy(prep, out)
        write_hierarchy_files(prep, out)
    h = prep.hierarchy
    print(f"class hierarchy from {cfg.hierarchy.embedding} ({h.linkage} linkage, {h.metric} metric):")
    for name, (k, _, kind) in prep.levels.items():
        if kind == "learned":
            print(f"  k={k}: " + "; ".join(prep.hierarchy.superclass_names(k)))
    if prep.reference_groups is not None:
        cmp_ = prep.hierarchy.compare(prep.reference_groups)
        print(f"  vs reference {cfg.hierarchy.reference}: ARI {cmp_['ari']:.3f}, NMI {cmp_['nmi']:.3f}")
    print(f"wrote {out / 'hierarchy.json'}, {out / 'levels'}/k*.yaml and {out / 'dendrogram.png'}")
    return EXIT_OK


def _spec_from_args(args: argparse.Namespace, cfg):
    from hiercluster.pipeline import grid_spec

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
    if args.plan is None:
        return quant.QuantPlan()
    if args.plan not in plans:
        names = ", ".join(short_repr(name, 40) for name in list(plans)[:10]) + (", ..." if len(plans) > 10 else "")
        raise HierclusterError(f"--plan {short_repr(args.plan)} is not in config key quant.plans (names: {names})")
    try:
        return quant.QuantPlan.from_dict(plans[args.plan].quant_plan_dict())
    except ValueError as exc:  # a plan setting out of range (layer_bits: {conv1: 99}); QuantError is one too
        raise HierclusterError(f"config section quant: {exc}") from None


def cmd_quantize(args: argparse.Namespace) -> int:
    import json

    import quant
    from quant._files import write_text_atomic

    from hiercluster.config import data_root, load_config, resolve_path
    from hiercluster.data import dataset_info, load_dataset
    from hiercluster.models import metadata_path
    from hiercluster.pipeline import GridPoint, calibration_settings, check_plans_fit, load_calibration, load_float_model
    from hiercluster.rundir import check_output_file

    cfg = load_config(args.config, args.overrides)
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
    info = dataset_info(load_dataset(cfg.data.dataset, data_root(cfg), cfg.data.eval_split, cfg.data.download))
    model, ckpt = load_float_model(cfg, list(info["classes"]), info["in_channels"])
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
    print(f"{spec.tag} (plan {plan.name}{fitted}) of {ckpt}: average {report.avg_bits:.2f} bits per weight")
    print(
        f"  fp32 {sizes['fp32_bytes'] / 1024:.1f} KB -> packed {sizes['packed_bytes'] / 1024:.1f} KB "
        f"(gzip {sizes['gzip_bytes'] / 1024:.1f} KB, xz {sizes['xz_bytes'] / 1024:.1f} KB)"
    )
    print(f"wrote {out} and {report_file}")
    return EXIT_OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    import quant

    from hiercluster.config import load_config
    from hiercluster.evaluate import collect_logits
    from hiercluster.pipeline import level_metrics, prepare
    from hiercluster.rundir import RunLock, check_run_dir

    cfg = load_config(args.config, args.overrides)
    packed = Path(args.packed)
    if packed.is_dir():
        raise HierclusterError(f"--packed {packed} is a folder; give a packed model file (.hcq, from `hiercluster quantize`)")
    out = _run_dir(args, cfg)
    check_run_dir(out)
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
    rows = level_metrics(prep, qlogits)
    _print_levels_table(rows, f"{packed} against merged heads ({cfg.eval.reduction}, {cfg.eval.random_seeds} random groupings):")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="hiercluster",
        description="How few bits can a classifier's weights have, and at which granularity of labels does it still work?",
    )
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
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate-checkpoint", help="print a checkpoint's accuracy on its dataset's test split",
                       description="Load a checkpoint (with its metadata JSON) and print its test accuracy.")
    p.add_argument("checkpoint", help="a .pt state_dict with a .json metadata file beside it")
    p.add_argument("--dataset", help="dataset name (default: from the metadata)")
    p.add_argument("--root", help="dataset folder")
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--batch-size", type=int, default=128)
    p.set_defaults(func=cmd_evaluate_checkpoint)

    def run_like(name: str, help_: str, description: str, func) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=description)
        p.add_argument("config", help="YAML config file")
        _add_set(p)
        p.add_argument("--out", help="run directory (default: config key output.dir)")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        p.set_defaults(func=func)
        return p

    p = run_like(
        "run", "everything: float logits, hierarchy, the quantization sweep, results and report",
        "Evaluate the float model once, build the class hierarchy, quantize and evaluate every spec of the "
        "config's quant grid against every level and its random baseline, store results in DIR/results.sqlite "
        "(re-running resumes), and write DIR/report.md with plots. Prints the headline table.",
        cmd_run,
    )
    p.add_argument(
        "--force", action="store_true",
        help="run into a directory that holds a run of another grid (its report then describes only this grid)",
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
    p.add_argument("--scheme", help="asymmetric, symmetric or pow2 (default: first of quant.schemes)")
    p.add_argument("--clipping", help="weight range setting, e.g. minmax or mse (default: first of quant.clipping)")
    p.add_argument("--granularity", help="per_channel or per_tensor (default: first of quant.granularity)")
    p.add_argument("--plan", help="name of a plan in quant.plans (default: quantize every layer)")
    p.add_argument("--method", default="rtn",
                   help="rtn (round to nearest, no data), gptq or adaround (fit on the config's calibration section)")
    p.add_argument("--bn-reestimate", action="store_true",
                   help="re-estimate BN statistics after rounding, on the config's calibration section")
    p.add_argument("--out", required=True, help="packed model file to write, e.g. model-4b.hcq")
    p.add_argument("--overwrite", action="store_true", help="replace existing files")
    p.set_defaults(func=cmd_quantize)

    p = run_like(
        "evaluate", "evaluate one bit-packed model against every level's merged head",
        "Evaluate a bit-packed model (from `hiercluster quantize`) against the merged heads of every level of "
        "the hierarchy and their random baselines; prints a table.",
        cmd_evaluate,
    )
    p.add_argument("--packed", required=True, help="bit-packed model file")

    p = sub.add_parser("report", help="rebuild the report of a run directory",
                       description="Rebuild DIR/report.md and its plots from DIR/run.json and DIR/results.sqlite.")
    p.add_argument("run_dir", help="a run directory written by `hiercluster run`")
    p.set_defaults(func=cmd_report)
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
    if folder is None or args.command not in ("run", "evaluate", "hierarchy", "report"):
        return None
    return Path(folder) / "results.sqlite"


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
