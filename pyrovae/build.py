"""Build a :class:`~pyrovae.VAE` from part names (what the CLI and the benchmarks use).

Each registry maps a name to a factory; adding a part is adding one entry. In code, build the parts
directly: this module only turns names and sizes into the same objects.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .errors import ConfigError
from .families import DiagonalNormal
from .likelihoods import Bernoulli, Gaussian
from .nets import MLP
from .priors import StandardNormal
from .vae import VAE

__all__ = ["VAEConfig", "build_vae", "PRIORS", "FAMILIES", "LIKELIHOODS"]


@dataclass
class VAEConfig:
    """Everything :func:`build_vae` needs; stored beside checkpoints to rebuild the model.

    :ivar num_features: the data size ``D`` (flat).
    :ivar latent_dim: the size of ``z``.
    :ivar hidden_dims: the MLP hidden layers of encoder and decoder.
    :ivar activation: the MLP activation name.
    :ivar prior, family, likelihood: part names (keys of :data:`PRIORS`, :data:`FAMILIES`,
        :data:`LIKELIHOODS`).
    :ivar options: extra keyword options of the parts, e.g. ``{"scale": 0.1}`` for a Gaussian.
    """

    num_features: int
    latent_dim: int = 50
    hidden_dims: Sequence[int] = (400, 400)
    activation: str = "relu"
    prior: str = "standard"
    family: str = "diagonal"
    likelihood: str = "bernoulli"
    image_shape: Sequence[int] | None = None
    options: dict[str, Any] = field(default_factory=dict)


def _standard(cfg: VAEConfig, encoder_features: int) -> nn.Module:
    return StandardNormal(cfg.latent_dim)


def _diagonal(cfg: VAEConfig) -> nn.Module:
    h = tuple(cfg.hidden_dims)
    encoder = (
        MLP(cfg.num_features, h[:-1], h[-1], cfg.activation, activate_output=True)
        if h
        else nn.Identity()
    )
    feature_dim = h[-1] if h else cfg.num_features
    return DiagonalNormal(encoder, cfg.latent_dim, feature_dim=feature_dim)


def _decoder(cfg: VAEConfig, out_dim: int) -> nn.Module:
    return MLP(cfg.latent_dim, tuple(cfg.hidden_dims), out_dim, cfg.activation)


def _bernoulli(cfg: VAEConfig) -> nn.Module:
    return Bernoulli(_decoder(cfg, cfg.num_features))


def _gaussian(cfg: VAEConfig) -> nn.Module:
    scale = cfg.options.get("scale", "learned")
    return Gaussian(_decoder(cfg, cfg.num_features), scale, num_features=cfg.num_features)


#: name -> factory(config, encoder_feature_dim) for the prior.
PRIORS: dict[str, Callable[..., nn.Module]] = {"standard": _standard}
#: name -> factory(config) for the variational family (with its encoder).
FAMILIES: dict[str, Callable[..., nn.Module]] = {"diagonal": _diagonal}
#: name -> factory(config) for the likelihood (with its decoder).
LIKELIHOODS: dict[str, Callable[..., nn.Module]] = {"bernoulli": _bernoulli, "gaussian": _gaussian}


def _lookup(registry: dict[str, Any], name: str, kind: str) -> Any:
    if name not in registry:
        raise ConfigError(f"unknown {kind} {name!r}; choose one of {sorted(registry)}")
    return registry[name]


def build_vae(config: VAEConfig, num_data: int) -> VAE:
    """Build the VAE a :class:`VAEConfig` describes, for a training set of ``num_data`` points."""
    family = _lookup(FAMILIES, config.family, "family")(config)
    prior = _lookup(PRIORS, config.prior, "prior")(config, getattr(family, "feature_dim", None))
    likelihood = _lookup(LIKELIHOODS, config.likelihood, "likelihood")(config)
    vae = VAE(prior, family, likelihood, num_data=num_data)
    vae.config = config  # fit(checkpoint_dir=...) saves it; pyrovae.load_model rebuilds from it
    return vae
