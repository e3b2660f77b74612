"""`RunLease`: one process at a time works on a run directory, on disk and in object storage alike.

The holder writes ``RUN/lease.json`` (host, pid, command, start time, expiry, a random token) and
renews it from a daemon thread every ``ttl_s / 4`` seconds. Another process that finds a live lease is
refused with a `RunBusyError` naming the holder. A lease stops counting when it expires (its holder
died without releasing it, on any machine) or at once when its holder ran on this machine and that
process no longer exists, so a killed run resumes without waiting. Object stores have no
compare-and-swap for pyarrow, so taking a lease is write-then-read-back: of two processes racing for
a free lease the one whose token is not read back gives way.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import sys
import threading
import time
from typing import Any

from .location import Location, StorageError, location

DEFAULT_TTL_S = 60.0


class RunBusyError(StorageError):
    """Another live process holds the run directory's lease."""


class RunLease:
    """Use as ``with RunLease(run_dir): ...``; ``run_dir`` is a path, a URI or a `Location`."""

    def __init__(self, run_dir: "str | Location", ttl_s: float = DEFAULT_TTL_S, settle_s: float = 0.2):
        self.file = location(run_dir) / "lease.json"
        self.ttl_s, self.settle_s = ttl_s, settle_s
        self.token = secrets.token_hex(8)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "RunLease":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lease, or raise `RunBusyError` naming its live holder."""
        holder = self._read()
        if holder is not None and holder.get("token") != self.token and _alive(holder):
            raise RunBusyError(_busy(self.file, holder))
        self._write()
        time.sleep(self.settle_s)
        holder = self._read()
        if holder is None or holder.get("token") != self.token:
            raise RunBusyError(_busy(self.file, holder or {}))
        self._thread = threading.Thread(target=self._renew, name="ray_dal-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        holder = self._read()
        if holder is not None and holder.get("token") == self.token:
            self.file.delete()

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                self._write()
            except StorageError:  # a passing outage; the next renewal retries well before expiry
                pass

    def _write(self) -> None:
        now = time.time()
        self.file.write_text(json.dumps({
            "host": socket.gethostname(), "pid": os.getpid(), "command": " ".join(sys.argv)[:300],
            "since": getattr(self, "_since", now), "expires": now + self.ttl_s, "token": self.token,
        }))
        self._since = getattr(self, "_since", now)

    def _read(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.file.read_text())
        except StorageError:
            if not self.file.exists():
                return None
            raise
        except ValueError:  # cut short by a crash mid-write on a filesystem without atomic writes: not a lease
            return None


def _alive(holder: dict[str, Any]) -> bool:
    if holder.get("expires", 0) < time.time():
        return False
    if holder.get("host") == socket.gethostname():
        try:
            os.kill(int(holder.get("pid", -1)), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
    return True


def _busy(file: Location, holder: dict[str, Any]) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", time.time())))
    return (f"{file.parent.uri} is in use by process {holder.get('pid', '?')} on {holder.get('host', '?')} "
            f"(since {since}: {holder.get('command', '?')!r}). Fix: wait for it to finish, or stop it; a lease "
            f"whose holder died expires within {DEFAULT_TTL_S:.0f} s, at once on the same machine")
