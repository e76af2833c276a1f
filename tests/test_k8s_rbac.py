"""RBAC evaluated, not just present.

First the authorizer itself (tests/fixtures/k8s_rbac.py) against the rules of Kubernetes' RBAC
authorizer; then each overlay of k8s/ applied to the stand-in API server (k8s_api.py) as
`kubectl apply` creates it, and the step pods' service account asks, through the server's
authentication and authorization, for what the steps do: read the Secrets and the ConfigMap,
run a TrainJob or PyTorchJob (the one its overlay's Trainer serves) with the real launcher, read
its pods and logs - allowed where the steps run, refused in any other namespace and to any other
account, and nothing the launcher does not call (no watch, no events).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from fixtures.k8s_api import K8sApiServer
from fixtures.k8s_manifests import K8S_INSTALLS, K8S_TRAINERS
from fixtures.k8s_rbac import (
    SSAR_PATH,
    Access,
    RBACAuthorizer,
    User,
    apply_objects,
    collection_path,
    request_info,
    service_account,
)

from components.launcher import LaunchError, delete_run_jobs, launch_kubernetes, training_client
from components.pytorchjob import TrainJob

RBAC_V1 = "rbac.authorization.k8s.io/v1"


def role(name: str, rules: list[dict], namespace: str | None = None) -> dict:
    meta = {"name": name, **({"namespace": namespace} if namespace else {})}
    return {"apiVersion": RBAC_V1, "kind": "Role" if namespace else "ClusterRole", "metadata": meta, "rules": rules}


def binding(name: str, ref_kind: str, ref_name: str, subjects: list[dict], namespace: str | None = None) -> dict:
    meta = {"name": name, **({"namespace": namespace} if namespace else {})}
    return {"apiVersion": RBAC_V1, "kind": "RoleBinding" if namespace else "ClusterRoleBinding", "metadata": meta,
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": ref_kind, "name": ref_name},
            "subjects": subjects}


def authorizer(*objects: dict) -> RBACAuthorizer:
    rbac = RBACAuthorizer()
    for obj in objects:
        assert rbac.add(obj)
    return rbac


JOBS = {"apiGroups": ["kubeflow.org"], "resources": ["pytorchjobs"], "verbs": ["create", "get"]}
RUNNER = service_account("kubeflow", "pipeline-runner")


# ------------------------------------------------------------------------------------------
# The authorizer
# ------------------------------------------------------------------------------------------

def test_a_role_binding_grants_its_role_only_in_its_namespace() -> None:
    rbac = authorizer(role("jobs", [JOBS], "kubeflow"),
                      binding("b", "Role", "jobs", [{"kind": "ServiceAccount", "name": "pipeline-runner",
                                                     "namespace": "kubeflow"}], "kubeflow"))
    assert rbac.allowed(RUNNER, "create", "pytorchjobs", "kubeflow", "kubeflow.org")
    assert not rbac.allowed(RUNNER, "create", "pytorchjobs", "maskdit", "kubeflow.org")
    assert not rbac.allowed(RUNNER, "create", "pytorchjobs", "", "kubeflow.org"), "not cluster-wide"
    assert not rbac.allowed(RUNNER, "delete", "pytorchjobs", "kubeflow", "kubeflow.org"), "verb not granted"
    assert not rbac.allowed(RUNNER, "create", "pytorchjobs", "kubeflow", ""), "wrong API group"
    assert not rbac.allowed(service_account("kubeflow", "default"), "get", "pytorchjobs", "kubeflow", "kubeflow.org")
    assert not rbac.allowed(service_account("other", "pipeline-runner"), "get", "pytorchjobs", "kubeflow",
                            "kubeflow.org"), "same name, other namespace: another account"


def test_a_role_binding_refers_to_a_role_in_its_own_namespace() -> None:
    rbac = authorizer(role("jobs", [JOBS], "maskdit"),
                      binding("b", "Role", "jobs", [{"kind": "ServiceAccount", "name": "pipeline-runner",
                                                     "namespace": "kubeflow"}], "kubeflow"))
    assert not rbac.allowed(RUNNER, "get", "pytorchjobs", "kubeflow", "kubeflow.org")
    assert not rbac.allowed(RUNNER, "get", "pytorchjobs", "maskdit", "kubeflow.org")


def test_a_cluster_role_through_a_role_binding_is_scoped_to_the_binding() -> None:
    group = {"kind": "Group", "name": "system:serviceaccounts:kubeflow"}
    rbac = authorizer(role("jobs", [JOBS]), binding("b", "ClusterRole", "jobs", [group], "kubeflow"))
    assert rbac.allowed(RUNNER, "get", "pytorchjobs", "kubeflow", "kubeflow.org")
    assert not rbac.allowed(RUNNER, "get", "pytorchjobs", "maskdit", "kubeflow.org")
    assert not rbac.allowed(service_account("maskdit", "x"), "get", "pytorchjobs", "kubeflow", "kubeflow.org")
    every_account = {"kind": "Group", "name": "system:serviceaccounts"}
    cluster_wide = authorizer(role("jobs", [JOBS]), binding("c", "ClusterRole", "jobs", [every_account]))
    assert cluster_wide.allowed(service_account("maskdit", "x"), "get", "pytorchjobs", "anywhere", "kubeflow.org")
    assert not cluster_wide.allowed(User("alice", ("system:authenticated",)), "get", "pytorchjobs", "a", "kubeflow.org")


def test_subjects_users_and_a_service_account_without_namespace() -> None:
    rbac = authorizer(role("jobs", [JOBS], "kubeflow"),
                      binding("b", "Role", "jobs", [{"kind": "User", "name": "alice"},
                                                    {"kind": "ServiceAccount", "name": "pipeline-runner"}], "kubeflow"))
    assert rbac.allowed(User("alice"), "get", "pytorchjobs", "kubeflow", "kubeflow.org")
    assert not rbac.allowed(User("bob", ("alice",)), "get", "pytorchjobs", "kubeflow", "kubeflow.org")
    assert rbac.allowed(RUNNER, "get", "pytorchjobs", "kubeflow", "kubeflow.org"), "defaults to the binding's namespace"


def test_subresources_wildcards_and_resource_names() -> None:
    rules = [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]},
             {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["maskdit-s3"], "verbs": ["get", "create"]},
             {"apiGroups": ["*"], "resources": ["*/status"], "verbs": ["*"]}]
    rbac = authorizer(role("r", rules, "ns"), binding("b", "Role", "r", [{"kind": "User", "name": "u"}], "ns"))
    user = User("u")
    assert rbac.allowed(user, "get", "pods", "ns")
    assert not rbac.allowed(user, "get", "pods/log", "ns"), "pods does not cover its subresources"
    assert rbac.allowed(user, "patch", "deployments/status", "ns", "apps"), "*/status, any group, any verb"
    assert not rbac.allowed(user, "patch", "deployments", "ns", "apps")
    assert rbac.allowed(user, "get", "secrets", "ns", name="maskdit-s3")
    assert not rbac.allowed(user, "get", "secrets", "ns", name="other")
    assert not rbac.allowed(user, "list", "secrets", "ns"), "resourceNames never allow a list"
    assert not rbac.allowed(user, "create", "secrets", "ns"), "nor a create (no name yet)"
    everything = authorizer(role("all", [{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}], "ns"),
                            binding("b", "Role", "all", [{"kind": "User", "name": "u"}], "ns"))
    assert everything.allowed(user, "get", "pods/log", "ns") and everything.allowed(user, "delete", "x", "ns", "y.io")
    assert not everything.allowed(user, "get", "pods", "other")


def test_non_resource_urls_and_the_masters_group() -> None:
    rbac = authorizer(role("health", [{"nonResourceURLs": ["/healthz", "/metrics/*"], "verbs": ["get"]}]),
                      binding("b", "ClusterRole", "health", [{"kind": "Group", "name": "system:authenticated"}]))
    user = User("u", ("system:authenticated",))
    assert rbac.authorize(user, request_info("GET", "/healthz"))[0]
    assert rbac.authorize(user, request_info("GET", "/metrics/cadvisor"))[0]
    assert not rbac.authorize(user, request_info("GET", "/version"))[0]
    assert rbac.allowed(User("admin", ("system:masters",)), "delete", "namespaces", name="kube-system")
    assert not RBACAuthorizer().allowed(RUNNER, "get", "pods", "kubeflow"), "nothing is allowed by default"


JOBS_PATH = "/apis/kubeflow.org/v1/namespaces/ns/pytorchjobs"


@pytest.mark.parametrize("method,path,query,expected", [
    ("GET", "/api/v1/namespaces/ns/pods", {}, ("list", "ns", "", "pods", "", "")),
    ("GET", "/api/v1/namespaces/ns/pods", {"watch": "true"}, ("watch", "ns", "", "pods", "", "")),
    ("GET", "/api/v1/namespaces/ns/pods/p-0/log", {"follow": "true"}, ("get", "ns", "", "pods", "log", "p-0")),
    ("POST", JOBS_PATH, {}, ("create", "ns", "kubeflow.org", "pytorchjobs", "", "")),
    ("DELETE", JOBS_PATH + "/j", {}, ("delete", "ns", "kubeflow.org", "pytorchjobs", "", "j")),
    ("DELETE", JOBS_PATH, {}, ("deletecollection", "ns", "kubeflow.org", "pytorchjobs", "", "")),
    ("PATCH", JOBS_PATH + "/j", {}, ("patch", "ns", "kubeflow.org", "pytorchjobs", "", "j")),
    ("GET", "/api/v1/namespaces/ns", {}, ("get", "ns", "", "namespaces", "", "ns")),
    ("GET", "/api/v1/events", {}, ("list", "", "", "events", "", "")),
    ("GET", "/api/v1/watch/namespaces/ns/events", {}, ("watch", "ns", "", "events", "", "")),
])
def test_request_attributes_from_the_rest_path(method, path, query, expected) -> None:
    r = request_info(method, path, query)
    assert (r.verb, r.namespace, r.api_group, r.resource, r.subresource, r.name) == expected


# ------------------------------------------------------------------------------------------
# The overlays, applied and asked
# ------------------------------------------------------------------------------------------

def call(server: K8sApiServer, token: str, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(server.host + path, data=data, method=method,
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def can_i(server: K8sApiServer, token: str, verb: str, resource: str, namespace: str, group: str = "",
          name: str = "") -> bool:
    """`kubectl auth can-i` as the token's user: a SelfSubjectAccessReview."""
    resource, _, subresource = resource.partition("/")
    attrs = {"verb": verb, "resource": resource, "subresource": subresource, "namespace": namespace,
             "group": group, "name": name}
    code, review = call(server, token, "POST", SSAR_PATH, {
        "apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
        "spec": {"resourceAttributes": attrs}})
    assert code == 201, review
    return review["status"]["allowed"]


@pytest.fixture(params=sorted(K8S_INSTALLS))
def installed(request, k8s_built):
    """(server, access, install name): the stand-in with the overlay applied by an admin."""
    access = Access()
    kind = "trainjob" if K8S_TRAINERS[request.param] == "trainer-v2" else "pytorchjob"
    server = K8sApiServer(access=access, kinds=(kind,), runtimes=()).start()  # the overlay brings the runtime
    try:
        created = apply_objects(server.host, access.admin_token, k8s_built[request.param])
        assert any(c.startswith("RoleBinding/") for c in created)
        yield server, access, request.param
    finally:
        server.stop()


def test_the_step_account_reads_the_secrets_and_the_configmap_where_it_runs(installed) -> None:
    server, access, name = installed
    namespace, account = K8S_INSTALLS[name]
    token = access.token_for(service_account(namespace, account))
    for path in (f"/api/v1/namespaces/{namespace}/secrets/maskdit-s3",
                 f"/api/v1/namespaces/{namespace}/secrets/maskdit-mlflow",
                 f"/api/v1/namespaces/{namespace}/configmaps/maskdit-config"):
        code, body = call(server, token, "GET", path)
        assert code == 200 and body["metadata"]["namespace"] == namespace, (path, body)
    for other in ("maskdit", "default", "kube-system"):  # the Secrets exist in maskdit too: still not its own
        code, body = call(server, token, "GET", f"/api/v1/namespaces/{other}/secrets/maskdit-s3")
        assert code == 403 and body["reason"] == "Forbidden", body
        assert f'User "system:serviceaccount:{namespace}:{account}" cannot get resource "secrets"' in body["message"]
    code, _ = call(server, token, "GET", f"/api/v1/namespaces/{namespace}/secrets")
    assert code == 403, "no list of the namespace's Secrets"
    stranger = access.token_for(service_account(namespace, "default"))
    assert call(server, stranger, "GET", f"/api/v1/namespaces/{namespace}/secrets/maskdit-s3")[0] == 403
    assert call(server, "not-a-token", "GET", f"/api/v1/namespaces/{namespace}/configmaps/maskdit-config")[0] == 401


@pytest.mark.parametrize("resource,group", [("trainjobs", "trainer.kubeflow.org"), ("pytorchjobs", "kubeflow.org")])
def test_the_step_account_runs_training_jobs_only_where_it_runs(installed, resource, group) -> None:
    server, access, name = installed
    namespace, account = K8S_INSTALLS[name]
    token = access.token_for(service_account(namespace, account))
    for verb in ("create", "get", "list", "delete", "patch"):
        assert can_i(server, token, verb, resource, namespace, group), verb
        assert not can_i(server, token, verb, resource, "maskdit", group), verb
    assert not can_i(server, token, "watch", resource, namespace, group), "the launcher polls: no watch"
    assert not can_i(server, token, "create", "clustertrainingruntimes", "", "trainer.kubeflow.org")
    # get pods: on SIGTERM the launcher reads its own pod (a drain's DisruptionTarget keeps the job: launch_drain.py)
    for verb, resource_ in (("list", "pods"), ("get", "pods"), ("get", "pods/log")):
        assert can_i(server, token, verb, resource_, namespace), (verb, resource_)
        assert not can_i(server, token, verb, resource_, "default"), (verb, resource_)
    for verb, resource_ in (("watch", "pods"), ("list", "events"), ("watch", "events")):
        assert not can_i(server, token, verb, resource_, namespace), f"{verb} {resource_}: never called"
    for verb, other in (("create", "pods"), ("delete", "pods"), ("create", "pods/exec"), ("list", "secrets"),
                        ("create", "secrets"), ("update", "configmaps"), ("create", "rolebindings")):
        other_group = "rbac.authorization.k8s.io" if other == "rolebindings" else ""
        assert not can_i(server, token, verb, other, namespace, other_group), (verb, other)
    assert not can_i(server, token, "create", "pytorchjobs", "", "kubeflow.org"), "nothing cluster-wide"
    assert not can_i(server, token, "create", "trainjobs", "", "trainer.kubeflow.org"), "nothing cluster-wide"


def _job(run_id: str, checkpoints: Path) -> TrainJob:
    return TrainJob(step="pretrain", run_id=run_id, image="registry.example.com/ml/maskdit:0.1.0",
                    command=["maskdit", "train", "--config", "imagenet256_pretrain"],
                    checkpoint_uri=str(checkpoints / run_id),
                    secrets=["maskdit-s3", "maskdit-mlflow"], config_maps=["maskdit-config"])


def test_the_launcher_runs_a_job_as_the_step_account(installed, tmp_path) -> None:
    """The launcher's real calls (create, watch the job, find the master pod, stream and tail its
    log, delete the run's jobs) succeed with the step pods' token where they run, and the first
    of them is refused with the API server's 403 anywhere else."""
    server, access, name = installed
    namespace, account = K8S_INSTALLS[name]
    token = access.token_for(service_account(namespace, account))
    api = training_client(namespace=namespace, configuration=server.configuration(token))
    launched = launch_kubernetes(_job("run-a", tmp_path), api, namespace, timeout_s=10.0, poll_s=0.05)
    assert "step 2 loss 0.5" in launched.tail
    plural, group = ("trainjobs", "trainer.kubeflow.org") if K8S_TRAINERS[name] == "trainer-v2" else \
        ("pytorchjobs", "kubeflow.org")
    assert server.jobs[(namespace, _job("run-a", tmp_path).name)]["kind"] == \
        ("TrainJob" if plural == "trainjobs" else "PyTorchJob")
    decisions = [(r.verb, r.resource, r.subresource) for user, r, ok in access.decisions
                 if user == service_account(namespace, account).name]
    assert {("create", plural, ""), ("get", plural, ""), ("list", "pods", ""),
            ("get", "pods", "log")} <= set(decisions), decisions
    assert all(ok for user, _, ok in access.decisions if user == service_account(namespace, account).name), \
        "the Role grants every call the launcher makes"
    assert delete_run_jobs("run-a", api, namespace) == [_job("run-a", tmp_path).name]

    elsewhere = training_client(namespace="maskdit", configuration=server.configuration(token))
    with pytest.raises(LaunchError, match=rf"HTTP 403 Forbidden: {plural}.{group} is forbidden"):
        launch_kubernetes(_job("run-b", tmp_path), elsewhere, "maskdit", timeout_s=5.0, poll_s=0.05)
    assert not [key for key in server.jobs if key[0] == "maskdit"]


def test_apply_posts_to_the_right_collections() -> None:
    assert collection_path({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "m"}}) == "/api/v1/namespaces"
    assert collection_path({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                            "metadata": {"name": "x", "namespace": "m"}}) == \
        "/apis/networking.k8s.io/v1/namespaces/m/networkpolicies"
    assert collection_path({"apiVersion": RBAC_V1, "kind": "ClusterRoleBinding", "metadata": {"name": "x"}}) == \
        "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings"
    with pytest.raises(ValueError, match="no namespace"):
        collection_path({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "x"}})


def test_tokens_decide_who_asks() -> None:
    """No token is system:anonymous (refused here), a wrong one 401; an admin (system:masters)
    may create anything, and what it creates is stored and readable."""
    access = Access()
    server = K8sApiServer(access=access).start()
    try:
        review = {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
                  "spec": {"resourceAttributes": {"verb": "get", "resource": "pods", "namespace": "x"}}}
        anonymous = urllib.request.Request(server.host + SSAR_PATH, data=json.dumps(review).encode(), method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(anonymous, timeout=10)
        assert refused.value.code == 403
        assert call(server, "wrong", "GET", "/api/v1/namespaces/x/pods")[0] == 401
        config = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": "x"}, "data": {}}
        assert call(server, access.admin_token, "POST", "/api/v1/namespaces/x/configmaps", config)[0] == 201
        assert call(server, access.admin_token, "POST", "/api/v1/namespaces/x/configmaps", config)[0] == 409
        assert call(server, access.admin_token, "POST", "/api/v1/namespaces/y/configmaps", config)[0] == 400
        assert call(server, access.admin_token, "GET", "/api/v1/namespaces/x/configmaps/c")[1]["metadata"]["name"] == "c"
        assert can_i(server, access.admin_token, "delete", "nodes", "")
    finally:
        server.stop()
