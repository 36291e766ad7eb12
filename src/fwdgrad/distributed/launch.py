"""Starting the processes of a world: from ``torchrun``'s environment, or on one machine without it.

:func:`init_from_env` joins the world described by the variables ``torchrun`` sets (``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) and returns a counted :class:`~fwdgrad.distributed.comm.Comm`;
:func:`spawn_local` starts ``nproc`` copies of a command with those variables set (what ``fwdgrad train
--nproc N`` is meant to call), waits for all of them within a deadline, and stops the others once one fails.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence

import torch

from fwdgrad.distributed.comm import Comm, default_timeout


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_from_env(timeout_s: float = 60.0, backend: str | None = None, probe_s: float = 3.0) -> Comm:
    """Initialise the default process group from ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``.

    Args:
        timeout_s: how long a collective (and the rendezvous) may wait for a peer before failing.
        backend: ``"gloo"`` or ``"nccl"``; default NCCL when CUDA is available, else gloo.
        probe_s: see :class:`~fwdgrad.distributed.comm.Comm`.

    Rank 0 hosts the store, unless an agent (``torchrun``) already does (``TORCHELASTIC_USE_AGENT_STORE``).
    """
    import torch.distributed as dist

    where = "fwdgrad.distributed.init_from_env"
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        addr, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ["MASTER_PORT"])
    except (KeyError, ValueError) as exc:
        raise ValueError(f"{where}: RANK, WORLD_SIZE and MASTER_PORT must be set to integers ({exc})") from exc
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    timeout = default_timeout(timeout_s)
    store = dist.TCPStore(addr, port, world, is_master=(rank == 0 and not agent), timeout=timeout)
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":  # one GPU per process, by local rank
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    return Comm(store=store, probe_s=probe_s)


def spawn_local(
    nproc: int, command: Sequence[str], *, timeout_s: float, env: Mapping[str, str] | None = None,
    grace_s: float = 10.0,
) -> list[int]:
    """Run ``nproc`` copies of ``command`` (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
    ``MASTER_PORT`` set for each) and return their exit codes, by rank.

    A copy that fails gives the others ``grace_s`` seconds to stop on their own (they should, with an error
    naming the lost rank), then they are killed; past ``timeout_s`` in all every copy still running is
    killed (exit code ``-9``).
    """
    port = free_port()
    base = dict(os.environ if env is None else env)
    procs = []
    for r in range(nproc):
        e = {**base, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(nproc),
             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen(list(command), env=e))
    deadline = time.monotonic() + timeout_s
    failed_at: float | None = None
    while True:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes):
            return [int(c) for c in codes]  # type: ignore[arg-type]
        now = time.monotonic()
        if failed_at is None and any(c not in (None, 0) for c in codes):
            failed_at = now
        if now > deadline or (failed_at is not None and now > failed_at + grace_s):
            for p in procs:
                if p.poll() is None:
                    p.kill()
            return [int(p.wait()) for p in procs]
        time.sleep(0.05)


def python_command(*args: str) -> list[str]:
    """``[sys.executable, *args]``."""
    return [sys.executable, *args]
