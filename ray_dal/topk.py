"""Exact, deterministic top-b selection of (id, score) pairs: one shot (`top_b`) or streaming (`TopB`).

Pure numpy. The order is total: larger score first, ties broken by the smaller id, so the result does
not depend on the input order, on how a pool was split into batches, or on how many actors scored it.
Non-finite scores are never ranked: they raise `NonFiniteScoreError` listing the offending ids.
"""

from __future__ import annotations

import numpy as np

_INT64_MAX = np.iinfo(np.int64).max


class NonFiniteScoreError(ValueError):
    """Some scores are NaN or infinite; ``ids`` holds the ids of those samples (int64)."""

    def __init__(self, ids: np.ndarray, where: str = ""):
        self.ids = np.asarray(ids, dtype=np.int64)
        self.where = where
        shown = self.ids[:20].tolist()
        more = f" (and {self.ids.size - 20} more)" if self.ids.size > 20 else ""
        super().__init__(
            f"{self.ids.size} non-finite score(s) (NaN or inf){' ' + where if where else ''} for ids "
            f"{shown}{more}; a score cannot be ranked. Check the model weights, G and those samples' "
            "images (a diverged model or a corrupt image is the usual cause)."
        )

    def __reduce__(self):  # keep ``ids`` when the error crosses a process boundary (Ray tasks, actors)
        return (type(self), (self.ids, self.where))


def check_pairs(ids, scores, where: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert to (int64 [n], float64 [n]); raise `NonFiniteScoreError` on NaN/inf."""
    ids, scores = np.asarray(ids), np.asarray(scores)
    if ids.ndim != 1 or scores.ndim != 1 or ids.shape != scores.shape:
        raise ValueError(
            f"ids and scores must be 1-D arrays of one length, got shapes {ids.shape} and {scores.shape}"
        )
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"ids must be integers, got dtype {ids.dtype}")
    if ids.size and ids.dtype.kind == "u" and ids.max() > _INT64_MAX:
        raise ValueError(f"ids must fit in int64, got {ids.max()}")
    if scores.size and not (np.issubdtype(scores.dtype, np.floating) or np.issubdtype(scores.dtype, np.integer)):
        raise TypeError(f"scores must be real numbers, got dtype {scores.dtype}")
    ids, scores = ids.astype(np.int64, copy=False), scores.astype(np.float64, copy=False)
    bad = ~np.isfinite(scores)
    if bad.any():
        raise NonFiniteScoreError(ids[bad], where)
    return ids, scores


def _check_b(b) -> int:
    if isinstance(b, (bool, np.bool_)) or not isinstance(b, (int, np.integer)) or b < 0:
        raise ValueError(f"b must be a non-negative integer, got {b!r}")
    return int(b)


def _select_rows(ids: np.ndarray, scores: np.ndarray, b: int) -> np.ndarray:
    """Positions of the top ``b`` of already-validated arrays, in rank order."""
    n = ids.size
    if b == 0:
        return np.empty(0, np.int64)
    keep = np.arange(n)
    if b < n:
        # The b-th largest score is the threshold: everything above it is in, and the remaining
        # places go to the smallest ids among those equal to it (exact ties at the boundary).
        threshold = scores[np.argpartition(scores, n - b)[n - b]]
        above = np.flatnonzero(scores > threshold)
        at = np.flatnonzero(scores == threshold)
        need = b - above.size
        if need < at.size:
            at = at[np.argpartition(ids[at], need - 1)[:need]]
        keep = np.concatenate([above, at])
    return keep[np.lexsort((ids[keep], -scores[keep]))]


def _select(ids: np.ndarray, scores: np.ndarray, b: int) -> tuple[np.ndarray, np.ndarray]:
    """top_b on already-validated arrays."""
    rows = _select_rows(ids, scores, b)
    return ids[rows], scores[rows]


def top_b_rows(ids, scores, b: int) -> np.ndarray:
    """Positions in ``ids``/``scores`` of `top_b`'s result, in its order (to carry other columns along)."""
    b = _check_b(b)
    ids, scores = check_pairs(ids, scores)
    return _select_rows(ids, scores, b)


def top_b(ids, scores, b: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``b`` pairs with the largest scores (ties: smaller id first), sorted by (score desc, id asc).

    Returns new arrays (int64 [min(b, n)], float64 [min(b, n)]); ``b >= n`` returns all pairs sorted.
    O(n + b log b). Ids are expected to be unique. Raises `NonFiniteScoreError` (with ``.ids``) if any
    score is NaN or infinite, ``ValueError`` for mismatched shapes or a negative ``b``.
    """
    b = _check_b(b)
    ids, scores = check_pairs(ids, scores)
    return _select(ids, scores, b)


class TopB:
    """Streaming `top_b`: ``add`` chunks in any order and size; ``result()`` equals `top_b` over them all.

    Memory stays O(b) plus the chunks buffered since the last merge (merged once they exceed
    ``merge_factor * b`` pairs). Every chunk is validated on ``add`` (non-finite scores raise there).
    Other per-sample columns (``add(ids, scores, pred=...)``) travel with their pairs: `columns()`.
    """

    def __init__(self, b: int, merge_factor: int = 4):
        self.b = _check_b(b)
        self._limit = max(merge_factor * self.b, 1024)
        self._ids: list[np.ndarray] = []
        self._scores: list[np.ndarray] = []
        self._columns: dict[str, list[np.ndarray]] = {}
        self._buffered = 0
        self.num_added = 0  # pairs seen so far

    @property
    def buffered(self) -> int:
        """Pairs held right now (at most ``max(merge_factor * b, 1024)`` plus the last chunk added)."""
        return self._buffered

    def add(self, ids, scores, **columns: np.ndarray) -> None:
        ids, scores = check_pairs(ids, scores)
        if self._ids and set(columns) != set(self._columns):
            raise ValueError(f"every chunk needs the same columns: {sorted(self._columns)}, got {sorted(columns)}")
        for name, values in columns.items():
            if len(values) != ids.size:
                raise ValueError(f"column {name!r} has {len(values)} values for {ids.size} pairs")
            self._columns.setdefault(name, []).append(np.asarray(values))
        self._ids.append(ids)
        self._scores.append(scores)
        self._buffered += ids.size
        self.num_added += ids.size
        if self._buffered > self._limit:
            self._merge()

    def _merge(self) -> tuple[np.ndarray, np.ndarray]:
        ids = np.concatenate(self._ids or [np.empty(0, np.int64)])
        scores = np.concatenate(self._scores or [np.empty(0, np.float64)])
        rows = _select_rows(ids, scores, self.b)
        self._columns = {name: [np.concatenate(parts)[rows]] for name, parts in self._columns.items()}
        self._ids, self._scores, self._buffered = [ids[rows]], [scores[rows]], rows.size
        return self._ids[0], self._scores[0]

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """The current top-b as new arrays (int64, float64), sorted by (score desc, id asc)."""
        ids, scores = self._merge()
        return ids.copy(), scores.copy()

    def columns(self) -> dict[str, np.ndarray]:
        """The other columns of `result()`'s pairs, in its order."""
        self._merge()
        return {name: parts[0].copy() for name, parts in self._columns.items()}
