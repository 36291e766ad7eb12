"""Starting the processes of a world: from ``torchrun``'s environment, or on one machine without it.

:func:`init_from_env` joins the world described by the variables ``torchrun`` sets (``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) and returns a counted :class:`~fwdgrad.distributed.comm.Comm`;
:func:`spawn_local` starts ``nproc`` copies of a command with those variables set (what ``fwdgrad train
--nproc N`` is meant to call), waits for all of them within a deadline, and stops the others once one fails.
A SIGINT or SIGTERM sent to the launching process is forwarded to every copy, which then stops on its own
(:class:`LaunchInterrupted` tells the caller); the copies run in their own session, so a terminal's Ctrl-C
reaches them once, through the launcher. On Linux a copy that calls :func:`init_from_env` also asks the
kernel for SIGTERM when the launcher dies, even by SIGKILL (:func:`die_with_launcher`): no rank outlives it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

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
    A process started by :func:`spawn_local` first calls :func:`die_with_launcher`.
    """
    import torch.distributed as dist

    where = "fwdgrad.distributed.init_from_env"
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        addr, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ["MASTER_PORT"])
    except (KeyError, ValueError) as exc:
        raise ValueError(f"{where}: RANK, WORLD_SIZE and MASTER_PORT must be set to integers ({exc})") from exc
    die_with_launcher()
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    timeout = default_timeout(timeout_s)
    store = dist.TCPStore(addr, port, world, is_master=(rank == 0 and not agent), timeout=timeout)
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":  # one GPU per process, by local rank
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    return Comm(store=store, probe_s=probe_s)


class LaunchInterrupted(Exception):
    """:func:`spawn_local` received ``signum`` (SIGINT or SIGTERM), forwarded it to every copy and waited for
    them: ``codes`` are their exit codes by rank (``-9``: killed after the grace period)."""

    def __init__(self, signum: int, codes: list[int]) -> None:
        super().__init__(f"{signal.Signals(signum).name}: forwarded to the {len(codes)} processes; exit status by "
                         f"rank: {codes}")
        self.signum, self.codes = signum, codes


LAUNCHER_ENV = "FWDGRAD_LAUNCHER_PID"


def die_with_launcher() -> bool:
    """In a process started by :func:`spawn_local` (``FWDGRAD_LAUNCHER_PID`` set) on Linux: ask the kernel to
    send this process SIGTERM when the launcher dies (``prctl(PR_SET_PDEATHSIG)``), and send it now when the
    launcher is already gone. Returns whether the request was made (no-op elsewhere, e.g. under torchrun).

    Done here, in the child, rather than in a ``preexec_fn`` between fork and exec, which is unsafe in a
    process with threads (torch's)."""
    launcher = os.environ.get(LAUNCHER_ENV, "")
    if not launcher.isdigit() or not sys.platform.startswith("linux"):
        return False
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return False
    if prctl(1, int(signal.SIGTERM), 0, 0, 0) != 0:  # PR_SET_PDEATHSIG
        return False
    if os.getppid() != int(launcher):  # the launcher died before the request
        os.kill(os.getpid(), signal.SIGTERM)
    return True


def spawn_local(
    nproc: int, command: Sequence[str], *, timeout_s: float, env: Mapping[str, str] | None = None,
    grace_s: float = 10.0,
) -> list[int]:
    """Run ``nproc`` copies of ``command`` (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
    ``MASTER_PORT`` set for each) and return their exit codes, by rank.

    A copy that fails gives the others ``grace_s`` seconds to stop on their own (they should, with an error
    naming the lost rank), then they are killed; past ``timeout_s`` in all every copy still running is
    killed (exit code ``-9``).

    SIGINT or SIGTERM received while waiting (main thread only) is sent on to every running copy; the copies
    get ``grace_s`` seconds to stop (writing what they write when interrupted), then are killed, and
    :class:`LaunchInterrupted` is raised with their exit codes. A second signal kills them at once. Each copy
    runs in a new session (``start_new_session``): signals reach it through this function only, once.
    """
    port = free_port()
    base = dict(os.environ if env is None else env)
    procs: list[subprocess.Popen[bytes]] = []
    received: list[int] = []

    def forward(signum: int, frame: Any) -> None:
        received.append(signum)
        for p in procs:
            if p.poll() is None:
                if len(received) == 1:
                    p.send_signal(signum)
                else:
                    p.kill()

    previous: dict[int, Any] = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, forward)
    except ValueError:  # not the main thread: signals stay as they are
        pass
    try:
        for r in range(nproc):
            if received:  # a signal came while starting (and reached the copies started): start no more
                break
            e = {**base, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(nproc),
                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), LAUNCHER_ENV: str(os.getpid())}
            procs.append(subprocess.Popen(list(command), env=e, start_new_session=True))
        codes = _wait(procs, timeout_s, grace_s, received)
    finally:
        for p in procs:  # whatever went wrong here, no copy is left running
            if p.poll() is None:
                p.kill()
                p.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        raise LaunchInterrupted(received[0], codes)
    return codes


def _wait(procs: list[subprocess.Popen[bytes]], timeout_s: float, grace_s: float, received: list[int]) -> list[int]:
    deadline = time.monotonic() + timeout_s
    failed_at: float | None = None
    while True:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes):
            return [int(c) for c in codes]  # type: ignore[arg-type]
        now = time.monotonic()
        if failed_at is None and (received or any(c not in (None, 0) for c in codes)):
            failed_at = now
        if now > deadline or (failed_at is not None and now > failed_at + grace_s):
            for p in procs:
                if p.poll() is None:
                    p.kill()
            return [int(p.wait()) for p in procs]
        time.sleep(0.05)


def leave_and_exit(comm: Comm, finished: bool, code: int) -> NoReturn:
    """End the process of a rank: leave the world (:meth:`Comm.leave <fwdgrad.distributed.comm.Comm.leave>`),
    flush stdout and stderr, and exit with ``code`` at once (``os._exit``), skipping the interpreter's teardown.

    Why: a rank that returned normally from a run its peers stopped too (SIGTERM forwarded by ``--nproc``)
    was seen to abort at interpreter exit, after its last Python frame, in 2 of 37 runs: ``terminate called
    without an active exception`` (exit -6) once rank 0, which hosts the store, had gone. A C++ object of
    torch.distributed that lives until finalization (the store's client or the gloo transport it was built
    on) is then destroyed with its peer already gone and its destructor ends in ``std::terminate``. Nothing of
    fwdgrad's state needs that teardown (files are written atomically, the run folder's lock is released by
    then), so the rank ends before it: no abort in 40 runs with this (docs/distributed.md).
    """
    try:
        comm.leave(finished)
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


def python_command(*args: str) -> list[str]:
    """``[sys.executable, *args]``."""
    return [sys.executable, *args]
