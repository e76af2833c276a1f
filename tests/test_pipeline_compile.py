"""The compiled pipeline: up to date, valid KFP IR, and the cluster settings where they belong."""

import json

import yaml
from google.protobuf import json_format
from kfp.kubernetes import kubernetes_executor_config_pb2 as k8s_pb2
from kfp.pipeline_spec import pipeline_spec_pb2

from components.cluster import ClusterSettings
from pipelines.maskdit_pipeline import PIPELINE_YAML, compile_pipeline


def cluster_fields():
    return ClusterSettings.model_fields

SECRET_VALUES = {"AWS_ACCESS_KEY_ID": "AKIA-test-key-id-4711", "AWS_SECRET_ACCESS_KEY": "s3cr3t-value-do-not-leak",
                 "MLFLOW_TRACKING_PASSWORD": "mlflow-password-0815", "MLFLOW_TRACKING_USERNAME": "mlflow-user-0815"}


def _compiled(tmp_path, monkeypatch):
    for key, value in SECRET_VALUES.items():  # credentials in the compiling shell must not leak into the YAML
        monkeypatch.setenv(key, value)
    path = compile_pipeline(tmp_path / "pipeline.yaml")
    return path.read_text()


def _parse(text):
    spec_doc, platform_doc = yaml.safe_load_all(text)
    spec = json_format.ParseDict(spec_doc, pipeline_spec_pb2.PipelineSpec())
    platform = json_format.ParseDict(platform_doc, pipeline_spec_pb2.PlatformSpec())
    executors = {
        name: json_format.ParseDict(json_format.MessageToDict(config), k8s_pb2.KubernetesExecutorConfig())
        for name, config in platform.platforms["kubernetes"].deployment_spec.executors.items()
    }
    return spec, executors


def test_committed_yaml_is_up_to_date(tmp_path, monkeypatch):
    assert PIPELINE_YAML.exists(), "run `maskdit-pipeline compile` and commit pipelines/maskdit_pipeline.yaml"
    assert _compiled(tmp_path, monkeypatch) == PIPELINE_YAML.read_text(), (
        "pipelines/maskdit_pipeline.yaml is out of date with the code: run `maskdit-pipeline compile`")


def test_spec_parses_and_wires_the_dag(tmp_path, monkeypatch):
    spec, _ = _parse(_compiled(tmp_path, monkeypatch))
    assert spec.pipeline_info.name == "maskdit"
    root = spec.root.dag.tasks
    assert root["cleanup"].trigger_policy.strategy == \
        pipeline_spec_pb2.PipelineTaskSpec.TriggerPolicy.TriggerStrategy.ALL_UPSTREAM_TASKS_COMPLETED
    inner = spec.components[root["exit-handler-1"].component_ref.name].dag.tasks
    assert set(inner) == {"settings", "check-parameters", "fingerprint", "encode", "pretrain", "tune", "evaluate",
                          "condition-2"}
    # every step's parameters are checked before any work: the first work step waits for the check
    assert "check-parameters" in inner["fingerprint"].dependent_tasks
    checked = inner["check-parameters"].inputs.parameters["cluster"].task_output_parameter
    assert checked.producer_task == "settings"
    # every pipeline parameter a step uses is checked, except the ones only naming where or what is registered
    wired = {v.component_input_parameter.removeprefix("pipelinechannel--")
             for v in inner["check-parameters"].inputs.parameters.values() if v.component_input_parameter}
    unchecked = {"store_uri", "step_node_selector", "model_name", "experiment"} | set(cluster_fields())
    assert wired | unchecked == set(spec.root.input_definitions.parameters)
    # the training steps take the checked cluster settings: the settings step runs before them
    assert "settings" in inner["pretrain"].dependent_tasks and "settings" in inner["tune"].dependent_tasks
    cluster = inner["pretrain"].inputs.parameters["cluster"].task_output_parameter
    assert (cluster.producer_task, cluster.output_parameter_key) == ("settings", "Output")
    # encode's cache key holds the data's identity: the uncached fingerprint step's output is one of its inputs
    assert not inner["fingerprint"].caching_options.enable_cache
    identity = inner["encode"].inputs.parameters["dataset_id"].task_output_parameter
    assert (identity.producer_task, identity.output_parameter_key) == ("fingerprint", "Output")
    assert set(inner["tune"].dependent_tasks) == {"encode", "pretrain", "settings"}
    condition = inner["condition-2"].trigger_policy.condition
    assert "pipelinechannel--evaluate-Output" in condition and "<=" in condition and "fid_threshold" in condition
    # like types on both sides of the comparison (a float output against a float parameter)
    condition_inputs = spec.components[inner["condition-2"].component_ref.name].input_definitions.parameters
    double = pipeline_spec_pb2.ParameterType.NUMBER_DOUBLE
    assert condition_inputs["pipelinechannel--evaluate-Output"].parameter_type == double
    assert condition_inputs["pipelinechannel--fid_threshold"].parameter_type == double
    # caching only for encode; retries on the steps that talk to the network
    assert inner["encode"].caching_options.enable_cache
    assert not any(inner[t].caching_options.enable_cache for t in ("pretrain", "tune", "evaluate"))
    for task in ("encode", "pretrain", "tune"):
        assert inner[task].retry_policy.max_retry_count >= 1
    register = spec.components[inner["condition-2"].component_ref.name].dag.tasks["register"]
    assert register.retry_policy.max_retry_count >= 1 and not register.caching_options.enable_cache
    params = spec.root.input_definitions.parameters
    assert params["fid_threshold"].default_value.number_value == 3.0
    assert json_format.MessageToDict(params["sampler"].default_value) == {}  # SamplerConfig's own defaults
    assert "SamplerConfig" in params["sampler"].description
    assert params["gpus_per_node"].default_value.number_value == 8
    assert "FID <= this" in params["fid_threshold"].description  # documented for the UI


def test_gpus_tolerations_node_selectors_and_secrets(tmp_path, monkeypatch):
    spec, executors = _parse(_compiled(tmp_path, monkeypatch))
    deployment = json_format.ParseDict(json_format.MessageToDict(spec.deployment_spec),
                                       pipeline_spec_pb2.PipelineDeploymentConfig())
    containers = {name: e.container for name, e in deployment.executors.items()}
    for gpu_step in ("exec-encode", "exec-evaluate"):
        accelerator = containers[gpu_step].resources.accelerator
        # sized by pipeline parameters: 0 GPUs on any node by default (the work runs as a job), 1 to run in-process
        assert accelerator.resource_type == "nvidia.com/gpu" and "step_gpus" in accelerator.resource_count
        assert [t.key for t in executors[gpu_step].tolerations] == ["nvidia.com/gpu"]
        selector = json_format.MessageToDict(executors[gpu_step].node_selector)
        assert "step_node_selector" in json.dumps(selector)
    for light_step in ("exec-fingerprint", "exec-pretrain", "exec-tune", "exec-register", "exec-cleanup"):
        assert not containers[light_step].resources.accelerator.resource_type
        assert not executors.get(light_step, k8s_pb2.KubernetesExecutorConfig()).tolerations
    for step in ("exec-fingerprint", "exec-encode", "exec-pretrain", "exec-tune", "exec-evaluate", "exec-register"):
        secrets = {(s.secret_name, k.env_var) for s in executors[step].secret_as_env for k in s.key_to_env}
        assert {("maskdit-s3", "AWS_SECRET_ACCESS_KEY"), ("maskdit-mlflow", "MLFLOW_TRACKING_PASSWORD")} <= secrets
        # the pipeline's own MLflow account, never MLflow's admin Secret (maskdit-mlflow-admin, issue 23.10)
        assert {s for s, _ in secrets} == {"maskdit-s3", "maskdit-mlflow"}
        assert {k for s, k in secrets if s == "maskdit-mlflow"} == {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}
        assert [c.config_map_name for c in executors[step].config_map_as_env] == ["maskdit-config"]
    # the PyTorchJobs get their GPUs, node selector and tolerations as (documented) parameters
    params = spec.root.input_definitions.parameters
    assert json_format.MessageToDict(params["node_selector"].default_value) == {"nvidia.com/gpu.present": "true"}
    assert json_format.MessageToDict(params["step_node_selector"].default_value) == {}
    assert params["step_gpus"].default_value.number_value == 0
    # encode and evaluate run as jobs by default (the pods are thin clients), each with its own deadline
    assert params["encode_as_job"].default_value.bool_value and params["evaluate_as_job"].default_value.bool_value
    assert params["encode_timeout_hours"].default_value.number_value == 24.0
    assert params["evaluate_timeout_hours"].default_value.number_value == 6.0
    # the launcher pods know themselves (downward API), so the PyTorchJob can be owned by them
    for step in ("exec-pretrain", "exec-tune", "exec-encode", "exec-evaluate"):
        fields = {f.name: f.field_path for f in executors[step].field_path_as_env}
        assert fields == {"MASKDIT_POD_NAME": "metadata.name", "MASKDIT_POD_UID": "metadata.uid",
                          "MASKDIT_POD_NAMESPACE": "metadata.namespace"}
    assert json_format.MessageToDict(params["tolerations"].default_value)[0]["key"] == "nvidia.com/gpu"


def test_no_secret_value_in_the_yaml(tmp_path, monkeypatch):
    text = _compiled(tmp_path, monkeypatch)
    for value in SECRET_VALUES.values():
        assert value not in text
    spec, _ = _parse(text)
    names = " ".join(spec.root.input_definitions.parameters).lower()
    assert not any(word in names for word in ("password", "secret", "token", "access_key"))


def test_cli_parameters_take_the_pipelines_types():
    from maskdit.core.errors import UserError
    from pipelines.cli import parse_params

    params = parse_params(["fid_threshold=3", "nodes=2", "pixel_space=true", 'pretrain_overrides=["steps=10"]',
                           "images=s3://b/x=y"])
    assert params == {"fid_threshold": 3.0, "nodes": 2, "pixel_space": True, "pretrain_overrides": ["steps=10"],
                      "images": "s3://b/x=y"}
    assert isinstance(params["fid_threshold"], float)
    for bad in ("fid_treshold=3", "nodes=two", "tolerations={}"):
        try:
            parse_params([bad])
        except UserError as error:
            assert bad.split("=")[0] in str(error)
        else:
            raise AssertionError(f"{bad} was accepted")


def test_warm_start_parameters_reach_pretraining(tmp_path, monkeypatch):
    """pretrain_init_from / pretrain_resume_from / tune_init_from (strings, "" = off) feed the pretrain step."""
    spec, _ = _parse(_compiled(tmp_path, monkeypatch))
    params = spec.root.input_definitions.parameters
    for name in ("pretrain_init_from", "pretrain_resume_from", "tune_init_from"):
        assert params[name].parameter_type == pipeline_spec_pb2.ParameterType.STRING
        assert params[name].default_value.string_value == ""
    inner = spec.components[spec.root.dag.tasks["exit-handler-1"].component_ref.name].dag.tasks
    wired = {key: value.component_input_parameter for key, value in inner["pretrain"].inputs.parameters.items()}
    assert wired["init_from"] == "pipelinechannel--pretrain_init_from"
    assert wired["resume_from"] == "pipelinechannel--pretrain_resume_from"
    assert wired["pretrained"] == "pipelinechannel--tune_init_from"


def test_the_cluster_settings_are_declared_once():
    """ClusterSettings is the declaration: the pipeline's parameters are generated from it, and the settings
    step's signature (which KFP needs written out) names the same fields with the same types."""
    import inspect

    from components.cluster import ClusterSettings, cluster_parameters
    from components.settings import settings
    from pipelines.maskdit_pipeline import maskdit_pipeline

    declared = {p.name: p.annotation for p in cluster_parameters()}
    step = inspect.signature(settings.python_func).parameters
    assert {name: p.annotation for name, p in step.items()} == declared, (
        "components/settings.py's parameters differ from ClusterSettings (components/cluster.py): add the field there")
    pipeline = inspect.signature(maskdit_pipeline.pipeline_func).parameters
    defaults = ClusterSettings()
    for name in declared:
        assert pipeline[name].default == getattr(defaults, name), name
    spec = maskdit_pipeline.pipeline_spec.root.input_definitions.parameters
    for name, field in ClusterSettings.model_fields.items():
        assert spec[name].description == field.description, name
