"""score_pool on a seeded slice of real CIFAR-10: the Ray pipeline's top-b equals the in-process top-b."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ray_dal.config import ModelConfig, ScoringConfig
from ray_dal.data import ImageDecodeError, preprocess_batch, read_pool
from ray_dal.models import build_model
from ray_dal.pipeline.decode import decode_layout
from ray_dal.pipeline.held_out import HeldOutRows
from ray_dal.pipeline import pool_scoring
from ray_dal.pipeline.pool_scoring import PoolQuery, score_pool
from ray_dal.pipeline.training import count_correct
from ray_dal.scoring import dynamic_scores, entropy, labeled_gradient, random_scores
from ray_dal.topk import NonFiniteScoreError, top_b

POOL, LABELED, EXCLUDED_IN_POOL, BUDGET = 600, 100, 60, 40


@dataclasses.dataclass
class Slice:
    path: str  # Parquet pool: id (original row index), image, label
    ids: np.ndarray  # pool ids, file order
    x: torch.Tensor  # preprocessed images of the pool, file order
    exclude: np.ndarray  # labeled ids: the G samples (outside the pool) and some pool samples
    model: torch.nn.Module
    grad_sum: dict[str, torch.Tensor]

    @property
    def unlabeled(self) -> np.ndarray:
        return ~np.isin(self.ids, self.exclude)


def write_pool(path, table: pa.Table, ids: np.ndarray, rows_per_group: int) -> None:
    table = table.append_column("id", pa.array(ids, pa.int64())).select(["id", "image", "label"])
    pq.write_table(table, path, row_group_size=rows_per_group)


@pytest.fixture(scope="module")
def pool_slice(cifar10_dir, tmp_path_factory) -> Slice:
    table = pq.read_table(cifar10_dir / "train.parquet", columns=["image", "label"])
    perm = np.random.default_rng(7).permutation(table.num_rows)  # rows are grouped by class: never a prefix
    pool_ids, labeled_ids = perm[:POOL], perm[POOL : POOL + LABELED]
    path = str(tmp_path_factory.mktemp("pool") / "pool.parquet")
    pool_table = table.take(pool_ids)
    write_pool(path, pool_table, pool_ids, rows_per_group=150)  # 4 read tasks

    def prep(rows: pa.Table, ids: np.ndarray) -> dict:
        batch = {"id": ids, "image": rows["image"].to_numpy(zero_copy_only=False), "label": rows["label"].to_numpy()}
        return preprocess_batch(batch)

    torch.manual_seed(0)
    model = build_model("cnn", 10).eval()
    labeled = prep(table.take(labeled_ids), labeled_ids)
    grad_sum = labeled_gradient(model, (torch.from_numpy(labeled["x"]), torch.from_numpy(labeled["label"])))
    excluded_in_pool = np.random.default_rng(8).choice(pool_ids, EXCLUDED_IN_POOL, replace=False)
    pool = prep(pool_table, pool_ids)
    return Slice(path, pool["id"], torch.from_numpy(pool["x"]), np.concatenate([labeled_ids, excluded_in_pool]),
                 model, grad_sum)


def run(s: Slice, strategy: str, num_scorers: int = 2, budget: int = BUDGET, state_dict=None, decode: str = "auto",
        lifetime: str = "run", **kwargs) -> PoolQuery:
    cfg = ScoringConfig(strategy=strategy, num_scorers=num_scorers, batch_size=128, decode=decode,
                        scorer_lifetime=lifetime)
    return score_pool(s.path, model_cfg=ModelConfig(name="cnn"), state_dict=state_dict or s.model.state_dict(),
                      grad_sum=s.grad_sum, scoring_cfg=cfg, budget=budget, exclude_ids=s.exclude, seed=3, **kwargs)


def assert_valid_query(q: PoolQuery, s: Slice, budget: int = BUDGET) -> None:
    assert q.ids.dtype == np.int64 and q.scores.dtype == np.float64
    assert q.ids.shape == q.scores.shape == (budget,)
    assert np.unique(q.ids).size == budget
    assert not np.isin(q.ids, s.exclude).any()
    assert np.isin(q.ids, s.ids).all()
    assert q.num_scored == POOL - EXCLUDED_IN_POOL
    assert q.skipped_ids.size == 0
    assert q.seconds > 0 and q.samples_per_second == pytest.approx(q.num_scored / q.seconds)
    order = np.lexsort((q.ids, -q.scores))
    np.testing.assert_array_equal(order, np.arange(budget))  # sorted by (score desc, id asc)


def assert_matches(q: PoolQuery, ids: np.ndarray, scores: np.ndarray) -> None:
    np.testing.assert_array_equal(q.ids, ids)
    np.testing.assert_allclose(q.scores, scores, rtol=1e-5, atol=1e-7 * np.abs(scores).max())


def test_dynamic_top_b_equals_in_process_scores(ray_local, pool_slice):
    s = pool_slice
    q = run(s, "dynamic")
    assert_valid_query(q, s)
    want = dynamic_scores(s.model, s.x[s.unlabeled], s.grad_sum, gamma=2.0, scope="all").double().numpy()
    assert_matches(q, *top_b(s.ids[s.unlabeled], want, BUDGET))


def test_reading_only_the_candidate_rows_changes_nothing(ray_local, pool_slice, bad_pool, monkeypatch):
    s = pool_slice
    path, test_ids, _ = bad_pool
    held_out = HeldOutRows(read_pool(path), len(test_ids))
    whole = run(s, "dynamic", on_bad="skip", held_out=held_out)  # 90% of the pool to score: every row read
    monkeypatch.setattr(pool_scoring, "READ_ALL_ABOVE", 1.01)  # only the 540 candidates read, by id
    only = run(s, "dynamic", on_bad="skip", held_out=held_out)
    np.testing.assert_array_equal(only.ids, whole.ids)
    np.testing.assert_allclose(only.scores, whole.scores, rtol=1e-6)
    assert only.num_scored == whole.num_scored == POOL - EXCLUDED_IN_POOL
    assert (only.tested.correct, only.tested.tested) == (whole.tested.correct, whole.tested.tested)
    np.testing.assert_array_equal(only.tested.skipped_ids, whole.tested.skipped_ids)


def test_entropy_top_b_equals_in_process_scores(ray_local, pool_slice):
    s = pool_slice
    q = run(s, "entropy")
    assert_valid_query(q, s)
    with torch.no_grad():
        want = entropy(s.model(s.x[s.unlabeled])).double().numpy()
    assert_matches(q, *top_b(s.ids[s.unlabeled], want, BUDGET))


def test_random_query_does_not_depend_on_the_number_of_actors(ray_local, pool_slice):
    s = pool_slice
    one, two = run(s, "random", num_scorers=1), run(s, "random", num_scorers=2)
    assert_valid_query(one, s)
    np.testing.assert_array_equal(one.ids, two.ids)
    np.testing.assert_array_equal(one.scores, two.scores)
    unlabeled = s.ids[s.unlabeled]
    assert_matches(one, *top_b(unlabeled, random_scores(unlabeled, 3), BUDGET))
    # The exclusion mattered: without it some excluded ids would have been queried.
    assert np.isin(top_b(s.ids, random_scores(s.ids, 3), BUDGET)[0], s.exclude).any()


@pytest.mark.parametrize("budget", [0, -3, POOL - EXCLUDED_IN_POOL + 1])
def test_budget_out_of_range_is_a_clear_error(ray_local, pool_slice, budget):
    with pytest.raises(ValueError, match=rf"budget b = {budget} is invalid.*\[1, {POOL - EXCLUDED_IN_POOL}\]"):
        run(pool_slice, "random", budget=budget)


def test_budget_equal_to_the_unlabeled_count_returns_all_of_them(ray_local, pool_slice):
    s = pool_slice
    q = run(s, "random", num_scorers=1, budget=POOL - EXCLUDED_IN_POOL)
    np.testing.assert_array_equal(np.sort(q.ids), np.sort(s.ids[s.unlabeled]))


def test_non_finite_scores_raise_with_their_ids(ray_local, pool_slice):
    s = pool_slice
    state = {n: t.clone() for n, t in s.model.state_dict().items()}
    state["fc3.weight"] = torch.full_like(state["fc3.weight"], 3e38)  # finite weights, logits overflow to inf
    with pytest.raises(NonFiniteScoreError) as info:
        run(s, "entropy", num_scorers=1, state_dict=state)
    assert info.value.ids.size > 0
    assert np.isin(info.value.ids, s.ids[s.unlabeled]).all()


def test_mismatched_weights_or_g_fail_before_any_actor_starts(ray_local, pool_slice):
    s = pool_slice
    with pytest.raises(ValueError, match="state_dict does not fit"):
        run(s, "entropy", state_dict=build_model("vgg11", 10).state_dict())
    nan = {n: t.clone() for n, t in s.model.state_dict().items()}
    nan["fc3.bias"][4] = float("nan")
    with pytest.raises(ValueError, match=r"state_dict holds NaN or infinite values in \['fc3.bias'\]"):
        run(s, "entropy", state_dict=nan)
    cfg = ScoringConfig(strategy="dynamic", scope="all")
    with pytest.raises(ValueError, match="grad_sum"):
        score_pool(s.path, model_cfg={"name": "cnn"}, state_dict=s.model.state_dict(), grad_sum=None,
                   scoring_cfg=cfg, budget=5, exclude_ids=s.exclude, seed=0)


@pytest.fixture(scope="module")
def bad_pool(cifar10_dir, tmp_path_factory):
    """60 real images, 3 of them replaced by bytes that are not an image."""
    table = pq.read_table(cifar10_dir / "test.parquet", columns=["image", "label"])
    ids = np.random.default_rng(9).choice(table.num_rows, 60, replace=False)
    images = table.take(ids)["image"].to_pylist()
    bad = np.sort(ids[[5, 31, 47]])
    for i in (5, 31, 47):
        images[i] = b"not an image"
    path = str(tmp_path_factory.mktemp("bad") / "bad.parquet")
    rows = pa.table({"image": pa.array(images, pa.binary()), "label": table.take(ids)["label"]})
    write_pool(path, rows, ids, rows_per_group=30)
    return path, ids, bad


def test_bad_images_fail_with_their_ids_or_are_skipped_and_reported(ray_local, bad_pool):
    path, ids, bad = bad_pool
    common = dict(model_cfg=ModelConfig(), state_dict=None, grad_sum=None, exclude_ids=np.empty(0, np.int64),
                  seed=0)
    cfg = ScoringConfig(strategy="random", num_scorers=1, batch_size=128)
    with pytest.raises(ImageDecodeError) as info:
        score_pool(path, scoring_cfg=cfg, budget=5, **common)
    assert set(info.value.bad_ids) <= set(bad.tolist()) and info.value.bad_ids
    q = score_pool(path, scoring_cfg=cfg, budget=57, on_bad="skip", **common)
    np.testing.assert_array_equal(q.skipped_ids, bad)
    assert q.num_scored == 57
    np.testing.assert_array_equal(np.sort(q.ids), np.setdiff1d(ids, bad))


@pytest.mark.parametrize("strategy", ["dynamic", "margin"])
def test_held_out_rows_tested_in_the_scoring_pass_change_nothing_and_are_counted_exactly(
        ray_local, pool_slice, bad_pool, strategy):
    s = pool_slice
    path, test_ids, bad = bad_pool  # ids from the test split: some equal excluded pool ids, which must not matter
    assert np.isin(test_ids, s.exclude).any() or np.isin(test_ids, s.ids).any()
    held_out = HeldOutRows(read_pool(path), len(test_ids))
    one = run(s, strategy, on_bad="skip", held_out=held_out)
    two = run(s, strategy, on_bad="skip")
    np.testing.assert_array_equal(one.ids, two.ids)
    np.testing.assert_allclose(one.scores, two.scores, rtol=1e-6)
    np.testing.assert_array_equal(one.pred, two.pred)
    assert (one.num_scored, one.skipped_ids.size, two.tested) == (two.num_scored, 0, None)
    correct, tested, skipped = count_correct(ModelConfig(name="cnn"), s.model.state_dict(), read_pool(path),
                                             on_bad="skip")
    assert (one.tested.correct, one.tested.tested) == (correct, tested) == (one.tested.correct, 57)
    np.testing.assert_array_equal(one.tested.skipped_ids, bad)
    rows = pq.read_table(path)
    good = ~np.isin(rows["id"].to_numpy(), bad)
    decoded = preprocess_batch({"id": rows["id"].to_numpy()[good], "label": rows["label"].to_numpy()[good],
                                "image": rows["image"].to_numpy(zero_copy_only=False)[good]})
    with torch.no_grad():  # the oracle: the model in this process on the decodable held-out images
        want = int((s.model(torch.from_numpy(decoded["x"])).argmax(1).numpy() == decoded["label"]).sum())
    assert one.tested.correct == want


def test_decode_layout_and_scorer_lifetime_change_no_query_test_count_or_skipped_id(ray_local, pool_slice, bad_pool):
    s = pool_slice
    path, test_ids, bad = bad_pool
    held_out = HeldOutRows(read_pool(path), len(test_ids))
    actors = run(s, "dynamic", on_bad="skip", held_out=held_out, decode="actors")  # warm scorers decode
    for decode, lifetime in (("tasks", "run"), ("actors", "pass"), ("tasks", "pass")):
        other = run(s, "dynamic", on_bad="skip", held_out=held_out, decode=decode, lifetime=lifetime)
        np.testing.assert_array_equal(actors.ids, other.ids)
        np.testing.assert_allclose(actors.scores, other.scores, rtol=1e-6)
        assert (actors.num_scored, actors.tested.correct, actors.tested.tested) == \
            (other.num_scored, other.tested.correct, other.tested.tested)
        np.testing.assert_array_equal(other.tested.skipped_ids, bad)
    # a pool of bad images: skipped and reported the same way when decoded in tasks
    cfg = ScoringConfig(strategy="random", num_scorers=1, batch_size=16, decode="tasks")
    q = score_pool(path, model_cfg=ModelConfig(), state_dict=None, grad_sum=None, scoring_cfg=cfg, budget=57,
                   exclude_ids=np.empty(0, np.int64), seed=0, on_bad="skip")
    np.testing.assert_array_equal(q.skipped_ids, bad)
    with pytest.raises(ImageDecodeError):
        score_pool(path, model_cfg=ModelConfig(), state_dict=None, grad_sum=None, scoring_cfg=cfg, budget=5,
                   exclude_ids=np.empty(0, np.int64), seed=0)


def test_auto_decodes_in_tasks_exactly_when_the_scorers_hold_gpus(ray_local):
    assert decode_layout(ScoringConfig()) == "actors"  # this cluster has no GPU
    assert decode_layout(ScoringConfig(gpus_per_scorer=1)) == "tasks"
    assert [decode_layout(ScoringConfig(decode=d, gpus_per_scorer=1)) for d in ("actors", "tasks")] == ["actors",
                                                                                                      "tasks"]
