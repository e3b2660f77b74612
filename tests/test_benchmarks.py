"""Smoke runs of every benchmark's `--quick` mode (benchmarks/*.py), writing to a tmp folder.

Each script runs as a subprocess (its own torch threads and, where it uses Ray, its own local Ray: RAY_ADDRESS
is removed from its environment so it never joins the session's `ray_local` cluster). These check that every
code path of the full run still works and the outputs are well formed; they assert nothing about timings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_quick(script: str, out: Path, *extra: str) -> dict:
    """Run benchmarks/SCRIPT --quick --out OUT; return NAME_quick.json parsed, after checking .md and .png."""
    before = committed_results()
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, str(REPO / "benchmarks" / script), "--quick", "--out", str(out), *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout (tail) ---\n{proc.stdout[-4000:]}"
                    f"\n--- stderr (tail) ---\n{proc.stderr[-4000:]}")
    stem = out / f"{Path(script).stem}_quick"
    result = json.loads(stem.with_suffix(".json").read_text())
    assert "settings" in result and result["settings"]["quick"] is True
    md = stem.with_suffix(".md").read_text().splitlines()
    assert any(line.startswith("|---") for line in md), "the .md has no table"
    assert any(line.startswith("| ") for line in md)
    assert stem.with_suffix(".png").read_bytes()[:8] == PNG_MAGIC
    assert committed_results() == before, "a --quick --out run touched benchmarks/results"
    return result


def committed_results() -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (REPO / "benchmarks" / "results").glob("*")}


@pytest.mark.slow
def test_scoring_cost_quick(tmp_path):
    r = run_quick("scoring_cost.py", tmp_path)
    assert r["machine"]["torch"] and r["machine"]["backpack"] and r["machine"]["git_commit"] is not None
    assert r["partial"] is False and r["cells"]
    methods = ["train_step", "forward", "ray_dal_all", "ray_dal_last", "vmap", "vmap_chunked", "loop", "backpack"]
    for cell in r["cells"]:
        for m in methods:  # every method ran, none skipped or raised
            assert cell["methods"][m]["status"] == "ok", (cell["model"], cell["batch_size"], m, cell["methods"][m])
        for m in ("vmap", "vmap_chunked", "loop", "backpack"):
            assert "max_rel_diff_vs_ray_dal_all" in cell["methods"][m]
        assert all(cell["ratios"][k] is not None for k in cell["ratios"])
    assert r["agreement"]["ok"], r["agreement"]
    assert set(r["float64_anchor"]) == set(r["settings"]["models"])


@pytest.mark.slow
def test_layer_choice_quick(tmp_path):
    r = run_quick("layer_choice.py", tmp_path)
    assert r["machine"]["torch"] and r["machine"]["date_utc"] and r["machine"]["load_average_at_end"]
    assert len(r["layers"]) >= 2  # every distinct conv shape of the quick model
    for row in r["layers"]:
        assert set(row["seconds"]) == {"ghost", "materialize", "weight_grad"}
        assert row["winner"] in ("ghost", "materialize") and row["current_rule"] in ("ghost", "materialize")
    assert r["summary"]["shapes_x_batch"] == len(r["layers"])
    assert {row["in_channels_per_group"] for row in r["narrow"]} == {3, 6}  # the cnn's conv1 and conv2
    for row in r["narrow"]:
        assert set(row["seconds"]) == {"patches", "grouped", "weight_grad"} and row["rule"] in ("patches", "grouped")
    (e2e,) = r["end_to_end"]
    assert set(e2e["seconds"]) == {"train_step", "auto", "ghost", "materialize", "auto_previous_rule"}
    assert all(v < 1e-2 for v in e2e["max_rel_diff_vs_auto"].values()), e2e["max_rel_diff_vs_auto"]


@pytest.mark.slow
def test_pipeline_efficiency_quick(tmp_path, cifar10_dir):
    r = run_quick("pipeline_efficiency.py", tmp_path, "--data-dir", str(cifar10_dir))
    assert r["machine"]["torch"] and r["machine"]["ray"] and r["machine"]["git_commit"] is not None
    (st,) = r["studies"]
    assert {"1", "2"} <= set(st["summary"])
    for k in ("1", "2"):
        s = st["summary"][k]
        assert s["efficiency"] > 0 and s["rate"] > 0 and s["n"] == 1
    assert st["summary"]["speedup_2_vs_1"] > 0
    assert all(run["num_scored"] == st["pool_rows"] for run in st["runs"])
    assert any("parallel_inprocess" in run for run in st["runs"])  # the k-process baseline ran
    assert r["decode_alternatives"]["status"] == "ok"
    assert r["findings"]


@pytest.mark.slow
def test_pipeline_efficiency_quick_on_warm_actors(tmp_path, cifar10_dir):
    r = run_quick("pipeline_efficiency.py", tmp_path, "--data-dir", str(cifar10_dir), "--lifetime", "run",
                  "--name", "pipeline_efficiency_quick")
    (st,) = r["studies"]
    assert r["settings"]["lifetime"] == st["lifetime"] == "run"
    assert set(st["first_passes"]) == {"1", "2"}  # an untimed pass started each k's pool
    for k in ("1", "2"):
        s = st["summary"][k]
        assert s["efficiency"] > 0 and s["n"] == 1
        assert s["actor_init_s"] == 0.0, s  # Ray's timeline: no actor started inside a timed pass
    assert all(run["num_scored"] == st["pool_rows"] for run in st["runs"])


@pytest.mark.slow
def test_pool_scaling_quick(tmp_path):
    r = run_quick("pool_scaling.py", tmp_path)
    assert r["machine"]["torch"] and r["machine"]["ray"]
    sizes = r["settings"]["sizes"]
    assert len(sizes) == 2
    assert sorted(run["n"] for run in r["runs"]) == sizes  # one run per size
    for n in sizes:
        s = r["summary"][str(n)]
        assert s["runs"] == 1 and s["wall_s"] > 0 and s["peak_total_mib"] > 0
    assert {"wall_time_per_sample", "peak_memory"} <= set(r["summary"]["ratios"])
    for run in r["runs"]:
        assert run["num_scored"] == run["n"] - r["settings"]["labeled"]


@pytest.mark.slow
def test_pool_scaling_from_object_storage_quick(tmp_path):
    """--start-moto: the same select from a local moto server and from disk, same query, a throughput ratio."""
    r = run_quick("pool_scaling.py", tmp_path, "--start-moto", "--name", "pool_scaling_quick")
    assert r["settings"]["store"]["moto_started_here"] and r["settings"]["store"]["uri"].startswith("s3://")
    assert sorted(run["source"] for run in r["runs"]) == ["local disk", "object store"]
    (first, other) = r["agreement_with_first_run"]
    assert first["identical"] and other["shared_ids"] >= 0.95 and other["max_score_diff_rel"] < 1e-4
    assert all(run["num_scored"] == r["settings"]["n"] - r["settings"]["labeled"] for run in r["runs"])
    assert r["summary"]["ratios"]["score_throughput_store_vs_disk"] > 0


@pytest.mark.slow
def test_approximation_ratio_quick(tmp_path, cifar10_dir):
    r = run_quick("approximation_ratio.py", tmp_path, "--data-dir", str(cifar10_dir))
    assert r["machine"]["torch"] and r["machine"]["git_commit"] is not None and r["paper_claim"]
    s = r["settings"]
    assert [cp["epoch"] for cp in r["checkpoints"]] == list(range(s["max_epochs"] + 1))
    for cp in r["checkpoints"]:
        assert set(cp["scopes"]) == {"all", "last"}
        for cell in cp["scopes"].values():
            for b in s["budgets"]:
                c = cell["budgets"][str(b)]
                assert len(c["random"]) == s["draws"] and c["top"]["delta"] != 0
                assert abs(c["random_mean"]) < float("inf")  # neither NaN nor infinite
        assert cp["scopes"]["all"]["direct_check"]["rel_diff_vs_cached"] < 1e-4  # the function = the cached terms
    assert r["findings"]


@pytest.mark.slow
def test_round_time_quick(tmp_path, cifar10_dir):
    result = run_quick("round_time.py", tmp_path, "--data-dir", str(cifar10_dir))
    (run,) = result["runs"]
    first, last = run["rounds"]
    assert (first["round"], last["round"]) == (0, 1) and first["train_workers"] == last["train_workers"] == 0
    assert first["eval"] is None and first["score"] > 0  # the test set rode in round 0's scoring pass
    assert last["eval"] > 0 and last["score"] is None  # the last round tests on its own
    for row in run["rounds"]:
        assert row["overhead_ratio"] >= 1 and row["other"] >= -1e-6  # the parts never exceed the round
    assert first["non_train_ratio"] > 0 and run["in_process"]["test_images"] == 200
