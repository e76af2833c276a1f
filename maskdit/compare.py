"""`maskdit compare`: MaskDiT against the same network trained unmasked, at equal wall-clock time.

Two arms train on the same data for the same training time on the same machine:
- maskdit: masked pretraining (the `pretrain` config: mask 0.5 + MAE) for (1 - tune_share) of the
  budget, then the unmasking tuning (the `tune` config: zero or cosine ratio) for the rest;
- dit: the `pretrain` config with mask.ratio 0 and mae_weight 0 - the same network, decoder
  included, so parameters and FLOPs a token are the paper's comparison.

Every `budget_s / eval_points` seconds of training, both arms are scored: FID of `fid_samples`
images (fixed labels i mod K and seeds seed + i, so both arms draw the same noise) against
held-out real data, and the accuracy of a digit classifier (maskdit.evaluation.classifier) trained on the
training data. Evaluation time does not count: training runs in segments of `maskdit train`
itself (`train.run` with `max_wall_s`, resuming from the arm's checkpoint), and the clock is the
sum of the segments' loop times (TrainResult.seconds). The arms alternate segment by segment
(which goes first alternates too), so a change in machine load hits both alike: the machine this
runs on may be shared. Segment start-up (building the model, loading the checkpoint) is not
counted either; it is the same for both arms.

Output in `out`: compare.json (both curves), compare.png (FID against wall clock and against
images seen, accuracy against wall clock), a sample grid per arm and point, and the arms'
checkpoint folders. With MLflow: one parent run (params, the plot, compare.json, FID of both arms
as `<arm>_fid`), two child runs (`maskdit`, `dit`: the training metrics, and `fid`, `accuracy`,
`images_seen` at step = seconds of training); the tuning phase is a run under `maskdit`.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from maskdit.core import storage
from maskdit.core.config import ConfigError, StrictModel, build_config, deep_merge
from maskdit.method.diffusion import SamplerConfig
from maskdit.train.config import TrackingConfig, TrainConfig

log = logging.getLogger(__name__)
ARMS = ("maskdit", "dit")
UNLIMITED_STEPS = 10**9  # the arms stop on wall-clock time, never on a step count


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


# ------------------------------------------------------------------------------------------
# The arms: train configs and their segments
# ------------------------------------------------------------------------------------------


def _train_config(cfg: CompareConfig, source: str, what: str, extra: dict[str, Any]) -> TrainConfig:
    """The train config `source` (file or preset) with compare's settings; errors name `what`."""
    from maskdit.train.config import preset_path

    path = preset_path(source)
    if not path.is_file():
        raise ConfigError(f"{what}={source!r} is neither a YAML file nor a preset in maskdit/configs; "
                          "give a train config file or a preset name such as mnist_pretrain")
    import yaml

    data = deep_merge(deep_merge(yaml.safe_load(path.read_text()) or {}, cfg.train), extra)
    return build_config(TrainConfig, data, source=f"{what} ({path}) with compare's train overrides")


@dataclass
class Phase:
    name: str
    cfg: TrainConfig
    seconds: float  # training time of this phase


@dataclass
class Arm:
    name: str
    phases: list[Phase]
    index: int = 0  # the phase now training
    wall_s: float = 0.0
    steps: int = 0  # over all phases
    images: int = 0
    phase_steps: int = 0
    done: bool = False
    run_id: str | None = None  # the arm's MLflow child run
    points: list[EvalPoint] = field(default_factory=list)

    @property
    def phase(self) -> Phase:
        return self.phases[self.index]

    def phase_end(self) -> float:
        return sum(p.seconds for p in self.phases[:self.index + 1])


def build_arms(cfg: CompareConfig) -> dict[str, Arm]:
    """Both arms' train configs, all validated before anything trains."""
    common = {"data": {"uri": cfg.data}, "steps": UNLIMITED_STEPS, "init_from": None, "device": cfg.device,
              "seed": cfg.seed,
              "checkpoint": {"every": UNLIMITED_STEPS, "keep_last": 1},
              "tracking": {"uri": cfg.tracking.uri, "experiment": cfg.tracking.experiment}}
    masked = _train_config(cfg, cfg.pretrain, "pretrain", deep_merge(common, {
        "checkpoint": {"dir": storage.join(cfg.out, "maskdit", "pretrain")}, "tracking": {"run_name": "maskdit"}}))
    if masked.mask.schedule != "constant" or masked.mask.ratio == 0:
        raise ConfigError(f"pretrain={cfg.pretrain!r} masks with schedule {masked.mask.schedule!r}, ratio "
                          f"{masked.mask.ratio}: the masked arm needs a constant ratio > 0 (e.g. mask.ratio=0.5)")
    tune = _train_config(cfg, cfg.tune, "tune", deep_merge(common, {
        "init_from": masked.checkpoint.dir, "checkpoint": {"dir": storage.join(cfg.out, "maskdit", "tune")},
        "tracking": {"run_name": "maskdit-tune"}}))
    if tune.mask.schedule not in ("zero", "cosine"):
        raise ConfigError(f"tune={cfg.tune!r} has mask.schedule {tune.mask.schedule!r}; the unmasking tuning needs "
                          "'zero' or 'cosine'")
    if tune.model != masked.model:
        raise ConfigError(f"tune={cfg.tune!r} has another model than pretrain={cfg.pretrain!r}; give both the same "
                          "model (compare's train.model overrides apply to both)")
    plain = masked.model_copy(update={
        "mask": masked.mask.model_copy(update={"ratio": 0.0}), "mae_weight": 0.0,
        "checkpoint": masked.checkpoint.model_copy(update={"dir": storage.join(cfg.out, "dit", "train")}),
        "tracking": masked.tracking.model_copy(update={"run_name": "dit"})})
    tune_s = cfg.budget_s * cfg.tune_share
    phases = [Phase("pretrain", masked, cfg.budget_s - tune_s)] + ([Phase("tune", tune, tune_s)] if tune_s else [])
    return {"maskdit": Arm("maskdit", phases), "dit": Arm("dit", [Phase("train", plain, cfg.budget_s)])}


def _tune_steps(arms: dict[str, Arm], tune: Phase) -> int:
    """Steps of a cosine tuning (its ratio schedule needs a length): its time at the unmasked arm's step rate."""
    ref = arms["dit"] if arms["dit"].steps else arms["maskdit"]
    return max(1, round(tune.seconds * ref.steps / max(ref.wall_s, 1e-9)))


def advance(arm: Arm, target_s: float, arms: dict[str, Arm], parent_run: str | None, final: bool = False) -> None:
    """Train `arm` in segments (one per phase) until it has trained `target_s` seconds in all; at the `final`
    point a phase that a long step of the one before left no time gets one step (the tuning always runs)."""
    from maskdit.core.tracking import environment
    from maskdit.train.loop import run as train

    while not arm.done and (arm.wall_s < target_s or (final and arm.phase_steps == 0)):
        phase = arm.phase
        if phase.name == "tune" and phase.cfg.mask.schedule == "cosine" and phase.cfg.steps == UNLIMITED_STEPS:
            phase.cfg = phase.cfg.model_copy(update={"steps": _tune_steps(arms, phase)})
        stop_at = min(target_s, arm.phase_end())
        cfg = phase.cfg.model_copy(update={"max_wall_s": max(stop_at - arm.wall_s, 1e-3)})
        parent = arm.run_id if phase.name == "tune" else parent_run
        with environment({"MASKDIT_PARENT_RUN_ID": parent} if parent else {}):
            result = train(cfg)
        if phase.name != "tune":
            arm.run_id = arm.run_id or result.run_id
        new_steps = result.step - arm.phase_steps
        arm.phase_steps = result.step
        arm.steps += new_steps
        arm.images += new_steps * cfg.batch.global_batch
        arm.wall_s += result.seconds
        finished = result.step >= cfg.steps  # a cosine tuning ends with its schedule
        if arm.wall_s >= arm.phase_end() - 1e-9 or finished:
            if arm.index + 1 < len(arm.phases):
                arm.index, arm.phase_steps = arm.index + 1, 0
            else:
                arm.done = finished


# ------------------------------------------------------------------------------------------
# Evaluation: FID against held-out digits, classifier accuracy
# ------------------------------------------------------------------------------------------


@dataclass
class Judge:
    """What scores a model: reference statistics, Inception, and (for digits) a classifier."""

    ref: Any  # fid.FIDStats
    inception: Any  # fid.InceptionFeatures
    classifier: Any | None  # maskdit.evaluation.classifier.Classifier
    classifier_accuracy: float | None
    reference_n: int


def _real_images(uri: str, limit: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, H, W, 3) images and labels (N,) of a dataset, decoded as the pipeline decodes samples."""
    from maskdit.data.shards import load_dataset

    data = load_dataset(uri)
    idx = torch.arange(min(limit or len(data), len(data)))
    x0 = data.draw(idx, generator=torch.Generator().manual_seed(seed))  # (N, C, H, W)
    return data.decode(x0).numpy(), data.labels[idx].numpy()


def make_judge(cfg: CompareConfig, device: torch.device) -> Judge:
    """Reference statistics of the held-out data and, when asked, the digit classifier trained on `data`."""
    from maskdit.evaluation import fid
    from maskdit.evaluation.classifier import train_classifier

    inception = fid.InceptionFeatures(cfg.inception, device)
    if cfg.reference.endswith(".npz"):
        if cfg.classifier:
            raise ConfigError(f"reference={cfg.reference!r} holds statistics, no labelled images to check a "
                              "classifier on; set classifier=false or give a held-out dataset")
        ref = fid.load_stats(cfg.reference)
        return Judge(ref, inception, None, None, ref.n or 0)
    ref_images, ref_labels = _real_images(cfg.reference, cfg.reference_limit, cfg.seed)
    ref = fid.feature_stats(inception.features(_batches(ref_images, cfg.batch_size), progress=True,
                                               total=len(ref_images)))
    classifier = accuracy = None
    if cfg.classifier:
        train_images, train_labels = _real_images(cfg.data, None, cfg.seed)
        if train_labels.max() >= 10:
            raise ConfigError(f"classifier=true: data={cfg.data!r} has {int(train_labels.max()) + 1} classes, the "
                              "digit classifier knows 10; set classifier=false")
        classifier = train_classifier(train_images, train_labels, ref_images, ref_labels, seed=cfg.seed)
        accuracy = classifier.heldout_accuracy
        log.info("digit classifier: %.3f on %d held-out real images", accuracy, len(ref_labels))
    return Judge(ref, inception, classifier, accuracy, len(ref_images))


def _batches(images: np.ndarray, size: int):
    return (images[i:i + size] for i in range(0, len(images), size))


def evaluate_arm(cfg: CompareConfig, arm: Arm, judge: Judge, point: int, device: torch.device) -> EvalPoint:
    """FID (and accuracy) of the arm's newest EMA weights; a 10-row grid (one class a row) beside."""
    from maskdit.evaluation import fid
    from maskdit.evaluation.sample import generate, save_grid
    from maskdit.evaluation.sources import load_sampler_source

    started = time.perf_counter()
    source = load_sampler_source(arm.phase.cfg.checkpoint.dir if arm.phase_steps else
                                 arm.phases[arm.index - 1].cfg.checkpoint.dir, device, cfg.data)
    classes = source.config.num_classes
    labels = torch.arange(cfg.fid_samples) % classes  # (N,) balanced
    images = generate(source.precond, source.decode, labels, [cfg.seed + i for i in range(cfg.fid_samples)],
                      cfg.sampler, cfg.batch_size)  # (N, H, W, 3) uint8
    score = fid.fid_from_stats(fid.feature_stats(judge.inception.features(_batches(images, cfg.batch_size))),
                               judge.ref)
    accuracy = judge.classifier.accuracy(images, labels.numpy()) if judge.classifier is not None else None
    per_class = min(8, cfg.fid_samples // classes)
    if per_class:
        order = [c + classes * j for c in range(classes) for j in range(per_class)]  # row c: class c
        save_grid(images[order], classes, storage.join(cfg.out, arm.name, f"grid-{point}.png"))
    phase = arm.phase.name if arm.phase_steps or arm.index == 0 else arm.phases[arm.index - 1].name
    return EvalPoint(point=point, target_s=cfg.budget_s * point / cfg.eval_points, wall_s=round(arm.wall_s, 3),
                     steps=arm.steps, images=arm.images, phase=phase, fid=score, accuracy=accuracy,
                     eval_s=round(time.perf_counter() - started, 3), load=os.getloadavg()[0])


# ------------------------------------------------------------------------------------------
# Plot and tracking
# ------------------------------------------------------------------------------------------


def plot(result: CompareResult, path: str, title: str) -> None:
    """FID against wall clock and against images seen; accuracy against wall clock (when measured)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_acc = any(p.accuracy is not None for pts in result.arms.values() for p in pts)
    fig, axes = plt.subplots(1, 3 if with_acc else 2, figsize=(15 if with_acc else 10, 4.2))
    styles = {"maskdit": dict(color="tab:red", marker="o", label="MaskDiT (mask 0.5 + tuning)"),
              "dit": dict(color="tab:blue", marker="s", label="DiT (unmasked)")}
    for name, pts in result.arms.items():
        axes[0].plot([p.wall_s for p in pts], [p.fid for p in pts], **styles[name])
        axes[1].plot([p.images for p in pts], [p.fid for p in pts], **styles[name])
        if with_acc:
            axes[2].plot([p.wall_s for p in pts], [100 * p.accuracy for p in pts], **styles[name])
    for ax, xlabel, ylabel in zip(axes, ("training wall clock (s)", "training images seen", "training wall clock (s)"),
                                  ("FID (lower is better)", "FID (lower is better)", "classifier accuracy (%)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class _Tracker:
    """The comparison's MLflow parent run, written through the client (the arms' training runs nest under it)."""

    def __init__(self, cfg: CompareConfig):
        from maskdit.core.tracking import check_reachable, connect, tracking_uri

        uri = tracking_uri(cfg.tracking.uri)
        self.client = self.run_id = None
        if uri is None:
            return
        import mlflow

        uri = connect(uri)
        check_reachable(uri)
        self.client = mlflow.MlflowClient()
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or cfg.tracking.experiment
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        parent = os.environ.get("MASKDIT_PARENT_RUN_ID")
        tags = {"maskdit.step": "compare", **({"mlflow.parentRunId": parent} if parent else {})}
        self.run_id = self.client.create_run(experiment_id, run_name=cfg.tracking.run_name, tags=tags).info.run_id
        from mlflow.entities import Param

        from maskdit.core.config import flatten

        params = [Param(k, str(v)[:6000]) for k, v in storage.redact(flatten(cfg.model_dump(mode="json"))).items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def point(self, arm: Arm, p: EvalPoint) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now, step = int(time.time() * 1000), int(round(p.wall_s))
        values = {"fid": p.fid, "images_seen": p.images, "train_steps": p.steps,
                  **({"accuracy": p.accuracy} if p.accuracy is not None else {})}
        if arm.run_id:
            self.client.log_batch(arm.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])
        self.client.log_batch(self.run_id, metrics=[Metric(f"{arm.name}_{k}", float(v), now, step)
                                                    for k, v in values.items()])

    def finish(self, files: list[str], status: str) -> None:
        if self.client is None:
            return
        for path in files:
            self.client.log_artifact(self.run_id, path)
        self.client.set_terminated(self.run_id, status)


# ------------------------------------------------------------------------------------------
# The command
# ------------------------------------------------------------------------------------------


def run(cfg: CompareConfig) -> CompareResult:
    """Train both arms to every evaluation point in turn, score them, write compare.json and compare.png."""
    import tempfile

    from tqdm import tqdm

    from maskdit.core.distributed import resolve_device

    started = time.perf_counter()
    arms = build_arms(cfg)
    result_uri = storage.join(cfg.out, "compare.json")
    if storage.exists(result_uri) or any(storage.list_uris(storage.join(cfg.out, name)) for name in ARMS):
        raise ConfigError(f"out={cfg.out!r} already holds a comparison (its clock cannot be resumed); choose a new out")
    storage.check_writable(result_uri, "comparison folder (out)")
    device = resolve_device(cfg.device, 0)
    judge = make_judge(cfg, device)
    tracker = _Tracker(cfg)
    status = "FAILED"
    points = [cfg.budget_s * k / cfg.eval_points for k in range(1, cfg.eval_points + 1)]
    try:
        with tqdm(total=round(2 * cfg.budget_s), unit="s", desc="compare (s of training)", dynamic_ncols=True) as bar:
            for k, target in enumerate(points, start=1):
                order = ARMS if k % 2 else ARMS[::-1]  # who trains first alternates: load drifts hit both
                for name in order:
                    arm = arms[name]
                    before = arm.wall_s
                    advance(arm, target, arms, tracker.run_id, final=k == cfg.eval_points)
                    bar.update(round(arm.wall_s - before, 1))
                for name in ARMS:
                    p = evaluate_arm(cfg, arms[name], judge, k, device)
                    arms[name].points.append(p)
                    tracker.point(arms[name], p)
                    acc = f", accuracy {p.accuracy:.3f}" if p.accuracy is not None else ""
                    tqdm.write(f"{name:8s} {p.wall_s:7.1f} s  {p.steps:6d} steps  {p.images:8d} images  "
                               f"FID {p.fid:7.2f}{acc}  ({p.phase}, load {p.load:.1f})")
        masked = arms["maskdit"].phases[0].cfg
        from maskdit.method.model import MaskDiT

        params = sum(t.numel() for t in MaskDiT(masked.model).parameters())
        result = CompareResult(
            arms={name: arm.points for name, arm in arms.items()}, params=params,
            global_batch=masked.batch.global_batch, classifier_accuracy=judge.classifier_accuracy,
            reference_n=judge.reference_n, fid_samples=cfg.fid_samples, device=str(device),
            plot=storage.join(cfg.out, "compare.png"), config=storage.redact(cfg.model_dump(mode="json")),
            seconds=round(time.perf_counter() - started, 1), run_id=tracker.run_id)
        with tempfile.TemporaryDirectory() as tmp:
            png, js = os.path.join(tmp, "compare.png"), os.path.join(tmp, "compare.json")
            m = masked.model
            plot(result, png, f"{m.depth}x{m.hidden_size} + decoder {m.decoder_depth}x{m.decoder_hidden_size}, "
                              f"patch {m.patch_size} ({m.num_tokens} tokens), {params / 1e6:.2f}M params, batch "
                              f"{masked.batch.global_batch}, {cfg.budget_s:.0f} s an arm on {device}")
            with open(js, "w") as f:
                f.write(result.model_dump_json(indent=1))
            storage.put_file(png, result.plot)
            storage.put_file(js, result_uri)
            status = "FINISHED"
            tracker.finish([png, js], status)
        return result
    finally:
        if status != "FINISHED":
            tracker.finish([], status)


def summary(result: CompareResult) -> str:
    """Final FIDs of both arms, one line."""
    last = {name: pts[-1] for name, pts in result.arms.items() if pts}
    return ", ".join(f"{name} FID {p.fid:.2f} at {p.wall_s:.0f} s ({p.steps} steps)" for name, p in last.items())


