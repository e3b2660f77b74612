"""Dynamic active learning on SVHN (configs/svhn.yaml: the paper's protocol, VGG11).

    python jobs/svhn.py --data-dir ~/data/svhn --out runs/svhn     # train_32x32.mat + test_32x32.mat, or Parquet

Settings come from ray_dal/config.py's defaults, then --config (YAML), then the flags below.
Re-running with the same --out resumes after the last complete round.
"""

from pathlib import Path

from ray_dal.job import run_job, script


def main(argv=None):
    run_job("svhn", Path(__file__).parents[1] / "configs" / "svhn.yaml", argv, __doc__)


if __name__ == "__main__":
    script(main, "svhn.py")
