"""The MaskDiT training pipeline (Kubeflow Pipelines v2).

    fingerprint -> encode -> pretrain -> tune -> evaluate -> [FID <= fid_threshold] register
    (encode and evaluate: jobs on the cluster's GPUs like training, or in their own pod: `*_as_job`)
    (all inside an ExitHandler whose exit step deletes the run's training jobs)
    (with `tune_init_from`, e.g. models:/<name>@champion, pretrain trains nothing: a weekly retrain)

Pretrain and tune are light launcher pods that run `maskdit train` as a training job (a Kubeflow
Trainer v2 TrainJob or a Training Operator PyTorchJob, parameter `job_api`; or, with
`backend="local"`, with torchrun on the same machine, for KFP's local runner). Register adds a
version with alias `candidate` and moves `champion` only when the FID beats the champion's.

Secrets never pass as parameters: the steps read S3 and MLflow credentials from Kubernetes
Secrets (`maskdit-s3`, `maskdit-mlflow`: the pipeline's own non-admin MLflow account, never MLflow's
admin) and MLflow's address from the ConfigMap `maskdit-config`
(k8s/); the training jobs get the same through envFrom. The local runner ignores these settings:
there the environment of the calling process provides them.
"""


import ast
import json
import re
from pathlib import Path

from kfp import compiler, dsl, kubernetes

from components.cleanup import cleanup
from components.cluster import (
    CONFIG_MAP,
    GPU_RESOURCE,
    GPU_TOLERATIONS,
    MLFLOW_SECRET,
    S3_SECRET,
    with_cluster_parameters,
)
from components.encode import encode
from components.evaluate import evaluate
from components.fingerprint import fingerprint
from components.pretrain import pretrain
from components.pytorchjob import IMAGE_UID
from components.register import register
from components.settings import check_parameters, settings
from components.tune import tune

PIPELINE_YAML = Path(__file__).with_name("maskdit_pipeline.yaml")


def _with_credentials(task: dsl.PipelineTask) -> dsl.PipelineTask:
    """S3 and MLflow settings from the cluster: Secrets and a ConfigMap, never pipeline parameters."""
    kubernetes.use_secret_as_env(task, S3_SECRET, {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
                                                   "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"})
    kubernetes.use_secret_as_env(task, S3_SECRET, {"AWS_ENDPOINT_URL": "AWS_ENDPOINT_URL"}, optional=True)
    kubernetes.use_secret_as_env(task, MLFLOW_SECRET, {"MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME",
                                                       "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD"})
    kubernetes.use_config_map_as_env(task, CONFIG_MAP, {"MLFLOW_TRACKING_URI": "MLFLOW_TRACKING_URI"})
    kubernetes.add_pod_label(task, "app.kubernetes.io/part-of", "maskdit")  # MLflow's NetworkPolicy admits these
    return _non_root(task)


def _non_root(task: dsl.PipelineTask) -> dsl.PipelineTask:
    """The image's user, never root: a namespace that enforces runAsNonRoot admits the step pods (kfp-kubernetes
    >= 2.16; `--kfp-backend` before 2.16 leaves it out, pipelines/kfp_backend.py)."""
    kubernetes.set_security_context(task, run_as_user=IMAGE_UID, run_as_group=IMAGE_UID, run_as_non_root=True)
    return task


def _sized(task: dsl.PipelineTask, cpu: str, memory: str, gpus, node_selector) -> dsl.PipelineTask:
    """The step's own pod: GPUs (0 in pixel space) and node labels from pipeline parameters.

    (CPU and memory stay constants: KFP's local runner cannot resolve a resource placeholder whose
    parameter is not also an input of the task; `gpus` is one, as the step picks its device from it.)
    """
    task.set_accelerator_type(GPU_RESOURCE).set_accelerator_limit(gpus)
    task.set_cpu_limit(cpu).set_memory_limit(memory)
    kubernetes.add_node_selector_json(task, node_selector)
    for toleration in GPU_TOLERATIONS:  # allows GPU nodes, requires none
        kubernetes.add_toleration(task, **toleration)
    return task


def _launcher(task: dsl.PipelineTask, name: str) -> dsl.PipelineTask:
    """A pretrain/tune pod: it only creates and watches the training job (retries re-attach to it).

    It knows its own pod (downward API) so that the training job can be owned by it: deleting the run
    deletes the job (components/launcher.py, docs/operating.md).
    """
    task.set_display_name(name).set_caching_options(False).set_retry(num_retries=2, backoff_duration="60s")
    task.set_cpu_limit("1").set_memory_limit("2Gi")
    return _with_credentials(_knows_its_pod(task))


def _knows_its_pod(task: dsl.PipelineTask) -> dsl.PipelineTask:
    """The step's pod name, uid and namespace (downward API): the jobs it launches are owned by it."""
    for env, field in (("MASKDIT_POD_NAME", "metadata.name"), ("MASKDIT_POD_UID", "metadata.uid"),
                       ("MASKDIT_POD_NAMESPACE", "metadata.namespace")):
        kubernetes.use_field_path_as_env(task, env, field)
    return task


@dsl.pipeline(
    name="maskdit",
    description="MaskDiT: encode -> masked pretraining (training job) -> unmasking tuning -> FID -> MLflow registry.",
)
@with_cluster_parameters
def maskdit_pipeline(
    images: str = "s3://maskdit/data/imagenet/train",
    store_uri: str = "s3://maskdit",
    resolution: int = 256,
    vae: str = "stabilityai/sd-vae-ft-mse",
    pixel_space: bool = False,
    grayscale: bool = False,
    pretrain_config: str = "imagenet256_pretrain",
    pretrain_overrides: list = [],
    tune_config: str = "imagenet256_tune_zero",
    tune_overrides: list = [],
    pretrain_init_from: str = "",
    pretrain_resume_from: str = "",
    tune_init_from: str = "",
    pretrain_timeout_hours: float = 336.0,
    tune_timeout_hours: float = 48.0,
    encode_as_job: bool = True,
    evaluate_as_job: bool = True,
    encode_timeout_hours: float = 24.0,
    evaluate_timeout_hours: float = 6.0,
    step_gpus: int = 0,
    step_node_selector: dict = {},
    ref_stats: str = "s3://maskdit/fid/VIRTUAL_imagenet256_labeled.npz",
    num_samples: int = 50000,
    sampler: dict = {},
    fid_threshold: float = 3.0,
    model_name: str = "maskdit-xl2-imagenet256",
    experiment: str = "maskdit",
    *,
    cluster: dict,
):
    """Train, evaluate and register a MaskDiT (defaults: the paper's ImageNet-256 XL/2 recipe).

    Args:
        images: Class folders of training images (folder or s3:// prefix), or "mnist" for the bundled digits.
        store_uri: Object-store root for datasets (<store>/datasets) and checkpoints (<store>/runs/<run id>).
        resolution: Image side in pixels (ADM center crop); the SD VAE makes 32x32x4 latents of 256.
        vae: AutoencoderKL for the latents (hub id or path); ignored with pixel_space.
        pixel_space: Train on pixels instead of VAE latents (the laptop demo).
        grayscale: One channel (with pixel_space).
        pretrain_config: `maskdit train` preset or YAML for masked pretraining (mask ratio 0.5, 2M steps).
        pretrain_overrides: key=value overrides for pretraining, e.g. ["steps=100000"].
        tune_config: Preset for unmasking tuning: imagenet256_tune_zero (best with CFG) or imagenet256_tune_cosine.
        tune_overrides: key=value overrides for tuning.
        pretrain_init_from: Start pretraining from these weights: a checkpoint (file or folder) or models:/<name>@<alias> (or /<version>); empty = from scratch.
        pretrain_resume_from: Continue a failed run's pretraining from its checkpoint folder (<store>/runs/<run id>/pretrain) with its optimizer, step and RNG; empty = none.
        tune_init_from: Skip pretraining and tune from this model: a checkpoint or models:/<name>@champion (a weekly retrain); empty = this run's pretraining.
        pretrain_timeout_hours: Delete the pretraining job and fail after this long (2M steps: about 257 h on 8 A100).
        tune_timeout_hours: Delete the tuning job and fail after this long.
        encode_as_job: Run `maskdit encode` as a job on gpus_per_node GPUs (a training job, `job_api`; torchrun with local_nproc processes on the local backend); false = in the encode pod itself (small data).
        evaluate_as_job: Run `maskdit evaluate` (sampling, Inception) as a job on gpus_per_node GPUs, like encode_as_job; false = in the evaluate pod itself.
        encode_timeout_hours: Delete the encode job and fail after this long (ImageNet: 1.28M images).
        evaluate_timeout_hours: Delete the evaluation job and fail after this long.
        step_gpus: GPUs of the encode and evaluate pods themselves: 0 when they run as jobs (thin clients); 1 to encode VAE latents or sample in-process.
        step_node_selector: Node labels of the encode and evaluate pods (e.g. {"nvidia.com/gpu.present": "true"} with step_gpus=1).
        ref_stats: FID reference statistics (.npz with mu and sigma, ADM's VIRTUAL_imagenet256_labeled.npz); empty = the dataset's own.
        num_samples: Samples for FID (50k in the paper).
        sampler: Sampler settings for FID (SamplerConfig fields), e.g. {"cfg_scale": 1.5, "num_steps": 40}; empty = the paper's (CFG 1.5, 40 EDM Heun steps).
        fid_threshold: Register only when FID <= this.
        model_name: Registered model name in the MLflow Model Registry.
        experiment: MLflow experiment of the run's parent run.
    """  # the cluster settings' parameters and their lines here come from components/cluster.py
    run_id, run_name = dsl.PIPELINE_JOB_ID_PLACEHOLDER, dsl.PIPELINE_JOB_NAME_PLACEHOLDER
    exit_task = cleanup(kfp_run_id=run_id, backend=cluster["backend"], namespace=cluster["namespace"],
                        experiment=experiment)
    exit_task.set_display_name("delete training jobs, close MLflow run").set_caching_options(False).set_retry(3)
    _with_credentials(exit_task.set_cpu_limit("500m").set_memory_limit("1Gi"))

    with dsl.ExitHandler(exit_task, name="train and register"):
        checked = settings(**cluster)  # a bad cluster parameter fails here, before any work
        checked.set_display_name("check settings").set_caching_options(False)
        _with_credentials(checked.set_cpu_limit("500m").set_memory_limit("1Gi"))
        # every step's config from the run's parameters: a bad one fails here, not after weeks of training
        params = check_parameters(
            cluster=checked.output, images=images, resolution=resolution, vae=vae, pixel_space=pixel_space,
            grayscale=grayscale, pretrain_config=pretrain_config, pretrain_overrides=pretrain_overrides,
            tune_config=tune_config, tune_overrides=tune_overrides, pretrain_init_from=pretrain_init_from,
            pretrain_resume_from=pretrain_resume_from, tune_init_from=tune_init_from,
            pretrain_timeout_hours=pretrain_timeout_hours, tune_timeout_hours=tune_timeout_hours,
            step_gpus=step_gpus, ref_stats=ref_stats, num_samples=num_samples, sampler=sampler,
            fid_threshold=fid_threshold, encode_as_job=encode_as_job, evaluate_as_job=evaluate_as_job,
            encode_timeout_hours=encode_timeout_hours, evaluate_timeout_hours=evaluate_timeout_hours)
        params.set_display_name("check parameters").set_caching_options(False)
        _non_root(params.set_cpu_limit("500m").set_memory_limit("1Gi"))  # reads no store: no credentials
        # encode is cached on the data's identity (a listing: sizes, ETags, mtimes), not on the URI string
        identity = fingerprint(images=images, resolution=resolution, vae=vae, pixel_space=pixel_space,
                               grayscale=grayscale)
        identity.set_display_name("fingerprint images").set_caching_options(False).set_retry(2).after(params)
        _with_credentials(identity.set_cpu_limit("1").set_memory_limit("4Gi"))  # ImageNet: 1.3M listed files
        encoded = encode(images=images, store_uri=store_uri, resolution=resolution, vae=vae,
                         pixel_space=pixel_space, grayscale=grayscale, gpus=step_gpus, dataset_id=identity.output,
                         as_job=encode_as_job, cluster=checked.output, timeout_hours=encode_timeout_hours)
        encoded.set_display_name("encode images").set_caching_options(True).set_retry(2, backoff_duration="60s")
        _knows_its_pod(_sized(_with_credentials(encoded), "16", "64Gi", step_gpus, step_node_selector))

        run = dict(store_uri=store_uri, kfp_run_id=run_id, kfp_run_name=run_name, experiment=experiment,
                   cluster=checked.output)
        pretrained = pretrain(dataset=encoded.outputs["dataset"], config=pretrain_config,
                              overrides=pretrain_overrides, timeout_hours=pretrain_timeout_hours,
                              init_from=pretrain_init_from, resume_from=pretrain_resume_from,
                              pretrained=tune_init_from, **run)
        _launcher(pretrained, "masked pretraining (training job)")

        tuned = tune(dataset=encoded.outputs["dataset"], pretrained=pretrained.outputs["model"], config=tune_config,
                     overrides=tune_overrides, timeout_hours=tune_timeout_hours, **run)
        _launcher(tuned, "unmasking tuning (training job)")

        evaluated = evaluate(model=tuned.outputs["model"], dataset=encoded.outputs["dataset"], ref_stats=ref_stats,
                             num_samples=num_samples, sampler=sampler, gpus=step_gpus, store_uri=store_uri,
                             kfp_run_id=run_id, kfp_run_name=run_name, experiment=experiment,
                             as_job=evaluate_as_job, cluster=checked.output, timeout_hours=evaluate_timeout_hours)
        evaluated.set_display_name("samples and FID").set_caching_options(False).set_retry(1)
        _knows_its_pod(_sized(_with_credentials(evaluated), "8", "64Gi", step_gpus, step_node_selector))

        # FID (float) against the threshold (float): like types, or dsl.If silently skips both branches
        fid = evaluated.outputs["Output"]
        with dsl.If(fid <= fid_threshold, name="fid-within-threshold"):
            registered = register(evaluation=evaluated.outputs["evaluation"], dataset=encoded.outputs["dataset"],
                                  model_name=model_name, kfp_run_id=run_id, kfp_run_name=run_name,
                                  experiment=experiment)
            registered.set_display_name("register in MLflow").set_caching_options(False)
            registered.set_retry(3, backoff_duration="30s").set_cpu_limit("2").set_memory_limit("8Gi")
            _with_credentials(registered)


def _stable_header(text: str) -> str:
    """KFP's header comment prints dict defaults in protobuf map order, which varies between runs:
    print them with sorted keys so that the same code compiles to the same bytes."""

    def sort(match: re.Match) -> str:
        value = json.dumps(ast.literal_eval(match.group(2)), sort_keys=True)
        return f"{match.group(1)}{value}]"

    lines = text.split("\n")
    for i, line in enumerate(lines):
        if not line.startswith("#"):
            break
        lines[i] = re.sub(r"^(#\s+\w+: (?:dict|list) \[Default: )(.*)\]$", sort, line)
    return "\n".join(lines)


# An OCI image reference (the grammar of github.com/distribution/reference): [domain[:port]/]path[:tag][@digest]
_DOMAIN = r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*(?::[0-9]+)?"
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_IMAGE_REF = re.compile(rf"(?:{_DOMAIN}/)?{_COMPONENT}(?:/{_COMPONENT})*(?::[\w][\w.-]{{0,127}})?"
                        r"(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?")


def check_image(image: str) -> str:
    """`image` when it is an OCI image reference (e.g. registry.example.com:5000/team/maskdit:1.0), else UserError."""
    from maskdit.core.config import excerpt
    from maskdit.core.errors import UserError

    if not _IMAGE_REF.fullmatch(image) or len(image.partition("@")[0].rpartition(":")[0] or image) > 255:
        raise UserError(f"--image {excerpt(image)} is not an image reference: use [registry[:port]/]name[:tag]"
                        "[@sha256:digest], e.g. registry.example.com/maskdit:0.1.0")
    return image


def _spec_with_image(image: str):
    """A copy of the pipeline's spec with every step's image, and the training jobs' default, set to `image`."""
    from kfp.pipeline_spec import pipeline_spec_pb2

    spec = pipeline_spec_pb2.PipelineSpec()
    spec.CopyFrom(maskdit_pipeline.pipeline_spec)
    executors = spec.deployment_spec["executors"]
    for name in executors:
        executors[name]["container"]["image"] = image
    spec.root.input_definitions.parameters["image"].default_value.string_value = image
    return spec


def compile_pipeline(path: str | Path = PIPELINE_YAML, image: str | None = None) -> Path:
    """Write the pipeline's IR YAML to `path`; `image` (your registry's) replaces the steps' image and the
    training jobs' default, set in the spec (never spliced into the text)."""
    from kfp.compiler import pipeline_spec_builder

    from maskdit.core.errors import UserError

    path = Path(path)
    try:
        if image is None:
            compiler.Compiler().compile(maskdit_pipeline, str(path))
        else:
            pipeline_spec_builder.write_pipeline_spec_to_file(
                pipeline_spec=_spec_with_image(check_image(image)), pipeline_description=maskdit_pipeline.description,
                platform_spec=maskdit_pipeline.platform_spec, package_path=str(path))
        path.write_text(_stable_header(path.read_text()))
    except OSError as error:
        raise UserError(f"cannot write the pipeline to {str(path)!r} ({error.strerror or error}): pass a writable "
                        "--out") from None
    return path
