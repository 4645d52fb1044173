"""Command-line interface: ``hiercluster SUBCOMMAND ...``.

Exit codes: 0 success, 2 bad input (one line on stderr naming what is wrong),
1 failure (an unexpected error, with its traceback), 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from hiercluster.errors import HierclusterError

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


class _Parser(argparse.ArgumentParser):
    """argparse that exits with 2 and one line on a usage error (argparse's own convention)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


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

    from hiercluster.config import load_config, resolve_path
    from hiercluster.data import load_dataset
    from hiercluster.data import make_loader
    from hiercluster.evaluate import accuracy, collect_logits
    from hiercluster.models import build_model, count_parameters, metadata_path, save_checkpoint
    from hiercluster.train import checkpoint_metadata, train_model

    cfg = load_config(args.config, args.overrides)
    if not cfg.model.arch:
        raise HierclusterError(f"{args.config}: config key model.arch is required for training")
    out = Path(args.out) if args.out else (resolve_path(cfg.model.checkpoint, cfg.source) if cfg.model.checkpoint else None)
    if out is None:
        raise HierclusterError("where to save? set config key model.checkpoint or pass --out PATH")
    if not args.overwrite:
        for p in (out, metadata_path(out)):
            if p.exists():
                raise HierclusterError(f"{p} exists; pass --overwrite to replace it, or --out another path")
    root = resolve_path(cfg.data.root, cfg.source) if cfg.data.root else None
    train_set = load_dataset(cfg.data.dataset, root, "train", cfg.data.download)
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
    from hiercluster.data import load_dataset, make_loader
    from hiercluster.evaluate import accuracy, collect_logits
    from hiercluster.models import load_checkpoint

    model, meta = load_checkpoint(args.checkpoint)
    dataset = args.dataset or meta.get("dataset")
    if not dataset:
        raise HierclusterError(f"metadata of {args.checkpoint} names no dataset; pass --dataset NAME")
    test_set = load_dataset(dataset, args.root, args.split)
    if len(test_set.classes) != int(meta["num_classes"]):
        raise HierclusterError(
            f"{dataset} has {len(test_set.classes)} classes but {args.checkpoint} was trained for {meta['num_classes']}"
        )
    start = time.perf_counter()
    acc = accuracy(*collect_logits(model, make_loader(test_set, args.batch_size)))
    elapsed = time.perf_counter() - start
    print(
        f"{args.checkpoint}: {meta['arch']} on {dataset} ({args.split} split, {len(test_set)} images): "
        f"accuracy {acc * 100:.2f}% ({elapsed:.1f} s)"
    )
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except HierclusterError as exc:
        print(f"hiercluster {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"hiercluster {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
