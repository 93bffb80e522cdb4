"""Seed 000's MNIST image-sequence tasks (iterativenn.utils.DatasetUtils), built offline.

The seed's conf/data files `baseline_addition`, `both_random` and `both_uniform` say `dataset: MNIST`
and compose a `sequence_type` (their Hydra `defaults`). MNIST is a download a worker cannot make, so, as
for RandomAnomaly (anomaly.py), the digits are scikit-learn's bundled 8x8 ones upscaled to the seed's
50x50 (2500 inputs, what their description models read), under the same named transforms
(`anomaly.transform`: baseline, perspective_small, perspective, erase, noise, both, ...), normalised
with MNIST's mean/std. Sequence types, as the seed's classes build them:

- `uniform` (ImageSequence): one image, transformed once, shown k times, k uniform in
  [min_copies, max_copies]; its label at every step (`evaluate_loss: all`) or only the last.
- `random` (RandomImageSequence): k different images of the same digit, each transformed.
- `addition` (AdditionImageSequence): an image, an image of a random digit, a blank; each shown
  `copies` times, labelled with its digit, the blank with their sum modulo 10.

Samples are built lazily from (seed, split, index): the same on every machine, no memory for 10,000.
Loss: 10-class cross-entropy wherever a step has a label (IGNORE elsewhere).
"""
from __future__ import annotations

import hashlib

import torch

from .anomaly import LazySamples, _digits, transform
from .data import IGNORE, Pair, SequenceData

KINDS = ("uniform", "random", "addition")


class DigitSequences(LazySamples):
    def __init__(self, images, labels, pool, count: int, seed: int, split: str, kind: str, transform_name: str,
                 min_copies: int, max_copies: int, copies: int, evaluate_loss: str):
        self.images, self.labels, self.pool, self.count = images, labels, pool, count
        self.seed, self.split, self.kind, self.transform_name = seed, split, kind, transform_name
        self.min_copies, self.max_copies, self.copies, self.evaluate_loss = min_copies, max_copies, copies, evaluate_loss
        self.by_label = {int(d): pool[labels[pool] == d] for d in labels[pool].unique()}

    def _image(self, index, gen: torch.Generator) -> torch.Tensor:
        return transform(self.images[int(index)], self.transform_name, gen).reshape(-1)

    def _pick(self, digit: int, gen: torch.Generator) -> int:
        same = self.by_label[digit]
        return int(same[int(torch.randint(len(same), (1,), generator=gen))])

    def _sample(self, i: int) -> Pair:
        digest = hashlib.sha256(f"digit_sequences:{self.kind}:{self.seed}:{self.split}:{i}".encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
        base = int(self.pool[int(torch.randint(len(self.pool), (1,), generator=gen))])
        digit = int(self.labels[base])
        if self.kind == "addition":
            other = int(torch.randint(10, (1,), generator=gen))
            first, second = self._image(base, gen), self._image(self._pick(other, gen), gen)
            frames = [first] * self.copies + [second] * self.copies + [torch.zeros_like(first)] * self.copies
            labels = [digit] * self.copies + [other] * self.copies + [(digit + other) % 10] * self.copies
        else:
            k = int(torch.randint(self.min_copies, self.max_copies + 1, (1,), generator=gen))
            if self.kind == "uniform":
                frames = [self._image(base, gen)] * k
            else:
                frames = [self._image(self._pick(digit, gen), gen) for _ in range(k)]
            labels = [digit] * k if self.evaluate_loss == "all" else [IGNORE] * (k - 1) + [digit]
        return torch.stack(frames), torch.tensor(labels, dtype=torch.long)


def build(kind: str, train_size: int, validation_size: int, test_size: int, seed: int, transform_name: str = "baseline",
          min_copies: int = 1, max_copies: int = 1, copies: int = 1, evaluate_loss: str = "all",
          image_size: int = 50) -> SequenceData:
    if kind not in KINDS:
        raise ValueError(f"sequence_type must be one of {', '.join(KINDS)}, got {kind!r}")
    if not 1 <= min_copies <= max_copies or copies < 1:
        raise ValueError(f"copies must be >= 1 and 1 <= min_copies <= max_copies, got {copies}, {min_copies}, {max_copies}")
    if evaluate_loss not in ("all", "last"):
        raise ValueError(f"evaluate_loss must be 'all' or 'last', got {evaluate_loss!r}")
    transform(torch.zeros(1, 4, 4), transform_name, torch.Generator())  # an unknown name fails here, not mid-run
    images, labels = _digits(image_size)
    # the digit images themselves are split, so validation/test sequences show digits training never saw
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    cut1, cut2 = int(0.7 * len(perm)), int(0.85 * len(perm))
    pools = {"train": perm[:cut1], "validation": perm[cut1:cut2], "test": perm[cut2:]}
    sizes = {"train": train_size, "validation": validation_size, "test": test_size}
    splits = {name: DigitSequences(images, labels, pools[name], sizes[name], seed, name, kind, transform_name,
                                   min_copies, max_copies, copies, evaluate_loss) for name in sizes}
    return SequenceData(splits["train"], splits["validation"], splits["test"], input_size=image_size * image_size,
                        output_size=10, loss="cross_entropy", sequence_position="all", name=f"digit_sequences:{kind}",
                        info={"source": "sklearn_digits", "image_size": image_size, "sequence_type": kind})
