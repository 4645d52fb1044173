"""Devices: runtime.device / --device resolved and refused clearly, and every forward pass through quant.device.

This machine has no GPU: CUDA's presence and device count are monkeypatched where the
logic (auto, cuda:N ranges) is tested, and the real "no CUDA here" refusal is tested
only where torch indeed sees no GPU. Where a GPU exists the same commands run there.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import yaml

import hiercluster.evaluation.inference as inference
import hiercluster.hierarchy.embeddings as embeddings
import hiercluster.run.train as train
from hiercluster.cli import main
from hiercluster.errors import HierclusterError
from hiercluster.models.device import check_device_name, resolve_device
from hiercluster.run.config import TrainConfig, load_config
from quant.device import to_device

NO_CUDA = not torch.cuda.is_available()
NUMBER = " (cuda:N takes a GPU number: cuda:0, cuda:1, ...)"


def _machine(monkeypatch, cuda: int = 0, mps: bool = False) -> None:
    """Pretend this machine has ``cuda`` CUDA devices and MPS or not."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)


@pytest.mark.parametrize(
    ("cuda", "mps", "expected"),
    [(0, False, torch.device("cpu")), (2, False, torch.device("cuda")), (0, True, torch.device("cpu")),
     (1, True, torch.device("cuda"))],
)
def test_auto_prefers_cuda_then_the_cpu_never_mps(monkeypatch, cuda, mps, expected):
    """MPS has no float64, which quant's range search uses: auto leaves it to an explicit --device mps."""
    _machine(monkeypatch, cuda, mps)
    assert resolve_device("auto") == expected


def test_cpu_and_available_devices_resolve_to_themselves(monkeypatch):
    _machine(monkeypatch, cuda=2, mps=True)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("cuda") == torch.device("cuda")
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("mps") == torch.device("mps")


@pytest.mark.parametrize(
    ("cuda", "name", "message"),
    [
        (2, "cuda:2", r"^--device is cuda:2, but this machine has 2 CUDA devices \(cuda:0 \.\. cuda:1\); use one of those, or --device cpu$"),
        (1, "cuda:7", r"^--device is cuda:7, but this machine has 1 CUDA device \(cuda:0\); use one of those"),
        (0, "cuda", r"^--device is cuda, but CUDA is not available here \(torch .*\); use --device cpu "),
        (0, "cuda:0", r"^--device is cuda:0, but CUDA is not available here"),
        (0, "mps", r"^--device is mps, but MPS \(Apple's GPU backend\) is not available here .*; use --device cpu "),
    ],
)
def test_a_device_the_machine_lacks_is_one_line_that_says_what_to_use(monkeypatch, cuda, name, message):
    _machine(monkeypatch, cuda)
    with pytest.raises(HierclusterError, match=message) as info:
        resolve_device(name, "--device")
    assert "\n" not in str(info.value)


def test_the_default_place_named_is_the_config_key(monkeypatch):
    _machine(monkeypatch, cuda=0)
    with pytest.raises(HierclusterError, match=r"^config key runtime.device is cuda, but CUDA is not available"):
        resolve_device("cuda")


@pytest.mark.skipif(not NO_CUDA, reason="this machine has a GPU")
def test_cuda_is_refused_on_this_cpu_only_machine():
    with pytest.raises(HierclusterError, match="CUDA is not available here"):
        resolve_device("cuda")


@pytest.mark.parametrize(
    ("name", "hint"),
    [("gpu", " (a GPU is cuda)"), ("GPU:0", " (a GPU is cuda)"), ("CPU", " (did you mean 'cpu'?)"), ("cude", " (did you mean 'cuda'?)"),
     ("cuda:", NUMBER), ("cuda:-1", NUMBER), ("cuda:1.5", NUMBER), ("cuda: 0", NUMBER), ("cuda:123456", NUMBER),
     ("", ""), ("opencl", ""), (3, ""), (None, "")],
)
def test_a_name_that_is_no_device_is_refused_with_the_choices(name, hint):
    with pytest.raises(HierclusterError) as info:
        check_device_name(name, "--device")
    message = str(info.value)
    assert message.startswith("--device: ") and message.endswith(f"choose auto, cpu, cuda, cuda:N (N = 0, 1, ...) or mps{hint}")


# --- config ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["auto", "cpu", "cuda", "cuda:0", "cuda:12", "mps"])
def test_runtime_device_takes_every_device_name_without_asking_the_machine(name):
    # Only the spelling is checked at load: a config written for a GPU machine loads anywhere.
    assert load_config(None, [f"runtime.device={name}"]).runtime.device == name


def test_runtime_defaults_and_refusals():
    runtime = load_config(None).runtime
    assert (runtime.device, runtime.workers, runtime.threads) == ("auto", 0, None)
    assert load_config(None, ["runtime.workers=4"]).runtime.workers == 4
    cases = {
        "runtime.device=gpu": "config key runtime.device: 'gpu' is not a device; choose auto, cpu, cuda, cuda:N",
        "runtime.device=0": "config key runtime.device: expected str, got 0",
        "data.workers=2": "config key data.workers has moved: write it as runtime.workers",
        "runtime.workers=257": "config key runtime.workers: must be >= 0 and <= 256, got 257",
        "runtime.workers=-1": "config key runtime.workers: must be >= 0 and <= 256, got -1",
    }
    for override, message in cases.items():
        with pytest.raises(HierclusterError) as info:
            load_config(None, [override])
        assert str(info.value).startswith(message), (override, str(info.value))


def test_reading_a_config_loads_no_torch():
    # The device name is checked without torch, so that a typo is refused in a fraction of a second.
    code = "import sys; from hiercluster.run.config import load_config; load_config(None, ['runtime.device=cuda:1']); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- forward passes ---------------------------------------------------------------------


def test_collect_logits_returns_cpu_float32_logits_of_a_float64_model():
    torch.manual_seed(0)
    model = nn.Linear(5, 3).double()
    xs = [torch.randn(4, 5, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)]
    ys = [torch.tensor([0, 1, 2, 0]), torch.tensor([2, 1], dtype=torch.int32)]
    logits, labels = inference.collect_logits(model, list(zip(xs, ys)))
    assert logits.dtype == torch.float32 and logits.device.type == "cpu" and logits.shape == (6, 3)
    assert labels.dtype == torch.int64 and labels.device.type == "cpu" and labels.tolist() == [0, 1, 2, 0, 2, 1]
    with torch.no_grad():
        expected = (torch.cat(xs) @ model.weight.T + model.bias).float()  # independent of the module's forward
    torch.testing.assert_close(logits, expected)


class _Probe(nn.Module):
    """Records every input it is called with."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x)
        return x


def _spy(monkeypatch, module) -> set[int]:
    """``module.to_device`` replaced by a spy that hands out copies; returns the ids it handed out."""
    handed_out: set[int] = set()
    keep: list = []

    def copies(out):
        if isinstance(out, tuple):
            return type(out)(copies(item) for item in out)
        if isinstance(out, torch.Tensor):
            out = out.clone()
            keep.append(out)  # alive until the test ends, so ids stay unique
            handed_out.add(id(out))
        return out

    def spy(batch, device):
        return copies(to_device(batch, device))

    monkeypatch.setattr(module, "to_device", spy)
    return handed_out


def _digits_batches(n_batches: int = 3, size: int = 32):
    from hiercluster.data.datasets import load_dataset, make_loader

    data = load_dataset("digits", split="train")
    return data, [batch for _, batch in zip(range(n_batches), make_loader(data, size))]


def _probe_net() -> tuple[nn.Module, _Probe]:
    probe = _Probe()
    return nn.Sequential(probe, nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)), probe


@pytest.mark.parametrize("where", ["collect_logits", "centroid embeddings", "confusion embeddings", "training"])
def test_every_forward_pass_gets_its_batch_from_quant_to_device(monkeypatch, where):
    torch.manual_seed(0)
    model, probe = _probe_net()
    data, batches = _digits_batches()
    if where == "collect_logits":
        handed_out = _spy(monkeypatch, inference)
        inference.collect_logits(model, batches)
    elif where.endswith("embeddings"):
        handed_out = _spy(monkeypatch, embeddings)
        embeddings.class_embeddings(model, where.split()[0].replace("centroid", "centroids"), batches)
    else:
        handed_out = _spy(monkeypatch, train)
        cfg = TrainConfig(epochs=1, batch_size=256, crop_padding=1, hflip=True)
        train.train_model(model, data, cfg, progress=False)
    assert probe.inputs, "no forward pass ran"
    strays = [tuple(x.shape) for x in probe.inputs if id(x) not in handed_out]
    assert strays == [], f"forward passes on batches that did not go through quant.device.to_device: {strays}"


# --- commands ---------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def keep_threads():
    """A command sets torch's threads for the whole process (--threads, runtime.threads): restore them."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_every_command_that_runs_a_model_takes_device():
    import argparse

    from hiercluster.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    takes = {name for name, p in sub.choices.items() if "--device" in {o for a in p._actions for o in a.option_strings}}
    assert takes == {"train", "evaluate-checkpoint", "run", "hierarchy", "quantize", "evaluate", "sensitivity"}  # not report


@pytest.fixture(scope="module")
def digits_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "r8.pt"
    assert main(["train", "configs/digits.yaml", "--out", str(out), "--set", "train.epochs=1", "--device", "cpu", "--threads", "1"]) == 0
    return out


def test_train_on_the_cpu_records_the_device_and_saves_cpu_tensors(digits_checkpoint):
    meta = json.loads(digits_checkpoint.with_suffix(".json").read_text())
    assert meta["device"] == "cpu"
    state = torch.load(digits_checkpoint, map_location="meta", weights_only=True)  # where the tensors were saved from
    assert state and all(t.device.type == "meta" for t in state.values())
    saved = torch.load(digits_checkpoint, weights_only=True)  # no map_location: loads where it was saved
    assert all(t.device.type == "cpu" for t in saved.values())


def test_evaluate_checkpoint_on_the_cpu_and_a_missing_gpu_refused(digits_checkpoint, capsys, monkeypatch):
    assert main(["evaluate-checkpoint", str(digits_checkpoint), "--device", "cpu", "--limit", "100"]) == 0
    assert ": accuracy " in capsys.readouterr().out
    _machine(monkeypatch, cuda=0)
    assert main(["evaluate-checkpoint", str(digits_checkpoint), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("hiercluster evaluate-checkpoint: error: --device is cuda, but CUDA is not available here")
    assert "use --device cpu" in err


def test_a_misspelled_device_flag_is_a_usage_error(digits_checkpoint, capsys):
    assert main(["evaluate-checkpoint", str(digits_checkpoint), "--device", "gpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "argument --device: 'gpu' is not a device; choose auto, cpu" in err


def _config(tmp_path, checkpoint, **runtime) -> str:
    cfg = {
        "data": {"dataset": "digits", "batch_size": 256},
        "model": {"checkpoint": str(checkpoint)},
        "hierarchy": {"embedding": "fc_weights", "levels": [5, 2]},
        "quant": {"schemes": ["asymmetric"], "bits": [8, 2], "clipping": ["minmax"]},
        "eval": {"random_seeds": 3},
        "output": {"export_models": False},
        "runtime": {"threads": 1, **runtime},
    }
    path = tmp_path / "digits_device.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_the_whole_digits_pipeline_runs_with_device_cpu(digits_checkpoint, tmp_path, monkeypatch, capsys):
    import hiercluster.run.pipeline as pipeline
    from hiercluster.run import prepare as prepare_module
    from hiercluster.run.store import ResultsStore

    devices = []
    real_prepare = prepare_module.prepare

    def recording(*args, **kwargs):
        prep = real_prepare(*args, **kwargs)
        devices.append((prep.device, {p.device for p in prep.model.parameters()}))
        return prep

    monkeypatch.setattr(prepare_module, "prepare", recording)
    monkeypatch.setattr(pipeline, "prepare", recording)
    out = tmp_path / "run"
    assert main(["run", _config(tmp_path, digits_checkpoint, device="cpu"), "--out", str(out), "--quiet"]) == 0
    assert devices == [(torch.device("cpu"), {torch.device("cpu")})]
    with ResultsStore(out / "results.sqlite") as store:
        assert len(store.done_keys()) == 2  # both specs (8 and 2 bits)
        assert {row["level"] for row in store.results()} == {"k=5", "k=2"}
    assert (out / "report.md").is_file()
    assert "float accuracy" in capsys.readouterr().out


def test_the_device_flag_overrides_the_config_and_a_missing_device_stops_before_any_work(
    digits_checkpoint, tmp_path, monkeypatch, capsys
):
    _machine(monkeypatch, cuda=0)
    config = _config(tmp_path, digits_checkpoint, device="cuda")
    out = tmp_path / "tree"
    assert main(["hierarchy", config, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hiercluster hierarchy: error: config key runtime.device is cuda, but CUDA is not available")
    assert err.count("\n") == 1 and not out.exists()  # refused before the run directory was made
    assert main(["hierarchy", config, "--out", str(out), "--quiet", "--device", "cpu"]) == 0
    assert (out / "hierarchy.json").is_file()
    assert main(["run", config, "--out", str(tmp_path / "run"), "--device", "cuda:1"]) == 2
    assert "--device is cuda:1, but CUDA is not available" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_cuda_device_turns_tf32_off(monkeypatch):
    """TF32 would make GPU logits differ from the CPU's by more than kernel order: resolving CUDA turns it off."""
    _machine(monkeypatch, cuda=1)
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    # torch's flags are module attributes served by __getattr__: set and restored by hand
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = True, True
    try:
        assert resolve_device("auto") == torch.device("cuda")
        assert torch.backends.cuda.matmul.allow_tf32 is False and torch.backends.cudnn.allow_tf32 is False
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
