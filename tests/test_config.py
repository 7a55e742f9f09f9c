"""params.yaml is validated on load: bad input fails before any work, naming the key."""

from pathlib import Path

import pytest
import yaml

from roadshift.config import ConfigError, Params, apply_overrides, load_params, parse_params

PROJECT_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def write_params(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def project_raw() -> dict:
    return yaml.safe_load(PROJECT_PARAMS.read_text())


def test_project_params_file_is_valid_and_matches_defaults_shape():
    params = load_params(PROJECT_PARAMS)
    assert isinstance(params, Params)
    assert params.finetune.strategy == "auto"  # users get the measured choice by default


@pytest.mark.parametrize("text", ["", "# only a comment\n", "{}\n", "- a list\n", "42\n"])
def test_an_empty_or_non_mapping_file_is_refused_in_one_line_naming_it(tmp_path, text):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_params(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: expected a mapping of sections")
    assert "\n" not in message


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("pretrain", "epochs", True),
        ("pretrain", "epochs", "yes"),
        ("pretrain", "epochs", "on"),
        ("finetune", "batch_size", 2.0),
        ("finetune", "lr", True),
        ("base", "deterministic", 1),
        ("base", "deterministic", 0),
        ("base", "progress_bars", 1),
        ("finetune", "reinit_head", "no"),
        ("pretrain", "num_workers", True),
        ("evaluate", "bootstrap_samples", False),
    ],
)
def test_booleans_are_not_numbers_and_numbers_are_not_booleans(section, key, value):
    with pytest.raises(ConfigError) as caught:
        parse_params({section: {key: value}}, source="params.yaml")
    assert f"{section}.{key}: " in str(caught.value)
    assert f"(got {value!r})" in str(caught.value)


def test_yaml_words_for_booleans_are_refused_from_the_file(tmp_path):
    """PyYAML reads ``yes``/``on`` as true: the file's value must still not become 1 epoch."""
    path = tmp_path / "params.yaml"
    path.write_text("pretrain:\n  epochs: on\n")
    with pytest.raises(ConfigError, match=r"pretrain\.epochs: .*\(got True\)"):
        load_params(path)


def test_integers_and_e_notation_still_count_as_floats():
    params = parse_params({"finetune": {"lr": 1, "weight_decay": "1e-4"}, "data": {}})
    assert params.finetune.lr == 1.0 and isinstance(params.finetune.lr, float)
    assert params.finetune.weight_decay == 1e-4


def test_image_limits_have_a_home_and_defaults_that_refuse_a_12000px_square():
    limits = Params().prepare.image_limits
    assert 12000 * 12000 > limits.max_pixels >= 8000 * 6000  # a 48 MP camera photo passes
    assert limits.max_file_bytes >= 20_000_000


def test_unknown_key_is_named(tmp_path):
    raw = project_raw()
    raw["finetune"]["learning_rate"] = 0.1
    with pytest.raises(ConfigError, match=r"finetune\.learning_rate: unknown key"):
        load_params(write_params(tmp_path, raw))


def test_unknown_section_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"trainer: unknown key"):
        load_params(write_params(tmp_path, {"trainer": {"epochs": 3}}))


def test_mistyped_value_is_named_with_the_value(tmp_path):
    raw = project_raw()
    raw["pretrain"]["epochs"] = "many"
    with pytest.raises(ConfigError, match=r"pretrain\.epochs: .*'many'"):
        load_params(write_params(tmp_path, raw))


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("finetune", "lr", -1.0),
        ("base", "image_size", 4),
        ("finetune", "strategy", "fine_tuning"),
        ("model", "architecture", "vgg11"),
    ],
)
def test_out_of_range_or_unsupported_value_is_named(tmp_path, section, key, value):
    raw = project_raw()
    raw[section][key] = value
    with pytest.raises(ConfigError, match=rf"{section}\.{key}"):
        load_params(write_params(tmp_path, raw))


def test_error_names_the_file(tmp_path):
    path = write_params(tmp_path, {"base": {"seed": -3}})
    with pytest.raises(ConfigError, match=str(path)):
        load_params(path)


def test_split_fractions_must_sum_to_one(tmp_path):
    raw = {"prepare": {"split_fractions": {"train": 0.8, "val": 0.15, "test": 0.15}}}
    with pytest.raises(ConfigError, match=r"prepare\.split_fractions: .*sum to 1"):
        load_params(write_params(tmp_path, raw))


def test_missing_file_and_bad_yaml_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "absent.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("base: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)


def test_overrides_apply_and_are_validated(tmp_path):
    path = write_params(tmp_path, project_raw())
    assert load_params(path, ["finetune.lr=0.05"]).finetune.lr == 0.05
    with pytest.raises(ConfigError, match=r"finetune\.lr"):
        load_params(path, ["finetune.lr=zero"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_overrides({}, ["finetune.lr"])


def test_config_is_frozen():
    params = Params()
    with pytest.raises(Exception, match="frozen"):
        params.base.seed = 1  # type: ignore[misc]


def test_a_value_that_fits_no_alternative_is_reported_once_under_its_own_key():
    with pytest.raises(ConfigError) as error:
        parse_params({"pretrain": {"num_workers": -1}, "finetune": {"unfreeze_blocks": "some"}})
    message = str(error.value)
    assert "  pretrain.num_workers: " in message and "'auto'" in message
    assert "  finetune.unfreeze_blocks: " in message and "'all'" in message
    assert "constrained-int" not in message and "literal[" not in message
