import subprocess
import sys
from pathlib import Path

import pytest

from engine.config import PROFILES, ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", PROFILES)
def test_every_profile_loads_and_is_frozen(name):
    cfg = load_config(name, env={})
    assert cfg.profile == name
    with pytest.raises(Exception):
        cfg.port = 1  # frozen


def test_default_profile_is_cpu_with_the_packaged_model():
    cfg = load_config(env={})
    assert cfg.profile == "cpu"
    assert cfg.llm.backend == "transformers" and cfg.llm.model == "qwen2.5-coder-0.5b"
    assert cfg.host == "127.0.0.1" and cfg.port == 7860


def test_env_then_cli_override_order():
    env = {"OMNI_PORT": "9000", "OMNI_LLM": "/models/x", "OMNI_TEMPERATURE": "0.1"}
    cfg = load_config("cpu", env=env)
    assert (cfg.port, cfg.llm.model, cfg.llm.temperature) == (9000, "/models/x", 0.1)
    cfg = load_config("cpu", overrides={"port": "9100"}, sets=["llm.top_p=0.5"], env=env)
    assert cfg.port == 9100 and cfg.llm.top_p == 0.5 and cfg.llm.model == "/models/x"


@pytest.mark.parametrize("bad, needle", [
    ({"port": "seventy"}, "expected int"),
    ({"llm_backend": "magic"}, "choose transformers"),
    ({"quantization": "3bit"}, "choose none, 4bit or 8bit"),
    ({"host": "lan-host.local"}, "auth-token"),
    ({"max_new_tokens": "999999"}, "max_new_tokens"),
])
def test_bad_values_say_what_is_allowed(bad, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config("cpu", overrides=bad, env={})


def test_unknown_field_and_profile():
    with pytest.raises(ConfigError, match="unknown config field"):
        load_config("cpu", sets=["llm.nope=1"], env={})
    with pytest.raises(ConfigError, match="unknown profile"):
        load_config("huge", env={})


def test_help_imports_nothing_heavy():
    code = ("import sys, runpy; sys.argv=['run_app.py','--help']\n"
            "try:\n runpy.run_path('run_app.py', run_name='__main__')\nexcept SystemExit: pass\n"
            "heavy=[m for m in ('torch','transformers','gradio','fastapi') if m in sys.modules]\n"
            "print('HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "--profile" in out.stdout and "HEAVY []" in out.stdout, out.stdout + out.stderr


def test_cli_flags_after_subcommand(tmp_path):
    from run_app import parser
    from engine.config import config_from_args

    args = parser().parse_args(["chat", "--profile", "tiny", "--port", "7999", "--json", "hi"])
    cfg = config_from_args(args)
    assert cfg.profile == "tiny" and cfg.port == 7999 and args.json and args.message == "hi"
