"""shared.settings: frozen dataclass settings from HYBRIDML_* variables, one spelling of each."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from hybridml.shared.errors import ConfigError
from hybridml.shared.settings import FALSE, TRUE, env_flag, load_env, parse_bool


@dataclass(frozen=True)
class Knobs:
    enabled: bool = True
    max_batch: int = 1000
    timeout_ms: float = 250.0
    cloud: str = "http://127.0.0.1:8000"
    device: str | None = None
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ConfigError("max_batch must be a positive integer", field="max_batch")


def test_unset_variables_keep_the_defaults() -> None:
    assert load_env(Knobs, env={}) == Knobs()


def test_each_field_reads_prefix_plus_upper_name_and_parses_by_type() -> None:
    env = {"HYBRIDML_ENABLED": "off", "HYBRIDML_MAX_BATCH": " 64 ", "HYBRIDML_TIMEOUT_MS": "1e3",
           "HYBRIDML_CLOUD": "http://cloud:80", "HYBRIDML_DEVICE": "pi-17",
           "HYBRIDML_LIMIT": "5", "HYBRIDML_UNRELATED": "x", "OTHER_MAX_BATCH": "2"}
    assert load_env(Knobs, env=env) == Knobs(False, 64, 1000.0, "http://cloud:80", "pi-17", 5)


def test_another_prefix_reads_other_variables() -> None:
    env = {"HYBRIDML_FALLBACK_TIMEOUT_MS": "500", "HYBRIDML_TIMEOUT_MS": "9"}
    assert load_env(Knobs, prefix="HYBRIDML_FALLBACK_", env=env).timeout_ms == 500.0


@pytest.mark.parametrize("word", [*TRUE, *(w.upper() for w in TRUE), " Yes "])
def test_every_true_spelling_is_true(word: str) -> None:
    assert parse_bool("HYBRIDML_X", word) is True
    assert load_env(Knobs, env={"HYBRIDML_ENABLED": word}).enabled is True


@pytest.mark.parametrize("word", [*FALSE, *(w.upper() for w in FALSE), " Off "])
def test_every_false_spelling_is_false(word: str) -> None:
    assert parse_bool("HYBRIDML_X", word) is False
    assert load_env(Knobs, env={"HYBRIDML_ENABLED": word}).enabled is False


@pytest.mark.parametrize("word", ["2", "enabled", "y", "t", "nope"])
def test_a_misspelt_bool_is_an_error_naming_the_variable_and_the_spellings(word: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_env(Knobs, env={"HYBRIDML_ENABLED": word})
    err = info.value
    assert err.code == "config" and err.details["field"] == "enabled"
    assert err.details["variable"] == "HYBRIDML_ENABLED"
    assert f"HYBRIDML_ENABLED={word!r}" in err.message
    assert "1/true/yes/on" in err.message and "0/false/no/off" in err.message


@pytest.mark.parametrize(("variable", "raw", "what"), [
    ("HYBRIDML_MAX_BATCH", "12.5", "is not an integer"),
    ("HYBRIDML_MAX_BATCH", "many", "is not an integer"),
    ("HYBRIDML_TIMEOUT_MS", "fast", "is not a number"),
    ("HYBRIDML_LIMIT", "none", "is not an integer"),
])
def test_a_bad_number_names_the_variable_the_value_and_an_example(
        variable: str, raw: str, what: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_env(Knobs, env={variable: raw})
    assert f"{variable}={raw!r} {what}; use e.g. {variable}=" in info.value.message
    assert info.value.details["field"] == variable.removeprefix("HYBRIDML_").lower()


def test_empty_or_blank_variables_count_as_unset() -> None:
    env = {"HYBRIDML_ENABLED": "", "HYBRIDML_MAX_BATCH": "  ", "HYBRIDML_DEVICE": ""}
    assert load_env(Knobs, env=env) == Knobs()


def test_overrides_win_over_the_environment_and_none_means_not_given() -> None:
    env = {"HYBRIDML_MAX_BATCH": "64", "HYBRIDML_DEVICE": "pi-17"}
    knobs = load_env(Knobs, env=env, max_batch=8, device=None)
    assert knobs.max_batch == 8 and knobs.device == "pi-17"


def test_an_unknown_override_is_an_error_listing_the_settings() -> None:
    with pytest.raises(ConfigError, match="Knobs has no setting max_bacth; settings: cloud, "):
        load_env(Knobs, env={}, max_bacth=8)


def test_the_classes_own_checks_still_run() -> None:
    with pytest.raises(ConfigError, match="max_batch must be a positive integer"):
        load_env(Knobs, env={"HYBRIDML_MAX_BATCH": "0"})


def test_unsupported_field_types_are_a_programming_error() -> None:
    @dataclass(frozen=True)
    class Odd:
        sizes: tuple[int, ...] = (1,)

    with pytest.raises(TypeError, match="load_env reads bool, int, float, str"):
        load_env(Odd, env={"HYBRIDML_SIZES": "1,2"})
    with pytest.raises(TypeError, match="needs a dataclass"):
        load_env(dict, env={})


def test_env_flag_reads_one_variable_with_the_same_spellings() -> None:
    assert env_flag("HYBRIDML_INSECURE", env={}) is False
    assert env_flag("HYBRIDML_INSECURE", True, env={"HYBRIDML_INSECURE": ""}) is True
    assert env_flag("HYBRIDML_INSECURE", env={"HYBRIDML_INSECURE": "On"}) is True
    with pytest.raises(ConfigError, match="HYBRIDML_INSECURE='maybe' is not a yes/no value"):
        env_flag("HYBRIDML_INSECURE", env={"HYBRIDML_INSECURE": "maybe"})
