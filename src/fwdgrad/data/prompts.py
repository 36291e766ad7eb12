"""Prompt-based classification tasks from two-column TSV files, in MeZO's protocols (extra ``fwdgrad[hf]``).

A sentence becomes a prompt (SST-2's template, from LM-BFF and MeZO: ``"<sentence> It was"``, label words
``terrible`` / ``great``) that :class:`fwdgrad.models.hf_prompt.PromptLM` scores: a causal LM predicts the
label word after the prompt, a masked LM fills the mask token appended to it (``"<sentence> It
was<mask>."``). The loss is the cross-entropy over the label words' logits at the answer position and the
accuracy the argmax over them.

Splits, sampled with a ``torch.Generator`` seeded by ``seed`` (same seed, same split), from ``train.tsv``
(train and dev, disjoint) and ``dev.tsv`` (eval; GLUE's test labels are not public, so its dev set is the
test set, as in LM-BFF and MeZO):

=========  =====================================================  ===============================
protocol   train / dev                                            eval
=========  =====================================================  ===============================
``k16``    16 examples per class each (MeZO's RoBERTa setting)    all of ``dev.tsv``
``k512``   512 per class each                                     all of ``dev.tsv``
``k=N``    N per class each                                       all of ``dev.tsv``
``opt``    1000 / 500 (MeZO's OPT setting)                        1000 (all, when fewer: SST-2 has 872)
=========  =====================================================  ===============================

Files: a header line naming the two columns (``sentence<TAB>label`` for SST-2; any names), then one
``text<TAB>label`` row per example, labels ``0 .. C-1``; from ``data_dir``, ``data_dir/SST-2`` or
``data_dir/sst2``. Nothing is downloaded. Each example is ``x = [ids, mask]`` of shape ``[2, max_length]``
(right padded; a prompt longer than ``max_length`` loses its first tokens, so the answer cue stays),
float32 like :mod:`fwdgrad.data.glue`.

Example (the splits of a generated file, no tokenizer needed):
    >>> import torch
    >>> from fwdgrad.data.prompts import parse_prompt_spec, sample_splits
    >>> protocol, seed, words = parse_prompt_spec("k=2,seed=3")
    >>> labels = torch.tensor([0, 1] * 10)
    >>> train, dev, test = sample_splits(labels, 7, protocol, seed)
    >>> len(train), len(dev), len(test), labels[train].tolist().count(1)
    (4, 4, 7, 2)
"""

from __future__ import annotations

import csv
import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

from fwdgrad.data import Dataset
from fwdgrad.models.hf_prompt import label_word_ids, load_tokenizer, resolve_kind

Tensor = torch.Tensor

__all__ = ["PROTOCOLS", "SST2", "PromptTask", "PromptTemplate", "Protocol", "encode_prompts", "load_prompt_dataset",
           "load_prompt_task", "parse_prompt_spec", "prompt_model_options", "read_labelled_tsv", "sample_splits"]


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
    """A prompt: ``text`` with ``{sentence}`` (the answer follows it) and one label word per class."""

    text: str = "{sentence} It was"
    label_words: tuple[str, ...] = ("terrible", "great")

    def prompt(self, sentence: str, mask_token: str | None = None) -> str:
        """The prompt of ``sentence``; a masked LM's ends with ``mask_token`` and a full stop."""
        body = self.text.format(sentence=sentence.strip())
        return body if mask_token is None else f"{body}{mask_token}."


SST2 = PromptTemplate()


@dataclasses.dataclass(frozen=True)
class Protocol:
    """Split sizes: ``per_class`` examples of each class for train and for dev (k-shot), or totals."""

    name: str
    per_class: int | None = None
    train: int | None = None
    dev: int | None = None
    eval: int | None = None  # None: every eval row


PROTOCOLS = {"k16": Protocol("k16", per_class=16), "k512": Protocol("k512", per_class=512),
             "opt": Protocol("opt", train=1000, dev=500, eval=1000)}


def parse_prompt_spec(text: str) -> tuple[Protocol, int, tuple[str, ...]]:
    """``"k16"``, ``"k512"``, ``"k=N"`` or ``"opt"``, then optional ``,seed=N`` (default 0) and
    ``,words=W1|W2|...`` (default SST-2's): ``(protocol, seed, label_words)``."""
    where = "fwdgrad.data.prompts: prompt"
    name, *options = [part.strip() for part in str(text).split(",")]
    if name.startswith("k="):
        k = name[2:]
        if not k.isdigit() or int(k) < 1:
            raise ValueError(f"{where} {text!r}: k=N needs an int N >= 1")
        protocol = Protocol(name, per_class=int(k))
    elif name in PROTOCOLS:
        protocol = PROTOCOLS[name]
    else:
        raise ValueError(f"{where} {text!r}: the protocol must be one of {sorted(PROTOCOLS)} or k=N")
    seed, words = 0, SST2.label_words
    for option in options:
        key, _, value = option.partition("=")
        if key == "seed" and value.isdigit():
            seed = int(value)
        elif key == "words" and len([w for w in value.split("|") if w]) >= 2:
            words = tuple(w for w in value.split("|") if w)
        else:
            raise ValueError(f"{where} {text!r}: unknown option {option!r} (seed=N, words=W1|W2)")
    return protocol, seed, words


def read_labelled_tsv(path: str | os.PathLike) -> tuple[list[str], list[int]]:
    """``(texts, labels)`` of a two-column TSV file with a header line; a bad row raises ``ValueError``
    naming the file and line."""
    where = "fwdgrad.data.prompts.read_labelled_tsv"
    p = Path(path)
    with p.open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows or len(rows[0]) != 2:
        raise ValueError(f"{where}: {str(p)!r} must start with a two-column header (e.g. 'sentence<TAB>label')")
    texts, labels = [], []
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != 2 or not row[1].strip().isdigit():
            raise ValueError(f"{where}: {str(p)!r} line {line}: expected 'text<TAB>label' (label an int >= 0), "
                             f"got {row!r}")
        texts.append(row[0])
        labels.append(int(row[1]))
    return texts, labels


def sample_splits(labels: Tensor, num_eval_rows: int, protocol: Protocol, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Indices ``(train, dev, eval)``: train and dev into ``labels`` (the train file, disjoint), eval into
    the eval file's ``num_eval_rows`` rows; ``ValueError`` when there are too few rows."""
    where = f"fwdgrad.data.prompts: protocol {protocol.name!r}"
    g = torch.Generator().manual_seed(int(seed))
    if protocol.per_class is not None:
        k, train, dev = protocol.per_class, [], []
        for c in range(int(labels.max()) + 1):
            rows = torch.nonzero(labels == c).flatten()
            if rows.numel() < 2 * k:
                raise ValueError(f"{where} needs {2 * k} training rows of class {c} (train and dev), "
                                 f"has {rows.numel()}")
            rows = rows[torch.randperm(rows.numel(), generator=g)]
            train.append(rows[:k])
            dev.append(rows[k:2 * k])
        train_idx, dev_idx = torch.cat(train), torch.cat(dev)
    else:
        assert protocol.train is not None and protocol.dev is not None
        need = protocol.train + protocol.dev
        if labels.numel() < need:
            raise ValueError(f"{where} needs {need} training rows (train {protocol.train} + dev {protocol.dev}), "
                             f"has {labels.numel()}")
        rows = torch.randperm(labels.numel(), generator=g)
        train_idx, dev_idx = rows[:protocol.train], rows[protocol.train:need]
    eval_idx = torch.randperm(num_eval_rows, generator=g)
    if protocol.eval is not None:
        eval_idx = eval_idx[:protocol.eval]
    return train_idx, dev_idx, eval_idx.sort().values


def encode_prompts(
    tokenizer: Any, texts: list[str], template: PromptTemplate, kind: str, max_length: int
) -> Tensor:
    """``[N, 2, max_length]`` float32: token ids and attention mask of each prompt, right padded, the first
    tokens dropped from a prompt that is too long."""
    mask_token = tokenizer.mask_token if kind == "masked" else None
    if kind == "causal":
        plain = tokenizer("a", add_special_tokens=False)["input_ids"]
        if tokenizer("a")["input_ids"][-len(plain):] != plain:
            raise ValueError("fwdgrad.data.prompts: this tokenizer appends special tokens to a prompt, so a causal "
                             "LM's last position would not be the prompt's last word")
    prompts = [template.prompt(t, mask_token) for t in texts]
    side = tokenizer.truncation_side
    tokenizer.truncation_side = "left"
    try:
        enc = tokenizer(prompts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    finally:
        tokenizer.truncation_side = side
    return torch.stack([enc["input_ids"], enc["attention_mask"]], dim=1).to(torch.float32)


@dataclasses.dataclass
class PromptTask:
    """The three splits of a prompt task, as ``(x [N, 2, T], y [N])`` pairs, and how they were made."""

    name: str
    train: tuple[Tensor, Tensor]
    dev: tuple[Tensor, Tensor]
    eval: tuple[Tensor, Tensor]
    num_classes: int
    label_words: tuple[str, ...]
    label_ids: list[int]
    kind: str
    source: str

    def dataset(self) -> Dataset:
        """train and eval as a :class:`fwdgrad.data.Dataset` (what the CLI trains and tests on)."""
        return Dataset(self.name, *self.train, *self.eval, self.num_classes, self.source)

    def examples(self, split: str) -> list[dict[str, Tensor]]:
        """One split as Hugging Face Trainer examples ``{"x": [2, T], "labels": []}`` for :class:`PromptLM`."""
        x, y = {"train": self.train, "dev": self.dev, "eval": self.eval}[split]
        return [{"x": x[i], "labels": y[i]} for i in range(y.numel())]


def _task_folder(data_dir: str | os.PathLike) -> Path:
    root = Path(data_dir).expanduser()
    folders = [root / "SST-2", root / "sst2", root]
    folder = next((f for f in folders if (f / "train.tsv").is_file() and (f / "dev.tsv").is_file()), None)
    if folder is None:
        raise FileNotFoundError(f"fwdgrad.data.prompts: no train.tsv and dev.tsv in any of {[str(f) for f in folders]}")
    return folder


def load_prompt_task(
    data_dir: str | os.PathLike, model_dir: str | os.PathLike, protocol: str | Protocol = "k16", *, seed: int = 0,
    template: PromptTemplate = SST2, kind: str = "auto", max_length: int = 64,
) -> PromptTask:
    """The prompt task of ``data_dir``'s ``train.tsv`` / ``dev.tsv``, tokenised with ``model_dir``'s tokenizer.

    Args:
        data_dir: the task's folder (see the module docstring).
        model_dir: the model folder (or its ``config.json``) whose tokenizer and LM kind are used.
        protocol: a :class:`Protocol` or its name (``"k16"``, ``"k512"``, ``"k=N"``, ``"opt"``).
        seed: the sampling seed of the splits.
        template: the prompt and its label words (one per class).
        kind: ``"causal"``, ``"masked"`` or ``"auto"`` (from the model's config and tokenizer).
        max_length: tokens per prompt.
    """
    if isinstance(protocol, str):
        protocol = parse_prompt_spec(protocol)[0]
    folder = _task_folder(data_dir)
    tok = load_tokenizer(model_dir)
    kind = resolve_kind(model_dir, tok, kind)
    texts, labels = read_labelled_tsv(folder / "train.tsv")
    eval_texts, eval_labels = read_labelled_tsv(folder / "dev.tsv")
    num_classes = max(labels + eval_labels) + 1
    if len(template.label_words) != num_classes:
        raise ValueError(f"fwdgrad.data.prompts: {len(template.label_words)} label words "
                         f"{list(template.label_words)} for a task with {num_classes} classes")
    y, y_eval = torch.tensor(labels, dtype=torch.int64), torch.tensor(eval_labels, dtype=torch.int64)
    train_idx, dev_idx, eval_idx = sample_splits(y, len(eval_texts), protocol, seed)

    def split(rows: Tensor, pool: list[str], targets: Tensor) -> tuple[Tensor, Tensor]:
        return encode_prompts(tok, [pool[i] for i in rows.tolist()], template, kind, max_length), targets[rows]

    return PromptTask(
        f"{folder.name.lower()}-prompt", split(train_idx, texts, y), split(dev_idx, texts, y),
        split(eval_idx, eval_texts, y_eval), num_classes, template.label_words,
        label_word_ids(tok, template.label_words), kind,
        f"{folder} (prompt {protocol.name}, seed {seed}, {kind} LM, tokenizer {model_dir})",
    )


def prompt_model_options(spec: str, options: dict[str, Any]) -> dict[str, Any]:
    """The ``hf-prompt`` model options for ``--prompt spec --model hf:DIR``: the ``hf`` options and the label
    words of ``spec``.

    >>> prompt_model_options("k16,words=bad|good", {"path": "models/tiny"})
    {'path': 'models/tiny', 'words': 'bad|good'}
    """
    return {**options, "words": "|".join(parse_prompt_spec(spec)[2])}


def load_prompt_dataset(
    data_dir: str | os.PathLike, model_dir: str | os.PathLike, spec: str, max_length: int = 64
) -> Dataset:
    """``--prompt spec``: :func:`load_prompt_task` with the protocol, seed and label words of ``spec``, as the
    :class:`fwdgrad.data.Dataset` of its train and eval splits (the CLI holds its validation split out of
    train with ``--val-fraction``; the protocol's dev split is :attr:`PromptTask.dev`)."""
    if not model_dir:
        raise ValueError("fwdgrad.data.prompts: a prompt task needs the model folder (--model hf:DIR), for its "
                         "tokenizer")
    protocol, seed, words = parse_prompt_spec(spec)
    template = PromptTemplate(SST2.text, words)
    task = load_prompt_task(data_dir, model_dir, protocol, seed=seed, template=template, max_length=max_length)
    return task.dataset()
