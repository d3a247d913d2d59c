"""Settings: sources, precedence, and one-line errors for bad values."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, strategies as st

from wattledger.agent.config import AgentConfig, ConfigError, build_config, parse_duration_seconds


@pytest.mark.parametrize("text, seconds", [("100ms", 0.1), ("0.5s", 0.5), ("2", 2.0), ("2m", 120.0),
                                           ("1h", 3600.0), (" 10ms ", 0.01), ("1e-2", 0.01)])
def test_durations(text, seconds):
    assert parse_duration_seconds(text) == pytest.approx(seconds)


@given(st.text(max_size=20))
def test_duration_parser_returns_a_finite_non_negative_number_or_a_value_error(text):
    try:
        value = parse_duration_seconds(text)
    except ValueError as err:
        assert "\n" not in str(err)
    else:
        assert value >= 0 and value == value


def test_precedence_is_flags_then_environment_then_file(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text('[agent]\nport = 1111\ninterval = "50ms"\nbackend = "mock"\nmock_gpus = 3\n')
    config = build_config({"port": 3333}, {"WATTLEDGER_PORT": "2222", "WATTLEDGER_MOCK_GPUS": "4"}, str(path))
    assert (config.port, config.interval_seconds, config.backend, config.mock_gpus) == (3333, 0.05, "mock", 4)


def test_defaults():
    config = build_config({}, {})
    assert config == AgentConfig()
    assert config.port not in (9100, 9400, 9835)


@pytest.mark.parametrize("flags, environ, message", [
    ({"interval": "5ms"}, {}, "at least 10ms"),
    ({"interval": "fast"}, {}, "not a duration"),
    ({"port": 70000}, {}, "port"),
    ({"backend": "cuda"}, {}, "backend"),
    ({"backend": "replay"}, {}, "--replay FILE"),
    ({}, {"WATTLEDGER_MOCK_GPUS": "many"}, "environment: mock_gpus"),
    ({}, {"WATTLEDGER_COLOUR": "blue"}, "unknown setting 'WATTLEDGER_COLOUR'"),
    ({"mock_faults": ["explode"]}, {}, "mock-fault"),
    ({"token": "short"}, {}, "16 characters"),
    ({"record": "/no/such/dir/x.jsonl"}, {}, "does not exist"),
    ({"attribution_max_owners": -1}, {}, "attribution-max-owners must be 0-10000"),
    ({"attribution_max_owners": 10_001}, {}, "attribution-max-owners must be 0-10000"),
    ({"attribution_retention": "30s"}, {}, "attribution-retention must be at least 60s"),
    ({}, {"WATTLEDGER_ATTRIBUTION": "perhaps"}, "environment: attribution: expected true or false"),
    ({"kubelet_socket": "kubelet.sock"}, {}, "kubelet-socket must be an absolute path"),
    ({"engines": ["http://127.0.0.1:8000/metrics"]}, {}, "engine: charging an engine's tokens .* needs attribution"),
    ({"attribution": True, "engines": ["tcp://127.0.0.1:8000"]}, {}, "expected an http:// or https:// URL"),
    ({}, {"WATTLEDGER_ATTRIBUTION": "1", "WATTLEDGER_ENGINES": "http://h:0x1f/metrics"}, "is not a URL"),
    ({"attribution": True, "engines": ["http://127.0.0.1:8000/metrics"], "engine_interval": "10ms"}, {},
     "engine-interval must be 50ms to 1h, got 0.01s"),
    ({}, {"WATTLEDGER_ATTRIBUTION": "1", "WATTLEDGER_ENGINES": "http://127.0.0.1:8000/metrics",
          "WATTLEDGER_ENGINE_INTERVAL": "soon"}, "environment: engine_interval"),
])
def test_bad_settings_give_one_line_errors(flags, environ, message):
    with pytest.raises(ConfigError, match=message) as err:
        build_config(flags, environ)
    assert "\n" not in str(err.value)


def test_the_engine_interval_is_a_duration_from_any_source(tmp_path):
    url = "http://127.0.0.1:8000/metrics"
    assert build_config({"attribution": True, "engines": [url]}, {}).engine_interval_seconds == 5.0
    assert build_config({"attribution": True, "engines": [url], "engine_interval": "250ms"},
                        {}).engine_interval_seconds == 0.25
    path = tmp_path / "agent.toml"
    path.write_text(f'[agent]\nattribution = true\nengines = ["{url}"]\nengine-interval = "30s"\n')
    assert build_config({}, {}, str(path)).engine_interval_seconds == 30.0


def test_bad_config_files(tmp_path):
    broken = tmp_path / "broken.toml"
    broken.write_text("port = = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        build_config({}, {}, str(broken))
    with pytest.raises(ConfigError, match="cannot read"):
        build_config({}, {}, str(tmp_path / "missing.toml"))


def test_attribution_is_off_by_default_and_its_settings_come_from_every_source(tmp_path):
    default = build_config({}, {})
    assert (default.attribution, default.attribution_max_owners, default.attribution_retention_seconds,
            default.kubelet_socket) == (False, 50, 600.0, "/var/lib/kubelet/pod-resources/kubelet.sock")
    path = tmp_path / "agent.toml"
    path.write_text('[agent]\nattribution = true\nattribution_retention = "2m"\nkubelet_socket = "/k.sock"\n')
    config = build_config({"attribution_max_owners": "7"}, {"WATTLEDGER_KUBELET_SOCKET": ""}, str(path))
    assert (config.attribution, config.attribution_max_owners, config.attribution_retention_seconds,
            config.kubelet_socket) == (True, 7, 120.0, "")
    assert build_config({"attribution_max_owners": 0}, {}).attribution_max_owners == 0  # all in "other"


MOCK_PROCESS = {"gpu": 0, "pid": 4242, "sm_share": 0.5, "memory_bytes": 2**30,
                "labels": {"namespace": "llm", "pod": "vllm-0", "container": "vllm"}}


def test_mock_processes_come_from_a_json_file_named_by_any_source(tmp_path):
    from wattledger.agent.config import load_mock_processes

    path = tmp_path / "processes.json"
    path.write_text(json.dumps([MOCK_PROCESS, dict(MOCK_PROCESS, gpu=1, pid=7, sm_share=[[0, 0.2], [5, 0.4]],
                                                   labels={"group": "trainer.service"})]))
    toml = tmp_path / "agent.toml"
    toml.write_text(f'[agent]\nbackend = "mock"\nmock_gpus = 2\nmock_processes = {json.dumps(str(path))}\n')
    for flags, environ, config_file in (({}, {}, str(toml)), ({}, {"WATTLEDGER_MOCK_PROCESSES": str(path)}, str(toml)),
                                        ({"mock_processes": str(path)}, {}, str(toml))):
        assert build_config(flags, environ, config_file).mock_processes == str(path)
    script = load_mock_processes(str(path))
    assert [p.pid for p in script] == [4242, 7] and script.owner_labels()[7] == {"group": "trainer.service"}
    assert build_config({}, {}).mock_processes is None


@pytest.mark.parametrize("content, flags, message", [
    (None, {}, "mock-processes: cannot read .*: No such file or directory"),
    ("[{", {}, "is not JSON: Expecting"),
    (b"\xff\xfe\xff", {}, "is not JSON"),
    ("{}", {}, "scripted processes must be a list of tables"),
    ([dict(MOCK_PROCESS, sm_share=1.5)], {}, r"processes\[0\]: sm_share must be a ratio from 0 to 1"),
    ([{"gpu": 0}], {}, r"processes\[0\]: missing pid, sm_share, memory_bytes, labels"),
    ([MOCK_PROCESS, dict(MOCK_PROCESS, colour="red")], {}, r"processes\[1\]: unknown key 'colour'"),
    ([dict(MOCK_PROCESS, labels={"team": "a"})], {}, r"processes\[0\]: owner labels may only be"),
    ([dict(MOCK_PROCESS, labels={"kind": "tenant"})], {}, r"processes\[0\]: owner kind must be one of"),
    ([dict(MOCK_PROCESS, gpu=2)], {"mock_gpus": 2}, "a process is on GPU 2, but the mock has GPUs 0-1"),
    ([MOCK_PROCESS], {"backend": "nvml"}, "mock-processes goes with --backend mock .*, got backend nvml"),
    ([MOCK_PROCESS], {"backend": "auto"}, "goes with --backend mock"),
])
def test_a_bad_mock_processes_file_is_one_line(tmp_path, content, flags, message):
    path = tmp_path / "processes.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, list):
        path.write_text(json.dumps(content))
    elif content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=message) as err:
        build_config({"backend": "mock", **flags, "mock_processes": str(path)}, {})
    assert "\n" not in str(err.value)
