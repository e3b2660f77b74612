"""The ``ray-dal`` console script.

    ray-dal select --pool POOL --checkpoint model.pt --labeled labeled.parquet --budget 500 --out query.parquet
        Score a real, unlabeled pool once with a trained model and write the top-b query as Parquet
        (id, score, rank): the human-in-the-loop step. ``--labeled`` holds (id, label) of the samples
        already labeled: they are excluded, and dynamic AL's G is summed over them.
    ray-dal synth --out DIR --num-samples N
        Write a synthetic JPEG pool (Parquet shards) for benchmarks.

Runs on the Ray cluster in ``RAY_ADDRESS`` (e.g. under ``ray job submit``), else an embedded local Ray.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .config import STRATEGIES, ExperimentConfig, ModelConfig, ScoringConfig, validate
from .data import inspect_pool, write_synthetic_pool
from .grad_sum import pool_grad_sum
from .pool_scoring import score_pool
from .runtime import init_ray


def _select(args: argparse.Namespace) -> None:
    model_cfg = ModelConfig(args.model, args.num_classes, args.in_channels)
    scoring = ScoringConfig(strategy=args.strategy, gamma=args.gamma, scope=args.scope,
                            num_scorers=args.num_scorers, batch_size=args.batch_size)
    validate(ExperimentConfig(model=model_cfg, scoring=scoring))
    if not str(args.out).endswith(".parquet"):
        raise SystemExit(f"--out {args.out} must name a .parquet file")
    pool = inspect_pool(args.pool)
    try:
        state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    except Exception as error:
        raise SystemExit(f"cannot load checkpoint {args.checkpoint} as a state_dict (weights only): {error}")
    ids, labels = _read_labeled(args.labeled)
    if ids.size and len(np.unique(ids)) != ids.size:
        raise SystemExit(f"{args.labeled} lists some ids twice; each labeled sample must appear once")
    image_size = tuple(args.image_size) if args.image_size else None
    init_ray(no_progress_timeout_s=args.no_progress_timeout)
    grad_sum = None
    if args.strategy == "dynamic" and args.gamma != 0:
        if ids.size == 0:
            raise SystemExit("dynamic AL needs --labeled (id, label) to sum G over; or use --gamma 0")
        grad_sum = pool_grad_sum(pool, ids, labels, model_cfg=model_cfg, state_dict=state, scope=args.scope,
                                 num_actors=args.num_scorers, image_size=image_size)
    query = score_pool(pool, model_cfg=model_cfg, state_dict=state, grad_sum=grad_sum, scoring_cfg=scoring,
                       budget=args.budget, exclude_ids=ids, seed=args.seed, image_size=image_size,
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


def _read_labeled(path: Path | None) -> tuple[np.ndarray, np.ndarray]:
    if path is None:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    try:
        table = pq.read_table(path)
    except Exception as error:
        raise SystemExit(f"cannot read --labeled {path} as Parquet: {error}")
    missing = {"id", "label"} - set(table.column_names)
    if missing:
        raise SystemExit(f"--labeled {path} needs columns id and label; it lacks {sorted(missing)}")
    return table["id"].to_numpy().astype(np.int64), table["label"].to_numpy().astype(np.int64)


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
    select.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), help="expected image size")
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
    args.run(args)


if __name__ == "__main__":
    sys.exit(main())
