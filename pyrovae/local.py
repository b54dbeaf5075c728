r"""The per-datapoint optimization of :math:`q^*`: each datapoint's own variational parameters.

For a datapoint :math:`x`, :math:`q^*` is the best member of the VAE's variational family for
that one datapoint,

.. math::

    \mathcal L[q^*](x) = \max_{\lambda} \mathbb E_{q_\lambda(z)}[\log p(x, z) - \log q_\lambda(z)],

found by optimizing the datapoint's own parameters (the family's ``local_params(x, idx)``, started
at the encoder's output, turned into a distribution by ``family.distribution_from_params``) with
the decoder and the prior fixed. :func:`pyrovae.gaps.gaps` uses it for the amortization gap, and
the estimators of :mod:`pyrovae.importance` for ``local="fit"`` (a per-datapoint family scored on
new data). The ELBOs of different datapoints are independent sums, so a whole batch is optimized
jointly by one :class:`torch.optim.Adam` (Adam is elementwise, so this is the same as one optimizer
per datapoint).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pyro
import torch

from ._checks import check_positive_float, check_positive_int
from .errors import ConfigError
from .evaluation import (
    DEFAULT_MAX_BYTES,
    Program,
    Scorable,
    evaluating,
    frozen,
    rows_per_chunk,
)
from .options import EstimateOptions, resolve_options

__all__ = ["optimal_elbo"]


def _local_program(vae: Scorable, q: Callable[[], Any]) -> Program:
    """The VAE's model with a guide that samples ``z`` from ``q()`` (private): scores any
    proposal against the model with the same machinery as the amortized guide."""

    def guide(x: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        if idx is None:
            idx = torch.arange(x.shape[0], device=x.device)
        with pyro.plate("data", vae.num_data, subsample=idx):
            return pyro.sample("z", q())

    return Program(vae.model, guide, vae=vae, modules=[vae], takes_idx=True)


def _check_reparameterized(program: Program, x: torch.Tensor, idx: torch.Tensor) -> None:
    """q* is found by reparameterized gradients: refuse a guide site that cannot give them."""
    from pyro import poutine

    with torch.random.fork_rng(), torch.no_grad(), poutine.block():
        trace = poutine.trace(program.guide).get_trace(*program.args(x, idx))
    for name in program.latent:
        if not getattr(trace.nodes[name]["fn"], "has_rsample", False):
            raise ConfigError(
                f"L[q*] needs reparameterized gradients, but the guide's site {name!r} "
                f"({type(trace.nodes[name]['fn']).__name__}) has no rsample"
            )


def check_family(vae: Scorable) -> Any:
    """The family whose per-datapoint parameters are optimized: ``None`` for a ``(model, guide)``
    pair (its guide's distribution parameters are optimized); a family without ``local_params``
    and ``distribution_from_params`` is refused in one line."""
    if isinstance(vae, (tuple, list)):
        return None  # a plain pair: its guide's distribution parameters are optimized (_PairLocal)
    family = getattr(vae, "family", None)
    if not (
        callable(getattr(family, "local_params", None))
        and callable(getattr(family, "distribution_from_params", None))
    ):
        raise ConfigError(
            f"gap analysis needs a family with local_params(x, idx) and "
            f"distribution_from_params(params) (all pyrovae families have them); "
            f"{type(family).__name__} lacks them"
        )
    return family


def _start_params(family: Any, x: torch.Tensor, idx: torch.Tensor, lookup: bool) -> dict[str, torch.Tensor]:
    """Where a datapoint's own parameters start: the encoder's output for an amortized family;
    for a per-datapoint family, its stored row only when ``lookup`` (the data are the family's
    own), else the wrapped family's encoder output (``Local`` of an amortized family) or the
    mean of the stored rows (the same neutral start for every datapoint: never another
    datapoint's own parameters)."""
    with torch.no_grad():
        if getattr(family, "amortized", True) or lookup:
            return family.local_params(x, idx)
        inner = getattr(family, "family", None)
        if inner is not None and getattr(inner, "amortized", False):
            return inner.local_params(x)
        tables = family.local_params(x, torch.arange(int(family.num_data), device=x.device))
        return {k: v.mean(0, keepdim=True).expand((x.shape[0],) + tuple(v.shape[1:]))
                for k, v in tables.items()}


class _FamilyLocal:
    """Per-datapoint parameters of a pyrovae family: ``local_params`` / ``distribution_from_params``."""

    def __init__(self, vae: Scorable, lookup: bool) -> None:
        self.vae, self.lookup = vae, lookup
        self.name = type(vae.family).__name__

    def start(self, x: torch.Tensor, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        return _start_params(self.vae.family, x, idx, self.lookup)

    def program(self, params: dict[str, torch.Tensor]) -> Program:
        family = self.vae.family
        return _local_program(self.vae, lambda: family.distribution_from_params(params))


class _PairLocal:
    r"""Per-datapoint parameters of a plain guide, found generically: the parameters
    (``arg_constraints``) of each latent site's distribution in the guide's trace, mapped to
    the reals by ``biject_to``; the distribution is rebuilt from them by its own class
    (``Normal(loc, scale)``, ``MultivariateNormal(loc, scale_tril=...)``, ...). A guide site
    that is not such a distribution (a flow) has no parameters to optimize generically: refused.
    """

    name = "the guide"

    def __init__(self, program: Program) -> None:
        self.p = program

    def start(self, x: torch.Tensor, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        from pyro import poutine
        from torch.distributions import biject_to

        with torch.random.fork_rng(), torch.no_grad(), poutine.block():  # draws nothing
            trace = poutine.trace(self.p.guide).get_trace(*self.p.args(x, idx))
        self.sites: dict[str, tuple[type, int, dict[str, Any]]] = {}
        params = {}
        for name in self.p.latent:
            fn = trace.nodes[name]["fn"]
            event = 0
            while isinstance(fn, torch.distributions.Independent):
                event += fn.reinterpreted_batch_ndims
                fn = fn.base_dist
            constraints = getattr(fn, "arg_constraints", None)
            held = {k: c for k, c in (constraints or {}).items()
                    if isinstance(fn.__dict__.get(k), torch.Tensor)}
            if isinstance(fn, torch.distributions.TransformedDistribution) or not held:
                raise ConfigError(
                    f"gaps of a (model, guide) pair optimizes the parameters of each guide "
                    f"site's distribution; site {name!r} is a {type(fn).__name__}, which has none "
                    "that can be optimized generically (use a pyrovae VAE with a family)"
                )
            self.sites[name] = (type(fn), event, held)
            for k, c in held.items():
                value = fn.__dict__[k].detach()
                params[f"{name}.{k}"] = biject_to(c).inv(value).clone()
        return params

    def program(self, params: dict[str, torch.Tensor]) -> Program:
        import pyro
        from torch.distributions import biject_to

        p, sites = self.p, self.sites

        def guide(x: torch.Tensor, *rest: Any) -> None:
            with pyro.plate(p.data_plate, x.shape[0], dim=p.data_dim):
                for name, (cls, event, held) in sites.items():
                    kwargs = {k: biject_to(c)(params[f"{name}.{k}"]) for k, c in held.items()}
                    d = cls(**kwargs)
                    pyro.sample(name, d.to_event(event) if event else d)

        return Program(p.model, guide, modules=p.modules, takes_idx=p.takes_idx)


def _optimize_batch(
    vae: Scorable,
    x: torch.Tensor,
    idx: torch.Tensor,
    *,
    num_steps: int,
    lr: float,
    num_particles: int,
    check_every: int,
    tol: float,
    max_decays: int,
    lookup: bool = True,
) -> tuple[dict[str, torch.Tensor], int]:
    r"""Maximize :math:`\sum_n \mathcal L[q_n]` over the batch's local parameters.

    Adam on the reparameterized ELBO (``num_particles`` draws per step). At the start and every
    ``check_every`` steps each datapoint's current parameters are scored by a fresh ELBO estimate
    with ``10 * num_particles`` draws, and each datapoint keeps the best parameters seen so far
    (so the result is never worse than the start because of late gradient noise; the
    final ELBO is estimated afterwards on fresh draws, so this choice does not bias it upwards).
    When the batch's mean score improved by less than ``tol`` nats per datapoint the learning
    rate is halved; after ``max_decays`` halvings (or ``num_steps`` steps) the optimization stops.

    :returns: the best parameters (detached) and the number of steps taken.
    """
    local = vae if isinstance(vae, (_PairLocal, _FamilyLocal)) else _FamilyLocal(vae, lookup)
    start = local.start(x, idx)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in start.items()}
    if not params:
        raise ConfigError(f"{local.name}.local_params returned no parameters")
    for k, v in params.items():
        if v.dim() == 0 or v.shape[0] != x.shape[0]:
            raise ConfigError(
                f"{local.name}.local_params()[{k!r}] has shape {tuple(v.shape)}; "
                f"local parameters must have the batch size {x.shape[0]} first"
            )
    proposal = local.program(params)
    proposal.analyze(x, idx)
    optimizer = torch.optim.Adam(list(params.values()), lr=lr)
    leaves = list(params.values())

    def score() -> torch.Tensor:
        with torch.no_grad():
            return proposal.log_weights(x, idx, 10 * num_particles).mean(0)

    best_score = score()
    best_params = {k: v.detach().clone() for k, v in params.items()}
    best_mean = float(best_score.mean())
    decays = 0
    step = 0
    while step < num_steps:
        w = proposal.log_weights(x, idx, num_particles)  # (S, batch)
        grads = torch.autograd.grad(-w.mean(0).sum(), leaves)
        if not all(bool(torch.isfinite(g).all()) for g in grads):
            break  # a non-finite gradient: keep the best parameters found so far
        for p, g in zip(leaves, grads):
            p.grad = g
        optimizer.step()
        step += 1
        if step % check_every == 0 or step == num_steps:
            current = score()
            better = current > best_score  # NaN scores never win
            for k, v in params.items():
                mask = better.reshape((-1,) + (1,) * (v.dim() - 1))
                best_params[k] = torch.where(mask, v.detach(), best_params[k])
            best_score = torch.where(better, current, best_score)
            current_mean = float(current.mean())
            if not current_mean >= best_mean + tol:
                decays += 1
                if decays > max_decays:
                    break
                for group in optimizer.param_groups:
                    group["lr"] *= 0.5
            best_mean = max(best_mean, current_mean)
    return best_params, step


#: The fields of :class:`~pyrovae.options.EstimateOptions` that :func:`optimal_elbo` took as
#: keywords before ``options`` existed (still taken).
_KEYWORDS = ("max_bytes", "max_rows", "seed", "progress", "local")


def optimal_elbo(
    vae: Scorable,
    data: Any,
    *,
    num_elbo_samples: int = 1000,
    num_steps: int = 2000,
    lr: float = 1e-2,
    num_particles: int = 10,
    batch_size: int = 100,
    check_every: int = 50,
    tol: float = 1e-3,
    max_decays: int = 4,
    options: EstimateOptions | None = None,
    **keywords: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    r""":math:`\mathcal L[q^*]` per datapoint: each datapoint's variational parameters optimized.

    .. math::

        \mathcal L[q^*](x) = \max_{\lambda} \mathbb E_{q_\lambda(z)}[\log p(x, z) - \log q_\lambda(z)]

    Starts every datapoint's parameters at the encoder's output (``vae.family.local_params``;
    for a per-datapoint family see :func:`_start_params`), keeps the decoder, the prior and any
    shared network of the family fixed, and runs :func:`_optimize_batch` on batches of
    ``batch_size`` datapoints; then estimates the ELBO of the optimized distribution with
    ``num_elbo_samples`` draws (in chunks bounded by ``options.max_bytes`` /
    ``options.max_rows``).

    :param options: how the estimate is computed (:class:`~pyrovae.options.EstimateOptions`;
        its fields also as keywords, not beside it, as before ``options`` existed: ``max_bytes``,
        ``max_rows``, ``seed``, ``progress``, ``local``). ``local="lookup"`` starts a
        per-datapoint family at its stored parameters (the data are its own datapoints). The
        optimization runs in one process and through Pyro's tracing: ``process_group`` and
        ``compile`` are refused.
    :param keywords: the fields of ``options`` as keywords (see ``options``).
    :returns: ``(elbo, num_steps)``, both of shape ``(num_datapoints,)``.
    """
    options = resolve_options(options, keywords, "optimal_elbo", takes=_KEYWORDS)
    options.refuse("optimal_elbo", "process_group", "compile")
    values, steps = [], []
    for sub, x, idx, n_steps in optimized_batches(
        vae,
        data,
        num_steps=num_steps,
        lr=lr,
        num_particles=num_particles,
        batch_size=batch_size,
        check_every=check_every,
        tol=tol,
        max_decays=max_decays,
        seed=options.seed,
        progress=options.progress,
        lookup=options.local == "lookup",
    ):
        values.append(mc_elbo(sub, x, idx, num_elbo_samples, options.max_bytes, options.max_rows))
        steps.append(torch.full((x.shape[0],), n_steps, dtype=torch.long))
    return torch.cat(values), torch.cat(steps)


def optimized_batches(
    vae: Scorable,
    data: Any,
    *,
    num_steps: int = 2000,
    lr: float = 1e-2,
    num_particles: int = 10,
    batch_size: int = 100,
    check_every: int = 50,
    tol: float = 1e-3,
    max_decays: int = 4,
    seed: int | None = None,
    progress: bool = False,
    lookup: bool = True,
    context: bool = True,
) -> Any:
    """Yield ``(program, x, idx, steps)`` per batch: ``program`` scores the batch's optimized
    per-datapoint distributions against the model (decoder fixed)."""
    program = Program.resolve(vae, "vae")
    if program.vae is not None:
        check_family(vae)
    num_steps = check_positive_int(num_steps, "num_steps")
    num_particles = check_positive_int(num_particles, "num_particles")
    batch_size = check_positive_int(batch_size, "batch_size")
    check_every = check_positive_int(check_every, "check_every")
    lr = check_positive_float(lr, "lr")
    if isinstance(max_decays, bool) or not isinstance(max_decays, int) or max_decays < 0:
        raise ConfigError(f"max_decays must be a non-negative integer, got {max_decays!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol < math.inf:
        raise ConfigError(f"tol must be a finite number >= 0 (nats per datapoint), got {tol!r}")
    tol = float(tol)
    dataset = program.dataset(data)
    n = len(dataset)
    device = program.device()
    from contextlib import nullcontext

    from tqdm.auto import tqdm

    outer = evaluating(program.modules, seed) if context else nullcontext()
    with outer, frozen(program.modules), torch.enable_grad(), tqdm(
        total=n, desc="L[q*]", unit="pt", disable=not progress, leave=False
    ) as bar:
        for start in range(0, n, batch_size):
            x, idx = dataset[torch.arange(start, min(start + batch_size, n))]
            x, idx = torch.as_tensor(x).to(device), torch.as_tensor(idx).to(device)
            if start == 0:
                program.check_data(x)
                if program.vae is None:  # (a VAE's per-datapoint family is not run on new data)
                    program.analyze(x, idx)
                    _check_reparameterized(program, x, idx)
            local = _PairLocal(program) if program.vae is None else _FamilyLocal(vae, lookup)
            params, n_steps = _optimize_batch(
                local, x, idx, num_steps=num_steps, lr=lr, num_particles=num_particles,
                check_every=check_every, tol=tol, max_decays=max_decays, lookup=lookup,
            )
            sub = local.program(params)
            yield sub, x, idx, n_steps
            bar.update(x.shape[0])


def fitted_programs(program: Program, data: Any, **options: Any) -> Any:
    """For ``local="fit"`` in the estimators: ``(program, x, idx)`` per batch, each scoring the
    batch's own fitted parameters (decoder fixed; inside the caller's seeded context)."""
    for sub, x, idx, _ in optimized_batches(
        program.vae, data, lookup=False, context=False, **options
    ):
        yield sub, x, idx


@torch.no_grad()
def mc_elbo(
    program: Program,
    x: torch.Tensor,
    idx: torch.Tensor,
    num_samples: int,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_rows: int | None = None,
) -> torch.Tensor:
    """Monte Carlo ELBO of the program's guide, shape ``(batch,)``, draws in bounded chunks."""
    program.analyze(x, idx)
    rows = rows_per_chunk(program, max_bytes, max_rows)
    per_chunk = max(1, rows // x.shape[0])
    total = x.new_zeros(x.shape[0])
    for k0 in range(0, num_samples, per_chunk):
        k = min(per_chunk, num_samples - k0)
        total = total + program.log_weights(x, idx, k).sum(0)
    return (total / num_samples).cpu()
