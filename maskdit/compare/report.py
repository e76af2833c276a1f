"""`maskdit compare-report`: several seeds of one comparison as one answer (bands, a table, who gets there first).

A comparison (`maskdit compare`) is one seed: one initialisation, one data order, one set of
sampling seeds. Its curves alone cannot say whether a gap between the arms is larger than the
spread of a rerun. This report takes the compare.json of runs that differ only in `seed` (and
`out`, `tracking`), and writes:

- compare-seeds.png: FID against wall clock and against images seen, accuracy against wall clock;
  each arm's mean over the seeds as a line, the range between seeds (min .. max) as a band;
- report.md: a table of every point (mean and range over the seeds, the highest load average
  seen at that point), and the wall clock at which each arm's mean curve first reaches given FID
  and accuracy levels (linear between evaluation points), with the ratio DiT / MaskDiT;
- report.json: the same numbers (CompareReport).

Points are matched by their index: every run has the same evaluation points (the configs are
checked to be equal). Wall clock and images seen are the means over the seeds at a point.
"""

from __future__ import annotations

import math
import os
import tempfile
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from maskdit.compare.config import CompareResult, EvalPoint
from maskdit.compare.plot import arm_style, label_and_save
from maskdit.core import storage
from maskdit.core.config import ConfigError, StrictModel, flatten

FREE_KEYS = ("seed", "out", "tracking.")  # what may differ between the runs of one report


class CompareReportConfig(StrictModel):
    """`maskdit compare-report`: the seeds of one comparison as bands, a table and first-reach times."""

    results: list[str] = Field(min_length=1, description="compare.json files, or the `out` folders that hold them "
                                                         "(runs of one comparison that differ only in seed)")
    out: str = Field(description="folder for compare-seeds.png, report.md and report.json")
    fid_levels: list[float] | None = None  # FID levels for the first-reach table; None: 2x, 1.5x and 1x the
    #                                        worse arm's best mean FID (levels both arms reach)
    accuracy_levels: list[float] = [0.5, 0.8, 0.9]  # accuracy levels for the first-reach table (fractions)
    max_load: float | None = Field(None, gt=0)  # points whose load average was above this are refused: the
    #                                             machine was not quiet enough to time them; None: no check

    @model_validator(mode="after")
    def _levels(self) -> CompareReportConfig:
        bad = [a for a in self.accuracy_levels if not 0 < a <= 1]
        if bad:
            raise ValueError(f"accuracy_levels: {bad} are not fractions in (0, 1]; e.g. accuracy_levels=[0.5,0.9]")
        if self.fid_levels is not None and any(not (f > 0 and math.isfinite(f)) for f in self.fid_levels):
            raise ValueError(f"fid_levels: {self.fid_levels} must be positive numbers; e.g. fid_levels=[100,50]")
        return self


class Band(StrictModel):
    """One arm at one evaluation point, over the seeds."""

    point: int
    wall_s: float  # mean training seconds
    steps: float  # mean optimizer steps
    images: float  # mean training images seen
    phase: str
    fid: float  # mean
    fid_min: float
    fid_max: float
    accuracy: float | None = None  # mean
    accuracy_min: float | None = None
    accuracy_max: float | None = None
    load_max: float  # the highest 1-minute load average among the seeds' points


class Reach(StrictModel):
    """When each arm's mean curve first reaches a level (None: not within the budget)."""

    metric: str  # fid | accuracy
    level: float
    maskdit_s: float | None
    dit_s: float | None
    ratio: float | None  # dit_s / maskdit_s: > 1 means MaskDiT gets there first


class CompareReport(StrictModel):
    """report.json."""

    kind: Literal["compare-report"] = "compare-report"
    seeds: list[int]
    arms: dict[str, list[Band]]
    reach: list[Reach]
    plot: str
    markdown: str
    budget_s: float
    fid_samples: int
    reference_n: int
    classifier_accuracy: list[float | None]
    seconds: list[float]  # each comparison's whole time, evaluation included


def _json_uri(uri: str) -> str:
    return uri if uri.endswith(".json") else storage.join(uri, "compare.json")


def load_results(uris: list[str]) -> list[CompareResult]:
    """The comparisons, read and validated; a missing or foreign file is one line naming it."""
    from pydantic import ValidationError

    results = []
    for uri in uris:
        path = _json_uri(uri)
        if not storage.exists(path):
            raise ConfigError(f"results: {storage.redact(path)!r} does not exist; give the compare.json (or the out "
                              "folder) of a finished `maskdit compare`")
        try:
            results.append(CompareResult.model_validate_json(storage.get_bytes(path)))
        except ValidationError as err:
            raise ConfigError(f"results: {storage.redact(path)!r} is not a compare.json of this maskdit "
                              f"({err.errors()[0]['loc']}: {err.errors()[0]['msg']})") from None
    return results


def check_comparable(results: list[CompareResult], uris: list[str]) -> None:
    """The runs are seeds of one comparison: equal configs but for seed/out/tracking, distinct seeds, same points."""
    def fixed(r: CompareResult) -> dict[str, Any]:
        return {k: v for k, v in flatten(r.config).items() if not k.startswith(FREE_KEYS)}

    first = fixed(results[0])
    for uri, r in zip(uris[1:], results[1:]):
        other = fixed(r)
        for key in sorted(set(first) | set(other)):
            if first.get(key) != other.get(key):
                raise ConfigError(f"results: {uri!r} has {key}={other.get(key)!r}, {uris[0]!r} has "
                                  f"{first.get(key)!r}; a report joins seeds of one comparison, so only seed and out "
                                  "may differ")
    seeds = [r.config.get("seed") for r in results]
    if len(set(seeds)) < len(seeds):
        raise ConfigError(f"results: seeds {seeds} repeat; each run of a report needs its own seed (a rerun with the "
                          "same seed measures the machine, not the method)")
    for uri, r in zip(uris, results):
        for arm in ("maskdit", "dit"):
            n = len(r.arms.get(arm, []))
            if n != r.config["eval_points"]:
                raise ConfigError(f"results: {uri!r} has {n} points of arm {arm!r}, not eval_points="
                                  f"{r.config['eval_points']}: an unfinished comparison; rerun it")


def _bands(points: list[list[EvalPoint]]) -> list[Band]:
    """Per point index: means and ranges over the seeds (`points[s][k]`: seed s, point k)."""
    bands = []
    for k in range(len(points[0])):
        at = [pts[k] for pts in points]
        fid = np.array([p.fid for p in at])
        acc = [p.accuracy for p in at]
        has_acc = all(a is not None for a in acc)
        bands.append(Band(
            point=at[0].point, wall_s=float(np.mean([p.wall_s for p in at])),
            steps=float(np.mean([p.steps for p in at])), images=float(np.mean([p.images for p in at])),
            phase=at[0].phase, fid=float(fid.mean()), fid_min=float(fid.min()), fid_max=float(fid.max()),
            accuracy=float(np.mean(acc)) if has_acc else None, accuracy_min=min(acc) if has_acc else None,
            accuracy_max=max(acc) if has_acc else None, load_max=max(p.load for p in at)))
    return bands


def first_reach(wall: list[float], values: list[float], level: float, lower_is_better: bool) -> float | None:
    """The wall clock at which a curve first reaches `level`, linear between points; before the first point
    nothing is known, so a curve already past the level there reaches it at the first point's time."""
    sign = 1.0 if lower_is_better else -1.0
    done = [sign * v <= sign * level for v in values]
    for i, ok in enumerate(done):
        if not ok:
            continue
        if i == 0:
            return wall[0]
        v0, v1 = values[i - 1], values[i]
        return wall[i - 1] + (wall[i] - wall[i - 1]) * (v0 - level) / (v0 - v1)
    return None


def reach_table(arms: dict[str, list[Band]], fid_levels: list[float] | None,
                accuracy_levels: list[float]) -> list[Reach]:
    """First-reach times of both arms' mean curves at the FID and accuracy levels."""
    if fid_levels is None:
        worse_best = max(min(b.fid for b in bands) for bands in arms.values())
        fid_levels = [round(worse_best * f, 1) for f in (2.0, 1.5, 1.0)]
    rows = []
    with_acc = all(b.accuracy is not None for bands in arms.values() for b in bands)
    for metric, levels, lower in (("fid", fid_levels, True), ("accuracy", accuracy_levels if with_acc else [], False)):
        for level in levels:
            t = {name: first_reach([b.wall_s for b in bands], [getattr(b, metric) for b in bands], level, lower)
                 for name, bands in arms.items()}
            ratio = t["dit"] / t["maskdit"] if t["dit"] and t["maskdit"] else None
            rows.append(Reach(metric=metric, level=level, maskdit_s=t["maskdit"], dit_s=t["dit"], ratio=ratio))
    return rows


def plot_bands(arms: dict[str, list[Band]], path: str, title: str) -> None:
    """FID against wall clock and images seen, accuracy against wall clock: mean lines, min..max bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_acc = all(b.accuracy is not None for bands in arms.values() for b in bands)
    fig, axes = plt.subplots(1, 3 if with_acc else 2, figsize=(15 if with_acc else 10, 4.2))
    for name, bands in arms.items():
        style = arm_style(name)
        wall, images = [b.wall_s for b in bands], [b.images for b in bands]
        for ax, x in ((axes[0], wall), (axes[1], images)):
            ax.plot(x, [b.fid for b in bands], **style)
            ax.fill_between(x, [b.fid_min for b in bands], [b.fid_max for b in bands], color=style.get("color"),
                            alpha=0.2, linewidth=0)
        if with_acc:
            axes[2].plot(wall, [100 * b.accuracy for b in bands], **style)
            axes[2].fill_between(wall, [100 * b.accuracy_min for b in bands], [100 * b.accuracy_max for b in bands],
                                 color=style.get("color"), alpha=0.2, linewidth=0)
    label_and_save(fig, axes, title, path)


def _fmt_range(mean: float | None, lo: float | None, hi: float | None, scale: float = 1.0, digits: int = 1) -> str:
    if mean is None:
        return "-"
    if lo == hi:  # one seed: no range to show
        return f"{mean * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f} ({lo * scale:.{digits}f}-{hi * scale:.{digits}f})"


def markdown(report: CompareReport) -> str:
    """report.md: the table of points and the first-reach table."""
    several = len(report.seeds) > 1
    lines = [f"Seed{'s' if several else ''} {report.seeds}; FID from {report.fid_samples} samples against "
             f"{report.reference_n} held-out images" + ("; mean (min-max) over the seeds." if several else "."), "",
             "| arm | point | training s | steps | images seen | FID | accuracy % | phase | load (max) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for k in range(len(report.arms["maskdit"])):
        for name in ("maskdit", "dit"):
            b = report.arms[name][k]
            lines.append(f"| {arm_style(name)['label'].split(' (')[0]} | {b.point} | {b.wall_s:.0f} | {b.steps:.0f} | "
                         f"{b.images:,.0f} | {_fmt_range(b.fid, b.fid_min, b.fid_max)} | "
                         f"{_fmt_range(b.accuracy, b.accuracy_min, b.accuracy_max, 100)} | {b.phase} | "
                         f"{b.load_max:.2f} |")
    lines += ["", "| level | MaskDiT first reaches it at | DiT | DiT / MaskDiT |", "|---|---|---|---|"]
    for r in report.reach:
        level = f"FID <= {r.level:g}" if r.metric == "fid" else f"accuracy >= {100 * r.level:g} %"
        at = ["not within the budget" if t is None else f"{t:.0f} s" for t in (r.maskdit_s, r.dit_s)]
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else "-"
        lines.append(f"| {level} | {at[0]} | {at[1]} | {ratio} |")
    return "\n".join(lines) + "\n"


def run(cfg: CompareReportConfig) -> CompareReport:
    """Read the comparisons, check they are seeds of one, and write the bands plot, report.md and report.json."""
    results = load_results(cfg.results)
    check_comparable(results, cfg.results)
    if cfg.max_load is not None:
        for uri, r in zip(cfg.results, results):
            hot = [(name, p.point, p.load) for name, pts in r.arms.items() for p in pts if p.load > cfg.max_load]
            if hot:
                name, point, load = hot[0]
                raise ConfigError(f"results: {uri!r}: {len(hot)} points were taken under load above max_load="
                                  f"{cfg.max_load:g} (first: {name} point {point} at load {load:.2f}); rerun that "
                                  "seed on a quiet machine, or raise max_load and say so")
    storage.check_writable(storage.join(cfg.out, "report.json"), "report folder (out)")
    arms = {name: _bands([r.arms[name] for r in results]) for name in ("maskdit", "dit")}
    config = results[0].config
    seeds = [int(r.config["seed"]) for r in results]
    report = CompareReport(
        seeds=seeds, arms=arms, reach=reach_table(arms, cfg.fid_levels, cfg.accuracy_levels),
        plot=storage.join(cfg.out, "compare-seeds.png"), markdown=storage.join(cfg.out, "report.md"),
        budget_s=config["budget_s"], fid_samples=results[0].fid_samples, reference_n=results[0].reference_n,
        classifier_accuracy=[r.classifier_accuracy for r in results], seconds=[r.seconds for r in results])
    train = config.get("train", {}).get("model", {})
    spread = f"{len(seeds)} seeds {seeds}: mean and min-max band" if len(seeds) > 1 else \
        f"one seed ({seeds[0]}): no band"
    title = (f"{spread}; {results[0].params / 1e6:.2f}M params, patch "
             f"{train.get('patch_size', 'preset')}, batch {results[0].global_batch}, {config['budget_s']:g} s an "
             f"arm on {results[0].device}, FID-{results[0].fid_samples}")
    with tempfile.TemporaryDirectory() as tmp:
        png, md, js = (os.path.join(tmp, n) for n in ("compare-seeds.png", "report.md", "report.json"))
        plot_bands(arms, png, title)
        with open(md, "w") as f:
            f.write(markdown(report))
        with open(js, "w") as f:
            f.write(report.model_dump_json(indent=1))
        storage.put_file(png, report.plot)
        storage.put_file(md, report.markdown)
        storage.put_file(js, storage.join(cfg.out, "report.json"))
    return report


def summary(report: CompareReport) -> str:
    """One line: the final mean FIDs and accuracies of both arms."""
    parts = []
    for name, bands in report.arms.items():
        b = bands[-1]
        acc = f", accuracy {100 * b.accuracy:.1f} %" if b.accuracy is not None else ""
        parts.append(f"{name} FID {b.fid:.1f}{acc} at {b.wall_s:.0f} s")
    return f"{len(report.seeds)} seed{'s' if len(report.seeds) > 1 else ''}: " + "; ".join(parts)
