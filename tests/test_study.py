"""The study runner end to end on a tiny setting: variants x seeds through the real loop, then curves,
AULC, table and plot; a re-run redoes nothing; unfinished runs are reported, not averaged. The seed-by-seed
comparison with a baseline and the per-schedule learning-curve tables, also on summaries built by hand."""

from __future__ import annotations

import importlib.util
import json
import shutil
import statistics

import numpy as np
import pytest
import yaml

from ray_dal.config import ConfigError
from ray_dal.loop.study import (StudyConfig, add_paired, aulc, curve_summary, load_study, paired, summarize,
                                 write_report)

from .conftest import REPO


def study_job():
    spec = importlib.util.spec_from_file_location("study_job", REPO / "jobs" / "study.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    return job


@pytest.fixture
def study_file(tmp_path, cifar10_slice):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({
        "config": str(REPO / "configs" / "cifar10.yaml"),
        "settings": {"data.data_dir": str(cifar10_slice), "loop.initial": 100, "loop.budget": 50, "loop.rounds": 2,
                     "train.max_epochs": 1, "train.num_workers": 0, "scoring.num_scorers": 1,
                     "data.test_size": 200},
        "variants": {"random": {"scoring.strategy": "random"}, "margin": {"scoring.strategy": "margin"}},
        "seeds": [0, 1],
        "out": str(tmp_path / "runs"),
        "panels": {"both": ["random", "margin"]},
        "reference": {"margin": 0.2},
        "baseline": "random",
    }))
    return path


def entry(seeds: list[int], n_labeled: list[int], accuracy: list[list[float]]) -> dict:
    """A summary entry as `summarize` makes it, for these per-seed curves."""
    return {"seeds": seeds, "incomplete_seeds": [], "overrides": {}, "compute_hours": 0.0,
            **curve_summary(n_labeled, accuracy)}


@pytest.fixture
def mixed_summary() -> dict:
    """Baseline 'a'; 'b' shares its schedule and seeds 0, 1; 'c' has another schedule; 'd' shares one seed;
    'e' has not finished."""
    n, other = [100, 150, 200], [100, 200]
    summary = {"a": entry([0, 1], n, [[0.2, 0.3, 0.4], [0.2, 0.4, 0.5]]),
               "b": entry([0, 1, 2], n, [[0.2, 0.2, 0.3], [0.2, 0.2, 0.7], [0.1, 0.1, 0.1]]),
               "c": entry([0, 1], other, [[0.2, 0.5], [0.2, 0.6]]),
               "d": entry([1], n, [[0.2, 0.2, 0.2]]),
               "e": {"seeds": [], "incomplete_seeds": [0, 1], "overrides": {}, "compute_hours": 0.0},
               "f": {**entry([0, 1], n, [[0.2, 0.2, 0.2], [0.2, 0.2, 0.2]]), "overrides": {"data.pool_size": None}}}
    add_paired(summary, "a")
    return summary


def report(summary: dict, folder) -> str:
    """study.md of ``summary`` (baseline 'a'), written by `write_report` into ``folder``."""
    write_report(StudyConfig(config="-", variants={name: {} for name in summary}, baseline="a"), summary, folder,
                 "cmd")
    return (folder / "study.md").read_text()


def curve_tables(markdown: str) -> dict[str, list[str]]:
    """The learning-curve tables of a study.md: schedule line -> the variants in its table."""
    tables: dict[str, list[str]] = {}
    section = markdown.split("Learning curves")[1].split("Paired by seed")[0]
    for line in section.splitlines():
        if line.startswith("Schedule: "):
            rows = tables.setdefault(line, [])
        elif line.startswith("| ") and not line.startswith("| variant"):
            rows.append(line.split(" | ")[0][2:])
    return tables


def test_aulc_is_the_mean_accuracy_over_the_label_range():
    assert aulc(np.array([100, 200, 400]), np.array([0.2, 0.4, 0.4])) == pytest.approx((0.3 * 100 + 0.4 * 200) / 300)
    assert aulc(np.array([100]), np.array([0.25])) == 0.25


def test_paired_is_baseline_minus_variant_seed_by_seed_over_the_seeds_both_finished():
    n = [100, 200, 400]
    base = entry([0, 1, 2, 3], n, [[0.2, 0.3, 0.4], [0.2, 0.4, 0.5], [0.2, 0.3, 0.6], [0.1, 0.1, 0.1]])
    other = entry([1, 2, 3, 5], n, [[0.2, 0.3, 0.4], [0.2, 0.4, 0.5], [0.1, 0.2, 0.2], [0.9, 0.9, 0.9]])
    result = paired(base, other)
    assert result["seeds"] == [1, 2, 3]
    # final: 0.5 - 0.4, 0.6 - 0.5, 0.1 - 0.2; AULC (x300): 120 - 95, 115 - 120, 30 - 55
    for score, differences, ahead in [("final", [0.1, 0.1, -0.1], 2), ("aulc", [25 / 300, -5 / 300, -25 / 300], 1)]:
        got, std = result[score], statistics.stdev(differences)
        assert got["differences"] == pytest.approx(differences, abs=1e-12)
        assert got["mean"] == pytest.approx(sum(differences) / 3, abs=1e-12)
        assert got["std"] == pytest.approx(std, abs=1e-12) and got["se"] == pytest.approx(std / 3 ** 0.5, abs=1e-12)
        assert got["ahead"] == ahead


def test_only_variants_with_the_baseline_schedule_and_two_common_seeds_are_paired(mixed_summary, tmp_path):
    assert "paired" not in mixed_summary["a"] and "unpaired" not in mixed_summary["a"]
    b = mixed_summary["b"]["paired"]
    assert b["baseline"] == "a" and b["seeds"] == [0, 1] and b["final"]["differences"] == pytest.approx([0.1, -0.2])
    assert "another label schedule" in mixed_summary["c"]["unpaired"]
    assert [mixed_summary[v]["unpaired"] for v in "de"] == ["fewer than 2 finished seeds in common with the "
                                                            "baseline"] * 2
    markdown = report(mixed_summary, tmp_path)
    rows = [line for line in markdown.split("Paired by seed")[1].splitlines() if line.startswith("| ")]
    # final: 0.4 - 0.3, 0.5 - 0.7; AULC: 0.3 - 0.225, 0.375 - 0.325 (SE of two differences: half their gap)
    assert rows[1:] == ["| b | a | 0, 1 | -5.00 ± 15.00 | +6.25 ± 1.25 | no | no | yes | yes | 1 of 2 | 2 of 2 |"]
    assert "Left out of the paired table (baselines: a): c (another label schedule" in markdown
    assert "; d, e (fewer than 2 finished seeds" in markdown
    assert mixed_summary["f"]["unpaired"].startswith("other settings than the baseline's besides scoring")


def test_each_variant_is_paired_with_the_baseline_that_shares_its_pool(mixed_summary):
    full = {"data.pool_size": None}
    summary = {"a": mixed_summary["a"], "b": mixed_summary["b"],
               "a_full": {**entry([0, 1], [100, 150, 200], [[0.3, 0.3, 0.3], [0.3, 0.3, 0.4]]), "overrides": full},
               "f": {**entry([0, 1], [100, 150, 200], [[0.2, 0.2, 0.2], [0.2, 0.2, 0.2]]), "overrides": full}}
    add_paired(summary, ["a", "a_full"])
    assert (summary["b"]["paired"]["baseline"], summary["f"]["paired"]["baseline"]) == ("a", "a_full")
    assert summary["f"]["paired"]["final"]["differences"] == pytest.approx([0.1, 0.2])
    assert "paired" not in summary["a_full"] and "unpaired" not in summary["a_full"]


def test_learning_curves_get_one_table_per_label_schedule(mixed_summary, tmp_path):
    assert curve_tables(report(mixed_summary, tmp_path)) == {
        "Schedule: 100 labels, then 2 queries of 50 (200 at the end)": ["a", "b", "d", "f"],
        "Schedule: 100 labels, then 1 query of 100 (200 at the end)": ["c"]}
    mixed_summary["c"] = entry([0], [100, 150, 400], [[0.2, 0.3, 0.4]])
    assert "Schedule: labels 100, 150, 400" in curve_tables(report(mixed_summary, tmp_path))


def test_a_study_runs_every_variant_and_seed_and_summarises_them(ray_local, study_file, tmp_path):
    job = study_job()
    job.main([str(study_file), "--seeds", "1"])  # one seed first (as on one of several machines)
    assert sorted(p.name for p in (tmp_path / "runs").glob("*/seed_*")) == ["seed_1", "seed_1"]
    partial = json.loads((tmp_path / "runs" / "study.json").read_text())
    assert partial["variants"]["margin"]["seeds"] == [1] and partial["variants"]["margin"]["incomplete_seeds"] == [0]
    assert partial["command"] == f"python jobs/study.py {study_file}"  # reproduces the whole study
    job.main([str(study_file)])  # the rest: seed 0
    report = json.loads((tmp_path / "runs" / "study.json").read_text())["variants"]
    for name in ("random", "margin"):
        curves = []
        for seed in (0, 1):
            lines = (tmp_path / "runs" / name / f"seed_{seed}" / "metrics.jsonl").read_text().splitlines()
            rows = [json.loads(line) for line in lines]
            assert [m["n_labeled"] for m in rows] == [100, 150, 200] and {m["strategy"] for m in rows} == {name}
            curves.append([m["test_accuracy"] for m in rows])
        variant, acc = report[name], np.array(curves)
        assert variant["seeds"] == [0, 1] and variant["n_labeled"] == [100, 150, 200]
        np.testing.assert_allclose(variant["accuracy"], acc)
        np.testing.assert_allclose(variant["accuracy_mean"], acc.mean(0))
        np.testing.assert_allclose(variant["accuracy_std"], acc.std(0))
        assert variant["final_mean"] == pytest.approx(acc[:, -1].mean())
        assert variant["aulc_mean"] == pytest.approx(np.mean([np.trapezoid(a, [100, 150, 200]) / 100 for a in acc]))
    per_seed = {name: np.array(report[name]["accuracy"]) for name in ("random", "margin")}  # baseline: random
    final = per_seed["random"][:, -1] - per_seed["margin"][:, -1]
    area = [np.trapezoid(r - m, [100, 150, 200]) / 100 for r, m in zip(per_seed["random"], per_seed["margin"])]
    pair = report["margin"]["paired"]
    assert pair["baseline"] == "random" and pair["seeds"] == [0, 1] and "paired" not in report["random"]
    for score, differences in (("final", final), ("aulc", area)):
        assert pair[score]["differences"] == pytest.approx(differences, abs=1e-12)
        assert pair[score]["mean"] == pytest.approx(np.mean(differences), abs=1e-12)
        assert pair[score]["se"] == pytest.approx(abs(differences[0] - differences[1]) / 2, abs=1e-12)
        assert pair[score]["ahead"] == sum(d > 0 for d in differences)
    assert (tmp_path / "runs" / "study.png").stat().st_size > 1000
    table = (tmp_path / "runs" / "study.md").read_text()
    assert "| margin |" in table and "| 20.00 |" in table and f"python jobs/study.py {study_file}" in table
    assert f"| margin | random | 0, 1 | {100 * pair['final']['mean']:+.2f} ± {100 * pair['final']['se']:.2f} | " in table

    runs = tmp_path / "runs"
    stamps = {p: p.stat().st_mtime_ns for p in runs.rglob("round_*/*")}
    job.main([str(study_file)])  # everything finished: nothing is run again
    assert {p: p.stat().st_mtime_ns for p in runs.rglob("round_*/*")} == stamps

    shutil.rmtree(runs / "margin" / "seed_1" / "round_002")  # as if that run were still going
    study, base = load_study(study_file)
    summary = summarize(study, base)
    assert summary["margin"]["seeds"] == [0] and summary["margin"]["incomplete_seeds"] == [1]


def test_bad_study_files_are_refused_before_anything_runs(tmp_path, study_file):
    values = yaml.safe_load(study_file.read_text())
    for change, message in [({"seed": [0]}, "unknown key"), ({"panels": {"p": ["nope"]}}, "not in 'variants'"),
                            ({"baseline": "nope"}, "baseline 'nope' is not in 'variants'"),
                            ({"variants": {"x": {"scoring.strategy": "nope"}}, "panels": {}, "baseline": None},
                             "study variant 'x'")]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(yaml.safe_dump({**values, **change}))
        with pytest.raises(ConfigError, match=message):
            load_study(bad)
    with pytest.raises(ConfigError, match=r"seeds \[7\] are not in the study"):
        study_job().main([str(study_file), "--seeds", "7"])
