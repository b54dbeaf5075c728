"""Bad input, generated: every public entry point either succeeds on valid input or raises one of
pyrovae's own errors (a :class:`~pyrovae.errors.PyrovaeError`) with a one-line message, never a raw
torch, NumPy, pickle or Python error.

Each property draws arguments that are valid or broken in one or more ways (shapes, dtypes, NaN,
inf, out-of-support values, empty data, wrong devices, impossible sizes, unknown names, wrong
types, random or truncated file bytes), computes from the draw whether the call must succeed, and
checks exactly that: a valid call returns a sound result, an invalid one raises a PyrovaeError.
Hypothesis runs derandomized (fixed seeds) with few examples, so the file takes seconds.
"""

from __future__ import annotations

import gzip
import io
import math
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyro.infer import Trace_ELBO

import pyrovae
from pyrovae import PyrovaeError, elbo, fit, importance, load_checkpoint, load_model, log_likelihood
from pyrovae.build import FAMILIES, LIKELIHOODS, PRIORS, VAEConfig, build_vae
from pyrovae.checkpoint import read_checkpoint, save_checkpoint
from pyrovae.data import DATASETS, load_dataset, read_amat, read_frey, read_idx
from pyrovae.gaps import gaps
from pyrovae.importance import iwae_bounds

D, N = 6, 8  # features and datapoints of the tiny model every property uses

SETTINGS = dict(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                           HealthCheck.data_too_large],
)

#: How many generated calls each property made, and how many of them were valid (filled in as the
#: tests run and printed at the end, with ``pytest -s``; the README's reliability table reports them).
TRIED: dict[str, int] = {}
VALID: dict[str, int] = {}


@pytest.fixture(autouse=True, scope="module")
def _report(one_thread):
    yield
    print("\ngenerated calls (valid / all):")
    for name in sorted(TRIED):
        print(f"  {name:28s} {VALID.get(name, 0):4d} / {TRIED[name]:4d}")
    print(f"  {'total':28s} {sum(VALID.values()):4d} / {sum(TRIED.values()):4d}")


def _vae(num_data: int = N) -> pyrovae.VAE:
    torch.manual_seed(0)
    return build_vae(VAEConfig(num_features=D, latent_dim=2, hidden_dims=(4,)), num_data=num_data)


def _expect(valid: bool, call: Any, name: str) -> Any:
    """Run ``call``; it must succeed when ``valid`` and raise a one-line PyrovaeError otherwise."""
    TRIED[name] = TRIED.get(name, 0) + 1
    if valid:
        VALID[name] = VALID.get(name, 0) + 1
        return call()
    with pytest.raises(PyrovaeError) as e:
        call()
    message = str(e.value)
    assert message and "\n" not in message, message
    return None


# -------------------------------------------------------------------------------- generated data
#: The ways to break the data a Bernoulli VAE over D features gets.
DATA_DEFECTS = (
    "numpy", "list", "number", "string", "none", "0-d", "1-d", "3-d",
    "no rows", "no columns", "too few columns", "too many columns", "float64", "float16", "int64",
    "uint8", "bool", "complex64", "nan", "inf", "negative", "grey", "large", "meta device",
)


@st.composite
def data_arrays(draw: Any) -> tuple[Any, bool]:
    """An argument for ``data``: binary float32 data of shape ``(rows, D)`` (rows random), broken
    in zero, one or two of the ways in :data:`DATA_DEFECTS`. Returns ``(data, valid)``."""
    defects = set(draw(st.lists(st.sampled_from(DATA_DEFECTS), min_size=1, max_size=2))) - {"ok"}
    if draw(st.sampled_from([True, False, False])):
        defects = set()  # a third of the draws are valid
    rows = 0 if "no rows" in defects else draw(st.sampled_from([1, 3, N]))
    cols = {"no columns": 0, "too few columns": D - 1, "too many columns": D + 1}
    cols = next((cols[d] for d in defects if d in cols), D)
    shape = (rows, cols)
    if "0-d" in defects:
        shape = ()
    elif "1-d" in defects:
        shape = (cols,)
    elif "3-d" in defects:
        shape = (rows, 1, cols)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    x = torch.rand(shape, generator=g, dtype=torch.float64)
    x = x if "grey" in defects else (x < 0.5).double()
    if x.numel():
        flat = x.flatten()
        if "nan" in defects:
            flat[0] = math.nan
        if "inf" in defects:
            flat[-1] = math.inf
        if "negative" in defects:
            flat[0] = -1.0
        if "large" in defects:
            flat[-1] = 255.0
        x = flat.reshape(shape)
    dtype = next((getattr(torch, d) for d in defects if hasattr(torch, d) and d in (
        "float64", "float16", "int64", "uint8", "bool", "complex64")), torch.float32)
    x = x.to(dtype)
    # Breaks that leave no trace (a NaN in a tensor with no elements, ...) do not count.
    broken = {d for d in defects if not (d in ("nan", "inf", "negative", "large", "grey") and x.numel() == 0)}
    if "meta device" in broken and not broken & {"numpy", "list"}:
        x = torch.empty(shape, dtype=dtype, device="meta")
    if "numpy" in broken:
        return x.numpy(), False
    if "list" in broken:
        return x.tolist(), False
    if "number" in broken:
        return 1.0, False
    if "string" in broken:
        return "data.csv", False
    if "none" in broken:
        return None, False
    return x, not broken


@settings(max_examples=100, **SETTINGS)
@given(data_arrays())
def test_check_data(arg) -> None:
    x, valid = arg
    _expect(valid, lambda: _vae().check_data(x), "VAE.check_data")


def _with_log_weights(call: Any) -> tuple[Any, torch.Tensor]:
    """Run ``call`` with the evaluation core's log-weights recorded
    (:meth:`pyrovae.evaluation.Program.log_weights`); return its result and the log-weights it
    drew, ``(K, num_datapoints)`` (one draw per batch of datapoints)."""
    from pyrovae.evaluation import Program

    drawn: list[torch.Tensor] = []
    original = Program.log_weights

    def spy(self: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        w = original(self, *args, **kwargs)
        if not kwargs.get("traced"):  # (the fast path's proof evaluates the traced weights once)
            drawn.append(w)
        return w

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Program, "log_weights", spy)
        result = call()
    return result, torch.cat(drawn, 1)


@settings(max_examples=40, **SETTINGS)
@given(data_arrays())
def test_estimators_on_random_data(arg) -> None:
    """log_likelihood, elbo and iwae_bounds on random data: a result of one finite value per
    datapoint; with the same seed, log p(x) and the ELBO are the log-mean-exp and the mean of the
    same draws of log-weights."""
    x, valid = arg
    vae = _vae()
    ll = _expect(valid, lambda: _with_log_weights(
        lambda: log_likelihood(vae, x, 4, seed=0, diagnostics=False)), "log_likelihood")
    lb = _expect(valid, lambda: _with_log_weights(lambda: elbo(vae, x, 4, seed=0)), "elbo")
    bounds = _expect(valid, lambda: iwae_bounds(vae, x, (1, 4), seed=0), "iwae_bounds")
    if valid:
        (ll, w), (lb, w_elbo) = ll, lb
        assert ll.values.shape == lb.values.shape == (x.shape[0],)
        assert torch.isfinite(ll.values).all() and torch.isfinite(lb.values).all()
        torch.testing.assert_close(w_elbo, w)  # same seed, same draws
        torch.testing.assert_close(ll.values, torch.logsumexp(w, 0) - math.log(4))
        torch.testing.assert_close(lb.values, w.mean(0))
        torch.testing.assert_close(bounds.values[1], ll.values)


@settings(max_examples=30, **SETTINGS)
@given(data_arrays())
def test_fit_on_random_data(arg) -> None:
    x, valid = arg
    num_data = x.shape[0] if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] else N
    vae = _vae(num_data)
    history = _expect(valid, lambda: fit(vae, x, num_epochs=1, batch_size=1, progress=False),
                      "fit (data)")
    if valid:
        assert history.num_steps == x.shape[0] and math.isfinite(history.train_elbo[0])


# ------------------------------------------------------------------------------ generated options
def _is_pos_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


@st.composite
def options(draw: Any, good: dict[str, list], bad: dict[str, list]) -> tuple[dict, set]:
    """Keyword arguments: each from its ``good`` values, except zero, one or two drawn from its
    ``bad`` values. Returns ``(kwargs, names of the broken ones)``."""
    broken = set(draw(st.lists(st.sampled_from(sorted(bad)), max_size=2)))
    if draw(st.booleans()):
        broken = set()  # half of the draws are entirely valid
    kwargs = {k: draw(st.sampled_from(bad[k] if k in broken else v)) for k, v in good.items()}
    return kwargs, broken


BAD_INTS = [0, -1, 2.5, True, None, "2", math.nan]
BAD_FLOATS = [0.0, -1e-3, math.inf, math.nan, None, "0.1", True]

FIT_GOOD = {
    "num_epochs": [1, 2], "batch_size": [1, 3, N], "lr": [1e-3, 0.05], "beta": [1.0, 0.5],
    "kl_warmup_epochs": [0, 1.5], "seed": [0, 5, None], "clip_grad_norm": [None, 1.0],
    "device": [None, "cpu", torch.device("cpu")], "loss": ["default"],
    "checkpoint_every_steps": [None, 2], "validation": ["none", "valid"], "num_data": [N],
    "max_bad_steps": [5, 1], "vae": ["vae"],
}
FIT_BAD = {
    "num_epochs": BAD_INTS, "batch_size": BAD_INTS + [N + 1], "lr": BAD_FLOATS, "beta": BAD_FLOATS,
    "kl_warmup_epochs": [-1, math.inf, math.nan, "1", None], "seed": [-1, 1.5, True, "0"],
    "clip_grad_norm": BAD_FLOATS[:-3] + ["1", True],
    "device": ["cuda:7", "tpu", "meta", 3, "nope"], "loss": ["a string", "a class"],
    "checkpoint_every_steps": [0, -3, 1.5, "2"], "validation": ["wrong width", "nan", "empty", "list"],
    "num_data": [N + 3, 1], "max_bad_steps": [0, -1, 1.5], "vae": ["None", "a Linear"],
}


@settings(max_examples=50, **SETTINGS)
@given(options(FIT_GOOD, FIT_BAD))
def test_fit_options(tmp_path_factory, drawn) -> None:
    """fit with random option values: valid ones train, an invalid one is a PyrovaeError raised
    before the first step (the model's parameters are untouched)."""
    kwargs, broken = drawn
    if torch.cuda.is_available() and torch.cuda.device_count() > 7:
        broken.discard("device")
    vae = _vae(kwargs.pop("num_data"))
    vae = {"vae": vae, "None": None, "a Linear": torch.nn.Linear(D, D)}[kwargs.pop("vae")]
    x = torch.bernoulli(torch.full((N, D), 0.4), generator=torch.Generator().manual_seed(1))
    kwargs["validation"] = {"none": None, "valid": x[:3], "wrong width": x[:3, :-1],
                            "nan": x[:3] * math.nan, "empty": x[:0],
                            "list": x[:3].tolist()}[kwargs["validation"]]
    kwargs["loss"] = {"default": None, "a string": "elbo", "a class": Trace_ELBO}[kwargs["loss"]]
    if kwargs["checkpoint_every_steps"] is not None:
        kwargs["checkpoint_dir"] = tmp_path_factory.mktemp("fit")
    before = {k: v.clone() for k, v in vae.state_dict().items()} if vae is not None else {}
    history = _expect(not broken, lambda: fit(vae, x, progress=False, **kwargs), "fit (options)")
    if history is not None:
        assert history.num_steps == kwargs["num_epochs"] * math.ceil(N / kwargs["batch_size"])
        assert all(math.isfinite(v) for v in history.train_elbo)
    elif vae is not None:
        assert all(torch.equal(before[k], v) for k, v in vae.state_dict().items())


EST_GOOD = {"num_samples": [1, 3], "max_rows": [2048, 1, 5], "seed": [None, 0],
            "ks": [(1, 3), [2], 3, (3, 1, 3)], "vae": ["vae"]}
EST_BAD = {"num_samples": BAD_INTS + [math.inf], "max_rows": BAD_INTS, "seed": [-1, "0", 1.5],
           "ks": [(), (0, 2), (1, -1), ("a",), None, (1.5,), "12"],
           "vae": ["None", "a string", "a Linear"]}


@settings(max_examples=40, **SETTINGS)
@given(options(EST_GOOD, EST_BAD))
def test_estimator_options(drawn) -> None:
    kwargs, broken = drawn
    ks = kwargs.pop("ks")
    vae = {"vae": _vae(), "None": None, "a string": "vae", "a Linear": torch.nn.Linear(D, D)}[
        kwargs.pop("vae")]
    x = torch.bernoulli(torch.full((5, D), 0.5), generator=torch.Generator().manual_seed(0))
    valid = not broken - {"ks"}
    ll = _expect(valid, lambda: log_likelihood(vae, x, **kwargs), "log_likelihood (options)")
    _expect(valid, lambda: elbo(vae, x, **kwargs), "elbo (options)")
    k = kwargs.pop("num_samples")
    b = _expect(not broken - {"num_samples"}, lambda: iwae_bounds(vae, x, ks, **kwargs),
                "iwae_bounds (options)")
    if ll is not None:
        assert ll.values.shape == (5,) and ll.num_samples == k
    if b is not None:
        assert list(b.num_samples) == sorted({ks} if isinstance(ks, int) else set(ks))


GAPS_GOOD = {"num_steps": [2], "lr": [1e-2], "tol": [1e-3, 0], "batch_size": [4, 100],
             "num_particles": [2], "check_every": [1], "max_decays": [0, 2], "vae": ["vae"]}
GAPS_BAD = {"num_steps": BAD_INTS, "lr": BAD_FLOATS, "tol": [-1.0, math.nan, "x", None],
            "batch_size": BAD_INTS, "num_particles": BAD_INTS, "check_every": BAD_INTS,
            "max_decays": [-1, 1.5, None], "vae": ["None", "a Linear"]}


@settings(max_examples=60, **SETTINGS)
@given(data_arrays(), options(GAPS_GOOD, GAPS_BAD))
def test_gaps(arg, drawn) -> None:
    """gaps on random data (with sound options) or with random options (on sound data); a result
    decomposes the inference gap exactly, one value per datapoint."""
    x, valid = arg
    kwargs, broken = drawn
    if broken:
        x, valid = torch.bernoulli(torch.full((3, D), 0.5), generator=torch.Generator().manual_seed(0)), True
        vae = {"vae": _vae(), "None": None, "a Linear": torch.nn.Linear(D, D)}[kwargs.pop("vae")]
    else:
        vae = _vae()
        kwargs.pop("vae")
    result = _expect(valid and not broken,
                     lambda: gaps(vae, x, num_samples=4, num_elbo_samples=4, log_px="is", **kwargs),
                     "gaps" if not broken else "gaps (options)")
    if result is not None:
        torch.testing.assert_close(result.approximation_gap + result.amortization_gap,
                                   result.inference_gap)
        assert result.log_px.shape == (x.shape[0],)


# --------------------------------------------------------------------------------- configurations
CONFIG_GOOD = {
    "num_features": [D], "latent_dim": [2, 3], "hidden_dims": [(4,), (), (4, 3)],
    "activation": ["relu", "tanh"], "prior": sorted(PRIORS), "family": sorted(FAMILIES),
    "likelihood": sorted(LIKELIHOODS), "options": [{}, {"num_transforms": 1}, {"scale": 0.1},
                                                   {"num_components": 2, "num_pseudo_inputs": 3}],
    "network": ["mlp"], "image_shape": [None, (2, 3)], "num_data": [N, 1],
}
CONFIG_BAD = {
    "num_features": BAD_INTS, "latent_dim": BAD_INTS, "hidden_dims": [(0,), (-2,), (2.5,), 4, "4", None, ("a",)],
    "activation": ["nope", 3, None], "prior": ["nope", 1, None], "family": ["nope", None],
    "likelihood": ["nope", None],
    "options": [{"num_transforms": 0}, {"num_transforms": -1}, {"scale": -1.0}, {"scale": "nope"},
                {"num_components": 0}, {"num_pseudo_inputs": -5}, {"count_bins": 0},
                {"flow_base": "nope"}, {"unknown": 1}, {"flow_hidden_dims": [0]}, None, [1]],
    "network": ["nope", 3], "image_shape": [(3, 3), (0, 6), "2x3", (2.5, 2)], "num_data": BAD_INTS,
}


@settings(max_examples=80, **SETTINGS)
@given(options(CONFIG_GOOD, CONFIG_BAD))
def test_build_vae(drawn) -> None:
    """build_vae on random configurations: a sound one builds a model that samples, scores and
    trains on data of its own size; any broken field is a PyrovaeError at build time."""
    kwargs, broken = drawn
    num_data = kwargs.pop("num_data")
    # (every option's value is checked, also one the chosen parts do not read)
    if kwargs["prior"] == "vamp" and kwargs["family"] in ("local", "planar", "radial"):
        broken.add("prior")  # the VampPrior needs q(z|u) at any z: an encoder and an inverse
    vae = _expect(not broken, lambda: build_vae(VAEConfig(**kwargs), num_data=num_data), "build_vae")
    if vae is None:
        return
    torch.manual_seed(0)
    x = vae.sample(min(num_data, 3), mean=False)
    assert x.shape == (min(num_data, 3), D) and torch.isfinite(x).all()
    # a per-datapoint family scores new points by fitting their own parameters
    local = {"local": "fit"} if kwargs["family"] == "local" else {}
    ll = log_likelihood(vae, x, 3, seed=0, diagnostics=False, **local)
    assert torch.isfinite(ll.values).all()
    history = fit(vae, torch.cat([x] * math.ceil(num_data / len(x)))[:num_data], num_epochs=1,
                  batch_size=num_data, progress=False)
    assert history.num_steps == 1


# ------------------------------------------------------------------------------------------ files
def _idx_bytes(n: int, rows: int = 2, cols: int = 3, magic: int = 2051) -> bytes:
    if magic == 2049:
        return struct.pack(">II", magic, n) + bytes(range(n))
    return struct.pack(">IIII", magic, n, rows, cols) + bytes((i * 7) % 256 for i in range(n * rows * cols))


@settings(max_examples=60, **SETTINGS)
@given(
    kind=st.sampled_from(["random", "truncated", "valid", "valid-labels", "gzip-truncated",
                          "gzip-valid", "empty", "bad-magic", "longer"]),
    junk=st.binary(min_size=0, max_size=64),
    cut=st.integers(0, 40),
)
def test_read_idx_on_random_and_truncated_bytes(tmp_path_factory, kind, junk, cut) -> None:
    good = _idx_bytes(3) if kind != "valid-labels" else _idx_bytes(5, magic=2049)
    raw = {
        "random": junk, "truncated": good[: min(cut, len(good) - 1)], "valid": good,
        "valid-labels": good, "gzip-truncated": gzip.compress(good)[: max(1, cut)],
        "gzip-valid": gzip.compress(good), "empty": b"", "bad-magic": b"\x00\x00\x09\x03" + good[4:],
        "longer": good + b"\x00" + junk,
    }[kind]
    path = tmp_path_factory.mktemp("idx") / ("f.gz" if kind.startswith("gzip") else "f.idx")
    path.write_bytes(raw)
    valid = kind in ("valid", "valid-labels", "gzip-valid") or (
        kind == "random" and len(raw) >= 8 and _parses_as_idx(raw)
    )
    array = _expect(valid, lambda: read_idx(path), "read_idx")
    if array is not None and kind != "random":
        assert array.dtype == np.uint8 and array.shape == ((3, 2, 3) if kind != "valid-labels" else (5,))
    # The other readers refuse the same bytes with a DataError, never a raw error.
    for reader, name in ((read_amat, "read_amat"), (read_frey, "read_frey")):
        TRIED[name] = TRIED.get(name, 0) + 1
        try:
            reader(path)
        except PyrovaeError as e:
            assert "\n" not in str(e)


def _parses_as_idx(raw: bytes) -> bool:
    magic = int.from_bytes(raw[:4], "big")
    if magic not in (2049, 2051):
        return False
    ndim = magic & 0xFF
    if len(raw) < 4 + 4 * ndim:
        return False
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return math.prod(dims) == len(raw) - 4 - 4 * ndim


GARBAGE_NAMES = (
    "train-images-idx3-ubyte", "t10k-images-idx3-ubyte", "train-labels-idx1-ubyte",
    "t10k-labels-idx1-ubyte", "binarized_mnist_train.amat", "binarized_mnist_valid.amat",
    "binarized_mnist_test.amat", "frey_rawface.mat",
)


@settings(max_examples=50, **SETTINGS)
@given(
    name=st.sampled_from(sorted(DATASETS) + ["default"] * 4 + ["nope", "", None, 3, "MNIST"]),
    split=st.sampled_from(["train", "test", "train", "test", "valid", "all", "nope", None, 0]),
    binarize=st.sampled_from([None, "dynamic", "none", None, "static", True]),
    root=st.sampled_from(["empty", "missing", "file", "garbage", "truncated"]),
    junk=st.binary(min_size=0, max_size=64),
)
def test_load_dataset(tmp_path_factory, name, split, binarize, root, junk) -> None:
    """Data sets by name from an empty, missing or non-folder root, or one whose files hold random
    or truncated bytes: the bundled set loads whatever the root; the others raise a PyrovaeError
    (DataNotFoundError, DataError or ConfigError)."""
    tmp = tmp_path_factory.mktemp("root")
    folder = {"missing": tmp / "missing", "file": tmp / "file.txt"}.get(root, tmp)
    if root == "file":
        folder.write_text("not a folder")
    if root in ("garbage", "truncated"):  # every file name a loader looks for, holding junk
        for fname in GARBAGE_NAMES:
            content = junk if root == "garbage" else _idx_bytes(3)[:-1 - len(junk) % 10]
            (tmp / fname).write_bytes(content)
    valid = name == "default" and split in ("train", "test") and binarize in (None, "dynamic", "none")
    data = _expect(valid, lambda: load_dataset(name, split, root=folder, binarize=binarize),
                   "load_dataset")
    if data is not None:
        assert len(data) == (6000 if split == "train" else 1000) and data.num_features == 784


# ------------------------------------------------------------------------------------ checkpoints
class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > /dev/null",))


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory) -> bytes:
    vae = _vae()
    path = save_checkpoint(tmp_path_factory.mktemp("ckpt") / "c.pt", vae,
                           torch.optim.Adam(vae.parameters()))
    return path.read_bytes()


@settings(max_examples=60, **SETTINGS)
@given(
    kind=st.sampled_from(["random", "truncated", "flipped", "valid", "evil-pickle", "plain-pickle",
                          "zip-junk", "empty", "state-dict", "text"]),
    junk=st.binary(min_size=0, max_size=200),
    where=st.floats(0.0, 1.0),
)
def test_load_checkpoint_on_random_bytes(tmp_path_factory, good_checkpoint, kind, junk, where) -> None:
    """read_checkpoint, load_checkpoint and load_model on random, truncated, bit-flipped and
    malicious files: only a pyrovae checkpoint loads, anything else is a CheckpointError, and a
    pickle that would run code is refused without running it."""
    good = good_checkpoint
    cut = int(where * (len(good) - 1))
    if kind == "evil-pickle":
        buf = io.BytesIO()
        torch.save({"format": "pyrovae-checkpoint", "model": _Evil()}, buf)
        raw = buf.getvalue()
    elif kind == "plain-pickle":
        raw = pickle.dumps({"a": 1, "b": [junk]})
    elif kind == "zip-junk":
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr("archive/data.pkl", junk)
        raw = buf.getvalue()
    elif kind == "state-dict":
        buf = io.BytesIO()
        torch.save(_vae().state_dict(), buf)
        raw = buf.getvalue()
    elif kind == "flipped":
        raw = bytearray(good)
        raw[cut] ^= 0xFF
        raw = bytes(raw)
    else:
        raw = {"random": junk, "truncated": good[:cut], "valid": good, "empty": b"",
               "text": b"{}" + junk}[kind]
    path = tmp_path_factory.mktemp("load") / "checkpoint.pt"
    path.write_bytes(raw)
    flip_harmless = kind == "flipped" and raw == good
    valid = kind == "valid" or flip_harmless
    # A flipped byte may land in zip padding that no reader checks; then the file still loads
    # and must give the saved parameters. Everywhere else it must be refused.
    vae = _vae()
    if kind == "flipped":
        try:
            load_checkpoint(path, vae=vae)
            valid = True
        except PyrovaeError:
            valid = False
        TRIED["load_checkpoint"] = TRIED.get("load_checkpoint", 0) + 1
        VALID["load_checkpoint"] = VALID.get("load_checkpoint", 0) + valid
    else:
        _expect(valid, lambda: load_checkpoint(path, vae=vae), "load_checkpoint")
    if valid:
        for k, v in _vae().state_dict().items():
            assert torch.equal(vae.state_dict()[k], v)
    _expect(valid, lambda: read_checkpoint(path), "read_checkpoint")
    _expect(valid, lambda: load_model(path), "load_model")


# -------------------------------------------------------------------------------------------- CLI
TINY_CLI = ["--hidden-dims", "4", "--latent-dim", "2", "--epochs", "1", "--eval-points", "5",
            "--num-samples", "2", "--no-progress"]
CLI_BAD = [
    (["--latent-dim", "0"], "--latent-dim must be a positive integer"),
    (["--hidden-dims", "16", "0"], "--hidden-dims must be positive integers"),
    (["--epochs", "0"], "--epochs must be a positive integer"),
    (["--batch-size", "-5"], "--batch-size must be a positive integer"),
    (["--batch-size", "100000"], "larger than the 5400 training datapoints"),
    (["--lr", "0"], "--lr must be a positive finite number"),
    (["--lr", "nan"], "--lr must be a positive finite number"),
    (["--adam-eps", "0"], "--adam-eps must be a positive finite number"),
    (["--beta", "-1"], "--beta must be a positive finite number"),
    (["--kl-warmup", "inf"], "--kl-warmup must be a finite number >= 0"),
    (["--num-particles", "0"], "--num-particles must be"),
    (["--validation-fraction", "1.5"], "--validation-fraction must be in [0, 1)"),
    (["--seed", "-1"], "--seed must be a non-negative integer"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--num-samples", "0"], "--num-samples must be a positive integer"),
    (["--eval-points", "0"], "--eval-points must be a positive integer"),
    (["--checkpoint-every-steps", "0"], "--checkpoint-every-steps must be a positive integer"),
    (["--clip-grad-norm", "-1"], "--clip-grad-norm must be a positive finite number"),
    (["--dataset", "nope"], "unknown dataset 'nope'"),
    (["--dataset", "mnist", "--data-root", "/nonexistent/pyrovae"], "/nonexistent/pyrovae"),
    (["--prior", "nope"], "unknown prior 'nope'"),
    (["--family", "nope"], "unknown family 'nope'"),
    (["--likelihood", "nope"], "unknown likelihood 'nope'"),
    (["--activation", "nope"], "unknown activation 'nope'"),
    (["--option", "junk"], "--option needs KEY=VALUE"),
    (["--option", "colour=1"], "unknown option(s) ['colour']"),
    (["--option", "num_transforms=0", "--family", "planar"], "num_transforms must be a positive"),
    (["--likelihood", "gaussian", "--option", "scale=-2"], "option scale must be a positive number"),
]
if torch.cuda.is_available():
    CLI_BAD.remove((["--device", "tpu"], "unknown device 'tpu'"))


@pytest.mark.parametrize("extra, message", CLI_BAD, ids=[" ".join(a) for a, _ in CLI_BAD])
def test_cli_bad_options(tmp_path: Path, capsys, extra, message) -> None:
    """Every impossible option: exit code 2, one line on stderr naming it, nothing trained."""
    from pyrovae.cli import main

    TRIED["CLI options"] = TRIED.get("CLI options", 0) + 1
    run = tmp_path / "run"
    assert main(["train", *TINY_CLI, "--out", str(run), *extra]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("pyrovae train: error: ") and captured.err.count("\n") == 1
    assert message in captured.err, captured.err
    assert "epoch" not in captured.out and not (run / "checkpoint.pt").exists()


@pytest.mark.parametrize("extra, message", [
    (["--num-samples", "0"], "--num-samples must be a positive integer"),
    (["--eval-points", "-1"], "--eval-points must be a positive integer"),
    (["--split", "nope"], "split"),
    (["--device", "cuda:99"], "cuda"),
])
def test_cli_evaluate_bad_options(tmp_path: Path, capsys, good_checkpoint, extra, message) -> None:
    """`pyrovae evaluate` on a run folder with impossible options, or on a folder that is no run."""
    from pyrovae.checkpoint import save_config
    from pyrovae.cli import main

    TRIED["CLI options"] = TRIED.get("CLI options", 0) + 1
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(good_checkpoint)
    save_config(run, _vae().config, cli={"dataset": "default", "binarize": None})
    assert main(["evaluate", str(run), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pyrovae evaluate: error: ") and err.count("\n") == 1 and message in err, err
    (run / "config.json").unlink()
    assert main(["evaluate", str(run)]) == 2
    assert "config.json does not exist" in capsys.readouterr().err
