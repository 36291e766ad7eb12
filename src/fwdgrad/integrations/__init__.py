"""fwdgrad inside the training frameworks people already use (optional extras).

* :mod:`fwdgrad.integrations.transformers`: :class:`~fwdgrad.integrations.transformers.Trainer`, a
  ``transformers.Trainer`` whose training step is an estimator's (``fwdgrad[hf]``);
* :mod:`fwdgrad.integrations.lightning`: saving and restoring an estimator's state in a Lightning
  checkpoint (``fwdgrad[lightning]``);
* :mod:`fwdgrad.integrations.state`: the estimator state both carry.

This layer sits on top, beside the training loop and the CLI: it imports the public estimator API and
nothing from :mod:`fwdgrad.training`, and nothing below imports it. Importing this package imports neither
``transformers`` nor ``lightning``.
"""
