"""hiercluster.run.config: YAML caps on config files and --set values, range caps, repeated values, paths."""

from __future__ import annotations

from pathlib import Path

import pytest

import hiercluster.run.config as config
import hiercluster.yamlio as yamlio
from hiercluster.errors import HierclusterError
from hiercluster.run.config import load_config, parse_override, resolve_path
from hiercluster.yamlio import load_yaml_text, read_yaml

REPO = Path(__file__).resolve().parents[3]


def _write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --- config files and --set values go through the bounded YAML reader -----------------


def test_a_file_over_the_byte_cap_is_refused_before_it_is_parsed(tmp_path, monkeypatch):
    monkeypatch.setattr(yamlio, "MAX_CONFIG_BYTES", 100)
    path = _write(tmp_path, "data: {dataset: digits}\n# " + "x" * 100)
    with pytest.raises(HierclusterError, match=r"config file .*c\.yaml is larger than 0 KiB"):
        load_config(path)
    monkeypatch.setattr(yamlio, "MAX_CONFIG_BYTES", 1024)
    assert load_config(path).data.dataset == "digits"


def test_a_set_value_over_the_byte_cap_is_refused(monkeypatch):
    monkeypatch.setattr(yamlio, "MAX_CONFIG_BYTES", 10)
    with pytest.raises(HierclusterError, match="the value of --set 'quant.bits' is larger than"):
        parse_override("quant.bits=[8, 6, 5, 4, 3]")
    assert parse_override("quant.bits=[8, 6]") == (["quant", "bits"], [8, 6])


def test_read_yaml_names_a_missing_file_and_a_folder(tmp_path):
    with pytest.raises(HierclusterError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(HierclusterError, match="is a folder, not a file"):
        load_config(tmp_path)


def test_a_set_value_with_an_undecodable_character_is_named():
    with pytest.raises(HierclusterError, match=r"--set 'data.dataset' is not UTF-8 text \(character '\\udce9'\)"):
        parse_override("data.dataset=caf\udce9")


# --- ranges and caps -------------------------------------------------------------------


@pytest.mark.parametrize("key, cap", [(k, v) for k, v in config._POSITIVE.items() if v is not None])
def test_every_positive_cap_allows_the_cap_and_refuses_one_more(key, cap):
    assert load_config(None, [f"{key}={cap}"]) is not None
    with pytest.raises(HierclusterError, match=f"config key {key}: must be > 0 and <= {cap:,}, got {cap + 1}"):
        load_config(None, [f"{key}={cap + 1}"])
    with pytest.raises(HierclusterError, match=f"config key {key}: must be > 0"):
        load_config(None, [f"{key}=0"])


# Keys inside list items (quant.methods[i].budgets) name the item's index: tests/hiercluster/run/test_mixed_precision.py.
@pytest.mark.parametrize("key, bound", [(k, v) for k, v in config._RANGES.items()
                                        if v[1] is not None and not v[2] and not k.startswith("quant.methods.")])
def test_every_closed_range_allows_its_ends_and_refuses_beyond(key, bound):
    lo, hi, _ = bound
    load_config(None, [f"{key}={lo}", f"{key}={hi}"])
    for bad in (lo - 1, hi + 1):  # a list key (hierarchy.levels) names the item: hierarchy.levels[0]
        with pytest.raises(HierclusterError, match=rf"config key {key}(\[0\])?: must be >= {lo} and <= {hi}"):
            load_config(None, [f"{key}={bad}"])


@pytest.mark.parametrize(
    "override, key",
    [
        ("quant.bits=[4, 0]", r"quant.bits\[1\]: 0 bits"),
        ("quant.bits=[17]", r"quant.bits\[0\]: 17 bits"),
        ("quant.activation_bits=0", "quant.activation_bits: 0 bits"),
        ("quant.plans=[{name: p, bits: [99]}]", r"quant.plans\[0\].bits\[0\]: 99 bits"),
        ("quant.plans=[{name: p, first_layer_bits: 0}]", r"quant.plans\[0\].first_layer_bits: 0 bits"),
        ("quant.plans=[{name: p, last_layer_bits: 32}]", r"quant.plans\[0\].last_layer_bits: 32 bits"),
        ("quant.methods=[{name: gptq, bits: [3, 20]}]", r"quant.methods\[0\].bits\[1\]: 20 bits"),
    ],
)
def test_bit_widths_outside_2_to_16_name_the_key(override, key):
    # weights may be 1 bit (binary); activations need 2
    lowest = "2" if "activation" in override else "1"
    with pytest.raises(HierclusterError, match=f"config key {key} is outside {lowest}..16"):
        load_config(None, [override])


def test_bit_widths_at_the_ends_are_fine():
    cfg = load_config(None, ["quant.bits=[2, 16]", "quant.schemes=[asymmetric]", "quant.activation_bits=16"])
    assert cfg.quant.bits == (2, 16)


@pytest.mark.parametrize(
    "override, message",
    [
        ("quant.schemes=[asymetric]", r"quant.schemes\[0\]: 'asymetric' is not one of .* \(did you mean 'asymmetric'\?\)"),
        ("quant.clipping=[mse, minmax, maxmin]", r"quant.clipping\[2\]: 'maxmin' is not one of"),
        ("quant.granularity=[per_layer]", r"quant.granularity\[0\]: 'per_layer' is not one of per_tensor, per_channel"),
        ("quant.methods=[{name: rtn, schemes: [pow3]}]", r"quant.methods\[0\].schemes\[0\]: 'pow3'"),
        ("quant.plans=[{name: p, schemes: [sym]}]", r"quant.plans\[0\].schemes\[0\]: 'sym'"),
    ],
)
def test_unknown_grid_names_are_refused_when_the_config_is_read(override, message):
    with pytest.raises(HierclusterError, match=message):
        load_config(None, [override])


@pytest.mark.parametrize(
    "key, items",
    [
        ("quant.bits", list(range(2, 17)) * 5),
        ("quant.plans", [{"name": f"p{i}"} for i in range(config.MAX_GRID_ITEMS + 1)]),
        ("quant.methods", ["rtn"] * (config.MAX_GRID_ITEMS + 1)),
        ("hierarchy.levels", list(range(2, config.MAX_LEVELS + 3))),
    ],
)
def test_lists_longer_than_their_cap_are_refused(key, items):
    limit = config._MAX_ITEMS[key]
    with pytest.raises(HierclusterError, match=f"config key {key}: {len(items):,} items, more than the {limit} allowed"):
        load_config(None, [f"{key}={items}"])


def test_lists_at_their_cap_are_fine():
    cfg = load_config(None, [f"quant.methods={['rtn'] * config.MAX_GRID_ITEMS}"])
    assert len(cfg.quant.methods) == config.MAX_GRID_ITEMS


# --- repeated values -------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        ("quant.bits=[4, 4]", "quant.bits: 4 is listed twice"),
        ("quant.schemes=[pow2, symmetric, pow2]", "quant.schemes: 'pow2' is listed twice"),
        ("quant.clipping=[mse, mse]", "quant.clipping: 'mse' is listed twice"),
        ("quant.granularity=[per_channel, per_channel]", "quant.granularity: 'per_channel' is listed twice"),
        ("quant.bn_reestimate=[false, true, false]", "quant.bn_reestimate: False is listed twice"),
        ("hierarchy.levels=[5, 3, 5]", "hierarchy.levels: 5 is listed twice"),
        ("quant.plans=[{name: p, bits: [2, 2]}]", r"quant.plans\[0\].bits: 2 is listed twice"),
        ("quant.plans=[{name: p, schemes: [pow2, pow2]}]", r"quant.plans\[0\].schemes: 'pow2' is listed twice"),
        ("quant.methods=[rtn, {name: gptq, bits: [3, 3]}]", r"quant.methods\[1\].bits: 3 is listed twice"),
        ("quant.methods=[{name: gptq, schemes: [symmetric, symmetric]}]", r"quant.methods\[0\].schemes: 'symmetric' is listed twice"),
        ("quant.methods=[{name: gptq, clipping: [mse, mse]}]", r"quant.methods\[0\].clipping: 'mse' is listed twice"),
        ("quant.methods=[{name: gptq, bn_reestimate: [true, true]}]", r"quant.methods\[0\].bn_reestimate: True is listed twice"),
        ("quant.methods=[{name: gptq, plans: [full, full]}]", r"quant.methods\[0\].plans: 'full' is listed twice"),
    ],
)
def test_a_repeated_list_value_is_refused_naming_key_and_value(override, message):
    with pytest.raises(HierclusterError, match=f"config key {message}; list each value once"):
        load_config(None, [override])


def test_method_items_may_share_a_name():
    cfg = load_config(None, ["quant.methods=[rtn, {name: rtn, clipping: [minmax], bits: [2]}]"])
    assert [m.name for m in cfg.quant.methods] == ["rtn", "rtn"]


# --- shapes ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, overrides, message",
    [
        ("- data\n- model\n", [], "the top level must be a mapping of sections"),
        ("3\n", [], "the top level must be a mapping of sections"),
        ("eval: 3\n", [], "config section eval: expected a mapping, got 3"),
        ("", ["eval=3"], "config section eval: expected a mapping, got 3"),
        ("", ["eval.random_seeds.x=3"], "config key eval.random_seeds: expected int"),
        ("eval: {random_seeds: 4}\n", ["eval.random_seeds.x=3"], "--set 'eval.random_seeds.x': 'random_seeds' is not a section"),
        ('"": 3\n', [], "unknown config key ''"),
        ('data: {"": 3}\n', [], "unknown config key 'data.'"),
        ("evaluation: {}\n", [], "unknown config key 'evaluation'"),
        ("", ["=3"], "--set expects section.key=value"),
    ],
)
def test_every_wrong_shape_is_one_line(tmp_path, text, overrides, message):
    path = _write(tmp_path, text)
    with pytest.raises(HierclusterError, match=message) as info:
        load_config(path, overrides)
    assert "\n" not in str(info.value)


def test_a_bombed_value_in_a_free_form_key_is_refused(tmp_path):
    # ten aliases of the level before at each of 7 levels: 10**7 values once expanded
    lines = ["l0: &l0 [a, a, a, a, a, a, a, a, a, a]"]
    lines += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, 7)]
    text = "hierarchy:\n  names:\n" + "".join(f"    {line}\n" for line in lines)
    with pytest.raises(HierclusterError, match=r"holds more than 100,000 values .* at hierarchy\.names\.l4"):
        load_config(_write(tmp_path, text))


# --- paths -----------------------------------------------------------------------------


def test_a_path_beside_the_config_comes_first(tmp_path, monkeypatch):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "m.pt").write_text("beside")
    (tmp_path / "m.pt").write_text("cwd")
    monkeypatch.chdir(tmp_path)
    assert resolve_path("m.pt", "cfg/c.yaml").read_text() == "beside"


def test_a_path_only_under_the_current_directory_is_still_found(tmp_path, monkeypatch):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "m.pt").write_text("cwd")
    monkeypatch.chdir(tmp_path)
    assert resolve_path("m.pt", "cfg/c.yaml") == Path("m.pt")


def test_a_path_found_nowhere_is_the_one_beside_the_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_path("new.pt", "cfg/c.yaml") == Path("cfg/new.pt")
    assert resolve_path("new.pt", None) == Path("new.pt")
    assert resolve_path(tmp_path / "abs.pt", "cfg/c.yaml") == tmp_path / "abs.pt"


@pytest.mark.parametrize("name", ["fashion_mnist.yaml", "cifar10.yaml", "digits.yaml", "cifar100.yaml"])
def test_shipped_configs_point_inside_the_repository_from_any_folder(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(REPO / "configs" / name)
    assert resolve_path(cfg.model.checkpoint, cfg.source).resolve().parent.parent.parent == REPO
    if cfg.data.root:
        assert config.data_root(cfg).resolve() == REPO / "data"
    if cfg.hierarchy.reference and cfg.hierarchy.reference != "dataset:coarse":
        assert resolve_path(cfg.hierarchy.reference, cfg.source).is_file()


def test_the_shipped_checkpoint_is_found_from_another_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(REPO / "configs" / "fashion_mnist.yaml")
    assert resolve_path(cfg.model.checkpoint, cfg.source).resolve() == REPO / "data" / "checkpoints" / "fashion_mnist_resnet20.pt"
    assert resolve_path(cfg.model.checkpoint, cfg.source).is_file()


# --- integers of thousands of digits ---------------------------------------------------


def test_a_decimal_integer_over_pythons_conversion_limit_is_one_line():
    with pytest.raises(HierclusterError, match="^x.yaml holds an integer of over 4,300 digits; no setting takes"):
        load_yaml_text("epochs: " + "9" * 5000, "x.yaml")


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.epochs=0x" + "f" * 4000, "config key train.epochs: must be > 0 and <= 10,000, got <an integer of about 4,817 digits>"),
        ("hierarchy.levels=[0x" + "f" * 4000 + "]", "config key hierarchy.levels[0]: must be >= 1 and <= 100000, got <an integer"),
        ("quant.bits=[0x" + "f" * 4000 + "]", "config key quant.bits[0]: <an integer of about 4,817 digits> bits is outside"),
        ("eval.seed=-0x" + "f" * 4000, "config key eval.seed: must be >= 0"),
    ],
)
def test_a_hex_integer_of_thousands_of_digits_is_refused_and_quoted_by_size(override, message):
    with pytest.raises(HierclusterError) as err:
        load_config(None, [override])
    assert message in str(err.value) and len(str(err.value)) < 200


def test_hierarchy_levels_are_bounded_by_the_most_classes_a_model_has():
    from hiercluster.models.zoo import MAX_NUM_CLASSES

    assert config.MAX_CLASSES == MAX_NUM_CLASSES
    assert load_config(None, [f"hierarchy.levels=[{config.MAX_CLASSES}, 2]"]).hierarchy.levels == (config.MAX_CLASSES, 2)
    with pytest.raises(HierclusterError, match=r"hierarchy.levels\[0\]: must be >= 1"):
        load_config(None, ["hierarchy.levels=[0]"])


def test_a_choice_of_megabytes_is_quoted_short():
    with pytest.raises(HierclusterError) as err:
        load_config(None, ["eval.reduction=" + "r" * 500_000])
    assert "eval.reduction: 'rrr" in str(err.value) and len(str(err.value)) < 200


# --- files that are not regular files ---------------------------------------------------


def _open_write_end_later(path: Path) -> None:
    """Open the FIFO's write end in a thread: a reader that blocked on it is released, so a regression fails, not hangs."""
    import threading

    def release() -> None:
        with open(path, "wb"):
            pass

    threading.Thread(target=release, daemon=True).start()


def test_a_config_that_is_a_fifo_is_refused_at_once(tmp_path):
    import os

    os.mkfifo(tmp_path / "c.yaml")
    _open_write_end_later(tmp_path / "c.yaml")
    with pytest.raises(HierclusterError, match=r"^config file .*c.yaml is a named pipe \(FIFO\), not a file$"):
        load_config(tmp_path / "c.yaml")


def test_a_device_is_refused_as_a_grouping():
    with pytest.raises(HierclusterError, match=r"^grouping file /dev/null is a device, not a file$"):
        read_yaml("/dev/null", "grouping file")


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda tmp: tmp / ("x" * 300 + ".yaml"), "cannot be read: File name too long; a name in it is longer"),
        (lambda tmp: _loop(tmp / "c.yaml"), "cannot be read: Too many levels of symbolic links; a symbolic link"),
        (lambda tmp: _under_a_file(tmp), "cannot be read: Not a directory; a part of it that should be a folder is a file"),
    ],
    ids=["a name too long", "a symbolic link loop", "a path under a file"],
)
def test_a_config_path_the_file_system_refuses_is_one_line(tmp_path, make, message):
    with pytest.raises(HierclusterError) as err:
        load_config(make(tmp_path))
    assert str(err.value).startswith("config file ") and message in str(err.value) and len(str(err.value)) < 400


def _loop(path: Path) -> Path:
    path.symlink_to(path)
    return path


def _under_a_file(tmp: Path) -> Path:
    (tmp / "afile").write_text("x")
    return tmp / "afile" / "c.yaml"


@pytest.mark.parametrize("embedding", ["centroids", "confusion"])
def test_a_data_based_hierarchy_is_never_fitted_on_the_evaluation_split(embedding):
    with pytest.raises(HierclusterError, match=r"hierarchy\.split is 'test', the same as data\.eval_split"):
        load_config(None, [f"hierarchy.embedding={embedding}", "hierarchy.split=test"])
    # fc_weights reads no images: any split is fine
    assert load_config(None, ["hierarchy.embedding=fc_weights", "hierarchy.split=test"]).hierarchy.split == "test"
    assert load_config(None, [f"hierarchy.embedding={embedding}"]).hierarchy.split == "train"


def test_the_config_knows_which_embeddings_read_images():
    from hiercluster.hierarchy.embeddings import NEEDS_DATA
    from hiercluster.run.config import DATA_EMBEDDINGS

    assert set(DATA_EMBEDDINGS) == set(NEEDS_DATA)
