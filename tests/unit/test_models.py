"""Models build by name and map (N, *input_shape) to (N, num_classes) logits."""

import pytest
import torch
from torch import nn

from hvcodistill.config import load_config
from hvcodistill.errors import ConfigError
from hvcodistill.models import MODEL_NAMES, build_model

# (name, input_shape, batch): the torchvision models are big, so they get 3x32x32 and batch 2.
CASES = [
    ("mlp", (1, 8, 8), 4),
    ("cnn", (1, 8, 8), 4),
    ("cnn", (3, 16, 12), 4),
    ("resnet18_cifar", (3, 32, 32), 2),
    ("resnet18_cifar", (1, 8, 8), 2),
    ("resnet50", (3, 32, 32), 2),
    ("resnet50", (1, 32, 32), 2),
    ("resnext101_32x8d", (3, 32, 32), 2),
]


def test_every_name_is_covered():
    # transformer_lm maps token windows to (N, T, V) logits: test_transformer.py covers it
    assert {name for name, _, _ in CASES} | {"transformer_lm"} == set(MODEL_NAMES)


@pytest.mark.parametrize("name,shape,batch", CASES)
def test_logits_shape(name, shape, batch):
    torch.manual_seed(0)
    model = build_model(name, input_shape=shape, num_classes=7).eval()
    with torch.no_grad():
        logits = model(torch.randn(batch, *shape))
    assert logits.shape == (batch, 7)
    assert torch.isfinite(logits).all()


def test_mlp_hidden_sizes():
    model = build_model("mlp", input_shape=(2, 5), num_classes=3, hidden=[16, 8, 4])
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(10, 16), (16, 8), (8, 4), (4, 3)]
    no_hidden = build_model("mlp", input_shape=(2, 5), num_classes=3, hidden=[])
    assert [m.out_features for m in no_hidden.modules() if isinstance(m, nn.Linear)] == [3]


def test_resnet18_cifar_keeps_resolution_in_stem():
    model = build_model("resnet18_cifar", input_shape=(3, 32, 32), num_classes=10)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    assert [len(layer) for layer in (model.layer1, model.layer2, model.layer3, model.layer4)] == [
        2,
        2,
        2,
        2,
    ]


def test_unknown_name():
    with pytest.raises(ConfigError, match="model.name") as err:
        build_model("vgg", input_shape=(3, 32, 32), num_classes=10)
    assert "resnet50" in str(err.value)


def test_image_models_need_chw():
    with pytest.raises(ConfigError, match="model.name"):
        build_model("cnn", input_shape=(64,), num_classes=10)


def test_dropout_option_and_its_range():
    m = build_model("mlp", input_shape=(1, 8, 8), num_classes=10, hidden=[16, 8], dropout=0.5)
    assert [type(layer).__name__ for layer in m].count("Dropout") == 2
    plain = build_model("mlp", input_shape=(1, 8, 8), num_classes=10, hidden=[16, 8])
    assert "Dropout" not in [type(layer).__name__ for layer in plain]
    assert load_config(None, ["model.dropout=0.3", "train.steps=1"]).model.dropout == 0.3
    for bad in (
        ["model.dropout=1"],
        ["model.dropout=-0.1"],
        ["model.dropout=.nan"],
        ["model.dropout=0.2", "model.name=cnn"],
    ):
        with pytest.raises(ConfigError, match="model.dropout"):
            load_config(None, [*bad, "train.steps=1"])
