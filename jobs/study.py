"""Run (or resume) a study: variants x seeds of one experiment, then its learning curves and table.

    python jobs/study.py configs/study_cifar10.yaml --data-dir ../shared/data/cifar10
    python jobs/study.py configs/study_cifar10.yaml --seeds 2          # only seed 2 (e.g. one seed per machine)
    python jobs/study.py configs/study_cifar10.yaml --report-only      # summarise what has finished

Writes study.json / study.md / study.png into --report (default: the study's out folder).
"""

import argparse
import logging
import shlex
import sys
from pathlib import Path

from ray_dal import console
from ray_dal.errors import exit_on_user_error
from ray_dal.loop.study import load_study, run_study, summarize, write_report

SUBSET_FLAGS = ("--seeds", "--variants", "--report-only")


def whole_study(argv: list[str]) -> list[str]:
    """``argv`` without the flags that pick a part of the study (and their values): the command for all of it."""
    kept, dropping = [], False
    for arg in argv:
        if arg.startswith("--"):
            dropping = arg.split("=", 1)[0] in SUBSET_FLAGS
        if not dropping:
            kept.append(arg)
    return kept


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", type=Path, help="study YAML (see ray_dal/loop/study.py)")
    parser.add_argument("--data-dir", help="override data.data_dir of every run")
    parser.add_argument("--out", help="override the study's out folder")
    parser.add_argument("--variants", nargs="+", help="run only these variants")
    parser.add_argument("--seeds", nargs="+", type=int, help="run only these of the study's seeds")
    parser.add_argument("--report", type=Path, help="folder for study.json/.md/.png (default: the out folder)")
    parser.add_argument("--report-only", action="store_true", help="only summarise the runs that finished")
    parser.add_argument("--verbose", action="store_true", help="show Ray's own lines on the console too; they "
                        "always go to OUT/logs/ray.log")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    study, base = load_study(args.study, {"data.data_dir": args.data_dir} if args.data_dir else None)
    if args.out:
        study.out = args.out
    if not args.report_only:
        with console.session(Path(study.out) / "logs" / "ray.log", verbose=args.verbose):
            run_study(study, base, args.variants, args.seeds)
    command = "python jobs/study.py " + " ".join(shlex.quote(a) for a in whole_study(argv if argv is not None
                                                                                       else sys.argv[1:]))
    report = args.report or Path(study.out)
    write_report(study, summarize(study, base), report, command)
    print(f"study report in {report}")


if __name__ == "__main__":
    with exit_on_user_error("study.py"):
        main()
