"""Synthetic tasks of the paper's Appendix D, scaled for CPU, deterministic from the run seed.

Each task is a ``Task`` with ``batch(step) -> (inputs, targets)`` and ``loss(logits, targets)``,
plus ``marginal_loss``: the cross-entropy of the best context-free predictor (the entropy of the
target's marginal distribution), used by the trainer's ``collapsed`` label.

associative_recall (D.1)
    ``k1 v1 k2 v2 … kP vP  f f … f  q``: P key–value pairs (keys from [4, V/2), values from
    [V/2, V), keys distinct), filler tokens from [4, V/2) up to length T−1, then a query key ``q``
    drawn from the P keys. Target: the value paired with ``q``. Loss: cross-entropy on the
    last-position logits only, ``F.cross_entropy(logits[:, -1, :], y)``.
synthetic_lm (D.2)
    Sequences built by concatenating segments until length T+1, then truncated: repetition
    (a pattern of length 2–5 repeated 2–4 times), sequential (a contiguous integer run of length
    5–15, wrapping within the range) and random (i.i.d. tokens, length 5–15), each segment type
    equally likely. Tokens from [4, V) (ids 0–3 are reserved, as in the paper). Next-token
    cross-entropy over every position.

Data: ``n_train`` sequences generated once from the run seed (numpy ``default_rng``), batches drawn
from them with a second stream of the same seed, so a run is fully reproducible.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

TASKS = ("assoc_recall", "synthetic_lm")
RESERVED = 4  # token ids 0..3 are kept free for special tokens


def associative_recall_data(
    rng: np.random.Generator, n: int, seq_len: int = 64, vocab_size: int = 256, n_pairs: int = 4,
) -> tuple[np.ndarray, np.ndarray]:
    """``(inputs, targets)`` of shapes (n, seq_len) and (n,), as described in the module doc."""
    half = vocab_size // 2
    if seq_len < 2 * n_pairs + 1:
        raise ValueError(f"seq_len must be at least 2*n_pairs+1={2 * n_pairs + 1}, got {seq_len}")
    if half - RESERVED < n_pairs:
        raise ValueError(f"vocab_size {vocab_size} too small for {n_pairs} distinct keys")
    keys = np.stack([rng.choice(np.arange(RESERVED, half), n_pairs, replace=False)
                     for _ in range(n)])                               # (n, P)
    values = rng.integers(half, vocab_size, size=(n, n_pairs))         # (n, P)
    x = rng.integers(RESERVED, half, size=(n, seq_len))                # filler everywhere first
    x[:, 0:2 * n_pairs:2] = keys
    x[:, 1:2 * n_pairs:2] = values
    which = rng.integers(0, n_pairs, size=n)
    x[:, -1] = keys[np.arange(n), which]
    y = values[np.arange(n), which]
    return x.astype(np.int64), y.astype(np.int64)


def synthetic_lm_data(
    rng: np.random.Generator, n: int, seq_len: int = 64, vocab_size: int = 256,
) -> np.ndarray:
    """Token sequences of shape (n, seq_len + 1) (inputs are ``[:, :-1]``, targets ``[:, 1:]``)."""
    lo, span = RESERVED, vocab_size - RESERVED
    out = np.empty((n, seq_len + 1), dtype=np.int64)
    for i in range(n):
        toks: list[int] = []
        while len(toks) < seq_len + 1:
            kind = rng.integers(3)
            if kind == 0:    # repetition
                pat = rng.integers(lo, vocab_size, size=rng.integers(2, 6)).tolist()
                toks += pat * int(rng.integers(2, 5))
            elif kind == 1:  # sequential run, wrapping inside [lo, V)
                start, length = int(rng.integers(0, span)), int(rng.integers(5, 16))
                toks += [lo + (start + j) % span for j in range(length)]
            else:            # random
                toks += rng.integers(lo, vocab_size, size=rng.integers(5, 16)).tolist()
        out[i] = toks[: seq_len + 1]
    return out


@dataclass
class Task:
    """A generated training set and its loss. Build with ``make_task``."""

    name: str
    inputs: torch.Tensor    # (n, T)
    targets: torch.Tensor   # (n,) for recall, (n, T) for LM
    batch_size: int
    seed: int
    marginal_loss: float
    uniform_loss: float

    def __post_init__(self) -> None:
        self._gen = torch.Generator().manual_seed(self.seed + 1)

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next random mini-batch ``(inputs (B, T), targets)``."""
        idx = torch.randint(0, self.inputs.shape[0], (self.batch_size,), generator=self._gen)
        return self.inputs[idx], self.targets[idx]

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.name == "assoc_recall":
            return F.cross_entropy(logits[:, -1, :], targets)                      # last position
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def make_task(
    name: str, *, seed: int, seq_len: int = 64, vocab_size: int = 256, batch_size: int = 16,
    n_train: int = 2048, n_pairs: int = 4,
) -> Task:
    """Generate ``n_train`` examples of task ``name`` deterministically from ``seed``."""
    rng = np.random.default_rng(seed)
    if name == "assoc_recall":
        x, y = associative_recall_data(rng, n_train, seq_len, vocab_size, n_pairs)
        marginal = math.log(vocab_size - vocab_size // 2)  # values uniform on [V/2, V)
        inputs, targets = torch.from_numpy(x), torch.from_numpy(y)
    elif name == "synthetic_lm":
        s = synthetic_lm_data(rng, n_train, seq_len, vocab_size)
        marginal = math.log(vocab_size - RESERVED)         # tokens ≈ uniform on [4, V)
        inputs, targets = torch.from_numpy(s[:, :-1].copy()), torch.from_numpy(s[:, 1:].copy())
    else:
        raise ValueError(f"task must be one of {TASKS}, got {name!r}")
    return Task(name=name, inputs=inputs, targets=targets, batch_size=batch_size, seed=seed,
                marginal_loss=marginal, uniform_loss=math.log(vocab_size))
