"""Settings: validation names the bad key, ${VAR} substitution, GATEWAY_* overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.__main__ import main
from gateway.config_load import ConfigError, load_settings

GOOD = """
providers:
  openai: {base_url: https://api.openai.com/v1, api_key: "${OPENAI_API_KEY}"}
  azure: {kind: azure, base_url: https://x.openai.azure.com, api_key: "${AZ:-unset}",
          api_version: "2024-10-21"}
  local: {base_url: "http://127.0.0.1:8000/v1", fallbacks: [openai]}
models:
  - {name: gpt-4o-mini, provider: openai}
  - {name: fast, provider: local, upstream_model: llama-3.1-8b}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    return path


def test_valid_file_loads_with_secrets_substituted(tmp_path):
    settings = load_settings(write(tmp_path, GOOD), env={"OPENAI_API_KEY": "sk-from-env"})
    assert settings.providers["openai"].api_key.get_secret_value() == "sk-from-env"
    assert settings.providers["azure"].api_key.get_secret_value() == "unset"
    assert "sk-from-env" not in repr(settings)
    assert settings.models[1].upstream_model == "llama-3.1-8b"


def test_missing_variable_is_named(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, GOOD), env={})
    assert "OPENAI_API_KEY" in str(caught.value)


@pytest.mark.parametrize(
    ("change", "path"),
    [
        ("server: {prot: 1}", "server.prot"),
        ("server: {port: 99999}", "server.port"),
        ("server: {workers: 0}", "server.workers"),
        ("server: {gc_threshold: -1}", "server.gc_threshold"),
        ("server: {gc_freeze: maybe}", "server.gc_freeze"),
        ("auth: {mode: off}", "auth.mode"),
    ],
)
def test_bad_keys_are_named_by_path(tmp_path, change, path):
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, GOOD + change + "\n"), env={"OPENAI_API_KEY": "k"})
    assert any(problem.startswith(path) for problem in caught.value.problems)


@pytest.mark.parametrize("name", ["Authorization", "x-api-key", "cookie", "x-*", "a*", "*", ""])
def test_headers_that_stay_at_the_gateway_cannot_be_forwarded(tmp_path, name):
    text = GOOD.replace(
        "fallbacks: [openai]}", f'fallbacks: [openai], forward_headers: ["{name}"]}}'
    )
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, text), env={"OPENAI_API_KEY": "k"})
    assert any(p.startswith("providers.local.forward_headers") for p in caught.value.problems)


def test_forwarded_header_names_are_kept_lower_case(tmp_path):
    text = GOOD.replace(
        "fallbacks: [openai]}",
        'fallbacks: [openai], forward_headers: ["User-Agent", "X-Stainless-*"]}',
    )
    settings = load_settings(write(tmp_path, text), env={"OPENAI_API_KEY": "k"})
    assert settings.providers["local"].forward_headers == ("user-agent", "x-stainless-*")
    assert settings.providers["openai"].forward_headers == ("openai-beta",)


def test_unknown_provider_and_fallback_are_refused(tmp_path):
    text = GOOD.replace("provider: local", "provider: nowhere")
    with pytest.raises(ConfigError, match="unknown provider 'nowhere'"):
        load_settings(write(tmp_path, text), env={"OPENAI_API_KEY": "k"})
    text = GOOD.replace("fallbacks: [openai]", "fallbacks: [ghost]")
    with pytest.raises(ConfigError, match="invalid fallback 'ghost'"):
        load_settings(write(tmp_path, text), env={"OPENAI_API_KEY": "k"})


def test_environment_overrides(tmp_path):
    env = {"OPENAI_API_KEY": "k", "GATEWAY_SERVER__PORT": "9123", "GATEWAY_LOGGING__LEVEL": "debug"}
    settings = load_settings(write(tmp_path, GOOD), env=env)
    assert settings.server.port == 9123
    assert settings.logging.level == "debug"


def test_embedded_default_uses_demo_without_openai_key():
    assert load_settings(None, env={}).providers["demo"].kind == "demo"
    settings = load_settings(None, env={"OPENAI_API_KEY": "sk-x"})
    assert settings.providers["openai"].base_url == "https://api.openai.com/v1"


def test_config_check_command_reports_every_problem(tmp_path, capsys):
    path = write(tmp_path, "providers: {}\nmodels: [{name: a, provider: b, colour: red}]\n")
    assert main(["config", "check", str(path)]) == 1
    errors = capsys.readouterr().err
    assert "models.0.colour" in errors
    good = write(tmp_path, "providers: {d: {kind: demo}}\nmodels: [{name: a, provider: d}]\n")
    assert main(["config", "check", str(good)]) == 0
