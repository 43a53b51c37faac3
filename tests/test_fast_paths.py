"""The optimised code paths compute the same losses and updates as the plain ones (CPU, smoke-size models).

Each test runs an optimised path next to an independent plain computation and compares the numbers:
- fused Adam (what train.TrainStep and ddpm.make_optimizer use) vs the for-loop Adam, on a TreeVAE;
- train.TrainStep (fused Adam, alpha held in a tensor, no host sync, decode only the new leaves of a subtree)
  vs a hand-written step: forward, model.loss, backward, for-loop Adam;
- torch.compile of the TreeVAE (TrainStep(compile=True)'s forward) vs eager: loss terms, gradients, buffers;
- bf16 autocast vs fp32: the DDPM loss and the TreeVAE loss terms, each returned in float32;
- ddpm.EMA.update (one foreach lerp) vs the textbook per-parameter average;
- ddpm.dropout (CPU: rand_like written out) vs the definition of inverted dropout;
- spectral-normed treevae.MapConv (a 3x3 conv as one matrix product) and FourierConv2d (a conv through the
  DFT) vs a spectral-normed nn.Conv2d;
- the DDPM's conditioning computed once for the whole training set (train.leaf_reconstructions) vs per batch.

Tolerances are stated where they are used, with the reason. Runtime on one thread: the compile test 35-65 s
with a cold inductor cache (it compiles forward and backward; ~5 s once cached), a few seconds for the rest.
"""
import copy
from contextlib import nullcontext

import pytest
import torch
import torch.nn as nn

import ddpm
import train
import treevae

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and the 2 shared cores may be busy; restore the setting after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def smoke_treevae(seed=0, splits=()):
    """The smoke-preset MNIST TreeVAE (root 0 -> leaves 1, 2), then `splits` applied in order."""
    torch.manual_seed(seed)
    model = treevae.TreeVAE(treevae.treevae_config("mnist", "smoke"))
    for leaf in splits:
        model.split(leaf)
    return model


def images(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=g)  # (n, 1, 28, 28) in [0, 1]


def plain_adam(params, cfg, weight_decay=None):
    """The reference optimiser: torch's single-tensor for-loop Adam (no foreach, no fused kernel)."""
    wd = cfg.weight_decay if weight_decay is None else weight_decay
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=wd, foreach=False, fused=False)


def plain_step(model, opt, x, alpha, decode=None):
    """The textbook training step: forward, the negative ELBO (TreeVAE.loss) with a Python-float alpha, backward,
    Adam."""
    opt.zero_grad(set_to_none=True)
    out = model(x, decode=decode)
    loss = model.loss(out, alpha)
    loss.backward()
    opt.step()
    return loss.detach(), out["rec"].detach()


def max_state_diff(a, b):
    """Largest absolute difference over all floating entries of two state dicts (weights, BN statistics,
    spectral-norm power-iteration vectors), with a check that both hold the same keys."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return max((sa[k] - sb[k]).abs().max().item() for k in sa if sa[k].is_floating_point())


# Adam moves every weight by at most ~lr = 1e-3 a step. Two implementations of the same update differ only in
# float32 rounding (~1e-7 relative); after a step that difference feeds the next forward pass and, for the
# handful of weights whose gradient is ~0 (where m / (sqrt(v) + eps) is ill-conditioned), can move the next
# update by a sizeable fraction of lr. WEIGHT_TOL = 1e-5 = 1 % of one step allows for that, while any real
# difference in the update rule (bias correction, coupled vs decoupled weight decay, a skipped step, a wrong
# alpha) moves weights by ~lr and fails. Each test also checks that the weights did move by far more than that.
WEIGHT_TOL = 1e-5


# ----------------------------------------------------------------------------------------------------------------
# 1. fused Adam vs for-loop Adam

@pytest.mark.parametrize("weight_decay", [None, 0.1], ids=["cfg_weight_decay", "weight_decay_0.1"])
def test_fused_adam_matches_for_loop_adam(weight_decay):
    """torch.optim.Adam(fused=True), as TrainStep builds it, leaves the same TreeVAE weights after 3 steps as the
    plain for-loop Adam. Both models start from identical weights (deepcopy) and draw identical reparameterisation
    noise (reseeded before every forward). Measured difference 1.6e-7. Adam's weight decay is coupled
    (grad + wd * w): with the config's 1e-5 it shows only in weights whose gradient is ~0 (a conv bias before a
    batch norm), where it makes the step ~lr (fused AdamW instead: 2e-3 off); a second case with weight_decay 0.1
    makes the decay term count for every weight."""
    model = smoke_treevae()
    ref, start = copy.deepcopy(model), copy.deepcopy(model)
    cfg = model.cfg
    wd = cfg.weight_decay if weight_decay is None else weight_decay
    fused = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=wd, fused=True)
    loop = plain_adam(ref.parameters(), cfg, wd)
    assert not loop.defaults["fused"] and not loop.defaults["foreach"]
    for step in range(3):
        x = images(seed=step)
        for m, opt in ((model, fused), (ref, loop)):
            torch.manual_seed(100 + step)
            opt.zero_grad(set_to_none=True)
            m.loss(m(x), 0.5).backward()
            opt.step()
    assert max_state_diff(model, ref) < WEIGHT_TOL
    assert max_state_diff(model, start) > 100 * WEIGHT_TOL        # the weights did move (~3 lr)


# ----------------------------------------------------------------------------------------------------------------
# 2. train.TrainStep vs a hand-written step

def test_train_step_matches_plain_step():
    """train.TrainStep (fused Adam, alpha as a device tensor refilled every call, loss returned as a tensor
    without a host sync) gives the same loss and rec values, and the same weights, BN statistics and spectral-norm
    vectors, as plain_step with the for-loop Adam, over 2 steps with different batches and different alphas (a
    stale alpha tensor would show in the second loss). Same noise: the RNG is reseeded before each step.
    Loss tolerance: the first step's forward sees identical weights; the second sees weights that differ by
    Adam's rounding, which can move a loss of ~556 in its last digits: rtol 1e-5 (measured: identical both times;
    an alpha off by 0.1 changes the loss by ~0.3, i.e. 5e-4 relative)."""
    model = smoke_treevae()
    ref, start = copy.deepcopy(model), copy.deepcopy(model)
    step = train.TrainStep(model, list(model.parameters()), model.cfg, CPU, nullcontext)
    opt = plain_adam(ref.parameters(), ref.cfg)
    for i, alpha in enumerate((0.3, 0.8)):
        x = images(seed=10 + i)
        torch.manual_seed(200 + i)
        loss, rec = step(x, alpha)
        torch.manual_seed(200 + i)
        loss_ref, rec_ref = plain_step(ref, opt, x, alpha)
        assert torch.is_tensor(loss) and not loss.requires_grad and loss.dtype == torch.float32
        torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=0)
        torch.testing.assert_close(rec, rec_ref, rtol=1e-5, atol=0)
    assert step.alpha.item() == pytest.approx(0.8)
    assert max_state_diff(model, ref) < WEIGHT_TOL
    assert max_state_diff(model, start) > 100 * WEIGHT_TOL


def test_subtree_train_step_decoding_new_leaves_only_matches_plain_step():
    """Subtree training: TrainStep(decode=new leaves) skips the other leaves' decoders, which is exact because
    their reconstruction terms do not depend on the subtree's parameters. Against plain_step decoding every leaf:
    the same updated weights (the frozen rest of the tree bit for bit unchanged), and a loss that is lower by
    exactly the skipped reconstruction mass (loss_ref - loss = rec_ref - rec > 0, i.e. the same KL terms).
    Tolerances as in test_train_step_matches_plain_step; the two loss differences are both the skipped rec term
    computed from the same numbers, so they agree to float32 rounding of values ~500 (atol 1e-3)."""
    model = smoke_treevae(splits=[1])                            # root -> (1 -> (3, 4)), 2
    ref = copy.deepcopy(model)
    params, kids = model.train_subtree(1), model.child_ids[1]
    params_ref = ref.train_subtree(1)
    start_params = [p.detach().clone() for p in params]
    frozen_before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith(
        tuple(f"{d}.{n}." for d in ("transform", "dense", "decoder") for n in kids) + ("router_p.1.", "router_q.1."))}
    step = train.TrainStep(model, params, model.cfg, CPU, nullcontext, decode=kids)
    opt = plain_adam(params_ref, ref.cfg)
    for i in range(2):
        x = images(seed=20 + i)
        torch.manual_seed(300 + i)
        loss, rec = step(x, 0.5)
        torch.manual_seed(300 + i)
        loss_ref, rec_ref = plain_step(ref, opt, x, 0.5)
        assert rec_ref - rec > 10                                 # leaf 2's term (~0.5 x 550) was skipped
        torch.testing.assert_close(loss_ref - loss, rec_ref - rec, rtol=0, atol=1e-3)
    assert max_state_diff(model, ref) < WEIGHT_TOL
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in frozen_before.items())
    moved = max((p.detach() - p0).abs().max().item() for p, p0 in zip(params, start_params))
    assert moved > 100 * WEIGHT_TOL                               # the subtree did train


# ----------------------------------------------------------------------------------------------------------------
# 3. torch.compile vs eager

def test_compiled_forward_matches_eager():
    """TrainStep(compile=True)'s forward (torch.compile of the TreeVAE; MapConv falls back to nn.Conv2d while
    compiling) gives the same loss terms, gradients and updated buffers (BN running statistics, spectral-norm
    power-iteration vectors) as the eager model, in train mode. sample=False: inductor draws its own random
    numbers, so with sampling the two would not see the same z.
    Tolerances: inductor fuses and reorders float32 arithmetic, and the compiled graph runs nn.Conv2d where eager
    runs MapConv's matrix product, so results agree to float32 rounding: rtol 1e-5 on the loss terms (measured
    3e-7). Gradients: error below 1e-3 of the tensor's largest gradient. Most agree to ~1e-5 of it, but the
    routers' gradients are ill-conditioned: they are differences of leaf NLLs (~555 each, float32 rounding
    ~1e-4 after summing 784 pixels) weighted by P(l|x), passed through batch norms over 16 samples (measured
    6.7e-5 for router_q.0). A missing or doubled term, or a wrong branch, is off by >10 %."""
    torch._dynamo.reset()
    model = smoke_treevae()
    ref = copy.deepcopy(model)
    step = train.TrainStep(model, list(model.parameters()), model.cfg, CPU, nullcontext, compile=True)
    assert step.forward is not model                              # a compiled wrapper, same weights
    x = images()
    out, out_ref = step.forward(x, sample=False), ref(x, sample=False)
    for k in ("rec", "kl_root", "kl_nodes", "kl_decisions", "leaf_probs"):
        torch.testing.assert_close(out[k], out_ref[k], rtol=1e-5, atol=1e-6, msg=k)
    model.loss(out, 0.5).backward()
    ref.loss(out_ref, 0.5).backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        scale = q.grad.abs().max().item()
        assert (p.grad - q.grad).abs().max().item() <= 1e-3 * scale + 1e-7, name
    assert max_state_diff(model, ref) < 1e-6                      # running stats and _u/_v vectors
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------------------------
# 4. bf16 autocast vs float32

def randomize_unet(model, seed=0):
    """The U-Net's output conv and each block's last conv start at zero (eps_theta = 0, whatever the precision);
    give them small random weights so that the whole network shapes the loss."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d) and not m.weight.any():
                m.weight.copy_(0.05 * torch.randn(m.weight.shape, generator=g))
    return model


def test_ddpm_loss_bf16_autocast_matches_fp32():
    """Diffusion.loss under CPU bf16 autocast agrees with float32 (same t and noise: same seed) and is returned
    in float32, while the U-Net itself really ran in bf16.
    Loss: rtol 2e-2. bf16 keeps 8 significant bits (unit roundoff 2^-8 = 3.9e-3); the loss is a mean of squared
    residuals eps - eps_theta, dominated by |eps|^2 ~ 1, and its error is a few roundoffs at most (measured
    1e-4 - 1e-3 relative over 3 draws of t and noise).
    The loss hardly depends on eps_theta at initialisation, so the U-Net output is compared too: relative error
    (in norm) below 4e-2, ten roundoffs accumulated over the U-Net's ~15 layers (measured 1.7e-2); the wrong
    leaf index changes it by 20 %, so a conditioning input lost or mangled under autocast would fail."""
    cfg = ddpm.ddpm_config("mnist", "smoke", n_leaves=3)
    torch.manual_seed(0)
    model, diffusion = randomize_unet(ddpm.UNet(cfg)), ddpm.Diffusion(cfg)
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(8, 1, 28, 28, generator=g) * 2 - 1
    cond = (x0 + 0.3 * torch.randn(x0.shape, generator=g)).clamp(-1, 1)   # a blurry 'TreeVAE image'
    leaf, t = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]), torch.tensor([0, 3, 10, 20, 30, 40, 45, 49])
    torch.manual_seed(7)
    loss32 = diffusion.loss(model, x0, cond, leaf)
    with torch.no_grad():
        eps32, eps_other_leaf = model(x0, t, cond, leaf), model(x0, t, cond, (leaf + 1) % 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(7)
        loss16 = diffusion.loss(model, x0, cond, leaf)
        with torch.no_grad():
            eps16 = model(x0, t, cond, leaf)
    assert eps16.dtype == torch.bfloat16                         # autocast was in effect
    assert loss32.dtype == loss16.dtype == torch.float32
    assert loss16.item() != loss32.item()                        # ... and changed the arithmetic
    torch.testing.assert_close(loss16, loss32, rtol=2e-2, atol=0)
    rel = lambda a, b: ((a.float() - b).norm() / b.norm()).item()
    assert rel(eps16, eps32) < 4e-2, rel(eps16, eps32)
    assert rel(eps_other_leaf, eps32) > 3 * 4e-2                  # the tolerance is not vacuous


def test_treevae_loss_terms_bf16_autocast_match_fp32():
    """The TreeVAE loss terms (posterior means: sample=False, train mode as in training) under CPU bf16 autocast
    agree with float32 and are each float32, so the loss and the optimiser stay float32 (data.setup_device).
    rec, kl_root, kl_nodes: rtol 2e-2 (bf16 unit roundoff 3.9e-3, a few roundoffs through the encoder's and
    bottom-up chain's ~12 layers; measured <2e-3 over 8 seeds).
    kl_decisions is different: a KL between two Bernoullis with nearby logits is ~q(1-q)(l_q - l_p)^2 / 2, a
    small function (0.04-0.08 here) of the difference of two bf16 router logits, so its relative error is
    ~2 delta_l / |l_q - l_p| rather than 2^-8 (measured up to 4 %, 2.1e-3 absolute, over 8 seeds on this tree,
    whether or not kl_bernoulli itself runs in float32). It is compared with atol 5e-3: 2.4x the worst measured
    error, and a quarter of the term itself (checked)."""
    model = smoke_treevae(splits=[1])                          # 2 decisions, 3 leaves, both KL kinds
    x = images(seed=3)
    ref = copy.deepcopy(model)                                  # train-mode forward moves BN stats, spectral u/v
    with torch.no_grad():
        out32 = ref(x, sample=False)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out16 = model(x, sample=False)
            assert model.encoder(x).dtype == torch.bfloat16    # autocast was in effect
    for k in ("rec", "kl_root", "kl_nodes", "kl_decisions"):
        assert out16[k].dtype == torch.float32, k
        assert out16[k].item() != out32[k].item(), k           # computed differently, not skipped
    for k in ("rec", "kl_root", "kl_nodes"):
        torch.testing.assert_close(out16[k], out32[k], rtol=2e-2, atol=0, msg=k)
    torch.testing.assert_close(out16["kl_decisions"], out32["kl_decisions"], rtol=0, atol=5e-3)
    assert out32["kl_decisions"].item() > 4 * 5e-3              # the tolerance is not vacuous


# ----------------------------------------------------------------------------------------------------------------
# 5. EMA: foreach lerp vs the textbook average

def test_ema_foreach_lerp_matches_textbook_loop():
    """ddpm.EMA.update (one torch._foreach_lerp_ with the bias-corrected weight) after 3 updates with random,
    different-per-element weight changes equals the textbook bias-corrected average of the iterates,
    sum_k decay^(n-k) (1 - decay) theta_k / (1 - decay^n), computed per parameter in float64 (the existing
    test_ema_update_arithmetic checks single updates). On the smoke U-Net, whose weights are channels_last.
    atol 1e-6: a few float32 roundings of values ~1 (eps 1.2e-7); swapping decay and 1 - decay, skipping an
    update or leaving the initial weights in the average is off by ~0.1."""
    cfg = ddpm.ddpm_config("mnist", "smoke", n_leaves=3)
    torch.manual_seed(0)
    model = ddpm.UNet(cfg)
    ema, decay = ddpm.EMA(model, cfg.ema_decay), cfg.ema_decay
    iterates = []
    g = torch.Generator().manual_seed(1)
    for step in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.5 * torch.randn(p.shape, generator=g))
        ema.update(model, step)
        iterates.append([p.detach().double().clone() for p in model.parameters()])
    n = len(iterates)
    ref = [sum(decay ** (n - k) * (1 - decay) * it[j] for k, it in enumerate(iterates, 1)) / (1 - decay ** n)
           for j in range(len(iterates[0]))]
    for (name, p), r in zip(ema.model.named_parameters(), ref):
        torch.testing.assert_close(p.double(), r, rtol=0, atol=1e-6, msg=name)
    diff = max((p.double() - q.detach().double()).abs().max().item()
               for p, q in zip(ema.model.parameters(), model.parameters()))
    assert diff > 0.1                                            # the average lags the weights: not a copy


# ----------------------------------------------------------------------------------------------------------------
# 6. dropout written with rand_like vs the definition

def test_cpu_dropout_is_inverted_dropout():
    """ddpm.dropout on CPU (rand_like >= p, scaled) is inverted dropout: each element is kept with probability
    1 - p and then multiplied by 1 / (1 - p), the others are exactly 0; in eval mode, or with p = 0, it returns
    its input unchanged.
    Kept fraction of n = 10^6 elements: Binomial(n, 0.7) / n has sigma = sqrt(0.7 * 0.3 / n) = 4.6e-4, so a
    5-sigma band (2.3e-3; p and 1 - p mixed up would be off by 0.4). Scale: kept values equal h / 0.7 up to
    float32 rounding of the product (the code multiplies by a rounded 1 / 0.7): rtol 3e-7, 2.5 ulp."""
    p, n = 0.3, 10 ** 6
    torch.manual_seed(0)
    h = torch.randn(1000, 1000) + 3.0                            # no exact zeros (P(0) = 0 for a Gaussian)
    out = ddpm.dropout(h, p, training=True)
    kept = out != 0
    frac = kept.double().mean().item()
    sigma = ((1 - p) * p / n) ** 0.5
    assert abs(frac - (1 - p)) < 5 * sigma, (frac, sigma)
    torch.testing.assert_close(out[kept], h[kept] / (1 - p), rtol=3e-7, atol=0)
    assert abs(out.mean().item() - h.mean().item()) < 0.01      # inverted dropout keeps the mean (~3)
    rows = kept.double().mean(1)                                 # no structure: every row keeps ~70 %
    assert (rows - (1 - p)).abs().max().item() < 6 * ((1 - p) * p / 1000) ** 0.5
    assert ddpm.dropout(h, p, training=False) is h
    assert ddpm.dropout(h, 0.0, training=True) is h
    assert not torch.equal(ddpm.dropout(h, p, True), out)        # fresh masks each call


# ----------------------------------------------------------------------------------------------------------------
# 7. spectral-normed MapConv and FourierConv2d vs spectral-normed nn.Conv2d

@pytest.mark.parametrize("kind", ["map", "fourier"])
def test_spectral_fast_conv_equals_spectral_conv2d(kind):
    """treevae.spectral(MapConv) computes what treevae.spectral(nn.Conv2d(3x3, padding 1)) computes, given the
    same original weight and the same power-iteration vectors _u, _v (copied by load_state_dict: the keys are the
    same); so does spectral(FourierConv2d) with a 5x5 kernel (the encoder's fast conv). Eval mode (fixed u, v: the
    normalised weight W / u^T W v) on 2, 3 and 4 px maps (6-8 px for the 5x5 kernel), gradients with respect
    to the original weight included; then one train-mode call each (one power iteration updates u and v, and both
    layers must update them the same way: a layer that read its weight twice would run two). The fast convs sum
    in another order than the library conv: atol 1e-5 on outputs ~1, 1e-4 on gradients summed over the batch (as
    test_map_conv_equals_conv2d)."""
    torch.manual_seed(0)
    k, sizes = (3, (2, 3, 4)) if kind == "map" else (5, (6, 7, 8))
    for R, bias in zip(sizes, (True, False, True)):
        fast = treevae.MapConv(5, 7, bias=bias) if kind == "map" else treevae.FourierConv2d(5, 7, k, padding=1, bias=bias)
        conv = treevae.spectral(fast)
        ref = treevae.spectral(nn.Conv2d(5, 7, k, padding=1, bias=bias))
        ref.load_state_dict(conv.state_dict())
        sn, sn_ref = conv.parametrizations.weight[0], ref.parametrizations.weight[0]
        assert torch.equal(sn._u, sn_ref._u) and torch.equal(sn._v, sn_ref._v)
        conv.eval(), ref.eval()
        w = conv.weight
        assert not torch.allclose(w, conv.parametrizations.weight.original)   # the normalisation is active
        x = torch.randn(4, 5, R, R)
        y, y_ref = conv(x), ref(x)
        torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-5, msg=f"R={R}")
        orig, orig_ref = conv.parametrizations.weight.original, ref.parametrizations.weight.original
        g, = torch.autograd.grad(y.square().sum(), orig)
        g_ref, = torch.autograd.grad(y_ref.square().sum(), orig_ref)
        torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-4, msg=f"R={R}")
        conv.train(), ref.train()
        u0 = sn._u.clone()
        with torch.no_grad():
            torch.testing.assert_close(conv(x), ref(x), rtol=0, atol=1e-5, msg=f"R={R} train")
        assert not torch.equal(sn._u, u0)                                     # a power iteration ran
        torch.testing.assert_close(sn._u, sn_ref._u, rtol=0, atol=1e-6)
        torch.testing.assert_close(sn._v, sn_ref._v, rtol=0, atol=1e-6)


def test_precomputed_leaf_conditioning_matches_per_batch():
    """Stage 2 computes every leaf's reconstruction and P(l|x) once for the training set; a batch then indexes its
    rows. The frozen TreeVAE is deterministic in eval mode, so this must give the same leaves (same RNG draws) and
    the same conditioning images as running it on the batch. Tolerance 1e-6: batch-size-dependent float sums."""
    import data
    tv = smoke_treevae(seed=3, splits=(1,)).eval()
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 1, 28, 28), dtype=torch.uint8, generator=g)
    x_hat_all, probs_all = train.leaf_reconstructions(tv, images, CPU, batch=16)
    assert x_hat_all.shape == (40, 3, 1, 28, 28) and probs_all.shape == (40, 3)
    rows = torch.tensor([5, 0, 39, 17, 22, 8])
    x_hat_b, probs_b = tv.reconstruct(data.to_float(images[rows]))
    torch.manual_seed(7)
    cond_pre, leaf_pre = train.leaf_condition(x_hat_all[rows], probs_all[rows])
    torch.manual_seed(7)
    cond_b, leaf_b = train.leaf_condition(x_hat_b, probs_b.float())
    assert torch.equal(leaf_pre, leaf_b)
    torch.testing.assert_close(cond_pre, cond_b, rtol=0, atol=1e-6)
    assert cond_pre.min() >= -1 and cond_pre.max() <= 1                 # the DDPM's [-1, 1] range
