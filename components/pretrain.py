"""The pretrain step: a light pod that launches masked pretraining (`maskdit train`) as a PyTorchJob."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def pretrain(dataset: Input[Dataset], config: str, overrides: list, store_uri: str, kfp_run_id: str,
             kfp_run_name: str, experiment: str, image: str, backend: str, nodes: int, gpus_per_node: int,
             cpu: str, memory: str, shm_size: str, node_selector: dict, tolerations: list, namespace: str,
             timeout_hours: float, local_nproc: int, model: Output[Model]):
    """Masked pretraining (`maskdit train`) as a PyTorchJob, or with torchrun here (backend "local").

    The checkpoints go to <store_uri>/runs/<run id>/pretrain; the Model artifact points at the final one.
    """
    from components.steps import point, pointed, train_step

    uri, mlflow_run = train_step("pretrain", config, overrides, pointed(dataset), "", store_uri, kfp_run_id,
                                 kfp_run_name, experiment, image, backend, nodes, gpus_per_node, cpu, memory,
                                 shm_size, node_selector, tolerations, namespace, timeout_hours, local_nproc)
    point(model, uri, dataset=pointed(dataset), config=config, stage="pretrain", mlflow_parent_run_id=mlflow_run)
