"""The DAG's first steps: the run's cluster settings and every step's parameters checked before anything runs."""

from kfp import dsl

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def settings(image: str, backend: str, job_api: str, runtime: str, namespace: str, nodes: int, gpus_per_node: int,
             cpu_request: str, cpu_limit: str, memory_request: str, memory_limit: str, shm_size: str,
             node_selector: dict, tolerations: list, backoff_limit: int, queue_name: str, priority_class_name: str,
             pending_timeout_hours: float, local_nproc: int, grace_period_s: float) -> dict:
    """The pipeline's cluster parameters as `ClusterSettings` (components/cluster.py): a bad value fails
    this step, naming the parameter, before any data is encoded or any GPU is taken."""
    values = dict(locals())  # before the import below adds a name to them
    from components.steps import cluster_settings

    return cluster_settings(values)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def check_parameters(cluster: dict, images: str, resolution: int, vae: str, pixel_space: bool, grayscale: bool,
                     pretrain_config: str, pretrain_overrides: list, tune_config: str, tune_overrides: list,
                     pretrain_init_from: str, pretrain_resume_from: str, tune_init_from: str,
                     pretrain_timeout_hours: float, tune_timeout_hours: float, step_gpus: int, ref_stats: str,
                     num_samples: int, sampler: dict, fid_threshold: float, encode_as_job: bool,
                     evaluate_as_job: bool, encode_timeout_hours: float, evaluate_timeout_hours: float):
    """Every step's config built from the run's parameters (components/parameters.py), the same check
    `maskdit-pipeline submit` makes: a bad value fails here, in seconds, naming the parameter."""
    values = dict(locals())  # before the import below adds a name to them
    from components.parameters import check_parameters as check

    check({**values.pop("cluster"), **values})
    print("parameters checked: every step's config is valid")
