"""Executors: who runs the pending specs of a sweep.

Every spec is independent: it reads the run's frozen :class:`~hiercluster.run.sweep.SweepContext` and returns a
:class:`~hiercluster.run.records.SpecResult`. An executor only decides where that
happens; the driver (:func:`hiercluster.run.pipeline.run_pipeline`) alone writes the
results store and the run directory, so resuming works the same for every executor.

* :class:`SerialExecutor` (the default) runs the specs one after another in this
  process. It imports nothing beyond the sweep itself.
* :class:`RayExecutor` runs each spec as a Ray task. The sweep context goes through
  Ray's object store once (``ray.put``), not once per task; results come back to the
  driver in the order they finish. Ray is an optional dependency:
  ``pip install 'hiercluster[ray]'``.

An executor is a context manager: the pipeline enters it before it prepares anything, so
that a missing Ray or a wrong ``--address`` is one line before the float model runs or the
run directory is written. Under Ray the driver also checks what comes back: each task
returns, with its result, the code versions and device type of the worker that computed
it (a result of other code would be stored under this code's resume key), and the
warnings it raised (Ray does not forward a worker's output here), which the driver
re-emits once each.

Why Ray rather than Dask: a spec is a coarse, stateful task (minutes of PyTorch work on
a model of up to hundreds of MB) and not a step of a dataframe or array graph. Ray's
object store shares that model between tasks on a node without copying it per task,
places tasks by CPU and GPU requests (``num_gpus``), and one address connects a laptop
to a cluster (``ray start --head`` / ``ray up``); Dask's strengths (lazy collections,
graph optimisation) buy nothing here.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.util
import re
import socket
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import torch

from hiercluster import interrupt
from hiercluster.errors import HierclusterError, short_repr
from hiercluster.run.grid import GridPoint
from hiercluster.run.records import SpecResult
from hiercluster.run.sweep import SweepContext, code_version, evaluate_point
from quant.device import model_device

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11

EXECUTORS = ("serial", "ray")
# How long the driver waits for a Ray task before it checks for Ctrl-C again (seconds).
_POLL_S = 0.5
# How long the driver waits for a TCP answer from a HOST:PORT address before it gives up
# (seconds): a head node answers in milliseconds, and ray.init would retry for minutes.
_PROBE_S = 5.0
# HOST:PORT, the host a name, an IPv4 address or a bracketed IPv6 one.
_HOST_PORT = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):(?P<port>\d{1,5})")
# Addresses Ray itself understands that are not HOST:PORT: join the instance on this
# machine, or start a new one.
_RAY_WORDS = ("auto", "local")
# Where the address of a running Ray cluster is printed.
_FIND_ADDRESS = "`ray status` on the head node prints it, as HOST:6379 by default"
# The end of every message about a failed task: nothing finished is lost.
_RESUME = "the finished specs are saved; run the same command again to resume"
_SAME_CODE = "install the same hiercluster and torch on every node"


class Executor(Protocol):
    """Runs pending specs and yields their results as they finish.

    Entered (``with executor:``) before the run prepares anything: whatever it needs
    (Ray, a cluster) is checked there, so that a failure costs nothing.
    """

    name: str

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc_info: object) -> None: ...

    def map(self, ctx: SweepContext, todo: Sequence[tuple[GridPoint, str]]) -> Iterator[SpecResult]: ...


class SerialExecutor:
    """Each spec in turn, in this process (the default).

    It uses the torch threads the command set: all cores unless ``runtime.threads``.

    Examples
    --------
    >>> with SerialExecutor() as executor:
    ...     executor.name
    'serial'
    """

    name = "serial"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None

    def map(self, ctx: SweepContext, todo: Sequence[tuple[GridPoint, str]]) -> Iterator[SpecResult]:
        for point, key in todo:
            interrupt.check()  # Ctrl-C between specs: the finished ones are all in the store
            yield evaluate_point(point, ctx, key)


@dataclasses.dataclass(frozen=True)
class WorkerInfo:
    """Who computed a result: the worker's host, the versions of its code, and the device type it ran on."""

    node: str
    version: Mapping[str, Any]
    device: str


@dataclasses.dataclass(frozen=True)
class TaskOutput:
    """What a Ray task returns: the spec's result, its worker, and the warnings raised while computing it."""

    result: SpecResult
    worker: WorkerInfo
    warnings: tuple[tuple[type[Warning], str], ...] = ()


class RayExecutor:
    """Each spec as a Ray task; the shared state goes through the object store once.

    Entering it imports Ray and connects (or starts a local instance); leaving it shuts
    down an instance it started. :meth:`map` outside a ``with`` block connects for that
    call only.

    Parameters
    ----------
    address : str, optional
        A Ray cluster's address (``"auto"``, ``"HOST:6379"``, ``"ray://HOST:10001"``). Without
        one, the Ray instance this process already joined is used, or a local one is started
        (and shut down at the end).
    num_cpus : int, optional
        CPUs of a local instance started here (default: all of this machine's).
    threads_per_task : int, optional
        Torch threads (and Ray CPUs requested) per task; default ``runtime.threads`` or 1.
    """

    name = "ray"

    def __init__(self, address: str | None = None, num_cpus: int | None = None, threads_per_task: int | None = None):
        self.address = check_address(address)
        self.num_cpus = num_cpus
        self.threads_per_task = threads_per_task
        self._ray: Any = None  # the ray module while entered
        self._started = False  # whether entering started the instance (then leaving shuts it down)

    def __enter__(self) -> Self:
        ray = _import_ray()
        self._started = self._connect(ray)
        self._ray = ray
        return self

    def __exit__(self, *exc_info: object) -> None:
        ray, started = self._ray, self._started
        self._ray, self._started = None, False
        if ray is not None and started:
            ray.shutdown()

    def map(self, ctx: SweepContext, todo: Sequence[tuple[GridPoint, str]]) -> Iterator[SpecResult]:
        if not todo:
            return
        if self._ray is None:  # not entered: connect for this call only
            with self:
                yield from self._run(self._ray, ctx, todo)
            return
        yield from self._run(self._ray, ctx, todo)

    def _connect(self, ray: Any) -> bool:
        """Join the cluster (or the instance already joined, or a new local one); True when this call started it."""
        if ray.is_initialized():
            return False
        where = f"the Ray cluster at --address {self.address}" if self.address else "a local Ray instance"
        probe_address(self.address)
        if self.address and self.address.startswith("ray://") and not _has_ray_client():
            raise HierclusterError(
                f"--address {self.address} is a Ray client address, which needs Ray's client (ray[client]): "
                "pip install 'hiercluster[ray]', or give the head node's HOST:6379 and run on a node of the cluster"
            )
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
        if self.address is None and self.num_cpus is not None:
            kwargs["num_cpus"] = self.num_cpus
        try:
            ray.init(address=self.address, **kwargs)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: BLE001 - ray.init may end in SystemExit (a signal while it retries)
            _shutdown_quietly(ray)
            hint = f"check the address ({_FIND_ADDRESS})" if self.address else "check that `ray start --head` works"
            raise HierclusterError(
                f"could not connect to {where} ({_first_line(exc)}); {hint}, or run without --executor ray"
            ) from None
        return True

    def _run(self, ray: Any, ctx: SweepContext, todo: Sequence[tuple[GridPoint, str]]) -> Iterator[SpecResult]:
        threads = self.threads_per_task or ctx.cfg.runtime.threads or 1
        gpus = 1 if ctx.device.type == "cuda" else 0
        check_feasible(ray.nodes(), threads, gpus)
        options: dict[str, Any] = {"num_cpus": threads, "num_gpus": gpus, "max_retries": 0}
        # The context already holds the calibration images and the float side of every metric
        # (a worker may not see the data, and nothing is computed once per task that could be once).
        shared = ray.put(_for_workers(ctx))  # once: every task reads the same copy
        task = ray.remote(_evaluate_task).options(**options)
        pending = {task.remote(shared, point, key, threads): point for point, key in todo}
        version, warned = code_version(), set()
        try:
            while pending:
                interrupt.check()
                done, _ = ray.wait(list(pending), num_returns=1, timeout=_POLL_S)
                for ref in done:
                    point = pending.pop(ref)
                    output = _result(ray, ref, point)
                    check_worker(output.worker, version, ctx.device.type, point.tag)
                    reemit_warnings(output.warnings, warned)
                    yield output.result
        finally:
            for ref in pending:  # an interrupted or failed sweep leaves no task running
                ray.cancel(ref, force=True)


def check_address(address: str | None) -> str | None:
    """``address`` when Ray could take it as a cluster's address; else one :class:`HierclusterError`.

    Accepted: none (a local instance), ``auto``/``local``, ``HOST:PORT`` and an address with a
    scheme (``ray://HOST:10001``), which Ray checks itself.

    Examples
    --------
    >>> check_address("head.example.org:6379")
    'head.example.org:6379'
    >>> check_address("head.example.org")
    Traceback (most recent call last):
    ...
    hiercluster.errors.HierclusterError: --address 'head.example.org' is not a Ray address; give HOST:PORT (`ray status` on the head node prints it, as HOST:6379 by default), ray://HOST:10001, or auto
    """
    if address is None or address in _RAY_WORDS or "://" in address:
        return address
    match = _HOST_PORT.fullmatch(address)
    if match is None or not 0 < int(match.group("port")) < 2**16:
        raise HierclusterError(
            f"--address {short_repr(address)} is not a Ray address; give HOST:PORT ({_FIND_ADDRESS}), "
            "ray://HOST:10001, or auto"
        )
    return address


def probe_address(address: str | None, timeout: float = _PROBE_S) -> None:
    """For a ``HOST:PORT`` address, one TCP connection: nothing answering is one :class:`HierclusterError`.

    ``ray.init`` retries an unreachable address for minutes (and may end in
    ``SystemExit``); this answers in at most ``timeout`` seconds. Other addresses
    (``auto``, ``ray://...``) are left to Ray.
    """
    match = _HOST_PORT.fullmatch(address or "")
    if match is None:
        return
    host, port = match.group("host").strip("[]"), int(match.group("port"))
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        why = f"no answer within {timeout:g} s" if isinstance(exc, TimeoutError) else (exc.strerror or _first_line(exc))
        raise HierclusterError(
            f"--address {address}: nothing answers there ({why}); give the head node's address "
            f"({_FIND_ADDRESS}), or leave --address out for a local Ray instance"
        ) from None


def check_feasible(nodes: Iterable[Mapping[str, Any]], num_cpus: int, num_gpus: int) -> None:
    """Refuse a task request no live node of the cluster could ever meet (Ray would wait forever).

    Parameters
    ----------
    nodes : iterable of mapping
        ``ray.nodes()``: each node's ``Alive`` flag and total ``Resources``.
    num_cpus, num_gpus : int
        What each task requests (``runtime.threads``; one GPU when the device is CUDA).

    Examples
    --------
    >>> check_feasible([{"Alive": True, "Resources": {"CPU": 8.0}}], 4, 0)
    >>> check_feasible([{"Alive": True, "Resources": {"CPU": 8.0}}], 16, 0)
    Traceback (most recent call last):
    ...
    hiercluster.errors.HierclusterError: each Ray task requests 16 CPUs, but no node of the Ray cluster has them (the most on one node: 8 CPUs, 0 GPUs); lower runtime.threads (the CPUs, and torch threads, of each task) to at most 8
    """
    alive = [dict(node.get("Resources") or {}) for node in nodes if node.get("Alive", True)]
    if any(res.get("CPU", 0) >= num_cpus and res.get("GPU", 0) >= num_gpus for res in alive):
        return
    most_cpus = max((res.get("CPU", 0) for res in alive), default=0)
    most_gpus = max((res.get("GPU", 0) for res in alive), default=0)
    need = f"{num_cpus} CPU{'s' if num_cpus != 1 else ''}" + (" and a GPU" if num_gpus else "")
    fixes = []
    if num_cpus > most_cpus:
        fixes.append(f"lower runtime.threads (the CPUs, and torch threads, of each task) to at most {int(most_cpus)}")
    if num_gpus > most_gpus:
        fixes.append("use --device cpu (config key runtime.device: cpu): the device resolved to CUDA here")
    if not fixes:  # enough CPUs on one node and a GPU on another
        fixes.append("lower runtime.threads to the CPUs of a GPU node, or use --device cpu")
    raise HierclusterError(
        f"each Ray task requests {need}, but no node of the Ray cluster has them "
        f"(the most on one node: {int(most_cpus)} CPUs, {int(most_gpus)} GPUs); {'; or '.join(fixes)}"
    )


def check_worker(worker: WorkerInfo, version: Mapping[str, Any], device_type: str, tag: str) -> None:
    """Refuse a result computed by other code, or on another device type, than this command's.

    Its resume key names this command's code versions and device type, so a result of any
    other would be stored under a key that does not describe it.

    Examples
    --------
    >>> ok = WorkerInfo("node-1", {"torch": "2.4.0"}, "cpu")
    >>> check_worker(ok, {"torch": "2.4.0"}, "cpu", "rtn-4b")
    >>> check_worker(ok, {"torch": "2.5.1"}, "cpu", "rtn-4b")
    Traceback (most recent call last):
    ...
    hiercluster.errors.HierclusterError: spec rtn-4b ran on Ray node node-1 with torch 2.4.0 where this command has torch 2.5.1; install the same hiercluster and torch on every node (its result is not kept)
    """
    theirs = [f"{name} {worker.version.get(name)}" for name in version if worker.version.get(name) != version[name]]
    ours = [f"{name} {version[name]}" for name in version if worker.version.get(name) != version[name]]
    if worker.device != device_type:
        theirs.append(f"device {worker.device}")
        ours.append(f"device {device_type}")
    if theirs:
        raise HierclusterError(
            f"spec {tag} ran on Ray node {worker.node} with {', '.join(theirs)} where this command has "
            f"{', '.join(ours)}; {_SAME_CODE} (its result is not kept)"
        )


def worker_device(device: torch.device) -> torch.device:
    """The device a Ray task runs on for the driver's ``device``.

    A task that requests a GPU sees only the GPU Ray gave it (``CUDA_VISIBLE_DEVICES``),
    as ``cuda:0``: the driver's ``cuda:N`` would name another GPU, or none. Other devices
    are kept.

    Examples
    --------
    >>> worker_device(torch.device("cuda", 3))
    device(type='cuda')
    >>> worker_device(torch.device("cpu"))
    device(type='cpu')
    """
    return torch.device("cuda") if device.type == "cuda" else device


def record_warnings(caught: Iterable[warnings.WarningMessage]) -> tuple[tuple[type[Warning], str], ...]:
    """Caught warnings as (category, text) pairs, each once, in order: what a task sends back."""
    found: dict[tuple[type[Warning], str], None] = {}
    for w in caught:
        category = w.category if isinstance(w.category, type) and issubclass(w.category, Warning) else UserWarning
        found[(category, str(w.message))] = None
    return tuple(found)


def reemit_warnings(records: Iterable[tuple[type[Warning], str]], seen: set[tuple[type[Warning], str]]) -> None:
    """Warn here, with its category, each recorded warning not in ``seen`` (which it is added to).

    The driver's warning filters apply, as they would to the serial executor's warnings.
    """
    for category, message in records:
        if (category, message) not in seen:
            seen.add((category, message))
            warnings.warn(message, category, stacklevel=2)


def task_error(exc: BaseException, tag: str) -> HierclusterError:
    """The one line for a Ray task that failed: a worker's :class:`HierclusterError` as it was, else its cause.

    ``exc`` is what ``ray.get`` raised: a ``RayTaskError`` (whose ``cause`` is the
    worker's exception) or another ``RayError`` (a worker or node lost).
    """
    cause = getattr(exc, "cause", None) or exc
    if isinstance(cause, HierclusterError):
        where = getattr(exc, "ip", None)
        return HierclusterError(f"{cause} (on the Ray worker at {where})" if where else str(cause))
    hint = f" ({_SAME_CODE})" if isinstance(cause, ImportError) else ""
    return HierclusterError(
        f"spec {tag} failed on a Ray worker: {type(cause).__name__}: {_first_line(cause)}{hint}; {_RESUME}"
    )


def _for_workers(ctx: SweepContext) -> SweepContext:
    """The sweep context as tasks get it: the model on the CPU, the device as a worker names it.

    A worker need not have the driver's GPU to unpickle it (it moves the model to
    :func:`worker_device`), and nothing of the driver's run directory is needed on a worker.
    """
    model = copy.deepcopy(ctx.model).cpu()
    return dataclasses.replace(ctx, model=model, device=worker_device(ctx.device))


def _evaluate_task(ctx: SweepContext, point: GridPoint, key: str, threads: int) -> TaskOutput:
    """One spec on a Ray worker (module level, so Ray pickles it by reference).

    Its warnings come back with the result: Ray forwards no worker output to a driver
    started with ``log_to_driver=False``.
    """
    torch.set_num_threads(threads)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # every warning is recorded; the driver's filters decide what shows
        ctx.model.to(ctx.device)
        result = evaluate_point(point, ctx, key)
    worker = WorkerInfo(socket.gethostname(), code_version(), model_device(ctx.model).type)
    return TaskOutput(result, worker, record_warnings(caught))


def _result(ray: Any, ref: Any, point: GridPoint) -> TaskOutput:
    """A finished task's output; a failed task is one :class:`HierclusterError` (:func:`task_error`)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as exc:
        raise task_error(exc, point.tag) from None


def _first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message, or its type's name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _shutdown_quietly(ray: Any) -> None:
    """Undo a half-done ``ray.init``; its own failure would only hide the first one."""
    with contextlib.suppress(Exception):  # the connection error is the one to report
        ray.shutdown()


def _has_ray_client() -> bool:
    """Whether Ray's client (``ray[client]``: grpcio) is installed, which a ``ray://`` address needs."""
    return importlib.util.find_spec("grpc") is not None


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise HierclusterError(
            "--executor ray needs Ray, which is not installed: pip install 'hiercluster[ray]' "
            "(or run without --executor ray)"
        ) from None
    return ray


def make_executor(name: str, address: str | None = None) -> Executor:
    """The executor called ``name`` (``serial`` or ``ray``); ``address`` is for Ray only."""
    if name not in EXECUTORS:
        raise HierclusterError(f"unknown executor {name!r}; choose one of {', '.join(EXECUTORS)}")
    if name == "serial":
        if address is not None:
            raise HierclusterError("--address is for --executor ray (the Ray cluster to run the specs on)")
        return SerialExecutor()
    return RayExecutor(address=address)


__all__ = [
    "EXECUTORS",
    "Executor",
    "RayExecutor",
    "SerialExecutor",
    "TaskOutput",
    "WorkerInfo",
    "check_address",
    "check_feasible",
    "check_worker",
    "make_executor",
    "probe_address",
    "record_warnings",
    "reemit_warnings",
    "task_error",
    "worker_device",
]
