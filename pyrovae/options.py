r"""How an estimate is computed: one options object shared by every estimator.

Every estimator of pyrovae (:func:`~pyrovae.log_likelihood`, :func:`~pyrovae.elbo`,
:func:`~pyrovae.iwae_bounds`, :func:`~pyrovae.ais`, :func:`~pyrovae.bdmc`,
:func:`~pyrovae.local.optimal_elbo`, :func:`~pyrovae.gaps`) takes ``options=``, an
:class:`EstimateOptions`: the memory budget, the seed, the progress bar, how a per-datapoint
family is scored, the processes that share the work and compilation. None of these changes
*what* is estimated; each estimator's own parameters (``num_samples``, ``num_intermediate``,
``start``, ...) say that.

.. code-block:: python

    opts = pyrovae.EstimateOptions(seed=0, max_rows=1024)
    ll = pyrovae.log_likelihood(vae, test, 5000, options=opts)
    a = pyrovae.ais(vae, test[:100], num_intermediate=1000, options=opts)

The fields also work as keywords, as they did before this object existed
(``log_likelihood(vae, test, 5000, seed=0)``), but not beside ``options=``: a field given both
ways is refused in one line (:class:`~pyrovae.errors.ConfigError`); change a field of an
options object with :meth:`EstimateOptions.replace`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ._checks import check_positive_int, check_seed
from .errors import ConfigError

__all__ = ["EstimateOptions", "DEFAULT_MAX_BYTES"]

#: Default memory budget of one decoder call (bytes of the distributions' tensors, times the
#: workspace factor of :mod:`pyrovae.evaluation` for the temporaries that ``log_prob`` and
#: autograd create).
DEFAULT_MAX_BYTES = 256 * 2**20


def check_local(local: Any) -> str | None:
    """``local`` if it is ``None``, ``"fit"`` or ``"lookup"``, else :class:`ConfigError`."""
    if local not in (None, "fit", "lookup"):
        raise ConfigError(f"local must be None, 'fit' or 'lookup', got {local!r}")
    return local


def check_process_group(group: Any) -> Any:
    """``group`` if it is ``False``, ``None``, ``True`` or a ``torch.distributed`` process group,
    else :class:`ConfigError`."""
    if group is None or isinstance(group, bool):
        return group
    import torch.distributed as tdist

    if tdist.is_available() and isinstance(group, tdist.ProcessGroup):
        return group
    raise ConfigError(
        f"process_group must be False, True or a torch.distributed ProcessGroup, got {group!r}"
    )


@dataclass(frozen=True)
class EstimateOptions:
    r"""How an estimate is computed (not what is estimated); validated when it is made.

    Frozen: change a field with :meth:`replace`. The defaults are every estimator's defaults,
    except that :func:`~pyrovae.gaps` seeds with ``0`` when given neither ``options`` nor
    ``seed`` (an ``options`` object passed to it is taken as it is).

    :ivar max_bytes: memory budget of one decoder call, in bytes of the distributions' tensors
        (measured per row on a probe: a ``Categorical256`` likelihood's ``784 x 256`` logits
        per row); the rows per call follow from it. Default 256 MiB.
    :ivar max_rows: a cap on rows (draws x datapoints; for :func:`~pyrovae.ais` and
        :func:`~pyrovae.bdmc` chains x datapoints) per decoder call; ``None`` (default): 2048,
        a CPU decoder's sweet spot.
    :ivar seed: ``None`` (default): draw from the global RNG. An integer >= 0: the draws are
        reproducible and the global RNG is left as it was; each batch of datapoints is seeded by
        ``(seed, batch)``, so a datapoint's draws do not depend on the batches before it nor on
        how many processes share the work.
    :ivar progress: show a progress bar (default ``False``).
    :ivar local: for a family that keeps parameters per datapoint (``LocalNormal``, ``Local``):
        ``"fit"`` fits each scored datapoint's own parameters with the decoder fixed and uses
        them as the proposal; ``"lookup"`` uses the stored parameters of the data's indices
        (only for the very data the family was fitted on); ``None`` (default) refuses such a
        family. (:func:`~pyrovae.ais` takes ``"lookup"`` with ``start="encoder"``; with
        ``start="prior"`` it needs none.)
    :ivar process_group: ``False`` (default): this process scores every datapoint. ``True``
        (the default group, e.g. under ``torchrun``) or a ``ProcessGroup``: the batches of
        datapoints are split across the ranks and the per-datapoint values gathered, so every
        rank returns the whole result, identical to one process's for the same ``seed``; every
        rank must call with the same arguments (see :mod:`pyrovae.distributed`). Taken by
        :func:`~pyrovae.log_likelihood`, :func:`~pyrovae.elbo`, :func:`~pyrovae.iwae_bounds`
        and :func:`~pyrovae.ais`; the others run in one process and refuse it.
    :ivar compile: evaluate the importance weights of a :class:`~pyrovae.VAE` running its own
        program through ``torch.compile``: the same draws for the same seed and the same values
        to float rounding, ~15-25 % less time per datapoint on a CPU at K = 5000, after a
        one-off compilation of ~10-25 s (and one more for a new chunk shape). Needs a C++
        compiler on a CPU. Taken by :func:`~pyrovae.log_likelihood`, :func:`~pyrovae.elbo` and
        :func:`~pyrovae.iwae_bounds`; a ``(model, guide)`` pair (Pyro's tracing, which
        ``torch.compile`` does not take), ``local="fit"`` and the other estimators refuse it.
    """

    max_bytes: int = DEFAULT_MAX_BYTES
    max_rows: int | None = None
    seed: int | None = None
    progress: bool = False
    local: str | None = None
    process_group: Any = False
    compile: bool = False

    def __post_init__(self) -> None:
        check_positive_int(self.max_bytes, "max_bytes")
        if self.max_rows is not None:
            check_positive_int(self.max_rows, "max_rows")
        check_seed(self.seed)
        if not isinstance(self.progress, bool):
            raise ConfigError(f"progress must be True or False, got {self.progress!r}")
        check_local(self.local)
        check_process_group(self.process_group)
        if not isinstance(self.compile, bool):
            raise ConfigError(f"compile must be True or False, got {self.compile!r}")

    def replace(self, **changes: Any) -> EstimateOptions:
        """A copy with ``changes`` (field names as keywords), validated."""
        return dataclasses.replace(self, **changes)

    def seeded(self, offset: int) -> EstimateOptions:
        """A copy whose seed is ``seed + offset`` (``None`` stays ``None``): the independent
        draws of a second estimate inside one estimator (e.g. :func:`~pyrovae.gaps`)."""
        return self if self.seed is None else self.replace(seed=self.seed + offset)

    def refuse(self, estimator: str, *names: str) -> None:
        """Refuse, in one line, a field that ``estimator`` does not take set to other than off
        (``process_group``: ``False``/``None``; ``compile``: ``False``)."""
        for name in names:
            value = getattr(self, name)
            if name == "process_group" and value not in (None, False):
                raise ConfigError(
                    f"{estimator} runs in one process and takes no process_group (got "
                    f"{value!r}); leave EstimateOptions.process_group at False"
                )
            if name == "compile" and value:
                raise ConfigError(
                    f"{estimator} does not take compile=True: it compiles importance sampling's "
                    f"weights (log_likelihood, elbo, iwae_bounds), and {estimator} runs through "
                    "Pyro's tracing; estimate without compile=True (--compile)"
                )


#: Every field of :class:`EstimateOptions`, the keywords the estimators took before it.
FIELDS = tuple(f.name for f in dataclasses.fields(EstimateOptions))


def resolve_options(
    options: Any,
    keywords: dict[str, Any],
    estimator: str,
    *,
    takes: tuple[str, ...] = FIELDS,
    default: EstimateOptions | None = None,
) -> EstimateOptions:
    """The :class:`EstimateOptions` of one call to ``estimator``.

    ``options`` as given, or ``default`` (``EstimateOptions()`` if ``None``) with the fields
    passed as keywords (``keywords``, the ones ``estimator`` took before ``options`` existed:
    ``takes``). A keyword beside ``options`` is refused in one line; one that the estimator
    never took is a ``TypeError``, as Python says it.
    """
    for name in keywords:
        if name not in takes:
            raise TypeError(f"{estimator}() got an unexpected keyword argument {name!r}")
    if options is None:
        base = EstimateOptions() if default is None else default
        return base.replace(**keywords) if keywords else base
    if not isinstance(options, EstimateOptions):
        raise ConfigError(
            f"options must be a pyrovae.EstimateOptions, got {type(options).__name__}"
        )
    if keywords:
        name = next(iter(keywords))
        raise ConfigError(
            f"{estimator} got {name}={keywords[name]!r} beside options=: {name} is a field of "
            f"the options; say it once (options.replace({name}=...), or drop options=)"
        )
    return options
