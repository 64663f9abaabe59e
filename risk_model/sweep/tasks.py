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

digits (corpus-v3, ours)
    Image classification for the image family (``vit``) on scikit-learn's handwritten digits,
    which ship with scikit-learn, so every machine has them without a download: the file
    ``sklearn/datasets/data/digits.csv.gz`` that ``sklearn.datasets.load_digits`` reads (57,523
    bytes, sha256 ``DIGITS_SHA256``; a missing or changed file is refused, naming it), 1797 images
    of 8×8 pixels with values 0–16, scaled to [0, 1] (÷ 16), and their labels 0–9. The file's
    first 80% of the images (1437) are the training split, the last 20% (360) the held-out split
    (a fixed split, the same for every seed). Batches are ``(images (B, 8, 8) float32, labels
    (B,))`` drawn with replacement from the training split; the loss is the cross-entropy of the
    class logits (B, 10). ``marginal_loss`` = the entropy (nats) of the training split's label
    frequencies (≈ ln 10: the best predictor that ignores the image); ``uniform_loss`` = ln 10.

Data: ``n_train`` sequences generated once from the run seed (numpy ``default_rng``), batches drawn
from them with a second stream of the same seed, so a run is fully reproducible (text_bytes: the
windows are drawn by that stream). Every task also has a fixed held-out set (``eval_set``): fresh
sequences from a separate stream of the seed (``default_rng([seed, 1])``), or for text_bytes
windows of the held-out split at evenly spaced offsets, for digits the held-out images in order.
It does not depend on the training stream, so a run evaluated after h steps and a separate h-step
run see the same held-out batches.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from risk_model.lrmodel import IMAGE_TASKS

TASKS = ("assoc_recall", "synthetic_lm", "text_bytes", "digits")
# IMAGE_TASKS: the image tasks, for the image families only (``archs.IMAGE_FAMILIES``); their home
# is the predictor's features, which read them too
#: sha256 of the text_bytes corpus (pydoc_data.topics of Python 3.11.7)
TEXT_SHA256 = "2a95af4ac93f5b719944030ce3769070ddf827d847cba42192afa8da989e5dc4"
TEXT_NAME = "pydoc_data.topics.topics (CPython 3.11.7 help topics), sorted keys, newline-joined, UTF-8"
TEXT_TRAIN_FRACTION = 0.9
#: sha256 of sklearn/datasets/data/digits.csv.gz (scikit-learn 1.9.1; the file dates from 2011)
DIGITS_SHA256 = "09f66e6debdee2cd2b5ae59e0d6abbb73fc2b0e0185d2e1957e9ebb51e23aa22"
DIGITS_HELDOUT_FRACTION = 0.2
DIGITS_CLASSES = 10
DIGITS_IMAGES = 1797    # images in the recorded file
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

    try:
        import pydoc_data.topics as mod
    except ImportError:
        raise ValueError("text_bytes: this Python has no pydoc_data/topics.py (the text of the task) "
                         "to read") from None
    topics = mod.topics
    raw = "\n".join(topics[k] for k in sorted(topics)).encode("utf-8")
    digest = hashlib.sha256(raw).hexdigest()
    if digest != TEXT_SHA256:
        raise ValueError(f"text_bytes: {mod.__file__} gives text with sha256 {digest}, "
                         f"not the recorded {TEXT_SHA256} (another Python version?)")
    return np.frombuffer(raw, dtype=np.uint8)


def digits_file():
    """Path of the digits data file inside the installed scikit-learn (it may be missing)."""
    from pathlib import Path

    import sklearn.datasets

    return Path(sklearn.datasets.__file__).parent / "data" / "digits.csv.gz"


def digits_data() -> tuple[np.ndarray, np.ndarray]:
    """``(images (1797, 8, 8) float32 in [0, 1], labels (1797,) int64)`` read from ``digits_file()``;
    ValueError naming the file if it is missing, unreadable or not the one recorded
    (``DIGITS_SHA256``)."""
    return _digits_arrays(str(digits_file()))


@functools.lru_cache(maxsize=4)
def _digits_arrays(path: str) -> tuple[np.ndarray, np.ndarray]:
    import gzip
    import hashlib
    import io

    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as e:
        raise ValueError(f"digits: cannot read the data file {path}: {e.strerror or e}") from None
    digest = hashlib.sha256(raw).hexdigest()
    if digest != DIGITS_SHA256:
        raise ValueError(f"digits: the data file {path} has sha256 {digest}, not the recorded "
                         f"{DIGITS_SHA256} (changed, or another scikit-learn?)")
    data = np.loadtxt(io.BytesIO(gzip.decompress(raw)), delimiter=",")   # (1797, 65)
    images = (data[:, :-1] / 16.0).astype(np.float32).reshape(-1, 8, 8)   # (n, 8, 8)
    labels = data[:, -1].astype(np.int64)                                 # (n,)
    images.flags.writeable = labels.flags.writeable = False               # shared by the cache
    return images, labels


def check_task_data(name: str) -> None:
    """Refuse, before any run, a task whose data file is missing or changed (ValueError, one
    line naming the file); nothing to check for the generated tasks."""
    if name == "text_bytes":
        text_bytes()
    elif name == "digits":
        digits_data()


def unigram_entropy(data: np.ndarray, vocab_size: int = 256) -> float:
    """Entropy in nats of the symbol frequencies of ``data`` (shape (n,), ints < vocab_size): the
    task's marginal loss, by the one rule of ``detector.marginal_loss``."""
    from ..detector import marginal_loss

    return marginal_loss(data, vocab_size)


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


class DigitsTask:
    """digits: random training images, the fixed held-out split (module doc)."""

    name = "digits"

    def __init__(self, seed: int, batch_size: int):
        images, labels = digits_data()                                   # (n, 8, 8), (n,)
        cut = _digits_cut(len(labels))
        self.train_x = torch.from_numpy(images[:cut].copy())             # (n_train, 8, 8)
        self.train_y = torch.from_numpy(labels[:cut].copy())             # (n_train,)
        self.heldout_x = torch.from_numpy(images[cut:].copy())           # (n_heldout, 8, 8)
        self.heldout_y = torch.from_numpy(labels[cut:].copy())           # (n_heldout,)
        self.batch_size, self.seed = batch_size, seed
        self.marginal_loss = unigram_entropy(labels[:cut], DIGITS_CLASSES)
        self.uniform_loss = math.log(DIGITS_CLASSES)
        self._gen = torch.Generator().manual_seed(seed + 1)

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images (B, 8, 8), labels (B,))`` drawn with replacement from the training split."""
        idx = torch.randint(0, len(self.train_y), (self.batch_size,), generator=self._gen)  # (B,)
        return self.train_x[idx], self.train_y[idx]

    def eval_set(self, n_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The first ``n_batches`` batches of the held-out split, in file order."""
        n = n_batches * self.batch_size
        if n > len(self.heldout_y):
            raise ValueError(f"digits holds {len(self.heldout_y)} held-out images, {n} asked for")
        return [(self.heldout_x[i:i + self.batch_size], self.heldout_y[i:i + self.batch_size])
                for i in range(0, n, self.batch_size)]

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, targets)   # logits (B, C), targets (B,)


def _digits_cut(n: int) -> int:
    """Training images of ``n``: the first 80% (1437 of 1797), the rest held out."""
    return int((1 - DIGITS_HELDOUT_FRACTION) * n)


def digits_heldout_size() -> int:
    """Images in the digits held-out split (of the recorded file, without reading it): 360."""
    return DIGITS_IMAGES - _digits_cut(DIGITS_IMAGES)


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
) -> Task | TextTask | DigitsTask:
    """Generate ``n_train`` examples of task ``name`` deterministically from ``seed`` (and, with
    ``n_eval``, that many held-out examples from a separate stream). ``digits`` reads its data
    file and ignores ``seq_len``, ``vocab_size``, ``n_train`` and ``n_eval``."""
    if name == "digits":
        return DigitsTask(seed=seed, batch_size=batch_size)
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
