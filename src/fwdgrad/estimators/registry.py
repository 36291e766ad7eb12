"""The registry: a name is a *recipe* — an estimator class, preset options, default learning rates and the
generic properties it claims — as optax's ``alias.py`` builds ``adam`` from small transforms.

``lg-fg-a`` is :class:`~fwdgrad.estimators.local.LocalActivityForwardGradient` with ``groups=True``, not a
subclass. The generic estimator tests (``tests/test_generic.py``) run every check a recipe claims:

=============  ==========================================================================================
claim          what is tested, by registry name
=============  ==========================================================================================
``exact``      float64 exactness against ``torch.autograd`` (an implicit gradient's directional
               derivatives, or the gradient itself for ``bp``)
``unbiased``   Monte-Carlo unbiasedness (light always, heavy behind the ``montecarlo`` marker)
``no-backward`` a model whose backward raises trains: no backward pass runs
``grad``       ``.grad`` interop: two calls without ``zero_grad`` add up like two backward passes
``fused``      ``sgd_step`` equals ``.grad`` + ``torch.optim.SGD`` (with and without momentum)
=============  ==========================================================================================

Example:
    >>> import fwdgrad
    >>> from fwdgrad.estimators.registry import recipe
    >>> r = recipe("lg-fg-a")
    >>> r.cls.__name__, dict(r.preset)
    ('LocalActivityForwardGradient', {'groups': True})
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Iterable, Mapping
from typing import Any

from fwdgrad.estimators.base import Estimator

CLAIMS = ("exact", "unbiased", "no-backward", "grad", "fused")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One registry entry.

    Attributes:
        name: the registry name.
        cls: the estimator class.
        preset: options passed to ``cls`` unless the caller gives them.
        default_lr: optimizer name (``"sgd"``, ``"adam"``) → default learning rate.
        lr_note: where the default learning rates come from.
        claims: the generic properties the tests check for it (see the module docstring).
        needs: what the model must provide (``"local-heads"``: the :mod:`fwdgrad.local` protocol).
        lr_scales_with: ``"parameters"`` when the estimate's variance grows with the number of perturbed
            parameters (weight perturbation), so the training loop scales the default SGD lr down for
            larger models; ``None`` otherwise.
    """

    name: str
    cls: type[Estimator]
    preset: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    default_lr: Mapping[str, float] = dataclasses.field(default_factory=dict)
    lr_note: str = ""
    claims: frozenset[str] = frozenset()
    needs: str | None = None
    lr_scales_with: str | None = None

    def options(self) -> dict[str, Any] | None:
        """Constructor options with their defaults (presets applied); ``None`` when it takes ``**kwargs``."""
        init = self.cls.__init__
        if init is object.__init__:
            return {}
        params = list(inspect.signature(init).parameters.values())[1:]
        if any(p.kind is p.VAR_KEYWORD for p in params):
            return None
        out = {p.name: p.default for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
        return {**out, **self.preset}


_REGISTRY: dict[str, Recipe] = {}


def register_estimator(
    name: str, cls: type[Estimator] | None = None, *, preset: Mapping[str, Any] | None = None,
    default_lr: Mapping[str, float] | None = None, lr_note: str = "", claims: Iterable[str] = (),
    needs: str | None = None, lr_scales_with: str | None = None,
) -> Any:
    """Register a recipe: ``cls`` with ``preset`` options under ``name`` (usable as a class decorator).

    A taken name raises ``ValueError``; so does an unknown claim or a preset the class does not accept.

    Example:
        >>> import fwdgrad
        >>> from fwdgrad.estimators import ForwardGradient, register_estimator
        >>> _ = register_estimator("fg-w-rank1-doc", ForwardGradient, preset={"tangents": "rank1"})
        >>> fwdgrad.estimator("fg-w-rank1-doc", seed=0).tangents
        'rank1'
    """

    def add(c: type[Estimator]) -> type[Estimator]:
        where = "fwdgrad.register_estimator"
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}: name must be a non-empty str, got {name!r}")
        if name in _REGISTRY:
            raise ValueError(f"{where}: name {name!r} is taken by {_REGISTRY[name].cls.__name__}")
        if not (isinstance(c, type) and issubclass(c, Estimator)):
            raise TypeError(f"{where}: {c!r} is not a subclass of fwdgrad.Estimator")
        unknown = sorted(set(claims) - set(CLAIMS))
        if unknown:
            raise ValueError(f"{where}: unknown claim {unknown[0]!r}; choose from {CLAIMS}")
        if lr_scales_with not in (None, "parameters"):
            raise ValueError(f"{where}: lr_scales_with must be None or 'parameters', got {lr_scales_with!r}")
        entry = Recipe(name, c, dict(preset or {}), dict(default_lr or {}), lr_note, frozenset(claims), needs,
                       lr_scales_with)
        known = entry.options()
        if known is not None and preset:
            bad = sorted(set(preset) - set(known))
            if bad:
                raise ValueError(f"{where}: {c.__name__} has no option {bad[0]!r} for the preset of {name!r}")
        _REGISTRY[name] = entry
        if not c.__dict__.get("_name"):
            c._name = name  # the class's own name when built directly (its first recipe)
        return c

    return add if cls is None else add(cls)


def available_estimators() -> list[str]:
    """The registered estimator names, sorted."""
    return sorted(_REGISTRY)


def recipe(name: str) -> Recipe:
    """The recipe registered as ``name``; an unknown name raises ``ValueError`` listing the known ones."""
    if name not in _REGISTRY:
        raise ValueError(f"fwdgrad.estimator: unknown estimator {name!r}; available: {available_estimators()}")
    return _REGISTRY[name]


def estimator_class(name: str) -> type[Estimator]:
    """The class of the recipe registered under ``name``."""
    return recipe(name).cls


def estimator_options(name: str) -> dict[str, Any] | None:
    """Constructor options of estimator ``name`` with their defaults (presets applied)."""
    return recipe(name).options()


def estimator(name: str, **kwargs: Any) -> Estimator:
    """Build the estimator registered as ``name``: its class with the preset options, then ``kwargs``.

    An option the estimator does not take raises ``ValueError`` naming it and listing the valid ones.

    Example:
        >>> import fwdgrad
        >>> fwdgrad.estimator("fg-w", num_directions=4, tangents="rademacher", seed=0)
        ForwardGradient(num_directions=4, tangents='rademacher', chunk_size=None)
    """
    entry = recipe(name)
    known = entry.options()
    if known is not None:
        unknown = sorted(set(kwargs) - set(known))
        if unknown:
            raise ValueError(
                f"fwdgrad.estimator: estimator {name!r} has no option {unknown[0]!r}; options: {sorted(known)}"
            )
    est = entry.cls(**{**entry.preset, **kwargs})
    est._name = name
    return est


def default_lr(name: str, optimizer: str) -> tuple[float, str]:
    """The default learning rate of recipe ``name`` with ``optimizer`` and where it comes from: the recipe's
    ``default_lr``, else a ``default_lr`` attribute of its class (a float, or a dict by optimizer).

    A recipe without one for ``optimizer`` borrows ``fg-w``'s (the most cautious: forward gradients need much
    smaller steps than backprop because their variance grows with the number of perturbed dimensions)."""
    entry = recipe(name)
    if optimizer in entry.default_lr:
        note = entry.lr_note or f"default for {name} with {optimizer}"
        return float(entry.default_lr[optimizer]), note
    own = getattr(entry.cls, "default_lr", None)  # a class may carry its own (a float, or a dict by optimizer)
    if isinstance(own, Mapping):
        own = own.get(optimizer)
    if isinstance(own, int | float) and not isinstance(own, bool) and own > 0:
        return float(own), f"{name}.default_lr"
    fallback = recipe("fg-w").default_lr.get(optimizer)
    if fallback is None:
        raise ValueError(f"fwdgrad: no default learning rate for optimizer {optimizer!r}")
    return float(fallback), f"no default for {name}: the fg-w default with {optimizer}"


_ROLE = re.compile(r":[\w:]+:`~?([^`]+)`")


def plain_text(text: str) -> str:
    """reST markup to plain text for a terminal: ``:mod:`x``` → ``x``, double backquotes dropped."""
    return " ".join(_ROLE.sub(r"\1", text).replace("``", "").split())


def _args_section(doc: str | None) -> dict[str, str]:
    """The ``Args:`` entries of one Google-style docstring, ``{option: meaning}``; an entry naming several
    options (``seed, generator: ...``) gives each of them the meaning. Continuation lines (indented deeper
    than the entry) join its meaning."""
    lines = inspect.cleandoc(doc or "").splitlines()
    out: dict[str, str] = {}
    for i, line in enumerate(lines):
        if line.strip() != "Args:":
            continue
        indent: int | None = None
        names: list[str] = []
        for entry in lines[i + 1 :]:
            if not entry.strip():
                continue
            depth = len(entry) - len(entry.lstrip())
            if depth <= len(line) - len(line.lstrip()):
                break  # the section ended (a new heading or text at the docstring's own depth)
            indent = depth if indent is None else indent
            head = re.match(r"([A-Za-z_]\w*(?:\s*,\s*[A-Za-z_]\w*)*)\s*(?:\([^)]*\))?\s*:\s*(.*)", entry.strip())
            if depth == indent and head:
                names = [n.strip() for n in head.group(1).split(",")]
                for n in names:
                    out[n] = head.group(2)
            elif names:
                for n in names:
                    out[n] += " " + entry.strip()
        break
    return {k: plain_text(v) for k, v in out.items()}


def option_docs(name: str) -> dict[str, str]:
    """The meaning of every constructor option of recipe ``name``, from the ``Args:`` sections of its class's
    docstrings along the method resolution order (a subclass's entry wins over its base's); an option no
    docstring describes is absent. Presets are marked.

    Example:
        >>> option_docs("fg-w")["num_directions"]
        'K, tangents averaged per call.'
        >>> option_docs("fg-w-momentum")["directions"].startswith("preset 'momentum' in this recipe")
        True
    """
    entry = recipe(name)
    docs: dict[str, str] = {}
    for cls in entry.cls.__mro__:
        for key, text in _args_section(cls.__dict__.get("__doc__")).items():
            docs.setdefault(key, text)
    for key, value in entry.preset.items():
        if key in docs:
            docs[key] = f"preset {value!r} in this recipe. {docs[key]}"
    return docs
