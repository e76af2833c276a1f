"""Compiling for a KFP backend version: the YAML for each supported version uses only fields that
version's protos know (pipelines/kfp_backend.py), and `maskdit-pipeline submit|schedule` send
the namespace and service account that the k8s/ overlays prepare."""

from __future__ import annotations

import difflib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml
from kfp.kubernetes import kubernetes_executor_config_pb2 as k8s_pb2
from kfp.pipeline_spec import pipeline_spec_pb2
from typer.testing import CliRunner

from maskdit.core.errors import EXIT_USER_ERROR
from pipelines.cli import pipeline_app
from pipelines.kfp_backend import NEWEST_BACKEND, SUPPORTED_BACKENDS, known_fields, unknown_fields
from pipelines.maskdit_pipeline import PIPELINE_YAML


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[str, str]:
    """`maskdit-pipeline compile --kfp-backend V` for every supported V: version -> YAML text."""
    out = {}
    for version in SUPPORTED_BACKENDS:
        path = tmp_path_factory.mktemp("kfp") / f"pipeline-{version}.yaml"
        result = CliRunner().invoke(pipeline_app, ["compile", "--out", str(path), "--kfp-backend", version])
        assert result.exit_code == 0, result.output
        out[version] = path.read_text()
    return out


def docs(text: str) -> tuple[dict, dict]:
    spec, platform = yaml.safe_load_all(text)
    return spec, platform


def env_sources(platform: dict):
    for config in platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"].values():
        yield from config.get("secretAsEnv", []) + config.get("configMapAsEnv", [])


@pytest.mark.parametrize("version", SUPPORTED_BACKENDS)
def test_each_version_gets_only_fields_it_knows(compiled, version) -> None:
    spec, platform = docs(compiled[version])
    assert unknown_fields(spec, platform, version) == []
    with_optional = [e for e in env_sources(platform) if "optional" in e]
    if version == "2.14":
        assert not with_optional, "a backend before 2.15 rejects `optional` on secret/ConfigMap env"
    else:
        # AWS_ENDPOINT_URL (absent for AWS S3 itself); the MLflow account is required (MLflow asks for it)
        assert any(e["optional"] is True and e["secretName"] == "maskdit-s3" for e in with_optional)
        assert not any(e.get("secretName") == "maskdit-mlflow" and e["optional"] for e in with_optional)


def test_the_newest_needs_no_rewrite_and_older_ones_lose_only_optional(compiled) -> None:
    assert NEWEST_BACKEND == SUPPORTED_BACKENDS[-1] and compiled[NEWEST_BACKEND] == PIPELINE_YAML.read_text(), (
        "the committed YAML is the default compile (the newest backend)")
    security = ("securityContext:", "runAsGroup: '10001'", "runAsNonRoot: true", "runAsUser: '10001'")  # int64: JSON text
    for older, dropped in (("2.16", ()), ("2.15", security), ("2.14", ("optional: true", "optional: false",
                                                                          *security))):
        diff = [line for line in difflib.unified_diff(compiled[NEWEST_BACKEND].splitlines(),
                                                      compiled[older].splitlines(), lineterm="", n=0)
                if not line.startswith(("---", "+++", "@@"))]
        # an executor whose only Kubernetes setting was its security context loses its `exec-<task>:` key too
        assert all(line[0] == "-" and (line[1:].strip() in dropped or (security[0] in dropped and re.fullmatch(
            r"exec-[a-z0-9-]+:", line[1:].strip()))) for line in diff), (older, diff[:5])
        assert bool(diff) == bool(dropped), older


def test_step_pods_run_as_non_root(compiled) -> None:
    """Issue 23.9: a namespace that enforces runAsNonRoot rejected the step pods. Every step runs as the image's
    user (kfp-kubernetes set_security_context), for backends that know the field (2.16+)."""
    from components.pytorchjob import IMAGE_UID

    for version in SUPPORTED_BACKENDS:
        _, platform = docs(compiled[version])
        executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
        spec, _ = docs(compiled[version])
        if version >= "2.16":  # (before, a step whose only setting is its security context has none)
            assert set(executors) == set(spec["deploymentSpec"]["executors"]), "every step has a Kubernetes config"
        for name, config in executors.items():
            if version >= "2.16":
                context = config["securityContext"]  # int64 fields are JSON strings (protojson)
                assert context["runAsNonRoot"] is True, (version, name)
                assert int(context["runAsUser"]) == int(context["runAsGroup"]) == IMAGE_UID, (version, name)
            else:
                assert "securityContext" not in config, (version, name)


def test_the_check_names_what_an_older_backend_rejects(compiled) -> None:
    spec, platform = docs(compiled[NEWEST_BACKEND])
    rejected = unknown_fields(spec, platform, "2.14")
    assert rejected and all(path.endswith(("secretAsEnv.optional", "configMapAsEnv.optional", ".securityContext"))
                            for path in rejected)
    assert any(p.endswith(".securityContext") for p in unknown_fields(spec, platform, "2.15"))
    assert unknown_fields(spec, platform, "2.16") == []
    spec["root"]["dag"]["tasks"]["cleanup"]["taskInfo"]["nme"] = "x"
    assert "pipelineSpec.root.dag.tasks.cleanup.taskInfo.nme" in unknown_fields(spec, platform, NEWEST_BACKEND)


def test_the_newest_table_matches_the_installed_sdks_protos() -> None:
    """The transcribed field sets of the newest backend are those of the protos the SDK here
    compiles with (kfp-pipeline-spec, kfp-kubernetes 2.17): a typo or a missed field fails."""
    files = {"pipeline": pipeline_spec_pb2.DESCRIPTOR, "kubernetes": k8s_pb2.DESCRIPTOR}
    for message, fields in known_fields(NEWEST_BACKEND).items():
        descriptor = None
        for file in files.values():
            try:
                descriptor = file.pool.FindMessageTypeByName(f"{file.package}.{message}")
                break
            except KeyError:
                continue
        assert descriptor is not None, f"{message} is in no installed proto"
        assert set(fields) == {f.json_name for f in descriptor.fields}, message


def test_an_unsupported_backend_is_refused(tmp_path) -> None:
    result = CliRunner().invoke(pipeline_app, ["compile", "--out", str(tmp_path / "p.yaml"), "--kfp-backend", "2.5"])
    assert result.exit_code == EXIT_USER_ERROR and "2.14" in result.output and not (tmp_path / "p.yaml").exists()


# ------------------------------------------------------------------------------------------
# submit / schedule: namespace and service account reach KFP's API (v2beta1)
# ------------------------------------------------------------------------------------------

class KfpApi:
    """KFP's REST API (v2beta1) as far as kfp.Client's run and recurring-run calls use it: it
    records each request and answers what the real API server returns."""

    def __init__(self, token: str | None = None):
        self.requests: list[tuple[str, str, dict]] = []
        self.authorizations: list[str | None] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0) or 0)) or b"{}")
                api.authorizations.append(self.headers.get("Authorization"))
                if token is not None and self.headers.get("Authorization") != f"Bearer {token}":
                    # what Kubeflow's Istio ingress (oauth2-proxy / the AuthorizationPolicy) answers
                    self.send_response(401, "Unauthorized")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                api.requests.append((self.command, self.path.split("?")[0], body))
                path = self.path.split("?")[0]
                answers = {
                    ("GET", "/apis/v2beta1/healthz"): {"multi_user": True},
                    ("GET", "/apis/v2beta1/experiments"): {"experiments": []},
                    ("POST", "/apis/v2beta1/experiments"): {"experiment_id": "e-1", **body},
                    ("POST", "/apis/v2beta1/runs"): {"run_id": "r-1", **body},
                    ("POST", "/apis/v2beta1/recurringruns"): {"recurring_run_id": "rr-1", **body},
                }
                answer = answers.get((self.command, path))
                data = json.dumps(answer if answer is not None else {"error": "not found"}).encode()
                self.send_response(200 if answer is not None else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _answer

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def posted(self, path: str) -> dict:
        (body,) = [b for method, p, b in self.requests if method == "POST" and p == path]
        return body


@pytest.fixture
def kfp_api():
    api = KfpApi()
    yield api
    api.httpd.shutdown()
    api.httpd.server_close()


def test_submit_sends_the_profile_namespace_and_service_account(kfp_api) -> None:
    result = CliRunner().invoke(pipeline_app, [
        "submit", "--host", kfp_api.host, "--namespace", "kubeflow-user-example-com",
        "--service-account", "default-editor", "--run-name", "try-1", "-p", "fid_threshold=10.0"])
    assert result.exit_code == 0, result.output
    assert kfp_api.posted("/apis/v2beta1/experiments") == {"display_name": "maskdit",
                                                           "namespace": "kubeflow-user-example-com"}
    run = kfp_api.posted("/apis/v2beta1/runs")
    assert run["service_account"] == "default-editor" and run["experiment_id"] == "e-1"
    assert run["runtime_config"]["parameters"] == {"fid_threshold": 10.0}


def test_standalone_submit_names_no_namespace_and_keeps_kfps_service_account(kfp_api) -> None:
    result = CliRunner().invoke(pipeline_app, ["submit", "--host", kfp_api.host])
    assert result.exit_code == 0, result.output
    assert kfp_api.posted("/apis/v2beta1/experiments")["namespace"] == "", "single-user KFP: no namespace"
    assert "service_account" not in kfp_api.posted("/apis/v2beta1/runs"), "KFP's own default (pipeline-runner)"


def test_schedule_sends_the_namespace_and_service_account(kfp_api) -> None:
    result = CliRunner().invoke(pipeline_app, [
        "schedule", "--cron", "0 0 3 * * 0", "--host", kfp_api.host, "--namespace", "team-a",
        "--service-account", "maskdit-runner"])
    assert result.exit_code == 0, result.output
    assert kfp_api.posted("/apis/v2beta1/experiments")["namespace"] == "team-a"
    recurring = kfp_api.posted("/apis/v2beta1/recurringruns")
    assert recurring["service_account"] == "maskdit-runner" and recurring["max_concurrency"] in (1, "1")
    assert recurring["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * 0"


# ------------------------------------------------------------------------------------------
# Multi-user Kubeflow: a service-account token through the Istio ingress (issue 23.2)
# ------------------------------------------------------------------------------------------

TOKEN = "eyJhbGciOiJSUzI1NiJ9.profile-token.sig"


@pytest.fixture
def guarded_kfp():
    """The KFP API behind an ingress that admits only `Authorization: Bearer TOKEN`."""
    api = KfpApi(token=TOKEN)
    yield api
    api.httpd.shutdown()
    api.httpd.server_close()


PROFILE_SUBMIT = ["submit", "--namespace", "kubeflow-user-example-com", "--service-account", "default-editor"]


@pytest.mark.parametrize("how", ["option", "env", "file"])
def test_submit_and_schedule_send_the_token(guarded_kfp, tmp_path, how) -> None:
    args, env = [], {}
    if how == "option":
        args = ["--token", TOKEN]
    elif how == "env":
        env = {"MASKDIT_KFP_TOKEN": TOKEN}
    else:
        (tmp_path / "token").write_text(TOKEN + "\n")  # as a projected token file ends
        args = ["--token-file", str(tmp_path / "token")]
    result = CliRunner().invoke(pipeline_app, [*PROFILE_SUBMIT, "--host", guarded_kfp.host, *args], env=env)
    assert result.exit_code == 0, result.output
    assert guarded_kfp.posted("/apis/v2beta1/runs")["service_account"] == "default-editor"
    result = CliRunner().invoke(pipeline_app, ["schedule", "--cron", "0 0 3 * * 0", "--host", guarded_kfp.host,
                                               "--namespace", "team-a", *args], env=env)
    assert result.exit_code == 0, result.output
    assert guarded_kfp.posted("/apis/v2beta1/recurringruns")
    assert set(guarded_kfp.authorizations) == {f"Bearer {TOKEN}"}


def _one_line_error(result) -> str:
    assert result.exit_code == EXIT_USER_ERROR, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


@pytest.mark.parametrize("command", [PROFILE_SUBMIT, ["schedule", "--cron", "0 0 3 * * 0"]], ids=["submit", "schedule"])
def test_a_wrong_or_missing_token_is_one_line(guarded_kfp, command) -> None:
    wrong = _one_line_error(CliRunner().invoke(pipeline_app, [*command, "--host", guarded_kfp.host,
                                                              "--token", "expired"]))
    assert "refused the token (HTTP 401" in wrong and guarded_kfp.host in wrong and "create token" in wrong
    assert "expired" not in wrong, "the token itself is never printed"
    missing = _one_line_error(CliRunner().invoke(pipeline_app, [*command, "--host", guarded_kfp.host], env={
        "MASKDIT_KFP_TOKEN": ""}))
    assert "no token was given" in missing and "--token" in missing
    assert not guarded_kfp.requests, "nothing got past the ingress"


def test_an_unreadable_token_file_or_two_tokens_are_one_line(tmp_path) -> None:
    gone = _one_line_error(CliRunner().invoke(pipeline_app, ["submit", "--host", "http://127.0.0.1:9",
                                                             "--token-file", str(tmp_path / "none")]))
    assert str(tmp_path / "none") in gone and "create token" in gone
    (tmp_path / "empty").write_text("\n")
    assert "is empty" in _one_line_error(CliRunner().invoke(pipeline_app, [
        "submit", "--token-file", str(tmp_path / "empty")]))
    assert "not both" in _one_line_error(CliRunner().invoke(pipeline_app, [
        "submit", "--token", "t", "--token-file", str(tmp_path / "empty")]))


def test_an_unreachable_host_is_one_line() -> None:
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        host = f"http://127.0.0.1:{sock.getsockname()[1]}"
    error = _one_line_error(CliRunner().invoke(pipeline_app, [*PROFILE_SUBMIT, "--host", host, "--token", TOKEN]))
    assert f"cannot reach KFP at {host}" in error and "--host" in error
