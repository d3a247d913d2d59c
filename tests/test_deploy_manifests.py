"""Static checks of the deployment material under deploy/ (no cluster, no Docker engine needed).

Every YAML and JSON file parses; the Kubernetes manifests pass schema validation (kubernetes-validate's
bundled, offline schemas, strict: unknown fields fail) and the ServiceMonitor CRD a small schema here;
the security properties are asserted field by field; the systemd unit passes ``systemd-analyze verify``
where that exists; the Dockerfile installs no torch and runs the agent; the compose file names the three
services. Flags and WATTLEDGER_* settings in the manifests are checked against the agent's own parser.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from deploy_files import DEPLOY, ROOT, relative, yaml_documents

from wattledger.agent.cli import make_parser
from wattledger.agent.config import DEFAULT_PORT, build_config

K8S = DEPLOY / "k8s"
UNIT = DEPLOY / "systemd" / "wattledger-agent.service"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
COMPOSE = DEPLOY / "docker" / "compose.yaml"

YAML_FILES = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yml", ".yaml") and p.is_file())
JSON_FILES = sorted(p for p in DEPLOY.rglob("*.json") if p.is_file())
K8S_MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
# Oldest Kubernetes the manifests claim (internalTrafficPolicy is GA from 1.26) and the newest bundled.
K8S_VERSIONS = ("1.28.0", "latest")
MEASURED_RSS_MIB = 32  # README "Overhead (measured)": agent RSS with 8 mock GPUs after scrapes


def _k8s_objects() -> dict[str, dict]:
    objects = {}
    for path in K8S_MANIFESTS:
        for doc in yaml_documents(path):
            objects[doc["kind"]] = doc
    return objects


def _check_agent_settings(env: dict[str, str], args: list[str]) -> None:
    """The agent accepts these flags and WATTLEDGER_* variables (an unknown variable stops it)."""
    parsed = make_parser().parse_args(["agent", *args])
    flags = {k: v for k, v in vars(parsed).items() if k not in ("command", "config_file", "json")}
    settings = {k: v for k, v in env.items() if k.startswith("WATTLEDGER_")}
    build_config(flags, settings)


# -- every file parses ------------------------------------------------------------------------------


def test_deploy_folder_has_the_expected_files():
    for path in (K8S / "daemonset.yaml", K8S / "service.yaml", K8S / "servicemonitor.yaml",
                 K8S / "kustomization.yaml", UNIT, DOCKERFILE, COMPOSE, DEPLOY / "README.md"):
        assert path.is_file(), f"missing {relative(path)}"


@pytest.mark.parametrize("path", YAML_FILES, ids=relative)
def test_every_yaml_file_parses(path):
    docs = yaml_documents(path)
    assert docs, f"{relative(path)} holds no YAML document"


@pytest.mark.parametrize("path", JSON_FILES, ids=relative)
def test_every_json_file_parses(path):
    json.loads(path.read_text(encoding="utf-8"))


# -- Kubernetes: schemas --------------------------------------------------------------------------

# The CRD's schema is not bundled with kubernetes-validate: this is the part of the Prometheus
# Operator's ServiceMonitor schema that these manifests use, closed against typos.
SERVICEMONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {"name": {"type": "string"}, "namespace": {"type": "string"},
                           "labels": {"type": "object", "additionalProperties": {"type": "string"}}},
        },
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "jobLabel": {"type": "string"},
                "selector": {
                    "type": "object", "additionalProperties": False,
                    "properties": {"matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
                                   "matchExpressions": {"type": "array"}},
                },
                "namespaceSelector": {"type": "object"},
                "endpoints": {
                    "type": "array", "minItems": 1,
                    "items": {
                        "type": "object", "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": {"type": "string", "pattern": r"^(0|(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"},
                            "scrapeTimeout": {"type": "string", "pattern": r"^(0|(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"},
                            "honorLabels": {"type": "boolean"},
                            "relabelings": {"type": "array", "items": {
                                "type": "object", "additionalProperties": False,
                                "properties": {"sourceLabels": {"type": "array", "items": {"type": "string"}},
                                               "targetLabel": {"type": "string"}, "regex": {"type": "string"},
                                               "replacement": {"type": "string"}, "separator": {"type": "string"},
                                               "action": {"enum": ["replace", "keep", "drop", "labelmap",
                                                                   "labeldrop", "labelkeep", "hashmod"]}}}},
                            "metricRelabelings": {"type": "array"},
                        },
                    },
                },
            },
        },
    },
}


def _validate_builtin(doc: dict, version: str) -> None:
    from kubernetes_validate import utils

    utils.validate(doc, utils.latest_version() if version == "latest" else version, strict=True)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", K8S_MANIFESTS, ids=relative)
def test_k8s_manifests_pass_schema_validation(path, version):
    pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (test extra)")
    import jsonschema

    for doc in yaml_documents(path):
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):  # a CRD: the schema above
            jsonschema.validate(doc, SERVICEMONITOR_SCHEMA)
        else:
            _validate_builtin(doc, version)


def test_strict_validation_catches_a_misspelt_field():
    """The validator is strict: a typo in a field name fails (so the test above means something)."""
    pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (test extra)")
    from kubernetes_validate import utils

    daemonset = _k8s_objects()["DaemonSet"]
    broken = json.loads(json.dumps(daemonset))
    broken["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesytem"] = True
    with pytest.raises(utils.ValidationError):
        _validate_builtin(broken, "latest")


def test_kustomization_lists_every_manifest():
    kustomization = yaml_documents(K8S / "kustomization.yaml")[0]
    assert kustomization["namespace"]
    assert sorted(kustomization["resources"]) == sorted(p.name for p in K8S_MANIFESTS)
    labels = kustomization["labels"][0]
    assert labels["pairs"] and labels["includeSelectors"] is False  # a DaemonSet's selector is immutable
    assert any(image["name"] == "wattledger-agent" for image in kustomization["images"])


def test_kustomize_build_renders_valid_objects():
    tool = shutil.which("kustomize") or shutil.which("kubectl")
    if tool is None:
        pytest.skip("neither kustomize nor kubectl is installed")
    command = [tool, "build", str(K8S)] if tool.endswith("kustomize") else [tool, "kustomize", str(K8S)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        pytest.skip(f"{tool} could not run: {err}")
    assert result.returncode == 0, result.stderr
    rendered = [d for d in yaml.safe_load_all(result.stdout) if d]
    kinds = sorted(d["kind"] for d in rendered)
    assert kinds == ["DaemonSet", "Namespace", "Service", "ServiceMonitor"]
    namespace = yaml_documents(K8S / "kustomization.yaml")[0]["namespace"]
    for doc in rendered:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == namespace
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "wattledger"
    daemonset = next(d for d in rendered if d["kind"] == "DaemonSet")
    assert daemonset["spec"]["selector"]["matchLabels"] == _k8s_objects()["DaemonSet"]["spec"]["selector"]["matchLabels"]
    try:
        from kubernetes_validate import utils
    except ImportError:
        return
    for doc in rendered:
        if doc["kind"] != "ServiceMonitor":
            utils.validate(doc, utils.latest_version(), strict=True)


# -- Kubernetes: what the DaemonSet promises --------------------------------------------------------


@pytest.fixture(scope="module")
def pod() -> dict:
    return _k8s_objects()["DaemonSet"]["spec"]["template"]["spec"]


@pytest.fixture(scope="module")
def container(pod) -> dict:
    (only,) = pod["containers"]
    return only


_QUANTITY = re.compile(r"^([0-9.]+)(m|Ki|Mi|Gi|k|M|G)?$")
_FACTORS = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}


def _quantity(text: str) -> float:
    match = _QUANTITY.match(str(text))
    assert match, f"not a quantity: {text}"
    return float(match.group(1)) * _FACTORS[match.group(2)]


def test_daemonset_runs_only_on_gpu_nodes(pod):
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    tolerated = {(t["key"], t.get("effect")) for t in pod["tolerations"] if t.get("operator") == "Exists"}
    assert ("nvidia.com/gpu", "NoSchedule") in tolerated


def test_daemonset_reads_gpus_through_the_nvidia_runtime_without_taking_one(pod, container):
    assert pod["runtimeClassName"] == "nvidia"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert env["NVIDIA_DRIVER_CAPABILITIES"] == "utility"
    assert env["WATTLEDGER_BACKEND"] == "nvml"  # never the simulated GPU on a GPU node
    for section in ("requests", "limits"):
        assert not any("gpu" in name for name in container["resources"][section]), "takes a GPU from workloads"


def test_daemonset_security_context(pod, container):
    assert pod["hostPID"] is False and pod.get("hostNetwork", False) is False and pod.get("hostIPC", False) is False
    assert pod["automountServiceAccountToken"] is False
    for context in (pod["securityContext"], container["securityContext"]):
        assert context["runAsNonRoot"] is True
        assert context["runAsUser"] > 0 and context["runAsGroup"] > 0
        assert context["seccompProfile"]["type"] == "RuntimeDefault"
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security.get("privileged", False) is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert "add" not in security["capabilities"]


def test_daemonset_uid_matches_the_image_user(pod):
    user = [line.split()[1] for line in _dockerfile_instructions() if line.startswith("USER ")][-1]
    assert user == f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}"


def test_daemonset_mounts_host_proc_and_sys_read_only_and_passes_them(pod, container):
    host_paths = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    assert sorted(host_paths.values()) == ["/proc", "/sys"]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    where = {}
    for name, host_path in host_paths.items():
        assert mounts[name]["readOnly"] is True
        where[host_path] = mounts[name]["mountPath"]
    assert f"--path.procfs={where['/proc']}" in container["args"]
    assert f"--path.sysfs={where['/sys']}" in container["args"]


def test_daemonset_flags_and_settings_are_the_agents(container):
    env = {e["name"]: e.get("value", "x" * 16) for e in container["env"]}  # valueFrom: a stand-in token
    _check_agent_settings(env, container["args"])


def test_daemonset_port_and_probes(container):
    (port,) = container["ports"]
    assert port == {"name": "metrics", "containerPort": DEFAULT_PORT, "protocol": "TCP"}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/healthz", probe
        assert get["port"] in ("metrics", DEFAULT_PORT), probe


def test_daemonset_resources_sized_from_measured_overhead(container):
    resources = container["resources"]
    for section in ("requests", "limits"):
        assert set(resources[section]) >= {"cpu", "memory"}, section
    for name in ("cpu", "memory"):
        assert _quantity(resources["requests"][name]) <= _quantity(resources["limits"][name])
    assert _quantity(resources["requests"]["memory"]) >= 2 * MEASURED_RSS_MIB * 2**20
    assert _quantity(resources["limits"]["memory"]) >= 4 * MEASURED_RSS_MIB * 2**20
    assert _quantity(resources["limits"]["cpu"]) >= 0.1  # room for bursts of ~10 ms scrapes
    assert "Overhead (measured)" in (K8S / "daemonset.yaml").read_text(encoding="utf-8")


def test_service_and_servicemonitor_select_the_agent():
    objects = _k8s_objects()
    pod_labels = objects["DaemonSet"]["spec"]["template"]["metadata"]["labels"]
    service = objects["Service"]
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    assert port["name"] == "metrics" and port["port"] == DEFAULT_PORT and port["targetPort"] == "metrics"
    monitor = objects["ServiceMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics" and endpoint["interval"] == "15s"
    # The alert rules in deploy/prometheus match job="wattledger": the job comes from this Service label.
    assert service["metadata"]["labels"][monitor["spec"]["jobLabel"]] == "wattledger"


# -- Kubernetes: the attribution component -----------------------------------------------------------

ATTRIBUTION = K8S / "attribution"
POD_RESOURCES_DIR = "/var/lib/kubelet/pod-resources"


def _kustomize(folder: Path) -> list[dict]:
    """``kustomize build folder`` (or ``kubectl kustomize``) as objects; skips without either tool."""
    tool = shutil.which("kustomize") or shutil.which("kubectl")
    if tool is None:
        pytest.skip("neither kustomize nor kubectl is installed")
    command = [tool, "build", str(folder)] if tool.endswith("kustomize") else [tool, "kustomize", str(folder)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        pytest.skip(f"{tool} could not run: {err}")
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


@pytest.fixture(scope="module")
def with_attribution(tmp_path_factory) -> dict[str, dict]:
    """The base rendered through an overlay that adds the attribution component, as the README says to
    use it (kustomize refuses an overlay inside its base's folder, so the overlay is a temporary one)."""
    overlay = tmp_path_factory.mktemp("overlay")
    base = Path(os.path.relpath(K8S, overlay))
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [str(base)], "components": [str(base / "attribution")]}))
    return {d["kind"]: d for d in _kustomize(overlay)}


@pytest.fixture(scope="module")
def without_attribution() -> dict[str, dict]:
    return {d["kind"]: d for d in _kustomize(K8S)}


def test_attribution_is_a_component_the_base_does_not_include():
    (component,) = yaml_documents(ATTRIBUTION / "kustomization.yaml")
    assert component["kind"] == "Component" and component["apiVersion"] == "kustomize.config.k8s.io/v1alpha1"
    base = yaml_documents(K8S / "kustomization.yaml")[0]
    assert "components" not in base and "attribution" not in " ".join(base["resources"])
    assert POD_RESOURCES_DIR not in (K8S / "daemonset.yaml").read_text(encoding="utf-8")


def test_attribution_adds_host_pid_the_kubelet_socket_and_the_flag(with_attribution):
    pod = with_attribution["DaemonSet"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["hostPID"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    (name,) = [n for n, v in volumes.items() if v.get("hostPath", {}).get("path") == POD_RESOURCES_DIR]
    assert volumes[name]["hostPath"]["type"] == "Directory"  # the kubelet recreates the socket on restart
    assert mounts[name]["readOnly"] is True and mounts[name]["mountPath"] == POD_RESOURCES_DIR
    assert container["args"].count("--attribution") == 1
    endpoint = with_attribution["ServiceMonitor"]["spec"]["endpoints"][0]
    assert endpoint["honorLabels"] is True  # owners' namespace/pod labels are not renamed exported_*


def test_attribution_keeps_the_base_capability_set_and_changes_nothing_else(with_attribution,
                                                                           without_attribution):
    on = with_attribution["DaemonSet"]["spec"]["template"]["spec"]
    off = without_attribution["DaemonSet"]["spec"]["template"]["spec"]
    (container_on,), (container_off,) = on["containers"], off["containers"]
    security = container_on["securityContext"]
    assert security["capabilities"] == container_off["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security.get("privileged", False) is False
    assert on["securityContext"]["seccompProfile"] == off["securityContext"]["seccompProfile"]
    assert on.get("hostNetwork", False) is False and on.get("hostIPC", False) is False
    # Everything else is the base's: only these fields may differ (uid 0 reaches the root-owned socket).
    expected_changes = {"hostPID", "volumes", "securityContext"}
    assert {k for k in on.keys() | off.keys() if on.get(k) != off.get(k)} - {"containers"} <= expected_changes
    container_changes = {k for k in container_on.keys() | container_off.keys()
                         if container_on.get(k) != container_off.get(k)}
    assert container_changes <= {"args", "volumeMounts", "securityContext"}
    changed_security = {k for k in security.keys() | container_off["securityContext"].keys()
                        if security.get(k) != container_off["securityContext"].get(k)}
    assert changed_security <= {"runAsUser", "runAsGroup", "runAsNonRoot"}
    assert container_on["args"][:-1] == container_off["args"]
    for kind in ("Namespace", "Service"):
        assert with_attribution[kind] == without_attribution[kind]


def test_attribution_renders_valid_objects(with_attribution):
    pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (test extra)")
    import jsonschema
    from kubernetes_validate import utils

    for doc in with_attribution.values():
        if doc["kind"] == "ServiceMonitor":
            jsonschema.validate(doc, SERVICEMONITOR_SCHEMA)
        else:
            utils.validate(doc, utils.latest_version(), strict=True)


def test_attribution_flags_are_the_agents(with_attribution):
    (container,) = with_attribution["DaemonSet"]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value", "x" * 16) for e in container["env"]}
    _check_agent_settings(env, container["args"])


# -- systemd ------------------------------------------------------------------------------------------


def _unit() -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> values (systemd keys repeat: DeviceAllow, Environment, SystemCallFilter)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in UNIT.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_systemd_unit_hardening():
    service = _unit()["Service"]

    def one(key):
        assert key in service, f"{key} missing"
        return service[key][-1]

    assert one("DynamicUser") == "yes" or one("User") not in ("", "root", "0")
    assert one("ProtectSystem") == "strict"
    assert one("ProtectHome") == "yes"
    assert one("PrivateTmp") == "yes"
    assert one("NoNewPrivileges") == "yes"
    assert one("CapabilityBoundingSet") == ""
    assert set(one("RestrictAddressFamilies").split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert "@system-service" in service["SystemCallFilter"]
    assert one("DevicePolicy") == "closed"
    allowed = service["DeviceAllow"]
    assert "/dev/nvidiactl rw" in allowed and "/dev/nvidia-uvm rw" in allowed
    assert "char-nvidia* rw" in allowed  # /dev/nvidia0..N: DeviceAllow globs only device-group names
    assert service.get("PrivateDevices", ["no"])[-1] != "yes", "PrivateDevices would hide /dev/nvidia*"
    assert one("MemoryMax")
    assert one("Restart") == "on-failure"
    assert one("ExecStart").split()[-1] == "agent" and one("ExecStart").split()[0].endswith("/wattledger")


def test_systemd_unit_settings_are_the_agents():
    env = {}
    for line in _unit()["Service"]["Environment"]:
        for pair in line.split():
            key, _, value = pair.partition("=")
            env[key] = value
    assert env["WATTLEDGER_BACKEND"] == "nvml"
    _check_agent_settings(env, _unit()["Service"]["ExecStart"][-1].split()[2:])


def _unit_with_runnable_exec(tmp_path: Path) -> Path:
    # verify checks that ExecStart's program exists: point it at this environment's wattledger.
    program = Path(sys.executable).parent / "wattledger"
    if not program.exists():
        program = Path(shutil.which("true") or "/bin/true")
    copy = tmp_path / UNIT.name
    copy.write_text(re.sub(r"(?m)^ExecStart=\S+", f"ExecStart={program}", UNIT.read_text(encoding="utf-8")))
    return copy


def test_systemd_unit_passes_systemd_analyze_verify(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    unit = _unit_with_runnable_exec(tmp_path)
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if unit.name in line]
    assert result.returncode == 0 and not complaints, result.stdout + result.stderr


def test_systemd_unit_exposure_is_low(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    unit = _unit_with_runnable_exec(tmp_path)
    result = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager", str(unit)],
                            capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout)
    if result.returncode != 0 or match is None:
        pytest.skip(f"systemd-analyze security --offline not available here: {result.stderr.strip()[:200]}")
    assert float(match.group(1)) <= 3.0, result.stdout  # "OK" in systemd's scale (0 safe .. 10 unsafe)


# -- Docker ----------------------------------------------------------------------------------------------


def _dockerfile_instructions() -> list[str]:
    """Instructions with continuation lines joined and comments dropped."""
    instructions, pending = [], ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        instructions.append((pending + line).strip())
        pending = ""
    return instructions


def test_dockerfile_builds_the_agent_without_torch():
    instructions = _dockerfile_instructions()
    text = "\n".join(instructions)
    assert "torch" not in text.lower()
    assert "workloads]" not in text and "[workloads" not in text  # the extra is never installed
    froms = [line.split()[1] for line in instructions if line.upper().startswith("FROM ")]
    assert froms and all(image == "python:3.12-slim" for image in froms)
    assert any(line.startswith("RUN pip install") for line in instructions)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert not any("torch" in dep for dep in pyproject["project"]["dependencies"])
    # Every package folder is copied in (setuptools fails on a missing one), and every COPY source exists.
    copied = []
    for line in instructions:
        if line.startswith("COPY ") and "--from=" not in line:
            copied += line.split()[1:-1]
    for source in copied:
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
    for folder in pyproject["tool"]["setuptools"]["package-dir"].values():
        assert any(c.rstrip("/") == folder for c in copied), f"{folder}/ is not copied into the build"


def test_dockerfile_runs_the_agent_as_non_root_with_a_healthcheck():
    instructions = _dockerfile_instructions()
    entrypoint = [line for line in instructions if line.startswith("ENTRYPOINT ")]
    assert json.loads(entrypoint[-1][len("ENTRYPOINT "):]) == ["wattledger", "agent"]
    user = [line.split()[1] for line in instructions if line.startswith("USER ")]
    assert user and user[-1].split(":")[0] not in ("root", "0")
    assert f"EXPOSE {DEFAULT_PORT}" in instructions
    (healthcheck,) = [line for line in instructions if line.startswith("HEALTHCHECK ")]
    assert "urllib" in healthcheck and "/healthz" in healthcheck and str(DEFAULT_PORT) in healthcheck


# -- compose -------------------------------------------------------------------------------------------


def _expand_defaults(value: str) -> str:
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


def test_compose_names_the_three_services_and_mounts_that_exist():
    compose = yaml_documents(COMPOSE)[0]
    services = compose["services"]
    assert set(services) == {"agent", "prometheus", "grafana"}
    here = COMPOSE.parent
    build = services["agent"]["build"]
    assert ((here / build["context"]) / build["dockerfile"]).resolve() == DOCKERFILE
    assert services["prometheus"]["image"].startswith("prom/prometheus:")
    assert services["grafana"]["image"].startswith("grafana/grafana:")
    mounts = {}
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith("."):
                assert (here / source).is_dir(), f"{name}: {source} does not exist"
            mounts[(name, target)] = source
    assert mounts[("prometheus", "/etc/prometheus")] == "../prometheus"
    assert (DEPLOY / "prometheus" / "prometheus.yml").is_file()
    assert mounts[("grafana", "/etc/grafana/provisioning")] == "../grafana/provisioning"
    assert mounts[("grafana", "/var/lib/grafana/dashboards")] == "../grafana/dashboards"
    assert mounts[("agent", "/host/proc")] == "/proc" and mounts[("agent", "/host/sys")] == "/sys"


def test_compose_agent_gets_nvml_only_and_valid_settings():
    agent = yaml_documents(COMPOSE)[0]["services"]["agent"]
    (device,) = agent["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["utility"]
    assert agent["read_only"] is True and agent["cap_drop"] == ["ALL"]
    env = {k: _expand_defaults(str(v)) for k, v in agent["environment"].items()}
    assert env["WATTLEDGER_BACKEND"] == "nvml"
    _check_agent_settings(env, agent["command"])
