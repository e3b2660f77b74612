"""The fast engine against a plain per-sample autograd loop in float64 (ray_dal.scoring.reference).

By default everything runs on the CPU in float64. ``RAY_DAL_TEST_DEVICE`` / ``RAY_DAL_TEST_DTYPE`` /
``RAY_DAL_TEST_AUTOCAST`` run the fast engine elsewhere (e.g. CUDA in float32 or under bfloat16
autocast) against the same float64 CPU reference: see `Target`.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import math
import os
from dataclasses import dataclass

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


# --- where the fast engine runs: the CPU in float64 unless the environment says otherwise -------------

# Tolerances of the fast engine off the float64 CPU path, relative to the largest |expected| entry (as
# `assert_close`). Measured on the CPU (torch 2.14) over these cases, every gamma and layer method:
#   float32 (TF32 off): scores <= 3.6e-6 ("auto"/"ghost"); forced "materialize" <= 9.8e-4 (vgg11; per-sample
#     weight gradients summed over up to 1024 positions in float32 before squaring); G per tensor <= 1.9e-6.
#   bf16 autocast: scores <= 4.7e-2 (cnn, gamma 2); G <= 2.8e-2 of the largest |G| entry, but up to 0.33 of
#     a small tensor's own largest entry, so under autocast G is compared at the scale of the whole G.
# Each limit is 10-50x the measured error (bf16: 2-3.5x, what its 8-bit mantissa leaves): loose enough for
# another device's reduction order, tight enough that a missing or wrong layer term fails in float32.
FLOAT32_RTOL, FLOAT32_MATERIALIZE_RTOL, BF16_RTOL = 1e-4, 1e-2, 1e-1


@dataclass(frozen=True)
class Target:
    """Where the fast engine runs in these tests; the float64 CPU loop reference never moves.

    Default (no ``RAY_DAL_TEST_*`` variable): the fast engine gets the case's own float64 CPU model and
    tensors and each test's own tolerance, exactly as written. Otherwise ("moved") a copy of the model and
    the inputs go to ``RAY_DAL_TEST_DEVICE`` (cpu, cuda, cuda:1; default cpu) in ``RAY_DAL_TEST_DTYPE``
    (float64 or float32, the default), optionally under ``RAY_DAL_TEST_AUTOCAST=bf16`` (bfloat16
    autocast over float32 weights); scores and G come back as CPU float64, compared at `rtol`. TF32 is
    off while moved, so float32 means IEEE float32 (TF32's 10-bit mantissa lies within the bf16 run's).
    """

    moved: bool = False
    device: str = "cpu"
    dtype: torch.dtype = torch.float64
    autocast: bool = False

    @classmethod
    def from_env(cls, env=os.environ) -> "Target":
        device, dtype, autocast = (env.get(f"RAY_DAL_TEST_{k}", "") for k in ("DEVICE", "DTYPE", "AUTOCAST"))
        if not (device or dtype or autocast):
            return cls()
        if dtype not in ("", "float32", "float64"):
            raise ValueError(f"RAY_DAL_TEST_DTYPE must be float32 or float64, got {dtype!r}")
        if autocast not in ("", "bf16"):
            raise ValueError(f"RAY_DAL_TEST_AUTOCAST must be bf16 (or unset), got {autocast!r}")
        if autocast and dtype == "float64":
            raise ValueError("RAY_DAL_TEST_AUTOCAST=bf16 runs float32 weights: unset RAY_DAL_TEST_DTYPE=float64")
        return cls(True, device or "cpu", getattr(torch, dtype or "float32"), bool(autocast))

    def __str__(self) -> str:
        return f"{self.device} {str(self.dtype)[6:]}{' + bf16 autocast' if self.autocast else ''}"

    def model(self, model: nn.Module) -> nn.Module:
        return copy.deepcopy(model).to(self.device, self.dtype) if self.moved else model

    def inputs(self, t: torch.Tensor) -> torch.Tensor:
        if not self.moved:
            return t
        return t.to(self.device, self.dtype) if t.is_floating_point() else t.to(self.device)

    def context(self):
        if not self.autocast:
            return contextlib.nullcontext()
        return torch.autocast(torch.device(self.device).type, torch.bfloat16)

    def back(self, t: torch.Tensor, of: str) -> torch.Tensor:
        """``t`` as CPU float64, after checking the engine's contract: on the target, float32 or wider."""
        if not self.moved:
            return t
        assert t.device.type == torch.device(self.device).type, f"{of} on {t.device}, expected {self.device}"
        assert t.dtype == torch.promote_types(self.dtype, torch.float32), f"{of} is {t.dtype} on {self}"
        return t.detach().to("cpu", torch.float64)

    def scores(self, model: nn.Module, x: torch.Tensor, G, **kwargs) -> torch.Tensor:
        """`dynamic_scores` of ``model`` (already `model`-ed) on the target; G and x are moved here."""
        G = G if G is None else {n: self.inputs(g) for n, g in G.items()}
        with self.context():
            return self.back(dynamic_scores(model, self.inputs(x), G, **kwargs), "scores")

    def gradient(self, model: nn.Module, batches, scope: str = "all") -> dict[str, torch.Tensor]:
        """`labeled_gradient` of ``model`` (already `model`-ed) on the target; ``batches`` is moved here."""
        if isinstance(batches, tuple):
            batches = tuple(self.inputs(t) for t in batches)
        else:
            batches = [tuple(self.inputs(t) for t in b) for b in batches]
        with self.context():
            return {n: self.back(g, f"G[{n!r}]") for n, g in labeled_gradient(model, batches, scope=scope).items()}

    def rtol(self, written: float, method: str = "auto") -> float:
        """The tolerance of a comparison written as ``written`` for the float64 CPU engine."""
        if not self.moved or self.dtype == torch.float64:
            return written
        if self.autocast:
            return max(written, BF16_RTOL)
        return max(written, FLOAT32_MATERIALIZE_RTOL if method == "materialize" else FLOAT32_RTOL)

    def assert_gradients_close(self, fast: dict, slow: dict, written: float) -> None:
        for n in slow:
            if self.autocast:  # bf16: each tensor at the scale of the whole G (see the tolerances above)
                scale = max(t.abs().max() for t in slow.values())
                err = ((fast[n] - slow[n]).abs().max() / scale).item()
                assert err <= self.rtol(written), f"G[{n!r}]: max error {err:.3e} of the largest |G| on {self}"
            else:
                assert_close(fast[n], slow[n], self.rtol(written))

    def assert_same(self, scores: torch.Tensor) -> None:
        """Identical samples in one batch: identical scores on the CPU; equal within `rtol` when moved
        (a device kernel may reduce batch rows in different orders)."""
        if self.moved:
            assert_close(scores, scores[:1].expand_as(scores), self.rtol(1e-8))
        else:
            assert all(s == scores[0] for s in scores[1:]), scores


TARGET = Target.from_env()
cpu_only = pytest.mark.skipif(TARGET.moved, reason=f"device-independent; runs in the default CPU run, not on {TARGET}")


@pytest.fixture(scope="module")
def target():
    """`TARGET`, checked usable; while moved, TF32 is off (restored afterwards)."""
    if not TARGET.moved:
        yield TARGET
        return
    kind = torch.device(TARGET.device).type
    if kind == "cuda" and not torch.cuda.is_available():
        pytest.fail(f"RAY_DAL_TEST_DEVICE={TARGET.device}, but torch sees no CUDA GPU (torch.cuda.is_available())")
    torch.empty(1, device=TARGET.device)  # a bad device name fails here, clearly
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield TARGET
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


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
def test_labeled_gradient_matches_loop(case, scope, target):
    _, model, _, (lx, ly) = case
    fast_model = target.model(model)
    fast = target.gradient(fast_model, [(lx[:2], ly[:2]), (lx[2:], ly[2:])], scope=scope)
    slow = loop_labeled_gradient(model, lx, ly, scope=scope)
    assert fast.keys() == slow.keys()
    target.assert_gradients_close(fast, slow, 1e-8)
    single = target.gradient(fast_model, (lx, ly), scope=scope)  # one (inputs, labels) tuple is accepted too
    target.assert_gradients_close(single, slow, 1e-8)


@pytest.mark.parametrize("scope", ["all", "last"])
def test_dynamic_scores_match_loop_for_every_gamma(case, scope, target):
    name, model, x, labeled = case
    G = labeled_gradient(model, labeled, scope=scope)
    fast_model = target.model(model)
    methods = ["auto", "ghost", "materialize"] if scope == "all" else ["auto"]
    for gamma in GAMMAS:
        expected = loop_scores(model, x, G, gamma=gamma, scope=scope)
        for method in methods:
            actual = target.scores(fast_model, x, G, gamma=gamma, scope=scope, layer_method=method)
            assert actual.dtype == torch.float64 and actual.shape == (x.shape[0],)
            assert_close(actual, expected, target.rtol(1e-8, method))


def test_batch_of_one_and_repeated_samples(case, target):
    _, model, x, labeled = case
    G = labeled_gradient(model, labeled)
    fast_model = target.model(model)
    assert_close(target.scores(fast_model, x[:1], G), loop_scores(model, x[:1], G), target.rtol(1e-8))
    repeated = torch.cat([x[:1], x[:1], x[1:2], x[:1]])
    scores = target.scores(fast_model, repeated, G)
    assert_close(scores, loop_scores(model, repeated, G), target.rtol(1e-8))
    target.assert_same(scores[[0, 1, 3]])


@cpu_only
def test_float32_agrees_with_float64_loop(case):
    _, model64, x, labeled = case
    G64 = labeled_gradient(model64, labeled)
    expected = loop_scores(model64, x, G64)
    model32 = float64_case(case[0])[0].float()
    G32 = labeled_gradient(model32, (labeled[0].float(), labeled[1]))
    actual = dynamic_scores(model32, x.float(), G32)
    assert actual.dtype == torch.float32
    assert_close(actual.double(), expected, 1e-4)


@cpu_only
def test_vmap_oracle_agrees_with_loop():
    model, x, labeled = float64_case("every_layer")
    G = labeled_gradient(model, labeled)
    assert_close(vmap_scores(model, x, G), loop_scores(model, x, G), 1e-10)


def test_model_mode_and_grads_are_left_untouched(target):
    model, x, labeled = float64_case("resnet18")
    model, x, labeled = target.model(model), target.inputs(x), tuple(map(target.inputs, labeled))
    model.train()
    model.layer2.eval()  # a mixed-mode model must come back mixed
    modes = {n: m.training for n, m in model.named_modules()}
    for i, p in enumerate(model.parameters()):
        p.grad = None if i % 2 else torch.full_like(p, float(i))
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    stats = {n: b.clone() for n, b in model.named_buffers()}
    with target.context():
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


class ReusedFirstLayer(nn.Module):
    """A bias-free first layer (its input needs no gradient, so autograd sees its op as a function of the
    weight alone) whose weight a later op reuses."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(6, 6, bias=False)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.first(x))
        return self.out(h + F.linear(h, self.first.weight))


class DetachedReuse(nn.Module):
    """A parent reads a child's weight without differentiating through it: no second gradient term."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.fc(x)) * self.fc.weight.detach().norm())


class OneWeightTwice(nn.Module):
    """The model's only parameter, used by its layer and again functionally: every op depends on it alone."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3, bias=False)

    def forward(self, x):
        return self.fc(x) + F.linear(x.flip(1), self.fc.weight)


@pytest.mark.parametrize(
    "factory, generic",
    [
        (lambda: nn.Linear(6, 3, bias=False), set()),  # one parameter: the whole graph is a function of it
        (OneWeightTwice, {"fc.weight"}),
        (WithPReLU, {"act.weight"}),
        (TiedWeights, {"embed.weight"}),
        (SharedLayer, {"shared.weight", "shared.bias"}),
        (Attention, {"attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias"}),
        (ReusedFirstLayer, {"first.weight"}),
        (DetachedReuse, set()),
    ],
)
def test_parameters_without_a_fast_path_are_still_exact(factory, generic, target):
    torch.manual_seed(0)
    model = factory().double()
    x = torch.randn(4, 6, dtype=torch.float64)
    labels = torch.randint(0, 3, (4,))
    fast_model = target.model(model)
    assert set(generic_path_parameters(fast_model, target.inputs(x))) == generic
    G = labeled_gradient(model, (x.flip(0), labels))
    for gamma in (0.0, 2.0, math.inf):
        expected = loop_scores(model, x, G, gamma=gamma)
        assert_close(target.scores(fast_model, x, G, gamma=gamma), expected, target.rtol(1e-8))


@cpu_only
def test_a_weight_reused_under_autocast_takes_the_generic_path():
    """Autocast casts a weight once per forward and reuses the cast: two ops, one cast node between them and the
    weight. Both uses must still be seen (a fast handler alone would drop the second op's term)."""
    torch.manual_seed(0)
    model = ReusedFirstLayer()
    x = torch.randn(8, 6)
    G = labeled_gradient(model.double(), (x.double().flip(0), torch.randint(0, 3, (8,))))
    expected = loop_scores(model, x.double(), G)
    model.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert generic_path_parameters(model, x) == ["first.weight"]
        actual = dynamic_scores(model, x, {n: g.float() for n, g in G.items()})
    assert_close(actual.double(), expected, BF16_RTOL)


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


@cpu_only
def test_unscorable_parameter_raises_a_clear_error():
    model = CustomScale()
    x = torch.randn(4, 6)
    G = labeled_gradient(model, (x, torch.zeros(4, dtype=torch.long)))
    with pytest.raises(UnsupportedModelError, match=r"scale.*torch.func"):
        dynamic_scores(model, x, G)


@cpu_only
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


@cpu_only
def test_input_modified_in_place_after_the_layer_is_refused():
    with pytest.raises(UnsupportedModelError, match=r"'fc'.*modified in place"):
        dynamic_scores(InPlaceAfterUse(), torch.randn(4, 6), None, gamma=0)


@cpu_only
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
def test_autocast_bfloat16_scores_are_float32_and_close(name, target):
    """AMP-safe: activations in bfloat16 (8-bit mantissa), reductions in float32, scores float32."""
    model64, x, labeled = float64_case(name)
    G64 = labeled_gradient(model64, labeled)
    expected = loop_scores(model64, x, G64)
    device = torch.device(target.device)  # the CPU unless RAY_DAL_TEST_DEVICE says otherwise
    model = float64_case(name)[0].float().to(device)
    G = {n: g.float().to(device) for n, g in G64.items()}
    with torch.autocast(device.type, dtype=torch.bfloat16):
        actual = dynamic_scores(model, x.float().to(device), G)
    assert actual.dtype == torch.float32 and actual.device.type == device.type
    assert_close(actual.double().cpu(), expected, 5e-2 if device.type == "cpu" else BF16_RTOL)


@cpu_only
def test_patches_only_where_they_are_narrow_and_small():
    """Patches for narrow layers whose one-sample patches fit a chunk; the grouped kernel for wide layers, 3d ones,
    and large images (a 3-channel 7x7 stem on 512x512 would need 150 MB of patches per sample)."""
    conv = importlib.import_module("ray_dal.scoring.layers.conv")
    cases = [(nn.Conv2d(3, 6, 5), (1, 3, 32, 32), True), (nn.Conv2d(6, 16, 5), (1, 6, 14, 14), False),
             (nn.Conv2d(8, 8, 3, groups=2), (1, 8, 9, 9), True), (nn.Conv3d(1, 2, 3), (1, 1, 6, 6, 6), False),
             (nn.Conv2d(3, 64, 7, stride=2), (1, 3, 512, 512), False)]
    for module, shape, expected in cases:
        x = torch.zeros(shape)
        with torch.no_grad():
            d = module(x)
        assert conv.takes_patches(module, x, d) is expected, module


@cpu_only
@pytest.mark.parametrize("module, x_shape", [
    (nn.Conv2d(3, 5, 3, stride=2, padding=2, dilation=2), (6, 3, 9, 9)),
    (nn.Conv2d(4, 6, 3, groups=2, padding=1, padding_mode="reflect"), (6, 4, 7, 7)),
    (nn.Conv1d(2, 4, 5, stride=3, padding=1), (6, 2, 20)),
])
def test_narrow_convolutions_take_patches_in_chunks(module, x_shape, monkeypatch):
    """Narrow convolutions (an RGB stem) take patches x output gradient, a few samples at a time, into a buffer
    kept between calls: the grouped convolution's per-sample gradients, whatever the chunk, dtype or call order."""
    conv = importlib.import_module("ray_dal.scoring.layers.conv")
    torch.manual_seed(0)
    module = module.double()
    x = torch.randn(x_shape, dtype=torch.float64)
    d = torch.randn_like(module(x))
    padded, padding = conv._padded(module, x)
    monkeypatch.setattr(conv, "NARROW_CHANNELS", 0)
    expected = conv._per_sample_weight_grad(module, padded, d, padding)
    monkeypatch.setattr(conv, "NARROW_CHANNELS", 4)
    one_sample = conv._patch_numel(module, d) * 8  # bytes of one sample's float64 patches
    for chunk_bytes in (one_sample, 2 * one_sample, conv.PATCH_CHUNK_BYTES):  # 1 sample, 2 or so, the whole batch
        monkeypatch.setattr(conv, "PATCH_CHUNK_BYTES", chunk_bytes)
        assert conv.takes_patches(module, padded, d)
        as_float = conv._per_sample_weight_grad(copy.deepcopy(module).float(), padded.float(), d.float(), padding)
        assert_close(as_float.double(), expected, 1e-5)
        assert_close(conv._per_sample_weight_grad(module, padded, d, padding), expected, 1e-12)


@cpu_only
@pytest.mark.parametrize("module, x_shape, d_shape", [
    (nn.Linear(64, 32), (8, 64), (8, 32)),
    (nn.Conv2d(16, 32, 3, padding=1), (4, 16, 8, 8), (4, 32, 8, 8)),
    (nn.LayerNorm(64), (8, 64), (8, 64)),
    (nn.GroupNorm(4, 16), (4, 16, 6, 6), (4, 16, 6, 6)),
])
def test_layer_reductions_ignore_an_enclosing_autocast(module, x_shape, d_shape):
    """Under AMP the engine's per-layer reductions (||g||^2, <g, G>) stay float32: autocast would run their
    matmuls in bfloat16 (measured: a Linear's <g, G> 3e-3 off); the same float32 inputs give the same numbers."""
    from ray_dal.scoring.layers import handler_for

    torch.manual_seed(0)
    x, d = torch.randn(x_shape), torch.randn(d_shape)
    names = {n for n, _ in module.named_parameters()}
    G = {n: torch.randn_like(p) for n, p in module.named_parameters()}
    handler = handler_for(module)
    for method in ("ghost", "materialize"):
        plain = handler(module, x, d, names, G, method)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under_amp = handler(module, x, d, names, G, method)
        for a, b in zip(under_amp, plain):
            assert a.dtype == torch.float32 and torch.equal(a, b)
