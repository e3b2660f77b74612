"""The dataset registry on small files generated in each on-disk format, and the SVHN and Caltech101 jobs end to end."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.io
from PIL import Image

from ray_dal.config import ConfigError, from_dict
from ray_dal.data import DATASETS, ImageDecodeError, ImageTransform, PoolError, decode_images, inspect_pool
from ray_dal.data.image_folder import split_per_class

from .conftest import run_job


def rgb(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def save_image(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)


def write_svhn(folder: Path, n_train: int, n_test: int, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """train_32x32.mat / test_32x32.mat in SVHN's real layout (X uint8 [32, 32, 3, N], y [N, 1] in 1..10);
    returns each split's HWC images and the labels torchvision gives (10 -> 0)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    written = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
        y = (np.arange(n) % 10 + 1).astype(np.uint8)[:, None]  # every digit, 10 included
        scipy.io.savemat(folder / f"{split}_32x32.mat", {"X": x, "y": y})
        written[split] = (x.transpose(3, 0, 1, 2), np.where(y[:, 0] == 10, 0, y[:, 0]).astype(np.int64))
    return written


def write_class_tree(root: Path, counts: dict[str, int], ext: str = "jpg", seed: int = 0) -> None:
    """<root>/<class>/image_NNNN.<ext> with images of varying sizes; each class's second image is grayscale."""
    for c, (name, n) in enumerate(counts.items()):
        for i in range(n):
            image = rgb(20 + (i * 7) % 23, 18 + (i * 5) % 29, seed + 100 * c + i)
            save_image(root / name / f"image_{i + 1:04d}.{ext}", image[..., 0] if i == 1 else image)


def read(path: Path) -> pa.Table:
    return pq.read_table(path)


def mtimes(*paths: Path) -> list[int]:
    return [p.stat().st_mtime_ns for p in paths]


# ---- SVHN: torchvision's .mat files ---------------------------------------------------------------------


def test_svhn_mat_files_are_converted_once(tmp_path):
    written = write_svhn(tmp_path, n_train=23, n_test=11)
    train, test = DATASETS["svhn"].resolve(tmp_path, download=False)
    assert (train, test) == (tmp_path / "ray_dal_parquet" / "train.parquet", tmp_path / "ray_dal_parquet" / "test.parquet")
    for path, (images, labels) in ((train, written["train"]), (test, written["test"])):
        table = read(path)
        assert table.schema.names == ["id", "image", "label"]
        assert table.schema.field("id").type == pa.int64() and table.schema.field("label").type == pa.int64()
        np.testing.assert_array_equal(table["id"].to_numpy(), np.arange(len(labels)))
        np.testing.assert_array_equal(table["label"].to_numpy(), labels)  # 10 -> 0
        assert set(labels) == set(range(10))
        np.testing.assert_array_equal(decode_images(table["image"].to_pylist())[0], images)  # PNG: lossless
    before = mtimes(train, test)
    assert DATASETS["svhn"].resolve(tmp_path, download=False) == (train, test)
    assert mtimes(train, test) == before
    assert sorted(p.name for p in train.parent.iterdir()) == ["test.parquet", "train.parquet"]  # no temp files


def test_a_broken_svhn_file_is_refused(tmp_path):
    write_svhn(tmp_path, 4, 4)
    scipy.io.savemat(tmp_path / "test_32x32.mat", {"X": np.zeros((28, 28, 3, 4), np.uint8), "y": np.ones((4, 1))})
    with pytest.raises(PoolError, match=r"test_32x32.mat: X is uint8 \[28, 28, 3, 4\].*Fix: download the file again"):
        DATASETS["svhn"].resolve(tmp_path, download=False)


# ---- Caltech101 and ImageFolder copies ------------------------------------------------------------------


CALTECH_COUNTS = {"Faces": 10, "BACKGROUND_Google": 4, "accordion": 7, "airplanes": 3}


def test_caltech101_layout_is_split_per_class_once(tmp_path):
    write_class_tree(tmp_path / "a" / "caltech101" / "101_ObjectCategories", CALTECH_COUNTS)
    train, test = DATASETS["caltech101"].resolve(tmp_path / "a", download=False)
    tr, te = read(train), read(test)
    assert tr.schema.names == ["id", "image", "label", "path"]
    ids = np.concatenate([tr["id"].to_numpy(), te["id"].to_numpy()])
    np.testing.assert_array_equal(np.sort(ids), np.arange(20))  # disjoint and covering: BACKGROUND_Google left out
    classes = ["Faces", "accordion", "airplanes"]  # sorted, as torchvision's categories
    for table in (tr, te):
        for label, path in zip(table["label"].to_pylist(), table["path"].to_pylist()):
            assert path.split("/")[0] == classes[label]
    np.testing.assert_array_equal(np.bincount(te["label"].to_numpy()), [2, 1, 1])  # round(20% of 10, 7, 3)
    np.testing.assert_array_equal(np.bincount(tr["label"].to_numpy()), [8, 6, 2])
    source = tmp_path / "a" / "caltech101" / "101_ObjectCategories"
    for row in te.to_pylist()[:3]:  # the original file bytes, unchanged
        assert row["image"] == (source / row["path"]).read_bytes()

    write_class_tree(tmp_path / "b" / "101_ObjectCategories", CALTECH_COUNTS)  # the same files elsewhere
    again = DATASETS["caltech101"].resolve(tmp_path / "b", download=False)
    assert read(again[1])["id"].to_pylist() == te["id"].to_pylist()  # the split is seeded

    before = mtimes(train, test)
    assert DATASETS["caltech101"].resolve(tmp_path / "a", download=False) == (train, test)
    assert mtimes(train, test) == before


def test_split_per_class_is_seeded_disjoint_and_covers_every_class():
    labels = np.repeat(np.arange(5), [31, 5, 2, 1, 100])
    test = split_per_class(labels, 0.2, seed=0)
    np.testing.assert_array_equal(np.bincount(labels[test], minlength=5), [6, 1, 0, 0, 20])
    np.testing.assert_array_equal(split_per_class(labels, 0.2, seed=0), test)
    assert not np.array_equal(split_per_class(labels, 0.2, seed=1), test)


def test_caltech_images_decode_to_rgb_at_the_configured_size(tmp_path):
    write_class_tree(tmp_path / "101_ObjectCategories", {"a": 3, "b": 2})
    train, _ = DATASETS["caltech101"].resolve(tmp_path, download=False)
    table = read(train)
    sizes = {Image.open(io.BytesIO(b)).size for b in table["image"].to_pylist()}
    assert len(sizes) > 1  # the files vary in size ...
    transform = DATASETS["caltech101"].transform(image_size=[24, 40])
    images, keep = decode_images(table["image"].to_pylist(), transform=transform)
    assert keep.all() and images.shape == (len(table), 24, 40, 3)  # ... and all decode to the configured size
    gray = table["path"].to_pylist().index("a/image_0002.jpg")
    assert np.array_equal(images[gray, ..., 0], images[gray, ..., 1])  # grayscale -> RGB
    assert DATASETS["caltech101"].transform() == ImageTransform((299, 299), DATASETS["caltech101"].mean,
                                                                DATASETS["caltech101"].std, resize=True)


def test_image_folder_copies(tmp_path):
    write_class_tree(tmp_path / "split" / "train", {"cat": 4, "dog": 3}, ext="png")
    write_class_tree(tmp_path / "split" / "test", {"dog": 2}, ext="png", seed=9)
    train, test = DATASETS["svhn"].resolve(tmp_path / "split", download=False)  # any dataset takes an ImageFolder
    assert read(train)["label"].to_pylist() == [0] * 4 + [1] * 3
    assert read(test)["label"].to_pylist() == [1, 1]  # labels by the training folder's classes
    assert read(test)["id"].to_pylist() == [0, 1]

    write_class_tree(tmp_path / "flat", {"x": 5, "y": 5}, ext="png")
    (tmp_path / "flat" / "notes.txt").write_text("not an image")
    train, test = DATASETS["cifar10"].resolve(tmp_path / "flat", download=False)
    assert inspect_pool(train).num_rows == 8 and read(test)["label"].to_pylist() == [0, 1]

    write_class_tree(tmp_path / "bad" / "train", {"cat": 2}, ext="png")
    write_class_tree(tmp_path / "bad" / "test", {"cow": 1}, ext="png")
    with pytest.raises(PoolError, match=r"bad/test/cow is not a class of the training folder.*Fix: give train/"):
        DATASETS["cifar10"].resolve(tmp_path / "bad", download=False)
    write_class_tree(tmp_path / "empty_class", {"cat": 2}, ext="png")
    (tmp_path / "empty_class" / "dog").mkdir()
    with pytest.raises(PoolError, match=r"class folder \S*empty_class/dog holds no image.*Fix: add its images"):
        DATASETS["cifar10"].resolve(tmp_path / "empty_class", download=False)


def test_a_parquet_copy_is_used_as_is(tmp_path):
    table = pa.table({"id": pa.array([5, 9], pa.int64()), "image": pa.array([b"x", b"y"], pa.binary()),
                      "label": pa.array([0, 100], pa.int64())})
    for name in ("train.parquet", "test.parquet"):
        pq.write_table(table, tmp_path / name)
    for dataset in DATASETS.values():
        assert dataset.resolve(tmp_path, download=False) == (tmp_path / "train.parquet", tmp_path / "test.parquet")
    assert not (tmp_path / "ray_dal_parquet").exists()


@pytest.mark.parametrize("name, layout", [("svhn", "train_32x32.mat"), ("caltech101", "101_ObjectCategories")])
def test_missing_data_fails_fast_offline(tmp_path, name, layout):
    start = time.perf_counter()
    with pytest.raises(PoolError) as err:
        DATASETS[name].resolve(tmp_path / name, download=True)  # a real download attempt; this machine is offline
    assert time.perf_counter() - start < 60
    msg = str(err.value)
    assert f"was not found in {tmp_path / name} and the download failed" in msg
    assert "--data-dir" in msg and "train.parquet" in msg and layout in msg and "ImageFolder" in msg
    with pytest.raises(PoolError, match="download=False"):
        DATASETS[name].resolve(tmp_path / "elsewhere", download=False)


# ---- preprocessing and settings ---------------------------------------------------------------------------


def test_transform_resizes_or_refuses_other_sizes():
    encoded = []
    for i, (h, w) in enumerate([(10, 12), (31, 17), (20, 20)]):
        buf = io.BytesIO()
        Image.fromarray(rgb(h, w, i)).save(buf, format="PNG")
        encoded.append(buf.getvalue())
    images, keep = decode_images(encoded, transform=ImageTransform(20, resize=True))
    assert keep.all() and images.shape == (3, 20, 20, 3)
    with pytest.raises(ImageDecodeError, match="wrong size 10x12, expected 20x20"):
        decode_images(encoded, transform=ImageTransform(20))
    with pytest.raises(ImageDecodeError, match="undecodable"):
        decode_images([rgb(10, 12, 0).tobytes()], transform=ImageTransform(20, resize=True))  # raw pixels
    for bad, message in (({"image_size": 0}, "image_size = 0 is invalid"), ({"resize": True}, "needs an image_size"),
                         ({"std": (1, 0, 1)}, "std > 0")):
        with pytest.raises(ValueError, match=message):
            ImageTransform(**bad)
    svhn = DATASETS["svhn"]
    assert svhn.transform() == ImageTransform((32, 32), svhn.mean, svhn.std, resize=False)
    assert svhn.transform(64) == ImageTransform((64, 64), svhn.mean, svhn.std, resize=True)


@pytest.mark.parametrize("value, ok", [(None, True), (64, True), ([48, 64], True), (0, False), ([32], False),
                                       ("big", False), (True, False)])
def test_data_image_size_setting(value, ok):
    if ok:
        assert from_dict({"data": {"image_size": value}}).data.image_size == value
    else:
        with pytest.raises(ConfigError, match="data.image_size = .* is invalid: give one int"):
            from_dict({"data": {"image_size": value}})


# ---- the jobs end to end on tiny generated data (real local Ray) -----------------------------------------

TINY_RUN = ["--initial", "20", "--budget", "10", "--rounds", "1", "--epochs", "1", "--num-workers", "0",
            "--num-scorers", "1", "--seed", "1"]


def check_run(out: Path, dataset: str, model: str, pool: set[int]) -> None:
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(m["round"], m["n_labeled"]) for m in metrics] == [(0, 20), (1, 30)]
    assert all(0 <= m["test_accuracy"] <= 1 for m in metrics)
    labeled = set(read(out / "round_000" / "labeled.parquet")["id"].to_pylist())
    selected = set(read(out / "round_000" / "selected.parquet")["id"].to_pylist())
    assert len(selected) == 10 and not selected & labeled and selected | labeled <= pool
    config = (out / "config.yaml").read_text()
    assert f"dataset: {dataset}" in config and f"name: {model}" in config


def test_svhn_job_end_to_end(ray_local, tmp_path):
    write_svhn(tmp_path / "svhn", n_train=120, n_test=30)
    out = tmp_path / "run"
    run_job(["--data-dir", str(tmp_path / "svhn"), "--out", str(out), *TINY_RUN], job="svhn")
    check_run(out, "svhn", "vgg11", set(range(120)))


def test_caltech101_job_end_to_end(ray_local, tmp_path):
    root = tmp_path / "data" / "caltech101" / "101_ObjectCategories"
    write_class_tree(root, {"BACKGROUND_Google": 3, "ant": 50, "bass": 50, "crab": 50})
    out = tmp_path / "run"
    run_job(["--data-dir", str(tmp_path / "data"), "--out", str(out), "--image-size", "32", *TINY_RUN],
            job="caltech101")
    train_ids = set(read(tmp_path / "data" / "ray_dal_parquet" / "train.parquet")["id"].to_pylist())
    assert len(train_ids) == 120
    check_run(out, "caltech101", "resnet18_imagenet", train_ids)
    assert "image_size: 32" in (out / "config.yaml").read_text()
