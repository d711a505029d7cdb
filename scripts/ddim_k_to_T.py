"DDIM as k -> T (issue 16 item 5): the sampler on a Gaussian toy with an exact eps model, and the shipped SR3 against diffusers DDIM. Usage: python scripts/ddim_k_to_T.py [out.json]"
import json, math, time, sys
import torch
torch.set_num_threads(1)
from diffsr_kit.diffusion import Diffusion, DiffusionConfig
from diffsr_kit.samplers import ddim_sample, ddpm_sample, GaussianMixture1D, mixture_eps_model
from diffsr_kit.schedules import get_schedule
out = {}
# 1. toy: x0 ~ N(mu, s^2) per pixel; the probability-flow ODE maps x_T to mu + s (x_T - a_T mu) / sqrt(a_T^2 s^2 + 1 - a_T^2)
mu, s = 0.3, 0.2
gm = GaussianMixture1D(means=(mu,), stds=(s,), weights=(1.0,))
for name in ('linear', 'cosine'):
    sch = get_schedule(name, 1000)
    fn = mixture_eps_model(sch, gm)
    xT = torch.randn(4096, 1, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64).float()
    aT = math.sqrt(float(sch.abar.double()[-1]))
    exact = mu + s * (xT.double() - aT * mu) / math.sqrt(aT ** 2 * s ** 2 + 1 - aT ** 2)
    for k in (10, 50, 250, 500, 1000):
        x = ddim_sample(fn, xT.shape, sch, steps=k, x_T=xT, progress=False)
        err = (x.double() - exact).abs()
        out[f'toy/{name}/ddim{k}'] = dict(max_err=float(err.max()), mean_err=float(err.mean()), std=float(x.double().std()))
        print(name, k, out[f'toy/{name}/ddim{k}'], flush=True)
# 2. shipped SR3: ours vs diffusers' DDIMScheduler at k = T/2 and T, and the PSNR of DDIM-k / DDPM-1000
from diffsr_kit.train import load_task
from diffsr_kit.tasks import unet_fn
from diffsr_kit.quality import quality_images, protocol_lr
from diffsr_kit.bench import diffusers_loop
from diffsr_kit.metrics import psnr
from diffsr_kit.core import from_model
imgs = quality_images(size=64)
name = [n for n in imgs if 'astronaut' in n][0]
hr = imgs[name][None]
lr = protocol_lr(hr) * 2 - 1
task = load_task('assets/tiny_sr3_x4', 'cpu')
mods = task.eval_modules
fn = unet_fn(mods['unet'], task.diffusion, lr=lr)
shape = task.chain_shape(lr)
dec = lambda x: from_model(task.decode_chain(x, lr, mods))
for k in (10, 50, 250, 500, 1000):
    t0 = time.time(); x = ddim_sample(fn, shape, task.diffusion, steps=k, seed=0, progress=False)
    out[f'sr3/ddim{k}'] = dict(psnr=float(psnr(dec(x), hr)), s=round(time.time() - t0, 1))
    if k in (500, 1000):
        xl = x if k == 1000 else ddim_sample(fn, shape, task.diffusion, steps=k, seed=0, progress=False, spacing='leading')
        ref = diffusers_loop(fn, shape, task.diffusion, 'ddim', k, 0, 'cpu', spacing='leading')
        out[f'sr3/ddim{k}']['diffusers_psnr'] = float(psnr(dec(ref), hr))
        out[f'sr3/ddim{k}']['max_diff_vs_diffusers'] = float((xl - ref).abs().max())
    print(k, out[f'sr3/ddim{k}'], flush=True)
x = ddpm_sample(fn, shape, task.diffusion, seed=0, progress=False)
out['sr3/ddpm1000'] = dict(psnr=float(psnr(dec(x), hr)))
print(out['sr3/ddpm1000'])
json.dump(out, open(sys.argv[1] if len(sys.argv) > 1 else 'ddim_k_to_T.json', 'w'), indent=1)
