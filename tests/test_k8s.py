"""The Kubernetes manifests (k8s/): they build, they validate, and they are least-privilege.

No cluster runs here, so every overlay is built with kustomize (kubectl's), each built-in
resource is validated against the Kubernetes API schemas (kubernetes-validate, offline), and
the PyTorchJob against the Training Operator's CRD schema and the ClusterTrainingRuntime against
Trainer v2.3.0's, from shared/crds (kept in tests/data/crds). Then the rules:
where each install puts what (namespaces), RBAC, images, non-root pods, resources that fit the
node, empty Secrets, MLflow's allowed hosts. tests/test_k8s_rbac.py applies the overlays to the
stand-in API server and evaluates their RBAC.
"""

from __future__ import annotations

import base64
import configparser
import copy
import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import kubernetes_validate
import pytest
import yaml
from fixtures.k8s_api import manifest_errors
from fixtures.k8s_manifests import K8S_INSTALLS, K8S_TRAINERS, copy_k8s, kustomize_build

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").exists())
MLFLOW_NAMESPACE = "maskdit"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
# The oldest and the newest Kubernetes the manifests must suit (schemas bundled in the wheel).
K8S_VERSIONS = ["1.29", "1.37"]
CRD_NAME = "kubeflow.org_pytorchjobs.yaml"

# What the pipeline's steps may do, and nothing more: (apiGroup, resource) -> verbs.
# Secrets and the ConfigMap only by name (resourceNames).
# Exactly what the launcher calls (components/kube_calls.py): no watch, no events.
ALLOWED_RULES = {
    ("trainer.kubeflow.org", "trainjobs"): {"create", "get", "list", "delete", "patch"},
    ("kubeflow.org", "pytorchjobs"): {"create", "get", "list", "delete", "patch"},
    ("", "pods"): {"get", "list"},  # get: the launcher reads its own pod on SIGTERM (a drain keeps the job)
    ("", "pods/log"): {"get"},
    ("", "secrets"): {"get"},
    ("", "configmaps"): {"get"},
}
ALLOWED_NAMES = {("", "secrets"): {"maskdit-s3", "maskdit-mlflow"}, ("", "configmaps"): {"maskdit-config"}}
# A 96-vCPU / 680 GB 8xA100 node (GCP a2-highgpu-8g; AWS p4d has more memory): what the kubelet
# leaves allocatable there (GKE's reservation formula: about 95.7 CPU / 613 GiB), less room for
# DaemonSets (GPU operator, logging, CNI) and the system.
NODE_ALLOCATABLE = {"cpu": 95.0, "memory": 600 * 2**30}
DAEMONSET_ROOM = {"cpu": 2.0, "memory": 16 * 2**30}


# ------------------------------------------------------------------------------------------
# Building
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request, k8s_built) -> tuple[str, list[dict[str, Any]]]:
    """(name, resources) of each overlay, built from a copy of k8s/ whose Secrets' env files are
    the templates (tests/fixtures/k8s_manifests.py)."""
    return request.param, k8s_built[request.param]


def secrets_of(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == "Secret"]


def test_every_overlay_is_found() -> None:
    assert set(OVERLAYS) == set(K8S_INSTALLS) == set(K8S_TRAINERS), (
        "every overlay needs its (namespace, service account) and its Trainer here")


def test_each_overlay_states_and_carries_the_trainer_it_needs(overlay) -> None:
    name, docs = overlay
    said = (K8S / "overlays" / name / "kustomization.yaml").read_text()
    kinds = {d["kind"] for d in docs}
    if K8S_TRAINERS[name] == "trainer-v2":
        assert "Trainer v2.3" in said and "ClusterTrainingRuntime" in kinds and "PyTorchJob" not in kinds
    else:
        assert "Training Operator v1.9" in said and "PyTorchJob" in kinds and "ClusterTrainingRuntime" not in kinds


# ------------------------------------------------------------------------------------------
# Schemas
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_builtin_resources_validate_against_kubernetes(overlay, version: str) -> None:
    _, docs = overlay
    checked = 0
    for doc in docs:
        if doc["apiVersion"].startswith(("kubeflow.org/", "trainer.kubeflow.org/")):
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} is invalid for Kubernetes {version}: {error}")
        checked += 1
    assert checked >= 7


def test_the_validator_rejects_an_unknown_field() -> None:
    """Strict validation is not vacuous: a misspelt field fails."""
    bad = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"},
           "spec": {"ports": [{"port": 80}], "selectr": {"a": "b"}}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSIONS[0], strict=True)


def crd_file() -> Path:
    """The Training Operator's CRD (release-1.9), kept in tests/data (a copy of shared/crds)."""
    return ROOT / "tests" / "data" / "crds" / CRD_NAME


def test_the_kept_crd_is_the_shared_one() -> None:
    """The copy in tests/data must not drift from shared/crds where that sits beside the repository."""
    shared = ROOT.parent / "shared" / "crds" / CRD_NAME
    if not shared.exists():
        pytest.skip(f"no {shared} to compare with")
    assert crd_file().read_bytes() == shared.read_bytes(), f"tests/data/crds/{CRD_NAME} differs from {shared}"


def strict(schema: dict[str, Any]) -> dict[str, Any]:
    """What the API server does with kubectl's strict field validation: an object schema with
    listed properties accepts no other field, unless it says it keeps unknown fields."""
    schema = copy.deepcopy(schema)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)  # (top-level metadata has no properties in a CRD: it is checked as ObjectMeta)
    return schema


@pytest.fixture(scope="module")
def pytorchjob_validator() -> jsonschema.protocols.Validator:
    crd = yaml.safe_load(crd_file().read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = strict(version["schema"]["openAPIV3Schema"])
    return jsonschema.Draft7Validator(schema)


def pytorchjobs(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == "PyTorchJob"]


def runtimes(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == "ClusterTrainingRuntime"]


def training_template(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The overlay's training pod template: the example PyTorchJob's master, or the runtime's node."""
    if pytorchjobs(docs):
        return pytorchjobs(docs)[0]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
    return runtimes(docs)[0]["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]


def test_the_runtime_validates_against_the_crd(overlay) -> None:
    """The rendered ClusterTrainingRuntime against Trainer v2.3.0's CRD (cluster-scoped: no namespace)."""
    name, docs = overlay
    for runtime in runtimes(docs):
        assert manifest_errors(runtime) == [] and "namespace" not in runtime["metadata"]
        assert runtime["metadata"]["name"] == "maskdit"
    assert bool(runtimes(docs)) == (K8S_TRAINERS[name] == "trainer-v2")


def test_pytorchjob_validates_against_the_crd(overlay, pytorchjob_validator) -> None:
    name, docs = overlay
    jobs = pytorchjobs(docs)
    assert bool(jobs) == (K8S_TRAINERS[name] == "training-operator"), "the Training Operator overlays carry it"
    for job in jobs:
        assert job["apiVersion"] == "kubeflow.org/v1"
        errors = sorted(pytorchjob_validator.iter_errors(job), key=lambda e: list(e.path))
        assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)


def test_the_crd_check_rejects_mistakes(k8s_built, pytorchjob_validator) -> None:
    """The CRD check is not vacuous: an int nprocPerNode, a string replica count and a misspelt
    field all fail."""
    example = pytorchjobs(k8s_built["kfp-standalone"])[0]
    job = copy.deepcopy(example)
    job["spec"]["nprocPerNode"] = 8
    assert not pytorchjob_validator.is_valid(job)
    job = copy.deepcopy(example)
    job["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"] = "1"
    assert not pytorchjob_validator.is_valid(job)
    job = copy.deepcopy(example)
    job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["nodeSelecter"] = {}
    assert not pytorchjob_validator.is_valid(job)


# ------------------------------------------------------------------------------------------
# Least privilege
# ------------------------------------------------------------------------------------------

def test_nothing_cluster_wide(overlay) -> None:
    _, docs = overlay
    kinds = {d["kind"] for d in docs}
    assert not kinds & {"ClusterRole", "ClusterRoleBinding"}, f"cluster-wide RBAC: {kinds}"


# What the step pods need, where they run; the MLflow server (and the quickstart's store) in maskdit.
STEP_SIDE = {("Role", "maskdit-pipeline"), ("RoleBinding", "maskdit-pipeline"), ("ConfigMap", "maskdit-config"),
             ("Secret", "maskdit-s3"), ("Secret", "maskdit-mlflow")}
TRAINER_SIDE = {"training-operator": ("PyTorchJob", "maskdit-pretrain-example"),  # where the steps run
                "trainer-v2": ("ClusterTrainingRuntime", "maskdit")}  # cluster-scoped
MLFLOW_SIDE = {("Deployment", "mlflow"), ("Service", "mlflow"), ("PersistentVolumeClaim", "mlflow-db"),
               ("ConfigMap", "maskdit-config"), ("Secret", "maskdit-s3"), ("Secret", "maskdit-mlflow"),
               ("Secret", "maskdit-mlflow-admin"), ("Job", "mlflow-pipeline-user")}
ADMIN_SECRET, USER_SECRET = "maskdit-mlflow-admin", "maskdit-mlflow"  # MLflow's admin; the pipeline's own account


def test_each_install_puts_the_steps_needs_where_its_steps_run(overlay) -> None:
    """Secrets, ConfigMap, Role and binding in the namespace where KFP runs the steps (and the steps
    their training jobs); MLflow with its own Secrets and ConfigMap in maskdit; nowhere else but the
    Trainer v2 runtime, which is cluster-scoped."""
    name, docs = overlay
    step_namespace, account = K8S_INSTALLS[name]
    placed: dict[str, set[tuple[str, str]]] = {}
    for doc in docs:
        if doc["kind"] != "Namespace":
            placed.setdefault(doc["metadata"].get("namespace", ""), set()).add((doc["kind"], doc["metadata"]["name"]))
    trainer = TRAINER_SIDE[K8S_TRAINERS[name]]
    where = "" if trainer[0] == "ClusterTrainingRuntime" else step_namespace
    assert trainer in placed.get(where, set()), f"{name}: no {trainer} in {where!r}"
    placed[where].discard(trainer)
    if not placed[where]:
        del placed[where]
    assert set(placed) == {step_namespace, MLFLOW_NAMESPACE}, f"{name}: resources in {sorted(placed)}"
    assert STEP_SIDE <= placed[step_namespace], f"{name}: {sorted(STEP_SIDE - placed[step_namespace])} missing"
    mlflow_side = MLFLOW_SIDE if name != "quickstart" else (  # MLflow on Postgres: tests/test_k8s_postgres.py
        MLFLOW_SIDE - {("PersistentVolumeClaim", "mlflow-db")} | {("StatefulSet", "mlflow-postgres")})
    assert mlflow_side <= placed[MLFLOW_NAMESPACE], f"{name}: {sorted(mlflow_side - placed[MLFLOW_NAMESPACE])}"
    binding = by_kind_name([d for d in docs if d["metadata"].get("namespace") == step_namespace],
                           "RoleBinding", "maskdit-pipeline")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": step_namespace}]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "maskdit-pipeline"}
    assert not [d for d in docs if d["kind"] == "ServiceAccount"], "KFP and the profile controller create the accounts"


def test_rbac_grants_nothing_beyond_the_list(overlay) -> None:
    _, docs = overlay
    roles = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Role"}
    assert roles, "the pipeline's Role is missing"
    granted: dict[tuple[str, str], set[str]] = {}
    for role in roles.values():
        for rule in role["rules"]:
            assert "nonResourceURLs" not in rule
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    verbs = set(rule["verbs"])
                    allowed = ALLOWED_RULES.get((group, resource))
                    assert allowed is not None, f"Role {role['metadata']['name']} grants {resource!r} in {group!r}"
                    assert verbs <= allowed, f"{resource}: {sorted(verbs - allowed)} beyond {sorted(allowed)}"
                    names = ALLOWED_NAMES.get((group, resource))
                    assert set(rule.get("resourceNames", [])) == (names or set()), (
                        f"{resource}: resourceNames {rule.get('resourceNames')}, expected {names}")
                    granted.setdefault((group, resource), set()).update(verbs)
    assert granted == ALLOWED_RULES, f"the steps need exactly {ALLOWED_RULES}, the Role gives {granted}"
    for binding in (d for d in docs if d["kind"] == "RoleBinding"):
        assert binding["roleRef"]["kind"] == "Role" and binding["roleRef"]["name"] in roles, (
            "a RoleBinding may bind only our Role (binding a ClusterRole such as `edit` would grant more)")


# ------------------------------------------------------------------------------------------
# Pods: non-root, no escalation, resources everywhere
# ------------------------------------------------------------------------------------------

def pod_templates(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for doc in docs:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield name, doc["spec"]["template"]
        elif doc["kind"] == "PyTorchJob":
            for replica, spec in doc["spec"]["pytorchReplicaSpecs"].items():
                yield f"{name}/{replica}", spec["template"]
        elif doc["kind"] == "ClusterTrainingRuntime":
            for job in doc["spec"]["template"]["spec"]["replicatedJobs"]:
                yield f"{name}/{job['name']}", job["template"]["spec"]["template"]
        elif doc["kind"] == "Pod":
            yield name, doc


def containers(pod_spec: dict[str, Any]) -> list[dict[str, Any]]:
    return pod_spec.get("initContainers", []) + pod_spec["containers"]


def test_there_are_pods_to_check(overlay) -> None:
    names = [name for name, _ in pod_templates(overlay[1])]
    assert any(n.startswith("Deployment/mlflow") for n in names)
    assert any(n.startswith(("PyTorchJob/", "ClusterTrainingRuntime/")) for n in names)


def test_no_pod_runs_as_root_or_escalates(overlay) -> None:
    for name, template in pod_templates(overlay[1]):
        spec = template["spec"]
        pod_sc = spec.get("securityContext", {})
        assert pod_sc.get("runAsNonRoot") is True, f"{name}: runAsNonRoot is not set"
        assert pod_sc.get("runAsUser", 1) != 0 and pod_sc.get("runAsGroup", 1) != 0, f"{name}: uid/gid 0"
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC"), name
        for container in containers(spec):
            where = f"{name}/{container['name']}"
            sc = container.get("securityContext", {})
            assert sc.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation is not false"
            assert not sc.get("privileged"), f"{where}: privileged"
            assert sc.get("runAsUser", 1) != 0, f"{where}: runs as uid 0"
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{where}: capabilities not dropped"
            assert not sc.get("capabilities", {}).get("add"), f"{where}: adds capabilities"
            seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {}))
            assert seccomp.get("type") == "RuntimeDefault", f"{where}: no RuntimeDefault seccomp profile"


def test_every_container_has_requests_and_limits(overlay) -> None:
    for name, template in pod_templates(overlay[1]):
        for container in containers(template["spec"]):
            resources = container.get("resources", {})
            for kind in ("requests", "limits"):
                missing = {"cpu", "memory"} - set(resources.get(kind, {}))
                assert not missing, f"{name}/{container['name']}: no {kind} for {sorted(missing)}"
            gpus = resources["limits"].get("nvidia.com/gpu")
            assert gpus == resources["requests"].get("nvidia.com/gpu"), f"{name}: GPU requests != limits"


def quantity(text: str | int | float) -> float:
    """A Kubernetes quantity ("80", "500m", "480Gi", "64G") as a number (cores or bytes)."""
    match = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(text))
    assert match, f"not a quantity: {text!r}"
    factors = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30,
               "Ti": 2**40}
    return float(match.group(1)) * factors[match.group(2)]


def test_training_pods_fit_an_8xa100_node_with_headroom(overlay) -> None:
    """The example job (and docs/operating.md's numbers) fit a 96-vCPU / 680 GB node: requests below
    limits, limits below what the node leaves allocatable less DaemonSet room, /dev/shm (memory,
    counted in the pod's memory) inside the request."""
    spec = training_template(overlay[1])["spec"]
    resources = spec["containers"][0]["resources"]
    for kind in ("cpu", "memory"):
        request, limit = quantity(resources["requests"][kind]), quantity(resources["limits"][kind])
        assert request < limit, f"{kind}: request {request} is not below its limit {limit}"
        assert limit + DAEMONSET_ROOM[kind] <= NODE_ALLOCATABLE[kind], f"{kind}: limit {limit} leaves no headroom"
    shm = next(v for v in spec["volumes"] if v["name"] == "dshm")["emptyDir"]["sizeLimit"]
    assert quantity(shm) < quantity(resources["requests"]["memory"])
    operating = (ROOT / "docs" / "operating.md").read_text()
    for kind in ("requests", "limits"):
        for key in ("cpu", "memory"):
            assert f"`{resources[kind][key]}`" in operating, f"docs/operating.md does not state {kind}.{key}"


def images(docs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(name, c["image"]) for name, template in pod_templates(docs) for c in containers(template["spec"])
            if "image" in c]  # the runtime's trainer has none: each TrainJob names its image


def test_no_image_is_left_unset(overlay) -> None:
    """Our images name a registry (a bare `maskdit` would end in ImagePullBackOff), and the maskdit
    image's tag is the project's version (pyproject.toml)."""
    ours = {}
    for name, image in images(overlay[1]):
        repository = image.split("@")[0].rpartition(":")[0] if ":" in image.rpartition("/")[2] else image
        last = repository.rpartition("/")[2]
        if last in ("maskdit", "maskdit-mlflow"):
            registry = repository.split("/")[0]
            assert "/" in repository and ("." in registry or ":" in registry or registry == "localhost"), (
                f"{name}: image {image!r} names no registry: make k8s-image IMAGE_REPO=<registry>/maskdit")
            ours[last] = image
    # every install runs maskdit in the Job mlflow-pipeline-user (and a Training Operator one in its example)
    assert set(ours) == {"maskdit", "maskdit-mlflow"}, f"found {ours}"
    if "maskdit" in ours:
        assert ours["maskdit"].endswith(f":{VERSION}"), f"{ours['maskdit']}: the tag is not pyproject's {VERSION}"


def test_make_k8s_image_points_every_overlay_at_a_registry(tmp_path) -> None:
    """`make k8s-image IMAGE_REPO=...` rewrites the one images entry all overlays use; a bare name
    is refused."""
    tree = copy_k8s(tmp_path)
    settings = tree / "components" / "images" / "kustomization.yaml"
    make = ["make", "-s", "-C", str(ROOT), "k8s-image", f"K8S_SETTINGS={settings}"]
    proc = subprocess.run([*make, "IMAGE_REPO=registry.example.com:5000/ml/maskdit"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    for name in OVERLAYS:
        found = {image for _, image in images(kustomize_build(tree / "overlays" / name))}
        assert f"registry.example.com:5000/ml/maskdit:{VERSION}" in found, found
        assert any(i.startswith("registry.example.com:5000/ml/maskdit-mlflow:") for i in found), found
    refused = subprocess.run([*make, "IMAGE_REPO=maskdit"], capture_output=True, text=True)
    assert refused.returncode != 0 and "names no registry" in refused.stdout + refused.stderr
    assert "registry.example.com:5000/ml/maskdit" in settings.read_text()


def test_every_image_is_pinned(overlay) -> None:
    for name, template in pod_templates(overlay[1]):
        for container in containers(template["spec"]):
            image = container.get("image", "maskdit:set-by-each-trainjob")  # the runtime's trainer: none
            tag = image.rpartition(":")[2] if ":" in image.rpartition("/")[2] else ""
            assert "@sha256:" in image or (tag and tag != "latest"), f"{name}: image {image!r} is not pinned"


def test_pods_talk_to_no_api_server_unless_they_must(overlay) -> None:
    for name, template in pod_templates(overlay[1]):
        assert template["spec"].get("automountServiceAccountToken") is False, (
            f"{name}: mounts a service account token it has no use for")


# ------------------------------------------------------------------------------------------
# Secrets: templates only, and every reference resolves
# ------------------------------------------------------------------------------------------

def test_secrets_are_made_from_the_templates(overlay) -> None:
    """Both Secrets in both namespaces, MLflow's admin beside MLflow only, with the templates' keys and
    no value (the quickstart sets only its store's address)."""
    name, docs = overlay
    step_namespace, _ = K8S_INSTALLS[name]
    found = {(d["metadata"]["namespace"], d["metadata"]["name"]) for d in secrets_of(docs)}
    expected = {(ns, s) for ns in (step_namespace, MLFLOW_NAMESPACE) for s in ("maskdit-s3", USER_SECRET)}
    expected.add((MLFLOW_NAMESPACE, ADMIN_SECRET))
    if name == "quickstart":  # MLflow's database password, beside MLflow only (k8s/components/mlflow-postgres)
        expected.add((MLFLOW_NAMESPACE, "maskdit-mlflow-db"))
    assert found == expected
    for secret in secrets_of(docs):
        values = {**secret.get("data", {}), **secret.get("stringData", {})}
        assert values, f"{secret['metadata']['name']}: the template should list its keys"
        values.pop("AWS_ENDPOINT_URL", None) if name == "quickstart" else None
        assert all(v in ("", None) for v in values.values()), f"{secret['metadata']['name']} holds a value"


def test_env_files_with_values_are_ignored_by_git() -> None:
    for example in K8S.rglob("*.env.example"):
        assert "*.env" in (example.parent / ".gitignore").read_text().split(), f"{example.parent}/.gitignore"
    ignore = (K8S / "secrets" / ".gitignore").read_text().split()
    assert "*.env" in ignore
    kustomization = yaml.safe_load((K8S / "secrets" / "kustomization.yaml").read_text())
    for generator in kustomization["secretGenerator"]:
        for env in generator["envs"]:
            assert (K8S / "secrets" / f"{env}.example").exists(), f"{env}.example is missing"


def test_every_secret_and_configmap_reference_resolves(overlay) -> None:
    """In the pod's own namespace: a Secret in another namespace is no use to it."""
    for namespace in {d["metadata"].get("namespace") for d in overlay[1]} - {None}:
        docs = [d for d in overlay[1] if d["metadata"].get("namespace") == namespace]
        references_resolve(docs)


def references_resolve(docs: list[dict[str, Any]]) -> None:
    secret_keys = {d["metadata"]["name"]: set(d.get("data", {})) for d in secrets_of(docs)}
    config_keys = {d["metadata"]["name"]: set(d.get("data", {})) for d in docs if d["kind"] == "ConfigMap"}
    for name, template in pod_templates(docs):
        for container in containers(template["spec"]):
            for source in container.get("envFrom", []):
                for ref, known in (("secretRef", secret_keys), ("configMapRef", config_keys)):
                    if ref in source:
                        assert source[ref]["name"] in known, f"{name}: {ref} {source[ref]['name']} is defined nowhere"
            for env in container.get("env", []):
                source = env.get("valueFrom", {})
                for ref, known in (("secretKeyRef", secret_keys), ("configMapKeyRef", config_keys)):
                    if ref in source:
                        key_ref = source[ref]
                        assert key_ref["key"] in known.get(key_ref["name"], set()), (
                            f"{name}: {ref} {key_ref['name']}/{key_ref['key']} is defined nowhere")


# ------------------------------------------------------------------------------------------
# The pieces themselves
# ------------------------------------------------------------------------------------------

def by_kind_name(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: found {len(found)}"
    return found[0]


def arg_value(args: list[str], flag: str) -> str:
    for i, arg in enumerate(args):
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
        if arg == flag:
            return args[i + 1]
    raise AssertionError(f"{flag} is not among {args}")


def test_mlflow_allows_its_service_dns_names(overlay) -> None:
    docs = overlay[1]
    service = by_kind_name(docs, "Service", "mlflow")
    namespace, port = service["metadata"]["namespace"], service["spec"]["ports"][0]["port"]
    container = by_kind_name(docs, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]
    allowed = set(arg_value(container["command"] + container.get("args", []), "--allowed-hosts").split(","))
    for host in ("mlflow", f"mlflow.{namespace}", f"mlflow.{namespace}.svc", f"mlflow.{namespace}.svc.cluster.local"):
        assert {host, f"{host}:{port}"} <= allowed, f"--allowed-hosts lacks {host} / {host}:{port}"
    assert "*" not in allowed
    configmaps = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "maskdit-config"]
    assert len(configmaps) == 2, "one ConfigMap beside MLflow, one where the steps run"
    for configmap in configmaps:  # the steps reach MLflow across namespaces by its full name
        assert configmap["data"]["MLFLOW_TRACKING_URI"] == f"http://mlflow.{namespace}.svc.cluster.local:{port}"
        assert configmap["data"]["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    args = container.get("args", [])
    assert arg_value(args, "--artifacts-destination") == "$(MLFLOW_ARTIFACTS_DESTINATION)"
    if overlay[0] == "quickstart":  # on PostgreSQL: tests/test_k8s_postgres.py
        return
    assert arg_value(args, "--backend-store-uri").startswith("sqlite:////mlflow/")
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert "/mlflow" in mounts, "the sqlite store must live on the PVC"


def test_mlflow_requires_authentication(overlay) -> None:
    """Issue 16.2: the in-cluster MLflow ran with no authentication."""
    docs = overlay[1]
    spec = by_kind_name(docs, "Deployment", "mlflow")["spec"]["template"]["spec"]
    container = spec["containers"][0]
    assert arg_value(container["command"] + container.get("args", []), "--app-name") == "basic-auth"
    env = {e["name"]: e for e in container["env"]}
    for name in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert (ref["name"], ref["key"]) == (ADMIN_SECRET, name) and not ref.get("optional"), name
    admin_secret = by_kind_name(docs, "Secret", ADMIN_SECRET)
    assert set(admin_secret["data"]) == {"MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD",
                                         "MLFLOW_FLASK_SERVER_SECRET_KEY"}
    # the auth config comes from a ConfigMap, and the user store lives on the PVC with the runs
    config_path = Path(env["MLFLOW_AUTH_CONFIG_PATH"]["value"])
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(config_path.parent))
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    ini = by_kind_name(docs, "ConfigMap", volume["configMap"]["name"])["data"][config_path.name]
    parser = configparser.ConfigParser()
    parser.read_string(ini)
    assert parser["mlflow"]["database_uri"] == ("postgresql:///mlflow_auth" if overlay[0] == "quickstart" else
                                                "sqlite:////mlflow/basic_auth.db")
    assert "admin_password" not in parser["mlflow"], "the admin password belongs in the Secret"
    # the clients sign in as the pipeline's own account
    job = training_template(docs)["spec"]["containers"][0]
    refs = [s["secretRef"] for s in job["envFrom"] if "secretRef" in s]
    assert {"name": USER_SECRET} in refs, "training pods need MLflow's credentials (not optional)"


def secret_reads(spec: dict[str, Any]) -> dict[str, set[str]]:
    """{Secret name: the keys a pod spec reads from it ("*": all of them)}, from env, envFrom and volumes."""
    reads: dict[str, set[str]] = {}
    for container in containers(spec):
        for source in container.get("envFrom", []):
            if "secretRef" in source:
                reads.setdefault(source["secretRef"]["name"], set()).add("*")
        for env in container.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                reads.setdefault(ref["name"], set()).add(ref["key"])
    for volume in spec.get("volumes", []):
        for secret in [volume.get("secret", {})] + [s.get("secret", {}) for s in
                                                    volume.get("projected", {}).get("sources", [])]:
            if secret.get("secretName") or secret.get("name"):
                reads.setdefault(secret.get("secretName") or secret["name"], set()).add("*")
    return reads


def test_only_mlflow_holds_its_admin_and_the_pipeline_signs_in_as_its_own_user(overlay) -> None:
    """Issue 23.10: the training pods and the steps received MLflow's admin password and CSRF key."""
    name, docs = overlay
    step_namespace, _ = K8S_INSTALLS[name]
    assert {d["metadata"]["namespace"] for d in secrets_of(docs) if d["metadata"]["name"] == ADMIN_SECRET} == \
        {MLFLOW_NAMESPACE}, "MLflow's admin Secret must not exist where the steps run"
    placed = {(d["metadata"]["namespace"], d["metadata"]["name"]) for d in secrets_of(docs)}
    assert (step_namespace, USER_SECRET) in placed, "the steps need the pipeline's account where they run"
    for secret in secrets_of(docs):
        if secret["metadata"]["name"] == USER_SECRET:  # the pipeline's account: a name and a password, nothing else
            assert set(secret["data"]) == {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}
    readers = {}
    for pod, template in pod_templates(docs):
        reads = secret_reads(template["spec"])
        if ADMIN_SECRET in reads:
            readers[pod] = reads[ADMIN_SECRET]
        if pod.startswith(("PyTorchJob/", "ClusterTrainingRuntime/")):
            assert "*" in reads.get(USER_SECRET, set()), f"{pod}: no MLflow account"
    assert readers == {"Deployment/mlflow": {"MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD",
                                             "MLFLOW_FLASK_SERVER_SECRET_KEY"},
                       "Job/mlflow-pipeline-user": {"MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD"}}, \
        "only MLflow reads its admin Secret (and the Job that creates the pipeline's user, without the CSRF key)"
    assert USER_SECRET not in secret_reads(by_kind_name(docs, "Deployment", "mlflow")["spec"]["template"]["spec"])
    role = by_kind_name(docs, "Role", "maskdit-pipeline")
    named = {n for rule in role["rules"] for n in rule.get("resourceNames", [])}
    assert ADMIN_SECRET not in named and USER_SECRET in named


def test_the_pipelines_user_is_made_by_the_job_as_the_cli_defines_it(overlay) -> None:
    """The Job runs `maskdit mlflow-user ensure` with options the command has, signed in as the admin,
    for the user of the steps' Secret; exit 2 (a wrong Secret) fails it at once."""
    from typer.testing import CliRunner

    from maskdit.cli import app

    docs = overlay[1]
    job = by_kind_name(docs, "Job", "mlflow-pipeline-user")
    assert job["metadata"]["namespace"] == MLFLOW_NAMESPACE
    container = job["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert args[:2] == ["mlflow-user", "ensure"]
    help_text = CliRunner().invoke(app, [*args[:2], "--help"]).output
    for arg in args[2:]:
        assert arg.split("=", 1)[0] in help_text, f"{arg}: `maskdit mlflow-user ensure` has no such option"
    assert "--experiment=maskdit" in args and "--model=maskdit-xl2-imagenet256" in args  # the pipeline's defaults
    env = {e["name"]: e["valueFrom"] for e in container["env"] if "valueFrom" in e}
    assert env["MLFLOW_TRACKING_URI"]["configMapKeyRef"]["name"] == "maskdit-config"
    for key, secret in (("MLFLOW_AUTH_ADMIN_USERNAME", ADMIN_SECRET), ("MLFLOW_AUTH_ADMIN_PASSWORD", ADMIN_SECRET),
                        ("MLFLOW_TRACKING_USERNAME", USER_SECRET), ("MLFLOW_TRACKING_PASSWORD", USER_SECRET)):
        assert env[key]["secretKeyRef"] == {"name": secret, "key": key}, key
    rule = job["spec"]["podFailurePolicy"]["rules"][0]
    assert rule["action"] == "FailJob" and rule["onExitCodes"]["values"] == [2]
    assert job["spec"]["ttlSecondsAfterFinished"] > 0, "a finished Job must go, so that the next apply runs it again"


def matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions) against `labels`."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        if not {"In": key in labels and labels[key] in values, "NotIn": labels.get(key) not in values,
                "Exists": key in labels, "DoesNotExist": key not in labels}[operator]:
            return False
    return True


def admitted(policies: list[dict[str, Any]], target: dict[str, str], port: int, labels: dict[str, str],
             namespace: str, namespace_labels: dict[str, str] | None = None) -> bool:
    """Whether NetworkPolicies in `maskdit` let a pod (`labels`, in `namespace`) connect to `target`:`port`."""
    namespace_labels = {"kubernetes.io/metadata.name": namespace, **(namespace_labels or {})}
    selecting = [p for p in policies if "Ingress" in p["spec"]["policyTypes"]
                 and matches(p["spec"]["podSelector"], target)]
    if not selecting:
        return True  # a pod no policy selects is open to all
    for policy in selecting:
        for rule in policy["spec"].get("ingress", []):
            if rule.get("ports") and not any(p.get("port") == port for p in rule["ports"]):
                continue
            for peer in rule.get("from", []):
                in_namespace = (matches(peer["namespaceSelector"], namespace_labels) if "namespaceSelector" in peer
                                else namespace == policy["metadata"]["namespace"])
                if in_namespace and matches(peer.get("podSelector", {}), labels):
                    return True
    return False


def test_only_the_pipeline_and_the_ui_reach_mlflow(overlay) -> None:
    """Issue 16.2: nothing limited who reaches MLflow."""
    docs = overlay[1]
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    mlflow = by_kind_name(docs, "Deployment", "mlflow")["spec"]["template"]
    target = mlflow["metadata"]["labels"]
    port = mlflow["spec"]["containers"][0]["ports"][0]["containerPort"]
    assert not admitted(policies, target, port, {}, "maskdit"), "MLflow is open to every pod"
    job = training_template(docs)["metadata"]["labels"]
    pipeline = {"app.kubernetes.io/part-of": "maskdit"}  # the launcher's training pods; the pipeline's steps
    assert admitted(policies, target, port, job, "maskdit"), "the training pods cannot reach MLflow"
    assert admitted(policies, target, port, pipeline, "maskdit")
    # issue 23.1: the steps and their jobs run in the overlay's namespace (kubeflow, or the profile's)
    step_namespace, _ = K8S_INSTALLS[overlay[0]]
    assert admitted(policies, target, port, pipeline, step_namespace), f"{step_namespace}'s steps cannot reach MLflow"
    assert admitted(policies, target, port, job, step_namespace), f"{step_namespace}'s training pods cannot reach MLflow"
    for elsewhere in {ns for ns, _ in K8S_INSTALLS.values()} - {step_namespace}:
        assert not admitted(policies, target, port, pipeline, elsewhere), f"{elsewhere}, where nothing runs, is admitted"
    assert admitted(policies, target, port, {}, "ingress-nginx", {"maskdit.io/mlflow-ui": "allowed"})
    assert not admitted(policies, target, port, {}, "ingress-nginx")
    assert not admitted(policies, target, port, pipeline, "default"), "any namespace's pods may reach MLflow"
    assert not admitted(policies, target, port, {"app": "x"}, "kubeflow")
    assert not admitted(policies, target, port + 1, pipeline, "maskdit"), "a rule without ports"
    user_job = by_kind_name(docs, "Job", "mlflow-pipeline-user")["spec"]["template"]["metadata"]["labels"]
    assert admitted(policies, target, port, user_job, "maskdit"), "the Job that makes the pipeline's user is refused"
    for name, template in pod_templates(docs):  # e.g. the quickstart's SeaweedFS: no business with MLflow
        if name.startswith(("Deployment/mlflow", "PyTorchJob/", "ClusterTrainingRuntime/", "Job/mlflow-pipeline-user")):
            continue
        assert not admitted(policies, target, port, template["metadata"].get("labels", {}), "maskdit"), name


def test_the_runtime_follows_the_trainer_rules(overlay) -> None:
    """Trainer v2 installs: the torch policy, the trainer container `node`, the exit-code mapping
    (tests/test_trainjob.py checks it rule by rule), the GPU nodes, the SIGTERM grace."""
    name, docs = overlay
    if K8S_TRAINERS[name] != "trainer-v2":
        pytest.skip(f"{name} runs PyTorchJobs")
    runtime = runtimes(docs)[0]
    assert runtime["spec"]["mlPolicy"]["torch"] == {}
    job = runtime["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]
    assert job["metadata"]["labels"]["trainer.kubeflow.org/trainjob-ancestor-step"] == "trainer"
    assert job["spec"]["podFailurePolicy"]["rules"][1]["onExitCodes"]["values"] == [137, 143]
    template = job["spec"]["template"]
    assert template["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"
    spec = template["spec"]
    assert spec["containers"][0]["name"] == "node" and spec["terminationGracePeriodSeconds"] >= 30
    assert spec["nodeSelector"]["nvidia.com/gpu.product"].startswith("NVIDIA-A100")
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]


def test_pytorchjob_follows_the_training_operator_rules(overlay) -> None:
    name, docs = overlay
    if K8S_TRAINERS[name] != "training-operator":
        pytest.skip(f"{name} runs TrainJobs")
    job = pytorchjobs(docs)[0]
    assert job["spec"]["nprocPerNode"] == "8"
    assert job["spec"]["runPolicy"]["cleanPodPolicy"] in ("Running", "All")
    assert job["spec"]["runPolicy"]["suspend"] is True, "the example must not start training when applied"
    master = job["spec"]["pytorchReplicaSpecs"]["Master"]
    # user errors (exit 2) never restart; preemption (143) does: maskdit.elastic maps torchrun's codes
    assert master["replicas"] == 1 and master["restartPolicy"] == "ExitCode"
    template = master["template"]
    assert template["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"
    spec = template["spec"]
    container = spec["containers"][0]
    assert container["name"] == "pytorch"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    shm = {v["name"]: v for v in spec["volumes"]}
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm")
    assert shm[mount["name"]]["emptyDir"]["medium"] == "Memory"
    command = container["command"] + container["args"]
    assert command[:4] == ["python", "-m", "maskdit.elastic", "--no-python"] and command[4:6] == ["maskdit", "train"]
    assert spec["terminationGracePeriodSeconds"] >= 30
    config = Path(arg_value(command, "--config"))
    assert config.parent == Path("/opt/maskdit/configs"), "the image keeps the presets at /opt/maskdit/configs"
    presets = ROOT / "maskdit" / "configs"
    if presets.exists():
        assert (presets / config.name).exists(), f"{config.name} is not a preset in maskdit/configs"
    # every install sends training to the A100 80 GB nodes (k8s/components/gpu)
    assert spec["nodeSelector"]["nvidia.com/gpu.product"].startswith("NVIDIA-A100")
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]


def test_quickstart_brings_its_object_store(k8s_built) -> None:
    """The quickstart's SeaweedFS address reaches every pod through the Secret maskdit-s3, in both
    namespaces (the pipeline's steps read it there too); the other installs use the cluster's store."""
    docs = k8s_built["quickstart"]
    service = by_kind_name(docs, "Service", "seaweedfs")
    endpoint = f"http://seaweedfs.{service['metadata']['namespace']}.svc.cluster.local:{service['spec']['ports'][0]['port']}"
    store = by_kind_name(docs, "Deployment", "seaweedfs")["spec"]["template"]["spec"]["containers"][0]
    assert {e["name"] for e in store["env"]} >= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    s3 = [d for d in secrets_of(docs) if d["metadata"]["name"] == "maskdit-s3"]
    assert len(s3) == 2
    for secret in s3:
        assert base64.b64decode(secret["data"]["AWS_ENDPOINT_URL"]).decode() == endpoint, secret["metadata"]
    mlflow_env = by_kind_name(docs, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "MLFLOW_S3_ENDPOINT_URL", "valueFrom": {"secretKeyRef": {
        "name": "maskdit-s3", "key": "AWS_ENDPOINT_URL", "optional": True}}} in mlflow_env
    for name in set(OVERLAYS) - {"quickstart"}:
        assert not [d for d in k8s_built[name] if d["metadata"]["name"] == "seaweedfs"], name


def test_the_operators_docs_name_real_paths() -> None:
    """Every k8s/ or docker/ path the install docs name exists, and each folder they apply builds."""
    docs = [p for p in (ROOT / "README.md", ROOT / "docs" / "operating.md") if p.exists()]
    named = {m for doc in docs for m in re.findall(r"\b((?:k8s|docker)/[\w./-]*\w)", doc.read_text())}
    assert named, "the install docs name no k8s/ or docker/ path"
    for path in sorted(named):
        target = ROOT / path
        if path.endswith(".env"):  # the files the operator creates from the templates
            target = ROOT / f"{path}.example"
        assert target.exists(), f"the docs name {path}, which does not exist"
    applied = {m for doc in docs for m in re.findall(r"apply -k (k8s/[\w/-]+)", doc.read_text())}
    assert {f"k8s/overlays/{name}" for name in OVERLAYS} <= applied


def test_a_profile_namespace_is_set_in_one_place(tmp_path) -> None:
    """Changing the profile's namespace in kubeflow-profile/steps/kustomization.yaml moves the
    Secrets, ConfigMap, Role, binding and its subject with it."""
    tree = copy_k8s(tmp_path)
    kustomization = tree / "overlays" / "kubeflow-profile" / "steps" / "kustomization.yaml"
    text = kustomization.read_text()
    assert "namespace: kubeflow-user-example-com" in text
    kustomization.write_text(text.replace("namespace: kubeflow-user-example-com", "namespace: team-a"))
    docs = kustomize_build(tree / "overlays" / "kubeflow-profile")
    assert {d["metadata"].get("namespace") for d in docs
            if d["kind"] not in ("Namespace", "ClusterTrainingRuntime")} == {"team-a", MLFLOW_NAMESPACE}
    binding = by_kind_name(docs, "RoleBinding", "maskdit-pipeline")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "default-editor", "namespace": "team-a"}]
    # issue 23.1: MLflow's NetworkPolicy admits the renamed namespace's pipeline pods, and no longer the old one
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    mlflow = by_kind_name(docs, "Deployment", "mlflow")["spec"]["template"]
    target, port = mlflow["metadata"]["labels"], mlflow["spec"]["containers"][0]["ports"][0]["containerPort"]
    pipeline = {"app.kubernetes.io/part-of": "maskdit"}
    assert admitted(policies, target, port, pipeline, "team-a")
    assert not admitted(policies, target, port, pipeline, "kubeflow-user-example-com")
    assert not admitted(policies, target, port, pipeline, "kubeflow")


@pytest.mark.parametrize("endpoint", ["", "http://minio.storage.svc:9000"], ids=["aws", "s3-compatible"])
def test_mlflow_gets_no_empty_s3_endpoint(overlay, endpoint: str) -> None:
    """Issue 23.3: s3.env's AWS_ENDPOINT_URL= left empty (AWS S3 itself) reached MLflow as
    MLFLOW_S3_ENDPOINT_URL="", which its S3 artifact store rejects ("Invalid endpoint"). The server's
    command unsets an empty one and passes a set one on: run it here with `env` in place of the server."""
    container = by_kind_name(overlay[1], "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][:2] == ["mlflow", "server"], "the command runs its arguments"
    base = {"PATH": "/usr/bin:/bin", "MLFLOW_S3_ENDPOINT_URL": endpoint, "AWS_ENDPOINT_URL": endpoint}
    proc = subprocess.run([*container["command"], "env"], env=base, capture_output=True, text=True, timeout=10)
    assert proc.returncode == 0, proc.stderr
    seen = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    for name in ("MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL"):
        if endpoint:
            assert seen.get(name) == endpoint, name
        else:
            assert name not in seen, f"{name} reaches the server empty"


def test_large_artifacts_bypass_the_mlflow_servers_tmp(overlay) -> None:
    """Issue 23.4: every pod of the pipeline transfers large artifacts through presigned multipart URLs, and
    the server's /tmp still holds the XL/2 model (2.9 GB) twice for the transfers that do pass it (the UI)."""
    docs = overlay[1]
    for configmap in (d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "maskdit-config"):
        assert configmap["data"]["MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD"] == "true"
        assert configmap["data"]["MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD"] == "true"
    spec = by_kind_name(docs, "Deployment", "mlflow")["spec"]["template"]["spec"]
    tmp = next(m for m in spec["containers"][0]["volumeMounts"] if m["mountPath"] == "/tmp")
    volume = next(v for v in spec["volumes"] if v["name"] == tmp["name"])
    limit = volume["emptyDir"]["sizeLimit"]
    assert limit.endswith("Gi") and int(limit[:-2]) * 2**30 >= 2 * 2.9e9, limit
