"""Classifiers used in the paper, and a registry for models users bring.

`build_model(name, num_classes, in_channels=3)` builds one of:

- ``"cnn"``: the authors' LeNet-like net (conv 3->6 k5, pool, conv 6->16 k5, pool, fc 400-120-84-K),
  about 62k parameters for 32x32 inputs, no BatchNorm.
- ``"resnet18"``: CIFAR ResNet18 (3x3 stem, no max-pool, 64-512 channels), 11.2M parameters.
- ``"vgg11"``: VGG11 with BatchNorm and a single 512-K classifier, as in BADGE's code.
- ``"resnet18_imagenet"``: torchvision's ImageNet ResNet18 (7x7 stride-2 stem, max-pool), untrained
  (``weights=None``): the paper's Caltech101 model at 299x299, trained from scratch.

Every model maps ``[B, in_channels, H, W]`` float inputs to ``[B, num_classes]`` logits and ends in an
``nn.Linear`` (what ``scope="last"`` scoring uses). Any other ``torch.nn.Module`` works with the
scoring engine directly; `register_model` makes it buildable by name (from configs and jobs).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

ModelFactory = Callable[[int, int], nn.Module]
_REGISTRY: dict[str, ModelFactory] = {}


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator: register ``factory(num_classes, in_channels) -> nn.Module`` under ``name``."""

    def wrap(factory: ModelFactory) -> ModelFactory:
        if name in _REGISTRY:
            raise ValueError(f"a model named {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return wrap


def available_models() -> list[str]:
    return sorted(_REGISTRY)


def build_model(name: str | nn.Module, num_classes: int, in_channels: int = 3) -> nn.Module:
    """Build a registered model by name; an ``nn.Module`` passed as ``name`` is returned as is."""
    if isinstance(name, nn.Module):
        return name
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown model {name!r}; choose one of {available_models()} "
            "or register your own with ray_dal.models.register_model"
        )
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    return _REGISTRY[name](num_classes, in_channels)


class LeNet(nn.Module):
    def __init__(self, num_classes: int, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.adaptive_avg_pool2d(x, 5).flatten(1)  # identity for 32x32 inputs
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    def __init__(self, num_classes: int, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        layers, in_planes = [], 64
        for planes, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            layers.append(nn.Sequential(BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes, 1)))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.linear(F.adaptive_avg_pool2d(x, 1).flatten(1))


class VGG11(nn.Module):
    CFG = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]

    def __init__(self, num_classes: int, in_channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for v in self.CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)
        return self.classifier(x)


register_model("cnn")(LeNet)
register_model("resnet18")(ResNet18)
register_model("vgg11")(VGG11)


@register_model("resnet18_imagenet")
def resnet18_imagenet(num_classes: int, in_channels: int = 3) -> nn.Module:
    from torchvision.models import resnet18  # imported here: torchvision is slow to import and only this needs it

    model = resnet18(weights=None, num_classes=num_classes)
    if in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model
