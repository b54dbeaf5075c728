r"""The evaluation core shared by every estimator (private helpers, one public result type).

Every estimator of pyrovae (:func:`~pyrovae.log_likelihood`, :func:`~pyrovae.elbo`,
:func:`~pyrovae.iwae_bounds`, :func:`~pyrovae.ais`, :func:`~pyrovae.bdmc`, :func:`~pyrovae.gaps`,
:func:`~pyrovae.diagnose`) scores a *program*, a Pyro model with its guide, on batches of data:

- :class:`Program` turns what the user passed (a :class:`~pyrovae.VAE`, or a plain
  ``(model, guide)`` pair written as in Pyro's VAE tutorial) into one object that finds the latent
  and observed sites and the data plate from traces, and computes per-datapoint log-densities
  with each site's own unscaled ``log_prob`` (a plate's subsample scale never leaks in);
- :func:`chunks` splits ``(datapoints x draws)`` into pieces of **bounded bytes**: the bytes one
  decoded row takes are measured on a probe (the tensors held by every site's distribution, e.g.
  a ``Categorical256`` likelihood's ``784 x 256`` logits), not guessed from the likelihood's name;
- :class:`evaluating` seeds the draws (the global RNG is forked and left as it was), puts the
  modules in eval mode and turns distribution validation off, and restores all three;
- :class:`Estimate` is the one result type: per-datapoint ``values``, their ``mean`` and its
  standard error ``stderr``, ``to_dict()``; every result extends it.

A program's contract (what :class:`Program` checks, refusing anything else in one line):

- the model and the guide are called as ``model(x)`` / ``guide(x)`` (a pair) or
  ``model(x, idx)`` / ``guide(x, idx)`` (a VAE) on a batch ``x`` of shape ``(batch, ...)``;
- every observed site and every latent site lies inside one plate over the batch (the *data
  plate*: named ``"data"``, or else the plate of size ``batch`` enclosing the observed sites);
  a latent site outside it (a global latent) has no per-datapoint weight and is refused;
- every latent site of the model has a site of the same name in the guide.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeAlias

if TYPE_CHECKING:  # for annotations only (no import cycle at run time)
    from .vae import VAE

import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from torch.utils.data import Dataset

from ._batching import IndexedTensor, as_dataset
from ._checks import check_seed, to_device
from ._compile import compile_direct
from .errors import ConfigError, DataError
from .options import DEFAULT_MAX_BYTES

__all__ = [
    "Estimate", "Program", "evaluating", "chunks", "batch_seed", "gather_parts",
    "resolve_group",
    "mean_stderr", "DEFAULT_MAX_BYTES",
]

#: Default cap on rows (draws x datapoints) per decoder call: 1,000-4,000 rows keep a CPU
#: decoder cache-resident (docs/references.md); also the chunking the estimators used before the byte
#: budget existed, so fixed-seed values are unchanged where the budget does not bind.
DEFAULT_MAX_ROWS = 2048

#: Temporaries per byte of the distributions' tensors: ``log_prob`` of a categorical makes a
#: normalized copy of its logits, a Gaussian a standardized residual, and so on.
_WORKSPACE_FACTOR = 4

_PARTICLES = "_pyrovae_particles"


# ---------------------------------------------------------------------- results

#: A Pyro model and guide, called as ``model(x)`` / ``guide(x)`` (or ``(x, idx)``).
ModelGuide: TypeAlias = "tuple[Callable[..., Any], Callable[..., Any]]"
#: What the estimators score: a :class:`~pyrovae.VAE` or any Pyro ``(model, guide)`` pair.
Scorable: TypeAlias = "VAE | ModelGuide"

def mean_stderr(values: torch.Tensor) -> tuple[float, float]:
    r"""Mean and standard error :math:`\mathrm{sd}(v)/\sqrt n` over the last dimension's entries.

    ``stderr`` is ``nan`` for a single datapoint (no spread to measure).
    """
    values = values.detach().double().flatten()
    n = values.numel()
    if n == 0:
        return float("nan"), float("nan")
    stderr = float(values.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
    return float(values.mean()), stderr


def _jsonable(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.tolist() if v.dim() else v.item()
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


@dataclass(frozen=True)
class Estimate:
    r"""A per-datapoint estimate and its summary; the base of every pyrovae result.

    :ivar values: per-datapoint values (nats), shape ``(num_datapoints,)`` (results that hold
        several estimates per datapoint document their own shape).
    :ivar mean: the mean over datapoints of the headline estimate.
    :ivar stderr: its standard error over datapoints, :math:`\mathrm{sd}/\sqrt n` (``nan`` for
        one datapoint).
    """

    values: torch.Tensor
    mean: float
    stderr: float

    @property
    def num_datapoints(self) -> int:
        return int(self.values.shape[-1])

    @property
    def num_nonfinite(self) -> int:
        """Datapoints whose headline value is not finite (``-inf``: zero density; ``nan``)."""
        v = self.values if self.values.dim() == 1 else self.values[-1]
        return int((~torch.isfinite(v)).sum())

    def why_not_finite(self) -> str | None:
        """``None`` when the mean is finite, else one line saying why it is not."""
        if math.isfinite(self.mean):
            return None
        v = self.values if self.values.dim() == 1 else self.values[-1]
        neg = int((v == -math.inf).sum())
        nan = int(torch.isnan(v).sum())
        parts = []
        if neg:
            parts.append(f"{neg} datapoint(s) got -inf (every draw gave them zero density)")
        if nan:
            parts.append(f"{nan} datapoint(s) got nan (a density evaluated to nan)")
        return "; ".join(parts) or "the values are not finite"

    def to_dict(self, per_datapoint: bool = False) -> dict[str, Any]:
        """A JSON-ready summary: ``mean``, ``stderr``, ``num_datapoints``, the result's scalar
        fields, and ``per_datapoint`` lists if asked. Non-finite numbers become ``None`` (nan)
        or ``"inf"``/``"-inf"``, with ``"not_finite"`` saying why."""
        out: dict[str, Any] = {
            "mean": self.mean,
            "stderr": self.stderr,
            "num_datapoints": self.num_datapoints,
        }
        why = self.why_not_finite()
        if why is not None:
            out["not_finite"] = why
        for f in fields(self):
            if f.name in ("values", "mean", "stderr"):
                continue
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                if per_datapoint:
                    out.setdefault("per_datapoint", {})[f.name] = v.tolist()
                continue
            if isinstance(v, Estimate):
                out[f.name] = v.to_dict(per_datapoint)
                continue
            out[f.name] = v
        if per_datapoint:
            out.setdefault("per_datapoint", {})["values"] = self.values.tolist()
        return _jsonable(out)

    def __str__(self) -> str:
        why = self.why_not_finite()
        if why is not None:
            return f"not finite: {why} (n={self.num_datapoints})"
        return f"{self.mean:.2f} ± {self.stderr:.2f} nats (n={self.num_datapoints})"


# ---------------------------------------------------------------------- seeding and eval mode
class evaluating:
    """Fork and seed the torch RNG (if ``seed`` is given), put ``modules`` in eval mode and turn
    Pyro's distribution validation off; restore all three on exit."""

    def __init__(self, modules: Any = (), seed: int | None = None) -> None:
        if isinstance(modules, torch.nn.Module):
            modules = (modules,)
        self.modules = [m for m in modules if isinstance(m, torch.nn.Module)]
        self.seed = check_seed(seed)
        self._fork: Any = None

    def __enter__(self) -> evaluating:
        if self.seed is not None:
            devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
            self._fork = torch.random.fork_rng(devices=devices)
            self._fork.__enter__()
            torch.manual_seed(self.seed)
        self._training = [m.training for m in self.modules]
        for m in self.modules:
            m.eval()
        self._validation = pyro.validation_enabled(False)
        self._validation.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._validation.__exit__(*exc)
        for m, t in zip(self.modules, self._training):
            m.train(t)
        if self._fork is not None:
            self._fork.__exit__(*exc)


def no_draws() -> Any:
    """A context in which draws do not advance the RNG (the CPU's and the current GPU's are
    forked): a probe or a check that must not shift the estimators' seeded draws."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    return torch.random.fork_rng(devices=devices)


class frozen:
    """Set ``requires_grad=False`` on the modules' parameters (e.g. a decoder held fixed while
    latents or local parameters are optimized); restore on exit."""

    def __init__(self, modules: Any) -> None:
        self.params = []
        seen: set[int] = set()
        for m in modules:
            for p in m.parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    self.params.append(p)

    def __enter__(self) -> frozen:
        for p in self.params:
            p.requires_grad_(False)
        return self

    def __exit__(self, *exc: Any) -> None:
        for p in self.params:
            p.requires_grad_(True)


# ---------------------------------------------------------------------- the program
def _tensor_bytes(obj: Any, seen: set[int], depth: int = 0) -> int:
    """Bytes of the tensors a distribution holds (recursing into base distributions)."""
    if depth > 6:
        return 0
    if isinstance(obj, torch.Tensor):
        if id(obj) in seen:
            return 0
        seen.add(id(obj))
        return obj.numel() * obj.element_size()
    if isinstance(obj, torch.distributions.Distribution):
        return sum(_tensor_bytes(v, seen, depth + 1) for v in vars(obj).values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v, seen, depth + 1) for v in obj)
    return 0


def _scored(site: dict) -> bool:
    """A sample site that carries a density (not a plate's subsample site, not auxiliary)."""
    return (
        site["type"] == "sample"
        and not site_is_subsample(site)
        and not site["infer"].get("is_auxiliary")
    )


def _is_factor(site: dict) -> bool:
    """A ``pyro.factor`` statement (an observed auxiliary sample site): a term of Pyro's ELBO."""
    return (
        site["type"] == "sample"
        and bool(site["is_observed"])
        and bool(site["infer"].get("is_auxiliary"))
        and not site_is_subsample(site)
    )


def _vectorized_frames(site: dict) -> list[Any]:
    return [f for f in site["cond_indep_stack"] if f.vectorized and f.name != _PARTICLES]


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _zeros(x: torch.Tensor, num_samples: int, batch: int) -> torch.Tensor:
    if x.is_floating_point():
        return x.new_zeros(num_samples, batch)
    return torch.zeros(num_samples, batch, device=x.device)


class Program:
    r"""A Pyro model and guide, ready to be scored per datapoint (private to the estimators).

    Built by :meth:`resolve` from a :class:`~pyrovae.VAE` (``model(x, idx)``) or a ``(model,
    guide)`` pair (``model(x)``). :meth:`analyze` traces both once on a probe batch (with the RNG
    forked, so it draws nothing from the caller's stream) and records the latent and observed
    sites, the data plate, the plate nesting and the bytes one row takes.
    """

    def __init__(
        self,
        model: Any,
        guide: Any,
        *,
        vae: VAE | None = None,
        modules: Any = (),
        takes_idx: bool = False,
    ) -> None:
        self.model = model
        self.guide = guide
        self.vae = vae
        self.modules = [m for m in modules if isinstance(m, torch.nn.Module)]
        self.takes_idx = takes_idx
        self.analyzed = False
        self.latent: list[str] = []
        self.observed: list[str] = []
        self.particle_dim = -2
        self.row_bytes = 0
        self.factors: list[str] = []
        self.guide_factors: list[str] = []
        self.compile_requested = False
        self._fast: Callable[..., Any] | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def resolve(cls, target: Any, what: str = "the model") -> Program:
        """A :class:`Program` from a VAE or a ``(model, guide)`` pair; :class:`ConfigError`
        naming the accepted forms otherwise."""
        if isinstance(target, Program):
            return target
        if isinstance(target, (tuple, list)):
            if len(target) == 2 and all(callable(f) for f in target):
                model, guide = target
                modules = []
                for f in (model, guide):
                    owner = f if isinstance(f, torch.nn.Module) else getattr(f, "__self__", None)
                    if isinstance(owner, torch.nn.Module) and all(owner is not m for m in modules):
                        modules.append(owner)
                return cls(model, guide, modules=modules, takes_idx=False)
            raise ConfigError(
                f"{what} must be a pyrovae.VAE or a (model, guide) pair of Pyro programs called "
                f"as model(x) and guide(x); got a {type(target).__name__} of length {len(target)}"
            )
        if isinstance(target, torch.nn.Module) and all(
            callable(getattr(target, a, None)) for a in ("model", "guide", "check_data")
        ):
            return cls(target.model, target.guide, vae=target, modules=[target], takes_idx=True)
        raise ConfigError(
            f"{what} must be a pyrovae.VAE (a torch.nn.Module with model, guide and check_data) "
            f"or a (model, guide) pair of Pyro programs called as model(x) and guide(x), got "
            f"{type(target).__name__}"
        )

    @property
    def family(self) -> Any:
        return getattr(self.vae, "family", None)

    @property
    def amortized(self) -> bool:
        """``False`` for a VAE whose family keeps parameters per datapoint (``amortized =
        False``): it holds no parameters for data it was not built on."""
        family = self.family
        return family is None or bool(getattr(family, "amortized", True))

    @property
    def dtype(self) -> torch.dtype:
        """The floating dtype of the program's parameters (the default dtype if it has none)."""
        for m in self.modules:
            for t in m.parameters():
                if t.is_floating_point():
                    return t.dtype
        return torch.get_default_dtype()

    def device(self, data: torch.Tensor | None = None) -> torch.device:
        for m in self.modules:
            for t in m.parameters():
                return t.device
            for t in m.buffers():
                return t.device
        return data.device if data is not None else torch.device("cpu")

    def args(self, x: torch.Tensor, idx: torch.Tensor) -> tuple:
        return (x, idx) if self.takes_idx else (x,)

    def dataset(self, data: Any) -> Dataset:
        """``data`` as a dataset of ``(x, idx)``; a pair also takes tensors of any shape
        ``(num_datapoints, ...)`` (e.g. images), a VAE flat ``(num_datapoints, num_features)``."""
        if not self.takes_idx and isinstance(data, torch.Tensor) and data.dim() >= 1:
            dataset: Dataset = IndexedTensor(data)
        else:
            dataset = as_dataset(data, "data")
        if len(dataset) == 0:  # type: ignore[arg-type]
            raise DataError("data is empty; pass at least one datapoint")
        return dataset

    def check_data(self, x: torch.Tensor) -> None:
        if self.vae is not None:
            self.vae.check_data(x)

    # ------------------------------------------------------------------ traces
    def _traces(
        self, x: torch.Tensor, idx: torch.Tensor, num_samples: int | None, condition: Any = None,
        guide_condition: Any = None, run_guide: bool = True,
    ) -> tuple[Any, Any]:
        """Trace the guide (under a particle plate of ``num_samples``, if given) and the model
        replayed against it (or conditioned on ``condition``)."""
        args = self.args(x, idx)

        def wrap(fn: Any) -> Any:
            if num_samples is None:
                return fn
            return pyro.plate(_PARTICLES, num_samples, dim=self.particle_dim)(fn)

        with poutine.block():
            guide_trace = None
            if run_guide:
                guide = self.guide if guide_condition is None else poutine.condition(
                    self.guide, data=guide_condition
                )
                guide_trace = poutine.trace(wrap(guide)).get_trace(*args)
            model = self.model
            if condition is not None:
                model = poutine.condition(model, data=condition)
            elif guide_trace is not None:
                model = poutine.replay(model, trace=guide_trace)
            model_trace = poutine.trace(wrap(model)).get_trace(*args)
        return guide_trace, model_trace

    def analyze(self, x: torch.Tensor, idx: torch.Tensor, need_guide: bool = True) -> Program:
        """Find the sites, the data plate and the bytes per row from one probe trace of the
        model and the guide on the batch ``x`` (RNG forked: no draws are consumed)."""
        if self.analyzed:
            return self
        batch = int(x.shape[0])
        with no_draws(), torch.no_grad():
            try:
                guide_trace, model_trace = self._traces(x, idx, None, run_guide=need_guide)
            except (ConfigError, DataError):
                raise
            except Exception as exc:  # noqa: BLE001 - any failure of user code, in one line
                raise ConfigError(
                    f"running the model and guide on a batch of shape {tuple(x.shape)} failed "
                    f"({type(exc).__name__}: {_first_line(exc)}); they must take the data "
                    f"batch as {'model(x, idx)' if self.takes_idx else 'model(x)'}"
                ) from None
        sites = [(n, s) for n, s in model_trace.nodes.items() if _scored(s)]
        self.observed = [n for n, s in sites if s["is_observed"]]
        self.latent = [n for n, s in sites if not s["is_observed"]]
        # pyro.factor statements: part of log p(x, z) (model) or of log q (guide), as in
        # Pyro's ELBO.
        self.factors = [n for n, s in model_trace.nodes.items() if _is_factor(s)]
        self.guide_factors = [] if guide_trace is None else [
            n for n, s in guide_trace.nodes.items() if _is_factor(s)
        ]
        if guide_trace is not None:
            extra = [n for n, s in guide_trace.nodes.items()
                     if _scored(s) and not s["is_observed"] and n not in self.latent]
            if extra:
                raise ConfigError(
                    f"the guide samples {extra[0]!r}, which the model does not: an importance "
                    "weight p(x, z) / q(z | x) needs the guide's latent sites to be the model's; "
                    "remove it from the guide or add it to the model"
                )
        if not self.observed:
            raise ConfigError("the model has no observed site (pyro.sample(..., obs=x)); nothing to score")
        if not self.latent:
            raise ConfigError("the model has no latent site; log p(x) needs a latent variable")
        # The data plate: "data" if every observed site is inside it, else the plate of size
        # `batch` that encloses every observed site.
        common = None
        for n in self.observed:
            frames = {f.name: f for f in _vectorized_frames(model_trace.nodes[n])}
            common = frames if common is None else {k: v for k, v in common.items() if k in frames}
        candidates = [f for f in (common or {}).values() if f.size == batch]
        named = [f for f in candidates if f.name == "data"]
        if named or candidates:
            frame = (named or sorted(candidates, key=lambda f: f.dim))[0]
        else:
            raise ConfigError(
                f"the observed site {self.observed[0]!r} is not inside a plate over the "
                f"{batch} datapoints of the batch; put the model's sites in "
                "pyro.plate('data', len(x)) so that each datapoint gets its own score"
            )
        self.data_plate = frame.name
        self.data_dim = int(frame.dim)
        for n in self.latent:
            names = {f.name for f in _vectorized_frames(model_trace.nodes[n])}
            if frame.name not in names:
                raise ConfigError(
                    f"the latent site {n!r} lies outside the data plate {frame.name!r} (a global "
                    "latent): per-datapoint log p(x) needs every latent inside the data plate"
                )
            if guide_trace is not None and n not in guide_trace.nodes:
                raise ConfigError(
                    f"the latent site {n!r} of the model has no counterpart in the guide; "
                    "the guide must sample every latent site of the model"
                )
        nesting = 0
        for tr in (model_trace, guide_trace):
            if tr is None:
                continue
            for s in tr.nodes.values():
                if _scored(s):
                    for f in _vectorized_frames(s):
                        nesting = max(nesting, -int(f.dim))
        self.particle_dim = -(nesting + 1)
        seen: set[int] = set()
        total = 0
        for tr in (model_trace, guide_trace):
            if tr is None:
                continue
            for s in tr.nodes.values():
                if _scored(s):
                    total += _tensor_bytes(s["fn"], seen) + _tensor_bytes(s["value"], seen)
        self.row_bytes = max(1, math.ceil(total / batch))
        self.latent_shapes = {
            n: tuple(model_trace.nodes[n]["value"].shape[1:]) for n in self.latent
        }
        self.latent_supports = {n: model_trace.nodes[n]["fn"].support for n in self.latent}
        self.analyzed = True
        self._prove_fast_path(x, idx, need_guide)
        return self

    def _prove_fast_path(self, x: torch.Tensor, idx: torch.Tensor, need_guide: bool) -> None:
        """Use :func:`pyrovae.fastpath.log_weights` where :func:`pyrovae.fastpath.verify_weights`
        proves it equal to the traced weights on this VAE's public program; compile it if asked,
        and refuse ``compile=True`` in one line where it does not apply."""
        from . import fastpath

        vae = self.vae
        verdict = None
        if vae is not None and need_guide and self.model == vae.model and self.guide == vae.guide:
            verdict = fastpath.verify_weights(
                vae, x, idx, lambda x_, i_, k: self.log_weights(x_, i_, k, traced=True)
            )
        if verdict is None or not verdict.fast:
            self._fast = None
            if self.compile_requested:
                why = f" ({verdict.reason})" if verdict is not None and verdict.reason else ""
                raise ConfigError(
                    "compile=True compiles a pyrovae.VAE's own importance weights; this program "
                    f"runs through Pyro's tracing{why} (a (model, guide) pair, or a VAE whose "
                    "program has other sites), which torch.compile does not take: estimate "
                    "without compile=True (--compile)"
                )
            return
        direct = functools.partial(fastpath.log_weights, vae)
        if self.compile_requested:
            direct = compile_direct(
                direct, "the importance weights", "estimate without compile=True (--compile)"
            )
        self._fast = direct

    def _per_datapoint(self, lp: torch.Tensor, num_samples: int, batch: int) -> torch.Tensor:
        """Sum a site's log-density over every dim but the particle and data dims: ``(K, B)``."""
        if lp.dim() >= -self.particle_dim and tuple(lp.shape) == (num_samples, batch):
            return lp
        pd, dd = lp.dim() + self.particle_dim, lp.dim() + self.data_dim
        if pd < 0:  # the site ignores the particle plate (cannot happen for sampled sites)
            lp = lp.reshape((1,) * (-pd) + tuple(lp.shape))
            pd, dd = 0, dd - pd
        keep = {pd, dd}
        other = [d for d in range(lp.dim()) if d not in keep]
        if other:
            lp = lp.sum(other)
        return lp.expand(num_samples, batch)

    def site_log_prob(self, site: dict, num_samples: int, batch: int) -> torch.Tensor:
        r"""A site's log-density per draw and datapoint, ``(K, B)``, as Pyro's ELBO counts it:
        times the site's scale and mask, with the data plate's subsample scale :math:`N/B`
        divided out (it must never leak into a per-datapoint weight)."""
        lp = site["fn"].log_prob(site["value"])
        scale = site["scale"]
        for f in site["cond_indep_stack"]:
            if f.name == self.data_plate and f.full_size:
                scale = scale / (f.full_size / f.size)
        if site["mask"] is not None:
            lp = torch.where(site["mask"], lp, lp.new_zeros(()))
        if not (isinstance(scale, (int, float)) and scale == 1.0):
            lp = lp * scale
        return self._per_datapoint(lp, num_samples, batch)

    # ------------------------------------------------------------------ weights
    @property
    def fast(self) -> bool:
        """Whether :meth:`log_weights` runs :func:`pyrovae.fastpath.log_weights` (proven equal
        to the traced weights on this program when it was analyzed)."""
        return self._fast is not None

    def compile(self, compile: Any = True) -> Program:
        """Evaluate :meth:`log_weights` through ``torch.compile`` where the fast path is proven
        (same draws as eager torch, same values to float rounding); a program that runs Pyro's
        tracing is refused with :class:`ConfigError` when it is analyzed. ``compile=False`` is a
        no-op, so estimators pass their argument straight through."""
        if not isinstance(compile, bool):
            raise ConfigError(f"compile must be True or False, got {compile!r}")
        if compile:
            self.compile_requested = True
            self.analyzed = False  # prove (and compile) at the next analysis
        return self

    def log_weights(
        self, x: torch.Tensor, idx: torch.Tensor, num_samples: int, traced: bool = False
    ) -> torch.Tensor:
        r"""Log importance weights :math:`w_k`, shape ``(num_samples, batch)``: the guide traced
        under a particle plate, the model replayed against it, and every site's log-density
        (sample and ``pyro.factor`` sites, with their own scales and masks, the data plate's
        subsample scale divided out) summed per datapoint: the model's minus the guide's. Where
        :mod:`pyrovae.fastpath` proved its direct weights equal on this program, those run
        instead (unless ``traced``)."""
        if not traced and self._fast is not None:
            return self._fast(x, idx, num_samples)
        guide_trace, model_trace = self._traces(x, idx, num_samples)
        batch = int(x.shape[0])
        w = _zeros(x, num_samples, batch)
        for name, site in model_trace.nodes.items():
            if _scored(site) or _is_factor(site):
                w = w + self.site_log_prob(site, num_samples, batch)
                if _scored(site) and not site["is_observed"]:
                    g = guide_trace.nodes.get(name)
                    if g is None:
                        raise ConfigError(
                            f"latent site {name!r} of the model has no counterpart in the guide"
                        )
                    w = w - self.site_log_prob(g, num_samples, batch)
        for name in self.guide_factors:
            w = w - self.site_log_prob(guide_trace.nodes[name], num_samples, batch)
        return w

    def log_densities(
        self, x: torch.Tensor, idx: torch.Tensor, z: dict[str, torch.Tensor], num_samples: int,
        with_guide: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        r"""At given latent values ``z`` (each ``(num_samples, batch, ...)``):
        :math:`\log p(z)` (the latent sites), :math:`\log p(x \mid z)` (the observed sites)
        and, if ``with_guide``, :math:`\log q(z \mid x)`; each ``(num_samples, batch)``."""
        batch = int(x.shape[0])
        guide_trace, model_trace = self._traces(
            x, idx, num_samples, condition=z, guide_condition=z if with_guide else None,
            run_guide=with_guide,
        )
        prior = _zeros(x, num_samples, batch)
        lik = _zeros(x, num_samples, batch)
        for name, site in model_trace.nodes.items():
            if _scored(site) or _is_factor(site):
                lp = self.site_log_prob(site, num_samples, batch)
                if name in self.latent:
                    prior = prior + lp
                else:  # observed sites and factors: annealed with the likelihood
                    lik = lik + lp
        q = None
        if with_guide:
            q = _zeros(x, num_samples, batch)
            for name in self.latent + self.guide_factors:
                q = q + self.site_log_prob(guide_trace.nodes[name], num_samples, batch)
        return prior, lik, q

    def sample_latents(
        self, x: torch.Tensor, idx: torch.Tensor, num_samples: int, source: str
    ) -> dict[str, torch.Tensor]:
        """Draw the latent sites from the guide (``"encoder"``) or the prior (``"prior"``),
        each of shape ``(num_samples, batch, ...)``."""
        if source == "encoder":
            guide_trace, _ = self._traces(x, idx, num_samples)
            return {n: guide_trace.nodes[n]["value"].detach() for n in self.latent}
        _, model_trace = self._traces(x, idx, num_samples, run_guide=False)
        return {n: model_trace.nodes[n]["value"].detach() for n in self.latent}

    def simulate(self, template: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Draw ``(x, z)`` from the model, z ~ p(z), x ~ p(x | z), with as many datapoints as
        ``template`` has rows (its values are not used)."""
        idx = torch.arange(template.shape[0], device=template.device)
        if self.factors:
            raise ConfigError(
                f"simulating data needs the model's joint to be its ancestral sampler, but the "
                f"model has pyro.factor site(s) {self.factors} that reweight it: BDMC cannot "
                "simulate from it; check log p(x) with pyrovae.ais on held-out data instead"
            )
        with poutine.block():
            tr = poutine.trace(poutine.uncondition(self.model)).get_trace(*self.args(template, idx))
        if len(self.observed) != 1:
            raise ConfigError("simulating data needs a model with exactly one observed site")
        x = tr.nodes[self.observed[0]]["value"].detach()
        return x, {n: tr.nodes[n]["value"].detach() for n in self.latent}


# ---------------------------------------------------------------------- batches of bounded bytes
def rows_per_chunk(program: Program, max_bytes: int, max_rows: int | None, factor: int = 1) -> int:
    """Rows (draws x datapoints) per decoder call: the byte budget over the measured bytes of
    one row (times the workspace factor), capped by ``max_rows``."""
    by_bytes = max(1, max_bytes // (program.row_bytes * _WORKSPACE_FACTOR * factor))
    cap = DEFAULT_MAX_ROWS if max_rows is None else max_rows
    return max(1, min(cap, by_bytes))


def batch_seed(seed: int, batch: int) -> int:
    """The seed of batch ``batch``'s draws under the estimators' ``seed``: ``seed`` itself for
    the first batch, and a distinct 64-bit seed per later batch (golden-ratio increments)."""
    return (seed + batch * 0x9E3779B97F4A7C15) % 2**64


def resolve_group(process_group: Any, program: Program | None = None, local: str | None = None) -> Any:
    """The process group an estimator splits its datapoints over, or ``None`` (one process).

    ``False`` / ``None``: none; ``True``: the default group (initialized from the ``torchrun``
    environment if needed); a ``ProcessGroup``: that group. A non-amortized family with
    ``local="fit"`` is not split: every rank fits and scores every datapoint.
    """
    if process_group is None or process_group is False:
        return None
    from . import distributed

    group = distributed.process_group(
        True if process_group is True else process_group,
        None if program is None else program.device(),
    )
    if group is None or distributed.world_size(group) == 1:
        return None
    if program is not None and not program.amortized and local == "fit":
        return None
    return group


def gather_parts(parts: list[torch.Tensor], group: Any, dim: int = 0, empty: tuple = (0,),
                 dtype: torch.dtype | None = None) -> torch.Tensor:
    """This rank's per-batch parts concatenated along ``dim`` (on the CPU), then gathered over
    ``group`` (if any); a rank with no batches contributes an ``empty``-shaped tensor of
    ``dtype`` (the program's: every rank must send the same dtype)."""
    local = torch.cat([p.cpu() for p in parts], dim) if parts else torch.empty(empty, dtype=dtype)
    if group is None:
        return local
    from . import distributed

    return distributed.all_gather_cat(local, group, dim)


def chunks(
    program: Program,
    data: Any,
    num_samples: int,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_rows: int | None = None,
    progress: bool = False,
    desc: str = "",
    need_guide: bool = True,
    factor: int = 1,
    seed: int | None = None,
    group: Any = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, int, int]]:
    """Yield ``(x, idx, particles_per_chunk, rows)`` covering ``data`` in order, each batch on
    the program's device, at most ``rows`` rows of ``num_samples`` draws per decoder call.

    The first datapoints are checked (``vae.check_data``) and probed (:meth:`Program.analyze`)
    before any draw; with ``K`` draws per datapoint a batch holds ``max(1, rows // K)``
    datapoints and the draws go ``min(K, rows)`` at a time (``rows`` from the byte budget).

    With ``seed``, batch ``b``'s draws are seeded by :func:`batch_seed` ``(seed, b)``: a
    datapoint's draws depend on the seed and on its batch, not on what ran before. With a
    process ``group`` of ``W`` ranks, the batches are split into ``W`` contiguous runs
    (:func:`pyrovae.distributed.shard`) and each rank yields its own; concatenating the ranks'
    values in rank order (:func:`gather_parts`) gives exactly the single-process values.
    """
    dataset = program.dataset(data)
    n = len(dataset)  # type: ignore[arg-type]
    x0, idx0 = dataset[torch.arange(0, min(n, 8))]
    device = program.device(torch.as_tensor(x0))
    x0 = to_device(torch.as_tensor(x0), device)
    idx0 = torch.as_tensor(idx0).to(device)
    program.check_data(x0)
    program.analyze(x0, idx0, need_guide=need_guide)
    rows = rows_per_chunk(program, max_bytes, max_rows, factor)
    points = max(1, rows // num_samples)
    batches = torch.arange(math.ceil(n / points))
    main = True
    if group is not None:
        from . import distributed

        batches = distributed.shard(batches, distributed.rank(group), distributed.world_size(group))
        main = distributed.is_main(group)
    total = sum(min(points, n - int(b) * points) for b in batches)
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=desc, unit="pt", disable=not (progress and main), leave=False) as bar:
        for b in batches.tolist():
            start = b * points
            x, idx = dataset[torch.arange(start, min(start + points, n))]
            x = to_device(torch.as_tensor(x), device)
            idx = torch.as_tensor(idx).to(device)
            if seed is not None:
                torch.manual_seed(batch_seed(seed, b))
            yield x, idx, min(num_samples, rows), rows
            bar.update(int(x.shape[0]))


def refuse_local(program: Program, what: str) -> None:
    """Refuse a non-amortized family on data it holds no parameters for (one line)."""
    if not program.amortized:
        raise ConfigError(
            f"{what}: the family {type(program.family).__name__} keeps parameters per training "
            "datapoint (amortized = False) and has none for these datapoints; pass local='fit' "
            "to fit each datapoint's own parameters with the decoder fixed, or local='lookup' "
            "if the data are exactly the datapoints (and indices) the family was fitted on"
        )

