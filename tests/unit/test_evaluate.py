"""Evaluation (training/evaluate.py): a language model's compact per-token rows and counts."""

import numpy as np
import pytest
import torch

from hvcodistill.data.tokens import token_datasets
from hvcodistill.models.transformer import TransformerLM
from hvcodistill.training.evaluate import token_counts, token_rows
from tests.unit.test_tokens import write_tokens


def test_token_rows_and_counts_match_a_brute_force_ensemble(tmp_path):
    """Two language models on the same windows: per-model and ensemble loss, accuracy and
    disagreement from the compact rows equal those from the full (n, T, V) probabilities (V = 12
    <= 16 candidates, so the ensemble's argmax is exact here)."""
    write_tokens(tmp_path / "d", vocab=12, n=3000)
    val = token_datasets(str(tmp_path / "d"), context=16, seed=0).val
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(TransformerLM(vocab_size=12, context=16, layers=1, heads=2, width=16).eval())
    idx = torch.arange(0, len(val), 2)
    every = np.stack(
        [token_rows(mod, val, idx, device=torch.device("cpu"), batch_size=7) for mod in models]
    )
    x, y = val.fetch(0, idx)
    with torch.no_grad():
        probs = torch.stack([torch.softmax(mod(x), -1).flatten(0, 1).double() for mod in models])
    y = y.flatten()
    for model_id in (0, 1):
        nll, correct, ens_nll, ens_correct, disagree, n = token_counts(every, model_id)
        n = int(n)
        assert n == len(y)
        assert nll == pytest.approx(
            -probs[model_id, torch.arange(n), y].log().sum().item(), rel=1e-5
        )
        assert correct == (probs[model_id].argmax(-1) == y).sum().item()
        ens = probs.mean(0)
        assert ens_nll == pytest.approx(-ens[torch.arange(n), y].log().sum().item(), rel=1e-5)
        assert ens_correct == (ens.argmax(-1) == y).sum().item()
        assert disagree == (probs[0].argmax(-1) != probs[1].argmax(-1)).sum().item()
