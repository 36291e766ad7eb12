"""fwdgrad inside the training frameworks people already use (optional extras).

* :mod:`fwdgrad.integrations.transformers`: :class:`~fwdgrad.integrations.transformers.Trainer`, a
  ``transformers.Trainer`` whose training step is an estimator's (``fwdgrad[hf]``);
* Lightning needs no helper: a ``LightningModule``'s ``on_save_checkpoint`` / ``on_load_checkpoint`` hooks
  carry ``est.state_dict()`` (``examples/lightning_forward_gradient.py``).

This layer sits on top, beside the training loop and the CLI: it imports the public estimator API and
nothing from :mod:`fwdgrad.training`, and nothing below imports it. Importing this package imports neither
``transformers`` nor ``lightning``.
"""
