"""The causal Transformer (models/transformer.py): causal, tied embeddings, bad shapes refused."""

import pytest
import torch

from hvcodistill.errors import ConfigError
from hvcodistill.models.transformer import TransformerLM


def lm(**kw):
    torch.manual_seed(0)
    return TransformerLM(vocab_size=50, context=16, layers=2, heads=2, width=32, **kw).eval()


def test_model_is_causal_and_ties_embeddings():
    model = lm()
    x = torch.randint(50, (3, 16))
    changed = x.clone()
    changed[:, 9:] = (changed[:, 9:] + 7) % 50  # change every token from position 9 on
    a, b = model(x), model(changed)
    assert a.shape == (3, 16, 50)
    torch.testing.assert_close(a[:, :9], b[:, :9], rtol=0, atol=1e-6)  # earlier logits unchanged
    assert not torch.allclose(a[:, 9:], b[:, 9:])  # later ones see the change
    assert model.head.weight is model.tok.weight


def test_model_rejects_bad_shapes():
    with pytest.raises(ConfigError, match="model.width=30 must be a multiple of model.heads=4"):
        TransformerLM(vocab_size=50, context=8, heads=4, width=30)
    with pytest.raises(ConfigError, match="model.layers"):
        TransformerLM(vocab_size=50, context=8, layers=True)
    with pytest.raises(ValueError, match="longer than the context"):
        lm()(torch.zeros(1, 17, dtype=torch.long))
