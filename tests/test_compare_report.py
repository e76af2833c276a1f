"""`maskdit compare-report`: seeds of one comparison joined into bands, a table and first-reach times.

The comparisons here are written by hand (compare.json as `maskdit compare` writes it), so every
number the report derives can be checked against its definition: means and ranges over seeds,
linear interpolation between evaluation points, the DiT / MaskDiT ratio.
"""

from __future__ import annotations

import json

import pytest

from maskdit.compare.config import CompareConfig, CompareResult, EvalPoint
from maskdit.compare.report import CompareReportConfig, first_reach, run
from maskdit.core.config import ConfigError, build_config


def comparison(tmp_path, seed: int, fids: dict[str, list[float]], accs: dict[str, list[float]],
               load: float = 1.0, **config) -> str:
    """A finished compare.json: 2 arms x len(fids) points at 100 s each, written where compare writes it."""
    out = tmp_path / f"run-s{seed}"
    cfg = CompareConfig(data="d", reference="r", out=str(out), seed=seed, budget_s=100.0 * len(fids["dit"]),
                        eval_points=len(fids["dit"]), **config)
    per_step = {"maskdit": 2, "dit": 1}  # MaskDiT makes twice the steps in the same seconds
    arms = {name: [EvalPoint(point=k + 1, target_s=100.0 * (k + 1), wall_s=100.0 * (k + 1) + seed,
                             steps=per_step[name] * 100 * (k + 1), images=per_step[name] * 6400 * (k + 1),
                             phase="train", fid=f, accuracy=accs[name][k], eval_s=1.0, load=load)
                   for k, f in enumerate(fids[name])] for name in ("maskdit", "dit")}
    result = CompareResult(arms=arms, params=1000, global_batch=64, classifier_accuracy=0.99, reference_n=500,
                           fid_samples=500, device="cpu", plot=str(out / "compare.png"),
                           config=cfg.model_dump(mode="json"), seconds=1234.0)
    out.mkdir()
    (out / "compare.json").write_text(result.model_dump_json())
    return str(out)


FIDS = {0: {"maskdit": [300.0, 150.0, 60.0], "dit": [350.0, 250.0, 120.0]},
        1: {"maskdit": [320.0, 130.0, 40.0], "dit": [330.0, 270.0, 100.0]}}
ACCS = {0: {"maskdit": [0.2, 0.7, 0.95], "dit": [0.1, 0.3, 0.6]},
        1: {"maskdit": [0.3, 0.8, 0.97], "dit": [0.1, 0.5, 0.8]}}


def test_first_reach_is_linear_between_points():
    wall = [100.0, 200.0, 300.0]
    assert first_reach(wall, [300.0, 150.0, 60.0], 200.0, lower_is_better=True) == pytest.approx(100 + 100 * 100 / 150)
    assert first_reach(wall, [300.0, 150.0, 60.0], 400.0, lower_is_better=True) == 100.0  # past it at the first point
    assert first_reach(wall, [300.0, 150.0, 60.0], 50.0, lower_is_better=True) is None
    assert first_reach(wall, [0.2, 0.7, 0.95], 0.9, lower_is_better=False) == pytest.approx(200 + 100 * 0.2 / 0.25)
    # not monotone: the first crossing counts, not a later one
    assert first_reach(wall, [0.5, 0.95, 0.8], 0.9, lower_is_better=False) == pytest.approx(100 + 100 * 0.4 / 0.45)


def test_report_joins_two_seeds_into_bands_and_first_reach_times(tmp_path):
    runs = [comparison(tmp_path, s, FIDS[s], ACCS[s]) for s in (0, 1)]
    cfg = build_config(CompareReportConfig, {"results": runs, "out": str(tmp_path / "report"),
                                             "fid_levels": [200.0, 100.0], "accuracy_levels": [0.5, 0.9]})
    report = run(cfg)
    m, d = report.arms["maskdit"], report.arms["dit"]
    assert [b.fid for b in m] == pytest.approx([310.0, 140.0, 50.0])
    assert [(b.fid_min, b.fid_max) for b in d] == [(330.0, 350.0), (250.0, 270.0), (100.0, 120.0)]
    assert [b.accuracy for b in d] == pytest.approx([0.1, 0.4, 0.7])
    assert [b.wall_s for b in m] == pytest.approx([100.5, 200.5, 300.5])  # seed s ran s seconds over
    assert [b.steps for b in m] == [200.0, 400.0, 600.0]
    reach = {(r.metric, r.level): r for r in report.reach}
    fid100 = reach[("fid", 100.0)]
    assert fid100.maskdit_s == pytest.approx(200.5 + 100 * 40 / 90)  # 140 -> 50 between points 2 and 3
    assert fid100.dit_s is None  # 110 at the end: not within the budget
    acc50 = reach[("accuracy", 0.5)]
    assert acc50.maskdit_s == pytest.approx(100.5 + 100 * 0.25 / 0.5)
    assert acc50.dit_s == pytest.approx(200.5 + 100 * 0.1 / 0.3)
    assert acc50.ratio == pytest.approx(acc50.dit_s / acc50.maskdit_s)
    files = {p.name for p in (tmp_path / "report").iterdir()}
    assert files == {"compare-seeds.png", "report.md", "report.json"}
    assert (tmp_path / "report" / "compare-seeds.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| MaskDiT | 3 | 300 | 600 | 38,400 | 50.0 (40.0-60.0) | 96.0 (95.0-97.0) |" in md
    assert "| FID <= 100 | 245 s | not within the budget | - |" in md
    assert json.loads((tmp_path / "report" / "report.json").read_text())["seeds"] == [0, 1]


def test_default_fid_levels_are_ones_both_arms_reach(tmp_path):
    runs = [comparison(tmp_path, s, FIDS[s], ACCS[s]) for s in (0, 1)]
    report = run(build_config(CompareReportConfig, {"results": runs, "out": str(tmp_path / "report")}))
    fid_rows = [r for r in report.reach if r.metric == "fid"]
    assert [r.level for r in fid_rows] == [220.0, 165.0, 110.0]  # 2, 1.5 and 1 x DiT's best mean FID (110)
    assert all(r.maskdit_s is not None and r.dit_s is not None for r in fid_rows)


@pytest.mark.parametrize("change, key", [({"fid_samples": 100}, "fid_samples"),
                                         ({"sampler": {"cfg_scale": 4.0}}, "sampler.cfg_scale"),
                                         ({"train": {"model": {"patch_size": 2}}}, "train.model.patch_size")])
def test_runs_that_differ_in_more_than_seed_are_refused(tmp_path, change, key):
    runs = [comparison(tmp_path, 0, FIDS[0], ACCS[0]), comparison(tmp_path, 1, FIDS[1], ACCS[1], **change)]
    with pytest.raises(ConfigError, match=f"has {key}=.*only seed and out may differ"):
        run(build_config(CompareReportConfig, {"results": runs, "out": str(tmp_path / "report")}))
    assert not (tmp_path / "report").exists()


def test_bad_inputs_are_one_line_each_and_write_nothing(tmp_path):
    a = comparison(tmp_path, 0, FIDS[0], ACCS[0])
    hot = comparison(tmp_path, 1, FIDS[1], ACCS[1], load=5.5)
    out = str(tmp_path / "report")
    cases = [({"results": [a, a]}, r"seeds \[0, 0\] repeat"),
             ({"results": [a, str(tmp_path / "nowhere")]}, "does not exist; give the compare.json"),
             ({"results": [a, hot], "max_load": 3.0}, "6 points were taken under load above max_load=3 "
                                                      r"\(first: maskdit point 1 at load 5.50\)")]
    for extra, message in cases:
        with pytest.raises(ConfigError, match=message):
            run(build_config(CompareReportConfig, {"out": out, **extra}))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "compare.json").write_text('{"kind": "evaluate"}')
    with pytest.raises(ConfigError, match="is not a compare.json of this maskdit"):
        run(build_config(CompareReportConfig, {"out": out, "results": [a, str(tmp_path / "junk")]}))
    unfinished = json.loads((tmp_path / "run-s1" / "compare.json").read_text())
    unfinished["arms"]["dit"].pop()
    (tmp_path / "run-s1" / "compare.json").write_text(json.dumps(unfinished))
    with pytest.raises(ConfigError, match="has 2 points of arm 'dit', not eval_points=3: an unfinished"):
        run(build_config(CompareReportConfig, {"out": out, "results": [a, hot]}))
    assert not (tmp_path / "report").exists()
    with pytest.raises(ConfigError, match="accuracy_levels"):
        build_config(CompareReportConfig, {"out": out, "results": [a], "accuracy_levels": [90]})


def test_one_seed_is_a_report_without_ranges(tmp_path):
    """A single comparison reports its own numbers (no band to draw, no range to print)."""
    report = run(build_config(CompareReportConfig, {"results": [comparison(tmp_path, 0, FIDS[0], ACCS[0])],
                                                    "out": str(tmp_path / "report")}))
    assert report.seeds == [0] and report.arms["dit"][2].fid_min == report.arms["dit"][2].fid_max == 120.0
    md = (tmp_path / "report" / "report.md").read_text()
    assert md.startswith("Seed [0]; FID from 500 samples against 500 held-out images.\n")
    assert "| MaskDiT | 3 | 300 | 600 | 38,400 | 60.0 | 95.0 | train | 1.00 |" in md
