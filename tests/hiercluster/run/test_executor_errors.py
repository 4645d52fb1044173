"""The Ray executor's checks, each without a Ray instance: addresses, connection failures, what
no node could run, a worker of other code, the worker's device, its warnings and its errors.

``tests/hiercluster/run/test_ray_executor.py`` runs the same paths on a local Ray instance.
"""

from __future__ import annotations

import socket
import types
import warnings

import pytest
import torch
import torch.nn as nn

from hiercluster.errors import HierclusterError
from hiercluster.run import executors
from hiercluster.run.executors import (
    RayExecutor,
    WorkerInfo,
    check_address,
    check_feasible,
    check_worker,
    make_executor,
    probe_address,
    record_warnings,
    reemit_warnings,
    task_error,
    worker_device,
)
from hiercluster.run.sweep import code_version

RESUME = "the finished specs are saved; run the same command again to resume"


def _closed_port() -> int:
    """A local port nothing listens on (just released by the OS)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- addresses ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address", [None, "auto", "local", "ray://head:10001", "head:6379", "10.0.0.5:6379", "[::1]:6379", "h:65535"]
)
def test_ray_addresses_are_taken(address):
    assert check_address(address) == address
    assert make_executor("ray", address).address == address


@pytest.mark.parametrize(
    "address", ["foo", "head:", ":6379", "head:0", "head:65536", "head:port", "a b:6379", "head:6379:1"]
)
def test_other_addresses_are_refused_before_anything_runs(address):
    with pytest.raises(HierclusterError, match=r"^--address .* is not a Ray address; give HOST:PORT \(`ray status`"):
        make_executor("ray", address)


def test_an_address_where_nothing_listens_is_one_line_at_once():
    address = f"127.0.0.1:{_closed_port()}"
    with pytest.raises(HierclusterError) as info:
        probe_address(address)
    message = str(info.value)
    assert message.startswith(f"--address {address}: nothing answers there (")
    assert "`ray status` on the head node" in message and "\n" not in message


def test_an_address_that_answers_passes_the_probe():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        probe_address(f"127.0.0.1:{server.getsockname()[1]}")
    probe_address("auto")  # left to Ray: no HOST:PORT to try
    probe_address("ray://127.0.0.1:1")


# --- connecting (a fake ray module: these are ray.init's failure modes) -------------------


def _fake_ray(init_error: BaseException | None = None, initialized: bool = False) -> types.SimpleNamespace:
    calls: list[str] = []

    def init(**kwargs):
        calls.append("init")
        if init_error is not None:
            raise init_error

    return types.SimpleNamespace(
        calls=calls,
        is_initialized=lambda: initialized,
        init=init,
        shutdown=lambda: calls.append("shutdown"),
    )


@pytest.mark.parametrize("error", [SystemExit(15), ConnectionError("GCS not ready\nretrying"), OSError("boom")])
def test_any_ray_init_failure_is_one_line(monkeypatch, error):
    ray = _fake_ray(error)
    monkeypatch.setattr(executors, "_import_ray", lambda: ray)
    with pytest.raises(HierclusterError) as info, RayExecutor(address="auto"):
        pass
    message = str(info.value)
    assert message.startswith("could not connect to the Ray cluster at --address auto (") and "\n" not in message
    assert "`ray status` on the head node" in message
    assert ray.calls == ["init", "shutdown"]  # a half-done init is undone


def test_ctrl_c_during_ray_init_stays_an_interrupt(monkeypatch):
    monkeypatch.setattr(executors, "_import_ray", lambda: _fake_ray(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        RayExecutor().__enter__()


def test_the_executor_shuts_down_only_an_instance_it_started(monkeypatch):
    started = _fake_ray()
    monkeypatch.setattr(executors, "_import_ray", lambda: started)
    with RayExecutor(num_cpus=2):
        assert started.calls == ["init"]
    assert started.calls == ["init", "shutdown"]

    joined = _fake_ray(initialized=True)  # the process had joined a cluster already: it stays joined
    monkeypatch.setattr(executors, "_import_ray", lambda: joined)
    with RayExecutor():
        pass
    assert joined.calls == []


def test_a_ray_client_address_without_ray_client_names_the_extra(monkeypatch):
    ray = _fake_ray()
    monkeypatch.setattr(executors, "_import_ray", lambda: ray)
    monkeypatch.setattr(executors, "_has_ray_client", lambda: False)
    expected = r"^--address ray://head:10001 is a Ray client address.*pip install 'hiercluster\[ray\]'"
    with pytest.raises(HierclusterError, match=expected), RayExecutor(address="ray://head:10001"):
        pass
    assert ray.calls == []


# --- what no node can run ----------------------------------------------------------------


def _node(cpus: float, gpus: float = 0, alive: bool = True) -> dict:
    resources = {"CPU": float(cpus), "memory": 1e9}
    if gpus:
        resources["GPU"] = float(gpus)
    return {"Alive": alive, "Resources": resources}


def test_a_request_one_node_meets_is_feasible():
    check_feasible([_node(2), _node(8, 1)], 4, 1)
    check_feasible([_node(4)], 4, 0)


def test_too_many_threads_per_task_names_runtime_threads():
    with pytest.raises(HierclusterError) as info:
        check_feasible([_node(2), _node(4)], 6, 0)
    assert str(info.value) == (
        "each Ray task requests 6 CPUs, but no node of the Ray cluster has them (the most on one node: 4 CPUs, "
        "0 GPUs); lower runtime.threads (the CPUs, and torch threads, of each task) to at most 4"
    )


def test_a_gpu_task_on_a_cluster_without_gpus_names_device_cpu():
    with pytest.raises(HierclusterError, match=r"requests 1 CPU and a GPU.*0 GPUs\); use --device cpu"):
        check_feasible([_node(16)], 1, 1)


def test_dead_nodes_do_not_count():
    with pytest.raises(HierclusterError, match="the most on one node: 2 CPUs"):
        check_feasible([_node(2), _node(64, alive=False)], 8, 0)
    with pytest.raises(HierclusterError, match="the most on one node: 0 CPUs, 0 GPUs"):
        check_feasible([], 1, 0)


def test_cpus_on_one_node_and_a_gpu_on_another_is_not_enough():
    with pytest.raises(HierclusterError, match=r"8 CPUs, 1 GPUs\); lower runtime.threads to the CPUs of a GPU node"):
        check_feasible([_node(8), _node(2, 1)], 4, 1)


# --- a worker of other code, and the worker's device --------------------------------------


def test_a_worker_of_the_same_code_passes():
    check_worker(WorkerInfo("node-a", code_version(), "cpu"), code_version(), "cpu", "asymmetric-4b")


@pytest.mark.parametrize("name", sorted(code_version()))
def test_a_worker_of_other_code_is_refused(name):
    theirs = {**code_version(), name: "other"}
    with pytest.raises(HierclusterError) as info:
        check_worker(WorkerInfo("node-b", theirs, "cpu"), code_version(), "cpu", "pow2-3b")
    message = str(info.value)
    assert message.startswith(f"spec pow2-3b ran on Ray node node-b with {name} other where this command has {name} ")
    assert "install the same hiercluster and torch on every node" in message


def test_a_worker_on_another_device_type_is_refused():
    with pytest.raises(HierclusterError, match="with device cpu where this command has device cuda"):
        check_worker(WorkerInfo("node-c", code_version(), "cpu"), code_version(), "cuda", "asymmetric-4b")


@pytest.mark.parametrize(
    ("driver", "worker"),
    [("cuda:3", "cuda"), ("cuda:0", "cuda"), ("cuda", "cuda"), ("cpu", "cpu"), ("mps", "mps")],
)
def test_a_task_uses_the_gpu_ray_gave_it(driver, worker):
    assert worker_device(torch.device(driver)) == torch.device(worker)


# --- warnings: recorded on the worker, each shown once here -------------------------------


class _Chatty(UserWarning):
    pass


def test_a_task_returns_its_warnings_and_who_ran_it(monkeypatch):
    def noisy_evaluate(point, prep, key):
        for _ in range(3):
            warnings.warn("attention projection weights ['attn.in_proj_weight'] are rounded to nearest", _Chatty)
        warnings.warn("old API", DeprecationWarning)
        return f"result of {key}"

    monkeypatch.setattr(executors, "evaluate_point", noisy_evaluate)
    prep = types.SimpleNamespace(model=nn.Linear(2, 2), device=torch.device("cpu"))
    threads = torch.get_num_threads()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nothing escapes the task: it is all recorded
            output = executors._evaluate_task(prep, None, "k1", 1)
    finally:
        torch.set_num_threads(threads)
    assert output.result == "result of k1"
    assert output.worker == WorkerInfo(socket.gethostname(), code_version(), "cpu")
    assert output.warnings == (
        (_Chatty, "attention projection weights ['attn.in_proj_weight'] are rounded to nearest"),
        (DeprecationWarning, "old API"),
    )


def test_worker_warnings_are_shown_once_each_with_their_category():
    seen: set = set()
    first = ((_Chatty, "a"), (RuntimeWarning, "b"))
    with pytest.warns(Warning) as shown:  # noqa: PT031 - two tasks' warnings in turn
        reemit_warnings(first, seen)
        reemit_warnings(((_Chatty, "a"), (_Chatty, "c")), seen)  # a second task's: "a" again
    assert [(w.category, str(w.message)) for w in shown] == [(_Chatty, "a"), (RuntimeWarning, "b"), (_Chatty, "c")]


def test_recorded_warnings_keep_order_and_drop_repeats():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for text in ("x", "y", "x"):
            warnings.warn(text, UserWarning)
        warnings.warn("z", FutureWarning)
    assert record_warnings(caught) == ((UserWarning, "x"), (UserWarning, "y"), (FutureWarning, "z"))


# --- errors on a worker --------------------------------------------------------------------


def test_a_worker_exception_is_one_line_with_the_spec_and_how_to_resume():
    exceptions = pytest.importorskip("ray.exceptions")
    oom = RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nGPU 0 has a total capacity of 8 GiB")
    error = task_error(exceptions.RayTaskError("_evaluate_task", "Traceback ...", oom, ip="10.0.0.7"), "gptq-2b")
    assert str(error) == (
        "spec gptq-2b failed on a Ray worker: RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB; " + RESUME
    )


def test_a_node_without_hiercluster_is_told_to_install_it():
    exceptions = pytest.importorskip("ray.exceptions")
    missing = ModuleNotFoundError("No module named 'hiercluster'")
    error = task_error(exceptions.RayTaskError("_evaluate_task", "tb", missing), "asymmetric-4b")
    assert "ModuleNotFoundError: No module named 'hiercluster' (install the same hiercluster and torch" in str(error)
    assert str(error).endswith(RESUME)


def test_a_worker_user_error_keeps_its_words_and_names_the_worker():
    exceptions = pytest.importorskip("ray.exceptions")
    cause = HierclusterError("data.root /data/imgs: no such file or folder; check the path")
    error = task_error(exceptions.RayTaskError("_evaluate_task", "tb", cause, ip="10.0.0.8"), "asymmetric-4b")
    assert str(error) == "data.root /data/imgs: no such file or folder; check the path (on the Ray worker at 10.0.0.8)"


def test_a_lost_worker_is_one_line_through_result():
    exceptions = pytest.importorskip("ray.exceptions")

    def get(ref):
        raise exceptions.WorkerCrashedError()

    ray = types.SimpleNamespace(get=get, exceptions=exceptions)
    point = types.SimpleNamespace(tag="pow2-4b")
    with pytest.raises(HierclusterError) as info:
        executors._result(ray, object(), point)
    message = str(info.value)
    assert message.startswith("spec pow2-4b failed on a Ray worker: WorkerCrashedError: ") and message.endswith(RESUME)
    assert "\n" not in message
