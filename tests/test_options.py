"""One options object for how an estimate is computed (:class:`pyrovae.EstimateOptions`).

- each estimator gives the same numbers with ``options=EstimateOptions(seed=3, max_rows=120)``
  as with the old keywords (tiny model, fixed seeds);
- a field given both as a keyword and through ``options`` is refused in one line;
- bad option values are refused at construction with the estimators' messages;
- ``elbo`` returns an :class:`~pyrovae.ELBOEstimate`.

Each test was checked to fail with the mapping, the conflict check, a validation or the result
type broken on purpose.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import pytest
import torch

import pyrovae
from pyrovae import ConfigError, EstimateOptions
from pyrovae.build import VAEConfig, build_vae
from pyrovae.local import optimal_elbo

N, D = 20, 6
OPTS = EstimateOptions(seed=3, max_rows=120)
AIS = dict(num_intermediate=6, num_chains=3, leapfrog_steps=2)


@pytest.fixture(scope="module")
def setup() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    vae = build_vae(VAEConfig(num_features=D, latent_dim=2, hidden_dims=(8,)), num_data=N)
    x = torch.bernoulli(torch.full((N, D), 0.4), generator=torch.Generator().manual_seed(0))
    return vae, x


def _values(result):
    if isinstance(result, tuple):  # optimal_elbo: (elbo, num_steps)
        return torch.cat([r.double() for r in result])
    if isinstance(result, pyrovae.GapResult):
        return torch.cat([result.log_px, result.elbo_optimal, result.elbo_amortized])
    if isinstance(result, pyrovae.BDMCResult):
        return torch.cat([result.values, result.importance.values.flatten()])
    return result.values


#: estimator name -> (call with keywords, the fields it took as keywords before options)
CASES = {
    "log_likelihood": (lambda vae, x, **kw: pyrovae.log_likelihood(vae, x, 30, **kw),
                       ("seed", "max_rows")),
    "elbo": (lambda vae, x, **kw: pyrovae.elbo(vae, x, 7, **kw), ("seed", "max_rows")),
    "iwae_bounds": (lambda vae, x, **kw: pyrovae.iwae_bounds(vae, x, (1, 5, 30), **kw),
                    ("seed", "max_rows")),
    # ais and bdmc took no max_rows keyword: a budget in bytes splits the data instead, and
    # options' max_rows=120 (chains 3 x 40 datapoints) does not bind on 20 datapoints
    "ais": (lambda vae, x, **kw: pyrovae.ais(vae, x, **AIS, **kw), ("seed", "max_bytes")),
    "bdmc": (lambda vae, x, **kw: pyrovae.bdmc(vae, 6, is_samples=(5,), **AIS, **kw),
             ("seed", "max_bytes")),
    "optimal_elbo": (lambda vae, x, **kw: optimal_elbo(vae, x, num_elbo_samples=20, num_steps=4,
                                                       check_every=2, **kw),
                     ("seed", "max_rows")),
    "gaps": (lambda vae, x, **kw: pyrovae.gaps(vae, x, num_samples=30, num_elbo_samples=20,
                                               num_steps=4, check_every=2, ais_options=AIS, **kw),
             ("seed", "max_rows")),
}


@pytest.mark.parametrize("name", list(CASES))
def test_options_give_the_same_numbers_as_the_keywords(setup, name) -> None:
    vae, x = setup
    call, fields = CASES[name]
    options = OPTS if "max_rows" in fields else EstimateOptions(seed=3, max_bytes=4000)
    keywords = {f: getattr(options, f) for f in fields}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        by_keywords = _values(call(vae, x, **keywords))
        by_options = _values(call(vae, x, options=options))
        other = _values(call(vae, x, options=options.replace(seed=4)))
        unbounded = _values(call(vae, x, options=options.replace(max_rows=None)))
    assert torch.equal(by_options, by_keywords)
    assert not torch.equal(other, by_keywords)  # the seed does reach the draws
    if "max_rows" in fields and name != "optimal_elbo":  # max_rows reaches the chunking
        assert not torch.equal(unbounded, by_keywords)


def test_ais_takes_max_rows_from_the_options(setup) -> None:
    """ais and bdmc took no max_rows keyword; through options it caps chains x datapoints."""
    vae, x = setup
    capped = pyrovae.ais(vae, x, **AIS, options=EstimateOptions(seed=3, max_rows=3))
    default = pyrovae.ais(vae, x, **AIS, options=EstimateOptions(seed=3, max_rows=None))
    assert torch.equal(default.values, pyrovae.ais(vae, x, **AIS, seed=3).values)
    assert not torch.equal(capped.values, default.values)  # one datapoint per batch


def test_gaps_keeps_its_seed_0_default(setup) -> None:
    vae, x = setup
    call, _ = CASES["gaps"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        default = _values(call(vae, x, log_px="is"))
        zero = _values(call(vae, x, log_px="is", options=EstimateOptions(seed=0)))
    assert torch.equal(default, zero)


@pytest.mark.parametrize("name", list(CASES))
def test_a_keyword_beside_options_is_refused_in_one_line(setup, name) -> None:
    vae, x = setup
    call, _ = CASES[name]
    with pytest.raises(ConfigError) as info:
        call(vae, x, seed=3, options=EstimateOptions(seed=3))
    message = str(info.value)
    assert "\n" not in message and "seed=3 beside options=" in message and name in message


def test_options_must_be_an_options_object(setup) -> None:
    vae, x = setup
    with pytest.raises(ConfigError, match="options must be a pyrovae.EstimateOptions, got dict"):
        pyrovae.log_likelihood(vae, x, 5, options={"seed": 3})
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_rows'"):
        pyrovae.ais(vae, x, **AIS, max_rows=5)  # ais never took max_rows as a keyword


@pytest.mark.parametrize("field, value, message", [
    ("max_bytes", 0, "max_bytes must be a positive integer, got 0"),
    ("max_bytes", 1.5, "max_bytes must be a positive integer, got 1.5"),
    ("max_rows", -1, "max_rows must be a positive integer, got -1"),
    ("max_rows", True, "max_rows must be a positive integer, got True"),
    ("seed", -1, "seed must be a non-negative integer or None, got -1"),
    ("seed", "0", "seed must be a non-negative integer or None, got '0'"),
    ("local", "yes", "local must be None, 'fit' or 'lookup', got 'yes'"),
    ("compile", "yes", "compile must be True or False, got 'yes'"),
    ("progress", None, "progress must be True or False, got None"),
    ("process_group", "world", "process_group must be False, True or a torch.distributed"),
])
def test_bad_values_are_refused_at_construction(setup, field, value, message) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        EstimateOptions(**{field: value})
    with pytest.raises(ConfigError, match="must be"):
        EstimateOptions().replace(**{field: value})
    if field != "process_group":  # the same message through the old keywords
        vae, x = setup
        with pytest.raises(ConfigError, match=message):
            pyrovae.log_likelihood(vae, x, 5, **{field: value})


def test_options_are_frozen_and_default_to_the_estimators_defaults() -> None:
    o = EstimateOptions()
    assert (o.max_bytes, o.max_rows, o.seed, o.progress, o.local, o.process_group, o.compile) == (
        256 * 2**20, None, None, False, None, False, False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.seed = 1  # type: ignore[misc]
    assert o.seeded(2) is o and EstimateOptions(seed=1).seeded(2).seed == 3


def test_fields_an_estimator_does_not_take_are_refused(setup) -> None:
    vae, x = setup
    with pytest.raises(ConfigError, match="ais does not take compile=True"):
        pyrovae.ais(vae, x, **AIS, options=EstimateOptions(compile=True))
    for call in (lambda o: pyrovae.bdmc(vae, 4, **AIS, options=o),
                 lambda o: optimal_elbo(vae, x, num_steps=2, options=o),
                 lambda o: pyrovae.gaps(vae, x, num_steps=2, options=o)):
        with pytest.raises(ConfigError, match="runs in one process and takes no process_group"):
            call(EstimateOptions(process_group=True))
        with pytest.raises(ConfigError, match="does not take compile=True"):
            call(EstimateOptions(compile=True))


def test_elbo_returns_an_elbo_estimate(setup) -> None:
    vae, x = setup
    e = pyrovae.elbo(vae, x, 7, options=OPTS)
    assert isinstance(e, pyrovae.ELBOEstimate) and isinstance(e, pyrovae.Estimate)
    assert not isinstance(e, pyrovae.LogLikelihood)
    assert e.num_samples == 7 and e.num_nonfinite_weights == 0 and e.values.shape == (N,)
    assert math.isfinite(e.mean) and math.isfinite(e.stderr)
    assert str(e) == f"{e.mean:.2f} ± {e.stderr:.2f} nats (K=7, n={N})"
    d = e.to_dict()
    assert d["num_samples"] == 7 and d["mean"] == e.mean and "khat" not in d
