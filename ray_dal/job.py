"""What every experiment job (``jobs/<dataset>.py``) does: flags and YAML to a config, then run the loop.

Settings come from ray_dal/config.py's defaults, then ``--config`` (YAML; the job's own file by default),
then the flags below; the job sets ``data.dataset``. Re-running with the same ``--out`` resumes after
the last complete round. ``--out`` (and ``--data-dir``) may be a local path or an object-store URI
(``s3://bucket/prefix``; `ray_dal.storage`); one process at a time works on a run directory (its lease).
The console shows ray_dal's lines and progress bars; Ray's own output goes to ``OUT/logs/ray.log``, or
for a run in object storage to a local file that the console names (`RunDir.log_file`); ``--verbose``:
to the console as well (`ray_dal.console`).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from pathlib import Path
from typing import Callable, Iterator

from . import console
from .config import STRATEGIES, load_config
from .errors import exit_on_user_error
from .loop.simulation import run_experiment
from .models import available_models
from .loop.run_dir import RunDir

def workers_count(value: str) -> int | str:
    """``--num-workers``: a count, or ``auto`` (`ray_dal.config.TrainConfig`)."""
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"give a number of workers or 'auto', not {value!r}") from None


FLAGS = {  # flag -> (config key, type, help)
    "--data-dir": ("data.data_dir", str, "the data as Parquet, torchvision's layout or an ImageFolder copy, or where "
                                         "to download it"),
    "--out": ("loop.out", str, "run directory, a path or a URI such as s3://bucket/runs/x (resumed if it exists)"),
    "--model": ("model.name", str, " | ".join(available_models())),
    "--strategy": ("scoring.strategy", str, " | ".join(STRATEGIES)),
    "--gamma": ("scoring.gamma", float, "weight of <g, G> (inf: <g, G> alone)"),
    "--scope": ("scoring.scope", str, "all | last"),
    "--initial": ("loop.initial", int, "size M of the seeded initial labeled set"),
    "--budget": ("loop.budget", int, "samples b queried per round"),
    "--rounds": ("loop.rounds", int, "number R of queries"),
    "--epochs": ("train.max_epochs", int, "max epochs per round"),
    "--train-accuracy": ("train.train_accuracy", float, "end a round at this training accuracy"),
    "--seed": ("loop.seed", int, "seed of the initial set, the model and the shuffles"),
    "--num-workers": ("train.num_workers", workers_count, "Ray Train workers; 0: train in the driver; auto"),
    "--num-scorers": ("scoring.num_scorers", int, "scorer actors"),
    "--scorer-lifetime": ("scoring.scorer_lifetime", str, "run (start the scorers once) | pass (a pool per pass)"),
    "--pool-size": ("data.pool_size", int, "use a seeded subsample of the training pool"),
    "--test-size": ("data.test_size", int, "use a seeded subsample of the test set"),
    "--image-size": ("data.image_size", int, "resize every image to this height and width (default: the dataset's)"),
    "--num-cpus": ("runtime.num_cpus", int, "CPUs of the embedded local Ray (ignored on a cluster)"),
}


log = logging.getLogger("ray_dal")


@contextlib.contextmanager
def run_session(run: RunDir, verbose: bool = False) -> Iterator[Path]:
    """`console.session` writing to the run's log file (`name_log_file`)."""
    with console.session(run.log_file, verbose=verbose) as log_file:
        name_log_file(run)
        yield log_file


def name_log_file(run: RunDir) -> None:
    """For a run in object storage, one line on the console names its local log file (Ray's output cannot
    go straight into a bucket); nothing for a run on disk (its log is RUN/logs/ray.log)."""
    if not run.root.is_local:
        log.info("the log of this run (%s) is the local file %s", run.root, run.log_file)


def add_config_flags(parser: argparse.ArgumentParser, flags: dict[str, tuple], required: tuple[str, ...] = ()) -> None:
    """Add ``flags`` (flag -> (config key, type, help), as `FLAGS`) to ``parser``; none has a default."""
    for flag, (key, kind, help_text) in flags.items():
        parser.add_argument(flag, type=kind, help=f"{help_text} [{key}]", required=flag in required)


def config_overrides(args: argparse.Namespace | dict, flags: dict[str, tuple]) -> dict:
    """``{"section.key": value}`` of the ``flags`` given on the command line."""
    values = args if isinstance(args, dict) else vars(args)
    given = {key: values[flag[2:].replace("-", "_")] for flag, (key, _, _) in flags.items()}
    return {key: value for key, value in given.items() if value is not None}


def build_parser(default_config: Path, description: str | None = None) -> argparse.ArgumentParser:
    """The jobs' command line: the flags above (`FLAGS`), ``--config`` (default ``default_config``), ``--verbose``."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=default_config, help="YAML config [default: %(default)s]")
    add_config_flags(parser, FLAGS)
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray's own lines (workers, Ray Data, Ray Train) on the console too; they always go "
                             "to OUT/logs/ray.log (a local file named on the console for a run in object storage)")
    return parser


def run_job(dataset: str, default_config: Path, argv: list[str] | None = None,
            description: str | None = None) -> RunDir:
    """Parse ``argv`` (the flags above and ``--config``, default ``default_config``), run the experiment on
    ``dataset``, print each round's test accuracy; returns the run directory."""
    args = vars(build_parser(default_config, description).parse_args(argv))
    cfg = load_config(args["config"], {"data.dataset": dataset, **config_overrides(args, FLAGS)})
    with run_session(RunDir(cfg.loop.out), verbose=args["verbose"]):
        run = run_experiment(cfg)
    for m in run.metrics():
        print(f"round {m['round']}: {m['n_labeled']} labeled, test accuracy {m['test_accuracy']:.4f}")
    print(f"results in {run.root}")
    return run


def script(main: Callable[[], object], name: str) -> None:
    """Run a job's ``main`` as a script: bad input prints one message naming the value and the fix, exit 2;
    Ctrl-C prints one line saying how to resume, exit 130."""
    try:
        with exit_on_user_error(name):
            main()
    except KeyboardInterrupt:
        print(f"{name}: interrupted; the same command resumes after the last complete round", file=sys.stderr)
        raise SystemExit(130) from None
