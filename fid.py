"""FID done right: the number that judges the generations (Heusel et al. 2017).

The Frechet distance between two Gaussians fitted to image features (Heusel et al. 2017, Eq. 6; the
2-Wasserstein distance of Dowson & Landau 1982), real features (mu1, sigma1), generated ones (mu2, sigma2):

    d^2 = ||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^{1/2})

- Everything statistical is float64: the moments are accumulated in float64 in a streaming way
  (FeatureStats, the pairwise update of Chan, Golub & LeVeque 1979), and, without scipy,
      tr (sigma1 sigma2)^{1/2} = sum_i sqrt(lambda_i),  lambda = eig(S1h sigma2 S1h),  Sih = sigmai^{1/2}
  S1h sigma2 S1h = A A^T with A = S1h S2h is symmetric PSD with the eigenvalues of sigma1 sigma2, so
  sum sqrt(lambda) = sum of the singular values of A: two `eigh` (the square roots) and one `svdvals`, exact
  also when N <= d makes the covariances singular. (eigvalsh(sigma1 @ sigma2) would be wrong: that product
  is not symmetric; eigvalsh(A A^T) would lose eigenvalues below 1e-16 * the largest to rounding.)
- Extractors (every result line names its extractor; FIDs are comparable only with the same extractor,
  the same N and the same reference set):
  * InceptionV3, pool3, 2048-d. Preprocessing: quantise to uint8 with rounding (a generated image is scored
    exactly like the PNG one would save, and like the real uint8 data), grayscale repeated to 3 channels,
    bilinear resize to 299x299 (align_corners=False, as pytorch-fid), scaled to [-1, 1], eval mode.
    weights="torchvision" (ImageNet, torchvision's file): NOT comparable to published FIDs.
    weights="tf-fid" (the TF graph of the original FID code, ported by pytorch-fid): comparable to papers
    that use TF-FID / pytorch-fid at the same N against the same reference set.
  * OfflineNet: a small CNN trained on the data set's own training labels, cached in cache/; its 128-d
    penultimate features give an Inception-free distance that needs no download: comparable only to itself
    (same data set and same cached net, whose id is printed).
- Uncertainty: FID from N samples is biased upwards by O(d/N). bootstrap_fid resamples real and generated
  features independently (rows with replacement) into replicates F_star; resampling adds about the same
  bias again, so the percentile interval [q2.5, q97.5] of F_star lies above F and usually misses the
  truth. We report the basic interval [2F - q97.5, 2F - q2.5] and the bias-corrected 2F - mean(F_star)
  (Efron & Tibshirani 1993, ch. 10 and 13). fid_infinity: FID_N = FID_inf + k/N (Chong & Forsyth 2020).
  The correction is first order: when d/N is not small (Inception: 2048/10,000) it removes most of the
  bias, not all. So compare FIDs only at equal N, next to the real-vs-real floor at that N.

Legend: mu (d,) feature mean, sigma (d, d) feature covariance (unbiased, 1/(N-1) like numpy.cov and
pytorch-fid), F point estimate, F_star (B,) bootstrap replicates, N images, d feature dimension.

Run:  python fid.py --real-vs-real --dataset fashion_mnist --root ../shared/data     (the floor)
      python fid.py --run runs/mnist                                 (score RUN/samples.npz against its test split)
      python fid.py --help
"""
import contextlib
import hashlib
import os
import sys
import time
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data


class FIDError(data.DataError):
    """User-facing error: one line with the cause and the remedy. A DataError, so that train.py and sample.py,
    which score through this module, print it as their one `error:` line too."""


# ---------------------------------------------------------------------------------------------------------
# 1. The Frechet distance and the feature statistics, all in float64
# ---------------------------------------------------------------------------------------------------------

def _f64(a):
    # numpy array or tensor (any dtype, any device) -> float64 tensor on the same device
    return torch.as_tensor(a).detach().to(torch.float64)


def _sqrt_psd(sigma):
    # sigma^{1/2} of a symmetric PSD matrix: sigma = V diag(w) V^T  ->  V diag(sqrt w) V^T. Eigenvalues below
    # the rank tolerance d * eps * w_max (numpy.linalg.matrix_rank's) are rounding noise around 0 (N <= d, dead
    # features): set to exactly 0, else sqrt turns noise of 1e-16 into 1e-8 per eigenvalue, over d of them.
    w, V = torch.linalg.eigh(sigma)                                   # (..., d), (..., d, d)
    tol = w.shape[-1] * torch.finfo(w.dtype).eps * w.abs().amax(-1, keepdim=True)
    w = torch.where(w > tol, w, torch.zeros_like(w))
    return (V * w.sqrt().unsqueeze(-2)) @ V.transpose(-1, -2)


def _frechet(mu1, sigma1, mu2, sigma2):
    # Batched core: float64 tensors with any leading batch dimensions -> d^2 with those dimensions.
    # tr (sigma1 sigma2)^{1/2} = sum sqrt(eig(S1h sigma2 S1h)) = sum of the singular values of A = S1h S2h,
    # because S1h sigma2 S1h = A A^T. We take the singular values of A: eigh of A A^T would square the
    # condition number and lose the small eigenvalues (a 1e-10 eigenvalue is below its rounding noise).
    diff = mu1 - mu2                                                  # (..., d)
    A = _sqrt_psd(sigma1) @ _sqrt_psd(sigma2)                         # (..., d, d)  sigma1^{1/2} sigma2^{1/2}
    tr_covmean = torch.linalg.svdvals(A).sum(-1)                      # tr (sigma1 sigma2)^{1/2}
    trace = lambda S: S.diagonal(dim1=-2, dim2=-1).sum(-1)
    d2 = (diff * diff).sum(-1) + trace(sigma1) + trace(sigma2) - 2 * tr_covmean
    return d2.clamp(min=0)      # d^2 >= 0 exactly; only rounding (~1e-12 relative) can push it below


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """d^2 = ||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^{1/2}) as a Python float, computed in
    float64. Accepts numpy arrays or tensors; exact also for singular (rank-deficient) covariances."""
    mu1, sigma1, mu2, sigma2 = (_f64(a).to(_f64(mu1).device) for a in (mu1, sigma1, mu2, sigma2))
    for name, a in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        data.check_finite(a, f"the feature statistic {name}", _NONFINITE)
    d = mu1.shape[-1]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise FIDError(f"shape mismatch: mu1 {tuple(mu1.shape)}, sigma1 {tuple(sigma1.shape)}, mu2 "
                       f"{tuple(mu2.shape)}, sigma2 {tuple(sigma2.shape)}; expected (d,) and (d, d)")
    return float(_frechet(mu1, sigma1, mu2, sigma2))


class FeatureStats:
    """Streaming float64 mean and covariance of feature rows: add(feats (B, d)) batch by batch, read .n,
    .mean (d,), .cov (d, d). Batches are merged with the pairwise update (Chan et al. 1979), which never forms
    sum(x x^T) of raw features (that loses digits when |mean| >> spread), so no image needs to stay in memory."""

    def __init__(self):
        self.n, self.mean, self._m2 = 0, None, None     # _m2 = sum_i (x_i - mean)(x_i - mean)^T

    def add(self, feats):
        x = _f64(feats).reshape(len(feats), -1)         # (B, d)
        b = x.shape[0]
        if b == 0:
            return self
        mean_b = x.mean(0)                              # (d,)
        m2_b = (x - mean_b).T @ (x - mean_b)            # (d, d) float64 matmul
        if self.n == 0:
            self.n, self.mean, self._m2 = b, mean_b, m2_b
            return self
        # merge (n, mean, m2) with (b, mean_b, m2_b): the cross term accounts for the shift between the means
        n = self.n + b
        delta = mean_b - self.mean
        self._m2 = self._m2 + m2_b + torch.outer(delta, delta) * (self.n * b / n)
        self.mean = self.mean + delta * (b / n)
        self.n = n
        return self

    @property
    def cov(self):
        if self.n < 2:
            raise FIDError(f"a covariance needs at least 2 feature rows, got {self.n}; give more images")
        return self._m2 / (self.n - 1)                  # unbiased, as numpy.cov and pytorch-fid


_NONFINITE = "no FID is computed from them: check the model that made the images and the extractor"


def _finite_feats(X, which):
    # NaN or inf features (a diverged generator, a damaged extractor) would make any FID meaningless: refuse them.
    return data.check_finite(X, f"the {which} features", _NONFINITE)


def _warn_rank(n, d):
    # With N <= d the sample covariance has rank <= N - 1 < d: the distance stays exact for these statistics,
    # but as an estimate of the population FID it is heavily biased (the bias grows like d/N).
    if n <= d:
        warnings.warn(f"FID with N = {n} <= feature dimension d = {d}: rank-deficient covariances; the value is "
                      f"exact but strongly biased, use N >> d", stacklevel=3)


def _resampled_stats(X, idx):
    # X (N, d) float64, idx (B, N) indices drawn with replacement -> means (B, d), covariances (B, d, d)
    Xb = X[idx]                                         # (B, N, d)
    mu = Xb.mean(1)                                     # (B, d)
    Xc = Xb - mu.unsqueeze(1)                           # (B, N, d)
    return mu, Xc.transpose(1, 2) @ Xc / (X.shape[0] - 1)


def bootstrap_fid(feats_real, feats_gen, n_boot=200, seed=0, level=0.95, device=None):
    """Point estimate F and bootstrap uncertainty from features (N_real, d) and (N_gen, d).

    Real and generated rows are resampled independently with replacement (both sets are random samples).
    Returns dict(fid, basic_lo, basic_hi (the basic interval [2F - q_hi, 2F - q_lo]), bias_corrected
    (2F - mean F_star), percentile_lo/hi (reported only to show how far off it is), boot_std, n_boot,
    n_real, n_gen, dim, level). FID >= 0, so the basic interval and bias_corrected are floored at 0
    (intersecting an interval with the parameter space keeps its coverage). n_boot = 0: point estimate only.
    device: where the float64 algebra runs (default: where feats_real lives; a GPU makes d = 2048 fast)."""
    X1 = _finite_feats(_f64(feats_real).to(device or torch.as_tensor(feats_real).device), "real")  # (N_real, d)
    X2 = _finite_feats(_f64(feats_gen).to(X1.device), "generated")                                 # (N_gen, d)
    (n1, d), n2 = X1.shape, X2.shape[0]
    if X2.shape[1] != d:
        raise FIDError(f"feature dimensions differ: real {d}, generated {X2.shape[1]}; use the same extractor")
    _warn_rank(min(n1, n2), d)
    s1, s2 = FeatureStats().add(X1), FeatureStats().add(X2)
    fid = float(_frechet(s1.mean, s1.cov, s2.mean, s2.cov))
    nan = float("nan")
    out = dict(fid=fid, basic_lo=nan, basic_hi=nan, bias_corrected=nan, percentile_lo=nan, percentile_hi=nan,
               boot_std=nan, n_boot=n_boot, n_real=n1, n_gen=n2, dim=d, level=level)
    if n_boot < 2:
        return out
    g = torch.Generator(device=X1.device).manual_seed(seed)
    chunk = max(1, 2 ** 25 // (max(n1, n2) * d))        # replicates per batch: ~256 MB of resampled float64
    F_star = []
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        i1 = torch.randint(n1, (b, n1), generator=g, device=X1.device)   # (b, N_real) row indices
        i2 = torch.randint(n2, (b, n2), generator=g, device=X1.device)   # (b, N_gen), drawn independently
        F_star.append(_frechet(*_resampled_stats(X1, i1), *_resampled_stats(X2, i2)))
    F_star = torch.cat(F_star).cpu()                     # (n_boot,) replicates F*
    alpha = 1 - level
    q_lo, q_hi = torch.quantile(F_star, torch.tensor([alpha / 2, 1 - alpha / 2], dtype=torch.float64)).tolist()
    # Resampling adds F's upward bias once more: F* - F mimics F - FID, hence the reflection 2F - q.
    out.update(basic_lo=max(0.0, 2 * fid - q_hi), basic_hi=max(0.0, 2 * fid - q_lo),
               bias_corrected=max(0.0, 2 * fid - float(F_star.mean())), percentile_lo=q_lo, percentile_hi=q_hi,
               boot_std=float(F_star.std()))
    return out


def fid_infinity(feats_real, feats_gen, n_points=15, min_frac=0.2, seed=0, device=None):
    """FID_inf (Chong & Forsyth 2020): FID on random generated subsets of N_j = min_frac*N .. N images
    against all real features, least-squares fit FID_N = FID_inf + k / N_j, return the intercept. Only the
    generated side's 1/N bias is extrapolated away: the real side's stays (use all the real images you have)."""
    X1 = _finite_feats(_f64(feats_real).to(device or torch.as_tensor(feats_real).device), "real")
    X2 = _finite_feats(_f64(feats_gen).to(X1.device), "generated")
    s1 = FeatureStats().add(X1)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(X2), generator=g)
    ns = torch.linspace(max(2, int(min_frac * len(X2))), len(X2), n_points).round().long().tolist()
    fids = [_frechet(s1.mean, s1.cov, (s := FeatureStats().add(X2[perm[:n]])).mean, s.cov) for n in ns]
    A = torch.tensor([[1.0, 1.0 / n] for n in ns], dtype=torch.float64)           # (n_points, 2)
    coef = torch.linalg.lstsq(A, torch.stack(fids).cpu().unsqueeze(1)).solution      # (2, 1): FID_inf, k
    return max(0.0, float(coef[0, 0]))                 # an intercept below 0 means "0 within the noise"


# ---------------------------------------------------------------------------------------------------------
# 2. Images in: one preprocessing path for real and generated images
# ---------------------------------------------------------------------------------------------------------

def _as_uint8(x):
    # Images (N, C, H, W), uint8 or float in [0, 1] -> uint8 tensor. Floats are quantised with rounding
    # (data.to_uint8), so a generated image is scored exactly as its saved PNG would be.
    x = torch.as_tensor(x)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise FIDError(f"images must be (N, C, H, W) with C = 1 or 3, got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return x
    lo, hi = (float(x.min()), float(x.max())) if x.numel() else (0.0, 0.0)
    if not x.is_floating_point() or lo < -1e-3 or hi > 1 + 1e-3:
        raise FIDError(f"images must be uint8 or floats in [0, 1], got {x.dtype} in [{lo:.3g}, {hi:.3g}]; "
                       f"map [-1, 1] images with (x + 1) / 2")
    return data.to_uint8(x)


@contextlib.contextmanager
def _ieee_fp32():
    # PyTorch lets cuDNN run float32 convolutions as TF32 on Ampere and newer GPUs (10-bit mantissa), which moves
    # Inception features by ~1e-3 relative (measured on an H100); train.py allows TF32 for matmuls too. A score
    # must not depend on those flags: the extractors (convs and linear layers) run in IEEE float32, and the
    # caller's settings are restored afterwards.
    prev = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = prev


def extract_features(extractor, images, batch_size=100):
    """Features (N, D) float32 on CPU of images: a tensor/array (N, C, H, W), or an iterable of such batches
    (e.g. a generator that samples on the fly, so that the images never all sit in memory)."""
    if isinstance(images, (torch.Tensor, np.ndarray)):
        feats = extractor.features(images, batch_size)
    else:
        feats = torch.cat([extractor.features(b, batch_size) for b in images])
    return data.check_finite(feats, f"the features of {extractor.name}", "its weights are damaged: delete the "
                             "cached extractor (cache/feature_net_*.pt) to retrain it, or use another --extractor")


# ---------------------------------------------------------------------------------------------------------
# 3. Inception-v3, module for module and key for key torchvision's inception_v3 (27,161,264 parameters)
# ---------------------------------------------------------------------------------------------------------

class BasicConv2d(nn.Module):
    # conv (no bias) + BatchNorm (eps 0.001, as TF) + ReLU: every conv of Inception-v3; k = kernel size
    def __init__(self, cin, cout, k, **kw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


C = BasicConv2d


def _pool3(x, kind):
    # The 3x3 stride-1 pool before each block's branch_pool. torchvision: average including the zero padding.
    # TF-FID graph: average over valid pixels only ('avg_valid'), and a max pool in Mixed_7c ('max').
    if kind == "max":
        return F.max_pool2d(x, 3, stride=1, padding=1)
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=(kind == "avg"))


class InceptionA(nn.Module):                 # Mixed_5b-5d, 35x35: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | pool-1x1
    def __init__(self, cin, pool_features, pool="avg"):
        super().__init__()
        self.pool, self.branch1x1 = pool, C(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = C(cin, 48, 1), C(48, 64, 5, padding=2)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = C(cin, 64, 1), C(64, 96, 3, padding=1)
        self.branch3x3dbl_3, self.branch_pool = C(96, 96, 3, padding=1), C(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(_pool3(x, self.pool))], 1)


class InceptionB(nn.Module):                 # Mixed_6a: 35x35 -> 17x17 (stride-2 3x3 | 3x3-3x3 | max pool)
    def __init__(self, cin):
        super().__init__()
        self.branch3x3, self.branch3x3dbl_1 = C(cin, 384, 3, stride=2), C(cin, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = C(64, 96, 3, padding=1), C(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):                 # Mixed_6b-6e, 17x17: 7x7 convs factorised into 1x7 and 7x1
    def __init__(self, cin, c7, pool="avg"):
        super().__init__()
        h, v = dict(padding=(0, 3)), dict(padding=(3, 0))          # 1x7 (horizontal), 7x1 (vertical)
        self.pool, self.branch1x1 = pool, C(cin, 192, 1)
        self.branch7x7_1, self.branch7x7_2 = C(cin, c7, 1), C(c7, c7, (1, 7), **h)
        self.branch7x7_3 = C(c7, 192, (7, 1), **v)
        self.branch7x7dbl_1, self.branch7x7dbl_2 = C(cin, c7, 1), C(c7, c7, (7, 1), **v)
        self.branch7x7dbl_3, self.branch7x7dbl_4 = C(c7, c7, (1, 7), **h), C(c7, c7, (7, 1), **v)
        self.branch7x7dbl_5, self.branch_pool = C(c7, 192, (1, 7), **h), C(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for i in range(1, 6):
            bd = getattr(self, f"branch7x7dbl_{i}")(bd)
        return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(_pool3(x, self.pool))], 1)


class InceptionD(nn.Module):                 # Mixed_7a: 17x17 -> 8x8 (1x1-3x3 | 1x1-1x7-7x1-3x3 | max pool)
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = C(cin, 192, 1), C(192, 320, 3, stride=2)
        self.branch7x7x3_1, self.branch7x7x3_2 = C(cin, 192, 1), C(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3, self.branch7x7x3_4 = C(192, 192, (7, 1), padding=(3, 0)), C(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):                 # Mixed_7b/7c, 8x8: 3x3 convs split into parallel 1x3 and 3x1
    def __init__(self, cin, pool="avg"):
        super().__init__()
        h, v = dict(padding=(0, 1)), dict(padding=(1, 0))
        self.pool, self.branch1x1 = pool, C(cin, 320, 1)
        self.branch3x3_1 = C(cin, 384, 1)
        self.branch3x3_2a, self.branch3x3_2b = C(384, 384, (1, 3), **h), C(384, 384, (3, 1), **v)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = C(cin, 448, 1), C(448, 384, 3, padding=1)
        self.branch3x3dbl_3a, self.branch3x3dbl_3b = C(384, 384, (1, 3), **h), C(384, 384, (3, 1), **v)
        self.branch_pool = C(cin, 192, 1)

    def forward(self, x):
        b3, bd = self.branch3x3_1(x), self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd),
                          self.branch_pool(_pool3(x, self.pool))], 1)


class InceptionAux(nn.Module):               # training-time side classifier on Mixed_6e: unused for FID, kept
    def __init__(self, cin, num_classes):    # so that torchvision's checkpoint loads with strict=True
        super().__init__()
        self.conv0, self.conv1, self.fc = C(cin, 128, 1), C(128, 768, 5), nn.Linear(768, num_classes)

    def forward(self, x):                    # (N, 768, 17, 17) -> (N, num_classes)
        x = self.conv1(self.conv0(F.avg_pool2d(x, kernel_size=5, stride=3)))    # (N, 768, 1, 1)
        return self.fc(torch.flatten(x, 1))


class InceptionV3(nn.Module):
    """Inception-v3 (Szegedy et al. 2016) with torchvision's module names and state-dict keys.
    tf_fid=True builds the TF-FID variant (1008 classes, no AuxLogits, pools as in _pool3).
    features(x) -> (N, 2048) pool3 features; forward(x in [-1, 1] at 299x299) -> class logits."""

    def __init__(self, num_classes=1000, aux_logits=True, tf_fid=False):
        super().__init__()
        pool = "avg_valid" if tf_fid else "avg"
        self.name = "Inception-v3 pool3 (random weights)"
        self.Conv2d_1a_3x3 = C(3, 32, 3, stride=2)                           # (N, 32, 149, 149)
        self.Conv2d_2a_3x3 = C(32, 32, 3)                                    # (N, 32, 147, 147)
        self.Conv2d_2b_3x3 = C(32, 64, 3, padding=1)                         # (N, 64, 147, 147)
        self.maxpool1 = nn.MaxPool2d(kernel_size=3, stride=2)                # (N, 64, 73, 73)
        self.Conv2d_3b_1x1 = C(64, 80, 1)                                    # (N, 80, 73, 73)
        self.Conv2d_4a_3x3 = C(80, 192, 3)                                   # (N, 192, 71, 71)
        self.maxpool2 = nn.MaxPool2d(kernel_size=3, stride=2)                # (N, 192, 35, 35)
        self.Mixed_5b = InceptionA(192, 32, pool)                            # (N, 256, 35, 35)
        self.Mixed_5c = InceptionA(256, 64, pool)                            # (N, 288, 35, 35)
        self.Mixed_5d = InceptionA(288, 64, pool)                            # (N, 288, 35, 35)
        self.Mixed_6a = InceptionB(288)                                      # (N, 768, 17, 17)
        self.Mixed_6b = InceptionC(768, 128, pool)
        self.Mixed_6c = InceptionC(768, 160, pool)
        self.Mixed_6d = InceptionC(768, 160, pool)
        self.Mixed_6e = InceptionC(768, 192, pool)                           # (N, 768, 17, 17)
        if aux_logits:
            self.AuxLogits = InceptionAux(768, num_classes)
        self.Mixed_7a = InceptionD(768)                                      # (N, 1280, 8, 8)
        self.Mixed_7b = InceptionE(1280, pool)                               # (N, 2048, 8, 8)
        self.Mixed_7c = InceptionE(2048, "max" if tf_fid else "avg")         # (N, 2048, 8, 8)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))                          # (N, 2048, 1, 1) = pool3
        self.dropout = nn.Dropout(p=0.5)
        self.fc = nn.Linear(2048, num_classes)

    def pool3(self, x):                                  # x (N, 3, 299, 299) in [-1, 1] -> (N, 2048)
        for name in ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1",
                     "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
                     "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "avgpool"]:
            x = getattr(self, name)(x)
        return torch.flatten(x, 1)

    def forward(self, x):
        return self.fc(self.dropout(self.pool3(x)))

    @torch.no_grad()
    def features(self, x, batch_size=50):
        """x: (N, C, H, W), C = 1 or 3, floats in [0, 1] or uint8 -> (N, 2048) float32 pool3 features (CPU)."""
        x = _as_uint8(x)                                 # round to uint8 exactly like the real data
        was_training, device = self.training, next(self.parameters()).device
        self.eval()                                      # BatchNorm running statistics, no dropout: always
        out = []
        with _ieee_fp32():
            for i in range(0, len(x), batch_size):
                # uint8 -> [-1, 1]: torchvision's transform_input maps ImageNet-normalised input to this range
                xb = data.to_float(x[i:i + batch_size], signed=True).to(device)    # (B, C, H, W)
                xb = xb.expand(-1, 3, -1, -1)                                       # grayscale -> 3 equal channels
                xb = F.interpolate(xb, size=(299, 299), mode="bilinear", align_corners=False)  # (B, 3, 299, 299)
                out.append(self.pool3(xb).float().cpu())
        self.train(was_training)
        return torch.cat(out) if out else torch.zeros(0, 2048)


WEIGHTS = {  # name -> checkpoint URL, architecture, and what the numbers are comparable to
    "torchvision": dict(url="https://download.pytorch.org/models/inception_v3_google-0cc3c7bd.pth",
                        num_classes=1000, aux_logits=True, tf_fid=False,
                        note="torchvision weights: NOT comparable to published FIDs"),
    "tf-fid": dict(url="https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                       "pt_inception-2015-12-05-6726825d.pth", num_classes=1008, aux_logits=False, tf_fid=True,
                   note="TF-FID weights: comparable to published FIDs at equal N and reference set"),
}


def inception_file(weights="torchvision"):
    """Where torch.hub keeps (or would download) the Inception weights: present means usable offline."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(WEIGHTS[weights]["url"]))


def load_inception(weights="torchvision", device="cpu", progress=False):
    """InceptionV3 with pretrained weights ('torchvision' or 'tf-fid') in eval mode, via
    torch.hub.load_state_dict_from_url (cached as $TORCH_HOME/hub/checkpoints/<file>; a file placed there
    by hand is used without network)."""
    if weights not in WEIGHTS:
        raise FIDError(f"unknown Inception weights {weights!r}; choose one of {', '.join(WEIGHTS)}")
    w = WEIGHTS[weights]
    model = InceptionV3(w["num_classes"], w["aux_logits"], w["tf_fid"])
    file_name = os.path.basename(w["url"])
    path = os.path.join(torch.hub.get_dir(), "checkpoints", file_name)
    try:
        # check_hash: a fresh download must match the sha256 prefix in the file name (0cc3c7bd / 6726825d)
        state = torch.hub.load_state_dict_from_url(w["url"], map_location="cpu", progress=progress,
                                                   check_hash=True, file_name=file_name)
    except Exception as e:                               # offline, HTTP error, hash mismatch, unreadable file
        why = (str(e).splitlines() or [type(e).__name__])[0][:100]
        raise FIDError(f"cannot get Inception weights from {w['url']} ({why}); download that file to {path} "
                       f"(or set TORCH_HOME), or use --extractor offline") from None
    model.load_state_dict(state, strict=True)            # every key must match: the architecture is exact
    model.name = f"Inception-v3 pool3, {w['note']}"
    return model.eval().to(device)


# ---------------------------------------------------------------------------------------------------------
# 4. The Inception-free extractor: a small classifier trained on the data set's own labels
# ---------------------------------------------------------------------------------------------------------

class OfflineNet(nn.Module):
    """Three stride-2 conv layers and one hidden layer; features = the hidden layer (feat_dim, post-ReLU,
    the analogue of Inception's pool3). About 0.36 M parameters for 28x28 grayscale."""

    def __init__(self, in_channels=1, image_size=28, n_classes=10, width=32, feat_dim=128):
        super().__init__()
        self.config = dict(in_channels=in_channels, image_size=image_size, n_classes=n_classes, width=width,
                           feat_dim=feat_dim)
        self.name = "offline-cnn (untrained)"
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, stride=2, padding=1), nn.BatchNorm2d(w), nn.ReLU(),      # (B, w, 14, 14)
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),        # (B, 2w, 7, 7)
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.BatchNorm2d(4 * w), nn.ReLU(),    # (B, 4w, 4, 4)
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),                                                # (B, 64w)
            nn.Linear(64 * w, feat_dim), nn.ReLU())                                               # (B, feat_dim)
        self.head = nn.Linear(feat_dim, n_classes)

    def forward(self, x):                                # x (B, C, H, W) in [-1, 1] -> logits (B, n_classes)
        return self.head(self.body(x))

    @torch.no_grad()
    def features(self, x, batch_size=500):
        """x: (N, C, H, W) floats in [0, 1] or uint8 at the training size -> (N, feat_dim) float32 (CPU)."""
        x = _as_uint8(x)                                 # the same rounding as for Inception
        c, s = self.config["in_channels"], self.config["image_size"]
        if tuple(x.shape[1:]) != (c, s, s):
            raise FIDError(f"{self.name} expects images ({c}, {s}, {s}), got {tuple(x.shape[1:])}; "
                           f"use the extractor of the images' data set")
        was_training, device = self.training, next(self.parameters()).device
        self.eval()
        with _ieee_fp32():
            out = [self.body(data.to_float(x[i:i + batch_size], signed=True).to(device)).float().cpu()
                   for i in range(0, len(x), batch_size)]
        self.train(was_training)
        return torch.cat(out) if out else torch.zeros(0, self.config["feat_dim"])

    @torch.no_grad()
    def classify(self, x, batch_size=500):
        """x: (N, C, H, W) uint8 or [0, 1] floats -> (N,) int64 predicted class (argmax of the head's logits):
        the evaluation's stand-in for the authors' ResNet-50 in the leaf-specificity check."""
        feats = self.features(x, batch_size)                                  # (N, feat_dim), CPU
        device = next(self.parameters()).device
        return torch.cat([self.head(feats[i:i + batch_size].to(device)).argmax(1).cpu()
                          for i in range(0, len(feats), batch_size)]) if len(feats) else torch.zeros(0).long()


def train_offline_net(images, labels, n_classes, epochs=3, batch_size=128, lr=2e-3, seed=0, device="cpu",
                      log=print):
    """Train OfflineNet on uint8 images (N, C, H, W) and int64 labels (N,) with Adam and cross-entropy."""
    images, labels = torch.as_tensor(images), torch.as_tensor(labels)
    torch.manual_seed(seed)                              # same data + seed -> same net (on the same hardware)
    net = OfflineNet(images.shape[1], images.shape[-1], n_classes).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    # A net this small gains little from intra-op threads, and on a shared CPU their waiting costs ~10x
    # (measured, Fashion-MNIST, 3 epochs: 54 s on one thread, 516 s on two busy cores): train on one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if torch.device(device).type == "cpu" else threads)
    try:
        net.train()
        for epoch in range(epochs):
            perm = torch.randperm(len(images), generator=g)
            for i in range(0, len(images) - batch_size + 1, batch_size):           # drop the last partial batch
                idx = perm[i:i + batch_size]
                x = data.to_float(images[idx], signed=True).to(device)             # (B, C, H, W) in [-1, 1]
                loss = F.cross_entropy(net(x), labels[idx].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            log(f"  offline extractor epoch {epoch + 1}/{epochs}: last batch loss {loss.item():.3f}")
    finally:
        torch.set_num_threads(threads)                   # the caller's setting
    return net.eval()


@torch.no_grad()
def accuracy(net, images, labels, batch_size=1000):
    device = next(net.parameters()).device
    hits = sum(int((net(data.to_float(images[i:i + batch_size], signed=True).to(device)).argmax(1).cpu()
                    == labels[i:i + batch_size]).sum()) for i in range(0, len(images), batch_size))
    return hits / len(images)


def load_offline_net(path, device="cpu", data_id=None):
    """OfflineNet from its self-contained checkpoint (torch.load(weights_only=True) safe). data_id: the fingerprint
    of the training images it must have been trained on (offline_extractor's), checked when the file records one."""
    ckpt = data.read_checkpoint(path, "delete it to retrain the offline extractor", finite=("state_dict",))
    if data_id is not None and ckpt.get("data_id", data_id) != data_id:      # a file copied under another name
        raise FIDError(f"the offline extractor {path} was trained on other images (id {ckpt['data_id']}) than "
                       f"these (id {data_id}); delete it to retrain")
    try:
        net = OfflineNet(**ckpt["config"])
        net.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, KeyError, TypeError) as e:                # another version's net
        raise FIDError(f"cannot load the offline extractor {path} ({type(e).__name__}); delete it to retrain") from None
    h = hashlib.sha256()                                 # a hash of the weights identifies the net: FIDs
    for k, v in sorted(ckpt["state_dict"].items()):      # are comparable only between equal ids
        h.update(k.encode() + v.cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    net_id = h.hexdigest()[:8]
    net.name = (f"offline-cnn {ckpt['dataset']} (test acc {ckpt['test_acc']:.1%}, id {net_id}; "
                f"comparable only to itself)")
    net.meta = {k: v for k, v in ckpt.items() if k not in ("state_dict", "config")}
    return net.eval().to(device)


def offline_extractor(dataset, root="data", cache_dir="cache", epochs=3, seed=0, device="cpu", log=print):
    """The cached OfflineNet of a data set (cache_dir/feature_net_<dataset>_<hash of its training images>.pt), trained on first use on the
    training split (data.load) and evaluated once on the test split; the accuracy is part of its name."""
    name = data.canonical_name(dataset)
    x_train, y_train = data.load(name, "train", root)
    # The cache is keyed by the training images themselves, so a net trained on a subset (e.g. the 9k-digit MNIST
    # subset) is never reused for the full data set: their FIDs are not comparable.
    fingerprint = hashlib.sha1(x_train.numpy().tobytes()).hexdigest()[:8]
    path = os.path.join(cache_dir, f"feature_net_{name}_{fingerprint}.pt")
    if os.path.exists(path):
        return load_offline_net(path, device, fingerprint)
    x_test, y_test = data.load(name, "test", root)
    log(f"training the offline extractor on {name} train ({len(x_train)} images, {epochs} epochs) ...")
    t0, c0 = time.perf_counter(), time.process_time()
    net = train_offline_net(x_train, y_train, data.DATASETS[name]["n_classes"], epochs=epochs, seed=seed,
                            device=device, log=log)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    if data.nonfinite_tensor(net.state_dict()):             # a diverged net is never cached
        raise data.NonFiniteError(f"the offline extractor's training diverged (NaN/inf weights); nothing was "
                                  f"cached in {cache_dir}: rerun, or use --extractor inception")
    acc = accuracy(net, x_test, y_test)
    log(f"offline extractor: test accuracy {acc:.2%}, trained in {wall:.0f} s wall ({cpu:.0f} s CPU); "
        f"saved {path}")
    os.makedirs(cache_dir, exist_ok=True)
    ckpt = dict(state_dict={k: v.cpu() for k, v in net.state_dict().items()}, config=net.config, dataset=name,
                test_acc=acc, epochs=epochs, seed=seed, n_train=len(x_train), train_seconds=wall,
                data_id=fingerprint)                     # the training images it depends on: checked when loaded
    torch.save(ckpt, path + ".tmp")                      # atomic write: temp file + rename
    os.replace(path + ".tmp", path)
    return load_offline_net(path, device, fingerprint)


# ---------------------------------------------------------------------------------------------------------
# 5. Images -> FID with interval, and the command line
# ---------------------------------------------------------------------------------------------------------

def fid_from_images(extractor, images_gen, images_ref=None, feats_ref=None, batch_size=100, n_boot=200, seed=0,
                    ref_name="reference", device=None):
    """FID of generated images against reference images (or their cached features feats_ref).
    Images: (N, C, H, W) uint8 or [0, 1] floats, or an iterable of such batches. Returns bootstrap_fid's
    dict plus extractor, ref_name, feats_gen, feats_ref (reuse feats_ref on the next call). The statistics run
    on `device` (default: the extractor's)."""
    if images_ref is None and feats_ref is None:
        raise FIDError("no reference: pass images_ref (images) or feats_ref (features of the same extractor)")
    feats_gen = extract_features(extractor, images_gen, batch_size)
    if feats_ref is None:
        feats_ref = extract_features(extractor, images_ref, batch_size)
    device = device or next(extractor.parameters()).device
    res = bootstrap_fid(feats_ref, feats_gen, n_boot=n_boot, seed=seed, device=device)
    res.update(extractor=extractor.name, ref_name=ref_name, feats_gen=feats_gen, feats_ref=feats_ref)
    return res


def format_fid_line(res):
    """The one result line: FID, its interval, N generated, N reference and its split, the extractor."""
    pct = round(100 * res["level"])
    boot = (f"{pct}% basic bootstrap interval [{res['basic_lo']:.4g}, {res['basic_hi']:.4g}], bias-corrected "
            f"{res['bias_corrected']:.4g}, {res['n_boot']} resamples" if res["n_boot"] >= 2 else "no bootstrap")
    inf = f" | FID_inf {res['fid_inf']:.4g}" if "fid_inf" in res else ""
    return (f"FID {res['fid']:.4g} ({boot}){inf} | N gen {res['n_gen']} | N ref {res['n_real']} "
            f"({res.get('ref_name', 'reference')}) | extractor: {res.get('extractor', 'given features')}")


def _load_npz(path, key):
    # (an .npz file's array under `key` as a tensor, all its arrays); images (N, H, W) get a channel axis. NaN or
    # inf in it is an error naming the file (uint8 images cannot hold any; float images or features can).
    arrays = data.read_npz(path, f"give an .npz file with key '{key}' (np.savez(path, {key}=...))", need=(key,))
    a = torch.from_numpy(arrays[key])
    if a.is_floating_point():
        data.check_finite(a, f"{path} ('{key}')", _NONFINITE)
    return (a.unsqueeze(1) if key == "images" and a.ndim == 3 else a), arrays


def _check_run_samples(run, path, arrays):
    # RUN/samples.npz records the fingerprints of the checkpoints that made it (sample.save_npz): a file left from
    # before stage 1 or 2 was retrained must not be scored as the run's samples. Older files record none.
    for key, name, weights in (("treevae_id", "treevae.pt", "state_dict"), ("ddpm_id", "ddpm.pt", "ema")):
        made_by = str(arrays.get(key, ""))
        if not made_by:                                  # not recorded, or TreeVAE images (no DDPM involved)
            continue
        ckpt_path = os.path.join(run, name)
        now = data.fingerprint(data.read_checkpoint(ckpt_path, f"score the file alone with --gen {path}")[weights]) \
            if os.path.exists(ckpt_path) else "missing"
        if now != made_by:
            raise FIDError(f"{path} was made by another {name} than {ckpt_path} (retrained since?): write the run's "
                           f"samples again with python sample.py --run {run} --out "
                           f"{os.path.join(run, 'samples.png')}, or score the file as it is with --gen {path}")


def run_data(run_dir):
    """{'dataset': ..., 'data_dir': ...} of a run folder, from the RunConfig train.py saves in RUN/treevae.pt;
    {} when there is no such file (then --dataset must say it)."""
    path = os.path.join(run_dir, "treevae.pt")
    if not os.path.exists(path):
        return {}
    info = data.read_checkpoint(path, "give --dataset (and --root) for the run's data").get("run") or {}
    return {k: info[k] for k in ("dataset", "data_dir") if k in info}


def parser():
    """fid.py's command line."""
    p = data.Parser(prog="fid.py", description="FID with a bootstrap interval; prints one result line.",
                    epilog="examples:\n  python fid.py --real-vs-real --dataset fashion_mnist --root ../shared/data"
                           "\n  python fid.py --run runs/mnist\n  python fid.py --gen samples.npz --dataset mnist "
                           "--split test\n  python fid.py --gen-feats a.npz --ref-feats b.npz")
    p.add_argument("--run", help="run folder: scores RUN/samples.npz (key 'images', (N, C, H, W) uint8) against "
                   "the data set and data folder the run was trained on (saved in RUN/treevae.pt)")
    p.add_argument("--gen", help=".npz of generated images, key 'images': (N, C, H, W) uint8 or floats in [0, 1]")
    p.add_argument("--ref", help=".npz of reference images (key 'images'); default: --dataset's --split")
    p.add_argument("--gen-feats", help=".npz of generated features, key 'features' (N, D)")
    p.add_argument("--ref-feats", help=".npz of reference features, key 'features' (N, D)")
    p.add_argument("--real-vs-real", action="store_true",
                   help="the floor: N random --dataset train images against the --split images")
    p.add_argument("--dataset", help="mnist | fashion_mnist | cifar10: reference set and offline extractor")
    p.add_argument("--split", default="test", choices=["test", "train"],
                   help="the reference images: --dataset's test or train split")
    p.add_argument("--root", "--data-dir", dest="root", help="data folder for data.load; default: the run's with "
                   "--run, else data")
    p.add_argument("--n", type=data.Range(int, ge=2), help="use the first N generated images (real-vs-real: N train "
                   "images; a covariance needs two); default all")
    p.add_argument("--extractor", default="offline", choices=["offline", "inception", "tf-inception"],
                   help="offline: CNN trained on --dataset (no download); inception: torchvision weights; "
                        "tf-inception: TF-FID weights (paper-comparable)")
    p.add_argument("--cache-dir", default="cache", help="where the offline extractor is cached")
    p.add_argument("--n-boot", type=data.Range(int, ge=2, off=0), default=200, help="bootstrap resamples, 0: no "
                   "interval. Each costs two 2048x2048 eigh + one SVD with Inception: ~0.5 s on an H100, minutes on "
                   "a CPU")
    p.add_argument("--fid-inf", action="store_true", help="also print FID_inf (Chong & Forsyth 2020)")
    p.add_argument("--seed", type=data.Range(int, ge=0), default=0, help="seed of the bootstrap and of subsets")
    p.add_argument("--batch-size", type=data.Range(int, ge=1), default=100, help="images per feature batch")
    p.add_argument("--threads", type=data.Range(int, ge=0), default=0, help="CPU threads of torch's kernels "
                   "(torch.set_num_threads), set before any work; 0: torch's choice")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where the extractor runs: cpu | cuda | cuda:N | mps (default: cuda if there is one)")
    p.add_argument("--save-feats", metavar="PREFIX", help="write PREFIX_gen.npz and PREFIX_ref.npz (features)")
    return p


def _score_feature_files(a):
    """--gen-feats / --ref-feats: (feats_gen, feats_ref, result) of two saved feature files; no extractor runs, so
    the files must come from one extractor (--save-feats records it)."""
    if not (a.gen_feats and a.ref_feats):
        raise FIDError("--gen-feats and --ref-feats go together (features of one extractor)")
    (feats_gen, gen), (feats_ref, ref) = (_load_npz(f, "features") for f in (a.gen_feats, a.ref_feats))
    feats_gen = feats_gen[:a.n]
    names = [str(f.get("extractor", "")) for f in (gen, ref)]      # written by --save-feats
    if all(names) and names[0] != names[1]:
        raise FIDError(f"{a.gen_feats} and {a.ref_feats} come from different extractors ({names[0]}; "
                       f"{names[1]}): a FID compares features of one extractor, extract both again with it")
    res = bootstrap_fid(feats_ref, feats_gen, a.n_boot, a.seed, device=a.device)
    res.update(ref_name=a.ref_feats, extractor=f"features from {a.gen_feats}")
    return feats_gen, feats_ref, res


def _real_vs_real(a, name):
    """--real-vs-real, the floor: N random train images against the test split, or (--split train) against the
    next N train images, disjoint from the first. Returns (images_gen, gen_name, images_ref)."""
    if not name:
        raise FIDError("--real-vs-real needs --dataset")
    x_train, _ = data.load(name, "train", a.root)
    perm = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(a.seed))
    images_ref = data.load(name, "test", a.root)[0] if a.split == "test" else None
    n = a.n or (len(images_ref) if images_ref is not None else len(x_train) // 2)
    images_gen = x_train[perm[:n]]
    if images_ref is None:                      # train vs train: the next n, disjoint from the first
        images_ref = x_train[perm[n:2 * n]]
    return images_gen, f"{name} train, random {n}", images_ref


def _generated(a, name):
    """--run / --gen: (images_gen, gen_name, images_ref) from the .npz of generated images and the reference
    (--ref's file, else --dataset's --split). A run's samples.npz must come from the run's current checkpoints."""
    gen_path = os.path.join(a.run, "samples.npz") if a.run else a.gen
    if a.run and not os.path.exists(gen_path):
        raise FIDError(f"{gen_path} not found: train.py writes it with a run's figures; score other "
                       f"samples with --gen FILE.npz (sample.py writes one beside each picture)")
    images_gen, arrays = _load_npz(gen_path, "images")
    if a.run:
        _check_run_samples(a.run, gen_path, arrays)
    if a.ref:
        images_ref = _load_npz(a.ref, "images")[0]
    elif name:
        images_ref = data.load(name, a.split, a.root)[0]
    else:
        raise FIDError("no reference: give --ref FILE.npz or --dataset NAME (with --split)")
    return images_gen[:a.n], gen_path, images_ref


def _score_images(a, log):
    """--run / --gen / --real-vs-real: (feats_gen, feats_ref, result) through the chosen extractor, each side's
    feature time logged (extraction dominates a CPU run: Inception at 299 x 299)."""
    trained = run_data(a.run) if a.run else {}       # the run knows its data set and data folder
    dataset = a.dataset or trained.get("dataset")
    name = data.canonical_name(dataset) if dataset else None
    a.root = a.root or trained.get("data_dir") or "data"
    images_gen, gen_name, images_ref = _real_vs_real(a, name) if a.real_vs_real else _generated(a, name)
    ref_name = a.ref or f"{name} {a.split}" + (" (disjoint)" if a.real_vs_real and a.split == "train" else "")
    if a.extractor == "offline":
        if not name:
            raise FIDError("the offline extractor is trained per data set: give --dataset")
        extractor = offline_extractor(name, a.root, a.cache_dir, device=a.device, log=log)
    else:
        extractor = load_inception("torchvision" if a.extractor == "inception" else "tf-fid", a.device)
    feats = []
    for what, images in ((gen_name, images_gen), (ref_name, images_ref)):     # timed separately
        t0, c0 = time.perf_counter(), time.process_time()
        feats.append(extract_features(extractor, images, a.batch_size))      # (N, D)
        log(f"features of {len(images)} images ({what}): {time.perf_counter() - t0:.1f} s wall, "
            f"{time.process_time() - c0:.1f} s CPU")
    feats_gen, feats_ref = feats
    res = dict(bootstrap_fid(feats_ref, feats_gen, a.n_boot, a.seed, device=a.device), extractor=extractor.name,
               ref_name=ref_name)
    return feats_gen, feats_ref, res


def main(argv=None):
    """fid.py's command line: exactly one source of generated images or features, one result line on stdout
    (progress and warnings on stderr); a user error is one `error: ...` line and exit code 2."""
    log = lambda msg: print(msg, file=sys.stderr)
    warnings.showwarning = lambda msg, *args, **kw: log(f"warning: {msg}")
    try:
        a = parser().parse_args(argv)                    # a bad option: data.UsageError, one line below
        if a.threads:
            torch.set_num_threads(a.threads)             # before any work
        a.device = data.device(a.device)                 # a one-line error for a bad or absent device
        if sum(bool(s) for s in (a.run, a.gen, a.gen_feats, a.real_vs_real)) != 1:
            raise FIDError("give exactly one of --run, --gen, --gen-feats, --real-vs-real (see --help)")
        if a.gen_feats or a.ref_feats:                   # features given: no extractor involved
            feats_gen, feats_ref, res = _score_feature_files(a)
        else:
            feats_gen, feats_ref, res = _score_images(a, log)
        if a.fid_inf:
            res["fid_inf"] = fid_infinity(feats_ref, feats_gen, seed=a.seed, device=a.device)
        if a.save_feats:                                 # with the extractor's name: --gen-feats checks it
            for side, feats in (("gen", feats_gen), ("ref", feats_ref)):
                np.savez(f"{a.save_feats}_{side}.npz", features=np.asarray(feats), extractor=res["extractor"])
        print(format_fid_line(res))
    except (FIDError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:          # the extractor's cache is written atomically: nothing half-made is left
        print("interrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
