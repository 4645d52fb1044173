"""Model zoo: shapes, classifier access, penultimate features, checkpoints and their errors."""

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
    with pytest.raises(HierclusterError, match="cannot read checkpoint"):  # weights_only refuses it
        load_weights(build_model("resnet8", 10, 1), unsafe)
    with pytest.raises(HierclusterError, match="not found"):
        load_weights(build_model("resnet8", 10, 1), tmp_path / "none.pt")


def test_load_checkpoint_needs_metadata(tmp_path):
    torch.save(build_model("resnet8", 10, 1).state_dict(), tmp_path / "bare.pt")
    with pytest.raises(HierclusterError, match="no metadata file"):
        load_checkpoint(tmp_path / "bare.pt")
