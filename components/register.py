"""The register step: the tuned model into the MLflow Model Registry (`maskdit register`)."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Input, Markdown, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def register(model: Input[Model], dataset: Input[Dataset], fid: float, cfg_scale: float, num_steps: int,
             model_name: str, kfp_run_id: str, kfp_run_name: str, experiment: str,
             report: Output[Markdown]) -> NamedTuple("RegisterOutputs", version=str, champion=bool):
    """Register a version of `model_name` (alias `candidate`); move `champion` to it only when its
    FID beats the current champion's."""
    from collections import namedtuple

    from components.steps import pointed, register_step

    version, champion = register_step(pointed(model), pointed(dataset), fid, cfg_scale, num_steps, model_name,
                                      kfp_run_id, kfp_run_name, experiment, report)
    return namedtuple("RegisterOutputs", ["version", "champion"])(version, champion)
