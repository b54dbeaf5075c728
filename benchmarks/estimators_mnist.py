"""log p(x) estimators side by side on an MNIST VAE: importance sampling vs AIS, and BDMC.

Scores a trained 784-200-200-50 tanh VAE (``--model``: a run folder or a checkpoint file, e.g.
the MNIST reproduction's ``../pyrovae-runs/mnist_nll/vae-dynamic-k1``; without it, a model
trained here for ``--epochs`` epochs) on the first ``--test-points`` MNIST test digits (the whole
test set binarized once with ``--binarize-seed``, as benchmarks/mnist_nll.py does, so its
learning-curve NLL is on the same digits):

- importance sampling with the encoder, K = 1000 and 5000 (two independent runs; each keeps its
  nested bounds L_K for smaller K, so the K = 5000 run also gives the curve L_K against K);
- AIS from the encoder (:func:`pyrovae.ais`) for each T of ``--ais-steps``, ``--chains`` chains,
  ``--leapfrog-steps`` leapfrog steps, step sizes adapted per digit toward 65% acceptance;

and BDMC (:func:`pyrovae.bdmc`) on ``--sim-points`` digits simulated from the model, for each
T: forward AIS (a stochastic lower bound) and reverse AIS from the generating z (an upper
bound), with IS on the same simulated digits.

**Resumable.** The work is cut into units (one estimator on one block of ``--block`` test
digits or ``--sim-block`` simulated digits); each finished unit is saved in the state folder
(``--state``, default ``../pyrovae-runs/estimators_mnist``) as ``units/<name>.json`` with its
per-digit values and its wall and CPU seconds. Each invocation continues with the next
unfinished unit, cheapest part first (IS, then BDMC and AIS in increasing cost: all of AIS
T=1000 before any of T=10000), and stops before a unit that would end past ``--max-hours``;
SIGTERM or Ctrl-C lose only the unit in progress. One invocation at a time runs units in a state
folder (a lock; ``--report`` only rewrites the results and needs none). Unit ``name`` is seeded by
``crc32(name) + seed * 2**32`` (pyrovae then seeds each batch inside it by ``(seed, batch)``),
so a unit's values do not depend on which invocation ran it.

Chains: 4 by default, not the 16 of Wu et al. (2017). What the chains buy is a smaller
per-digit Monte Carlo error of log-mean-of-weights; at T = 1000 one digit's estimate over 4 chains
has a standard error of about 0.1 nats (measured, ``mean_chain_stderr``), so its downward bias,
about the square over 2, is near 0.005 nats, far below the differences measured between
estimators, and the paired standard errors over 1000 digits are dominated by IS. On one CPU
thread 16 chains cost 2.9x as much as 4 (22.5 vs 31.4 us per row and gradient evaluation,
measured), about 15 CPU hours for the whole benchmark instead of about 5.

The first invocation freezes the model: it copies the checkpoint (and ``config.json``) into
``<state>/model/`` and records where it came from, its epochs and the test NLL its run had
recorded; later invocations score that copy (``--model`` is then optional and only compared),
even if the source run keeps training. The plan (digits, blocks, chains, seeds) is fixed in
``<state>/plan.json``; ``--ais-steps`` may change between invocations (one part per T).

Every invocation (also one with nothing left to do) rewrites, from all finished units,
``estimators_mnist.{json,md}`` in the state folder and in ``--out`` (default
benchmarks/results of this tree), and the README section ``docs/readme-snippets/
estimators_mnist.md``, saying which parts are complete and which partial.

Usage::

    PYROVAE_DATA=/path/to/data nohup nice -n 15 python benchmarks/estimators_mnist.py \\
        --model ../pyrovae-runs/mnist_nll/vae-dynamic-k1 --threads 1 \\
        >> ../pyrovae-runs/estimators_mnist/log.txt 2>&1 &      # start or continue
    python benchmarks/estimators_mnist.py --max-hours 2                 # continue for 2 hours
    python benchmarks/estimators_mnist.py --report                      # only rewrite the results
    python benchmarks/estimators_mnist.py --quick [--dataset default]   # smoke test, < 1 min
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import math
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # the pyrovae of this tree, not whichever is installed
    sys.path.insert(0, str(HERE.parent))
RESULTS = HERE / "results"
SNIPPET = HERE.parent / "docs" / "readme-snippets" / "estimators_mnist.md"
#: Beside the clone (outside the git tree): ``<clone>/../pyrovae-runs``.
DEFAULT_STATE = Path(__file__).resolve().parents[2] / "pyrovae-runs" / "estimators_mnist"
NAME = "estimators_mnist"

#: The nested bounds each IS run keeps (the K = 5000 run's give the curve L_K against K).
IS_CURVES = {1000: (1, 10, 100, 1000), 5000: (1, 10, 100, 200, 500, 1000, 2000, 5000)}
#: The plan's defaults, fixed in plan.json at the first invocation (full run / --quick).
PLAN_DEFAULTS = {
    "dataset": "mnist", "test_points": 1000, "block": 50, "sim_points": 100, "sim_block": 25,
    "chains": 4, "leapfrog_steps": 10, "is_samples": [1000, 5000], "seed": 0, "binarize_seed": 1,
}
QUICK_PLAN = {"test_points": 20, "block": 10, "sim_points": 4, "sim_block": 2, "chains": 2}
DEFAULT_AIS_STEPS, QUICK_AIS_STEPS = [1000, 10000], [10, 20]
#: Relative cost of one row of one gradient evaluation (forward + backward) to one IS row
#: (forward only): orders the parts before anything is measured.
GRAD_COST = 3


class BenchmarkError(Exception):
    """A bad option or state: reported as one line, exit status 2."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None,
                   help="a trained model: run folder or checkpoint file (frozen into the state "
                        "folder at the first invocation); default: train one for --epochs")
    p.add_argument("--state", type=Path, default=None,
                   help=f"state folder (default {DEFAULT_STATE}; with --quick a temporary one)")
    p.add_argument("--data-root", default=None, help="data folder (default: $PYROVAE_DATA)")
    p.add_argument("--dataset", default=None, help="mnist (default) or default (bundled sample)")
    p.add_argument("--epochs", type=int, default=5, help="training epochs without --model")
    p.add_argument("--test-points", type=int, default=None, help="first N test digits (1000)")
    p.add_argument("--block", type=int, default=None, help="test digits per unit (50)")
    p.add_argument("--sim-points", type=int, default=None, help="simulated digits for BDMC (100)")
    p.add_argument("--sim-block", type=int, default=None, help="simulated digits per unit (25)")
    p.add_argument("--ais-steps", type=int, nargs="+", default=None,
                   help="numbers of intermediate distributions T (default: 1000 10000)")
    p.add_argument("--chains", type=int, default=None, help="AIS chains per digit (default: 4)")
    p.add_argument("--leapfrog-steps", type=int, default=None, help="per HMC transition (10)")
    p.add_argument("--seed", type=int, default=None, help="seed of the units' draws (0)")
    p.add_argument("--binarize-seed", type=int, default=None,
                   help="seed of the test set's one binarization (1, as benchmarks/mnist_nll.py)")
    p.add_argument("--max-hours", type=float, default=None,
                   help="start no unit that would end past this many hours (default: no limit)")
    p.add_argument("--max-units", type=int, default=None, help="run at most this many units")
    p.add_argument("--report", action="store_true", help="only rewrite the results; run nothing")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder (benchmarks/results)")
    p.add_argument("--snippet", type=Path, default=None,
                   help=f"README snippet (default {SNIPPET.relative_to(HERE.parent)}; "
                        "--quick: <out>/estimators_mnist_quick_snippet.md)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 20 test digits, 4 simulated, T = 10 and 20, 2 chains; a model "
                        "trained 1 epoch on 2,000 digits unless --model")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------- files
def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path`` and rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def clean(v: Any) -> Any:
    """JSON-ready: tensors to lists, non-finite floats to None."""
    if isinstance(v, torch.Tensor):
        return clean(v.tolist())
    if isinstance(v, dict):
        return {k: clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [clean(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------------- plan
def resolve_plan(args: argparse.Namespace, state: Path) -> dict[str, Any]:
    """The plan of ``state/plan.json``, or a new one from the options; options that contradict
    a saved plan are refused (they would mix incomparable units)."""
    given = {k: getattr(args, k) for k in PLAN_DEFAULTS if k != "is_samples"}
    path = state / "plan.json"
    if path.is_file():
        plan = json.loads(path.read_text())
        clash = {k: (v, plan[k]) for k, v in given.items() if v is not None and plan.get(k) != v}
        if clash:
            text = ", ".join(f"--{k.replace('_', '-')} {v} (the plan has {old})"
                             for k, (v, old) in clash.items())
            raise BenchmarkError(
                f"{state} was started with other settings: {text}; drop these options to "
                "continue it, or pass a new --state"
            )
        return plan
    plan = dict(PLAN_DEFAULTS)
    if args.quick:
        plan.update(QUICK_PLAN)
    plan.update({k: v for k, v in given.items() if v is not None})
    for k in ("test_points", "block", "sim_points", "sim_block", "chains", "leapfrog_steps"):
        if not isinstance(plan[k], int) or plan[k] < 1:
            raise BenchmarkError(f"--{k.replace('_', '-')} must be a positive integer, got {plan[k]}")
    plan["quick"] = bool(args.quick)
    return plan


@dataclass(frozen=True)
class Unit:
    kind: str  # "is", "ais", "bdmc"
    param: int  # K or T
    block: int
    start: int
    stop: int

    @property
    def part(self) -> str:
        return f"{self.kind}-{'K' if self.kind == 'is' else 'T'}{self.param}"

    @property
    def name(self) -> str:
        return f"{self.part}-b{self.block:03d}"

    @property
    def size(self) -> int:
        return self.stop - self.start


def unit_seed(seed: int, name: str) -> int:
    return (zlib.crc32(name.encode()) + seed * 2**32) % 2**63


def cost(kind: str, param: int, digits: int, chains: int, leapfrog: int) -> float:
    """Decoder rows (forward-pass equivalents) a part evaluates: orders the parts."""
    if kind == "is":
        return digits * param
    passes = 2 if kind == "bdmc" else 1
    return passes * digits * chains * param * (leapfrog + 1) * GRAD_COST


def make_units(plan: dict[str, Any], ais_steps: list[int]) -> list[Unit]:
    """Every unit of the plan, cheapest part first (blocks in order within a part)."""
    parts = [("is", k, plan["test_points"], plan["block"]) for k in plan["is_samples"]]
    parts += [("ais", t, plan["test_points"], plan["block"]) for t in ais_steps]
    parts += [("bdmc", t, plan["sim_points"], plan["sim_block"]) for t in ais_steps]
    parts.sort(key=lambda p: (p[0] != "is", cost(p[0], p[1], p[2], plan["chains"],
                                                 plan["leapfrog_steps"])))
    units = []
    for kind, param, n, size in parts:
        for b, s in enumerate(range(0, n, size)):
            units.append(Unit(kind, param, b, s, min(s + size, n)))
    return units


# ---------------------------------------------------------------------------------- model
def run_test_nll(source: Path, epochs: int) -> dict[str, Any] | None:
    """The latest test NLL the source run recorded at or before ``epochs`` (benchmarks/
    mnist_nll.py's learning curve: ``mnist_nll.json`` in a run folder, ``<name>.json`` beside a
    saved state file)."""
    meta = source / "mnist_nll.json" if source.is_dir() else source.with_suffix(".json")
    if not meta.is_file():
        return None
    try:
        curve = json.loads(meta.read_text()).get("curve") or []
    except (OSError, ValueError):
        return None
    points = [c for c in curve if isinstance(c, dict) and c.get("epochs", math.inf) <= epochs]
    if not points:
        return None
    c = points[-1]
    return {k: c.get(k) for k in ("nll", "stderr", "num_test", "num_samples", "epochs", "eval_seed")} | {
        "file": str(meta)}


def freeze_model(args: argparse.Namespace, plan: dict[str, Any], state: Path, train: Any) -> None:
    """Copy ``--model`` (or a model trained here) into ``state/model`` with its description."""
    from pyrovae.checkpoint import read_checkpoint

    target = state / "model"
    tmp = state / "model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if args.model is not None:
        source = args.model.resolve()
        ckpt_file = source / "checkpoint.pt" if source.is_dir() else source
        if not ckpt_file.is_file():
            raise BenchmarkError(f"--model {args.model}: no checkpoint file there")
        for attempt in range(3):  # a training run may replace its checkpoint meanwhile
            shutil.copyfile(ckpt_file, tmp / "checkpoint.pt")
            try:
                ckpt = read_checkpoint(tmp / "checkpoint.pt")
                break
            except Exception as e:  # noqa: BLE001 -- a torn copy: try again
                if attempt == 2:
                    raise BenchmarkError(f"--model {args.model}: cannot read its checkpoint ({e})") from None
                time.sleep(2)
        config = (source if source.is_dir() else source.parent) / "config.json"
        if config.is_file():
            shutil.copyfile(config, tmp / "config.json")
        history = ckpt.get("history") or {}
        epochs = len(history.get("train_elbo") or [])
        info = {
            "source": str(source), "trained_here": False, "epochs": epochs,
            "train_elbo": (history.get("train_elbo") or [None])[-1],
            "steps": history.get("num_steps"),
            "test_nll_of_its_run": run_test_nll(source, epochs),
        }
    else:
        from pyrovae import fit
        from pyrovae.build import VAEConfig, build_vae

        epochs = 1 if plan["quick"] else args.epochs
        if plan["quick"]:
            train = train.subset(min(2000, len(train)))
        config = VAEConfig(num_features=784, latent_dim=50, hidden_dims=(200, 200),
                           activation="tanh", prior="standard", family="diagonal",
                           likelihood="bernoulli")
        torch.manual_seed(plan["seed"])
        vae = build_vae(config, num_data=len(train))
        t0 = time.perf_counter()
        history = fit(vae, train, num_epochs=epochs, batch_size=100, lr=1e-3, seed=plan["seed"],
                      progress=False, checkpoint_dir=tmp)
        info = {
            "source": None, "trained_here": True, "epochs": epochs,
            "train_elbo": history.train_elbo[-1], "steps": None, "test_nll_of_its_run": None,
            "train_digits": len(train), "train_seconds": time.perf_counter() - t0,
        }
    info["checkpoint_sha256"] = sha256(tmp / "checkpoint.pt")
    info["frozen_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
    write_atomic(tmp / "model.json", json.dumps(clean(info), indent=2))
    os.replace(tmp, target)
    print(f"{NAME}: froze the model ({describe_model(info)}) in {target}", flush=True)


def describe_model(info: dict[str, Any]) -> str:
    if info.get("trained_here"):
        return (f"trained here {info['epochs']} epoch(s) on {info.get('train_digits')} digits, "
                f"final train ELBO {info['train_elbo']:.2f}")
    text = f"{info['source']} at epoch {info['epochs']}"
    if info.get("train_elbo") is not None:
        text += f", train ELBO {info['train_elbo']:.2f}"
    nll = info.get("test_nll_of_its_run")
    if nll:
        text += (f"; its run's test NLL {nll['nll']:.2f} ± {nll['stderr']:.2f} "
                 f"(K={nll['num_samples']}, first {nll['num_test']} test digits, epoch {nll['epochs']})")
    return text


# ----------------------------------------------------------------------------------- data
def load_test(plan: dict[str, Any], root: str | None) -> torch.Tensor:
    from pyrovae.data import load_dataset

    test = load_dataset(plan["dataset"], "test", root=root, binarize="dynamic").binarized(
        generator=torch.Generator().manual_seed(plan["binarize_seed"])
    )
    n = plan["test_points"]
    if n > len(test):
        raise BenchmarkError(f"--test-points {n}: {plan['dataset']} has {len(test)} test digits")
    x, _ = test.subset(n)[torch.arange(n)]
    return torch.as_tensor(x).reshape(n, -1).float()


def digits_sha(x: torch.Tensor) -> str:
    return hashlib.sha256(x.to(torch.uint8).numpy().tobytes()).hexdigest()


# ----------------------------------------------------------------------------------- units
def run_unit(unit: Unit, vae: Any, x: torch.Tensor, plan: dict[str, Any]) -> dict[str, Any]:
    from pyrovae import iwae_bounds
    from pyrovae.ais import ais, bdmc

    seed = unit_seed(plan["seed"], unit.name)
    out: dict[str, Any] = {"name": unit.name, "kind": unit.kind, "param": unit.param,
                           "block": unit.block, "start": unit.start, "stop": unit.stop,
                           "seed": seed}
    t0, c0 = time.perf_counter(), time.process_time()
    if unit.kind == "is":
        ks = IS_CURVES.get(unit.param, (1, unit.param))
        b = iwae_bounds(vae, x[unit.start:unit.stop], ks, seed=seed)
        out["num_samples"] = list(ks)
        out["values"] = {str(k): v for k, v in zip(ks, b.values)}
    elif unit.kind == "ais":
        r = ais(vae, x[unit.start:unit.stop], num_intermediate=unit.param,
                num_chains=plan["chains"], leapfrog_steps=plan["leapfrog_steps"], seed=seed)
        out.update(values=r.values, chain_stderr=r.chain_stderr, acceptance=r.acceptance,
                   step_size=r.step_size, log_weights=r.log_weights)
    else:
        ks = IS_CURVES[max(IS_CURVES)]
        r = bdmc(vae, unit.size, num_intermediate=unit.param, num_chains=plan["chains"],
                 leapfrog_steps=plan["leapfrog_steps"], seed=seed, is_samples=ks)
        bits = r.data.reshape(unit.size, -1).to(torch.uint8).numpy()
        import numpy as np

        out.update(
            lower=r.lower.values, upper=r.upper.values, num_samples=list(ks),
            importance={str(k): v for k, v in zip(ks, r.importance.values)},
            acceptance_forward=r.lower.acceptance, acceptance_reverse=r.upper.acceptance,
            chain_stderr_forward=r.lower.chain_stderr, chain_stderr_reverse=r.upper.chain_stderr,
            data_packbits=base64.b64encode(np.packbits(bits, axis=1).tobytes()).decode(),
            data_shape=list(bits.shape),
        )
    out["wall_seconds"] = time.perf_counter() - t0
    out["cpu_seconds"] = time.process_time() - c0
    return clean(out)


def unit_path(state: Path, unit: Unit) -> Path:
    return state / "units" / f"{unit.name}.json"


def load_units(state: Path, units: list[Unit]) -> dict[str, dict[str, Any]]:
    done = {}
    for u in units:
        p = unit_path(state, u)
        if p.is_file():
            try:
                done[u.name] = json.loads(p.read_text())
            except ValueError:  # cannot happen with atomic writes; redo the unit if it does
                print(f"{NAME}: {p} is unreadable; it will be redone", flush=True)
    return done


# --------------------------------------------------------------------------------- summary
def t(values: list) -> torch.Tensor:
    return torch.tensor([math.nan if v is None else v for v in values], dtype=torch.float64)


def mean_se(v: torch.Tensor) -> tuple[float, float]:
    v = v[torch.isfinite(v)]
    if v.numel() == 0:
        return math.nan, math.nan
    se = float(v.std(unbiased=True) / math.sqrt(v.numel())) if v.numel() > 1 else math.nan
    return float(v.mean()), se


def per_digit(done: dict[str, dict[str, Any]], units: list[Unit], part: str,
              key: Any) -> dict[int, float]:
    """digit index -> value (``key(unit_record)`` gives the block's list) over finished units."""
    out = {}
    for u in units:
        if u.part == part and u.name in done:
            for i, v in enumerate(key(done[u.name])):
                out[u.start + i] = math.nan if v is None else v
    return out


def part_times(done: dict[str, dict[str, Any]], units: list[Unit], part: str) -> dict[str, Any]:
    us = [u for u in units if u.part == part]
    fin = [u for u in us if u.name in done]
    wall = sum(done[u.name]["wall_seconds"] for u in fin)
    cpu = sum(done[u.name]["cpu_seconds"] for u in fin)
    digits = sum(u.size for u in fin)
    total = sum(u.size for u in us)
    return {"units_done": len(fin), "units_total": len(us), "digits_done": digits,
            "digits_total": total, "complete": len(fin) == len(us),
            "wall_seconds": wall, "cpu_seconds": cpu,
            "cpu_seconds_per_digit": cpu / digits if digits else None,
            "wall_seconds_per_unit": wall / len(fin) if fin else None}


def equal_accuracy(a_mean: float, curve: list[tuple[int, float]]) -> dict[str, Any] | None:
    """The K at which IS's mean bound L_K equals ``a_mean``: interpolated linearly in log K
    between the measured K, or extrapolated from the last two (then a lower bound on the K
    needed when L_K is concave in log K, as it is here)."""
    if not curve or not math.isfinite(a_mean):
        return None
    ks = [k for k, _ in curve]
    ms = [m for _, m in curve]
    if a_mean <= ms[0]:
        return {"K": float(ks[0]), "how": f"IS with K={ks[0]} is already as high"}
    for (k0, m0), (k1, m1) in zip(curve, curve[1:]):
        if m0 < a_mean <= m1:
            f = (a_mean - m0) / (m1 - m0)
            return {"K": math.exp(math.log(k0) + f * (math.log(k1) - math.log(k0))),
                    "how": "interpolated in log K between measured K"}
    (k0, m0), (k1, m1) = curve[-2], curve[-1]
    slope = (m1 - m0) / (math.log(k1) - math.log(k0))
    if slope <= 0:
        return {"K": None, "how": f"none: L_K stops rising by K={k1}"}
    return {"K": k1 * math.exp((a_mean - m1) / slope),
            "how": f"extrapolated linearly in log K from K={k0}..{k1}: a lower bound on the K "
                   "needed while L_K keeps flattening in log K", "extrapolated": True}


def summarize(state: Path, plan: dict[str, Any], model: dict[str, Any], units: list[Unit],
              done: dict[str, dict[str, Any]], ais_steps: list[int], machine: dict[str, Any]) -> dict[str, Any]:
    C, L = plan["chains"], plan["leapfrog_steps"]
    parts = []
    seen = []
    for u in units:
        if u.part not in seen:
            seen.append(u.part)
    for part in seen:
        pt = part_times(done, units, part)
        parts.append({"part": part, **pt})
    times = {p["part"]: p for p in parts}

    # importance sampling
    importance = []
    is_digits: dict[int, dict[int, dict[int, float]]] = {}  # K -> k -> digit -> value
    for K in plan["is_samples"]:
        part = f"is-K{K}"
        ks = IS_CURVES.get(K, (1, K))
        is_digits[K] = {k: per_digit(done, units, part, lambda r, k=k: r["values"][str(k)]) for k in ks}
        vals = is_digits[K][K]
        m, se = mean_se(t(list(vals.values())))
        pt = times[part]
        curve = {str(k): mean_se(t(list(is_digits[K][k].values())))[0] for k in ks}
        importance.append({
            "K": K, **{k: pt[k] for k in ("digits_done", "digits_total", "complete")},
            "mean": m, "stderr": se, "curve_L_K": curve,
            "cpu_seconds": pt["cpu_seconds"], "wall_seconds": pt["wall_seconds"],
            "cpu_seconds_per_digit": pt["cpu_seconds_per_digit"],
            "cpu_microseconds_per_sample": (1e6 * pt["cpu_seconds_per_digit"] / K
                                            if pt["cpu_seconds_per_digit"] else None),
        })
    is_by_k = {r["K"]: r for r in importance}
    kmax = max(plan["is_samples"])
    us_per_sample = is_by_k[kmax]["cpu_microseconds_per_sample"]

    # AIS on test digits, beside IS on the same digits
    ais_rows = []
    for T in ais_steps:
        part = f"ais-T{T}"
        vals = per_digit(done, units, part, lambda r: r["values"])
        acc = per_digit(done, units, part, lambda r: r["acceptance"])
        cse = per_digit(done, units, part, lambda r: r["chain_stderr"])
        pt = times[part]
        idx = sorted(vals)
        a = t([vals[i] for i in idx])
        m, se = mean_se(a)
        row: dict[str, Any] = {
            "T": T, "chains": C, "leapfrog_steps": L,
            **{k: pt[k] for k in ("digits_done", "digits_total", "complete")},
            "mean": m, "stderr": se,
            "mean_chain_stderr": mean_se(t([cse[i] for i in idx]))[0],
            "mean_acceptance": mean_se(t([acc[i] for i in idx]))[0],
            "gradient_evaluations_per_digit": C * T * (L + 1),
            "cpu_seconds": pt["cpu_seconds"], "wall_seconds": pt["wall_seconds"],
            "cpu_seconds_per_digit": pt["cpu_seconds_per_digit"], "vs_importance": {},
        }
        for K in plan["is_samples"]:
            common = [i for i in idx if i in is_digits[K][K]]
            if not common:
                continue
            iv = t([is_digits[K][K][i] for i in common])
            av = t([vals[i] for i in common])
            d_m, d_se = mean_se(av - iv)
            row["vs_importance"][f"K={K}"] = {"digits": len(common), "is_mean": mean_se(iv)[0],
                                              "ais_mean": mean_se(av)[0],
                                              "difference": d_m, "stderr": d_se}
        # cost at equal accuracy, on the digits both have
        common = [i for i in idx if i in is_digits[kmax][kmax]]
        if common and us_per_sample:
            curve = [(k, mean_se(t([is_digits[kmax][k][i] for i in common]))[0])
                     for k in IS_CURVES.get(kmax, (1, kmax))]
            a_mean = mean_se(t([vals[i] for i in common]))[0]
            eq = equal_accuracy(a_mean, curve)
            if eq is not None:
                K_star = eq["K"]
                is_cpu = None if K_star is None else K_star * us_per_sample * 1e-6
                eq.update({
                    "digits": len(common), "ais_mean": a_mean,
                    "ais_cpu_seconds_per_digit": row["cpu_seconds_per_digit"],
                    "is_cpu_seconds_per_digit_at_K": is_cpu,
                    "cpu_ratio_ais_to_is": (row["cpu_seconds_per_digit"] / is_cpu
                                            if is_cpu and row["cpu_seconds_per_digit"] else None),
                    "evaluation_ratio_ais_to_is": (C * T * (L + 1) / K_star if K_star else None),
                })
                row["equal_accuracy"] = eq
        ais_rows.append(row)

    # BDMC on simulated digits
    bdmc_rows = []
    for T in ais_steps:
        part = f"bdmc-T{T}"
        lo = per_digit(done, units, part, lambda r: r["lower"])
        up = per_digit(done, units, part, lambda r: r["upper"])
        idx = sorted(lo)
        pt = times[part]
        lower, upper = t([lo[i] for i in idx]), t([up[i] for i in idx])
        row = {"T": T, "chains": C, "leapfrog_steps": L,
               **{k: pt[k] for k in ("digits_done", "digits_total", "complete")},
               "lower": dict(zip(("mean", "stderr"), mean_se(lower))),
               "upper": dict(zip(("mean", "stderr"), mean_se(upper))),
               "width": dict(zip(("mean", "stderr"), mean_se(upper - lower))),
               "acceptance_forward": mean_se(t(list(per_digit(
                   done, units, part, lambda r: r["acceptance_forward"]).values())))[0],
               "acceptance_reverse": mean_se(t(list(per_digit(
                   done, units, part, lambda r: r["acceptance_reverse"]).values())))[0],
               "cpu_seconds": pt["cpu_seconds"], "wall_seconds": pt["wall_seconds"],
               "cpu_seconds_per_digit": pt["cpu_seconds_per_digit"], "importance": {}}
        for K in plan["is_samples"]:
            iv = per_digit(done, units, part, lambda r, K=K: r["importance"][str(K)])
            v = t([iv[i] for i in idx])
            m, se = mean_se(v)
            below, below_se = mean_se(lower - v)
            row["importance"][f"K={K}"] = {"mean": m, "stderr": se,
                                           "below_lower_by": below, "below_lower_stderr": below_se}
        bdmc_rows.append(row)

    # time left: per kind, CPU seconds per unit of cost measured on finished units
    rates: dict[str, float] = {}
    for kind in ("is", "ais", "bdmc"):
        c = sum(done[u.name]["cpu_seconds"] for u in units if u.kind == kind and u.name in done)
        w = sum(cost(u.kind, u.param, u.size, C, L) for u in units if u.kind == kind and u.name in done)
        if w:
            rates[kind] = c / w
    left = {}
    for p in parts:
        if p["complete"]:
            continue
        rest = [u for u in units if u.part == p["part"] and u.name not in done]
        rate = rates.get(rest[0].kind)
        left[p["part"]] = (None if rate is None else
                           sum(cost(u.kind, u.param, u.size, C, L) for u in rest) * rate / 3600)
    complete = all(p["complete"] for p in parts)
    return clean({
        "benchmark": "benchmarks/estimators_mnist.py",
        "complete": complete,
        "status": [status_line(p) for p in parts],
        "parts": parts,
        "cpu_hours_left_estimate": left,
        "plan": plan, "ais_steps": ais_steps, "model": model, "machine": machine,
        "state": str(state),
        "importance": importance, "ais": ais_rows, "bdmc": bdmc_rows,
        "definitions": DEFINITIONS,
    })


DEFINITIONS = {
    "difference": "AIS minus IS per digit on the digits both have, averaged; the standard error "
                  "is that of the paired per-digit differences",
    "equal_accuracy": "both are stochastic lower bounds, so the higher mean is the more accurate; "
                      "K is the number of IS samples whose mean bound L_K (nested bounds of the "
                      "IS K=max run, same digits) equals AIS's mean, interpolated in log K, or "
                      "extrapolated linearly in log K beyond the largest K measured",
    "cost_ratio": "AIS CPU seconds per digit over IS CPU seconds per digit at that K (IS's "
                  "measured CPU time per sample times K); the evaluation ratio counts AIS's "
                  "chains x T x (leapfrog steps + 1) gradient evaluations (forward + backward) "
                  "against IS's K forward evaluations",
    "times": "cpu_seconds: CPU time of the process (one torch thread), robust to other jobs on "
             "the machine; wall_seconds: elapsed time, inflated when the cores are shared",
}


def status_line(p: dict[str, Any]) -> str:
    what = {"is": "IS", "ais": "AIS", "bdmc": "BDMC"}[p["part"].split("-")[0]]
    param = p["part"].split("-")[1]
    param = param[0] + "=" + param[1:]
    unit = "simulated digits" if what == "BDMC" else "test digits"
    state = "complete" if p["complete"] else "partial"
    return f"{what} {param}: {p['digits_done']} of {p['digits_total']} {unit} ({state})"


# -------------------------------------------------------------------------------- markdown
def f2(v: Any, digits: int = 2, sign: bool = False) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v:+.{digits}f}" if sign else f"{v:.{digits}f}"


def sig(v: Any) -> str:
    """Seconds and ratios to about three significant digits."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    a = abs(v)
    if a >= 100:
        return f"{v:,.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def pm(m: Any, se: Any, sign: bool = False) -> str:
    if m is None:
        return "–"
    return f"{f2(m, sign=sign)} ± {f2(se)}"


def fmt_k(k: Any, rough: bool = False) -> str:
    """A number of samples; ``rough`` (extrapolated): two significant digits."""
    if k is None:
        return "–"
    if rough or k >= 1e7:
        return f"{k:.1e}".replace("e+0", "e").replace("e+", "e")
    return f"{k:,.0f}"


def write_markdown(path: Path, r: dict[str, Any]) -> None:
    plan, model = r["plan"], r["model"]
    lines = [
        "# log p(x) estimators on an MNIST VAE (benchmarks/estimators_mnist.py)", "",
        f"**{'Complete' if r['complete'] else 'Partial: the run continues'}.** "
        + "; ".join(r["status"]) + ".", "",
        f"Model: 784-200-200-50 tanh VAE, Bernoulli likelihood, N(0, I) prior, diagonal Gaussian "
        f"q(z|x): {describe_model(model)} (checkpoint sha256 {str(model.get('checkpoint_sha256'))[:12]}, "
        f"frozen {model.get('frozen_at')}).", "",
        f"Data: the first {plan['test_points']} {plan['dataset']} test digits, the test set "
        f"binarized once (seed {plan['binarize_seed']}, as benchmarks/mnist_nll.py); "
        f"{plan['sim_points']} digits simulated from the model for BDMC. AIS: from q(z|x), sigmoid "
        f"schedule, {plan['chains']} chains, {plan['leapfrog_steps']} leapfrog steps per "
        "transition, step size adapted per digit toward 65% acceptance. Units of "
        f"{plan['block']} test / {plan['sim_block']} simulated digits, each seeded by its name. "
        f"CPU: {r['machine']['cpu']}, one torch thread.", "",
        "## Importance sampling with the encoder (test digits)", "",
        "| K | digits | log p(x), nats | CPU s per digit | CPU µs per sample | wall s |",
        "|---|---|---|---|---|---|",
    ]
    for i in r["importance"]:
        lines.append(f"| {i['K']} | {i['digits_done']} of {i['digits_total']} | "
                     f"{pm(i['mean'], i['stderr'])} | {sig(i['cpu_seconds_per_digit'])} | "
                     f"{sig(i['cpu_microseconds_per_sample'])} | {sig(i['wall_seconds'])} |")
    big = r["importance"][-1]
    lines += ["", f"Nested bounds L_K of the K={big['K']} run (same draws): " + ", ".join(
        f"L_{k} = {f2(v)}" for k, v in big["curve_L_K"].items()) + ".", ""]
    lines += ["## AIS against IS on the same test digits", "",
              "| T | digits | AIS log p(x) | " + " | ".join(
                  f"AIS − IS K={k} (paired)" for k in plan["is_samples"]) +
              " | chain s.e. | acceptance | gradient evals per digit | CPU s per digit | wall s |",
              "|---|---|---|" + "---|" * len(plan["is_samples"]) + "---|---|---|---|---|"]
    for a in r["ais"]:
        diffs = [a["vs_importance"].get(f"K={k}") for k in plan["is_samples"]]
        lines.append(
            f"| {a['T']} | {a['digits_done']} of {a['digits_total']} | {pm(a['mean'], a['stderr'])} | "
            + " | ".join("–" if d is None else pm(d["difference"], d["stderr"], sign=True) for d in diffs)
            + f" | {f2(a['mean_chain_stderr'], 3)} | {f2(a['mean_acceptance'])} | "
              f"{a['gradient_evaluations_per_digit']:,} | {sig(a['cpu_seconds_per_digit'])} | "
              f"{sig(a['wall_seconds'])} |")
    lines += ["", "A positive difference: AIS is higher (tighter) than IS on the same digits. "
              "Chain s.e.: the mean over digits of the delta-method standard error of one digit's "
              "AIS estimate over its chains; the bias of log-mean-of-chains is about its square / 2.",
              "", "## Cost of AIS against IS at equal accuracy", "",
              "| T | digits | K that IS needs | how | AIS CPU s per digit | IS CPU s per digit at that K "
              "| CPU ratio AIS / IS | evaluation ratio |", "|---|---|---|---|---|---|---|---|"]
    for a in r["ais"]:
        e = a.get("equal_accuracy")
        if not e:
            lines.append(f"| {a['T']} | – | – | not measured yet | | | | |")
            continue
        ext = bool(e.get("extrapolated"))
        ge, le = ("≥ ", "≤ ") if ext else ("", "")
        lines.append(f"| {a['T']} | {e['digits']} | {ge}{fmt_k(e['K'], ext)} | {e['how']} | "
                     f"{sig(e['ais_cpu_seconds_per_digit'])} | {ge}{sig(e['is_cpu_seconds_per_digit_at_K'])} | "
                     f"{le}{sig(e['cpu_ratio_ais_to_is'])} | {le}{sig(e['evaluation_ratio_ais_to_is'])} |")
    d = r["definitions"]
    lines += ["", f"Equal accuracy: {d['equal_accuracy']}. Cost ratio: {d['cost_ratio']}.", "",
              "## BDMC on digits simulated from the model", "",
              "| T | digits | lower (forward AIS) | upper (reverse AIS) | width | IS K="
              + " | IS K=".join(str(k) for k in plan["is_samples"])
              + " | IS K=" + str(plan["is_samples"][-1]) + " below lower by | acceptance fwd / rev | CPU s per digit |",
              "|---|---|---|---|---|" + "---|" * len(plan["is_samples"]) + "---|---|---|"]
    for b in r["bdmc"]:
        imp = [b["importance"][f"K={k}"] for k in plan["is_samples"]]
        lines.append(
            f"| {b['T']} | {b['digits_done']} of {b['digits_total']} | {pm(b['lower']['mean'], b['lower']['stderr'])} | "
            f"{pm(b['upper']['mean'], b['upper']['stderr'])} | {pm(b['width']['mean'], b['width']['stderr'])} | "
            + " | ".join(f2(i["mean"]) for i in imp)
            + f" | {pm(imp[-1]['below_lower_by'], imp[-1]['below_lower_stderr'])} | "
              f"{f2(b['acceptance_forward'])} / {f2(b['acceptance_reverse'])} | {sig(b['cpu_seconds_per_digit'])} |")
    lines += ["", "Nats per digit, ± standard error over digits. Both AIS bounds hold in "
              "expectation; the true log p(x) of the simulated digits lies between them, so the "
              "width bounds the error of forward AIS, and IS's distance below the lower bound is "
              "at least its error.", "", "## Progress and time", "",
              "| part | units | CPU s | wall s | CPU hours left (estimate) |", "|---|---|---|---|---|"]
    for p in r["parts"]:
        left = r["cpu_hours_left_estimate"].get(p["part"])
        lines.append(f"| {p['part']} | {p['units_done']} of {p['units_total']} | {sig(p['cpu_seconds'])} | "
                     f"{sig(p['wall_seconds'])} | {'0' if p['complete'] else f2(left, 1)} |")
    lines += ["", f"Times: {d['times']}. State: `{r['state']}`; an invocation continues the run "
              "(see the script's docstring)."]
    path.write_text("\n".join(lines) + "\n")


def snippet(r: dict[str, Any]) -> str:
    """The README's 'Estimating log p(x)' figures: a compact table and when to use which."""
    plan, model = r["plan"], r["model"]
    kmax = max(plan["is_samples"])
    if model.get("trained_here"):
        which = describe_model(model)
    else:
        which = f"`{Path(str(model.get('source'))).name}` of the MNIST reproduction at epoch {model['epochs']}"
        nll = model.get("test_nll_of_its_run")
        if nll:
            which += f" (its run's test NLL {nll['nll']:.2f} at epoch {nll['epochs']})"
    partial = [s.replace(" (partial)", "") for s in r["status"] if s.endswith("(partial)")]
    lines = [
        f"Measured (`benchmarks/estimators_mnist.py`, {'complete' if r['complete'] else 'partial: ' + '; '.join(partial)}): "
        f"a 784-200-200-50 tanh VAE, {which}, "
        f"first {plan['test_points']} test digits; AIS from q(z|x) with {plan['chains']} chains and "
        f"{plan['leapfrog_steps']} leapfrog steps; CPU seconds per digit on one thread. Full tables: "
        "[benchmarks/results/estimators_mnist.md](benchmarks/results/estimators_mnist.md).", "",
        "| estimator | digits | log p(x), nats | vs IS K=" + str(kmax) + " (paired) | CPU s per digit |",
        "|---|---|---|---|---|",
    ]
    for i in r["importance"]:
        lines.append(f"| IS, K={i['K']} | {i['digits_done']} | {pm(i['mean'], i['stderr'])} | | "
                     f"{sig(i['cpu_seconds_per_digit'])} |")
    for a in r["ais"]:
        if not a["digits_done"]:
            continue
        dv = a["vs_importance"].get(f"K={kmax}")
        lines.append(f"| AIS, T={a['T']} | {a['digits_done']} | {pm(a['mean'], a['stderr'])} | "
                     f"{'–' if dv is None else pm(dv['difference'], dv['stderr'], sign=True)} | "
                     f"{sig(a['cpu_seconds_per_digit'])} |")
    for b in r["bdmc"]:
        if not b["digits_done"]:
            continue
        imp = b["importance"][f"K={kmax}"]
        lines.append(f"| BDMC, T={b['T']} (simulated digits) | {b['digits_done']} | "
                     f"[{f2(b['lower']['mean'])}, {f2(b['upper']['mean'])}], width {pm(b['width']['mean'], b['width']['stderr'])} | "
                     f"IS K={kmax} {f2(imp['below_lower_by'])} below the lower bound | {sig(b['cpu_seconds_per_digit'])} |")
    lines += ["", *when_to_use(r)]
    return "\n".join(lines) + "\n"


def when_to_use(r: dict[str, Any]) -> list[str]:
    plan = r["plan"]
    kmax = max(plan["is_samples"])
    is_big = r["importance"][-1]  # the largest K (is_samples is sorted)
    done_ais = [a for a in r["ais"] if a["digits_done"] and a["vs_importance"].get(f"K={kmax}")]
    done_bdmc = [b for b in r["bdmc"] if b["digits_done"]]
    out = ["**When to use which.**"]
    text = (f"Importance sampling with the encoder (K = {kmax}: "
            f"{sig(is_big['cpu_seconds_per_digit'])} CPU s per digit) is the cheap default and the "
            "number the literature reports; it is a stochastic lower bound.")
    if done_ais:
        a = done_ais[-1]
        dv = a["vs_importance"][f"K={kmax}"]
        gap, se = dv["difference"], dv["stderr"]
        significant = se is not None and math.isfinite(se) and abs(gap) > 2 * se
        text += (f" AIS (T = {a['T']}) lands {f2(abs(gap))} ± {f2(se)} nats "
                 f"{'above' if gap > 0 else 'below'} it on the same digits"
                 f"{'' if significant else ' (within noise)'} at "
                 f"{sig(a['cpu_seconds_per_digit'] / is_big['cpu_seconds_per_digit']) if is_big['cpu_seconds_per_digit'] else '–'}x the CPU time")
        e = a.get("equal_accuracy") or {}
        if e.get("cpu_ratio_ais_to_is"):
            if e.get("extrapolated"):
                text += (f"; IS would need K ≳ {fmt_k(e['K'], True)} samples to match it "
                         f"(extrapolated), so at equal accuracy AIS costs at most "
                         f"{sig(e['cpu_ratio_ais_to_is'])}x the CPU time of IS")
            else:
                text += (f"; IS matches it at K ≈ {fmt_k(e['K'])}, so at equal accuracy AIS "
                         f"costs {sig(e['cpu_ratio_ais_to_is'])}x the CPU time of IS")
        text += "."
    out.append(text)
    out.append("Use AIS to check IS on a few hundred digits (a paired difference has a small standard "
               "error) and to report log p(x) when the encoder is poor or the bound must be tight; "
               "its cost grows linearly with T and the chains.")
    if done_bdmc:
        b = done_bdmc[-1]
        imp = b["importance"][f"K={kmax}"]
        out.append(f"BDMC brackets log p(x) on digits simulated from the model: at T = {b['T']} the "
                   f"sandwich is {pm(b['width']['mean'], b['width']['stderr'])} nats wide and IS "
                   f"K = {kmax} falls {pm(imp['below_lower_by'], imp['below_lower_stderr'])} nats "
                   "below it. Use it to choose T for AIS (where the width is negligible) and to "
                   "measure IS's error, not as a test-set score.")
    return out


# ----------------------------------------------------------------------------------- main
def machine_info(threads: int) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    return {"python": platform.python_version(), "torch": torch.__version__, "threads": threads,
            "cpu": f"{cpu}, {os.cpu_count()} cores shared with other jobs"}


def report(state: Path, out: Path, snippet_path: Path, plan: dict[str, Any], model: dict[str, Any],
           units: list[Unit], ais_steps: list[int], machine: dict[str, Any], quick: bool) -> dict[str, Any]:
    done = load_units(state, units)
    r = summarize(state, plan, model, units, done, ais_steps, machine)
    name = f"{NAME}_quick" if quick else NAME
    text = json.dumps(r, indent=2, allow_nan=False)
    for folder in dict.fromkeys([state, out]):
        write_atomic(folder / f"{name}.json", text)
        md = folder / f"{name}.md"
        write_markdown(md.with_suffix(".tmp"), r)
        os.replace(md.with_suffix(".tmp"), md)
    write_atomic(snippet_path, snippet(r))
    return r


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except BenchmarkError as e:
        print(f"{NAME}: {e}", file=sys.stderr, flush=True)
        return 2


def hold_lock(state: Path) -> Any:
    """One invocation runs units in a state folder at a time (``--report`` needs no lock)."""
    import fcntl

    f = open(state / ".lock", "a+")  # noqa: SIM115 -- held open until the process exits
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        raise BenchmarkError(f"another invocation is running on {state} (pid {f.read().strip() or '?'}); "
                             "wait for it, stop it, or pass --report to rewrite the results") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


def _sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    from pyrovae import load_model
    from pyrovae.data import load_dataset

    tmp_state = None
    if args.state is None and args.quick:
        tmp_state = Path(tempfile.mkdtemp(prefix="estimators_mnist_quick_"))
    state = (args.state or tmp_state or DEFAULT_STATE).resolve()
    state.mkdir(parents=True, exist_ok=True)
    lock = None if args.report else hold_lock(state)  # noqa: F841 -- held until exit
    plan = resolve_plan(args, state)
    root = args.data_root or os.environ.get("PYROVAE_DATA")
    if plan["dataset"] != "default" and not root:
        raise BenchmarkError(f"dataset {plan['dataset']!r} needs the data root: pass --data-root "
                             "or set PYROVAE_DATA (e.g. ../shared/data)")
    x = load_test(plan, root)
    sha = digits_sha(x)
    if plan.setdefault("test_digits_sha256", sha) != sha:
        raise BenchmarkError(f"the test digits differ from those {state} was started on "
                             "(another data root or torch version?)")
    if not (state / "plan.json").is_file():
        write_atomic(state / "plan.json", json.dumps(plan, indent=2))
    if not (state / "model" / "model.json").is_file():
        train = None
        if args.model is None:
            train = load_dataset(plan["dataset"], "train", root=root, binarize="dynamic")
        freeze_model(args, plan, state, train)
    model = json.loads((state / "model" / "model.json").read_text())
    if args.model is not None and model.get("source") != str(args.model.resolve()):
        print(f"{NAME}: note: {state} scores its frozen model ({describe_model(model)}), "
              f"not --model {args.model}", flush=True)
    vae = load_model(state / "model")

    saved_steps = state / "ais_steps.json"
    if args.ais_steps is not None:
        ais_steps = sorted(set(args.ais_steps))
        if any(s < 1 for s in ais_steps):
            raise BenchmarkError(f"--ais-steps must be positive integers, got {args.ais_steps}")
        write_atomic(saved_steps, json.dumps(ais_steps))
    elif saved_steps.is_file():
        ais_steps = json.loads(saved_steps.read_text())
    else:
        ais_steps = QUICK_AIS_STEPS if plan["quick"] else DEFAULT_AIS_STEPS
    units = make_units(plan, ais_steps)
    quick = plan["quick"]
    snippet_path = args.snippet or (args.out / f"{NAME}_quick_snippet.md" if quick else SNIPPET)
    machine = machine_info(args.threads)

    def rewrite() -> dict[str, Any]:
        return report(state, args.out, snippet_path, plan, model, units, ais_steps, machine, quick)

    rewrite()
    if args.report:
        print(f"{NAME}: rewrote the results from {state}", flush=True)
        return 0
    old = signal.signal(signal.SIGTERM, _sigterm)
    t_start = time.perf_counter()
    ran = 0
    stopped = "everything is done"
    try:
        done = load_units(state, units)
        todo = [u for u in units if u.name not in done]
        print(f"{NAME}: {len(units) - len(todo)} of {len(units)} units done; state {state}", flush=True)
        for u in todo:
            if args.max_units is not None and ran >= args.max_units:
                stopped = f"--max-units {args.max_units} reached"
                break
            if args.max_hours is not None:
                same = [done[v.name]["wall_seconds"] for v in units if v.part == u.part and v.name in done]
                guess = sum(same) / len(same) if same else 0.0
                if time.perf_counter() - t_start + guess > args.max_hours * 3600:
                    stopped = f"--max-hours {args.max_hours} reached (next unit ~{guess / 60:.0f} min)"
                    break
            print(f"{NAME}: {u.name} ({u.size} digits, {u.start}..{u.stop - 1}) ...", flush=True)
            rec = run_unit(u, vae, x, plan)
            write_atomic(unit_path(state, u), json.dumps(rec))
            done[u.name] = rec
            ran += 1
            r = rewrite()
            print(f"{NAME}: {u.name} done in {rec['wall_seconds']:.0f} s wall, "
                  f"{rec['cpu_seconds']:.0f} s CPU; "
                  + next(s for s, p in zip(r["status"], r["parts"]) if p["part"] == u.part),
                  flush=True)
    except KeyboardInterrupt:
        stopped = "interrupted; the unit in progress is lost, finished ones are saved"
        rewrite()
        print(f"{NAME}: {stopped}", flush=True)
        return 130
    finally:
        signal.signal(signal.SIGTERM, old)
    r = rewrite()
    print(f"{NAME}: stopped ({stopped}) after {ran} unit(s); " + "; ".join(r["status"]), flush=True)
    if tmp_state is not None:
        shutil.rmtree(tmp_state, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
