"""Build a :class:`~pyrovae.VAE` from part names (what the CLI and the benchmarks use).

Each registry maps a name to a factory; adding a part is adding one entry. In code, build the parts
directly: this module only turns names and sizes into the same objects.

========================  =====================================================================
registry                  names
========================  =====================================================================
:data:`PRIORS`            ``standard``, ``learned``, ``mixture``, ``vamp``, ``flow``,
                          ``hierarchical``
:data:`FAMILIES`          ``diagonal``, ``full_rank``, ``iaf``, ``planar``, ``radial``,
                          ``spline``, ``householder``, ``local``, ``bottom_up``
:data:`LIKELIHOODS`       ``bernoulli``, ``gaussian``, ``laplace``, ``continuous_bernoulli``,
                          ``categorical256``
:data:`NETWORKS`          ``mlp``, ``conv`` (needs ``image_shape``)
========================  =====================================================================

The options (``VAEConfig.options``) are listed in :data:`OPTIONS`.

Stochastic layers (:mod:`pyrovae.hierarchy`): the option ``layers``, e.g. ``[100, 50]`` (bottom
first, summing to ``latent_dim``), splits :math:`z` into layers (default for the ``hierarchical``
prior or the ``bottom_up`` family: about 2/3 and 1/3 of ``latent_dim``, so 150 gives Burda et
al.'s ``[100, 50]``); their networks between layers have ``layer_hidden_dims``, and the decoder
then reads the bottom layer only (``First(layers[0])`` before the network), for any likelihood.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn

from ._checks import check_positive_int
from .errors import ConfigError
from .families import FLOW_TRANSFORMS, DiagonalNormal, Flow, FullRankNormal, LocalNormal
from .likelihoods import Bernoulli, Categorical256, ContinuousBernoulli, Gaussian, Laplace
from .hierarchy import BottomUp, Hierarchical
from .nets import ACTIVATIONS, MLP, ConvDecoder, ConvEncoder, FactoredLogits, First
from .priors import LearnedNormal, MixtureOfGaussians, StandardNormal, VampPrior, flow_prior
from .vae import VAE

__all__ = [
    "VAEConfig",
    "build_vae",
    "PRIORS",
    "FAMILIES",
    "LIKELIHOODS",
    "NETWORKS",
    "OPTIONS",
]

#: option name -> (default, meaning). Unknown option names raise :class:`ConfigError`.
OPTIONS: dict[str, tuple[Any, str]] = {
    "scale": ("learned", "gaussian/laplace scale: a number, 'learned' or 'predicted'"),
    "num_transforms": (2, "flow steps of a flow family or of the flow prior"),
    "flow_hidden_dims": (None, "hidden sizes of the flow networks (default [2 * latent_dim])"),
    "flow_base": ("diagonal", "base family of a flow family: 'diagonal' or 'full_rank'"),
    "count_bins": (8, "bins of the spline flow"),
    "num_components": (10, "components of the mixture prior"),
    "num_pseudo_inputs": (500, "pseudo-inputs of the VampPrior"),
    "flow_prior_kind": ("affine_autoregressive", "'affine_autoregressive' or 'spline_autoregressive'"),
    "conv_channels": ([32, 64], "conv network channels (encoder order; the decoder reverses them)"),
    "logit_rank": (32, "features per pixel of the categorical256 MLP decoder, mapped to the 256 "
                   "logits by a 1x1 layer shared by all pixels (FactoredLogits); 0 for a dense "
                   "output layer"),
    "layers": (None, "sizes of the stochastic layers, bottom first, e.g. [100, 50] (summing to "
               "latent_dim; default for the hierarchical prior or the bottom_up family: about "
               "2/3 and 1/3 of latent_dim); the decoder then reads the bottom layer"),
    "layer_hidden_dims": ([100, 100], "hidden sizes of the networks between stochastic layers "
                          "(p(z_l|z_l+1) and q(z_l+1|z_l))"),
}


@dataclass
class VAEConfig:
    """Everything :func:`build_vae` needs; stored beside checkpoints to rebuild the model.

    All fields are JSON-serializable.

    :ivar num_features: the data size ``D`` (flat).
    :ivar latent_dim: the size of ``z``.
    :ivar hidden_dims: the MLP hidden layers of encoder and decoder (the encoder's features are
        the last one); for ``network="conv"`` only the last one is used: the size of the conv
        encoder's features.
    :ivar activation: the activation name.
    :ivar prior, family, likelihood: part names (keys of :data:`PRIORS`, :data:`FAMILIES`,
        :data:`LIKELIHOODS`).
    :ivar image_shape: ``(H, W)`` or ``(C, H, W)`` of the images (needed by ``network="conv"``).
    :ivar options: extra part options (see :data:`OPTIONS`), e.g. ``{"scale": 0.1}`` for a
        Gaussian or ``{"num_transforms": 4}`` for a flow.
    :ivar network: ``"mlp"`` or ``"conv"`` (:data:`NETWORKS`) for both encoder and decoder.
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
    network: str = "mlp"


def _option(cfg: VAEConfig, name: str) -> Any:
    return cfg.options.get(name, OPTIONS[name][0])


# ---------------------------------------------------------------------- networks
def _feature_dim(cfg: VAEConfig) -> int:
    h = tuple(cfg.hidden_dims)
    if cfg.network == "conv":
        return h[-1] if h else 256
    return h[-1] if h else cfg.num_features


def _mlp_encoder(cfg: VAEConfig) -> nn.Module:
    h = tuple(cfg.hidden_dims)
    if not h:
        return nn.Identity()
    return MLP(cfg.num_features, h[:-1], h[-1], cfg.activation, activate_output=True)


def _mlp_decoder(cfg: VAEConfig, values_per_feature: int) -> nn.Module:
    return MLP(cfg.latent_dim, tuple(cfg.hidden_dims), values_per_feature * cfg.num_features, cfg.activation)


def _image_shape(cfg: VAEConfig) -> tuple[int, ...]:
    if cfg.image_shape is None:
        raise ConfigError("network='conv' needs image_shape, e.g. (28, 28); or use network='mlp'")
    shape = tuple(int(s) for s in cfg.image_shape)
    size = 1
    for s in shape:
        size *= s
    if size != cfg.num_features:
        raise ConfigError(
            f"image_shape {shape} has {size} pixels but num_features is {cfg.num_features}"
        )
    return shape


def _conv_encoder(cfg: VAEConfig) -> nn.Module:
    channels = tuple(_option(cfg, "conv_channels"))
    return ConvEncoder(_image_shape(cfg), _feature_dim(cfg), channels, cfg.activation)


def _conv_decoder(cfg: VAEConfig, values_per_feature: int) -> nn.Module:
    channels = tuple(reversed(tuple(_option(cfg, "conv_channels"))))
    return ConvDecoder(cfg.latent_dim, _image_shape(cfg), values_per_feature, channels, cfg.activation)


#: name -> (encoder factory(config), decoder factory(config, values_per_feature)).
NETWORKS: dict[str, tuple[Callable[..., nn.Module], Callable[..., nn.Module]]] = {
    "mlp": (_mlp_encoder, _mlp_decoder),
    "conv": (_conv_encoder, _conv_decoder),
}


def _encoder(cfg: VAEConfig) -> nn.Module:
    return _lookup(NETWORKS, cfg.network, "network")[0](cfg)


def _decoder(cfg: VAEConfig, values_per_feature: int = 1) -> nn.Module:
    make = _lookup(NETWORKS, cfg.network, "network")[1]
    return _reading_bottom(cfg, lambda c: make(c, values_per_feature))


def _layers(cfg: VAEConfig) -> tuple[int, ...] | None:
    """The stochastic layers' sizes: the ``layers`` option, else, for the ``hierarchical`` prior
    or the ``bottom_up`` family, two layers of about 2/3 and 1/3 of ``latent_dim`` (150 ->
    (100, 50), Burda et al.'s); ``None`` for a model with one stochastic layer."""
    layers = _option(cfg, "layers")
    if layers is not None:
        return tuple(layers)
    if cfg.prior != "hierarchical" and cfg.family != "bottom_up":
        return None
    top = max(1, cfg.latent_dim // 3)
    if cfg.latent_dim - top < 1:
        raise ConfigError(
            f"two stochastic layers need latent_dim >= 2, got {cfg.latent_dim}; or give their "
            "sizes: option layers=[100, 50] (CLI: --option 'layers=[100,50]' --latent-dim 150)"
        )
    return (cfg.latent_dim - top, top)


def _reading_bottom(cfg: VAEConfig, build: Callable[[VAEConfig], nn.Module]) -> nn.Module:
    """The decoder ``build`` makes, reading only the bottom layer of ``z`` when ``layers`` is set."""
    layers = _layers(cfg)
    if layers is None:
        return build(cfg)
    return nn.Sequential(First(layers[0]), build(replace(cfg, latent_dim=layers[0])))


# ---------------------------------------------------------------------- priors
def _standard(cfg: VAEConfig, likelihood: nn.Module) -> nn.Module:
    return StandardNormal(cfg.latent_dim)


def _learned(cfg: VAEConfig, likelihood: nn.Module) -> nn.Module:
    return LearnedNormal(cfg.latent_dim)


def _mixture(cfg: VAEConfig, likelihood: nn.Module) -> nn.Module:
    return MixtureOfGaussians(cfg.latent_dim, _option(cfg, "num_components"))


def _vamp(cfg: VAEConfig, likelihood: nn.Module) -> nn.Module:
    # The VAE attaches its family; the pseudo-inputs live where the likelihood says data lives.
    return VampPrior(
        _option(cfg, "num_pseudo_inputs"),
        cfg.num_features,
        bounds=getattr(likelihood, "data_bounds", None),
    )


def _hierarchical(cfg: VAEConfig, likelihood: nn.Module) -> nn.Module:
    return Hierarchical(_layers(cfg), tuple(_option(cfg, "layer_hidden_dims")),
                        cfg.activation)


def _flow_prior(cfg: VAEConfig, likelihood: nn.Module) -> nn.Module:
    return flow_prior(
        cfg.latent_dim,
        _option(cfg, "num_transforms"),
        _option(cfg, "flow_prior_kind"),
        _option(cfg, "flow_hidden_dims"),
    )


# ---------------------------------------------------------------------- families
def _diagonal(cfg: VAEConfig, num_data: int) -> nn.Module:
    return DiagonalNormal(_encoder(cfg), cfg.latent_dim, feature_dim=_feature_dim(cfg))


def _full_rank(cfg: VAEConfig, num_data: int) -> nn.Module:
    return FullRankNormal(_encoder(cfg), cfg.latent_dim, feature_dim=_feature_dim(cfg))


def _bottom_up(cfg: VAEConfig, num_data: int) -> nn.Module:
    return BottomUp(_encoder(cfg), _layers(cfg),
                    tuple(_option(cfg, "layer_hidden_dims")), cfg.activation,
                    feature_dim=_feature_dim(cfg))


def _local(cfg: VAEConfig, num_data: int) -> nn.Module:
    return LocalNormal(num_data, cfg.latent_dim)


def _flow(kind: str) -> Callable[[VAEConfig, int], nn.Module]:
    def make(cfg: VAEConfig, num_data: int) -> nn.Module:
        base_name = _option(cfg, "flow_base")
        if base_name not in ("diagonal", "full_rank"):
            raise ConfigError(f"flow_base must be 'diagonal' or 'full_rank', got {base_name!r}")
        base = (_diagonal if base_name == "diagonal" else _full_rank)(cfg, num_data)
        factory = FLOW_TRANSFORMS[kind]
        # Options a factory declares beyond the common four (e.g. the spline's count_bins).
        extra = {name: _option(cfg, name) for name in getattr(factory, "options", ())}
        transforms = factory(
            cfg.latent_dim,
            base.feature_dim,
            _option(cfg, "num_transforms"),
            _option(cfg, "flow_hidden_dims"),
            **extra,
        )
        return Flow(base, transforms)

    make.__name__ = f"_{kind}"
    return make


# ---------------------------------------------------------------------- likelihoods
def _bernoulli(cfg: VAEConfig) -> nn.Module:
    return Bernoulli(_decoder(cfg))


def _continuous_bernoulli(cfg: VAEConfig) -> nn.Module:
    return ContinuousBernoulli(_decoder(cfg))


def _loc_scale(kind: type) -> Callable[[VAEConfig], nn.Module]:
    def make(cfg: VAEConfig) -> nn.Module:
        scale = _option(cfg, "scale")
        decoder = _decoder(cfg, 2 if scale == "predicted" else 1)
        return kind(decoder, scale, num_features=cfg.num_features)

    make.__name__ = f"_{kind.__name__.lower()}"
    return make


def _categorical256(cfg: VAEConfig) -> nn.Module:
    rank = _option(cfg, "logit_rank")
    if cfg.network != "mlp" or rank == 0:  # the conv decoder's output layer is already shared
        return Categorical256(_decoder(cfg, 256), num_levels=256)
    h = tuple(cfg.hidden_dims)

    def build(c: VAEConfig) -> nn.Module:
        trunk = (
            MLP(c.latent_dim, h[:-1], h[-1], c.activation, activate_output=True) if h
            else nn.Identity()
        )
        head = FactoredLogits(h[-1] if h else c.latent_dim, c.num_features, 256, rank)
        return nn.Sequential(trunk, head)

    return Categorical256(_reading_bottom(cfg, build), num_levels=256)


#: Options that a saved config states even when they were left at their default (see
#: :func:`pin_options`).
PINNED_OPTIONS = ("logit_rank",)


def lacks_logit_rank(config: Mapping[str, Any]) -> bool:
    """Whether a config dict describes a categorical256 MLP decoder without saying its
    ``logit_rank``."""
    options = config.get("options")
    return (
        config.get("likelihood") == "categorical256"
        and config.get("network", "mlp") == "mlp"
        and isinstance(options, dict)
        and "logit_rank" not in options
    )


def pin_options(config: dict[str, Any]) -> dict[str, Any]:
    """A config dict (``dataclasses.asdict`` of a :class:`VAEConfig`) with the options whose
    default may change set to the value used: what a run folder stores, so that it always
    rebuilds the same model."""
    if lacks_logit_rank(config):
        config = {**config, "options": {**config["options"], "logit_rank": OPTIONS["logit_rank"][0]}}
    return config


def upgrade_saved(config: dict[str, Any]) -> dict[str, Any]:
    """A saved config dict as this version reads it: one without ``logit_rank`` was saved before
    the option existed, when the categorical256 decoder had a dense output layer."""
    if lacks_logit_rank(config):
        config = {**config, "options": {**config["options"], "logit_rank": 0}}
    return config


#: name -> factory(config, likelihood) for the prior (a VampPrior gets the family from the VAE).
PRIORS: dict[str, Callable[..., nn.Module]] = {
    "standard": _standard,
    "learned": _learned,
    "mixture": _mixture,
    "vamp": _vamp,
    "flow": _flow_prior,
    "hierarchical": _hierarchical,
}
#: name -> factory(config, num_data) for the variational family (with its encoder).
FAMILIES: dict[str, Callable[..., nn.Module]] = {
    "diagonal": _diagonal,
    "full_rank": _full_rank,
    **{kind: _flow(kind) for kind in FLOW_TRANSFORMS},
    "local": _local,
    "bottom_up": _bottom_up,
}
#: name -> factory(config) for the likelihood (with its decoder).
LIKELIHOODS: dict[str, Callable[..., nn.Module]] = {
    "bernoulli": _bernoulli,
    "gaussian": _loc_scale(Gaussian),
    "laplace": _loc_scale(Laplace),
    "continuous_bernoulli": _continuous_bernoulli,
    "categorical256": _categorical256,
}


def _lookup(registry: dict[str, Any], name: str, kind: str) -> Any:
    if not isinstance(name, str) or name not in registry:
        raise ConfigError(f"unknown {kind} {name!r}; choose one of {sorted(registry)}")
    return registry[name]


def _is_positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _positive_ints(value: Any, name: str, *, allow_empty: bool = True) -> tuple[int, ...]:
    if (
        isinstance(value, (str, bytes))
        or not isinstance(value, Sequence)
        or not all(_is_positive_int(v) for v in value)
        or (not allow_empty and len(value) == 0)
    ):
        raise ConfigError(
            f"{name} must be a {'non-empty ' if not allow_empty else ''}list of positive integers, "
            f"got {value!r}"
        )
    return tuple(value)


def _check_option(name: str, value: Any) -> None:
    """Raise :class:`ConfigError` if ``value`` is not a sound value of option ``name``."""
    if name in ("num_transforms", "num_components", "num_pseudo_inputs", "count_bins"):
        check_positive_int(value, f"option {name}")
    elif name == "logit_rank" and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        raise ConfigError(
            f"option logit_rank must be an integer >= 1 (features per pixel of the categorical256 "
            f"logit head) or 0 (a dense output layer), got {value!r}"
        )
    elif name == "flow_hidden_dims" and value is not None:
        _positive_ints(value, "option flow_hidden_dims", allow_empty=False)
    elif name == "conv_channels":
        _positive_ints(value, "option conv_channels", allow_empty=False)
    elif name == "layers" and value is not None:
        if len(_positive_ints(value, "option layers", allow_empty=False)) < 2:
            raise ConfigError(f"option layers needs two or more stochastic layers, bottom first, "
                              f"e.g. [100, 50]; got {value!r}")
    elif name == "layer_hidden_dims":
        _positive_ints(value, "option layer_hidden_dims")
    elif name in ("flow_base", "flow_prior_kind"):
        choices = ("diagonal", "full_rank") if name == "flow_base" else (
            "affine_autoregressive", "spline_autoregressive")
        if value not in choices:
            raise ConfigError(f"option {name} must be one of {list(choices)}, got {value!r}")
    elif name == "scale" and value not in ("learned", "predicted"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            0 < value < float("inf")
        ):
            raise ConfigError(
                f"option scale must be a positive number, 'learned' or 'predicted', got {value!r}"
            )


def _check_config(config: VAEConfig) -> None:
    if not isinstance(config, VAEConfig):
        raise ConfigError(f"config must be a pyrovae.build.VAEConfig, got {type(config).__name__}")
    check_positive_int(config.num_features, "num_features")
    check_positive_int(config.latent_dim, "latent_dim")
    _positive_ints(config.hidden_dims, "hidden_dims")
    if not isinstance(config.activation, str) or config.activation not in ACTIVATIONS:
        raise ConfigError(
            f"unknown activation {config.activation!r}; use one of {sorted(ACTIVATIONS)}"
        )
    if config.image_shape is not None:
        shape = _positive_ints(config.image_shape, "image_shape", allow_empty=False)
        if len(shape) > 3 or math.prod(shape) != config.num_features:
            raise ConfigError(
                f"image_shape {config.image_shape!r} must be (H, W) or (C, H, W) with "
                f"num_features={config.num_features} pixels in all; fix it or pass None"
            )
    if not isinstance(config.options, dict):
        raise ConfigError(f"options must be a dict, got {type(config.options).__name__}")
    unknown = sorted(map(str, set(config.options) - set(OPTIONS)))
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown}; known options are {sorted(OPTIONS)}")
    for name, value in config.options.items():
        _check_option(name, value)
    layers = config.options.get("layers")
    if layers is not None and sum(layers) != config.latent_dim:
        raise ConfigError(
            f"option layers={list(layers)} sums to {sum(layers)} but latent_dim is "
            f"{config.latent_dim}; set latent_dim to the sum (CLI: --latent-dim {sum(layers)})"
        )
    _lookup(NETWORKS, config.network, "network")
    _lookup(PRIORS, config.prior, "prior")
    _lookup(FAMILIES, config.family, "family")
    _lookup(LIKELIHOODS, config.likelihood, "likelihood")


def build_vae(config: VAEConfig, num_data: int) -> VAE:
    """Build the VAE a :class:`VAEConfig` describes, for a training set of ``num_data`` points.

    Example::

        >>> cfg = VAEConfig(784, latent_dim=8, hidden_dims=(64,), prior="vamp", family="iaf",
        ...                 options={"num_pseudo_inputs": 10, "num_transforms": 2})
        >>> build_vae(cfg, num_data=100).sample(3).shape
        torch.Size([3, 784])
    """
    _check_config(config)
    num_data = check_positive_int(num_data, "num_data")
    family = _lookup(FAMILIES, config.family, "family")(config, num_data)
    likelihood = _lookup(LIKELIHOODS, config.likelihood, "likelihood")(config)
    prior = _lookup(PRIORS, config.prior, "prior")(config, likelihood)
    vae = VAE(prior, family, likelihood, num_data=num_data)
    vae.config = config  # fit(checkpoint_dir=...) saves it; pyrovae.load_model rebuilds from it
    return vae
