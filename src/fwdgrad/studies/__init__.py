"""The theory papers of the forward-gradient family as runnable studies (``fwdgrad study NAME``).

- :mod:`fwdgrad.studies.linreg`: forward gradient descent in linear regression (Bos & Schmidt-Hieber 2023),
  the rate d²·log(d)/k and the collapse of the curves, with SGD beside it and ℓ steps per sample;
- :mod:`fwdgrad.studies.testfunctions`: optimisers with backprop and forward gradients on classic test
  functions (Baydin et al. 2022, Belouze 2022): success rates, performance profiles, steps vs dimension;
- :mod:`fwdgrad.studies.frankwolfe`: Frank-Wolfe with projected forward gradients and its variance-reduced
  version (Rostami & Kia 2024) on MNIST.

Each study returns a JSON-ready dict and writes ``<study>.json``, ``<study>.md`` and PNG plots into a fresh
folder under ``runs/`` (:func:`fwdgrad.diagnostics.output.new_run_dir`).
"""
