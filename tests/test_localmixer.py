"""The LocalMixer: the paper's Table 2 sizes, registry names, argument checks, FG-A's perturbation units."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

from fwdgrad.estimators.activity import ActivityPerturbation, select_modules
from fwdgrad.models import build_model, num_parameters
from fwdgrad.models.localmixer import CONFIGS, LocalMixer

# Ren et al. (2023), Table 2: parameter counts as printed (rounded).
PAPER_SIZES = {"s1": 272e3, "m1-16": 429e3, "m8-16": 919e3, "l8-64": 13.1e6}
INPUTS = {"s1": (1, 28, 28), "m1-16": (1, 28, 28), "m8-16": (3, 32, 32), "l8-64": (3, 32, 32)}


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_parameter_counts_match_table_2(config: str):
    with torch.device("meta"):  # no memory for the 13M-parameter model
        model = LocalMixer.from_config(config, INPUTS[config], 10)
    n = num_parameters(model)
    printed = PAPER_SIZES[config]
    # the paper rounds to three significant figures
    assert abs(n - printed) <= 0.5 * 10 ** (len(str(int(printed))) - 3), (config, n)


def test_registered_names_build_and_run():
    for config in ["s1", "m1-16"]:
        model = build_model(f"localmixer-{config}", (1, 28, 28), 10)
        assert isinstance(model, LocalMixer)
    model = build_model("localmixer", (3, 8, 8), 4, num_blocks=2, num_patches=2, channels=16, groups=4)
    assert model(torch.randn(3, 3, 8, 8)).shape == (3, 4)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_patches": 3}, "num_patches=3 does not divide"),
        ({"groups": 3}, "groups=3 does not divide"),
        ({"num_blocks": 0}, "num_blocks must be an int >= 1"),
    ],
)
def test_invalid_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LocalMixer((1, 8, 8), 10, **({"channels": 16, "num_patches": 2} | kwargs))
    with pytest.raises(ValueError, match="unknown config"):
        LocalMixer.from_config("xl", (1, 8, 8), 10)


def test_readout_starts_at_zero_and_patchify_roundtrip():
    model = LocalMixer((2, 4, 6), 3, num_patches=2, channels=8, groups=2)
    assert torch.equal(model(torch.randn(2, 2, 4, 6)), torch.zeros(2, 3))
    x = torch.arange(2 * 4 * 6, dtype=torch.float32).reshape(1, 2, 4, 6)
    tokens = model.patchify(x)  # [1, 4, 2·2·3]
    assert tokens.shape == (1, 4, 12)
    assert torch.equal(tokens[0, 1], x[0, :, 0:2, 3:6].reshape(-1))  # second patch: top row, right half


def test_fg_a_perturbs_the_normalised_units_and_masks_inactive_relus():
    torch.manual_seed(0)
    model = LocalMixer((1, 4, 4), 3, num_blocks=2, num_patches=2, channels=8, groups=2)
    names = [n for n, _ in select_modules("t", model)]
    assert names == [
        "blocks.0.channel", "blocks.0.group", "blocks.1.token", "blocks.1.channel", "blocks.1.group",
        "heads.0", "heads.1", "readout",
    ]
    x, y = torch.randn(5, 1, 4, 4), torch.randint(0, 3, (5,))
    pert = ActivityPerturbation(model, select_modules("t", model), "gaussian", torch.Generator().manual_seed(0))
    with fwAD.dual_level(), pert:
        F.cross_entropy(model(x), y, reduction="none")
    masked = {s.name for s in pert.sites if s.mask is not None}
    # every unit that feeds a ReLU directly; the last group layer adds the residual first
    assert masked == {"blocks.0.channel", "blocks.0.group", "blocks.1.token", "blocks.1.channel"}
