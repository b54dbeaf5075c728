"""Networks for encoders and decoders.

Encoders map a flat batch ``x`` of shape ``(batch, num_features)`` to features of shape
``(batch, out_features)``; decoders map latents ``z`` of shape ``(..., latent_dim)`` to the
parameters of the likelihood, shape ``(..., num_features)``. Any :class:`torch.nn.Module` with that
behaviour can be used; :class:`MLP` is the one pyrovae ships.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from .errors import ConfigError

__all__ = ["MLP", "ACTIVATIONS"]

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
        else:
            make_activation = activation
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
