"""GLUE SST-2 (binary sentiment) from its TSV files, tokenised with a Hugging Face tokenizer.

Files (as distributed by GLUE): ``train.tsv`` and ``dev.tsv`` with a header line ``sentence<TAB>label``;
``test.tsv`` has no labels and is not read, so the dev split serves as the test split (as in MeZO and
ZO-Bench, which sample their train / dev / eval sets from the labelled data). Nothing is downloaded.

Each example becomes ``x = [ids, mask]`` of shape ``[2, max_length]`` (padded / truncated), stored as
float32 (exact for ids below 2²⁴) to fit :class:`fwdgrad.data.Dataset`; :class:`fwdgrad.models.hf.HFClassifier`
casts it back.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import torch

from fwdgrad.data import Dataset


def read_sst2_tsv(path: str | os.PathLike) -> tuple[list[str], list[int]]:
    """``(sentences, labels)`` of one SST-2 TSV file; a bad header or label raises ``ValueError`` naming it."""
    where = "fwdgrad.data.glue.read_sst2_tsv"
    p = Path(path)
    with p.open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows or [c.strip() for c in rows[0][:2]] != ["sentence", "label"]:
        raise ValueError(f"{where}: {str(p)!r} must start with the header 'sentence<TAB>label', got {rows[:1]!r}")
    sentences, labels = [], []
    for line, row in enumerate(rows[1:], start=2):
        if len(row) < 2 or row[1].strip() not in ("0", "1"):
            raise ValueError(f"{where}: {str(p)!r} line {line}: expected 'sentence<TAB>0|1', got {row!r}")
        sentences.append(row[0])
        labels.append(int(row[1]))
    return sentences, labels


def load_sst2(
    data_dir: str | os.PathLike,
    tokenizer: str | os.PathLike,
    *,
    max_length: int = 64,
    limit_train: int | None = None,
    limit_test: int | None = None,
) -> Dataset:
    """SST-2 from ``data_dir`` (``data_dir/SST-2/``, ``data_dir/sst2/`` or ``data_dir`` itself), tokenised
    with the tokenizer saved in the folder ``tokenizer`` (``local_files_only=True``).

    Args:
        data_dir: folder holding ``train.tsv`` and ``dev.tsv``.
        tokenizer: a model folder with a tokenizer (usually the ``--model hf:path=DIR`` folder).
        max_length: tokens per example after padding / truncation.
        limit_train, limit_test: keep the first this many examples (``None``: all).
    """
    where = "fwdgrad.data.glue.load_sst2"
    try:
        from transformers import AutoTokenizer
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError(f"{where}: SST-2 needs the optional extra: pip install 'fwdgrad[hf]'") from e
    root = Path(data_dir).expanduser()
    folders = [root / "SST-2", root / "sst2", root]
    folder = next((f for f in folders if (f / "train.tsv").is_file() and (f / "dev.tsv").is_file()), None)
    if folder is None:
        raise FileNotFoundError(f"{where}: no train.tsv and dev.tsv in any of {[str(f) for f in folders]}")
    tok = AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True)

    def encode(split: str, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        sentences, labels = read_sst2_tsv(folder / f"{split}.tsv")
        sentences, labels = sentences[:limit], labels[:limit]
        enc = tok(sentences, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
        x = torch.stack([enc["input_ids"], enc["attention_mask"]], dim=1).to(torch.float32)
        return x, torch.tensor(labels, dtype=torch.int64)

    x_train, y_train = encode("train", limit_train)
    x_test, y_test = encode("dev", limit_test)
    return Dataset("sst2", x_train, y_train, x_test, y_test, 2, f"{folder} (tokenizer {tokenizer})")
