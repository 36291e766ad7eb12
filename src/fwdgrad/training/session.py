"""One ``fwdgrad train`` / ``fwdgrad compare`` invocation in its run folder: claim and lock the folder,
write the CSV log and the checkpoint after every epoch and ``results.json`` after every run, save the
trained weights when asked, turn SIGTERM into the same clean stop as Ctrl-C (message, partial report,
the checkpoint of the last complete epoch kept), and continue a killed run with ``resume``.
"""

from __future__ import annotations

import shlex
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from fwdgrad.training import checkpoint as ckpt
from fwdgrad.training import report
from fwdgrad.training.config import RunConfig, config_from_mapping
from fwdgrad.training.experiment import Experiment, run_experiment
from fwdgrad.training.loop import RunResult
from fwdgrad.training.rundir import RunFolder, claim, default_stem, reopen

Log = Callable[[str], None]


class Interrupted(Exception):
    """The run was stopped by SIGINT or SIGTERM; the partial report and the checkpoint are written."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class Outcome:
    exp: Experiment
    folder: Path
    name: str


@contextmanager
def sigterm_as_interrupt() -> Iterator[dict[str, int]]:
    """While active, SIGTERM raises ``KeyboardInterrupt`` like SIGINT, once (a second SIGTERM, e.g. one sent
    to the whole process group and one forwarded by ``--nproc``'s launcher, does not interrupt the partial
    report); yields ``{"signal": number}``."""
    seen = {"signal": int(signal.SIGINT)}

    def handler(signum: int, frame: Any) -> None:
        if seen.get("terminated"):
            return
        seen["signal"], seen["terminated"] = signum, 1
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield seen
        return
    try:
        yield seen
    finally:
        signal.signal(signal.SIGTERM, previous)


def model_file(folder: Path, run: RunResult) -> Path:
    return folder / "models" / f"{report.safe_filename(run.method)}_seed{run.seed}.pt"


def replay_file(folder: Path, method: str, seed: int) -> Path:
    """The replay log of a run (``--replay-log``); its initial state dict is ``replay/<method>_seed<k>.init.pt``."""
    return folder / "replay" / f"{report.safe_filename(method)}_seed{seed}.log"


def saved_data_dir(data_dir: str | None) -> str | None:
    """The ``--data-dir`` a saved model records, as an absolute path (``fwdgrad evaluate`` may run from
    another folder); ``None`` when the run used the default."""
    return None if data_dir is None else str(Path(data_dir).expanduser().resolve())


def load_resume(run_dir: str | Path) -> dict[str, Any]:
    """The checkpoint of the run in ``run_dir`` (``ValueError`` when there is none)."""
    path = Path(run_dir) / ckpt.CHECKPOINT_FILE
    if not path.is_file():
        raise ValueError(f"fwdgrad: --resume: {run_dir} has no {ckpt.CHECKPOINT_FILE} (the run ended before its "
                         "first epoch, or this is not a run folder)")
    return ckpt.load(path)


def config_of(state: dict[str, Any]) -> RunConfig:
    """The config stored in a checkpoint."""
    return config_from_mapping(state["config"], RunConfig(), "fwdgrad: --resume checkpoint").validate()


def execute(
    config: RunConfig,
    command: str,
    argv: list[str],
    *,
    log: Log,
    overwrite: bool = False,
    resume_dir: str | Path | None = None,
    dataset: Any = None,
    comm: Any = None,
) -> Outcome:
    """Run the experiment of ``config`` in its run folder (a new one, or ``resume_dir`` to continue it)
    and write the full report. Raises :class:`Interrupted` after writing the partial report.

    ``comm``: the world's collectives (``config.parallel``); a rank other than 0 trains in step with the
    others (reading ``resume_dir``'s checkpoint) but claims no folder and writes nothing."""
    state = load_resume(resume_dir) if resume_dir is not None else None
    if comm is not None and comm.rank != 0:
        with sigterm_as_interrupt() as seen:
            try:
                exp = run_experiment(config, command, dataset=dataset, resume=state, comm=comm)
            except KeyboardInterrupt:
                how = "SIGTERM" if seen["signal"] == signal.SIGTERM else "SIGINT"
                raise Interrupted(f"rank {comm.rank} interrupted ({how})", 128 + seen["signal"]) from None
        folder_path = Path(resume_dir) if resume_dir is not None else Path(config.out_dir)
        return Outcome(exp, folder_path, "")
    if config.tensorboard:
        from fwdgrad.training.tensorboard import check_available

        check_available()
    folder: RunFolder
    if resume_dir is not None:
        folder = reopen(resume_dir)
        argv = list(state.get("argv") or argv)
    else:
        folder = claim(config.out_dir, config.name, default_stem(command, config.dataset, config.model),
                       overwrite=overwrite)
    out, name = folder.path, folder.name
    command_line = shlex.join(argv)
    tb = None
    if config.tensorboard:
        from fwdgrad.training.tensorboard import TensorBoardLog

        tb = TensorBoardLog(out)
    holder: dict[str, Any] = {"saved": "no checkpoint yet" if state is None else "its last checkpoint"}

    def save_checkpoint(exp: Experiment, current: dict[str, Any] | None) -> None:
        ckpt.save(out / ckpt.CHECKPOINT_FILE, {**exp.checkpoint(current), "argv": argv}, ckpt.CHECKPOINT_FORMAT)
        where = f"epoch {current['epoch']} of {current['method']} seed {current['seed']}" if current else None
        holder["saved"] = f"the end of {where}" if where else f"the end of run {len(exp.runs)}"

    def on_epoch_end(exp: Experiment, run: RunResult, state: dict[str, Any], model: nn.Module) -> None:
        holder["exp"] = exp
        save_checkpoint(exp, state)  # first: the files below never run ahead of the checkpoint for long
        report.write_run_csv(out, run)
        if tb is not None:
            tb.epoch(run.method, run.seed, run.history[-1])

    def on_run_done(exp: Experiment) -> None:
        holder["exp"] = exp
        report.write_run_csv(out, exp.runs[-1])
        report.write_results_json(exp, out, name, argv)
        save_checkpoint(exp, None)

    def on_model_trained(run: RunResult, model: nn.Module) -> None:
        exp = holder["exp"]
        ckpt.save(model_file(out, run), {
            "model": config.model, "model_options": dict(config.model_options),
            "input_shape": list(exp.splits_info["input_shape"]), "num_classes": exp.splits_info["num_classes"],
            "dataset": config.dataset, "data_dir": saved_data_dir(config.data_dir), "method": run.method,
            "seed": run.seed, "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        }, ckpt.MODEL_FORMAT)

    try:
        with sigterm_as_interrupt() as seen:
            try:
                exp = run_experiment(
                    config, command, dataset=dataset, log=log, on_run_done=on_run_done, on_epoch_end=on_epoch_end,
                    on_model_trained=on_model_trained if config.save_model else None, resume=state,
                    comm=comm, replay_log=(lambda method, seed: replay_file(out, method, seed)) if config.replay_log
                    else None,
                )
            except KeyboardInterrupt:
                how = "SIGTERM" if seen["signal"] == signal.SIGTERM else "SIGINT"
                world = getattr(comm, "world", 1)
                nproc = f" --nproc {world}" if world > 1 else ""
                exp = holder.get("exp")
                if exp is None:
                    raise Interrupted(f"interrupted ({how}) before an epoch ended; {out} keeps its last "
                                      "checkpoint, if any", 128 + seen["signal"]) from None
                report.write_report(exp, out, name, command_line, plots=False, argv=argv)
                raise Interrupted(
                    f"interrupted ({how}); partial report in {out / 'results.md'}; `fwdgrad {command} --resume "
                    f"{out}{nproc}` continues from {holder['saved']}", 128 + seen["signal"]) from None
        report.write_report(exp, out, name, command_line, plots=config.plots, argv=argv)
        return Outcome(exp, out, name)
    finally:
        if tb is not None:
            tb.close()
        folder.release()
