"""The two arms of a comparison: their train configs, and training them in segments to a wall-clock point.

Training runs in segments of `maskdit train` itself (`train.run` with `max_wall_s`, resuming from the
arm's checkpoint); an arm's clock is the sum of its segments' loop times (TrainResult.seconds).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from maskdit.compare.config import CompareConfig, EvalPoint
from maskdit.core import storage
from maskdit.core.config import ConfigError, build_config, deep_merge, load_yaml
from maskdit.core.parent_run import parent_env
from maskdit.core.tracking_server import environment
from maskdit.train.config import TrainConfig

ARMS = ("maskdit", "dit")
UNLIMITED_STEPS = 10**9  # the arms stop on wall-clock time, never on a step count


def _train_config(cfg: CompareConfig, source: str, what: str, extra: dict[str, Any]) -> TrainConfig:
    """The train config `source` (file or preset) with compare's settings; errors name `what`."""
    from maskdit.train.config import preset_path

    path = preset_path(source)
    if not path.is_file():
        raise ConfigError(f"{what}={source!r} is neither a YAML file nor a preset in maskdit/configs; "
                          "give a train config file or a preset name such as mnist_pretrain")
    data = deep_merge(deep_merge(load_yaml(path.read_text()) or {}, cfg.train), extra)
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
    from maskdit.train.loop import run as train

    while not arm.done and (arm.wall_s < target_s or (final and arm.phase_steps == 0)):
        phase = arm.phase
        if phase.name == "tune" and phase.cfg.mask.schedule == "cosine" and phase.cfg.steps == UNLIMITED_STEPS:
            phase.cfg = phase.cfg.model_copy(update={"steps": _tune_steps(arms, phase)})
        stop_at = min(target_s, arm.phase_end())
        cfg = phase.cfg.model_copy(update={"max_wall_s": max(stop_at - arm.wall_s, 1e-3)})
        parent = arm.run_id if phase.name == "tune" else parent_run
        with environment(parent_env(parent)):
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
