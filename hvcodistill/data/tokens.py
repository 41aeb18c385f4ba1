"""Token data for language models: batches of windows of `context` tokens and their next tokens.

- `tokens`: `data.path` is a directory with `train.bin` and `val.bin`, flat arrays of token ids as
  nanoGPT-style pipelines write them, and `meta.json` saying `{"dtype": "uint16" | "uint32",
  "vocab_size": V}`. The files are memory-mapped: nothing is read until a batch needs it.
- `text`: any UTF-8 file tokenised to its bytes (V = 256), the last 10% held out for validation.
  With no `data.path`, the corpus is the help text that ships inside every CPython
  (`pydoc_data.topics`, ~460 k characters): no download, the same bytes on every machine of one
  Python version.

Sample i of an epoch is the window starting at token `offset(epoch) + i * context`: the windows
of one epoch tile the split without overlap, shifted per epoch by an offset drawn from
(seed, epoch). A batch is therefore a pure function of (seed, epoch, indices), and BatchPlan makes
the indices a pure function of (seed, step, group rank): peers hold identical windows and a
resumed run reads exactly the windows it would have read.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from hvcodistill.data.base import Batch, BatchDataset, DataSpec, mix_seed
from hvcodistill.errors import ConfigError

TOKEN_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
TEXT_VAL_FRACTION = 0.1


class TokenWindowDataset(BatchDataset):
    """Windows of `context` tokens (inputs) and the same windows one token later (targets)."""

    def __init__(self, tokens: np.ndarray, *, context: int, seed: int) -> None:
        if len(tokens) < 2 * context + 1:
            raise ConfigError(
                f"a split of {len(tokens)} tokens is too short for model.context={context} "
                f"(need at least {2 * context + 1})"
            )
        self.tokens, self.context, self.seed = tokens, context, seed
        # one window's worth of slack, so that every epoch's shifted tiling has the same length
        self.size = (len(tokens) - 1 - context) // context

    def __len__(self) -> int:
        return self.size

    def offset(self, epoch: int) -> int:
        return mix_seed(self.seed, epoch) % self.context

    def starts(self, epoch: int, indices: torch.Tensor) -> np.ndarray:
        return self.offset(epoch) + indices.numpy().astype(np.int64) * self.context

    def fingerprint(self) -> bytes:
        """The tokens' content (data/fingerprint.py): all of them up to 64 MB, beyond that the size
        and 256 chunks of 256 KB spread evenly over the file (hashing a many-GB token file in full
        on every rank at every start would be slow)."""
        raw = self.tokens.view(np.uint8).reshape(-1)
        h = hashlib.blake2b(
            repr((self.tokens.dtype.str, len(self.tokens), self.context, self.seed)).encode(),
            digest_size=16,
        )
        if raw.nbytes <= 64 << 20:
            h.update(memoryview(np.ascontiguousarray(raw)))
        else:
            for start in np.linspace(0, raw.nbytes - (256 << 10), 256).astype(np.int64):
                h.update(memoryview(np.ascontiguousarray(raw[start : start + (256 << 10)])))
        return h.digest()

    def fetch(self, epoch: int, indices: torch.Tensor) -> Batch:
        rows = self.starts(epoch, indices)[:, None] + np.arange(self.context + 1)
        chunk = torch.from_numpy(self.tokens[rows].astype(np.int64))
        return chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()


def _spec(train: np.ndarray, val: np.ndarray, vocab_size: int, context: int, seed: int) -> DataSpec:
    return DataSpec(
        TokenWindowDataset(train, context=context, seed=seed),
        TokenWindowDataset(val, context=context, seed=seed),
        (context,),
        vocab_size,
        sequence=True,
    )


def pydoc_corpus() -> bytes:
    """CPython's own help text (`help('topics')`), in a fixed order."""
    from pydoc_data.topics import topics  # a large module: loaded only for this default corpus

    return "\n\n".join(topics[k] for k in sorted(topics)).encode("utf-8")


def text_datasets(path: str, *, context: int, seed: int) -> DataSpec:
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(
                f"data.path={path}: {'a directory, not a file' if p.is_dir() else 'no such file'} "
                "(data.name=text reads one UTF-8 file)"
            )
        raw = p.read_bytes()
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"data.path={path}: not UTF-8 text (byte {e.start})") from None
    else:
        raw = pydoc_corpus()
    tokens = np.frombuffer(raw, dtype=np.uint8)
    n_val = int(len(tokens) * TEXT_VAL_FRACTION)
    return _spec(tokens[:-n_val], tokens[-n_val:], 256, context, seed)


def token_datasets(path: str, *, context: int, seed: int) -> DataSpec:
    if not path:
        raise ConfigError(
            "data.path: data.name=tokens needs a directory with train.bin, val.bin and meta.json"
        )
    root = Path(path)
    meta_file = root / "meta.json"
    try:
        meta = json.loads(meta_file.read_text())
        dtype, vocab = meta["dtype"], meta["vocab_size"]
    except FileNotFoundError:
        raise ConfigError(
            f"{meta_file}: no such file; it must say "
            '{"dtype": "uint16" or "uint32", "vocab_size": V}'
        ) from None
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(
            f"{meta_file}: need a JSON object with dtype and vocab_size ({e})"
        ) from None
    if dtype not in TOKEN_DTYPES:
        raise ConfigError(f"{meta_file}: dtype {dtype!r}; choose one of {', '.join(TOKEN_DTYPES)}")
    if (
        isinstance(vocab, bool)
        or not isinstance(vocab, int)
        or not 2 <= vocab <= np.iinfo(TOKEN_DTYPES[dtype]).max + 1
    ):
        raise ConfigError(f"{meta_file}: vocab_size {vocab!r} does not fit dtype {dtype}")
    splits = {}
    for split in ("train", "val"):
        f = root / f"{split}.bin"
        if not f.is_file():
            raise ConfigError(f"{f}: no such file (flat {dtype} token ids)")
        if f.stat().st_size % np.dtype(TOKEN_DTYPES[dtype]).itemsize:
            raise ConfigError(
                f"{f}: {f.stat().st_size} bytes is not a whole number of {dtype} tokens"
            )
        splits[split] = np.memmap(f, dtype=TOKEN_DTYPES[dtype], mode="r")
    # ids at or above the vocabulary would index past the embedding: check the (small) validation
    # split fully and the training split's maximum in chunks, once
    for split, arr in splits.items():
        top = max(
            (int(arr[i : i + (1 << 24)].max()) for i in range(0, len(arr), 1 << 24)), default=0
        )
        if top >= vocab:
            raise ConfigError(
                f"{root / (split + '.bin')}: token id {top} >= vocab_size {vocab} in {meta_file}"
            )
    return _spec(splits["train"], splits["val"], vocab, context, seed)


__all__ = ["TokenWindowDataset", "pydoc_corpus", "text_datasets", "token_datasets"]
