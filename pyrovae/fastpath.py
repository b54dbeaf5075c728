r"""One semantics: Pyro's evaluation of the user's program, and a faster one where it is proven equal.

Every number pyrovae reports (the training loss, :func:`~pyrovae.elbo`,
:func:`~pyrovae.log_likelihood`, :func:`~pyrovae.iwae_bounds`, :func:`~pyrovae.ais`,
:func:`~pyrovae.gaps`, :func:`~pyrovae.bdmc`) is *defined* by Pyro's evaluation of the VAE's public
``model`` and ``guide``: whatever Pyro statements a subclass or a part contains (``pyro.factor``,
extra sample sites, ``poutine`` handlers, parameters registered with ``pyro.module``) count.

Tracing costs time, though: on a small model it is about a quarter of a training step. For the
program that :class:`~pyrovae.VAE` itself writes,

.. math::

    \text{guide: } z_n \sim q(z \mid x_n), \qquad
    \text{model: } z_n \sim p(z),\; x_n \sim p(x \mid z_n), \qquad n \in \text{plate "data"},

this module computes the same numbers straight from the parts (:func:`elbo_loss`,
:func:`log_weights`), and uses them only where it has *proven, at run time on the program at
hand*, that they equal Pyro's:

1. **Sites.** The public ``model`` and ``guide`` are traced once on the real minibatch (with the
   random number generators forked, so the check draws nothing from the run's stream, and the
   modules' buffers restored afterwards). The guide must hold exactly one sample site ``"z"``, the
   model exactly ``"z"`` and the observed ``"x"`` (the data itself), each in the ``"data"`` plate
   alone, scaled by the plate's :math:`N/B` (and the KL weight for ``"z"``), unmasked; every
   ``param`` site must be a parameter of the VAE. No other sample, factor or param site.
2. **Numbers.** Pyro's loss (``Trace_ELBO().differentiable_loss(vae.model, vae.guide, x, idx)``,
   or the traced importance weights) and the direct one are evaluated from the same RNG state, and
   must agree to float tolerance: the value (and, for the loss, the gradient of every parameter;
   at two KL weights when the KL weight varies, which pins down a loss affine in it).

A part may also declare closed forms of its log-density (``closed_forms = ("log_prob",)`` on a
prior or a likelihood, ``("rsample_and_log_prob",)`` on a family): the direct loss then skips
building distribution objects. A declared closed form is proven like the rest; when it does not
match, the direct loss without closed forms is tried, then Pyro's.

The proof is kept per program and made again when what it depends on changes: the VAE's class,
its parts (their identity and class), a method set on an instance, the data's dtype and device,
and train/eval mode. Where the proof fails, Pyro's tracing runs, and a
:class:`~pyrovae.errors.FastPathWarning` says why, once.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from torch import nn

from ._compile import compile_direct
from .errors import ConfigError, FastPathWarning

__all__ = [
    "Verdict",
    "elbo_loss",
    "log_weights",
    "site_problem",
    "TrainingLoss",
    "verify_weights",
    "check_parameters",
]

#: The particle plate the estimators put around the guide and the model.
PARTICLES = "_pyrovae_particles"

#: Closed-form levels of the direct loss, tried in this order.
_LEVELS = ("closed_forms", "distributions")


@dataclass(frozen=True)
class Verdict:
    """Whether the direct evaluation stands in for Pyro's on a program.

    :ivar level: ``"closed_forms"`` (the parts' declared closed forms), ``"distributions"``
        (the parts' distributions, untraced), or ``None`` (Pyro's tracing).
    :ivar reason: why not (``None`` when it applies).
    """

    level: str | None
    reason: str | None = None

    @property
    def fast(self) -> bool:
        return self.level is not None


# ----------------------------------------------------------------------------- the direct formulas
def _closed_form(part: nn.Module, name: str, level: str) -> Callable[..., Any] | None:
    """The part's declared closed form ``name`` (bound), or ``None``."""
    if level != "closed_forms" or name not in getattr(part, "closed_forms", ()):
        return None
    return getattr(part, name, None)


def elbo_loss(
    vae: Any, x: torch.Tensor, idx: torch.Tensor, kl_weight: float = 1.0, *,
    level: str = "closed_forms",
) -> torch.Tensor | None:
    r"""The loss Pyro's one-particle ``Trace_ELBO`` gives for the :class:`~pyrovae.VAE`'s own
    program on the minibatch ``(x, idx)``, computed from the parts without tracing.

    With :math:`s = N/B` (the data plate's subsample scale), :math:`w` the KL weight and one draw
    :math:`z_i \sim q(z \mid x_i)` per row (the guide's single ``rsample``: the same draw for the
    same RNG state),

    .. math::

        \hat{\mathcal L} = -s \sum_i \Big(\log p(x_i \mid z_i)
            + w \big(\log p(z_i) - \log q(z_i \mid x_i)\big)\Big).

    Use it only where :class:`TrainingLoss` has proven it equal to Pyro's on the program.

    :param x: ``(batch, num_features)``; :param idx: ``(batch,)``.
    :param level: ``"closed_forms"`` to use the parts' declared closed forms, ``"distributions"``
        for their distributions only.
    :returns: the loss (a scalar), or ``None`` where the family has no ``rsample`` (Pyro would
        add a score-function term).
    """
    batch = torch.Size((x.shape[0],))
    draw = _closed_form(vae.family, "rsample_and_log_prob", level)
    if draw is not None:
        z, log_q = draw(x, idx)
    else:
        q = vae.family(x, idx).expand(batch)
        if not q.has_rsample:
            return None
        z = q.rsample()
        log_q = None
    prior_log_prob = _closed_form(vae.prior, "log_prob", level)
    log_pz = prior_log_prob(z) if prior_log_prob is not None else vae.prior().expand(batch).log_prob(z)
    lik_log_prob = _closed_form(vae.likelihood, "log_prob", level)
    log_px = lik_log_prob(x, z) if lik_log_prob is not None else (
        vae.likelihood(z).expand(batch).log_prob(x)
    )
    if log_q is None:
        log_q = q.log_prob(z)
    kl = log_pz - log_q
    per_row = log_px + (kl if kl_weight == 1.0 else kl_weight * kl)
    return per_row.sum() * (-vae.num_data / x.shape[0])


def log_weights(vae: Any, x: torch.Tensor, idx: torch.Tensor, num_samples: int) -> torch.Tensor:
    r"""Log importance weights :math:`w_k = \log p(x, z_k) - \log q(z_k \mid x)`, :math:`z_k \sim
    q(z \mid x)`, shape ``(num_samples, batch)``, of the :class:`~pyrovae.VAE`'s own program,
    from the parts' distributions (each broadcast to ``(num_samples, batch)`` as the particle
    and data plates broadcast it; the same draws for the same RNG state as the traced guide).

    Use it only where :func:`verify_weights` has proven it equal to the traced weights.
    """
    batch = torch.Size((num_samples, x.shape[0]))
    q = vae.family(x, idx).expand(batch)
    z = q.rsample() if q.has_rsample else q.sample()
    pz = vae.prior().expand(batch)
    px = vae.likelihood(z).expand(batch)
    w = torch.zeros(batch, dtype=x.dtype, device=x.device)
    return w + pz.log_prob(z) - q.log_prob(z) + px.log_prob(x)


# ------------------------------------------------------------------------------ the site check
def _own_parameter(value: Any, own: set[int]) -> bool:
    if id(value) in own:
        return True
    unconstrained = getattr(value, "unconstrained", None)  # pyro.param / PyroParam values
    if callable(unconstrained):
        u = unconstrained()
        return u is not None and id(u) in own
    return False


def site_problem(
    vae: Any, model_trace: Any, guide_trace: Any, x: torch.Tensor, kl_weight: float = 1.0,
) -> str | None:
    """Why the traced program is not the one the direct formulas compute (one line), or
    ``None`` where its sites are exactly theirs (see the module docstring)."""
    batch, num_data = int(x.shape[0]), int(vae.num_data)
    own = {id(p) for p in vae.parameters()}
    scale = num_data / batch
    for role, trace, expected in (
        ("guide", guide_trace, {"z": (False, kl_weight * scale)}),
        ("model", model_trace, {"z": (False, kl_weight * scale), "x": (True, scale)}),
    ):
        seen = set()
        for name, site in trace.nodes.items():
            if site["type"] == "param":
                if not _own_parameter(site["value"], own):
                    return (f"the {role} has a param site {name!r} that is not a parameter of the "
                            "VAE's modules")
                continue
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            if name not in expected:
                kind = "factor" if site["infer"].get("is_auxiliary") else "sample"
                return f"the {role} has a {kind} site {name!r} besides {sorted(expected)}"
            observed, want_scale = expected[name]
            if bool(site["is_observed"]) != observed:
                return f"the {role}'s site {name!r} is {'' if site['is_observed'] else 'not '}observed"
            frames = [f for f in site["cond_indep_stack"] if f.name != PARTICLES]
            if len(frames) != 1 or frames[0].name != "data" or frames[0].size != batch or (
                frames[0].full_size or frames[0].size
            ) != num_data or frames[0].dim != -1:
                return (f"the {role}'s site {name!r} is not in the 'data' plate (size {num_data}, "
                        f"subsample {batch}) alone")
            if not math.isclose(float(site["scale"]), want_scale, rel_tol=1e-12):
                return (f"the {role}'s site {name!r} is scaled by {float(site['scale']):g}, not "
                        f"{want_scale:g}")
            if site["mask"] is not None:
                return f"the {role}'s site {name!r} is masked"
            if name == "x" and site["value"] is not x:
                return "the model's observed site 'x' does not observe the data batch itself"
            seen.add(name)
        missing = sorted(set(expected) - seen)
        if missing:
            return f"the {role} has no sample site {missing[0]!r}"
    return None


# ------------------------------------------------------------------------------ proofs, cached
def _instance_methods(obj: Any) -> tuple[str, ...]:
    return tuple(sorted(
        k for k, v in vars(obj).items()
        if callable(v) and not isinstance(v, (nn.Module, torch.Tensor, type))
    ))


def program_key(vae: Any, x: torch.Tensor) -> tuple:
    """What a proof depends on: the VAE's and its parts' identities and classes, methods set on
    instances, the data's dtype and device, and train/eval mode."""
    parts = (vae, vae.prior, vae.family, vae.likelihood)
    return (
        tuple(id(p) for p in parts), tuple(type(p) for p in parts),
        tuple(_instance_methods(p) for p in parts), x.dtype, x.device, bool(vae.training),
    )


#: Proofs per VAE (weakly held), per purpose and :func:`program_key`.
_PROOFS: weakref.WeakKeyDictionary[Any, dict[tuple, Verdict]] = weakref.WeakKeyDictionary()


def _cached(vae: Any, key: tuple) -> Verdict | None:
    return _PROOFS.get(vae, {}).get(key)


def _remember(vae: Any, key: tuple, verdict: Verdict, what: str) -> Verdict:
    _PROOFS.setdefault(vae, {})[key] = verdict
    if verdict.reason is not None:
        via = "Pyro's tracing" if verdict.level is None else f"its {verdict.level}"
        warnings.warn(
            f"pyrovae computes {what} of this {type(vae).__name__} through {via} (the same "
            f"numbers, more slowly): {verdict.reason}",
            FastPathWarning, stacklevel=4,
        )
    return verdict


class _Isolated:
    """Run a check without touching the run: the RNGs forked (no draws consumed), the modules'
    buffers (e.g. batch-norm statistics) restored, Pyro's validation off."""

    def __init__(self, vae: nn.Module, x: torch.Tensor) -> None:
        self.vae = vae
        self.devices = [x.device] if x.device.type == "cuda" else []

    def __enter__(self) -> _Isolated:
        self._fork = torch.random.fork_rng(devices=self.devices)
        self._fork.__enter__()
        with torch.no_grad():
            self._buffers = [b.detach().clone() for b in self.vae.buffers()]
        return self

    def __exit__(self, *exc: Any) -> None:
        with torch.no_grad():
            for b, saved in zip(self.vae.buffers(), self._buffers):
                b.copy_(saved)
        self._fork.__exit__(*exc)


def _tolerance(dtype: torch.dtype) -> float:
    return 256 * torch.finfo(dtype).eps


def _traces(model: Any, guide: Any, args: tuple, kwargs: dict, particles: int | None = None) -> tuple:
    def wrap(fn: Any) -> Any:
        return fn if particles is None else pyro.plate(PARTICLES, particles, dim=-2)(fn)

    with poutine.block():
        guide_trace = poutine.trace(wrap(guide)).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(wrap(model), trace=guide_trace)).get_trace(
            *args, **kwargs
        )
    return model_trace, guide_trace


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"


# ------------------------------------------------------------------------------ training
class TrainingLoss:
    r"""The training loss of ``loss`` on the VAE's public ``model`` and ``guide``:
    ``loss.differentiable_loss(vae.model, vae.guide, x, idx[, kl_weight=w])``, by Pyro, or by
    :func:`elbo_loss` where that is proven equal on this program (only for Pyro's own
    ``Trace_ELBO`` with one particle).

    :param vae: the model.
    :param loss: a Pyro ELBO with ``differentiable_loss``.
    :param weighted: pass ``kl_weight`` to the programs (a KL weight other than 1 at some step);
        otherwise they are called as ``model(x, idx)``, so a rewritten ``model`` need not take it.
    :param fast: allow the direct evaluation (``False``: always Pyro's).
    :param compile: compile the direct evaluation with ``torch.compile``; refused (in
        :meth:`prepare`) where it is not proven.
    """

    def __init__(self, vae: Any, loss: Any, *, weighted: bool, fast: bool = True,
                 compile: bool = False) -> None:
        from pyro.infer import Trace_ELBO

        self.vae, self.loss, self.weighted, self.compile = vae, loss, weighted, compile
        self.eligible = bool(fast) and type(loss) is Trace_ELBO and loss.num_particles == 1 and all(
            hasattr(vae, a) for a in ("prior", "family", "likelihood", "num_data")
        )
        self._compiled: Callable[..., Any] | None = None

    def _kwargs(self, kl_weight: float) -> dict[str, float]:
        return {"kl_weight": kl_weight} if self.weighted else {}

    def pyro_loss(self, x: torch.Tensor, idx: torch.Tensor, kl_weight: float = 1.0) -> torch.Tensor:
        """Pyro's loss of the public programs (the definition)."""
        return self.loss.differentiable_loss(self.vae.model, self.vae.guide, x, idx,
                                             **self._kwargs(kl_weight))

    def verdict(self, x: torch.Tensor, idx: torch.Tensor, kl_weight: float = 1.0) -> Verdict:
        """The (cached) proof for this program; made now if none holds."""
        if not self.eligible:
            return Verdict(None)
        key = ("training", self.weighted) + program_key(self.vae, x)
        found = _cached(self.vae, key)
        if found is None:
            found = _remember(self.vae, key, self._prove(x, idx, kl_weight), "the training loss")
        return found

    def prepare(self, x: torch.Tensor, idx: torch.Tensor, kl_weight: float = 1.0) -> Verdict:
        """Prove (or not) the direct loss on a first minibatch, before training; with
        ``compile=True``, compile it, or refuse in one line where it is not proven."""
        verdict = self.verdict(x, idx, kl_weight)
        if self.compile and not verdict.fast:
            raise ConfigError(
                "compile=True compiles pyrovae's direct loss (Pyro's Trace_ELBO() with one "
                "particle on a VAE's own model and guide), which does not apply here"
                + (f" ({verdict.reason})" if verdict.reason else f" ({type(self.loss).__name__})")
                + "; Pyro's tracing, which torch.compile does not take, runs instead: train "
                "without compile=True (--compile)"
            )
        return verdict

    def __call__(self, x: torch.Tensor, idx: torch.Tensor, kl_weight: float = 1.0) -> torch.Tensor:
        """The loss of the minibatch ``(x, idx)``; the first call proves the direct loss (and,
        with ``compile=True``, refuses a program it does not apply to, before any update)."""
        verdict = self.prepare(x, idx, kl_weight) if self.compile else self.verdict(x, idx, kl_weight)
        if not verdict.fast:
            return self.pyro_loss(x, idx, kl_weight)
        if self.compile:
            if self._compiled is None:
                self._compiled = compile_direct(
                    elbo_loss, "the loss", "train without compile=True (--compile)"
                )
            return self._compiled(self.vae, x, idx, kl_weight, level=verdict.level)
        return elbo_loss(self.vae, x, idx, kl_weight, level=verdict.level)

    # -- the proof
    def _prove(self, x: torch.Tensor, idx: torch.Tensor, kl_weight: float) -> Verdict:
        vae = self.vae
        weights = [kl_weight]
        if self.weighted:  # two weights: the loss is affine in it
            weights.append(0.5 * kl_weight if kl_weight != 0.5 else 1.0)
        params = [p for p in vae.parameters() if p.requires_grad]
        try:
            with _Isolated(vae, x), pyro.validation_enabled(False):
                for w in weights:
                    with torch.no_grad():
                        model_trace, guide_trace = _traces(
                            vae.model, vae.guide, (x, idx), self._kwargs(w)
                        )
                    problem = site_problem(vae, model_trace, guide_trace, x, w if self.weighted else 1.0)
                    if problem is not None:
                        return Verdict(None, problem)
                results = {}
                for level in _LEVELS:
                    results[level] = all(self._equal(x, idx, w, level, params) for w in weights)
                    if results[level]:
                        break
        except Exception as exc:  # noqa: BLE001 - the direct path cannot run: Pyro's will say
            return Verdict(None, f"the direct loss failed on it ({_first_line(exc)})")
        if results.get("closed_forms"):
            return Verdict("closed_forms")
        declared = [type(p).__name__ for p in (vae.prior, vae.family, vae.likelihood)
                    if getattr(p, "closed_forms", ())]
        if results.get("distributions"):
            return Verdict("distributions", None if not declared else (
                f"the closed forms declared by {', '.join(declared)} do not equal Pyro's loss"
            ))
        return Verdict(None, "the direct loss does not equal Pyro's Trace_ELBO on it")

    def _equal(self, x: torch.Tensor, idx: torch.Tensor, w: float, level: str,
               params: list[torch.Tensor]) -> bool:
        torch.manual_seed(20261206)
        reference = self.pyro_loss(x, idx, w)
        torch.manual_seed(20261206)
        direct = elbo_loss(self.vae, x, idx, w if self.weighted else 1.0, level=level)
        if direct is None:
            return False
        tol = _tolerance(reference.dtype)
        if not torch.isfinite(reference) or not math.isclose(
            float(direct.detach()), float(reference.detach()), rel_tol=tol, abs_tol=tol
        ):
            return False
        if not params:
            return True
        g_ref = torch.autograd.grad(reference, params, allow_unused=True)
        g_dir = torch.autograd.grad(direct, params, allow_unused=True)
        diff = sum(float((_g(a, p) - _g(b, p)).double().square().sum())
                   for a, b, p in zip(g_ref, g_dir, params))
        norm = sum(float(_g(a, p).double().square().sum()) for a, p in zip(g_ref, params))
        return math.sqrt(diff) <= 16 * tol * math.sqrt(norm) + tol


def _g(grad: torch.Tensor | None, param: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(param) if grad is None else grad


# ------------------------------------------------------------------------------ importance weights
def verify_weights(
    vae: Any, x: torch.Tensor, idx: torch.Tensor, traced: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor],
) -> Verdict:
    """Whether :func:`log_weights` equals ``traced`` (the traced importance weights of the
    public programs) on this VAE: the sites checked, then both evaluated from the same RNG
    state with 3 draws per datapoint (cached per :func:`program_key`)."""
    key = ("weights",) + program_key(vae, x)
    found = _cached(vae, key)
    if found is not None:
        return found
    return _remember(vae, key, _prove_weights(vae, x, idx, traced), "the importance weights")


def _prove_weights(vae: Any, x: torch.Tensor, idx: torch.Tensor, traced: Callable[..., Any]) -> Verdict:
    if not all(hasattr(vae, a) for a in ("prior", "family", "likelihood", "num_data")):
        return Verdict(None)
    try:
        with _Isolated(vae, x), torch.no_grad(), pyro.validation_enabled(False):
            model_trace, guide_trace = _traces(vae.model, vae.guide, (x, idx), {}, particles=3)
            problem = site_problem(vae, model_trace, guide_trace, x)
            if problem is not None:
                return Verdict(None, problem)
            torch.manual_seed(20261206)
            reference = traced(x, idx, 3)
            torch.manual_seed(20261206)
            direct = log_weights(vae, x, idx, 3)
    except Exception as exc:  # noqa: BLE001
        return Verdict(None, f"the direct weights failed on it ({_first_line(exc)})")
    tol = _tolerance(reference.dtype)
    same = direct.shape == reference.shape and bool(torch.isclose(
        direct, reference, rtol=tol, atol=tol, equal_nan=True
    ).all())
    if not same:
        return Verdict(None, "the direct importance weights do not equal the traced ones on it")
    return Verdict("distributions")


# ------------------------------------------------------------------------------ parameters
def check_parameters(vae: Any, x: torch.Tensor, idx: torch.Tensor, kwargs: dict[str, Any]) -> None:
    """Refuse, in one line and before any update, a program that registers a parameter
    (``pyro.param``, or ``pyro.module`` of a network) that is not a parameter of the VAE's modules:
    :func:`pyrovae.fit` optimizes and checkpoints the VAE's parameters, so such a parameter would
    silently stay at its initial value. Checked once per program (see :func:`program_key`), on
    the public ``model`` and ``guide`` traced with the RNGs forked and the buffers restored."""
    if not isinstance(vae, nn.Module) or not all(hasattr(vae, a) for a in ("model", "guide")):
        return
    key = ("parameters",) + program_key(vae, x) if _is_vae(vae) else None
    if key is not None and _cached(vae, key) is not None:
        return
    own = {id(p) for p in vae.parameters()}
    foreign = []
    with _Isolated(vae, x), torch.no_grad(), pyro.validation_enabled(False), poutine.block():
        for fn in (vae.guide, vae.model):
            trace = poutine.trace(fn).get_trace(x, idx, **kwargs)
            foreign += [n for n, site in trace.nodes.items()
                        if site["type"] == "param" and not _own_parameter(site["value"], own)]
    if foreign:
        raise ConfigError(
            f"the program registers the parameter {foreign[0]!r}, which is not a parameter of the "
            f"{type(vae).__name__}'s modules: fit trains and checkpoints the VAE's parameters only, "
            "so it would never change; make it an nn.Parameter of one of the parts (or a PyroParam "
            "of a PyroModule part)"
        )
    if key is not None:
        _PROOFS.setdefault(vae, {})[key] = Verdict(None)


def _is_vae(vae: Any) -> bool:
    return all(hasattr(vae, a) for a in ("prior", "family", "likelihood"))
