"""ray_dal.integrations.label_studio against a real Label Studio server (`label_studio` fixture): a query of real
CIFAR-10 images pushed as tasks, annotated through the API as the UI does, and pulled back; every error a user
can meet; and, without a server, the task, config and labels-file pieces."""

from __future__ import annotations

import base64
import io
import json
import xml.etree.ElementTree as ET

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ray_dal.config import ConfigError
from ray_dal.data import read_label_file
from ray_dal.integrations.label_studio import (
    API_KEY_ENV,
    LabelStudio,
    LabelStudioError,
    build_tasks,
    config_classes,
    image_mime,
    label_config,
    merge_labels,
)

from .label_studio_server import annotate, api, free_port, list_tasks

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
MODEL_VERSION = "ray_dal round 1"
N = 40  # query samples


@pytest.fixture(scope="module")
def query(cifar10_dir) -> dict:
    """A query of N real CIFAR-10 images (ids: row numbers), ranked scores, a model right on every other sample."""
    ids = np.random.default_rng(0).choice(50_000, N, replace=False)
    table = pq.read_table(cifar10_dir / "train.parquet", columns=["image", "label"]).take(ids)
    labels = table["label"].to_numpy()
    ranks = np.arange(N)
    return {"ids": ids.astype(np.int64), "labels": labels, "images": table["image"].to_pylist(),
            "scores": np.linspace(9.0, 1.0, N), "ranks": ranks,
            "pred": np.where(ranks % 2 == 0, labels, (labels + 1) % 10), "prob": np.linspace(0.9, 0.3, N)}


@pytest.fixture(scope="module")
def tasks(query) -> list[dict]:
    q = query
    return build_tasks(q["ids"], q["scores"], q["ranks"], q["pred"], q["prob"], q["images"], CLASSES, MODEL_VERSION)


def check_error(call, *fragments: str, token: str | None = None) -> str:
    """``call()`` raises a LabelStudioError holding every fragment (and never ``token``); returns its message."""
    with pytest.raises(LabelStudioError) as info:
        call()
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message
    if token:
        assert token not in message and token not in repr(info.value)
    return message


# ---------------------------------------------------------------------------------------------- no server


def test_label_config_escapes_names_and_keeps_their_order():
    classes = ["cat", "a<b", "R&D", 'say "hi"', "it's", "z>y"]
    config = label_config(classes)
    ET.fromstring(config)  # well-formed XML
    assert 'value="a&lt;b"' in config and 'value="R&amp;D"' in config
    assert config_classes(config) == classes
    assert config_classes("<View><Text name='t' value='$t'/></View>") is None
    assert config_classes("not xml <") is None
    check_error(lambda: label_config(["cat", "cat"]), "distinct")
    check_error(lambda: label_config([]), "distinct")


def test_build_tasks_from_real_images(query, tasks):
    assert len(tasks) == N
    assert json.loads(json.dumps(tasks)) == tasks  # plain JSON: no numpy scalars
    for k, task in enumerate(tasks):
        data = task["data"]
        assert data["ray_dal_id"] == query["ids"][k] and data["rank"] == k and data["score"] == query["scores"][k]
        prefix = "data:image/jpeg;base64,"
        assert data["image"].startswith(prefix)
        assert base64.b64decode(data["image"][len(prefix):]) == query["images"][k]
        [prediction] = task["predictions"]
        assert prediction == {"model_version": MODEL_VERSION, "score": query["prob"][k], "result": [
            {"from_name": "label", "to_name": "image", "type": "choices",
             "value": {"choices": [CLASSES[query["pred"][k]]]}}]}
    q = query
    check_error(lambda: build_tasks(q["ids"], q["scores"][:-1], q["ranks"], q["pred"], q["prob"], q["images"],
                                    CLASSES, MODEL_VERSION), "one entry per sample")
    check_error(lambda: build_tasks(q["ids"][:1], q["scores"][:1], q["ranks"][:1], [10], q["prob"][:1],
                                    q["images"][:1], CLASSES, MODEL_VERSION), "[10] are outside [0, 10)")
    # A query saved without the model's predictions (pred -1, prob NaN); a prediction without a probability.
    bare = build_tasks(q["ids"][:2], q["scores"][:2], q["ranks"][:2], [-1, 3], [np.nan, np.nan], q["images"][:2],
                       CLASSES, MODEL_VERSION)
    assert bare[0]["predictions"] == [] and bare[0]["data"] == tasks[0]["data"]
    assert bare[1]["predictions"] == [{"model_version": MODEL_VERSION, "result": [
        {"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": ["cat"]}}]}]


def test_image_mime_by_magic(query):
    image = Image.open(io.BytesIO(query["images"][0]))
    for fmt, mime in (("PNG", "image/png"), ("GIF", "image/gif"), ("BMP", "image/bmp"), ("WEBP", "image/webp"),
                      ("JPEG", "image/jpeg")):
        out = io.BytesIO()
        image.save(out, fmt)
        assert image_mime(out.getvalue()) == mime
    assert image_mime(b"%PDF-1.4") == image_mime(b"") == "application/octet-stream"


def test_merge_labels_new_wins():
    ids, labels, n_changed = merge_labels([3, 1, 2], ["frog", "cat", "dog"], [4, 2, 3], ["ship", "cat", "frog"])
    assert ids.dtype == np.int64 and ids.tolist() == [1, 2, 3, 4]
    assert labels.tolist() == ["cat", "cat", "frog", "ship"] and n_changed == 1
    ids, labels, n_changed = merge_labels([], [], [5], ["deer"])
    assert ids.tolist() == [5] and labels.tolist() == ["deer"] and n_changed == 0


def test_client_errors_without_a_server(monkeypatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    check_error(lambda: LabelStudio("http://127.0.0.1:8080"), f"set {API_KEY_ENV}")
    assert issubclass(LabelStudioError, ConfigError)  # the CLI prints it as one message and exits 2
    secret = "f00d" * 10
    monkeypatch.setenv(API_KEY_ENV, secret)
    check_error(lambda: LabelStudio("localhost:8080"), "must start with http:// or https://", token=secret)
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    client = LabelStudio(url)
    assert secret not in repr(client)
    check_error(lambda: client.pull("cifar10"), f"cannot reach Label Studio at {url}", "check the URL", token=secret)


# ---------------------------------------------------------------------------------------------- real server


@pytest.fixture(scope="module")
def pushed(label_studio, tasks):
    """A project made by pushing the first 30 tasks, then all N: (project id, first PushResult, second)."""
    client = LabelStudio(label_studio.url, label_studio.token)
    first = client.push("cifar10 query", CLASSES, tasks[:30], MODEL_VERSION)
    second = client.push("cifar10 query", CLASSES, tasks, MODEL_VERSION)
    return first.project_id, first, second


@pytest.mark.slow
def test_push_imports_tasks_as_built_once(label_studio, tasks, pushed):
    project_id, first, second = pushed
    assert (first.created, first.imported, first.skipped) == (True, 30, 0)
    assert (second.created, second.imported, second.skipped, second.project_id) == (False, N - 30, 30, project_id)
    assert second.url == f"{label_studio.url}/projects/{project_id}/data"
    project = api(label_studio.url, label_studio.token, "GET", f"/api/projects/{project_id}")
    assert config_classes(project["label_config"]) == CLASSES and project["model_version"] == MODEL_VERSION
    stored = sorted(list_tasks(label_studio.url, label_studio.token, project_id), key=lambda t: t["data"]["rank"])
    assert [t["data"] for t in stored] == [t["data"] for t in tasks]  # images as the same data URIs
    for task, built in zip(stored, tasks):
        [prediction], [expected] = task["predictions"], built["predictions"]
        assert prediction["model_version"] == MODEL_VERSION and prediction["result"] == expected["result"]
        assert prediction["score"] == pytest.approx(expected["score"])


@pytest.mark.slow
def test_exported_json_file_imports_as_it_is(label_studio, tasks):
    """`ray-dal export --format label-studio` writes `build_tasks`' list: a user imports that file in the UI."""
    client = LabelStudio(label_studio.url, label_studio.token)
    project_id, created = client.find_or_create_project("exported file", CLASSES)
    upload = {"file": ("query.json", json.dumps(tasks).encode(), "application/json")}
    answer = api(label_studio.url, label_studio.token, "POST", f"/api/projects/{project_id}/import", files=upload)
    assert created and answer["task_count"] == N and answer["prediction_count"] == N
    stored = list_tasks(label_studio.url, label_studio.token, project_id)
    assert sorted(t["data"]["ray_dal_id"] for t in stored) == sorted(t["data"]["ray_dal_id"] for t in tasks)


@pytest.mark.slow
def test_annotate_then_pull_and_merge(label_studio, query, pushed, tmp_path, capsys, monkeypatch):
    project_id = pushed[0]
    url, token = label_studio.url, label_studio.token
    ids = query["ids"].tolist()
    truth = {i: CLASSES[label] for i, label in zip(ids, query["labels"])}
    other = {i: CLASSES[(CLASSES.index(truth[i]) + 1) % 10] for i in ids}
    first = annotate(url, token, project_id, {ids[0]: other[ids[0]], ids[1]: other[ids[1]]})
    annotate(url, token, project_id, {i: truth[i] for i in ids[:25]}, skip_ids=ids[25:30])
    annotate(url, token, project_id, {}, skip_ids=[ids[3]])  # a skip after a label: still labeled
    # Editing ids[1]'s first annotation makes it the latest by updated_at, though not by annotation id.
    third = next(c for c in CLASSES if c not in (truth[ids[1]], other[ids[1]]))
    result = [{"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": [third]}}]
    api(url, token, "PATCH", f"/api/annotations/{first[ids[1]]}", json={"result": result})

    expected = {i: truth[i] for i in ids[:25]} | {ids[1]: third}
    pulled = LabelStudio(url, token).pull(str(project_id))
    assert pulled.project_id == project_id and pulled.classes == CLASSES and pulled.n_tasks == N
    assert dict(zip(pulled.ids.tolist(), pulled.labels.tolist())) == expected
    assert pulled.ids.tolist() == sorted(expected)
    assert sorted(pulled.conflict_ids.tolist()) == sorted(ids[:2])
    assert (pulled.n_skipped, pulled.n_unlabeled) == (5, N - 30)

    # The CLI merges into an existing labels file whose labels are class indices.
    existing = {1_000_000: 4, ids[5]: (query["labels"][5] + 1) % 10, ids[6]: query["labels"][6]}
    out = tmp_path / "labels.parquet"
    pq.write_table(pa.table({"id": pa.array(list(existing), pa.int64()), "label": list(existing.values())}), out)
    monkeypatch.setenv(API_KEY_ENV, token)
    run_cli("pull", "--url", url, "--project", "cifar10 query", "--out", str(out))
    printed = capsys.readouterr()
    assert token not in printed.out + printed.err
    assert f"pulled 25 label(s) of {N} task(s) from project {project_id}" in printed.out
    assert "23 new, 1 changed, 2 with disagreeing annotations" in printed.out
    assert "5 skipped, 10 not labeled yet" in printed.out
    ids_out, labels_out = read_label_file(out)
    assert dict(zip(ids_out.tolist(), labels_out.tolist())) == {1_000_000: "deer"} | expected
    csv_out = tmp_path / "labels.csv"
    run_cli("pull", "--url", url, "--project", str(project_id), "--out", str(csv_out))
    assert dict(zip(*(a.tolist() for a in read_label_file(csv_out)))) == expected

    monkeypatch.setenv(API_KEY_ENV, "0badc0de" * 5)  # a refused token: one message, exit 2
    with pytest.raises(SystemExit) as exit_info:
        run_cli("pull", "--url", url, "--project", str(project_id), "--out", str(csv_out))
    printed = capsys.readouterr()
    assert exit_info.value.code == 2 and "0badc0de" not in printed.out + printed.err
    assert printed.err.strip() == printed.err.strip().splitlines()[0]
    assert printed.err.startswith(f"ray-dal label-studio: error: the token in {API_KEY_ENV} was refused by {url}")


def run_cli(*argv: str) -> None:
    from ray_dal.cli import main

    main(["label-studio", *argv])


@pytest.mark.slow
def test_server_errors_name_the_fix_never_the_token(label_studio, tasks, pushed):
    url, token = label_studio.url, label_studio.token
    client = LabelStudio(url, token)
    wrong = "0badc0de" * 5
    check_error(lambda: LabelStudio(url, wrong).pull("cifar10 query"), f"was refused by {url}", "HTTP 401",
                token=wrong)
    check_error(lambda: client.pull("987654"), f"project 987654 does not exist at {url}", token=token)
    check_error(lambda: client.pull("never pushed"), f"no project at {url} is titled 'never pushed'", token=token)

    client.find_or_create_project("two classes", ["cat", "dog"])
    check_error(lambda: client.push("two classes", CLASSES, tasks, MODEL_VERSION),
                "offers the classes ['cat', 'dog'], but ray_dal's are ['airplane'", token=token)
    check_error(lambda: client.find_or_create_project(str(pushed[0]), ["cat", "dog"]), "offers the classes",
                token=token)

    project_id, _ = client.find_or_create_project("foreign task", CLASSES)
    foreign = {"data": {"image": tasks[0]["data"]["image"]}}  # imported by hand: no ray_dal_id
    api(url, token, "POST", f"/api/projects/{project_id}/import", json=[foreign])
    [task] = list_tasks(url, token, project_id)
    for call in (lambda: client.pull("foreign task"), lambda: client.push("foreign task", CLASSES, tasks, "v")):
        check_error(call, f"task {task['id']} of project {project_id}", "ray_dal did not push it", token=token)


@pytest.mark.slow
def test_personal_access_token(label_studio, pushed):
    """A personal access token (a JWT refresh token) works, and a refused access token is refreshed."""
    url = label_studio.url
    pat = api(url, label_studio.token, "POST", "/api/token/")["token"]
    client = LabelStudio(url, pat)
    assert client.pull(str(pushed[0])).n_tasks == N
    client._access = "expired"  # as if the server had expired it early
    assert client.find_or_create_project("cifar10 query", CLASSES) == (pushed[0], False)
    forged = pat[:-4] + ("AAAA" if not pat.endswith("AAAA") else "BBBB")
    check_error(lambda: LabelStudio(url, forged).pull("cifar10 query"), f"was refused by {url}", token=forged)


@pytest.mark.slow
def test_cli_pushes_the_latest_query_of_a_run(label_studio, finished_run, monkeypatch, capsys):
    """``ray-dal label-studio push --run`` on a real run: its latest query, once, with the model's predictions."""
    from ray_dal.loop.export import latest_query

    query = latest_query(finished_run)
    monkeypatch.setenv(API_KEY_ENV, label_studio.token)
    for _ in range(2):
        run_cli("push", "--run", str(finished_run), "--url", label_studio.url, "--project", "run query")
    first, second = capsys.readouterr().out.splitlines()[-2:]
    n = len(query.ids)
    assert first.startswith(f"imported {n} task(s) of round {query.round} into new project ")
    assert second.startswith(f"imported 0 task(s) of round {query.round} into project ")
    assert f"; {n} were there already: {label_studio.url}/projects/" in second
    project_id = int(second.split("/projects/")[1].split("/")[0])
    stored = {t["data"]["ray_dal_id"]: t for t in list_tasks(label_studio.url, label_studio.token, project_id)}
    assert sorted(stored) == sorted(query.ids.tolist())
    for i, pred in zip(query.ids.tolist(), query.pred.tolist()):
        [prediction] = stored[i]["predictions"]
        assert prediction["model_version"] == f"ray_dal round {query.round}"
        assert prediction["result"][0]["value"]["choices"] == [query.classes[pred]]
