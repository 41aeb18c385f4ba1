"""Builders shared by training and the plain reference loop: data, model, optimizer, step count.

A name maps to a builder in one place; config validation reads these registries.
"""

from __future__ import annotations

import torch

# optim.name -> how the optimizer is built from the model's parameters and the config's optim.*
OPTIMIZERS = {
    "sgd": lambda params, o, lr: torch.optim.SGD(
        params, lr=lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay
    ),
    "adamw": lambda params, o, lr: torch.optim.AdamW(params, lr=lr, weight_decay=o.weight_decay),
}
