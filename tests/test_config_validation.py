"""One validation layer for every agent setting (issue 8, item 14): each key's type and range, whatever the
source (TOML hands over ints, floats, lists and tables as they are; the environment and flags hand over
strings), non-UTF-8 TOML, keys beside ``[agent]``, mock faults, the record path, the token, and the
``WATTLEDGER_*`` variables that other parts of wattledger read."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from wattledger.agent.config import (
    NOT_AGENT_ENV_VARS,
    AgentConfig,
    ConfigError,
    build_config,
    load_mock_processes,
    validate,
)

REPO = Path(__file__).resolve().parent.parent
SETTING_KEYS = ("address", "port", "interval", "host_interval", "backend", "mock_gpus", "mock_preset", "mock_faults",
                "mock_delay", "replay", "replay_speed", "replay_loop", "record", "procfs", "sysfs", "token",
                "max_workloads", "workload_name_pattern", "log_level", "attribution", "attribution_max_owners",
                "attribution_retention", "kubelet_socket", "mock_processes", "engine_interval")


def toml_value(value) -> str:
    """A Python value as a TOML value (nan and inf included: TOML has them)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):  # JSON's escapes are TOML's; TOML also wants DEL escaped, and no surrogate pairs
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


_SCALARS = (st.integers(min_value=-2**63, max_value=2**63 - 1) | st.floats() | st.booleans() | st.text(max_size=12)
            | st.sampled_from(["100ms", "0.5", "mock", "replay", "0", "65535", "70000", "nan", "inf", " ", "", "1e999",
                               "gpu_lost:gpu=0:at=1", "h100-sxm-80gb", "debug", "10m", "59s", "true",
                               "/var/lib/kubelet/pod-resources/kubelet.sock", "unix:///run/k.sock"]))
_VALUES = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=3)
                       | st.dictionaries(st.sampled_from(["a", "port"]), inner, max_size=2), max_leaves=4)


def write_toml(tmp_path: Path, body: str | bytes) -> Path:
    """``body`` as ``agent.toml`` in ``tmp_path``; bytes are written as they are (the file need not be text)."""
    path = tmp_path / "agent.toml"
    if isinstance(body, bytes):
        path.write_bytes(body)
    else:
        path.write_text(body, encoding="utf-8")
    return path


def refused(pattern: str | None, *build_args) -> ConfigError:
    """The ConfigError that ``build_config(*build_args)`` raises: one line, matching ``pattern`` (a regex)."""
    with pytest.raises(ConfigError, match=pattern) as err:
        build_config(*build_args)
    assert "\n" not in str(err.value)
    return err.value


def assert_usable(config: AgentConfig) -> None:
    """What the rest of the agent relies on once build_config returned."""
    assert isinstance(config.port, int) and not isinstance(config.port, bool) and 0 <= config.port <= 65535
    for name in ("interval_seconds", "host_interval_seconds", "mock_delay_seconds", "replay_speed"):
        value = getattr(config, name)
        assert isinstance(value, (int, float)) and math.isfinite(value), name
    assert 0.01 <= config.interval_seconds <= 60 and config.replay_speed > 0
    assert isinstance(config.mock_gpus, int) and 1 <= config.mock_gpus <= 64
    assert isinstance(config.replay_loop, bool)
    assert isinstance(config.mock_faults, list) and all(isinstance(f, str) for f in config.mock_faults)
    for name in ("address", "backend", "mock_preset", "procfs", "sysfs", "workload_name_pattern", "log_level"):
        assert isinstance(getattr(config, name), str), name
    for name in ("replay", "record", "token"):
        assert getattr(config, name) is None or isinstance(getattr(config, name), str), name
    if config.token is not None:
        assert config.token.strip() == config.token and len(config.token) >= 16
    assert isinstance(config.attribution, bool)
    assert isinstance(config.attribution_max_owners, int) and 0 <= config.attribution_max_owners <= 10_000
    assert math.isfinite(config.attribution_retention_seconds) and config.attribution_retention_seconds >= 60
    assert isinstance(config.kubelet_socket, str)
    if config.mock_processes:  # named only with the mock, and a file that loads onto its GPUs
        assert config.backend == "mock"
        assert all(p.gpu < config.mock_gpus for p in load_mock_processes(config.mock_processes))
    assert config.kubelet_socket.strip() == "" or config.kubelet_socket.strip().startswith(("/", "unix:"))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.dictionaries(st.sampled_from(SETTING_KEYS), _VALUES, max_size=3), under_agent=st.booleans())
def test_any_toml_value_gives_a_usable_config_or_one_line(tmp_path, values, under_agent):
    body = "".join(f"{key} = {toml_value(value)}\n" for key, value in values.items())
    path = write_toml(tmp_path, ("[agent]\n" if under_agent else "") + body)
    try:
        config = build_config({}, {}, str(path))
    except ConfigError as err:
        assert "\n" not in str(err) and str(err)
    else:
        assert_usable(config)


@settings(max_examples=300, deadline=None)
@given(values=st.dictionaries(st.sampled_from(SETTING_KEYS), _VALUES, max_size=3))
def test_any_flag_value_gives_a_usable_config_or_one_line(values):
    try:
        config = build_config(values, {})
    except ConfigError as err:
        assert "\n" not in str(err)
    else:
        assert_usable(config)


@settings(max_examples=300, deadline=None)
@given(values=st.dictionaries(st.sampled_from(SETTING_KEYS), st.text(max_size=16), max_size=3))
def test_any_environment_value_gives_a_usable_config_or_one_line(values):
    environ = {f"WATTLEDGER_{key.upper()}": value for key, value in values.items()}
    try:
        config = build_config({}, environ)
    except ConfigError as err:
        assert "\n" not in str(err)
    else:
        assert_usable(config)


@pytest.mark.parametrize("body, message", [
    ("[agent]\nport = [1]\n", "port: expected an integer, got [1]"),
    ("[agent]\nport = 1.5\n", "port: expected an integer"),
    ("[agent]\nport = true\n", "port: expected an integer"),
    ("[agent]\nport = inf\n", "port: expected an integer"),
    ("[agent]\nmock_gpus = {a = 1}\n", "mock_gpus: expected an integer"),
    ("[agent]\nreplay_speed = [1]\n", "replay_speed: expected a number"),
    ("[agent]\nreplay_speed = nan\n", "replay_speed: expected a finite number"),
    ("[agent]\nreplay_loop = 1\n", "replay_loop: expected true or false"),
    ("[agent]\naddress = 5\n", "address: expected a string"),
    ("[agent]\ntoken = [\"a\"]\n", "token: expected a string"),
    ("[agent]\nmock_faults = [1]\n", "mock_faults: expected a list of strings"),
    ("interval = nan\n", "interval: expected a finite duration, got nan"),
    ("[agent]\ninterval = inf\n", "interval: expected a finite duration"),
    ("[agent]\ninterval = -inf\n", "interval: expected a finite duration"),
    ("[agent]\ninterval = [1]\n", "interval: expected a duration"),
    ("[agent]\nhost_interval = true\n", "host_interval: expected a duration"),
    ("[agent]\nmock_delay = nan\n", "mock_delay: expected a finite duration"),
    ("[agent]\nattribution = \"maybe\"\n", "attribution: expected true or false"),
    ("[agent]\nattribution_max_owners = 2.5\n", "attribution_max_owners: expected an integer"),
    ("[agent]\nattribution_retention = nan\n", "attribution_retention: expected a finite duration"),
    ("[agent]\nkubelet_socket = 1\n", "kubelet_socket: expected a string"),
])
def test_toml_values_of_the_wrong_type_or_not_finite(tmp_path, body, message):
    path = write_toml(tmp_path, body)
    assert str(path) in str(refused(re.escape(message), {}, {}, str(path)))


def test_nan_interval_is_refused_even_on_a_config_built_in_code():
    # nan fails every comparison, so a check written as ``value < minimum`` lets it through.
    for name in ("interval_seconds", "host_interval_seconds", "mock_delay_seconds", "replay_speed",
                 "attribution_retention_seconds"):
        with pytest.raises(ConfigError):
            validate(dataclasses.replace(AgentConfig(), **{name: math.nan}))


def test_toml_that_is_not_utf8_names_the_line(tmp_path):
    path = write_toml(tmp_path, b'[agent]\nbackend = "mock"\nlog_level = "\xff"\n')
    refused(r"not UTF-8 text \(byte \d+, line 3\)", {}, {}, str(path))


def test_binary_toml_is_one_line(tmp_path):
    refused(None, {}, {}, str(write_toml(tmp_path, bytes(range(256)) * 4)))


@pytest.mark.parametrize("body, key", [
    ('port = 1\n[agent]\nbackend = "mock"\n', "port"),
    ('interval = "1s"\nzzz = 2\n[agent]\n', "interval"),
    ('[agent]\nbackend = "mock"\n[exporter]\nport = 3\n', "exporter"),
])
def test_top_level_keys_beside_an_agent_table_are_named(tmp_path, body, key):
    refused(f"key '{key}' sits outside the \\[agent\\] table", {}, {}, str(write_toml(tmp_path, body)))


def test_settings_at_the_top_level_without_an_agent_table_still_work(tmp_path):
    path = write_toml(tmp_path, 'backend = "mock"\nmock_gpus = 2\n')
    assert build_config({}, {}, str(path)).mock_gpus == 2


def test_agent_that_is_not_a_table(tmp_path):
    refused("agent must be a table", {}, {}, str(write_toml(tmp_path, "agent = 3\n")))


@pytest.mark.parametrize("faults, gpus, message", [
    (["gpu_lost:gpu=1:at=1"], 1, "there is no GPU 1"),
    (["gpu_lost:gpu=7:at=1"], 4, "the mock has GPUs 0-3"),
    (["gpu_lost:gpu=0:gpu=1:at=1"], 2, "gpu= given twice"),
    (["energy_reset:at=1:at=2"], 1, "at= given twice"),
])
def test_mock_faults_for_missing_gpus_or_with_repeated_keys(faults, gpus, message):
    refused(message, {"mock_faults": faults, "mock_gpus": gpus, "backend": "mock"}, {})


def test_a_fault_for_an_existing_gpu_is_accepted():
    assert build_config({"mock_faults": ["gpu_lost:gpu=3:at=1"], "mock_gpus": 4}, {}).mock_faults


@pytest.mark.parametrize("token, message", [
    ("", "empty or only whitespace"),
    (" " * 20, "empty or only whitespace"),
    ("\t\n  \n", "empty or only whitespace"),
    ("0123456789 abcdef", "printable ASCII"),
    ("0123456789abcdéf", "printable ASCII"),
    ("short", "16 characters"),
])
def test_tokens_no_client_could_send_are_refused(token, message):
    for flags, environ in (({"token": token}, {}), ({}, {"WATTLEDGER_TOKEN": token})):
        refused(message, flags, environ)


@pytest.mark.parametrize("raw", ["0123456789abcdef\n", "  0123456789abcdef", "0123456789abcdef\r\n"])
def test_a_token_read_from_a_secret_keeps_working_without_its_surrounding_whitespace(raw):
    # `kubectl create secret --from-file` keeps the file's trailing newline in WATTLEDGER_TOKEN.
    for flags, environ in (({"token": raw}, {}), ({}, {"WATTLEDGER_TOKEN": raw})):
        assert build_config(flags, environ).token == "0123456789abcdef"


def test_whitespace_only_token_from_the_config_file(tmp_path):
    refused("only whitespace", {}, {}, str(write_toml(tmp_path, '[agent]\ntoken = "                    "\n')))


def test_record_at_a_directory(tmp_path):
    refused("is a directory; give a file name", {"record": str(tmp_path)}, {})


def test_record_path_is_tried_for_real_and_leaves_nothing_behind(tmp_path):
    target = tmp_path / "samples.jsonl"
    assert build_config({"record": str(target)}, {}).record == str(target)
    assert list(tmp_path.iterdir()) == []  # the recorder creates it when the agent starts, not the check
    existing = tmp_path / "kept.jsonl"
    existing.write_text("old\n")
    build_config({"record": str(existing)}, {})
    assert existing.read_text() == "old\n"


@pytest.mark.parametrize("path", ["/proc/forbidden.jsonl", "/sys/forbidden.jsonl", "/proc/self/status/x"])
def test_record_at_an_unwritable_path(path):
    refused("record: ", {"record": path}, {})


def test_record_under_a_file(tmp_path):
    (tmp_path / "plain").write_text("")
    refused("does not exist", {"record": str(tmp_path / "plain" / "x.jsonl")}, {})


def test_variables_that_workloads_read_do_not_stop_the_agent():
    environ = {"WATTLEDGER_AGENT_URL": "http://127.0.0.1:9478", "WATTLEDGER_WORKLOAD": "chat",
               "WATTLEDGER_PORT": "1234"}
    assert build_config({}, environ).port == 1234


def test_a_misspelt_agent_variable_still_stops_it():
    refused("unknown setting 'WATTLEDGER_PROT'", {}, {"WATTLEDGER_PROT": "1234"})


def test_every_wattledger_variable_the_code_reads_is_a_setting_or_known_to_be_someone_elses():
    """A new WATTLEDGER_* variable read anywhere in the project must not stop the agent it is set beside."""
    settings_names = {f"WATTLEDGER_{key.upper()}" for key in SETTING_KEYS}
    settings_names |= {f"WATTLEDGER_{f.name.upper()}" for f in dataclasses.fields(AgentConfig)}
    found = set()
    for path in REPO.rglob("*.py"):
        if ".venv" in path.parts or "site-packages" in path.parts:
            continue
        found |= set(re.findall(r"\bWATTLEDGER_[A-Z][A-Z0-9_]*[A-Z0-9]\b", path.read_text(encoding="utf-8")))
    found -= {"WATTLEDGER_PROT", "WATTLEDGER_COLOUR"}  # the misspellings the tests use on purpose
    assert sorted(found - settings_names - NOT_AGENT_ENV_VARS) == []


def test_record_under_the_home_of_a_user_that_does_not_exist():
    # Found by the environment property test: Path.expanduser raises RuntimeError for "~nosuchuser".
    refused("no such user's home directory", {"record": "~wattledger-no-such-user/samples.jsonl"}, {})


def test_record_with_a_nul_character_is_one_line():
    # Found by the environment property test: Path.resolve raises ValueError("embedded null byte").
    refused("NUL character", {"record": "samples\x00.jsonl"}, {})


@pytest.mark.parametrize("key", ["replay", "record", "procfs", "address", "token", "mock_faults", "kubelet_socket"])
def test_a_nul_in_any_string_setting_from_toml_is_one_line(tmp_path, key):
    value = '["a\\u0000b"]' if key == "mock_faults" else '"a\\u0000b"'
    refused("NUL", {}, {}, str(write_toml(tmp_path, f"[agent]\n{key} = {value}\n")))


# JSON a --mock-processes file may hold: any shape, with the spec's keys and values near their edges.
_JSON_SCALARS = (st.none() | st.booleans() | st.integers(min_value=-2, max_value=2**64) | st.floats()
                 | st.text(max_size=8) | st.sampled_from(["gpu", "pid", "labels", "pod", "kind", "unit"]))
_SPEC_KEYS = st.sampled_from(["gpu", "pid", "sm_share", "memory_bytes", "labels", "start_s", "end_s",
                              "tensor_ratio", "dram_ratio", "pod", "group", "kind", "x"])
_JSON_VALUES = st.recursive(_JSON_SCALARS, lambda inner: st.lists(inner, max_size=3)
                            | st.dictionaries(_SPEC_KEYS, inner, max_size=6), max_leaves=12)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=_JSON_VALUES | st.lists(st.dictionaries(_SPEC_KEYS, _JSON_VALUES, max_size=6), max_size=3))
def test_any_json_in_a_mock_processes_file_gives_a_usable_config_or_one_line(tmp_path, document):
    path = tmp_path / "processes.json"
    path.write_text(json.dumps(document))  # nan and inf included: json writes (and reads) NaN and Infinity
    try:
        config = build_config({"backend": "mock", "mock_gpus": 2, "mock_processes": str(path)}, {})
    except ConfigError as err:
        assert "\n" not in str(err) and str(path) in str(err)
    else:
        assert_usable(config)


def test_a_mock_processes_file_broken_after_validation_is_one_line_at_start(tmp_path):
    """The daemon reads the file again when it opens the mock: a file changed in between is a ConfigError
    (which the command line prints as one line, exit 2), not a traceback."""
    from wattledger.agent.daemon import open_gpu_backend

    path = tmp_path / "processes.json"
    path.write_text(json.dumps([{"gpu": 0, "pid": 1, "sm_share": 0.5, "memory_bytes": 0, "labels": {}}]))
    config = build_config({"backend": "mock", "mock_processes": str(path)}, {})
    opened = open_gpu_backend(config)
    assert len(opened.backend.scripted_processes) == 1 and "1 scripted process(es)" in opened.notes[-1]
    opened.backend.close()
    path.write_text("[")
    with pytest.raises(ConfigError, match="is not JSON"):
        open_gpu_backend(config)
