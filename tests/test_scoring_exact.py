"""The fast engine against a plain per-sample autograd loop in float64 (ray_dal.scoring.reference)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ray_dal.models import build_model
from ray_dal.scoring import (
    UnsupportedModelError,
    dynamic_scores,
    generic_path_parameters,
    labeled_gradient,
)
from ray_dal.scoring.reference import loop_labeled_gradient, loop_scores, vmap_scores

GAMMAS = [0.0, 1.0, 2.0, math.inf]


def randomise_norm_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running stats and affine parameters, so BatchNorm terms are really tested."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)) and m.weight is not None:
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
    return model


class EveryLayer(nn.Module):
    """Every supported layer type, with the awkward options: strides, dilation, groups, padding modes,
    'same' padding, token positions, repeated and padding tokens."""

    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.conv_a = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.conv_b = nn.Conv2d(8, 8, 3, dilation=2, groups=2, padding="same", bias=False)
        self.conv_c = nn.Conv2d(8, 12, 2, stride=2, padding=1, padding_mode="circular")
        self.bn2d = nn.BatchNorm2d(8)
        self.gn = nn.GroupNorm(4, 12)
        self.conv3d = nn.Conv3d(1, 2, (2, 3, 3), stride=(1, 2, 2))
        self.conv1d = nn.Conv1d(8, 12, 3, stride=2, dilation=2, groups=4, padding=2, padding_mode="reflect")
        self.bn1d = nn.BatchNorm1d(12)
        self.embed = nn.Embedding(7, 8, padding_idx=0)
        self.tokens = nn.Linear(8, 8)  # applied at every token position: [B, T, 8]
        self.ln = nn.LayerNorm(8)
        self.head = nn.Linear(12 + 2 + 8 + 12, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        img = F.relu(self.bn2d(self.conv_a(x)))
        img = F.relu(self.conv_b(img))
        img = self.gn(self.conv_c(img)).mean((2, 3))
        vol = self.conv3d(x[:, :1].unsqueeze(1).repeat(1, 1, 2, 1, 1)).mean((2, 3, 4))
        ids = (x[:, 0, 0, :12].detach() * 3).long().clamp(0, 6)  # repeated ids and padding id 0
        tok = self.ln(torch.tanh(self.tokens(self.embed(ids))))  # [B, 12, 8]
        seq = self.bn1d(self.conv1d(tok.transpose(1, 2))).mean(2)
        return self.head(torch.cat([img, vol, tok.mean(1), seq], dim=1))


def float64_case(name: str, batch: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    model = EveryLayer() if name == "every_layer" else build_model(name, 10)
    model = randomise_norm_statistics(model.double(), seed)
    size = {"every_layer": 16, "resnet18_imagenet": 64}.get(name, 32)  # the ImageNet stem downsamples 4x
    x = torch.randn(batch, 3, size, size, dtype=torch.float64)
    labeled_x = torch.randn(5, 3, size, size, dtype=torch.float64)
    labeled_y = torch.randint(0, 5, (5,))
    return model, x, (labeled_x, labeled_y)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    scale = expected.abs().max().clamp_min(1e-30)
    err = ((actual - expected).abs().max() / scale).item()
    assert err <= rtol, f"max relative error {err:.3e} > {rtol:.0e}\nactual   {actual}\nexpected {expected}"


@pytest.fixture(scope="module", params=["cnn", "resnet18", "vgg11", "resnet18_imagenet", "every_layer"])
def case(request):
    model, x, labeled = float64_case(request.param)
    assert generic_path_parameters(model, x) == [], "every parameter of these models must take a fast path"
    return request.param, model, x, labeled


@pytest.mark.parametrize("scope", ["all", "last"])
def test_labeled_gradient_matches_loop(case, scope):
    _, model, _, (lx, ly) = case
    fast = labeled_gradient(model, [(lx[:2], ly[:2]), (lx[2:], ly[2:])], scope=scope)
    slow = loop_labeled_gradient(model, lx, ly, scope=scope)
    assert fast.keys() == slow.keys()
    for n in slow:
        assert_close(fast[n], slow[n], 1e-8)
    single = labeled_gradient(model, (lx, ly), scope=scope)  # one (inputs, labels) tuple is accepted too
    for n in slow:
        assert_close(single[n], slow[n], 1e-8)


@pytest.mark.parametrize("scope", ["all", "last"])
def test_dynamic_scores_match_loop_for_every_gamma(case, scope):
    name, model, x, labeled = case
    G = labeled_gradient(model, labeled, scope=scope)
    methods = ["auto", "ghost", "materialize"] if scope == "all" else ["auto"]
    for gamma in GAMMAS:
        expected = loop_scores(model, x, G, gamma=gamma, scope=scope)
        for method in methods:
            actual = dynamic_scores(model, x, G, gamma=gamma, scope=scope, layer_method=method)
            assert actual.dtype == torch.float64 and actual.shape == (x.shape[0],)
            assert_close(actual, expected, 1e-8)


def test_batch_of_one_and_repeated_samples(case):
    _, model, x, labeled = case
    G = labeled_gradient(model, labeled)
    assert_close(dynamic_scores(model, x[:1], G), loop_scores(model, x[:1], G), 1e-8)
    repeated = torch.cat([x[:1], x[:1], x[1:2], x[:1]])
    scores = dynamic_scores(model, repeated, G)
    assert_close(scores, loop_scores(model, repeated, G), 1e-8)
    assert scores[0] == scores[1] == scores[3]


def test_float32_agrees_with_float64_loop(case):
    _, model64, x, labeled = case
    G64 = labeled_gradient(model64, labeled)
    expected = loop_scores(model64, x, G64)
    model32 = float64_case(case[0])[0].float()
    G32 = labeled_gradient(model32, (labeled[0].float(), labeled[1]))
    actual = dynamic_scores(model32, x.float(), G32)
    assert actual.dtype == torch.float32
    assert_close(actual.double(), expected, 1e-4)


def test_vmap_oracle_agrees_with_loop():
    model, x, labeled = float64_case("every_layer")
    G = labeled_gradient(model, labeled)
    assert_close(vmap_scores(model, x, G), loop_scores(model, x, G), 1e-10)


def test_model_mode_and_grads_are_left_untouched():
    model, x, labeled = float64_case("resnet18")
    model.train()
    model.layer2.eval()  # a mixed-mode model must come back mixed
    modes = {n: m.training for n, m in model.named_modules()}
    for i, p in enumerate(model.parameters()):
        p.grad = None if i % 2 else torch.full_like(p, float(i))
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    stats = {n: b.clone() for n, b in model.named_buffers()}
    G = labeled_gradient(model, labeled)
    for scope in ("all", "last"):
        dynamic_scores(model, x, G, scope=scope)
    assert {n: m.training for n, m in model.named_modules()} == modes
    for p, g in zip(model.parameters(), grads):
        assert (p.grad is None and g is None) or torch.equal(p.grad, g)
    assert all(torch.equal(b, stats[n]) for n, b in model.named_buffers())  # eval mode: stats not updated


# --- parameters the fast handlers cannot own: exact generic path or a clear error ---------------------


class WithPReLU(nn.Module):
    """A parameterised layer without a handler."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.act = nn.PReLU(8)
        self.out = nn.Linear(8, 4)

    def forward(self, x):
        return self.out(self.act(self.fc(x)))


class TiedWeights(nn.Module):
    """The embedding's weight is reused functionally by the output layer (weight tying)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(9, 6)
        self.mix = nn.Linear(6, 6)

    def forward(self, x):
        ids = (x[:, :4].detach().abs() * 3).long().clamp(0, 8)
        h = torch.tanh(self.mix(self.embed(ids))).mean(1)
        return F.linear(h, self.embed.weight)  # logits over the 9 embedding rows


class SharedLayer(nn.Module):
    """One Linear called twice per forward."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(6, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.shared(torch.tanh(self.shared(x)))))


class Attention(nn.Module):
    """nn.MultiheadAttention uses its out_proj Linear's weight without calling it."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(2, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        h = self.proj(x.reshape(x.shape[0], 3, 2))
        return self.out(self.attn(h, h, h, need_weights=False)[0].mean(1))


@pytest.mark.parametrize(
    "factory, generic",
    [
        (WithPReLU, {"act.weight"}),
        (TiedWeights, {"embed.weight"}),
        (SharedLayer, {"shared.weight", "shared.bias"}),
        (Attention, {"attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias"}),
    ],
)
def test_parameters_without_a_fast_path_are_still_exact(factory, generic):
    torch.manual_seed(0)
    model = factory().double()
    x = torch.randn(4, 6, dtype=torch.float64)
    labels = torch.randint(0, 3, (4,))
    assert set(generic_path_parameters(model, x)) == generic
    G = labeled_gradient(model, (x.flip(0), labels))
    for gamma in (0.0, 2.0, math.inf):
        assert_close(dynamic_scores(model, x, G, gamma=gamma), loop_scores(model, x, G, gamma=gamma), 1e-8)


class _NoVmap(torch.autograd.Function):
    @staticmethod
    def forward(x, w):
        return x * w

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        return grad * w, (grad * x).sum(0)


class CustomScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(6))
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        return self.out(_NoVmap.apply(x, self.scale))


def test_unscorable_parameter_raises_a_clear_error():
    model = CustomScale()
    x = torch.randn(4, 6)
    G = labeled_gradient(model, (x, torch.zeros(4, dtype=torch.long)))
    with pytest.raises(UnsupportedModelError, match=r"scale.*torch.func"):
        dynamic_scores(model, x, G)


def test_batch_statistics_normalisation_is_refused():
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8, track_running_stats=False), nn.Linear(8, 3))
    x = torch.randn(4, 6)
    with pytest.raises(UnsupportedModelError, match=r"module '1' \(BatchNorm1d\).*batch statistics"):
        dynamic_scores(model, x, None, gamma=0)


class InPlaceAfterUse(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(x * 1.0)
        y = self.fc(h)
        h.mul_(2)  # changes the fc layer's input after fc ran
        return self.out(y + h)


def test_input_modified_in_place_after_the_layer_is_refused():
    with pytest.raises(UnsupportedModelError, match=r"'fc'.*modified in place"):
        dynamic_scores(InPlaceAfterUse(), torch.randn(4, 6), None, gamma=0)


def test_bad_arguments_are_refused():
    model, x, labeled = float64_case("cnn")
    G = labeled_gradient(model, labeled)
    with pytest.raises(ValueError, match="gamma"):
        dynamic_scores(model, x, G, gamma=-1.0)
    with pytest.raises(ValueError, match="grad_sum is required"):
        dynamic_scores(model, x, None, gamma=2.0)
    with pytest.raises(ValueError, match="lacks 2 parameter"):
        dynamic_scores(model, x, {n: t for n, t in list(G.items())[2:]})
    with pytest.raises(ValueError, match="scope"):
        dynamic_scores(model, x, G, scope="first")
    last_only = labeled_gradient(model, labeled, scope="last")
    with pytest.raises(ValueError, match="lacks"):
        dynamic_scores(model, x, last_only, scope="all")
    bad_shape = dict(G, **{"fc3.bias": torch.zeros(3, dtype=torch.float64)})
    with pytest.raises(ValueError, match=r"grad_sum\['fc3.bias'\] has shape"):
        dynamic_scores(model, x, bad_shape)
    with pytest.raises(ValueError, match="final nn.Linear"):  # the last Linear's output is not the logits
        dynamic_scores(nn.Sequential(nn.Linear(6, 3), nn.Tanh()), torch.randn(2, 6), None, gamma=0, scope="last")


@pytest.mark.parametrize("name", ["cnn", "vgg11"])
def test_autocast_bfloat16_scores_are_float32_and_close(name):
    """AMP-safe: activations in bfloat16 (8-bit mantissa), reductions in float32, scores float32."""
    model64, x, labeled = float64_case(name)
    G64 = labeled_gradient(model64, labeled)
    expected = loop_scores(model64, x, G64)
    model = float64_case(name)[0].float()
    G = {n: g.float() for n, g in G64.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        actual = dynamic_scores(model, x.float(), G)
    assert actual.dtype == torch.float32
    assert_close(actual.double(), expected, 5e-2)
