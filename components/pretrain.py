"""The pretrain step: a light pod that launches masked pretraining (`maskdit train`) as a training job."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Markdown, Metrics, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def pretrain(dataset: Input[Dataset], config: str, overrides: list, store_uri: str, kfp_run_id: str,
             kfp_run_name: str, experiment: str, timeout_hours: float, cluster: dict, model: Output[Model],
             metrics: Output[Metrics], card: Output[Markdown], init_from: str = "", resume_from: str = "",
             pretrained: str = ""):
    """Masked pretraining (`maskdit train`) as a training job, or with torchrun here (backend "local").

    The checkpoints go to <store_uri>/runs/<run id>/pretrain; the Model artifact points at the final one;
    metrics and card (the MLflow run, the last sample grid) show it in the KFP UI. `cluster`: the checked
    cluster settings (the settings step's output, components/cluster.py).
    `init_from`: weights to start from (checkpoint or models:/ URI); `resume_from`: a failed run's pretraining
    folder to continue; `pretrained`: no pretraining, the Model artifact points at this URI instead.
    """
    from components.steps import (
        TrainStep,
        point,
        pointed,
        show_training,
        skip_pretraining,
        train_step,
    )

    if pretrained:
        skip_pretraining(pretrained, {"pretrain_init_from": init_from, "pretrain_resume_from": resume_from},
                         model, metrics, card)
        return

    step = TrainStep(stage="pretrain", config=config, overrides=overrides, dataset=pointed(dataset),
                     store_uri=store_uri, kfp_run_id=kfp_run_id, kfp_run_name=kfp_run_name, experiment=experiment,
                     timeout_hours=timeout_hours, cluster=cluster, init_from=init_from, resume_from=resume_from)
    result, parent, logs = train_step(step)
    point(model, result.checkpoint, dataset=step.dataset, config=config, stage=step.stage,
          mlflow_parent_run_id=parent, logs=logs)
    show_training(result, metrics, card, "Masked pretraining")
