"""Language-model parts: the causal Transformer, token windows, per-token losses, top-k payloads."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hvcodistill.comm.topk import topk_bytes, topk_payload, topk_teacher_logits
from hvcodistill.data.sharding import BatchPlan
from hvcodistill.data.tokens import pydoc_corpus, text_datasets, token_datasets
from hvcodistill.errors import ConfigError
from hvcodistill.losses import codistillation_loss, distillation_distance
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


def test_per_token_kl_matches_a_hand_computation():
    torch.manual_seed(1)
    s, t = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    temperature = 2.0
    expected = 0.0
    for b in range(2):
        for i in range(3):
            p = [math.exp(v / temperature) for v in t[b, i].tolist()]
            q = [math.exp(v / temperature) for v in s[b, i].tolist()]
            p, q = [v / sum(p) for v in p], [v / sum(q) for v in q]
            expected += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    expected = expected / 6 * temperature**2
    got = distillation_distance(s, t, distance="kl", temperature=temperature)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_per_token_task_loss_is_next_token_cross_entropy():
    torch.manual_seed(2)
    logits, targets = torch.randn(2, 4, 7), torch.randint(7, (2, 4))
    loss, parts = codistillation_loss(
        logits=logits, targets=targets, teacher_logits=[], alpha=1.0, distance="kl"
    )
    manual = (
        -sum(F.log_softmax(logits[b, i], -1)[targets[b, i]] for b in range(2) for i in range(4)) / 8
    )
    assert loss.item() == pytest.approx(manual.item(), rel=1e-6)
    assert parts["distill_loss"].item() == 0


@pytest.mark.parametrize("distance", ["kl", "ce", "mse"])
def test_topk_with_k_equal_to_the_vocabulary_equals_the_full_exchange(distance):
    torch.manual_seed(3)
    student = torch.randn(2, 5, 40, requires_grad=True)
    teacher = torch.randn(2, 5, 40) * 3
    values, indices = topk_payload(teacher, 40, torch.float32)
    rebuilt = topk_teacher_logits(values, indices, 40)
    if distance == "mse":
        # mse compares logits, and logits are defined up to a shift: the payload holds log-probs
        teacher = torch.log_softmax(teacher, -1)
    full = distillation_distance(student, teacher, distance=distance, temperature=2.0)
    top = distillation_distance(student, rebuilt, distance=distance, temperature=2.0)
    torch.testing.assert_close(top, full, rtol=1e-5, atol=1e-6)
    (g_full,) = torch.autograd.grad(full, student)
    (g_top,) = torch.autograd.grad(top, student)
    torch.testing.assert_close(g_top, g_full, rtol=1e-4, atol=1e-7)


def test_topk_keeps_the_top_and_spreads_the_rest_evenly():
    logits = torch.tensor([[4.0, 3.0, 0.0, -1.0, -2.0]])
    values, indices = topk_payload(logits, 2)
    assert values.dtype == torch.float16 and indices.dtype == torch.int32
    assert sorted(indices[0].tolist()) == [0, 1]
    p = topk_teacher_logits(values, indices, 5).exp()
    full = torch.softmax(logits, -1)
    assert p.sum().item() == pytest.approx(1.0, abs=1e-3)
    assert p[0, :2].tolist() == pytest.approx(full[0, :2].tolist(), rel=1e-3)
    rest = (1 - full[0, :2].sum()) / 3
    assert p[0, 2:].tolist() == pytest.approx([rest.item()] * 3, rel=1e-2)
    # a teacher sure of its top-k leaves no mass: the rest stays finite, not -inf or nan
    sure = topk_teacher_logits(*topk_payload(torch.tensor([[100.0, -100.0, -100.0]]), 1), 3)
    assert torch.isfinite(sure).all()
    assert topk_bytes(rows=8 * 1024, k=32) == 8 * 1024 * 32 * 6


def test_text_windows_are_a_pure_function_of_seed_epoch_and_indices(tmp_path):
    spec = text_datasets("", context=32, seed=5)
    assert spec.num_classes == 256 and spec.input_shape == (32,)
    corpus = np.frombuffer(pydoc_corpus(), dtype=np.uint8)
    assert len(spec.train) > 10_000
    idx = torch.tensor([3, 0, 7])
    x, y = spec.train.fetch(2, idx)
    again = text_datasets("", context=32, seed=5).train.fetch(2, idx)
    assert torch.equal(x, again[0]) and torch.equal(y, again[1])
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs, one later
    start = spec.train.starts(2, idx)[0]
    assert x[0].tolist() == corpus[start : start + 32].tolist()
    # another epoch shifts the tiling; another seed too
    assert spec.train.offset(2) != spec.train.offset(3) or spec.train.offset(
        2
    ) != spec.train.offset(4)
    assert not torch.equal(x, text_datasets("", context=32, seed=6).train.fetch(2, idx)[0])


def test_peers_read_identical_windows_and_a_resume_reads_the_same():
    """Predictions mode: group rank r of every model holds the same batch at every step, and the
    batch at step s depends on s alone (not on what ran before: a resume reads the same)."""
    spec = text_datasets("", context=16, seed=0)
    plans = [
        BatchPlan(
            n_samples=len(spec.train),
            batch_size=4,
            group_size=2,
            group_rank=1,
            n_models=3,
            model_id=m,
            order="shared",
            seed=0,
        )
        for m in range(3)
    ]
    for step in (0, 5, 1000):
        batches = [spec.train.fetch(*plan.key(step)) for plan in plans]
        assert all(torch.equal(b[0], batches[0][0]) for b in batches)
    fresh = BatchPlan(
        n_samples=len(spec.train),
        batch_size=4,
        group_size=2,
        group_rank=1,
        n_models=3,
        model_id=0,
        order="shared",
        seed=0,
    )
    assert torch.equal(
        spec.train.fetch(*fresh.key(1000))[0], spec.train.fetch(*plans[0].key(1000))[0]
    )


def write_tokens(root, dtype="uint16", vocab=1000, n=5000, top=None):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        arr = rng.integers(0, vocab, n).astype(dtype)
        if top is not None:
            arr[-1] = top
        arr.tofile(root / f"{split}.bin")
    (root / "meta.json").write_text(json.dumps({"dtype": dtype, "vocab_size": vocab}))


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_token_files(tmp_path, dtype):
    write_tokens(tmp_path / "d", dtype, vocab=70000 if dtype == "uint32" else 1000)
    spec = token_datasets(str(tmp_path / "d"), context=64, seed=0)
    x, y = spec.train.fetch(0, torch.arange(4))
    raw = np.fromfile(tmp_path / "d" / "train.bin", dtype=dtype)
    s = spec.train.starts(0, torch.arange(1))[0]
    assert x.dtype == torch.int64 and x[0].tolist() == raw[s : s + 64].tolist()
    assert spec.num_classes == (70000 if dtype == "uint32" else 1000)


@pytest.mark.parametrize(
    "problem, message",
    [
        ("no-meta", "meta.json: no such file"),
        ("bad-dtype", "dtype 'int8'"),
        ("id-too-large", "token id 1000 >= vocab_size 1000"),
        ("odd-size", "not a whole number of uint16 tokens"),
        ("too-short", "too short for model.context=64"),
    ],
)
def test_bad_token_files_are_named(tmp_path, problem, message):
    d = tmp_path / "d"
    write_tokens(
        d,
        n=100 if problem == "too-short" else 5000,
        top=1000 if problem == "id-too-large" else None,
    )
    if problem == "no-meta":
        (d / "meta.json").unlink()
    if problem == "bad-dtype":
        (d / "meta.json").write_text(json.dumps({"dtype": "int8", "vocab_size": 10}))
    if problem == "odd-size":
        with open(d / "val.bin", "ab") as f:
            f.write(b"\0")
    with pytest.raises(ConfigError, match=message):
        token_datasets(str(d), context=64, seed=0)


def test_text_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="a directory, not a file"):
        text_datasets(str(tmp_path), context=8, seed=0)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"caf\xe9 " * 100)
    with pytest.raises(ConfigError, match="not UTF-8"):
        text_datasets(str(bad), context=8, seed=0)


def test_token_rows_and_counts_match_a_brute_force_ensemble(tmp_path):
    """Two language models on the same windows: per-model and ensemble loss, accuracy and
    disagreement from the compact rows equal those from the full (n, T, V) probabilities (V = 12
    <= 16 candidates, so the ensemble's argmax is exact here)."""
    from hvcodistill.training.evaluate import token_counts, token_rows

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


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.name=transformer_lm"], "does not fit data.name=digits"),
        (["data.name=text"], "model.name=mlp does not fit data.name=text"),
        (
            ["data.name=text", "model.name=transformer_lm", "model.width=30", "model.heads=4"],
            "multiple of model.heads",
        ),
        (
            ["data.name=text", "model.name=transformer_lm", "model.context=0"],
            "model.context must be >= 1",
        ),
        (["codistill.topk=-1"], "codistill.topk must be >= 0"),
    ],
)
def test_language_model_config_errors_name_the_key(overrides, message):
    from hvcodistill.config import load_config

    with pytest.raises(ConfigError, match=message):
        load_config(None, ["train.steps=10", *overrides])


def test_top_k_payload_round_trip_through_the_exchange_packing():
    """What a peer unpacks from a top-k payload row is the rebuilt teacher, checksum intact."""
    from hvcodistill.comm.exchange import pack_topk, payload_checksum, unpack_topk

    torch.manual_seed(4)
    logits = torch.randn(3, 5, 50)
    row = pack_topk(logits, 8, "fp16", checksum=0xDEADBEEF)
    assert row.nbytes == 3 * 5 * 8 * (2 + 4) + 8
    assert payload_checksum(row) == 0xDEADBEEF
    got = unpack_topk(row, 8, "fp16", logits.shape, torch.device("cpu"))
    expected = topk_teacher_logits(*topk_payload(logits, 8, torch.float16), 50)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_gpt2_small_recipe_is_gpt2_small():
    """configs/lm_gpt2_small_codistill.yaml builds GPT-2 small (124 M parameters with the
    50257-token vocabulary, tied embeddings), in bf16, weights mode with a burn-in, for 16 GPUs."""
    from pathlib import Path

    from hvcodistill.config import load_config
    from hvcodistill.models import build_model

    cfg = load_config(
        str(Path(__file__).resolve().parents[1] / "configs" / "lm_gpt2_small_codistill.yaml")
    )
    with torch.device("meta"):
        model = build_model(
            cfg.model.name,
            input_shape=(cfg.model.context,),
            num_classes=50257,
            layers=cfg.model.layers,
            heads=cfg.model.heads,
            width=cfg.model.width,
        )
    n = sum(p.numel() for p in model.parameters())
    assert 124_000_000 < n < 125_000_000, n
    assert (
        cfg.train.amp == "bf16"
        and cfg.codistill.mode == "weights"
        and cfg.codistill.burn_in_steps > 0
    )
    assert cfg.train.device == "cuda" and cfg.data.name == "tokens"
