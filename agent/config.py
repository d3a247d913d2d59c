"""Agent settings from defaults, a TOML file, ``WATTLEDGER_*`` environment variables and flags.

Later sources win: defaults < ``--config FILE.toml`` < environment < command-line flags. Every value
is checked here, so a bad setting stops the agent with one line before anything starts.
"""

from __future__ import annotations

import argparse

import dataclasses
import json
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from wattledger.agent.accounting import DEFAULT_MAX_WORKLOADS, DEFAULT_NAME_PATTERN
from wattledger.agent.sampler import DEFAULT_HOST_INTERVAL_SECONDS, DEFAULT_INTERVAL_SECONDS, MIN_INTERVAL_SECONDS
from wattledger.probes.mock import parse_fault
from wattledger.probes.mock_presets import PRESETS
from wattledger.probes.mock_processes import ScriptedProcesses
from wattledger.probes.pod_resources import DEFAULT_SOCKET_PATH as DEFAULT_KUBELET_SOCKET

# 9478 is free of the neighbours: dcgm-exporter 9400, node_exporter 9100, nvidia_gpu_exporter 9835.
DEFAULT_PORT = 9478
BACKENDS = ("auto", "nvml", "mock", "replay")
ENV_PREFIX = "WATTLEDGER_"
# Owner attribution (issue 13; docs/attribution.md). The cap bounds the per-owner series a node adds (5 per
# owner: tests/benchmarks/bench_attribution.py measures them); the retention is how long an owner that left
# keeps its series.
DEFAULT_ATTRIBUTION_MAX_OWNERS = 50
MAX_ATTRIBUTION_OWNERS = 10_000  # as max-workloads: beyond this, a node's exposition is no longer one scrape's worth
DEFAULT_ATTRIBUTION_RETENTION_SECONDS = 600.0
# An owner's series must outlive a scrape interval, or a scrape may never see its last charges (the
# accumulator drops an owner only after reading it, docs/attribution.md "Reads come first"): at least
# Prometheus' default scrape_interval, 1m (prometheus.io/docs/prometheus/latest/configuration/configuration/).
MIN_ATTRIBUTION_RETENTION_SECONDS = 60.0
DEFAULT_ENGINE_INTERVAL_SECONDS = 5.0  # ASSUMPTION: a few reads per 1m scrape; an engine's counters move per step
ENGINE_INTERVAL_RANGE_SECONDS = (0.05, 3600.0)


class ConfigError(ValueError):
    """A setting that cannot be used; the message is one line naming the setting and its source."""


@dataclass(slots=True)
class AgentConfig:
    address: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    interval_seconds: float = DEFAULT_INTERVAL_SECONDS
    host_interval_seconds: float = DEFAULT_HOST_INTERVAL_SECONDS
    backend: str = "auto"
    mock_gpus: int = 1
    mock_preset: str = "h100-sxm-80gb"
    mock_faults: list[str] = field(default_factory=list)
    # A JSON file of scripted compute processes for the mock (probes/mock_processes.py): who runs on each
    # simulated GPU, with what SM share and memory, under which owner labels. None: no processes.
    mock_processes: str | None = None
    # Spans arrive when they end: the span-driven mock simulates this far behind the clock.
    mock_delay_seconds: float = 1.0
    replay: str | None = None
    replay_speed: float = 1.0
    replay_loop: bool = False
    record: str | None = None
    procfs: str = "/proc"
    sysfs: str = "/sys"
    token: str | None = None  # bearer token that lets non-loopback clients write
    max_workloads: int = DEFAULT_MAX_WORKLOADS
    workload_name_pattern: str = DEFAULT_NAME_PATTERN
    log_level: str = "info"
    attribution: bool = False  # who used the GPU: per-owner series (pods, units, commands); off by default
    attribution_max_owners: int = DEFAULT_ATTRIBUTION_MAX_OWNERS  # owners with series of their own; the rest: "other"
    attribution_retention_seconds: float = DEFAULT_ATTRIBUTION_RETENTION_SECONDS
    kubelet_socket: str = DEFAULT_KUBELET_SOCKET  # the kubelet's pod-resources socket; "" does without it
    # Serving engines' /metrics URLs whose tokens are charged to the owner of the process listening on the
    # URL's port (off Kubernetes; agent/engines.py). Needs attribution.
    engines: list[str] = field(default_factory=list)
    # How often each engine's /metrics is read (s): its counters are cumulative, so a slower read loses
    # nothing, it only makes the owner's token counter move in larger steps.
    engine_interval_seconds: float = DEFAULT_ENGINE_INTERVAL_SECONDS


_FIELDS = {f.name: f for f in dataclasses.fields(AgentConfig)}
_UNITS = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration_seconds(text: str) -> float:
    """``"100ms"``, ``"0.1s"``, ``"0.1"`` (seconds), ``"2m"``, ``"1h"`` -> seconds."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(ms|s|m|h)?\s*", str(text))
    if not match:
        raise ValueError(f"not a duration: {text!r} (examples: 100ms, 0.5s, 2m)")
    value = float(match.group(1)) * _UNITS[match.group(2) or "s"]
    if not math.isfinite(value):
        raise ValueError(f"not a finite duration: {text!r}")
    return value


class _BadValue(ValueError):
    """A value of the wrong type or out of range; the message is one line without the setting's name."""


def _describe(value: object) -> str:
    """A value as the error shows it: short, one line."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _as_duration_seconds(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise _BadValue(f"expected a duration such as 100ms or 0.5, got {_describe(value)}")
    if isinstance(value, str):
        return parse_duration_seconds(value)
    seconds = float(value)
    if not math.isfinite(seconds):  # nan would pass every range check below and busy-loop the sampler
        raise _BadValue(f"expected a finite duration, got {_describe(value)}")
    return seconds


def _as_int(value: object) -> int:
    if isinstance(value, bool):
        raise _BadValue(f"expected an integer, got {_describe(value)}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise _BadValue(f"expected an integer, got {_describe(value)}")


def _as_float(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise _BadValue(f"expected a number, got {_describe(value)}")
    try:
        number = float(value)
    except ValueError:
        raise _BadValue(f"expected a number, got {_describe(value)}") from None
    if not math.isfinite(number):
        raise _BadValue(f"expected a finite number, got {_describe(value)}")
    return number


def _as_bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    lowered = value.strip().lower() if isinstance(value, str) else None
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise _BadValue(f"expected true or false, got {_describe(value)}")


def _as_string_list(value: object) -> list[str]:
    if isinstance(value, str):  # environment and flags: comma separated
        return [_as_string(part) for part in value.split(",") if part.strip()]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [_as_string(v) for v in value]
    raise _BadValue(f"expected a list of strings, got {_describe(value)}")


def _as_string(value: object) -> str:
    if not isinstance(value, str):
        raise _BadValue(f"expected a string, got {_describe(value)}")
    # TOML can spell a NUL ("\u0000"); no path, address or token holds one, and the OS would refuse it
    # later with a traceback (ValueError: embedded null byte).
    if "\0" in value:
        raise _BadValue(f"expected text without NUL characters, got {value!r}")
    return value


_DURATION_FIELDS = ("interval_seconds", "host_interval_seconds", "mock_delay_seconds",
                    "attribution_retention_seconds", "engine_interval_seconds")
_CONVERTERS = {"int": _as_int, "float": _as_float, "bool": _as_bool, "list[str]": _as_string_list,
               "str": _as_string, "str | None": _as_string}


def setting_name(name: str) -> str:
    """A field as users write it: ``interval_seconds`` -> ``interval``."""
    return name.removesuffix("_seconds")


def _coerce(name: str, value: object, source: str):
    """Convert a raw setting to its field's type, with a one-line error naming where it came from.

    Every value is type-checked here whatever its source: TOML hands over ints, floats, lists and
    tables as they are, the environment and flags hand over strings."""
    convert = _as_duration_seconds if name in _DURATION_FIELDS else _CONVERTERS[_FIELDS[name].type]
    try:
        return convert(value)
    except ValueError as err:  # _BadValue, or parse_duration_seconds' own
        raise ConfigError(f"{source}: {setting_name(name)}: {err}") from None


def _decode_utf8(data: bytes, path: str) -> str:
    """TOML is UTF-8 by definition; say where it is not, in one line."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {err.start}, line {line})") from None


def _read_file_bytes(path: str, failure: str) -> bytes:
    """The file's bytes; ConfigError ``failure: reason`` (one line) when it cannot be read."""
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as err:
        raise ConfigError(f"{failure}: {err.strerror or err}") from None


def load_toml(path: str) -> dict:
    """The agent settings of a TOML file: the ``[agent]`` table, or the top level when there is none."""
    data = _read_file_bytes(path, f"cannot read config file {path}")
    try:
        document = tomllib.loads(_decode_utf8(data, path))
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {path} is not valid TOML: {err}") from None
    if "agent" not in document:
        return document  # settings may sit at the top level ...
    section = document["agent"]
    if not isinstance(section, dict):
        raise ConfigError(f"config file {path}: agent must be a table ([agent])")
    beside = sorted(key for key in document if key != "agent")
    if beside:  # ... or under [agent], but not both: a key beside [agent] would be silently ignored
        raise ConfigError(f"config file {path}: key {beside[0]!r} sits outside the [agent] table "
                          "(move it under [agent])")
    return section


def _key_to_field(key: str) -> str | None:
    key = key.replace("-", "_").replace(".", "_")
    if key in _FIELDS:
        return key
    aliases = {"interval": "interval_seconds", "host_interval": "host_interval_seconds", "path_procfs": "procfs", "path_sysfs": "sysfs",
               "mock_delay": "mock_delay_seconds", "attribution_retention": "attribution_retention_seconds",
               "engine": "engines", "engine_interval": "engine_interval_seconds"}
    return aliases.get(key)


# WATTLEDGER_* variables that other parts of wattledger read, not the agent: the workloads a profiled command
# starts find the agent through WATTLEDGER_AGENT_URL and WATTLEDGER_WORKLOAD (wattledger run sets them, and
# an agent started from such a shell inherits them); the test suite's switches. Every other WATTLEDGER_*
# name must be an agent setting, so that a misspelt one stops the agent instead of being ignored.
NOT_AGENT_ENV_VARS = frozenset({
    "WATTLEDGER_CONFIG",  # the --config default, read by the command line
    "WATTLEDGER_AGENT_URL", "WATTLEDGER_WORKLOAD",
    "WATTLEDGER_UPDATE_GOLDEN", "WATTLEDGER_SCREENSHOT_DIR",
})


def environment_settings(environ: Mapping[str, str]) -> dict[str, str]:
    """The agent's settings among the environment variables, by lower-case key without the prefix."""
    return {key[len(ENV_PREFIX):].lower(): value for key, value in environ.items()
            if key.startswith(ENV_PREFIX) and key not in NOT_AGENT_ENV_VARS}


def build_config(
    flags: Mapping[str, object],
    environ: Mapping[str, str],
    config_file: str | None = None,
) -> AgentConfig:
    """Merge the sources (``flags`` holds only what was given on the command line)."""
    config = AgentConfig()
    layers: list[tuple[str, Mapping[str, object]]] = []
    if config_file:
        layers.append((f"config file {config_file}", load_toml(config_file)))
    layers.append(("environment", environment_settings(environ)))
    layers.append(("command line", flags))
    for source, values in layers:
        for key, value in values.items():
            name = _key_to_field(key)
            if name is None:
                where = f"{ENV_PREFIX}{key.upper()}" if source == "environment" else key
                raise ConfigError(f"{source}: unknown setting {where!r}")
            setattr(config, name, _coerce(name, value, source))
    validate(config)
    return config


def _require(condition: bool, message: str) -> None:
    """Refuse a setting; ``condition`` is written so that nan fails it (``not lo <= x <= hi``)."""
    if not condition:
        raise ConfigError(message)


def validate(config: AgentConfig) -> None:
    """Check every setting's range and the combinations; ConfigError (one line) on the first bad one.

    Ranges are written as ``lo <= value <= hi`` so that nan, which fails every comparison, is refused
    even on a config built in code rather than by ``build_config``."""
    _validate_network(config)
    _validate_intervals(config)
    _validate_backend(config)
    _validate_mock(config)
    _validate_mock_processes(config)
    _require(1 <= config.max_workloads <= 10_000, "max-workloads must be 1-10000")
    try:
        re.compile(config.workload_name_pattern)
    except re.error as err:
        raise ConfigError(f"workload-name-pattern is not a regular expression: {err}") from None
    for name in ("procfs", "sysfs"):
        _require(bool(getattr(config, name).strip()), f"path.{name} must not be empty")
    if config.record:
        check_record_path(config.record)
    if config.token is not None:
        config.token = check_token(config.token)
    _require(config.log_level.lower() in ("debug", "info", "warning", "error"),
             "log-level must be debug, info, warning or error")
    _validate_attribution(config)


def _validate_attribution(config: AgentConfig) -> None:
    _require(0 <= config.attribution_max_owners <= MAX_ATTRIBUTION_OWNERS,
             f"attribution-max-owners must be 0-{MAX_ATTRIBUTION_OWNERS} (0 puts every owner in \"other\"), "
             f"got {config.attribution_max_owners}")
    retention = config.attribution_retention_seconds
    _require(MIN_ATTRIBUTION_RETENTION_SECONDS <= retention < math.inf,
             f"attribution-retention must be at least {MIN_ATTRIBUTION_RETENTION_SECONDS:g}s (longer than "
             f"Prometheus' scrape interval), got {retention:g}s")
    socket = config.kubelet_socket.strip()
    _require(not socket or socket.startswith(("/", "unix:")),
             f"kubelet-socket must be an absolute path (or unix:///path; empty to do without), got {socket!r}")
    _validate_engines(config)


def _validate_engines(config: AgentConfig) -> None:
    """Each engine URL parses (http/https, a host, a port or the scheme's), once each, and attribution is on
    (the tokens are charged to owners)."""
    from wattledger.agent.engines import parse_engine_url

    if not config.engines:
        return
    _require(config.attribution, "engine: charging an engine's tokens to its owner needs attribution "
             "(--attribution, or attribution = true)")
    low, high = ENGINE_INTERVAL_RANGE_SECONDS
    _require(low <= config.engine_interval_seconds <= high,
             f"engine-interval must be {low * 1000:g}ms to {high / 3600:g}h, got {config.engine_interval_seconds:g}s")
    for url in config.engines:
        try:
            parse_engine_url(url)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    repeated = sorted({url for url in config.engines if config.engines.count(url) > 1})
    if repeated:
        raise ConfigError(f"engine {repeated[0]!r} is given twice (one engine per URL)")


def check_port(port: int, allow_zero: bool = True) -> None:
    """A TCP port: 1-65535, or 0 (any free port) where ``allow_zero``."""
    low = 0 if allow_zero else 1
    _require(not isinstance(port, bool) and isinstance(port, int) and low <= port <= 65535,
             f"port must be {low}-65535, got {port}")


def _validate_network(config: AgentConfig) -> None:
    check_port(config.port)
    _require(bool(config.address.strip()), "address must not be empty (0.0.0.0 listens on every interface)")


def _validate_intervals(config: AgentConfig) -> None:
    interval = config.interval_seconds
    _require(math.isfinite(interval), f"interval must be a finite duration, got {interval!r}")
    _require(interval >= MIN_INTERVAL_SECONDS,
             f"interval must be at least {MIN_INTERVAL_SECONDS * 1000:g}ms, got {interval * 1000:g}ms")
    _require(interval <= 60, "interval must be at most 60s")
    _require(MIN_INTERVAL_SECONDS <= config.host_interval_seconds <= 60, "host-interval must be 10ms to 60s")
    _require(0 <= config.mock_delay_seconds <= 60, "mock-delay must be 0-60s")


def _validate_backend(config: AgentConfig) -> None:
    _require(config.backend in BACKENDS, f"backend must be one of {', '.join(BACKENDS)}, got {config.backend!r}")
    _require(not (config.backend == "replay" and not config.replay), "backend replay needs --replay FILE")
    _require(not config.replay or config.backend in ("replay", "auto"), "--replay FILE goes with --backend replay")
    if config.replay:
        config.backend = "replay"
    _require(0 < config.replay_speed < math.inf, "replay-speed must be a positive finite number")


def _validate_mock(config: AgentConfig) -> None:
    _require(1 <= config.mock_gpus <= 64, f"mock-gpus must be 1-64, got {config.mock_gpus}")
    _require(config.mock_preset in PRESETS,
             f"mock-preset must be one of {', '.join(PRESETS)}, got {config.mock_preset!r}")
    for text in config.mock_faults:
        try:
            fault = parse_fault(text)
        except ValueError as err:
            raise ConfigError(f"mock-fault: {err}") from None
        _require(fault.gpu is None or fault.gpu < config.mock_gpus,
                 f"mock-fault {text!r}: there is no GPU {fault.gpu} (the mock has GPUs 0-{config.mock_gpus - 1}; "
                 "see --mock-gpus)")


def _validate_mock_processes(config: AgentConfig) -> None:
    """The ``mock_processes`` file is for the mock alone, and must load (``load_mock_processes``) onto its GPUs."""
    if not config.mock_processes:
        return
    _require(config.backend == "mock",
             f"mock-processes goes with --backend mock (it scripts the simulated GPUs' processes), got backend "
             f"{config.backend}")
    script = load_mock_processes(config.mock_processes)
    outside = sorted(gpu for gpu in script.gpus() if gpu >= config.mock_gpus)
    if outside:
        raise ConfigError(f"mock-processes: {config.mock_processes}: a process is on GPU {outside[0]}, but the mock "
                          f"has GPUs 0-{config.mock_gpus - 1} (see --mock-gpus)")


def load_mock_processes(path: str) -> ScriptedProcesses:
    """The mock's scripted processes from a JSON file: a list of objects as ``ScriptedProcesses.from_spec``
    takes them. ConfigError (one line naming the file, and the entry where one is at fault) for a file that
    cannot be read, is not JSON, or holds a bad entry, owner labels that no owner resolver takes included
    (agent/owners.py's ``labels_from_mapping``)."""
    from wattledger.agent.owners import labels_from_mapping  # only a config naming the file needs it

    data = _read_file_bytes(path, f"mock-processes: cannot read {path}")
    try:
        # json.loads takes bytes in UTF-8, -16 or -32 (RFC 8259 section 8.1); anything else is a ValueError.
        spec = json.loads(data)
    except (ValueError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError; nesting too deep
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"mock-processes: {path} is not JSON: {reason}") from None
    try:
        script = ScriptedProcesses.from_spec(spec)
        for number, process in enumerate(script):
            try:
                labels_from_mapping(process.labels)
            except ValueError as err:
                raise ValueError(f"processes[{number}]: {err}") from None
    except ValueError as err:
        raise ConfigError(f"mock-processes: {path}: {err}") from None
    return script


def check_record_path(text: str) -> None:
    """The ``--record`` file can be created and written; tried for real (root passes every access check)."""
    _require("\0" not in text, f"record: {text!r} holds a NUL character, which no file name can")
    try:
        path = Path(text).expanduser()
    except RuntimeError:  # "~name" for a user this machine does not have
        raise ConfigError(f"record: cannot expand {text!r}: no such user's home directory") from None
    _require(not path.is_dir(), f"record: {path} is a directory; give a file name, e.g. {path / 'samples.jsonl'}")
    parent = path.resolve().parent
    _require(parent.is_dir(), f"record: directory {parent} does not exist")
    _require(os.access(parent, os.W_OK) and not parent.is_relative_to("/proc") and not parent.is_relative_to("/sys"),
             f"record: directory {parent} is not writable")
    existed = path.exists()
    try:
        # O_NONBLOCK: a FIFO nobody reads fails at once instead of hanging the agent's start.
        os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK, 0o644))
    except OSError as err:
        raise ConfigError(f"record: cannot write {path}: {err.strerror or err}") from None
    if not existed:
        path.unlink(missing_ok=True)  # the recorder creates it when the agent starts; nothing left if it does not


def check_token(token: str) -> str:
    """The bearer token a client can actually send: printable ASCII, 16+ characters; returned stripped.

    Surrounding whitespace is dropped rather than refused: a token read from a file or a Kubernetes Secret
    usually ends in a newline, which no client sends (HTTP drops it from the header)."""
    token = token.strip()
    _require(bool(token), "token is empty or only whitespace")
    _require(all(33 <= ord(c) <= 126 for c in token), "token must be printable ASCII without spaces "
             "(it travels in an HTTP header)")
    _require(len(token) >= 16, "token must be at least 16 characters")
    return token


# Exit statuses every wattledger command uses: 2 for bad usage (as argparse), 1 for a failure.
EXIT_USAGE = 2
EXIT_FAILED = 1


class UsageParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``PROG: error: ... (see --help)``) and exit status 2: the
    parser of every wattledger command line, the agent's and the heavy commands' (workloads/cli_args.py)."""

    def error(self, message: str) -> None:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")
