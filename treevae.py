"""CNN-TreeVAE: a VAE whose latent variables sit on a binary tree that grows during training.

Paper: Manduchi et al., "Tree Variational Autoencoders", NeurIPS 2023 (arXiv 2306.08984), CNN variant as used by
Goncalves et al., "Structured Generations: Using Hierarchical Clusters to guide Diffusion Models" (arXiv 2407.06124).
Settings: the authors' code (github.com/JoGo175/diffuse-treevae): configs/mnist.yml, fmnist.yml, cifar10.yml for
every constant, models/model.py and utils/ for the mechanics. This file holds, in the paper's order (its Sec. 2):
configuration, the ELBO's building blocks (KLs, precision-weighted fusion), the networks, the model (tree walk,
inference and ELBO, generation, growing and pruning), the clustering metrics; then, as optional reading at the end,
the exact CPU rewrites of three convolutions. train.py runs the schedule (initial training -> split -> retrain ...
-> prune -> fine-tune).

Generative model (top-down), for a tree with nodes V, leaves L and root-to-leaf paths P_l:
    z_0 ~ N(0, I)                                           root latent, a small feature map (C, R, R)
    z_i | z_pa(i) ~ N(mu_p, var_p),  (mu_p, var_p) = Transformation_i(z_pa(i))
    c_i | z_i ~ Bernoulli(p_left_p = RouterP_i(z_i))        a learned, input-dependent decision per inner node
    x | z_l ~ Decoder_l(z_l)                                Bernoulli logits (MNIST, FMNIST) or unit Gaussian
Inference (Ladder-VAE style):
    d_0 = Encoder(x),  d_k = BottomUp_k(d_{k-1})            deterministic bottom-up chain, k = 1 .. max_depth
    a node at depth k reads d_{max_depth - k}               (the root reads the most abstract level)
    (mu_hat, var_hat) = Dense_i(d)
    root:   q(z_0|x) = N(mu_hat, var_hat)
    others: var_q = 1 / (1/var_hat + 1/var_p),  mu_q = (mu_hat/var_hat + mu_p/var_p) * var_q   (precision weighting)
    q(c_i = left | x) = p_left_q = RouterQ_i(d)             a separate router on the bottom-up features, so the soft
                                                            clustering P(l|x) = prod of decisions is deterministic in x
ELBO terms (all returned separately, batch means; minimise  rec + alpha * (kl_root + kl_nodes + kl_decisions)):
    rec          = sum_l P(l|x) * nll(x | Decoder_l(z_l))              summed over pixels
    kl_root      = KL(q(z_0|x) || N(0, I))
    kl_nodes     = sum_{i != root} P(i|x) * KL(q(z_i|z_pa, x) || p(z_i|z_pa))
    kl_decisions = sum_{inner i} P(i|x) * KL_Bern(q(c_i|x) || p(c_i|z_i))
P(i|x) is the q-probability of reaching node i (product of q-decisions on its path).

Legend: `mu_q, var_q` posterior, `mu_p, var_p` prior, `mu_hat, var_hat` bottom-up estimate, `p_left_q` / `p_left_p`
router outputs (as logits `logit_q`, `logit_p`), `prob[i]` = P(i|x) of shape (B,), `leaf_probs` (B, n_leaves).
Node ids are integers that never get reused; the tree topology is plain data: `self.parent` and `self.child_ids`
dicts, `self.depth`. Every feature visits the tree through the single breadth-first walk `TreeVAE.walk`.

Growing (the authors' train/train_tree.py and utils/training_utils.py): after the initial tree (root + 2 leaves),
repeatedly pick the leaf holding the most training samples (choose_split), give it two children and train only that
new subtree on the leaf's samples with the rest of the tree frozen (eval mode: frozen batch-norm statistics), then
attach it (the split leaf's decoder is dropped). Every `splits_per_retrain` splits the whole tree retrains. Growth
stops at the leaf budget, at max depth, or when no leaf holds one batch of samples; then leaves holding < 1 % of
the hard-assigned samples are pruned and the whole tree is fine-tuned. Labels are never used for any decision.
Where we differ from the authors it is marked [ours] with the reason.
"""
import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from data import all_views, batch_random, setting

VERSION = 2  # bump when the checkpoint layout changes


@dataclass
class TreeVAEConfig:
    # flag=False: set by treevae_config from the data set (its image shape, and the latent map size that the
    # encoders produce for it: 2 x 2 at 28 x 28, 4 x 4 at 32 x 32), not a user setting.
    dataset: str = setting("mnist", "data set the config was made for", flag=False)
    in_channels: int = setting(1, "image channels", flag=False)
    image_size: int = setting(28, "image height = width, pixels", flag=False)
    likelihood: str = setting("bernoulli", "decoder likelihood: bernoulli (BCE on [0, 1] targets) | gaussian (sum "
                              "of squared errors)", choices=("bernoulli", "gaussian"))
    latent_channels: int = setting(16, "latent channels per node (16 x 2 x 2 on MNIST)", ge=1)
    latent_size: int = setting(2, "latent map height = width", flag=False)
    bottom_up_channels: int = setting(32, "channels of the bottom-up features (32 x 2 x 2 on MNIST)", ge=1)
    encoder_arch: str = setting("authors", "28 x 28 encoder: authors (large kernels) | fast (pixel unshuffle)",
                                choices=("authors", "fast"))
    decoder_arch: str = setting("fast", "28 x 28 decoder: fast (ours, pixel shuffle) | authors (transposed convs)",
                                choices=("fast", "authors"))
    decoder_channels: int = setting(16, "decoder width (its 7 x 7 convs dominate the FLOPs: 16 keeps ~1.0 M "
                                        "parameters at 10 leaves; CIFAR-10's decoder divides it by 4)", ge=4)
    activation: str = setting("swish", "swish | leaky_relu (slope 0.3, the authors' Fashion-MNIST setting)",
                              choices=("swish", "leaky_relu"))
    residual: bool = setting(False, "skip connections in the bottom-up blocks (the authors' res_connections: off on "
                                    "MNIST, on on Fashion-MNIST and CIFAR-10)")
    spectral_norm: bool = setting(True, "spectral norm on the encoder, the bottom-up chain and split-born heads "
                                        "(the authors' placement; on for MNIST only)")
    decoder_spectral_norm: bool = setting(False, "spectral norm on the decoders' convolutions too (not the "
                                                 "authors' code)")
    max_depth: int = setting(6, "deepest level a leaf may reach (the root is level 0)", ge=1)
    max_leaves: int = setting(10, "leaf budget: growing stops when the effective leaf count reaches it", ge=2)
    lr: float = setting(1e-3, "Adam learning rate", gt=0)
    weight_decay: float = setting(1e-5, "Adam weight decay (L2)", ge=0)
    lr_decay_every: int = setting(100, "epochs between learning-rate decays (step decay, restarted every phase)",
                                  ge=1)
    lr_gamma: float = setting(0.1, "learning-rate factor at each decay", gt=0, le=1)
    batch_size: int = setting(256, "images per step (batch norm needs 2); with --treevae-contrastive each image "
                                   "gives two views", ge=2)
    kl_start: float = setting(0.0, "KL weight alpha at the start of every phase ...", ge=0, le=1)
    decay_kl: float = setting(0.001, "... growing by this much per epoch, capped at 1", ge=0)
    epochs_init: int = setting(150, "epochs of the initial tree (root + 2 leaves)", ge=0)
    epochs_subtree: int = setting(150, "epochs of each split's new subtree (only it trains)", ge=0)
    epochs_intermediate: int = setting(80, "epochs of the whole tree after every --treevae-splits-per-retrain "
                                           "splits", ge=0)
    splits_per_retrain: int = setting(3, "splits between two intermediate trainings of the whole tree", ge=1)
    epochs_finetune: int = setting(200, "epochs of the whole tree at the end", ge=0)
    finetune_kl_ramp: bool = setting(True, "fine-tuning ramps alpha to 1 over its epochs (the authors'); false: "
                                           "--treevae-decay-kl per epoch")
    prune_threshold: float = setting(0.01, "prune leaves holding less than this share of the hard-assigned "
                                           "training samples", ge=0, lt=1)
    contrastive: bool = setting(False, "CIFAR-10: two augmented views + InfoNCE/NT-Xent terms")
    contrastive_weight: float = setting(1.0, "weight of the contrastive terms (the authors' aug_decisions_weight: 100 "
                                             "on CIFAR-10, 1 elsewhere)", ge=0)
    val_fraction: float = setting(0.1, "share of the training split held out for validation (never the test "
                                       "set)", gt=0, lt=1)


# The authors' value of every TreeVAEConfig field that has a counterpart in their code, per data set, read from
# their configs/mnist.yml, configs/fmnist.yml and configs/cifar10.yml (the key named in each row) or, for constants
# that sit in their code, from the file named. The 'paper' preset equals it (tests/test_treevae.py holds every row);
# None: that data set has no counterpart. Rows:  field: ((mnist, fashion_mnist, cifar10), where).
AUTHORS = {
    "in_channels": ((1, 1, 3), "configs/*.yml inp_channels"),
    "image_size": ((28, 28, 32), "configs/*.yml inp_shape"),
    "likelihood": (("bernoulli", "bernoulli", "gaussian"), "configs/*.yml activation: sigmoid | mse"),
    "latent_channels": ((16, 16, 64), "configs/*.yml latent_channels"),
    "latent_size": ((2, 2, 4), "configs/*.yml representation_dim"),
    "bottom_up_channels": ((32, 32, 128), "configs/*.yml bottom_up_channels"),
    "encoder_arch": (("authors", "authors", None), "configs/*.yml encoder: cnn1 (28 x 28; CIFAR-10's cnn2 is our "
                     "ResEncoder, which the field does not select)"),
    "activation": (("swish", "leaky_relu", "swish"), "configs/*.yml act_function"),
    "residual": ((False, True, True), "configs/*.yml res_connections"),
    "spectral_norm": ((True, False, False), "configs/*.yml spectral_norm (placement: models/model.py)"),
    "decoder_spectral_norm": ((False, False, False), "models/model.py get_decoder(spectral_normalization=False)"),
    "max_depth": ((6, 6, 6), "len(bottom_up_channels) - 1 in train/train_tree.py"),
    "max_leaves": ((10, 10, 10), "configs/*.yml num_clusters_tree"),
    "lr": ((1e-3, 1e-3, 1e-3), "configs/*.yml lr"),
    "weight_decay": ((1e-5, 1e-5, 1e-5), "configs/*.yml weight_decay"),
    "lr_decay_every": ((100, 100, 100), "configs/*.yml decay_stepsize"),
    "lr_gamma": ((0.1, 0.1, 0.1), "configs/*.yml decay_lr"),
    # batch_size counts images per step; cifar10.yml's 256 counts both views: utils/data_utils.py halves it
    "batch_size": ((256, 256, 128), "configs/*.yml batch_size (CIFAR-10: 256 views = 128 images)"),
    "kl_start": ((0.0, 0.5, 0.01), "configs/*.yml kl_start"),
    "decay_kl": ((0.001, 0.001, 0.01), "configs/*.yml decay_kl"),
    "epochs_init": ((150, 150, 150), "configs/*.yml num_epochs"),
    "epochs_subtree": ((150, 150, 150), "configs/*.yml num_epochs_smalltree"),
    "epochs_intermediate": ((80, 80, 0), "configs/*.yml num_epochs_intermediate_fulltrain (intermediate_fulltrain: "
                            "True everywhere; CIFAR-10's 0 epochs train nothing)"),
    "splits_per_retrain": ((3, 3, 3), "train/train_tree.py growing_iterations % 3"),
    "epochs_finetune": ((200, 200, 0), "configs/*.yml num_epochs_finetuning"),
    "finetune_kl_ramp": ((True, True, True), "train/train_tree.py decay max(0.01, 1 / (epochs - 1))"),
    "prune_threshold": ((0.01, 0.01, 0.01), "utils/training_utils.py compute_pruning_leaf"),
    "contrastive": ((False, False, True), "configs/*.yml augment, augmentation_method 'InfoNCE,instancewise_full'"),
    "contrastive_weight": ((1.0, 1.0, 100.0), "configs/*.yml aug_decisions_weight (acts only with augment: True)"),
}
# No counterpart: dataset (a label); decoder_arch (we differ: our default decoder goes through pixel shuffle, README
# "Where we differ"; 'authors' is theirs); decoder_channels (our decoders' width); val_fraction (the authors validate
# on the test set, we hold out part of the training set). Their settings we have no field for: dropout_router 0.0
# (no dropout), initial_depth 1, grow and prune True (always), dim_mod_conv True (CIFAR-10: our ResEncoder and
# ResDecoder change resolution by strided and upsampling convs).
AUTHORS_DATASETS = ("mnist", "fashion_mnist", "cifar10")      # the columns of AUTHORS


def treevae_config(dataset: str, preset: str = "paper") -> TreeVAEConfig:
    """Named presets. 'paper' = the authors' architecture and schedule per data set (AUTHORS above: configs/mnist.yml
    150 / 150 / 80 / 200 epochs, Adam 1e-3, weight decay 1e-5, batch 256, lr x0.1 every 100 epochs; fmnist.yml: leaky
    ReLU, residual connections, no spectral norm, kl_start 0.5; cifar10.yml: 64 x 4 x 4 latents, 128 bottom-up
    channels, contrastive terms of weight 100, 128 image pairs a step, KL weight from 0.01 by 0.01 an epoch, no
    whole-tree retraining or fine-tuning); 'fast' and 'cpu' cut its epochs only (their stage 2 differs:
    ddpm.PRESETS); 'smoke' is a tiny model for CPU tests."""
    if dataset not in AUTHORS_DATASETS:
        raise ValueError(f"unknown data set {dataset!r}: use data.canonical_name first (mnist, fashion_mnist, cifar10)")
    cfg = TreeVAEConfig(dataset=dataset)                     # the defaults are configs/mnist.yml's
    if dataset == "fashion_mnist":
        cfg = _replace(cfg, activation="leaky_relu", residual=True, spectral_norm=False, kl_start=0.5)
    elif dataset == "cifar10":
        cfg = _replace(cfg, in_channels=3, image_size=32, likelihood="gaussian", latent_channels=64, latent_size=4,
                       bottom_up_channels=128, decoder_channels=128, residual=True, spectral_norm=False,
                       batch_size=128, kl_start=0.01, decay_kl=0.01, epochs_intermediate=0, epochs_finetune=0,
                       contrastive=True, contrastive_weight=100.0)
    if preset == "paper":
        return cfg
    if preset in ("fast", "cpu"):   # ~7x shorter: minutes on a GPU, ~15 min on 2 CPU cores for the 9k-digit MNIST
        # subset; 'cpu' is 'fast' here and differs in its stage 2 (a small U-Net: ddpm.PRESETS). A phase the data
        # set's config skips (0 epochs) stays skipped.
        return _replace(cfg, epochs_init=24, epochs_subtree=12, epochs_intermediate=min(cfg.epochs_intermediate, 6),
                        epochs_finetune=min(cfg.epochs_finetune, 24))
    if preset == "smoke":     # tiny and quick: CI end-to-end tests
        return _replace(cfg, latent_channels=4, bottom_up_channels=8, decoder_channels=8, max_depth=2,
                        max_leaves=3, batch_size=16, epochs_init=1, epochs_subtree=1, epochs_intermediate=1,
                        epochs_finetune=1, splits_per_retrain=1, kl_start=0.5, decay_kl=0.5)
    raise ValueError(f"unknown preset {preset!r}: choose paper, fast, cpu or smoke")


def _replace(cfg, **changes):
    return TreeVAEConfig(**{**asdict(cfg), **changes})


# ----------------------------------------------------------------------------------------------------------------
# Analytic divergences (tested against torch.distributions)

def kl_normal(mu_q, var_q, mu_p, var_p):
    """KL(N(mu_q, var_q) || N(mu_p, var_p)) summed over all but the batch dim. Exact formula, no clamp: the
    variances come out of softplus + eps, so the logs are finite."""
    kl = 0.5 * (torch.log(var_p) - torch.log(var_q) + (var_q + (mu_q - mu_p) ** 2) / var_p - 1.0)
    return kl.sum(tuple(range(1, kl.dim())))  # (B,); no flatten: that would copy an NHWC map


def kl_bernoulli(logit_q, logit_p):
    """KL(Bern(q) || Bern(p)) from logits, in log space: log p = logsigmoid(l), log(1-p) = logsigmoid(-l). The
    authors clamp probabilities instead; this form needs no clamp and is exact to float precision."""
    q = torch.sigmoid(logit_q)
    return (q * (F.logsigmoid(logit_q) - F.logsigmoid(logit_p))
            + (1 - q) * (F.logsigmoid(-logit_q) - F.logsigmoid(-logit_p)))  # (B,)


def precision_weighted(mu_hat, var_hat, mu_p, var_p):
    """Ladder-VAE fusion (Sonderby et al. 2016) of the bottom-up estimate with the top-down prior, TreeVAE's
    inference model: the posterior's precision is the sum of the two precisions (the authors' utils/model_utils.py
    adds an epsilon to both variances; ours come out of softplus + 1e-6 and need none)."""
    var_q = 1.0 / (1.0 / var_hat + 1.0 / var_p)
    mu_q = (mu_hat / var_hat + mu_p / var_p) * var_q
    return mu_q, var_q


# The contrastive terms' building block (CIFAR-10; TreeVAE.contrastive_loss)

def info_nce(u, temperature):
    """Per-row InfoNCE / NT-Xent (Oord et al. 2018; Chen et al. 2020) of unit rows u (2B, D) = [view 1; view 2]:
    row a's positive is its other view a' = a +- B, its negatives all other 2B - 2 rows (both views):
        nce_a = -log( exp(u_a . u_a' / T) / sum_{k != a} exp(u_a . u_k / T) ).   Returns (2B,)."""
    sim = (u @ u.T) / temperature                                            # (2B, 2B)
    sim = sim.masked_fill(torch.eye(len(u), dtype=torch.bool, device=u.device), float("-inf"))   # k != a
    B = len(u) // 2
    partner = torch.cat([torch.arange(B, 2 * B), torch.arange(B)]).to(u.device)
    return F.cross_entropy(sim, partner, reduction="none")


# ----------------------------------------------------------------------------------------------------------------
# Building blocks. All feature maps keep the spatial size R x R of the latents (2 x 2 on MNIST).

def act_fn(name):
    """The authors' act_function: swish (mnist.yml, cifar10.yml) or leaky ReLU with slope 0.3 (fmnist.yml)."""
    return nn.SiLU() if name == "swish" else nn.LeakyReLU(0.3)


def spectral(m, on=True):
    """Spectral normalisation (Miyato et al. 2018): W / sigma_max(W), sigma_max by one power iteration per step.
    It caps the gain of a layer at 1; the authors put it on the encoder and the bottom-up chain."""
    return nn.utils.parametrizations.spectral_norm(m) if on else m


def conv_bn(c_in, c_out, act, k=3, stride=1, pad=1, small=False, sn=False, conv=nn.Conv2d):
    """conv (no bias: the batch norm's shift replaces it) + BatchNorm + activation, the authors' conv unit."""
    # small=True: a 3x3 conv on the tree's R x R maps, as MapConv (its exact CPU rewrite, end of this file)
    conv = MapConv(c_in, c_out, bias=False) if small else conv(c_in, c_out, k, stride, pad, bias=False)
    return nn.Sequential(spectral(conv, sn), nn.BatchNorm2d(c_out), act_fn(act))


class MLPBlock(nn.Module):
    """3 x (conv3x3 + BN + act) on an R x R map, channels c_in -> c_in -> c_in -> c_out: the 'MLP' of the
    CNN-TreeVAE (the authors' `Conv`). Spectral norm on the first two convs (`sn`, the authors' bottom-up chain);
    a residual connection only when asked for and in == out."""
    def __init__(self, c_in, c_out, act, residual=False, sn=False):
        super().__init__()
        self.net = nn.Sequential(conv_bn(c_in, c_in, act, small=True, sn=sn), conv_bn(c_in, c_in, act, small=True, sn=sn),
                                 conv_bn(c_in, c_out, act, small=True))
        self.residual = residual and c_in == c_out

    def forward(self, h):
        return h + self.net(h) if self.residual else self.net(h)


class GaussianHead(nn.Module):
    """(mu, var) by two conv3x3; var = softplus(.) + 1e-6 keeps every log finite without clamping."""
    def __init__(self, c_in, c_out, sn=False):
        super().__init__()
        # MapConv: nn.Conv2d(c_in, c_out, 3, padding=1), computed as a matrix product on a CPU (end of this file)
        self.mu, self.var = spectral(MapConv(c_in, c_out), sn), spectral(MapConv(c_in, c_out), sn)

    def forward(self, h):
        return self.mu(h), F.softplus(self.var(h)) + 1e-6


class Transformation(nn.Module):
    """p(z_i | z_pa(i)): the prior of a node given its parent's sample."""
    def __init__(self, c_latent, c_hidden, act):
        super().__init__()
        self.block, self.head = MLPBlock(c_latent, c_hidden, act), GaussianHead(c_hidden, c_latent)

    def forward(self, z_parent):
        return self.head(self.block(z_parent))


class Router(nn.Module):
    """Decision logit: conv3x3 -> 1 channel, flatten R^2, two hidden layers (Linear, BN, act; width = bottom-up
    channels) -> 1. Returns the logit of 'go left' (B,); the probability is its sigmoid."""
    def __init__(self, c_in, r, c_hidden, act):
        super().__init__()
        self.conv = MapConv(c_in, 1, bias=False)       # a 3x3 conv (exact CPU rewrite, end of this file)
        self.mlp = nn.Sequential(nn.Linear(r * r, c_hidden, bias=False), nn.BatchNorm1d(c_hidden), act_fn(act),
                                 nn.Linear(c_hidden, c_hidden, bias=False), nn.BatchNorm1d(c_hidden), act_fn(act),
                                 nn.Linear(c_hidden, 1))

    def forward(self, h):
        # A decision is a difference of logits: under bf16 autocast (GPU) its 8-bit mantissa moves P(l|x) by ~1 %,
        # so the routers always run in float32 (they are a tiny share of the FLOPs).
        off = torch.autocast(h.device.type, enabled=False) if h.device.type in ("cuda", "cpu") else nullcontext()
        with off:                                  # (torch 2.4 has no autocast on MPS, not even a disabled one)
            return self.mlp(self.conv(h.float()).flatten(1)).squeeze(1)  # (B,)


class ProjectionHead(nn.Module):
    """CIFAR-10's contrastive head on a bottom-up level, the authors' contrastive_projection (models/networks.py):
    conv3x3 -> 1 channel, flatten R^2, Linear (128 units, no bias) -> BN -> act -> Linear -> 10. (Their head also
    has a sigma layer that no loss reads: left out.) Returns (B, 10)."""
    def __init__(self, c_in, r, act, hidden=128, out=10):
        super().__init__()
        self.conv = MapConv(c_in, 1, bias=False)       # a 3x3 conv (exact CPU rewrite, end of this file)
        self.mlp = nn.Sequential(nn.Linear(r * r, hidden, bias=False), nn.BatchNorm1d(hidden), act_fn(act),
                                 nn.Linear(hidden, out))

    def forward(self, d):
        return self.mlp(self.conv(d).flatten(1))      # (B, 1, R, R) -> (B, R^2) -> (B, 10)


class SmallEncoder(nn.Module):
    """MNIST/FMNIST encoder, 28 -> 7 -> 3 -> 2 px. [ours] Instead of the authors' large-kernel convs on the 28 x 28
    grid, a space-to-depth step (pixel unshuffle: each 4 x 4 patch becomes 16 channels at 7 x 7) lets every conv
    run on wide, small maps, which is 2-4x faster on a CPU for the same receptive field (README, bench.py)."""
    def __init__(self, c_in, c_out, act, sn=False):
        super().__init__()
        self.net = nn.Sequential(nn.PixelUnshuffle(4), conv_bn(16 * c_in, 32, act, 3, 1, 1, sn=sn),          # (32, 7, 7)
                                 conv_bn(32, 32, act, 3, 2, 0, sn=sn), conv_bn(32, c_out, act, 2, 1, 0, sn=sn))  # 3, 2 px

    def forward(self, x):
        return self.net(x)  # (B, C, 2, 2)


class SmallDecoder(nn.Module):
    """The encoder's mirror: transposed convs 2 -> 3 -> 7 px, a conv at 7 x 7, then depth-to-space (pixel
    shuffle: 16 channels -> one 4 x 4 patch) to 28 x 28. Outputs logits (Bernoulli) or means (Gaussian)."""
    def __init__(self, c_latent, c_out, width, act):
        super().__init__()
        w = width
        self.net = nn.Sequential(
            nn.ConvTranspose2d(c_latent, w, 2, 1, 0, bias=False), nn.BatchNorm2d(w), act_fn(act),   # (w, 3, 3)
            nn.ConvTranspose2d(w, w, 3, 2, 0, bias=False), nn.BatchNorm2d(w), act_fn(act),          # (w, 7, 7)
            conv_bn(w, w, act), nn.Conv2d(w, 16 * c_out, 3, padding=1), nn.PixelShuffle(4))         # (c_out, 28, 28)

    def forward(self, z):
        return self.net(z)


def _linspace_channels(a, b):
    """The authors' channel ladder: 4 evenly spaced integers from a to b (1 -> 32: 1, 11, 21, 32)."""
    return [int(a + (b - a) * k / 3) for k in range(4)]


class AuthorsEncoder(nn.Module):
    """The authors' MNIST encoder: three large-kernel convs, 28 -> 19 -> 10 -> 2 px, channels 1 -> 11 -> 21 -> 32.
    The second conv is a FourierConv2d: on a CPU it runs through the DFT and hands the third one NHWC maps (the
    layout oneDNN convolves in); elsewhere it is a plain nn.Conv2d and the maps stay NCHW, as measured there."""
    def __init__(self, c_in, c_out, act, sn=False):
        super().__init__()
        c = _linspace_channels(c_in, c_out)
        self.net = nn.Sequential(conv_bn(c[0], c[1], act, 12, 1, 1, sn=sn),
                                 conv_bn(c[1], c[2], act, 12, 1, 1, sn=sn, conv=FourierConv2d),  # DFT on a CPU
                                 conv_bn(c[2], c[3], act, 7, 5, 1, sn=sn))

    def forward(self, x):
        return self.net(x)  # (B, C, 2, 2)


class AuthorsDecoder(nn.Module):
    """The authors' MNIST decoder: transposed convs 2 -> 10 -> 19 -> 28 px, channels 16 -> 11 -> 6 -> 1."""
    def __init__(self, c_latent, c_out, width, act):
        super().__init__()
        c = _linspace_channels(c_latent, c_out)
        self.net = nn.Sequential(
            nn.ConvTranspose2d(c[0], c[1], 7, 5, 1, bias=False), nn.BatchNorm2d(c[1]), act_fn(act),     # (c1, 10, 10)
            nn.ConvTranspose2d(c[1], c[2], 12, 1, 1, bias=False), nn.BatchNorm2d(c[2]), act_fn(act),    # (c2, 19, 19)
            nn.ConvTranspose2d(c[2], c[3], 12, 1, 1, bias=False))                                       # (1, 28, 28)

    def forward(self, z):
        return self.net(z)


class ResBlock(nn.Module):
    def __init__(self, c, act):
        super().__init__()
        self.net = nn.Sequential(nn.BatchNorm2d(c), act_fn(act), nn.Conv2d(c, c, 3, padding=1, bias=False),
                                 nn.BatchNorm2d(c), act_fn(act), nn.Conv2d(c, c, 3, padding=1, bias=False))

    def forward(self, h):
        return h + self.net(h)


class ResEncoder(nn.Module):
    """CIFAR-10 encoder: conv3x3, ResNet blocks, 3 stride-2 downsamples 32 -> 4 px, ending with c_out channels."""
    def __init__(self, c_in, c_out, act, sn=False):
        super().__init__()
        chans, layers = [c_out // 4, c_out // 2, c_out], [spectral(nn.Conv2d(c_in, c_out // 4, 3, padding=1), sn)]
        for i, c in enumerate(chans):
            layers += [ResBlock(chans[max(i - 1, 0)], act), nn.Conv2d(chans[max(i - 1, 0)], c, 4, 2, 1)]
        self.net = nn.Sequential(*layers, ResBlock(c_out, act), nn.BatchNorm2d(c_out), act_fn(act))

    def forward(self, x):
        return self.net(x)  # (B, C, 4, 4)


class ResDecoder(nn.Module):
    """CIFAR-10 decoder: ResNet blocks and 3 x2 upsamples 4 -> 32 px, linear output (Gaussian means)."""
    def __init__(self, c_latent, c_out, width, act):
        super().__init__()
        chans, layers = [width, width // 2, width // 4], [nn.Conv2d(c_latent, width, 3, padding=1)]
        for i, c in enumerate(chans):
            layers += [ResBlock(chans[max(i - 1, 0)], act), nn.Upsample(scale_factor=2, mode="nearest"),
                       nn.Conv2d(chans[max(i - 1, 0)], c, 3, padding=1)]
        self.net = nn.Sequential(*layers, nn.BatchNorm2d(chans[-1]), act_fn(act), nn.Conv2d(chans[-1], c_out, 3, 1, 1))

    def forward(self, z):
        return self.net(z)


# ----------------------------------------------------------------------------------------------------------------
# The model

class TreeVAE(nn.Module):
    """The whole tree: a shared encoder and bottom-up chain, and per node a dense head (mu_hat, var_hat), a prior
    transformation (all but the root), two routers (inner nodes with two children) and a decoder (leaves).
    topology: the plain-data tree of a checkpoint (default: the initial tree, root + 2 leaves)."""

    def __init__(self, cfg: TreeVAEConfig, topology=None):
        super().__init__()
        for name in ("encoder_arch", "decoder_arch"):
            if getattr(cfg, name) not in ("fast", "authors"):
                raise ValueError(f"unknown {name} {getattr(cfg, name)!r}: use 'authors' or 'fast'")
        self.cfg = cfg
        c, r, cb, act = cfg.latent_channels, cfg.latent_size, cfg.bottom_up_channels, cfg.activation
        small = cfg.image_size == 28
        encoder = (AuthorsEncoder if cfg.encoder_arch == "authors" else SmallEncoder) if small else ResEncoder
        self.encoder = encoder(cfg.in_channels, cb, act, cfg.spectral_norm)
        # d_1 .. d_max_depth: one bottom-up step per level; the root reads d_max_depth, the deepest leaves d_0
        self.bottom_up = nn.ModuleList(MLPBlock(cb, cb, act, cfg.residual, cfg.spectral_norm)
                                       for _ in range(cfg.max_depth))
        # Per-node modules live in dicts keyed by str(node id); which keys exist follows the topology.
        self.dense, self.transform = nn.ModuleDict(), nn.ModuleDict()
        self.router_p, self.router_q, self.decoder = nn.ModuleDict(), nn.ModuleDict(), nn.ModuleDict()
        # NT-Xent heads, CIFAR-10 only: a 10-d projection of every bottom-up level (the authors' cifar10.yml,
        # augmentation_method 'InfoNCE,instancewise_full'); see contrastive_loss. Their batch norms see both views;
        # under torchrun train.sync_batchnorm makes them global-batch ones like every other.
        if cfg.contrastive:
            self.projection = nn.ModuleList(ProjectionHead(cb, r, act) for _ in range(cfg.max_depth + 1))
        # Topology as plain data. Default: the initial tree, root 0 with leaves 1 and 2.
        topology = topology or {"parent": [[0, -1], [1, 0], [2, 0]], "next_id": 3}
        self.parent, self.child_ids, self.depth = {}, {}, {}
        for i, p in topology["parent"]:            # parents are listed before their children
            self._add_node(i, None if p < 0 else p)
        self.next_id = topology["next_id"]

    # -- topology --------------------------------------------------------------------------------------------
    def _add_node(self, i, parent):
        """Register node i under `parent` and create its modules; a node starts as a leaf."""
        cfg, key = self.cfg, str(i)
        self.parent[i], self.child_ids[i] = parent, []
        self.depth[i] = 0 if parent is None else self.depth[parent] + 1
        # The authors' code normalises the dense heads of the nodes that splits create (ids from 3 on: the initial
        # tree is 0, 1, 2), not those of the initial tree; we follow it.
        self.dense[key] = GaussianHead(cfg.bottom_up_channels, cfg.latent_channels, cfg.spectral_norm and i >= 3)
        if parent is not None:
            self.transform[key] = Transformation(cfg.latent_channels, cfg.bottom_up_channels, cfg.activation)
            self.child_ids[parent].append(i)
            self._set_inner(parent)
        self.decoder[key] = self._new_decoder()

    def _new_decoder(self):
        cfg = self.cfg
        small = AuthorsDecoder if cfg.decoder_arch == "authors" else SmallDecoder
        decoder = (small if cfg.image_size == 28 else ResDecoder)(
            cfg.latent_channels, cfg.in_channels, cfg.decoder_channels, cfg.activation)
        if cfg.decoder_spectral_norm:      # not the authors' placement (see TreeVAEConfig), kept to compare
            for m in decoder.net.children():
                if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                    spectral(m)                    # registers the parametrization in place
        return decoder

    def _set_inner(self, i):
        """Node i has just gained or lost a child: fix its decoder (leaves only) and routers (two children only)."""
        cfg, key, n_children = self.cfg, str(i), len(self.child_ids[i])
        if n_children and key in self.decoder:
            del self.decoder[key]                  # a split leaf is an inner node now: only leaves decode
        if n_children == 2 and key not in self.router_p:
            r, cb = cfg.latent_size, cfg.bottom_up_channels
            self.router_p[key] = Router(cfg.latent_channels, r, cb, cfg.activation)
            self.router_q[key] = Router(cb, r, cb, cfg.activation)
        if n_children == 1 and key in self.router_p:   # a pass-through node decides nothing
            del self.router_p[key], self.router_q[key]

    def walk(self, start=0):
        """THE tree walk: breadth-first from `start`, parents before children. Everything else uses it."""
        queue = [start]
        while queue:
            i = queue.pop(0)
            yield i
            queue += self.child_ids[i]

    @property
    def leaves(self):
        """Leaf node ids in breadth-first order; a leaf's index in this list is its cluster label."""
        return [i for i in self.walk() if not self.child_ids[i]]

    @property
    def n_leaves(self):
        return len(self.leaves)

    def topology(self):
        return {"parent": [[i, -1 if self.parent[i] is None else self.parent[i]] for i in self.walk()],
                "next_id": self.next_id}

    # -- inference and the ELBO ------------------------------------------------------------------------------
    def bottom_up_features(self, x):
        """d_0 = Encoder(x), d_k = BottomUp_k(d_{k-1}); returns [d_0, ..., d_max_depth], each (B, Cb, R, R)."""
        d = [self.encoder(x)]
        for step in self.bottom_up:
            d.append(step(d[-1]))
        return d

    def forward(self, x, x2=None, sample=True, decode=None):
        """x: images in [0, 1] (B, C, H, W). x2: a second augmented view (contrastive training only).
        sample: reparameterised z (training) or posterior means (deterministic evaluation).
        decode: leaf ids whose reconstruction term is computed (default all); subtree training decodes only the
        new leaves, since the other leaves' terms do not depend on the trainable parameters.
        Returns the loss terms (batch means) and leaf_probs (B, n_leaves)."""
        return self.infer(x, x2, sample, decode)[0]

    def infer(self, x, x2=None, sample=True, decode=None):
        """The inference walk behind forward: (forward's dict, z) with z[i] the latent of node i (B, C, R, R)."""
        if x2 is not None:
            if not self.cfg.contrastive:
                raise ValueError("a second view x2 needs contrastive=True (the CIFAR-10 setting)")
            x = torch.cat([x, x2])                 # both views go through the ELBO
        B, D = x.shape[0], self.cfg.max_depth
        d = self.bottom_up_features(x)
        zero = x.new_zeros(B)
        z, prob, logit_q = {}, {0: x.new_ones(B)}, {}
        kl_root, kl_nodes, kl_decisions, rec = zero, zero, zero, zero
        decode = set(self.leaves if decode is None else decode)
        for i in self.walk():
            key, d_i = str(i), d[D - self.depth[i]]
            mu_hat, var_hat = self.dense[key](d_i)                          # (B, C, R, R) each
            if self.parent[i] is None:
                mu_q, var_q = mu_hat, var_hat
                kl_root = kl_normal(mu_q, var_q, torch.zeros_like(mu_q), torch.ones_like(var_q))
            else:
                mu_p, var_p = self.transform[key](z[self.parent[i]])
                mu_q, var_q = precision_weighted(mu_hat, var_hat, mu_p, var_p)
                kl_nodes = kl_nodes + prob[i] * kl_normal(mu_q, var_q, mu_p, var_p)
            z[i] = mu_q
            if sample:   # eps drawn in NCHW order: torch's CPU normal_ is ~20x slower on the NHWC maps of MapConv;
                # under torchrun each process takes its rows of the global batch's eps (data.batch_random)
                eps = batch_random(lambda u: u.normal_(), mu_q.shape, dtype=mu_q.dtype, device=mu_q.device,
                                   views=x2 is not None)
                z[i] = mu_q + var_q.sqrt() * eps
            kids = self.child_ids[i]
            if len(kids) == 2:
                logit_q[i] = self.router_q[key](d_i)                        # (B,)
                kl_decisions = kl_decisions + prob[i] * kl_bernoulli(logit_q[i], self.router_p[key](z[i]))
            elif not kids and i in decode:
                rec = rec + prob[i] * self.nll(x, self.decoder[key](z[i]))
            self._route(i, prob, logit_q.get(i))                             # P(child|x) for the children
        out = {"rec": rec.mean(), "kl_root": kl_root.mean(), "kl_nodes": kl_nodes.mean(),
               "kl_decisions": kl_decisions.mean(), "contrastive": x.new_zeros(()),
               "leaf_probs": torch.stack([prob[l] for l in self.leaves], 1)}  # (B, n_leaves)
        if x2 is not None:
            out["contrastive"] = self.cfg.contrastive_weight * self.contrastive_loss(d, logit_q, prob)
        return out, z

    def nll(self, x, out):
        """-log p(x | z_l) summed over pixels: BCE with logits (Bernoulli) or the sum of squared errors (the
        authors' unit-variance Gaussian, up to the factor 1/2 and a constant)."""
        if self.cfg.likelihood == "bernoulli":
            return F.binary_cross_entropy_with_logits(out.float(), x, reduction="none").flatten(1).sum(1)
        return ((out.float() - x) ** 2).flatten(1).sum(1)

    def loss(self, out, alpha):
        """The negative ELBO with KL annealing: rec + alpha * (KL_root + KL_nodes + KL_decisions) (+ contrastive
        terms); alpha = 1 is TreeVAE's ELBO (Manduchi et al. Sec. 2), the warm-up alpha < 1 the authors'
        AnnealKLCallback (utils/training_utils.py)."""
        return out["rec"] + alpha * (out["kl_root"] + out["kl_nodes"] + out["kl_decisions"]) + out["contrastive"]

    def contrastive_loss(self, d, logit_q, prob):
        """CIFAR-10's invariance terms, the authors' calc_aug_loss (utils/training_utils.py; cifar10.yml,
        augmentation_method 'InfoNCE,instancewise_full'). The batch holds view 1 then view 2 (2B rows).
        Decisions: at every inner node i, u = [p, 1-p] / ||[p, 1-p]|| (p = q's P(left)), InfoNCE at temperature 1
        over all 2B rows, and the rows' terms averaged with the detached reach probabilities as weights:
            sum_a w_a nce_a / sum_a w_a,   w_a = P(i | x_a),
        so a deep node's term counts as much as the root's (a plain mean of w * nce would shrink it by its mass).
        Bottom-up levels: InfoNCE at temperature 0.5 (NT-Xent) on the ProjectionHead of every level d_0..d_D, the
        mean over rows and levels. Under torchrun every term runs on the global batch (data.all_views): each row's
        negatives are all other rows of both views, as with one process. Returns a scalar tensor."""
        loss = d[0].new_zeros(())
        for i, logit in logit_q.items():
            p = torch.sigmoid(logit)                                         # (2b,) this process's rows
            u = all_views(F.normalize(torch.stack([p, 1 - p], 1), dim=1))   # (2B, 2), unit rows
            w = all_views(prob[i].detach())                                  # (2B,)
            loss = loss + (w * info_nce(u, 1.0)).sum() / w.sum()
        for level, head in zip(d, self.projection):
            h = all_views(F.normalize(head(level), dim=1))                   # (2B, 10)
            loss = loss + info_nce(h, 0.5).mean() / len(d)
        return loss

    # -- generation and reconstruction -----------------------------------------------------------------------
    def decode(self, i, z):
        """Image of leaf i from its latent, in [0, 1]."""
        out = self.decoder[str(i)](z)
        return torch.sigmoid(out) if self.cfg.likelihood == "bernoulli" else out.clamp(0, 1)

    @torch.no_grad()
    def reconstruct(self, x):
        """Every leaf's reconstruction of x (posterior means, eval mode): ((B, n_leaves, C, H, W), (B, n_leaves))."""
        assert x.min() >= 0 and x.max() <= 1, "TreeVAE expects images in [0, 1] (use data.to_float)"
        modes = {m: m.training for m in self.modules()}   # restored below (subtree training mixes modes)
        self.eval()
        out, z = self.infer(x, sample=False, decode=[])       # the same walk as training, at posterior means
        x_hat = torch.stack([self.decode(l, z[l]) for l in self.leaves], 1)
        for m, mode in modes.items():
            m.training = mode
        return x_hat, out["leaf_probs"]

    def _route(self, i, prob, logit_left):
        """Pass node i's probability to its children: split by the decision, or copy through one child."""
        kids = self.child_ids[i]
        if len(kids) == 2:
            p_left = torch.sigmoid(logit_left)
            prob[kids[0]], prob[kids[1]] = prob[i] * p_left, prob[i] * (1 - p_left)
        elif len(kids) == 1:
            prob[kids[0]] = prob[i]

    @torch.no_grad()
    def generate(self, n, z0=None, leaf=None, generator=None):
        """Ancestral sampling: z_0 ~ N(0, I), z_i ~ p(z_i | z_pa(i)) down the tree, every leaf decoded.
        Returns (x_hat (n, n_leaves, C, H, W) in [0, 1], leaf_probs (n, n_leaves) from the p-routers).
        leaf=k (a leaf index) walks only the path to that leaf and returns its images (n, C, H, W)."""
        modes = {m: m.training for m in self.modules()}   # restored below (subtree training mixes modes)
        self.eval()
        cfg, dev = self.cfg, next(self.parameters()).device
        shape = (n, cfg.latent_channels, cfg.latent_size, cfg.latent_size)
        z = {0: torch.randn(shape, generator=generator, device=dev) if z0 is None else z0.to(dev)}
        prob, path = {0: torch.ones(n, device=dev)}, None
        if leaf is not None:
            if not 0 <= leaf < self.n_leaves:
                raise ValueError(f"leaf {leaf} out of range: this tree has leaves 0..{self.n_leaves - 1}")
            path, i = set(), self.leaves[leaf]
            while i is not None:
                path.add(i)
                i = self.parent[i]
        for i in self.walk():
            if path is not None and i not in path:
                continue
            if self.parent[i] is not None:
                mu_p, var_p = self.transform[str(i)](z[self.parent[i]])
                eps = torch.randn(mu_p.shape, generator=generator, device=dev)
                z[i] = mu_p + var_p.sqrt() * eps
            self._route(i, prob, self.router_p[str(i)](z[i]) if len(self.child_ids[i]) == 2 else None)
        if leaf is not None:
            x_hat = self.decode(self.leaves[leaf], z[self.leaves[leaf]])                  # (n, C, H, W)
        else:
            x_hat = torch.stack([self.decode(l, z[l]) for l in self.leaves], 1)           # (n, L, C, H, W)
        for m, mode in modes.items():                      # decoders ran in eval mode too; now restore
            m.training = mode
        return x_hat if leaf is not None else (x_hat, torch.stack([prob[l] for l in self.leaves], 1))

    # -- growing and pruning (the authors' train/train_tree.py) -----------------------------------------------
    def split(self, leaf_id):
        """Turn leaf `leaf_id` into an inner node with two new children (their transformations, dense heads and
        decoders; the leaf gains two routers and loses its decoder). Returns the new ids."""
        if self.child_ids.get(leaf_id, [None]):
            raise ValueError(f"node {leaf_id} is not a leaf of this tree")
        if self.depth[leaf_id] >= self.cfg.max_depth:
            raise ValueError(f"leaf {leaf_id} is at max_depth {self.cfg.max_depth}: no bottom-up level for children")
        kids = [self.next_id, self.next_id + 1]
        self.next_id += 2
        for k in kids:
            self._add_node(k, leaf_id)
        return kids

    def subtree_parameters(self, node_id):
        """The parameters a split trains: the node's two routers and its children's transformation, dense and
        decoder. Everything else stays frozen."""
        mods = [self.router_p[str(node_id)], self.router_q[str(node_id)]]
        for k in self.child_ids[node_id]:
            mods += [self.transform[str(k)], self.dense[str(k)], self.decoder[str(k)]]
        return [p for m in mods for p in m.parameters()], mods

    def train_subtree(self, node_id):
        """Train mode for the subtree of `node_id` only: the rest of the tree is in eval mode (frozen batch-norm
        statistics) with requires_grad off. Returns the subtree parameters for the optimiser."""
        params, mods = self.subtree_parameters(node_id)
        self.eval().requires_grad_(False)
        for m in mods:
            m.train().requires_grad_(True)
        return params

    def train_all(self):
        """Train mode and gradients for the whole tree (undoes `train_subtree`)."""
        return self.train().requires_grad_(True)

    def prune(self, leaf_counts, threshold):
        """Remove leaves holding < threshold (prune_threshold: 1 %, utils/training_utils.py) of the hard-assigned
        samples (`leaf_counts` in leaf order), fewest first.
        A parent left with one child becomes a pass-through node; a node never loses its last child.
        Returns the pruned leaf ids."""
        total, pruned = sum(leaf_counts), []
        for leaf, count in sorted(zip(self.leaves, leaf_counts), key=lambda t: t[1]):
            parent = self.parent[leaf]
            if count >= threshold * total or parent is None or len(self.child_ids[parent]) < 2:
                continue
            for modules in (self.dense, self.transform, self.decoder):
                del modules[str(leaf)]
            self.child_ids[parent].remove(leaf)
            del self.parent[leaf], self.child_ids[leaf], self.depth[leaf]
            self._set_inner(parent)
            pruned.append(leaf)
        return pruned

    # -- checkpoint ------------------------------------------------------------------------------------------
    def checkpoint(self):
        """Self-contained: config, topology as plain lists, weights. torch.load(..., weights_only=True) reads it."""
        return {"version": VERSION, "config": asdict(self.cfg), "topology": self.topology(),
                "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()}}

    @classmethod
    def from_checkpoint(cls, ckpt):
        if ckpt.get("version") != VERSION:
            raise ValueError(f"checkpoint version {ckpt.get('version')} != {VERSION}: retrain with this code")
        cfg = TreeVAEConfig(**{f.name: ckpt["config"][f.name] for f in fields(TreeVAEConfig)
                               if f.name in ckpt["config"]})
        model = cls(cfg, ckpt["topology"])
        try:
            model.load_state_dict(ckpt["state_dict"])
        except RuntimeError as e:   # same version, other layout (e.g. CIFAR-10's projection heads before they
            # followed the authors'): one line, not torch's list of keys
            first = (str(e).splitlines() or [""])[0][:90]
            raise ValueError(f"the checkpoint's weights do not fit this code's {cfg.dataset} model ({first}): retrain "
                             f"with this code") from None
        return model


def choose_split(model, leaf_probs, batch_size):
    """Which leaf to split, from the training set's leaf_probs (N, n_leaves), as the authors' utils/training_utils.py:
    n_eff = number of leaves holding >= 1 % of the probability mass; a sample belongs to leaf l when
    P(l|x) >= min(1/n_eff, 0.5) (the 0.5 cap: with n_eff = 1 the threshold 1 would count almost no sample). Split the fullest leaf with at
    least one batch of samples; stop at the leaf budget or when the fullest candidate sits at max depth.
    Returns (leaf id or None, message, sample mask (N,) of that leaf)."""
    mass = leaf_probs.mean(0)                                               # (n_leaves,)
    n_eff = int((mass >= 0.01).sum())
    if n_eff >= model.cfg.max_leaves:
        return None, f"stop: {n_eff} effective leaves reached the budget of {model.cfg.max_leaves}", None
    members = leaf_probs >= min(1.0 / n_eff, 0.5)                           # (N, n_leaves)
    counts = members.sum(0)
    for k in counts.argsort(descending=True).tolist():
        leaf = model.leaves[k]
        if counts[k] < batch_size:
            break
        if model.depth[leaf] >= model.cfg.max_depth:
            return None, f"stop: the fullest leaf {leaf} is at the maximum depth {model.cfg.max_depth}", None
        return leaf, (f"split leaf {leaf} (index {k}, depth {model.depth[leaf]}, {int(counts[k])} samples, "
                      f"n_eff {n_eff}; leaf masses % {[round(100 * float(m)) for m in mass]})"), members[:, k]
    return None, "stop: no leaf holds one batch of samples", None


# ----------------------------------------------------------------------------------------------------------------
# The clustering metrics Manduchi et al. report (test set, hard assignment argmax_l P(l|x)): accuracy under the best
# cluster-to-class matching, NMI, leaf purity, dendrogram purity. Written here so that no scipy / scikit-learn is
# needed.

def hungarian(cost):
    """Minimum-cost perfect assignment of an n x m cost matrix (n <= m): the O(n^2 m) Hungarian algorithm with
    potentials (Kuhn-Munkres, shortest augmenting paths). Returns col[row] for every row."""
    cost = [list(map(float, row)) for row in cost]
    n, m = len(cost), len(cost[0])
    assert n <= m, "transpose the matrix: rows must not outnumber columns"
    u, v = [0.0] * (n + 1), [0.0] * (m + 1)        # row and column potentials (1-based, index 0 is a sentinel)
    match, way = [0] * (m + 1), [0] * (m + 1)      # match[j] = row assigned to column j
    for i in range(1, n + 1):
        match[0], j0 = i, 0
        minv, used = [math.inf] * (m + 1), [False] * (m + 1)
        while match[j0]:                           # grow the alternating tree until a free column is reached
            used[j0], i0, delta, j1 = True, match[j0], math.inf, 0
            for j in range(1, m + 1):
                if not used[j]:
                    reduced = cost[i0 - 1][j - 1] - u[i0] - v[j]
                    if reduced < minv[j]:
                        minv[j], way[j] = reduced, j0
                    if minv[j] < delta:
                        delta, j1 = minv[j], j
            for j in range(m + 1):                 # shift potentials so that a new zero-cost edge appears
                if used[j]:
                    u[match[j]] += delta
                    v[j] -= delta
                else:
                    minv[j] -= delta
            j0 = j1
        while j0:                                  # flip the augmenting path
            j1 = way[j0]
            match[j0], j0 = match[j1], j1
    col = [0] * n
    for j in range(1, m + 1):
        if match[j]:
            col[match[j] - 1] = j - 1
    return col


def contingency(pred, labels):
    """n[c, k] = number of samples of cluster c with label k, as a float64 tensor."""
    pred, labels = torch.as_tensor(pred).long(), torch.as_tensor(labels).long()
    n = torch.zeros(int(pred.max()) + 1, int(labels.max()) + 1, dtype=torch.float64)
    return n.index_put_((pred, labels), torch.ones(len(pred), dtype=torch.float64), accumulate=True)


def cluster_accuracy(pred, labels):
    """Accuracy under the best one-to-one matching of clusters to classes (Hungarian algorithm); clusters left
    without a class (more clusters than classes) count as errors."""
    n = contingency(pred, labels)
    if n.shape[0] > n.shape[1]:
        n = torch.cat([n, n.new_zeros(n.shape[0], n.shape[0] - n.shape[1])], 1)
    col = hungarian((-n).tolist())
    return float(sum(n[r, c] for r, c in enumerate(col)) / n.sum())


def nmi(pred, labels):
    """Normalised mutual information I(C; K) / ((H(C) + H(K)) / 2), scikit-learn's default 'arithmetic' mean."""
    p = contingency(pred, labels)
    p = p / p.sum()
    pc, pk = p.sum(1, keepdim=True), p.sum(0, keepdim=True)
    nz = p > 0
    mi = (p[nz] * (p[nz] / (pc @ pk)[nz]).log()).sum()
    h = lambda q: -(q[q > 0] * q[q > 0].log()).sum()
    denom = (h(pc) + h(pk)) / 2
    return 1.0 if denom == 0 else float(mi / denom)


def leaf_purity(pred, labels):
    """Fraction of samples that carry their leaf's majority label (size-weighted mean of per-leaf purity)."""
    n = contingency(pred, labels)
    return float(n.max(1).values.sum() / n.sum())


def dendrogram_purity(model, pred, labels):
    """Dendrogram purity (Heller & Ghahramani 2005): over all pairs of distinct samples with the same label,
    the mean purity of their lowest common ancestor's subtree (fraction of its samples with that label).
    Pairs whose LCA is node v with label k: (n_vk^2 - sum_children n_ck^2) / 2 across children, plus
    n_vk (n_vk - 1) / 2 inside a leaf. Uses the tree walk (reversed: children before parents)."""
    n_leaf = contingency(pred, labels)
    n_classes = n_leaf.shape[1]
    counts = {}                                                  # node -> (n_classes,) samples in its subtree
    for i in reversed(list(model.walk())):
        kids = model.child_ids[i]
        if not kids:
            k = model.leaves.index(i)
            counts[i] = n_leaf[k] if k < len(n_leaf) else torch.zeros(n_classes, dtype=torch.float64)
            pairs = counts[i] * (counts[i] - 1) / 2
        else:
            counts[i] = sum(counts[c] for c in kids)
            pairs = (counts[i] ** 2 - sum(counts[c] ** 2 for c in kids)) / 2
        purity = counts[i] / counts[i].sum().clamp(min=1)
        counts[i, "score"] = (pairs * purity).sum()
    total_pairs = (n_leaf.sum(0) * (n_leaf.sum(0) - 1) / 2).sum()
    if total_pairs == 0:
        return float("nan")                                     # no two samples share a label: undefined
    return float(sum(v for key, v in counts.items() if isinstance(key, tuple)) / total_pairs)


def cluster_metrics(model, pred, labels):
    """The four clustering figures TreeVAE reports (NMI, accuracy, leaf and dendrogram purity) plus the tree's size,
    for metrics.json."""
    pred, labels = torch.as_tensor(pred).long(), torch.as_tensor(labels).long()
    return {"nmi": nmi(pred, labels), "acc": cluster_accuracy(pred, labels),
            "leaf_purity": leaf_purity(pred, labels), "dendrogram_purity": dendrogram_purity(model, pred, labels),
            "n_leaves": model.n_leaves,
            "leaf_sizes": torch.bincount(pred, minlength=model.n_leaves).tolist()}


# ================================================================================================================
# OPTIONAL READING: exact CPU rewrites (measurements: docs/performance.md). Nothing above needs them to be
# understood: each computes the same linear map as the nn.Conv2d it replaces (same parameters and state-dict keys,
# equal to float32 rounding, tested in tests/test_fast_paths.py) and runs only on a CPU, where torch's convolutions
# pay a high fixed cost on the tree's tiny maps and odd channel counts. Off the CPU and under torch.compile each
# falls back to the plain convolution.
#   MapConv        3x3 conv on an R x R map as one matrix product: a conv is a linear map, i.e. a dense matrix of
#                  gathered kernel taps. 2-3x faster tree steps; its NHWC output makes the batch norm after it
#                  79 instead of 379 us (forward + backward of a (256, 32, 2, 2) map, 2 threads).
#   SpatialMajor   the (B, C, H, W) -> (H, W, B C) copy FourierConv2d starts from, with a backward that keeps the
#                  gradient's layout: the encoder's SiLU backward 4.6 -> 1.5 ms a step.
#   FourierConv2d  the authors' encoder's 12 x 12 conv through the DFT: correlation theorem on the zero-padded
#                  grid. Forward + backward at batch 256 on 2 threads 37.7 -> 20.4-21.2 ms (1.7 -> 0.4 GFLOP).
# The model picks them in conv_bn (small=True: MapConv), GaussianHead, Router and AuthorsEncoder.
# ================================================================================================================

class MapConv(nn.Conv2d):
    """A 3x3, padding-1 convolution on the small R x R maps of the tree (2 x 2 on MNIST), computed exactly as one
    matrix product. Output position p reads input position q through kernel tap (q - p + 1); gathering those taps
    turns the kernel into a dense (C_out R^2, C_in R^2) matrix (zero where |q - p| > 1). Same parameters and result
    as nn.Conv2d (tests check it), 2-3x faster on a CPU, where library convs have a high per-call cost on tiny maps.
    It writes channels-last (NHWC) maps: the batch norms after it then run ~5x faster on a CPU than on NCHW 2 x 2
    maps (forward + backward of a (256, 32, 2, 2) map, 2 threads: 79 instead of 379 us).
    Off the CPU, and under torch.compile, the plain convolution is used: there the gather's extra kernels would
    cost more than they save (and inductor fails on this gather of a spectral-normed weight)."""
    _taps = {}                           # (R, device) -> (tap index (P, Q), valid mask (P, Q)), built once

    def __init__(self, c_in, c_out, bias=True):
        super().__init__(c_in, c_out, 3, padding=1, bias=bias)

    @classmethod
    def taps(cls, R, device):
        key = (R, str(device))
        if key not in cls._taps:
            with torch.inference_mode(False):    # normal tensors even if first built under inference mode
                p = torch.arange(R * R, device=device)
                dy = (p // R)[None, :] - (p // R)[:, None] + 1               # (P, Q) row offset of the tap
                dx = (p % R)[None, :] - (p % R)[:, None] + 1
                valid = (dy >= 0) & (dy <= 2) & (dx >= 0) & (dx <= 2)
                cls._taps[key] = ((dy * 3 + dx).clamp(0, 8), valid)
        return cls._taps[key]

    def forward(self, h):
        if h.device.type != "cpu" or torch.compiler.is_compiling():
            return super().forward(h)
        (B, C, R, _), Co, P = h.shape, self.out_channels, h.shape[-1] ** 2
        index, valid = self.taps(R, h.device)
        taps = self.weight.flatten(2)[:, :, index] * valid                    # (C_out, C_in, P, Q)
        # The output is NHWC either way. Order the matrix (position, channel) and the NHWC maps are free views, or
        # keep it (channel, position) and reorder the maps: each costs a copy of what it reorders (and the matrix's
        # backward more), so reorder the smaller, the matrix on MNIST's 2 x 2 maps, the maps on CIFAR's 4 x 4 ones.
        if P * Co * P * C <= B * P * (C + Co):
            W = taps.permute(2, 0, 3, 1).reshape(P * Co, P * C)             # rows (p, c_out), cols (q, c_in)
            h = h.permute(0, 2, 3, 1).reshape(B, P * C)                      # (B, Q C_in): free if h is NHWC
            out = (h @ W.T).view(B, R, R, Co).permute(0, 3, 1, 2)           # (B, C_out, R, R), NHWC in memory
        else:
            W = taps.permute(0, 2, 1, 3).reshape(Co * P, C * P)             # rows (c_out, p), cols (c_in, q)
            out = (h.reshape(B, C * P) @ W.T).view(B, Co, R, R).contiguous(memory_format=torch.channels_last)
        return out if self.bias is None else out + self.bias.view(1, -1, 1, 1)


class SpatialMajor(torch.autograd.Function):
    """x (B, C, H, W) -> x laid out (H, W, B C) (a copy), for FourierConv2d. The backward returns the gradient NCHW if
    x was, else NHWC: autograd's permute would hand back a strided view of the (H, W, B, C) gradient, on which
    the elementwise backward ops before the conv run ~3x slower (the encoder's SiLU: 4.6 -> 1.5 ms a step)."""
    @staticmethod
    def forward(ctx, x):
        B, C, H, W = x.shape
        ctx.C = C
        ctx.layout = torch.contiguous_format if x.is_contiguous() else torch.channels_last
        return x.permute(2, 3, 0, 1).reshape(H, W, B * C)

    @staticmethod
    def backward(ctx, g):                                                # g (H, W, B C)
        H, W, _ = g.shape
        return g.reshape(H, W, -1, ctx.C).permute(2, 3, 0, 1).contiguous(memory_format=ctx.layout)


class FourierConv2d(nn.Conv2d):
    """A stride-1 convolution computed through the discrete Fourier transform, on a CPU [ours]. It serves the
    authors' encoder's second conv (11 -> 21 channels, 12 x 12 kernel, 19 x 19 -> 10 x 10): odd channel counts and a
    big kernel keep oneDNN at ~60 % of the machine's rate there, and it was the largest item of the MNIST step.

    torch's conv is a correlation: out[o, r, s] = sum_{i, u, v} w[o, i, u, v] xp[i, r + u, s + v], with xp the input
    zero-padded to N x M. For r < N - kh + 1 the index r + u never passes N - 1, so this equals the *circular*
    correlation on the N x M grid, and by the correlation theorem
        out = crop( IDFT_2( sum_i DFT_2(xp)[i] * conj(DFT_2(w padded to N x M)[o, i]) ) ).
    Each 1-D DFT is a small real matrix (complex numbers kept as (re, im) parts; the real input needs only the
    M // 2 + 1 non-negative column frequencies, the others being conjugates), the padding is folded into the
    forward matrices and the crop into the inverse ones, so the conv becomes a chain of small matrix products
    (transform rows and columns, one channel product per frequency, transform back) whose backward autograd
    derives. For the encoder's conv at batch 256: 0.4 instead of 1.7 GFLOP per forward, forward + backward
    38 -> 21 ms on 2 threads (docs/performance.md). Same linear map, equal to float32 rounding (tests); same
    parameters and state dict as nn.Conv2d. Off the CPU, in low precision (autocast, bf16 inputs: the transforms would lose digits), under
    torch.compile and for what it does not handle (stride, dilation, groups, other padding modes) the plain
    convolution runs."""
    _mats = {}                          # (H, W, kh, kw, ph, pw, device, dtype) -> the six transform matrices

    @classmethod
    def mats(cls, H, W, kh, kw, ph, pw, device, dtype):
        key = (H, W, kh, kw, ph, pw, str(device), dtype)
        if key not in cls._mats:
            with torch.inference_mode(False):  # normal tensors even if first built under inference mode
                cls._mats[key] = cls._build(H, W, kh, kw, ph, pw, device, dtype)
        return cls._mats[key]

    @staticmethod
    def _build(H, W, kh, kw, ph, pw, device, dtype):
        N, M = H + 2 * ph, W + 2 * pw                  # padded grid
        Ho, Wo, L = N - kh + 1, M - kw + 1, M // 2 + 1    # output size; column frequencies l = 0 .. M // 2
        f64 = dict(dtype=torch.float64)
        angle = lambda a, b, n: 2 * math.pi * torch.outer(torch.arange(a, **f64), b) / n   # (a, len(b))

        def columns(n_in, offset):   # real 1-D DFT over columns (padded position m + offset) -> (re; im): (2L, n_in)
            t = angle(L, torch.arange(n_in, **f64) + offset, M)
            return torch.cat([t.cos(), -t.sin()])

        def rows(n_in, offset):      # complex 1-D DFT over rows: [(row, part)] -> [(part, k)]: (2N, 2 n_in)
            t = angle(N, torch.arange(n_in, **f64) + offset, N)
            c, s = t.cos(), -t.sin()                                   # e^{-i t} = c + i s
            re, im = torch.stack([c, -s], 2), torch.stack([s, c], 2)   # (a + ib)(c + is), parts (a, b) interleaved
            return torch.cat([re, im]).reshape(2 * N, 2 * n_in)

        t = angle(Ho, torch.arange(N, **f64), N)                       # inverse over rows, k -> r < Ho: e^{+i t}
        c, s = t.cos(), t.sin()
        inv_rows = torch.stack([torch.cat([c, -s], 1), torch.cat([s, c], 1)], 1)   # [(r, part'), (part, k)]
        inv_rows = inv_rows.reshape(2 * Ho, 2 * N) / (N * M)                      # (1 / NM of the inverse here)
        # inverse over columns, l -> s < Wo, real part: x_s = sum_{l < M} X_l e^{+i t} = sum_{l <= M/2} c_l Re(..)
        c_l = torch.full((L,), 2.0, **f64)
        c_l[0] = 1.0                                                   # l = 0 has no conjugate twin,
        if M % 2 == 0:
            c_l[-1] = 1.0                                              # nor has l = M / 2
        t = angle(Wo, torch.arange(L, **f64), M)                       # (Wo, L)
        inv_cols = torch.cat([c_l * t.cos(), -c_l * t.sin()], 1)       # (Wo, 2L): [(part, l)]
        return [m.to(device, dtype) for m in (columns(W, pw), columns(kw, 0), rows(H, ph), rows(kh, 0),
                                              inv_rows, inv_cols)]

    def forward(self, x):
        plain = (x.device.type != "cpu" or torch.compiler.is_compiling() or torch.is_autocast_enabled("cpu")
                 or x.dtype not in (torch.float32, torch.float64) or x.dim() != 4
                 or self.stride != (1, 1) or self.dilation != (1, 1) or self.groups != 1
                 or self.padding_mode != "zeros" or isinstance(self.padding, str))
        if plain or any(k > n + 2 * p for k, n, p in zip(self.kernel_size, x.shape[-2:], self.padding)):
            return super().forward(x)    # (a kernel larger than the padded map: nn.Conv2d's error, not an empty map)
        w = self.weight                  # read once: under spectral norm each read runs a power iteration
        (B, C, H, W), (Co, _, kh, kw), (ph, pw) = x.shape, w.shape, self.padding
        cols, cols_w, rows, rows_w, inv_rows, inv_cols = self.mats(H, W, kh, kw, ph, pw, x.device, x.dtype)
        N, L, Ho, Wo = rows.shape[0] // 2, cols.shape[0] // 2, inv_rows.shape[0] // 2, inv_cols.shape[0]
        # spectra, frequencies first: X[part, (k, l), b, i] and Wf[part, (k, l), i, o]; part 0 = re, 1 = im
        X = torch.matmul(cols, SpatialMajor.apply(x))                                  # (H, 2L, B C): (h, part, l, .)
        X = (rows @ X.view(2 * H, L * B * C)).view(2, N * L, B, C)
        Wf = torch.matmul(cols_w, w.permute(2, 3, 1, 0).reshape(kh, kw, C * Co))
        Wf = (rows_w @ Wf.view(2 * kh, L * C * Co)).view(2, N * L, C, Co)
        # per frequency, sum_i X conj(Wf):  re = Xr Wr + Xi Wi,  im = Xi Wr - Xr Wi     (B, C) @ (C, Co) each
        (Xr, Xi), (Wr, Wi) = X.unbind(), Wf.unbind()       # (unbind, not X[0]: its backward fills no zeros)
        Yr = torch.baddbmm(torch.bmm(Xr, Wr), Xi, Wi)                                 # (N L, B, Co)
        Yi = torch.baddbmm(torch.bmm(Xi, Wr), Xr, Wi, alpha=-1)
        Z = torch.addmm(inv_rows[:, :N] @ Yr.view(N, -1), inv_rows[:, N:], Yi.view(N, -1))   # (2 Ho, L B Co)
        out = torch.matmul(inv_cols, Z.view(Ho, 2 * L, B * Co)).view(Ho, Wo, B, Co)   # (r, s, b, o)
        out = out.permute(2, 3, 0, 1).contiguous(memory_format=torch.channels_last)   # (B, Co, Ho, Wo), NHWC
        return out if self.bias is None else out + self.bias.view(1, -1, 1, 1)
