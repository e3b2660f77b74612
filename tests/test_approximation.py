"""`approximation_ratio` (R(Q|S), the paper's Eq. 14) against a float64 per-sample autograd computation."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ray_dal.data import decode_images, normalize
from ray_dal.models import build_model
from ray_dal.scoring import ApproximationRatio, approximation_ratio, labeled_gradient, scoped_parameters

from .test_scoring_exact import randomise_norm_statistics

SCOPES = ["all", "last"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Thousands of tiny per-sample ops: on a loaded 2-core machine two threads spin (measured 3 s -> 20 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def per_sample_gradients(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor | None, scope: str
                         ) -> torch.Tensor:
    """float64 ``[B, P]``: row i = the flattened gradient of CE(f(x_i), y_i) (argmax labels if ``labels`` is None)."""
    params = list(scoped_parameters(model, scope).values())
    rows = []
    model.eval()
    for i in range(inputs.shape[0]):
        logits = model(inputs[i : i + 1])
        y = logits.detach().argmax(dim=1) if labels is None else labels[i : i + 1]
        grads = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), params, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for g, p in zip(grads, params)]))
    return torch.stack(rows).double()


def oracle(model, x_q, x_s, y_s, scope) -> tuple[float, float]:
    """(Σ_x score, Δ) straight from the definitions: Δ = ||G_S + G_Q||² - ||G_S||²."""
    G_S = per_sample_gradients(model, x_s, y_s, scope).sum(0)
    g = per_sample_gradients(model, x_q, None, scope)
    G_Q = g.sum(0)
    numerator = float(((g * g).sum(1) + 2 * g @ G_S).sum())
    return numerator, float((G_S + G_Q) @ (G_S + G_Q) - G_S @ G_S)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(),
                         nn.Linear(16, 5))


def batchnorm_net() -> nn.Module:
    return randomise_norm_statistics(nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2),
        nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)))


@pytest.fixture(scope="module")
def cifar(cifar10_dir) -> tuple[torch.Tensor, torch.Tensor]:
    """48 real CIFAR-10 training images (float32 [48, 3, 32, 32], normalised) and their labels."""
    table = pq.read_table(cifar10_dir / "train.parquet", columns=["image", "label"]).take(list(range(7, 50000, 1040)))
    return normalize(decode_images(table["image"].to_pylist())[0]), torch.tensor(table["label"].to_pylist())


def labeled_split(x: torch.Tensor, y: torch.Tensor, m: int):
    """(x_q, x_s, y_s): the first ``m`` rows are S, the rest Q."""
    return x[m:], x[:m], y[:m]


def case(name: str, cifar) -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A float64 model and (x_q, x_s, y_s) for it."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    y = torch.randint(0, 5, (30,), generator=gen)
    if name == "cnn":
        model, (x, y) = build_model("cnn", 10), cifar
    elif name == "mlp":
        model, x = mlp(), torch.randn(30, 3, 8, 8, generator=gen)
    else:
        model, x = batchnorm_net(), torch.randn(30, 3, 9, 9, generator=gen)
    return (model.double(), *labeled_split(x.double(), y, 12))


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("name", ["cnn", "mlp", "batchnorm"])
def test_matches_per_sample_autograd_in_float64(name, scope, cifar):
    model, x_q, x_s, y_s = case(name, cifar)
    want_num, want_delta = oracle(model, x_q, x_s, y_s, scope)
    got = approximation_ratio(model, x_q, labeled_gradient(model, (x_s, y_s), scope=scope), scope=scope, batch_size=7)
    assert got.b == x_q.shape[0]
    assert got.numerator == pytest.approx(want_num, rel=1e-8)
    assert got.delta == pytest.approx(want_delta, rel=1e-8)
    assert got.ratio == pytest.approx(want_num / want_delta, rel=1e-8)


@pytest.mark.parametrize("scope", SCOPES)
def test_single_sample_ratio_is_one(scope, cifar):
    model, x_q, x_s, y_s = case("cnn", cifar)
    G = labeled_gradient(model, (x_s, y_s), scope=scope)
    for i in range(3):
        assert approximation_ratio(model, x_q[i : i + 1], G, scope=scope).ratio == pytest.approx(1.0, abs=1e-12)


def test_ratio_does_not_depend_on_batch_size(cifar):
    model, x_q, x_s, y_s = case("batchnorm", cifar)
    G = labeled_gradient(model, (x_s, y_s))
    ratios = [approximation_ratio(model, x_q, G, batch_size=bs) for bs in (1, 5, 256)]
    for r in ratios[1:]:
        assert r.ratio == pytest.approx(ratios[0].ratio, rel=1e-12)
        assert r.delta == pytest.approx(ratios[0].delta, rel=1e-12)


@pytest.mark.parametrize("scope", SCOPES)
def test_without_labeled_gradient_it_is_sum_of_norms_over_norm_of_sum(scope, cifar):
    model, x_q, _, _ = case("cnn", cifar)
    g = per_sample_gradients(model, x_q, None, scope)
    zeros = {n: torch.zeros_like(p) for n, p in scoped_parameters(model, scope).items()}
    got = approximation_ratio(model, x_q, zeros, scope=scope)
    assert got.ratio == pytest.approx(float((g * g).sum() / (g.sum(0) @ g.sum(0))), rel=1e-8)


def test_float32_model_agrees_with_float64(cifar):
    """What a real round computes (float32) against the same model in float64."""
    x, y = cifar
    torch.manual_seed(0)
    model = build_model("cnn", 10).train()
    G = labeled_gradient(model, (x[:20], y[:20]))
    got = approximation_ratio(model, x[20:], G)
    want = approximation_ratio(model.double(), x[20:].double(), {n: t.double() for n, t in G.items()})
    assert got.ratio == pytest.approx(want.ratio, rel=1e-4)
    assert model.training and all(p.grad is None for p in model.parameters())  # modes and .grad untouched


def test_empty_query_and_zero_change_are_refused():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3, bias=False))
    G = {"1.weight": torch.zeros(3, 12)}
    with pytest.raises(ValueError, match="non-empty query"):
        approximation_ratio(model, torch.zeros(0, 3, 2, 2), G)
    with pytest.raises(ValueError, match="exactly 0"):  # zero inputs: every g_x = e a^T = 0
        approximation_ratio(model, torch.zeros(4, 3, 2, 2), G)
    with pytest.raises(ValueError, match="non-empty query"):
        ApproximationRatio.of(1.0, 2.0, 0)
