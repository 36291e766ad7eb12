"""Test-suite options. ``pytest --device cuda`` (or ``FWDGRAD_TEST_DEVICE=cuda``) runs the exactness and
estimator tests that build their models through ``tests/problems.py`` (``problems.DEVICE``) on that device;
CI runs on the CPU."""

from __future__ import annotations

import importlib.util
import os

import pytest

# Modules that import an optional extra at the top: their doctests run only where it is installed.
collect_ignore = [] if importlib.util.find_spec("transformers") else ["src/fwdgrad/integrations/transformers.py"]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--device",
        default=os.environ.get("FWDGRAD_TEST_DEVICE", "cpu"),
        help="device for the exactness and estimator tests (default: $FWDGRAD_TEST_DEVICE, else cpu)",
    )


def pytest_configure(config: pytest.Config) -> None:
    import torch

    device = torch.device(config.getoption("--device"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--device cuda: CUDA is not available on this machine")
    os.environ["FWDGRAD_TEST_DEVICE"] = str(device)


@pytest.fixture
def one_thread():
    """One intra-op thread for the test, restored after it: tests of many tiny operations only wait on a second
    thread on a shared 2-core machine. Files opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
