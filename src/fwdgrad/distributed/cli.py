"""``fwdgrad replay LOG --init INIT.pt --out MODEL.pt``: rebuild trained weights from a seed-sharing replay log
(called from :mod:`fwdgrad.cli`; see :mod:`fwdgrad.distributed.replay`)."""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("log", metavar="LOG", help="replay log written by seed-sharing training (fwdgrad.distributed)")
    p.add_argument("--init", required=True, metavar="INIT.pt",
                   help="initial weights: a state dict (torch.save), e.g. the <method>_seed<k>.init.pt that "
                        "`fwdgrad train --replay-log` writes beside the log")
    p.add_argument("--out", required=True, metavar="MODEL.pt", help="where to write the rebuilt state dict")
    p.add_argument("--allow-version-mismatch", action="store_true",
                   help="replay a log written under another torch version (refused otherwise: the result may "
                        "then differ from the trained weights in the last bits)")


def run_from_args(args: argparse.Namespace) -> int:
    """Replay, write ``--out`` and print the weights' digest; ``ValueError`` (a usage error, one line) for
    anything that cannot be replayed."""
    import torch

    from fwdgrad.distributed.replay import read_header, replay_file
    from fwdgrad.distributed.seeds import digest

    try:
        header, _ = read_header(args.log)
        steps = replay_file(args.log, args.init, args.out, allow_version_mismatch=args.allow_version_mismatch)
    except OSError as exc:
        raise ValueError(str(exc)) from None
    if header.get("torch", torch.__version__) != torch.__version__:
        print(f"fwdgrad replay: warning: {args.log} was written under torch {header['torch']}, this is torch "
              f"{torch.__version__}; the result may differ from the trained weights in the last bits",
              file=sys.stderr, flush=True)
    state = torch.load(args.out, weights_only=True)
    names = [n for n, _, _ in header["config"]["params"]]
    print(f"replayed {steps} steps of {args.log} onto {args.init}: wrote {args.out} "
          f"(weights digest {digest([(n, state[n]) for n in names]):016x})")
    return 0
