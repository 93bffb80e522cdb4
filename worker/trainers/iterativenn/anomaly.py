"""RandomAnomaly (seed 000, ICMLA 2023): which of ten images of one digit was transformed differently?

A sample is a sequence of 11 flattened images: 10 of the same digit, all under one random "base"
transform except one (the anomaly) under another, then a blank cue. The label, read at the last step
only, is the index (0-9) of the anomalous image: 10-class cross-entropy, sequence_position "last".

Two sources, same shape of sample:
- `load_parquet(path, ...)`: the real files (RandomAnomaly_Train*.parquet*, RandomAnomaly_Validate*,
  RandomAnomaly_Test* in one folder; columns x = 11 lists of 2500 = 50x50 MNIST-derived images,
  y = 11 ints whose last is the anomaly's index). They are 1.7 GB and not public, so:
- `build_offline(...)`: the same task from scikit-learn's bundled 8x8 digits (on every machine, no
  download), upscaled to `image_size` (50 = the real 2500 inputs), built lazily and deterministically
  from (seed, split, index), so 10,000 samples cost no memory and a resumed job sees the same data.
  Transforms, as the seed's generator picks them (two distinct ones per sample): baseline (none),
  perspective_small / perspective (random 4-corner homography, distortion 0.5 / 0.9), erase (a 10-20%
  rectangle zeroed), noise (Gaussian, std 0.01), both (erase, then small perspective), blur (Gaussian,
  kernel ~0.3 x size), sharpness (factor 4). Each transformed image is clamped to its untransformed
  range, then normalised with MNIST's mean/std (0.1307, 0.3081), as the seed's were.
"""
from __future__ import annotations

import hashlib
import importlib.util
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .data import IGNORE, Pair, SequenceData

COPIES = 10
MEAN, STD = 0.1307, 0.3081
TRANSFORMS = ("baseline", "perspective_small", "perspective", "erase", "noise", "both", "blur", "sharpness")


def _label_sequence(anomaly: int, steps: int = COPIES + 1) -> torch.Tensor:
    y = torch.full((steps,), IGNORE, dtype=torch.long)
    y[-1] = anomaly
    return y


# ---- offline: scikit-learn digits ---------------------------------------------------------------------
def _digits_table() -> np.ndarray:
    """scikit-learn's bundled digits (1797 rows: 64 pixels 0-16, then the digit). The CSV is read from the
    package folder: importing sklearn.datasets costs seconds (scipy and more) for a 60 KB file."""
    spec = importlib.util.find_spec("sklearn")
    if spec is not None and spec.origin is not None:
        path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            return np.loadtxt(path, delimiter=",", dtype=np.float32)
    from sklearn.datasets import load_digits  # a layout we do not know: the public API

    digits = load_digits()
    return np.hstack([digits.data, digits.target[:, None]]).astype(np.float32)


def _digits(image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    table = torch.from_numpy(_digits_table())
    images = table[:, :64].reshape(-1, 1, 8, 8) / 16.0  # [1797, 1, 8, 8] in [0, 1]
    if image_size != 8:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return images.clamp(0, 1), table[:, 64].long()


def _homography(src: np.ndarray, dst: np.ndarray) -> torch.Tensor:
    """3x3 H with H @ [src, 1] ~ [dst, 1] for 4 point pairs (numpy: an 8x8 solve costs microseconds)."""
    a = np.zeros((8, 8))
    for k, ((x, y), (u, v)) in enumerate(zip(src, dst)):
        a[2 * k] = [x, y, 1, 0, 0, 0, -u * x, -u * y]
        a[2 * k + 1] = [0, 0, 0, x, y, 1, -v * x, -v * y]
    h = np.linalg.solve(a, dst.reshape(-1))
    return torch.from_numpy(np.append(h, 1.0).reshape(3, 3)).float()


_GRIDS: dict[int, torch.Tensor] = {}


def _pixel_grid(size: int) -> torch.Tensor:
    """[size, size, 3] homogeneous pixel centres in [-1, 1], cached per size."""
    if size not in _GRIDS:
        lin = torch.linspace(-1, 1, size)
        yy, xx = torch.meshgrid(lin, lin, indexing="ij")
        _GRIDS[size] = torch.stack([xx, yy, torch.ones_like(xx)], dim=-1)
    return _GRIDS[size]


def _perspective(img: torch.Tensor, distortion: float, gen: torch.Generator) -> torch.Tensor:
    """Move each corner inwards by up to distortion/2 of the side (as torchvision's RandomPerspective) and
    warp; pixels from outside the image are 0. Coordinates are normalised to [-1, 1]."""
    corners = np.array([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])
    shift = torch.rand(4, 2, generator=gen, dtype=torch.float64).numpy() * distortion  # of the half side
    moved = corners - np.sign(corners) * shift  # each corner moves inwards
    # For each output pixel, where to read the input: the image's corners end up at the moved points.
    h = _homography(moved, corners)
    pts = _pixel_grid(img.shape[-1]) @ h.t()
    grid = (pts[..., :2] / pts[..., 2:].clamp(min=1e-6)).unsqueeze(0)
    return F.grid_sample(img.unsqueeze(0), grid, align_corners=True, padding_mode="zeros").squeeze(0)


def _erase(img: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    size = img.shape[-1]
    area = (0.1 + 0.1 * torch.rand(1, generator=gen).item()) * size * size
    aspect = math.exp(math.log(0.3) + (math.log(3.3) - math.log(0.3)) * torch.rand(1, generator=gen).item())
    h = max(1, min(size, int(round(math.sqrt(area * aspect)))))
    w = max(1, min(size, int(round(math.sqrt(area / aspect)))))
    top = int(torch.randint(0, size - h + 1, (1,), generator=gen))
    left = int(torch.randint(0, size - w + 1, (1,), generator=gen))
    out = img.clone()
    out[..., top : top + h, left : left + w] = 0.0
    return out


def _blur(img: torch.Tensor) -> torch.Tensor:
    size = img.shape[-1]
    k = max(3, int(0.3 * size) | 1)  # 15 at 50x50, as the seed's GaussianBlur(15)
    sigma = 0.3 * ((k - 1) * 0.5 - 1) + 0.8  # torchvision's default for a kernel size
    ax = torch.arange(k, dtype=torch.float32) - (k - 1) / 2
    g = torch.exp(-(ax**2) / (2 * sigma**2))
    g = g / g.sum()
    padded = F.pad(img.unsqueeze(0), (k // 2,) * 4, mode="reflect")
    out = F.conv2d(padded, g.view(1, 1, 1, k))
    return F.conv2d(out, g.view(1, 1, k, 1)).squeeze(0)


def _sharpen(img: torch.Tensor, factor: float = 4.0) -> torch.Tensor:
    kernel = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0
    smooth = F.conv2d(F.pad(img.unsqueeze(0), (1, 1, 1, 1), mode="replicate"), kernel.view(1, 1, 3, 3)).squeeze(0)
    return (smooth + factor * (img - smooth)).clamp(0, 1)


def transform(img: torch.Tensor, name: str, gen: torch.Generator) -> torch.Tensor:
    """One image [1, S, S] in [0, 1] under a named transform, clamped to its own range, normalised."""
    if name == "baseline":
        out = img
    elif name == "perspective_small":
        out = _perspective(img, 0.5, gen)
    elif name == "perspective":
        out = _perspective(img, 0.9, gen)
    elif name == "erase":
        out = _erase(img, gen)
    elif name == "noise":
        out = img + torch.randn(img.shape, generator=gen) * 0.01
    elif name == "both":
        out = _perspective(_erase(img, gen), 0.5, gen)
    elif name == "blur":
        out = _blur(img)
    elif name == "sharpness":
        out = _sharpen(img)
    else:
        raise ValueError(f"unknown transform '{name}'; known: {', '.join(TRANSFORMS)}")
    out = out.clamp(float(img.min()), float(img.max()))
    return (out - MEAN) / STD


CACHE_BYTES = 512 * 2**20  # keep built samples when a split fits (small images); else build each time


class LazySamples(Sequence[Pair]):
    """`count` samples built on demand by `_sample(i)` (0 <= i < count), indexed and sliced as a list."""

    count: int

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.count))]
        if not -self.count <= i < self.count:
            raise IndexError(i)
        return self._sample(i % self.count)

    def _sample(self, i: int) -> Pair:
        raise NotImplementedError


class OfflineAnomalies(LazySamples):
    """Lazily built samples; sample i of a split depends only on (seed, split, i)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, pool: torch.Tensor, count: int, seed: int,
                 split: str):
        self.images, self.labels, self.pool, self.count, self.seed, self.split = images, labels, pool, count, seed, split
        self.by_label = {int(d): pool[labels[pool] == d] for d in labels[pool].unique()}
        fits = count * (COPIES + 1) * images[0].numel() * 4 <= CACHE_BYTES
        self._cache: dict[int, Pair] | None = {} if fits else None

    def _sample(self, i: int) -> Pair:
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        pair = self._build(i)
        if self._cache is not None:
            self._cache[i] = pair
        return pair

    def _build(self, i: int) -> Pair:
        digest = hashlib.sha256(f"random_anomaly:{self.seed}:{self.split}:{i}".encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
        base_idx = int(self.pool[int(torch.randint(len(self.pool), (1,), generator=gen))])
        same = self.by_label[int(self.labels[base_idx])]
        order = torch.randperm(len(TRANSFORMS), generator=gen)[:2].tolist()
        base_name, alt_name = TRANSFORMS[order[0]], TRANSFORMS[order[1]]
        picks = same[torch.randint(len(same), (COPIES + 1,), generator=gen)]
        anomaly = int(torch.randint(COPIES, (1,), generator=gen))
        frames = []
        for k in range(COPIES):
            name = alt_name if k == anomaly else base_name
            src = picks[COPIES] if k == anomaly else picks[k]  # the anomaly is a fresh draw, as in the seed
            frames.append(transform(self.images[int(src)], name, gen).reshape(-1))
        frames.append(torch.zeros_like(frames[0]))  # the blank cue
        return torch.stack(frames), _label_sequence(anomaly)


def build_offline(train_size: int, validation_size: int, test_size: int, seed: int, image_size: int = 50) -> SequenceData:
    images, labels = _digits(image_size)
    # Split the digit images themselves, so validation/test sequences show digits training never saw.
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    cut1, cut2 = int(0.7 * len(perm)), int(0.85 * len(perm))
    pools = {"train": perm[:cut1], "validation": perm[cut1:cut2], "test": perm[cut2:]}
    sizes = {"train": train_size, "validation": validation_size, "test": test_size}
    splits = {name: OfflineAnomalies(images, labels, pools[name], sizes[name], seed, name) for name in sizes}
    return SequenceData(splits["train"], splits["validation"], splits["test"], input_size=image_size * image_size,
                        output_size=COPIES, loss="cross_entropy", sequence_position="last",
                        name="random_anomaly", info={"source": "sklearn_digits", "image_size": image_size})


# ---- the real parquet files ------------------------------------------------------------------------
class _ParquetSplit(Sequence[Pair]):
    def __init__(self, x: np.ndarray, y: np.ndarray):
        self.x, self.y = x, y  # [n, 11, 2500] float32, [n] int64

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return torch.from_numpy(self.x[i]), _label_sequence(int(self.y[i]), self.x.shape[1])


def _read_split(files: list[Path], limit: int) -> _ParquetSplit:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    xs, ys, have = [], [], 0
    for path in files:
        table = pq.read_table(path, columns=["x", "y"])
        if have + table.num_rows > limit:
            table = table.slice(0, limit - have)
        n = table.num_rows
        x = pc.list_flatten(pc.list_flatten(table.column("x"))).to_numpy().astype(np.float32)
        steps = len(table.column("y")[0]) if n else COPIES + 1
        xs.append(x.reshape(n, steps, -1))
        last = pc.list_element(table.column("y"), steps - 1).to_numpy()
        ys.append(last.astype(np.int64))
        have += n
        if have >= limit:
            break
    return _ParquetSplit(np.concatenate(xs), np.concatenate(ys))


def _find(folder: Path, stem: str) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.name.startswith(stem) and ".parquet" in p.name)
    if not files:
        raise FileNotFoundError(f"no {stem}*.parquet* file in {folder} (leave data.path out for the offline task)")
    return files


def load_parquet(path: str, train_size: int, validation_size: int, test_size: int) -> SequenceData:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"RandomAnomaly folder '{path}' not found (leave data.path out for the offline task)")
    train = _read_split(_find(folder, "RandomAnomaly_Train"), train_size)
    validation = _read_split(_find(folder, "RandomAnomaly_Validate"), validation_size)
    test = _read_split(_find(folder, "RandomAnomaly_Test"), test_size)
    side = math.isqrt(train.x.shape[2])
    return SequenceData(train, validation, test, input_size=train.x.shape[2], output_size=COPIES,
                        loss="cross_entropy", sequence_position="last", name="random_anomaly",
                        info={"source": str(folder), "image_size": side})


def load(path: str | None, train_size: int, validation_size: int, test_size: int, seed: int,
         image_size: int = 50) -> SequenceData:
    if path:
        return load_parquet(path, train_size, validation_size, test_size)
    return build_offline(train_size, validation_size, test_size, seed, image_size)
