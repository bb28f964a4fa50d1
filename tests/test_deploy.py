"""The deployment files in docs/deploy: the structure a reader relies on, no literal secrets, and a
guide whose links and ``forkpop`` options exist."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
from pathlib import Path
from unittest import mock

import pytest
import yaml

pytestmark = pytest.mark.cluster

DEPLOY = Path(__file__).resolve().parents[1] / "docs" / "deploy"
GUIDE = DEPLOY / "README.md"
SECRET_KEY = re.compile(r"pass(word|wd)?|token|secret|api_?key|credential", re.IGNORECASE)
ENV_REF = re.compile(r"^\$?\$\{[A-Za-z_][A-Za-z0-9_]*(:?[-?][^}]*)?\}$")  # ${VAR}, ${VAR:-x}, ${VAR:?why}


def _docs(name: str) -> list:
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d is not None]


def _one(name: str) -> dict:
    (doc,) = _docs(name)
    return doc


def _walk(node, path=()):
    """Every (path, key, value) of the mappings in ``node``, and every list item's (path, None, item)."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield path, k, v
            yield from _walk(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield path, None, v
            yield from _walk(v, (*path, i))


def _literal_secrets(doc) -> list[str]:
    """Where ``doc`` holds a value that looks like a secret written out rather than referenced."""
    bad = []
    for path, key, value in _walk(doc):
        where = ".".join(map(str, (*path, key if key is not None else "")))
        if "file_mounts" in path:  # remote path -> local path: files, not values
            continue
        # A Kubernetes env entry: a secret-like name must come from valueFrom.secretKeyRef.
        if (
            isinstance(value, dict)
            and isinstance(value.get("name"), str)
            and ("value" in value or "valueFrom" in value)
        ):
            if SECRET_KEY.search(value["name"]) and "secretKeyRef" not in (value.get("valueFrom") or {}):
                bad.append(f"{where}: env {value['name']} is not taken from a secretKeyRef")
        # A mapping entry (compose environment, say): a secret-like key holds a ${VAR} reference.
        if key is not None and SECRET_KEY.search(str(key)) and not isinstance(value, (dict, list)):
            if not (isinstance(value, str) and ENV_REF.match(value.strip())):
                bad.append(f"{where}: {key} = {value!r} is not an environment reference")
        if isinstance(value, str):
            # scheme://user:password@host with a password written out
            for m in re.finditer(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^/@\s:]+:([^/@\s]+)@", value):
                if not ENV_REF.match(m.group(1)):
                    bad.append(f"{where}: a URI holds a literal password")
            for m in re.finditer(r"\b(RAY_AUTH_TOKEN|[A-Z_]*PASSWORD)=(\S+)", value):
                if not m.group(2).startswith("$"):
                    bad.append(f"{where}: {m.group(1)} is set to a literal")
    return bad


def test_rayjob_structure():
    job = _one("rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["metadata"]["name"]
    assert job["spec"]["entrypoint"].startswith("forkpop run ")
    cluster = job["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"]
    assert head and all(c["image"] and c["resources"]["limits"] for c in head)
    groups = cluster["workerGroupSpecs"]
    assert groups
    for g in groups:
        assert g["groupName"] and g["replicas"] >= 1
        assert g.get("minReplicas", 0) <= g["replicas"] <= g.get("maxReplicas", g["replicas"])
        containers = g["template"]["spec"]["containers"]
        assert containers and all(c["image"] and c["resources"]["limits"] for c in containers)


def test_rayjob_takes_secrets_from_a_kubernetes_secret():
    job = _one("rayjob.yaml")
    envs = [e for _, key, v in _walk(job) if key == "env" for e in v]
    refs = {e["name"] for e in envs if "secretKeyRef" in e.get("valueFrom", {})}
    assert "RAY_AUTH_TOKEN" in refs
    assert {"name": "RAY_AUTH_MODE", "value": "token"} in envs


def test_cluster_launcher_structure():
    cfg = _one("ray-cluster.yaml")
    assert cfg["cluster_name"] and cfg["provider"]["type"]
    types = cfg["available_node_types"]
    assert len(types) >= 2 and cfg["head_node_type"] in types
    assert all("node_config" in t and "resources" in t for t in types.values())
    workers = [n for n in types if n != cfg["head_node_type"]]
    assert all(types[n]["max_workers"] >= types[n].get("min_workers", 0) for n in workers)
    setup = " ".join(cfg["setup_commands"])
    assert "torch==2.13.0" in setup and ("-e " in setup or "git+" in setup)
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "ray start --head" in head_start and "RAY_AUTH_MODE=token" in head_start
    assert any("ray start --address" in c for c in cfg["worker_start_ray_commands"])


def test_cluster_launcher_matches_rays_schema():
    jsonschema = pytest.importorskip("jsonschema")
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(_one("ray-cluster.yaml"), schema)


def test_compose_has_postgres_and_mlflow_on_it():
    compose = _one("mlflow-postgres.yaml")
    services = compose["services"]
    assert {"postgres", "mlflow"} <= set(services)
    assert services["postgres"]["image"].startswith("postgres")
    mlflow = services["mlflow"]
    command = " ".join(mlflow["command"]) if isinstance(mlflow["command"], list) else mlflow["command"]
    assert "mlflow server" in command and "--serve-artifacts" in command and "--host 0.0.0.0" in command
    assert re.search(r"--backend-store-uri\s+postgresql://\S+@postgres:\d+/", command)
    assert "--artifacts-destination" in command
    assert "postgres" in mlflow["depends_on"]


@pytest.mark.parametrize("name", ["rayjob.yaml", "ray-cluster.yaml", "mlflow-postgres.yaml"])
def test_no_literal_secrets(name):
    assert _literal_secrets(_docs(name)) == []


def test_the_secret_check_catches_literals():
    env_literal = {"env": [{"name": "RAY_AUTH_TOKEN", "value": "abc123"}]}
    compose_literal = {"environment": {"POSTGRES_PASSWORD": "hunter2"}}
    uri_literal = {"command": "mlflow server --backend-store-uri postgresql://mlflow:hunter2@db/mlflow"}
    shell_literal = {"cmds": ["RAY_AUTH_TOKEN=abc123 ray start --head"]}
    for doc in (env_literal, compose_literal, uri_literal, shell_literal):
        assert _literal_secrets(doc), doc
    fine = {
        "env": [{"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}],
        "environment": {"POSTGRES_PASSWORD": "${POSTGRES_PASSWORD:?set it}", "PGPASSWORD": "${POSTGRES_PASSWORD}"},
        "command": "mlflow server --backend-store-uri postgresql://mlflow:$${PGPASSWORD}@db/mlflow",
    }
    assert _literal_secrets(fine) == []


def _code_lines(markdown: str) -> list[str]:
    """The lines of the fenced code blocks of ``markdown``."""
    return [
        line for block in re.findall(r"^```[^\n]*\n(.*?)^```", markdown, re.M | re.S) for line in block.splitlines()
    ]


def _forkpop_calls(text: str) -> list[tuple[str, list[str]]]:
    """Each ``forkpop COMMAND ... --flags`` in ``text`` (a shell line), as (command, flags)."""
    calls = []
    for part in re.split(r"&&|\|\||;|\|", text.split(" #")[0]):
        words = [w.strip("'\"") for w in part.split()]
        while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):  # VAR=value forkpop ...
            words = words[1:]
        if len(words) >= 2 and words[0] == "forkpop":
            calls.append((words[1], [w.split("=")[0] for w in words[2:] if w.startswith("--")]))
    return calls


def _help(command: str) -> str:
    """``forkpop COMMAND --help``, from the CLI's own parser, in this process."""
    from forkpop.experiments.cli import main

    out = io.StringIO()
    with mock.patch.dict(os.environ), contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    return out.getvalue()


def _guide_calls() -> list[tuple[str, list[str]]]:
    calls = [c for line in _code_lines(GUIDE.read_text()) for c in _forkpop_calls(line)]
    for name in ("ray-cluster.yaml", "rayjob.yaml"):  # commands in the YAML files and their comments
        for line in (DEPLOY / name).read_text().splitlines():
            calls += _forkpop_calls(line.lstrip("# ").replace("entrypoint:", "").strip())
    return calls


def test_guide_uses_only_real_forkpop_options():
    calls = _guide_calls()
    assert {c for c, _ in calls} >= {"run"} and sum(len(f) for _, f in calls) >= 5
    helps: dict[str, str] = {}
    for command, flags in calls:
        text = helps.setdefault(command, _help(command))
        for flag in flags:
            assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), f"forkpop {command} has no {flag}"


def test_guide_names_the_options_it_explains():
    flags = {f for _, fs in _guide_calls() for f in fs}
    text = GUIDE.read_text()
    assert {"--address", "--tracking-uri", "--summary"} <= flags
    for needle in ("--allow-unauthenticated-ray", "RAY_AUTH_MODE=disabled", "RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        assert needle in text
    assert "--allow-unauthenticated-ray" in _help("run")


def test_guide_links_point_to_files():
    links = re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", GUIDE.read_text())
    local = [link.split("#")[0] for link in links if not re.match(r"^[a-z]+:|^#", link)]
    assert local
    missing = [link for link in local if not (DEPLOY / link).exists()]
    assert missing == []
