"""The tune step: a light pod that launches unmasking tuning (`maskdit train`) as a training job."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Markdown, Metrics, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def tune(dataset: Input[Dataset], pretrained: Input[Model], config: str, overrides: list, store_uri: str,
         kfp_run_id: str, kfp_run_name: str, experiment: str, timeout_hours: float, cluster: dict,
         model: Output[Model], metrics: Output[Metrics], card: Output[Markdown]):
    """Unmasking tuning (`maskdit train`, mask ratio 0 or cosine) from the pretrained model and EMA.

    The checkpoints go to <store_uri>/runs/<run id>/tune; the Model artifact points at the final one;
    metrics and card (the MLflow run, the last sample grid) show it in the KFP UI. `cluster`: the checked
    cluster settings (the settings step's output, components/cluster.py).
    """
    from components.steps import TrainStep, point, pointed, show_training, train_step

    step = TrainStep(stage="tune", config=config, overrides=overrides, dataset=pointed(dataset),
                     init_from=pointed(pretrained), store_uri=store_uri, kfp_run_id=kfp_run_id,
                     kfp_run_name=kfp_run_name, experiment=experiment, timeout_hours=timeout_hours, cluster=cluster)
    result, parent, logs = train_step(step)
    point(model, result.checkpoint, dataset=step.dataset, config=config, stage=step.stage,
          mlflow_parent_run_id=parent, logs=logs)
    show_training(result, metrics, card, "Unmasking tuning")
