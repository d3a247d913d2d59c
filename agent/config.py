"""Agent settings from defaults, a TOML file, ``WATTLEDGER_*`` environment variables and flags.

Later sources win: defaults < ``--config FILE.toml`` < environment < command-line flags. Every value
is checked here, so a bad setting stops the agent with one line before anything starts.
"""

from __future__ import annotations

import dataclasses
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

# 9478 is free of the neighbours: dcgm-exporter 9400, node_exporter 9100, nvidia_gpu_exporter 9835.
DEFAULT_PORT = 9478
BACKENDS = ("auto", "nvml", "mock", "replay")
ENV_PREFIX = "WATTLEDGER_"


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


def _coerce(name: str, value: object, source: str):
    """Convert a raw setting to its field's type, with a one-line error naming where it came from."""
    kind = _FIELDS[name].type
    try:
        if name in ("interval_seconds", "host_interval_seconds", "mock_delay_seconds"):
            return value if isinstance(value, float) else parse_duration_seconds(str(value))
        if kind == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(f"expected an integer, got {value!r}")
            return int(value)
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError(f"expected a number, got {value!r}")
            result = float(value)
            if not math.isfinite(result):
                raise ValueError(f"expected a finite number, got {value!r}")
            return result
        if kind == "bool":
            if isinstance(value, bool):
                return value
            lowered = str(value).strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(f"expected true or false, got {value!r}")
        if kind == "list[str]":
            if isinstance(value, str):
                return [part for part in value.split(",") if part.strip()]
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                return list(value)
            raise ValueError("expected a list of strings")
        if not isinstance(value, str):
            raise ValueError(f"expected a string, got {value!r}")
        return value
    except ValueError as err:
        raise ConfigError(f"{source}: {name.replace('_seconds', '')}: {err}") from None


def load_toml(path: str) -> dict:
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror or err}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {path} is not valid TOML: {err}") from None
    section = data.get("agent", data)  # settings may sit at the top or under [agent]
    if not isinstance(section, dict):
        raise ConfigError(f"config file {path}: [agent] must be a table")
    return section


def _key_to_field(key: str) -> str | None:
    key = key.replace("-", "_").replace(".", "_")
    if key in _FIELDS:
        return key
    aliases = {"interval": "interval_seconds", "host_interval": "host_interval_seconds", "path_procfs": "procfs", "path_sysfs": "sysfs",
               "mock_delay": "mock_delay_seconds"}
    return aliases.get(key)


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
    layers.append(("environment", {
        k[len(ENV_PREFIX):].lower(): v for k, v in environ.items() if k.startswith(ENV_PREFIX) and k != "WATTLEDGER_CONFIG"
    }))
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


def validate(config: AgentConfig) -> None:
    if not 0 <= config.port <= 65535:
        raise ConfigError(f"port must be 0-65535, got {config.port}")
    if config.interval_seconds < MIN_INTERVAL_SECONDS:
        raise ConfigError(f"interval must be at least {MIN_INTERVAL_SECONDS * 1000:g}ms, got "
                          f"{config.interval_seconds * 1000:g}ms")
    if config.interval_seconds > 60:
        raise ConfigError("interval must be at most 60s")
    if not MIN_INTERVAL_SECONDS <= config.host_interval_seconds <= 60:
        raise ConfigError("host-interval must be 10ms to 60s")
    if config.backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {config.backend!r}")
    if config.backend == "replay" and not config.replay:
        raise ConfigError("backend replay needs --replay FILE")
    if config.replay and config.backend not in ("replay", "auto"):
        raise ConfigError("--replay FILE goes with --backend replay")
    if config.replay:
        config.backend = "replay"
    if not 1 <= config.mock_gpus <= 64:
        raise ConfigError(f"mock-gpus must be 1-64, got {config.mock_gpus}")
    if config.mock_preset not in PRESETS:
        raise ConfigError(f"mock-preset must be one of {', '.join(PRESETS)}, got {config.mock_preset!r}")
    if not 0 <= config.mock_delay_seconds <= 60:
        raise ConfigError("mock-delay must be 0-60s")
    if not config.replay_speed > 0:
        raise ConfigError("replay-speed must be positive")
    for fault in config.mock_faults:
        try:
            parse_fault(fault)
        except ValueError as err:
            raise ConfigError(f"mock-fault: {err}") from None
    if not 1 <= config.max_workloads <= 10_000:
        raise ConfigError("max-workloads must be 1-10000")
    try:
        re.compile(config.workload_name_pattern)
    except re.error as err:
        raise ConfigError(f"workload-name-pattern is not a regular expression: {err}") from None
    if config.record:
        parent = Path(config.record).expanduser().resolve().parent
        if not parent.is_dir():
            raise ConfigError(f"record: directory {parent} does not exist")
        if not os.access(parent, os.W_OK) or parent.is_relative_to("/proc") or parent.is_relative_to("/sys"):
            raise ConfigError(f"record: directory {parent} is not writable")
    if config.token is not None and len(config.token) < 16:
        raise ConfigError("token must be at least 16 characters")
    if config.log_level.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError("log-level must be debug, info, warning or error")
