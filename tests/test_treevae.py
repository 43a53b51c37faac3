"""Tests for treevae.py: reference checks on CPU with tiny trees (the 'smoke' preset, 28 x 28 images, batch 16).

What is checked against what:
- kl_normal / kl_bernoulli against torch.distributions (extreme logits included); precision_weighted against the
  closed form of a product of two Gaussian densities.
- Probability sums of P(l|x) (forward, reconstruct) and of the p-routers (generate) while the tree grows and is
  pruned (pass-through nodes included); subtree training touches nothing outside the subtree (bit for bit).
- Forced-leaf generation, checkpoint round trips, choose_split's rules.
- The clustering metrics: tests/test_metrics.py (it imports this file's smoke-tree helpers).
- The contrastive (CIFAR-10) path, its loss against the authors' formula written out with loops, and a small
  learning check on two obvious synthetic clusters.
"""
import copy
import itertools
import math
from dataclasses import fields

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Bernoulli, Normal, kl_divergence

import treevae
from treevae import (TreeVAE, TreeVAEConfig, choose_split, kl_bernoulli, kl_normal, nmi, precision_weighted,
                     treevae_config)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread; two threads on the 2 shared cores can be 10x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def smoke_cfg(**changes):
    return TreeVAEConfig(**{**treevae_config("mnist", "smoke").__dict__, **changes})


def make_model(seed=0, splits=(), **changes):
    """A smoke-size MNIST TreeVAE (root 0 -> leaves 1, 2), then `splits` applied in order. Tests that grow to
    depth 3 pass max_depth=3 (the smoke preset has max_depth 2, and deeper nodes have no bottom-up level)."""
    torch.manual_seed(seed)
    model = TreeVAE(smoke_cfg(**changes))
    for leaf in splits:
        model.split(leaf)
    return model


def images(n=16, seed=0, channels=1, size=28):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, channels, size, size, generator=g)  # (n, C, H, W) in [0, 1]


def assert_sums_to_one(model, x):
    """P(l|x) from forward (train and eval mode), reconstruct and generate: each row sums to one."""
    ones = torch.ones(len(x))
    for mode in (True, False):
        model.train(mode)
        with torch.no_grad():
            lp = model(x)["leaf_probs"]  # (B, n_leaves)
        assert lp.shape == (len(x), model.n_leaves)
        torch.testing.assert_close(lp.sum(1), ones)
    x_hat, lp = model.reconstruct(x)
    assert x_hat.shape == (len(x), model.n_leaves, 1, 28, 28) and 0 <= x_hat.min() and x_hat.max() <= 1
    torch.testing.assert_close(lp.sum(1), ones)
    x_gen, lp = model.generate(len(x), generator=torch.Generator().manual_seed(1))
    assert x_gen.shape == (len(x), model.n_leaves, 1, 28, 28)
    torch.testing.assert_close(lp.sum(1), ones)
    assert (lp >= 0).all()


# ----------------------------------------------------------------------------------------------------------------
# 1-2. Analytic formulas

def test_kl_normal_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    shape = (6, 4, 2, 2)  # (B, C, R, R)
    mu_q, mu_p = 3 * torch.randn(shape, generator=g), 3 * torch.randn(shape, generator=g)
    # variances from 6e-6 (softplus floor 1e-6 territory) to 150
    var_q, var_p = (torch.empty(shape).uniform_(-12, 5, generator=g).exp() for _ in range(2))
    ref = kl_divergence(Normal(mu_q.double(), var_q.double().sqrt()),
                        Normal(mu_p.double(), var_p.double().sqrt())).flatten(1).sum(1)  # (B,)
    ours64 = kl_normal(mu_q.double(), var_q.double(), mu_p.double(), var_p.double())
    assert ours64.shape == (6,)
    torch.testing.assert_close(ours64, ref, rtol=1e-10, atol=1e-10)
    ours32 = kl_normal(mu_q, var_q, mu_p, var_p)
    assert torch.isfinite(ours32).all()
    torch.testing.assert_close(ours32.double(), ref, rtol=1e-4, atol=1e-3)
    # KL(q || q) = 0 and KL(q || N(0, I)) against the textbook expression
    torch.testing.assert_close(kl_normal(mu_q, var_q, mu_q, var_q), torch.zeros(6), atol=1e-5, rtol=0)
    textbook = 0.5 * (var_q + mu_q ** 2 - 1 - var_q.log()).flatten(1).sum(1)
    torch.testing.assert_close(kl_normal(mu_q, var_q, torch.zeros(shape), torch.ones(shape)), textbook)


def test_kl_bernoulli_matches_torch_distributions_including_extreme_logits():
    values = torch.tensor([-30.0, -10.0, -1.0, 0.0, 0.5, 10.0, 30.0])
    pairs = torch.cartesian_prod(values, values)
    g = torch.Generator().manual_seed(0)
    pairs = torch.cat([pairs, 5 * torch.randn(30, 2, generator=g)])
    logit_q, logit_p = pairs[:, 0], pairs[:, 1]  # (N,)
    # float64 reference: sigmoid(+-30) is still distinguishable from 0 / 1 there, so torch's formula is exact
    ref = kl_divergence(Bernoulli(logits=logit_q.double()), Bernoulli(logits=logit_p.double()))
    assert torch.isfinite(ref).all()
    ours = kl_bernoulli(logit_q, logit_p)
    assert torch.isfinite(ours).all() and (ours >= -1e-6).all()
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kl_bernoulli(logit_q.double(), logit_p.double()), ref, rtol=1e-9, atol=1e-9)
    # the naive float32 formula on probabilities overflows at these logits (0 * log 0, log(0) = -inf) ...
    q, p = torch.sigmoid(logit_q), torch.sigmoid(logit_p)
    naive = q * (q / p).log() + (1 - q) * ((1 - q) / (1 - p)).log()
    assert not torch.isfinite(naive).all()
    # ... while ours stays exact even at +-100: KL(Bern(sigmoid(100)) || Bern(sigmoid(-100))) = 100 (to 1e-40)
    extreme = kl_bernoulli(torch.tensor([100.0, -100.0, 100.0]), torch.tensor([-100.0, 100.0, 100.0]))
    torch.testing.assert_close(extreme, torch.tensor([100.0, 100.0, 0.0]))


def log_normal(x, mu, var):
    return -0.5 * (math.log(2 * math.pi) + var.log() + (x - mu) ** 2 / var)


def test_precision_weighted_is_the_normalised_product_of_gaussians():
    """N(x; mu_hat, var_hat) N(x; mu_p, var_p) = N(mu_hat; mu_p, var_hat + var_p) N(x; mu_q, var_q) for all x."""
    g = torch.Generator().manual_seed(0)
    shape = (3, 5)
    mu_hat, mu_p = (s * torch.randn(shape, generator=g, dtype=torch.float64) for s in (2.0, 1.0))
    var_hat, var_p = (torch.empty(shape, dtype=torch.float64).uniform_(-4, 3, generator=g).exp() for _ in range(2))
    mu_q, var_q = precision_weighted(mu_hat, var_hat, mu_p, var_p)
    const = log_normal(mu_hat, mu_p, var_hat + var_p)
    for x in torch.linspace(-6, 6, 7, dtype=torch.float64):
        lhs = log_normal(x, mu_hat, var_hat) + log_normal(x, mu_p, var_p) - log_normal(x, mu_q, var_q)
        torch.testing.assert_close(lhs, const, rtol=1e-9, atol=1e-9)
    assert (var_q < torch.minimum(var_hat, var_p)).all()  # fusing two estimates always sharpens


# ----------------------------------------------------------------------------------------------------------------
# 3. Probability sums while growing and pruning

def test_leaf_probs_sum_to_one_through_growing_and_pruning():
    model, x = make_model(max_depth=3), images()
    assert model.leaves == [1, 2]
    assert_sums_to_one(model, x)
    assert model.split(1) == [3, 4] and model.leaves == [2, 3, 4]
    assert "1" not in model.decoder and "1" in model.router_p and "1" in model.router_q
    assert_sums_to_one(model, x)
    # prune leaf 4 (0 samples): node 1 keeps only leaf 3 and becomes a pass-through node
    assert model.prune([100, 100, 0], 0.01) == [4]
    assert model.leaves == [2, 3] and model.child_ids[1] == [3]
    assert "1" not in model.router_p and "1" not in model.router_q
    assert all("4" not in mods for mods in (model.dense, model.transform, model.decoder))
    assert_sums_to_one(model, x)
    # P(3|x) = P(1|x): the pass-through node hands its probability to its only child unchanged
    model.eval()
    out = model(x, sample=False)
    p_left = torch.sigmoid(model.router_q["0"](model.bottom_up_features(x)[model.cfg.max_depth]))
    torch.testing.assert_close(out["leaf_probs"][:, 1], p_left)
    assert torch.isfinite(model.loss(out, 1.0))
    # prune leaf 2 as well: the root becomes pass-through, a single leaf carries all the mass
    assert model.prune([0, 100], 0.01) == [2]
    assert model.leaves == [3] and "0" not in model.router_p
    assert_sums_to_one(model, x)
    assert model.prune([0], 0.5) == []  # a node never loses its last child
    # growing again below the pass-through chain still sums to one
    model.split(3)
    assert_sums_to_one(model, x)


def test_reconstruct_agrees_with_deterministic_forward():
    """reconstruct = posterior means in eval mode: same leaf_probs as forward(sample=False), and forward's rec
    term equals sum_l P(l|x) BCE(x, x_hat_l) computed from reconstruct's images."""
    model, x = make_model(splits=[1]), images()
    model.prune([100, 100, 0], 0.01)
    x_hat, lp = model.reconstruct(x)
    model.eval()
    with torch.no_grad():
        out = model(x, sample=False)
    torch.testing.assert_close(out["leaf_probs"], lp)
    bce = torch.stack([F.binary_cross_entropy(x_hat[:, l], x, reduction="none").flatten(1).sum(1)
                       for l in range(model.n_leaves)], 1)  # (B, n_leaves)
    torch.testing.assert_close(out["rec"], (lp * bce).sum(1).mean(), rtol=1e-4, atol=1e-2)
    for key in ("kl_root", "kl_nodes", "kl_decisions"):
        assert out[key] >= 0


# ----------------------------------------------------------------------------------------------------------------
# 4. Subtree training

def subtree_prefixes(model, node):
    kids = model.child_ids[node]
    return ([f"router_p.{node}.", f"router_q.{node}."]
            + [f"{part}.{k}." for k in kids for part in ("transform", "dense", "decoder")])


def test_subtree_step_changes_only_the_subtree():
    model, x = make_model(splits=[1], max_depth=3), images()
    new_leaves = model.split(3)                                  # node 3 (depth 2) -> 5, 6 (depth 3)
    params = model.train_subtree(3)
    prefixes = subtree_prefixes(model, 3)
    in_subtree = lambda name: any(name.startswith(p) for p in prefixes)
    named = dict(model.named_parameters())
    assert {id(p) for p in params} == {id(p) for n, p in named.items() if in_subtree(n)}
    before = copy.deepcopy(model.state_dict())
    opt = torch.optim.Adam(params, lr=1e-2, weight_decay=1e-2)
    loss = model.loss(model(x, decode=new_leaves), 0.5)
    loss.backward()
    opt.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(in_subtree(k) for k in changed), sorted(k for k in changed if not in_subtree(k))
    for name, p in named.items():
        if in_subtree(name):
            assert name in changed, f"subtree parameter {name} did not move"
        else:
            assert not p.requires_grad and p.grad is None, name
    # subtree batch norms ran in train mode (running statistics moved), the frozen ones did not
    assert f"decoder.{new_leaves[0]}.net.1.running_mean" in changed
    assert f"router_q.3.mlp.1.num_batches_tracked" in changed
    assert not any(k.endswith("num_batches_tracked") and not in_subtree(k) for k in changed)
    model.train_all()
    assert all(m.training for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_reconstruct_and_generate_keep_subtree_training_modes():
    """reconstruct/generate switch to eval mode and back; after train_subtree the modes are mixed (frozen tree in
    eval, subtree in train) and must come back exactly as they were, not all-eval."""
    model, x = make_model(splits=[1]), images()
    model.train_subtree(1)
    modes = {name: m.training for name, m in model.named_modules()}
    model.reconstruct(x)
    assert {name: m.training for name, m in model.named_modules()} == modes, "reconstruct changed the modes"
    model.generate(4)
    assert {name: m.training for name, m in model.named_modules()} == modes, "generate changed the modes"


# ----------------------------------------------------------------------------------------------------------------
# 5. Forced-leaf generation

def test_generate_leaf_uses_that_leafs_path_and_decoder(monkeypatch):
    # spectral_norm off: the test sets a decoder conv to zero weights, which a spectral norm cannot normalise
    model = make_model(max_depth=3, spectral_norm=False)
    z0 = torch.randn(5, 4, 2, 2)
    # initial tree: leaf 0 (node 1) is the first node after the root, so both calls draw the same eps for it
    full, _ = model.generate(5, z0=z0, generator=torch.Generator().manual_seed(3))
    only = model.generate(5, z0=z0, leaf=0, generator=torch.Generator().manual_seed(3))
    assert only.shape == (5, 1, 28, 28)
    assert torch.equal(only, full[:, 0])
    # a grown tree with a pass-through node, eps = 0 on every node: every leaf's forced images = its column
    model.split(1)
    model.split(3)
    model.prune([50, 0, 25, 25], 0.01)                           # leaf 4 goes: node 1 passes through to 3
    assert model.leaves == [2, 5, 6]
    monkeypatch.setattr(torch, "randn", lambda shape, generator=None, device=None: torch.zeros(shape, device=device))
    full, _ = model.generate(5, z0=z0)
    for k in range(model.n_leaves):
        assert torch.equal(model.generate(5, z0=z0, leaf=k), full[:, k]), k
    monkeypatch.undo()
    # leaf k's decoder made constant: generate(leaf=k) must return sigmoid(c) everywhere, other leaves must not
    k, c = 1, 0.7
    last = model.decoder[str(model.leaves[k])].net[-2]           # the conv before the pixel shuffle
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(c)
    forced = model.generate(6, leaf=k, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(forced, torch.full_like(forced, torch.sigmoid(torch.tensor(c)).item()))
    full, _ = model.generate(6, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(full[:, k], forced)
    for other in (0, 2):
        assert not torch.allclose(full[:, other], forced, atol=1e-3)
        assert not torch.allclose(model.generate(6, leaf=other), forced, atol=1e-3)
    for bad in (model.n_leaves, -1):
        with pytest.raises(ValueError):
            model.generate(2, leaf=bad)


# ----------------------------------------------------------------------------------------------------------------
# Presets (the authors' configs/mnist.yml, fmnist.yml, cifar10.yml)

def test_presets_follow_the_spec():
    mnist, fmnist, cifar = (treevae_config(d, "paper") for d in ("mnist", "fashion_mnist", "cifar10"))
    assert (mnist.latent_channels, mnist.latent_size, mnist.bottom_up_channels) == (16, 2, 32)
    assert (mnist.max_depth, mnist.max_leaves, mnist.batch_size) == (6, 10, 256)
    assert (mnist.lr, mnist.weight_decay) == (1e-3, 1e-5)
    assert (mnist.epochs_init, mnist.epochs_subtree, mnist.epochs_intermediate, mnist.epochs_finetune,
            mnist.splits_per_retrain, mnist.prune_threshold) == (150, 150, 80, 200, 3, 0.01)
    assert mnist.activation == "swish" and fmnist.activation == "leaky_relu" and not mnist.contrastive
    assert (cifar.latent_channels, cifar.latent_size, cifar.bottom_up_channels, cifar.in_channels) == (64, 4, 128, 3)
    assert cifar.contrastive and cifar.likelihood == "gaussian"
    # cifar10.yml: num_epochs_finetuning 0 (no fine-tuning on CIFAR-10); a shorter schedule must not add one
    for preset in ("paper", "fast"):
        assert treevae_config("cifar10", preset).epochs_finetune == 0, preset
    with pytest.raises(ValueError):
        treevae_config("mnist", "huge")


def test_paper_presets_equal_the_authors_configs():
    """treevae.AUTHORS (the authors' configs/mnist.yml, fmnist.yml, cifar10.yml, read field by field) holds for every
    data set's 'paper' preset; 'fast' and 'cpu' only cut epochs, so they keep the per-data-set settings; every
    config field is in the table or one of the few without a counterpart."""
    for k, dataset in enumerate(treevae.AUTHORS_DATASETS):
        paper = treevae_config(dataset, "paper")
        for field, (values, where) in treevae.AUTHORS.items():
            if values[k] is not None:
                assert getattr(paper, field) == values[k], \
                    f"{dataset}.{field}: ours {getattr(paper, field)!r}, theirs ({where}) {values[k]!r}"
        for preset in ("fast", "cpu"):
            cut = treevae_config(dataset, preset)
            changed = {f.name for f in fields(TreeVAEConfig) if getattr(cut, f.name) != getattr(paper, f.name)}
            assert changed <= {"epochs_init", "epochs_subtree", "epochs_intermediate", "epochs_finetune"}, changed
            assert all(getattr(cut, f) < getattr(paper, f) for f in changed), (dataset, preset)
    no_counterpart = {"dataset", "decoder_arch", "decoder_channels", "val_fraction"}
    assert set(treevae.AUTHORS) | no_counterpart == {f.name for f in fields(TreeVAEConfig)}
    assert not set(treevae.AUTHORS) & no_counterpart
    # the departures the review found, spelled out (fmnist.yml, cifar10.yml)
    fmnist, cifar = treevae_config("fashion_mnist", "fast"), treevae_config("cifar10", "fast")
    assert (fmnist.kl_start, fmnist.residual, fmnist.spectral_norm) == (0.5, True, False)
    assert (cifar.kl_start, cifar.decay_kl, cifar.residual, cifar.spectral_norm) == (0.01, 0.01, True, False)
    assert (cifar.epochs_intermediate, cifar.epochs_finetune, cifar.batch_size) == (0, 0, 128)


# ----------------------------------------------------------------------------------------------------------------
# 10. Checkpoint round trip

def test_checkpoint_round_trip(tmp_path):
    model, x = make_model(splits=[1], max_depth=3), images()
    model.split(4)                                               # leaves [2, 3, 5, 6]
    model.prune([30, 0, 20, 20], 0.01)                           # node 1 passes through to 4 -> (5, 6)
    assert model.leaves == [2, 5, 6]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(2):                                           # move weights and batch-norm statistics
        opt.zero_grad()
        model.loss(model(x), 1.0).backward()
        opt.step()
    model.eval()
    path = tmp_path / "treevae.pt"
    torch.save(model.checkpoint(), path)
    m2 = TreeVAE.from_checkpoint(torch.load(path, weights_only=True)).eval()
    assert m2.leaves == model.leaves and m2.topology() == model.topology() and m2.cfg == model.cfg
    assert m2.next_id == model.next_id and "1" not in m2.router_p
    with torch.no_grad():
        a, b = model(x, sample=False), m2(x, sample=False)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    for u, v in zip(model.reconstruct(x), m2.reconstruct(x)):
        assert torch.equal(u, v)
    g1, g2 = (m.generate(4, generator=torch.Generator().manual_seed(5)) for m in (model, m2))
    assert torch.equal(g1[0], g2[0]) and torch.equal(g1[1], g2[1])
    assert m2.split(2) == model.split(2)                         # node ids are never reused after loading
    ck = model.checkpoint()
    ck["version"] = treevae.VERSION + 1
    with pytest.raises(ValueError):
        TreeVAE.from_checkpoint(ck)


# ----------------------------------------------------------------------------------------------------------------
# 11. choose_split

def one_hot_probs(counts, n_leaves):
    """Hard leaf_probs (N, n_leaves): counts[k] samples sit entirely in leaf k."""
    idx = torch.cat([torch.full((c,), k) for k, c in enumerate(counts)])
    return F.one_hot(idx, n_leaves).float()


def test_choose_split_rules():
    model = make_model(splits=[1], max_depth=3, max_leaves=10)   # leaves [2, 3, 4] at depths 1, 2, 2
    leaf, msg, mask = choose_split(model, one_hot_probs([20, 50, 30], 3), batch_size=16)
    assert leaf == 3 and mask.tolist() == [False] * 20 + [True] * 50 + [False] * 30
    assert choose_split(model, one_hot_probs([20, 30, 50], 3), 16)[0] == 4
    assert choose_split(model, one_hot_probs([30, 20, 50], 3), 40)[0] == 4
    leaf, msg, mask = choose_split(model, one_hot_probs([30, 20, 50], 3), 60)   # nobody holds one batch
    assert leaf is None and mask is None
    # membership threshold min(1/n_eff, 0.5) = 1/3 here: group A counts for leaves 0 AND 1, so leaf 1 (30) wins;
    # with a 0.5 threshold leaf 2 (25) would have won
    probs = torch.tensor([[0.50, 0.35, 0.15]] * 20 + [[0.05, 0.15, 0.80]] * 25 + [[0.1, 0.6, 0.3]] * 10)
    leaf, _, mask = choose_split(model, probs, 16)
    assert leaf == 3 and int(mask.sum()) == 30
    # leaf budget: n_eff counts leaves with >= 1 % of the mass
    small = make_model(splits=[1], max_depth=3, max_leaves=3)
    assert choose_split(small, one_hot_probs([20, 50, 30], 3), 16)[0] is None
    assert choose_split(small, one_hot_probs([0, 60, 40], 3), 16)[0] == 3        # n_eff = 2 < 3
    assert choose_split(small, one_hot_probs([1, 60, 139], 3), 16)[0] == 4        # 0.5 % of the mass: n_eff 2
    assert choose_split(small, one_hot_probs([3, 60, 137], 3), 16)[0] is None     # 1.5 %: n_eff 3, budget hit
    # max depth: the fullest leaf (node 3) sits at depth 2 = max_depth -> stop; the next one is not tried
    deep = make_model(splits=[1], max_depth=2, max_leaves=10)
    leaf, msg, _ = choose_split(deep, one_hot_probs([40, 50, 30], 3), 16)
    assert leaf is None and "depth" in msg
    assert choose_split(deep, one_hot_probs([50, 40, 30], 3), 16)[0] == 2


# ----------------------------------------------------------------------------------------------------------------
# 12. Contrastive path (CIFAR-10)

def test_contrastive_path_is_finite_positive_and_trains():
    cfg = treevae_config("cifar10", "smoke")
    assert cfg.contrastive and cfg.in_channels == 3 and cfg.image_size == 32 and cfg.likelihood == "gaussian"
    torch.manual_seed(0)
    model = TreeVAE(cfg)
    model.split(1)
    x = images(8, seed=0, channels=3, size=32)
    x2 = (x.flip(3) + 0.05 * torch.randn_like(x)).clamp(0, 1)   # a second "view"
    out = model(x, x2)
    assert out["leaf_probs"].shape == (16, 3)                   # both views go through the ELBO
    assert torch.isfinite(out["contrastive"]) and out["contrastive"] > 0
    assert model(x)["contrastive"] == 0                         # one view: no contrastive term
    out["contrastive"].backward()
    # (cifar10.yml: no spectral norm, so the encoder's and bottom-up chain's weights are plain parameters)
    for name in ("projection.0.conv.weight", "projection.0.mlp.0.weight", "router_q.0.conv.weight",
                 "router_q.1.conv.weight", "encoder.net.0.weight", "bottom_up.0.net.0.0.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    model.zero_grad()
    loss = model.loss(model(x, x2), 0.5)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def written_out_info_nce(rows, temperature):
    """The InfoNCE of the authors' calc_aug_loss with loops: rows = [view 1; view 2] (lists of unit vectors), row a's
    positive is a +- n/2, its denominator every other row. Returns one term per row."""
    n, dot = len(rows), lambda u, v: sum(a * b for a, b in zip(u, v))
    terms = []
    for a in range(n):
        positive = math.exp(dot(rows[a], rows[(a + n // 2) % n]) / temperature)
        others = sum(math.exp(dot(rows[a], rows[k]) / temperature) for k in range(n) if k != a)
        terms.append(-math.log(positive / others))
    return terms


def test_contrastive_loss_against_the_formula_written_out():
    """TreeVAE.contrastive_loss on a fixed batch of 3 image pairs against the authors' formula written out
    (utils/training_utils.py calc_aug_loss, models/networks.py contrastive_projection): per inner node the
    L2-normalised [p, 1-p], InfoNCE at temperature 1 over all 5 other rows, weighted by the reach probability
    normalised by its sum; per bottom-up level the projection head (conv -> Linear -> batch norm -> swish -> Linear)
    and NT-Xent at temperature 0.5, averaged over rows and levels."""
    torch.manual_seed(0)
    cfg = treevae_config("cifar10", "smoke")
    model = TreeVAE(cfg).double()                                 # train mode: batch norms use the batch statistics
    g = torch.Generator().manual_seed(1)
    n, r = 6, cfg.latent_size                                     # 3 pairs: rows 0-2 view 1, rows 3-5 view 2
    d = [torch.randn(n, cfg.bottom_up_channels, r, r, generator=g, dtype=torch.float64)
         for _ in range(cfg.max_depth + 1)]
    logit_q = {0: 2 * torch.randn(n, generator=g, dtype=torch.float64),
               4: 2 * torch.randn(n, generator=g, dtype=torch.float64)}
    prob = {0: torch.ones(n, dtype=torch.float64),                # the root, and a node reached with ~6 %
            4: 0.12 * torch.rand(n, generator=g, dtype=torch.float64)}
    got = model.contrastive_loss(d, logit_q, prob)

    want = 0.0
    for i in logit_q:
        rows = []
        for logit in logit_q[i].tolist():
            p = 1 / (1 + math.exp(-logit))
            norm = math.sqrt(p * p + (1 - p) * (1 - p))
            rows.append([p / norm, (1 - p) / norm])
        w = prob[i].tolist()
        want += sum(wa * ta for wa, ta in zip(w, written_out_info_nce(rows, 1.0))) / sum(w)
    for level, head in zip(d, model.projection):
        conv, lin1, bn, lin2 = head.conv, head.mlp[0], head.mlp[1], head.mlp[3]
        h = F.conv2d(level, conv.weight, padding=1).flatten(1) @ lin1.weight.T            # (n, 128)
        h = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + bn.eps) * bn.weight + bn.bias
        h = h * torch.sigmoid(h)                                                          # swish
        h = h @ lin2.weight.T + lin2.bias                                                 # (n, 10)
        rows = [[x / math.sqrt(sum(y * y for y in row)) for x in row] for row in h.tolist()]
        want += sum(written_out_info_nce(rows, 0.5)) / n / len(d)
    assert got.item() == pytest.approx(want, rel=1e-9)
    # normalised weights: scaling a node's reach probabilities changes nothing
    scaled = model.contrastive_loss(d, logit_q, {0: prob[0], 4: 7 * prob[4]})
    assert scaled.item() == pytest.approx(want, rel=1e-9)


# ----------------------------------------------------------------------------------------------------------------
# 13. Learning check

def two_squares(n, seed):
    """Half the images dark with a bright square top-left, half with one bottom-right, plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = 0.1 * torch.rand(n, 1, 28, 28, generator=g)
    x[y == 0, :, 2:12, 2:12] += 0.8
    x[y == 1, :, 16:26, 16:26] += 0.8
    return x.clamp(0, 1), y


def test_learns_two_obvious_clusters():
    """150 Adam steps (batch 16, lr 2e-3, alpha annealed 0.1 -> 1) on a smoke tree: the argmax leaf separates the
    two kinds of image; untrained, NMI is ~0. A run can get stuck with every sample on one side (measured with the
    authors' encoder, seeds 0-7: 7 of 8 reach NMI 1, seed 0 stays at 0), so 2 of 3 seeds must succeed."""
    x, y = two_squares(256, seed=0)
    results = []
    for seed in (0, 1, 2):
        model = make_model(seed=seed)
        model.eval()
        with torch.no_grad():
            untrained = nmi(model(x, sample=False)["leaf_probs"].argmax(1), y)
        assert untrained < 0.5
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=2e-3)
        g = torch.Generator().manual_seed(seed)
        for step in range(150):
            batch = x[torch.randint(0, len(x), (16,), generator=g)]
            loss = model.loss(model(batch), min(1.0, 0.1 + step / 100))
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            results.append(nmi(model(x, sample=False)["leaf_probs"].argmax(1), y))
    assert sum(r >= 0.8 for r in results) >= 2, results


def test_map_conv_equals_conv2d():
    """MapConv (the 3x3 conv on small maps as one matrix product) computes F.conv2d to float rounding, gradients
    too, from NCHW and NHWC inputs alike, and writes NHWC maps (what makes the batch norms after it fast). Batch 2
    takes the branch that reorders the maps, batch 64 the one that reorders the matrix."""
    from treevae import MapConv
    torch.manual_seed(0)
    for (R, bias), B, layout in itertools.product(((2, True), (4, False), (3, True)), (2, 64),
                                                   (torch.contiguous_format, torch.channels_last)):
        conv = MapConv(5, 7, bias=bias)
        x = torch.randn(B, 5, R, R).contiguous(memory_format=layout).requires_grad_(True)
        y, y_ref = conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1)
        assert torch.allclose(y, y_ref, atol=1e-5), (R, B, layout)
        assert y.is_contiguous(memory_format=torch.channels_last), (R, B, layout)
        gw, gx = torch.autograd.grad(y.square().sum(), (conv.weight, x))
        gw_ref, gx_ref = torch.autograd.grad(y_ref.square().sum(), (conv.weight, x))
        assert torch.allclose(gw, gw_ref, atol=1e-4), (R, B, layout)
        assert torch.allclose(gx, gx_ref, atol=1e-4), (R, B, layout)


def test_fourier_conv_equals_conv2d():
    """FourierConv2d (a stride-1 conv through the DFT) computes F.conv2d to float rounding, gradients too, for
    square and rectangular kernels, paddings 0-2, odd and even padded widths (the half spectrum's last column is its
    own conjugate only when even), NCHW and NHWC inputs, with and without bias; it writes NHWC maps. The first
    case is the authors' encoder's conv at a small batch. Under autocast it runs the library conv (bf16 out)."""
    from treevae import FourierConv2d
    torch.manual_seed(0)
    cases = [(2, 11, 21, 19, 19, 12, 12, 1, 1, False), (3, 4, 5, 8, 9, 3, 4, 1, 2, True),
             (2, 2, 3, 10, 7, 4, 3, 0, 0, True), (2, 3, 2, 6, 6, 3, 3, 2, 0, False)]
    for (B, Ci, Co, H, W, kh, kw, ph, pw, bias), layout in itertools.product(
            cases, (torch.contiguous_format, torch.channels_last)):
        conv = FourierConv2d(Ci, Co, (kh, kw), padding=(ph, pw), bias=bias)
        x = torch.randn(B, Ci, H, W).contiguous(memory_format=layout).requires_grad_(True)
        y, y_ref = conv(x), F.conv2d(x, conv.weight, conv.bias, padding=(ph, pw))
        assert y.shape == y_ref.shape and y.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-5 * y_ref.abs().max().item())
        params = [x, conv.weight] + ([conv.bias] if bias else [])
        grads = torch.autograd.grad(y.square().sum(), params)
        grads_ref = torch.autograd.grad(y_ref.square().sum(), params)
        for g, g_ref in zip(grads, grads_ref):
            torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-5 * g_ref.abs().max().item())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv(x).dtype == torch.bfloat16


def test_fourier_conv_edge_cases():
    """FourierConv2d beyond the common shapes: float64, a channel-sliced (non-contiguous) input, padding above k - 1,
    a kernel as large as the padded map (1 x 1 output), batch 1 with one channel; the cases it hands to nn.Conv2d
    give nn.Conv2d's result or error (a 3-D unbatched input, 'same' padding, a kernel larger than the padded map);
    and its transform matrices, cached per shape, stay usable for training after a first call under
    torch.inference_mode() (inference tensors cannot be saved for backward)."""
    from treevae import FourierConv2d
    torch.manual_seed(0)
    f32, f64 = torch.float32, torch.float64
    for shape, k, pad, dtype, sliced in [((2, 3, 7, 6), 3, 1, f64, False), ((2, 6, 7, 6), 3, 1, f32, True),
                                         ((2, 3, 5, 5), 3, 3, f32, False), ((2, 3, 5, 4), (7, 6), 1, f32, False),
                                         ((1, 1, 6, 6), 4, 0, f32, False)]:
        x = torch.randn(shape, dtype=dtype)
        x = (x[:, ::2] if sliced else x).requires_grad_(True)
        conv = FourierConv2d(x.shape[1], 4, k, padding=pad).to(dtype)
        y, y_ref = conv(x), F.conv2d(x, conv.weight, conv.bias, padding=pad)
        tol = (1e-12 if dtype == torch.float64 else 1e-5) * y_ref.abs().max().item()
        torch.testing.assert_close(y, y_ref, rtol=0, atol=tol)
        g, g_ref = (torch.autograd.grad(out.square().sum(), x)[0] for out in (y, y_ref))
        torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-5 * g_ref.abs().max().item())
    conv = FourierConv2d(3, 4, 3, padding=1)
    x = torch.randn(3, 5, 5)                                              # unbatched: the library conv's job
    torch.testing.assert_close(conv(x), F.conv2d(x[None], conv.weight, conv.bias, padding=1)[0])
    with pytest.raises(RuntimeError):
        FourierConv2d(3, 4, 9, padding=1)(torch.randn(2, 3, 5, 5))    # 9 > 5 + 2: nn.Conv2d's error
    same = FourierConv2d(3, 4, 3, padding="same")
    x = torch.randn(2, 3, 6, 5)
    torch.testing.assert_close(same(x), F.conv2d(x, same.weight, same.bias, padding=1))
    conv, x = FourierConv2d(2, 3, 3, padding=1), torch.randn(2, 2, 11, 13)   # a shape no other test builds
    with torch.inference_mode():
        conv(x)
    conv(x).sum().backward()                      # would raise if the cache held inference tensors
    assert conv.weight.grad is not None


def test_generate_and_reconstruct_run_decoders_in_eval_mode():
    """From a model in train mode, generate/reconstruct twice give identical images (no batch statistics, no
    spectral-norm power iteration), and the train mode is restored afterwards."""
    model, x = make_model(splits=[1]), images()
    model.train()
    z0 = torch.randn(4, 4, 2, 2)
    a, _ = model.generate(4, z0=z0, generator=torch.Generator().manual_seed(1))
    b, _ = model.generate(4, z0=z0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert torch.equal(model.reconstruct(x)[0], model.reconstruct(x)[0])
    assert all(m.training for m in model.modules())
