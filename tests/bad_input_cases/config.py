"""Config files and --set values: size, alias bombs, nesting, ranges, repeated values, shapes, missing files."""

from __future__ import annotations

from pathlib import Path

from bad_input_cases import Case, copy_checkpoint, digits_config

# Nine levels of ten aliases each: 10^9 values once expanded (the "billion laughs").
BOMB = "lol0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"lol{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]\n" for i in range(1, 9)
)


def _run(tmp: Path, config: Path, *overrides: str) -> list[str]:
    argv = ["run", str(config), "--out", str(tmp / "run")]
    for text in overrides:
        argv += ["--set", text]
    return argv


def _raw_config(tmp: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp / name
    path.write_text(text, encoding="utf-8")
    return path


def _set(*overrides: str):
    """A case that runs the digits config with these ``--set`` overrides."""

    def make(tmp: Path) -> list[str]:
        return _run(tmp, digits_config(tmp), *overrides)

    return make


def _alias_bomb_value(tmp: Path) -> list[str]:
    # hierarchy.names takes any mapping: nothing but the count of values refuses the bomb.
    names = "".join("    " + line + "\n" for line in BOMB.splitlines())
    return _run(tmp, _raw_config(tmp, "data:\n  dataset: digits\nhierarchy:\n  names:\n" + names))


def _recursive_alias(tmp: Path) -> list[str]:
    return _run(tmp, _raw_config(tmp, "data:\n  dataset: digits\nquant:\n  bits: &b [4, *b]\n"))


def _recursive_mapping(tmp: Path) -> list[str]:
    return _run(tmp, _raw_config(tmp, "data: &d\n  dataset: digits\n  again: *d\n"))


def _huge_list(tmp: Path) -> list[str]:
    return _run(tmp, _raw_config(tmp, "quant:\n  bits: [" + ",".join(["4"] * 2_000_000) + "]\n"))


def _many_values_under_the_size_cap(tmp: Path) -> list[str]:
    return _run(tmp, _raw_config(tmp, "hierarchy:\n  names: {x: [" + ",".join(["1"] * 200_000) + "]}\n"))


def _set_alias_bomb(tmp: Path) -> list[str]:
    # --set takes one value: the bomb's levels are keys of one inline mapping.
    levels = ["&a0 [" + ", ".join(["lol"] * 10) + "]"]
    levels += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    return _run(tmp, digits_config(tmp), "hierarchy.names={" + ", ".join(f"k{i}: {v}" for i, v in enumerate(levels)) + "}")


def _deep_nesting(tmp: Path) -> list[str]:
    return _run(tmp, digits_config(tmp), "hierarchy.names={x: " + "[" * 200 + "]" * 200 + "}")


def _invalid_yaml(tmp: Path) -> list[str]:
    return _run(tmp, _raw_config(tmp, "data:\n  dataset: [digits\nmodel:\n  arch: resnet8\n"))


def _two_documents(tmp: Path) -> list[str]:
    return _run(tmp, _raw_config(tmp, "data:\n  dataset: digits\n---\nmodel:\n  arch: resnet8\n"))


def _over_one_mib(tmp: Path) -> list[str]:
    return _run(tmp, _raw_config(tmp, "# " + "x" * (1024 * 1024) + "\ndata:\n  dataset: digits\n"))


def _unknown_section(tmp: Path) -> list[str]:
    return _run(tmp, digits_config(tmp, extra="modle:\n  width: 8\n"))


def _section_not_a_mapping(tmp: Path) -> list[str]:
    return _run(tmp, _raw_config(tmp, "data:\n  dataset: digits\neval: 3\n"))


def _config_is_a_list(tmp: Path) -> list[str]:
    return _run(tmp, _raw_config(tmp, "- data\n- model\n"))


def _empty_key(tmp: Path) -> list[str]:
    return _run(tmp, _raw_config(tmp, 'data:\n  dataset: digits\n  "": 3\n'))


def _missing_config(tmp: Path) -> list[str]:
    return _run(tmp, tmp / "no-such-config.yaml")


def _config_is_a_folder(tmp: Path) -> list[str]:
    (tmp / "configs").mkdir()
    return _run(tmp, tmp / "configs")


def _grouping_alias_bomb(tmp: Path) -> list[str]:
    ckpt = copy_checkpoint(tmp)
    (tmp / "ref.yaml").write_text(BOMB + "odd: ['1', '3', '5', '7', '9']\neven: ['0', '2', '4', '6', '8']\n")
    config = digits_config(
        tmp,
        model={"checkpoint": ckpt.name},  # relative: taken from the config's folder
        hierarchy={"reference": "ref.yaml", "levels": [2]},
        quant={"schemes": ["asymmetric"], "bits": [4]},
        eval={"random_seeds": 2},
        output={"export_models": False},
    )
    return ["run", str(config), "--out", str(tmp / "run"), "--quiet"]


def _set_not_utf8(tmp: Path) -> list[str]:
    return _run(tmp, digits_config(tmp), "data.dataset=caf\udce9")


CASES: dict[str, Case] = {
    "alias bomb in a config value": Case(_alias_bomb_value, "holds more than 100,000 values", bomb=True),
    "recursive alias (a list inside itself)": Case(_recursive_alias, "the alias *b at quant.bits[1] refers to a value"),
    "recursive alias (a mapping inside itself)": Case(_recursive_mapping, "the alias *d at data.again refers"),
    "4 MB config with a 2M-item list": Case(_huge_list, "is larger than 1,024 KiB", bomb=True),
    "200,000 values under the size cap": Case(_many_values_under_the_size_cap, "holds more than 100,000 values"),
    "--set with an alias bomb": Case(_set_alias_bomb, "the value of --set 'hierarchy.names' holds more than", bomb=True),
    "nesting 200 levels deep": Case(_deep_nesting, "nests lists and mappings more than 32 levels deep"),
    "config over 1 MiB": Case(_over_one_mib, "is larger than 1,024 KiB"),
    "invalid YAML is one line": Case(_invalid_yaml, "is not valid YAML: line 3, column"),
    "two YAML documents": Case(_two_documents, "expected a single document"),
    "eval.random_seeds 1e9": Case(_set("eval.random_seeds=1000000000"), "eval.random_seeds: must be > 0 and <= 10,000"),
    "quant.bits [4, 4]": Case(_set("quant.bits=[4, 4]"), "quant.bits: 4 is listed twice"),
    "quant.bits [0]": Case(_set("quant.bits=[0]"), "quant.bits[0]: 0 bits is outside 1..16"),
    "quant.bits [99]": Case(_set("quant.bits=[99]"), "quant.bits[0]: 99 bits is outside 1..16"),
    "quant.activation_bits 1": Case(_set("quant.activation_bits=1"), "quant.activation_bits: 1 bits is outside"),
    "plan first_layer_bits 40": Case(
        _set("quant.plans=[{name: p, first_layer_bits: 40}]"), "quant.plans[0].first_layer_bits: 40 bits"
    ),
    "repeated scheme": Case(_set("quant.schemes=[pow2, asymmetric, pow2]"), "quant.schemes: 'pow2' is listed twice"),
    "repeated clipping in a method item": Case(
        _set("quant.methods=[{name: gptq, clipping: [mse, mse]}]"), "quant.methods[0].clipping: 'mse' is listed twice"
    ),
    "repeated bn_reestimate": Case(_set("quant.bn_reestimate=[true, true]"), "quant.bn_reestimate: True is listed twice"),
    "repeated granularity": Case(
        _set("quant.granularity=[per_tensor, per_tensor]"), "quant.granularity: 'per_tensor' is listed twice"
    ),
    "repeated hierarchy level": Case(_set("hierarchy.levels=[3, 2, 3]"), "hierarchy.levels: 3 is listed twice"),
    "unknown clipping": Case(_set("quant.clipping=[mes]"), "quant.clipping[0]: 'mes' is not one of"),
    "65 plans": Case(
        _set("quant.plans=[" + ", ".join(f"{{name: p{i}}}" for i in range(65)) + "]"),
        "quant.plans: 65 items, more than the 64 allowed",
    ),
    "1,001 hierarchy levels": Case(
        _set("hierarchy.levels=[" + ", ".join(map(str, range(2, 1003))) + "]"),
        "hierarchy.levels: 1,001 items, more than the 1000 allowed",
    ),
    "calibration.samples 1e12": Case(_set("calibration.samples=1000000000000"), "calibration.samples: must be > 0 and <= 1,000,000"),
    "data.batch_size 2^20": Case(_set("data.batch_size=1048576"), "data.batch_size: must be > 0 and <= 65,536"),
    "train.batch_size 2^20": Case(_set("train.batch_size=1048576"), "train.batch_size: must be > 0 and <= 65,536"),
    "calibration.batch_size 2^20": Case(_set("calibration.batch_size=1048576"), "calibration.batch_size: must be > 0"),
    "train.epochs 1e6": Case(_set("train.epochs=1000000"), "train.epochs: must be > 0 and <= 10,000"),
    "model.width 4096": Case(_set("model.width=4096"), "model.width: must be > 0 and <= 1,024"),
    "runtime.workers 10,000": Case(_set("runtime.workers=10000"), "runtime.workers: must be >= 0 and <= 256"),
    "data.workers (moved)": Case(_set("data.workers=2"), "data.workers has moved: write it as runtime.workers"),
    "runtime.threads 1e6": Case(_set("runtime.threads=1000000"), "runtime.threads: must be >= 1 and <= 1024"),
    "train.threads (moved)": Case(_set("train.threads=2"), "train.threads has moved: write it as runtime.threads"),
    "train.crop_padding 1e9": Case(_set("train.crop_padding=1000000000"), "train.crop_padding: must be >= 0 and <= 256"),
    "activation_calibration_batches 1e9": Case(
        _set("quant.activation_calibration_batches=1000000000"), "quant.activation_calibration_batches: must be > 0"
    ),
    "negative eval.seed": Case(_set("eval.seed=-1"), "eval.seed: must be >= 0"),
    "negative train.seed": Case(_set("train.seed=-5"), "train.seed: must be >= 0"),
    "unknown section": Case(_unknown_section, "unknown config key 'modle'; did you mean 'model'?"),
    "section not a mapping": Case(_section_not_a_mapping, "config section eval: expected a mapping, got 3"),
    "--set eval=3": Case(_set("eval=3"), "config section eval: expected a mapping, got 3"),
    "--set through a value": Case(_set("eval.random_seeds.x=1"), "'random_seeds' is not a section"),
    "config that is a YAML list": Case(_config_is_a_list, "the top level must be a mapping of sections"),
    "empty-string config key": Case(_empty_key, "unknown config key 'data.'"),
    "grouping file with an alias bomb": Case(_grouping_alias_bomb, "ref.yaml holds more than 100,000 values", bomb=True),
    "config file missing": Case(_missing_config, "config file not found"),
    "config file is a folder": Case(_config_is_a_folder, "is a folder, not a file"),
    "--set value not UTF-8": Case(_set_not_utf8, "the value of --set 'data.dataset' is not UTF-8 text"),
}
