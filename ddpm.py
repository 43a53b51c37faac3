"""Stage 2 of Diffuse-TreeVAE: a leaf-conditioned DDPM that refines the TreeVAE's blurry leaf images.

Papers: Ho, Jain & Abbeel 2020, "Denoising Diffusion Probabilistic Models" (DDPM); Song, Meng & Ermon 2021,
"Denoising Diffusion Implicit Models" (DDIM); Nichol & Dhariwal 2021 (cosine schedule, scale-shift norm);
Pandey et al. 2022, DiffuseVAE (conditioning by concatenation, "Formulation 1"). Settings: the ddpm section of the
authors' configs/mnist.yml (github.com/JoGo175/diffuse-treevae): T 1000, beta 1e-4 -> 0.02, U-Net dim 64,
dim_mults 1,2,2,2, 2 residual blocks, dropout 0.3, Adam 2e-4 with 5,000 warm-up steps, grad clip 1.0, EMA 0.9999,
batch 256, 1,000 epochs, the leaf index as the conditioning "latent" (z_dim 1, type form1), no classifier-free
dropout (cfd_rate 0), 1000-step ancestral sampling with the "fixedlarge" variance. [ours]: data in [-1, 1] (their
norm flag), DDIM beside the ancestral sampler, a bias-corrected EMA and the predicted x_0 clipped (below).
Order of this file: configuration, the diffusion process (schedule, loss, samplers), the U-Net, EMA and the
training step; then, as optional reading, the exact CPU rewrites (UpConv, dropout).

Legend (paper symbol -> code name). Paper time t = 1..T is code index t = 0..T-1 (tensor position).
  beta_t = betas[t]   alpha_t = 1 - beta_t = alphas[t]   alpha_bar_t = prod_{s<=t} alpha_s = alpha_bar[t]
  sqrt(alpha_bar_t) = sqrt_alpha_bar   sqrt(1 - alpha_bar_t) = sqrt_one_minus_alpha_bar
  alpha_bar_{t-1} = alpha_bar_prev (= 1 at the first step)   beta~_t = posterior_var
  eps = the Gaussian noise, eps_theta(x_t, t, x_hat, l) = UNet(x_t, t, cond=x_hat, leaf=l)

Forward process (Eq. 4):   q(x_t | x_0) = N(sqrt_alpha_bar * x_0, (1 - alpha_bar) I)          -> q_sample
Loss (Eq. 14, Alg. 1):     E_{t ~ U, eps ~ N(0,I)} || eps - eps_theta(x_t, t) ||^2           -> Diffusion.loss
                           (Eq. 12, the bound's eps-form term, with its per-t weight dropped: "L_simple")
Posterior (Eq. 6-7):       q(x_{t-1} | x_t, x_0) = N(mu~, beta~ I),
                           mu~ = coef_x0 * x_0 + coef_xt * x_t,  beta~ = (1 - alpha_bar_prev)/(1 - alpha_bar) beta
                                                                                            -> Diffusion.posterior
Ancestral sampling (Alg. 2, Eq. 11):
  x_{t-1} = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - alpha_bar_t) eps_theta) + sigma_t z,
  sigma_t^2 = beta_t ("fixed large", the authors' choice) or beta~_t ("fixed small")        -> sample_ddpm
Respacing (Nichol & Dhariwal 2021, Sec. 4): sample on a sub-sequence S = (s_1 < ... < s_K) of the T steps with
  the betas that keep alpha_bar on S unchanged, beta_k = 1 - alpha_bar_{s_k} / alpha_bar_{s_{k-1}}: the same
  ancestral sampler on a K-step process whose marginals q(x_{s_k} | x_0) are the trained ones; the network is
  called with the original index s_k. With S = all T steps it is Alg. 2 again.                 -> respaced
  clip=True (default, as in Ho et al.'s code, `clip_denoised`): the same mean written as the posterior mean
  mu~(x0_pred, x_t) with x0_pred = (x_t - sqrt(1 - alpha_bar_t) eps_theta) / sqrt(alpha_bar_t) clipped to [-1, 1];
  identical to Eq. 11 while x0_pred is in range, and it stops an imperfect eps_theta from drifting off the data.
DDIM (Song et al. Eq. 12), on a sub-sequence of steps t -> t_prev:
  x0_pred = (x_t - sqrt(1 - alpha_bar_t) eps_theta) / sqrt(alpha_bar_t)
  x_prev  = sqrt(alpha_bar_prev) x0_pred + sqrt(1 - alpha_bar_prev - sigma^2) eps_theta + sigma z,
  sigma   = eta sqrt((1 - alpha_bar_prev)/(1 - alpha_bar_t)) sqrt(1 - alpha_bar_t/alpha_bar_prev)  -> sample_ddim
  (eta = 0: deterministic; eta = 1 with all T steps: exactly the fixed-small ancestral sampler.)
  clip=True: x0_pred clipped to [-1, 1] and eps_theta re-derived from it (improved-diffusion's DDIM does the same).

All images here are in [-1, 1]; the caller maps a TreeVAE image x_hat in [0, 1] with 2 * x_hat - 1.
Use: cfg = ddpm_config("mnist", "paper", n_leaves=10); model = UNet(cfg); diffusion = Diffusion(cfg);
     ema = EMA(model, cfg.ema_decay); opt = make_optimizer(model, cfg);
     loss = train_step(model, ema, diffusion, opt, x0, cond, leaf, cfg, step);
     x = diffusion.sample_ddim(ema.model, x0.shape, cond, leaf, steps=100)
"""
import copy
import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from data import batch_random, setting, world


class DDPMError(Exception):
    """A user-facing error: the message names the cause and the remedy in one line."""


@dataclass
class DDPMConfig:
    # flag=False: set by ddpm_config from the data set and by train.py from the tree, not user settings
    dataset: str = setting("mnist", "data set the config was made for", flag=False)
    image_channels: int = setting(1, "C of the data (and of the conditioning image x_hat)", flag=False)
    image_size: int = setting(28, "image height = width, pixels", flag=False)
    # noise schedule (Ho et al. section 4: T = 1000, linear beta 1e-4 -> 0.02)
    T: int = setting(1000, "diffusion steps (the linear schedule needs T > 1000 max(beta_1, beta_T): 20)", ge=1)
    schedule: str = setting("linear", "noise schedule: linear | cosine (Nichol & Dhariwal Eq. 17)",
                            choices=("linear", "cosine"))
    beta_1: float = setting(1e-4, "first beta of the linear schedule, at T = 1000 (scaled by 1000/T)", gt=0, lt=1)
    beta_T: float = setting(0.02, "last beta of the linear schedule, at T = 1000 (scaled by 1000/T)", gt=0, lt=1)
    var_type: str = setting("fixed_large", "ancestral sampler's sigma_t^2: fixed_large (beta) | fixed_small "
                            "(beta~)", choices=("fixed_large", "fixed_small"))
    # U-Net (DiffuseVAE's setting: ~9.3 M parameters)
    base_channels: int = setting(64, "U-Net channels at full resolution", ge=1)
    channel_mult: tuple = setting((1, 2, 2, 2), "channel multiplier per resolution level (each level halves "
                                                "the size)", ge=1)
    num_res_blocks: int = setting(2, "residual blocks per level", ge=1)
    dropout: float = setting(0.3, "dropout probability in the residual blocks", ge=0, lt=1)
    n_leaves: int = setting(0, "leaf conditioning: train.py sets the tree's leaf count; 0 turns it off (an "
                               "ablation)", choices=(0,))
    cond_image: bool = setting(True, "concatenate the TreeVAE image x_hat to x_t (false: no image conditioning)")
    # optimisation (Adam, as DiffuseVAE)
    lr: float = setting(2e-4, "Adam learning rate (after the warm-up)", gt=0)
    warmup: int = setting(5000, "steps of linear learning-rate warm-up", ge=0)
    grad_clip: float = setting(1.0, "max global gradient norm; 0: no clipping", ge=0)
    ema_decay: float = setting(0.9999, "decay of the weights' exponential moving average (sampled with)", ge=0, lt=1)
    batch_size: int = setting(256, "images per step", ge=1)
    epochs: int = setting(1000, "epochs over the training split", ge=0)
    max_steps: int = setting(0, "stop after this many optimiser steps; 0: no limit besides --ddpm-epochs", ge=0)
    # sampling: the figures' and FID's DDIM settings in train.py, and sample.py's defaults (saved in ddpm.pt)
    ddim_steps: int = setting(100, "DDIM steps (--sampler ddim; at most T)", ge=1)
    respace_steps: int = setting(0, "ancestral sampler's steps (--sampler ddpm): 0 = all T (Ho et al. Alg. 2); "
                                    "K < T: T respaced to K steps (Nichol & Dhariwal Sec. 4)", ge=2, off=0)
    ddim_eta: float = setting(0.0, "DDIM noise: 0 deterministic, 1 = ancestral with the fixed-small variance "
                                   "(--sampler ddim)", ge=0, le=1)


# Presets are named configs; ddpm_config fills in the data set's shape and the tree's leaf count.
PRESETS = {
    "paper": DDPMConfig(),
    # Same U-Net, a short run (about 12k steps on MNIST, 1,860 on the 9k-digit subset); a 0.9999 EMA would
    # average over ~10k steps (its horizon 1/(1 - decay)), most of such a run, so the EMA is shorter too.
    "fast": DDPMConfig(epochs=60, warmup=1000, ema_decay=0.999),
    # A laptop's scale for both stages (train.py --preset cpu): the U-Net shrunk to ~1.16 M parameters (base width
    # 32, multipliers 1-2-2, one block per level), batch 64, 3,150 steps (the README's measured CPU run: ~40 min on
    # 2 cores), the bias-corrected EMA at 0.999 as in 'fast', and for the figures and the evaluation the ancestral
    # sampler respaced to 100 steps with the fixed-small variance beta~ (Nichol & Dhariwal Sec. 4 found beta~ the
    # better fixed choice at few steps; it is DDIM with eta 1 on the same steps). Measured (README): its FID lies
    # inside the interval of the authors' 1,000-step fixed-large sampler; respaced with beta (fixed large) it does
    # not, even at 250 steps.
    "cpu": DDPMConfig(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, batch_size=64, epochs=1000,
                      max_steps=3150, warmup=1000, ema_decay=0.999, respace_steps=100, var_type="fixed_small"),
    # Tiny, for end-to-end CI runs in seconds: nothing here is meant to produce good images.
    "smoke": DDPMConfig(T=50, base_channels=16, channel_mult=(1, 2), num_res_blocks=1, dropout=0.0,
                        batch_size=8, epochs=1, max_steps=4, warmup=2, ema_decay=0.9, ddim_steps=5),
}


def ddpm_config(dataset="mnist", preset="paper", n_leaves=0):
    """The preset's config for a data set ('mnist', 'fashion_mnist', 'cifar10' and aliases)."""
    if preset not in PRESETS:
        raise DDPMError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    name = dataset.lower().replace("-", "_")
    name = {"fmnist": "fashion_mnist", "cifar": "cifar10", "cifar_10": "cifar10"}.get(name, name)
    shapes = {"mnist": (1, 28), "fashion_mnist": (1, 28), "cifar10": (3, 32)}   # (channels, size), as data.DATASETS
    if name not in shapes:
        raise DDPMError(f"unknown data set {dataset!r}; choose one of {sorted(shapes)}")
    C, size = shapes[name]
    return dataclasses.replace(PRESETS[preset], dataset=name, image_channels=C, image_size=size,
                               n_leaves=int(n_leaves))


def check(cfg):
    """Refuse a config whose noise schedule cannot work (DDPMError, one line; train.py calls it while parsing): the
    linear schedule scales beta_1, beta_T by 1000/T, and every beta must stay below 1 (alpha_t = 1 - beta_t > 0,
    else sqrt(alpha_bar) is NaN), so a short T needs smaller betas (the smoke preset's T = 50 gives beta_T = 0.4)."""
    top = max(cfg.beta_1, cfg.beta_T) * 1000 / cfg.T
    if cfg.schedule == "linear" and top >= 1:
        raise DDPMError(f"the linear schedule with T = {cfg.T} scales beta up to {max(cfg.beta_1, cfg.beta_T):g} x "
                        f"1000/{cfg.T} = {top:g}, but every beta must be < 1: raise T above "
                        f"{math.floor(1000 * max(cfg.beta_1, cfg.beta_T))}, lower beta_1/beta_T or use the cosine "
                        f"schedule")
    return cfg


# ----------------------------------------------------------------------------- the diffusion process
class Diffusion:
    """The schedule (float64, built once) and the math of training and sampling; holds no weights."""

    def __init__(self, cfg):
        self.cfg, T = cfg, cfg.T
        if cfg.schedule == "linear":                         # Ho et al. section 4
            # beta_1, beta_T are meant for T = 1000; for other T scale them by 1000/T (Nichol & Dhariwal's
            # code) so that alpha_bar_T stays ~4e-5: otherwise x_T ~ N(0, I) is not what training saw.
            scale = 1000 / T
            betas = torch.linspace(scale * cfg.beta_1, scale * cfg.beta_T, T, dtype=torch.float64)
        elif cfg.schedule == "cosine":                       # Nichol & Dhariwal Eq. 17, s = 0.008
            s = 0.008
            f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + s) / (1 + s) * math.pi / 2) ** 2
            betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)    # their clip: avoids a singular last step
        else:
            raise DDPMError(f"unknown schedule {cfg.schedule!r}; use 'linear' or 'cosine'")
        if cfg.var_type not in ("fixed_large", "fixed_small"):
            raise DDPMError(f"unknown var_type {cfg.var_type!r}; use 'fixed_large' or 'fixed_small'")
        self._derive(betas, torch.arange(T))

    def _derive(self, betas, timesteps):
        """Every schedule array from the betas (K,) of the process sampled, and the network's time index of each
        of its K steps (timesteps (K,): 0..T-1 for the trained process, a sub-sequence after respacing)."""
        # Everything derived in float64 (alpha_bar_T ~ 4e-5 loses digits in float32); cast where used.
        self.timesteps = timesteps                                          # (K,) int64, what the U-Net sees
        self.betas = betas                                                  # (K,)
        self.alphas = 1 - betas
        self.alpha_bar = torch.cumprod(self.alphas, 0)
        self.alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alpha_bar[:-1]])
        self.sqrt_alpha_bar = self.alpha_bar.sqrt()
        self.sqrt_one_minus_alpha_bar = (1 - self.alpha_bar).sqrt()
        # Eq. 7: posterior variance beta~_t and the two coefficients of its mean mu~_t(x_t, x_0)
        self.posterior_var = betas * (1 - self.alpha_bar_prev) / (1 - self.alpha_bar)
        self.coef_x0 = betas * self.alpha_bar_prev.sqrt() / (1 - self.alpha_bar)
        self.coef_xt = (1 - self.alpha_bar_prev) * self.alphas.sqrt() / (1 - self.alpha_bar)
        # Eq. 11's coefficients: x_{t-1} mean = (x_t - eps_coef * eps) / sqrt(alpha_t)
        self.eps_coef = betas / self.sqrt_one_minus_alpha_bar
        self.sqrt_recip_alpha = 1 / self.alphas.sqrt()

    def respaced(self, steps):
        """A Diffusion on `steps` of the T steps, evenly spaced from the last to the first (Nichol & Dhariwal's
        space_timesteps; the first and the last step always included), with betas_k = 1 - alpha_bar[s_k] /
        alpha_bar[s_{k-1}] so that alpha_bar on those steps is unchanged (module docstring). Only sample_ddpm uses
        it (training is on the full process). Raises DDPMError unless 2 <= steps <= T."""
        T = len(self.alpha_bar)
        if not 2 <= steps <= T:
            raise DDPMError(f"respaced steps={steps} must be between 2 and T={T}")
        s = torch.linspace(0, T - 1, steps, dtype=torch.float64).round().long()         # (K,) ascending, unique
        a = self.alpha_bar.cpu()[s]
        out = copy.copy(self)
        out._derive(1 - a / torch.cat([torch.ones(1, dtype=a.dtype), a[:-1]]), s)      # beta_1 = 1 - alpha_bar_1
        return out.to(self.betas.device)

    def to(self, device):
        """Move the schedule to a device (done on first use); MPS has no float64, so float32 there."""
        dtype = torch.float32 if torch.device(device).type == "mps" else torch.float64
        for k, v in vars(self).items():
            if torch.is_tensor(v):                          # timesteps stay integers
                setattr(self, k, v.to(device, dtype) if v.is_floating_point() else v.to(device))
        return self

    def _extract(self, a, t, x):
        """a[t] shaped (B, 1, 1, 1) in x's dtype, to broadcast against images."""
        return a[t].to(x.dtype).view(-1, *([1] * (x.dim() - 1)))

    def q_sample(self, x0, t, noise):
        """Eq. 4 via reparameterisation: x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps."""
        if self.betas.device != x0.device:
            self.to(x0.device)
        return self._extract(self.sqrt_alpha_bar, t, x0) * x0 + self._extract(self.sqrt_one_minus_alpha_bar, t, x0) * noise

    def loss(self, model, x0, cond=None, leaf=None):
        """Algorithm 1 / Eq. 14: MSE between the noise and its prediction, t ~ Uniform{1..T}. Scalar."""
        # Under torchrun x0 is this process's shard of the global batch, and t and eps are its rows of the global
        # batch's draws (data.batch_random); with one process these are torch.randint and torch.randn_like.
        t = batch_random(lambda u: u.random_(0, self.cfg.T), (x0.shape[0],), torch.long, x0.device)  # (B,) line 3
        noise = batch_random(lambda u: u.normal_(), x0.shape, x0.dtype, x0.device)    # (B, C, H, W)  line 4
        eps_pred = model(self.q_sample(x0, t, noise), t, cond, leaf)             # line 5's eps_theta(x_t, t)
        # Under bf16 autocast the U-Net returns bf16; the loss itself is computed in float32.
        return F.mse_loss(eps_pred.float(), noise.float())

    def predict_x0(self, x_t, t, eps):
        """Eq. 4 solved for x_0: (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)."""
        return (x_t - self._extract(self.sqrt_one_minus_alpha_bar, t, x_t) * eps) / self._extract(self.sqrt_alpha_bar, t, x_t)

    def posterior(self, x0, x_t, t):
        """Eq. 6-7: mean and variance of q(x_{t-1} | x_t, x_0); variance is (B, 1, 1, 1)."""
        if self.betas.device != x0.device:
            self.to(x0.device)
        mean = self._extract(self.coef_x0, t, x0) * x0 + self._extract(self.coef_xt, t, x_t) * x_t
        return mean, self._extract(self.posterior_var, t, x0)

    def _start(self, model, shape, cond, leaf, noise, generator):
        """Common sampler set-up: the device, x_T ~ N(0, I) (or the given noise), a range check on cond."""
        given = [v for v in (noise, cond, leaf) if v is not None]
        device = given[0].device if given else next(model.parameters()).device
        if self.betas.device != device:
            self.to(device)
        if cond is not None and not (-1.001 <= float(cond.min()) and float(cond.max()) <= 1.001):
            raise DDPMError("cond is outside [-1, 1]; pass the TreeVAE image as 2 * x_hat - 1")
        x = noise.clone() if noise is not None else torch.randn(shape, generator=generator, device=device)
        return x, device

    def _z(self, x, generator, last):
        """Fresh noise for one reverse step; none is added after the last step (Alg. 2 line 3)."""
        return torch.zeros_like(x) if last else torch.randn(x.shape, generator=generator, device=x.device)

    @torch.no_grad()
    def sample_ddpm(self, model, shape, cond=None, leaf=None, noise=None, generator=None, var_type=None,
                    progress=None, clip=True):
        """Algorithm 2: T ancestral steps from x_T ~ N(0, I), predicted x_0 clipped unless clip=False (module
        docstring). Returns x_0 in [-1, 1], shape `shape`.
        For "the same sample per leaf", pass the same `noise` and a generator seeded the same way per call."""
        x, device = self._start(model, shape, cond, leaf, noise, generator)     # (moves the schedule first)
        var = {"fixed_large": self.betas, "fixed_small": self.posterior_var}.get(var_type or self.cfg.var_type)
        if var is None:
            raise DDPMError(f"unknown var_type {var_type!r}; use 'fixed_large' or 'fixed_small'")
        was_training = model.training
        model.eval()                                               # dropout off while sampling
        K = len(self.betas)                                        # T, or the steps of a respaced process
        for i in reversed(range(K)):                               # Alg. 2 line 2: t = T, ..., 1
            t = torch.full((x.shape[0],), i, device=device, dtype=torch.long)    # (B,) step of this process
            eps = model(x, self.timesteps[t], cond, leaf).float()  # the network's own time index (respacing)
            if clip:   # Ho et al.'s code: x_0 predicted, clipped to the data range, then the posterior mean (Eq. 7)
                mean, _ = self.posterior(self.predict_x0(x, t, eps).clamp(-1, 1), x, t)
            else:      # Eq. 11: the same mean written with the predicted noise
                mean = self._extract(self.sqrt_recip_alpha, t, x) * (x - self._extract(self.eps_coef, t, x) * eps)
            x = mean + self._extract(var, t, x).sqrt() * self._z(x, generator, last=(i == 0))   # line 4
            if progress is not None:
                progress(K - i, K)
        model.train(was_training)
        return x.clamp(-1, 1)

    @torch.no_grad()
    def sample_ddim(self, model, shape, cond=None, leaf=None, steps=50, eta=0.0, noise=None, generator=None,
                    progress=None, clip=True):
        """Song et al. Eq. 12 on `steps` evenly spaced timesteps (from T-1 down to 0), predicted x_0 clipped unless
        clip=False. Returns x_0 in [-1, 1]."""
        if not 1 <= steps <= self.cfg.T:
            raise DDPMError(f"DDIM steps={steps} must be between 1 and T={self.cfg.T}")
        x, device = self._start(model, shape, cond, leaf, noise, generator)
        # Include the last step T-1 (start from pure noise) and 0 ("trailing" spacing, Lin et al. 2023).
        ts = torch.linspace(self.cfg.T - 1, 0, steps, dtype=torch.float64).round().long().tolist()
        was_training = model.training
        model.eval()
        for k, i in enumerate(ts):
            t = torch.full((x.shape[0],), i, device=device, dtype=torch.long)
            i_prev = ts[k + 1] if k + 1 < steps else -1                      # -1: alpha_bar_prev = 1
            a_t = self.alpha_bar[i]                                          # 0-d tensors, float64
            a_prev = self.alpha_bar[i_prev] if i_prev >= 0 else torch.ones_like(a_t)
            eps = model(x, t, cond, leaf).float()
            x0_pred = self.predict_x0(x, t, eps)                             # Eq. 12 "predicted x_0"
            if clip:                                          # keep x_0 in the data range, eps consistent with it
                x0_pred = x0_pred.clamp(-1, 1)
                eps = (x - a_t.sqrt().float() * x0_pred) / (1 - a_t).sqrt().float()
            sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()  # Eq. 16
            dir_xt = (1 - a_prev - sigma ** 2).clamp(min=0).sqrt().float() * eps  # "direction pointing to x_t"
            x = a_prev.sqrt().float() * x0_pred + dir_xt
            if eta > 0:
                x = x + sigma.float() * self._z(x, generator, last=(i_prev < 0))
            if progress is not None:
                progress(k + 1, steps)
        model.train(was_training)
        return x.clamp(-1, 1)


# ----------------------------------------------------------------------------- the U-Net
def norm(c):
    """GroupNorm with 32 groups (Ho et al.), fewer when c is small (the smoke preset's 16 channels)."""
    return nn.GroupNorm(math.gcd(32, c), c)


def timestep_embedding(t, dim):
    """Transformer sinusoids of the timestep (Ho et al. appendix B; Vaswani et al. section 3.5)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / (half - 1))   # (dim/2,)
    args = t.float()[:, None] * freqs[None]                                               # (B, dim/2)
    return torch.cat([args.sin(), args.cos()], dim=1)                                     # (B, dim)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice; the embedding (time + leaf) sets the scale and shift of the second norm."""

    def __init__(self, c_in, c_out, emb_dim, p_drop):
        super().__init__()
        self.norm1, self.conv1 = norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * c_out)                       # -> (scale, shift), Nichol & Dhariwal
        self.norm2, self.p = norm(c_out), p_drop
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)                              # each block starts as the identity
        nn.init.zeros_(self.conv2.bias)                                # (Ho et al.'s code: init_scale=0)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, emb):                                         # x (B, c_in, H, W), emb (B, emb_dim)
        h = self.conv1(F.silu(self.norm1(x)))                          # (B, c_out, H, W)
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)  # (B, c_out, 1, 1) each
        h = F.silu(torch.addcmul(shift, self.norm2(h), 1 + scale))     # norm2(h) (1 + scale) + shift
        return self.skip(x) + self.conv2(dropout(h, self.p, self.training))   # F.dropout (CPU form at the end)


class Attention(nn.Module):
    """Single-head self-attention over the pixels, in the middle block only (4x4 = 16 tokens)."""

    def __init__(self, c):
        super().__init__()
        self.norm, self.qkv, self.proj = norm(c), nn.Conv2d(c, 3 * c, 1), nn.Conv2d(c, c, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x):
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).transpose(2, 3)   # (B, 3, HW, C)
        q, k, v = qkv.unsqueeze(2).unbind(1)                                  # (B, 1, HW, C) each
        h = F.scaled_dot_product_attention(q, k, v)                           # fused softmax(q k^T / sqrt C) v
        return x + self.proj(h.squeeze(1).transpose(1, 2).reshape(B, C, H, W))


class UNet(nn.Module):
    """eps_theta(x_t, t, x_hat, l): the DDPM U-Net (Ho et al. appendix B) with DiffuseVAE conditioning."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg, ch, C = cfg, cfg.base_channels, cfg.image_channels
        emb_dim = 4 * ch
        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        # Leaf l -> learned vector -> MLP, added to the time embedding (the authors' z_cond with z_dim 1: the leaf
        # index is the conditioning signal); no leaf input when n_leaves = 0.
        self.leaf_mlp = nn.Sequential(nn.Embedding(cfg.n_leaves, ch), nn.Linear(ch, emb_dim), nn.SiLU(),
                                      nn.Linear(emb_dim, emb_dim)) if cfg.n_leaves > 0 else None
        # DiffuseVAE Formulation 1: x_hat enters as C extra input channels.
        self.conv_in = nn.Conv2d(C * (2 if cfg.cond_image else 1), ch, 3, padding=1)
        # Down path: num_res_blocks blocks per level, then a stride-2 conv (not after the last level).
        self.down, skips, c = nn.ModuleList(), [ch], ch
        for i, m in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                self.down.append(ResBlock(c, ch * m, emb_dim, cfg.dropout))
                c = ch * m
                skips.append(c)
            if i < len(cfg.channel_mult) - 1:
                self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))   # halve H, W (Ho et al.)
                skips.append(c)
        self.mid = nn.ModuleList([ResBlock(c, c, emb_dim, cfg.dropout), Attention(c),
                                  ResBlock(c, c, emb_dim, cfg.dropout)])
        # Up path: one more block per level, each eating one skip connection (concatenated channels).
        self.up = nn.ModuleList()
        for i, m in reversed(list(enumerate(cfg.channel_mult))):
            for _ in range(cfg.num_res_blocks + 1):
                self.up.append(ResBlock(c + skips.pop(), ch * m, emb_dim, cfg.dropout))
                c = ch * m
            if i > 0:
                self.up.append(UpConv(c))             # double H, W: upsample + conv3x3 (CPU rewrite at the end)
        self.norm_out, self.conv_out = norm(c), nn.Conv2d(c, C, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)          # zero output: eps_theta = 0 at start, a calm first loss
        nn.init.zeros_(self.conv_out.bias)
        self.factor = 2 ** (len(cfg.channel_mult) - 1)   # sizes must divide by this: 28 is padded to 32
        # NHWC ("channels_last") is the layout oneDNN convolves in; on CPU it also makes GroupNorm ~5x faster.
        self.memory_format = torch.channels_last
        self.to(memory_format=self.memory_format)

    def forward(self, x_t, t, cond=None, leaf=None):  # x_t, cond (B, C, H, W) in [-1, 1]; t, leaf (B,) int64
        if self.cfg.cond_image != (cond is not None) or (self.leaf_mlp is not None) != (leaf is not None):
            raise DDPMError(f"this U-Net takes cond={'image' if self.cfg.cond_image else None}, "
                            f"leaf={'index' if self.leaf_mlp is not None else None}; pass exactly those")
        emb = self.time_mlp(timestep_embedding(t, self.cfg.base_channels))              # (B, emb_dim)
        if self.leaf_mlp is not None:
            emb = emb + self.leaf_mlp(leaf)
        emb = F.silu(emb)                            # every block's Linear reads SiLU(emb): apply it once
        h = torch.cat([x_t, cond.to(x_t.dtype)], 1) if cond is not None else x_t    # (B, C_in, H, W)
        H, W = h.shape[-2:]
        ph, pw = -H % self.factor, -W % self.factor   # 28x28 -> pad 2 px each side -> 32x32
        h = F.pad(h, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        h = self.conv_in(h.contiguous(memory_format=self.memory_format))          # (B, ch, H_pad, W_pad)
        hs = [h]                                     # skip connections, consumed in reverse by the up path
        for block in self.down:
            h = block(h, emb) if isinstance(block, ResBlock) else block(h)
            hs.append(h)
        for block in self.mid:
            h = block(h, emb) if isinstance(block, ResBlock) else block(h)   # (B, ch * mult[-1], H/8, W/8)
        for block in self.up:
            h = block(torch.cat([h, hs.pop()], 1), emb) if isinstance(block, ResBlock) else block(h)
        h = self.conv_out(F.silu(self.norm_out(h)))  # (B, C, H_pad, W_pad)
        return h[..., ph // 2: ph // 2 + H, pw // 2: pw // 2 + W]                   # crop back: (B, C, H, W)


# ----------------------------------------------------------------------------- EMA, optimiser, one step
class EMA:
    """Exponential moving average of the weights, bias-corrected [ours]: after n updates with weights theta_1..n,
        theta_ema = sum_k decay^(n-k) (1 - decay) theta_k / (1 - decay^n),
    i.e. update k is  theta_ema <- theta_ema + w_k (theta_k - theta_ema),  w_k = (1 - decay) / (1 - decay^k)
    (w_1 = 1: the first update copies). The plain EMA (w = 1 - decay, started at the initial weights) keeps the
    share decay^n of the random initial network, whose output layer is zero: 16 % after the `fast` preset's 1,860
    steps on the MNIST subset (decay 0.999); at 4 % (3,150 steps) the averaged U-Net still predicted only 0.966
    of the noise (measured, README), and its samples diverged. Adam corrects its moments the same way (Kingma &
    Ba, Alg. 1). After the paper's 210k-234k steps at 0.9999 the two agree to decay^n < 1e-9.
    `.model` is the averaged copy (eval mode, no grads): sample with it, save ema.model.state_dict().
    Buffers (none in this U-Net, but any model works) are copied, not averaged."""

    def __init__(self, model, decay=0.9999):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.params, self.buffers = list(self.model.parameters()), list(self.model.buffers())

    def weight(self, step):
        """w_k of the update after optimiser step `step` (0-based, so k = step + 1); decay 1 freezes the average."""
        return 0.0 if self.decay >= 1 else (1.0 - self.decay) / (1.0 - self.decay ** (step + 1))

    @torch.no_grad()
    def update(self, model, step):
        # One fused multi-tensor kernel instead of ~200 small ones: ema += w (theta - ema).
        torch._foreach_lerp_(self.params, list(model.parameters()), self.weight(step))
        for b_ema, b in zip(self.buffers, model.buffers()):
            b_ema.copy_(b)


def make_optimizer(model, cfg):
    """Adam (Ho et al.: no weight decay) with the fused kernel: on CUDA, and on CPU from torch 2.4 on
    (measured here: 26 ms instead of 46 ms a step for the paper U-Net)."""
    p = next(model.parameters())
    fused = p.is_cuda or (p.device.type == "cpu" and tuple(map(int, torch.__version__.split(".")[:2])) >= (2, 4))
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=fused)


def lr_at(step, cfg):
    """Learning rate for optimiser step `step` (0-based): linear warm-up over cfg.warmup steps, then constant."""
    return cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup))


def train_step(model, ema, diffusion, opt, x0, cond, leaf, cfg, step):
    """One step of Algorithm 1: loss, backward, clip, Adam, EMA. Returns the loss detached (no host sync)."""
    for group in opt.param_groups:
        group["lr"] = lr_at(step, cfg)
    loss = diffusion.loss(model, x0, cond, leaf)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip > 0:                            # clip_grad_norm_ scales on-device: no .item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    ema.update(model, step)
    return loss.detach()


# ================================================================================================================
# OPTIONAL READING: exact CPU rewrites (measurements: docs/performance.md). Nothing above needs them to be
# understood; each computes what the plain layers compute (same parameters and state-dict keys; tests/test_ddpm.py
# and tests/test_fast_paths.py compare them) and runs only on a CPU. On a GPU and under torch.compile the plain
# layers run.
#   UpConv   nearest x2 upsampling + 3x3 conv as four 2x2 convs of the low-resolution input (each output phase reads
#            two input rows with summed kernel taps): 2.25x fewer FLOPs in the up-convs; the 16 -> 32 px one,
#            forward + backward at batch 32 on a CPU, 142 -> 88 ms.
#   dropout  F.dropout as a uniform draw and a compare: torch's CPU bernoulli_ is ~4x slower than rand_like.
# The U-Net picks them in UNet.__init__ (UpConv) and ResBlock.forward (dropout).
# ================================================================================================================

class UpConv(nn.Sequential):
    """Nearest-neighbour x2 upsampling, then a 3x3 conv (Ho et al.): Sequential(Upsample, Conv2d), so parameters
    and state-dict keys are those of the plain pair. On a CPU it is computed without the upsampled image [ours]:
    the upsampled rows 2i-1, 2i, 2i+1 are input rows i-1, i, i, so output row 2i (phase a = 0) reads input rows
    {i-1, i} with kernel rows {k0, k1 + k2}, and row 2i+1 (a = 1) reads {i, i+1} with {k0 + k1, k2}; columns
    likewise. Each of the 4 output phases (a, b) is then a 2x2 conv of the input: 16 instead of 36 multiply-adds
    per input pixel and channel pair, 2.25x fewer FLOPs in the up-convs (~14 % of the U-Net's, measured with
    bench.py's FLOP counter). Same linear map, equal to float32 rounding (tests). Off the CPU and under
    torch.compile the plain pair runs: there the four convs and the interleave would add kernels, unmeasured."""

    def __init__(self, c):
        super().__init__(nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(c, c, 3, padding=1))

    @staticmethod
    def fold(w, a, dim):
        """The 3 taps of w along `dim` summed into the 2 that phase a reads."""
        k0, k1, k2 = w.unbind(dim)
        return torch.stack([k0, k1 + k2] if a == 0 else [k0 + k1, k2], dim)

    def forward(self, x):                                              # x (B, C, H, W) -> (B, C, 2H, 2W)
        if x.device.type != "cpu" or torch.compiler.is_compiling():
            return super().forward(x)
        conv, (B, C, H, W) = self[1], x.shape
        pad = ((1, 0), (0, 1))         # phase 0 reads rows (i-1, i): a zero row above; phase 1 (i, i+1): below
        y = [[F.conv2d(F.pad(x, pad[b] + pad[a]), self.fold(self.fold(conv.weight, a, 2), b, 3), conv.bias)
              .permute(0, 2, 3, 1) for b in (0, 1)] for a in (0, 1)]     # y[a][b] (B, H, W, C): pixels (2i+a, 2j+b)
        y = torch.stack([torch.stack(row, 3) for row in y], 2)           # (B, H, 2, W, 2, C)
        return y.view(B, 2 * H, 2 * W, C).permute(0, 3, 1, 2)            # NCHW shape, NHWC memory


def dropout(h, p, training):
    """F.dropout, but on CPU written out: torch's CPU bernoulli_ is ~4x slower than rand_like (measured)."""
    if not training or p == 0:
        return h
    if world()[1] > 1:         # torchrun: this process's rows of the global batch's mask (data.batch_random)
        fmt = torch.channels_last if h.dim() == 4 and not h.is_contiguous() else torch.contiguous_format
        return h * batch_random(lambda u: u.uniform_(), h.shape, h.dtype, h.device, fmt).ge_(p).div_(1 - p)
    if h.is_cuda:
        return F.dropout(h, p, True)                                   # one fused kernel on the GPU
    return h * torch.rand_like(h).ge_(p).div_(1 - p)                   # keep w.p. 1 - p, scale by 1/(1 - p)
