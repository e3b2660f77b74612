"""What a person sees: ray_dal's lines and progress on the console, Ray's output in OUT/logs/ray.log.

The job tests run jobs/cifar10.py in fresh processes (a captured console: not a terminal, so progress comes
as one line per stage); the bars on a terminal are checked on a pseudo-terminal, without Ray.
"""

from __future__ import annotations

import fcntl
import logging
import os
import pty
import struct
import subprocess
import sys
import termios
import textwrap
import warnings
from pathlib import Path

import pytest

from ray_dal import console

from .conftest import REPO

# Ray's lines that used to fill the console: none may reach it without --verbose.
RAY_ON_CONSOLE = ["PlacementGroupCleaner", "core_worker.cc", "RayDeprecationWarning", "Token authentication",
                  "Started a local Ray instance", "Starting execution of Dataset", "execution finished",
                  "Running Dataset", "logging_progress", "(TrainController", "(RayTrainWorker"]


def run_cifar10(data_dir: Path, out: Path, *flags: str) -> tuple[str, str]:
    """jobs/cifar10.py on ``data_dir`` in a fresh process (embedded Ray, 2 CPUs); its (stdout, stderr)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    argv = [sys.executable, str(REPO / "jobs" / "cifar10.py"), "--data-dir", str(data_dir), "--out", str(out),
            "--initial", "100", "--budget", "50", "--epochs", "2", "--num-scorers", "1", "--num-cpus", "2", *flags]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout, done.stderr


@pytest.mark.slow
def test_the_console_shows_ray_dal_and_the_log_file_holds_ray(cifar10_slice, tmp_path):
    out = tmp_path / "run"
    # Per-pass scorer pools: Ray kills their actors after each pass, which its C++ core worker logs on the driver's
    # file descriptor 2 (warm actors, the default, leave no such line to hide).
    stdout, stderr = run_cifar10(cifar10_slice, out, "--rounds", "1", "--num-workers", "2", "--scorer-lifetime", "pass")
    printed = stdout + stderr
    assert not [noise for noise in RAY_ON_CONSOLE if noise in printed], printed
    assert f"Ray's output: {out / 'logs' / 'ray.log'}; Ray's own log files: " in stderr
    for line in ("round 0: 100 labeled, test accuracy", "round 1: 150 labeled, test accuracy",
                 "train: 2/2 epoch", "accuracy", "G: 100/100 img", "G: 150/150 img", "test: 300/300 img"):
        assert line in stderr, stderr
    assert len(printed.splitlines()) <= 20, printed  # 216 lines for this job before ray_dal.console

    ray_log = (out / "logs" / "ray.log").read_text()
    for line in ("Started a local Ray instance",  # Ray's Python loggers
                 "core_worker.cc",  # C++, from the driver's file descriptor 2
                 "(RayTrainWorker pid=",  # a Ray Train worker's output
                 "Starting execution of Dataset",  # Ray Data
                 "INFO ray_dal: round 1: 150 labeled",  # ray_dal's own lines too
                 "INFO ray_dal.progress: train: 2/2 epoch"):
        assert line in ray_log, line


@pytest.mark.slow
def test_verbose_brings_rays_lines_back_and_training_in_the_driver_shows_its_epochs(cifar10_slice, tmp_path):
    out = tmp_path / "run"
    stdout, stderr = run_cifar10(cifar10_slice, out, "--rounds", "0", "--num-workers", "0", "--verbose",
                                 "--scorer-lifetime", "pass")  # C++ lines (test above)
    for line in ("Started a local Ray instance", "Starting execution of Dataset", "core_worker.cc",
                 "round 0: 100 labeled", "train: 2/2 epoch", "test: 300/300 img"):
        assert line in stdout + stderr, line
    assert "Started a local Ray instance" in (out / "logs" / "ray.log").read_text()


def test_outside_a_terminal_each_stage_is_one_line_and_ray_records_go_to_the_file_only(tmp_path, capsys):
    log_file = tmp_path / "logs" / "ray.log"
    root = logging.getLogger()
    before = root.handlers[:], root.level, sys.stderr
    with console.session(log_file):
        with console.progress(3, "score", "img") as bar:
            bar.update(2)
            logging.getLogger("ray_dal").info("a line of ours")
            bar.update(1)
            bar.set_postfix("done")
        logging.getLogger("ray.data").info("a Ray Data line")
        logging.getLogger("ray").error("a Ray error")
        warnings.warn("a warning for the user")
    assert (root.handlers, root.level, sys.stderr) == before
    err = capsys.readouterr().err
    assert "a line of ours" in err and "score: 3/3 img [" in err and "done]" in err
    assert "a Ray error" in err and "a warning for the user" in err
    assert "a Ray Data line" not in err
    written = log_file.read_text()
    assert "INFO ray.data: a Ray Data line" in written and "ray_dal.progress: score: 3/3 img" in written


def test_on_a_terminal_bars_are_drawn_and_log_lines_step_around_them(tmp_path):
    script = textwrap.dedent(f"""
        import logging, time
        from ray_dal import console
        with console.session({str(tmp_path / "ray.log")!r}):
            with console.progress(4, "embed", "img") as bar:
                for i in range(4):
                    time.sleep(0.05)
                    bar.update(1)
                    if i == 1:
                        logging.getLogger("ray_dal").warning("a warning between two updates")
            logging.getLogger("ray").info("a Ray line")
    """)
    screen = run_on_terminal([sys.executable, "-c", script])
    assert "embed:  50%|" in screen and "2/4 [" in screen
    assert "WARNING ray_dal: a warning between two updates\r\n" in screen  # on a line of its own
    assert "a Ray line" not in screen
    assert "ray_dal.progress: embed: 4/4 img" in (tmp_path / "ray.log").read_text()  # the file keeps the stage


def run_on_terminal(argv: list[str], columns: int = 100) -> str:
    """Run ``argv`` with stdout and stderr on a pseudo-terminal ``columns`` wide; everything it wrote there."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, cwd=REPO)
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    assert proc.wait(timeout=60) == 0, b"".join(chunks).decode(errors="replace")
    return b"".join(chunks).decode(errors="replace")
