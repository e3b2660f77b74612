"""The ``ray-dal`` console script.

    ray-dal select --pool POOL --checkpoint model.pt --labeled labeled.parquet --budget 500 --out query.parquet
        Score a real, unlabeled pool once with a trained model and write the top-b query as Parquet
        (id, score, rank, pred, prob): the scoring step alone, for a model trained elsewhere. ``--labeled`` holds (id, label) of the samples
        already labeled: they are excluded, and dynamic AL's G is summed over them. Each of the four files
        may be a URI (s3://bucket/key, gs://, hdfs://, file://; `ray_dal.storage.location`).
    ray-dal round --pool POOL --labels LABELS --run RUN --budget B [--classes cat,dog,...]
        One active-learning round on your own data: train on the labeled ids of LABELS (Parquet or CSV:
        id, label), score the rest of POOL, write RUN/round_NNN/ with the next query. Again with more
        labels: the next round. (`ray_dal.loop.annotated`)
    ray-dal export --run RUN --format {parquet,csv,label-studio} --out PATH
        The run's latest query, for annotators (`ray_dal.loop.export`).
    ray-dal label-studio push|pull
        The latest query to a Label Studio project, and its annotations back into a labels file
        (`ray_dal.integrations.label_studio`).
    ray-dal synth --out DIR --num-samples N
        Write a synthetic JPEG pool (Parquet shards) for benchmarks.

Runs on the Ray cluster in ``RAY_ADDRESS`` (e.g. under ``ray job submit``), else an embedded local Ray.
Every flag, file and size is checked before Ray starts; such errors print one message and exit 2.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .pipeline.actors import check_weights, load_weights_file, scorer_actors
from .config import (
    STRATEGIES,
    ConfigError,
    ExperimentConfig,
    ModelConfig,
    ScoringConfig,
    load_config,
    validate,
)
from .data import DATASETS, ImageTransform, PoolInfo, inspect_pool, load_labels, write_synthetic_pool
from . import console
from .errors import exit_on_user_error
from .integrations.label_studio import register_cli as register_label_studio
from .job import FLAGS, add_config_flags, config_overrides, name_log_file
from .loop.annotated import run_annotated_round
from .loop.export import FORMATS as EXPORT_FORMATS
from .loop.export import export_query
from .loop.run_dir import RunDir, query_table
from .pipeline.grad_sum import pool_grad_sum
from .models import available_models
from .pipeline.pool_scoring import score_pool
from .pipeline.runtime import init_ray
from .storage import StorageError, location
from .storage.location import local_stand_in


def _select(args: argparse.Namespace) -> None:
    model_cfg, scoring, pool, state, ids, labels, transform = _check_select(args)
    init_ray(no_progress_timeout_s=args.no_progress_timeout)
    grad_sum = None
    if args.strategy == "dynamic" and args.gamma != 0:
        grad_sum = pool_grad_sum(pool, ids, labels, model_cfg=model_cfg, state_dict=state, scope=args.scope,
                                 actors=scorer_actors(scoring), transform=transform)
    query = score_pool(pool, model_cfg=model_cfg, state_dict=state, grad_sum=grad_sum, scoring_cfg=scoring,
                       budget=args.budget, exclude_ids=ids, seed=args.seed, transform=transform,
                       on_bad=args.on_bad_image)
    table = query_table(query.ids, query.scores, query.pred, query.prob)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    out = location(args.out)
    out.write_bytes(sink.getvalue().to_pybytes())  # atomic: temp file + rename on disk, one PUT in a bucket
    print(f"scored {query.num_scored} samples in {query.seconds:.1f}s ({query.samples_per_second:.0f}/s); "
          f"wrote the top {len(query.ids)} to {out}")
    if query.skipped_ids.size:
        print(f"skipped {query.skipped_ids.size} undecodable image(s), ids {query.skipped_ids[:20].tolist()}")


def _check_select(args: argparse.Namespace):
    """Every check of ``select``'s flags, files and sizes, before Ray starts. Raises `USER_ERRORS`."""
    model_cfg = ModelConfig(args.model, args.num_classes, args.in_channels)
    scoring = ScoringConfig(strategy=args.strategy, gamma=args.gamma, scope=args.scope,
                            num_scorers=args.num_scorers, batch_size=args.batch_size)
    validate(ExperimentConfig(model=model_cfg, scoring=scoring))
    if args.model not in available_models():
        raise ConfigError(f"--model {args.model!r} is not a registered model; choose one of {available_models()}")
    if not str(args.out).endswith(".parquet"):
        raise ConfigError(f"--out {args.out} must name a .parquet file")
    location(args.out).check_bucket("--out")  # a missing bucket fails now, not after scoring
    if args.image_size and min(args.image_size) < 1:
        raise ConfigError(f"--image-size {args.image_size} must be two positive integers (H W)")
    pool = inspect_pool(args.pool)
    state = check_weights(model_cfg, load_weights_file(args.checkpoint, "Fix: pass the model.pt of a run's round "
                                                                         "folder, or a saved model.state_dict()"),
                          f"--checkpoint {args.checkpoint}")
    ids, labels = _read_labeled(args.labeled, pool, model_cfg.num_classes)
    in_pool, unlabeled = ids.size, pool.num_rows - ids.size  # every labeled id is in the pool (checked)
    if not 1 <= args.budget <= unlabeled:
        raise ConfigError(f"--budget {args.budget} is invalid: pool {pool.source} has {pool.num_rows} samples, "
                          f"{in_pool} of them labeled, so the budget must be in [1, {unlabeled}]")
    if args.strategy == "dynamic" and args.gamma != 0 and ids.size == 0:
        raise ConfigError("dynamic AL needs --labeled (id, label) to sum G over; or pass --gamma 0")
    if args.dataset:
        transform = DATASETS[args.dataset].transform(args.image_size)
    else:
        transform = ImageTransform(tuple(args.image_size) if args.image_size else None)
    return model_cfg, scoring, pool, state, ids, labels, transform


def _select_log(out: str) -> Path:
    """``select``'s log file: next to a local --out; for a URI under ~/.cache/ray_dal/logs/ (`local_stand_in`)."""
    where = location(out)
    return local_stand_in(where).with_suffix(".log")


def _read_labeled(path: str | None, pool: PoolInfo, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, labels) of ``--labeled`` (`ray_dal.data.load_labels`), none when it is not given."""
    if path is None:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    return load_labels(path, pool, None, num_classes, "--labeled")


def _round(args: argparse.Namespace) -> None:
    run, overrides = RunDir(args.run), config_overrides(args, ROUND_FLAGS)
    name_log_file(run)
    if args.config is None and (run.root / "config.yaml").is_file():
        cfg = run.config(overrides)  # the run's own settings; flags given now override them
    else:
        cfg = load_config(args.config, overrides)
    result = run_annotated_round(cfg, args.eval_labels)
    m, where = result.metrics, result.query_path
    if not result.trained:
        print(f"nothing to do: round {result.index} of {result.run.root} was trained on these {m['n_labeled']} "
              f"labels; its query is {where}. Add labels to {cfg.loop.labels} to make the next round.")
        return
    held_out = f", eval accuracy {m['eval_accuracy']:.4f}" if "eval_accuracy" in m else ""
    print(f"round {result.index}: trained on {m['n_labeled']} labels ({m['n_new']} new, {m['n_relabeled']} "
          f"relabeled), train accuracy {m['train_accuracy']:.4f}{held_out}; {m['round_seconds']:.1f}s")
    print(f"query: the {cfg.loop.budget} samples to label next are in {where}\n"
          f"next: ray-dal export --run {args.run} --format csv --out query.csv, or "
          f"ray-dal label-studio push --run {args.run} --url URL --project NAME")


def _export(args: argparse.Namespace) -> None:
    query, out = export_query(args.run, args.format, args.out)
    print(f"wrote the query of round {query.round} ({query.ids.size} samples) of {query.run} to {out}")


def _class_names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",")]


def _absolute(path: str) -> str:
    """A path as stored in the run's config.yaml: absolute, so the run works from any directory; a URI as it is."""
    try:
        where = location(path)
    except StorageError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return str(Path(where.path).resolve()) if where.is_local else where.uri


ROUND_FLAGS = {
    "--pool": ("data.data_dir", _absolute, "the pool: Parquet (column image, optional id; a label column is never used) "
                                     "or a folder of image files"),
    "--labels": ("loop.labels", _absolute, "Parquet or CSV with columns id (or path, for a folder of images) and "
                                           "label (a class index, or a class name)"),
    "--run": ("loop.out", _absolute, "run directory, a path or a URI such as s3://bucket/runs/x (created by the "
                                     "first round)"),
    "--budget": ("loop.budget", int, "b, the number of samples to query"),
    "--classes": ("data.classes", _class_names, "comma-separated class names (label i = name i); fixed for the run"),
    "--num-classes": ("model.num_classes", int, "number of classes (default: as many as --classes names)"),
    "--dataset": ("data.dataset", str, "preprocess as this dataset: its statistics and image size ("
                                       + " | ".join(sorted(DATASETS)) + ")"),
    **{flag: FLAGS[flag] for flag in ("--model", "--strategy", "--gamma", "--scope", "--epochs", "--train-accuracy",
                                      "--seed", "--num-workers", "--num-scorers", "--image-size", "--num-cpus")},
}


def _synth(args: argparse.Namespace) -> None:
    paths = write_synthetic_pool(args.out, args.num_samples, image_size=(args.size, args.size), seed=args.seed)
    print(f"wrote {args.num_samples} samples in {len(paths)} file(s) under {args.out}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ray-dal", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    select = commands.add_parser("select", help="score an unlabeled pool and write the top-b query")
    select.add_argument("--pool", required=True, help="Parquet file or folder of shards (image bytes, optional id); "
                        "a local path or a URI (file://, s3://, gs://, hdfs://)")
    select.add_argument("--checkpoint", required=True, help="model state_dict (e.g. OUT/round_003/model.pt); a path "
                        "or URI")
    select.add_argument("--labeled", help="Parquet or CSV with columns id, label of the labeled samples; a path or "
                        "URI")
    select.add_argument("--budget", required=True, type=int, help="b, the number of samples to query")
    select.add_argument("--out", required=True, help="where to write the query (.parquet); a path or URI (its "
                        "log then goes to ~/.cache/ray_dal/logs/)")
    select.add_argument("--model", default=ModelConfig.name, help="registered model name")
    select.add_argument("--num-classes", type=int, default=ModelConfig.num_classes)
    select.add_argument("--in-channels", type=int, default=ModelConfig.in_channels)
    select.add_argument("--strategy", default=ScoringConfig.strategy, choices=STRATEGIES)
    select.add_argument("--gamma", type=float, default=ScoringConfig.gamma)
    select.add_argument("--scope", default=ScoringConfig.scope, choices=("all", "last"))
    select.add_argument("--num-scorers", type=int, default=ScoringConfig.num_scorers)
    select.add_argument("--batch-size", type=int, default=ScoringConfig.batch_size)
    select.add_argument("--dataset", choices=sorted(DATASETS), help="preprocess as this dataset (its image size "
                        "and statistics); default: CIFAR-10's statistics, images of any one size")
    select.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"),
                        help="expected image size; with --dataset, resize every image to it")
    select.add_argument("--on-bad-image", default="fail", choices=("fail", "skip"))
    select.add_argument("--seed", type=int, default=0, help="seed of the random strategy")
    select.add_argument("--no-progress-timeout", type=float, default=600.0, help="seconds before a stuck stage fails")
    select.set_defaults(handler=_select)

    round_ = commands.add_parser("round", help="one active-learning round with labels from people")
    round_.add_argument("--config", type=Path, help="YAML config (default: the run's config.yaml, else the defaults)")
    add_config_flags(round_, ROUND_FLAGS, required=("--pool", "--labels", "--run", "--budget"))
    round_.add_argument("--eval-labels", type=_absolute, help="Parquet or CSV (id, label) of held-out labeled "
                        "samples of the pool: never trained on nor queried; adds eval_accuracy")
    round_.set_defaults(handler=_round)

    export = commands.add_parser("export", help="write the run's latest query for annotators")
    export.add_argument("--run", required=True, help="run directory (a path or a URI)")
    export.add_argument("--format", required=True, choices=EXPORT_FORMATS)
    export.add_argument("--out", required=True, help="file to write (a path or a URI)")
    export.set_defaults(handler=_export)

    register_label_studio(commands)

    synth = commands.add_parser("synth", help="write a synthetic JPEG pool for benchmarks")
    synth.add_argument("--out", required=True, type=Path)
    synth.add_argument("--num-samples", required=True, type=int)
    synth.add_argument("--size", type=int, default=32, help="image height and width")
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(handler=_synth)

    for command in (select, round_):
        command.add_argument("--verbose", action="store_true", help="show Ray's own lines (workers, Ray Data, Ray "
                             "Train) on the console too; they always go to the log file (RUN/logs/ray.log for "
                             "round, next to --out for select, or ~/.cache/ray_dal/logs/ when --out is a URI)")

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    log_file = {"select": lambda: _select_log(args.out),
                "round": lambda: RunDir(args.run).log_file}.get(args.command)
    with exit_on_user_error(f"ray-dal {args.command}"), \
            console.session(log_file(), args.verbose) if log_file else contextlib.nullcontext():
        args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
