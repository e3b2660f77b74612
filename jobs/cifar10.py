"""Dynamic active learning on CIFAR-10 (configs/cifar10.yaml: the paper's protocol, the LeNet-like cnn).

    python jobs/cifar10.py --data-dir ../shared/data/cifar10 --out runs/demo        # embedded local Ray
    ray job submit --working-dir . -- python jobs/cifar10.py --data-dir /data/cifar10 # on a cluster

Settings come from ray_dal/config.py's defaults, then --config (YAML), then the flags below.
Re-running with the same --out resumes after the last complete round.
"""

from pathlib import Path

from ray_dal.job import run_job, script


def main(argv=None):
    run_job("cifar10", Path(__file__).parents[1] / "configs" / "cifar10.yaml", argv, __doc__)


if __name__ == "__main__":
    script(main, "cifar10.py")
