"""What `maskdit compare` takes (CompareConfig) and gives (compare.json: CompareResult of EvalPoints)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from maskdit.core.config import StrictModel
from maskdit.method.diffusion import SamplerConfig
from maskdit.train.config import TrackingConfig


class CompareConfig(StrictModel):
    """`maskdit compare`: masked (MaskDiT) vs unmasked (DiT) training of one network at equal wall-clock time."""

    data: str = Field(description="training dataset URI (written by `maskdit encode`)")
    reference: str = Field(description="held-out real data: a dataset URI (FID statistics and the classifier's own "
                                       "accuracy), or reference statistics .npz (e.g. VIRTUAL_imagenet256_labeled.npz)")
    out: str = Field(description="output folder: compare.json, compare.png, grids, checkpoints (must be new)")
    pretrain: str = "mnist_pretrain"  # train config (file or preset) of the masked arm; the dit arm is it unmasked
    tune: str = "mnist_tune"  # train config (file or preset) of the unmasking tuning (mask.schedule zero or cosine)
    train: dict[str, Any] = {}  # overrides for all train configs, e.g. {model: {patch_size: 2}}
    budget_s: float = Field(600.0, gt=0)  # training seconds of each arm (evaluation not counted)
    eval_points: int = Field(4, ge=1)  # evaluate every budget_s / eval_points seconds of training
    tune_share: float = Field(0.1, ge=0, lt=1)  # share of the masked arm's budget spent on unmasking tuning, at the end
    fid_samples: int = Field(250, ge=2)  # generated images per evaluation (labels i mod classes, seeds seed + i)
    reference_limit: int | None = Field(None, ge=2)  # use the first N held-out images; None: all
    sampler: SamplerConfig = SamplerConfig(num_steps=18)  # quick FID: 18 Heun steps, CFG 1.5
    classifier: bool = True  # digit-classifier accuracy (class-conditional 32x32 grey digits, e.g. MNIST)
    batch_size: int = Field(250, ge=1)  # sampling and Inception batch
    inception: str = "bundled"  # Inception weights, as for `maskdit evaluate`
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    tracking: TrackingConfig = Field(default_factory=lambda: TrackingConfig(run_name="compare"))


class EvalPoint(StrictModel):
    """One arm scored at one wall-clock point."""

    point: int  # 1 .. eval_points
    target_s: float  # k * budget_s / eval_points
    wall_s: float  # training seconds actually done (a step overshoots the target a little)
    steps: int  # optimizer steps done, pretraining + tuning
    images: int  # training images seen (steps x global batch)
    phase: str  # pretrain | tune | train
    fid: float
    accuracy: float | None = None
    eval_s: float  # seconds the evaluation took (not counted in wall_s)
    load: float  # 1-minute load average of the machine when the point was reached


class CompareResult(StrictModel):
    """compare.json."""

    kind: Literal["compare"] = "compare"
    arms: dict[str, list[EvalPoint]]
    params: int  # network parameters (the same in both arms)
    global_batch: int
    classifier_accuracy: float | None = None  # the classifier on held-out real digits
    reference_n: int
    fid_samples: int
    device: str
    plot: str
    config: dict[str, Any]
    seconds: float  # the whole comparison, evaluation included
    run_id: str | None = None  # the MLflow parent run
