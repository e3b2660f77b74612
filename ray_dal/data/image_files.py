"""A folder of unlabeled image files (at any depth) as a pool, for active learning on your own images.

`resolve_pool(source)`: a Parquet pool (a file or a folder of shards) is used as it is; a folder of image
files is converted once into ``source/ray_dal_parquet/pool.parquet`` with columns ``id``, ``image`` (the
file's bytes) and ``path`` (relative to the folder). A sample's id is a hash of its relative path (63 bits
of BLAKE2b), so ids stay the same when the folder grows and is converted again (delete ``ray_dal_parquet``
to take in new images): labels given to earlier ids stay valid. In object storage (a URI) a pool must
already be Parquet: a folder of images there is refused with the way to convert it locally.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow.fs as pafs

from ray_dal.data.convert import CONVERTED, write_pool
from ray_dal.data.image_folder import IMAGE_EXTENSIONS, ROWS_PER_GROUP, read_image_file
from ray_dal.data.pools import ID, IMAGE, PoolError
from ray_dal.storage import Location, location

POOL_FILE = "pool.parquet"


def path_id(relative_path: str) -> int:
    """A stable int64 id >= 0 for an image's path relative to its folder ('/'-separated)."""
    digest = hashlib.blake2b(relative_path.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") & (2**63 - 1)


def image_files(folder: Path) -> list[str]:
    """Relative paths ('/'-separated, sorted) of the image files under ``folder``; hidden entries and
    ``ray_dal_parquet`` are skipped."""
    found = []
    for path in folder.rglob("*"):
        rel = path.relative_to(folder)
        if any(part.startswith(".") or part == CONVERTED for part in rel.parts):
            continue
        if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
            found.append(rel.as_posix())
    return sorted(found)


def resolve_pool(source: str | Path) -> str:
    """The Parquet pool for ``source``: itself when it is Parquet, else its image files converted once."""
    where = location(source)
    if not where.is_local:
        _refuse_remote_images(where)
        return where.uri
    path = Path(source).expanduser()
    if path.is_file() or not path.is_dir() or any(path.glob("*.parquet")):
        return str(source)  # Parquet, or missing: inspect_pool says what is wrong
    converted = path / CONVERTED / POOL_FILE
    if converted.is_file():
        return str(converted)
    files = image_files(path)
    if not files:
        raise PoolError(f"{path} holds neither Parquet files nor images ({', '.join(IMAGE_EXTENSIONS)}). Fix: "
                        "pass a Parquet pool (column image, optional id) or a folder of image files")
    ids = np.array([path_id(f) for f in files], np.int64)
    uniq, counts = np.unique(ids, return_counts=True)
    if uniq.size != ids.size:  # two paths with one 63-bit hash: never seen, but never silently merged
        raise PoolError(f"two images of {path} share id {uniq[counts > 1][:1].tolist()}; rename one of them")
    return str(write_pool(converted, _rows(path, files, ids)))


def _refuse_remote_images(where: Location) -> None:
    """PoolError for a folder of image files in object storage (a Parquet pool, or nothing, passes)."""
    if not where.is_dir() or where.files(".parquet"):
        return  # a file, Parquet shards or nothing: inspect_pool says what is wrong
    with where.errors("listing"):
        found = where.fs.get_file_info(pafs.FileSelector(where.path, recursive=True, allow_not_found=True))
    if not any(Path(f.base_name).suffix.lower() in IMAGE_EXTENSIONS for f in found):
        return
    raise PoolError(f"{where.uri} is a folder of image files in object storage; ray_dal converts such a folder to "
                    f"Parquet only on local disk. Fix: copy it to a local folder DIR and run once with --pool DIR "
                    f"(it writes DIR/{CONVERTED}/{POOL_FILE}), then upload that file and pass its URI as --pool")


def _rows(folder: Path, files: list[str], ids: np.ndarray) -> Iterator[dict]:
    for start in range(0, len(files), ROWS_PER_GROUP):
        part = files[start:start + ROWS_PER_GROUP]
        yield {ID: ids[start:start + ROWS_PER_GROUP], IMAGE: [read_image_file(folder / f) for f in part], "path": part}
