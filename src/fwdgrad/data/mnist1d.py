"""MNIST-1D, generated offline from the canonical recipe and seed.

MNIST-1D (Greydanus & Kobak, "Scaling down deep learning with MNIST-1D", ICML 2024; first released 2020 as
greydanus/mnist1d) turns ten hand-drawn 1-D "digit" templates of 12 points into 40-point signals by a
chain of random transformations. Each example, for template ``x`` (12 points) drawn in this order from one
legacy NumPy ``RandomState(seed)`` stream:

1. ``pad``: append ``p = 36 + floor(u * 25)`` zeros, ``u ~ U[0, 1)`` (so 36..60 zeros); the template is
   shifted by ``1e-8`` first so that signal and padding can be told apart later;
2. ``dilate``: resample the padded signal linearly onto ``12 + 60 = 72`` evenly spaced points;
3. ``scale``: multiply by ``1 + 0.4 (u - 0.5)``;
4. ``translate``: roll right by ``k``, ``k`` uniform in ``{0, ..., 47}``;
5. ``correlated noise``: where the signal is exactly zero (the padding), put
   ``gaussian_filter(0.25 * n, sigma=2)`` with ``n ~ N(0, I_72)`` (reflecting borders, radius 8);
6. ``iid noise``: add ``0.02 * n'``, ``n' ~ N(0, I_72)``;
7. ``shear``: subtract ``0.75 (u - 0.5) * linspace(-0.5, 0.5, 72)``;
8. ``subsample``: resample linearly onto 40 points.

500 examples per class are made in class order, shuffled by one permutation of the same stream, then the
whole array is standardised with its own scalar mean and standard deviation (``(x - mean) / std``), and the
first 80 % (4000) are the training set, the rest (1000) the test set. With the canonical defaults and seed
42 this reproduces the published ``mnist1d_data.pkl`` to float rounding (see ``tests/test_data_mnist1d.py``).

The random stream is NumPy's legacy Mersenne-Twister ``RandomState`` (a private instance, never the global
one) because that is what defines the canonical dataset; the result is converted to torch tensors.

Example:
    >>> from fwdgrad.data.mnist1d import make_mnist1d
    >>> x_train, y_train, x_test, y_test = make_mnist1d()
    >>> tuple(x_train.shape), tuple(x_test.shape), int(y_train.max()) + 1
    ((4000, 40), (1000, 40), 10)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# The ten digit templates, 12 points each (ordinates of a stroke, before whitening), as drawn by the authors.
_RAW_TEMPLATES: tuple[tuple[float, ...], ...] = (
    (5, 6, 6.5, 6.75, 7, 7, 7, 7, 6.75, 6.5, 6, 5),
    (5, 3, 3, 3.4, 3.8, 4.2, 4.6, 5, 5.4, 5.8, 5, 5),
    (5, 6, 6.5, 6.5, 6, 5.25, 4.75, 4, 3.5, 3.5, 4, 5),
    (5, 6, 6.5, 6.5, 6, 5, 5, 6, 6.5, 6.5, 6, 5),
    (5, 4.4, 3.8, 3.2, 2.6, 2.6, 5, 5, 5, 5, 5, 5),
    (5, 3, 3, 3, 3, 5, 6, 6.5, 6.5, 6, 4.5, 5),
    (5, 4, 3.5, 3.25, 3, 3, 3, 3, 3.25, 3.5, 4, 5),
    (5, 7, 7, 6.6, 6.2, 5.8, 5.4, 5, 4.6, 4.2, 5, 5),
    (5, 4, 3.5, 3.5, 4, 5, 5, 4, 3.5, 3.5, 4, 5),
    (5, 4, 3.5, 3.5, 4, 5, 5, 5, 5, 4.7, 4.3, 5),
)


@dataclass(frozen=True)
class MNIST1DConfig:
    """The generator's knobs; the defaults are the canonical MNIST-1D dataset.

    Attributes:
        num_samples: total examples, split evenly over the 10 classes (``num_samples // 10`` each).
        train_split: fraction of the shuffled examples that form the training set.
        template_len: points per template (12).
        padding: ``(low, high)``, inclusive range of zeros appended before dilation.
        scale_coeff: amplitude scale factor is ``1 + scale_coeff * (u - 0.5)``.
        max_translation: circular shift drawn uniformly from ``0 .. max_translation - 1``.
        corr_noise_scale: std of the white noise smoothed (sigma 2) into the padding.
        iid_noise_scale: std of the white noise added everywhere.
        shear_scale: slope of the random linear trend is ``shear_scale * (u - 0.5)``.
        final_seq_length: points per output signal (40).
        seed: seed of the NumPy ``RandomState`` stream.
    """

    num_samples: int = 5000
    train_split: float = 0.8
    template_len: int = 12
    padding: tuple[int, int] = (36, 60)
    scale_coeff: float = 0.4
    max_translation: int = 48
    corr_noise_scale: float = 0.25
    iid_noise_scale: float = 2e-2
    shear_scale: float = 0.75
    final_seq_length: int = 40
    seed: int = 42

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        where = "MNIST1DConfig"
        if not isinstance(self.num_samples, int) or self.num_samples < 10:
            raise ValueError(f"{where}: num_samples must be an int >= 10 (one per class), got {self.num_samples!r}")
        if not 0.0 < self.train_split < 1.0:
            raise ValueError(f"{where}: train_split must be in (0, 1), got {self.train_split!r}")
        if self.template_len != len(_RAW_TEMPLATES[0]):
            raise ValueError(f"{where}: template_len must be {len(_RAW_TEMPLATES[0])}, got {self.template_len!r}")
        low, high = self.padding
        if not (isinstance(low, int) and isinstance(high, int) and 0 <= low <= high):
            raise ValueError(f"{where}: padding must be two ints 0 <= low <= high, got {self.padding!r}")
        if not isinstance(self.max_translation, int) or self.max_translation < 1:
            raise ValueError(f"{where}: max_translation must be an int >= 1, got {self.max_translation!r}")
        if not isinstance(self.final_seq_length, int) or self.final_seq_length < 2:
            raise ValueError(f"{where}: final_seq_length must be an int >= 2, got {self.final_seq_length!r}")
        for name in ("scale_coeff", "corr_noise_scale", "iid_noise_scale", "shear_scale"):
            value = getattr(self, name)
            if not value >= 0.0:
                raise ValueError(f"{where}: {name} must be >= 0, got {value!r}")


def templates() -> np.ndarray:
    """The ten templates, float64 ``[10, 12]``: whitened per row, shifted to start at 0, divided by 6."""
    x = np.asarray(_RAW_TEMPLATES, dtype=np.float64)
    x = x - x.mean(axis=1, keepdims=True)
    x = x / x.std(axis=1, keepdims=True)
    x = x - x[:, :1]
    return x / 6.0


def _resample(signal: np.ndarray, num_points: int) -> np.ndarray:
    """Piecewise-linear resampling of ``signal`` (``[n]``, on an even grid of [0, 1]) onto ``num_points``."""
    old_grid = np.linspace(0.0, 1.0, len(signal))
    new_grid = np.linspace(0.0, 1.0, num_points)
    return np.interp(new_grid, old_grid, signal)


def _gaussian_smooth(signal: np.ndarray, sigma: float, truncate: float = 4.0) -> np.ndarray:
    """1-D Gaussian smoothing with half-sample-symmetric borders (``d c b a | a b c d | d c b a``).

    Kernel ``w_j ∝ exp(-j² / (2 sigma²))`` for ``|j| <= int(truncate * sigma + 0.5)``, normalised to sum 1.
    """
    radius = int(truncate * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * offsets**2 / sigma**2)
    kernel /= kernel.sum()
    padded = np.pad(signal, radius, mode="symmetric")
    return np.convolve(padded, kernel, mode="valid")


def _transform(template: np.ndarray, cfg: MNIST1DConfig, rng: np.random.RandomState) -> np.ndarray:
    """One random example from one template; see the module docstring for the steps and the draw order."""
    low, high = cfg.padding
    num_zeros = low + int(rng.rand() * (high - low + 1))
    signal = np.concatenate([template + 1e-8, np.zeros(num_zeros)])
    signal = _resample(signal, cfg.template_len + high)
    signal = signal * (1 + cfg.scale_coeff * (rng.rand() - 0.5))
    shift = int(rng.choice(cfg.max_translation))
    signal = np.roll(signal, shift)

    is_signal = signal != 0
    smooth_noise = _gaussian_smooth(cfg.corr_noise_scale * rng.randn(len(signal)), sigma=2.0)
    signal = np.where(is_signal, signal, smooth_noise)
    signal = signal + cfg.iid_noise_scale * rng.randn(len(signal))

    slope = cfg.shear_scale * (rng.rand() - 0.5)
    signal = signal - slope * np.linspace(-0.5, 0.5, len(signal))
    return _resample(signal, cfg.final_seq_length)


def generate_mnist1d_numpy(cfg: MNIST1DConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All examples before the split: float64 ``x [N, final_seq_length]`` (standardised) and int64 ``y [N]``."""
    cfg = MNIST1DConfig() if cfg is None else cfg
    cfg.validate()
    rng = np.random.RandomState(cfg.seed)
    base = templates()
    per_class = cfg.num_samples // len(base)
    xs = np.stack([_transform(base[label], cfg, rng) for label in range(len(base)) for _ in range(per_class)])
    ys = np.repeat(np.arange(len(base), dtype=np.int64), per_class)
    order = rng.permutation(len(ys))
    xs, ys = xs[order], ys[order]
    xs = (xs - xs.mean()) / xs.std()
    return xs, ys


def make_mnist1d(
    cfg: MNIST1DConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """MNIST-1D as tensors ``(x_train [N_tr, 40] float32, y_train [N_tr] int64, x_test, y_test)``.

    Same ``cfg`` (seed included), same tensors, bit for bit. Canonical defaults: 4000 train, 1000 test.

    Example:
        >>> x_tr, y_tr, x_te, y_te = make_mnist1d(MNIST1DConfig(num_samples=200, seed=0))
        >>> tuple(x_tr.shape), tuple(x_te.shape)
        ((160, 40), (40, 40))
    """
    cfg = MNIST1DConfig() if cfg is None else cfg
    xs, ys = generate_mnist1d_numpy(cfg)
    split = int(len(ys) * cfg.train_split)
    x = torch.from_numpy(xs.astype(np.float32))
    y = torch.from_numpy(ys)
    return x[:split].clone(), y[:split].clone(), x[split:].clone(), y[split:].clone()
