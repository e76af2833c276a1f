"""The register step: the evaluated model into the MLflow Model Registry (`maskdit register`)."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Markdown, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def register(evaluation: Input[Artifact], dataset: Input[Dataset], model_name: str, kfp_run_id: str,
             kfp_run_name: str, experiment: str,
             report: Output[Markdown]) -> NamedTuple("RegisterOutputs", version=str, champion=bool):
    """Register what the evaluation scored as a version of `model_name` (alias `candidate`); move
    `champion` to it only when its FID beats the current champion's."""
    from collections import namedtuple

    from components.steps import pointed, register_step

    result = register_step(pointed(evaluation), pointed(dataset), model_name, kfp_run_id, kfp_run_name, experiment,
                           report)
    return namedtuple("RegisterOutputs", ["version", "champion"])(result.version, result.champion)
