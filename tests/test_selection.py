"""The diversity baselines' math against brute-force references: k-center, k-means++ seeding on
gradient embeddings built explicitly (K x d per sample), the embedding itself against autograd, and
the ALBL bandit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ray_dal.models import build_model
from ray_dal.scoring import final_linear
from ray_dal.selection import albl, embedding_parts, k_center_greedy, kmeans_pp_seeding
from ray_dal.selection.kmeanspp import draw_proportional


def clustered(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = 5 * torch.randn(6, d, generator=g, dtype=torch.float64)
    return centres[torch.randint(0, 6, (n,), generator=g)] + torch.randn(n, d, generator=g, dtype=torch.float64)


# ---- embeddings -------------------------------------------------------------------------------------------


def test_embedding_outer_product_is_the_last_layer_gradient_at_the_pseudo_label():
    torch.manual_seed(0)
    model = build_model("cnn", 10).double().train()
    x = torch.randn(6, 3, 32, 32, dtype=torch.float64)
    a, e = embedding_parts(model, x)
    assert model.training  # modes restored
    name, layer = final_linear(model)
    model.eval()
    for i in range(len(x)):
        logits = model(x[i:i + 1])
        loss = F.cross_entropy(logits, logits.argmax(1))
        (grad,) = torch.autograd.grad(loss, layer.weight)
        torch.testing.assert_close(torch.outer(e[i], a[i]), grad, rtol=1e-10, atol=1e-12)


# ---- k-center ---------------------------------------------------------------------------------------------


def brute_k_center(x: np.ndarray, centres: np.ndarray, b: int) -> list[int]:
    picks: list[int] = []
    for _ in range(b):
        best, best_d = -1, -1.0
        for i in range(len(x)):
            if i in picks:
                continue
            pool = [c for c in centres] + [x[j] for j in picks]
            d = min(float(((x[i] - c) ** 2).sum()) for c in pool) if pool else float("inf")
            if d > best_d:
                best, best_d = i, d
        picks.append(best)
    return picks


@pytest.mark.parametrize("num_centres", [0, 1, 7])
def test_k_center_matches_brute_force(num_centres):
    x = clustered(60, 5, seed=num_centres)
    centres = clustered(num_centres, 5, seed=100 + num_centres)
    picks, gaps = k_center_greedy(x, centres, 12)
    assert picks.tolist() == brute_k_center(x.numpy(), centres.numpy(), 12)
    chosen = torch.cat([centres, x[picks]])
    for k, i in enumerate(picks.tolist()):  # each gap is the pick's squared distance to the centres before it
        prior = chosen[: num_centres + k]
        expected = ((prior - x[i]) ** 2).sum(1).min() if len(prior) else torch.tensor(float("inf"))
        torch.testing.assert_close(gaps[k], expected.to(gaps.dtype), rtol=1e-9, atol=1e-9)
    assert torch.all(gaps[1:] <= gaps[:-1] + 1e-9)  # greedy: gaps never grow


def test_k_center_never_repeats_a_pick_among_duplicates():
    x = torch.ones(5, 3, dtype=torch.float64)
    picks, _ = k_center_greedy(x, x[:1], 5)
    assert sorted(picks.tolist()) == [0, 1, 2, 3, 4]


def test_k_center_rejects_bad_shapes_and_budgets():
    with pytest.raises(ValueError, match="share d"):
        k_center_greedy(torch.zeros(4, 3), torch.zeros(2, 2), 1)
    with pytest.raises(ValueError, match="b = 5"):
        k_center_greedy(torch.zeros(4, 3), torch.zeros(0, 3), 5)


# ---- k-means++ ----------------------------------------------------------------------------------------------


def brute_kmeans_pp(g: np.ndarray, b: int, rng: np.random.Generator) -> list[int]:
    """BADGE's init_centers on explicit embeddings g [N, K*d]."""
    picks = [int(np.argmax(np.linalg.norm(g, axis=1)))]
    while len(picks) < b:
        d2 = np.array([min(float(((g[i] - g[j]) ** 2).sum()) for j in picks) for i in range(len(g))])
        d2[picks] = 0.0
        picks.append(draw_proportional(d2, rng))
    return picks


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kmeans_pp_matches_brute_force_on_explicit_embeddings(seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(40, 7, generator=g, dtype=torch.float64)
    e = torch.softmax(torch.randn(40, 4, generator=g, dtype=torch.float64), 1)
    e = e - F.one_hot(e.argmax(1), 4).double()
    explicit = torch.einsum("nk,nd->nkd", e, a).reshape(40, -1).numpy()
    picks, gaps = kmeans_pp_seeding(a, e, 10, np.random.default_rng(seed))
    assert picks.tolist() == brute_kmeans_pp(explicit, 10, np.random.default_rng(seed))
    assert len(set(picks.tolist())) == 10
    assert gaps[0] == pytest.approx(float((explicit[picks[0]] ** 2).sum()))


def test_kmeans_pp_picks_every_sample_once_when_b_is_n_even_with_duplicates():
    a = torch.ones(6, 3, dtype=torch.float64)
    e = torch.ones(6, 2, dtype=torch.float64)
    picks, _ = kmeans_pp_seeding(a, e, 6, np.random.default_rng(0))
    assert sorted(picks.tolist()) == list(range(6))


def test_kmeans_pp_seed_fixes_the_picks_and_draws_cover_far_clusters():
    g = torch.Generator().manual_seed(4)
    centres = 50 * torch.randn(6, 6, generator=g, dtype=torch.float64)
    cluster = torch.arange(300) % 6
    a = centres[cluster] + torch.randn(300, 6, generator=g, dtype=torch.float64)
    e = torch.ones(300, 1, dtype=torch.float64)
    first, _ = kmeans_pp_seeding(a, e, 6, np.random.default_rng(7))
    again, _ = kmeans_pp_seeding(a, e, 6, np.random.default_rng(7))
    assert torch.equal(first, again)
    covered = [len(set(cluster[kmeans_pp_seeding(a, e, 6, np.random.default_rng(s))[0]].tolist())) for s in range(20)]
    assert np.mean(covered) > 5.5  # six draws cover all six clusters (uniform draws would: 1.5% of the time)


# ---- ALBL bandit ---------------------------------------------------------------------------------------------


def test_albl_probabilities_have_a_floor_and_follow_rewards():
    w = np.ones(2)
    p = albl.probabilities(w)
    assert p.sum() == pytest.approx(1.0) and np.allclose(p, 0.5)
    for _ in range(200):  # arm 0 always earns 1, arm 1 always 0
        w = albl.update(w, 0, 1.0, albl.probabilities(w)[0])
        w = albl.update(w, 1, 0.0, albl.probabilities(w)[1])
    p = albl.probabilities(w)
    assert p[0] > p[1] >= 1 / 20 - 1e-12 and p.sum() == pytest.approx(1.0)


def test_albl_importance_weighting_and_seeded_draws():
    assert albl.importance_weighted_accuracy([1, 0, 1], [1.0, 1.0, 0.5]) == pytest.approx((1 + 0 + 2) / 3)
    draws = [albl.draw_arm(np.array([1.0, 3.0]), np.random.default_rng(s)) for s in range(400)]
    assert 0.6 < np.mean(draws) < 0.8  # p(arm 1) = 0.9 * 0.75 + 0.05 = 0.725
    with pytest.raises(ValueError):
        albl.importance_weighted_accuracy([], [])
