"""Model zoo: shapes, classifier access, penultimate features, checkpoints and their errors."""

import doctest
import errno
import json
import os
import pickle

import pytest
import torch
import torch.nn as nn

import hiercluster.models.zoo as zoo
from hiercluster.errors import HierclusterError
from hiercluster.models.zoo import (
    available_archs,
    build_model,
    classifier_layer,
    count_parameters,
    forward_features,
    load_checkpoint,
    load_weights,
    save_checkpoint,
)


def test_docstring_examples():
    assert doctest.testmod(zoo).failed == 0


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
    monkeypatch.setattr(zoo, "MAX_METADATA_BYTES", 100)
    ckpt = _meta_beside_checkpoint(tmp_path, json.dumps({**GOOD_META, "note": "x" * 200}))
    with pytest.raises(HierclusterError, match="is larger than"):
        load_checkpoint(ckpt)


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"arch": "a" * 201}, "key 'arch': a name of 201 characters"),
        ({"dataset": "d" * 2_000_000}, "key 'dataset': a name of 2,000,000 characters"),
        ({"classes": ["a", "b" * 201]}, "key 'classes'[1]: a name of 201 characters"),
        ({"classes": ["a", "b\nc"]}, "key 'classes'[1]: 'b\\nc' holds a line break or control character"),
        ({"classes": ["a", "b\x1b[1mc"]}, "holds a line break or control character"),
        ({"arch": "resnet8\u2028"}, "key 'arch': 'resnet8\\u2028' holds a line break"),
    ],
    ids=["arch too long", "dataset of 2 MB", "class name too long", "class name with a newline", "an escape code",
         "a Unicode line separator"],
)
def test_metadata_names_are_bounded_and_one_line(tmp_path, change, expected):
    ckpt = _meta_beside_checkpoint(tmp_path, json.dumps({**GOOD_META, **change}))
    with pytest.raises(HierclusterError) as err:
        load_checkpoint(ckpt)
    assert expected in str(err.value) and "\n" not in str(err.value) and len(str(err.value)) < 400


def test_metadata_names_at_the_cap_are_read(tmp_path):
    from hiercluster.models.zoo import MAX_NAME_CHARS, read_metadata

    meta = {**GOOD_META, "dataset": "d" * MAX_NAME_CHARS, "classes": ["a" * MAX_NAME_CHARS, "b c/d"]}
    assert read_metadata(_meta_beside_checkpoint(tmp_path, json.dumps(meta)))["dataset"] == "d" * MAX_NAME_CHARS


def test_unknown_arch_of_megabytes_is_quoted_short():
    with pytest.raises(HierclusterError) as err:
        build_model("x" * 2_000_000, 10)
    assert "unknown arch 'xxx" in str(err.value) and len(str(err.value)) < 400


def test_data_that_does_not_fit_quotes_class_names_on_one_line():
    from hiercluster.models.zoo import check_fits_data

    meta = {**GOOD_META, "classes": ["a", "b"]}
    with pytest.raises(HierclusterError) as err:
        check_fits_data(meta, "m.pt", "x" * 100_000, ["line\none" * 1000, "b"], 1)
    msg = str(err.value)
    assert "its classes are 'a', 'b', the data's are 'line\\none" in msg and "\n" not in msg and len(msg) < 400


def _plain_pickle(protocol):
    return pickle.dumps({"a": 1}, protocol=protocol)


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_a_plain_pickle_is_named_by_its_type_without_torch_warnings(tmp_path, protocol, recwarn):
    path = tmp_path / "m.pt"
    path.write_bytes(_plain_pickle(protocol))
    with pytest.raises(HierclusterError) as err:
        load_weights(build_model("resnet8", 10, 1), path)
    assert str(err.value) == (
        f"{path} is a plain Python pickle (of a dict), not a torch checkpoint; "
        "expected a state_dict saved with torch.save(model.state_dict(), path)"
    )
    assert not [w for w in recwarn if "pickle protocol" in str(w.message)]  # torch's warning is silenced


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy format"])
def test_a_whole_pickled_model_says_to_save_its_state_dict(tmp_path, legacy):
    path = tmp_path / "m.pt"
    torch.save(build_model("resnet8", 10, 1, width=4), path, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(HierclusterError) as err:
        load_weights(build_model("resnet8", 10, 1, width=4), path)
    assert str(err.value) == (
        f"checkpoint {path} holds a whole pickled model (GLOBAL hiercluster.models.zoo.CifarResNet), not a state_dict; "
        "save model.state_dict() instead (torch.save(model.state_dict(), path))"
    )


def test_a_model_pickled_without_torch_says_so(tmp_path):
    path = tmp_path / "m.pt"
    path.write_bytes(pickle.dumps(build_model("resnet8", 10, 1, width=4)))
    with pytest.raises(HierclusterError, match=r"is a plain Python pickle of a whole model \(hiercluster.models.zoo.CifarResNet\)"):
        load_weights(build_model("resnet8", 10, 1, width=4), path)


def test_a_weights_only_refusal_without_a_global_quotes_only_its_cause():
    from hiercluster.models.zoo import _weights_only_detail

    text = (
        "Weights only load failed. In PyTorch 2.6, ...\nPlease file an issue with the following so that we can make "
        "`weights_only=True` compatible with your use case: WeightsUnpickler error: \n\nUnsupported operand 100\n\n"
        "Check the documentation of torch.load to learn more"
    )
    assert _weights_only_detail(text) == "Unsupported operand 100"


@pytest.mark.parametrize(
    "head, expected",
    [
        (b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00]\x94.", "a list"),
        (b"(lp0\n.", "a list"),
        (b"cposix\nsystem\n.", "posix.system"),
        (b"\x80\x02K\x05.", "an object"),
        (b"hello world", None),
        (b"(hello", None),
        (b"PK\x03\x04", None),
    ],
)
def test_the_type_of_a_pickle_is_read_from_its_opcodes(head, expected):
    from hiercluster.models.zoo import _pickled_type

    assert _pickled_type(head) == expected


def test_a_checkpoint_that_is_a_fifo_is_refused_without_opening_it(tmp_path):
    os.mkfifo(tmp_path / "m.pt")  # torch.load would wait for a writer forever
    with pytest.raises(HierclusterError, match=r"checkpoint .*m.pt is a named pipe \(FIFO\), not a file"):
        load_weights(build_model("resnet8", 10, 1), tmp_path / "m.pt")


def test_a_checkpoint_path_in_a_symlink_loop_is_left_to_the_cli(tmp_path):
    os.symlink(tmp_path / "m.pt", tmp_path / "m.pt")
    with pytest.raises(OSError) as err:  # the CLI's one mapping names it (errno ELOOP)
        load_weights(build_model("resnet8", 10, 1), tmp_path / "m.pt")
    assert err.value.errno == errno.ELOOP
