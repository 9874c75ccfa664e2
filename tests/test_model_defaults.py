"""Per-model sampling defaults (assets/models.json "sampling"), applied where the user set none,
and what the status panel and /v1/status say of the model: licence, provenance, sampling."""
from __future__ import annotations

import re

import pytest

from engine.config import SAMPLING_FIELDS, load_config, model_sampling
from engine.llm.sources import model_info
from engine.packaged import manifest
from engine.status import model_markdown, sampling_line

LLMS = manifest()["llm"]


@pytest.mark.parametrize("name", sorted(LLMS))
def test_every_llm_entry_says_licence_provenance_and_sampling(name):
    entry = LLMS[name]
    assert entry["title"] and entry["license"] and entry["install"] and entry["upstream"]
    assert isinstance(entry["provenance"]["verified"], bool) and entry["provenance"]["note"]
    assert re.fullmatch(r"[0-9a-f]{64}", entry["source"]["sha256"])
    sampling = entry["sampling"]
    assert set(sampling) <= set(SAMPLING_FIELDS) and {"temperature", "top_p"} <= set(sampling)
    assert 0 <= sampling["temperature"] <= 2 and 0 < sampling["top_p"] <= 1
    assert entry["sampling_source"]


def test_the_models_own_sampling_applies_where_the_user_set_none():
    cfg = load_config("cpu", env={})
    own = model_sampling(cfg.llm.model)
    assert own and (cfg.llm.temperature, cfg.llm.top_p) == (own["temperature"], own["top_p"])
    assert set(cfg.llm.sampling_from_model) == set(own)


@pytest.mark.parametrize("how", ["flag", "env", "set"])
def test_a_sampling_value_the_user_set_wins(how):
    name = "qwen2.5-coder-0.5b"
    kwargs = {"flag": {"overrides": {"llm": name, "temperature": "1.1"}, "env": {}},
              "env": {"overrides": {"llm": name}, "env": {"OMNI_TEMPERATURE": "1.1"}},
              "set": {"overrides": {"llm": name}, "sets": ["llm.temperature=1.1"], "env": {}}}[how]
    cfg = load_config("cpu", **kwargs)
    assert cfg.llm.temperature == 1.1 and cfg.llm.top_p == model_sampling(name)["top_p"]
    assert cfg.llm.sampling_from_model == ("top_p",)
    both = load_config("cpu", overrides={"llm": name, "temperature": "0", "top_p": "0.5"}, env={})
    assert (both.llm.temperature, both.llm.top_p, both.llm.sampling_from_model) == (0.0, 0.5, ())


def test_models_outside_the_manifest_keep_the_config_sampling(tmp_path):
    tiny = load_config("tiny", env={})
    assert (tiny.llm.temperature, tiny.llm.sampling_from_model) == (0.0, ())
    local = load_config("cpu", overrides={"llm": str(tmp_path / "m.gguf")}, env={})
    assert (local.llm.temperature, local.llm.top_p, local.llm.sampling_from_model) == (0.7, 0.9, ())
    assert model_sampling("no-such-model") == {}


def test_status_shows_licence_provenance_and_sampling():
    cfg = load_config("cpu", overrides={"top_p": "0.95"}, env={})
    info = model_info(cfg.llm)
    entry = LLMS[cfg.llm.model]
    assert info["license"] == entry["license"] and info["verified"] == entry["provenance"]["verified"]
    assert info["sampling"]["temperature"] == {"value": cfg.llm.temperature, "from": "model"}
    assert info["sampling"]["top_p"] == {"value": 0.95, "from": "config"}
    text = model_markdown(info)
    assert entry["license"] in text and f"temperature {cfg.llm.temperature:g} (model default)" in text
    assert "top_p 0.95;" in text and "turns with facts: greedy" in text


def test_a_model_without_a_manifest_entry_says_its_licence_is_unknown(tmp_path):
    info = model_info(load_config("cpu", overrides={"llm": str(tmp_path / "m.gguf")}, env={}).llm)
    assert info["license"].startswith("unknown") and "verified" not in info
    assert model_info(load_config("tiny", env={}).llm)["license"].startswith("n/a")
    assert sampling_line(info["sampling"]) == "temperature 0.7, top_p 0.9; turns with facts: greedy"


def test_api_status_carries_the_model(engine):
    from engine.status import status, status_markdown

    report = status(engine)
    assert report["model"]["title"] == "tiny" and "sampling" in report["model"]
    assert "**Licence:** n/a" in status_markdown(report)
