r"""A compact log of seed-sharing training, and the replay that rebuilds the final weights from it.

Everything a seed-sharing step does to the weights is a function of the initial weights, the base seed,
the step number and the step's scalars. The log holds exactly that:

* a header (JSON, written once): the configuration of :meth:`SeedSharingSGD.config
  <fwdgrad.distributed.SeedSharingSGD.config>` (estimator, tangents, K, mode, base seed, world size,
  parameter names, shapes and dtypes), the digest of the initial weights, torch's version and thread count;
* one fixed-size record per step: ``step`` (uint64), ``lr``, ``weight_decay``, ``momentum``, ``loss`` and the
  ``S`` scalars the update used (float64; ``S = K`` in data mode, ``K·W`` in tangent mode), i.e.
  ``40 + 8·S`` bytes per step, whatever the model's size.

:func:`replay` re-runs the same update kernels (:class:`~fwdgrad.estimators.gradient.ImplicitGradient`'s
``sgd_``) on the same regenerated directions, so on the same software and hardware the result is bit for bit
the trained model (``fwdgrad replay LOG --init INIT.pt --out MODEL.pt``). Models whose forward pass changes
buffers (BatchNorm running statistics) are not covered: only trainable parameters are replayed.

File layout: ``b"FWDGRPL1"``, a little-endian uint32 header length, the header, then the records.
"""

from __future__ import annotations

import io
import json
import os
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from fwdgrad._io import write_atomic
from fwdgrad.distributed.seeds import ConcatSource, digest, step_source
from fwdgrad.estimators import ImplicitGradient

Tensor = torch.Tensor
MAGIC = b"FWDGRPL1"
RECORD = struct.Struct("<Q4d")  # step, lr, weight_decay, momentum, loss


def record_bytes(scalars: int) -> int:
    """Bytes of one step's record with ``scalars`` scalars: ``40 + 8·scalars``."""
    return RECORD.size + 8 * scalars


class ReplayLog:
    """Writer of a replay log (rank 0 of a :class:`~fwdgrad.distributed.SeedSharingSGD` appends to it).

    Args:
        path: the log file. A new log's header is written atomically (temporary file, then rename).
        opt: the :class:`~fwdgrad.distributed.SeedSharingSGD` whose steps are logged; its weights now are the
            initial weights of the log (``opt.step_count`` must be 0), unless ``resume`` is given.
        resume: continue an existing log at this step: records from this step on are cut off (a checkpoint
            taken at step ``resume``), the header must match ``opt``'s configuration.
    """

    def __init__(self, path: str | os.PathLike[str], opt: Any, resume: int | None = None) -> None:
        where = "fwdgrad.distributed.ReplayLog"
        self.path = Path(path)
        config = opt.config()
        self.scalars = config["num_directions"] * (config["world"] if config["mode"] == "tangent" else 1)
        if resume is None:
            if opt.step_count != 0:
                raise ValueError(f"{where}: a new log starts at step 0, the optimizer is at step {opt.step_count}")
            header = {"format": 1, "config": config, "init_digest": opt.weights_digest(),
                      "threads": torch.get_num_threads(), "torch": torch.__version__, "scalars": self.scalars}
            raw = json.dumps(header).encode()
            write_atomic(self.path, MAGIC + struct.pack("<I", len(raw)) + raw)
        else:
            header, start = read_header(self.path)
            if header["config"] != json.loads(json.dumps(config)):
                raise ValueError(f"{where}: {self.path} was written by a different configuration")
            with open(self.path, "r+b") as f:
                f.truncate(start + resume * record_bytes(self.scalars))
        self._file = open(self.path, "ab")

    def append(self, step: int, lr: float, weight_decay: float, momentum: float, loss: float, dirs: Tensor) -> None:
        """Write one step's record and flush it."""
        values = dirs.detach().double().cpu().contiguous()
        if values.numel() != self.scalars:
            raise ValueError(f"fwdgrad.distributed.ReplayLog.append: {values.numel()} scalars, expected {self.scalars}")
        self._file.write(RECORD.pack(step, lr, weight_decay, momentum, loss) + values.numpy().tobytes())
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_header(path: str | os.PathLike[str]) -> tuple[dict[str, Any], int]:
    """``(header, offset of the first record)`` of a replay log; a file that is not one raises ``ValueError``."""
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:8] != MAGIC:
            raise ValueError(f"fwdgrad replay: {path} is not a fwdgrad replay log")
        (size,) = struct.unpack("<I", head[8:])
        return json.loads(f.read(size)), 12 + size


def records(path: str | os.PathLike[str]) -> Iterator[tuple[int, float, float, float, float, Tensor]]:
    """The records of a log: ``(step, lr, weight_decay, momentum, loss, scalars [S] float64)``."""
    header, start = read_header(path)
    size = record_bytes(header["scalars"])
    with open(path, "rb") as f:
        f.seek(start)
        while True:
            raw = f.read(size)
            if len(raw) < size:
                if raw:
                    raise ValueError(f"fwdgrad replay: {path} ends with a truncated record")
                return
            step, lr, wd, mom, loss = RECORD.unpack_from(raw)
            yield step, lr, wd, mom, loss, torch.frombuffer(bytearray(raw[RECORD.size:]), dtype=torch.float64)


def replay(path: str | os.PathLike[str], init: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The state dict ``init`` with its trainable parameters advanced through every step of log ``path``.

    ``init`` must hold the parameters the log names, with the initial weights' digest; anything else in
    it (buffers) is copied unchanged. Runs with the thread count the training used.
    """
    where = "fwdgrad replay"
    header, _ = read_header(path)
    config = header["config"]
    names = [n for n, _, _ in config["params"]]
    missing = [n for n in names if n not in init]
    if missing:
        raise ValueError(f"{where}: the initial weights lack parameter(s) {missing[:3]} named by {path}")
    state = {k: (v.detach().clone() if isinstance(v, Tensor) else v) for k, v in init.items()}
    params = [state[n] for n in names]
    if digest(list(zip(names, params, strict=True))) != header["init_digest"]:
        raise ValueError(f"{where}: the initial weights do not match the digest recorded in {path}")
    tangents, k, base = config["tangents"], config["num_directions"], config["seed"]
    streams = range(config["world"]) if config["mode"] == "tangent" else range(1)
    buffers: dict[Tensor, Tensor] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(header["threads"])
    try:
        expected = 0
        for step, lr, wd, mom, loss, dirs in records(path):
            if step != expected:
                raise ValueError(f"{where}: {path} jumps from step {expected} to step {step}")
            parts = [step_source(tangents, params, k, base, step, s) for s in streams]
            source = parts[0] if len(parts) == 1 else ConcatSource(parts)
            grad = ImplicitGradient(torch.tensor(loss, dtype=params[0].dtype), dirs.to(params[0].dtype), source)
            grad.sgd_(where, params, lr, wd, mom, buffers)  # type: ignore[arg-type]
            expected += 1
    finally:
        torch.set_num_threads(threads)
    return state


def replay_file(log: str | os.PathLike[str], init: str | os.PathLike[str], out: str | os.PathLike[str]) -> int:
    """``fwdgrad replay``: read ``init`` (a state dict saved by ``torch.save``), replay ``log``, save the result
    to ``out`` atomically; returns the number of steps replayed."""
    state = torch.load(init, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise ValueError(f"fwdgrad replay: {init} does not hold a state dict")
    final = replay(log, state)
    buf = io.BytesIO()
    torch.save(final, buf)
    write_atomic(out, buf.getvalue())
    return sum(1 for _ in records(log))
