"""Settings: every setting is an env var and a CLI flag, the flag wins, bad values fail clearly."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from broker.core.settings import Settings, from_args
from broker.tools import cli

ENV_NAMES = [f.metadata["env"] for f in dataclasses.fields(Settings)]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No setting leaks in from the environment the tests run in."""
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)


def settings_for(*argv: str) -> Settings:
    return from_args(cli.build_parser().parse_args(list(argv)))


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_defaults_without_env_or_flags() -> None:
    settings = settings_for("edge")
    assert settings == Settings()
    assert settings.redis_url == "redis://localhost:6379/0"
    assert settings.openai_api_key is None


def test_env_vars_are_read_and_converted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://cache:6380/2")
    monkeypatch.setenv("BROKER_PORT", "9001")
    monkeypatch.setenv("BROKER_FLUSH_INTERVAL", "0.05")
    monkeypatch.setenv("BROKER_RETENTION_TTL", "60")
    monkeypatch.setenv("BROKER_MAX_CONCURRENCY", "3")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    settings = settings_for("worker")
    assert settings.redis_url == "redis://cache:6380/2"
    assert settings.port == 9001 and type(settings.port) is int
    assert settings.flush_interval == 0.05 and type(settings.flush_interval) is float
    assert settings.retention_ttl == 60.0 and type(settings.retention_ttl) is float
    assert settings.max_concurrency == 3 and type(settings.max_concurrency) is int
    assert settings.openai_api_key == "sk-test"


def test_every_env_var_is_read() -> None:
    env = {}
    for f in dataclasses.fields(Settings):
        kind = str(f.type)
        env[f.metadata["env"]] = (
            "7" if kind.startswith("int") else "7.5" if kind.startswith("float")
            else "True" if kind.startswith("bool") else f"v-{f.name}"
        )
    settings = Settings.from_env(env)
    for f in dataclasses.fields(Settings):
        assert getattr(settings, f.name) != f.default, f.name
        assert str(getattr(settings, f.name)) == env[f.metadata["env"]], f.name


@pytest.mark.parametrize(("raw", "value"), [("1", True), ("yes", True), ("TRUE", True),
                                            ("0", False), ("off", False), ("false", False)])
def test_switches_read_the_usual_spellings(raw: str, value: bool) -> None:
    assert Settings.from_env({"BROKER_INSECURE": raw}).insecure is value


def test_a_switch_rejects_anything_else() -> None:
    with pytest.raises(SystemExit, match="BROKER_INSECURE"):
        Settings.from_env({"BROKER_INSECURE": "maybe"})


def test_empty_env_var_means_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BROKER_PORT", "")
    monkeypatch.setenv("BROKER_MODEL", "")
    settings = settings_for("dev")
    assert settings.port == Settings().port
    assert settings.model == Settings().model


def test_from_env_takes_an_explicit_mapping(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BROKER_PORT", "1111")
    assert Settings.from_env({"BROKER_PORT": "2222"}).port == 2222
    assert Settings.from_env({}).port == Settings().port


def test_cli_flags_win_over_env_vars(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BROKER_PORT", "9001")
    monkeypatch.setenv("REDIS_URL", "redis://from-env/0")
    monkeypatch.setenv("BROKER_KEEPALIVE_INTERVAL", "5")
    settings = settings_for(
        "edge", "--port", "9100", "--redis-url", "redis://from-flag/1",
        "--keepalive-interval", "2.5",
    )
    assert settings.port == 9100
    assert settings.redis_url == "redis://from-flag/1"
    assert settings.keepalive_interval == 2.5


def test_env_var_fills_in_for_an_absent_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BROKER_FLUSH_INTERVAL", "0.3")
    monkeypatch.setenv("BROKER_MODEL", "env-model")
    settings = settings_for("worker", "--model", "flag-model")
    assert settings.model == "flag-model"
    assert settings.flush_interval == 0.3


def test_flags_are_converted_to_the_setting_type() -> None:
    settings = settings_for("worker", "--max-concurrency", "5", "--lease-ttl", "1.5")
    assert settings.max_concurrency == 5 and type(settings.max_concurrency) is int
    assert settings.lease_ttl == 1.5 and type(settings.lease_ttl) is float


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("BROKER_PORT", "eighty", "int"),
        ("BROKER_PORT", "80.5", "int"),
        ("BROKER_MAX_BODY_BYTES", "1MB", "int"),
        ("BROKER_LEASE_TTL", "soon", "float"),
    ],
)
def test_bad_env_value_exits_with_a_clear_message(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, expected: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as info:
        settings_for("dev")
    message = str(info.value.code)
    assert name in message
    assert expected in message
    assert repr(value) in message


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("BROKER_FLUSH_INTERVAL", "0", "> 0"),
        ("BROKER_FLUSH_INTERVAL", "-1", "> 0"),
        ("BROKER_FIRST_TEXT_WAIT", "-0.01", ">= 0"),
    ],
)
def test_a_wait_out_of_range_exits_with_a_clear_message(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, expected: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as info:
        settings_for("worker")
    assert str(info.value.code) == f"{name}: expected a number {expected}, got {float(value)}"


def test_the_sentence_buffer_waits_in_range_are_accepted() -> None:
    settings = settings_for("worker", "--first-text-wait", "0", "--flush-interval", "2.5")
    assert settings.first_text_wait == 0.0 and settings.flush_interval == 2.5


def test_bad_flag_value_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        settings_for("edge", "--port", "eighty")
    assert info.value.code == 2
    assert "--port" in capsys.readouterr().err


def test_unknown_flags_for_a_role_are_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    # The edge does not call the LLM: it has no --openai-api-key flag.
    with pytest.raises(SystemExit):
        settings_for("edge", "--openai-api-key", "sk")
    assert "--openai-api-key" in capsys.readouterr().err


def test_every_setting_is_documented_in_some_subcommand_help() -> None:
    helps = {name: p.format_help() for name, p in subcommands().items()}
    assert set(helps) == {"edge", "worker", "dev", "mock-llm", "cluster", "ask", "tail"}
    for f in dataclasses.fields(Settings):
        env = f.metadata["env"]
        flag = "--" + f.name.replace("_", "-")
        assert any(env in h and flag in h for h in helps.values()), (f.name, env)


@pytest.mark.parametrize("command", ["edge", "worker", "dev", "mock-llm", "cluster"])
def test_subcommand_help_names_the_env_var_of_each_of_its_flags(command: str) -> None:
    parser = subcommands()[command]
    help_text = parser.format_help()
    for f in dataclasses.fields(Settings):
        if cli.ROLES[command] in f.metadata["roles"]:
            assert "--" + f.name.replace("_", "-") in help_text, f.name
            assert f.metadata["env"] in help_text, f.name


def test_api_md_settings_are_flags_of_their_commands() -> None:
    # /work/shared/API.md: edge takes REDIS_URL; worker REDIS_URL, OPENAI_BASE_URL,
    # OPENAI_API_KEY, BROKER_MODEL; edge and dev take --host/--port (dev: --port).
    helps = {name: p.format_help() for name, p in subcommands().items()}
    assert all(s in helps["edge"] for s in ("REDIS_URL", "--host", "--port"))
    for env in ("REDIS_URL", "OPENAI_BASE_URL", "OPENAI_API_KEY", "BROKER_MODEL"):
        assert env in helps["worker"], env
    assert "--port" in helps["dev"]
