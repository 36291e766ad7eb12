"""How well each fg-guess guess aligns with the true per-example gradient at the block outputs, at initialisation.

Prints the mean |cos(u_i, dL/dh_i)| per block over 256 MNIST training images for every guess (docs/guided.md)::

    python benchmarks/guess_alignment.py --data-dir ../shared/data
"""

import argparse

import torch
import torch.nn.functional as F

import fwdgrad
from fwdgrad.data import load_dataset
from fwdgrad.models import build_model

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--data-dir", default="../shared/data")
DATA_DIR = ap.parse_args().data_dir
torch.set_num_threads(1)
data = load_dataset("mnist", DATA_DIR)
x, y = data.x_train[:256], data.y_train[:256]
for mname, opts in (("block-cnn", {"channels": "16x32x32"}), ("localmixer-m1-16", {})):
    torch.manual_seed(0)
    model = build_model(mname, data.input_shape, 10, **opts)
    if mname.startswith("localmixer"):
        with torch.no_grad():
            model.readout.weight.normal_(0, 0.05)  # zero-initialised read-out: give the global gradient a direction
    outs = {}
    hs = [b.register_forward_hook(lambda m, a, o, k=k, outs=outs: outs.__setitem__(k, o))
          for k, b in enumerate(model.blocks)]
    loss = F.cross_entropy(model(x), y)
    g = torch.autograd.grad(loss, [outs[k] for k in range(len(model.blocks))])
    for h in hs:
        h.remove()
    for guess in ("local", "above", "random", "ntk", "fixed-ntk"):
        est = fwdgrad.estimator("fg-guess", guess=guess, seed=0)
        model.zero_grad(set_to_none=True)
        est(model, lambda m: F.cross_entropy(m(x), y, reduction="none"))
        cos = [float(F.cosine_similarity(est.last_guesses[k].flatten(1), g[k].flatten(1), dim=1).abs().mean())
               for k in range(len(model.blocks))]
        print(mname, guess, "mean |cos(u_i, grad_i)| per block:", [round(c, 3) for c in cos])
