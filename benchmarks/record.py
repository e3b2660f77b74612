"""What every benchmark records: where it ran (machine, load, library versions, commit) and its result files."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import platform
import subprocess
from pathlib import Path
from typing import Callable

import psutil

REPO = Path(__file__).resolve().parents[1]
LIBRARIES = ("torch", "torchvision", "ray", "numpy", "pyarrow", "pillow", "psutil", "matplotlib",
             "backpack-for-pytorch")


def version(dist: str) -> str | None:
    """The installed version of distribution ``dist``, None when it is not installed."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=REPO).stdout.strip() or None
    except OSError:
        return None


def machine_info(**extra) -> dict:
    """CPU model, cores, memory, load average now, platform, library versions, UTC date, git commit and
    whether ray_dal/ has uncommitted changes; ``extra`` entries are added as they are."""
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu, "logical_cores": psutil.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "load_average_at_start": [round(x, 2) for x in psutil.getloadavg()], "platform": platform.platform(),
        "python": platform.python_version(), **{name.split("-")[0]: version(name) for name in LIBRARIES},
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git("rev-parse", "HEAD"), "ray_dal_dirty": bool(_git("status", "--porcelain", "ray_dal")),
        **extra,
    }


def save(result: dict, out: Path, stem: str, markdown: Callable[[dict, Path], None],
         plot: Callable[[dict, Path], None]) -> None:
    """Write OUT/STEM.json, .md (``markdown``) and .png (``plot``), after noting the load average at the end."""
    result["machine"]["load_average_at_end"] = [round(x, 2) for x in psutil.getloadavg()]
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1, default=float))
    markdown(result, out / f"{stem}.md")
    plot(result, out / f"{stem}.png")
