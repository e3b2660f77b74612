"""Bad input is refused with one clear error (what, where, how to fix) before any expensive work starts,
and files never run code. Through the real entry points: jobs/cifar10.py and `ray-dal select`.

"Before expensive work" is checked by what exists afterwards (no run folder, no round, no Ray Train
folder) and, in a fresh process, by Ray never having started.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from ray_dal.cli import main as ray_dal_main
from ray_dal.config import ConfigError
from ray_dal.data import ImageDecodeError, PoolError
from ray_dal.errors import WeightsError
from ray_dal.models import build_model

from .conftest import JOB_ARGS, REPO, run_job


class RunsCode:
    """Unpickling this runs ``touch marker``: what a malicious file would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_data(folder: Path, train: pa.Table, test: pa.Table) -> Path:
    folder.mkdir(parents=True)
    pq.write_table(train, folder / "train.parquet", row_group_size=100)
    pq.write_table(test, folder / "test.parquet", row_group_size=100)
    return folder


def replace_column(table: pa.Table, name: str, values) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, pa.array(values, table.schema.field(name).type))


@pytest.fixture(scope="module")
def slice_tables(cifar10_slice) -> tuple[pa.Table, pa.Table]:
    return pq.read_table(cifar10_slice / "train.parquet"), pq.read_table(cifar10_slice / "test.parquet")


# ---- jobs/cifar10.py: data, sizes and config -------------------------------------------------------------


def bad_data_dir(tmp_path: Path, kind: str, tables: tuple[pa.Table, pa.Table]) -> Path:
    train, test = tables
    if kind == "missing":
        return tmp_path / "nowhere"
    if kind == "not_parquet":
        folder = write_data(tmp_path / "data", train, test)
        (folder / "train.parquet").write_bytes(b"PAR1 half a file")
        return folder
    if kind == "no_image":
        return write_data(tmp_path / "data", train.drop_columns(["image"]), test)
    if kind == "duplicate_ids":
        ids = train["id"].to_numpy().copy()
        ids[7] = ids[3]
        return write_data(tmp_path / "data", replace_column(train, "id", ids), test)
    if kind == "label_out_of_range":
        labels = train["label"].to_numpy().copy()
        labels[11] = 12
        return write_data(tmp_path / "data", replace_column(train, "label", labels), test)
    raise ValueError(kind)


@pytest.mark.parametrize("kind, error, message", [
    ("missing", PoolError, r"CIFAR-10 was not found in \S*nowhere and the download failed.*Fix: point --data-dir"),
    ("not_parquet", PoolError, r"cannot read \S*train.parquet as Parquet.*Fix: check the file"),
    ("no_image", PoolError, r"train.parquet: no 'image' column \(columns found: \['label', 'id'\]\)\. Fix:"),
    ("duplicate_ids", PoolError, r"column 'id' has 1 duplicated value\(s\), e\.g\. \[\d+\]\. Fix: ids must be unique"),
    ("label_out_of_range", ConfigError, r"has labels \[12\] outside \[0, model.num_classes = 10\)\. Fix: set"),
])
def test_bad_data_is_refused_before_anything_runs(tmp_path, slice_tables, kind, error, message):
    out = tmp_path / "run"
    with pytest.raises(error, match=message):
        run_job(["--data-dir", str(bad_data_dir(tmp_path, kind, slice_tables)), "--out", str(out), *JOB_ARGS])
    assert not out.exists()


@pytest.mark.parametrize("flags, message", [
    (["--initial", "2500"], r"2500 \+ 2 x 100 = 2700 exceeds the pool's 2000 samples; lower them"),
    (["--budget", "1000"], r"200 \+ 2 x 1000 = 2200 exceeds the pool's 2000 samples"),  # b > unlabeled pool
    (["--budget", "0"], r"loop.budget = 0 is invalid: must be >= 1"),
    (["--budget", "-5"], r"loop.budget = -5 is invalid: must be >= 1"),
    (["--model", "lenet"], r"model.name = 'lenet' is not a registered model; choose one of \['cnn', "),
    (["--pool-size", "5000"], r"data.pool_size = 5000 is invalid: the data has 2000 samples"),
])
def test_sizes_that_do_not_fit_the_pool_are_refused(tmp_path, cifar10_slice, flags, message):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=message):
        run_job(["--data-dir", str(cifar10_slice), "--out", str(out), *JOB_ARGS, *flags])
    assert not out.exists()


def test_a_config_with_unknown_keys_or_python_tags_is_refused(tmp_path, cifar10_slice):
    config = tmp_path / "c.yaml"
    config.write_text("loop:\n  budgett: 5\n")
    common = ["--config", str(config), "--data-dir", str(cifar10_slice), "--out", str(tmp_path / "run")]
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['budgett'\] in section 'loop'; valid keys: .*'budget'"):
        run_job(common)
    marker = tmp_path / "pwned"
    config.write_text(f'loop: !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(ConfigError, match=r"c.yaml' is not plain YAML data.*python/object"):
        run_job(common)
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_a_cifar_pickle_that_would_run_code_is_refused(tmp_path):
    folder = tmp_path / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(b"")
    marker = tmp_path / "pwned"
    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump({b"data": RunsCode(marker), b"labels": [0]}, f, protocol=2)
    with pytest.raises(PoolError, match=r"cannot read CIFAR-10 batch file \S*data_batch_1 .*unexpected object "
                                        r"posix.system.*Fix: delete the cifar-10-batches-py folder"):
        run_job(["--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "run"), *JOB_ARGS])
    assert not marker.exists()


def test_entry_points_print_the_message_and_exit_2_before_ray_starts(tmp_path, slice_tables, cifar10_slice):
    """In fresh processes: one line naming the problem and the fix, no traceback, and Ray never started."""
    data = bad_data_dir(tmp_path, "no_image", slice_tables)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    commands = {
        "cifar10.py: error: ": [str(REPO / "jobs" / "cifar10.py"), "--data-dir", str(data), "--out",
                                str(tmp_path / "run"), *JOB_ARGS],
        "ray-dal select: error: ": ["-m", "ray_dal.cli", "select", "--pool", str(cifar10_slice / "train.parquet"),
                                    "--checkpoint", str(tmp_path / "missing.pt"), "--budget", "5",
                                    "--out", str(tmp_path / "q.parquet")],
    }
    for prefix, argv in commands.items():
        done = subprocess.run([sys.executable, *argv], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 2, done.stderr[-2000:]
        assert done.stderr.startswith(prefix) and "Fix:" in done.stderr, done.stderr[-2000:]
        assert "Traceback" not in done.stderr and "Started a local Ray" not in done.stderr + done.stdout


# ---- resuming a run whose files were tampered with ---------------------------------------------------------


@pytest.fixture()
def round_0_copy(finished_run, tmp_path) -> Path:
    """A run folder holding config.yaml and round_000 of `finished_run`: resuming it loads round_000/model.pt."""
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(finished_run / "config.yaml", out)
    shutil.copytree(finished_run / "round_000", out / "round_000")
    return out


def test_a_resumed_model_that_does_not_fit_is_refused(round_0_copy, cifar10_slice):
    torch.save(build_model("cnn", 5).state_dict(), round_0_copy / "round_000" / "model.pt")
    with pytest.raises(WeightsError, match=r"round_000/model.pt does not fit model 'cnn' \(num_classes=10, "
                                           r"in_channels=3\): .*size mismatch for fc3.weight.*Fix: use the model"):
        run_job(["--data-dir", str(cifar10_slice), "--out", str(round_0_copy), *JOB_ARGS])
    assert sorted(p.name for p in round_0_copy.iterdir()) == ["config.yaml", "metrics.jsonl", "round_000"]


def test_a_resumed_model_that_would_run_code_is_refused(round_0_copy, cifar10_slice, tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"fc3.weight": RunsCode(marker)}, round_0_copy / "round_000" / "model.pt")
    with pytest.raises(WeightsError, match=r"cannot load \S*round_000/model.pt as plain weights .*objects other than "
                                           r"tensors.*posix.system.*Fix: delete round_000"):
        run_job(["--data-dir", str(cifar10_slice), "--out", str(round_0_copy), *JOB_ARGS])
    assert not marker.exists()


# ---- ray-dal select ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def select_files(cifar10_slice, tmp_path_factory) -> dict[str, Path]:
    """A pool (2,000 real images), a checkpoint (a seeded cnn) and 20 labeled ids of the pool."""
    folder = tmp_path_factory.mktemp("select")
    pool = cifar10_slice / "train.parquet"
    table = pq.read_table(pool, columns=["id", "label"])
    torch.manual_seed(0)
    torch.save(build_model("cnn", 10).state_dict(), folder / "model.pt")
    pq.write_table(table.slice(0, 20), folder / "labeled.parquet")
    return {"pool": pool, "checkpoint": folder / "model.pt", "labeled": folder / "labeled.parquet"}


def select(files: dict[str, Path | None], out: Path, **flags) -> list[str]:
    """``ray-dal select`` arguments: ``files`` (pool, checkpoint, labeled; None leaves one out) and flags."""
    args = {**files, "budget": 10, "out": out / "query.parquet", "num_scorers": 1, **flags}
    return ["select", *[x for k, v in args.items() if v is not None for x in (f"--{k.replace('_', '-')}", str(v))]]


def select_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        ray_dal_main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def labeled_file(folder: Path, ids, labels) -> Path:
    path = folder / "labeled_bad.parquet"
    pq.write_table(pa.table({"id": pa.array(ids, pa.int64()), "label": pa.array(labels, pa.int64())}), path)
    return path


@pytest.mark.parametrize("case, message", [
    ("absent_ids", r"has 2 id\(s\) that pool \S+ does not hold, e\.g\. \[-4, 1000000000\]\. Fix: pass the pool"),
    ("duplicate_ids", r"gives 1 id\(s\) two different labels, e\.g\. \[\d+\]\. Fix: keep one label per id"),
    ("label_out_of_range", r"has labels \[10\] outside \[0, --num-classes = 10\)"),
    ("budget_0", r"--budget 0 is invalid: pool \S+ has 2000 samples, 20 of them labeled, so the budget must be in "
                 r"\[1, 1980\]"),
    ("budget_too_big", r"--budget 1981 is invalid: .*must be in \[1, 1980\]"),
    ("wrong_classes", r"--checkpoint \S+ does not fit model 'cnn' \(num_classes=10, in_channels=3\): .*size mismatch "
                      r"for fc3.weight: .*torch.Size\(\[5, 84\]\).*Fix: use the model settings"),
    ("not_a_state_dict", r"--checkpoint \S+ is not a state_dict .*Fix: save model.state_dict\(\)"),
    ("non_finite_weights", r"--checkpoint \S+ holds NaN or infinite values in \['fc3.bias'\]"),
    ("runs_code", r"cannot load \S+ as plain weights \(torch.load with weights_only=True\): it holds objects other "
                  r"than tensors.*posix.system"),
    ("no_image_column", r"labeled.parquet: no 'image' column"),
    ("missing_labeled_for_dynamic", r"dynamic AL needs --labeled"),
])
def test_select_refuses_bad_input_before_ray_starts(select_files, tmp_path, capsys, case, message):
    files, flags = dict(select_files), {}
    first = pq.read_table(files["pool"], columns=["id"])["id"].to_numpy()[:3]
    if case == "absent_ids":
        files["labeled"] = labeled_file(tmp_path, [first[0], 10**9, -4], [1, 2, 3])
    elif case == "duplicate_ids":
        files["labeled"] = labeled_file(tmp_path, [first[0], first[1], first[0]], [1, 2, 3])
    elif case == "label_out_of_range":
        files["labeled"] = labeled_file(tmp_path, first, [0, 10, 3])
    elif case in ("budget_0", "budget_too_big"):
        flags["budget"] = 0 if case == "budget_0" else 1981
    elif case in ("wrong_classes", "not_a_state_dict", "non_finite_weights", "runs_code"):
        files["checkpoint"] = tmp_path / "bad.pt"
        state = build_model("cnn", 10).state_dict()
        state["fc3.bias"][2] = float("inf")
        weights = {"wrong_classes": build_model("cnn", 5).state_dict(), "not_a_state_dict": {"epoch": 3},
                   "non_finite_weights": state, "runs_code": {"fc3.weight": RunsCode(tmp_path / "pwned")}}[case]
        torch.save(weights, files["checkpoint"])
    elif case == "no_image_column":
        files["pool"] = files["labeled"]
    elif case == "missing_labeled_for_dynamic":
        files["labeled"] = None
    err = select_error(select(files, tmp_path, **flags), capsys)
    assert err.startswith("ray-dal select: error: ") and re.search(message, err), err
    assert not (tmp_path / "query.parquet").exists() and not (tmp_path / "pwned").exists()


def test_non_finite_scores_are_reported_with_their_ids_through_the_cli(ray_local, select_files, tmp_path, capsys):
    state = torch.load(select_files["checkpoint"], weights_only=True)
    state["fc3.weight"] = torch.full_like(state["fc3.weight"], 3e38)  # finite weights, infinite logits
    torch.save(state, tmp_path / "huge.pt")
    err = select_error(select(select_files, tmp_path, checkpoint=tmp_path / "huge.pt"), capsys)
    assert re.search(r"non-finite score\(s\) \(NaN or inf\) for ids \[\d+", err), err
    assert "(raised inside a ray_dal.pipeline.pool_scoring.PoolScorer actor)" in err
    ids = [int(i) for i in re.search(r"for ids \[([\d, ]+)\]", err).group(1).split(", ")]
    pool_ids = pq.read_table(select_files["pool"], columns=["id"])["id"].to_numpy()
    labeled = pq.read_table(select_files["labeled"])["id"].to_numpy()
    assert np.isin(ids, pool_ids).all() and not np.isin(ids, labeled).any()
    assert not (tmp_path / "query.parquet").exists()


# ---- images that cannot be decoded, and a model that diverges, through the loop ----------------------------


def png(size: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((size, size, 3), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def with_bad_images(table: pa.Table, rows: int, bad: int, seed: int) -> tuple[pa.Table, np.ndarray]:
    """``rows`` seeded rows of ``table``, ``bad`` of them with undecodable or 16x16 images; and those ids."""
    rng = np.random.default_rng(seed)
    table = table.take(np.sort(rng.choice(table.num_rows, rows, replace=False)))
    broken = np.sort(rng.choice(rows, bad, replace=False))
    images = table["image"].to_pylist()
    for k, row in enumerate(broken):
        images[row] = b"\x89PNG truncated" if k % 2 else png(16)
    return replace_column(table, "image", images), np.sort(table["id"].to_numpy()[broken])


@pytest.fixture(scope="module")
def bad_images(slice_tables, tmp_path_factory):
    """400 train / 100 test real images; 40 of the train ones and 5 test ones undecodable or 16x16."""
    train, bad_train = with_bad_images(slice_tables[0], 400, 40, seed=1)
    test, bad_test = with_bad_images(slice_tables[1], 100, 5, seed=2)
    return write_data(tmp_path_factory.mktemp("bad_images") / "data", train, test), bad_train, bad_test


SMALL_JOB = ["--initial", "100", "--budget", "50", "--rounds", "1", "--epochs", "1", "--num-workers", "0",
             "--num-scorers", "1", "--seed", "1"]


def test_bad_images_fail_with_their_ids_before_training(ray_local, bad_images, tmp_path):
    data, bad_train, _ = bad_images
    out = tmp_path / "run"
    with pytest.raises(ImageDecodeError, match=r"could not be used \(id \d+: (undecodable|wrong size 16x16, "
                                               r"expected 32x32)") as info:
        run_job(["--data-dir", str(data), "--out", str(out), *SMALL_JOB])
    assert info.value.bad_ids and set(info.value.bad_ids) <= set(bad_train.tolist())
    assert "data.on_bad_image: skip" in str(info.value)
    assert not (out / "ray_train").exists() and not list(out.glob("round_*"))  # the labeled set's decode failed


@pytest.mark.slow
def test_bad_images_are_skipped_reported_and_never_queried(ray_local, bad_images, tmp_path):
    data, bad_train, bad_test = bad_images
    out = tmp_path / "run"
    config = tmp_path / "skip.yaml"
    config.write_text("data:\n  on_bad_image: skip\n")
    run_job(["--config", str(config), "--data-dir", str(data), "--out", str(out), *SMALL_JOB])
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    labeled_0 = pq.read_table(out / "round_000" / "labeled.parquet")["id"].to_numpy()
    selected = pq.read_table(out / "round_000" / "selected.parquet")["id"].to_numpy()
    labeled_1 = pq.read_table(out / "round_001" / "labeled.parquet")["id"].to_numpy()
    # Round 0 decoded every pool image (the labeled set to train, the rest to score): all bad ones reported.
    assert metrics[0]["skipped_ids"] == bad_train.tolist()
    assert np.isin(labeled_0, bad_train).any()  # some were in the seeded initial set: labeled, not trained on
    assert len(selected) == 50 and not np.isin(selected, bad_train).any()
    assert metrics[1]["skipped_ids"] == np.intersect1d(labeled_1, bad_train).tolist()  # round 1 only trains
    assert [m["skipped_test_ids"] for m in metrics] == [bad_test.tolist()] * 2
    assert metrics[0]["pool_size"] == 300


def test_a_diverging_model_stops_the_run_before_it_is_scored(ray_local, cifar10_slice, tmp_path):
    config = tmp_path / "lr.yaml"
    config.write_text("train:\n  lr: 1.0e+30\n  train_accuracy: null\n")
    out = tmp_path / "run"
    with pytest.raises(WeightsError, match=r"round 0's trained model \(train.lr = 1e\+30\) holds NaN or infinite "
                                           r"values in \[.*Fix: .*lower train.lr"):
        run_job(["--config", str(config), "--data-dir", str(cifar10_slice), "--out", str(out), *SMALL_JOB,
                 "--epochs", "3"])
    assert not list(out.glob("round_*"))
