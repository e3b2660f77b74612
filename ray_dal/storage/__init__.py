"""Where ray_dal's files live: local paths and object-store URIs behind one `Location` type.

``location("runs/x")``, ``location("file:///data/pool")``, ``location("s3://bucket/pools/cifar10")``,
``location("gs://...")`` and ``location("hdfs://...")`` all give a `Location`; every module that reads
or writes a pool, a labels file, a run directory or a checkpoint takes one. Failures surface as
`StorageError` naming the URI, the reason and the fix. A `Location` pickles as its URI and the store's
non-secret settings, so Ray workers rebuild the filesystem themselves and read credentials from their
own environment; secrets never travel with a task.
"""

from .location import Location, StorageError, location
from .lease import RunBusyError, RunLease

__all__ = ["Location", "StorageError", "location", "RunBusyError", "RunLease"]
