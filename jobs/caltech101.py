"""Dynamic active learning on Caltech101 (configs/caltech101.yaml: the paper's protocol, an ImageNet-style
ResNet18 from scratch on 299x299 images: a GPU setting; --image-size 64 for a CPU-sized trial).

    python jobs/caltech101.py --data-dir ~/data --out runs/caltech101   # caltech101/101_ObjectCategories

Settings come from ray_dal/config.py's defaults, then --config (YAML), then the flags below.
Re-running with the same --out resumes after the last complete round.
"""

from pathlib import Path

from ray_dal.job import run_job, script


def main(argv=None):
    run_job("caltech101", Path(__file__).parents[1] / "configs" / "caltech101.yaml", argv, __doc__)


if __name__ == "__main__":
    script(main, "caltech101.py")
