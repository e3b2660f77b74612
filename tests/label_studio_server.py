"""A real Label Studio server for the tests, and an annotator that labels tasks through its HTTP API like the UI.

The server runs from ``.venv-label-studio`` (``make label-studio-venv``: label-studio's pins clash with ours),
on a free local port, with a throwaway data dir, one user and a legacy API token; its output goes to
``label-studio.log`` in the data dir. The first start runs the database migrations (40-155 s measured).
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pytest
import requests

REPO = Path(__file__).resolve().parents[1]
LS_VENV = REPO / ".venv-label-studio"
LABEL_STUDIO = LS_VENV / "bin" / "label-studio"
START_TIMEOUT_S = 600.0


@dataclass
class LabelStudioServer:
    url: str
    token: str  # the user's legacy API token ("Authorization: Token ...")
    startup_seconds: float  # from launch until /health answered and the token was accepted
    log: Path
    process: subprocess.Popen

    def __repr__(self) -> str:
        return f"LabelStudioServer(url={self.url!r}, startup_seconds={self.startup_seconds:.1f}, log={str(self.log)!r})"

    def stop(self, grace_s: float = 20.0) -> None:
        """Terminate the server; then kill its process group (label-studio's children included)."""
        self.process.terminate()
        try:
            self.process.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()


def free_port() -> int:
    """A local TCP port nothing listens on (at the time of asking)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(data_dir: Path, port: int | None = None, token: str | None = None,
                 timeout_s: float = START_TIMEOUT_S) -> LabelStudioServer:
    """Start ``label-studio`` on ``data_dir`` (new or reused) and wait until it serves the API with ``token``."""
    if message := _missing_venv():
        raise FileNotFoundError(message)
    port = port or free_port()
    token = token or secrets.token_hex(20)
    data_dir.mkdir(parents=True, exist_ok=True)
    log = data_dir / "label-studio.log"
    env = {**os.environ, "LATEST_VERSION_CHECK": "false", "COLLECT_ANALYTICS": "false",
           "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir)}  # else it also makes folders in ~/.local/share
    cmd = [str(LABEL_STUDIO), "start", "--no-browser", "--internal-host", "127.0.0.1", "-p", str(port),
           "--data-dir", str(data_dir), "--username", "annotator@ray-dal.test",
           "--password", secrets.token_urlsafe(12), "--user-token", token, "--enable-legacy-api-token"]
    started = time.monotonic()
    with open(log, "ab") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=env, cwd=data_dir, start_new_session=True)
    server = LabelStudioServer(f"http://127.0.0.1:{port}", token, 0.0, log, process)
    try:
        _wait_until_serving(server, started + timeout_s)
    except BaseException:
        server.stop()
        raise
    server.startup_seconds = time.monotonic() - started
    return server


def _missing_venv() -> str | None:
    if (LS_VENV / ".installed").exists():
        return None
    return (f"the Label Studio tests need a real server from {LS_VENV}, which is not installed: "
            f"run `make label-studio-venv` in {REPO} (make test does it)")


def _wait_until_serving(server: LabelStudioServer, deadline: float) -> None:
    while True:
        if server.process.poll() is not None:
            raise RuntimeError(f"label-studio exited with {server.process.returncode} while starting; "
                               f"the end of {server.log}:\n{_tail(server.log)}")
        try:
            if (requests.get(f"{server.url}/health", timeout=5).ok
                    and requests.get(f"{server.url}/api/projects", headers=_auth(server.token), timeout=10).ok):
                return
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"label-studio did not serve {server.url} within the start-up timeout; "
                               f"the end of {server.log}:\n{_tail(server.log)}")
        time.sleep(1.0)


def _tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Token {token}"}


@pytest.fixture(scope="session")
def label_studio(request, tmp_path_factory):
    """One real Label Studio server for the session (`LabelStudioServer`: .url, .token, .startup_seconds)."""
    if message := _missing_venv():
        pytest.fail(message)
    server = start_server(tmp_path_factory.mktemp("label_studio"))
    with request.config.pluginmanager.get_plugin("capturemanager").global_and_fixture_disabled():
        print(f"\nLabel Studio up at {server.url} after {server.startup_seconds:.1f} s (log: {server.log})")
    yield server
    server.stop()


def api(url: str, token: str, method: str, path: str, **kwargs):
    """The JSON answer to an API request made with the legacy ``token`` (an HTTP error raises)."""
    response = requests.request(method, url + path, headers=_auth(token), timeout=60, **kwargs)
    response.raise_for_status()
    return response.json() if response.content else None


def list_tasks(url: str, token: str, project_id: int) -> list[dict]:
    """Every task of the project, with its annotations and predictions."""
    tasks, page = [], 1
    while True:
        answer = api(url, token, "GET", "/api/tasks",
                     params={"project": project_id, "page": page, "page_size": 100, "fields": "all"})
        tasks += answer["tasks"]
        if not answer["tasks"] or len(tasks) >= answer["total"]:
            return tasks
        page += 1


def annotate(url: str, token: str, project_id: int, labels_by_ray_dal_id: dict[int, str], skip_ids=(),
             lead_time: float = 1.0) -> dict[int, int]:
    """Annotate the project's tasks as an annotator in the UI does: one new annotation per task, choosing
    the given label, or a skip (cancel) for the ray_dal ids in ``skip_ids``. Returns {ray_dal_id: annotation id}."""
    tasks = {task["data"]["ray_dal_id"]: task["id"] for task in list_tasks(url, token, project_id)}
    started = datetime.now(timezone.utc).isoformat()
    bodies = {rid: {"result": [], "was_cancelled": True} for rid in skip_ids}
    bodies.update({rid: {"result": [{"id": secrets.token_urlsafe(8)[:10], "type": "choices", "origin": "manual",
                                     "from_name": "label", "to_name": "image", "value": {"choices": [label]}}]}
                   for rid, label in labels_by_ray_dal_id.items()})
    created = {}
    for rid, body in bodies.items():
        body.update(lead_time=lead_time, started_at=started, draft_id=0, parent_prediction=None,
                    parent_annotation=None, project=str(project_id))
        created[rid] = api(url, token, "POST", f"/api/tasks/{tasks[rid]}/annotations",
                           params={"project": project_id}, json=body)["id"]
    return created
