"""Closed-form log-densities shared by the parts (private)."""

from __future__ import annotations

import math

import torch

#: :math:`\tfrac12 \log 2\pi`, the Gaussian's normalizer per dimension.
LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def diagonal_normal_log_prob(value: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    r""":math:`\sum_d \log \mathcal N(v_d; \mu_d, \sigma_d^2) = -\sum_d \big(\tfrac12 ((v_d - \mu_d)
    / \sigma_d)^2 + \log \sigma_d\big) - \tfrac D2 \log 2\pi`, summed over the last dimension
    (the arguments broadcast)."""
    return -(0.5 * ((value - loc) / scale).square() + scale.log()).sum(-1) - (
        value.shape[-1] * LOG_SQRT_2PI
    )
