"""What a person sees in the terminal: ray_dal's own lines and one progress bar per stage; Ray's output in a file.

Entry points run inside `session(log_file, verbose)`:

- the console (``sys.stderr``) shows ray_dal's log records at INFO and up, other libraries' at WARNING and
  up (Python warnings included) and Ray's at ERROR and up (all of Ray's with ``verbose``), written through
  ``tqdm.write`` so that a live bar is never torn;
- ``log_file`` gets every record at INFO and up (it is created by the first one) and, once Ray starts in
  the session (`starting_ray`), the stdout/stderr of every Ray worker, one line each prefixed
  ``(ActorName pid=N)``, and, unless ``verbose``, the driver's own C++ lines (file descriptor 2 points at
  the file; ``sys.stderr`` stays on the terminal, so tracebacks and error messages still show there);
- a Ray started inside the session is shut down when the session ends, and everything is put back.

`progress(total, desc, unit)` is one stage's progress: a live bar when stderr is a terminal, else a line
every `LINE_EVERY_S` seconds; either way one closing line (to the log file; to the console too when no bar
was drawn). Outside a session nothing is redirected and `progress` works the same (library use, tests).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

LINE_EVERY_S = 60.0  # progress lines when the console is not a terminal (a log, a pipe, `ray job submit`)
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_FINAL = "{desc}: {n_fmt}/{total_fmt} {unit} [{elapsed}, {rate_fmt}{postfix}]"
_PERIODIC = "{desc}: {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
_UNSIZED = "{desc}: {n_fmt} {unit} [{elapsed}, {rate_fmt}{postfix}]"

log = logging.getLogger("ray_dal")
_progress_log = logging.getLogger("ray_dal.progress")
_worker_log = logging.getLogger("ray.workers")


@dataclass
class _Session:
    log_file: Path
    verbose: bool
    undo: contextlib.ExitStack


_active: _Session | None = None


@contextlib.contextmanager
def session(log_file: str | Path, verbose: bool = False) -> Iterator[Path]:
    """Route log records as the module says for the duration of the block; yields the log file's path."""
    global _active
    if _active is not None:
        raise RuntimeError("a ray_dal.console session is already active")
    log_file = Path(log_file).expanduser().resolve()
    with contextlib.ExitStack() as undo:
        console = _TqdmHandler()
        console.addFilter(_ConsoleFilter(verbose))
        console.setFormatter(_ConsoleFormatter())
        to_file = _LazyFileHandler(log_file, delay=True, encoding="utf-8")
        to_file.setFormatter(logging.Formatter(_FORMAT))
        to_file.setLevel(logging.INFO)
        _replace_handlers(logging.getLogger(), [console, to_file], logging.INFO, undo)
        _send_ray_loggers_to_root(undo)
        logging.captureWarnings(True)
        undo.callback(logging.captureWarnings, False)
        _active = _Session(log_file, verbose, undo)
        try:
            if "ray" in sys.modules and sys.modules["ray"].is_initialized():
                _capture_worker_output(undo)
            yield log_file
        finally:
            _active = None


@contextlib.contextmanager
def starting_ray() -> Iterator[None]:
    """Wrap ``ray.init`` in this: inside a `session`, Ray's output goes to the log file from then on, one line
    says where Ray's logs are, and Ray is shut down when the session ends. Outside a session it does nothing."""
    active = _active
    if active is None:
        yield
        return
    if not active.verbose:
        _point_fd2_at(active.log_file, active.undo)
    yield
    import ray  # only here: the rest of this module works without loading Ray

    _send_ray_loggers_to_root(active.undo)  # any logger ray.init configured
    _capture_worker_output(active.undo)
    active.undo.callback(ray.shutdown)  # first of the undos: what Ray prints while stopping still goes to the file
    session_dir = ray._private.worker._global_node.get_session_dir_path()
    log.info("Ray's output: %s; Ray's own log files: %s", active.log_file, Path(session_dir) / "logs")


class _Progress:
    """One stage's progress; see the module docstring. ``update(n)`` adds ``n`` (negative: goes back),
    ``set_postfix(text)`` shows ``text`` after the counts, ``refresh()`` redraws (the clock moves on while
    nothing else does), ``restart_clock()`` keeps what came before (e.g. workers starting) out of the rate and
    the ETA; a context manager that closes on exit."""

    def __init__(self, total: int | None, desc: str, unit: str):
        self.total, self.desc, self.unit = total, desc, unit
        self.n = self.initial = 0
        self.postfix = ""
        self.closed = False
        self.start = self.last_line = time.monotonic()
        self.bar = self._new_bar()

    def _new_bar(self) -> tqdm | None:
        if not _is_terminal(sys.stderr):
            return None
        return tqdm(total=self.total, initial=self.n, desc=self.desc, unit=self.unit, postfix=self.postfix or None,
                    file=sys.stderr, leave=False, dynamic_ncols=True)

    def restart_clock(self) -> None:
        self.start = self.last_line = time.monotonic()
        self.initial = self.n
        if self.bar is not None:
            self.bar.close()
            self.bar = self._new_bar()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif time.monotonic() - self.last_line >= LINE_EVERY_S:
            self._line(_PERIODIC if self.total else _UNSIZED, console=True)

    def refresh(self) -> None:
        if self.bar is not None:
            self.bar.refresh()

    def set_postfix(self, text: str) -> None:
        self.postfix = text
        if self.bar is not None:
            self.bar.set_postfix_str(text)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.bar is not None:
            self.bar.close()
        self._line(_FINAL if self.total else _UNSIZED, console=self.bar is None)

    def _line(self, bar_format: str, console: bool) -> None:
        text = tqdm.format_meter(self.n, self.total, time.monotonic() - self.start, prefix=self.desc, unit=self.unit,
                                 postfix=self.postfix or None, bar_format=bar_format, initial=self.initial)
        _progress_log.info("%s", text, extra={"console": console})
        self.last_line = time.monotonic()

    def __enter__(self) -> "_Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(total: int | None, desc: str, unit: str = "it") -> _Progress:
    """A stage's progress over ``total`` ``unit``s (None: unknown), labelled ``desc``; see the module docstring."""
    return _Progress(total, desc, unit)


# ------------------------------------------------------------------------------------------ plumbing


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


class _ConsoleFilter(logging.Filter):
    def __init__(self, verbose: bool):
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "console", True) or getattr(record, "hide", False):  # "hide": Ray Data's file-only
            return False
        if _under(record.name, "ray_dal"):
            return record.levelno >= logging.INFO
        if _under(record.name, "ray"):
            return record.levelno >= (logging.INFO if self.verbose else logging.ERROR)
        return record.levelno >= logging.WARNING


class _ConsoleFormatter(logging.Formatter):
    """ray_dal's INFO lines as "time message"; any other record also names its level and logger."""

    def __init__(self):
        super().__init__("%(asctime)s %(message)s")
        self.detailed = logging.Formatter(_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        if _under(record.name, "ray_dal") and record.levelno == logging.INFO:
            return super().format(record)
        return self.detailed.format(record)


class _TqdmHandler(logging.Handler):
    """Writes to ``sys.stderr`` as it is when the record comes, through ``tqdm.write`` (bars step aside)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


class _LazyFileHandler(logging.FileHandler):
    """Creates the file's folder when the first record comes: a run that logs nothing leaves nothing."""

    def _open(self):
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()


def _replace_handlers(logger: logging.Logger, handlers: list, level: int, undo: contextlib.ExitStack) -> None:
    before = logger.handlers[:], logger.level
    logger.handlers[:] = handlers
    logger.setLevel(level)
    undo.callback(_restore_handlers, logger, *before, added=handlers)


def _restore_handlers(logger: logging.Logger, handlers: list, level: int, added: list) -> None:
    logger.handlers[:] = handlers
    logger.setLevel(level)
    for handler in added:
        handler.close()


def _send_ray_loggers_to_root(undo: contextlib.ExitStack) -> None:
    """Ray's loggers that print to the console ("ray" and "ray.data" write to stderr and do not propagate)
    lose those handlers and propagate to the root's instead; their file handlers (Ray's session logs) stay."""
    for name in list(logging.root.manager.loggerDict):
        logger = logging.root.manager.loggerDict[name]
        if not _under(name, "ray") or not isinstance(logger, logging.Logger):
            continue
        printing = [h for h in logger.handlers
                    if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
        if printing:
            undo.callback(_restore_ray_logger, logger, logger.handlers[:], logger.propagate)
            logger.handlers[:] = [h for h in logger.handlers if h not in printing]
            logger.propagate = True


def _restore_ray_logger(logger: logging.Logger, handlers: list, propagate: bool) -> None:
    logger.handlers[:] = handlers
    logger.propagate = propagate


def _point_fd2_at(log_file: Path, undo: contextlib.ExitStack) -> None:
    """Send what is written to file descriptor 2 (Ray's C++ code) to ``log_file``; ``sys.stderr``, when it
    wrote to fd 2, now writes to a copy of where fd 2 pointed (the terminal)."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    try:
        on_fd2 = sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):  # e.g. pytest's capsys: not a file descriptor at all
        on_fd2 = False
    terminal = os.dup(2)
    target = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(target, 2)
    os.close(target)
    before = sys.stderr
    if on_fd2:
        sys.stderr = open(terminal, "w", buffering=1, encoding=before.encoding, errors="backslashreplace",
                          closefd=False)
    undo.callback(_restore_fd2, terminal, before)


def _restore_fd2(terminal: int, before) -> None:
    replaced = sys.stderr
    replaced.flush()
    os.dup2(terminal, 2)
    sys.stderr = before
    if replaced is not before:
        replaced.close()
    os.close(terminal)


def _capture_worker_output(undo: contextlib.ExitStack) -> None:
    """Log the workers' stdout/stderr lines, which the driver receives from Ray, instead of printing them.

    Uses Ray's private dispatcher of those lines (Ray 2.60: ``ray._private.ray_logging``); tests/test_console.py
    checks that they still reach the log file.
    """
    import ray
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    from ray._private.worker import filter_autoscaler_events

    def log_lines(data: dict) -> None:
        if data.get("pid") == "autoscaler":  # its status every few seconds, and events such as "cannot be scheduled"
            for line in filter_autoscaler_events(data.get("lines", ())):
                log.warning("Ray autoscaler: %s", line)
            return
        who = data.get("actor_name") or data.get("task_name") or "worker"
        where = "" if data.get("ip") == data.get("localhost") else f", ip={data.get('ip')}"
        for line in data.get("lines", ()):
            _worker_log.info("(%s pid=%s%s) %s", who, data.get("pid"), where, line)

    printers = [pair for pair in dispatcher.handlers if pair[0] == "ray_print_logs"]
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.remove_handler("ray_dal")
    dispatcher.add_handler("ray_dal", log_lines)

    def detach():
        dispatcher.remove_handler("ray_dal")
        if ray.is_initialized():  # a shut-down Ray removed its printer itself; a new ray.init adds another
            for pair in printers:
                dispatcher.add_handler(*pair)

    undo.callback(detach)

