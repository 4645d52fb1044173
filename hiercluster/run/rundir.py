"""The run directory: its file names, the checks made before anything is written, its lock and its records.

Every command that writes a run directory (``run``, ``hierarchy``, ``evaluate``,
``report``) first checks its paths (:func:`check_run_dir`, :func:`check_is_run`), then
holds the directory's lock (:class:`RunLock`) for the whole command, so that a second
command on the same directory stops at once, naming the process that holds it. The
records a run leaves (``run.json``, the saved ``config.yaml``) are read back only
through here, validated: a damaged file is one clear error, never a traceback.

Re-running ``run`` with another grid is refused unless ``--force`` (:func:`check_same_grid`),
and ``hierarchy`` refuses to replace the tree of a finished run with another one
(:func:`check_same_hierarchy`), so a run's files never disagree with its report.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from hiercluster.errors import HierclusterError, read_text, short_repr
from quant._files import write_text_atomic
from quant._validate import check_json

RUN_FILE = "run.json"
DB_FILE = "results.sqlite"
LOGITS_FILE = "float_logits.pt"
HOLDOUT_LOGITS_FILE = "holdout_logits.pt"  # the float model on the held-out images that choose a tree per k
HIERARCHY_FILE = "hierarchy.json"
CONFIG_FILE = "config.yaml"
CSV_FILE = "results.csv"
REPORT_FILE = "report.md"
LOCK_FILE = ".lock"
PACKED_CACHE_DIR = "packed"  # bit-packed calibrated models of the sweep, by spec key, for export without refitting
DENDROGRAM_FILE = "dendrogram.png"
LEVELS_DIR = "levels"  # one grouping YAML per reported level
MODELS_DIR = "models"  # the exported headline winners and their manifest
EVALUATIONS_DIR = "evaluations"  # tables of `hiercluster evaluate`
SENSITIVITY_DIR = "sensitivity"  # tables and plots of `hiercluster sensitivity`
TREES_DIR = "trees"  # every tree of a run with several (JSON), and the data-based trees' cached embeddings
# The report's figures, by the name report.md captions them with.
FIGURE_FILES = {
    "dendrogram": DENDROGRAM_FILE,
    "drop_vs_bits": "drop_vs_bits.png",
    "pareto": "pareto.png",
    "quartiles": "quartiles.png",
    "prediction_share": "prediction_share.png",
    "frontier": "frontier.png",
}
MODEL_SUFFIX = ".hcq"  # a bit-packed model (quant.save_packed)
GROUPS_SUFFIX = "_groups.yaml"  # an exported level's superclasses
# Folders a run writes at its top level: never a file there.
RUN_FOLDERS = (LEVELS_DIR, MODELS_DIR, PACKED_CACHE_DIR, EVALUATIONS_DIR, SENSITIVITY_DIR, TREES_DIR)
# Files a run writes at its top level: never a folder there, never the target of another command's --out.
MARKER_FILES = (RUN_FILE, DB_FILE, LOGITS_FILE, HIERARCHY_FILE)
RUN_FILES = (*MARKER_FILES, HOLDOUT_LOGITS_FILE, CONFIG_FILE, CSV_FILE, REPORT_FILE, LOCK_FILE)
# Any command writing a run directory leaves one of these: how a run directory is told from a user's folder.
MARKERS = (*MARKER_FILES, EVALUATIONS_DIR, SENSITIVITY_DIR)

# run.json of 1,000 classes with every level from 1,000 down to 2 is about 30 MB; far more is not ours.
MAX_RUN_FILE_BYTES = 64 * 1024 * 1024
# The lock file holds one short JSON line; a holder's command line is cut to this many characters.
MAX_LOCK_BYTES = 4096
_COMMAND_CHARS = 300
# A key of a damaged record (a level name) is quoted up to this many characters: "k=1000" needs 6.
_KEY_CHARS = 40
# Differences listed in one refusal; the rest are counted, so the message stays one readable line.
MAX_LISTED_CHANGES = 8

# Config values that change a run's results or its report. data.batch_size and data.download
# change neither, nor do the sections train, runtime (a device type's results are keyed apart)
# and output.
_RESULT_SECTIONS = ("data", "model", "hierarchy", "quant", "calibration", "eval")
_NOT_RESULTS = {("data", "batch_size"), ("data", "download")}

MANIFEST_FILE = "manifest.json"
# models/manifest.json holds one short entry per level: about 300 bytes each, 1,000 levels far below this.
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
MANIFEST_SPEC: dict[str, Any] = {"reduction": str, "levels": dict}
# What run.export.export_models writes for each level.
MANIFEST_ENTRY_SPEC: dict[str, Any] = {
    "model": str, "spec_key": str, "groups": str, "bits": int, "method": str, "tag": str, "drop_pp": float,
}

_LEVEL_SPEC = {"k": int, "kind": str, "assignment": [int], "names": [str], "tree?": str}
# What pipeline._run_info writes (keys ending in "?" are absent from some runs).
RUN_INFO_SPEC: dict[str, Any] = {
    "dataset": str,
    "eval_split": str,
    "n_eval": int,
    "checkpoint": (str, None),
    "checkpoint_sha256": str,
    "checkpoint_path?": (str, None),
    "class_names": [str],
    "float_accuracy": float,
    "float_prediction_share": [float],
    "device?": str,
    "reduction": str,
    "random_seeds": int,
    "bootstrap?": int,
    "tolerance": float,
    "hierarchy": {"embedding": ([str], str), "linkage": (str, None), "metric": (str, None), "select?": str},
    "tree_selection?": dict,
    "levels": dict,
    "grid": [{"key": str, "tag": str}],
    "calibration?": {
        "split": str,
        "samples": int,
        "batch_size": int,
        "seed": int,
        "from_eval_split": bool,
        "used_by": [str],
        "images": int,
    },
    "code_version?": dict,
    "timings?": dict,
    "reference_comparison?": {"k": int, "ari": float, "nmi": float},
    "reference_comparison_by_tree?": dict,
    "reference_file?": str,
    "data_limit?": {"limit": int, "of": int},
}


# --- paths of the files in a run directory ---------------------------------------------------


def packed_model_path(run_dir: str | Path, key: str) -> Path:
    """``packed/KEY.hcq``: a calibrated spec's bit-packed model, kept by the sweep for the export."""
    return Path(run_dir) / PACKED_CACHE_DIR / f"{key}{MODEL_SUFFIX}"


def level_yaml_path(run_dir: str | Path, k: int, tree: str = "") -> Path:
    """``levels/kK.yaml`` (``levels/kK-TREE.yaml`` for one of several trees): a learned level's grouping."""
    return Path(run_dir) / LEVELS_DIR / (f"k{k}-{tree}.yaml" if tree else f"k{k}.yaml")


def tree_json_path(run_dir: str | Path, tree: str) -> Path:
    """``trees/TREE.json``: one of several trees (``hierarchy.json`` holds the first)."""
    return Path(run_dir) / TREES_DIR / f"{tree}.json"


def tree_cache_path(run_dir: str | Path, tree: str) -> Path:
    """``trees/TREE.pt``: a data-based tree's class embedding, cached with the id of what it depends on."""
    return Path(run_dir) / TREES_DIR / f"{tree}.pt"


def exported_model_path(run_dir: str | Path, tag: str) -> Path:
    """``models/TAG.hcq``: a headline winner, exported."""
    return Path(run_dir) / MODELS_DIR / f"{tag}{MODEL_SUFFIX}"


def level_groups_path(run_dir: str | Path, level: str) -> Path:
    """``models/kK_groups.yaml`` (level ``k=K``; ``=`` left out of the name): an exported level's superclasses."""
    return Path(run_dir) / MODELS_DIR / f"{level.replace('=', '')}{GROUPS_SUFFIX}"


def evaluation_path(run_dir: str | Path, packed: str | Path) -> Path:
    """``evaluations/NAME.json``: what ``hiercluster evaluate`` saves for the packed model ``NAME.hcq``."""
    return Path(run_dir) / EVALUATIONS_DIR / f"{Path(packed).stem}.json"


def sensitivity_paths(run_dir: str | Path, tag: str, k: int) -> tuple[Path, Path]:
    """``sensitivity/TAG-kK.csv`` and ``.png``: what ``hiercluster sensitivity`` writes for spec ``TAG`` at level k."""
    folder, stem = Path(run_dir) / SENSITIVITY_DIR, f"{tag}-k{k}"  # not with_suffix: a tag may hold a dot (p99.9)
    return folder / f"{stem}.csv", folder / f"{stem}.png"


# --- paths, checked before any work -------------------------------------------------------


def check_parent_folders(path: Path, flag: str) -> None:
    """The nearest existing folder above ``path`` must be a folder, not a file (else nothing can be written there)."""
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise HierclusterError(f"{flag} {path}: {parent} is a file, not a folder; choose another path")
            return


def check_run_dir(out_dir: Path) -> None:
    """Refuse an ``--out`` that cannot be a run directory, before any work.

    A file, a path under a file, a non-empty folder that is not a hiercluster run (never
    overwrite a user's files), and a run directory where one of the run's own files is a folder.
    """
    out_dir = Path(out_dir)
    check_parent_folders(out_dir, "--out")
    if out_dir.exists() and not out_dir.is_dir():
        raise HierclusterError(f"--out {out_dir} is a file, not a folder; give a folder for the run directory")
    if not out_dir.is_dir():
        return
    entries = [p.name for p in out_dir.iterdir() if p.name != LOCK_FILE]  # a killed command's lock file is not content
    if entries and not any((out_dir / name).exists() for name in MARKERS):
        raise HierclusterError(
            f"--out {out_dir} is a non-empty folder that is not a hiercluster run directory; choose another folder"
        )
    for name in RUN_FILES:
        if (out_dir / name).is_dir():
            raise HierclusterError(
                f"{out_dir / name} is a folder, but a run directory keeps its {name} file there; move it away"
            )
    for name in RUN_FOLDERS:
        if (out_dir / name).exists() and not (out_dir / name).is_dir():
            raise HierclusterError(
                f"{out_dir / name} is a file, but a run directory keeps its {name} folder there; move it away"
            )


def check_is_run(run_dir: Path) -> None:
    """Refuse a folder that holds no finished run (``report``): nothing is written before this."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise HierclusterError(f"run directory not found: {run_dir}")
    if not run_dir.is_dir():
        raise HierclusterError(f"{run_dir} is a file, not a run directory")
    for name in (RUN_FILE, DB_FILE):
        if (run_dir / name).is_dir():
            raise HierclusterError(f"{run_dir / name} is a folder, but a run directory keeps its {name} file there")
        if (run_dir / name).exists() and not (run_dir / name).is_file():
            raise HierclusterError(f"{run_dir / name} is not a regular file (a pipe or device?); move it away")
        if not (run_dir / name).is_file():
            raise HierclusterError(
                f"{run_dir} is not a hiercluster run directory (no {name}); give the folder `hiercluster run` wrote"
            )


def check_output_file(path: Path, flag: str = "--out") -> None:
    """Refuse an output file path that is a folder, lies under a file, or is one of a run directory's own files."""
    path = Path(path)
    if path.is_dir():
        raise HierclusterError(f"{flag} {path} is a folder; give a file name, such as {path / 'model.hcq'}")
    if path.is_symlink() and not path.exists():  # the output would replace the link itself
        raise HierclusterError(f"{flag} {path} is a symbolic link that leads nowhere (or back to itself); choose another path")
    if path.exists() and not path.is_file():
        raise HierclusterError(f"{flag} {path} exists and is not a regular file (a pipe or device?); choose another path")
    check_parent_folders(path, flag)
    parent = path.absolute().parent
    if path.name in RUN_FILES and any((parent / name).exists() for name in MARKERS):
        raise HierclusterError(f"{flag} {path} would replace the run directory's own {path.name}; choose another name")
    check_writable(path)


def check_writable(path: Path) -> None:
    """Create and remove a scratch file in the nearest existing folder of ``path``, before any work.

    A read-only file system or a folder without write permission then fails at once, not
    after training or quantizing; the ``OSError`` propagates (the CLI names it, exit 2).
    """
    folder = next(p for p in (Path(path).absolute(), *Path(path).absolute().parents) if p.is_dir())
    probe = folder / f".hiercluster-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    probe.unlink()


# --- the lock ------------------------------------------------------------------------------


class RunLock:
    """An advisory ``flock`` on ``DIR/.lock``, held while a command writes the run directory.

    Taking it is the command's first write into the directory (a read-only or full disk
    fails here, before any work: the ``OSError`` propagates). The holder writes its PID,
    command line and start time into the file; a second command finds the lock taken and
    raises :class:`HierclusterError` naming them. The kernel drops the lock of a process
    that dies, so a stale file never blocks: it is locked again and rewritten.

    Parameters
    ----------
    out_dir : path
        The run directory (created if missing; removed again on release if it is still empty).
    command : str
        The holder's command line, shown to the commands it blocks.
    other_out : bool
        Whether the refusal may suggest another ``--out``.
    """

    def __init__(self, out_dir: str | Path, command: str, other_out: bool = True) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK_FILE
        self.command = command
        self.other_out = other_out
        self._fd: int | None = None
        self._created_dir = False

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock or raise :class:`HierclusterError` naming its holder."""
        self._created_dir = not self.out_dir.exists()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise HierclusterError(self._in_use(holder)) from None
            # A holder that finished removes the file; if it did so after we opened it, our lock
            # is on a file no one else sees: open the path again.
            if _same_file(fd, self.path):
                break
            os.close(fd)
        self._fd = fd
        try:
            self._write_holder()
        except BaseException:
            self.release()
            raise

    def _open(self) -> int:
        """Open (or create) the lock file itself: never what a link or another name of it points to.

        The holder truncates and writes the file, so a ``.lock`` that is a symbolic link, a
        hard link to another file, a folder or a pipe would have it write where it must not.
        """
        try:
            # No O_TRUNC: the holder's description must survive a refused attempt. O_NONBLOCK: a FIFO
            # placed here does not hang the open (it changes nothing for a regular file).
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.EOPNOTSUPP):
                raise  # a read-only or full disk: the CLI names it
            raise self._not_a_lock_file() from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            os.close(fd)
            raise self._not_a_lock_file()
        return fd

    def _not_a_lock_file(self) -> HierclusterError:
        try:
            st = os.lstat(self.path)
        except OSError:
            what = "not a plain file"
        else:
            what = next(
                (name for test, name in _FILE_KINDS if test(st.st_mode)),
                "a file with other names (a hard link)" if st.st_nlink > 1 else "not a plain file",
            )
        return HierclusterError(
            f"{self.path} is {what}, not the lock file this tool keeps there; move it away and run again"
        )

    def _write_holder(self) -> None:
        holder = {"pid": os.getpid(), "command": self.command[:_COMMAND_CHARS], "started": time.time()}
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, (json.dumps(holder) + "\n").encode(), 0)

    def release(self) -> None:
        """Remove the lock file and drop the lock (and the directory, if this lock created it and it is empty)."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still locked, so no one locks a file about to vanish
        finally:
            os.close(self._fd)
            self._fd = None
        if self._created_dir:
            try:
                self.out_dir.rmdir()
            except OSError:
                pass  # not empty: the command wrote its files

    def _in_use(self, holder: dict[str, Any]) -> str:
        who = "another process"
        if isinstance(holder.get("pid"), int):
            who = f"process {holder['pid']}"
        if isinstance(holder.get("command"), str) and holder["command"]:
            who += f" ({_one_line(holder['command'], _COMMAND_CHARS)})"
        started = holder.get("started")
        if isinstance(started, (int, float)) and not isinstance(started, bool) and np.isfinite(started):
            fmt = "%H:%M:%S" if time.localtime(started)[:3] == time.localtime()[:3] else "%Y-%m-%d %H:%M:%S"
            who += f" since {time.strftime(fmt, time.localtime(started))}"
        advice = "wait for it to finish" + (" or use another --out" if self.other_out else "")
        return f"run directory {self.out_dir} is in use by {who}; {advice}"


# What a ``.lock`` that is not a plain file is, for the refusal.
_FILE_KINDS = (
    (stat.S_ISLNK, "a symbolic link"),
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a named pipe"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a device"),
    (stat.S_ISBLK, "a device"),
)


def _one_line(text: str, limit: int) -> str:
    """``text`` on one line, cut to ``limit`` characters (a message quotes a file's or a library's words)."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_holder(fd: int) -> dict[str, Any]:
    """What the lock's holder wrote about itself; ``{}`` when it has not written yet or the file is not ours."""
    try:
        holder = json.loads(os.pread(fd, MAX_LOCK_BYTES, 0).decode("utf-8"))
    except (ValueError, RecursionError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    here = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (here.st_dev, here.st_ino)


# --- records ------------------------------------------------------------------------------


def _damaged(path: Path, detail: str, remedy: str) -> HierclusterError:
    return HierclusterError(f"{path} is damaged: {detail}; {remedy}")


def read_json_record(path: Path, what: str, spec: Any, remedy: str, max_bytes: int) -> Any:
    """A JSON file this tool wrote, read with a size cap and checked against ``spec`` (``check_json``'s form).

    Any problem is one :class:`HierclusterError`: ``PATH is damaged: WHERE: expected ..., got ...; REMEDY``.
    """
    text = read_text(path, what, max_bytes=max_bytes)
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, a 5,000-digit integer, nesting too deep
        raise _damaged(path, f"not valid JSON ({_one_line(str(exc), 80)})", remedy) from None
    try:
        # "@" marks the top level, cut from the message so that places read "levels.k=3.assignment".
        check_json(data, spec, "@", error=HierclusterError)
    except HierclusterError as exc:
        where = str(exc)
        detail = where[2:] if where.startswith("@.") else "the top level" + where[1:] if where.startswith("@") else where
        raise _damaged(path, detail, remedy) from None
    return data


def read_cache(path: Path, cache_id: str) -> dict[str, Any] | None:
    """A run directory's cache file (float logits, a tree's embedding) when its ``id`` is ``cache_id``; else None.

    Loaded with ``weights_only=True``; a missing, stale, damaged or hand-made file is None:
    recomputed, never trusted. The caller checks the shapes of what it holds.
    """
    import torch

    if not path.is_file():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # any unreadable file: torch raises many kinds
        return None
    return saved if isinstance(saved, dict) and saved.get("id") == cache_id else None


def read_run_info(run_dir: str | Path) -> dict[str, Any]:
    """``run.json`` of a run directory, validated: its shape and that its levels fit its classes."""
    path = Path(run_dir) / RUN_FILE
    remedy = "run `hiercluster run` again on this folder"
    info = read_json_record(path, "run file", RUN_INFO_SPEC, remedy, MAX_RUN_FILE_BYTES)
    n = len(info["class_names"])
    if not info["levels"]:
        raise _damaged(path, "levels: no level", remedy)
    if len(info["float_prediction_share"]) != n:
        raise _damaged(path, f"float_prediction_share has {len(info['float_prediction_share'])} entries for {n} classes", remedy)
    for where, level in _checked_levels(info["levels"], _LEVEL_SPEC, path, remedy):
        k, assignment = level["k"], level["assignment"]
        if len(assignment) != n or any(not 0 <= g < k for g in assignment) or len(level["names"]) != k:
            raise _damaged(
                path, f"{where}: {k} groups need {n} assignments in 0..{k - 1} and {k} names, got "
                f"{short_repr(assignment)} and {len(level['names'])} names", remedy,
            )
    return info


def _checked_levels(levels: dict[str, Any], spec: Any, path: Path, remedy: str) -> list[tuple[str, Any]]:
    """``(where, entry)`` for every entry of a record's ``levels`` mapping, each checked against ``spec``."""
    out = []
    for name, entry in levels.items():
        where = f"levels.{_one_line(name, _KEY_CHARS)}"
        try:
            check_json(entry, spec, where, error=HierclusterError)
        except HierclusterError as exc:
            raise _damaged(path, str(exc), remedy) from None
        out.append((where, entry))
    return out


def _is_plain_name(name: str, suffix: str) -> bool:
    """Whether ``name`` names a file in the same folder, ending in ``suffix``, as the export writes them."""
    separators = {"/", "\\", "\0"}
    return len(name) > len(suffix) and name.endswith(suffix) and not name.startswith(".") and not separators & set(name)


def read_manifest(path: Path) -> dict[str, Any]:
    """``models/manifest.json`` of a run directory, validated; a damaged one is a :class:`HierclusterError`.

    Its file names must be plain names of the kinds the export writes (``*.hcq``,
    ``*_groups.yaml``), so that a hand-edited manifest can never name a file elsewhere.
    """
    remedy = "run `hiercluster run` again on this folder to export the models again"
    manifest = read_json_record(path, "model manifest", MANIFEST_SPEC, remedy, MAX_MANIFEST_BYTES)
    for where, entry in _checked_levels(manifest["levels"], MANIFEST_ENTRY_SPEC, path, remedy):
        for key, suffix in (("model", MODEL_SUFFIX), ("groups", GROUPS_SUFFIX)):
            if not _is_plain_name(entry[key], suffix):
                raise _damaged(
                    path, f"{where}.{key}: {short_repr(entry[key])} is not a file name ending in {suffix}", remedy
                )
    return manifest


def write_json(path: Path, data: Any) -> Path:
    """Write a record as indented JSON through a temporary file and a rename.

    A full disk or a kill mid-write leaves the previous record whole (a resumed run reads it).
    """
    return write_text_atomic(path, json.dumps(data, indent=2) + "\n")


# --- a re-run must describe the same experiment ---------------------------------------------


def _plain(value: Any) -> Any:
    """Tuples as lists (as the saved YAML has them), for comparing and showing config values."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _result_settings(cfg: Any) -> dict[str, Any]:
    """``{"section.key": value}`` of the config values that change results or the report."""
    d = cfg.to_dict()
    return {
        f"{section}.{key}": _plain(value)
        for section in _RESULT_SECTIONS
        for key, value in d[section].items()
        if (section, key) not in _NOT_RESULTS
    }


def config_changes(cfg: Any, saved_path: Path) -> list[str]:
    """``"quant.bits: [8, 4] -> [8, 4, 2]"`` for each result-changing value that differs from a saved config."""
    from hiercluster.run.config import load_config

    try:
        saved = load_config(saved_path)
    except HierclusterError as exc:
        return [f"its {CONFIG_FILE} cannot be read ({_one_line(str(exc), 100)})"]
    old, new = _result_settings(saved), _result_settings(cfg)
    return [f"{key}: {short_repr(old[key])} -> {short_repr(new[key])}" for key in new if old[key] != new[key]]


def grid_changes(tags: list[str], recorded: list[str]) -> list[str]:
    """``"grid: 2 specs added, 1 removed"``, or nothing when the grids hold the same specs."""
    added = len(set(tags) - set(recorded))
    removed = len(set(recorded) - set(tags))
    if not added and not removed:
        return []
    parts = ([f"{added} spec{'s' if added != 1 else ''} added"] if added else []) + ([f"{removed} removed"] if removed else [])
    return ["grid: " + ", ".join(parts)]


def check_same_grid(cfg: Any, tags: list[str], out_dir: Path, checkpoint_digest: str | None, force: bool) -> None:
    """Refuse to run another grid into a run directory unless ``force``, listing what differs.

    Compared: the result-changing sections of the saved ``config.yaml`` (data, model,
    hierarchy, quant, calibration, eval; not output, train, runtime, data.batch_size),
    the grid's spec tags in ``run.json`` and the checkpoint's bytes. New code with the same
    config is not a change: its specs get new keys and are recomputed. A damaged
    ``run.json`` does not block ``run``, which rewrites it.
    """
    if force:
        return
    changes: list[str] = []
    if (out_dir / CONFIG_FILE).is_file():
        changes += config_changes(cfg, out_dir / CONFIG_FILE)
    if (out_dir / RUN_FILE).is_file():
        try:
            info = read_run_info(out_dir)
        except HierclusterError:
            info = None
        if info is not None:
            changes += grid_changes(tags, [g["tag"] for g in info["grid"]])
            if checkpoint_digest is not None and info["checkpoint_sha256"] != checkpoint_digest:
                changes.append(f"checkpoint bytes: sha256 {info['checkpoint_sha256'][:12]} -> {checkpoint_digest[:12]}")
    if not changes:
        return
    listed = "; ".join(changes[:MAX_LISTED_CHANGES])
    if len(changes) > MAX_LISTED_CHANGES:
        listed += f"; and {len(changes) - MAX_LISTED_CHANGES} more"
    raise HierclusterError(
        f"--out {out_dir} holds a run of another grid ({listed}); pass --force to run this grid there (its report "
        f"will describe only this grid; earlier results stay in {DB_FILE}), or use another --out"
    )


def check_same_hierarchy(prep: Any, out_dir: Path) -> None:
    """Refuse to replace the hierarchy of a finished run with another one, naming what differs.

    The whole tree is compared: embedding, linkage, metric, the linkage matrix (against
    ``hierarchy.json``, when it is readable) and every reported level's groups and names.
    ``hiercluster run`` may change its own directory's hierarchy (its report follows);
    the ``hierarchy`` subcommand must not leave a run whose files disagree with its report.
    """
    if not (out_dir / RUN_FILE).is_file():
        return
    info = read_run_info(out_dir)
    h = prep.hierarchy
    diffs = [
        f"{what} {old} -> {new}"
        for what, old, new in (
            ("embedding", _as_list(info["hierarchy"]["embedding"]), list(prep.cfg.hierarchy.embedding)),
            ("linkage", info["hierarchy"]["linkage"], h.linkage),
            ("metric", info["hierarchy"]["metric"], h.metric),
        )
        if old != new
    ]
    diffs += _tree_changes(out_dir / HIERARCHY_FILE, h)
    current = {name: (list(level.assignment), list(level.names)) for name, level in prep.levels.items()}
    recorded = {name: (lv["assignment"], lv["names"]) for name, lv in info["levels"].items()}
    changed = [name for name in current if name in recorded and current[name] != recorded[name]]
    if changed:
        diffs.append(f"superclasses or their names at level{'s' if len(changed) > 1 else ''} {', '.join(changed)}")
    if set(current) != set(recorded):
        diffs.append(f"levels {', '.join(recorded)} -> {', '.join(current)}")
    if diffs:
        raise HierclusterError(
            f"{out_dir} holds a run whose hierarchy differs from this one ({'; '.join(diffs[:MAX_LISTED_CHANGES])}); "
            "writing it there would make the run's files disagree with its report. Choose another --out."
        )


def _as_list(value: Any) -> list[Any]:
    """A run.json value that older runs wrote as one item and newer ones as a list."""
    return list(value) if isinstance(value, list) else [value]


def _tree_changes(path: Path, hierarchy: Any) -> list[str]:
    """How ``hierarchy``'s tree differs from the one saved at ``path`` (nothing if that file is missing or damaged).

    A damaged file is no evidence of another tree: writing the same tree over it repairs it.
    """
    from hiercluster.hierarchy.clustering import ClassHierarchy

    if not path.is_file():
        return []
    try:
        saved = ClassHierarchy.from_json(path)
    except HierclusterError:
        return []
    if saved.class_names_ != hierarchy.class_names_:
        return ["class names"]
    if saved.linkage_matrix_.shape != hierarchy.linkage_matrix_.shape or not np.allclose(
        saved.linkage_matrix_, hierarchy.linkage_matrix_, rtol=1e-9, atol=1e-12
    ):
        return ["linkage matrix (merge order or heights)"]
    return []


__all__ = [
    "CONFIG_FILE",
    "CSV_FILE",
    "DB_FILE",
    "DENDROGRAM_FILE",
    "EVALUATIONS_DIR",
    "FIGURE_FILES",
    "GROUPS_SUFFIX",
    "HIERARCHY_FILE",
    "HOLDOUT_LOGITS_FILE",
    "LEVELS_DIR",
    "LOCK_FILE",
    "LOGITS_FILE",
    "MANIFEST_ENTRY_SPEC",
    "MANIFEST_FILE",
    "MANIFEST_SPEC",
    "MARKERS",
    "MARKER_FILES",
    "MAX_LISTED_CHANGES",
    "MAX_LOCK_BYTES",
    "MAX_MANIFEST_BYTES",
    "MAX_RUN_FILE_BYTES",
    "MODELS_DIR",
    "MODEL_SUFFIX",
    "PACKED_CACHE_DIR",
    "REPORT_FILE",
    "RUN_FILE",
    "RUN_FILES",
    "RUN_FOLDERS",
    "RUN_INFO_SPEC",
    "SENSITIVITY_DIR",
    "TREES_DIR",
    "RunLock",
    "check_is_run",
    "check_output_file",
    "check_parent_folders",
    "check_run_dir",
    "check_same_grid",
    "check_same_hierarchy",
    "check_writable",
    "config_changes",
    "evaluation_path",
    "exported_model_path",
    "grid_changes",
    "level_groups_path",
    "level_yaml_path",
    "packed_model_path",
    "read_cache",
    "read_json_record",
    "read_manifest",
    "read_run_info",
    "sensitivity_paths",
    "tree_cache_path",
    "tree_json_path",
    "write_json",
]
