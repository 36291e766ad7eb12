r"""Tangent samplers: the random directions ``v`` of a forward gradient.

A forward gradient along ``v`` is :math:`g = \langle \nabla f, v\rangle\, v`. It is unbiased,
:math:`\mathbb{E}[g] = \nabla f`, whenever :math:`\mathbb{E}[v v^\top] = I`. Every sampler here meets that
condition, and they differ in their second moment. With :math:`a = \nabla f \in \mathbb{R}^n` and one
direction:

==============  ==========================================  ======================
name            distribution of v                           E‖g‖²
==============  ==========================================  ======================
``gaussian``    N(0, I)                                      (n + 2)‖a‖²
``rademacher``  independent ±1 entries                       n‖a‖²
``sphere``      uniform on the sphere of radius √n           n‖a‖²
``rank1``       u vᵀ per matrix parameter, u, v Rademacher   n‖a‖²
``orthogonal``  √n·q, q₁…q_K orthonormal, random subspace    (n/K)‖a‖² for the mean
==============  ==========================================  ======================

Averaging K independent directions divides :math:`\mathbb{E}\|g - a\|^2` by K; the orthogonal sampler
draws its K directions jointly and reaches :math:`(n/K - 1)\|a\|^2`, exact at K = n (see
``variance_factor``). The parameter vector is the concatenation of all tensors in ``like``, so ``n`` is
the total number of entries and joint samplers (``sphere``, ``orthogonal``) normalise across tensors.

Every sampler takes a ``torch.Generator``; the same generator state gives the same tangents.
``gaussian`` and ``rademacher`` draw one 62-bit seed per tensor from it (:func:`tensor_seeds`) and each
direction of a tensor from a generator seeded with a seed derived from it (:func:`direction_seed`,
:func:`draw_direction`; direction 0 uses the tensor's seed itself). A tensor's tangent is then a
function of (generator state, tensor index, direction) that can be drawn again, alone, whenever it is needed (the
fused update of :mod:`fwdgrad.derivatives` relies on it), and large draws run on several threads. A
tensor's block is drawn on that tensor's device, with a generator that is re-seeded, not created, per
tensor (:func:`scratch_generator`): no host round trip per tensor. On the CPU the numbers are those of a
fresh ``torch.Generator().manual_seed(seed)``.

Example:
    >>> import torch
    >>> from fwdgrad.directions import sample_tangents
    >>> g = torch.Generator().manual_seed(0)
    >>> w, b = torch.zeros(3, 2), torch.zeros(3)
    >>> tw, tb = sample_tangents("rademacher", [w, b], num_directions=4, generator=g)
    >>> tuple(tw.shape), tuple(tb.shape)
    ((4, 3, 2), (4, 3))
    >>> bool(((tw == 1) | (tw == -1)).all())
    True
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from fwdgrad._validation import check_positive_int

Tensor = torch.Tensor
Sampler = Callable[[Sequence[Tensor], int, "torch.Generator | None"], list[Tensor]]


def _draw_device(like: Tensor, generator: torch.Generator | None) -> torch.device:
    """Where a joint sampler draws: the generator's device (its state lives there)."""
    return generator.device if generator is not None else like.device


class _Scratch(threading.local):
    generators: dict[str | torch.device, torch.Generator]

    def __init__(self) -> None:
        self.generators = {}


_SCRATCH = _Scratch()


def scratch_generator(device: torch.device | str, seed: int) -> torch.Generator:
    """This thread's reusable generator on ``device``, re-seeded with ``seed``.

    ``manual_seed`` resets the whole state (on CUDA: seed and Philox offset, on the host), so the draws equal
    those of a new generator with that seed, without allocating one per tensor per step."""
    gen = _SCRATCH.generators.get(device)  # type: ignore[call-overload]
    if gen is None:
        key = str(torch.device(device))
        gen = _SCRATCH.generators.get(key)
        if gen is None:
            gen = _SCRATCH.generators[key] = torch.Generator(device=key)
        _SCRATCH.generators[device] = gen  # type: ignore[index]
    return gen.manual_seed(seed)


#: Draw tensors on several threads when a call draws at least this many entries in all.
PARALLEL_DRAW_MIN = 1 << 20


def tensor_seeds(count: int, generator: torch.Generator | None) -> list[int]:
    """``count`` seeds in ``[0, 2^62)`` from ``generator`` (``None``: torch's global RNG), one per tensor:
    all that a per-tensor sampler draws from the generator itself."""
    device = generator.device if generator is not None else "cpu"
    return torch.randint(0, 2**62, (count,), generator=generator, device=device).tolist()


#: Odd step between the seeds of a tensor's successive directions (the golden ratio in 64 bits): direction ``k``
#: of a tensor with seed ``s`` is drawn from ``(s + k·DIRECTION_STEP) mod 2^62``. The CPU generator keys on the
#: low 32 bits of a seed, and an odd step gives ``2^32`` distinct low words in a row.
DIRECTION_STEP = 0x9E3779B97F4A7C15


def direction_seed(seed: int, k: int) -> int:
    """The seed of direction ``k`` of a tensor whose seed is ``seed`` (``direction_seed(s, 0) == s``)."""
    return (seed + k * DIRECTION_STEP) % 2**62


def scratch_size(like: Tensor) -> int:
    """How many entries an ``out`` buffer of :func:`draw_direction` needs for a tensor like ``like``
    (``like.numel()`` rounded up to a multiple of 8: a Rademacher draw writes whole bytes of signs)."""
    return -(-like.numel() // 8) * 8


def draw_direction(
    name: str, like: Tensor, seed: int, k: int, device: torch.device | str | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """Direction ``k`` (shape ``like.shape``) of per-tensor sampler ``name`` for the tensor seed ``seed``: drawn
    alone from :func:`direction_seed`, on ``device`` (default: ``like``'s), returned on ``like``'s device. So
    a direction can be drawn again, alone, with memory of one tensor, whatever K is.

    ``out``: a flat, contiguous buffer of ``like``'s dtype on the drawing device with at least
    :func:`scratch_size` ``(like)`` entries (``like.numel()`` for ``gaussian``). The direction is then drawn
    into its first entries and returned as a view of them: the same numbers, no allocation (a loop over many
    tensors reuses one buffer; the view is overwritten by the next draw into it)."""
    gen = scratch_generator(like.device if device is None else device, direction_seed(seed, k))
    need = scratch_size(like) if name == "rademacher" else like.numel()
    if out is not None and (out.dtype != like.dtype or out.dim() != 1 or out.numel() < need):
        raise ValueError(
            f"fwdgrad.directions.draw_direction: out must be a flat {like.dtype} buffer of at least "
            f"{need} entries, got {out.dtype} of shape {tuple(out.shape)}"
        )
    if name == "rademacher":
        return _rademacher(tuple(like.shape), like, gen, out)
    if out is not None:  # torch.randn is torch.empty + normal_: the same numbers
        return out[: like.numel()].view(like.shape).normal_(generator=gen).to(like.device)
    return torch.randn(like.shape, generator=gen, dtype=like.dtype, device=gen.device).to(like.device)


def draw_tensor(
    name: str, like: Tensor, num_directions: int, seed: int, device: torch.device | str | None = None
) -> Tensor:
    """The ``[K, *like.shape]`` block of per-tensor sampler ``name`` (``gaussian`` or ``rademacher``) for
    ``seed``: direction ``k`` is :func:`draw_direction` ``(name, like, seed, k)``, drawn on ``device``
    (default: ``like``'s device, where it is used) and returned on ``like``'s device."""
    if num_directions == 1:
        return draw_direction(name, like, seed, 0, device).unsqueeze(0)
    out = torch.empty((num_directions, *like.shape), dtype=like.dtype, device=like.device)
    in_place = name == "gaussian" and (device is None or torch.device(device) == like.device)
    for k in range(num_directions):
        if in_place:  # straight into the block (torch.randn is torch.empty + normal_): no copy
            out[k].normal_(generator=scratch_generator(like.device, direction_seed(seed, k)))
        else:
            out[k] = draw_direction(name, like, seed, k, device)
    return out


def _per_tensor(
    name: str, like: Sequence[Tensor], num_directions: int, generator: torch.Generator | None
) -> list[Tensor]:
    return per_tensor_blocks(name, like, num_directions, tensor_seeds(len(like), generator))


def per_tensor_blocks(
    name: str, like: Sequence[Tensor], num_directions: int | None, seeds: Sequence[int],
    into: Sequence[Tensor | None] | None = None,
) -> list[Tensor]:
    """The ``[K, *p.shape]`` blocks of per-tensor sampler ``name`` for the tensor seeds ``seeds``
    (:func:`draw_tensor` per tensor; large CPU draws on several threads, same numbers). ``num_directions``
    ``None``: direction 0 alone, shaped like the tensor (:func:`draw_direction`), drawn into ``into[i]``'s
    storage where given (a contiguous tensor of ``like[i]``'s shape, dtype and device)."""
    homes = list(into) if into is not None else [None] * len(like)
    jobs = [(p, seed, p.device, home) for p, seed, home in zip(like, seeds, homes)]

    def draw(p: Tensor, seed: int, device: torch.device, home: Tensor | None) -> Tensor:
        if num_directions is None:
            if home is None:
                return draw_direction(name, p, seed, 0, device)
            if name == "gaussian" or home.numel() % 8 == 0:  # the draw's own buffer is the home
                return draw_direction(name, p, seed, 0, device, out=home.view(-1))
            return home.copy_(draw_direction(name, p, seed, 0, device))
        return draw_tensor(name, p, num_directions, seed, device)

    workers = min(torch.get_num_threads(), len(jobs))
    total = (num_directions or 1) * sum(p.numel() for p in like)
    if workers > 1 and total >= PARALLEL_DRAW_MIN and all(torch.device(job[2]).type == "cpu" for job in jobs):
        # Each tensor has its own generator, so the numbers do not depend on the threads.
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(lambda job: draw(*job), jobs))
    return [draw(*job) for job in jobs]


def gaussian(like: Sequence[Tensor], num_directions: int, generator: torch.Generator | None) -> list[Tensor]:
    """Standard normal entries; ``E‖g‖² = (n + 2)‖∇f‖²``. Returns ``[K, *p.shape]`` per tensor."""
    return _per_tensor("gaussian", like, num_directions, generator)


_SIGN_TABLES: dict[tuple[torch.dtype, torch.device], Tensor] = {}


def _sign_table(dtype: torch.dtype, device: torch.device) -> Tensor:
    """``[256, 8]``: row ``b`` holds the signs ``2·bit_j(b) − 1`` of byte ``b``, least significant bit first."""
    key = (dtype, torch.device(device))
    table = _SIGN_TABLES.get(key)
    if table is None:
        bits = (torch.arange(256, device=device).unsqueeze(1) >> torch.arange(8, device=device)) & 1
        table = _SIGN_TABLES[key] = bits.to(dtype).mul_(2).sub_(1)
    return table


def _signs_of_bytes(raw: Tensor, dtype: torch.dtype) -> Tensor:
    """The ±1 signs of random bytes ``raw`` (int64 in ``[0, 256)``), 8 per byte, flat: one table lookup."""
    return torch.index_select(_sign_table(dtype, raw.device), 0, raw).view(-1)


def _rademacher(
    shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None, out: Tensor | None = None
) -> Tensor:
    """±1 entries from random bytes, 8 signs per byte (about 2x faster than ``bernoulli_`` on CPU); the
    bytes are ``randint(0, 256)`` (the generator gives one number per byte whatever the integer dtype) and
    the signs come from a 256-row table (written into ``out``'s first entries when given, see
    :func:`draw_direction`)."""
    numel = math.prod(shape)
    device = _draw_device(like, generator)
    raw = torch.randint(0, 256, ((numel + 7) // 8,), generator=generator, device=device)
    if out is None:
        signs = _signs_of_bytes(raw, like.dtype)
    else:
        signs = out[: 8 * raw.numel()]
        torch.index_select(_sign_table(like.dtype, raw.device), 0, raw, out=signs.view(-1, 8))
    return signs[:numel].view(shape).to(like.device)


def rademacher(like: Sequence[Tensor], num_directions: int, generator: torch.Generator | None) -> list[Tensor]:
    """Independent ±1 entries; ``E‖g‖² = n‖∇f‖²``, the smallest of any i.i.d. distribution."""
    return _per_tensor("rademacher", like, num_directions, generator)


def sphere(like: Sequence[Tensor], num_directions: int, generator: torch.Generator | None) -> list[Tensor]:
    """Uniform on the sphere of radius √n of the whole parameter vector; ``E‖g‖² = n‖∇f‖²``."""
    draws = gaussian(like, num_directions, generator)
    n = sum(p.numel() for p in like)
    sq_norm = sum(d.flatten(1).pow(2).sum(1) for d in draws)  # [K]
    scale = math.sqrt(n) / sq_norm.sqrt()
    return [d * scale.view(-1, *([1] * (d.dim() - 1))) for d in draws]


def orthogonal(like: Sequence[Tensor], num_directions: int, generator: torch.Generator | None) -> list[Tensor]:
    """K orthonormal directions of a uniformly random K-dim subspace, each scaled to norm √n.

    The mean estimate ``(1/K) Σ (aᵀvₖ) vₖ = (n/K) Σ (aᵀqₖ) qₖ`` is unbiased with
    ``E‖g − a‖² = (n/K − 1)‖a‖²``. Requires ``K <= n``; costs a QR of an ``n × K`` matrix.
    """
    n = sum(p.numel() for p in like)
    if num_directions > n:
        raise ValueError(
            f"fwdgrad.directions.orthogonal: num_directions={num_directions} exceeds the number of "
            f"parameters n={n}; at most n orthonormal directions exist"
        )
    ref = like[0]
    device = _draw_device(ref, generator)
    dtype = ref.dtype if ref.dtype in (torch.float32, torch.float64) else torch.float32
    m = torch.randn((n, num_directions), generator=generator, dtype=dtype, device=device)
    q, r = torch.linalg.qr(m)
    # Fix the signs so that q is Haar-distributed (QR alone is not unique).
    q = q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones((), dtype=dtype, device=device))
    directions = (q.T * math.sqrt(n)).to(ref.device)  # [K, n]
    out, start = [], 0
    for p in like:
        out.append(directions[:, start : start + p.numel()].reshape(num_directions, *p.shape).to(p.dtype))
        start += p.numel()
    return out


def rank1_factors(
    like: Sequence[Tensor], num_directions: int, generator: torch.Generator | None
) -> list[tuple[Tensor, Tensor] | Tensor]:
    """The factors of the ``rank1`` tangents: ``(u [K, out], v [K, in])`` for tensors with ``dim >= 2``
    (``in`` is the product of the trailing dimensions) and a plain ``[K, *shape]`` Rademacher tensor for
    the others. ``rank1`` expands exactly these factors, so a fast path may use them directly."""
    shapes: list[tuple[int, ...]] = []
    for p in like:
        if p.dim() >= 2:
            shapes += [(num_directions, p.shape[0]), (num_directions, math.prod(p.shape[1:]))]
        else:
            shapes.append((num_directions, *p.shape))
    signs = iter(_rademacher_many(shapes, like, generator))
    return [(next(signs), next(signs)) if p.dim() >= 2 else next(signs) for p in like]


def _rademacher_many(
    shapes: Sequence[tuple[int, ...]], like: Sequence[Tensor], generator: torch.Generator | None
) -> list[Tensor]:
    """``[_rademacher(s, ...) for s in shapes]`` drawn in one call: the random bytes of every tensor, in
    order, come from one ``randint`` (on the CPU the generator hands out bytes one by one, so these are the
    numbers of the separate draws), then each tensor's signs from its own bytes. A per-step cost of a few
    kernels instead of ten per tensor. Tensors on several devices are drawn one by one."""
    ref = like[0]
    if len({p.device for p in like}) > 1 or len({p.dtype for p in like}) > 1:
        return [_rademacher(s, p, generator) for s, p in zip(shapes, _owners(shapes, like))]
    device = _draw_device(ref, generator)
    sizes = [math.prod(s) for s in shapes]
    nbytes = [(n + 7) // 8 for n in sizes]
    raw = torch.randint(0, 256, (sum(nbytes),), generator=generator, device=device)
    signs = _signs_of_bytes(raw, ref.dtype).to(ref.device)
    out, start = [], 0
    for s, n, nb in zip(shapes, sizes, nbytes):
        out.append(signs[8 * start : 8 * start + n].view(s))
        start += nb
    return out


def _owners(shapes: Sequence[tuple[int, ...]], like: Sequence[Tensor]) -> list[Tensor]:
    """The tensor of ``like`` each of ``rank1_factors``' shapes belongs to (two shapes for a matrix)."""
    out: list[Tensor] = []
    for p in like:
        out += [p, p] if p.dim() >= 2 else [p]
    return out[: len(shapes)]


def rank1(like: Sequence[Tensor], num_directions: int, generator: torch.Generator | None) -> list[Tensor]:
    """``u vᵀ`` with Rademacher ``u, v`` for matrix-shaped tensors (conv kernels are flattened to
    ``[out, in·kh·kw]``), Rademacher for the rest. Entries are ±1, so ``‖v‖² = n`` and
    ``E‖g‖² = n‖∇f‖²``, the same as full Rademacher, at the cost of ``out + in`` random signs."""
    out = []
    for p, f in zip(like, rank1_factors(like, num_directions, generator)):
        if isinstance(f, tuple):
            u, v = f
            out.append((u.unsqueeze(2) * v.unsqueeze(1)).reshape(num_directions, *p.shape))
        else:
            out.append(f)
    return out


SAMPLERS: dict[str, Sampler] = {
    "gaussian": gaussian,
    "rademacher": rademacher,
    "sphere": sphere,
    "orthogonal": orthogonal,
    "rank1": rank1,
}


def check_sampler_name(where: str, name: object) -> str:
    """Raise a ``ValueError`` naming ``name`` and the choices unless it is a known sampler."""
    if not isinstance(name, str) or name not in SAMPLERS:
        raise ValueError(f"{where}: unknown tangents {name!r}; choose one of {sorted(SAMPLERS)}")
    return name


def sample_tangents(
    name: str,
    like: Sequence[Tensor],
    num_directions: int = 1,
    generator: torch.Generator | None = None,
) -> list[Tensor]:
    """Draw ``num_directions`` tangents for the tensors in ``like``.

    Args:
        name: one of ``gaussian``, ``rademacher``, ``sphere``, ``orthogonal``, ``rank1``.
        like: the primal tensors; each tangent has its dtype and device.
        num_directions: K, the number of directions.
        generator: the source of randomness (``None``: torch's global RNG).

    Returns:
        One tensor ``[K, *p.shape]`` per tensor ``p`` in ``like``.
    """
    check_sampler_name("fwdgrad.sample_tangents", name)
    check_positive_int("fwdgrad.sample_tangents", "num_directions", num_directions)
    return SAMPLERS[name](list(like), num_directions, generator)


def variance_factor(name: str, n: int, num_directions: int = 1) -> float:
    """``E‖ĝ − ∇f‖² / ‖∇f‖²`` for the mean estimate ``ĝ`` over K directions of sampler ``name``.

    Gaussian ``(n + 1)/K``; Rademacher, sphere and rank-1 ``(n − 1)/K``; orthogonal ``n/K − 1``.
    Rank-1's value holds when every tensor is either a vector or a matrix (the moment is the same as
    full Rademacher because the entries are ±1 and uncorrelated).
    """
    check_sampler_name("fwdgrad.directions.variance_factor", name)
    k = num_directions
    if name == "gaussian":
        return (n + 1) / k
    if name == "orthogonal":
        return n / k - 1
    return (n - 1) / k


__all__ = [
    "DIRECTION_STEP",
    "PARALLEL_DRAW_MIN",
    "SAMPLERS",
    "Sampler",
    "check_sampler_name",
    "direction_seed",
    "draw_direction",
    "draw_tensor",
    "gaussian",
    "orthogonal",
    "per_tensor_blocks",
    "rademacher",
    "rank1",
    "rank1_factors",
    "sample_tangents",
    "scratch_generator",
    "scratch_size",
    "sphere",
    "tensor_seeds",
    "variance_factor",
]
