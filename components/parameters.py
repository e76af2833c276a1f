"""A run's parameters checked before anything runs: every step's config built from them, the bad one named.

One function, `check_parameters`, used twice: by `maskdit-pipeline submit|schedule` before the KFP
host is contacted, and by the DAG's `check parameters` step (components/settings.py) before any data
is encoded or any GPU is taken. It builds what each step will build from the same values (the encode
config, both training configs with their overrides and the keys the step sets itself, the sampler and
the evaluation config, the cluster settings) and checks what only the run knows (the global batch
against the number of ranks, a finite FID threshold), so a bad value fails in seconds, not after
two weeks of pretraining.
"""

from __future__ import annotations

import math
from typing import Any

from components.cluster import ClusterSettings
from maskdit.core.config import ConfigError, excerpt

# The keys the training steps set themselves (components/steps.py `train_step`), by stage; an override
# of one would silently replace what the KFP UI shows (the dataset, the run's folder, the warm start).
STEP_KEYS = {  # checkpoint.grace_period_s: from the cluster setting grace_period_s, with the pods' grace period
    "pretrain": ("data.uri", "checkpoint.dir", "init_from", "checkpoint.resume_from", "checkpoint.grace_period_s"),
    "tune": ("data.uri", "checkpoint.dir", "init_from", "checkpoint.resume_from", "checkpoint.grace_period_s"),
}
_PLACEHOLDER = "s3://maskdit-parameter-check"  # stands for the URIs the run makes (dataset, checkpoints)


class ParameterError(ConfigError):
    """A pipeline parameter that a step could not use; the message names the parameter."""


def check_overrides(parameter: str, overrides: Any, stage: str) -> list[str]:
    """`overrides` as a list of `key=value` strings, none an option (`-x`) or a key the step sets itself."""
    if not isinstance(overrides, list) or not all(isinstance(item, str) for item in overrides):
        raise ParameterError(f"{parameter}: expected a list of key=value strings, got {excerpt(overrides)}")
    for item in overrides:
        key = item.partition("=")[0].strip()
        if item.startswith("-"):
            raise ParameterError(f"{parameter}: {excerpt(item)} is an option, not a key=value override; to train "
                                 f"another config, set {stage}_config")
        if key in STEP_KEYS[stage]:
            raise ParameterError(f"{parameter}: {key} is set by the {stage} step itself (from the run's "
                                 f"parameters); remove {excerpt(item)} and use the step's own parameter")
    return list(overrides)


def _train_config(stage: str, config: str, overrides: list[str], init_from: str, resume_from: str, world: int):
    from maskdit.core.config import load_config
    from maskdit.train.config import TrainConfig, preset_path

    own = [f"data.uri={_PLACEHOLDER}/datasets/x", f"checkpoint.dir={_PLACEHOLDER}/runs/x/{stage}"]
    own += [f"init_from={init_from}"] if init_from else []
    own += [f"checkpoint.resume_from={resume_from}"] if resume_from else []
    try:
        cfg = load_config(TrainConfig, preset_path(config), own + overrides)
        cfg.batch.split(world)
    except ConfigError as error:
        raise ParameterError(f"{stage}_config={config!r} with {stage}_overrides: {error}") from None
    return cfg


def world_size(cluster: ClusterSettings) -> int:
    """The number of torchrun ranks a training job of these settings runs."""
    if cluster.backend == "local":
        return cluster.local_nproc
    return cluster.nodes * max(cluster.gpus_per_node, 1)


def _positive(name: str, value: Any, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0 or (value == 0 and not allow_zero):
        raise ParameterError(f"{name}={excerpt(value)}: expected a finite number {'>= 0' if allow_zero else '> 0'}")


def check_parameters(values: dict[str, Any]) -> ClusterSettings:
    """Check every step's config from the run's parameters (all of them, defaults applied).

    Returns the cluster settings; raises `ParameterError` naming the first parameter a step would refuse.
    """
    from maskdit.core.config import build_config
    from maskdit.data.encode import EncodeConfig
    from maskdit.evaluation.evaluate import EvaluateConfig
    from maskdit.method.diffusion import SamplerConfig

    cluster = build_config(ClusterSettings, {k: values[k] for k in ClusterSettings.model_fields if k in values},
                           source="the pipeline's cluster parameters")
    build_config(EncodeConfig, dict(input=values["images"], out=_PLACEHOLDER, resolution=values["resolution"],
                                    vae=values["vae"], pixel_space=values["pixel_space"],
                                    grayscale=values["grayscale"]), source="the parameters images, resolution, "
                 "vae, pixel_space, grayscale")
    for name in ("pretrain_timeout_hours", "tune_timeout_hours", "encode_timeout_hours", "evaluate_timeout_hours"):
        _positive(name, values[name])
    _positive("step_gpus", values["step_gpus"], allow_zero=True)
    fid = values["fid_threshold"]
    if isinstance(fid, bool) or not isinstance(fid, (int, float)) or math.isnan(fid):
        raise ParameterError(f"fid_threshold={excerpt(fid)}: expected a number (the FID at or below which the "
                             "model is registered; inf registers every model)")
    world = world_size(cluster)
    pretrained = values["tune_init_from"]
    overrides = {stage: check_overrides(f"{stage}_overrides", values[f"{stage}_overrides"], stage)
                 for stage in ("pretrain", "tune")}
    if pretrained:
        unused = {name: values[name] for name in ("pretrain_init_from", "pretrain_resume_from") if values[name]}
        if unused:
            raise ParameterError(f"tune_init_from={pretrained!r} skips pretraining, so "
                                 f"{', '.join(f'{k}={v!r}' for k, v in unused.items())} would be ignored: leave "
                                 "them empty, or leave tune_init_from empty to pretrain")
    else:
        _train_config("pretrain", values["pretrain_config"], overrides["pretrain"], values["pretrain_init_from"],
                      values["pretrain_resume_from"], world)
    _train_config("tune", values["tune_config"], overrides["tune"], pretrained or f"{_PLACEHOLDER}/pretrain", "",
                  world)
    sampler = values["sampler"]
    if not isinstance(sampler, dict):
        raise ParameterError(f"sampler={excerpt(sampler)}: expected a mapping of SamplerConfig fields")
    try:
        build_config(EvaluateConfig, dict(checkpoint=_PLACEHOLDER, ref_stats=values["ref_stats"] or _PLACEHOLDER,
                                          out=_PLACEHOLDER, num_samples=values["num_samples"],
                                          sampler=build_config(SamplerConfig, sampler, source="sampler")),
                     source="the parameters num_samples, ref_stats")
    except ConfigError as error:
        raise ParameterError(f"{error}") from None
    return cluster
