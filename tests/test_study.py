"""The study runner end to end on a tiny setting: variants x seeds through the real loop, then curves,
AULC, table and plot; a re-run redoes nothing; unfinished runs are reported, not averaged."""

from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pytest
import yaml

from ray_dal.config import ConfigError
from ray_dal.loop.study import aulc, load_study, summarize

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
    }))
    return path


def test_aulc_is_the_mean_accuracy_over_the_label_range():
    assert aulc(np.array([100, 200, 400]), np.array([0.2, 0.4, 0.4])) == pytest.approx((0.3 * 100 + 0.4 * 200) / 300)
    assert aulc(np.array([100]), np.array([0.25])) == 0.25


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
        entry, acc = report[name], np.array(curves)
        assert entry["seeds"] == [0, 1] and entry["n_labeled"] == [100, 150, 200]
        np.testing.assert_allclose(entry["accuracy_mean"], acc.mean(0))
        np.testing.assert_allclose(entry["accuracy_std"], acc.std(0))
        assert entry["final_mean"] == pytest.approx(acc[:, -1].mean())
        assert entry["aulc_mean"] == pytest.approx(np.mean([np.trapezoid(a, [100, 150, 200]) / 100 for a in acc]))
    assert (tmp_path / "runs" / "study.png").stat().st_size > 1000
    table = (tmp_path / "runs" / "study.md").read_text()
    assert "| margin |" in table and "| 20.00 |" in table and f"python jobs/study.py {study_file}" in table

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
                            ({"variants": {"x": {"scoring.strategy": "nope"}}, "panels": {}}, "study variant 'x'")]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(yaml.safe_dump({**values, **change}))
        with pytest.raises(ConfigError, match=message):
            load_study(bad)
    with pytest.raises(ConfigError, match=r"seeds \[7\] are not in the study"):
        study_job().main([str(study_file), "--seeds", "7"])
