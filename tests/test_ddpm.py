"""Reference checks for ddpm.py: the schedule's closed forms, Gaussian identities, the U-Net's shapes and size,
DDIM = DDPM at eta = 1, EMA arithmetic, and a small model that really learns two images. CPU, seconds."""
import dataclasses
import math

import pytest
import torch

import ddpm


def tiny_cfg(**kw):
    """A U-Net small enough to run hundreds of steps on CPU in seconds."""
    base = dict(T=100, base_channels=16, channel_mult=(1, 2), num_res_blocks=1, dropout=0.0,
                image_channels=1, image_size=8, n_leaves=0, cond_image=False, warmup=1, ema_decay=0.9)
    base.update(kw)
    return dataclasses.replace(ddpm.DDPMConfig(), **base)


def randomize(model, seed=0):
    """The output conv and every block's last conv are zero-initialised (eps = 0, blocks = identity);
    give them small random weights so that tests see the whole network, conditioning included."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d) and not m.weight.any():
                m.weight.copy_(0.05 * torch.randn(m.weight.shape, generator=g))
    return model


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors gain nothing from a second thread, and OpenMP stalls (measured: 7x slower) when another
    process holds the other core; run these tests on one thread and restore the setting."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Oracle(torch.nn.Module):
    """The exact noise predictor for data that is one known image per leaf:
    eps(x_t) = (x_t - sqrt(alpha_bar) x_0) / sqrt(1 - alpha_bar), plus an optional smooth error `wobble`."""

    def __init__(self, diffusion, images, wobble=0.0, gain=1.0):
        super().__init__()
        self.d, self.images, self.wobble, self.gain = diffusion, images, wobble, gain

    def forward(self, x_t, t, cond, leaf):
        ab = self.d.alpha_bar[t].float().view(-1, 1, 1, 1)
        eps = (x_t - ab.sqrt() * self.images[leaf]) / (1 - ab).sqrt()
        return self.gain * eps + self.wobble * torch.sin(3 * x_t + t.view(-1, 1, 1, 1) / 7)


# ----------------------------------------------------------------------------- schedule
def test_linear_schedule_closed_forms():
    d = ddpm.Diffusion(ddpm.DDPMConfig())
    assert d.betas.dtype == torch.float64 and d.alpha_bar.dtype == torch.float64
    assert d.betas[0].item() == pytest.approx(1e-4) and d.betas[-1].item() == pytest.approx(0.02)
    assert d.alpha_bar[-1].item() == pytest.approx(4.04e-5, rel=0.01)          # Ho et al. Sec. 4's schedule
    assert (d.betas.diff() > 0).all() and (d.alpha_bar.diff() < 0).all()        # monotone
    # alpha_bar_t = prod (1 - beta_s) with beta_s linear in s: compare with a plain-Python product.
    for t in (0, 1, 499, 999):
        ref = math.prod(1 - (1e-4 + (0.02 - 1e-4) * s / 999) for s in range(t + 1))
        assert d.alpha_bar[t].item() == pytest.approx(ref, rel=1e-12)
    assert d.alpha_bar_prev[0].item() == 1.0 and torch.equal(d.alpha_bar_prev[1:], d.alpha_bar[:-1])
    assert torch.allclose(d.sqrt_alpha_bar ** 2 + d.sqrt_one_minus_alpha_bar ** 2, torch.ones(1000, dtype=torch.float64))
    # Other T: the betas are scaled by 1000/T (Nichol & Dhariwal), so x_T is still almost pure noise.
    short = ddpm.Diffusion(dataclasses.replace(ddpm.DDPMConfig(), T=100))
    assert short.betas[0].item() == pytest.approx(1e-3) and 1e-5 < short.alpha_bar[-1].item() < 1e-4


def test_cosine_schedule_endpoints():
    d = ddpm.Diffusion(dataclasses.replace(ddpm.DDPMConfig(), schedule="cosine"))
    s, T = 0.008, 1000
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    for t in (1, 250, 500, 900):             # alpha_bar(t) = f(t)/f(0) where no beta is clipped (paper t)
        assert d.alpha_bar[t - 1].item() == pytest.approx(f(t) / f(0), rel=1e-9)
    assert 1 - d.alpha_bar[0].item() < 1e-4                       # starts almost noise-free
    assert d.betas.max().item() == pytest.approx(0.999) and d.betas[-1].item() == pytest.approx(0.999)
    assert d.alpha_bar[-1].item() < 1e-8                          # ends at pure noise
    assert (d.alpha_bar.diff() < 0).all()


def test_q_sample_moments():
    d = ddpm.Diffusion(ddpm.DDPMConfig())
    torch.manual_seed(0)
    x0 = torch.full((20000, 1, 4, 4), 0.6)
    t = torch.full((20000,), 300)
    x_t = d.q_sample(x0, t, torch.randn_like(x0))              # 320k draws of N(sqrt(ab) 0.6, 1 - ab)
    ab = d.alpha_bar[300].item()
    assert x_t.mean().item() == pytest.approx(math.sqrt(ab) * 0.6, abs=0.01)
    assert x_t.var().item() == pytest.approx(1 - ab, rel=0.02)


def test_posterior_is_the_gaussian_product():
    d = ddpm.Diffusion(ddpm.DDPMConfig())
    x0, x_t = torch.tensor([0.3]).view(1, 1, 1, 1), torch.tensor([-0.8]).view(1, 1, 1, 1)
    for t in (1, 10, 500, 999):
        # q(x_{t-1}|x_0) = N(sqrt(ab_prev) x0, 1 - ab_prev) times q(x_t|x_{t-1}) = N(sqrt(a_t) x_{t-1}, beta_t)
        ab_prev, a, beta = d.alpha_bar[t - 1].item(), d.alphas[t].item(), d.betas[t].item()
        prec = 1 / (1 - ab_prev) + a / beta
        mean_ref = (math.sqrt(ab_prev) * 0.3 / (1 - ab_prev) + math.sqrt(a) * -0.8 / beta) / prec
        mean, var = d.posterior(x0, x_t, torch.tensor([t]))
        assert mean.item() == pytest.approx(mean_ref, rel=1e-5) and var.item() == pytest.approx(1 / prec, rel=1e-6)
    mean, var = d.posterior(x0, x_t, torch.tensor([0]))       # first step: x_0 is known exactly
    assert mean.item() == pytest.approx(0.3) and var.item() == 0


# ----------------------------------------------------------------------------- U-Net
@pytest.mark.parametrize("C,size", [(1, 28), (3, 32)])
@pytest.mark.parametrize("conditioned", [True, False])
def test_unet_shapes(C, size, conditioned):
    cfg = dataclasses.replace(ddpm.ddpm_config("mnist", "smoke"), image_channels=C, image_size=size,
                              n_leaves=5 if conditioned else 0, cond_image=conditioned)
    model = randomize(ddpm.UNet(cfg))
    x = torch.rand(2, C, size, size) * 2 - 1
    cond = torch.rand(2, C, size, size) * 2 - 1 if conditioned else None
    leaf = torch.tensor([0, 4]) if conditioned else None
    eps = model(x, torch.tensor([0, 49]), cond, leaf)
    assert eps.shape == (2, C, size, size) and torch.isfinite(eps).all()
    if conditioned:                         # both inputs reach the output
        assert not torch.allclose(eps, model(x, torch.tensor([0, 49]), cond, torch.tensor([1, 2])))
        assert not torch.allclose(eps, model(x, torch.tensor([0, 49]), -cond, leaf))
        with pytest.raises(ddpm.DDPMError):
            model(x, torch.tensor([0, 49]), None, leaf)


def test_upconv_is_upsample_then_conv():
    """UpConv's CPU path (four 2x2 phase convs, no upsampled image) equals nn.Upsample + the 3x3 conv it wraps,
    output and all gradients, on NCHW and NHWC inputs of odd and even sizes. Tolerance: the phase kernels add taps
    before multiplying, so float32 rounding differs (measured ~1e-6 relative); a wrong tap or offset is off by O(1)."""
    torch.manual_seed(0)
    up = ddpm.UpConv(6)                                               # default (random) init
    for layout in (torch.contiguous_format, torch.channels_last):     # inputs and weights (the U-Net's are NHWC)
        up.to(memory_format=layout)
        for H, W in ((4, 4), (3, 5)):
            x = torch.randn(2, 6, H, W).contiguous(memory_format=layout).requires_grad_(True)
            y, y_ref = up(x), torch.nn.Sequential.forward(up, x)           # the plain pair on the same weights
            assert y.shape == (2, 6, 2 * H, 2 * W)
            torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
            g = torch.randn_like(y_ref)
            grads = torch.autograd.grad(y, (x, up[1].weight, up[1].bias), g)
            grads_ref = torch.autograd.grad(y_ref, (x, up[1].weight, up[1].bias), g)
            for a, b in zip(grads, grads_ref):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
    assert list(up.state_dict()) == ["1.weight", "1.bias"]              # the plain pair's checkpoint keys


def test_zero_initialised_output():
    cfg = ddpm.ddpm_config("mnist", "smoke", n_leaves=3)
    x = torch.randn(2, 1, 28, 28)
    assert ddpm.UNet(cfg)(x, torch.tensor([1, 2]), x.clamp(-1, 1), torch.tensor([0, 2])).abs().max() == 0


def test_paper_parameter_count():
    model = ddpm.UNet(ddpm.ddpm_config("mnist", "paper", n_leaves=10))
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - 9.3e6) < 0.1 * 9.3e6, n                   # DiffuseVAE's U-Net (configs/mnist.yml): ~9.3 M


# ----------------------------------------------------------------------------- samplers
def test_ddim_eta1_all_steps_is_ancestral_fixed_small():
    cfg = tiny_cfg(n_leaves=2)
    d = ddpm.Diffusion(cfg)
    model = Oracle(d, torch.rand(2, 1, 8, 8) * 2 - 1, wobble=1.0)   # an imperfect eps model, values stay in range
    noise, leaf = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 0, 1])
    gen = lambda: torch.Generator().manual_seed(1)
    # Same x_T and the same z per step (same generator seed): the two samplers must agree (Song et al. sec. 4.1).
    a = d.sample_ddpm(model, noise.shape, None, leaf, noise=noise, generator=gen(), var_type="fixed_small")
    b = d.sample_ddim(model, noise.shape, None, leaf, steps=cfg.T, eta=1.0, noise=noise, generator=gen())
    assert (a - b).abs().max() < 1e-5                        # measured 1.2e-7
    assert (a.abs() < 0.99).float().mean() > 0.5              # not just agreement of clamped values
    # ... while fixed-large variance or eta = 0 give visibly different samples (measured 7e-3, 2e-2).
    c = d.sample_ddpm(model, noise.shape, None, leaf, noise=noise, generator=gen())
    e = d.sample_ddim(model, noise.shape, None, leaf, steps=cfg.T, eta=0.0, noise=noise, generator=gen())
    assert (a - c).abs().max() > 1e-3 and (a - e).abs().max() > 1e-3
    # eta = 0 is deterministic whatever the generator.
    e1 = d.sample_ddim(model, noise.shape, None, leaf, steps=10, noise=noise, generator=gen())
    e2 = d.sample_ddim(model, noise.shape, None, leaf, steps=10, noise=noise, generator=torch.Generator().manual_seed(2))
    assert torch.equal(e1, e2)


def test_respaced_sampler_with_all_steps_is_the_plain_ancestral_sampler():
    """Respacing (Nichol & Dhariwal Sec. 4) on all T steps rebuilds the betas from alpha_bar ratios: the same
    process, so the same samples from the same x_T and per-step noise; on K steps alpha_bar is kept on the chosen
    steps, the network sees their original indices, and the first and last step are always among them."""
    cfg = tiny_cfg(T=60, n_leaves=2)
    d = ddpm.Diffusion(cfg)
    model = Oracle(d, torch.rand(2, 1, 8, 8) * 2 - 1, wobble=1.0)   # imperfect eps: the noise matters
    noise, leaf = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 0, 1])
    gen = lambda: torch.Generator().manual_seed(3)
    full = d.respaced(cfg.T)
    assert torch.equal(full.timesteps, torch.arange(cfg.T))
    for var_type in ("fixed_large", "fixed_small"):
        a = d.sample_ddpm(model, noise.shape, None, leaf, noise=noise, generator=gen(), var_type=var_type)
        b = full.sample_ddpm(model, noise.shape, None, leaf, noise=noise, generator=gen(), var_type=var_type)
        assert (a - b).abs().max() < 1e-5 and (a.abs() < 0.99).float().mean() > 0.5
    r = d.respaced(7)
    assert r.timesteps.tolist() == [0, 10, 20, 30, 39, 49, 59]
    assert torch.allclose(r.alpha_bar, d.alpha_bar[r.timesteps], rtol=1e-12)
    assert d.timesteps.tolist() == list(range(cfg.T))              # the original is left as it was
    seen = []

    class Spy(torch.nn.Module):                                    # records the time index the network sees
        def forward(self, x_t, t, cond, leaf):
            seen.append(int(t[0]))
            return model(x_t, t, cond, leaf)
    c = r.sample_ddpm(Spy(), noise.shape, None, leaf, noise=noise, generator=gen())
    assert seen == [59, 49, 39, 30, 20, 10, 0] and (c - a).abs().max() > 1e-3
    # With the fixed-small variance the respaced sampler is DDIM with eta 1 on the same steps (Song et al. Eq. 16:
    # sigma^2 = the respaced process's beta~): the cpu preset's evaluation sampler, measured as either.
    e = r.sample_ddpm(model, noise.shape, None, leaf, noise=noise, generator=gen(), var_type="fixed_small")
    f = d.sample_ddim(model, noise.shape, None, leaf, steps=7, eta=1.0, noise=noise, generator=gen())
    assert (e - f).abs().max() < 1e-5 and (e - c).abs().max() > 1e-3
    with pytest.raises(ddpm.DDPMError):
        d.respaced(1)


def test_samplers_recover_x0_with_the_true_noise():
    """Given the exact eps(x_t) = (x_t - sqrt(alpha_bar) x_0) / sqrt(1 - alpha_bar), every sampler returns x_0."""
    cfg = tiny_cfg(T=100, n_leaves=2)
    d = ddpm.Diffusion(cfg)
    images = torch.rand(2, 1, 8, 8) * 1.8 - 0.9                   # two targets inside (-1, 1)

    leaf = torch.tensor([0, 1, 1])
    oracle = Oracle(d, images)
    for clip in (True, False):                                    # posterior-mean form and Eq. 11
        for x in (d.sample_ddpm(oracle, (3, 1, 8, 8), None, leaf, clip=clip),
                  d.sample_ddpm(oracle, (3, 1, 8, 8), None, leaf, var_type="fixed_small", clip=clip),
                  d.sample_ddim(oracle, (3, 1, 8, 8), None, leaf, steps=7, clip=clip),
                  d.sample_ddim(oracle, (3, 1, 8, 8), None, leaf, steps=20, eta=1.0, clip=clip)):
            assert torch.allclose(x, images[leaf], atol=1e-4)


def test_clipping_is_the_eq11_mean_while_x0_is_in_range():
    """clip=True writes the ancestral mean as mu~(clip(x0_pred), x_t): with the same x_T and per-step noise it
    matches Eq. 11 while every x0_pred lies in [-1, 1] (an oracle, targets inside the range). A network that
    predicts no noise at all (the zero-output U-Net at initialisation) shows the difference: Eq. 11 divides x_t
    by sqrt(alpha_t) at every step and ends saturated (99 % of the pixels at +-1, measured); clipped, 17 %."""
    cfg = tiny_cfg(T=100, n_leaves=2)
    d = ddpm.Diffusion(cfg)
    images = torch.rand(2, 1, 8, 8) * 1.6 - 0.8
    leaf, noise = torch.tensor([0, 1, 1, 0]), torch.randn(4, 1, 8, 8)
    gen = lambda: torch.Generator().manual_seed(3)
    oracle = Oracle(d, images)
    a = d.sample_ddpm(oracle, noise.shape, None, leaf, noise=noise, generator=gen(), clip=True)
    b = d.sample_ddpm(oracle, noise.shape, None, leaf, noise=noise, generator=gen(), clip=False)
    assert (a - b).abs().max() < 1e-5
    d_long = ddpm.Diffusion(tiny_cfg(T=1000, n_leaves=2))
    zero = Oracle(d_long, images, gain=0.0)
    saturated = lambda x: (x.abs() > 0.999).float().mean().item()
    loose = d_long.sample_ddpm(zero, noise.shape, None, leaf, noise=noise, generator=gen(), clip=False)
    tight = d_long.sample_ddpm(zero, noise.shape, None, leaf, noise=noise, generator=gen(), clip=True)
    assert saturated(tight) < 0.5 < 0.9 < saturated(loose), (saturated(tight), saturated(loose))


def test_sampler_checks_cond_range_and_reports_progress():
    cfg = tiny_cfg(cond_image=True, T=10)
    model, d = ddpm.UNet(cfg), ddpm.Diffusion(cfg)
    with pytest.raises(ddpm.DDPMError):
        d.sample_ddim(model, (1, 1, 8, 8), cond=torch.full((1, 1, 8, 8), 2.0), steps=2)   # [0,1]*2 mistake
    with pytest.raises(ddpm.DDPMError):
        d.sample_ddpm(model, (1, 1, 8, 8), cond=torch.zeros(1, 1, 8, 8), var_type="large")
    seen = []
    d.sample_ddpm(model, (1, 1, 8, 8), cond=torch.zeros(1, 1, 8, 8), progress=lambda i, n: seen.append((i, n)))
    assert seen[0] == (1, 10) and seen[-1] == (10, 10) and model.training     # mode restored


# ----------------------------------------------------------------------------- EMA, optimiser, training
def test_ema_update_arithmetic():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = ddpm.EMA(model, decay=0.9)
    old = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model[1].running_mean.fill_(0.7)
    ema.update(model, step=10 ** 6)                            # late in training: w = 1 - decay
    for p_ema, p_old in zip(ema.model.parameters(), old):     # 0.9 old + 0.1 (old + 1) = old + 0.1
        assert torch.allclose(p_ema, p_old + 0.1) and not p_ema.requires_grad
    assert torch.equal(ema.model[1].running_mean, torch.full((2,), 0.7)) and not ema.model.training
    # Bias correction: the first update copies the weights (the random initial network gets no share) and the
    # second averages the two iterates 1 : decay, i.e. w_2 = (1 - decay) / (1 - decay^2) = 1 / (1 + decay).
    assert ema.weight(0) == 1.0 and ema.weight(1) == pytest.approx(1 / 1.9)
    ema2 = ddpm.EMA(model, decay=0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema2.update(model, step=0)
    for p_ema, p in zip(ema2.model.parameters(), model.parameters()):
        assert torch.equal(p_ema, p)


def test_lr_warmup_and_train_step():
    cfg = tiny_cfg(warmup=10, lr=1e-3)
    assert ddpm.lr_at(0, cfg) == pytest.approx(1e-4) and ddpm.lr_at(9, cfg) == pytest.approx(1e-3)
    assert ddpm.lr_at(10_000, cfg) == pytest.approx(1e-3)
    torch.manual_seed(0)
    model, d = ddpm.UNet(cfg), ddpm.Diffusion(cfg)
    ema, opt = ddpm.EMA(model, cfg.ema_decay), ddpm.make_optimizer(model, cfg)
    before = model.conv_out.weight.detach().clone()
    loss = ddpm.train_step(model, ema, d, opt, torch.rand(4, 1, 8, 8) * 2 - 1, None, None, cfg, step=3)
    assert loss.dim() == 0 and not loss.requires_grad and opt.param_groups[0]["lr"] == pytest.approx(4e-4)
    assert not torch.equal(before, model.conv_out.weight) and not torch.equal(before, ema.model.conv_out.weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):          # the loss stays float32 under autocast
        assert d.loss(model, torch.zeros(2, 1, 8, 8)).dtype == torch.float32


def test_config_presets_are_plain():
    for preset in ("paper", "fast", "cpu", "smoke"):
        cfg = ddpm.ddpm_config("fashion-mnist", preset, n_leaves=7)
        assert (cfg.dataset, cfg.image_channels, cfg.image_size, cfg.n_leaves) == ("fashion_mnist", 1, 28, 7)
        for v in dataclasses.asdict(cfg).values():
            assert isinstance(v, (int, float, str, bool, tuple))
    assert ddpm.ddpm_config("cifar10", "paper").image_channels == 3
    with pytest.raises(ddpm.DDPMError):
        ddpm.ddpm_config("mnist", "huge")
    with pytest.raises(ddpm.DDPMError):
        ddpm.ddpm_config("svhn", "paper")


def test_tiny_model_learns_two_images():
    """Leaf 0 -> image A, leaf 1 -> image B: after 300 steps, samples land on their own leaf's image."""
    torch.manual_seed(0)
    A = -torch.ones(1, 8, 8)
    A[:, 2:6, 1:3] = 1                                          # a vertical bar
    B = -torch.ones(1, 8, 8)
    B[:, 5:7, :] = 1                                            # a horizontal bar
    images = torch.stack([A, B])                                # (2, 1, 8, 8) in [-1, 1]
    cfg = tiny_cfg(T=200, n_leaves=2, lr=3e-3, warmup=20, ema_decay=0.95)
    model, d = ddpm.UNet(cfg), ddpm.Diffusion(cfg)
    ema, opt = ddpm.EMA(model, cfg.ema_decay), ddpm.make_optimizer(model, cfg)
    leaf = torch.arange(32) % 2
    for step in range(300):
        ddpm.train_step(model, ema, d, opt, images[leaf], None, leaf, cfg, step)
    g = torch.Generator().manual_seed(0)
    want = torch.tensor([0, 1] * 4)
    x = d.sample_ddpm(ema.model, (8, 1, 8, 8), None, want, generator=g)   # the authors' sampler
    err = ((x - images[want]) ** 2).mean().item()               # seeds 0-2 give 0.007-0.015
    err_other = ((x - images[1 - want]) ** 2).mean().item()     # ~1.2
    err_noise = ((torch.randn(8, 1, 8, 8, generator=g).clamp(-1, 1) - images[want]) ** 2).mean().item()  # ~1.5
    assert err < 0.1 * err_noise and err < 0.2 * err_other, (err, err_other, err_noise)
