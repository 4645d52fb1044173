"""Executors: who runs the pending specs of a sweep.

Every spec is independent: it reads the run's shared, prepared state and returns a
:class:`~hiercluster.run.records.SpecResult`. An executor only decides where that
happens; the driver (:func:`hiercluster.run.pipeline.run_pipeline`) alone writes the
results store and the run directory, so resuming works the same for every executor.

* :class:`SerialExecutor` (the default) runs the specs one after another in this
  process. It imports nothing beyond the sweep itself.
* :class:`RayExecutor` runs each spec as a Ray task. The prepared state goes through
  Ray's object store once (``ray.put``), not once per task; results come back to the
  driver in the order they finish. Ray is an optional dependency:
  ``pip install 'hiercluster[ray]'``.

Why Ray rather than Dask: a spec is a coarse, stateful task (minutes of PyTorch work on
a model of up to hundreds of MB) and not a step of a dataframe or array graph. Ray's
object store shares that model between tasks on a node without copying it per task,
places tasks by CPU and GPU requests (``num_gpus``), and one address connects a laptop
to a cluster (``ray start --head`` / ``ray up``); Dask's strengths (lazy collections,
graph optimisation) buy nothing here.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from hiercluster import interrupt
from hiercluster.errors import HierclusterError
from hiercluster.run.grid import GridPoint
from hiercluster.run.prepare import Prepared
from hiercluster.run.records import SpecResult
from hiercluster.run.sweep import evaluate_point, fill_float_stats

EXECUTORS = ("serial", "ray")
# How long the driver waits for a Ray task before it checks for Ctrl-C again (seconds).
_POLL_S = 0.5


class Executor(Protocol):
    """Runs pending specs and yields their results as they finish."""

    name: str

    def map(self, prep: Prepared, todo: Sequence[tuple[GridPoint, str]]) -> Iterator[SpecResult]: ...


class SerialExecutor:
    """Each spec in turn, in this process (the default).

    Examples
    --------
    >>> SerialExecutor().name
    'serial'
    """

    name = "serial"

    def map(self, prep: Prepared, todo: Sequence[tuple[GridPoint, str]]) -> Iterator[SpecResult]:
        for point, key in todo:
            interrupt.check()  # Ctrl-C between specs: the finished ones are all in the store
            yield evaluate_point(point, prep, key)


class RayExecutor:
    """Each spec as a Ray task; the shared state goes through the object store once.

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
        self.address = address
        self.num_cpus = num_cpus
        self.threads_per_task = threads_per_task

    def map(self, prep: Prepared, todo: Sequence[tuple[GridPoint, str]]) -> Iterator[SpecResult]:
        if not todo:
            return
        ray = _import_ray()
        started = self._connect(ray)
        try:
            yield from self._run(ray, prep, todo)
        finally:
            if started:
                ray.shutdown()

    def _connect(self, ray: Any) -> bool:
        """Join the cluster (or the instance already joined, or a new local one); True when this call started it."""
        if ray.is_initialized():
            return False
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
        if self.address is None and self.num_cpus is not None:
            kwargs["num_cpus"] = self.num_cpus
        try:
            ray.init(address=self.address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
            where = f"the Ray cluster at --address {self.address}" if self.address else "a local Ray instance"
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise HierclusterError(
                f"could not connect to {where} ({first}); check the address (`ray status` on the head node "
                "prints it), or run without --executor ray"
            ) from None
        return True

    def _run(self, ray: Any, prep: Prepared, todo: Sequence[tuple[GridPoint, str]]) -> Iterator[SpecResult]:
        threads = self.threads_per_task or prep.cfg.runtime.threads or 1
        options: dict[str, Any] = {"num_cpus": threads, "max_retries": 0}
        if prep.device.type == "cuda":
            options["num_gpus"] = 1
        calibrated = next((p for p, _ in todo if p.needs_calibration), None)
        if calibrated is not None:  # loaded here: a worker may not see the data
            prep.calibration_batches(calibrated.calibration_user)
        fill_float_stats(prep)  # the float side of every metric, once, not once per task
        shared = ray.put(_for_workers(prep))  # once: every task reads the same copy
        task = ray.remote(_evaluate_task).options(**options)
        pending = {task.remote(shared, point, key, threads): point for point, key in todo}
        try:
            while pending:
                interrupt.check()
                done, _ = ray.wait(list(pending), num_returns=1, timeout=_POLL_S)
                for ref in done:
                    point = pending.pop(ref)
                    yield _result(ray, ref, point)
        finally:
            for ref in pending:  # an interrupted or failed sweep leaves no task running
                ray.cancel(ref, force=True)


def _for_workers(prep: Prepared) -> Prepared:
    """The prepared state as tasks get it: the model on the CPU (a worker moves it to ``prep.device``).

    A worker need not have the driver's GPU to unpickle it, and nothing of the driver's run
    directory is needed on a worker.
    """
    model = copy.deepcopy(prep.model).cpu()
    return dataclasses.replace(prep, model=model)


def _evaluate_task(prep: Prepared, point: GridPoint, key: str, threads: int) -> SpecResult:
    """One spec on a Ray worker (module level, so Ray pickles it by reference)."""
    import torch

    torch.set_num_threads(threads)
    prep.model.to(prep.device)
    return evaluate_point(point, prep, key)


def _result(ray: Any, ref: Any, point: GridPoint) -> SpecResult:
    """A finished task's result; a user-facing error raised on a worker is raised here as it was."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, HierclusterError):
            raise HierclusterError(str(cause)) from None
        raise
    except ray.exceptions.RayError as exc:  # a worker died (out of memory, killed, node lost)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HierclusterError(
            f"the Ray task of spec {point.tag} failed ({first}); the finished specs are saved: run the same command "
            "again to resume"
        ) from None


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


__all__ = ["EXECUTORS", "Executor", "RayExecutor", "SerialExecutor", "make_executor"]
