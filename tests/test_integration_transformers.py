"""fwdgrad.integrations.transformers.Trainer: the Hugging Face Trainer with an estimator's step.

Tiny random-config BERT classifiers (2 layers, hidden 32) on generated token data, on CPU. What is proved:
a run resumed from a checkpoint ends with exactly the weights of an uninterrupted run (``.grad`` mode with
AdamW, a linear schedule, gradient accumulation and clipping; with dropout; fused mode with a warm-up
schedule; an unseeded estimator), and does not without the estimator's saved state; the
fused mode allocates no optimizer state and no ``.grad`` and follows the lr schedule; unsupported settings
raise a clear error."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fwdgrad  # noqa: E402
from fwdgrad.integrations.transformers import ESTIMATOR_FILE, Trainer  # noqa: E402

VOCAB, LENGTH = 40, 8


def _model(seed: int = 0, hidden: int = 32, layers: int = 2, vocab: int = VOCAB):  # -> BertForSequenceClassification
    cfg = transformers.BertConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=2 * hidden, max_position_embeddings=16, num_labels=2)
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(cfg)


def _data(n: int = 16, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, LENGTH), generator=g)
    labels = (ids[:, 0] > VOCAB // 2).long()  # learnable from the first token
    return [{"input_ids": ids[i], "labels": labels[i]} for i in range(n)]


def _args(out, **kw):  # -> TrainingArguments
    base = dict(per_device_train_batch_size=4, learning_rate=1e-3, report_to=[], use_cpu=True, disable_tqdm=True,
                save_strategy="steps", save_steps=3, logging_strategy="no", seed=7, dataloader_num_workers=0)
    return transformers.TrainingArguments(str(out), **{**base, **kw})


def _trainer(out, model=None, **kw) -> Trainer:
    est = {k: kw.pop(k) for k in ("estimator", "estimator_options", "fused", "dropout") if k in kw}
    t = Trainer(model=model if model is not None else _model(), args=_args(out, **kw), train_dataset=_data(), **est)
    t.remove_callback(transformers.PrinterCallback)
    return t


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


def _resume_case(mode: str) -> dict:
    if mode == "grad":  # AdamW, linear decay, accumulation over 2 micro-batches, clipping at 1.0
        return dict(estimator="fg-w", estimator_options={"num_directions": 2}, gradient_accumulation_steps=2,
                    max_grad_norm=1.0, lr_scheduler_type="linear", max_steps=6)
    if mode == "grad-dropout":  # dropout on: its masks come from torch's global RNG, which HF checkpoints
        return dict(estimator="fg-w", dropout=True, gradient_accumulation_steps=2, max_steps=6)
    if mode == "fused":  # MeZO: fused zo, linear warm-up then decay
        return dict(estimator="zo", fused=True, max_grad_norm=0, lr_scheduler_type="linear", warmup_steps=2,
                    max_steps=6)
    # an estimator instance without a seed draws from torch's global RNG (HF's rng_state.pth carries it)
    return dict(estimator=fwdgrad.estimator("zo"), fused=True, max_grad_norm=0, max_steps=6)


@pytest.mark.parametrize("mode", ["grad", "grad-dropout", "fused", "fused-global-rng"])
def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tmp_path, mode) -> None:
    """Checkpoint 3 of 6 steps is mid-epoch (16 examples, batches of 4), so HF skips the batches done."""
    whole = _trainer(tmp_path / "whole", **_resume_case(mode))
    whole.train()
    start = _model()
    assert not torch.equal(start.classifier.weight, whole.model.classifier.weight)  # it trained
    checkpoint = tmp_path / "whole" / "checkpoint-3"
    assert (checkpoint / ESTIMATOR_FILE).is_file()
    resumed = _trainer(tmp_path / "resumed", model=start, **_resume_case(mode))
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 6
    _assert_same_weights(whole.model, resumed.model)


def test_the_estimator_state_is_what_makes_the_resumed_run_equal(tmp_path, monkeypatch) -> None:
    """The control: with the saved estimator state not restored (its generator starts again from the
    seed), the resumed run ends elsewhere."""
    kw = _resume_case("fused")
    whole = _trainer(tmp_path / "whole", **kw)
    whole.train()
    resumed = _trainer(tmp_path / "resumed", model=_model(), **kw)
    monkeypatch.setattr(resumed.estimator, "load_state_dict", lambda state: None)
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-3"))
    assert not torch.equal(whole.model.classifier.weight, resumed.model.classifier.weight)


def test_a_checkpoint_without_the_estimator_state_is_refused(tmp_path) -> None:
    kw = dict(estimator="zo", fused=True, max_grad_norm=0, max_steps=3)
    _trainer(tmp_path / "whole", **kw).train()
    checkpoint = tmp_path / "whole" / "checkpoint-3"
    (checkpoint / ESTIMATOR_FILE).unlink()
    with pytest.raises(ValueError, match=f"holds no {ESTIMATOR_FILE}"):
        _trainer(tmp_path / "resumed", **kw).train(resume_from_checkpoint=str(checkpoint))


def test_fused_mode_holds_no_optimizer_state_and_no_gradient(tmp_path) -> None:
    trainer = _trainer(tmp_path, estimator="zo", fused=True, max_grad_norm=0, max_steps=3, save_strategy="no",
                       optim="adamw_torch")
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer,
                      torch.optim.SGD)
    assert trainer.optimizer.state_dict()["state"] == {}
    assert all(p.grad is None for p in trainer.model.parameters())


def test_fused_mode_is_sgd_step_at_the_scheduled_learning_rate(tmp_path) -> None:
    """One batch holds the whole data set, so each Trainer step is ``sgd_step`` on all of it at the linear
    schedule's lr ``lr0·(T − t)/T``. The Trainer's batch is a permutation of the data, so the mean loss
    agrees up to rounding, which a finite difference divides by 2ε: float64 keeps that far below the tolerance."""
    data, steps, lr0 = _data(), 3, 0.05
    trainer = _trainer(tmp_path, model=_model().double(), estimator="zo", fused=True, max_grad_norm=0,
                       max_steps=steps, save_strategy="no", per_device_train_batch_size=len(data),
                       learning_rate=lr0, lr_scheduler_type="linear")
    trainer.train()
    model, est = _model().double(), fwdgrad.estimator("zo", seed=7)  # the Trainer seeds it with args.seed
    model.eval()
    ids = torch.stack([d["input_ids"] for d in data])
    labels = torch.stack([d["labels"] for d in data])
    for t in range(steps):
        est.sgd_step(model, lambda m: m(input_ids=ids, labels=labels).loss, lr=lr0 * (steps - t) / steps)
    for p, q in zip(model.parameters(), trainer.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


def test_grad_mode_writes_what_the_estimator_writes(tmp_path) -> None:
    """``.grad`` mode: one step of plain SGD equals ``est(model, loss_fn)`` then ``torch.optim.SGD``."""
    data, lr = _data(), 0.1
    trainer = _trainer(tmp_path, estimator="fg-w", max_grad_norm=0, max_steps=1, save_strategy="no",
                       per_device_train_batch_size=len(data), learning_rate=lr, optim="sgd",
                       lr_scheduler_type="constant", weight_decay=0.0)
    trainer.train()
    model, est = _model(), fwdgrad.estimator("fg-w", seed=7)
    model.eval()
    ids = torch.stack([d["input_ids"] for d in data])
    labels = torch.stack([d["labels"] for d in data])
    est(model, lambda m: m(input_ids=ids, labels=labels).loss)
    torch.optim.SGD(model.parameters(), lr=lr).step()
    for p, q in zip(model.parameters(), trainer.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


def _step_peaks(tmp_path, fused: bool) -> tuple[int, int, int, int]:
    """(forward peak, step peak, parameter bytes, largest tensor bytes) of one Trainer step of ``zo``."""
    from fwdgrad.training.memory import peak_memory_probe

    model = _model(hidden=256, layers=4, vocab=64)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    trainer = _trainer(tmp_path, model=model, estimator="zo", fused=fused, max_grad_norm=0, max_steps=1,
                       save_strategy="no")
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    batch = trainer.data_collator(_data()[:4])
    trainer.current_gradient_accumulation_steps = 1
    trainer.training_step(trainer.model, batch)  # warm-up (and, for .grad, the first gradient exists)
    probe = peak_memory_probe()
    if probe is None:
        pytest.skip("no /proc/self/clear_refs: the peak resident memory cannot be measured here")
    with torch.no_grad():
        trainer.model(**batch)
    forward_peak = probe()
    trainer.model.zero_grad(set_to_none=True)
    probe = peak_memory_probe()
    trainer.training_step(trainer.model, batch)
    step_peak = probe()
    assert step_peak is not None and forward_peak is not None
    assert all((p.grad is None) == fused for p in trainer.model.parameters())
    return forward_peak, step_peak, param_bytes, largest


def test_fused_step_peak_memory_is_a_forward_pass_not_a_gradient(tmp_path) -> None:
    """The resident-memory high-water mark of one fused Trainer step (after a step that warms the allocator)
    stays within a forward pass's peak plus a small fraction of the parameters' bytes, where the same step
    writing ``.grad`` (the control) adds at least the parameters' bytes. The model has many similar tensors,
    as the fused step's temporaries are one tensor's direction (measured once: 0.95 MiB fused, 8.5 MiB
    ``.grad``, parameters 8.4 MiB, forward 0.4 MiB)."""
    forward_peak, fused_peak, param_bytes, largest = _step_peaks(tmp_path / "fused", fused=True)
    assert fused_peak <= forward_peak + 2 * largest + param_bytes // 4, (fused_peak, forward_peak, param_bytes)
    _, grad_peak, _, _ = _step_peaks(tmp_path / "grad", fused=False)
    assert grad_peak >= 0.9 * param_bytes, (grad_peak, param_bytes)


def test_unsupported_settings_raise(tmp_path) -> None:
    with pytest.raises(ValueError, match="gradient_accumulation_steps=1"):
        _trainer(tmp_path, estimator="zo", fused=True, max_grad_norm=0, gradient_accumulation_steps=2)
    with pytest.raises(ValueError, match=r"max_grad_norm=0"):
        _trainer(tmp_path, estimator="zo", fused=True)  # Hugging Face's default clips at 1.0
    with pytest.raises(ValueError, match="per-example losses"):
        _trainer(tmp_path, estimator="fg-a")
    with pytest.raises(ValueError, match="has no option 'bogus'"):
        _trainer(tmp_path, estimator="zo", estimator_options={"bogus": 1})
    trainer = _trainer(tmp_path, estimator="zo")
    for flag, match in (("is_deepspeed_enabled", "DeepSpeed"), ("is_fsdp_enabled", "FSDP")):
        setattr(trainer, flag, True)
        with pytest.raises(ValueError, match=match):
            trainer._check_supported()
        setattr(trainer, flag, False)
    trainer.args._n_gpu = 2
    with pytest.raises(ValueError, match="DataParallel"):
        trainer._check_supported()
