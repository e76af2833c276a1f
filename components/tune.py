"""The tune step: a light pod that launches unmasking tuning (`maskdit train`) as a PyTorchJob."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def tune(dataset: Input[Dataset], pretrained: Input[Model], config: str, overrides: list, store_uri: str,
         kfp_run_id: str, kfp_run_name: str, experiment: str, image: str, backend: str, nodes: int,
         gpus_per_node: int, cpu: str, memory: str, shm_size: str, node_selector: dict, tolerations: list,
         namespace: str, timeout_hours: float, local_nproc: int, model: Output[Model]):
    """Unmasking tuning (`maskdit train`, mask ratio 0 or cosine) from the pretrained model and EMA.

    The checkpoints go to <store_uri>/runs/<run id>/tune; the Model artifact points at the final one.
    """
    from components.steps import point, pointed, train_step

    uri, mlflow_run = train_step("tune", config, overrides, pointed(dataset), pointed(pretrained), store_uri,
                                 kfp_run_id, kfp_run_name, experiment, image, backend, nodes, gpus_per_node, cpu,
                                 memory, shm_size, node_selector, tolerations, namespace, timeout_hours, local_nproc)
    point(model, uri, dataset=pointed(dataset), config=config, stage="tune", mlflow_parent_run_id=mlflow_run)
