import pytest

from sglang_batchllm.config import (
    BatchLLMConfig,
    ConfigError,
    cli_fields,
    env_name,
    flag_name,
    is_enabled,
)


def test_defaults_and_env_round_trip():
    config = BatchLLMConfig(enable=True, levels=2, min_prefix_tokens=64)
    assert BatchLLMConfig.from_env(config.to_env()) == config
    assert BatchLLMConfig.from_env({}) == BatchLLMConfig()


def test_env_values_are_parsed():
    env = {"SGLANG_BATCHLLM_ENABLE": "yes", "SGLANG_BATCHLLM_LEVELS": " 3 ", "OTHER": "x"}
    assert BatchLLMConfig.from_env(env) == BatchLLMConfig(enable=True, levels=3)


@pytest.mark.parametrize(
    "env, needle",
    [
        ({"SGLANG_BATCHLLM_LEVEL": "2"}, "Did you mean SGLANG_BATCHLLM_LEVELS"),
        ({"SGLANG_BATCHLLM_LEVELS": "two"}, "expected an integer"),
        ({"SGLANG_BATCHLLM_ENABLE": "maybe"}, "expected one of"),
        ({"SGLANG_BATCHLLM_LEVELS": "0"}, "out of range 1..8"),
        ({"SGLANG_BATCHLLM_MIN_PREFIX_TOKENS": "-5"}, "--batchllm-min-prefix-tokens"),
    ],
)
def test_bad_env_is_a_clear_error(env, needle):
    with pytest.raises(ConfigError, match=needle):
        BatchLLMConfig.from_env(env)


def test_type_checked_on_construction():
    with pytest.raises(ConfigError):
        BatchLLMConfig(levels=1.5)
    with pytest.raises(ConfigError):
        BatchLLMConfig(enable="yes")


def test_master_switch_is_read_without_validating_the_rest():
    assert not is_enabled({"SGLANG_BATCHLLM_LEVELS": "garbage"})
    assert is_enabled({"SGLANG_BATCHLLM_ENABLE": "1"})
    assert not is_enabled({"SGLANG_BATCHLLM_ENABLE": "0"})
    assert is_enabled({"SGLANG_BATCHLLM_ENABLE": " On "})
    assert not is_enabled({"SGLANG_BATCHLLM_ENABLE": ""})
    assert not is_enabled({})


@pytest.mark.parametrize("value", ["maybe", "2", "enabled", "tru"])
def test_unreadable_master_switch_is_an_error_naming_the_variable(value):
    with pytest.raises(ConfigError) as err:
        is_enabled({"SGLANG_BATCHLLM_ENABLE": value})
    message = str(err.value)
    assert f"SGLANG_BATCHLLM_ENABLE={value!r}" in message
    for accepted in ("1/true/yes/on", "0/false/no/off", "unset"):
        assert accepted in message


def test_exported_restores_environment():
    environ = {"SGLANG_BATCHLLM_LEVELS": "4"}
    with BatchLLMConfig(enable=True, levels=2).exported(environ):
        assert environ["SGLANG_BATCHLLM_ENABLE"] == "1"
        assert environ["SGLANG_BATCHLLM_LEVELS"] == "2"
    assert environ == {"SGLANG_BATCHLLM_LEVELS": "4"}


def test_names_derive_from_fields():
    names = {f.name for f in cli_fields()}
    assert "enable" not in names and {"levels", "min_prefix_tokens"} <= names
    assert flag_name("min_prefix_tokens") == "--batchllm-min-prefix-tokens"
    assert env_name("min_prefix_tokens") == "SGLANG_BATCHLLM_MIN_PREFIX_TOKENS"
