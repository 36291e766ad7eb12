r"""A Hugging Face ``Trainer`` whose training step is a fwdgrad estimator's (extra ``fwdgrad[hf]``).

:class:`Trainer` is ``transformers.Trainer`` with one method replaced: :meth:`Trainer.training_step`
evaluates the Trainer's own ``compute_loss`` through an estimator instead of calling ``backward``. The
rest — data loading, evaluation, logging, callbacks, ``save_model``, checkpoints and
``resume_from_checkpoint`` — is Hugging Face's. Two modes:

* ``.grad`` (default): ``est(model, loss_fn)`` accumulates the estimate ``ĝ`` into ``p.grad`` as
  ``loss.backward()`` would, so the Trainer's optimizer, lr scheduler, gradient accumulation
  (``gradient_accumulation_steps``: the loss is scaled by ``1/steps`` as Hugging Face scales it, so the
  accumulated ``.grad`` is the mean) and clipping (``max_grad_norm``) act on it unchanged.
* fused (``fused=True``, MeZO's memory, Malladi et al. 2023, "Fine-Tuning Language Models with Just
  Forward Passes"): each step is ``est.sgd_step(model, loss_fn, lr, weight_decay)``,
  ``θ ← (1 − lr·wd)·θ − lr·ĝ``, with ``lr`` the Trainer's scheduled learning rate at that step. No
  ``.grad`` is written and the optimizer is a momentum-free ``torch.optim.SGD`` that never receives a
  gradient, so it holds no state; for ``zo`` / ``zo-sign`` and ``fg-w`` with ``gaussian`` /
  ``rademacher`` / ``rank1`` tangents no model-sized tensor is formed at all (each tensor's direction is
  drawn again from its seed). Gradient accumulation and clipping need a gradient and raise here.

The estimator's state (``est.state_dict()``: its private generator and any state of its own; see
:mod:`fwdgrad.estimators.state`) is written into
every checkpoint folder as ``fwdgrad_estimator.pt`` and read back by ``resume_from_checkpoint``, so a
resumed run ends with the weights of an uninterrupted one, bit for bit. A registry name builds the
estimator with ``seed=args.seed`` so that it has such a generator.

The model is evaluated in ``eval()`` mode inside the step (dropout off, as in MeZO's trainer: the two
evaluations of a finite difference must see the same network); ``dropout=True`` keeps ``train()``.

What it refuses with a ``ValueError`` at construction, instead of a silently wrong step: DeepSpeed and
FSDP (they shard or wrap parameters and gradients that the estimator writes itself), more than one
process or ``nn.DataParallel`` (no backward runs, so no gradient is all-reduced), fp16 with a gradient
scaler (it would unscale a gradient that was never scaled; bf16 works), LOMO optimizers (they fuse the
update into ``backward``), context/tensor parallelism, and an estimator that needs per-example losses
(``compute_loss`` returns their mean).

Example:
    >>> import tempfile, torch, transformers
    >>> from fwdgrad.integrations.transformers import Trainer
    >>> cfg = transformers.BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
    ...                               intermediate_size=32, max_position_embeddings=16, num_labels=2)
    >>> _ = torch.manual_seed(0)
    >>> model = transformers.BertForSequenceClassification(cfg)
    >>> data = [{"input_ids": torch.randint(0, 32, (8,)), "labels": torch.tensor(i % 2)} for i in range(8)]
    >>> with tempfile.TemporaryDirectory() as out:
    ...     args = transformers.TrainingArguments(out, max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3,
    ...                                           max_grad_norm=0, report_to=[], use_cpu=True, save_strategy="no",
    ...                                           disable_tqdm=True)
    ...     trainer = Trainer(model=model, args=args, train_dataset=data, estimator="zo", fused=True)
    ...     trainer.remove_callback(transformers.PrinterCallback)  # no log lines in this example
    ...     result = trainer.train()
    >>> result.global_step, trainer.optimizer.state_dict()["state"], model.classifier.weight.grad
    (2, {}, None)
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from fwdgrad._io import write_atomic
from fwdgrad.estimators import Estimator, estimator

try:
    import transformers
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("fwdgrad.integrations.transformers needs the optional extra: pip install 'fwdgrad[hf]'") from e

ESTIMATOR_FILE = "fwdgrad_estimator.pt"

__all__ = ["ESTIMATOR_FILE", "Trainer", "label_word_accuracy"]


class Trainer(transformers.Trainer):
    """``transformers.Trainer`` with the backward pass replaced by an estimator (see the module docstring).

    Args:
        *args, **kwargs: those of ``transformers.Trainer`` (``model``, ``args``, ``train_dataset``, ...).
        estimator: a registry name (``"zo"``, ``"fg-w"``, ...; see ``fwdgrad.available_estimators()``) or
            an :class:`fwdgrad.Estimator`.
        estimator_options: options for a registry name (e.g. ``{"num_directions": 4, "eps": 1e-3}``);
            ``seed`` defaults to ``args.seed``.
        fused: update in place with ``est.sgd_step`` (no gradient, no optimizer state) instead of writing
            ``.grad`` for the optimizer.
        dropout: keep the model in ``train()`` mode inside the step (default: ``eval()``, dropout off).
    """

    def __init__(
        self, *args: Any, estimator: str | Estimator, estimator_options: dict[str, Any] | None = None,
        fused: bool = False, dropout: bool = False, **kwargs: Any,
    ) -> None:
        if not isinstance(fused, bool) or not isinstance(dropout, bool):
            raise TypeError(f"fwdgrad Trainer: fused and dropout must be bools, got {fused!r}, {dropout!r}")
        self.fused, self.dropout = fused, dropout
        super().__init__(*args, **kwargs)
        self.estimator = _build_estimator(estimator, estimator_options, self.args.seed)
        self._check_supported()

    def _check_supported(self) -> None:
        """Raise ``ValueError`` for a setting whose step this Trainer would get wrong."""
        where, args = "fwdgrad Trainer", self.args
        refusals = [
            (self.is_deepspeed_enabled, "DeepSpeed is not supported (it owns the parameters and gradients)"),
            (self.is_fsdp_enabled, "FSDP is not supported (it shards the parameters the estimator perturbs)"),
            (args.world_size > 1, f"{args.world_size} processes: no backward runs, so no gradient would be "
                                  "all-reduced; train on one process (or use fwdgrad.distributed)"),
            (args.n_gpu > 1, f"nn.DataParallel over {args.n_gpu} GPUs is not supported; use one device "
                             "(CUDA_VISIBLE_DEVICES=0)"),
            (getattr(self.accelerator, "scaler", None) is not None,
             "fp16 with a gradient scaler would unscale a gradient that was never scaled; use bf16"),
            ("lomo" in str(args.optim).lower(), f"optim={args.optim} fuses its update into backward"),
            (getattr(args, "parallelism_config", None) is not None, "context / tensor parallelism is not supported"),
            (self.estimator.per_example_loss, f"estimator {self.estimator.name or type(self.estimator).__name__} "
                                              "needs per-example losses; compute_loss returns their mean"),
            (self.fused and args.gradient_accumulation_steps > 1,
             "fused=True updates at every step, so it cannot accumulate; set gradient_accumulation_steps=1"),
            (self.fused and args.max_grad_norm is not None and args.max_grad_norm > 0,
             "fused=True forms no gradient to clip; set TrainingArguments(max_grad_norm=0)"),
        ]
        for refused, why in refusals:
            if refused:
                raise ValueError(f"{where}: {why}")

    # -- the step ---------------------------------------------------------------------------------------

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        """One micro-batch: the estimator evaluates ``compute_loss`` (scaled for gradient accumulation as
        Hugging Face scales it) and writes ``.grad`` or, fused, updates the parameters. Returns the detached
        (scaled) loss, as Hugging Face's step does."""
        model.train(self.dropout)
        if callable(getattr(self.optimizer, "train", None)):  # schedule-free optimizers, as Hugging Face does
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        scale = 1.0 if self._loss_is_scaled(num_items_in_batch) else 1.0 / self.current_gradient_accumulation_steps

        def loss_fn(m: nn.Module) -> torch.Tensor:
            with self.compute_loss_context_manager():
                loss = self.compute_loss(m, inputs, num_items_in_batch=num_items_in_batch)
            return loss * scale if scale != 1.0 else loss

        if not self.fused:
            return self.estimator(model, loss_fn).detach()
        lr = float(self._get_learning_rate())
        if lr == 0.0:  # a warm-up's first step: no update, as an optimizer with lr 0 makes none
            with torch.no_grad():
                return loss_fn(model).detach()
        return self.estimator.sgd_step(model, loss_fn, lr=lr, weight_decay=float(self.args.weight_decay)).detach()

    def _loss_is_scaled(self, num_items_in_batch: torch.Tensor | int | None) -> bool:
        """Hugging Face's rule: the loss is already normalised over the accumulated batch when the model or
        ``compute_loss_func`` divided it by ``num_items_in_batch``."""
        if self.loss_is_scaled_for_ga is not None:
            return bool(self.loss_is_scaled_for_ga)
        return bool((self.model_accepts_loss_kwargs and num_items_in_batch is not None)
                    or self.compute_loss_func is not None)

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """Fused: a momentum-free ``torch.optim.SGD`` that only carries the lr schedule (it never sees a
        gradient, so it never holds state). Otherwise Hugging Face's optimizer."""
        if not self.fused or self.optimizer is not None:
            return super().create_optimizer(model) if model is not None else super().create_optimizer()
        params = [p for p in (model or self.model).parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(params, lr=self.args.learning_rate)
        return self.optimizer

    # -- checkpoints ------------------------------------------------------------------------------------

    def _save_rng_state(self, output_dir: str) -> None:
        """Hugging Face's RNG states, then the estimator's state (``fwdgrad_estimator.pt``, written
        atomically)."""
        super()._save_rng_state(output_dir)
        import io

        buf = io.BytesIO()
        torch.save(self.estimator.state_dict(), buf)
        write_atomic(os.path.join(output_dir, ESTIMATOR_FILE), buf.getvalue())

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Hugging Face's weights, then the estimator's state; a checkpoint without it (not written by this
        Trainer, or with ``save_only_model``) raises ``ValueError``, since the resumed run's directions
        would differ from an uninterrupted one's."""
        path = os.path.join(resume_from_checkpoint, ESTIMATOR_FILE)
        if not os.path.isfile(path):
            raise ValueError(f"fwdgrad Trainer: {resume_from_checkpoint!r} holds no {ESTIMATOR_FILE} (the "
                             "estimator's state), so the run cannot resume as it would have gone on")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # unpickling errors come in many types
            raise ValueError(f"fwdgrad Trainer: {path!r} is not readable: {exc}".splitlines()[0]) from None
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        self.estimator.load_state_dict(state)


def _build_estimator(spec: str | Estimator, options: dict[str, Any] | None, seed: int) -> Estimator:
    where = "fwdgrad Trainer"
    if isinstance(spec, Estimator):
        if options:
            raise ValueError(f"{where}: estimator_options are for a registry name, not an Estimator instance")
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"{where}: estimator must be a registry name or an fwdgrad.Estimator, got {spec!r}")
    opts = dict(options or {})
    if "generator" not in opts:
        opts.setdefault("seed", int(seed))
    return estimator(spec, **opts)


def label_word_accuracy(eval_pred: Any) -> dict[str, float]:
    """``compute_metrics`` for prompt tasks (:mod:`fwdgrad.data.prompts`): the share of examples whose
    largest label-word logit is their label. ``eval_pred`` is Hugging Face's ``EvalPrediction``
    (``predictions [N, C]``, ``label_ids [N]``)."""
    logits, labels = eval_pred.predictions, eval_pred.label_ids
    logits = logits[0] if isinstance(logits, tuple) else logits
    pred = torch.as_tensor(logits).argmax(-1)
    return {"accuracy": float((pred == torch.as_tensor(labels)).double().mean())}
