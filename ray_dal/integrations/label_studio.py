"""Label Studio: send a round's query to annotators as tasks, read their labels back.

    ray-dal label-studio push --run RUN_DIR --url URL --project NAME_OR_ID
        The run's latest query as image-classification tasks (each image as a data URI, the model's
        prediction attached); a project with the run's classes is made if NAME_OR_ID names none.
        Samples already in the project are not imported again (so a failed push can simply be rerun).
    ray-dal label-studio pull --url URL --project NAME_OR_ID --out LABELS
        Each task's label (its latest annotation that was not skipped) merged into LABELS
        (.parquet or .csv with columns id, label: the class name).

The API token comes from LABEL_STUDIO_API_KEY: a legacy token or a personal access token (Label
Studio: Account & Settings). We talk to Label Studio's documented REST API with `requests`
(installed with Ray), so its SDK is not needed; tested against a real label-studio 1.23.2.
Every failure is a `LabelStudioError` that names the URL and the fix, never the token. Samples are
keyed on our own id in the task data (``ray_dal_id``), never on Label Studio's task ids, which it
reuses after deletions.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import datetime
from typing import Iterator, Sequence
from xml.sax.saxutils import quoteattr

import numpy as np
import requests

from ..config import ConfigError
from ..data.labels import encode_labels, label_file_format, read_label_file, write_label_file
from ..storage import Location, location

API_KEY_ENV = "LABEL_STUDIO_API_KEY"
FROM_NAME, TO_NAME = "label", "image"  # the <Choices> and <Image> names in `label_config`
IMPORT_CHUNK_TASKS = 200
IMPORT_CHUNK_BYTES = 32 << 20  # far below Label Studio's 250 MB request limit (past it: an opaque HTTP 500)
PAGE_SIZE = 100
_IMAGE_MAGIC = ((b"\xff\xd8\xff", "image/jpeg"), (b"\x89PNG\r\n\x1a\n", "image/png"), (b"GIF87a", "image/gif"),
                (b"GIF89a", "image/gif"), (b"BM", "image/bmp"))


class LabelStudioError(ConfigError):
    """A Label Studio request, project or labels file is unusable; the message says what, where and the fix."""


# ---------------------------------------------------------------------------------------------- tasks


def label_config(classes: Sequence[str]) -> str:
    """The labeling interface: the image and one single choice among ``classes`` (choice i is class i)."""
    if not classes or len(set(classes)) != len(classes) or not all(isinstance(c, str) and c for c in classes):
        raise LabelStudioError(f"classes must be distinct, non-empty names; got {list(classes)}")
    choices = "".join(f"<Choice value={quoteattr(c)}/>" for c in classes)
    return (f'<View><Image name="{TO_NAME}" value="${TO_NAME}"/>'
            f'<Choices name="{FROM_NAME}" toName="{TO_NAME}" choice="single">{choices}</Choices></View>')


def config_classes(config: str) -> list[str] | None:
    """The choices, in order, of a label config's ``<Choices name="label" toName="image">``; None if it has none."""
    try:
        root = ET.fromstring(config)
    except ET.ParseError:
        return None
    for choices in root.iter("Choices"):
        if choices.get("name") == FROM_NAME and choices.get("toName") == TO_NAME:
            return [choice.get("value") for choice in choices.iter("Choice")]
    return None


def image_mime(data: bytes) -> str:
    """The MIME type of JPEG, PNG, GIF, BMP or WebP bytes (by their magic); else application/octet-stream."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return next((mime for magic, mime in _IMAGE_MAGIC if data.startswith(magic)), "application/octet-stream")


def _choice(label: str) -> dict:
    return {"from_name": FROM_NAME, "to_name": TO_NAME, "type": "choices", "value": {"choices": [label]}}


def build_tasks(ids, scores, ranks, preds, probs, images: Sequence[bytes], classes: Sequence[str],
                model_version: str, paths: Sequence[str] | None = None) -> list[dict]:
    """Label Studio tasks, one per query sample, importable as they are (also `ray-dal export`'s JSON).

    ``data``: the image as a data URI, ``ray_dal_id``, ``rank``, ``score`` and, for a pool made from a
    folder of images, the image's ``path`` in it; ``predictions``: the model's
    class ``classes[pred]`` with its probability ``prob`` (when finite), under ``model_version``; none for a
    sample whose ``pred`` is negative (a query saved without the model's predictions).
    """
    paths = [None] * len(ids) if paths is None else list(paths)
    columns = {"ids": ids, "scores": scores, "ranks": ranks, "preds": preds, "probs": probs, "images": images,
               "paths": paths}
    if len({len(v) for v in columns.values()}) > 1:
        raise LabelStudioError(f"build_tasks needs one entry per sample in each of {list(columns)}; got lengths "
                               f"{ {k: len(v) for k, v in columns.items()} }")
    preds = np.asarray(preds, dtype=np.int64)
    bad = preds[preds >= len(classes)]
    if bad.size:
        raise LabelStudioError(f"predicted classes {bad[:10].tolist()} are outside [0, {len(classes)}) "
                               f"(classes: {list(classes)})")
    return [{"data": {"image": f"data:{image_mime(image)};base64,{base64.b64encode(image).decode('ascii')}",
                      "ray_dal_id": int(i), "rank": int(r), "score": float(s), **({"path": path} if path else {})},
             "predictions": _prediction(classes, c, float(p), model_version)}
            for i, s, r, c, p, image, path in zip(ids, scores, ranks, preds.tolist(), probs, images, paths)]


def _prediction(classes: Sequence[str], pred: int, prob: float, model_version: str) -> list[dict]:
    if pred < 0:
        return []
    score = {"score": prob} if np.isfinite(prob) else {}
    return [{"model_version": model_version, **score, "result": [_choice(classes[pred])]}]


# ---------------------------------------------------------------------------------------------- client


@dataclass
class PushResult:
    project_id: int
    created: bool  # the project was made by this push
    imported: int  # tasks imported now
    skipped: int  # tasks whose ray_dal_id the project already held
    url: str  # the project's task list in the browser


@dataclass
class PulledAnnotations:
    project_id: int
    classes: list[str]  # the project's choices, in order (class i = choice i)
    ids: np.ndarray  # int64 ray_dal ids with a label, ascending
    labels: np.ndarray  # their class names (object array of str)
    paths: dict[int, str]  # ray_dal id -> the image's path, for tasks pushed from a folder of images
    n_tasks: int
    conflict_ids: np.ndarray  # ids whose annotations disagree (the latest one counts)
    n_skipped: int  # ids without a label whose annotations were all skipped (cancelled)
    n_unlabeled: int  # ids without any annotation that holds a choice, and never skipped

    @property
    def n_conflicts(self) -> int:
        return len(self.conflict_ids)


class LabelStudio:
    """A thin client of Label Studio's REST API at ``url``.

    ``token`` (default: LABEL_STUDIO_API_KEY) is a legacy token, sent as ``Token``, or a personal access
    token (a JWT refresh token), exchanged for short-lived access tokens sent as ``Bearer``.
    """

    def __init__(self, url: str, token: str | None = None, timeout: float = 30.0):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._token_name = "the Label Studio API token"
        if token is None:
            token = os.environ.get(API_KEY_ENV, "").strip()
            self._token_name = f"the token in {API_KEY_ENV}"
        if not re.match(r"https?://[^/]", self.url):
            raise LabelStudioError(f"the Label Studio URL {url!r} must start with http:// or https://, "
                                   f"e.g. http://localhost:8080")
        if not token:
            raise LabelStudioError(f"set {API_KEY_ENV} to your API token for {self.url} (Label Studio: "
                                   f"Account & Settings > Personal Access Token or Legacy Token)")
        self._token = token
        self._personal = _is_jwt(token)
        self._access: str | None = None
        self._access_expires = 0.0
        self._session = requests.Session()

    def __repr__(self) -> str:
        return f"LabelStudio(url={self.url!r})"

    # --- HTTP

    def _send(self, method: str, path: str, **kwargs) -> requests.Response:
        try:
            return self._session.request(method, self.url + path, timeout=self.timeout, **kwargs)
        except requests.ConnectionError:
            raise LabelStudioError(f"cannot reach Label Studio at {self.url}: check the URL and that the "
                                   f"server runs") from None
        except requests.Timeout:
            raise LabelStudioError(f"Label Studio at {self.url} did not answer {method} {path} within "
                                   f"{self.timeout:g} s: check that the server is not overloaded") from None
        except requests.RequestException as error:
            raise LabelStudioError(f"{method} {self.url}{path} failed ({type(error).__name__}): check the "
                                   f"URL") from None

    def _auth(self) -> dict[str, str]:
        if not self._personal:
            return {"Authorization": f"Token {self._token}"}
        if self._access is None or time.time() > self._access_expires - 30:
            response = self._send("POST", "/api/token/refresh/", json={"refresh": self._token})
            self._raise_for_status(response, "POST", "/api/token/refresh/")
            self._access = self._json(response, "/api/token/refresh/")["access"]
            self._access_expires = _jwt_claims(self._access).get("exp", time.time() + 60)
        return {"Authorization": f"Bearer {self._access}"}

    def _request(self, method: str, path: str, *, none_if_404: bool = False, **kwargs):
        """The JSON answer to an authenticated request (None for a 404 if ``none_if_404``)."""
        response = self._send(method, path, headers=self._auth(), **kwargs)
        if response.status_code == 401 and self._personal:  # the access token expired early: refresh once
            self._access = None
            response = self._send(method, path, headers=self._auth(), **kwargs)
        if response.status_code == 404 and none_if_404:
            return None
        self._raise_for_status(response, method, path)
        return self._json(response, path) if response.content else None

    def _raise_for_status(self, response: requests.Response, method: str, path: str) -> None:
        if response.ok:
            return
        excerpt = _excerpt(response).replace(self._token, "***")
        if response.status_code in (401, 403):
            raise LabelStudioError(f"{self._token_name} was refused by {self.url} (HTTP {response.status_code}: "
                                   f"{excerpt}): set it to the API token of a user of that server (Label Studio: "
                                   f"Account & Settings)")
        raise LabelStudioError(f"{method} {self.url}{path} failed with HTTP {response.status_code}: {excerpt}")

    def _json(self, response: requests.Response, path: str):
        try:
            return response.json()
        except ValueError:
            raise LabelStudioError(f"{self.url}{path} did not answer with JSON: is {self.url} a Label Studio "
                                   f"server?") from None

    # --- projects and tasks

    def _project(self, name_or_id: str, must_exist: bool) -> dict | None:
        """The project with this id (all digits: it must exist) or this exact title (None if absent)."""
        key = str(name_or_id).strip()
        if key.isdigit():
            project = self._request("GET", f"/api/projects/{key}", none_if_404=True)
            if project is None:
                raise LabelStudioError(f"project {key} does not exist at {self.url}: pass the id of an existing "
                                       f"project, or a project name")
            return project
        found, page = [], 1
        while True:
            answer = self._request("GET", "/api/projects", params={"title": key, "page": page,
                                                                  "page_size": PAGE_SIZE, "include": "id,title"})
            found += [p["id"] for p in answer["results"] if p["title"] == key]
            if not answer.get("next"):
                break
            page += 1
        if len(found) > 1:
            raise LabelStudioError(f"{len(found)} projects at {self.url} are titled {key!r} (ids {found}): "
                                   f"pass the id of the one to use")
        if not found:
            if must_exist:
                raise LabelStudioError(f"no project at {self.url} is titled {key!r}: push to it first, or pass "
                                       f"an existing project's name or id")
            return None
        return self._request("GET", f"/api/projects/{found[0]}")

    def _classes(self, project: dict) -> list[str]:
        classes = config_classes(project.get("label_config") or "")
        if classes is None:
            raise LabelStudioError(f"project {project['id']} at {self.url} has no <Choices name=\"{FROM_NAME}\" "
                                   f"toName=\"{TO_NAME}\"> in its label config, so ray_dal's tasks do not fit it: "
                                   f"use another project, or give it a config like {label_config(['cat', 'dog'])}")
        return classes

    def find_or_create_project(self, name_or_id: str, classes: Sequence[str]) -> tuple[int, bool]:
        """(project id, created): the project ``name_or_id`` names, made with `label_config` if a name is new.

        An existing project must offer exactly ``classes``, in order.
        """
        project = self._project(name_or_id, must_exist=False)
        if project is None:
            project = self._request("POST", "/api/projects", json={"title": str(name_or_id).strip(),
                                                                   "label_config": label_config(classes)})
            return project["id"], True
        have = self._classes(project)
        if have != list(classes):
            raise LabelStudioError(f"project {project['id']} ({project.get('title')!r}) at {self.url} offers the "
                                   f"classes {have}, but ray_dal's are {list(classes)} (choice i must be class i): "
                                   f"push to another project, or fix the project's label config")
        return project["id"], False

    def _tasks(self, project_id: int, annotations: bool) -> Iterator[tuple[int, dict]]:
        """(ray_dal_id, task) for every task of the project, with its annotations if ``annotations``."""
        params = {"project": project_id, "page_size": PAGE_SIZE, **({"fields": "all"} if annotations else {})}
        seen, page = 0, 1
        while True:
            answer = self._request("GET", "/api/tasks", none_if_404=True, params={**params, "page": page})
            if answer is None or not answer["tasks"]:  # a page past the end is a 404 "Invalid page."
                return
            for task in answer["tasks"]:
                rid = task["data"].get("ray_dal_id")
                if not isinstance(rid, int) or isinstance(rid, bool):
                    raise LabelStudioError(f"task {task['id']} of project {project_id} at {self.url} has no integer "
                                           f"data.ray_dal_id, so ray_dal did not push it: delete it, or add its "
                                           f"ray_dal_id to its data")
                yield rid, task
            seen += len(answer["tasks"])
            if seen >= answer["total"]:
                return
            page += 1

    def push(self, project: str, classes: Sequence[str], tasks: list[dict], model_version: str) -> PushResult:
        """Import `build_tasks`' ``tasks`` into ``project`` (made if new), except ids it already holds, and make
        the project show the predictions of ``model_version``."""
        ids = [task["data"]["ray_dal_id"] for task in tasks]
        if len(set(ids)) != len(ids):
            raise LabelStudioError("the tasks to push repeat ray_dal ids; each sample must be one task")
        project_id, created = self.find_or_create_project(project, classes)
        present = set() if created else {rid for rid, _ in self._tasks(project_id, annotations=False)}
        new = [task for task in tasks if task["data"]["ray_dal_id"] not in present]
        for chunk in _chunks(new):
            answer = self._request("POST", f"/api/projects/{project_id}/import", json=chunk)
            if answer.get("task_count") != len(chunk):
                raise LabelStudioError(f"project {project_id} at {self.url} imported {answer.get('task_count')} "
                                       f"of {len(chunk)} tasks: see the server's log")
        if any(task.get("predictions") for task in new):  # Label Studio refuses a model_version no prediction has
            self._request("PATCH", f"/api/projects/{project_id}", json={"model_version": model_version})
        return PushResult(project_id, created, len(new), len(tasks) - len(new),
                          f"{self.url}/projects/{project_id}/data")

    def pull(self, project: str) -> PulledAnnotations:
        """Every task's label: its latest (by updated_at, then id) annotation with a choice that was not skipped."""
        info = self._project(project, must_exist=True)
        classes = self._classes(info)
        by_id: dict[int, list[dict]] = {}
        paths: dict[int, str] = {}
        n_tasks = 0
        for rid, task in self._tasks(info["id"], annotations=True):
            by_id.setdefault(rid, []).extend(task.get("annotations") or [])
            if task["data"].get("path"):
                paths[rid] = task["data"]["path"]
            n_tasks += 1
        labels, conflicts, n_skipped, n_unlabeled = {}, [], 0, 0
        for rid, of_task in sorted(by_id.items()):
            chosen = []  # (updated_at, id, label) of the annotations that chose a class
            for annotation in of_task:
                label = None if annotation.get("was_cancelled") else self._label(annotation, classes)
                if label is not None:
                    chosen.append((_timestamp(annotation["updated_at"]), annotation["id"], label))
            if chosen:
                labels[rid] = max(chosen)[2]
                if len({label for *_, label in chosen}) > 1:
                    conflicts.append(rid)
            elif any(a.get("was_cancelled") for a in of_task):
                n_skipped += 1
            else:
                n_unlabeled += 1
        return PulledAnnotations(info["id"], classes, np.array(list(labels), dtype=np.int64),
                                 np.array(list(labels.values()), dtype=object), paths, n_tasks,
                                 np.array(conflicts, dtype=np.int64), n_skipped, n_unlabeled)

    def _label(self, annotation: dict, classes: list[str]) -> str | None:
        """The class an annotation chose (None if it chose none); a choice outside ``classes`` is an error."""
        for item in annotation.get("result") or []:
            if item.get("from_name") == FROM_NAME and item.get("type") == "choices":
                choices = item["value"].get("choices") or []
                if len(choices) != 1 or choices[0] not in classes:
                    raise LabelStudioError(f"annotation {annotation['id']} of task {annotation.get('task')} at "
                                           f"{self.url} chose {choices}, not one of the project's classes {classes}: "
                                           f"fix or delete that annotation")
                return choices[0]
        return None


def _chunks(tasks: list[dict]) -> Iterator[list[dict]]:
    """Consecutive runs of at most IMPORT_CHUNK_TASKS tasks and (but for a single huge task) IMPORT_CHUNK_BYTES."""
    chunk, size = [], 0
    for task in tasks:
        task_size = len(json.dumps(task))
        if chunk and (len(chunk) == IMPORT_CHUNK_TASKS or size + task_size > IMPORT_CHUNK_BYTES):
            yield chunk
            chunk, size = [], 0
        chunk.append(task)
        size += task_size
    if chunk:
        yield chunk


def _timestamp(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))  # Python 3.10 does not read "Z"


def _excerpt(response: requests.Response, limit: int = 200) -> str:
    text = response.text
    if "html" in response.headers.get("Content-Type", ""):
        text = re.sub(r"<(script|style)\b.*?</\1>|<[^>]+>", " ", text, flags=re.S | re.I)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


def _jwt_claims(token: str) -> dict:
    """The payload of a JWT (unverified; only to read its type and expiry), {} if it is not one."""
    parts = token.split(".")
    if len(parts) != 3:
        return {}
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except ValueError:
        return {}
    return claims if isinstance(claims, dict) else {}


def _is_jwt(token: str) -> bool:
    return bool(_jwt_claims(token))


# ---------------------------------------------------------------------------------------------- labels files


def merge_labels(existing_ids, existing_labels, new_ids, new_labels) -> tuple[np.ndarray, np.ndarray, int]:
    """(keys ascending, labels, n_changed): the union, ``new`` winning for a key in both; n_changed counts the
    keys in both whose label differs. Keys are ids or image paths; labels are of one kind (names or indices)."""
    merged = dict(zip(np.asarray(existing_ids).tolist(), np.asarray(existing_labels).tolist()))
    new = dict(zip(np.asarray(new_ids).tolist(), np.asarray(new_labels).tolist()))
    n_changed = sum(1 for key, label in new.items() if key in merged and merged[key] != label)
    merged.update(new)
    keys = sorted(merged)
    return np.array(keys, dtype=np.asarray(new_ids).dtype), np.array([merged[k] for k in keys], dtype=object), n_changed


def _existing_labels(path: Location, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(keys: ids or paths, class names) of the labels file ``path``, its labels checked against ``classes``."""
    keys, raw = read_label_file(path)
    codes_of, codes = np.unique(keys, return_inverse=True)  # ids, or paths as codes: encode_labels takes integers
    codes, labels = encode_labels(path, codes.astype(np.int64), raw, classes, len(classes))
    return codes_of[codes], np.asarray(classes, dtype=object)[labels]


def _keyed_by_path(pulled: PulledAnnotations, path: Location) -> np.ndarray:
    missing = [i for i in pulled.ids.tolist() if i not in pulled.paths]
    if missing:
        raise LabelStudioError(f"labels file {path} names images by path, but {len(missing)} labeled task(s) of "
                               f"project {pulled.project_id} have no data.path (e.g. ray_dal ids {missing[:5]}): "
                               "pull into a new labels file (keyed by id) instead")
    return np.asarray([pulled.paths[i] for i in pulled.ids.tolist()], dtype=object)


# ---------------------------------------------------------------------------------------------- CLI


def register_cli(subparsers) -> None:
    """Add ``label-studio push`` and ``label-studio pull`` to the ``ray-dal`` command's subparsers."""
    command = subparsers.add_parser("label-studio", help="send a run's query to Label Studio; pull its labels",
                                    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = command.add_subparsers(dest="action", required=True)
    push = actions.add_parser("push", help="import the run's latest query as tasks (images, predictions)")
    push.add_argument("--run", required=True, help="the run's directory (the job's --out)")
    push.set_defaults(handler=push_command)
    pull = actions.add_parser("pull", help="write the project's labels (merged into --out if it exists)")
    pull.add_argument("--out", required=True, help="labels file, .parquet or .csv (columns id, label); a path or "
                      "a URI (s3://...)")
    pull.set_defaults(handler=pull_command)
    for action in (push, pull):
        action.add_argument("--url", required=True, help="Label Studio's address, e.g. http://localhost:8080")
        action.add_argument("--project", required=True, help="project id, or title (push makes it if new)")


def push_command(args: argparse.Namespace) -> None:
    from ..loop.export import latest_query, query_images

    client = LabelStudio(args.url)
    query = latest_query(args.run)
    model_version = f"ray_dal round {query.round}"
    tasks = build_tasks(query.ids, query.scores, query.ranks, query.pred, query.prob, query_images(query),
                        query.classes, model_version, query.paths)
    result = client.push(args.project, query.classes, tasks, model_version)
    print(f"imported {result.imported} task(s) of round {query.round} into {'new ' if result.created else ''}"
          f"project {result.project_id}; {result.skipped} were there already: {result.url}")


def pull_command(args: argparse.Namespace) -> None:
    label_file_format(args.out)
    out = location(args.out)
    out.check_bucket("--out")  # a missing bucket or a store that cannot be reached: now, before Label Studio
    existed = out.exists()
    client = LabelStudio(args.url)
    pulled = client.pull(args.project)
    keys, labels, n_new, n_changed = pulled.ids, pulled.labels, len(pulled.ids), 0
    if existed:
        old_keys, old_labels = _existing_labels(out, pulled.classes)
        new_keys = _keyed_by_path(pulled, out) if old_keys.dtype == object else pulled.ids
        keys, labels, n_changed = merge_labels(old_keys, old_labels, new_keys, pulled.labels)
        n_new = len(keys) - len(old_keys)
    write_label_file(out, keys, labels, key="path" if keys.dtype == object else "id")
    conflicts = f" (ids {pulled.conflict_ids[:10].tolist()})" if pulled.n_conflicts else ""
    print(f"pulled {len(pulled.ids)} label(s) of {pulled.n_tasks} task(s) from project {pulled.project_id} at "
          f"{client.url}: {n_new} new, {n_changed} changed, {pulled.n_conflicts} with disagreeing annotations"
          f"{conflicts} (the latest counts), {pulled.n_skipped} skipped, {pulled.n_unlabeled} not labeled yet; "
          f"wrote {len(keys)} labels to {args.out}")
