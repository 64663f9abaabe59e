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

text_bytes (corpus-v3, ours)
    A byte-level language model on real English text that ships with CPython, so every machine
    has it without a download: the help topics of ``pydoc_data.topics.topics`` (the text of the
    Python language reference), topics in sorted key order joined by newlines, UTF-8 encoded
    (466,195 bytes under Python 3.11.7, sha256 ``TEXT_SHA256``; another Python's text differs and
    is refused, so a corpus never mixes texts). The first 90% of the bytes are the training split,
    the last 10% the held-out split. Batches are random windows of seq_len + 1 bytes of the
    training split. ``marginal_loss`` = the entropy (nats) of the byte unigram distribution of the
    training split (the best context-free predictor); vocab 256.

Data: ``n_train`` sequences generated once from the run seed (numpy ``default_rng``), batches drawn
from them with a second stream of the same seed, so a run is fully reproducible (text_bytes: the
windows are drawn by that stream). Every task also has a fixed held-out set (``eval_set``): fresh
sequences from a separate stream of the seed (``default_rng([seed, 1])``), or for text_bytes
windows of the held-out split at evenly spaced offsets. It does not depend on the training stream,
so a run evaluated after h steps and a separate h-step run see the same held-out batches.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

TASKS = ("assoc_recall", "synthetic_lm", "text_bytes")
#: sha256 of the text_bytes corpus (pydoc_data.topics of Python 3.11.7)
TEXT_SHA256 = "2a95af4ac93f5b719944030ce3769070ddf827d847cba42192afa8da989e5dc4"
TEXT_NAME = "pydoc_data.topics.topics (CPython 3.11.7 help topics), sorted keys, newline-joined, UTF-8"
TEXT_TRAIN_FRACTION = 0.9
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


@functools.lru_cache(maxsize=1)
def text_bytes() -> np.ndarray:
    """The bytes of the text_bytes corpus, shape (n_bytes,) uint8; ValueError if this Python's text
    is not the one recorded (``TEXT_SHA256``)."""
    import hashlib

    from pydoc_data.topics import topics

    raw = "\n".join(topics[k] for k in sorted(topics)).encode("utf-8")
    digest = hashlib.sha256(raw).hexdigest()
    if digest != TEXT_SHA256:
        raise ValueError(f"text_bytes: this Python's pydoc_data.topics has sha256 {digest}, "
                         f"not the recorded {TEXT_SHA256} (another Python version?)")
    return np.frombuffer(raw, dtype=np.uint8)


def unigram_entropy(data: np.ndarray, vocab_size: int = 256) -> float:
    """Entropy in nats of the symbol frequencies of ``data`` (shape (n,), ints < vocab_size)."""
    counts = np.bincount(data.astype(np.int64), minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


class TextTask:
    """text_bytes: random training windows, a fixed held-out set (module doc)."""

    name = "text_bytes"

    def __init__(self, seed: int, seq_len: int, batch_size: int):
        data = text_bytes()
        cut = int(TEXT_TRAIN_FRACTION * len(data))
        self.train_data = torch.from_numpy(data[:cut].astype(np.int64))          # (n_train,)
        self.heldout_data = torch.from_numpy(data[cut:].astype(np.int64))        # (n_heldout,)
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.marginal_loss = unigram_entropy(data[:cut])
        self.uniform_loss = math.log(256)
        self._gen = torch.Generator().manual_seed(seed + 1)
        self._offsets = torch.arange(seq_len + 1)                                 # (T+1,)

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs (B, T), targets (B, T))``: random windows of the training split."""
        start = torch.randint(0, len(self.train_data) - self.seq_len - 1, (self.batch_size,),
                              generator=self._gen)
        w = self.train_data[start[:, None] + self._offsets]                      # (B, T+1)
        return w[:, :-1], w[:, 1:]

    def eval_set(self, n_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``n_batches`` held-out batches: windows at evenly spaced offsets of the held-out split."""
        n = n_batches * self.batch_size
        start = torch.linspace(0, len(self.heldout_data) - self.seq_len - 2, n).round().long()
        w = self.heldout_data[start[:, None] + self._offsets]                    # (n, T+1)
        return [(w[i:i + self.batch_size, :-1], w[i:i + self.batch_size, 1:])
                for i in range(0, n, self.batch_size)]

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


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

    heldout: tuple[torch.Tensor, torch.Tensor] | None = None   # (n_eval, T) and targets

    def __post_init__(self) -> None:
        self._gen = torch.Generator().manual_seed(self.seed + 1)

    def eval_set(self, n_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The first ``n_batches`` batches of the fixed held-out set (module doc)."""
        x, y = self.heldout
        n = n_batches * self.batch_size
        if n > x.shape[0]:
            raise ValueError(f"eval set holds {x.shape[0]} examples, {n} asked for")
        return [(x[i:i + self.batch_size], y[i:i + self.batch_size]) for i in range(0, n, self.batch_size)]

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
    n_train: int = 2048, n_pairs: int = 4, n_eval: int = 0,
) -> Task | TextTask:
    """Generate ``n_train`` examples of task ``name`` deterministically from ``seed`` (and, with
    ``n_eval``, that many held-out examples from a separate stream)."""
    if name == "text_bytes":
        if vocab_size != 256:
            raise ValueError(f"text_bytes needs vocab_size 256, got {vocab_size}")
        return TextTask(seed=seed, seq_len=seq_len, batch_size=batch_size)
    rng = np.random.default_rng(seed)
    held = np.random.default_rng([seed, 1])
    heldout = None
    if name == "assoc_recall":
        x, y = associative_recall_data(rng, n_train, seq_len, vocab_size, n_pairs)
        marginal = math.log(vocab_size - vocab_size // 2)  # values uniform on [V/2, V)
        inputs, targets = torch.from_numpy(x), torch.from_numpy(y)
        if n_eval:
            hx, hy = associative_recall_data(held, n_eval, seq_len, vocab_size, n_pairs)
            heldout = (torch.from_numpy(hx), torch.from_numpy(hy))
    elif name == "synthetic_lm":
        s = synthetic_lm_data(rng, n_train, seq_len, vocab_size)
        marginal = math.log(vocab_size - RESERVED)         # tokens ≈ uniform on [4, V)
        inputs, targets = torch.from_numpy(s[:, :-1].copy()), torch.from_numpy(s[:, 1:].copy())
        if n_eval:
            h = synthetic_lm_data(held, n_eval, seq_len, vocab_size)
            heldout = (torch.from_numpy(h[:, :-1].copy()), torch.from_numpy(h[:, 1:].copy()))
    else:
        raise ValueError(f"task must be one of {TASKS}, got {name!r}")
    return Task(name=name, inputs=inputs, targets=targets, batch_size=batch_size, seed=seed,
                marginal_loss=marginal, uniform_loss=math.log(vocab_size), heldout=heldout)
