"""Networks for encoders and decoders.

Encoders map a flat batch ``x`` of shape ``(batch, num_features)`` to features of shape
``(batch, out_features)``; decoders map latents ``z`` of shape ``(..., latent_dim)`` to the
parameters of the likelihood, shape ``(..., num_features)``. Any :class:`torch.nn.Module` with that
behaviour can be used; :class:`MLP` is the one pyrovae ships.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .errors import ConfigError

__all__ = ["MLP", "ConvEncoder", "ConvDecoder", "FactoredLogits", "First", "ACTIVATIONS"]

#: Activation names accepted by :class:`MLP`.
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "softplus": nn.Softplus,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "leaky_relu": nn.LeakyReLU,
}


class MLP(nn.Sequential):
    """A multilayer perceptron ``in_dim -> hidden_dims... -> out_dim``.

    The activation follows every hidden layer and, by default, not the output layer, so the
    output is unconstrained (logits, locations, raw scales). Works on any leading batch shape:
    ``(..., in_dim) -> (..., out_dim)``.

    :param in_dim: input size.
    :param hidden_dims: sizes of the hidden layers, e.g. ``(400, 400)``; may be empty.
    :param out_dim: output size.
    :param activation: a name from :data:`ACTIVATIONS` or a callable returning a module.
    :param activate_output: also apply the activation to the output (for an encoder whose
        output is a feature vector fed to linear heads).

    Example::

        >>> net = MLP(784, (400, 400), 50)
        >>> net(torch.zeros(3, 784)).shape
        torch.Size([3, 50])
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dims: Sequence[int],
        out_dim: int,
        activation: str | Callable[[], nn.Module] = "relu",
        *,
        activate_output: bool = False,
    ) -> None:
        dims = [in_dim, *hidden_dims, out_dim]
        for d in dims:
            if not isinstance(d, int) or isinstance(d, bool) or d < 1:
                raise ConfigError(
                    f"MLP sizes must be positive integers, got {dims}; pass e.g. MLP(784, (400, 400), 50)"
                )
        if isinstance(activation, str):
            if activation not in ACTIVATIONS:
                raise ConfigError(
                    f"unknown activation {activation!r}; use one of {sorted(ACTIVATIONS)}"
                )
            make_activation = ACTIVATIONS[activation]
        elif callable(activation):
            make_activation = activation
        else:
            raise ConfigError(
                f"activation must be a name from {sorted(ACTIVATIONS)} or a callable returning a "
                f"module, got {activation!r}"
            )
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(dims) - 2 or activate_output:
                layers.append(make_activation())
        super().__init__(*layers)
        self.in_features = in_dim
        self.out_features = out_dim
        self.hidden_dims = tuple(hidden_dims)

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - torch's name
        return super().forward(input)


class First(nn.Module):
    """The first ``num`` coordinates of the last dimension: ``(..., D) -> (..., num)``.

    The decoder of a VAE with stochastic layers reads the bottom layer :math:`z_1` of
    :math:`z = (z_1, z_2, ...)` (see :mod:`pyrovae.hierarchy`):
    ``Bernoulli(nn.Sequential(First(d1), MLP(d1, (200, 200), 784)))``.

    :param num: how many leading coordinates to keep.

    Example::

        >>> First(2)(torch.arange(5.0))
        tensor([0., 1.])
    """

    def __init__(self, num: int) -> None:
        super().__init__()
        if isinstance(num, bool) or not isinstance(num, int) or num < 1:
            raise ConfigError(f"First needs a positive number of coordinates, got {num!r}")
        self.num = num
        self.out_features = num

    def extra_repr(self) -> str:
        return f"num={self.num}"

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.shape[-1] < self.num:
            raise ConfigError(
                f"First({self.num}) got latents of size {z.shape[-1]}; the bottom layer cannot "
                "be larger than z"
            )
        return z[..., : self.num]


def _make_activation(activation: str | Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    if isinstance(activation, str):
        if activation not in ACTIVATIONS:
            raise ConfigError(f"unknown activation {activation!r}; use one of {sorted(ACTIVATIONS)}")
        return ACTIVATIONS[activation]
    if not callable(activation):
        raise ConfigError(
            f"activation must be a name from {sorted(ACTIVATIONS)} or a callable returning a "
            f"module, got {activation!r}"
        )
    return activation


def _image_shape(image_shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(image_shape)
    if len(shape) == 2:
        shape = (1, *shape)
    if len(shape) != 3 or any(not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in shape):
        raise ConfigError(
            f"image_shape must be (height, width) or (channels, height, width) of positive "
            f"integers, got {image_shape!r}"
        )
    return shape  # type: ignore[return-value]


def _check_channels(channels: Sequence[int]) -> tuple[int, ...]:
    channels = tuple(channels)
    if not channels or any(not isinstance(c, int) or isinstance(c, bool) or c < 1 for c in channels):
        raise ConfigError(f"channels must be a non-empty list of positive integers, got {channels!r}")
    return channels


class ConvEncoder(nn.Module):
    """A convolutional encoder for flat images: ``(batch, C*H*W) -> (batch, out_features)``.

    The flat input is reshaped to ``(batch, C, H, W)``; each of ``channels`` is a 4x4 convolution
    with stride 2 (halving height and width, rounding down), then a linear layer maps the
    flattened result to ``out_features``, followed by the activation (the features feed a
    family's linear heads). Any ``H, W >= 4`` works, e.g. 28x28 (MNIST) or 28x20 (Frey faces).

    :param image_shape: ``(H, W)`` or ``(C, H, W)``.
    :param out_features: the feature size.
    :param channels: output channels of the convolutions, e.g. ``(32, 64)``.
    :param activation: a name from :data:`ACTIVATIONS` or a callable returning a module.
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        out_features: int,
        channels: Sequence[int] = (32, 64),
        activation: str | Callable[[], nn.Module] = "relu",
    ) -> None:
        super().__init__()
        self.image_shape = _image_shape(image_shape)
        channels = _check_channels(channels)
        if not isinstance(out_features, int) or out_features < 1:
            raise ConfigError(f"out_features must be a positive integer, got {out_features!r}")
        act = _make_activation(activation)
        c, h, w = self.image_shape
        layers: list[nn.Module] = []
        for out in channels:
            if h < 2 or w < 2:
                raise ConfigError(
                    f"image {self.image_shape[1:]} is too small for {len(channels)} stride-2 "
                    "convolutions; use fewer channels"
                )
            layers += [nn.Conv2d(c, out, 4, stride=2, padding=1), act()]
            c, h, w = out, h // 2, w // 2
        self.conv = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Linear(c * h * w, out_features), act())
        self.in_features = math.prod(self.image_shape)
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        h = self.conv(x.reshape(-1, *self.image_shape))
        return self.head(h.flatten(1)).reshape(*lead, self.out_features)


class ConvDecoder(nn.Module):
    """A transposed-convolutional decoder: ``(..., latent_dim) -> (..., out_channels * H * W)``.

    A linear layer maps ``z`` to a ``(channels[0], ceil(H/2^n), ceil(W/2^n))`` map; ``n`` 4x4
    transposed convolutions with stride 2 double it (the last has ``out_channels`` outputs and
    no activation), and the result is cropped to ``H x W`` and flattened channel-major. Any
    leading batch shape works (the particle dimension included).

    ``out_channels`` is how many values per pixel the likelihood needs: 1 for Bernoulli or a
    Gaussian mean, 2 for a Gaussian with predicted scale (mean then raw scale), 256 for
    :class:`~pyrovae.likelihoods.Categorical256`; set it from ``out_dim = out_channels * H * W``.

    :param latent_dim: the size of ``z``.
    :param image_shape: ``(H, W)`` or ``(C, H, W)`` of the data (``C`` multiplies the outputs).
    :param out_channels: values per pixel and image channel.
    :param channels: channels of the feature maps from coarse to fine, e.g. ``(64, 32)``.
    :param activation: a name from :data:`ACTIVATIONS` or a callable returning a module.
    """

    def __init__(
        self,
        latent_dim: int,
        image_shape: Sequence[int],
        out_channels: int = 1,
        channels: Sequence[int] = (64, 32),
        activation: str | Callable[[], nn.Module] = "relu",
    ) -> None:
        super().__init__()
        if not isinstance(latent_dim, int) or latent_dim < 1:
            raise ConfigError(f"latent_dim must be a positive integer, got {latent_dim!r}")
        if not isinstance(out_channels, int) or out_channels < 1:
            raise ConfigError(f"out_channels must be a positive integer, got {out_channels!r}")
        self.image_shape = _image_shape(image_shape)
        channels = _check_channels(channels)
        act = _make_activation(activation)
        c, h, w = self.image_shape
        n = len(channels)
        self._start = (channels[0], -(-h // 2**n), -(-w // 2**n))
        self.head = nn.Sequential(nn.Linear(latent_dim, math.prod(self._start)), act())
        layers: list[nn.Module] = []
        for i, cin in enumerate(channels):
            last = i == n - 1
            cout = c * out_channels if last else channels[i + 1]
            layers.append(nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1))
            if not last:
                layers.append(act())
        self.deconv = nn.Sequential(*layers)
        self.in_features = latent_dim
        self.out_channels = out_channels
        self.out_features = out_channels * math.prod(self.image_shape)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        lead = z.shape[:-1]
        c, h, w = self.image_shape
        y = self.deconv(self.head(z.reshape(-1, z.shape[-1])).reshape(-1, *self._start))
        y = y[..., :h, :w].reshape(-1, self.out_channels, c, h, w)
        return y.reshape(*lead, self.out_features)


class FactoredLogits(nn.Module):
    r"""A PixelCNN-style logit head: ``(..., in_dim) -> (..., num_levels * num_features)``.

    Instead of a dense layer to ``num_levels`` logits per feature, a linear layer gives each of
    the ``D = num_features`` pixels ``rank`` features, and one ``num_levels x rank`` matrix ``B``,
    shared by all pixels (a 1x1 convolution), maps them to the logits; an untied bias ``c`` of
    ``num_levels x D`` holds each pixel's marginal (and makes a bias of the features redundant):

    .. math::

        a = W h \in \mathbb{R}^{r \times D}, \qquad
        \ell_{l, d} = \sum_{k=1}^{r} B_{l k}\, a_{k d} + c_{l d}.

    The output is level-major, ``(..., num_levels, D)`` flattened, the layout
    :class:`~pyrovae.likelihoods.Categorical256` reads. Parameters:
    ``in_dim * r * D + num_levels * r + num_levels * D``, e.g. 10.2 M for
    ``400 -> 32 x 784 -> 256 x 784`` against 80.5 M for a dense ``Linear(400, 256 * 784)``.

    :param in_dim: size ``H`` of the hidden input.
    :param num_features: number of pixels ``D``.
    :param num_levels: logits per pixel ``L`` (256 for 8-bit images).
    :param rank: features per pixel ``r``.

    Example::

        >>> head = FactoredLogits(400, num_features=784, num_levels=256, rank=32)
        >>> head(torch.zeros(3, 400)).shape
        torch.Size([3, 200704])
    """

    def __init__(self, in_dim: int, num_features: int, num_levels: int = 256, rank: int = 32) -> None:
        super().__init__()
        sizes = {"in_dim": in_dim, "num_features": num_features, "num_levels": num_levels,
                 "rank": rank}
        for name, v in sizes.items():
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"FactoredLogits {name} must be a positive integer, got {v!r}")
        self.num_features, self.num_levels, self.rank = num_features, num_levels, rank
        self.features = nn.Linear(in_dim, rank * num_features, bias=False)  # c absorbs B b
        # B initialized like nn.Linear(rank, num_levels)'s weight; c starts at uniform levels.
        self.weight = nn.Parameter(torch.empty(num_levels, rank).uniform_(-1, 1) / math.sqrt(rank))
        self.bias = nn.Parameter(torch.zeros(num_levels, num_features))
        self.in_features = in_dim
        self.out_features = num_levels * num_features

    def extra_repr(self) -> str:
        return (f"in_dim={self.in_features}, num_features={self.num_features}, "
                f"num_levels={self.num_levels}, rank={self.rank}")

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        lead = h.shape[:-1]
        a = self.features(h).reshape(-1, self.rank, self.num_features)  # (n, r, D)
        n, shape = a.shape[0], (self.num_levels, self.num_features)
        # c + B a for each row, one batched matmul with the bias added in the same kernel; its
        # output, (n, L, D) contiguous, is the only logit-sized tensor (B and c are broadcast).
        logits = torch.baddbmm(self.bias.expand(n, *shape), self.weight.expand(n, -1, -1), a)
        return logits.reshape(*lead, self.out_features)
