"""pyrovae: variational autoencoders as Pyro programs.

A VAE is three swappable parts handed to one :class:`VAE`: a prior (:mod:`pyrovae.priors`), a
variational family with its encoder (:mod:`pyrovae.families`) and a likelihood with its decoder
(:mod:`pyrovae.likelihoods`). :func:`fit` trains it by SVI; :func:`log_likelihood` scores it by
importance sampling. Data loaders live in :mod:`pyrovae.data`, pictures in :mod:`pyrovae.plots`.
"""

from __future__ import annotations

from .errors import (
    CheckpointError,
    ConfigError,
    DataError,
    DataNotFoundError,
    PyrovaeError,
    TrainingError,
    Preempted,
)
from .checkpoint import load_checkpoint, load_model, save_checkpoint
from .families import (
    DiagonalNormal,
    Family,
    Flow,
    FullRankNormal,
    Local,
    LocalNormal,
    householder,
    iaf,
    planar,
    radial,
    spline_autoregressive,
)
from .diagnostics import (
    ActiveUnits,
    Diagnostics,
    KLPerDimension,
    MutualInformation,
    active_units,
    diagnose,
    kl_per_dimension,
    mutual_information,
)
from .gaps import GapResult, gaps, plot_gaps
from .importance import IWAEBounds, LogLikelihood, elbo, iwae_bounds, log_likelihood, log_weights
from .ais import AISResult, BDMCResult, ais, bdmc
from .evaluation import Estimate
from .losses import IWAE, ReparamELBO
from .likelihoods import (
    Bernoulli,
    Categorical256,
    ContinuousBernoulli,
    Gaussian,
    Laplace,
    Likelihood,
)
from .nets import MLP, ConvDecoder, ConvEncoder, FactoredLogits, First
from .hierarchy import (
    BottomUp,
    GaussianLayer,
    Hierarchical,
    LayerKL,
    TopDown,
    active_units_per_layer,
    kl_per_layer,
)
from .priors import (
    FlowPrior,
    LearnedNormal,
    MixtureOfGaussians,
    Prior,
    StandardNormal,
    VampPrior,
    flow_prior,
)
from . import distributed
from .training import SVI, History, Objective, TrainState, fit, objective, train_step
from .vae import VAE

__version__ = "0.1.0"

__all__ = [
    "VAE",
    "fit",
    "History",
    "TrainState",
    "SVI",
    "train_step",
    "objective",
    "Objective",
    "Preempted",
    "distributed",
    "IWAE",
    "ReparamELBO",
    "save_checkpoint",
    "load_checkpoint",
    "load_model",
    "log_likelihood",
    "ais",
    "bdmc",
    "AISResult",
    "BDMCResult",
    "Estimate",
    "elbo",
    "log_weights",
    "LogLikelihood",
    "iwae_bounds",
    "IWAEBounds",
    "gaps",
    "GapResult",
    "plot_gaps",
    "active_units",
    "kl_per_dimension",
    "mutual_information",
    "diagnose",
    "ActiveUnits",
    "KLPerDimension",
    "MutualInformation",
    "Diagnostics",
    "MLP",
    "ConvEncoder",
    "ConvDecoder",
    "FactoredLogits",
    "First",
    "Hierarchical",
    "BottomUp",
    "TopDown",
    "GaussianLayer",
    "kl_per_layer",
    "active_units_per_layer",
    "LayerKL",
    "Prior",
    "StandardNormal",
    "LearnedNormal",
    "MixtureOfGaussians",
    "VampPrior",
    "FlowPrior",
    "flow_prior",
    "Family",
    "DiagonalNormal",
    "FullRankNormal",
    "Flow",
    "LocalNormal",
    "Local",
    "iaf",
    "planar",
    "radial",
    "spline_autoregressive",
    "householder",
    "Likelihood",
    "Bernoulli",
    "Gaussian",
    "Laplace",
    "ContinuousBernoulli",
    "Categorical256",
    "PyrovaeError",
    "ConfigError",
    "DataError",
    "DataNotFoundError",
    "CheckpointError",
    "TrainingError",
]
