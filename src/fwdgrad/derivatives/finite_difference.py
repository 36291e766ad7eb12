r"""Finite-difference directional derivatives with in-place perturbation (SPSA, MeZO).

For a loss :math:`L(\theta)`, K directions :math:`z_k` and a step :math:`\varepsilon > 0`:

.. math::
    d_k^{\text{two-point}} = \frac{L(\theta + \varepsilon z_k) - L(\theta - \varepsilon z_k)}{2\varepsilon}
    = \langle \nabla L, z_k\rangle + O(\varepsilon^2), \qquad
    d_k^{\text{one-sided}} = \frac{L(\theta + \varepsilon z_k) - L(\theta)}{\varepsilon}
    = \langle \nabla L, z_k\rangle + O(\varepsilon).

For Gaussian ``z`` the two-point ``d_k z_k`` is an unbiased estimate of the gradient of the Gaussian-smoothed
loss :math:`L_\varepsilon(\theta) = \mathbb{E}_u[L(\theta + \varepsilon u)]`, ``u ~ N(0, I)`` (Nesterov &
Spokoiny 2017); SPSA is Spall (1992); the in-place, seed-regenerated form is MeZO (Malladi et al. 2023).

**In place.** The loss is evaluated on the module itself: each tensor ``θ_i`` is changed in place,
``θ_i += ε z_{k,i}``, tensor by tensor, with ``z_{k,i}`` drawn from its own seed (:class:`Perturbation`),
and put back by drawing ``z_{k,i}`` again and subtracting. The evaluations run under ``torch.no_grad()``,
so a step holds the memory of inference plus one tensor's direction; no autograd graph is built and no
backward pass can run.

**Restoring the parameters** (``restore=``):

- ``"exact"`` (default): the parameters come back bit for bit, in every dtype, for the price of what
  rounding would lose. When direction ``k`` is added (:class:`RoundingLedger`), each tensor's ``θ + εz`` is
  formed out of place and the in-place chain that will take it back (``−2εz, +εz``; ``−εz`` one-sided) is
  run on a copy; the difference between ``θ``'s bits and the chain's is kept (four bits per entry, or index
  and value where few entries differ) and written back after the chain. Memory: about 0.6 byte per
  parameter (measured in ``docs/precision.md``), and while a tensor is perturbed two temporaries of its
  size. The same pass counts the entries whose ``θ + εz`` rounds back to ``θ`` (the perturbation lost
  there): the estimator warns.
- ``"regenerate"`` (no extra memory): ``θ + εz − εz`` in floating point. Each entry comes back
  equal to its start, except where the rounding of ``θ + εz`` drops low bits of ``θ``; those move by at most
  one rounding of ``|θ| + ε|z|`` per add (unit roundoff ``u = 2⁻²⁴`` in float32, ``2⁻⁸`` in bfloat16).
  The two-point pass follows MeZO (``+εz, −2εz, +εz``). ``docs/zeroth-order.md`` measures the drift this
  leaves after many steps with ``lr = 0``.
- ``"snapshot"``: a copy of every trainable tensor is kept for the pass and copied back after it, so the
  parameters are bit-for-bit what they were (exactly restored after a NaN or an error too), at the cost of
  one more copy of the parameters in memory and one copy per evaluation.

Whatever happens during an evaluation (an exception, a NaN), the perturbation is taken back in a
``finally``.

**Half precision.** In bfloat16 (8 significant bits) ``θ + 10⁻³z`` rounds back to ``θ`` for most entries
with ``|θ| > 0.25``: :func:`default_eps` is ``1e-2`` when a parameter is bfloat16 / float16 or
``torch.autocast`` computes in one of them, ``1e-3`` otherwise (``docs/precision.md`` measures the choice).
Every evaluation clears ``torch.autocast``'s cache of cast weights before and after it (the cache would
otherwise hand the forward the weights as they were before the perturbation: a zero difference).

Example:
    >>> import torch
    >>> from fwdgrad.derivatives.finite_difference import Perturbation, spsa_directional_derivatives
    >>> model = torch.nn.Linear(3, 1).double()
    >>> x = torch.randn(5, 3, dtype=torch.float64)
    >>> params = [p for p in model.parameters()]
    >>> source = Perturbation("gaussian", params, 2, torch.Generator().manual_seed(0))
    >>> loss, d = spsa_directional_derivatives(model, lambda m: m(x).pow(2).mean(), params, source, eps=1e-4)
    >>> tuple(d.shape)
    (2,)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from fwdgrad._validation import check_number, check_real_scalar
from fwdgrad.directions import draw_direction, draw_tensor, scratch_size, tensor_seeds
from fwdgrad.directions.source import add_weighted_directions

Tensor = torch.Tensor

#: Direction distributions a :class:`Perturbation` can regenerate tensor by tensor.
FD_SAMPLERS = ("gaussian", "rademacher", "sphere")
#: Ways of restoring the parameters after a perturbation.
RESTORE_MODES = ("exact", "regenerate", "snapshot")
#: The dtypes whose resolution the default step must survive.
HALF_PRECISION = (torch.bfloat16, torch.float16)
#: Default steps: float32 / float64, and half precision (weights or autocast), see :func:`default_eps`.
DEFAULT_EPS, HALF_PRECISION_EPS = 1e-3, 1e-2


def compute_dtypes(params: Sequence[Tensor]) -> set[torch.dtype]:
    """The parameters' dtypes, and the dtype ``torch.autocast`` computes in on their devices when it is on."""
    dtypes = {p.dtype for p in params}
    for device_type in {p.device.type for p in params}:
        if torch.is_autocast_enabled(device_type):
            dtypes.add(torch.get_autocast_dtype(device_type))
    return dtypes


def default_eps(params: Sequence[Tensor]) -> float:
    r"""The default finite-difference step for ``params``: ``1e-2`` in half precision, else ``1e-3``.

    Two errors bound the two-point difference: the truncation ``O(ε²)`` and the rounding of the forward
    pass and of ``θ ± εz``, ``O(u/ε)`` with ``u`` the compute dtype's unit roundoff (float32 ``2⁻²⁴``,
    float16 ``2⁻¹¹``, bfloat16 ``2⁻⁸``). Measured on an MLP (``docs/precision.md``, relative error of ``d_k``
    against float64 with the loss in float32): bfloat16 0.26 at ``ε = 1e-3``, 0.026 at ``1e-2``; float16
    0.029 and 0.004; float32 below 0.001 and 0.003, so half precision takes ``1e-2`` and float32 keeps ``1e-3``.

    Example:
        >>> import torch
        >>> default_eps([torch.zeros(2, dtype=torch.bfloat16)]), default_eps([torch.zeros(2)])
        (0.01, 0.001)
    """
    return HALF_PRECISION_EPS if compute_dtypes(params) & set(HALF_PRECISION) else DEFAULT_EPS


def check_eps(where: str, eps: object) -> float:
    """``eps`` as a float; ``ValueError`` naming it unless it is a finite number > 0."""
    return check_number(where, "eps", eps, bound="> 0", say_finite=True)


def check_restore(where: str, restore: object) -> str:
    """``ValueError`` naming ``restore`` unless it is one of :data:`RESTORE_MODES`."""
    if restore not in RESTORE_MODES:
        raise ValueError(f"{where}: restore must be one of {RESTORE_MODES}, got {restore!r}")
    return str(restore)


class Perturbation:
    r"""The K directions of one step, never stored: ``z_{k,i}`` (direction ``k``, tensor ``i``) is drawn
    from its own seed whenever it is needed.

    The generator gives ``K·T`` seeds (``T`` tensors, :func:`fwdgrad.directions.tensor_seeds`), direction-major;
    ``z_{k,i} = draw_tensor(base, θ_i, 1, seed[k·T + i])[0]`` with ``base`` ``gaussian`` or ``rademacher``.
    ``sphere`` scales the Gaussian draws of direction ``k`` by ``√n / ‖g_k‖`` (``n`` entries in all); the K
    joint norms are computed once, from one pass of per-tensor draws, when the perturbation is built.
    With K = 1 the directions equal those of ``fwdgrad.sample_tangents(name, params, 1, generator)`` for
    the same generator state (so ``zo`` and ``fg-w`` see the same ``z`` for the same seed).

    Args:
        name: ``gaussian``, ``rademacher`` or ``sphere``.
        params: the tensors to perturb (their dtype and device are the directions').
        num_directions: K.
        generator: the step's randomness (``None``: torch's global RNG).
    """

    def __init__(
        self, name: str, params: Sequence[Tensor], num_directions: int, generator: torch.Generator | None
    ) -> None:
        if name not in FD_SAMPLERS:
            raise ValueError(f"fwdgrad.derivatives.Perturbation: tangents must be one of {FD_SAMPLERS}, got {name!r}")
        self.name, self.params, self.num_directions = name, list(params), num_directions
        self._base = "rademacher" if name == "rademacher" else "gaussian"
        seeds = tensor_seeds(num_directions * len(self.params), generator)
        self._seeds = [seeds[k * len(self.params) : (k + 1) * len(self.params)] for k in range(num_directions)]
        self._scale: list[Tensor] | None = None
        if name == "sphere":
            n = sum(p.numel() for p in self.params)
            self._scale = []
            for k in range(num_directions):
                sq = sum(self._draw(k, i).double().pow(2).sum() for i in range(len(self.params)))
                self._scale.append(math.sqrt(n) * sq.rsqrt())  # on the parameters' device: no host round trip

    def _draw(self, k: int, i: int) -> Tensor:
        # on the tensor's own device, from its own seed (fwdgrad.directions.draw_tensor)
        return draw_tensor(self._base, self.params[i], 1, self._seeds[k][i])[0]

    def direction(self, k: int, i: int) -> Tensor:
        """``z_{k,i}``, a fresh tensor of ``params[i]``'s shape, dtype and device."""
        z = self._draw(k, i)
        return z.mul_(self._scale[k].to(z.dtype)) if self._scale is not None else z

    def _pass(self) -> contextlib.AbstractContextManager[None]:
        """The context of one in-place pass over the parameters."""
        return torch.no_grad()

    def _pass_direction(self, k: int, i: int, slot: int = 0) -> Tensor:
        """``z_{k,i}`` as a pass uses it (here a fresh tensor; ``slot`` matters to :class:`ScratchPerturbation`)."""
        return self.direction(k, i)

    def shift_(self, t: Tensor, z: Tensor, alpha: float) -> Tensor:
        """``t += alpha · z`` in place, the one operation by which a pass moves a tensor (so that
        :class:`RoundingLedger` can run the same operation, with the same rounding, on a copy)."""
        return t.add_(z, alpha=alpha) if self._scale is None else t.add_(z * alpha)

    def add_(self, k: int, alpha: float, only: Sequence[int] | None = None) -> None:
        """``θ_i += alpha · z_{k,i}`` in place for every tensor (or those in ``only``), one draw at a time."""
        with self._pass():
            for i in range(len(self.params)) if only is None else only:
                self.shift_(self.params[i], self._pass_direction(k, i), alpha)

    def _weighted(
        self, i: int, weights: Tensor | Sequence[float], draw: Callable[[int, int, int], Tensor], wide: bool = False
    ) -> Tensor:
        """``Σ_k weights[k] · z_{k,i}`` with ``z_{k,i} = draw(k, i, slot)`` (slot 0 for the first term, 1 after).

        In bfloat16 / float16 the sum over K > 1 runs in float32 (a new tensor), cast at the end: summed in
        the parameters' dtype, each add rounds at the running sum's resolution and, over thousands of
        directions, the rounding becomes a bias (measured: 0.34‖g‖ at K = 6000 in bfloat16). ``wide``: return
        that float32 sum as it is."""
        if wide or (self.num_directions > 1 and self.params[i].dtype in HALF_PRECISION):
            total = sum(draw(k, i, 0).float().mul_(weights[k]) for k in range(self.num_directions))
            assert isinstance(total, Tensor)
            return total if wide else total.to(self.params[i].dtype)
        out: Tensor | None = None
        for k in range(self.num_directions):
            term = draw(k, i, 0 if out is None else 1).mul_(weights[k])
            out = term if out is None else out.add_(term)
        assert out is not None
        return out

    def weighted_sum(self, i: int, weights: Tensor | Sequence[float]) -> Tensor:
        """``Σ_k weights[k] · z_{k,i}`` (a new tensor of ``params[i]``'s shape); tensor weights stay on
        their device (no host synchronisation)."""
        return self._weighted(i, weights, lambda k, i, slot: self.direction(k, i))  # fresh, never scratch

    def materialise(self) -> list[Tensor]:
        """Every direction, ``[K, *θ_i.shape]`` per tensor (for tests and references)."""
        return [
            torch.stack([self.direction(k, i) for k in range(self.num_directions)]) for i in range(len(self.params))
        ]


class ScratchPerturbation(Perturbation):
    """A :class:`Perturbation` whose in-place passes draw each
    direction into a buffer reused for the whole step (one per dtype and device, the size of the largest
    tensor; a second one for sums over K > 1) instead of allocating a fresh tensor per tensor and pass. The
    numbers and the arithmetic are those of the parent's :meth:`add_` and :meth:`weighted_sum` (same draws,
    same operations in the same order), so the result is the same bit for bit. The buffers are allocated once
    per pass and freed at its end (:meth:`release`), so none is alive during a loss evaluation: the step's peak
    memory stays that of a forward or of one tensor's direction (two for K > 1), whichever is larger."""

    def __init__(
        self, name: str, params: list[Tensor], num_directions: int, generator: torch.Generator | None
    ) -> None:
        super().__init__(name, params, num_directions, generator)
        self._buffers: dict[tuple[torch.dtype, torch.device, int], Tensor] = {}

    def _draw_into(self, k: int, i: int, slot: int = 0) -> Tensor:
        """``z_{k,i}`` as a view of scratch buffer ``slot`` (valid until the next draw into that slot)."""
        p = self.params[i]
        key = (p.dtype, p.device, slot)
        buf = self._buffers.get(key)
        if buf is None:
            size = max(scratch_size(q) for q in self.params if q.dtype == p.dtype and q.device == p.device)
            buf = self._buffers[key] = torch.empty(size, dtype=p.dtype, device=p.device)
        z = draw_direction(self._base, p, self._seeds[k][i], 0, out=buf)
        return z.mul_(self._scale[k].to(z.dtype)) if self._scale is not None else z

    def release(self) -> None:
        """Free the scratch buffers (the next draw allocates them again)."""
        self._buffers.clear()

    @contextlib.contextmanager
    def scratch_pass(self) -> Iterator[None]:
        """One pass over the parameters under ``torch.no_grad()`` that draws into the scratch buffers, freed
        at its end (:meth:`release`) even when the pass fails, so none is alive during a loss evaluation."""
        try:
            with torch.no_grad():
                yield
        finally:
            self.release()

    def _pass(self) -> contextlib.AbstractContextManager[None]:
        return self.scratch_pass()

    def _pass_direction(self, k: int, i: int, slot: int = 0) -> Tensor:
        return self._draw_into(k, i, slot)

    def weighted_sum_into(self, i: int, weights: Tensor | list[float]) -> Tensor:
        """:meth:`weighted_sum` ``(i, weights)`` in the scratch buffers: a view, valid until the next draw
        (a loop over the tensors runs inside :meth:`scratch_pass`); in bfloat16 / float16 with K > 1 a new
        tensor (the sum runs in float32, see :meth:`_weighted`)."""
        return self._weighted(i, weights, self._draw_into)


def last_offset(eps: float, one_sided: bool) -> float:
    """The multiple of ``z_{K−1}`` that ``spsa_directional_derivatives(..., leave_last=True)`` leaves added."""
    return eps if one_sided else -eps


def evaluate_loss(where: str, model: nn.Module, loss_fn: object) -> Tensor:
    """``loss_fn(model)`` under ``torch.no_grad()``, checked to be a real scalar, detached.

    ``torch.autocast`` keeps the cast copies of the weights it made for the forward until its context ends;
    the weights change in place between evaluations, so the cache is cleared before and after each one (a
    no-op when autocast is off)."""
    torch.clear_autocast_cache()
    try:
        with torch.no_grad():
            value = loss_fn(model)  # type: ignore[operator]
    finally:
        torch.clear_autocast_cache()
    return check_real_scalar(where, value).detach()


def _bits(t: Tensor) -> Tensor:
    """``t``'s storage as integers of its width (so ``-0.0`` differs from ``0.0`` and a NaN from itself)."""
    return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _pack_nibbles(values: Tensor) -> Tensor:
    """Integers in ``[-8, 7]`` (any shape, read row-major) as ``uint8``, two to a byte."""
    codes = (values.flatten() + 8).to(torch.uint8)
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_full((1,), 8)])
    pairs = codes.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def _unpack_nibbles(packed: Tensor, numel: int) -> Tensor:
    """:func:`_pack_nibbles` undone: ``numel`` integers (``int16``), flat."""
    return torch.stack([packed & 15, packed >> 4], 1).flatten()[:numel].to(torch.int16) - 8


class RoundingLedger:
    r"""What rounding would not bring back when a direction is added and taken back in place, kept so that
    the parameters come back bit for bit: ``restore="exact"`` (see the module docstring).

    :meth:`perturb_` adds ``ε z_k`` to every tensor; for each it first runs, on a copy, the in-place chain
    that takes the perturbation back (two-point ``−2εz, +εz``; one-sided ``−εz``) with
    :meth:`Perturbation.shift_`, the very operation the pass uses, and keeps the difference between
    ``θ``'s bits and the bits that chain would leave: for a tensor where few entries differ, their index and
    value (8 bytes + one value each); else four bits per entry (the difference of the bit patterns, a few
    units in the last place: 95 % within ±1) plus index and value of the rare entries beyond ±7 or across a
    sign. :meth:`finish_` runs
    the rest of the chain from wherever a pass stopped and :meth:`patch_` writes the differences back: the
    parameters are then bit for bit what they were. :attr:`rounded_away` / :attr:`perturbed` count the
    entries where ``θ + εz`` rounded back to ``θ`` (with ``z ≠ 0``), for the estimator's warning;
    :attr:`saved_bytes` is what the step kept.

    Example:
        >>> import torch
        >>> w = torch.tensor([300.0, 1.0, 0.0], dtype=torch.bfloat16)
        >>> p = Perturbation("gaussian", [w], 1, torch.Generator().manual_seed(0))
        >>> ledger, before = RoundingLedger([w]), w.clone()
        >>> ledger.perturb_(p, 0, 1e-2, two_point=True)
        >>> ledger.finish_(p, 0, 1e-2, state=1.0)
        >>> bool(torch.equal(w, before))
        True
    """

    def __init__(self, params: Sequence[Tensor]) -> None:
        self.params = list(params)
        self._sparse: dict[int, tuple[Tensor, Tensor]] = {}
        self._dense: dict[int, Tensor] = {}
        self.two_point = True
        self.rounded_away: Tensor | int = 0
        self.perturbed = 0
        self.saved_bytes = 0

    def perturb_(self, source: Perturbation, k: int, eps: float, *, two_point: bool) -> None:
        """``θ_i += ε z_{k,i}`` for every tensor, keeping what the way back would lose (see the class)."""
        self.two_point = two_point
        done = 0
        try:
            with source._pass():
                for i, p in enumerate(self.params):
                    self._perturb_one(source, i, p, source._pass_direction(k, i), eps)
                    done += 1
        except BaseException:  # a failed draw or allocation: take back the tensors already perturbed
            self.finish_(source, k, eps, state=1.0, only=range(done))
            raise

    def _perturb_one(self, source: Perturbation, i: int, p: Tensor, z: Tensor, eps: float) -> None:
        up = source.shift_(p.detach().clone(), z, eps)
        bits = _bits(p)
        # the directions' entries are never 0 (Gaussian, Rademacher, sphere): every entry is perturbed
        self.rounded_away = self.rounded_away + torch.count_nonzero(_bits(up) == bits)
        self.perturbed += p.numel()
        way = up.clone()
        if self.two_point:
            source.shift_(source.shift_(way, z, -2 * eps), z, eps)
        else:
            source.shift_(way, z, -eps)
        back = _bits(way)
        diff = bits - back  # exact for same-signed bit patterns; non-zero exactly where they differ
        count = int(torch.count_nonzero(diff))
        if count * (8 + p.element_size()) < p.numel():  # few: index and value
            self._keep_sparse(i, p, diff != 0, count)
        else:  # many: four bits per entry, and index and value beyond them or across a sign
            wide = ((bits ^ back) < 0) | (diff < -8) | (diff > 7)
            self._dense[i] = _pack_nibbles(diff.masked_fill_(wide, 0))
            self.saved_bytes += self._dense[i].numel()
            self._keep_sparse(i, p, wide, int(torch.count_nonzero(wide)))
        p.copy_(up)

    def _keep_sparse(self, i: int, p: Tensor, mask: Tensor, count: int) -> None:
        if count:
            idx = mask.flatten().nonzero().squeeze(1)
            self._sparse[i] = (idx, p.detach().flatten()[idx].clone())
            self.saved_bytes += count * (8 + p.element_size())

    def finish_(
        self, source: Perturbation, k: int, eps: float, state: float, only: Sequence[int] | None = None
    ) -> None:
        """Take direction ``k`` back from ``state`` (the multiple of ``εz_k`` added now: ``1`` after ``L⁺``,
        ``−1`` after ``L⁻``) along the chain :meth:`perturb_` prepared, then :meth:`patch_`."""
        if self.two_point and state == 1.0:
            source.add_(k, -2 * eps, only=only)
            state = -1.0
        if state != 0.0:
            source.add_(k, -state * eps, only=only)
        self.patch_()

    def patch_(self) -> None:
        """Write the kept differences back (after the chain) and forget them."""
        with torch.no_grad():
            for i, packed in self._dense.items():
                bits = _bits(self.params[i])
                bits.add_(_unpack_nibbles(packed, bits.numel()).view(bits.shape).to(bits.dtype))
            for i, (idx, values) in self._sparse.items():
                p = self.params[i]
                if p.is_contiguous():
                    p.view(-1).index_copy_(0, idx, values)
                else:
                    p[torch.unravel_index(idx, p.shape)] = values
        self._sparse.clear()
        self._dense.clear()


@contextlib.contextmanager
def snapshot(params: Sequence[Tensor], enabled: bool) -> Iterator[list[Tensor] | None]:
    """Keep a copy of ``params`` for the block and copy it back when the block ends, however it ends."""
    if not enabled:
        yield None
        return
    saved = [p.detach().clone() for p in params]
    try:
        yield saved
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


def spsa_directional_derivatives(
    model: nn.Module,
    loss_fn: object,
    params: Sequence[Tensor],
    source: Perturbation,
    *,
    eps: float,
    one_sided: bool = False,
    restore: str = "exact",
    leave_last: bool = False,
    where: str = "fwdgrad.derivatives.spsa_directional_derivatives",
    ledger: RoundingLedger | None = None,
) -> tuple[Tensor, Tensor]:
    r"""``(loss, d [K])``: finite-difference directional derivatives along the K directions of ``source``.

    Two-point (default): ``d_k = (L(θ+εz_k) − L(θ−εz_k)) / 2ε``, two evaluations per direction, in the
    MeZO order ``+εz, L⁺, −2εz, L⁻, +εz``; ``loss`` is the mean of ``(L⁺ + L⁻)/2`` over k (``L(θ) + O(ε²)``).
    One-sided: ``d_k = (L(θ+εz_k) − L(θ)) / ε``, with ``L(θ)`` (the returned ``loss``) evaluated once and
    shared by the K directions: K + 1 evaluations.

    ``params`` must be the tensors ``source`` was built on, the module's own parameters (changed in place
    and restored, see the module docstring for the exact guarantee of each ``restore`` mode). Non-finite
    losses are returned as they are (the caller decides); the parameters are restored in any case, except
    with ``leave_last=True`` (``restore="regenerate"`` only): then, when every evaluation returned, the last
    direction is *not* taken back and the parameters are ``θ + o·z_{K−1}`` on return, with the offset
    ``o = −ε`` (two-point) or ``+ε`` (one-sided), which :func:`last_offset` gives. A fused update folds
    ``o`` into its own pass over the parameters and so saves one draw of every tensor (MeZO draws each ``z``
    four times a step; this draws it three times), or calls ``source.add_(K − 1, −o)`` to finish.
    ``ledger``: the :class:`RoundingLedger` of ``restore="exact"`` (one is made when ``None``), whose counts
    the caller may read.

    The differences are formed in float32 at least (a bfloat16 loss would round them again); the loss keeps
    ``loss_fn``'s dtype.
    """
    eps = check_eps(where, eps)
    check_restore(where, restore)
    exact = restore == "snapshot"
    if leave_last and restore != "regenerate":
        raise ValueError(f"{where}: leave_last=True needs restore='regenerate', got restore={restore!r}")
    if restore == "exact" and ledger is None:
        ledger = RoundingLedger(params)
    losses_plus: list[Tensor] = []
    losses_minus: list[Tensor] = []
    with snapshot(params, exact) as saved:
        base = evaluate_loss(where, model, loss_fn) if one_sided else None
        for k in range(source.num_directions):
            state = 0.0  # the multiple of ε z_k currently added to the parameters
            try:
                if restore == "exact":
                    assert ledger is not None
                    ledger.perturb_(source, k, eps, two_point=not one_sided)
                else:
                    source.add_(k, eps)
                state = 1.0
                losses_plus.append(evaluate_loss(where, model, loss_fn))
                if not one_sided:
                    source.add_(k, -2 * eps)
                    state = -1.0
                    losses_minus.append(evaluate_loss(where, model, loss_fn))
                if leave_last and k == source.num_directions - 1:
                    state = 0.0  # left for the caller (see the docstring)
            finally:
                if exact:
                    with torch.no_grad():
                        for p, s in zip(params, saved):
                            p.copy_(s)
                elif restore == "exact":
                    assert ledger is not None
                    ledger.finish_(source, k, eps, state)
                elif state != 0.0:
                    source.add_(k, -state * eps)
    wide = torch.promote_types(losses_plus[0].dtype, torch.float32)
    plus = torch.stack(losses_plus).to(wide)
    if one_sided:
        assert base is not None
        return base, (plus - base.to(wide)) / eps
    minus = torch.stack(losses_minus).to(wide)
    return ((plus + minus) / 2).mean().to(losses_plus[0].dtype), (plus - minus) / (2 * eps)


class PerturbationSource:
    r"""A :class:`Perturbation` handed out as a direction source (what
    :class:`~fwdgrad.estimators.gradient.ImplicitGradient` and seed sharing need of one), so that
    ``ImplicitGradient(loss, d, PerturbationSource(p))`` is the SPSA estimate ``(1/K) Σ_k d_k z_k`` formed from
    the very draws that perturbed the parameters.

    Sources index tensor first: ``dense(i, k)`` is ``p.direction(k, i)``, i.e. ``z_{k,i}``. Every direction
    is drawn again from its seed when it is used (nothing stored); a :class:`Perturbation` built from the same
    generator state on another process (a rank of :class:`fwdgrad.distributed.SeedSharingSGD`, the replay)
    hands out the same directions bit for bit, whatever K and the distribution (``sphere`` included: its
    scales come from the same draws).

    Example:
        >>> import torch
        >>> w = torch.zeros(3, 2)
        >>> make = lambda: PerturbationSource(Perturbation("gaussian", [w], 2, torch.Generator().manual_seed(0)))
        >>> a, b = make(), make()
        >>> bool(torch.equal(a.dense(0, 1), b.perturbation.direction(1, 0)))
        True
    """

    stored = False
    factored = False
    regenerable = True  # each tensor's directions come from its own seeds (threads may draw tensors apart)

    def __init__(self, perturbation: Perturbation) -> None:
        self.perturbation = perturbation
        self.name = perturbation.name
        self.primals = [p.detach() for p in perturbation.params]
        self.num_directions = perturbation.num_directions

    def direction(self, index: int, k: int) -> Tensor:
        """``z_{k,index}`` (a fresh tensor)."""
        return self.perturbation.direction(k, index)

    def dense(self, index: int, k: int) -> Tensor:
        return self.perturbation.direction(k, index)

    def materialise(self) -> list[Tensor]:
        """Every direction, ``[K, *θ_i.shape]`` per tensor."""
        return self.perturbation.materialise()

    def weighted_sum(self, index: int, weights: Tensor, out: Tensor | None = None, alpha: float = 1.0) -> Tensor:
        """``out + alpha · Σ_k weights[k] · z_{k,index}`` (``out`` updated in place; ``None``: a new tensor), one
        direction drawn at a time; no weight is read on the host."""
        dtype = self.primals[index].dtype
        if self.num_directions > 1 and dtype in HALF_PRECISION:  # summed in float32, as Perturbation._weighted
            total = self.perturbation._weighted(index, weights.float(), lambda k, i, slot: self.dense(i, k), wide=True)
            if out is None:
                return total.mul_(alpha).to(dtype)
            return out.copy_(out.float().add_(total, alpha=alpha))
        return add_weighted_directions(lambda k: self.perturbation.direction(k, index), weights.to(dtype),
                                       self.num_directions, out, alpha)

    def mean(self, index: int, dirs: Tensor) -> Tensor:
        """``(1/K) Σ_k dirs[k] · z_{k,index}``."""
        return self.weighted_sum(index, dirs, alpha=1.0 / self.num_directions)
