"""The ``ray-dal`` console script.

    ray-dal select --pool POOL --checkpoint model.pt --labeled labeled.parquet --budget 500 --out query.parquet
        Score a real, unlabeled pool once with a trained model and write the top-b query as Parquet
        (id, score, rank): the human-in-the-loop step. ``--labeled`` holds (id, label) of the samples
        already labeled: they are excluded, and dynamic AL's G is summed over them.
    ray-dal synth --out DIR --num-samples N
        Write a synthetic JPEG pool (Parquet shards) for benchmarks.

Runs on the Ray cluster in ``RAY_ADDRESS`` (e.g. under ``ray job submit``), else an embedded local Ray.
Every flag, file and size is checked before Ray starts; such errors print one message and exit 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .actors import check_weights, load_weights_file
from .config import (
    STRATEGIES,
    ConfigError,
    ExperimentConfig,
    ModelConfig,
    ScoringConfig,
    validate,
)
from .data import DATASETS, ImageTransform, PoolInfo, inspect_pool, read_ids, write_synthetic_pool
from .errors import exit_on_user_error
from .grad_sum import pool_grad_sum
from .models import available_models
from .pool_scoring import score_pool
from .runtime import init_ray


def _select(args: argparse.Namespace) -> None:
    model_cfg, scoring, pool, state, ids, labels, transform = _check_select(args)
    init_ray(no_progress_timeout_s=args.no_progress_timeout)
    grad_sum = None
    if args.strategy == "dynamic" and args.gamma != 0:
        grad_sum = pool_grad_sum(pool, ids, labels, model_cfg=model_cfg, state_dict=state, scope=args.scope,
                                 num_actors=args.num_scorers, transform=transform)
    query = score_pool(pool, model_cfg=model_cfg, state_dict=state, grad_sum=grad_sum, scoring_cfg=scoring,
                       budget=args.budget, exclude_ids=ids, seed=args.seed, transform=transform,
                       on_bad=args.on_bad_image)
    table = pa.table({"id": query.ids, "score": query.scores, "rank": np.arange(len(query.ids), dtype=np.int64)})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    pq.write_table(table, tmp)
    tmp.replace(out)
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


def _read_labeled(path: Path | None, pool: PoolInfo, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, labels) of ``--labeled``: columns id and label, no nulls, unique ids of ``pool``, labels < num_classes."""
    if path is None:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    try:
        table = pq.read_table(path)
    except Exception as error:
        raise ConfigError(f"cannot read --labeled {path} as Parquet: {error}") from None
    missing = {"id", "label"} - set(table.column_names)
    if missing:
        raise ConfigError(f"--labeled {path} needs columns id and label; it lacks {sorted(missing)}")
    if table["id"].null_count or table["label"].null_count:
        raise ConfigError(f"--labeled {path} has missing ids or labels; every row needs both")
    ids, labels = (table[c].to_numpy().astype(np.int64) for c in ("id", "label"))
    uniq, counts = np.unique(ids, return_counts=True)
    if uniq.size != ids.size:
        raise ConfigError(f"--labeled {path} lists ids {uniq[counts > 1][:10].tolist()} more than once; each labeled "
                          "sample must appear once")
    absent = np.setdiff1d(ids, read_ids(pool))
    if absent.size:
        raise ConfigError(f"--labeled {path} has {absent.size} id(s) that pool {pool.source} does not hold, e.g. "
                          f"{absent[:10].tolist()}. Fix: pass the pool these samples were labeled from, or drop them")
    bad = np.unique(labels[(labels < 0) | (labels >= num_classes)])
    if bad.size:
        raise ConfigError(f"--labeled {path} has labels {bad[:10].tolist()} outside [0, --num-classes = {num_classes})")
    return ids, labels


def _synth(args: argparse.Namespace) -> None:
    paths = write_synthetic_pool(args.out, args.num_samples, image_size=(args.size, args.size), seed=args.seed)
    print(f"wrote {args.num_samples} samples in {len(paths)} file(s) under {args.out}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ray-dal", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    select = commands.add_parser("select", help="score an unlabeled pool and write the top-b query")
    select.add_argument("--pool", required=True, help="Parquet file or folder of shards (image bytes, optional id)")
    select.add_argument("--checkpoint", required=True, type=Path, help="model state_dict (e.g. OUT/round_003/model.pt)")
    select.add_argument("--labeled", type=Path, help="Parquet with columns id, label of the labeled samples")
    select.add_argument("--budget", required=True, type=int, help="b, the number of samples to query")
    select.add_argument("--out", required=True, type=Path, help="where to write the query (.parquet)")
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
    select.set_defaults(run=_select)

    synth = commands.add_parser("synth", help="write a synthetic JPEG pool for benchmarks")
    synth.add_argument("--out", required=True, type=Path)
    synth.add_argument("--num-samples", required=True, type=int)
    synth.add_argument("--size", type=int, default=32, help="image height and width")
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(run=_synth)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    with exit_on_user_error(f"ray-dal {args.command}"):  # a message that names the fix, not a traceback
        args.run(args)


if __name__ == "__main__":
    sys.exit(main())
