from pathlib import Path

import pytest

from suwen.config import MEDCPT_QUERY, SettingsError, load_settings


def test_precedence_default_file_env_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    toml = tmp_path / "suwen.toml"
    toml.write_text('rounds = 4\nvlm = "/models/file"\ntext_k = 9\n')
    monkeypatch.setenv("SUWEN_VLM", "/models/env")
    monkeypatch.setenv("SUWEN_TEXT_K", "7")
    state = load_settings(toml, {"text_k": "3"})
    s = state.settings
    assert (s.rounds, s.vlm, s.text_k, s.max_queries) == (4, "/models/env", 3, 3)
    assert state.origins["rounds"] == "file"
    assert state.origins["vlm"] == "env"
    assert state.origins["text_k"] == "cli"
    assert state.origins["max_queries"] == "default"


def test_toml_in_home_is_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "suwen.toml").write_text("rounds = 5\n")
    monkeypatch.setenv("SUWEN_HOME", str(tmp_path))
    assert load_settings().settings.rounds == 5


def test_vllm_urls_from_env_comma_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SUWEN_VLLM_URL", "http://a:1/v1, http://b:2/v1")
    assert load_settings().settings.vllm_url == ["http://a:1/v1", "http://b:2/v1"]


def test_query_encoder_pairs_medcpt_and_defaults_symmetric(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings().settings.query_encoder == MEDCPT_QUERY
    monkeypatch.setenv("SUWEN_TEXT_ENCODER", "/models/minilm")
    assert load_settings().settings.query_encoder == "/models/minilm"
    monkeypatch.setenv("SUWEN_TEXT_QUERY_ENCODER", "/models/q")
    assert load_settings().settings.query_encoder == "/models/q"


def test_bad_values_are_one_line_errors_naming_the_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SUWEN_ROUNDS", "many")
    with pytest.raises(SettingsError, match=r"rounds = 'many' \(from env\)") as err:
        load_settings()
    assert "\n" not in str(err.value)
    bad = tmp_path / "bad.toml"
    bad.write_text("nonsense = 1\n")
    monkeypatch.delenv("SUWEN_ROUNDS")
    with pytest.raises(SettingsError, match="unknown setting"):
        load_settings(bad)
    with pytest.raises(SettingsError, match="not found"):
        load_settings(tmp_path / "missing.toml")
