"""The DAG's first step: the run's cluster settings checked before anything runs, handed on as one dict."""

from kfp import dsl

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def settings(image: str, backend: str, namespace: str, nodes: int, gpus_per_node: int, cpu_request: str,
             cpu_limit: str, memory_request: str, memory_limit: str, shm_size: str, node_selector: dict,
             tolerations: list, backoff_limit: int, queue_name: str, priority_class_name: str,
             pending_timeout_hours: float, local_nproc: int) -> dict:
    """The pipeline's cluster parameters as `ClusterSettings` (components/cluster.py): a bad value fails
    this step, naming the parameter, before any data is encoded or any GPU is taken."""
    values = dict(locals())  # the parameters alone: taken before the import below adds a name
    from components.steps import cluster_settings

    return cluster_settings(values)
