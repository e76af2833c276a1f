"""The tune step: a light pod that launches unmasking tuning (`maskdit train`) as a PyTorchJob."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Markdown, Metrics, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def tune(dataset: Input[Dataset], pretrained: Input[Model], config: str, overrides: list, store_uri: str,
         kfp_run_id: str, kfp_run_name: str, experiment: str, image: str, backend: str, nodes: int,
         gpus_per_node: int, cpu_request: str, cpu_limit: str, memory_request: str, memory_limit: str,
         shm_size: str, node_selector: dict, tolerations: list, namespace: str, backoff_limit: int,
         queue_name: str, priority_class_name: str, timeout_hours: float, pending_timeout_hours: float,
         local_nproc: int, model: Output[Model], metrics: Output[Metrics], card: Output[Markdown]):
    """Unmasking tuning (`maskdit train`, mask ratio 0 or cosine) from the pretrained model and EMA.

    The checkpoints go to <store_uri>/runs/<run id>/tune; the Model artifact points at the final one;
    metrics and card (the MLflow run, the last sample grid) show it in the KFP UI.
    """
    from components.steps import TrainStep, point, pointed, show_training, train_step

    step = TrainStep(stage="tune", config=config, overrides=overrides, dataset=pointed(dataset),
                     init_from=pointed(pretrained), store_uri=store_uri, kfp_run_id=kfp_run_id,
                     kfp_run_name=kfp_run_name, experiment=experiment, image=image, backend=backend,
                     namespace=namespace, nodes=nodes, gpus_per_node=gpus_per_node, cpu_request=cpu_request,
                     cpu_limit=cpu_limit, memory_request=memory_request, memory_limit=memory_limit, shm_size=shm_size,
                     node_selector=node_selector, tolerations=tolerations, backoff_limit=backoff_limit,
                     queue_name=queue_name, priority_class_name=priority_class_name, timeout_hours=timeout_hours,
                     pending_timeout_hours=pending_timeout_hours, local_nproc=local_nproc)
    result, parent, logs = train_step(step)
    point(model, result.checkpoint, dataset=step.dataset, config=config, stage=step.stage,
          mlflow_parent_run_id=parent, logs=logs)
    show_training(result, metrics, card, "Unmasking tuning")
