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
)
from .checkpoint import load_checkpoint, load_model, save_checkpoint
from .families import DiagonalNormal, Family
from .importance import LogLikelihood, elbo, log_likelihood, log_weights
from .likelihoods import Bernoulli, Gaussian, Likelihood
from .nets import MLP
from .priors import Prior, StandardNormal
from .training import History, fit
from .vae import VAE

__version__ = "0.1.0"

__all__ = [
    "VAE",
    "fit",
    "History",
    "save_checkpoint",
    "load_checkpoint",
    "load_model",
    "log_likelihood",
    "elbo",
    "log_weights",
    "LogLikelihood",
    "MLP",
    "Prior",
    "StandardNormal",
    "Family",
    "DiagonalNormal",
    "Likelihood",
    "Bernoulli",
    "Gaussian",
    "PyrovaeError",
    "ConfigError",
    "DataError",
    "DataNotFoundError",
    "CheckpointError",
    "TrainingError",
]
