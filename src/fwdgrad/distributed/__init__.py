"""Layer above estimators — seed-sharing training over several processes, and its replay.

Ranks that share a base seed exchange K scalars per step instead of a gradient (data parallel: an
``all_reduce`` of ``K + 1`` numbers; tangent parallel: an ``all_gather`` of K per rank), every rank
regenerates the directions and applies the same update, and a log of those scalars rebuilds the trained
weights bit for bit. :class:`AsyncFGD` pipelines a chain of modules, one process each, on stale parameters
(Zhao et al. 2023). See ``docs/distributed.md``.
"""

from fwdgrad.distributed.asyncfgd import AsyncFGD
from fwdgrad.distributed.comm import (
    Comm,
    DistributedError,
    LocalComm,
    RankLostError,
    ReplicaMismatchError,
)
from fwdgrad.distributed.launch import (
    LaunchInterrupted,
    die_with_launcher,
    free_port,
    init_from_env,
    leave_and_exit,
    spawn_local,
)
from fwdgrad.distributed.replay import (
    ReplayLog,
    check_replayable,
    load_initial_state,
    read_header,
    record_bytes,
    records,
    replay,
    replay_file,
    running_buffers,
    save_initial_state,
)
from fwdgrad.distributed.seeds import ConcatSource, digest, step_seed, step_source
from fwdgrad.distributed.sharing import MODES, SeedSharingSGD, shard, shard_bounds

__all__ = [
    "MODES",
    "AsyncFGD",
    "Comm",
    "ConcatSource",
    "DistributedError",
    "LaunchInterrupted",
    "LocalComm",
    "RankLostError",
    "ReplayLog",
    "ReplicaMismatchError",
    "SeedSharingSGD",
    "check_replayable",
    "die_with_launcher",
    "digest",
    "free_port",
    "init_from_env",
    "leave_and_exit",
    "load_initial_state",
    "read_header",
    "record_bytes",
    "records",
    "replay",
    "replay_file",
    "running_buffers",
    "save_initial_state",
    "shard",
    "shard_bounds",
    "spawn_local",
    "step_seed",
    "step_source",
]
