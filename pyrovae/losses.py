r"""Training objectives beyond Pyro's: the IWAE bound under minibatching, DReG and STL gradients.

Both losses are :class:`pyro.infer.ELBO` subclasses. They work with :func:`pyrovae.fit` (through
``differentiable_loss``) and with :class:`pyro.infer.SVI` (through ``loss`` and
``loss_and_grads``), and with every prior, family and likelihood: they read only the model and
guide traces. Extra arguments (e.g. ``kl_weight=``) are passed on to the model and the guide.

:class:`IWAE` is the importance weighted bound of Burda et al. [1]. For a minibatch ``idx`` of
``B`` of the ``N`` datapoints (``pyro.plate("data", N, subsample=idx)``) and ``K`` draws
:math:`z_{ik} \sim q(z \mid x_i)`,

.. math::

    w_{ik} = \sum_{\text{model sites}} s \log p - \sum_{\text{guide sites}} s \log q,
    \qquad
    \mathcal L_K = \frac{N}{B} \sum_{i \in \text{idx}}
        \Big[\operatorname{logsumexp}_k w_{ik} - \log K\Big],

where each site's scale :math:`s` excludes the data plate's subsample scale :math:`N/B` but keeps
any other scale (e.g. ``poutine.scale(kl_weight)`` on ``"z"`` for a beta-VAE or KL warm-up). So
with ``K = 1`` it equals ``Trace_ELBO`` exactly, and :math:`\mathcal L_K` is an unbiased estimate
of the full-data bound :math:`\sum_{n=1}^N \mathbb E[\log \frac1K \sum_k e^{w_{nk}}]`.

Why not ``pyro.infer.RenyiELBO(alpha=0)``. Pyro applies every site's scale, the subsample scale
included, to the log-weights *before* the logsumexp over particles, so under subsampling it
optimizes

.. math::

    \sum_{i} \Big[\operatorname{logsumexp}_k \big(\tfrac{N}{B} w_{ik}\big) - \log K\Big]
    \approx \frac{N}{B} \sum_i \max_k w_{ik},

a tempered objective that is not the IWAE bound: it tracks the *largest* weight, not the mean
of the weights, and its gradient weighs the particles by :math:`\tilde w_{ik}^{N/B}`
(renormalized), nearly all on the best one. Measured on a 784-200-50 tanh VAE trained 2 epochs
with :class:`IWAE` (bundled MNIST sample, ``N = 6000``, ``B = 100``, ``K = 5``, the same draws),
per datapoint: RenyiELBO reports :math:`-186.05` nats, the mean of :math:`\max_k w_{ik}` is
:math:`-186.03`, the IWAE bound is :math:`-187.40` (ELBO :math:`-198.8`); at initialization
:math:`-548.84`, :math:`-548.81` and :math:`-550.18`. The gap is at most :math:`\log K` per
datapoint in value, but the gradient is that of a max (``python benchmarks/renyi_vs_iwae.py`` remeasures
it). This module keeps the scale outside the logsumexp, as NumPyro does.

Gradients (``gradient=``):

``"standard"``
    the reparameterized gradient of the bound (all of it, score term included).
``"dreg"`` (:class:`IWAE` only)
    the doubly reparameterized gradient of Tucker et al. [2] for the guide's parameters
    :math:`\phi`; the model's parameters :math:`\theta` keep the standard IWAE gradient:

    .. math::

        \nabla_\phi \mathcal L_K = \sum_k \tilde w_k^2\,
            \frac{\partial w_k}{\partial z_k} \frac{\partial z_k}{\partial \phi},
        \qquad \tilde w_k = \frac{e^{w_k}}{\sum_j e^{w_j}},

    where :math:`\partial w_k / \partial z_k` treats :math:`q`'s parameters as constants. It is
    unbiased, and its signal-to-noise ratio does not vanish as ``K`` grows.
``"stl"`` (:class:`ReparamELBO` only)
    sticking the landing, Roeder et al. [3]: :math:`\log q` evaluated with its variational
    parameters held constant, which drops the score term
    :math:`\mathbb E_q[\nabla_\phi \log q_\phi(z)] = 0`. Unbiased; zero variance when :math:`q`
    is the exact posterior.

Both ``"dreg"`` and ``"stl"`` need a guide with one latent site (``"z"`` in a
:class:`~pyrovae.VAE`): with several, one may depend on another inside the guide, and that path
is not handled; such guides are refused. Both evaluate :math:`\log q_\phi(z)` at a value it did
not itself produce (with :math:`z` fixed), which needs the family's transforms to have an
inverse. Planar, radial, Sylvester, polynomial, block and neural autoregressive flows have none:
those families are refused with a :class:`~pyrovae.errors.ConfigError` at the first step. A
distribution (or transform) may declare the capability itself with a ``log_prob_anywhere``
(``has_inverse``) attribute; Pyro's transforms do not, so this module keeps a table of the
ones without inverse.

Implementation. The guide is traced under a particle plate (``K`` draws at once, outermost dim),
the model replayed against it. For ``"stl"`` and ``"dreg"``, with :math:`z` the guide's sample,

.. math::

    \log q^{\text{path}}(z) = \log q_\phi(z)
        - \big[\log q_\phi(\bar z) - \overline{\log q_\phi(\bar z)}\big]

(a bar is ``detach``): the same value, and a gradient with the score term
:math:`\partial_\phi \log q_\phi(z)|_{z}` removed. For ``"dreg"`` the path derivative must reach
:math:`\phi` through :math:`z`, so :math:`\log q_\phi(z)` is evaluated on a copy of :math:`z`
(not from a flow's cache), and a gradient hook on :math:`z` multiplies what arrives there by
:math:`\tilde w_k`, turning the surrogate's :math:`\tilde w_k` into :math:`\tilde w_k^2`.
Cost: one extra ``log_prob`` of each guide site (two inversions of a flow for ``"dreg"``).

References:

1. Burda, Grosse, Salakhutdinov (2016). Importance weighted autoencoders. ICLR.
2. Tucker, Lawson, Gu, Maddison (2019). Doubly reparameterized gradient estimators for Monte
   Carlo objectives. ICLR.
3. Roeder, Wu, Duvenaud (2017). Sticking the landing: simple, lower-variance gradient
   estimators for variational inference. NeurIPS.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.distributions.transforms import (
    BlockAutoregressive,
    NeuralAutoregressive,
    Polynomial,
    Sylvester,
)
from pyro.distributions.transforms.planar import ConditionedPlanar
from pyro.distributions.transforms.radial import ConditionedRadial
from pyro.infer import ELBO
from pyro.infer.util import torch_item
from pyro.poutine.indep_messenger import CondIndepStackFrame
from pyro.poutine.util import prune_subsample_sites

from .errors import ConfigError

__all__ = ["IWAE", "ReparamELBO", "IWAE_GRADIENTS", "ELBO_GRADIENTS"]

#: The gradient estimators :class:`IWAE` offers.
IWAE_GRADIENTS = ("standard", "dreg")
#: The gradient estimators :class:`ReparamELBO` offers.
ELBO_GRADIENTS = ("standard", "stl")

_PARTICLES = "_pyrovae_particles"

#: Pyro transforms whose inverse works only on the transform's own cached outputs.
_WITHOUT_INVERSE = (
    ConditionedPlanar,
    ConditionedRadial,
    Sylvester,
    Polynomial,
    BlockAutoregressive,
    NeuralAutoregressive,
)

Callable_ = Callable[..., Any]


# ----------------------------------------------------------------------------------- helpers
def _check_num_particles(num_particles: Any, name: str) -> int:
    if isinstance(num_particles, bool) or not isinstance(num_particles, int) or num_particles < 1:
        raise ConfigError(
            f"{name}(num_particles={num_particles!r}): num_particles must be an integer >= 1, "
            f"e.g. {name}(num_particles=5)"
        )
    return num_particles


def _check_gradient(gradient: Any, allowed: tuple[str, ...], name: str) -> str:
    if gradient not in allowed:
        other = "IWAE(gradient='dreg')" if name == "ReparamELBO" else "ReparamELBO(gradient='stl')"
        hint = f"; for {gradient!r} use {other}" if gradient in ("dreg", "stl") else ""
        raise ConfigError(
            f"{name} has no gradient {gradient!r}; choose one of {', '.join(map(repr, allowed))}"
            f"{hint}"
        )
    return str(gradient)


def _transform_has_inverse(t: Any) -> bool:
    declared = getattr(t, "has_inverse", None)
    if declared is not None:
        return bool(declared)
    parts = getattr(t, "parts", None)  # ComposeTransform
    if parts is not None:
        return all(_transform_has_inverse(p) for p in parts)
    return getattr(t, "bijective", True) and not isinstance(t, _WITHOUT_INVERSE)


def log_prob_anywhere(fn: Any) -> bool:
    r"""Whether distribution ``fn`` can evaluate ``log_prob`` at any value, not only at its own
    samples (which a flow without inverse, e.g. planar or radial, cannot).

    Reads a ``log_prob_anywhere`` attribute when the distribution declares one; otherwise walks
    its ``base_dist`` / ``transforms`` and checks each transform (a ``has_inverse`` attribute, or
    not one of Pyro's transforms without inverse: planar, radial, Sylvester, polynomial, block and
    neural autoregressive).
    """
    d = fn
    while d is not None:
        declared = getattr(d, "log_prob_anywhere", None)
        if declared is not None:
            return bool(declared)
        if not all(_transform_has_inverse(t) for t in getattr(d, "transforms", ())):
            return False
        d = getattr(d, "base_dist", None)
    return True


def _grad_only(t: torch.Tensor) -> torch.Tensor:
    """Value 0, gradient that of ``t``."""
    return t - t.detach()


def _scale_and_mask(lp: torch.Tensor, scale: Any, mask: Any) -> torch.Tensor:
    if mask is not None and mask is not True:
        lp = torch.where(torch.as_tensor(mask, device=lp.device), lp, lp.new_zeros(()))
    if not (isinstance(scale, (int, float)) and scale == 1.0):
        lp = lp * scale
    return lp


def _vectorized_frames(site: dict[str, Any]) -> list[CondIndepStackFrame]:
    return [f for f in site["cond_indep_stack"] if f.vectorized and f.name != _PARTICLES]


# ---------------------------------------------------------------------------------- the base
class _ParticleObjective(ELBO):
    """Shared machinery: trace the guide under a particle plate, replay the model, and collect
    each site's log-density (per particle, per datapoint of the data plate)."""

    _name = "loss"
    _gradients: tuple[str, ...] = ()
    #: ``differentiable_loss`` reaches every parameter through autograd; the param store's
    #: "param" sites are needed only by ``loss_and_grads`` under :class:`pyro.infer.SVI`.
    needs_param_sites: bool = False
    #: ``max_plate_nesting`` counts the model's plates only (the particle plate goes left of
    #: them); Pyro's own losses count the particle plate too.
    plate_nesting_counts_particles: bool = False

    @property
    def objective(self) -> str:
        """What the loss estimates, e.g. ``"iwae(k=5, dreg)"`` (for :class:`~pyrovae.History`)."""
        head = "iwae" if self._name == "IWAE" else "elbo"
        extra = "" if self.gradient == "standard" else f", {self.gradient}"
        return f"{head}(k={self.num_particles}{extra})"

    def __init__(
        self,
        num_particles: int = 1,
        gradient: str = "standard",
        max_plate_nesting: float = float("inf"),
    ) -> None:
        num_particles = _check_num_particles(num_particles, self._name)
        self.gradient = _check_gradient(gradient, self._gradients, self._name)
        if max_plate_nesting != float("inf") and (
            isinstance(max_plate_nesting, bool)
            or not isinstance(max_plate_nesting, int)
            or max_plate_nesting < 0
        ):
            raise ConfigError(
                f"{self._name}(max_plate_nesting={max_plate_nesting!r}): pass the number of "
                "nested pyro.plate in the model (1 for pyrovae.VAE), or leave it out to guess"
            )
        super().__init__(num_particles=num_particles, max_plate_nesting=max_plate_nesting)
        # Draws are vectorized (pyrovae.fit sets max_plate_nesting from the VAE's declaration).
        self.vectorize_particles = True

    def __repr__(self) -> str:
        return f"{self._name}(num_particles={self.num_particles}, gradient={self.gradient!r})"

    def _guess_max_plate_nesting(
        self, model: Callable_, guide: Callable_, args: tuple, kwargs: dict
    ) -> None:
        """The model's number of nested plates (the particle plate goes left of them)."""
        with poutine.block(), torch.no_grad():
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
                *args, **kwargs
            )
        dims = [
            f.dim
            for trace in (prune_subsample_sites(model_trace), prune_subsample_sites(guide_trace))
            for site in trace.nodes.values()
            if site["type"] == "sample"
            for f in site["cond_indep_stack"]
            if f.vectorized
        ]
        self.max_plate_nesting = -min(dims) if dims else 0

    def _traces(
        self, model: Callable_, guide: Callable_, args: tuple, kwargs: dict
    ) -> tuple[Any, Any, int]:
        """Guide and model traces with ``num_particles`` draws at dim ``-(max_plate_nesting+1)``."""
        if self.max_plate_nesting == float("inf"):
            self._guess_max_plate_nesting(model, guide, args, kwargs)
        pdim = -(int(self.max_plate_nesting) + 1)
        particles = pyro.plate(_PARTICLES, self.num_particles, dim=pdim)
        guide_trace = poutine.trace(particles(guide)).get_trace(*args, **kwargs)
        model_trace = poutine.trace(
            poutine.replay(particles(model), trace=guide_trace)
        ).get_trace(*args, **kwargs)
        guide_trace = prune_subsample_sites(guide_trace)
        model_trace = prune_subsample_sites(model_trace)
        for name, site in model_trace.nodes.items():
            if site["type"] == "sample" and not site["is_observed"]:
                if name not in guide_trace.nodes:
                    raise ConfigError(
                        f"latent site {name!r} of the model has no counterpart in the guide; "
                        f"{self._name} needs the guide to sample every latent site"
                    )
        latent = [
            n for n, s in guide_trace.nodes.items() if s["type"] == "sample" and not s["is_observed"]
        ]
        if self.gradient != "standard" and len(latent) > 1:
            # With several sites, one may depend on another inside the guide (z2 ~ q(z2 | z1)),
            # and the path derivative through that dependence is not handled here.
            raise ConfigError(
                f"gradient={self.gradient!r} supports a guide with one latent site, this one has "
                f"{len(latent)} ({', '.join(map(repr, latent))}); use gradient='standard'"
            )
        for name, site in guide_trace.nodes.items():
            if site["type"] == "sample" and not site["is_observed"]:
                if not site["fn"].has_rsample:
                    raise ConfigError(
                        f"guide site {name!r} ({type(site['fn']).__name__}) is not "
                        f"reparameterizable; {self._name} needs reparameterized latents "
                        "(use pyro.infer.TraceGraph_ELBO for discrete ones)"
                    )
                if self.gradient != "standard" and not log_prob_anywhere(site["fn"]):
                    raise ConfigError(
                        f"gradient={self.gradient!r} needs log q(z) at any z, but guide site "
                        f"{name!r} is a flow without inverse (planar/radial); use "
                        f"gradient='standard' or an invertible flow (iaf, spline, householder)"
                    )
        return model_trace, guide_trace, pdim

    def _get_trace(
        self, model: Callable_, guide: Callable_, args: tuple, kwargs: dict
    ) -> tuple[Any, Any]:
        """Pyro's hook: the (model, guide) traces of one vectorized evaluation."""
        model_trace, guide_trace, _ = self._traces(model, guide, args, kwargs)
        return model_trace, guide_trace

    def _guide_log_prob(self, site: dict[str, Any], hooked: bool) -> torch.Tensor:
        r"""``log q(z)`` of a guide site: plain, or with the score term removed
        (``gradient != "standard"``; evaluated on a copy of ``z`` when ``hooked``)."""
        fn, z = site["fn"], site["value"]
        lq = fn.log_prob(z)
        if self.gradient == "standard" or not torch.is_grad_enabled():
            return lq
        score = fn.log_prob(z.detach())
        if hooked:
            return lq.detach() + _grad_only(fn.log_prob(z.clone())) - _grad_only(score)
        return lq - _grad_only(score)

    # Pyro's ELBO interface ------------------------------------------------------------------
    def _value_and_surrogate(
        self, model: Callable_, guide: Callable_, args: tuple, kwargs: dict
    ) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def differentiable_loss(
        self, model: Callable_, guide: Callable_, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """The loss as a tensor whose gradient is the chosen estimator's (value: the loss)."""
        value, surrogate = self._value_and_surrogate(model, guide, args, kwargs)
        return value.detach() + _grad_only(surrogate)

    def loss(self, model: Callable_, guide: Callable_, *args: Any, **kwargs: Any) -> float:
        """The loss (a float), without gradients."""
        with torch.no_grad():
            value, _ = self._value_and_surrogate(model, guide, args, kwargs)
        return torch_item(value)

    def loss_and_grads(
        self, model: Callable_, guide: Callable_, *args: Any, **kwargs: Any
    ) -> float:
        """The loss (a float); backpropagates the surrogate (for :class:`pyro.infer.SVI`)."""
        value, surrogate = self._value_and_surrogate(model, guide, args, kwargs)
        if surrogate.requires_grad:
            surrogate.backward(retain_graph=self.retain_graph)
        return torch_item(value)


def _is_factor(site: dict[str, Any]) -> bool:
    """A ``pyro.factor`` statement (observed and auxiliary): Pyro's ELBO counts it in the model
    (``+``) and in the guide (``-``) alike."""
    return bool(site["is_observed"]) and bool(site["infer"].get("is_auxiliary"))


# ------------------------------------------------------------------------------------- IWAE
class IWAE(_ParticleObjective):
    r"""The negative IWAE bound (Burda et al. 2016) of a minibatch, scaled to the data set.

    .. math::

        \text{loss} = -\frac{N}{B} \sum_{i \in \text{idx}}
            \Big[\operatorname{logsumexp}_{k=1}^K w_{ik} - \log K\Big],
        \qquad w_{ik} = \sum_{\text{model}} s \log p(\cdot) - \sum_{\text{guide}} s \log q(\cdot),

    with :math:`N/B` the data plate's subsample scale and :math:`s` each site's other scales
    (kept inside :math:`w`: ``K = 1`` gives ``Trace_ELBO``'s value, beta included). See the
    module docstring for why ``RenyiELBO(alpha=0)`` is not this bound under subsampling.

    Every sample site must lie in one shared ``pyro.plate`` over the data (the data plate);
    plates nested inside it are summed over within each datapoint. Global latents (outside the
    data plate) are refused: their log-weight is shared by all datapoints of a minibatch, and no
    per-datapoint bound follows from it.

    :param num_particles: ``K``, importance samples per datapoint (>= 1).
    :param gradient: ``"standard"`` (reparameterized gradient of the bound) or ``"dreg"``
        (doubly reparameterized for the guide's parameters, Tucker et al. 2019).
    :param max_plate_nesting: the model's number of nested plates (guessed at the first call
        when omitted; 1 for :class:`pyrovae.VAE`).

    Example::

        >>> import pyrovae
        >>> from pyrovae.losses import IWAE
        >>> loss = IWAE(num_particles=5, gradient="dreg")
        >>> loss
        IWAE(num_particles=5, gradient='dreg')
    """

    _name = "IWAE"
    _gradients = IWAE_GRADIENTS

    def __init__(
        self,
        num_particles: int = 5,
        gradient: str = "standard",
        max_plate_nesting: float = float("inf"),
    ) -> None:
        super().__init__(num_particles, gradient, max_plate_nesting)

    def _log_weights(
        self, model: Callable_, guide: Callable_, args: tuple, kwargs: dict
    ) -> tuple[torch.Tensor, float, list[torch.Tensor], Any]:
        """Per-particle, per-datapoint log-weights ``(K, B)`` without the subsample scale; the
        subsample scale ``N/B``; the guide's latent values; the data plate's frame."""
        model_trace, guide_trace, pdim = self._traces(model, guide, args, kwargs)
        sites = [
            (site, trace is guide_trace)
            for trace in (model_trace, guide_trace)
            for site in trace.nodes.values()
            if site["type"] == "sample" and not (
                trace is guide_trace and site["is_observed"] and not _is_factor(site)
            )
        ]
        frame = self._data_frame(sites)
        data_scale = frame.full_size / frame.size if frame.full_size else 1.0
        nest = -pdim
        w: Any = 0.0
        latents = []
        for site, in_guide in sites:
            if in_guide and _is_factor(site):  # a pyro.factor of the guide: -log q, as Pyro
                lp = -site["fn"].log_prob(site["value"])
            elif in_guide:
                lp = -self._guide_log_prob(site, hooked=self.gradient == "dreg")
                latents.append(site["value"])
            else:
                lp = site["fn"].log_prob(site["value"])
            lp = _scale_and_mask(lp, site["scale"] / data_scale, site["mask"])
            if lp.dim() > nest:
                raise ConfigError(
                    f"site {site['name']!r} has log-density shape {tuple(lp.shape)}, more dims "
                    f"than its {nest - 1} plate(s); pass max_plate_nesting= or declare the "
                    "extra dims as event dims (.to_event)"
                )
            lp = lp.reshape((1,) * (nest - lp.dim()) + lp.shape)
            inner = [d for d in range(-nest, 0) if d not in (pdim, frame.dim) and lp.shape[d] > 1]
            if inner:
                lp = lp.sum(inner, keepdim=True)
            lp = lp.reshape(lp.shape[pdim], lp.shape[frame.dim])
            w = w + lp
        w = torch.as_tensor(w).expand(self.num_particles, frame.size)
        return w, data_scale, latents, frame

    def _data_frame(self, sites: list[tuple[dict[str, Any], bool]]) -> Any:
        shared: set[Any] | None = None
        for site, _ in sites:
            frames = {f for f in _vectorized_frames(site)}
            if not frames:
                raise ConfigError(
                    f"site {site['name']!r} lies outside the data plate; IWAE bounds each "
                    "datapoint separately, so every sample site must be inside one "
                    "pyro.plate over the data (global latents are not supported; use Trace_ELBO)"
                )
            shared = frames if shared is None else shared & frames
        if not shared or len(shared) != 1:
            names = sorted({f.name for f in shared or ()})
            raise ConfigError(
                f"IWAE needs exactly one pyro.plate over the data shared by all sample sites, "
                f"found {names or 'none'}; put every site inside one data plate"
            )
        return shared.pop()

    def _value_and_surrogate(
        self, model: Callable_, guide: Callable_, args: tuple, kwargs: dict
    ) -> tuple[torch.Tensor, torch.Tensor]:
        w, data_scale, latents, frame = self._log_weights(model, guide, args, kwargs)
        bound = data_scale * (torch.logsumexp(w, 0) - math.log(self.num_particles)).sum()
        if self.gradient == "dreg" and w.requires_grad:
            # The surrogate's gradient reaching z_k carries w~_k; multiply it by w~_k once more.
            w_tilde = torch.softmax(w.detach(), 0)
            nest = int(self.max_plate_nesting) + 1
            for z in latents:
                if z.requires_grad:
                    shape = [1] * nest
                    shape[0], shape[frame.dim] = self.num_particles, frame.size
                    factor = w_tilde.reshape(shape + [1] * (z.dim() - nest))
                    z.register_hook(lambda g, f=factor: g * f)
        return -bound, -bound


# ------------------------------------------------------------------------------ ReparamELBO
class ReparamELBO(_ParticleObjective):
    r"""The negative ELBO with a reparameterized gradient, standard or sticking the landing.

    .. math::

        \text{loss} = -\frac1K \sum_{k=1}^K \Big[\sum_{\text{model}} s \log p(\cdot)
            - \sum_{\text{guide}} s \log q(\cdot)\Big]_{z_k \sim q},

    with each site's full scale :math:`s` (subsample scale included: the ELBO is linear in the
    log-densities). Its value equals ``Trace_ELBO``'s on the same draws; global latents are
    allowed. With ``gradient="stl"`` (Roeder et al. 2017) :math:`\log q` is evaluated with the
    variational parameters held constant: the gradient is :math:`\frac1K \sum_k \partial_z
    [\log p(x, z_k) - \log q_{\bar\phi}(z_k)]\, \partial_\phi z_k`, which vanishes for every
    draw when :math:`q` is the exact posterior.

    :param num_particles: ``K``, draws per datapoint (>= 1), vectorized.
    :param gradient: ``"standard"`` or ``"stl"``.
    :param max_plate_nesting: the model's number of nested plates (guessed when omitted).
    """

    _name = "ReparamELBO"
    _gradients = ELBO_GRADIENTS

    def _value_and_surrogate(
        self, model: Callable_, guide: Callable_, args: tuple, kwargs: dict
    ) -> tuple[torch.Tensor, torch.Tensor]:
        model_trace, guide_trace, pdim = self._traces(model, guide, args, kwargs)
        total: Any = 0.0
        for trace, sign in ((model_trace, 1.0), (guide_trace, -1.0)):
            for site in trace.nodes.values():
                if site["type"] != "sample" or (
                    sign < 0 and site["is_observed"] and not _is_factor(site)
                ):
                    continue
                if sign < 0 and not _is_factor(site):
                    lp = self._guide_log_prob(site, False)
                else:
                    lp = site["fn"].log_prob(site["value"])
                total = total + sign * _scale_and_mask(lp, site["scale"], site["mask"]).sum()
        elbo = torch.as_tensor(total) / self.num_particles
        return -elbo, -elbo
