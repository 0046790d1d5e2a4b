"""server/config.py: the Settings fields, their environment variables and flags, and docs/settings.md.

docs/settings.md must be what the code renders now; the flags of `python -m server` are the fields
minus the secrets; VITSERVE_* values parse with the fields' types, and a bad one is a one-line
ConfigError naming the variable; flags override the environment, which overrides the defaults.
"""
from __future__ import annotations

import json
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from engine.errors import ConfigError
from server.__main__ import parse_args
from server.config import (
    ENV_PREFIX,
    SECRET_FIELDS,
    Settings,
    default_of,
    env_var,
    flag,
    render_markdown,
)
from tests.test_cli import (
    CALL_TIMEOUT,
    assert_one_error_line,
    clean_env,
    run_server_to_exit,
)

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "settings.md"
REGENERATE = "make docs (or: python -m server.config --markdown > docs/settings.md)"


def settings_from(argv: list[str], environ: dict[str, str]) -> Settings:
    """What `python -m server ARGV` builds in an environment `environ` (as server.__main__.main does)."""
    args = parse_args(argv)
    args.pop("grace")
    return Settings.from_env(environ, **args)


# ---------------------------------------------------------------- docs/settings.md

def test_docs_match_the_code():
    assert DOCS.is_file(), f"docs/settings.md is missing; write it with {REGENERATE}"
    assert DOCS.read_text() == render_markdown(), \
        f"docs/settings.md is out of date with server/config.py; run {REGENERATE}"


def test_docs_have_one_row_per_setting():
    rows = [line for line in render_markdown().splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == list(Settings.model_fields)
    port = next(row for row in rows if row.startswith("| `port`"))
    assert "`--port`" in port and "`VITSERVE_PORT`" in port and "| int |" in port and "`50051`" in port
    batching = next(row for row in rows if row.startswith("| `dynamic_batching`"))
    assert "`--no-dynamic-batching`" in batching and "`true`" in batching
    for name in SECRET_FIELDS:
        row = next(row for row in rows if row.startswith(f"| `{name}`"))
        assert "(environment only)" in row and flag(name) not in row


def test_python_m_server_config_prints_the_docs():
    result = subprocess.run([sys.executable, "-m", "server.config", "--markdown"], cwd=REPO, env=clean_env(),
                            capture_output=True, text=True, timeout=CALL_TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert result.stdout == render_markdown()


# ---------------------------------------------------------------- the fields

def test_every_field_has_a_description():
    empty = [name for name, f in Settings.model_fields.items() if not (f.description or "").strip()]
    assert not empty, f"settings without a description: {empty}"


def test_fields_have_real_types_and_the_engine_default():
    from engine import DEFAULT_MAX_BATCH_SIZE

    types = {name: f.annotation for name, f in Settings.model_fields.items()}
    choices = {name: t for name, t in types.items() if typing.get_origin(t) is typing.Literal}
    assert choices == {"role": typing.Literal["all", "train", "predict"],  # the settings that are a choice
                       "trainer": typing.Literal["ort", "ort-training"],
                       "train_isolation": typing.Literal["process", "thread"]}
    assert {t for name, t in types.items() if name not in choices} <= {Path, int, float, bool, str}, types
    assert types["artifacts"] is Path and types["port"] is int and types["dynamic_batching"] is bool
    assert default_of("max_batch_size") == Settings.from_env({}).max_batch_size == DEFAULT_MAX_BATCH_SIZE


def test_importing_the_settings_loads_neither_torch_nor_onnx_runtime():
    code = ("import sys, server.config; "
            "print(json.dumps(sorted(m for m, module in sys.modules.items() "
            "if module is not None and m.split('.')[0] in ('torch', 'model', 'onnxruntime'))))")
    result = subprocess.run([sys.executable, "-c", "import json; " + code], cwd=REPO, env=clean_env(),
                            capture_output=True, text=True, timeout=CALL_TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


# ---------------------------------------------------------------- the environment

@pytest.mark.parametrize("variable, raw, name, expected", [
    ("VITSERVE_PORT", "50100", "port", 50100),
    ("VITSERVE_METRICS_PORT", "-1", "metrics_port", -1),
    ("VITSERVE_LEARNING_RATE", "2e-4", "learning_rate", 2e-4),
    ("VITSERVE_MAX_BATCH_DELAY_MS", "5", "max_batch_delay_ms", 5.0),
    ("VITSERVE_DYNAMIC_BATCHING", "false", "dynamic_batching", False),
    ("VITSERVE_DYNAMIC_BATCHING", "off", "dynamic_batching", False),
    ("VITSERVE_LOG_JSON", "1", "log_json", True),
    ("VITSERVE_LOG_JSON", " yes ", "log_json", True),
    ("VITSERVE_DATA_DIR", "/data", "data_dir", Path("/data")),
    ("VITSERVE_ARTIFACTS", "artifacts/vit-tiny", "artifacts", Path("artifacts/vit-tiny")),
    ("VITSERVE_HOST", "0.0.0.0", "host", "0.0.0.0"),
])
def test_environment_values_parse_with_the_field_types(variable, raw, name, expected):
    value = getattr(Settings.from_env({variable: raw}), name)
    assert value == expected and type(value) is type(expected), (variable, raw, value)


@pytest.mark.parametrize("variable, raw, kind", [
    ("VITSERVE_PORT", "fifty", "int"),
    ("VITSERVE_PORT", "1.5", "int"),
    ("VITSERVE_LEARNING_RATE", "fast", "float"),
    ("VITSERVE_DYNAMIC_BATCHING", "maybe", "bool"),
    ("VITSERVE_WORKERS", "", "int"),
])
def test_a_bad_environment_value_is_a_config_error_naming_it(variable, raw, kind):
    with pytest.raises(ConfigError) as e:
        Settings.from_env({variable: raw})
    assert str(e.value) == f"{variable}={raw!r} is not a valid {kind}"


def test_every_bad_value_is_named_on_one_line():
    with pytest.raises(ConfigError) as e:
        Settings.from_env({"VITSERVE_PORT": "x", "VITSERVE_LOG_JSON": "perhaps"})
    message = str(e.value)
    assert "\n" not in message
    assert "VITSERVE_PORT='x' is not a valid int" in message
    assert "VITSERVE_LOG_JSON='perhaps' is not a valid bool" in message


def test_a_bad_override_and_an_unknown_one_are_config_errors():
    with pytest.raises(ConfigError, match=r"^port='x' is not a valid int$"):
        Settings.from_env({}, port="x")
    with pytest.raises(ConfigError, match="'no_such_setting' is not a setting"):
        Settings.from_env({}, no_such_setting=1)


def test_an_empty_environ_means_no_environment(monkeypatch):
    monkeypatch.setenv("VITSERVE_PORT", "1234")
    assert Settings.from_env({}).port == 50051
    assert Settings.from_env().port == 1234  # environ=None: os.environ
    assert Settings().port == 1234  # a plain BaseSettings reads os.environ too
    assert Settings(port=9).port == 9


def test_unrelated_and_unknown_variables_are_ignored():
    settings = Settings.from_env({"VITSERVE_NO_SUCH_SETTING": "1", "VITSERVE_ADDRESS": "x:1", "PORT": "1"})
    assert settings.port == 50051


# ---------------------------------------------------------------- secrets

def test_secrets_are_neither_flags_nor_in_repr(capsys):
    assert SECRET_FIELDS == {"read_token", "write_token"}
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    help_text = capsys.readouterr().out
    for name in SECRET_FIELDS:
        assert f"{flag(name)} " not in help_text and f"{flag(name)}\n" not in help_text, name
        assert name not in parse_args([])
        with pytest.raises(SystemExit):
            parse_args([flag(name), "secret"])
    settings = Settings.from_env({"VITSERVE_READ_TOKEN": "read-s3cret", "VITSERVE_WRITE_TOKEN": "write-s3cret"})
    assert (settings.read_token, settings.write_token) == ("read-s3cret", "write-s3cret")
    assert "s3cret" not in repr(settings) and "s3cret" not in str(settings)


# ---------------------------------------------------------------- flags

def test_flags_are_the_fields_minus_the_secrets():
    args = parse_args([])
    assert set(args) == (set(Settings.model_fields) - SECRET_FIELDS) | {"grace"}
    assert all(value is None for name, value in args.items() if name != "grace"), args
    switched = parse_args(["--no-dynamic-batching", "--log-json"])
    assert (switched["dynamic_batching"], switched["log_json"]) == (False, True)
    assert parse_args(["--data-dir", "/tmp/d", "--max-batch-delay-ms", "2.5"])["data_dir"] == Path("/tmp/d")


def test_flags_override_the_environment_which_overrides_the_defaults():
    environ = {env_var("port"): "6000", env_var("host"): "0.0.0.0", env_var("dynamic_batching"): "off",
               env_var("learning_rate"): "0.01"}
    settings = settings_from(["--port", "7000", "--dynamic-batching", "--data-dir", "/srv/data"], environ)
    assert settings.port == 7000  # flag over variable
    assert settings.dynamic_batching is True  # flag over variable
    assert settings.host == "0.0.0.0" and settings.learning_rate == 0.01  # variable over default
    assert settings.data_dir == Path("/srv/data")  # flag over default
    assert settings.workers == default_of("workers") == 32  # neither: the default
    assert settings_from([], {}) == Settings.from_env({})


def test_env_var_names_use_the_prefix():
    assert ENV_PREFIX == "VITSERVE_"
    assert {env_var(name) for name in Settings.model_fields} == {
        "VITSERVE_" + name.upper() for name in Settings.model_fields}


# ---------------------------------------------------------------- python -m server

def test_bad_environment_value_is_one_error_line():
    result = run_server_to_exit("--port", "0", env=clean_env(VITSERVE_MAX_BATCH_SIZE="many"))
    line = assert_one_error_line(result, code=2)
    assert line == "error: VITSERVE_MAX_BATCH_SIZE='many' is not a valid int", line


def test_bad_flag_value_and_unknown_flag_are_one_error_line():
    line = assert_one_error_line(run_server_to_exit("--port", "fifty"), code=2)
    assert "--port" in line and "fifty" in line, line
    line = assert_one_error_line(run_server_to_exit("--read-token", "secret"), code=2)
    assert "--read-token" in line, line
