"""The configuration of a training run or comparison: one dataclass, filled from defaults, an optional
TOML file, then command-line options (each later source wins).

Methods are estimator-registry names with options, written ``name:key=value,key=value``::

    bp
    fg-w:num_directions=8,tangents=rademacher
    fg-w:num_directions=8,lr=3e-4,label=fg-w-K8

``lr`` (learning rate for this method) and ``label`` (its name in reports) are reserved keys; every
other key goes to the estimator's constructor. Values are read as int, float, bool (``true``/``false``),
``none``, or else str. A list is written with ``|`` between its items, ``fg-a:modules=layers.0|layers.2``
(quote it in a shell); an option whose constructor annotation is a list or sequence (and not also a
plain ``str``) always receives a list, so ``fg-a:modules=layers.1`` gives ``modules=['layers.1']``.

A list of methods separates methods with ``;`` or ``,``: after a comma, a piece
with ``=`` and no ``:`` is another option of the method before it, anything else starts a new method, so
``bp,fg-w:num_directions=8,tangents=rademacher,fg-w`` is three methods. ``all`` stands for every
registered estimator that can train the chosen model.

A TOML file uses the field names of :class:`RunConfig`; an unknown key, or a value whose type does not
match the field's annotation (``download = "false"``, ``lr = true``), is an error naming the key, and a
float field must be finite::

    dataset = "mnist1d"
    model = "mlp"
    model_options = { width = 128, depth = 2 }
    methods = ["bp", "fg-w:num_directions=4"]   # or [[methods]] tables with name/options/lr/label
    epochs = 20
"""

from __future__ import annotations

import collections.abc
import dataclasses
import math
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fwdgrad._validation import as_annotated, describe_annotation, matches_annotation

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
RESERVED_METHOD_KEYS = ("lr", "label")
OPTIMIZERS = ("sgd", "adam")
ON_NONFINITE = ("stop", "skip")
SCHEDULES = ("constant", "cosine", "warmup-cosine", "step")
PARALLEL_MODES = ("data", "tangent")  # fwdgrad.distributed.MODES
_FACTORY = re.compile(r"^[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(?::|$)")


@dataclass(frozen=True)
class MethodSpec:
    """One method of a comparison: an estimator name, its constructor options, and optionally its own
    learning rate and report label.

    >>> parse_method("fg-w:num_directions=8,tangents=rademacher,lr=1e-4")
    MethodSpec(name='fg-w', options={'num_directions': 8, 'tangents': 'rademacher'}, lr=0.0001, label=None)
    """

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    lr: float | None = None
    label: str | None = None

    @property
    def display(self) -> str:
        """The name used in tables, plots and file names: ``label`` or ``name[:k=v,...]``."""
        if self.label:
            return self.label
        if not self.options:
            return self.name
        return self.name + ":" + ",".join(f"{k}={_format_value(v)}" for k, v in self.options.items())

    def to_text(self) -> str:
        """The spec in CLI syntax (parses back to an equal spec)."""
        extra = dict(self.options)
        if self.lr is not None:
            extra["lr"] = self.lr
        if self.label is not None:
            extra["label"] = self.label
        return self.name + (":" + ",".join(f"{k}={_format_value(v)}" for k, v in extra.items()) if extra else "")


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, list | tuple):
        return "|".join(_format_value(v) for v in value)
    return str(value)


def parse_value(text: str) -> Any:
    """``"8"`` → 8, ``"1e-4"`` → 0.0001, ``"true"`` → True, ``"none"`` → None, ``"a|b"`` → a list of
    such values, else the stripped str.

    >>> [parse_value(s) for s in ["8", "-2", "1e-4", "0.5", "True", "none", "gaussian", "layers.0|layers.2"]]
    [8, -2, 0.0001, 0.5, True, None, 'gaussian', ['layers.0', 'layers.2']]
    """
    if "|" in text:
        items = text.split("|")
        if any(not item.strip() for item in items):
            raise ValueError(f"parse_value: empty item in the list {text!r}")
        return [parse_value(item) for item in items]
    text = text.strip()
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        return text
    return value


_SEQUENCE_ORIGINS = (list, tuple, set, frozenset, collections.abc.Sequence, collections.abc.Iterable,
                     collections.abc.Collection, collections.abc.Set)


def list_valued_options(name: str) -> frozenset[str]:
    """The constructor options of estimator ``name`` annotated as a list/sequence and not also as ``str``
    (e.g. ``fg-a``'s ``modules``); empty for an unknown name or unreadable annotations.

    >>> sorted(list_valued_options("fg-a"))
    ['modules']
    """
    try:
        import fwdgrad.estimators  # noqa: F401  (fills the registry)
        from fwdgrad.estimators import estimator_class

        hints = typing.get_type_hints(estimator_class(name).__init__)
    except Exception:  # unknown name (reported later by check_methods) or an annotation that cannot resolve
        return frozenset()
    out = set()
    for key, tp in hints.items():
        members = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
        if str not in members and any(typing.get_origin(m) in _SEQUENCE_ORIGINS or m in _SEQUENCE_ORIGINS
                                      for m in members):
            out.add(key)
    return frozenset(out)


def _method_from_options(where: str, name: str, options: Mapping[str, Any], source: str) -> MethodSpec:
    if not _NAME.match(name):
        raise ValueError(f"{where}: bad method name {name!r} in {source!r}")
    opts = dict(options)
    for key in list_valued_options(name) & set(opts):  # one item without '|' is still a list
        if isinstance(opts[key], str | int | float):
            opts[key] = [opts[key]]
        elif isinstance(opts[key], tuple):
            opts[key] = list(opts[key])
    lr = opts.pop("lr", None)
    label = opts.pop("label", None)
    if lr is not None:
        if isinstance(lr, bool) or not isinstance(lr, int | float) or not math.isfinite(lr) or lr <= 0:
            raise ValueError(f"{where}: lr must be a positive number, got {lr!r} in {source!r}")
        lr = float(lr)
    if label is not None:
        label = str(label)
        if not _NAME.match(label):
            raise ValueError(f"{where}: label must be letters, digits and _.+- , got {label!r} in {source!r}")
    return MethodSpec(name=name, options=opts, lr=lr, label=label)


def _parse_option(where: str, piece: str, source: str) -> tuple[str, Any]:
    key, sep, value = piece.partition("=")
    key = key.strip()
    if not sep or not key or not value.strip():
        raise ValueError(f"{where}: expected key=value, got {piece!r} in {source!r}")
    if not key.isidentifier():
        raise ValueError(f"{where}: option name {key!r} is not an identifier in {source!r}")
    if any(not item.strip() for item in value.split("|")):
        raise ValueError(f"{where}: empty item in the list {piece!r} in {source!r}; write key=a|b")
    return key, parse_value(value)


def parse_spec(text: str, where: str) -> tuple[str, dict[str, Any]]:
    """Split ``name[:key=value[,key=value...]]`` into the name and the options (values parsed with
    :func:`parse_value`); raises ``ValueError`` on bad syntax or a repeated key.

    >>> parse_spec("mlp:width=128,activation=tanh", "example")
    ('mlp', {'width': 128, 'activation': 'tanh'})
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{where}: empty spec {text!r}")
    name, sep, rest = text.strip().partition(":")
    name = name.strip()
    if "=" in name:
        raise ValueError(f"{where}: {text!r} starts with an option; write name:key=value")
    if not _NAME.match(name):
        raise ValueError(f"{where}: bad name {name!r} in {text!r}")
    options: dict[str, Any] = {}
    if sep:
        if not rest.strip():
            raise ValueError(f"{where}: nothing after ':' in {text!r}; write name:key=value")
        for piece in rest.split(","):
            key, value = _parse_option(where, piece, text)
            if key in options:
                raise ValueError(f"{where}: option {key!r} given twice in {text!r}")
            options[key] = value
    return name, options


def parse_model_spec(text: str, where: str) -> tuple[str, dict[str, Any]]:
    """Like :func:`parse_spec`, and also ``module.path:function[:key=value,...]`` (a user's model factory,
    see ``fwdgrad.training.factories``), whose name keeps the ``module:function``.

    ``hf:PATH`` (a Hugging Face model folder or ``config.json``) is ``hf:path=PATH``.

    >>> parse_model_spec("mypkg.nets:make:width=3", "example")
    ('mypkg.nets:make', {'width': 3})
    >>> parse_model_spec("hf:models/tiny-bert", "example")
    ('hf', {'path': 'models/tiny-bert'})
    """
    if isinstance(text, str) and text.strip().startswith("hf:") and "=" not in text:
        return "hf", {"path": text.strip()[3:]}
    if isinstance(text, str) and _FACTORY.match(text.strip()):
        module, function, *rest = text.strip().split(":", 2)
        _, options = parse_spec("factory:" + rest[0], where) if rest else ("", {})
        return f"{module}:{function}", options
    return parse_spec(text, where)


def parse_method(text: str, where: str = "fwdgrad: --method") -> MethodSpec:
    """Parse one method spec ``name[:key=value[,key=value...]]``; ``lr`` and ``label`` are reserved keys."""
    name, options = parse_spec(text, where)
    return _method_from_options(where, name, options, text)


def parse_method_list(text: str, where: str = "fwdgrad: --methods") -> list[MethodSpec]:
    """Parse ``"bp,fg-w:num_directions=8,tangents=rademacher;fg-w"`` into method specs (see module doc).

    >>> [m.display for m in parse_method_list("bp,fg-w:num_directions=8,tangents=rademacher,fg-w")]
    ['bp', 'fg-w:num_directions=8,tangents=rademacher', 'fg-w']
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{where}: empty method list {text!r}")
    groups: list[str] = []
    for chunk in text.split(";"):
        current: list[str] = []
        for piece in chunk.split(","):
            piece = piece.strip()
            if not piece:
                raise ValueError(f"{where}: empty item in {text!r}")
            if "=" in piece and ":" not in piece:
                if not current:
                    raise ValueError(f"{where}: option {piece!r} comes before any method in {text!r}")
                current.append(piece)
            else:
                if current:
                    groups.append(",".join(current))
                current = [piece]
        if current:
            groups.append(",".join(current))
    return [parse_method(g, where) for g in groups]


@dataclass
class RunConfig:
    """Everything that defines a run; ``results.json`` stores it in full.

    Budget and fairness: every method gets ``epochs`` epochs (and at most ``time_budget`` seconds of
    training when set), the same initial weights and the same batch order for a given seed.
    """

    # what to train
    dataset: str = "mnist1d"  # fwdgrad.data name: mnist1d, mnist, fashion-mnist, cifar10
    data_dir: str | None = None  # folder of the dataset files (default: fwdgrad.data's own default)
    prompt: str | None = None  # sst2 as label-word prompts: k16, k512, k=N or opt [,seed=N][,words=A|B]
    download: bool = False  # download missing files into data_dir (needs network)
    model: str = "mlp"  # fwdgrad.models name
    model_options: dict[str, Any] = field(default_factory=dict)  # e.g. {"width": 256, "depth": 2}
    methods: list[MethodSpec] = field(default_factory=lambda: [MethodSpec("bp")])
    # budget
    epochs: int = 10
    time_budget: float | None = None  # seconds of training per run (excluding evaluation); None: no limit
    batch_size: int = 128
    train_subset: int | None = None  # train on this many examples of the training set (seeded choice)
    # optimisation
    optimizer: str = "sgd"  # sgd or adam
    momentum: float = 0.9  # sgd only
    weight_decay: float = 0.0
    clip_grad_norm: float | None = None  # rescale each step's gradient (estimate) to at most this 2-norm
    lr: float | None = None  # one lr for every method without its own; None: per-method defaults
    lr_sweep: list[float] | None = None  # candidate lrs: choose the best on the validation split
    schedule: str = "constant"  # lr schedule per step: constant, cosine, warmup-cosine, step
    warmup_epochs: float | None = None  # linear warm-up; None: 1 epoch for warmup-cosine, else 0
    step_epochs: int | None = None  # "step" schedule: multiply by step_gamma every this many epochs (None: epochs/3)
    step_gamma: float = 0.1  # "step" schedule factor
    sweep_epochs: int = 2  # epochs of each sweep trial (first seed)
    val_fraction: float = 0.1  # share of the training set held out for validation (never the test set)
    # repetitions and reproducibility
    seed: int = 0  # first seed
    seeds: int = 1  # number of seeds: seed, seed+1, ...
    # behaviour
    on_nonfinite: str = "stop"  # stop: end the run on a NaN/Inf loss; skip: skip that step and go on
    max_skip_fraction: float = 0.1  # with skip: a run that skips more than this share of its steps fails
    eval_batch_size: int = 1000
    device: str = "cpu"
    threads: int | None = None  # torch.set_num_threads; None leaves torch's default
    # seed-sharing parallelism (fwdgrad.distributed): "data" or "tangent"; None: the ordinary estimator
    parallel: str | None = None
    # output
    out_dir: str = "runs"
    name: str | None = None  # run folder name; default <command>-<dataset>-<model>-<UTC time>
    plots: bool = True
    quiet: bool = False
    save_model: bool = False  # write the trained weights of every run (models/<method>_seed<k>.pt)
    # write replay/<method>_seed<k>.log (seeds, scalars, lrs) and .init.pt; needs parallel (seed-shared steps)
    replay_log: bool = False
    tensorboard: bool = False  # also write TensorBoard scalars under <run>/tensorboard (needs tensorboard)

    def validate(self, where: str = "fwdgrad.RunConfig") -> RunConfig:
        """Raise ``ValueError`` (message starting with ``where`` and naming the value) on a bad field: a value
        whose type does not match the field's annotation (see :func:`check_fields`) or out of range."""
        check_fields(where, {f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
        if self.device != "auto":
            check_device_name(where, self.device)

        def positive_int(name: str, allow_none: bool = False) -> None:
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{where}: {name} must be an int >= 1, got {v!r}")

        for n in ("epochs", "batch_size", "sweep_epochs", "seeds", "eval_batch_size"):
            positive_int(n)
        positive_int("train_subset", allow_none=True)
        positive_int("threads", allow_none=True)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"{where}: seed must be an int >= 0, got {self.seed!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"{where}: optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.on_nonfinite not in ON_NONFINITE:
            raise ValueError(f"{where}: on_nonfinite must be one of {ON_NONFINITE}, got {self.on_nonfinite!r}")
        if isinstance(self.momentum, bool) or not isinstance(self.momentum, int | float) or not 0 <= self.momentum < 1:
            raise ValueError(f"{where}: momentum must be in [0, 1), got {self.momentum!r}")
        vf = self.val_fraction
        if isinstance(vf, bool) or not isinstance(vf, int | float) or not 0 <= vf <= 0.9:
            raise ValueError(f"{where}: val_fraction must be in [0, 0.9], got {vf!r}")
        if not isinstance(self.weight_decay, int | float) or self.weight_decay < 0:
            raise ValueError(f"{where}: weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.clip_grad_norm is not None and (
            isinstance(self.clip_grad_norm, bool) or not isinstance(self.clip_grad_norm, int | float)
            or not self.clip_grad_norm > 0
        ):
            raise ValueError(f"{where}: clip_grad_norm must be > 0, got {self.clip_grad_norm!r}")
        if self.lr is not None and (not isinstance(self.lr, int | float) or not self.lr > 0):
            raise ValueError(f"{where}: lr must be > 0, got {self.lr!r}")
        if self.time_budget is not None and (not isinstance(self.time_budget, int | float) or self.time_budget <= 0):
            raise ValueError(f"{where}: time_budget must be > 0 seconds, got {self.time_budget!r}")
        if self.lr_sweep is not None:
            if not self.lr_sweep or any(
                isinstance(v, bool) or not isinstance(v, int | float) or not v > 0 for v in self.lr_sweep
            ):
                raise ValueError(f"{where}: lr_sweep must be a non-empty list of positive lrs, got {self.lr_sweep!r}")
            if self.val_fraction <= 0:
                raise ValueError(f"{where}: lr_sweep needs a validation split, got val_fraction={self.val_fraction}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"{where}: schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        w = self.warmup_epochs
        if w is not None and (isinstance(w, bool) or not isinstance(w, int | float) or not 0 <= w <= self.epochs):
            raise ValueError(f"{where}: warmup_epochs must be a number in [0, epochs={self.epochs}], got {w!r}")
        positive_int("step_epochs", allow_none=True)
        g = self.step_gamma
        if isinstance(g, bool) or not isinstance(g, int | float) or not 0 < g <= 1:
            raise ValueError(f"{where}: step_gamma must be in (0, 1], got {g!r}")
        f = self.max_skip_fraction
        if isinstance(f, bool) or not isinstance(f, int | float) or not 0 <= f <= 1:
            raise ValueError(f"{where}: max_skip_fraction must be in [0, 1], got {f!r}")
        if self.parallel is not None and self.parallel not in PARALLEL_MODES:
            raise ValueError(f"{where}: parallel must be one of {PARALLEL_MODES}, got {self.parallel!r}")
        if self.replay_log and self.parallel is None:
            raise ValueError(f"{where}: replay_log needs seed-shared steps: set parallel to one of {PARALLEL_MODES}")
        if not self.methods:
            raise ValueError(f"{where}: methods is empty")
        labels = [m.display for m in self.methods]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise ValueError(f"{where}: method {dup[0]!r} is listed twice; give one of them label=...")
        if not isinstance(self.model_options, dict):
            raise ValueError(f"{where}: model_options must be a table/dict, got {self.model_options!r}")
        if self.prompt is not None:
            from fwdgrad.data.prompts import parse_prompt_spec

            parse_prompt_spec(self.prompt)
            if self.dataset != "sst2" or self.model != "hf-prompt":
                raise ValueError(f"{where}: prompt needs dataset sst2 (a folder of two-column TSV files) and model "
                                 f"hf-prompt (the CLI makes it of --model hf:DIR), got {self.dataset!r} and "
                                 f"{self.model!r}")
        if self.name is not None and not _NAME.match(self.name):
            raise ValueError(f"{where}: name must be letters, digits and _.+- , got {self.name!r}")
        return self

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; ``methods`` as CLI spec strings."""
        out = dataclasses.asdict(self)
        out["methods"] = [m.to_text() for m in self.methods]
        return out


CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(RunConfig))
_FIELD_TYPES: dict[str, Any] = typing.get_type_hints(RunConfig)


def check_fields(where: str, values: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming the key unless every value has the type of its :class:`RunConfig`
    field's annotation (``bool`` for ``download``, ``float | None`` for ``lr``, ...) and every float in it is
    finite. The checks come from the annotations, so a new field is checked without new code.

    >>> check_fields("example", {"lr": 0.1, "plots": False, "lr_sweep": [1e-3, 1e-2]})
    >>> check_fields("example", {"download": "false"})
    Traceback (most recent call last):
    ...
    ValueError: example: download must be true or false, got 'false' (str)
    """
    for key, value in values.items():
        tp = _FIELD_TYPES.get(key)
        if tp is None:
            continue
        if not matches_annotation(value, tp):
            shown = _format_value(value) if isinstance(value, bool) else repr(value)  # TOML spelling of booleans
            raise ValueError(f"{where}: {key} must be {describe_annotation(tp)}, got {shown} ({type(value).__name__})")
        items = value if isinstance(value, list) else [value]
        bad = [v for v in items if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            raise ValueError(f"{where}: {key} must be finite, got {value!r}")


def check_device_name(where: str, device: Any) -> None:
    """Raise ``ValueError`` unless ``device`` is a device string torch understands (``cpu``, ``cuda:1``)."""
    import torch

    try:
        torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{where}: device must be auto, cpu, cuda, cuda:N or another torch device, "
                         f"got {device!r}") from None


def resolve_device(where: str, device: str) -> str:
    """The device a run uses: ``auto`` → ``cuda`` when CUDA is available, else ``cpu``; any other name is
    checked (it parses, and a tensor can be made there), so that ``--device cuda`` on a machine without
    CUDA is a one-line error before training starts.

    >>> resolve_device("example", "cpu")
    'cpu'
    """
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    check_device_name(where, device)
    kind = torch.device(device).type
    if kind == "cuda" and not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ValueError(f"{where}: device {device!r} is not available ({why}); use --device cpu or auto")
    try:
        torch.empty(1, device=device)
    except Exception as exc:  # torch raises RuntimeError or AssertionError here
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{where}: device {device!r} is not usable here ({first})") from None
    return device


def methods_from_value(where: str, value: Any) -> list[MethodSpec]:
    """Methods from a TOML/JSON value: a spec string (a list in CLI syntax), or a list of spec strings and
    ``{name, options, lr, label}`` tables."""
    if isinstance(value, str):
        return parse_method_list(value, where)
    if not isinstance(value, list):
        raise ValueError(f"{where}: methods must be a string or a list, got {value!r}")
    out: list[MethodSpec] = []
    for item in value:
        if isinstance(item, str):
            out.append(parse_method(item, where))
        elif isinstance(item, dict):
            unknown = sorted(set(item) - {"name", "options", "lr", "label"})
            if unknown:
                raise ValueError(f"{where}: unknown key {unknown[0]!r} in method table {item!r}")
            if "name" not in item:
                raise ValueError(f"{where}: method table {item!r} has no name")
            options = dict(item.get("options", {}))
            clash = [k for k in RESERVED_METHOD_KEYS if k in options]
            if clash:
                raise ValueError(f"{where}: put {clash[0]!r} next to name, not in options, in {item!r}")
            options.update({k: item[k] for k in RESERVED_METHOD_KEYS if k in item})
            out.append(_method_from_options(where, str(item["name"]), options, str(item)))
        else:
            raise ValueError(f"{where}: a method must be a string or a table, got {item!r}")
    return out


def config_from_mapping(values: Mapping[str, Any], base: RunConfig | None = None, where: str = "fwdgrad") -> RunConfig:
    """``base`` (default: the defaults) updated with ``values``; unknown keys raise ``ValueError``."""
    unknown = sorted(set(values) - set(CONFIG_FIELDS))
    if unknown:
        raise ValueError(f"{where}: unknown config key {unknown[0]!r}; valid keys: {', '.join(CONFIG_FIELDS)}")
    updates = dict(values)
    if isinstance(updates.get("model"), str) and ":" in updates["model"]:
        name, options = parse_model_spec(updates["model"], where)
        updates["model"] = name
        model_options = updates.get("model_options") or {}
        check_fields(where, {"model_options": model_options})
        updates["model_options"] = {**model_options, **options}
    if "methods" in updates:
        updates["methods"] = methods_from_value(where, updates["methods"])
    if isinstance(updates.get("lr_sweep"), tuple):
        updates["lr_sweep"] = list(updates["lr_sweep"])
    check_fields(where, updates)
    updates = {k: as_annotated(v, _FIELD_TYPES[k]) for k, v in updates.items()}
    return dataclasses.replace(base or RunConfig(), **updates)


def _toml_loads(text: str) -> dict[str, Any]:
    try:
        import tomllib  # Python >= 3.11
    except ModuleNotFoundError:  # pragma: no cover - Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError:
            raise ModuleNotFoundError(
                "fwdgrad: reading a TOML config on Python 3.10 needs the 'tomli' package (pip install tomli)"
            ) from None
    return tomllib.loads(text)


def load_config(path: str | Path, base: RunConfig | None = None) -> RunConfig:
    """Read a TOML config file onto ``base``; a syntax error or unknown key raises ``ValueError`` naming
    the file."""
    path = Path(path)
    where = f"fwdgrad: config file {str(path)!r}"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"{where}: cannot read it ({exc.strerror})") from None
    try:
        values = _toml_loads(text)
    except ValueError as exc:  # tomllib.TOMLDecodeError is a ValueError
        raise ValueError(f"{where}: not valid TOML: {exc}") from None
    return config_from_mapping(values, base, where)

