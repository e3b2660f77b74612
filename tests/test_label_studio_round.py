"""Active learning with people, end to end, as the README tells a new user: a folder of real images and the
labels a team has -> `ray-dal round` -> `label-studio push` -> annotators (the HTTP calls Label Studio's UI
makes) -> `label-studio pull` -> `ray-dal round` -> a second query that excludes everything labeled."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from ray_dal.cli import main as ray_dal_main
from ray_dal.data.image_files import path_id
from ray_dal.integrations.label_studio import API_KEY_ENV, LabelStudio

from .label_studio_server import annotate

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
IMAGES, KNOWN, BUDGET = 600, 100, 30


def ray_dal(*argv) -> None:
    ray_dal_main([str(a) for a in argv])


@pytest.mark.slow
def test_a_real_round_trip_through_label_studio(label_studio, ray_local, cifar10_dir, tmp_path, monkeypatch, capsys):
    table = pq.read_table(cifar10_dir / "test.parquet").take(np.arange(0, 10_000, 10_000 // IMAGES)[:IMAGES])
    folder, truth = tmp_path / "my_images", {}
    for i, (image, label) in enumerate(zip(table["image"].to_pylist(), table["label"].to_pylist())):
        path = f"part_{i % 4}/img_{i:05d}.jpg"
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_bytes(image)
        truth[path] = CLASSES[label]
    known = sorted(truth)[::IMAGES // KNOWN]
    labels = tmp_path / "labels.csv"
    pacsv.write_csv(pa.table({"path": known, "label": [truth[p] for p in known]}), labels)
    run = tmp_path / "run"
    common = ["--pool", folder, "--labels", labels, "--run", run, "--budget", BUDGET]
    ray_dal("round", *common, "--classes", ",".join(CLASSES), "--epochs", "2", "--num-workers", "0",
            "--num-scorers", "1")
    assert "round 0: trained on 100 labels" in capsys.readouterr().out

    monkeypatch.setenv(API_KEY_ENV, label_studio.token)
    url = label_studio.url
    ray_dal("label-studio", "push", "--run", run, "--url", url, "--project", "my images")
    out = capsys.readouterr().out
    assert f"imported {BUDGET} task(s) of round 0 into new project" in out and label_studio.token not in out
    client = LabelStudio(url, label_studio.token)
    project_id, created = client.find_or_create_project("my images", CLASSES)
    assert not created
    query = pq.read_table(run / "round_000" / "selected.parquet")["id"].to_pylist()
    path_of = {path_id(p): p for p in truth}
    skipped = query[:2]
    annotate(url, label_studio.token, project_id, {i: truth[path_of[i]] for i in query[2:]}, skip_ids=skipped)

    ray_dal("label-studio", "pull", "--url", url, "--project", "my images", "--out", labels)
    out = capsys.readouterr().out
    assert f"pulled {BUDGET - 2} label(s)" in out and f"{BUDGET - 2} new, 0 changed" in out and "2 skipped" in out
    merged = pacsv.read_csv(labels)
    assert merged.column_names == ["path", "label"]  # the file keeps naming images by path
    assert dict(zip(merged["path"].to_pylist(), merged["label"].to_pylist())) == \
        {p: truth[p] for p in known} | {path_of[i]: truth[path_of[i]] for i in query[2:]}

    ray_dal("round", *common)  # the run's own settings: classes, model and epochs come from its config.yaml
    out = capsys.readouterr().out
    assert f"round 1: trained on {KNOWN + BUDGET - 2} labels ({BUDGET - 2} new, 0 relabeled)" in out
    metrics = json.loads((run / "round_001" / "metrics.json").read_text())
    assert metrics["n_labeled"] == KNOWN + BUDGET - 2 and metrics["pool_size"] == IMAGES - KNOWN - BUDGET + 2
    second = pq.read_table(run / "round_001" / "selected.parquet")["id"].to_pylist()
    labeled = {path_id(p) for p in merged["path"].to_pylist()}
    assert len(second) == BUDGET and not labeled & set(second)

    ray_dal("label-studio", "push", "--run", run, "--url", url, "--project", str(project_id))
    again = len(set(second) & set(skipped))  # a skipped sample can be queried again: it is already a task
    assert f"imported {BUDGET - again} task(s) of round 1 into project {project_id}; {again} were there" in \
        capsys.readouterr().out
