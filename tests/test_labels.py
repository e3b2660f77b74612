"""Labels files from people (Parquet, CSV; ids or image paths; indices or class names) and pools made from a
folder of image files. No Ray: these run before any round starts."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from ray_dal.config import ConfigError
from ray_dal.data import encode_labels, inspect_pool, load_labels, read_ids, read_label_file, resolve_pool
from ray_dal.data.image_files import path_id
from ray_dal.data.labels import write_label_file

CLASSES = ["cat", "dog", "3"]


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
@pytest.mark.parametrize("labels", [[2, 0, 1], ["dog", "cat", "3"]])
def test_label_files_round_trip(tmp_path, suffix, labels):
    path = write_label_file(tmp_path / f"labels{suffix}", np.array([7, 3, 5]), labels)
    ids, raw = read_label_file(path)
    assert ids.tolist() == [7, 3, 5] and [str(v) for v in raw] == [str(v) for v in labels]
    ids, encoded = encode_labels(path, ids, raw, CLASSES, 3)
    assert ids.tolist() == [3, 5, 7]
    # "3" is a class name here (index 2), so names win over the digit string
    assert dict(zip(ids.tolist(), encoded.tolist())) == ({7: 2, 3: 0, 5: 1} if labels[0] == 2 else {7: 1, 3: 0, 5: 2})


def test_label_files_keyed_by_path_and_names_with_commas(tmp_path):
    path = write_label_file(tmp_path / "sub" / "labels.csv", ["a/b.jpg", "c.png"], ["cat", "a, b"], key="path")
    keys, labels = read_label_file(path)
    assert keys.tolist() == ["a/b.jpg", "c.png"] and labels.tolist() == ["cat", "a, b"]
    assert [p.name for p in path.parent.iterdir()] == ["labels.csv"]  # no temp file left


def test_digit_strings_are_indices_when_the_run_has_no_names(tmp_path):
    ids, labels = encode_labels("x.csv", np.array([1, 2]), np.array(["0", "9"], dtype=object), None, 10)
    assert labels.tolist() == [0, 9]


def test_the_same_label_twice_is_one_label_and_two_labels_are_an_error():
    ids, labels = encode_labels("f.csv", np.array([4, 4, 1]), np.array([2, 2, 0]), None, 3)
    assert ids.tolist() == [1, 4] and labels.tolist() == [0, 2]
    with pytest.raises(ConfigError, match=r"f\.csv gives 1 id\(s\) two different labels, e\.g\. \[4\]"):
        encode_labels("f.csv", np.array([4, 4, 1]), np.array([2, 1, 0]), None, 3)


@pytest.mark.parametrize("text, message", [
    ("", r"cannot read labels file .* as CSV"),
    ("id,label\n", r"is empty"),
    ("sample,label\n1,cat\n", r"needs columns id \(or path\) and label"),
    ("id,label\n1,\n", r"1 row\(s\) without a label"),
    ("id,label\n1.5,cat\n", r"column id must hold integer sample ids"),
])
def test_bad_csv_files_say_what_is_wrong(tmp_path, text, message):
    path = tmp_path / "labels.csv"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        read_label_file(path)


def test_a_missing_file_and_an_unknown_format_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_label_file(tmp_path / "nope.csv")
    with pytest.raises(ConfigError, match=r"must end in \.parquet or \.csv"):
        read_label_file(tmp_path / "labels.json")


@pytest.fixture
def image_folder(tmp_path, cifar10_dir):
    """30 real CIFAR-10 JPEGs as files in nested folders (plus a hidden file and a non-image)."""
    table = pq.read_table(cifar10_dir / "test.parquet").slice(0, 30)
    root = tmp_path / "images"
    for i, data in enumerate(table["image"].to_pylist()):
        folder = root / f"batch_{i % 3}" / ("night" if i % 2 else "day")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"img_{i:03d}.jpg").write_bytes(data)
    (root / ".hidden.jpg").write_bytes(b"not an image")
    (root / "notes.txt").write_text("not an image")
    return root, table


def test_a_folder_of_images_becomes_a_pool_with_ids_that_survive_growth(image_folder, tmp_path):
    root, table = image_folder
    pool = inspect_pool(resolve_pool(root))
    converted = pq.read_table(pool.files[0])
    assert pool.num_rows == 30 and converted.column_names == ["id", "image", "path"]
    paths = converted["path"].to_pylist()
    assert paths == sorted(paths) and "batch_0/day/img_000.jpg" in paths
    assert read_ids(pool).tolist() == [path_id(p) for p in paths]
    assert resolve_pool(root) == pool.files[0]  # converted once
    by_path = dict(zip(paths, converted["image"].to_pylist()))
    assert by_path["batch_1/night/img_001.jpg"] == table["image"][1].as_py()

    grown = tmp_path / "grown"
    shutil.copytree(root, grown, ignore=shutil.ignore_patterns("ray_dal_parquet"))
    (grown / "batch_9").mkdir()
    (grown / "batch_9" / "new.jpg").write_bytes(table["image"][0].as_py())
    again = pq.read_table(resolve_pool(grown))
    old = dict(zip(paths, read_ids(pool).tolist()))
    new = dict(zip(again["path"].to_pylist(), again["id"].to_pylist()))
    assert len(new) == 31 and all(new[p] == i for p, i in old.items())


def test_labels_may_name_images_by_path(image_folder, tmp_path):
    root, _ = image_folder
    pool = inspect_pool(resolve_pool(root))
    path = tmp_path / "labels.csv"
    pacsv.write_csv(pa.table({"path": ["batch_0/day/img_000.jpg", "batch_1/night/img_001.jpg"],
                              "label": ["dog", "cat"]}), path)
    ids, labels = load_labels(path, pool, CLASSES, 3, "--labels")
    expected = {path_id("batch_0/day/img_000.jpg"): 1, path_id("batch_1/night/img_001.jpg"): 0}
    assert dict(zip(ids.tolist(), labels.tolist())) == expected
    pacsv.write_csv(pa.table({"path": ["batch_0/day/img_999.jpg"], "label": ["dog"]}), path)
    with pytest.raises(ConfigError, match=r"1 path\(s\) that pool .* does not hold, e\.g\. \['batch_0/day/img_999"):
        load_labels(path, pool, CLASSES, 3, "--labels")


def test_a_folder_without_images_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    from ray_dal.data import PoolError

    with pytest.raises(PoolError, match="holds neither Parquet files nor images"):
        resolve_pool(tmp_path / "empty")
