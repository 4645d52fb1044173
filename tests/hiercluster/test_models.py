"""Model zoo: shapes, classifier access, penultimate features, checkpoints and their errors."""

import json
import os
import pickle

import pytest
import torch
import torch.nn as nn

from hiercluster.errors import HierclusterError
from hiercluster.models import (
    available_archs,
    build_model,
    classifier_layer,
    count_parameters,
    forward_features,
    load_checkpoint,
    load_weights,
    save_checkpoint,
)


@pytest.mark.parametrize("arch,in_ch,size", [("resnet8", 1, 28), ("resnet20", 3, 32)])
def test_small_resnets(arch, in_ch, size):
    model = build_model(arch, num_classes=7, in_channels=in_ch, width=8)
    x = torch.randn(3, in_ch, size, size)
    feats, logits = forward_features(model, x)
    assert logits.shape == (3, 7) and feats.shape == (3, 32)  # 4 * width channels after pooling
    name, fc = classifier_layer(model)
    assert name == "fc" and fc.out_features == 7
    torch.testing.assert_close(fc(feats), logits)
    torch.testing.assert_close(model(x), logits)  # the hook leaves the model as it was


def test_resnet_depths_and_parameter_counts():
    # He et al. (2016) Table 6: resnet20 has 0.27M parameters at width 16 (10 classes, RGB).
    assert abs(count_parameters(build_model("resnet20", 10, 3)) - 0.27e6) < 0.01e6
    n8 = sum(isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) for m in build_model("resnet8", 10).modules())
    assert n8 == 7  # stem + 3 stages x 1 block x 2 convs


@pytest.mark.parametrize("arch,feat_dim", [("resnet18", 512), ("mobilenet_v2", 1280)])
def test_torchvision_models(arch, feat_dim):
    model = build_model(arch, num_classes=5, in_channels=1)
    x = torch.randn(2, 1, 32, 32)
    feats, logits = forward_features(model, x)
    assert logits.shape == (2, 5) and feats.shape == (2, feat_dim)
    _, fc = classifier_layer(model)
    torch.testing.assert_close(fc(feats), logits)


def test_unknown_arch_suggests():
    with pytest.raises(HierclusterError, match="did you mean .*resnet20"):
        build_model("resnet2O", 10)
    assert "resnet8" in available_archs() and "resnet18" in available_archs()


def test_checkpoint_roundtrip(tmp_path):
    model = build_model("resnet8", 4, 1, width=4)
    path = save_checkpoint(model, tmp_path / "m.pt", {"arch": "resnet8", "num_classes": 4, "in_channels": 1, "width": 4})
    loaded, meta = load_checkpoint(path)
    x = torch.randn(2, 1, 12, 12)
    torch.testing.assert_close(loaded(x), model.eval()(x))
    assert meta["width"] == 4
    with pytest.raises(HierclusterError, match="exists"):
        save_checkpoint(model, path, {"arch": "resnet8", "num_classes": 4, "in_channels": 1})


def test_mismatched_checkpoint_names_keys_and_shapes(tmp_path):
    torch.save(build_model("resnet8", 10, 1).state_dict(), tmp_path / "r8.pt")
    with pytest.raises(HierclusterError, match=r"missing keys layer1\.1\.") as err:
        build_model("resnet20", 10, 1, weights=tmp_path / "r8.pt")
    assert str(tmp_path / "r8.pt") in str(err.value)
    with pytest.raises(HierclusterError, match=r"fc\.weight: file \(10, 64\) vs model \(3, 64\)"):
        build_model("resnet8", 3, 1, weights=tmp_path / "r8.pt")


def test_damaged_and_unsafe_checkpoints(tmp_path):
    good = tmp_path / "good.pt"
    torch.save(build_model("resnet8", 10, 1).state_dict(), good)
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(HierclusterError, match="cannot read checkpoint"):
        load_weights(build_model("resnet8", 10, 1), damaged)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    unsafe = tmp_path / "unsafe.pt"
    with open(unsafe, "wb") as fh:
        pickle.dump({"fc.weight": Evil()}, fh, protocol=2)
    with pytest.raises(HierclusterError, match=r"holds a forbidden object \(GLOBAL print\)"):  # weights_only refuses it
        load_weights(build_model("resnet8", 10, 1), unsafe)
    with pytest.raises(HierclusterError, match="not found"):
        load_weights(build_model("resnet8", 10, 1), tmp_path / "none.pt")


def test_load_checkpoint_needs_metadata(tmp_path):
    torch.save(build_model("resnet8", 10, 1).state_dict(), tmp_path / "bare.pt")
    with pytest.raises(HierclusterError, match="no metadata file"):
        load_checkpoint(tmp_path / "bare.pt")


class _RunsACommand:
    """Unpickling this would run ``touch MARKER``: what a malicious checkpoint does."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_checkpoint_is_named_and_never_run(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    torch.save({"fc.weight": _RunsACommand(marker)}, path)
    with pytest.raises(HierclusterError) as err:
        load_weights(build_model("resnet8", 10, 1), path)
    msg = str(err.value)
    assert f"checkpoint {path} holds a forbidden object (GLOBAL {os.system.__module__}.system) and was not loaded" in msg
    assert "weights_only=True" in msg and "Re-running" not in msg and "\n" not in msg
    assert not marker.exists()


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"", r"is not a torch checkpoint \(the file is empty\)"),
        (b"hello world\n", r"is not a torch checkpoint \(not a zip or pickle file: it starts with b'hell'\)"),
    ],
)
def test_a_file_that_is_not_a_checkpoint_says_so(tmp_path, content, expected):
    path = tmp_path / "m.pt"
    path.write_bytes(content)
    with pytest.raises(HierclusterError, match=expected):
        load_weights(build_model("resnet8", 10, 1), path)


@pytest.mark.filterwarnings("ignore:Validating sparse tensor invariants")
@pytest.mark.parametrize(
    "state",
    [[torch.zeros(2)], {"fc.weight": 3}, {1: torch.zeros(2)}, {"fc.weight": torch.zeros(4, 4).to_sparse()}],
    ids=["a list", "a number", "a non-string key", "a sparse tensor"],
)
def test_checkpoint_not_a_state_dict_of_dense_tensors(tmp_path, state):
    path = tmp_path / "m.pt"
    torch.save(state, path)
    with pytest.raises(HierclusterError, match="does not hold a state_dict of tensors"):
        load_weights(build_model("resnet8", 10, 1), path)


def test_checkpoint_with_integer_weights_is_refused(tmp_path):
    state = build_model("resnet8", 10, 1).state_dict()
    state["fc.weight"] = state["fc.weight"].to(torch.int64)
    torch.save(state, tmp_path / "m.pt")
    with pytest.raises(HierclusterError, match=r"fc\.weight: file torch\.int64 vs model torch\.float32"):
        load_weights(build_model("resnet8", 10, 1), tmp_path / "m.pt")


def test_checkpoint_path_that_is_a_folder(tmp_path):
    (tmp_path / "m.pt").mkdir()
    with pytest.raises(HierclusterError, match="is a folder"):
        load_weights(build_model("resnet8", 10, 1), tmp_path / "m.pt")


GOOD_META = {"arch": "resnet8", "num_classes": 2, "in_channels": 1, "width": 4, "classes": ["a", "b"], "dataset": "x"}


def _meta_beside_checkpoint(tmp_path, text):
    (tmp_path / "m.json").write_text(text)
    return tmp_path / "m.pt"


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"num_classes": "ten"}, "key 'num_classes': expected an integer, got 'ten'"),
        ({"in_channels": None}, "key 'in_channels': expected an integer, got None"),
        ({"arch": 5}, "key 'arch': expected a string, got 5"),
        ({"num_classes": True}, "key 'num_classes': expected an integer, got True"),
        ({"width": 0}, "key 'width': expected an integer in [1, 1,024], got 0"),
        ({"num_classes": 10**9}, "key 'num_classes': expected an integer in [1, 100,000]"),
        ({"classes": ["a", 7]}, "key 'classes'[1]: expected a string, got 7"),
        ({"classes": ["a", "b", "c"]}, "3 class names but num_classes 2"),
        ({"dataset": ["x"]}, "key 'dataset': expected a string or null"),
    ],
)
def test_metadata_of_the_wrong_type_is_refused(tmp_path, change, expected):
    ckpt = _meta_beside_checkpoint(tmp_path, json.dumps({**GOOD_META, **change}))
    with pytest.raises(HierclusterError) as err:
        load_checkpoint(ckpt)
    assert f"metadata file {tmp_path / 'm.json'}" in str(err.value) and expected in str(err.value)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("[1, 2]", "expected an object, got [1, 2]"),
        ('{"arch": "resnet8"', "is not valid JSON"),
        ("[" * 100_000 + "]" * 100_000, "is not usable JSON: RecursionError"),
        ('{"num_classes": ' + "9" * 5000 + "}", "is not usable JSON: ValueError"),
        ('{"arch": "resnet8", "in_channels": 1}', "lacks 'num_classes'"),
    ],
    ids=["a list", "cut short", "nested too deep", "a 5,000-digit number", "a key missing"],
)
def test_metadata_that_is_not_an_object_or_not_json(tmp_path, text, expected):
    ckpt = _meta_beside_checkpoint(tmp_path, text)
    with pytest.raises(HierclusterError, match="metadata file") as err:
        load_checkpoint(ckpt)
    assert expected in str(err.value)


def test_metadata_file_over_the_cap_is_refused_unread(tmp_path, monkeypatch):
    import hiercluster.models as models

    monkeypatch.setattr(models, "MAX_METADATA_BYTES", 100)
    ckpt = _meta_beside_checkpoint(tmp_path, json.dumps({**GOOD_META, "note": "x" * 200}))
    with pytest.raises(HierclusterError, match="is larger than"):
        load_checkpoint(ckpt)
