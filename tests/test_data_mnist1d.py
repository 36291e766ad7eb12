"""MNIST-1D: the generator reproduces the published dataset, and is deterministic and balanced."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fwdgrad.data import load_dataset
from fwdgrad.data.mnist1d import MNIST1DConfig, generate_mnist1d_numpy, make_mnist1d, templates

# Reference values read from the published mnist1d_data.pkl (greydanus/mnist1d, the file its README loads),
# made by the authors' generator with the canonical defaults and seed 42.
OFFICIAL_Y_TRAIN_HEAD = [2, 6, 4, 5, 6, 6, 6, 0, 3, 1, 6, 9, 4, 3, 4, 5, 1, 9, 0, 3]
OFFICIAL_Y_TEST_HEAD = [2, 6, 3, 9, 4, 3, 1, 9, 5, 2, 0, 7, 7, 1, 4, 6, 1, 4, 3, 9]
OFFICIAL_X_TRAIN_0_HEAD = [-0.33200567, -0.47191037, -0.77869708, -1.00974083, -0.88235257, 0.10393481, 1.64328435]
OFFICIAL_X_TRAIN_3999_TAIL = [-0.84109618, -0.87756266, -0.81374439, -1.21624513, -1.4649417, -1.65099286]
OFFICIAL_X_TEST_999_HEAD = [-0.51932871, -0.69872276, -1.28103769, -2.16101485, -2.38942113, -0.242339, -0.14567826]
OFFICIAL_TRAIN_CLASS_COUNTS = [398, 396, 411, 394, 394, 402, 401, 404, 402, 398]
OFFICIAL_TEST_CLASS_COUNTS = [102, 104, 89, 106, 106, 98, 99, 96, 98, 102]


@pytest.fixture(scope="module")
def canonical() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return make_mnist1d()


def test_canonical_dataset_matches_the_published_one(canonical):
    x_train, y_train, x_test, y_test = canonical
    assert y_train[:20].tolist() == OFFICIAL_Y_TRAIN_HEAD
    assert y_test[:20].tolist() == OFFICIAL_Y_TEST_HEAD
    # float32 storage of float64 values: agreement to float32 rounding
    torch.testing.assert_close(x_train[0, :7], torch.tensor(OFFICIAL_X_TRAIN_0_HEAD), atol=2e-7, rtol=1e-6)
    torch.testing.assert_close(x_train[3999, -6:], torch.tensor(OFFICIAL_X_TRAIN_3999_TAIL), atol=2e-7, rtol=1e-6)
    torch.testing.assert_close(x_test[999, :7], torch.tensor(OFFICIAL_X_TEST_999_HEAD), atol=2e-7, rtol=1e-6)
    assert torch.bincount(y_train, minlength=10).tolist() == OFFICIAL_TRAIN_CLASS_COUNTS
    assert torch.bincount(y_test, minlength=10).tolist() == OFFICIAL_TEST_CLASS_COUNTS


def test_canonical_shapes_dtypes_and_standardisation(canonical):
    x_train, y_train, x_test, _ = canonical
    assert x_train.shape == (4000, 40) and x_test.shape == (1000, 40)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    everything = torch.cat([x_train, x_test]).double()
    assert abs(everything.mean().item()) < 1e-6
    assert everything.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-6)


def test_load_dataset_mnist1d(canonical):
    ds = load_dataset("mnist1d")
    assert ds.input_shape == (40,) and ds.num_classes == 10
    assert ds.source == "generated: mnist1d seed=42"
    assert torch.equal(ds.x_train, canonical[0]) and torch.equal(ds.y_test, canonical[3])


def test_same_seed_same_tensors_and_other_seed_differs():
    cfg = MNIST1DConfig(num_samples=300, seed=7)
    first, second = make_mnist1d(cfg), make_mnist1d(cfg)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    other = make_mnist1d(MNIST1DConfig(num_samples=300, seed=8))
    assert not torch.equal(first[0], other[0])


def test_generator_does_not_touch_numpy_global_state():
    np.random.seed(123)
    expected = np.random.rand()
    np.random.seed(123)
    make_mnist1d(MNIST1DConfig(num_samples=50))
    assert np.random.rand() == expected


@pytest.mark.parametrize("num_samples", [100, 250])
def test_classes_are_balanced_before_the_split(num_samples):
    xs, ys = generate_mnist1d_numpy(MNIST1DConfig(num_samples=num_samples, seed=3))
    assert xs.shape == (num_samples, 40)
    assert np.bincount(ys, minlength=10).tolist() == [num_samples // 10] * 10
    x_train, _, x_test, _ = make_mnist1d(MNIST1DConfig(num_samples=num_samples, seed=3))
    assert len(x_train) == int(num_samples * 0.8) and len(x_train) + len(x_test) == num_samples


def test_templates_start_and_end_at_zero():
    t = templates()
    assert t.shape == (10, 12)
    assert np.allclose(t[:, 0], 0.0) and np.allclose(t[:, -1], 0.0, atol=1e-12)


@pytest.mark.parametrize(
    "kwargs, bad",
    [
        ({"num_samples": 5}, "num_samples"),
        ({"train_split": 1.0}, "train_split"),
        ({"padding": (10, 5)}, "padding"),
        ({"max_translation": 0}, "max_translation"),
        ({"iid_noise_scale": -1.0}, "iid_noise_scale"),
    ],
)
def test_invalid_config_raises_value_error_naming_the_field(kwargs, bad):
    with pytest.raises(ValueError, match=rf"^MNIST1DConfig: {bad}"):
        make_mnist1d(MNIST1DConfig(**kwargs))
