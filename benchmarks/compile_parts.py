"""fit(compile=True) across parts: for 8 prior x family x likelihood combinations (every prior,
every family, four likelihoods), two epochs eager and compiled from the same start; prints the
per-epoch training objectives of each (equal to float rounding when the compiled loss draws the
eager noise) and the seconds (compiling included).

Run: ``python benchmarks/compile_parts.py`` (results: ``results/compile_parts.txt``).
"""
import time, torch, pyro, warnings, json
from pyrovae.build import VAEConfig, build_vae
from pyrovae import fit
torch.set_num_threads(1)
warnings.simplefilter("ignore")
g = torch.Generator().manual_seed(0)
data = torch.bernoulli(torch.rand(64, 16, generator=g) * 0.5, generator=g)
cont = torch.rand(64, 16, generator=g) * 0.9 + 0.05
combos = [("vamp", "diagonal", "bernoulli"), ("mixture", "iaf", "bernoulli"), ("flow", "planar", "bernoulli"),
          ("standard", "full_rank", "gaussian"), ("learned", "spline", "continuous_bernoulli"),
          ("standard", "householder", "laplace"), ("standard", "local", "bernoulli"), ("standard", "radial", "bernoulli")]
out = {}
for prior, fam, lik in combos:
    x = data if lik == "bernoulli" else cont
    res = []
    for c in (False, True):
        torch.manual_seed(1); pyro.clear_param_store()
        try:
            vae = build_vae(VAEConfig(num_features=16, latent_dim=2, hidden_dims=(8,), prior=prior, family=fam, likelihood=lik), num_data=64)
            t0 = time.perf_counter()
            h = fit(vae, x, num_epochs=2, batch_size=16, progress=False, compile=c)
            res.append((h.train_objective, round(time.perf_counter() - t0, 1)))
        except Exception as e:
            res.append(f"{type(e).__name__}: {str(e)[:200]}")
    out[f"{prior}/{fam}/{lik}"] = res
    print(f"{prior}/{fam}/{lik}", res, flush=True)
