"""Models by name. Pure PyTorch: no MPI, no Horovod, no downloads (weights=None everywhere)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from hvcodistill.errors import ConfigError
from hvcodistill.models.transformer import TransformerLM

MODEL_NAMES = ("mlp", "cnn", "resnet18_cifar", "resnet50", "resnext101_32x8d", "transformer_lm")


def build_model(
    name: str,
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    hidden: Sequence[int] = (128,),
    dropout: float = 0.0,
    layers: int = 2,
    heads: int = 4,
    width: int = 128,
) -> nn.Module:
    """Return a freshly initialised model mapping (N, *input_shape) to logits (N, num_classes).
    `dropout` (the MLP only) follows each hidden layer; its masks come from torch's global RNG."""
    if name not in MODEL_NAMES:
        raise ConfigError(
            f"model.name: unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}"
        )
    input_shape = tuple(int(d) for d in input_shape)
    if name == "transformer_lm":
        # token windows of input_shape = (context,), a vocabulary of num_classes: logits (N, T, V)
        return TransformerLM(
            vocab_size=num_classes,
            context=input_shape[0],
            layers=layers,
            heads=heads,
            width=width,
            dropout=dropout,
        )
    if name == "mlp":
        return _mlp(math.prod(input_shape), list(hidden), num_classes, dropout)
    if len(input_shape) != 3 or min(input_shape[1:]) < (8 if name == "cnn" else 1):
        raise ConfigError(
            f"model.name: {name!r} needs a (C, H, W) input of at least 8x8, got shape {input_shape}"
        )
    channels = input_shape[0]
    if name == "cnn":
        return _cnn(channels, num_classes)
    if name == "resnet18_cifar":
        return _resnet18_cifar(channels, num_classes)
    import torchvision  # over a second of start-up on every rank: the ResNets only

    model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
    if channels != 3:  # torchvision's stem assumes RGB
        model.conv1 = _stem_conv(channels, kernel_size=7, stride=2)
    return model


def _mlp(in_features: int, hidden: list[int], num_classes: int, dropout: float = 0.0) -> nn.Module:
    if any(int(h) < 1 for h in hidden):
        raise ConfigError(f"model.hidden: sizes must be positive integers, got {hidden}")
    layers: list[nn.Module] = [nn.Flatten()]
    for size in hidden:
        layers += [nn.Linear(in_features, int(size)), nn.ReLU(inplace=True)]
        if dropout:
            layers.append(nn.Dropout(dropout))
        in_features = int(size)
    layers.append(nn.Linear(in_features, num_classes))
    return nn.Sequential(*layers)


def _conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
    # bias=False: the BatchNorm that follows has its own shift.
    return [
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]


def _cnn(channels: int, num_classes: int) -> nn.Module:
    """Small enough for CPU demos; adaptive pooling makes it work for any H, W >= 8."""
    return nn.Sequential(
        *_conv_bn_relu(channels, 32),
        *_conv_bn_relu(32, 64, stride=2),
        *_conv_bn_relu(64, 64),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, num_classes),
    )


def _stem_conv(channels: int, *, kernel_size: int, stride: int) -> nn.Conv2d:
    conv = nn.Conv2d(channels, 64, kernel_size, stride=stride, padding=kernel_size // 2, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")  # as torchvision does
    return conv


def _resnet18_cifar(channels: int, num_classes: int) -> nn.Module:
    """ResNet-18 for 32x32 inputs: torchvision's blocks with a 3x3 stride-1 stem and no max-pool,
    so small images are not downsampled 4x before the first block."""
    from torchvision.models.resnet import BasicBlock, ResNet  # start-up time: see build_model

    model = ResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes)
    model.conv1 = _stem_conv(channels, kernel_size=3, stride=1)
    model.maxpool = nn.Identity()
    return model


__all__ = ["MODEL_NAMES", "build_model"]
