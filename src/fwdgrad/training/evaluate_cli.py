"""``fwdgrad evaluate MODEL``: score weights saved by ``--save-model`` on a dataset split (called from
:mod:`fwdgrad.cli`). The model file is read with its digest checked (:func:`fwdgrad.training.checkpoint.load`);
the dataset and its folder default to those the run was trained with."""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_file", metavar="MODEL", help="weights saved by --save-model (RUN_DIR/models/*.pt)")
    p.add_argument("--dataset", default=None,
                   help="dataset name or module.path:function (default: the one the model was trained on)")
    p.add_argument("--data-dir", default=None, metavar="DIR",
                   help="folder with the dataset files (default: the --data-dir the model was trained with)")
    p.add_argument("--download", action="store_true", help="download missing dataset files")
    p.add_argument("--split", choices=("test", "train"), default="test", help="which split to score")
    p.add_argument("--batch-size", type=int, default=1000, help="evaluation batch size")
    p.add_argument("--device", default="cpu", help="torch device")


def run_from_args(args: argparse.Namespace) -> int:
    """Print the accuracy and mean cross-entropy; ``ValueError`` (a usage error) for a bad model file or
    option, exit status 1 when the data cannot be read."""
    from fwdgrad.training.checkpoint import MODEL_FORMAT, load
    from fwdgrad.training.factories import build_model_for, load_dataset_for
    from fwdgrad.training.loop import evaluate

    try:
        saved = load(args.model_file, MODEL_FORMAT)
        dataset = args.dataset or saved["dataset"]
        model = build_model_for(saved["model"], saved["input_shape"], saved["num_classes"], saved["model_options"])
        model.load_state_dict(saved["state_dict"])
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    except (ValueError, RuntimeError) as exc:
        raise ValueError(str(exc).removeprefix("fwdgrad: ")) from None
    try:
        data_dir = args.data_dir if args.data_dir is not None else saved.get("data_dir")
        data = load_dataset_for(dataset, data_dir, download=args.download)
    except (FileNotFoundError, OSError, ValueError) as exc:
        print(f"fwdgrad evaluate: error: {exc}", file=sys.stderr, flush=True)
        return 1
    x, y = (data.x_test, data.y_test) if args.split == "test" else (data.x_train, data.y_train)
    if list(x.shape[1:]) != list(saved["input_shape"]) or data.num_classes != saved["num_classes"]:
        raise ValueError(f"{dataset!r} has inputs {list(x.shape[1:])} and {data.num_classes} classes; the model "
                         f"expects {saved['input_shape']} and {saved['num_classes']}")
    model.to(args.device)
    loss, acc = evaluate(model, x, y, args.batch_size, args.device)
    print(f"{args.model_file}: {saved['method']} seed {saved['seed']} on {dataset} {args.split} "
          f"({len(y)} examples): accuracy {100 * acc:.2f} %, loss {loss:.4f}")
    return 0
