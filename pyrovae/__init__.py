"""pyrovae: variational autoencoders as Pyro programs.

A VAE is three swappable parts handed to one :class:`VAE`: a prior (:mod:`pyrovae.priors`), a
variational family with its encoder (:mod:`pyrovae.families`) and a likelihood with its decoder
(:mod:`pyrovae.likelihoods`). :func:`fit` trains it by SVI; :func:`log_likelihood` scores it by
importance sampling. Data loaders live in :mod:`pyrovae.data`, pictures in :mod:`pyrovae.plots`.
"""

from __future__ import annotations

import importlib
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what a type checker and an IDE see; at run time each name loads on first use
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
    from .gaps import GapResult, gaps
    from .importance import (
        ELBOEstimate,
        IWAEBounds,
        LogLikelihood,
        elbo,
        iwae_bounds,
        log_likelihood,
        log_weights,
    )
    from .options import EstimateOptions
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
    from .plots import plot_gaps
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
    "EstimateOptions",
    "elbo",
    "ELBOEstimate",
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

# Each name loads its module on first use (PEP 562), so that ``import pyrovae.cli`` -- and with it
# ``pyrovae --help`` and every argument error -- imports neither torch nor Pyro.
_EXPORTS = {
    "CheckpointError": "errors",
    "ConfigError": "errors",
    "DataError": "errors",
    "DataNotFoundError": "errors",
    "PyrovaeError": "errors",
    "TrainingError": "errors",
    "Preempted": "errors",
    "load_checkpoint": "checkpoint",
    "load_model": "checkpoint",
    "save_checkpoint": "checkpoint",
    "DiagonalNormal": "families",
    "Family": "families",
    "Flow": "families",
    "FullRankNormal": "families",
    "Local": "families",
    "LocalNormal": "families",
    "householder": "families",
    "iaf": "families",
    "planar": "families",
    "radial": "families",
    "spline_autoregressive": "families",
    "ActiveUnits": "diagnostics",
    "Diagnostics": "diagnostics",
    "KLPerDimension": "diagnostics",
    "MutualInformation": "diagnostics",
    "active_units": "diagnostics",
    "diagnose": "diagnostics",
    "kl_per_dimension": "diagnostics",
    "mutual_information": "diagnostics",
    "GapResult": "gaps",
    "gaps": "gaps",
    "IWAEBounds": "importance",
    "ELBOEstimate": "importance",
    "EstimateOptions": "options",
    "LogLikelihood": "importance",
    "elbo": "importance",
    "iwae_bounds": "importance",
    "log_likelihood": "importance",
    "log_weights": "importance",
    "AISResult": "ais",
    "BDMCResult": "ais",
    "ais": "ais",
    "bdmc": "ais",
    "Estimate": "evaluation",
    "IWAE": "losses",
    "ReparamELBO": "losses",
    "Bernoulli": "likelihoods",
    "Categorical256": "likelihoods",
    "ContinuousBernoulli": "likelihoods",
    "Gaussian": "likelihoods",
    "Laplace": "likelihoods",
    "Likelihood": "likelihoods",
    "plot_gaps": "plots",
    "MLP": "nets",
    "ConvDecoder": "nets",
    "ConvEncoder": "nets",
    "FactoredLogits": "nets",
    "First": "nets",
    "BottomUp": "hierarchy",
    "GaussianLayer": "hierarchy",
    "Hierarchical": "hierarchy",
    "LayerKL": "hierarchy",
    "TopDown": "hierarchy",
    "active_units_per_layer": "hierarchy",
    "kl_per_layer": "hierarchy",
    "FlowPrior": "priors",
    "LearnedNormal": "priors",
    "MixtureOfGaussians": "priors",
    "Prior": "priors",
    "StandardNormal": "priors",
    "VampPrior": "priors",
    "flow_prior": "priors",
    "SVI": "training",
    "History": "training",
    "Objective": "training",
    "TrainState": "training",
    "fit": "training",
    "objective": "training",
    "train_step": "training",
    "VAE": "vae",
}
#: Names that are both a function and a submodule: ``pyrovae.gaps`` and ``pyrovae.ais`` are the
#: functions (as ``from .gaps import gaps`` made them when this package imported eagerly).
_FUNCTION_OVER_MODULE = frozenset({"gaps", "ais"})


def __getattr__(name: str) -> Any:
    if name == "distributed":
        return importlib.import_module(".distributed", __name__)
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        # The import system sets a loaded submodule as its package's attribute: keep the function.
        if name in _FUNCTION_OVER_MODULE and isinstance(value, types.ModuleType):
            value = getattr(value, name)
        super().__setattr__(name, value)


__import__("sys").modules[__name__].__class__ = _Package
