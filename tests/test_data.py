"""The data layer on the real CIFAR-10 Parquet files, small generated pools and a real local Ray."""

from __future__ import annotations

import io
import pickle
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from ray_dal.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    ImageDecodeError,
    ImageTransform,
    PoolError,
    decode_images,
    inspect_pool,
    normalize,
    preprocess_batch,
    read_ids,
    read_labels,
    read_pool,
    resolve_cifar10,
    select_row_groups,
    synthetic,
    write_synthetic_pool,
)
from ray_dal.data.transforms import _decode_jpeg, _decode_pil


def encode(image: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt)
    return buf.getvalue()


def random_images(n: int, h: int = 32, w: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)


def write_pool(path, images: np.ndarray, labels=None, ids=None, rows_per_group: int = 4) -> None:
    cols = {"image": pa.array([encode(im) for im in images], pa.binary())}
    if labels is not None:
        cols["label"] = pa.array(np.asarray(labels, dtype=np.int64))
    if ids is not None:
        cols["id"] = pa.array(np.asarray(ids, dtype=np.int64))
    pq.write_table(pa.table(cols), path, row_group_size=rows_per_group)


def collect(ds) -> dict[str, np.ndarray]:
    batches = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]} if batches else {}


# ---- CIFAR-10 pools ---------------------------------------------------------------------------------


def test_inspect_cifar10(cifar10_dir):
    train, test = inspect_pool(cifar10_dir / "train.parquet"), inspect_pool(cifar10_dir / "test.parquet")
    assert (train.num_rows, test.num_rows) == (50_000, 10_000)
    assert [rg.num_rows for rg in train.row_groups] == [5_000] * 10
    assert [rg.offset for rg in train.row_groups] == list(range(0, 50_000, 5_000))
    assert [rg.index for rg in train.row_groups] == list(range(10))
    assert train.has_label and not train.has_id_column
    assert train.files == (str((cifar10_dir / "train.parquet").resolve()),)


def test_read_pool_matches_pyarrow(ray_local, cifar10_dir):
    path = cifar10_dir / "train.parquet"
    info = inspect_pool(path)
    ids = np.random.default_rng(0).choice(info.num_rows, size=150, replace=False)
    got = collect(read_pool(info, ids=ids))
    assert got["id"].dtype == np.int64 and got["label"].dtype == np.int64
    np.testing.assert_array_equal(got["id"], np.sort(ids))  # each id once, in pool order
    direct = pq.read_table(path, columns=["image", "label"]).take(pa.array(got["id"]))
    np.testing.assert_array_equal(got["label"], direct.column("label").to_numpy())
    assert list(got["image"]) == direct.column("image").to_pylist()

    all_ids, labels = read_labels(info)
    np.testing.assert_array_equal(all_ids, np.arange(50_000))
    np.testing.assert_array_equal(labels, pq.read_table(path, columns=["label"]).column("label").to_numpy())


def test_read_pool_whole_pool_in_row_order(ray_local, cifar10_dir):
    info = inspect_pool(cifar10_dir / "test.parquet")
    ds = read_pool(info, columns=("id", "label"))
    assert ds.count() == 10_000
    got = collect(ds)
    np.testing.assert_array_equal(got["id"], np.arange(10_000))
    np.testing.assert_array_equal(got["label"], read_labels(info)[1])
    np.testing.assert_array_equal(read_ids(info), np.arange(10_000))


def test_read_pool_preprocess_through_ray(ray_local, cifar10_dir):
    info = inspect_pool(cifar10_dir / "test.parquet")
    ids = np.random.default_rng(1).choice(info.num_rows, size=40, replace=False)
    out = collect(read_pool(info, ids=ids).map_batches(preprocess_batch, batch_format="numpy", batch_size=16))
    assert out["x"].shape == (40, 3, 32, 32) and out["x"].dtype == np.float32
    order = np.argsort(out["id"])
    direct = pq.read_table(cifar10_dir / "test.parquet").take(pa.array(out["id"][order]))
    images, keep = decode_images(direct.column("image").to_pylist())
    assert keep.all()
    np.testing.assert_allclose(out["x"][order], normalize(images).numpy(), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(out["label"][order], direct.column("label").to_numpy())


def test_select_row_groups_reads_only_needed_groups(cifar10_dir):
    info = inspect_pool(cifar10_dir / "train.parquet")
    ids = np.array([10_001, 14_999, 10_000, 35_123, 10_001])  # row groups 2 and 7; a duplicate
    plan = select_row_groups(info, ids)
    assert [rg.index for rg, _ in plan] == [2, 7]
    np.testing.assert_array_equal(plan[0][1], [0, 1, 4_999])
    np.testing.assert_array_equal(plan[1][1], [123])
    assert [pos for _, pos in select_row_groups(info)] == [None] * 10
    with pytest.raises(PoolError, match=r"not in pool .*50000"):
        select_row_groups(info, np.array([3, 50_000]))


def test_unneeded_shards_are_never_opened(ray_local, tmp_path):
    images = random_images(12)
    for i in range(3):
        rows = slice(4 * i, 4 * i + 4)
        write_pool(tmp_path / f"part-{i}.parquet", images[rows], labels=np.arange(12)[rows], rows_per_group=2)
    info = inspect_pool(tmp_path)
    assert [rg.offset for rg in info.row_groups] == [0, 2, 4, 6, 8, 10]
    for i in (0, 2):  # destroy the shards the read must not touch
        (tmp_path / f"part-{i}.parquet").write_bytes(b"not parquet")
    got = collect(read_pool(info, ids=np.array([7, 5])))
    np.testing.assert_array_equal(got["id"], [5, 7])
    np.testing.assert_array_equal(got["label"], [5, 7])
    np.testing.assert_array_equal(decode_images(list(got["image"]))[0], images[[5, 7]])


# ---- a sharded pool with its own id column ------------------------------------------------------------


def test_sharded_pool_with_id_column(ray_local, tmp_path):
    rng = np.random.default_rng(2)
    images = random_images(15, seed=2)
    labels = rng.integers(0, 10, size=15)
    ids = rng.choice(10**9, size=15, replace=False)
    for i, rows in enumerate([slice(0, 6), slice(6, 11), slice(11, 15)]):
        write_pool(tmp_path / f"shard-{i}.parquet", images[rows], labels[rows], ids[rows], rows_per_group=4)
    info = inspect_pool(tmp_path)
    assert info.has_id_column and info.has_label and info.num_rows == 15 and len(info.files) == 3
    assert [rg.num_rows for rg in info.row_groups] == [4, 2, 4, 1, 4]
    np.testing.assert_array_equal(read_ids(info), ids)
    np.testing.assert_array_equal(read_labels(info)[1], labels)

    wanted = ids[[13, 2, 7]]
    plan = select_row_groups(info, wanted)  # one row group in each shard
    assert [(rg.path.rsplit("/", 1)[1], rg.index, pos.tolist()) for rg, pos in plan] == [
        ("shard-0.parquet", 0, [2]), ("shard-1.parquet", 0, [1]), ("shard-2.parquet", 0, [2])]
    got = collect(read_pool(info, ids=wanted))
    np.testing.assert_array_equal(got["id"], ids[[2, 7, 13]])
    np.testing.assert_array_equal(got["label"], labels[[2, 7, 13]])
    np.testing.assert_array_equal(decode_images(list(got["image"]))[0], images[[2, 7, 13]])
    with pytest.raises(PoolError, match="not in pool"):
        read_pool(info, ids=np.array([ids[0], -5]))


# ---- transforms ----------------------------------------------------------------------------------------


def test_normalize_matches_hand_computation():
    images = random_images(2, 4, 5, seed=3)
    images.flags.writeable = False  # as Ray hands batches over
    x = normalize(images)
    assert x.dtype == torch.float32 and tuple(x.shape) == (2, 3, 4, 5)
    for b in range(2):
        for c in range(3):
            expected = (images[b, :, :, c] / 255.0 - CIFAR10_MEAN[c]) / CIFAR10_STD[c]
            np.testing.assert_allclose(x[b, c].numpy(), expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"uint8 images \[B, H, W, 3\]"):
        normalize(images.astype(np.float32))


def test_normalize_lookup_is_the_float32_arithmetic_bit_for_bit():
    every_value = np.arange(256 * 3, dtype=np.int64).reshape(1, 16, 16, 3) % 256
    images = np.concatenate([every_value, random_images(3, 16, 16, seed=7)]).astype(np.uint8)
    for transform in (ImageTransform(), ImageTransform(mean=(0.1, 0.5, 0.9), std=(0.3, 0.05, 1.7))):
        expected = images.astype(np.float32)
        expected /= 255.0
        expected -= np.asarray(transform.mean, dtype=np.float32)
        expected /= np.asarray(transform.std, dtype=np.float32)
        x = normalize(images, transform)
        assert x.is_contiguous() and x.numpy().flags.writeable
        np.testing.assert_array_equal(x.numpy(), expected.transpose(0, 3, 1, 2))
    assert tuple(normalize(images[:0]).shape) == (0, 3, 16, 16)


def test_decode_images_bad_inputs():
    good = random_images(4, seed=4)
    gray = good[3, :, :, 0]
    blobs = [encode(good[0], "JPEG"), b"\xff\xd8 truncated", encode(good[1]), encode(random_images(1, 16, 16)[0]),
             encode(gray), None]
    ids = [100, 101, 102, 103, 104, 105]
    with pytest.raises(ImageDecodeError) as err:
        decode_images(blobs, ids)
    assert err.value.bad_ids == [101, 103, 105]
    msg = str(err.value)
    assert "3 of 6 images" in msg and "id 101: undecodable" in msg and "wrong size 16x16, expected 32x32" in msg
    assert "on_bad='skip'" in msg
    assert pickle.loads(pickle.dumps(err.value)).bad_ids == [101, 103, 105]  # survives a Ray worker -> driver trip

    images, keep = decode_images(blobs, ids, on_bad="skip")
    np.testing.assert_array_equal(keep, [True, False, True, False, True, False])
    assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images[1], good[1])  # PNG is lossless
    np.testing.assert_array_equal(images[2], np.repeat(gray[:, :, None], 3, axis=2))  # L -> RGB

    # The expected size may come from the caller; then the first image is not trusted.
    images, keep = decode_images(blobs[2:5], transform=ImageTransform((16, 16)), on_bad="skip")
    np.testing.assert_array_equal(keep, [False, True, False])
    with pytest.raises(ValueError, match="on_bad='ignore' is invalid"):
        decode_images(blobs, on_bad="ignore")


def _pil_reference(blobs) -> np.ndarray:
    return np.stack([_decode_pil(b) for b in blobs])


def _fast_path_taken(blobs) -> list[bool]:
    return [_decode_jpeg(b) is not None for b in blobs]


def test_jpeg_fast_path_is_pil_exact_on_real_cifar10(cifar10_dir):
    blobs = pq.read_table(cifar10_dir / "train.parquet", columns=["image"]).slice(0, 2000)["image"].to_pylist()
    assert all(_fast_path_taken(blobs))  # every image took the libjpeg-turbo path
    images, keep = decode_images(blobs)
    assert keep.all()
    np.testing.assert_array_equal(images, _pil_reference(blobs))


def test_jpeg_fast_path_is_pil_exact_on_every_jpeg_kind():
    photo = random_images(1, 37, 53, seed=9)[0]  # odd sizes: partial MCUs at the borders
    photo[:, :20] //= 3  # some structure, not only noise
    variants = {f"subsampling {ss}": dict(subsampling=ss, quality=q) for ss, q in ((0, 95), (1, 85), (2, 70))}
    variants["progressive"] = dict(progressive=True, quality=80)
    blobs = []
    for kwargs in variants.values():
        buf = io.BytesIO()
        Image.fromarray(photo).save(buf, format="JPEG", **kwargs)
        blobs.append(buf.getvalue())
    for mode in ("L", "CMYK"):
        buf = io.BytesIO()
        Image.fromarray(photo).convert(mode).save(buf, format="JPEG")
        blobs.append(buf.getvalue())
    assert all(_fast_path_taken(blobs))
    images, keep = decode_images(blobs)
    np.testing.assert_array_equal(images, _pil_reference(blobs))
    # resize after the fast decode is PIL's bilinear resize of PIL's pixels
    resized, _ = decode_images(blobs, transform=ImageTransform((20, 24), resize=True))
    expected = [np.asarray(Image.fromarray(im).resize((24, 20), Image.BILINEAR)) for im in _pil_reference(blobs)]
    np.testing.assert_array_equal(resized, np.stack(expected))


def test_jpeg_fast_path_does_not_import_torchvision(tmp_path):
    # importing torchvision costs ~1.5 s in every fresh Ray worker; the decoder op is loaded on its own
    blob = encode(random_images(1, seed=8)[0], "JPEG")
    script = ("import sys; from ray_dal.data.transforms import _decode_jpeg; "
              f"assert _decode_jpeg({blob!r}) is not None; assert 'torchvision' not in sys.modules")
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)


def test_jpeg_fast_path_leaves_bad_jpegs_to_pil():
    good = [encode(im, "JPEG") for im in random_images(3, seed=6)]
    truncated = good[1][: len(good[1]) // 2]
    blobs = [good[0], truncated, b"\xff\xd8\xff not a jpeg", good[2]]
    assert _fast_path_taken(blobs) == [True, False, False, True]  # one bad image does not fail the others
    with pytest.raises(ImageDecodeError) as err:
        decode_images(blobs, [10, 11, 12, 13])
    assert err.value.bad_ids == [11, 12] and all(r.startswith("undecodable: ") for r in err.value.reasons)
    images, keep = decode_images(blobs, on_bad="skip")
    np.testing.assert_array_equal(keep, [True, False, False, True])
    np.testing.assert_array_equal(images, _pil_reference([good[0], good[2]]))


def test_preprocess_batch_skip_keeps_rows_aligned():
    good = random_images(3, seed=5)
    image = np.array([encode(good[0]), b"junk", encode(good[2])], dtype=object)
    batch = {"id": np.array([7, 8, 9]), "image": image, "label": np.array([1, 2, 3])}
    for v in batch.values():
        v.flags.writeable = False
    out = preprocess_batch(batch, on_bad="skip")
    np.testing.assert_array_equal(out["id"], [7, 9])
    np.testing.assert_array_equal(out["label"], [1, 3])
    np.testing.assert_allclose(out["x"], normalize(good[[0, 2]]).numpy())
    assert out["id"].dtype == np.int64 and out["x"].dtype == np.float32
    with pytest.raises(ImageDecodeError, match="id 8"):
        preprocess_batch(batch)
    with pytest.raises(KeyError, match="missing \\['image'\\]"):
        preprocess_batch({"id": batch["id"]})


# ---- bad pools -----------------------------------------------------------------------------------------


def bad_pool(tmp_path, kind: str):
    path = tmp_path / "pool.parquet"
    img = pa.array([encode(im) for im in random_images(3)], pa.binary())
    tables = {
        "no_image": pa.table({"picture": img, "label": [0, 1, 2]}),
        "image_not_binary": pa.table({"image": ["a", "b", "c"]}),
        "label_not_int": pa.table({"image": img, "label": [0.5, 1.0, 2.0]}),
        "id_not_int": pa.table({"image": img, "id": ["a", "b", "c"]}),
        "duplicate_ids": pa.table({"image": img, "id": [4, 9, 4]}),
    }
    if kind in tables:
        pq.write_table(tables[kind], path)
    elif kind == "corrupt":
        path.write_bytes(b"PAR1 this is not really parquet")
    elif kind == "empty_dir":
        (tmp_path / "notes.txt").write_text("no shards here")
        return tmp_path
    elif kind == "missing":
        return tmp_path / "nowhere.parquet"
    return path


@pytest.mark.parametrize("kind, message", [
    ("no_image", r"no 'image' column \(columns found: \['picture', 'label'\]\)"),
    ("image_not_binary", "column 'image' has type string, but it must be binary"),
    ("label_not_int", "column 'label' has type double, but it must be an integer"),
    ("id_not_int", "column 'id' has type string, but it must be an integer"),
    ("duplicate_ids", r"1 duplicated value\(s\), e.g. \[4\]"),
    ("corrupt", "cannot read .*pool.parquet as Parquet"),
    ("empty_dir", r"holds no \*.parquet files \(found \['notes.txt'\]\)"),
    ("missing", "nowhere.parquet' does not exist"),
])
def test_bad_pools_raise_pool_error(tmp_path, kind, message):
    source = bad_pool(tmp_path, kind)
    with pytest.raises(PoolError, match=message) as err:
        inspect_pool(source)
    assert "Fix:" in str(err.value)


def test_unlabelled_pool(ray_local, tmp_path):
    images = random_images(3)
    write_pool(tmp_path / "u.parquet", images)
    info = inspect_pool(tmp_path / "u.parquet")
    assert not info.has_label
    got = collect(read_pool(info))  # the default columns ask for a label; an unlabelled pool has none
    assert sorted(got) == ["id", "image"]
    np.testing.assert_array_equal(decode_images(list(got["image"]))[0], images)
    with pytest.raises(PoolError, match="has no 'label' column"):
        read_labels(info)


# ---- synthetic pools -----------------------------------------------------------------------------------


def test_synthetic_pool_round_trip(ray_local, tmp_path):
    paths = write_synthetic_pool(tmp_path / "a", 2_500, num_classes=4, rows_per_file=1_000, rows_per_group=300, seed=7)
    assert [p.name for p in paths] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    info = inspect_pool(tmp_path / "a")
    assert info.num_rows == 2_500 and info.has_label
    assert [rg.num_rows for rg in info.row_groups[:5]] == [300, 300, 300, 100, 300]
    ids, labels = read_labels(info)
    assert set(np.unique(labels)) == {0, 1, 2, 3}
    sample = np.random.default_rng(0).choice(2_500, size=64, replace=False)
    out = collect(read_pool(info, ids=sample).map_batches(preprocess_batch, batch_format="numpy"))
    assert out["x"].shape == (64, 3, 32, 32)
    np.testing.assert_array_equal(out["label"], labels[np.sort(sample)])

    synthetic.main(["--out", str(tmp_path / "b"), "--num-samples", "2500", "--num-classes", "4",
                    "--rows-per-file", "1000", "--rows-per-group", "300", "--seed", "7"])
    for a, b in zip(paths, sorted((tmp_path / "b").glob("*.parquet"))):  # same seed, same bytes
        assert pq.read_table(a).equals(pq.read_table(b))
    with pytest.raises(ValueError, match="already holds .parquet files"):
        write_synthetic_pool(tmp_path / "a", 10)


# ---- CIFAR-10 on disk: torchvision's layout and the download ----------------------------------------


def write_torchvision_cifar10(root, per_batch: int, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A tiny cifar-10-batches-py folder in torchvision's pickle format; returns each file's HWC images and labels."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=per_batch).tolist()
        entry = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                 b"filenames": [f"{name}_{i}.png".encode() for i in range(per_batch)]}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)
        written[name] = (data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), np.array(labels))
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog",
                                      b"horse", b"ship", b"truck"], b"num_vis": 3072}, f, protocol=2)
    return written


def test_torchvision_layout_is_converted_once(tmp_path):
    written = write_torchvision_cifar10(tmp_path, per_batch=6)
    train, test = resolve_cifar10(tmp_path, download=False)
    out = tmp_path / "ray_dal_parquet"
    assert (train, test) == (out / "train.parquet", out / "test.parquet")
    assert sorted(p.name for p in train.parent.iterdir()) == ["test.parquet", "train.parquet"]  # no temp files left
    expected_train = [written[f"data_batch_{i}"] for i in range(1, 6)]
    for path, parts in ((train, expected_train), (test, [written["test_batch"]])):
        table = pq.read_table(path)
        assert table.schema.names == ["image", "label"] and table.schema.field("label").type == pa.int64()
        images, keep = decode_images(table.column("image").to_pylist())
        np.testing.assert_array_equal(images, np.concatenate([d for d, _ in parts]))  # PNG: lossless
        np.testing.assert_array_equal(table.column("label").to_numpy(), np.concatenate([lab for _, lab in parts]))
    assert inspect_pool(train).num_rows == 30

    mtime = train.stat().st_mtime_ns
    assert resolve_cifar10(tmp_path, download=False) == (train, test)
    assert train.stat().st_mtime_ns == mtime


def test_parquet_layout_is_used_as_is(cifar10_dir):
    assert resolve_cifar10(cifar10_dir, download=False) == (cifar10_dir / "train.parquet", cifar10_dir / "test.parquet")


def test_missing_cifar10_fails_fast_offline(tmp_path):
    start = time.perf_counter()
    with pytest.raises(PoolError) as err:
        resolve_cifar10(tmp_path / "cifar", download=True)  # a real download attempt; this machine is offline
    assert time.perf_counter() - start < 60
    msg = str(err.value)
    assert f"not found in {tmp_path / 'cifar'}" in msg and "the download failed" in msg
    assert "--data-dir" in msg and "train.parquet" in msg and "cifar-10-batches-py" in msg
    with pytest.raises(PoolError, match="download=False"):
        resolve_cifar10(tmp_path / "elsewhere", download=False)
