"""Dynamic active learning on CIFAR-10.

    python jobs/cifar10.py --data-dir ../shared/data/cifar10 --out runs/demo        # embedded local Ray
    ray job submit --working-dir . -- python jobs/cifar10.py --data-dir /data/cifar10 # on a cluster

Settings come from ray_dal/config.py's defaults, then --config (YAML), then the flags below.
Re-running with the same --out resumes after the last complete round.
"""

import argparse
import logging
from pathlib import Path

from ray_dal.config import STRATEGIES, load_config
from ray_dal.errors import exit_on_user_error
from ray_dal.loop import run_experiment

FLAGS = {  # flag -> (config key, type, help)
    "--data-dir": ("data.data_dir", str, "CIFAR-10 as Parquet, torchvision's layout, or where to download it"),
    "--out": ("loop.out", str, "run directory (resumed if it exists)"),
    "--model": ("model.name", str, "cnn | resnet18 | vgg11"),
    "--strategy": ("scoring.strategy", str, " | ".join(STRATEGIES)),
    "--gamma": ("scoring.gamma", float, "weight of <g, G> (inf: <g, G> alone)"),
    "--scope": ("scoring.scope", str, "all | last"),
    "--initial": ("loop.initial", int, "size M of the seeded initial labeled set"),
    "--budget": ("loop.budget", int, "samples b queried per round"),
    "--rounds": ("loop.rounds", int, "number R of queries"),
    "--epochs": ("train.max_epochs", int, "max epochs per round"),
    "--train-accuracy": ("train.train_accuracy", float, "end a round at this training accuracy"),
    "--seed": ("loop.seed", int, "seed of the initial set, the model and the shuffles"),
    "--num-workers": ("train.num_workers", int, "Ray Train workers"),
    "--num-scorers": ("scoring.num_scorers", int, "Ray Data scoring actors"),
    "--pool-size": ("data.pool_size", int, "use a seeded subsample of the training pool"),
    "--test-size": ("data.test_size", int, "use a seeded subsample of the test set"),
    "--num-cpus": ("runtime.num_cpus", int, "CPUs of the embedded local Ray (ignored on a cluster)"),
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path(__file__).parents[1] / "configs" / "cifar10.yaml")
    for flag, (key, kind, help_text) in FLAGS.items():
        parser.add_argument(flag, type=kind, help=f"{help_text} [{key}]")
    args = vars(parser.parse_args(argv))
    overrides = {key: args[flag[2:].replace("-", "_")] for flag, (key, _, _) in FLAGS.items()}
    cfg = load_config(args["config"], {k: v for k, v in overrides.items() if v is not None})
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    run = run_experiment(cfg)
    for m in run.metrics():
        print(f"round {m['round']}: {m['n_labeled']} labeled, test accuracy {m['test_accuracy']:.4f}")
    print(f"results in {run.root}")


if __name__ == "__main__":
    with exit_on_user_error("cifar10.py"):  # bad input: one message naming the value and the fix, exit 2
        main()
