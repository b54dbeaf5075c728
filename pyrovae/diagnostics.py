r"""How a trained VAE uses its latent space: active units, KL per dimension, the aggregate posterior.

Three diagnostics of the encoder's posteriors :math:`q(z \mid x)` over a data set
:math:`x_1..x_N` (e.g. the test set), each through the part contracts alone (any prior, any
family):

- :func:`active_units` (Burda et al. 2016 [1]): dimension :math:`d` is *active* when the
  posterior mean moves with the data,

  .. math::

      A_d = \operatorname{Var}_{x}\big(\mathbb E_{q(z \mid x)}[z_d]\big) > 0.01 .

  An inactive ("dead", "collapsed") dimension has :math:`q(z_d \mid x) \approx p(z_d)` for every
  :math:`x`: it carries no information about :math:`x`.

- :func:`kl_per_dimension`: :math:`\frac1N \sum_n \mathrm{KL}(q(z_d \mid x_n) \,\|\, p(z_d))` for
  each :math:`d`, the rate spent on each dimension. Analytic (``torch.distributions.kl_divergence``)
  when a closed form is registered (diagonal Gaussian against a diagonal Gaussian prior), Monte
  Carlo otherwise. Per dimension it needs both :math:`q` and :math:`p` to factorize over the
  dimensions (an ``Independent`` distribution); otherwise only the total is defined.

- :func:`mutual_information`: the decomposition of the ELBO's average KL term by Hoffman &
  Johnson (2016) [2],

  .. math::

      \underbrace{\frac1N \sum_n \mathrm{KL}(q(z \mid x_n) \,\|\, p(z))}_{\text{average KL}}
      = \underbrace{I_q(x; z)}_{\text{mutual information}}
      + \underbrace{\mathrm{KL}(q(z) \,\|\, p(z))}_{\text{marginal KL}},
      \qquad q(z) = \frac1N \sum_{n=1}^N q(z \mid x_n),

  where :math:`x` is uniform over the data set and :math:`q(z)` is the *aggregate posterior*.
  :math:`I_q \le \log N`. A large marginal KL means the prior puts mass where no datapoint's
  posterior does (samples from the prior look unlike the data).

References:

1. Y. Burda, R. Grosse, R. Salakhutdinov (2016). Importance weighted autoencoders. ICLR.
2. M. D. Hoffman, M. J. Johnson (2016). ELBO surgery: yet another way to carve up the variational
   evidence lower bound. NIPS Workshop on Advances in Approximate Bayesian Inference.
3. R. T. Q. Chen, X. Li, R. Grosse, D. Duvenaud (2018). Isolating sources of disentanglement in
   VAEs. NeurIPS (minibatch estimators of the aggregate posterior).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyro.distributions as dist
import torch

from ._batching import as_dataset, model_batches
from ._checks import check_positive_int, check_vae
from .errors import ConfigError, DataError
from .evaluation import evaluating, mean_stderr

if TYPE_CHECKING:  # for annotations only (no import cycle at run time)
    from .vae import VAE

__all__ = [
    "ActiveUnits",
    "KLPerDimension",
    "MutualInformation",
    "Diagnostics",
    "active_units",
    "kl_per_dimension",
    "mutual_information",
    "diagnose",
    "ACTIVE_THRESHOLD",
]

#: Burda et al.'s threshold on :math:`\operatorname{Var}_x(\mathbb E_q[z_d])`.
ACTIVE_THRESHOLD = 0.01


# ---------------------------------------------------------------------- results
@dataclass(frozen=True)
class ActiveUnits:
    r"""Active units of a VAE on a data set.

    :ivar count: the number of active dimensions.
    :ivar variances: :math:`\operatorname{Var}_x(\mathbb E_q[z_d \mid x])` per dimension, shape
        ``(latent_dim,)`` (unbiased over datapoints; Monte Carlo means are corrected for their
        own noise, so a value can be slightly negative for a dead dimension).
    :ivar threshold: a dimension is active when its variance exceeds this.
    :ivar num_datapoints: :math:`N`.
    :ivar analytic_mean: whether :math:`\mathbb E_q[z]` was exact (``q.mean``) or Monte Carlo.
    """

    count: int
    variances: torch.Tensor
    threshold: float
    num_datapoints: int
    analytic_mean: bool

    @property
    def active(self) -> torch.Tensor:
        """Boolean mask of the active dimensions, shape ``(latent_dim,)``."""
        return self.variances > self.threshold

    def to_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "latent_dim": int(self.variances.numel()),
            "threshold": self.threshold,
            "variances": [float(v) for v in self.variances],
            "num_datapoints": self.num_datapoints,
            "analytic_mean": self.analytic_mean,
        }

    def __str__(self) -> str:
        return f"{self.count} of {self.variances.numel()} units active (Var_x E_q[z_d] > {self.threshold})"


@dataclass(frozen=True)
class KLPerDimension:
    r""":math:`\mathrm{KL}(q(z \mid x) \,\|\, p(z))` averaged over a data set.

    :ivar total: the mean over datapoints of the whole KL (nats).
    :ivar stderr: its standard error over datapoints (Monte Carlo noise included).
    :ivar per_dim: the mean KL of each dimension, shape ``(latent_dim,)``, summing to ``total``;
        ``None`` when :math:`q` or :math:`p` does not factorize over the dimensions.
    :ivar values: the KL of each datapoint, shape ``(num_datapoints,)``.
    :ivar analytic: whether the KL was computed in closed form (else Monte Carlo).
    :ivar num_samples: Monte Carlo draws per datapoint (unused when analytic).
    """

    total: float
    stderr: float
    per_dim: torch.Tensor | None
    values: torch.Tensor
    analytic: bool
    num_samples: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "stderr": self.stderr,
            "per_dim": None if self.per_dim is None else [float(v) for v in self.per_dim],
            "analytic": self.analytic,
            "num_samples": None if self.analytic else self.num_samples,
            "num_datapoints": int(self.values.numel()),
        }

    def __str__(self) -> str:
        how = "analytic" if self.analytic else f"Monte Carlo, {self.num_samples} draws"
        return f"KL(q(z|x) || p(z)) = {self.total:.2f} ± {self.stderr:.2f} nats ({how})"


@dataclass(frozen=True)
class MutualInformation:
    r"""The average KL split into :math:`I_q(x; z)` and :math:`\mathrm{KL}(q(z) \| p(z))`.

    All in nats; ``average_kl == mutual_information + marginal_kl`` holds exactly (the three are
    computed from the same draws).

    :ivar mutual_information: :math:`I_q(x; z) = \mathbb E[\log q(z \mid x) - \log q(z)]`.
    :ivar marginal_kl: :math:`\mathrm{KL}(q(z) \| p(z)) = \mathbb E[\log q(z) - \log p(z)]`.
    :ivar average_kl: :math:`\mathbb E[\log q(z \mid x) - \log p(z)]` (Monte Carlo).
    :ivar mutual_information_stderr: standard error of the mean over draws (treating the draws
        as independent; the mixture over shared components correlates them slightly).
    :ivar marginal_kl_stderr: the same for the marginal KL.
    :ivar num_datapoints: :math:`N` (so :math:`I_q \le \log N`).
    :ivar num_samples: draws :math:`z \sim q(z \mid x_n)` per datapoint.
    :ivar batch_size: mixture components per estimate of :math:`q(z)` (``num_datapoints``:
        the exact mixture).
    """

    mutual_information: float
    marginal_kl: float
    average_kl: float
    mutual_information_stderr: float
    marginal_kl_stderr: float
    num_datapoints: int
    num_samples: int
    batch_size: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "mutual_information": {
                "mean": self.mutual_information, "stderr": self.mutual_information_stderr
            },
            "marginal_kl": {"mean": self.marginal_kl, "stderr": self.marginal_kl_stderr},
            "average_kl": self.average_kl,
            "log_num_datapoints": math.log(self.num_datapoints),
            "num_datapoints": self.num_datapoints,
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
        }

    def __str__(self) -> str:
        return (
            f"I(x;z) {self.mutual_information:.2f} ± {self.mutual_information_stderr:.2f} nats "
            f"(at most log N = {math.log(self.num_datapoints):.2f}), KL(q(z) || p(z)) "
            f"{self.marginal_kl:.2f} ± {self.marginal_kl_stderr:.2f} nats, average KL "
            f"{self.average_kl:.2f}"
        )


@dataclass(frozen=True)
class Diagnostics:
    """The three diagnostics of :func:`diagnose`."""

    active_units: ActiveUnits
    kl: KLPerDimension
    mutual_information: MutualInformation | None  # None: q(z|x) only at its own samples

    def to_dict(self) -> dict[str, Any]:
        return {
            "active_units": self.active_units.to_dict(),
            "kl": self.kl.to_dict(),
            "aggregate_posterior": (None if self.mutual_information is None
                                    else self.mutual_information.to_dict()),
        }

    def __str__(self) -> str:
        mi = self.mutual_information
        return (f"{self.active_units}; {self.kl}; "
                + (str(mi) if mi is not None else "aggregate posterior: n/a (the family cannot "
                   "evaluate q(z|x) at points it did not sample)"))


# ---------------------------------------------------------------------- helpers
def _check_vae(vae: VAE) -> Any:
    """The diagnostics read the VAE's family and prior: refuse anything else in one line."""
    return check_vae(vae, ("family", "prior"), "the latent-space diagnostics")


def _device(vae: VAE) -> torch.device:
    return next(iter(vae.parameters()), torch.empty(0)).device


def _factors(d: Any, latent_dim: int) -> Any:
    """The per-dimension base distribution of a distribution that factorizes over ``z``'s
    dimensions (``Independent`` over one dimension of size ``latent_dim``), else ``None``."""
    if (
        isinstance(d, torch.distributions.Independent)
        and d.reinterpreted_batch_ndims == 1
        and tuple(d.base_dist.batch_shape[-1:]) == (latent_dim,)
    ):
        return d.base_dist
    return None


def _no_density_error(vae: VAE, exc: Exception) -> ConfigError:
    return ConfigError(
        f"the family {type(vae.family).__name__} cannot evaluate q(z|x) at points it did not "
        f"sample ({type(exc).__name__}); the aggregate posterior needs a family with an inverse "
        "(diagonal, full_rank, iaf, spline, householder; not planar or radial)"
    )


# ---------------------------------------------------------------------- active units
@torch.no_grad()
def active_units(
    vae: VAE,
    data: Any,
    *,
    threshold: float = ACTIVE_THRESHOLD,
    num_samples: int = 1000,
    batch_size: int = 500,
    seed: int | None = None,
) -> ActiveUnits:
    r"""Count the active latent dimensions (Burda et al. 2016).

    .. math::

        A_d = \operatorname{Var}_{x}\big(\mathbb E_{q(z \mid x)}[z_d]\big),
        \qquad \text{active} \iff A_d > \text{threshold}.

    :math:`\mathbb E_q[z \mid x]` is ``q.mean`` when the family's distribution has one (diagonal,
    full-rank Gaussians); otherwise (flows) the average of ``num_samples`` draws
    :math:`\bar z`, whose noise would inflate the variance by :math:`\mathbb E_x
    \operatorname{Var}_q(z_d)/S`: that term is estimated from the same draws and subtracted, so
    the estimate is unbiased either way.

    :param vae: a :class:`~pyrovae.VAE` (or anything with ``family`` and ``check_data``).
    :param data: a tensor ``(num_datapoints, num_features)`` or a dataset of ``(x, idx)``;
        at least 2 datapoints.
    :param threshold: Burda et al.'s 0.01.
    :param num_samples: draws per datapoint when ``q.mean`` is not available (>= 2).
    :param batch_size: datapoints per encoder call.
    :param seed: seeds the draws (the global RNG is restored).
    :returns: an :class:`ActiveUnits`.
    """
    check_positive_int(batch_size, "batch_size")
    num_samples = check_positive_int(num_samples, "num_samples")
    if num_samples < 2:
        raise ConfigError("num_samples must be >= 2 (the Monte Carlo noise is estimated from them)")
    threshold = float(threshold)
    means, noise = [], []
    analytic = True
    with evaluating(_check_vae(vae), seed):
        for x, idx in model_batches(vae, data, batch_size, min_points=2):
            q = vae.family(x, idx)
            try:
                m = q.mean
                v = torch.zeros_like(m)
            except NotImplementedError:
                analytic = False
                z = q.sample((num_samples,))  # (S, batch, latent_dim)
                m = z.mean(0)
                v = z.var(0, unbiased=True) / num_samples  # variance of the MC mean
            means.append(m.double().cpu())
            noise.append(v.double().cpu())
    mean = torch.cat(means)  # (N, latent_dim)
    variances = mean.var(0, unbiased=True) - torch.cat(noise).mean(0)
    count = int((variances > threshold).sum())
    return ActiveUnits(count, variances, threshold, int(mean.shape[0]), analytic)


# ---------------------------------------------------------------------- KL per dimension
@torch.no_grad()
def kl_per_dimension(
    vae: VAE,
    data: Any,
    *,
    num_samples: int = 100,
    batch_size: int = 500,
    seed: int | None = None,
) -> KLPerDimension:
    r""":math:`\frac1N \sum_n \mathrm{KL}(q(z \mid x_n) \,\|\, p(z))`, per dimension where defined.

    When :math:`q(z \mid x) = \prod_d q_d(z_d \mid x)` and :math:`p(z) = \prod_d p_d(z_d)` (both
    ``Independent`` over the latent dimension), the KL splits into the dimensions,
    :math:`\mathrm{KL}_d = \mathrm{KL}(q_d \| p_d)`: closed form when
    ``torch.distributions.kl_divergence`` knows the pair (a diagonal Gaussian against a standard
    or learned normal prior:
    :math:`\mathrm{KL}_d = \tfrac12(\sigma_d^2 + (\mu_d - m_d)^2)/s_d^2 - \tfrac12 + \log(s_d/\sigma_d)`),
    else :math:`\frac1S \sum_s \log q_d(z_{s,d}) - \log p_d(z_{s,d})`, :math:`z_s \sim q`.
    Otherwise only the total is given: closed form when registered (e.g. two full-covariance
    Gaussians), else :math:`\frac1S \sum_s \log q(z_s \mid x) - \log p(z_s)`.

    :param num_samples: Monte Carlo draws per datapoint (when there is no closed form).
    :param batch_size: datapoints per encoder call.
    :param seed: seeds the draws.
    :returns: a :class:`KLPerDimension`.
    """
    num_samples = check_positive_int(num_samples, "num_samples")
    check_positive_int(batch_size, "batch_size")
    latent_dim = int(_check_vae(vae).latent_dim)
    totals: list[torch.Tensor] = []
    dims: list[torch.Tensor] | None = []
    analytic = True
    with evaluating(_check_vae(vae), seed):
        p = vae.prior()
        p_factors = _factors(p, latent_dim)
        for x, idx in model_batches(vae, data, batch_size):
            q = vae.family(x, idx)
            q_factors = _factors(q, latent_dim)
            per_dim = None
            if q_factors is not None and p_factors is not None:
                try:
                    per_dim = torch.distributions.kl_divergence(q_factors, p_factors)
                except NotImplementedError:
                    analytic = False
                    z = q_factors.rsample((num_samples,))  # (S, batch, latent_dim)
                    per_dim = (q_factors.log_prob(z) - p_factors.log_prob(z)).mean(0)
                total = per_dim.sum(-1)
            else:
                dims = None
                try:
                    total = torch.distributions.kl_divergence(q, p)
                except NotImplementedError:
                    analytic = False
                    z = q.rsample((num_samples,))
                    total = (q.log_prob(z) - p.log_prob(z)).mean(0)
            totals.append(total.double().cpu())
            if dims is not None:
                dims.append(per_dim.double().cpu())
    values = torch.cat(totals)
    mean, stderr = mean_stderr(values)
    per_dim_mean = torch.cat(dims).mean(0) if dims else None
    return KLPerDimension(mean, stderr, per_dim_mean, values, analytic, num_samples)


# ---------------------------------------------------------------------- aggregate posterior
@torch.no_grad()
def mutual_information(
    vae: VAE,
    data: Any,
    *,
    num_samples: int = 1,
    batch_size: int | None = None,
    max_rows: int = 2**16,
    seed: int | None = None,
    progress: bool = False,
) -> MutualInformation:
    r""":math:`I_q(x; z)` and :math:`\mathrm{KL}(q(z) \| p(z))` by Hoffman & Johnson's decomposition.

    Draws ``num_samples`` :math:`z_{n,s} \sim q(z \mid x_n)` for every datapoint and averages

    .. math::

        I_q(x; z) \approx \frac{1}{NS} \sum_{n,s} \log q(z_{n,s} \mid x_n) - \log \hat q(z_{n,s}),
        \qquad
        \mathrm{KL}(q(z) \| p(z)) \approx \frac{1}{NS} \sum_{n,s} \log \hat q(z_{n,s}) - \log p(z_{n,s}).

    The aggregate posterior's density :math:`q(z) = \frac1N \sum_m q(z \mid x_m)` is a mixture
    over the data set. With ``batch_size=None`` (or :math:`\ge N`) every component is evaluated:
    :math:`\hat q = q` exactly, and both estimates are unbiased (cost :math:`O(N^2 S)` density
    evaluations, in chunks of ``max_rows`` pairs). With ``batch_size=M < N`` the data set is
    split at random into groups of :math:`M` to :math:`2M - 1` datapoints and each draw sees only
    its own group :math:`B`, with the stratified minibatch estimator (Chen et al. 2018)

    .. math::

        \hat q(z_n) = \frac1N q(z_n \mid x_n) + \frac{N - 1}{N(|B| - 1)}
        \sum_{m \in B \setminus \{n\}} q(z_n \mid x_m),

    which is unbiased for :math:`q(z_n)` (the own component, from which :math:`z_n` was drawn, is
    weighted exactly; the others are a uniform sample of the rest). Its *logarithm* is biased
    downwards (Jensen): :math:`\mathbb E \log \hat q \le \log q`, by about half the relative
    variance of :math:`\hat q`, which shrinks like :math:`1/M`. So the minibatch estimator
    **over-estimates** :math:`I_q` and **under-estimates** :math:`\mathrm{KL}(q(z) \| p(z))` by
    the same amount (their sum, the average KL, is unaffected); it agrees exactly with the full
    mixture at :math:`M = N`.

    :math:`q(z)` is the aggregate posterior *of the data set given*, so :math:`I_q \le \log N`:
    use enough datapoints (:math:`\log N` well above the estimate) when the population value is
    wanted.

    :param vae: a :class:`~pyrovae.VAE`; its family must evaluate ``log_prob`` at points it did
        not sample (every family but planar and radial flows).
    :param data: a tensor ``(num_datapoints, num_features)`` or a dataset of ``(x, idx)``;
        at least 2 datapoints.
    :param num_samples: draws per datapoint, :math:`S`.
    :param batch_size: mixture components per estimate (``None``: all, the exact mixture).
    :param max_rows: at most this many ``(draw, component)`` pairs are evaluated at once.
    :param seed: seeds the draws and the grouping (the global RNG is restored).
    :param progress: show a progress bar.
    :returns: a :class:`MutualInformation`.
    """
    num_samples = check_positive_int(num_samples, "num_samples")
    max_rows = check_positive_int(max_rows, "max_rows")
    if batch_size is not None:
        batch_size = check_positive_int(batch_size, "batch_size")
        if batch_size < 2:
            raise ConfigError("batch_size must be >= 2 (a mixture needs other components)")
    dataset = as_dataset(data, "data")
    n = len(dataset)
    if n < 2:
        raise DataError(f"data has {n} datapoint(s); the aggregate posterior needs at least 2")
    from tqdm.auto import tqdm

    with evaluating(_check_vae(vae), seed):
        # 1. Draws z_{n,s} ~ q(z|x_n) with their own log q and log p: (N, S) and (N, S, L).
        p = vae.prior()
        draws, log_q_own, log_p = [], [], []
        for x, idx in model_batches(vae, dataset, max(1, 2048 // num_samples), min_points=2):
            q = vae.family(x, idx)
            z = q.sample((num_samples,))  # (S, batch, L)
            log_q_own.append(q.log_prob(z).T)
            log_p.append(p.log_prob(z).T)
            draws.append(z.transpose(0, 1))
        z_all = torch.cat(draws)  # (N, S, L)
        own, prior_lp = torch.cat(log_q_own), torch.cat(log_p)
        # 2. Groups of components: all N, or a random split into groups of M..2M-1.
        if batch_size is None or batch_size >= n:
            groups = [torch.arange(n)]
        else:
            perm = torch.randperm(n)
            groups = list(torch.tensor_split(perm, max(1, n // batch_size)))
        log_q_agg = torch.empty_like(own)
        device = _device(vae)
        with tqdm(total=n, desc="aggregate q(z)", unit="pt", disable=not progress, leave=False) as bar:
            for group in groups:
                others = _log_sum_others(vae, dataset, group, z_all, max_rows, device)  # (|B|, S)
                size = len(group)
                own_term = own[group] - math.log(n)
                other_term = others + math.log((n - 1) / (n * (size - 1)))
                log_q_agg[group] = torch.logaddexp(own_term, other_term)
                bar.update(size)
    mi_terms = (own - log_q_agg).double().cpu().flatten()
    kl_terms = (log_q_agg - prior_lp).double().cpu().flatten()
    mi, mi_se = mean_stderr(mi_terms)
    kl, kl_se = mean_stderr(kl_terms)
    average = float((own - prior_lp).double().mean())
    m = n if batch_size is None else min(batch_size, n)
    return MutualInformation(mi, kl, average, mi_se, kl_se, n, num_samples, m)


def _log_sum_others(
    vae: VAE,
    dataset: Any,
    group: torch.Tensor,
    z_all: torch.Tensor,
    max_rows: int,
    device: torch.device,
) -> torch.Tensor:
    r""":math:`\log \sum_{m \in B, m \ne n} q(z_{n,s} \mid x_m)` for every member ``n`` of the
    group ``B``; shape ``(|B|, S)``."""
    size = len(group)
    _, num_samples, latent_dim = z_all.shape
    z = z_all[group].reshape(size * num_samples, latent_dim)  # rows: (member, draw)
    owner = torch.arange(size, device=device).repeat_interleave(num_samples)
    comps_per_chunk = max(1, min(size, max_rows // max(1, min(len(z), max_rows))))
    rows_per_chunk = max(1, max_rows // comps_per_chunk)
    total = torch.full((len(z),), -math.inf, dtype=z.dtype, device=device)
    for c0 in range(0, size, comps_per_chunk):
        members = group[c0 : c0 + comps_per_chunk]
        x, idx = dataset[members]
        q = vae.family(x.to(device), torch.as_tensor(idx).to(device))  # batch (C,)
        comp = torch.arange(c0, c0 + len(members), device=device)
        for r0 in range(0, len(z), rows_per_chunk):
            rows = z[r0 : r0 + rows_per_chunk]
            try:
                lp = q.log_prob(rows.unsqueeze(-2))  # (R, C)
            except (NotImplementedError, KeyError) as exc:
                raise _no_density_error(vae, exc) from None
            self_pair = owner[r0 : r0 + rows_per_chunk, None] == comp[None, :]
            lp = lp.masked_fill(self_pair, -math.inf)
            chunk = slice(r0, r0 + len(rows))
            total[chunk] = torch.logaddexp(total[chunk], torch.logsumexp(lp, -1))
    return total.reshape(size, num_samples)


# ---------------------------------------------------------------------- all three
def diagnose(
    vae: VAE,
    data: Any,
    *,
    num_samples: int = 100,
    mi_num_samples: int = 1,
    mi_batch_size: int | None = None,
    seed: int | None = None,
    progress: bool = False,
) -> Diagnostics:
    """:func:`active_units`, :func:`kl_per_dimension` and :func:`mutual_information` on one data set.

    :param num_samples: Monte Carlo draws per datapoint for the posterior mean and the KL where
        they have no closed form.
    :param mi_num_samples: draws per datapoint for the aggregate posterior.
    :param mi_batch_size: mixture components per estimate of :math:`q(z)` (``None``: all).

    A family that evaluates q(z|x) only at its own samples (a planar or radial
    flow: ``log_prob_anywhere = False``) has no aggregate posterior to evaluate:
    ``mutual_information`` is then ``None`` (:func:`mutual_information` itself refuses it).
    """
    from .families import capability

    mi = None
    if capability(_check_vae(vae).family, "log_prob_anywhere"):
        mi = mutual_information(
            vae,
            data,
            num_samples=mi_num_samples,
            batch_size=mi_batch_size,
            seed=None if seed is None else seed + 2,
            progress=progress,
        )
    return Diagnostics(
        active_units(vae, data, num_samples=max(2, num_samples), seed=seed),
        kl_per_dimension(vae, data, num_samples=num_samples, seed=None if seed is None else seed + 1),
        mi,
    )
