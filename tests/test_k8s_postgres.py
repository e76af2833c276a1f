"""Issue 29.2: MLflow on PostgreSQL in the manifests (k8s/components/mlflow-postgres and postgres).

The quickstart runs MLflow on its own Postgres StatefulSet: 2 replicas, a rolling update that
never leaves zero servers, no sqlite volume, the runs and the auth store in Postgres, a
connection budget that the database can hold. The other overlays keep sqlite and one replica.
Schema validation of the new objects is tests/test_k8s.py's (every overlay, every object).
"""

from __future__ import annotations

import configparser
import subprocess
from typing import Any

import pytest

from fixtures.k8s_manifests import copy_k8s, kustomize_command

MLFLOW_NAMESPACE = "maskdit"


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def arg(args: list[str], flag: str) -> str:
    values = [a.split("=", 1)[1] for a in args if a.startswith(flag + "=")]
    assert len(values) == 1, f"{flag}: {values}"
    return values[0]


def mlflow_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return find(docs, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]


def test_quickstart_runs_two_mlflow_replicas_on_postgres(k8s_built) -> None:
    docs = k8s_built["quickstart"]
    deployment = find(docs, "Deployment", "mlflow")
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"] == {"type": "RollingUpdate",
                                              "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    container = mlflow_container(docs)
    assert arg(container["args"], "--backend-store-uri") == "postgresql:///mlflow"
    assert "/mlflow" not in {m["mountPath"] for m in container["volumeMounts"]}
    assert "db" not in {v["name"] for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim" and d["metadata"]["name"] == "mlflow-db"]
    assert {"secretRef": {"name": "maskdit-mlflow-db"}} in container["envFrom"]
    # the auth store too: with sqlite on a pod's disk each replica would have its own users
    auth = configparser.ConfigParser()
    auth.read_string(find(docs, "ConfigMap", "mlflow-auth")["data"]["basic_auth.ini"])
    assert auth["mlflow"]["database_uri"] == "postgresql:///mlflow_auth"
    assert auth["mlflow"].getint("auth_cache_ttl_seconds") > 0, "a scrypt check on every request caps the server"
    assert "PGPASSWORD" in find(docs, "Secret", "maskdit-mlflow-db")["data"]
    budget = find(docs, "PodDisruptionBudget", "mlflow")["spec"]
    assert budget["minAvailable"] == 1 and budget["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]


def test_quickstart_postgres_is_what_mlflow_connects_to(k8s_built) -> None:
    docs = k8s_built["quickstart"]
    env = {e["name"]: e for e in mlflow_container(docs)["env"]}
    service = find(docs, "Service", "mlflow-postgres")
    assert env["PGHOST"]["value"] == f"mlflow-postgres.{service['metadata']['namespace']}.svc.cluster.local"
    assert service["spec"]["ports"][0]["port"] == 5432 and "PGPORT" not in env
    statefulset = find(docs, "StatefulSet", "mlflow-postgres")
    spec = statefulset["spec"]
    assert spec["selector"]["matchLabels"] == service["spec"]["selector"]
    assert [c["metadata"]["name"] for c in spec["volumeClaimTemplates"]] == ["data"]
    postgres = spec["template"]["spec"]["containers"][0]
    pg_env = {e["name"]: e for e in postgres["env"]}
    assert pg_env["POSTGRES_USER"]["value"] == env["PGUSER"]["value"]
    assert pg_env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "maskdit-mlflow-db", "key": "PGPASSWORD"}
    assert pg_env["POSTGRES_DB"]["value"] == "mlflow"
    init = find(docs, "ConfigMap", "mlflow-postgres-init")["data"]
    assert any("CREATE DATABASE mlflow_auth" in sql for sql in init.values())
    assert pg_env["PGDATA"]["value"].startswith(
        next(m["mountPath"] for m in postgres["volumeMounts"] if m["name"] == "data") + "/")


def test_postgres_holds_every_connection_mlflow_may_open(k8s_built) -> None:
    """(replicas + surge) pods x workers x 2 stores (runs, users) x (pool + overflow) <= max_connections."""
    docs = k8s_built["quickstart"]
    deployment = find(docs, "Deployment", "mlflow")
    container = mlflow_container(docs)
    env = {e["name"]: e.get("value") for e in container["env"]}
    per_worker = int(env["MLFLOW_SQLALCHEMYSTORE_POOL_SIZE"]) + int(env["MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW"])
    assert per_worker >= 40, "a worker runs up to 40 requests at once: fewer connections and they queue"
    pods = deployment["spec"]["replicas"] + deployment["spec"]["strategy"]["rollingUpdate"]["maxSurge"]
    needed = pods * int(arg(container["args"], "--workers")) * 2 * per_worker
    postgres = find(docs, "StatefulSet", "mlflow-postgres")["spec"]["template"]["spec"]["containers"][0]
    settings = dict(a.split("=", 1) for a in postgres["args"] if "=" in a)
    assert int(settings["max_connections"]) >= needed, f"max_connections {settings['max_connections']} < {needed}"


def test_only_mlflow_reaches_its_database(k8s_built) -> None:
    docs = k8s_built["quickstart"]
    policy = find(docs, "NetworkPolicy", "mlflow-postgres-clients")["spec"]
    assert policy["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "mlflow-postgres"}
    (rule,) = policy["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "mlflow"}}}]
    assert rule["ports"] == [{"protocol": "TCP", "port": 5432}]


@pytest.mark.parametrize("name", ["kfp-standalone", "kubeflow-profile"])
def test_the_other_installs_keep_sqlite_and_one_replica(k8s_built, name) -> None:
    docs = k8s_built[name]
    deployment = find(docs, "Deployment", "mlflow")
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert arg(mlflow_container(docs)["args"], "--backend-store-uri").startswith("sqlite:////mlflow/")
    find(docs, "PersistentVolumeClaim", "mlflow-db")
    assert not [d for d in docs if d["metadata"]["name"].startswith("mlflow-postgres")]


def test_a_moved_backend_argument_fails_the_build(tmp_path) -> None:
    """The component replaces the base's --backend-store-uri by position after checking it: if the
    base's arguments change order, the build fails instead of replacing the wrong one."""
    tree = copy_k8s(tmp_path)
    base = tree / "base" / "mlflow.yaml"
    text = base.read_text()
    assert "            - --workers=2\n            - --backend-store-uri" in text
    base.write_text(text.replace("            - --workers=2\n            - --backend-store-uri",
                                 "            - --backend-store-uri").replace(
        "            - --artifacts-destination", "            - --workers=2\n            - --artifacts-destination"))
    proc = subprocess.run([*kustomize_command(), str(tree / "overlays" / "quickstart")], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode != 0 and "test" in proc.stderr.lower(), proc.stderr[-2000:]
