"""`ray-dal round` and `ray-dal export` on real CIFAR-10 slices: a round whose labels come from a file.

The strongest check of "one round function": fed the labels a simulated run gave itself, `ray-dal round`
reproduces that run's rounds (same models, same queries).
"""

from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import torch

from ray_dal.cli import main as ray_dal_main

from .conftest import JOB_ARGS

CLASSES = "airplane,automobile,bird,cat,deer,dog,frog,horse,ship,truck".split(",")
SEED = JOB_ARGS[JOB_ARGS.index("--seed") + 1]
# The simulated run's settings that a round takes as flags (JOB_ARGS without the simulation's own loop sizes).
ROUND_ARGS = ["--epochs", "2", "--num-workers", "2", "--num-scorers", "1", "--seed", SEED]


def ray_dal(argv: list, capsys) -> str:
    ray_dal_main([str(a) for a in argv])
    return capsys.readouterr().out


def round_argv(pool: Path, labels: Path, run: Path, budget: int = 100, *extra) -> list:
    return ["round", "--pool", pool, "--labels", labels, "--run", run, "--budget", budget, *ROUND_ARGS, *extra]


def assert_same_round(mine: Path, theirs: Path) -> None:
    for name in ("labeled.parquet", "selected.parquet"):
        a, b = pq.read_table(mine / name), pq.read_table(theirs / name)
        assert np.array_equal(a["id"].to_numpy(), b["id"].to_numpy()), name
    np.testing.assert_allclose(pq.read_table(mine / "selected.parquet")["score"].to_numpy(),
                               pq.read_table(theirs / "selected.parquet")["score"].to_numpy(), rtol=1e-5)
    a, b = (torch.load(f / "model.pt", weights_only=True) for f in (mine, theirs))
    for key in b:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def assert_approximation_ratio(folder: Path, pool: Path) -> None:
    """The round's R(Q|S) is the one its own files give: its model, its labeled set (G_S), its query."""
    from ray_dal.config import ModelConfig
    from ray_dal.data import DEFAULT_TRANSFORM, preprocess_batch, read_rows
    from ray_dal.pipeline.actors import load_model
    from ray_dal.scoring import approximation_ratio, labeled_gradient

    def decoded(ids):
        return torch.from_numpy(preprocess_batch(read_rows(pool, ids, ("image",)).to_pydict(), DEFAULT_TRANSFORM)["x"])

    model = load_model(ModelConfig(), torch.load(folder / "model.pt", weights_only=True))
    labeled = pq.read_table(folder / "labeled.parquet")
    grad_s = labeled_gradient(model, (decoded(labeled["id"].to_numpy()), torch.tensor(labeled["label"].to_numpy())))
    query = decoded(pq.read_table(folder / "selected.parquet")["id"].to_numpy())
    m = json.loads((folder / "metrics.json").read_text())
    assert m["approximation_ratio"] == pytest.approx(approximation_ratio(model, query, grad_s).ratio, rel=1e-4)
    assert m["approximation_seconds"] > 0


def metrics(run: Path, r: int) -> dict:
    return json.loads((run / f"round_{r:03d}" / "metrics.json").read_text())


@pytest.mark.slow
def test_rounds_from_labels_files_are_the_simulated_rounds(finished_run, cifar10_slice, tmp_path, capsys):
    pool, run = cifar10_slice / "train.parquet", tmp_path / "run"
    for r in (0, 1):  # the labels the simulation gave itself, round by round (round 1's: round 0's + its query)
        labels = finished_run / f"round_{r:03d}" / "labeled.parquet"
        out = ray_dal(round_argv(pool, labels, run), capsys)
        assert f"round {r}: trained on" in out and str(run / f"round_{r:03d}" / "selected.parquet") in out
        assert_same_round(run / f"round_{r:03d}", finished_run / f"round_{r:03d}")
    assert metrics(run, 1)["n_new"] == 100 and metrics(run, 1)["n_relabeled"] == 0
    assert_approximation_ratio(run / "round_001", pool)
    selected = pq.read_table(run / "round_001" / "selected.parquet")
    assert selected.column_names == ["id", "score", "rank", "pred", "prob"]
    prob = selected["prob"].to_numpy()
    assert np.all((prob >= 0.1) & (prob <= 1)) and np.all((selected["pred"].to_numpy() >= 0))

    # The same labels again: nothing happens, and it says so.
    before = {p: p.stat().st_mtime_ns for p in run.rglob("round_*/*")}
    out = ray_dal(round_argv(pool, finished_run / "round_001" / "labeled.parquet", run), capsys)
    assert out.startswith("nothing to do: round 1") and not (run / "round_002").exists()
    assert {p: p.stat().st_mtime_ns for p in run.rglob("round_*/*")} == before

    # People label the query, correct three earlier labels and hold 50 samples out: the next round.
    labeled = pq.read_table(finished_run / "round_001" / "labeled.parquet")
    truth = dict(zip(*(pq.read_table(pool, columns=[c])[c].to_pylist() for c in ("id", "label"))))
    query = selected["id"].to_pylist()
    ids = labeled["id"].to_pylist() + query
    names = [CLASSES[truth[i]] for i in ids]
    for k in (0, 1, 2):
        names[k] = CLASSES[(truth[ids[k]] + 1) % 10]
    pacsv.write_csv(pa.table({"id": ids, "label": names}), tmp_path / "labels.csv")
    rest = np.setdiff1d(pq.read_table(pool, columns=["id"])["id"].to_numpy(), ids)[:50]
    pq.write_table(pa.table({"id": rest, "label": [truth[i] for i in rest.tolist()]}), tmp_path / "held_out.parquet")
    with pytest.raises(SystemExit) as exit_info:  # names need the run's class names
        ray_dal(round_argv(pool, tmp_path / "labels.csv", run), capsys)
    assert exit_info.value.code == 2 and "are not class indices 0..9" in capsys.readouterr().err
    fresh = tmp_path / "named"
    shutil.copytree(run, fresh)
    with pytest.raises(SystemExit):  # class names are fixed for a run: they cannot be added later
        ray_dal(round_argv(pool, tmp_path / "labels.csv", fresh, 100, "--classes", ",".join(CLASSES)), capsys)
    assert "data.classes: None before" in capsys.readouterr().err

    # A round 2 killed mid-training with other labels left Ray Train checkpoints behind: they are not resumed.
    (run / "ray_train" / "round_002").mkdir(parents=True)
    (run / "ray_train" / "round_002" / "round.json").write_text(json.dumps({"fingerprint": "other labels"}))
    ints = tmp_path / "labels.parquet"
    pq.write_table(pa.table({"id": ids, "label": [CLASSES.index(n) for n in names]}), ints)
    out = ray_dal(round_argv(pool, ints, run, 100, "--eval-labels", tmp_path / "held_out.parquet"), capsys)
    m = metrics(run, 2)
    assert (m["n_labeled"], m["n_new"], m["n_relabeled"], m["n_removed"]) == (len(ids), 100, 3, 0)
    assert 0 <= m["eval_accuracy"] <= 1 and f"eval accuracy {m['eval_accuracy']:.4f}" in out
    assert m["pool_size"] == 2000 - len(ids) - 50
    chosen = pq.read_table(run / "round_002" / "selected.parquet")["id"].to_numpy()
    assert chosen.size == 100 and not np.isin(chosen, ids).any() and not np.isin(chosen, rest).any()
    stored = pq.read_table(run / "round_002" / "labeled.parquet")
    assert dict(zip(stored["id"].to_pylist(), stored["label"].to_pylist())) == \
        {i: CLASSES.index(n) for i, n in zip(ids, names)}


@pytest.fixture(scope="module")
def named_run(ray_local, cifar10_slice, tmp_path_factory) -> Path:
    """One round on a pool WITHOUT labels, labels by class name in a CSV, trained in the driver."""
    folder = tmp_path_factory.mktemp("named")
    table = pq.read_table(cifar10_slice / "train.parquet")
    pq.write_table(table.select(["id", "image"]), folder / "pool.parquet", row_group_size=500)
    first = table.slice(0, 150)
    pacsv.write_csv(pa.table({"id": first["id"], "label": [CLASSES[i] for i in first["label"].to_pylist()]}),
                    folder / "labels.csv")
    ray_dal_main(["round", "--pool", str(folder / "pool.parquet"), "--labels", str(folder / "labels.csv"),
                  "--run", str(folder / "run"), "--budget", "40", "--classes", ",".join(CLASSES),
                  "--epochs", "2", "--num-workers", "0", "--num-scorers", "1", "--strategy", "margin"])
    return folder


def test_export_writes_the_latest_query_for_people(named_run, tmp_path, capsys):
    run = named_run / "run"
    selected = pq.read_table(run / "round_000" / "selected.parquet")
    for fmt, name in (("parquet", "q.parquet"), ("csv", "q.csv")):
        out = ray_dal(["export", "--run", run, "--format", fmt, "--out", tmp_path / name], capsys)
        assert f"wrote the query of round 0 (40 samples) of {run} to {tmp_path / name}" in out
        table = pq.read_table(tmp_path / name) if fmt == "parquet" else pacsv.read_csv(tmp_path / name)
        assert table.column_names == ["id", "score", "rank", "pred", "pred_name", "prob"]
        assert table["id"].to_pylist() == selected["id"].to_pylist()
        assert table["pred_name"].to_pylist() == [CLASSES[p] for p in selected["pred"].to_pylist()]
    ray_dal(["export", "--run", run, "--format", "label-studio", "--out", tmp_path / "tasks.json"], capsys)
    tasks = json.loads((tmp_path / "tasks.json").read_text())
    images = dict(zip(*(pq.read_table(named_run / "pool.parquet")[c].to_pylist() for c in ("id", "image"))))
    assert [t["data"]["ray_dal_id"] for t in tasks] == selected["id"].to_pylist()
    first = tasks[0]
    assert first["data"]["image"] == "data:image/jpeg;base64," + base64.b64encode(images[first["data"]["ray_dal_id"]]).decode()
    prediction = first["predictions"][0]
    assert prediction["model_version"] == "ray_dal round 0"
    assert prediction["result"][0]["value"]["choices"] == [CLASSES[selected["pred"][0].as_py()]]
    assert prediction["score"] == pytest.approx(selected["prob"][0].as_py())


def test_only_dynamic_rounds_measure_the_approximation_ratio(named_run):
    assert "approximation_ratio" not in json.loads((named_run / "run" / "round_000" / "metrics.json").read_text())


def test_the_pools_label_column_is_never_read(named_run, cifar10_slice):
    """The named run's pool has no label column at all, and the labels it trained on are the file's."""
    stored = pq.read_table(named_run / "run" / "round_000" / "labeled.parquet")
    given = pacsv.read_csv(named_run / "labels.csv")
    assert stored["id"].to_pylist() == sorted(given["id"].to_pylist())
    assert [CLASSES[i] for i in stored["label"].to_pylist()] == \
        [n for _, n in sorted(zip(given["id"].to_pylist(), given["label"].to_pylist()))]


BAD_INPUT = [
    ("absent_ids", lambda ids: ({"id": [ids[0], 10**9], "label": ["cat", "dog"]}, ".csv"),
     r"--labels \S+ has 1 id\(s\) that pool \S+ does not hold, e\.g\. \[1000000000\]"),
    ("conflicting_duplicates", lambda ids: ({"id": [ids[0], ids[0]], "label": ["cat", "dog"]}, ".csv"),
     r"gives 1 id\(s\) two different labels"),
    ("label_out_of_range", lambda ids: ({"id": [ids[0], ids[1]], "label": [3, 10]}, ".parquet"),
     r"has labels \[10\] outside \[0, --num-classes = 10\)"),
    ("unknown_name", lambda ids: ({"id": [ids[0]], "label": ["cow"]}, ".csv"),
     r"has label\(s\) \['cow'\] that are not the run's classes \['airplane'"),
    ("empty", lambda ids: ({"id": pa.array([], pa.int64()), "label": pa.array([], pa.string())}, ".csv"),
     r"is empty: it needs at least one \(id, label\) row"),
    ("no_id_column", lambda ids: ({"sample": [ids[0]], "label": ["cat"]}, ".csv"),
     r"needs columns id \(or path\) and label .*lacks \['id'\]"),
    ("budget_too_big", lambda ids: ({"id": [ids[0]], "label": ["cat"]}, ".csv"),
     r"--budget 2000 is invalid: pool \S+ has 2000 samples, 1 labeled and 0 held out, so the budget must be in "
     r"\[1, 1999\]"),
    ("no_images", lambda ids: ({"id": [ids[0]], "label": ["cat"]}, ".csv"), r"no 'image' column"),
    ("wrong_suffix", lambda ids: ({"id": [ids[0]], "label": ["cat"]}, ".txt"), r"must end in \.parquet or \.csv"),
]


@pytest.mark.parametrize("case, make, message", BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_round_refuses_bad_input_and_writes_nothing(cifar10_slice, tmp_path, capsys, case, make, message):
    pool = cifar10_slice / "train.parquet"
    ids = pq.read_table(pool, columns=["id"])["id"].to_pylist()
    columns, suffix = make(ids)
    labels = tmp_path / f"labels{suffix}"
    write = {".parquet": pq.write_table, ".csv": pacsv.write_csv, ".txt": pacsv.write_csv}[suffix]
    write(pa.table(columns), labels)
    if case == "no_images":
        pool = tmp_path / "ids_only.parquet"
        pq.write_table(pq.read_table(cifar10_slice / "train.parquet", columns=["id", "label"]), pool)
    run = tmp_path / "run"
    budget = 2000 if case == "budget_too_big" else 10
    with pytest.raises(SystemExit) as exit_info:
        ray_dal_main(["round", "--pool", str(pool), "--labels", str(labels), "--run", str(run), "--budget",
                      str(budget), "--classes", ",".join(CLASSES)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("ray-dal round: error: ") and len(err.splitlines()) <= 3
    assert re.search(message, err), err
    assert not run.exists()  # nothing written: no run folder, no partial round


def test_export_of_a_run_without_a_query_says_so(tmp_path, capsys):
    with pytest.raises(SystemExit):
        ray_dal_main(["export", "--run", str(tmp_path), "--format", "csv", "--out", str(tmp_path / "q.csv")])
    assert "is not a ray_dal run folder (no config.yaml)" in capsys.readouterr().err
