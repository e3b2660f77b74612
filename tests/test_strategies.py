"""coreset, badge and albl through the real Ray pipeline on a slice of real CIFAR-10: each query is b
unique unlabeled ids, the pipeline's embeddings equal in-process ones, and the picks are the selection
math's on them."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from ray_dal.config import ConfigError, ModelConfig, ScoringConfig
from ray_dal.data import inspect_pool, preprocess_batch, read_pool
from ray_dal.models import build_model
from ray_dal.pipeline.held_out import HeldOutRows
from ray_dal.pipeline.pool_embedding import embed_pool
from ray_dal.pipeline.training import count_correct
from ray_dal.loop.query import Labeled, candidate_ids, select_query
from ray_dal.loop.run_dir import RunDir
from ray_dal.selection import albl, embedding_parts, k_center_greedy, kmeans_pp_seeding

from .conftest import JOB_ARGS, assert_same_run, run_job

BUDGET, SEED = 30, 11


@dataclasses.dataclass
class Setting:
    pool: object  # PoolInfo of the 2,000-image slice
    ids: np.ndarray
    labels: np.ndarray
    labeled: Labeled
    state: dict
    scoring: ScoringConfig


@pytest.fixture(scope="module")
def setting(ray_local, cifar10_slice) -> Setting:
    pool = inspect_pool(cifar10_slice / "train.parquet")
    table = pq.read_table(pool.files[0], columns=["id", "label"])
    ids, labels = table["id"].to_numpy(), table["label"].to_numpy()
    order = np.argsort(ids)
    ids, labels = ids[order], labels[order]
    rows = np.sort(np.random.default_rng(0).choice(ids.size, 150, replace=False))
    torch.manual_seed(0)
    state = build_model("cnn", 10).state_dict()
    scoring = ScoringConfig(num_scorers=1, batch_size=128, candidates=400)
    return Setting(pool, ids, labels, Labeled(ids[rows], labels[rows]), state, scoring)


def query(s: Setting, strategy: str, labeled: Labeled | None = None, seed: int = SEED):
    labeled = labeled or s.labeled
    return select_query(s.pool, labeled, model_cfg=ModelConfig(), state_dict=s.state, grad_sum=None,
                        scoring_cfg=dataclasses.replace(s.scoring, strategy=strategy), budget=BUDGET,
                        exclude_ids=labeled.ids, seed=seed)


def assert_valid(q, s: Setting, labeled: Labeled) -> None:
    assert q.ids.size == BUDGET and np.unique(q.ids).size == BUDGET
    assert np.isin(q.ids, s.ids).all() and not np.isin(q.ids, labeled.ids).any()


def in_process_parts(s: Setting, ids: np.ndarray):
    table = pq.read_table(s.pool.files[0])
    rows = np.searchsorted(table["id"].to_numpy(), ids) if np.all(np.diff(table["id"].to_numpy()) > 0) else None
    assert rows is not None
    part = table.take(rows)
    batch = preprocess_batch({"id": ids, "image": part["image"].to_numpy(zero_copy_only=False)})
    model = build_model("cnn", 10)
    model.load_state_dict(s.state)
    return embedding_parts(model.eval(), torch.from_numpy(batch["x"]))


def test_pipeline_embeddings_equal_in_process_ones(setting):
    some = setting.ids[::37]
    emb = embed_pool(setting.pool, some, model_cfg=ModelConfig(), state_dict=setting.state,
                     scoring_cfg=setting.scoring, residuals=True)
    assert np.array_equal(emb.ids, some)
    a, e = in_process_parts(setting, some)
    np.testing.assert_allclose(emb.features, a.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(emb.residuals, e.numpy(), rtol=1e-4, atol=1e-5)
    assert np.array_equal(emb.pred, e.argmin(1).numpy())


def test_embeddings_decoded_in_tasks_or_on_a_pool_per_pass_are_the_same(setting):
    some = setting.ids[::37]
    actors, tasks, per_pass = (
        embed_pool(setting.pool, some, model_cfg=ModelConfig(), state_dict=setting.state,
                   scoring_cfg=dataclasses.replace(setting.scoring, decode=d, scorer_lifetime=life), residuals=True)
        for d, life in (("actors", "run"), ("tasks", "run"), ("actors", "pass")))
    for other in (tasks, per_pass):
        assert np.array_equal(actors.ids, other.ids) and np.array_equal(actors.pred, other.pred)
        np.testing.assert_allclose(other.features, actors.features, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(other.residuals, actors.residuals, rtol=1e-5, atol=1e-6)


def test_coreset_is_k_center_on_the_candidates_with_the_labeled_set_as_centres(setting):
    q = query(setting, "coreset")
    assert_valid(q, setting, setting.labeled)
    cand = candidate_ids(setting.pool, setting.labeled.ids, BUDGET, setting.scoring.candidates, SEED)
    assert cand.size == 400 and np.isin(q.ids, cand).all() and q.info == {"candidates": 400, "centres": 150}
    emb = embed_pool(setting.pool, np.union1d(cand, setting.labeled.ids), model_cfg=ModelConfig(),
                     state_dict=setting.state, scoring_cfg=setting.scoring)
    feats = torch.from_numpy(emb.features)
    picks, gaps = k_center_greedy(feats[emb.rows(cand)], feats[emb.rows(setting.labeled.ids)], BUDGET)
    assert np.array_equal(q.ids, cand[picks.numpy()])
    np.testing.assert_allclose(q.scores, gaps.numpy(), rtol=1e-6)


def test_badge_is_kmeans_pp_on_the_candidates_gradient_embeddings(setting):
    q = query(setting, "badge")
    assert_valid(q, setting, setting.labeled)
    cand = candidate_ids(setting.pool, setting.labeled.ids, BUDGET, setting.scoring.candidates, SEED)
    emb = embed_pool(setting.pool, cand, model_cfg=ModelConfig(), state_dict=setting.state,
                     scoring_cfg=setting.scoring, residuals=True)
    picks, _ = kmeans_pp_seeding(torch.from_numpy(emb.features), torch.from_numpy(emb.residuals), BUDGET,
                                 np.random.default_rng([SEED, 2]))
    assert np.array_equal(q.ids, cand[picks.numpy()])
    assert query(setting, "badge", seed=SEED + 1).ids.tolist() != q.ids.tolist()  # the seed drives the draws


def test_albl_runs_its_bandit_across_rounds(setting):
    first = query(setting, "albl")
    assert_valid(first, setting, setting.labeled)
    state = first.info["albl"]
    assert state["reward"] is None and state["weights"] == [1.0, 1.0] and state["arm"] in albl.ARMS
    grown = np.union1d(setting.labeled.ids, first.ids)
    history = [{"selected_ids": first.ids, "albl": state}]
    labeled = Labeled(grown, setting.labels[np.searchsorted(setting.ids, grown)], history)
    second = query(setting, "albl", labeled, seed=SEED + 1)
    assert_valid(second, setting, labeled)
    after = second.info["albl"]
    arm = albl.ARMS.index(state["arm"])
    # the reward is the importance-weighted accuracy of the model's argmax on S: recompute it here
    a, e = in_process_parts(setting, grown)
    correct = e.argmin(1).numpy() == labeled.labels
    importance = np.where(np.isin(grown, first.ids), state["probabilities"][arm], 1.0)
    assert after["reward"] == pytest.approx(float((correct / importance).mean()), rel=1e-9)
    np.testing.assert_allclose(after["weights"], albl.update(state["weights"], arm, after["reward"],
                                                             state["probabilities"][arm]))


def test_too_few_candidates_for_the_budget_is_a_config_error(setting):
    s = dataclasses.replace(setting, scoring=dataclasses.replace(setting.scoring, candidates=BUDGET - 1))
    with pytest.raises(ConfigError, match="scoring.candidates = 29 is smaller than the budget"):
        query(s, "coreset")


def test_albl_job_runs_end_to_end_and_a_resumed_run_continues_the_same_bandit(ray_local, cifar10_slice, tmp_path):
    out = tmp_path / "albl"
    args = [*JOB_ARGS, "--strategy", "albl", "--num-workers", "0"]  # the bandit, not Ray Train, is under test
    run_job(["--data-dir", str(cifar10_slice), "--out", str(out), *args])
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["albl"]["reward"] is None for m in metrics[:2]] == [True, False] and "albl" not in metrics[2]
    run = RunDir(out)
    for r in range(2):
        before, query = run.load(r).labeled_ids, run.selected_ids(r)
        assert query.size == 100 and np.unique(query).size == 100 and not np.isin(query, before).any()
        assert np.array_equal(run.load(r + 1).labeled_ids, np.union1d(before, query))
    resumed = tmp_path / "resumed"  # as if killed after round 0: round 1's bandit must continue from round 0's
    shutil.copytree(out, resumed, ignore=shutil.ignore_patterns("ray_train", "round_001", "round_002"))
    run_job(["--data-dir", str(cifar10_slice), "--out", str(resumed), *args])
    assert_same_run(resumed, out)


@pytest.mark.slow
def test_held_out_rows_tested_in_the_embedding_pass_change_no_query_and_are_counted_exactly(setting, cifar10_slice):
    test_path = cifar10_slice / "test.parquet"
    held_out = HeldOutRows(read_pool(test_path), pq.read_metadata(test_path).num_rows)
    correct, tested, _ = count_correct(ModelConfig(), setting.state, read_pool(test_path))
    first = query(setting, "albl")
    grown = np.union1d(setting.labeled.ids, first.ids)
    later = Labeled(grown, setting.labels[np.searchsorted(setting.ids, grown)],
                    [{"selected_ids": first.ids, "albl": first.info["albl"]}])
    for strategy, labeled in [("coreset", setting.labeled), ("badge", setting.labeled), ("albl", later)]:
        kwargs = dict(model_cfg=ModelConfig(), state_dict=setting.state, grad_sum=None, budget=BUDGET,
                      scoring_cfg=dataclasses.replace(setting.scoring, strategy=strategy), exclude_ids=labeled.ids,
                      seed=SEED)
        alone, riding = (select_query(setting.pool, labeled, held_out=h, **kwargs) for h in (None, held_out))
        assert np.array_equal(alone.ids, riding.ids) and alone.info == riding.info, strategy
        assert alone.tested is None and (riding.tested.correct, riding.tested.tested) == (correct, tested), strategy
        assert riding.tested.skipped_ids.size == 0
