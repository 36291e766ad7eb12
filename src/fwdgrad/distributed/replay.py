r"""A compact log of seed-sharing training, and the replay that rebuilds the final weights from it.

Everything a seed-sharing step does to the weights is a function of the initial weights, the base seed,
the step number, the step's scalars and the update rule. The log holds exactly that, in one of two kinds:

* ``"fused-sgd"`` (:meth:`SeedSharingSGD.step <fwdgrad.distributed.SeedSharingSGD.step>` with
  ``SeedSharingSGD(..., log=ReplayLog(path, opt))``): one record per step of ``step`` (uint64), ``lr``,
  ``weight_decay``, ``momentum``, ``loss`` and the ``S`` scalars the update used (float64; ``S = K`` in data
  mode, ``K·W`` in tangent mode): ``40 + 8·S`` bytes per step;
* ``"optimizer"`` (:meth:`SeedSharingSGD.accumulate <fwdgrad.distributed.SeedSharingSGD.accumulate>` then a
  ``torch.optim`` optimizer's step, as ``fwdgrad train --replay-log`` does;
  ``ReplayLog(path, opt, optimizer=..., clip_grad_norm=...)`` and :meth:`ReplayLog.append_optimizer_step`):
  the header holds the optimizer's class and hyper-parameters and the clipping norm, and one record per
  step holds ``step`` (uint64), the ``lr`` the optimizer used (a schedule's value), ``loss`` and the ``S``
  scalars: ``24 + 8·S`` bytes per step.

The header (JSON, written once) also holds the configuration of :meth:`SeedSharingSGD.config
<fwdgrad.distributed.SeedSharingSGD.config>` (estimator, tangents, K, mode, base seed, world size, parameter
names, shapes and dtypes), the digests of the initial trainable parameters and of everything else in the
model's state (buffers, frozen parameters: copied unchanged by the replay), torch's version and thread count.
Models whose forward pass updates a buffer (BatchNorm's running statistics) are refused: the replay would
copy those buffers from the initial state, so the rebuilt model would not be the trained one.

:func:`replay` re-runs the same kernels on the same regenerated directions — the fused update, or the
estimate written into ``.grad`` (:meth:`ImplicitGradient.accumulate
<fwdgrad.estimators.gradient.ImplicitGradient.accumulate>`), ``clip_grad_norm_`` and a fresh optimizer of
the same class stepping with each step's recorded lr — so on the same software and hardware the result is
bit for bit the trained model (``fwdgrad replay LOG --init INIT.pt --out MODEL.pt``). The loss itself is
never evaluated again, so randomness inside it (dropout) needs no record: the scalars carry its effect.

File layout: ``b"FWDGRPL1"``, a little-endian uint32 header length, the header, then the records.

Example:
    >>> import tempfile, pathlib, torch, torch.nn.functional as F
    >>> from fwdgrad.distributed import SeedSharingSGD, ReplayLog, replay
    >>> model = torch.nn.Linear(3, 2); init = {k: v.clone() for k, v in model.state_dict().items()}
    >>> x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    >>> shared, adam = SeedSharingSGD(model, seed=0), torch.optim.Adam(model.parameters(), lr=1e-2)
    >>> with tempfile.TemporaryDirectory() as d:
    ...     log = ReplayLog(pathlib.Path(d) / "run.log", shared, optimizer=adam)
    ...     for _ in range(3):
    ...         adam.zero_grad(); loss = shared.accumulate(lambda m: F.cross_entropy(m(x), y)); adam.step()
    ...         log.append_optimizer_step(shared.step_count - 1, adam.param_groups[0]["lr"], loss,
    ...                                   shared.last_scalars)
    ...     log.close(); out = replay(log.path, init)
    >>> all(torch.equal(out[k], v) for k, v in model.state_dict().items())
    True
"""

from __future__ import annotations

import ast
import io
import json
import math
import os
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fwdgrad._io import check_digest, read_torch, save_verified, write_atomic
from fwdgrad.distributed.seeds import ConcatSource, after_exchange, digest, shared_source
from fwdgrad.estimators import Gradient, ImplicitGradient, estimator, estimator_class

Tensor = torch.Tensor
MAGIC = b"FWDGRPL1"
RECORD = struct.Struct("<Q4d")  # fused SGD: step, lr, weight_decay, momentum, loss
OPTIMIZER_RECORD = struct.Struct("<Q2d")  # accumulate + torch.optim: step, lr, loss
KINDS = ("fused-sgd", "optimizer")


def record_bytes(scalars: int, kind: str = "fused-sgd") -> int:
    """Bytes of one step's record with ``scalars`` scalars: ``40 + 8·scalars`` (fused SGD) or ``24 + 8·scalars``
    (``kind="optimizer"``)."""
    if kind not in KINDS:
        raise ValueError(f"fwdgrad.distributed.record_bytes: kind must be one of {KINDS}, got {kind!r}")
    return (RECORD.size if kind == "fused-sgd" else OPTIMIZER_RECORD.size) + 8 * scalars


def running_buffers(model: nn.Module) -> list[str]:
    """Names of the buffers that the forward pass of ``model`` updates in training mode: the running
    statistics of BatchNorm/InstanceNorm layers with ``track_running_stats``."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats:
            out.extend(f"{name}.{b}" if name else b for b, t in m.named_buffers(recurse=False) if t is not None)
    return out


def check_replayable(where: str, model: nn.Module) -> None:
    """``ValueError`` when a replay log of ``model``'s training could not rebuild it: a forward pass that
    updates buffers (:func:`running_buffers`), which the replay copies unchanged from the initial state."""
    running = running_buffers(model)
    if running:
        raise ValueError(f"{where}: the model updates buffer(s) {running[:3]} in its forward pass (running "
                         "statistics); a replay rebuilds the trainable parameters only, so it would not give "
                         "the trained model (use GroupNorm/LayerNorm, or track_running_stats=False)")


def _frozen(state: Mapping[str, Any], names: list[str]) -> list[tuple[str, Tensor]]:
    """The tensors of a state dict that are not replayed (buffers, frozen parameters), by name."""
    skip = set(names)
    return [(k, v) for k, v in sorted(state.items()) if k not in skip and isinstance(v, Tensor)]


def _jsonable(value: Any) -> bool:
    if value is None or isinstance(value, bool | int | str):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, tuple | list):
        return all(_jsonable(v) for v in value)
    return False


def optimizer_spec(where: str, optimizer: torch.optim.Optimizer, params: list[Tensor]) -> dict[str, Any]:
    """``{"class": name, "options": {...}}`` of a ``torch.optim`` optimizer with one parameter group holding
    exactly ``params`` in order; ``ValueError`` naming what cannot be rebuilt from it."""
    cls = type(optimizer)
    if not isinstance(optimizer, torch.optim.Optimizer) or getattr(torch.optim, cls.__name__, None) is not cls:
        raise ValueError(f"{where}: optimizer {cls.__name__!r} is not a torch.optim class; the replay rebuilds the "
                         "optimizer by its torch.optim name")
    if len(optimizer.param_groups) != 1:
        raise ValueError(f"{where}: the optimizer has {len(optimizer.param_groups)} parameter groups; the replay "
                         "supports one")
    group = optimizer.param_groups[0]
    if len(group["params"]) != len(params) or any(a is not b for a, b in zip(group["params"], params, strict=False)):
        raise ValueError(f"{where}: the optimizer's parameters are not the seed-shared parameters in their order")
    options = {k: group[k] for k in optimizer.defaults if k in group and k != "lr"}
    bad = sorted(k for k, v in options.items() if not _jsonable(v))
    if bad:
        raise ValueError(f"{where}: optimizer option {bad[0]}={options[bad[0]]!r} cannot be recorded in the log")
    return {"class": cls.__name__, "options": options}


class ReplayLog:
    """Writer of a replay log (rank 0 of a :class:`~fwdgrad.distributed.SeedSharingSGD` appends to it).

    Args:
        path: the log file. A new log's header is written atomically (temporary file, then rename).
        opt: the :class:`~fwdgrad.distributed.SeedSharingSGD` whose steps are logged; its weights now are the
            initial weights of the log (``opt.step_count`` must be 0), unless ``resume`` is given.
        resume: continue an existing log at this step: records from this step on are cut off (a checkpoint
            taken at step ``resume``), the header must match ``opt``'s configuration (and ``optimizer``'s).
        optimizer: for a log of ``accumulate`` + ``optimizer.step()`` (kind ``"optimizer"``; append with
            :meth:`append_optimizer_step`); ``None``: a log of fused SGD steps (:meth:`append`).
        clip_grad_norm: the ``max_norm`` of ``torch.nn.utils.clip_grad_norm_`` applied to ``.grad`` before
            every optimizer step, or ``None``.
    """

    def __init__(
        self, path: str | os.PathLike[str], opt: Any, resume: int | None = None, *,
        optimizer: torch.optim.Optimizer | None = None, clip_grad_norm: float | None = None,
    ) -> None:
        where = "fwdgrad.distributed.ReplayLog"
        self.path = Path(path)
        self.kind = "fused-sgd" if optimizer is None else "optimizer"
        if optimizer is None and clip_grad_norm is not None:
            raise ValueError(f"{where}: clip_grad_norm={clip_grad_norm!r} applies to an optimizer's .grad; "
                             "the fused SGD step has none")
        clip = clip_grad_norm
        if clip is not None and (isinstance(clip, bool) or not isinstance(clip, int | float)
                                 or not 0 < clip < math.inf):
            raise ValueError(f"{where}: clip_grad_norm must be a positive finite number, got {clip_grad_norm!r}")
        check_replayable(where, opt.model)
        config = opt.config()
        names = list(opt.params)
        self.scalars = config["num_directions"] * (config["world"] if config["mode"] == "tangent" else 1)
        first = next(iter(opt.params.values()))
        self.dtype = str(first.dtype)
        header: dict[str, Any] = {
            "format": 1, "kind": self.kind, "config": config, "init_digest": opt.weights_digest(),
            "frozen_digest": digest(_frozen(opt.model.state_dict(), names)), "dtype": self.dtype,
            "device": first.device.type,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "scalars": self.scalars,
        }
        if optimizer is not None:
            header["optimizer"] = optimizer_spec(where, optimizer, list(opt.params.values()))
            header["clip_grad_norm"] = None if clip_grad_norm is None else float(clip_grad_norm)
        if resume is None:
            if opt.step_count != 0:
                raise ValueError(f"{where}: a new log starts at step 0, the optimizer is at step {opt.step_count}")
            raw = json.dumps(header).encode()
            write_atomic(self.path, MAGIC + struct.pack("<I", len(raw)) + raw)
        else:
            if not self.path.is_file():
                raise ValueError(f"{where}: cannot resume the replay log {self.path}: there is no such file")
            old, start = read_header(self.path)
            for key in ("kind", "config", "optimizer", "clip_grad_norm", "dtype"):
                if key not in old and key != "kind":  # a log written before the key existed
                    continue
                if old.get(key, "fused-sgd") != json.loads(json.dumps(header.get(key))):
                    raise ValueError(f"{where}: {self.path} was written with a different {key} "
                                     f"({old.get(key)!r}, now {header.get(key)!r})")
            have = (self.path.stat().st_size - start) // record_bytes(self.scalars, self.kind)
            if have < resume:
                raise ValueError(f"{where}: {self.path} holds {have} steps, fewer than the {resume} to resume after")
            with open(self.path, "r+b") as f:
                f.truncate(start + resume * record_bytes(self.scalars, self.kind))
        self._start = read_header(self.path)[1]
        self._file = open(self.path, "ab")

    def _values(self, where: str, dirs: Tensor) -> bytes:
        values = dirs.detach().double().cpu().contiguous()
        if values.numel() != self.scalars:
            raise ValueError(f"{where}: {values.numel()} scalars, expected {self.scalars}")
        return values.numpy().tobytes()

    def append(self, step: int, lr: float, weight_decay: float, momentum: float, loss: float, dirs: Tensor) -> None:
        """Write one fused SGD step's record and flush it."""
        where = "fwdgrad.distributed.ReplayLog.append"
        if self.kind != "fused-sgd":
            raise ValueError(f"{where}: this is a log of optimizer steps; use append_optimizer_step")
        self._file.write(RECORD.pack(step, lr, weight_decay, momentum, loss) + self._values(where, dirs))
        self._file.flush()

    def append_optimizer_step(self, step: int, lr: float, loss: float | Tensor, dirs: Tensor) -> None:
        """Write the record of step ``step`` of ``accumulate`` + ``optimizer.step()`` (``lr``: the lr the
        optimizer used, ``dirs``: the exchanged scalars, :attr:`SeedSharingSGD.last_scalars
        <fwdgrad.distributed.SeedSharingSGD.last_scalars>`) and flush it."""
        where = "fwdgrad.distributed.ReplayLog.append_optimizer_step"
        if self.kind != "optimizer":
            raise ValueError(f"{where}: this is a log of fused SGD steps; use append")
        if isinstance(lr, Tensor) or not isinstance(lr, int | float):
            raise ValueError(f"{where}: lr must be a float, got {lr!r}")
        loss_value = float(loss.detach().double().mean()) if isinstance(loss, Tensor) else float(loss)
        self._file.write(OPTIMIZER_RECORD.pack(step, lr, loss_value) + self._values(where, dirs))
        self._file.flush()

    def truncate(self, steps: int) -> None:
        """Keep the first ``steps`` records only (a run that restores earlier weights)."""
        self._file.flush()
        self._file.truncate(self._start + steps * record_bytes(self.scalars, self.kind))

    def close(self) -> None:
        self._file.close()


def read_header(path: str | os.PathLike[str]) -> tuple[dict[str, Any], int]:
    """``(header, offset of the first record)`` of a replay log; a file that is not one raises ``ValueError``."""
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:8] != MAGIC:
            raise ValueError(f"fwdgrad replay: {path} is not a fwdgrad replay log")
        (size,) = struct.unpack("<I", head[8:])
        try:
            header = json.loads(f.read(size))
        except ValueError:
            raise ValueError(f"fwdgrad replay: {path} has a damaged header") from None
        kind = header.get("kind", "fused-sgd") if isinstance(header, dict) else None
        if kind not in KINDS or not isinstance(header.get("config"), dict):
            raise ValueError(f"fwdgrad replay: {path} has a header of unknown kind {kind!r}")
        return header, 12 + size


def records(path: str | os.PathLike[str]) -> Iterator[tuple[Any, ...]]:
    """The records of a log: ``(step, lr, weight_decay, momentum, loss, scalars [S] float64)`` for a fused
    SGD log, ``(step, lr, loss, scalars [S] float64)`` for an optimizer log."""
    header, start = read_header(path)
    kind = header.get("kind", "fused-sgd")
    head = RECORD if kind == "fused-sgd" else OPTIMIZER_RECORD
    size = record_bytes(header["scalars"], kind)
    with open(path, "rb") as f:
        f.seek(start)
        while True:
            raw = f.read(size)
            if len(raw) < size:
                if raw:
                    raise ValueError(f"fwdgrad replay: {path} ends with a truncated record")
                return
            yield *head.unpack_from(raw), torch.frombuffer(bytearray(raw[head.size:]), dtype=torch.float64)


def _estimator(where: str, config: dict[str, Any]) -> Any:
    """The logged run's estimator when it has seed-sharing hooks of its own (``zo``, ``zo-sign``: their
    directions and ``post_exchange``), rebuilt from the options in the header and checked against the
    recorded ``estimator_config``; ``None`` for estimators drawing ``TangentSource`` directions (``fg-w``)."""
    name = config["estimator"]
    try:
        cls = estimator_class(name)
    except (KeyError, ValueError):
        raise ValueError(f"{where}: the log names estimator {name!r}, which is not registered here") from None
    if not hasattr(cls, "shared_source"):
        return None
    try:
        options = {k: ast.literal_eval(v) for k, v in config["options"].items()}
    except (ValueError, SyntaxError):
        raise ValueError(f"{where}: the log's options {config['options']} of {name!r} cannot be read back") from None
    est = estimator(name, generator=torch.Generator(), **options)
    if json.loads(json.dumps(est.shared_config())) != config.get("estimator_config"):
        raise ValueError(f"{where}: {name} rebuilt from the log's options has the settings {est.shared_config()}, "
                         f"the log records {config.get('estimator_config')}")
    return est


def _gradient(est: Any, config: dict[str, Any], params: list[Tensor], step: int, loss: float, dirs: Tensor,
              dtype: torch.dtype) -> Gradient:
    """Step ``step``'s update from its logged scalars: the directions of every stream drawn again, and the
    estimator's ``post_exchange`` (zo-sign's sign) as the training applied it."""
    streams = range(config["world"]) if config["mode"] == "tangent" else range(1)
    parts = [shared_source(est, config["tangents"], params, config["num_directions"], config["seed"], step, s)
             for s in streams]
    source = parts[0] if len(parts) == 1 else ConcatSource(parts)  # type: ignore[arg-type]
    grad = ImplicitGradient(torch.tensor(loss, dtype=dtype), dirs.to(dtype), source)  # type: ignore[arg-type]
    return after_exchange(est, grad)


def _optimizer(where: str, spec: dict[str, Any], params: list[Tensor]) -> torch.optim.Optimizer:
    cls = getattr(torch.optim, spec["class"], None)
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ValueError(f"{where}: the log names optimizer {spec['class']!r}, which torch.optim does not have")
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in spec["options"].items()}
    return cls(params, lr=1.0, **options)  # the lr of every step is set from its record


def check_torch_version(where: str, path: str | os.PathLike[str], header: Mapping[str, Any],
                        allow_mismatch: bool = False) -> None:
    """``ValueError`` when the log ``path`` was written under another torch version than this one's: the
    kernels (and so the rounding) may differ, and the replay would silently not be the trained model.
    ``allow_mismatch``: replay anyway (the result may then differ from the trained weights in the last bits)."""
    recorded = header.get("torch")
    if recorded is None or recorded == torch.__version__ or allow_mismatch:
        return
    raise ValueError(f"{where}: {path} was written under torch {recorded} and this is torch {torch.__version__}; "
                     "a bit-identical replay needs the same version (--allow-version-mismatch, or "
                     "allow_version_mismatch=True, replays anyway, possibly not bit for bit)")


def replay(path: str | os.PathLike[str], init: Mapping[str, Tensor], *,
           allow_version_mismatch: bool = False) -> dict[str, Tensor]:
    """The state dict ``init`` with its trainable parameters advanced through every step of log ``path``.

    ``init`` must hold the parameters the log names, with the initial weights' digest, and the tensors the log
    does not replay (buffers, frozen parameters) as they were at the start; those are copied unchanged. Runs
    with the thread count the training used. A log written under another torch version is refused unless
    ``allow_version_mismatch`` (:func:`check_torch_version`).
    """
    where = "fwdgrad replay"
    header, _ = read_header(path)
    check_torch_version(where, path, header, allow_version_mismatch)
    config, kind = header["config"], header.get("kind", "fused-sgd")
    names = [n for n, _, _ in config["params"]]
    missing = [n for n in names if n not in init]
    if missing:
        raise ValueError(f"{where}: the initial weights lack parameter(s) {missing[:3]} named by {path}")
    state = {k: (v.detach().clone() if isinstance(v, Tensor) else v) for k, v in init.items()}
    params = [state[n] for n in names]
    if digest(list(zip(names, params, strict=True))) != header["init_digest"]:
        raise ValueError(f"{where}: the initial weights do not match the digest recorded in {path} (initial "
                         f"parameters digest {header['init_digest']:016x}, these have "
                         f"{digest(list(zip(names, params, strict=True))):016x})")
    if "frozen_digest" in header and digest(_frozen(state, names)) != header["frozen_digest"]:
        raise ValueError(f"{where}: the buffers or frozen parameters of the initial state do not match the digest "
                         f"recorded in {path} (give the whole initial state dict of the run)")
    dtype = getattr(torch, header["dtype"].removeprefix("torch.")) if "dtype" in header else params[0].dtype
    device = header.get("device", "cpu")
    if device != "cpu":  # the same kernels as the training: on a device of the same type (untested: no GPU here)
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"{where}: {path} was written by a run on {device!r}; bit-identical replay needs the "
                             "same kind of device, and none is available here")
        params = [p.to(device) for p in params]
    est = _estimator(where, config)
    threads = torch.get_num_threads()
    torch.set_num_threads(header["threads"])
    try:
        expected = 0
        if kind == "fused-sgd":
            buffers: dict[Tensor, Tensor] = {}
            for step, lr, wd, mom, loss, dirs in records(path):
                if step != expected:
                    raise ValueError(f"{where}: {path} jumps from step {expected} to step {step}")
                grad = _gradient(est, config, params, step, loss, dirs, dtype)
                grad.sgd_(where, params, lr, wd, mom, buffers)
                expected += 1
        else:
            optimizer = _optimizer(where, header["optimizer"], params)
            clip = header.get("clip_grad_norm")
            for step, lr, loss, dirs in records(path):
                if step != expected:
                    raise ValueError(f"{where}: {path} jumps from step {expected} to step {step}")
                for p in params:
                    p.grad = None
                _gradient(est, config, params, step, loss, dirs, dtype).accumulate(where, params, names)
                if clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, clip)
                optimizer.param_groups[0]["lr"] = lr
                optimizer.step()
                expected += 1
            for p in params:
                p.grad = None
    finally:
        torch.set_num_threads(threads)
    for n, p in zip(names, params, strict=True):
        state[n] = p.to(state[n].device) if p.device != state[n].device else p
    return state


INIT_FORMAT = "fwdgrad-replay-init/1"


def save_initial_state(path: str | os.PathLike[str], state: Mapping[str, Tensor]) -> Path:
    """Write the initial state dict of a replay log to ``path`` atomically, with its format tag
    (``fwdgrad-replay-init/1``) and content digest (:func:`fwdgrad._io.save_verified`)."""
    return save_verified(path, {"state_dict": {k: v.detach().cpu().clone() for k, v in state.items()}}, INIT_FORMAT)


def load_initial_state(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """The state dict in ``path``: a file of :func:`save_initial_state` (``fwdgrad train --replay-log``'s
    ``.init.pt``) or of ``fwdgrad train --save-model``, whose content digest is checked, or a plain
    ``torch.save``-d state dict (a user's own; the replay still checks its parameters against the log's
    digest). ``ValueError`` naming the file when it is not a readable torch file, is damaged or holds no
    state dict."""
    state = read_torch(path, "torch file of initial weights")
    if isinstance(state, Mapping) and "format" in state:
        check_digest(path, state)
        state = state.get("state_dict")
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"fwdgrad replay: {str(path)!r} does not hold a state dict")
    return dict(state)


def replay_file(log: str | os.PathLike[str], init: str | os.PathLike[str], out: str | os.PathLike[str], *,
                allow_version_mismatch: bool = False) -> int:
    """``fwdgrad replay``: read ``init`` (see :func:`load_initial_state`), replay ``log``, save the resulting
    state dict to ``out`` atomically; returns the number of steps replayed."""
    check_torch_version("fwdgrad replay", log, read_header(log)[0], allow_version_mismatch)
    final = replay(log, load_initial_state(init), allow_version_mismatch=allow_version_mismatch)
    buf = io.BytesIO()
    torch.save(final, buf)
    write_atomic(out, buf.getvalue())
    return sum(1 for _ in records(log))
