"""fid.py: the Frechet distance against closed forms and an independent float64 reference, streaming
statistics, the Inception-v3 layout (torchvision's keys and 27,161,264 parameters), weight loading through
torch.hub from a pre-placed file and its one-line offline error, the feature preprocessing, bootstrap
coverage, the offline extractor and the command line. CPU, no network, no ../shared."""
import hashlib

import numpy as np
import pytest
import torch

import data
import fid


def gaussian_stats(X):
    s = fid.FeatureStats().add(X)
    return s.mean, s.cov


# ------------------------------------------------------------------------------ the distance
def test_identical_statistics_give_zero():
    X = torch.randn(500, 8, generator=torch.Generator().manual_seed(0)) * 3 + 5
    mu, sigma = gaussian_stats(X)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-9


def test_equal_covariances_give_squared_mean_distance():
    g = torch.Generator().manual_seed(1)
    A = torch.randn(6, 6, generator=g, dtype=torch.float64)
    sigma = A @ A.T + 0.1 * torch.eye(6, dtype=torch.float64)        # full, well-conditioned covariance
    mu1, mu2 = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    want = float(((mu1 - mu2) ** 2).sum())
    assert fid.frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(want, rel=1e-10, abs=1e-12)


def test_diagonal_covariances_match_closed_form_and_accept_numpy():
    rng = np.random.default_rng(2)
    a, b = rng.uniform(0.1, 4, 10), rng.uniform(0.1, 4, 10)
    mu1, mu2 = rng.normal(size=10), rng.normal(size=10)
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    got_np = fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))                       # numpy in
    got_t = fid.frechet_distance(*(torch.tensor(v, dtype=torch.float32) for v in (mu1, np.diag(a), mu2, np.diag(b))))
    assert isinstance(got_np, float)
    assert got_np == pytest.approx(want, rel=1e-12)
    assert got_t == pytest.approx(want, rel=1e-6)                 # float32 inputs are promoted to float64


def test_wide_spectrum_keeps_tiny_eigenvalues():
    # Commuting covariances Q diag(a) Q^T, Q diag(b) Q^T with eigenvalues from 1e-5 to 200 (like real
    # features): FID = sum (sqrt a - sqrt b)^2 exactly. eig(sigma1 sigma2) = a b spans 1e-10 .. 4e4, so a
    # method that forms sigma1^{1/2} sigma2 sigma1^{1/2} loses the 1e-10 one (an error of ~1e-5 here).
    rng = np.random.default_rng(7)
    Q, _ = np.linalg.qr(rng.normal(size=(64, 64)))
    a = np.logspace(-5, np.log10(200), 64)
    b = a * rng.uniform(0.5, 2, 64)
    want = ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    got = fid.frechet_distance(np.zeros(64), Q @ np.diag(a) @ Q.T, np.zeros(64), Q @ np.diag(b) @ Q.T)
    assert got == pytest.approx(want, rel=1e-10, abs=1e-10)


def test_rank_deficient_covariances_exact_against_gram_reference():
    # N = 10 rows in d = 32 dimensions: both covariances have rank 9. Independent float64 reference:
    # sigma = A^T A with A = (X - mean) / sqrt(N - 1), so eig(sigma1 sigma2) \ {0} = eig(K K^T), K = A1 A2^T
    # (N x N), hence tr (sigma1 sigma2)^{1/2} = sum sqrt(eigvalsh(K K^T)).
    rng = np.random.default_rng(3)
    X1, X2 = rng.normal(size=(10, 32)), rng.normal(size=(10, 32)) * 2 + 1
    A1 = (X1 - X1.mean(0)) / np.sqrt(9)
    A2 = (X2 - X2.mean(0)) / np.sqrt(9)
    K = A1 @ A2.T
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(K @ K.T), 0, None)).sum()
    want = (((X1.mean(0) - X2.mean(0)) ** 2).sum() + (A1 ** 2).sum() + (A2 ** 2).sum() - 2 * tr_sqrt)
    mu1, s1 = gaussian_stats(X1)
    mu2, s2 = gaussian_stats(X2)
    got = fid.frechet_distance(mu1, s1, mu2, s2)
    assert np.isfinite(got) and got == pytest.approx(want, rel=1e-9)
    assert fid.frechet_distance(mu1, s1, mu1, s1) < 1e-9              # rank-deficient identity stays 0
    with pytest.warns(UserWarning, match="N = 10 <= feature dimension"):
        res = fid.bootstrap_fid(X1, X2, n_boot=0)
    assert res["fid"] == pytest.approx(want, rel=1e-9)


def test_feature_stats_streaming_float64_matches_numpy():
    # float32 features with a large offset, fed in uneven batches: the float64 pairwise update must agree with
    # numpy's float64 covariance of all rows at once (a float32 sum of x x^T would lose ~all digits here).
    rng = np.random.default_rng(4)
    X = (rng.normal(size=(1000, 5)) + 1e4).astype(np.float32)
    s = fid.FeatureStats()
    for lo, hi in [(0, 1), (1, 300), (300, 301), (301, 1000)]:
        s.add(torch.from_numpy(X[lo:hi]))
    ref = X.astype(np.float64)
    assert s.n == 1000 and s.mean.dtype == torch.float64
    np.testing.assert_allclose(s.mean.numpy(), ref.mean(0), rtol=1e-13)
    np.testing.assert_allclose(s.cov.numpy(), np.cov(ref, rowvar=False), rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------------------ the bootstrap
def test_basic_interval_covers_population_fid_and_percentile_does_not():
    # real ~ N(0, I), generated ~ N(m 1, s^2 I) in d = 16: population FID = d m^2 + d (1 - s)^2 = 1.64.
    # At N = 200 the estimate is biased up by ~1; the basic interval corrects for it, the percentile one
    # doubles it (its lower end lies even above the point estimate).
    d, n, m, s = 16, 200, 0.25, 1.2
    fid_true = d * m ** 2 + d * (1 - s) ** 2
    basic = percentile = above = 0
    for seed in range(10):
        g = torch.Generator().manual_seed(seed)
        real = torch.randn(n, d, generator=g, dtype=torch.float64)
        gen = m + s * torch.randn(n, d, generator=g, dtype=torch.float64)
        r = fid.bootstrap_fid(real, gen, n_boot=200, seed=seed)
        basic += r["basic_lo"] <= fid_true <= r["basic_hi"]
        percentile += r["percentile_lo"] <= fid_true <= r["percentile_hi"]
        above += r["percentile_lo"] > r["fid"]
        assert r["basic_lo"] < r["bias_corrected"] < r["basic_hi"] and r["n_real"] == r["n_gen"] == n
    assert basic >= 8 and percentile <= 2 and above >= 8


def test_bootstrap_is_reproducible_and_resamples_independently():
    g = torch.Generator().manual_seed(5)
    real, gen = torch.randn(100, 4, generator=g), torch.randn(100, 4, generator=g) + 0.5
    r1, r2 = fid.bootstrap_fid(real, gen, n_boot=50, seed=7), fid.bootstrap_fid(real, gen, n_boot=50, seed=7)
    assert r1 == r2
    # resampling the same array twice must not reuse one index draw: FID(X*, X**) > 0 for every replicate
    r = fid.bootstrap_fid(real, real, n_boot=20, seed=0)
    assert r["fid"] < 1e-9 and r["percentile_lo"] > 1e-3
    assert r["basic_lo"] == r["basic_hi"] == r["bias_corrected"] == 0.0     # floored at FID's lower bound 0


def test_fid_infinity_removes_most_of_the_generated_side_bias():
    d, m = 16, 0.25
    g = torch.Generator().manual_seed(6)
    real = torch.randn(20000, d, generator=g, dtype=torch.float64)
    gen = m + torch.randn(2000, d, generator=g, dtype=torch.float64)
    fid_true, fid_n = d * m ** 2, fid.bootstrap_fid(real, gen, n_boot=0)["fid"]
    fid_inf = fid.fid_infinity(real, gen, seed=0)
    assert abs(fid_inf - fid_true) < 0.5 * abs(fid_n - fid_true)


# ------------------------------------------------------------------------------ Inception-v3
TORCHVISION_KEYS = [  # a sample of torchvision inception_v3's state-dict keys, across every block type
    "Conv2d_1a_3x3.conv.weight", "Conv2d_1a_3x3.bn.running_mean", "Conv2d_1a_3x3.bn.running_var",
    "Conv2d_2b_3x3.bn.bias", "Conv2d_4a_3x3.conv.weight", "Mixed_5b.branch5x5_2.conv.weight",
    "Mixed_5d.branch3x3dbl_3.bn.weight", "Mixed_6a.branch3x3.conv.weight", "Mixed_6e.branch7x7dbl_5.conv.weight",
    "Mixed_6b.branch7x7_3.bn.running_var", "AuxLogits.conv0.conv.weight", "AuxLogits.conv1.bn.running_mean",
    "AuxLogits.fc.weight", "AuxLogits.fc.bias", "Mixed_7a.branch7x7x3_4.conv.weight",
    "Mixed_7b.branch3x3_2b.conv.weight", "Mixed_7c.branch3x3dbl_3a.bn.weight", "Mixed_7c.branch_pool.conv.weight",
    "fc.weight", "fc.bias"]


def test_inception_layout_matches_torchvision():
    model = fid.InceptionV3()
    sd = model.state_dict()
    assert set(TORCHVISION_KEYS) <= set(sd)
    assert sum(p.numel() for p in model.parameters()) == 27_161_264          # torchvision's count
    assert not any(k.endswith("conv.bias") for k in sd)                       # convs carry no bias
    assert all(m.eps == 0.001 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert sd["fc.weight"].shape == (1000, 2048) and sd["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
    tf = fid.InceptionV3(num_classes=1008, aux_logits=False, tf_fid=True).state_dict()    # the TF-FID layout
    assert set(tf) == {k for k in sd if not k.startswith("AuxLogits.")} and tf["fc.weight"].shape == (1008, 2048)


def test_load_inception_from_preplaced_file(tmp_path, monkeypatch):
    # The same torch.hub code path as a real run; a file already in $TORCH_HOME/hub/checkpoints is used as is.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(0)
    ref = fid.InceptionV3()
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(ref.state_dict(), tmp_path / "hub" / "checkpoints" / "inception_v3_google-0cc3c7bd.pth")
    model = fid.load_inception("torchvision")
    assert not model.training and "NOT comparable" in model.name
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))


def test_load_inception_offline_without_file_is_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    # an unreachable URL without touching the network: a file:// URL to nothing
    monkeypatch.setitem(fid.WEIGHTS["torchvision"], "url", f"file://{tmp_path}/no/inception_v3_google-0cc3c7bd.pth")
    with pytest.raises(fid.FIDError) as e:
        fid.load_inception("torchvision")
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "hub" / "checkpoints" / "inception_v3_google-0cc3c7bd.pth") in msg
    with pytest.raises(fid.FIDError, match="unknown Inception weights"):
        fid.load_inception("imagenet21k")


def test_inception_features_grayscale_rounding_and_determinism():
    # Random weights are enough for the preprocessing: a [0, 1] grayscale batch must give exactly the features
    # of its rounded uint8 copy repeated to 3 channels (two separate runs: also determinism).
    torch.manual_seed(0)
    model = fid.InceptionV3().train()                        # features() must switch to eval by itself
    x = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    f1 = model.features(x)
    f3 = model.features(data.to_uint8(x).repeat(1, 3, 1, 1))
    assert f1.shape == (2, 2048) and f1.dtype == torch.float32 and torch.isfinite(f1).all()
    assert torch.equal(f1, f3)
    assert not torch.allclose(f1[0], f1[1])                  # the features depend on the image
    assert model.training                                    # the caller's mode is restored
    with pytest.raises(fid.FIDError, match=r"\[0, 1\]"):
        model.features(2 * x - 1)                            # a [-1, 1] image is refused, not silently scored


# ------------------------------------------------------------------------------ the offline extractor
def two_class_images(n, size=16, seed=0):
    # class 0: bright top half, class 1: bright bottom half, plus noise; uint8 (n, 1, size, size)
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = 0.3 * torch.rand(n, 1, size, size, generator=g)
    top = torch.arange(size).view(1, 1, size, 1) < size // 2
    x = x + 0.6 * torch.where(y.view(n, 1, 1, 1) == 0, top, ~top)
    return data.to_uint8(x.clamp(0, 1)), y


@pytest.mark.filterwarnings("ignore:FID with N")  # 100 rows in 128 dimensions, on purpose
def test_offline_net_trains_saves_and_separates_classes(tmp_path, monkeypatch):
    x, y = two_class_images(400)
    calls = []
    monkeypatch.setattr(fid.data, "load", lambda name, split, root: calls.append(split) or two_class_images(
        400 if split == "train" else 200, seed=int(split == "test")))
    logs = []
    net = fid.offline_extractor("mnist", root="unused", cache_dir=str(tmp_path), epochs=2, log=logs.append)
    assert calls == ["train", "test"] and any("test accuracy" in line for line in logs)
    assert net.meta["test_acc"] > 0.95 and "comparable only to itself" in net.name
    path, = tmp_path.glob("feature_net_mnist_*.pt")           # keyed by a hash of the training images
    ckpt = torch.load(path, weights_only=True)                  # self-contained, safe to load
    assert ckpt["config"]["feat_dim"] == 128 and ckpt["dataset"] == "mnist"
    # the second call loads the cache (it reads the training split only to check the hash): same features
    again = fid.offline_extractor("mnist", root="unused", cache_dir=str(tmp_path))
    assert calls == ["train", "test", "train"] and again.name == net.name
    f = net.features(x)
    assert f.shape == (400, 128) and torch.equal(f, again.features(x))
    # its Frechet distance separates the classes: class 0 vs class 1 >> class 0 vs class 0
    f0, f1 = f[y == 0], f[y == 1]
    within = fid.bootstrap_fid(f0[:100], f0[100:], n_boot=0)["fid"]
    between = fid.bootstrap_fid(f0[:100], f1[:100], n_boot=0)["fid"]
    assert between > 10 * within
    with pytest.raises(fid.FIDError, match="expects images"):
        net.features(torch.zeros(2, 3, 16, 16))
    # other training images (a subset, another copy) get a net of their own, not the cached one
    monkeypatch.setattr(fid.data, "load", lambda name, split, root: calls.append(split) or two_class_images(
        300 if split == "train" else 200, seed=int(split == "test")))
    fid.offline_extractor("mnist", root="unused", cache_dir=str(tmp_path), epochs=1, log=logs.append)
    assert len(list(tmp_path.glob("feature_net_mnist_*.pt"))) == 2


def test_fid_from_images_streams_batches_and_reuses_reference_features():
    torch.manual_seed(0)
    net = fid.OfflineNet(in_channels=1, image_size=16, n_classes=2)      # untrained is enough for the plumbing
    x, _ = two_class_images(300)
    res = fid.fid_from_images(net, x[:150], x[150:], n_boot=0, ref_name="half")
    assert res["n_gen"] == res["n_real"] == 150 and res["feats_ref"].shape == (150, 128)
    batches = (x[i:i + 50].float() / 255 for i in range(0, 150, 50))     # a generator of [0, 1] float batches
    again = fid.fid_from_images(net, batches, feats_ref=res["feats_ref"], n_boot=0)
    assert again["fid"] == pytest.approx(res["fid"], rel=1e-12)          # same images, same rounding, same FID
    with pytest.raises(fid.FIDError, match="no reference"):
        fid.fid_from_images(net, x)


# ------------------------------------------------------------------------------ the command line
def test_cli_feature_files_and_image_files(tmp_path, capsys, monkeypatch):
    g = torch.Generator().manual_seed(0)
    np.savez(tmp_path / "a.npz", features=torch.randn(300, 4, generator=g).numpy())
    np.savez(tmp_path / "b.npz", features=(torch.randn(300, 4, generator=g) + 1).numpy())
    fid.main(["--gen-feats", str(tmp_path / "a.npz"), "--ref-feats", str(tmp_path / "b.npz"), "--n-boot", "20"])
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("FID ") and "basic bootstrap interval" in out[0]
    assert "N gen 300" in out[0] and "N ref 300" in out[0]
    # images: real-vs-real floor on a synthetic data set (data.load patched), offline extractor trained on it
    monkeypatch.setattr(fid.data, "load", lambda name, split, root: two_class_images(
        400 if split == "train" else 200, seed=int(split == "test")))
    monkeypatch.setattr(fid, "offline_extractor", lambda *a, **k: fid.train_offline_net(
        *two_class_images(200), n_classes=2, epochs=1, log=lambda m: None))
    fid.main(["--real-vs-real", "--dataset", "fmnist", "--n-boot", "10", "--n", "150"])
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "N gen 150" in out[0] and "N ref 200 (fashion_mnist test)" in out[0]
    # a generated-sample file against a reference file
    np.savez(tmp_path / "gen.npz", images=two_class_images(120)[0].numpy())
    np.savez(tmp_path / "ref.npz", images=(two_class_images(100)[0].float() / 255).numpy())   # floats in [0, 1]
    fid.main(["--gen", str(tmp_path / "gen.npz"), "--ref", str(tmp_path / "ref.npz"), "--dataset", "mnist",
              "--n-boot", "10"])
    assert "N gen 120 | N ref 100" in capsys.readouterr().out


@pytest.mark.parametrize("argv, msg", [
    ([], "exactly one of"),
    (["--gen", "missing.npz", "--dataset", "mnist"], "cannot read missing.npz"),
    (["--gen-feats", "a.npz"], "go together"),
    (["--run", "no/such/run", "--dataset", "mnist"], "samples.npz not found"),
    (["--real-vs-real"], "needs --dataset"),
    (["--real-vs-real", "--dataset", "svhn"], "unknown data set"),
    (["--real-vs-real", "--dataset", "mnist", "--device", "xyz"], "unknown device 'xyz'"),
])
def test_cli_errors_are_one_line_exit_2(argv, msg, capsys):
    with pytest.raises(SystemExit) as e:
        fid.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and msg in err[0]


# ------------------------------------------------------------------------------ non-finite numbers, damaged files
def test_non_finite_features_or_images_are_never_scored(tmp_path, capsys):
    """A NaN feature row used to turn into a finite-looking FID (or NaN); NaN images in a float .npz were scored.
    Both are now refused, naming what holds them."""
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(50, 4, generator=g), torch.randn(50, 4, generator=g)
    Y[3, 1] = float("nan")
    for call in (lambda: fid.bootstrap_fid(X, Y, n_boot=0), lambda: fid.fid_infinity(X, Y),
                 lambda: fid.frechet_distance(X.mean(0), torch.eye(4), Y.mean(0), torch.eye(4))):
        with pytest.raises(data.NonFiniteError, match="NaN or inf"):
            call()
    images = torch.rand(20, 1, 28, 28)
    images[0, 0, 0, 0] = float("nan")
    np.savez(tmp_path / "gen.npz", images=images.numpy())
    with pytest.raises(SystemExit) as e:
        fid.main(["--gen", str(tmp_path / "gen.npz"), "--dataset", "mnist"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "gen.npz ('images'): 1 of 15680 values are NaN or inf" in err[0]


@pytest.mark.parametrize("damage", ["truncated", "nan"])
def test_damaged_npz_and_mixed_extractors_are_one_line_errors(tmp_path, capsys, damage):
    """A truncated .npz gave numpy's BadZipFile traceback; features saved by two extractors were compared. Feature
    files written by --save-feats record their extractor, and --gen-feats / --ref-feats checks it."""
    g = torch.Generator().manual_seed(0)
    np.savez(tmp_path / "a.npz", features=torch.randn(60, 4, generator=g).numpy(), extractor="offline-cnn id 1")
    np.savez(tmp_path / "b.npz", features=torch.randn(60, 4, generator=g).numpy(), extractor="Inception-v3")
    raw = (tmp_path / "a.npz").read_bytes()
    if damage == "truncated":
        (tmp_path / "c.npz").write_bytes(raw[:len(raw) // 2])
    else:
        np.savez(tmp_path / "c.npz", features=np.full((60, 4), np.nan, np.float32))
    for argv, msg in ((["--gen-feats", "a.npz", "--ref-feats", "b.npz"], "come from different extractors"),
                      (["--gen-feats", "c.npz", "--ref-feats", "b.npz"], "c.npz")):
        with pytest.raises(SystemExit) as e:
            fid.main([str(tmp_path / a) if a.endswith(".npz") else a for a in argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and msg in err[0], err


def test_offline_cache_checked_against_its_training_images(tmp_path, monkeypatch):
    """The cached offline extractor depends on the training images: it records their fingerprint, and a cache
    file that records other images (copied under another name) or is damaged is a one-line error, not reused."""
    monkeypatch.setattr(fid.data, "load", lambda name, split, root: two_class_images(
        200 if split == "train" else 100, seed=int(split == "test")))
    fid.offline_extractor("mnist", root="unused", cache_dir=str(tmp_path), epochs=1, log=lambda m: None)
    path, = tmp_path.glob("feature_net_mnist_*.pt")
    monkeypatch.setattr(fid.data, "load", lambda name, split, root: two_class_images(
        150 if split == "train" else 100, seed=int(split == "test")))
    x_other = two_class_images(150)[0]
    other = tmp_path / f"feature_net_mnist_{hashlib.sha1(x_other.numpy().tobytes()).hexdigest()[:8]}.pt"
    other.write_bytes(path.read_bytes())                    # the first net, under the second data set's name
    with pytest.raises(fid.FIDError, match="was trained on other images .*delete it to retrain"):
        fid.offline_extractor("mnist", root="unused", cache_dir=str(tmp_path))
    other.write_bytes(path.read_bytes()[:1000])             # an interrupted copy
    with pytest.raises(data.DataError, match=f"cannot read {other}.*delete it to retrain"):
        fid.offline_extractor("mnist", root="unused", cache_dir=str(tmp_path))
    assert issubclass(fid.FIDError, data.DataError)         # train.py and sample.py print it as one line too
