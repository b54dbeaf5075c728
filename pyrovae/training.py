r"""Training by stochastic variational inference (AEVB, Kingma & Welling 2014).

Each step draws a minibatch ``(x, idx)``, evaluates a Pyro loss on ``vae.model`` and ``vae.guide``
(the ``"data"`` plate scales it to the whole training set, so it is an unbiased estimate of the
full-data negative ELBO) and takes one optimizer step on its reparameterized gradient.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from collections.abc import Callable
from typing import Any

import pyro
import torch
from pyro.infer import ELBO, Trace_ELBO
from tqdm.auto import tqdm

from ._batching import as_dataset, loader
from ._checks import check_positive_float, check_positive_int
from .errors import ConfigError, DataError
from .importance import elbo as elbo_estimate

__all__ = ["History", "fit"]


@dataclass
class History:
    """What :func:`fit` measured, one entry per epoch.

    :ivar train_elbo: the training objective per datapoint (nats), averaged over the epoch's
        minibatches: the ELBO for ``Trace_ELBO`` (with ``beta=1`` and no warm-up; else the
        KL-weighted objective), the IWAE bound for ``RenyiELBO(alpha=0)``.
    :ivar validation_elbo: the validation ELBO per datapoint (nats), or ``None`` without
        validation data.
    :ivar epoch_seconds: wall time of each epoch (validation excluded).
    :ivar num_steps: optimizer steps taken in all.
    """

    train_elbo: list[float] = field(default_factory=list)
    validation_elbo: list[float | None] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)
    num_steps: int = 0

    @property
    def num_epochs(self) -> int:
        return len(self.train_elbo)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _resolve_device(vae: torch.nn.Module, device: Any) -> torch.device:
    if device is None:
        p = next(iter(vae.parameters()), None)
        return p.device if p is not None else torch.device("cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device} was asked for but CUDA is not available; use 'cpu'")
    return device


def _check_dataset(vae: Any, dataset: Any, what: str, device: torch.device) -> None:
    """Run :meth:`VAE.check_data` over the whole data set before any training starts."""
    n = len(dataset)
    if n == 0:
        raise DataError(f"{what} is empty; pass at least one datapoint")
    for start in range(0, n, 8192):
        x, _ = dataset[torch.arange(start, min(start + 8192, n))]
        vae.check_data(torch.as_tensor(x).to(device), what)


def fit(
    vae: Any,
    train: Any,
    *,
    loss: ELBO | None = None,
    num_epochs: int = 10,
    batch_size: int = 128,
    lr: float = 1e-3,
    validation: Any = None,
    seed: int | None = 0,
    device: Any = None,
    progress: bool = True,
    beta: float = 1.0,
    kl_warmup_epochs: float = 0.0,
    on_epoch_end: Callable[[int, History], None] | None = None,
) -> History:
    r"""Train ``vae`` by SVI on minibatches of ``train``.

    :param vae: a :class:`~pyrovae.VAE` built with ``num_data == len(train)``.
    :param train: a tensor ``(num_datapoints, num_features)`` or a dataset of ``(x, idx)``
        pairs, such as :func:`pyrovae.data.load_dataset` returns.
    :param loss: any Pyro ELBO: ``Trace_ELBO()`` (default), ``TraceMeanField_ELBO()`` (analytic
        KL), ``RenyiELBO(alpha=0, num_particles=k, vectorize_particles=True)`` (IWAE).
    :param num_epochs: passes over ``train``.
    :param batch_size: datapoints per minibatch (at most ``len(train)``).
    :param lr: Adam's learning rate.
    :param validation: optional held-out data; its ELBO per datapoint is measured every epoch.
    :param seed: seeds Pyro and torch (the minibatch order and every draw); ``None`` leaves the
        global RNG alone.
    :param device: where to train (default: where the model is). The model is moved there.
    :param progress: show a tqdm progress bar with the running ELBO per datapoint.
    :param beta: weight on the KL term, :math:`E_q[\log p(x|z)] - \beta\,KL(q\|p)` (beta-VAE;
        Higgins et al. 2017). It scales the ``"z"`` site in model and guide; the validation ELBO
        and every log-likelihood are always of the unweighted model.
    :param kl_warmup_epochs: raise the KL weight linearly from 0 to ``beta`` over this many epochs
        (Sønderby et al. 2016); 0 disables warm-up.
    :param on_epoch_end: called as ``on_epoch_end(epoch, history)`` after each epoch (``epoch``
        counts from 1), e.g. to print progress or save pictures.
    :returns: a :class:`History`.

    The optimizer is one ``torch.optim.Adam`` over all parameters (Pyro's ``pyro.optim.Adam``
    keeps one optimizer per tensor and is slower); the loss is Pyro's.
    """
    num_epochs = check_positive_int(num_epochs, "num_epochs")
    batch_size = check_positive_int(batch_size, "batch_size")
    lr = check_positive_float(lr, "lr")
    beta = check_positive_float(beta, "beta")
    if not isinstance(kl_warmup_epochs, (int, float)) or not 0 <= kl_warmup_epochs < math.inf:
        raise ConfigError(f"kl_warmup_epochs must be a number >= 0, got {kl_warmup_epochs!r}")
    if loss is None:
        loss = Trace_ELBO()
    if not isinstance(loss, ELBO):
        raise ConfigError(
            f"loss must be a Pyro ELBO such as pyro.infer.Trace_ELBO(), got {type(loss).__name__}"
        )
    num_data = getattr(vae, "num_data", None)
    train_set = as_dataset(train, "train")
    if num_data != len(train_set):
        raise ConfigError(
            f"the VAE was built with num_data={num_data} but train has {len(train_set)} "
            f"datapoints; build it with num_data={len(train_set)} so the plate scales correctly"
        )
    if batch_size > len(train_set):
        raise ConfigError(
            f"batch_size={batch_size} is larger than the {len(train_set)} training datapoints; "
            f"use batch_size <= {len(train_set)}"
        )
    device = _resolve_device(vae, device)
    vae.to(device)
    _check_dataset(vae, train_set, "train", device)
    valid_set = None
    if validation is not None:
        valid_set = as_dataset(validation, "validation")
        _check_dataset(vae, valid_set, "validation", device)

    if seed is not None:
        pyro.set_rng_seed(seed)
    generator = torch.Generator()
    generator.manual_seed(torch.randint(0, 2**62, ()).item() if seed is None else seed)
    batches = loader(train_set, batch_size, shuffle=True, generator=generator)

    params = [p for p in vae.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the VAE has no trainable parameters")
    optimizer = torch.optim.Adam(params, lr=lr)
    # Losses with a differentiable_loss (Trace_ELBO, TraceMeanField_ELBO, JitTrace_ELBO) give a
    # tensor to backpropagate; the rest (RenyiELBO) backpropagate inside loss_and_grads.
    differentiable = hasattr(loss, "differentiable_loss")

    history = History()
    vae.train()
    steps_per_epoch = len(batches)
    for epoch in range(num_epochs):
        start = time.perf_counter()
        total, count = 0.0, 0
        bar = tqdm(
            batches,
            desc=f"epoch {epoch + 1}/{num_epochs}",
            disable=not progress,
            leave=False,
            unit="batch",
        )
        with pyro.validation_enabled(False):
            for step, (x, idx) in enumerate(bar):
                progress_epochs = epoch + step / steps_per_epoch
                warm = min(1.0, progress_epochs / kl_warmup_epochs) if kl_warmup_epochs else 1.0
                vae.kl_weight = beta * warm
                x = x.to(device, non_blocking=True)
                idx = idx.to(device, non_blocking=True)
                if differentiable:
                    value = loss.differentiable_loss(vae.model, vae.guide, x, idx)
                    value.backward()
                    value = value.item()
                else:
                    value = loss.loss_and_grads(vae.model, vae.guide, x, idx)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                history.num_steps += 1
                # The loss estimates -ELBO of the whole training set: per datapoint, / num_data.
                total += -value / num_data * len(idx)
                count += len(idx)
                if progress and history.num_steps % 10 == 0:
                    bar.set_postfix(elbo=f"{total / count:.2f}")
        bar.close()
        vae.kl_weight = 1.0
        history.epoch_seconds.append(time.perf_counter() - start)
        history.train_elbo.append(total / count)
        if valid_set is not None:
            history.validation_elbo.append(elbo_estimate(vae, valid_set, 1).mean)
            vae.train()
        else:
            history.validation_elbo.append(None)
        if not math.isfinite(history.train_elbo[-1]):
            from .errors import TrainingError

            raise TrainingError(
                f"the training ELBO became {history.train_elbo[-1]} in epoch {epoch + 1}; "
                "lower the learning rate"
            )
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, history)
    return history
