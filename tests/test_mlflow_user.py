"""The pipeline's own non-admin MLflow account (issue 23, item 10), on MLflow as k8s/base deploys it: the
basic-auth app with its admin (tests/fixtures/mlflow_deployed.py). `maskdit mlflow-user ensure` creates the user
as the admin (and is idempotent); then the pipeline's MLflow code runs as that user and succeeds, while the user
is refused what only an admin may do, and a 403 is one line that says what to grant."""

import secrets

import mlflow
import pandas as pd
import pytest
from fixtures.mlflow_deployed import DeployedMlflow
from fixtures.tiny_sampler import digits_checkpoint
from typer.testing import CliRunner

from maskdit.cli import app
from maskdit.core.parent_run import find_or_create_parent, finish_parents
from maskdit.core.tracking import log_metrics, tracking_run
from maskdit.core.tracking_server import TrackingError, environment
from maskdit.core.tracking_users import UserSetupError, ensure_user
from maskdit.evaluation.evaluate import EvaluateResult
from maskdit.evaluation.inception import BUNDLED_SHA256
from maskdit.method.diffusion import SamplerConfig
from maskdit.registry.champion import CANDIDATE, CHAMPION, LOCK_SUFFIX, RegistryError
from maskdit.registry.register import register

pytestmark = pytest.mark.slow  # a real MLflow server process

USER = "maskdit-pipeline"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = DeployedMlflow(tmp_path_factory.mktemp("mlflow-auth"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return digits_checkpoint(tmp_path_factory.mktemp("user-registry"))


def _ensure(server, password, *args, admin_password=None):
    env = {"MLFLOW_TRACKING_URI": server.uri, "MLFLOW_AUTH_ADMIN_USERNAME": server.username,
           "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password or server.password,
           "MLFLOW_TRACKING_USERNAME": USER, "MLFLOW_TRACKING_PASSWORD": password}
    return CliRunner().invoke(app, ["mlflow-user", "ensure", *args], env=env)


@pytest.fixture(scope="module")
def pipeline_user(server):
    """The user as the Job creates it; returns its password."""
    password = secrets.token_hex(12)
    result = _ensure(server, password)
    assert result.exit_code == 0, result.output
    assert f"MLflow user {USER!r}: created" in result.output
    return password


@pytest.fixture
def as_user(server, pipeline_user, monkeypatch):
    """This test's MLflow calls sign in as the pipeline's user, as the pods do with the Secret maskdit-mlflow."""
    for key, value in {"MLFLOW_TRACKING_URI": server.uri, "MLFLOW_TRACKING_USERNAME": USER,
                       "MLFLOW_TRACKING_PASSWORD": pipeline_user}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MASKDIT_PARENT_RUN_ID", raising=False)
    mlflow.set_tracking_uri(server.uri)
    return mlflow.MlflowClient()


def _signed_in(username, password):
    """MLflow's env credentials for the block (AuthServiceClient signs in with them)."""
    return environment({"MLFLOW_TRACKING_USERNAME": username, "MLFLOW_TRACKING_PASSWORD": password})


def _as_admin(server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", server.username)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", server.password)
    return mlflow.MlflowClient()


def test_ensure_creates_a_plain_user_once_and_follows_a_rotated_password(server, pipeline_user, monkeypatch):
    current = server.get_json(f"/api/2.0/mlflow/users/get?username={USER}")["user"]
    assert current["username"] == USER and not current["is_admin"]

    again = _ensure(server, pipeline_user)  # the Job's next run: nothing to do
    assert again.exit_code == 0 and f"MLflow user {USER!r}: exists, password unchanged" in again.output

    rotated = secrets.token_hex(12)  # the Secret changed: the next run sets the new password
    result = _ensure(server, rotated)
    assert result.exit_code == 0 and f"MLflow user {USER!r}: password updated" in result.output
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", rotated)
    mlflow.set_tracking_uri(server.uri)
    assert mlflow.MlflowClient().search_experiments(max_results=1) is not None
    result = _ensure(server, pipeline_user)  # and back, so that the other tests' password holds
    assert result.exit_code == 0 and "password updated" in result.output


def test_the_pipeline_never_holds_the_admin(server, pipeline_user):
    with pytest.raises(UserSetupError, match="is the admin's name"):
        ensure_user(server.uri, (server.username, server.password), (server.username, server.password))
    result = _ensure(server, pipeline_user, admin_password="wrong")
    assert result.exit_code == 2 and "does not accept 'admin' as its admin (HTTP 401)" in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    # an existing admin account is never taken as the pipeline's
    server_admin = (server.username, server.password)
    from mlflow.server.auth.client import AuthServiceClient

    with _signed_in(server.username, server.password):
        AuthServiceClient(server.uri).create_user("other-admin", "pw-" + secrets.token_hex(8))
        AuthServiceClient(server.uri).update_user_admin("other-admin", True)
    with pytest.raises(UserSetupError, match="is an admin: the pipeline must run as a plain user"):
        ensure_user(server.uri, server_admin, ("other-admin", "whatever"))


def test_the_user_is_refused_what_only_an_admin_may_do(server, pipeline_user):
    from mlflow.exceptions import MlflowException
    from mlflow.server.auth.client import AuthServiceClient

    with _signed_in(USER, pipeline_user):
        with pytest.raises(MlflowException, match="error code 403"):
            AuthServiceClient(server.uri).create_user("intruder", "pw-" + secrets.token_hex(8))
        with pytest.raises(MlflowException, match="error code 403"):
            AuthServiceClient(server.uri).update_user_admin(USER, True)
        with pytest.raises(MlflowException, match="error code 403"):
            AuthServiceClient(server.uri).update_user_password(server.username, "taken-over")
    with pytest.raises(UserSetupError, match="does not accept 'maskdit-pipeline' as its admin"):
        ensure_user(server.uri, (USER, pipeline_user), ("someone", "pw"))


def _evaluation(ckpt, dataset, tmp_path, fid) -> EvaluateResult:
    """An evaluation with recorded settings, so that a lower FID moves `champion` (maskdit/registry/champion.py)."""
    return EvaluateResult(fid=fid, num_samples=100, sampler=SamplerConfig(num_steps=3), seed=0, checkpoint=ckpt,
                          step=7, dataset=dataset, ref_stats="s3://b/ref.npz", ref_stats_sha256="a" * 64, ref_n=50,
                          inception="bundled", inception_sha256=BUNDLED_SHA256, world_size=1, seconds=1.0,
                          grid=str(tmp_path / "grid.png"))


def test_the_pipelines_mlflow_code_runs_as_the_plain_user(server, pipeline_user, as_user, trained, tmp_path):
    ckpt, dataset = trained
    experiment, name = "maskdit-user-exp", "maskdit-user-model"
    parent = find_or_create_parent(experiment, "kfp.run_id", "run-1", "kfp-run-1")  # the DAG's parent run
    assert find_or_create_parent(experiment, "kfp.run_id", "run-1", "kfp-run-1") == parent
    with tracking_run(run_name="train", params={"lr": 1e-4}, experiment=experiment) as run_id:  # a training step
        log_metrics({"loss": 0.5}, step=1)
    assert run_id and as_user.get_run(run_id).info.status == "FINISHED"

    first, worse, better = (register(ckpt, fid, name, evaluation=_evaluation(ckpt, dataset, tmp_path, fid),
                                     dataset_uri=dataset, experiment=experiment) for fid in (10.0, 20.0, 5.0))
    assert (first.champion, worse.champion, better.champion) == (True, False, True)
    assert as_user.get_model_version_by_alias(name, CHAMPION).version == better.version
    assert as_user.get_model_version_by_alias(name, CANDIDATE).version == better.version
    assert not as_user.search_registered_models(f"name = '{name}{LOCK_SUFFIX}'")  # the user deleted its lock
    model = mlflow.pyfunc.load_model(f"models:/{name}@{CHAMPION}")  # the warm start's and the sampler's read
    assert list(model.predict(pd.DataFrame({"class_label": [1], "seed": [0]}))["class_label"]) == [1]
    assert finish_parents(experiment, "kfp.run_id", "run-1", "FINISHED", {}) == [parent]
    permission = server.get_json(f"/api/3.0/mlflow/users/permissions/get?username={USER}"
                                 f"&resource_type=registered_model&resource_id={name}")
    assert permission["permission"] == "MANAGE"  # its own, from creating it
    result = _ensure(server, pipeline_user, "--model", name)
    assert result.exit_code == 0 and "granted" not in result.output  # a grant never lowers its own MANAGE
    assert server.get_json(f"/api/3.0/mlflow/users/permissions/get?username={USER}"
                           f"&resource_type=registered_model&resource_id={name}")["permission"] == "MANAGE"


def test_what_an_admin_created_before_needs_a_grant_and_a_403_is_one_line(server, pipeline_user, as_user, trained,
                                                                          monkeypatch):
    """An install from before the split: the experiment and the model were the admin's."""
    ckpt, dataset = trained
    experiment, name = "maskdit-legacy-exp", "maskdit-legacy-model"
    admin = _as_admin(server, monkeypatch)
    admin.create_experiment(experiment)
    admin.create_registered_model(name)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password := pipeline_user)

    with pytest.raises(TrackingError) as denied, tracking_run(run_name="train", experiment=experiment):
        pass
    assert "HTTP 403" in str(denied.value) and "mlflow-user ensure" in str(denied.value)
    with pytest.raises(TrackingError) as denied:  # the DAG's first MLflow call
        find_or_create_parent(experiment, "kfp.run_id", "run-2", "kfp-run-2")
    assert str(denied.value).startswith(f"the pipeline run's parent run in the MLflow experiment {experiment!r}: "
                                        f"MLflow denied the account {USER!r} (HTTP 403")
    with pytest.raises(RegistryError) as denied:
        register(ckpt, 10.0, name, dataset_uri=dataset, experiment="maskdit-user-exp")
    message = str(denied.value)
    assert message.startswith(f"registering {name} in MLflow: MLflow denied the account {USER!r} (HTTP 403")
    assert "\n" not in message and "--model" in message

    result = _ensure(server, password, "--experiment", experiment, "--model", name, "--model", "not-yet-there")
    assert result.exit_code == 0, result.output
    assert f"granted EDIT on experiment {experiment!r}" in result.output
    assert f"granted EDIT on registered model {name!r}" in result.output
    assert "registered model 'not-yet-there' does not exist yet" in result.output
    again = _ensure(server, password, "--experiment", experiment, "--model", name)
    assert again.exit_code == 0 and "granted" not in again.output  # idempotent

    assert find_or_create_parent(experiment, "kfp.run_id", "run-2", "kfp-run-2")
    with tracking_run(run_name="train", experiment=experiment) as run_id:
        log_metrics({"loss": 0.25}, step=1)
    assert run_id
    first = register(ckpt, 10.0, name, dataset_uri=dataset, experiment=experiment)
    assert first.champion and as_user.get_model_version_by_alias(name, CHAMPION).version == first.version
    # EDIT, not more: the model stays the admin's to delete
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match="403"):
        as_user.delete_registered_model(name)


def test_an_empty_secret_or_no_server_address_is_one_line_before_any_request():
    env = {"MLFLOW_TRACKING_URI": "http://127.0.0.1:1", "MLFLOW_AUTH_ADMIN_USERNAME": "admin",
           "MLFLOW_AUTH_ADMIN_PASSWORD": "pw", "MLFLOW_TRACKING_USERNAME": USER, "MLFLOW_TRACKING_PASSWORD": ""}
    result = CliRunner().invoke(app, ["mlflow-user", "ensure"], env=env)
    assert result.exit_code == 2 and result.output.strip() == (
        "MLFLOW_TRACKING_PASSWORD is empty: fill it in the Secret maskdit-mlflow (docs/operating.md, "
        "\"Fill in the secrets\")")
    result = CliRunner().invoke(app, ["mlflow-user", "ensure"], env={**env, "MLFLOW_TRACKING_URI": "mlruns"})
    assert result.exit_code == 2 and "MLFLOW_TRACKING_URI is 'mlruns'" in result.output
