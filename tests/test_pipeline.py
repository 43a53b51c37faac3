"""End-to-end checks of the pipeline, train.py -> sample.py, on a tiny synthetic MNIST made here: every output
of a smoke run, the sample grids, the command lines' error messages, and exact resumption (a run stopped and
resumed ends bit for bit where an uninterrupted one does). CPU; scripts run as subprocesses with one thread
(OMP_NUM_THREADS=1: CPU kernels are deterministic for a fixed thread count). About a minute in all."""
import gzip
import json
import os
import shutil
import socket
import struct
import subprocess
import sys

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

import ddpm
import sample
import treevae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The smoke preset (its T is 50: the default ancestral sampler takes 50 steps; 5 if a test picks DDIM), so that
# a whole run takes seconds.
SMOKE = ["--dataset", "mnist", "--preset", "smoke", "--device", "cpu"]


# ----------------------------------------------------------------------------- tiny data, scripts
def idx_bytes(array):
    """IDX encoding (as tests/test_data.py): magic 0x0000 08 ndim, big-endian uint32 dims, the bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def synthetic_digits(n, seed):
    """n 28x28 images of 3 visually distinct classes (horizontal bar, vertical bar, hollow square) with random
    shifts, contrast and noise; labels 0, 1, 2 in turn."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    x = np.zeros((n, 28, 28), np.float32)
    for k, (dx, dy) in enumerate(rng.integers(-3, 4, (n, 2))):
        if labels[k] == 0:
            x[k, 12 + dy:16 + dy, 4:24] = 1
        elif labels[k] == 1:
            x[k, 4:24, 12 + dx:16 + dx] = 1
        else:
            x[k, 6 + dy:22 + dy, 6 + dx:22 + dx] = 1
            x[k, 9 + dy:19 + dy, 9 + dx:19 + dx] = 0
    x = x * rng.uniform(0.7, 1.0, (n, 1, 1)) + rng.normal(0, 0.05, x.shape)
    return (np.clip(x, 0, 1) * 255).round().astype(np.uint8), labels.astype(np.uint8)


def cli(script, *args, env=None):
    """Run `python script args` in the repository root; returns the CompletedProcess (never raises on rc)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def sample_cli(capsys, *args):
    """sample.py's entry point in-process (sample.cli: what `python sample.py` runs), as a CompletedProcess;
    saves the 2-3 s interpreter start-up per call. One test runs the real script for each outcome."""
    rc = sample.cli([*map(str, args), "--device", "cpu"])
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, rc, out.out, out.err)


def ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def fails(proc, *needles):
    """A user error: exit code 2, one `error: ...` line on stderr naming the cause, no traceback."""
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(line) == 1, proc.stderr
    for needle in needles:
        assert needle in line[0], line[0]
    return line[0]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_grid(png, images, ncol, left=0):
    """A grid picture: its bottom-left corner (from `left` pixels in: the row labels) is exactly
    sample.tile(images, ncol), one image pixel per PNG pixel with 2 px gaps, and a title band lies above it."""
    grid = sample.tile(images, ncol)                                      # (h, w) for grey images
    picture = (plt.imread(png)[..., :3] * 255).round().astype(np.uint8)  # (H, W, 3)
    h, w = grid.shape
    assert picture.shape[0] > h and picture.shape[1] >= left + w, picture.shape
    assert np.array_equal(picture[-h:, left:left + w, 0], grid)


def assert_identical(a, b, where="ckpt"):
    """Bit-for-bit equality of nested checkpoint contents (dicts, lists, tensors, numbers)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys differ"
        for k in a:
            assert_identical(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths differ"
        for k, (u, v) in enumerate(zip(a, b)):
            assert_identical(u, v, f"{where}[{k}]")
    elif torch.is_tensor(a):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), f"{where}: tensors differ"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """300 train + 100 test synthetic images in the four gzip IDX files of MNIST."""
    folder = tmp_path_factory.mktemp("data")
    for split, n, seed in (("train", 300, 0), ("t10k", 100, 1)):
        images, labels = synthetic_digits(n, seed)
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            (folder / f"{split}-{kind}-ubyte.gz").write_bytes(gzip.compress(idx_bytes(array)))
    return folder


@pytest.fixture(scope="module")
def run(data_dir, tmp_path_factory):
    """An uninterrupted smoke run of both stages: the reference of the resume tests."""
    out = tmp_path_factory.mktemp("run") / "mnist"
    proc = ok(cli("train.py", *SMOKE, "--data-dir", data_dir, "--out", out))
    assert "[test] NMI" in proc.stdout and "[ddpm]" in proc.stdout
    return out


# ----------------------------------------------------------------------------- a whole run
def test_smoke_run_writes_every_output(run):
    for name in ("treevae.pt", "ddpm.pt", "metrics.json", "tree.png", "samples.png", "samples.npz",
                 "all_leaves.png"):
        assert (run / name).is_file(), f"missing {name}"
    m = json.loads((run / "metrics.json").read_text())["treevae"]
    for key in ("nmi", "acc", "leaf_purity", "dendrogram_purity", "n_leaves", "leaf_sizes", "leaf_majority"):
        assert key in m, key
    tv = treevae.TreeVAE.from_checkpoint(load(run / "treevae.pt"))
    assert m["n_leaves"] == tv.n_leaves >= 2 and len(m["leaf_sizes"]) == tv.n_leaves
    assert sum(m["leaf_sizes"]) == 100                             # every test image has one leaf
    assert all(0 <= m[k] <= 1 for k in ("nmi", "acc", "leaf_purity", "dendrogram_purity"))
    d = load(run / "ddpm.pt")
    assert d["n_leaves"] == tv.n_leaves
    assert d["state"]["global_step"] == ddpm.PRESETS["smoke"].max_steps       # the smoke preset's step budget
    with np.load(run / "samples.npz") as f:
        assert f["images"].dtype == np.uint8 and f["images"].shape == (64, 1, 28, 28)
        assert f["leaf"].min() >= 0 and f["leaf"].max() < tv.n_leaves
    with np.load(run / "samples.npz") as f:
        assert_grid(run / "samples.png", f["images"], 8)           # 8 x 8 grid, 2 px gaps, under its title
    for name in ("tree.png", "all_leaves.png"):
        assert plt.imread(run / name).ndim == 3                   # a readable picture


def test_sample_forced_leaf_grid_size(run, tmp_path):
    out = tmp_path / "leaf0.png"
    proc = ok(cli("sample.py", "--run", run, "--leaf", 0, "--n", 4, "--steps", 3, "--device", "cpu", "--out", out))
    assert str(out) in proc.stdout
    with np.load(tmp_path / "leaf0.npz") as f:
        assert_grid(out, f["images"], 2)                           # 2 x 2 grid of 28 px images, 2 px gaps
        assert f["images"].shape == (4, 1, 28, 28) and f["images"].dtype == np.uint8
        assert (f["leaf"] == 0).all() and f["treevae"].shape == (4, 1, 28, 28)


def test_sample_modes_in_process(run, tmp_path):
    """--all-leaves, --recons and --stage treevae through sample.main (no subprocess: seconds)."""
    L = treevae.TreeVAE.from_checkpoint(load(run / "treevae.pt")).n_leaves
    common = ["--run", str(run), "--device", "cpu", "--steps", "3"]
    sample.main(common + ["--all-leaves", "--n", "2", "--out", str(tmp_path / "all.png")])
    with np.load(tmp_path / "all.npz") as f:
        assert f["images"].shape == f["treevae"].shape == (2 * L, 1, 28, 28)
        assert f["leaf"].tolist() == list(range(L)) * 2 and f["leaf_probs"].shape == (2, L)
        assert np.allclose(f["leaf_probs"].sum(1), 1, atol=1e-5)
    sample.main(common + ["--recons", "--n", "5", "--out", str(tmp_path / "rec.png")])
    with np.load(tmp_path / "rec.npz") as f:
        assert f["images"].shape == f["original"].shape == f["treevae"].shape == (5, 1, 28, 28)
    with np.load(tmp_path / "rec.npz") as f:                      # rows original / TreeVAE / refined
        assert_grid(tmp_path / "rec.png", np.concatenate([f["original"], f["treevae"], f["images"]]), 5,
                    left=sample.LABEL_PX)
    sample.main(common + ["--sampler", "ddim", "--n", "2", "--out", str(tmp_path / "ddim.png")])   # 3 DDIM steps
    with np.load(tmp_path / "ddim.npz") as f:
        assert f["images"].shape == (2, 1, 28, 28)
    sample.main(common + ["--stage", "treevae", "--n", "3", "--out", str(tmp_path / "tv.png")])
    with np.load(tmp_path / "tv.npz") as f:
        assert f["images"].shape == (3, 1, 28, 28) and "treevae" not in f.files


def test_all_leaves_shares_root_sample_and_noise(run, monkeypatch):
    """The signature figure: every leaf of a row is refined from the same x_T and the same per-step noise."""
    m = sample.load_run(str(run), "cpu")
    calls = []

    def fake_refine(m_, x_hat, leaf, cfg, noise=None, generator=None):
        calls.append((x_hat, leaf, noise, generator.initial_seed()))
        return 2 * x_hat - 1
    monkeypatch.setattr(sample, "refine", fake_refine)
    g = torch.Generator().manual_seed(0)
    x_hat, x, _ = sample.all_leaves(m, 3, sample.SampleConfig(steps=3), g)
    assert len(calls) == m.tv.n_leaves and x.shape == x_hat.shape == (3, m.tv.n_leaves, 1, 28, 28)
    for k, (xh, leaf, noise, seed) in enumerate(calls):
        assert torch.equal(xh, x_hat[:, k]) and (leaf == k).all()
        assert torch.equal(noise, calls[0][2]) and seed == calls[0][3]


def test_ddim_settings_of_the_run_are_the_defaults(run, data_dir, tmp_path, capsys):
    """--ddpm-ddim-steps / --ddpm-ddim-eta are saved in ddpm.pt and are the DDIM settings of sample.py (unless
    --steps / --eta are given) and of train.py's figures (they used to be saved and ignored: 50-100 steps)."""
    assert load(run / "ddpm.pt")["config"]["ddim_steps"] == ddpm.PRESETS["smoke"].ddim_steps == 5
    out = ok(sample_cli(capsys, "--run", run, "--sampler", "ddim", "--n", 2, "--out", tmp_path / "a.png")).stdout
    assert "DDIM 5 steps, eta 0.0" in out and "note:" not in out, out
    out = ok(sample_cli(capsys, "--run", run, "--sampler", "ddim", "--n", 2, "--steps", 3, "--eta", 0.5,
                        "--out", tmp_path / "b.png")).stdout
    assert "DDIM 3 steps, eta 0.5" in out, out
    # train.py: a resumed, finished run redraws its figures with the DDIM settings given now, and saves them
    again = tmp_path / "mnist"
    shutil.copytree(run, again)
    proc = ok(cli("train.py", *SMOKE, "--data-dir", data_dir, "--out", again, "--stage", "ddpm", "--resume",
                  "--sampler", "ddim", "--ddpm-ddim-steps", 4, "--ddpm-ddim-eta", 0.25, "--fid-samples", 20))
    assert "samples.png/.npz (64 refined samples, DDIM 4 steps, eta 0.25)" in proc.stdout, proc.stdout[-2000:]
    rows = json.loads((again / "eval.json").read_text())["rows"]      # train.py ends with the evaluation
    assert {r["sampler"] for r in rows if r["sampler"]} == {"DDIM 4 steps, eta 0.25"} and rows[0]["n"] == 20
    assert load(again / "ddpm.pt")["config"]["ddim_steps"] == 4
    out = ok(sample_cli(capsys, "--run", again, "--sampler", "ddim", "--n", 2, "--out", tmp_path / "c.png")).stdout
    assert "DDIM 4 steps, eta 0.25" in out, out


def test_evaluation_writes_the_table_and_leaf_specificity(run, data_dir, tmp_path, capsys):
    """sample.py --evaluate on the smoke run: eval.json's rows (every name, both references, offline extractor),
    leaf specificity in [0, 1], the figure, the printed table; N and the sampler as asked."""
    with pytest.warns(UserWarning, match="rank-deficient"):          # 40 images < 128 features: said loudly
        proc = ok(sample_cli(capsys, "--run", run, "--evaluate", "--n", 40, "--steps", 5, "--out",
                             tmp_path / "eval.json"))
    res = json.loads((tmp_path / "eval.json").read_text())
    names = {r["name"] for r in res["rows"]}
    assert names == set(sample.EVAL_ROWS)
    for r in res["rows"]:
        assert r["reference"] in ("test", "train") and "offline-cnn" in r["extractor"] and r["fid"] >= 0
        assert len(r["ci95"]) == 2 and r["ci95"][0] <= r["ci95"][1]
        assert r["n"] == 40 and r["n_ref"] == (100 if r["reference"] == "test" else 260)   # 300 train - 40 floor
    assert len(res["rows"]) == 2 * len(sample.EVAL_ROWS)
    assert {r["sampler"] for r in res["rows"] if r["name"].startswith("diffusion")} == \
        {"ancestral DDPM, 50 steps respaced to 5"}
    spec = res["leaf_specificity"]
    assert 0 <= spec["purity"] <= 1 and 0 <= spec["agreement"] <= 1 and spec["n"] == 40
    assert sum(leaf["n"] for leaf in spec["per_leaf"]) == 40
    assert (run / "leaf_specificity.png").is_file() and (tmp_path / "eval_images.npz").is_file()
    assert "| diffusion_generations | sampled leaf | 40 |" in proc.stdout, proc.stdout
    fails(sample_cli(capsys, "--run", run, "--evaluate", "--leaf", 0), "--evaluate scores every row")


def test_evaluation_rows_share_z0_and_test_images(run, data_dir, monkeypatch):
    """The rows of both stages are computed on the same root samples and the same test images: with a DDPM that
    returns its condition unchanged, each refined row equals the TreeVAE images it was conditioned on (the drawn
    leaf's), the argmax variant equals the TreeVAE argmax row, and refined reconstructions equal the TreeVAE ones."""
    monkeypatch.setattr(sample, "refine", lambda m, x_hat, leaf, cfg, noise=None, generator=None: 2 * x_hat - 1)
    m = sample.load_run(str(run))
    cfg = sample._stage_config(m, sampler="ddpm")
    g = torch.Generator().manual_seed(0)
    gen = sample.eval_generations(m, 30, cfg, g, batch=16, log=lambda line: None)
    assert torch.equal(gen["refined"], gen["treevae_drawn"]) and torch.equal(gen["refined_argmax"], gen["treevae"])
    same = gen["leaf"] == gen["leaf_argmax"]
    assert torch.equal(gen["treevae"][same], gen["treevae_drawn"][same])
    images = sample.data.load("mnist", "test", str(data_dir))[0][:20]
    rec, rec_refined = sample.eval_reconstructions(m, images, cfg, g, batch=8, log=lambda line: None)
    assert torch.equal(rec, rec_refined) and rec.shape == images.shape


def test_leaf_specificity_counts():
    """Purity and agreement on a hand-made case: leaf 0 holds classes [1, 1, 2], leaf 1 [3]; the conditioning
    images' classes agree on 3 of 4."""
    classes, cond, leaf = torch.tensor([1, 1, 2, 3]), torch.tensor([1, 2, 2, 3]), torch.tensor([0, 0, 0, 1])
    s = sample.leaf_specificity(classes, cond, leaf, n_leaves=3, n_classes=4)
    assert s["purity"] == pytest.approx(3 / 4) and s["agreement"] == pytest.approx(3 / 4)
    assert s["per_leaf"][0] == dict(n=3, histogram=[0, 2, 1, 0], majority=1, purity=pytest.approx(2 / 3),
                                    agreement=pytest.approx(2 / 3))
    assert s["per_leaf"][2]["n"] == 0 and s["per_leaf"][2]["purity"] is None


# ----------------------------------------------------------------------------- resuming
@pytest.fixture(scope="module")
def resumed(data_dir, tmp_path_factory):
    """The same run in four calls: stop inside stage 1 (a subtree phase), finish stage 1 alone (--stage treevae),
    stop inside the DDPM, finish. Copies of the run folder after the first two calls serve the error tests."""
    base = tmp_path_factory.mktemp("resumed")
    # --plan false: the planner forks the RNG, so the reference (planned) run must still match bit for bit.
    out, args = base / "mnist", [*SMOKE, "--data-dir", data_dir, "--out", base / "mnist", "--plan", "false"]
    steps = {}
    p1 = ok(cli("train.py", *args, "--max-steps", 20))
    assert "stopped in phase subtree" in p1.stdout, p1.stdout[-2000:]
    steps["stop1"] = load(out / "treevae.pt")["state"]
    shutil.copytree(out, base / "unfinished")
    p2 = ok(cli("train.py", *args, "--resume", "--stage", "treevae"))
    assert "resumed" in p2.stdout and "phase subtree" in p2.stdout
    shutil.copytree(out, base / "stage1_only")
    p3 = ok(cli("train.py", *args, "--resume", "--max-steps", 2))
    assert "stopped the DDPM" in p3.stdout, p3.stdout[-2000:]
    steps["stop2"] = load(out / "ddpm.pt")["state"]
    p4 = ok(cli("train.py", *args, "--resume"))
    assert "resumed" in p4.stdout
    return base, steps


def test_resume_inside_stage1_is_exact(run, resumed):
    base, steps = resumed
    assert steps["stop1"]["phase"] == "subtree" and steps["stop1"]["total_steps"] == 20
    a, b = load(run / "treevae.pt"), load(base / "stage1_only" / "treevae.pt")
    assert_identical(a["topology"], b["topology"], "topology")
    assert_identical(a["state_dict"], b["state_dict"], "state_dict")
    assert_identical(a["state"], b["state"], "state")                 # schedule position, growth log, members


def test_resume_inside_ddpm_is_exact(run, resumed):
    base, steps = resumed
    assert steps["stop2"]["global_step"] == 2                        # stopped half-way through the 4 steps
    a, b = load(run / "ddpm.pt"), load(base / "mnist" / "ddpm.pt")
    for key in ("model", "ema", "optimizer", "state", "rng"):
        assert_identical(a[key], b[key], key)
    assert_identical(load(run / "treevae.pt")["state_dict"], load(base / "mnist" / "treevae.pt")["state_dict"])


# ----------------------------------------------------------------------------- error messages
def test_error_unknown_dataset():
    fails(cli("train.py", "--dataset", "foo", "--device", "cpu"), "unknown data set 'foo'", "mnist")


def test_error_data_missing_offline(tmp_path):
    """An empty data folder: the download must fail fast and say where to put the files. A proxy on a closed
    local port makes every download fail at once, with or without a network."""
    with socket.socket() as s:                                       # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proxy = f"http://127.0.0.1:{port}"
    env = {"http_proxy": proxy, "https_proxy": proxy, "HTTP_PROXY": proxy, "HTTPS_PROXY": proxy, "no_proxy": "",
           "NO_PROXY": ""}
    proc = cli("train.py", *SMOKE, "--data-dir", tmp_path / "empty", "--out", tmp_path / "run", env=env)
    fails(proc, "could not download train-images-idx3-ubyte.gz", "by hand", str(tmp_path / "empty"))


def test_error_missing_run_and_checkpoint(tmp_path):
    fails(cli("sample.py", "--run", tmp_path / "nowhere", "--device", "cpu"),
          f"no run folder {tmp_path / 'nowhere'}", "python train.py --dataset")
    with pytest.raises(sample.SampleError, match="no .*treevae.pt .*python train.py --dataset mnist"):
        sample.load_run(str(tmp_path), "cpu")                        # a folder without a checkpoint


def test_error_leaf_out_of_range(run, capsys):
    L = treevae.TreeVAE.from_checkpoint(load(run / "treevae.pt")).n_leaves
    fails(sample_cli(capsys, "--run", run, "--leaf", 99), "leaf 99 is out of range", f"valid leaves are 0..{L - 1}")
    fails(sample_cli(capsys, "--run", run, "--leaf", 0, "--all-leaves"), "drop --leaf")


def test_error_no_ddpm_yet(resumed, tmp_path, capsys):
    run = resumed[0] / "stage1_only"                                # made with --stage treevae
    assert not (run / "ddpm.pt").exists()
    fails(sample_cli(capsys, "--run", run), "not trained yet", "--stage treevae", "--stage ddpm")
    ok(sample_cli(capsys, "--run", run, "--stage", "treevae", "--n", 2, "--out", tmp_path / "a.png"))


def test_error_unfinished_stage1(resumed, capsys):
    fails(sample_cli(capsys, "--run", resumed[0] / "unfinished"), "unfinished stage 1 (phase subtree)", "--resume")


def test_error_incompatible_version(run, data_dir, tmp_path, capsys):
    ckpt = load(run / "treevae.pt")
    ckpt["version"] = 999
    (tmp_path / "old").mkdir()
    torch.save(ckpt, tmp_path / "old" / "treevae.pt")
    fails(sample_cli(capsys, "--run", tmp_path / "old"), "incompatible version", "999", "retrain with python train.py")
    fails(cli("train.py", *SMOKE, "--data-dir", data_dir, "--out", tmp_path / "old", "--resume"), "999")


def test_error_weights_of_another_layout(run, data_dir, tmp_path, capsys):
    """A checkpoint of this version whose weights do not fit the model (a layer renamed since, e.g. CIFAR-10's
    projection heads): one line naming the file and the remedy, from sample.py and from train.py --resume."""
    ckpt = load(run / "treevae.pt")
    key = next(iter(ckpt["state_dict"]))
    ckpt["state_dict"]["renamed." + key] = ckpt["state_dict"].pop(key)
    (tmp_path / "other").mkdir()
    torch.save(ckpt, tmp_path / "other" / "treevae.pt")
    fails(sample_cli(capsys, "--run", tmp_path / "other"), "treevae.pt", "do not fit this code's mnist model",
          "--overwrite")
    fails(cli("train.py", *SMOKE, "--data-dir", data_dir, "--out", tmp_path / "other", "--resume"), "do not fit")


def test_error_ddpm_from_other_treevae_weights(run, tmp_path, capsys):
    """ddpm.pt records the fingerprint of the stage-1 weights it was trained on: same leaf count, other weights
    (stage 1 retrained) -> the DDPM is refused with the remedy."""
    import shutil
    other = tmp_path / "retrained"
    other.mkdir()
    shutil.copy(run / "ddpm.pt", other / "ddpm.pt")
    ckpt = load(run / "treevae.pt")
    key = next(k for k, v in ckpt["state_dict"].items() if v.is_floating_point())
    ckpt["state_dict"][key] = ckpt["state_dict"][key] + 1.0
    torch.save(ckpt, other / "treevae.pt")
    fails(sample_cli(capsys, "--run", other), "other stage-1 weights", "--stage ddpm")


def test_ddpm_stage_plans_the_ddpm_it_will_train(run, data_dir, tmp_path):
    """--stage ddpm on a finished stage 1: the planner times only stage 2, with the U-Net the flags ask for and
    the saved tree's leaves (it used to add the TreeVAE phases, time the preset's U-Net and max_leaves leaves)."""
    out = tmp_path / "mnist"
    out.mkdir()
    shutil.copy(run / "treevae.pt", out / "treevae.pt")
    n_leaves = treevae.TreeVAE.from_checkpoint(load(out / "treevae.pt")).n_leaves
    proc = ok(cli("train.py", *SMOKE, "--data-dir", data_dir, "--out", out, "--stage", "ddpm",
                  "--ddpm-batch-size", 4, "--ddpm-max-steps", 2, "--treevae-max-leaves", 7))
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("plan:"))
    assert "init" not in line and "finetune" not in line and "subtree" not in line, line
    assert line.startswith("plan: ddpm") and "| figures " in line and "DDPM" in line, line
    assert f"at batch 4 with {n_leaves} leaf conditions," in line and n_leaves != 7, line
    assert (out / "ddpm.pt").is_file()


def test_ddpm_stage_without_stage1_says_so_before_planning(data_dir, tmp_path):
    proc = cli("train.py", *SMOKE, "--data-dir", data_dir, "--out", tmp_path / "empty", "--stage", "ddpm")
    fails(proc, "train stage 1 first", "--stage treevae")
    assert "plan:" not in proc.stdout


def test_threads_option_sets_torch_threads(data_dir, tmp_path):
    """--threads N: torch.set_num_threads(N) before any work (the data line says how many); without it torch's
    choice (here OMP_NUM_THREADS=1)."""
    for extra, threads in (([], 1), (["--threads", 3], 3)):
        proc = cli("train.py", *SMOKE, "--data-dir", data_dir, "--out", tmp_path / "empty", "--stage", "ddpm", *extra)
        fails(proc, "train stage 1 first")
        assert f"device cpu, {threads} thread(s)" in proc.stdout, proc.stdout


def test_resume_on_other_data_is_refused(run, data_dir, tmp_path):
    """A stage 1 resumed with another --dataset would go on training the saved tree on other images: refused."""
    (tmp_path / "run").mkdir()
    shutil.copy(run / "treevae.pt", tmp_path / "run" / "treevae.pt")
    proc = cli("train.py", *SMOKE[2:], "--dataset", "fashion_mnist", "--data-dir", data_dir, "--out",
               tmp_path / "run", "--resume")
    fails(proc, "was trained on mnist, not fashion_mnist", "--dataset mnist")


# ----------------------------------------------------------------------------- restarts
def test_restarts_keep_the_lowest_validation_elbo(data_dir, tmp_path):
    """--restarts 2: two stage-1 runs (seeds 0, 1) as child processes; the run folder's treevae.pt is the one with
    the lower validation -ELBO, and metrics.json lists both (with their test NMI, reported but never used)."""
    out = tmp_path / "mnist"
    proc = ok(cli("train.py", *SMOKE, "--data-dir", data_dir, "--out", out, "--stage", "treevae",
                  "--restarts", 2, "--threads", 2))
    assert "[restarts] validation -ELBO" in proc.stdout
    for k in (0, 1):                                  # --threads 2 split between the two: one each, not two
        assert "device cpu, 1 thread(s)" in (tmp_path / "mnist" / f"restart_{k}.log").read_text()
    runs = json.load(open(out / "metrics.json"))["treevae"]["restarts"]
    elbos = [r["val_elbo"] for r in runs["runs"]]
    assert [r["seed"] for r in runs["runs"]] == [0, 1] and runs["chosen"] == elbos.index(min(elbos))
    chosen = load(out / f"restart_{runs['chosen']}" / "treevae.pt")
    assert_identical(load(out / "treevae.pt")["state_dict"], chosen["state_dict"])
    other = load(out / f"restart_{1 - runs['chosen']}" / "treevae.pt")
    assert other["state"]["val_elbo"] >= chosen["state"]["val_elbo"]
    W = "encoder.net.0.0.parametrizations.weight.original"                 # different seeds, different weights
    assert not torch.equal(other["state_dict"][W], chosen["state_dict"][W])


# ----------------------------------------------------------------------------- bench.py
def test_bench_prints_one_json_line_per_figure():
    """bench.py's contract (README): one JSON line per figure with device, dtype, batch, compile flag and the
    median / min / max step time; unknown figure groups and a missing GPU are one-line errors."""
    proc = ok(cli("bench.py", "--device", "cpu", "--only", "peak,data", "--repeat", 2))
    lines = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert [ln["figure"] for ln in lines] == ["matmul_peak", "batches_epoch"], proc.stdout
    for ln in lines:
        assert ln["device"] == "cpu" and ln["dtype"] == "fp32" and ln["compile"] is False and ln["batch"] > 0
        assert ln["rate"] > 0 and ln["min_ms"] <= ln["median_ms"] <= ln["max_ms"], ln
    assert lines[0]["unit"] == "TFLOP/s" and lines[1]["unit"] == "img/s"
    fails(cli("bench.py", "--only", "peak,bogus"), "unknown or no figure group (bogus)", "choose from")
    fails(cli("bench.py", "--device", "xyz"), "unknown device 'xyz'")
    if not torch.cuda.is_available():
        fails(cli("bench.py", "--device", "cuda"), "no CUDA GPU", "--device cpu")


# ----------------------------------------------------------------------------- files that depend on others
def copy_run(run, folder):
    shutil.copytree(run, folder)
    return folder


def change_a_decoder_weight(path):
    ckpt = load(path)
    key = next(k for k, v in ckpt["state_dict"].items() if k.startswith("decoder") and v.is_floating_point())
    ckpt["state_dict"][key] = ckpt["state_dict"][key] + 0.5
    torch.save(ckpt, path)


def test_stale_ddpm_is_never_resumed_or_restamped(run, data_dir, tmp_path, capsys):
    """treevae.pt changed after stage 2 (retrained, or one decoder weight edited): --resume used to continue the
    old ddpm.pt and stamp it with the new tree's fingerprint, so that sample.py's check could no longer catch it.
    Now the resume refuses, says how to start stage 2 afresh, and leaves ddpm.pt byte for byte as it was; fid.py
    --run refuses the run's samples.npz, made by the old tree."""
    other = copy_run(run, tmp_path / "mnist")
    change_a_decoder_weight(other / "treevae.pt")
    before = (other / "ddpm.pt").read_bytes()
    for stage in ("ddpm", "all"):
        fails(cli("train.py", *SMOKE, "--data-dir", data_dir, "--out", other, "--stage", stage, "--resume"),
              f"{other / 'ddpm.pt'} was trained on other stage-1 weights", "afresh", "--stage ddpm --overwrite")
    assert (other / "ddpm.pt").read_bytes() == before
    fails(sample_cli(capsys, "--run", other), "other stage-1 weights", "--stage ddpm --overwrite")
    with pytest.raises(SystemExit) as e:
        import fid
        fid.main(["--run", str(other), "--dataset", "mnist", "--root", str(data_dir), "--cache-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "samples.npz was made by another treevae.pt" in err and "sample.py --run" in err


def test_metrics_of_other_checkpoints_are_dropped_or_recomputed(run, data_dir, tmp_path):
    """metrics.json sections record the fingerprints of the checkpoints they describe: a section of another tree
    (or another DDPM) left from earlier is recomputed (the stage-1 test metrics) or dropped (a FID not asked for
    again), never written back as this run's."""
    other = copy_run(run, tmp_path / "mnist")
    metrics = json.loads((other / "metrics.json").read_text())
    tv_id = metrics["treevae"]["treevae_id"]
    assert tv_id == load(other / "ddpm.pt")["treevae_id"] == sample.load_run(str(other)).tv_id
    metrics["treevae"].update(treevae_id="0" * 12, nmi=-1.0)
    metrics["fid"] = {"treevae": {"fid": 1.0}, "treevae_id": tv_id, "ddpm_id": "0" * 12}
    (other / "metrics.json").write_text(json.dumps(metrics))
    proc = ok(cli("train.py", *SMOKE, "--data-dir", data_dir, "--out", other, "--stage", "ddpm", "--resume",
                  "--plan", "false"))
    assert "describes other stage-1 weights" in proc.stdout and "dropped the 'fid' section" in proc.stdout
    metrics = json.loads((other / "metrics.json").read_text())
    assert "fid" not in metrics and metrics["treevae"]["treevae_id"] == tv_id and metrics["treevae"]["nmi"] >= 0


# ----------------------------------------------------------------------------- non-finite numbers
def test_nan_weights_or_outputs_are_never_saved_as_images(run, tmp_path, capsys, monkeypatch):
    """One NaN in ddpm.pt's EMA weights: sample.py used to save an all-black grid (exit 0). Now nothing is written
    and the error names the checkpoint; the same for NaN outputs of finite weights (a diverged sampler), and for
    the TreeVAE, whose leaf probabilities also feed the clustering metrics."""
    other = copy_run(run, tmp_path / "mnist")
    ckpt = load(other / "ddpm.pt")
    next(v for v in ckpt["ema"].values() if v.is_floating_point()).view(-1)[0] = float("nan")
    torch.save(ckpt, other / "ddpm.pt")
    out = tmp_path / "grid.png"
    fails(sample_cli(capsys, "--run", other, "--leaf", 0, "--out", out), f"{other / 'ddpm.pt'} holds NaN/inf weights",
          "--stage ddpm --overwrite")
    monkeypatch.setattr(sample, "refine", lambda m, x_hat, *a, **k: torch.full_like(x_hat, float("nan")))
    fails(sample_cli(capsys, "--run", run, "--leaf", 0, "--n", 2, "--out", out),
          f"images made by {run / 'ddpm.pt'}", "NaN or inf")
    assert not out.exists() and not (tmp_path / "grid.npz").exists()
    ckpt = load(other / "treevae.pt")
    ckpt["state_dict"] = {k: v * float("nan") if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
    torch.save(ckpt, other / "treevae.pt")
    fails(sample_cli(capsys, "--run", other, "--stage", "treevae", "--out", out), "treevae.pt holds NaN/inf weights")
    import train
    tv = treevae.TreeVAE.from_checkpoint(ckpt)
    with pytest.raises(train.data.NonFiniteError, match="leaf probabilities of runs/x/treevae.pt"):
        train.evaluate_clustering(tv, torch.zeros(4, 1, 28, 28, dtype=torch.uint8), torch.zeros(4), "cpu",
                                  source="runs/x/treevae.pt")


def test_diverged_training_stops_and_keeps_the_last_good_checkpoint(run, data_dir, tmp_path):
    """A loss that becomes NaN or inf stops training at the next progress line with one line naming the step; a
    divergence after the last progress line is caught by the save guard. Neither writes over the checkpoint."""
    fresh = tmp_path / "fresh"
    fails(cli("train.py", *SMOKE, "--data-dir", data_dir, "--out", fresh, "--plan", "false", "--stage", "treevae",
              "--treevae-lr", "1e30", "--log-every", 1), "[init] epoch 1/1 step", "training diverged", "--treevae-lr")
    assert not (fresh / "treevae.pt").exists()
    other = copy_run(run, tmp_path / "mnist")
    before = (other / "ddpm.pt").read_bytes()
    args = [*SMOKE, "--data-dir", data_dir, "--out", other, "--plan", "false", "--stage", "ddpm", "--overwrite",
            "--ddpm-lr", "1e30"]
    fails(cli("train.py", *args, "--log-every", 1), "training diverged", "stopped before saving it over " +
          str(other / "ddpm.pt"), "--ddpm-lr")
    fails(cli("train.py", *args, "--log-every", 1000, "--max-steps", 2), "became NaN or inf", "--ddpm-lr")
    assert (other / "ddpm.pt").read_bytes() == before


# ----------------------------------------------------------------------------- unreadable files, overwriting a run
def test_damaged_checkpoint_and_fresh_run_over_a_run(run, data_dir, tmp_path):
    """A truncated treevae.pt: --resume and a fresh run used to die in torch's zip reader (exit 1). Now --resume
    names the file and the remedy; a fresh run into a folder with checkpoints refuses unless --overwrite (which
    also removes the ddpm.pt of the tree it replaces); --stage ddpm on a finished stage 1 needs neither."""
    other = copy_run(run, tmp_path / "mnist")
    raw = (other / "treevae.pt").read_bytes()
    (other / "treevae.pt").write_bytes(raw[:len(raw) // 2])
    args = [*SMOKE, "--data-dir", data_dir, "--out", other, "--plan", "false"]
    fails(cli("train.py", *args, "--resume"), f"cannot read {other / 'treevae.pt'}", "put back a good copy",
          "--stage treevae --overwrite")
    fails(cli("train.py", *args), "treevae.pt", "ddpm.pt", "--resume", "--overwrite")
    assert (other / "treevae.pt").read_bytes() == raw[:len(raw) // 2]
    (other / "treevae.pt").write_bytes(raw)
    fails(cli("train.py", *args, "--stage", "ddpm"), f"{other / 'ddpm.pt'} from an earlier run", "--overwrite")
    fails(cli("train.py", *args, "--resume", "--overwrite"), "give one of them")
    (other / "metrics.json").write_text('{"treevae": {"nmi": 0.')            # an interrupted write of old code
    fails(cli("train.py", *args, "--stage", "ddpm", "--resume"), f"cannot read {other / 'metrics.json'}")
    proc = ok(cli("train.py", *args, "--stage", "treevae", "--overwrite", "--max-steps", 1))
    assert f"removed {other / 'ddpm.pt'}" in proc.stdout and not (other / "ddpm.pt").exists()
    assert load(other / "treevae.pt")["state"]["total_steps"] == 1


# ----------------------------------------------------------------------------- what a new user sees
def figure_texts(monkeypatch):
    """Spy on sample._savefig: {file name: every text drawn in that figure, lines joined by spaces}."""
    import matplotlib.text
    texts, save = {}, sample._savefig

    def spy(fig, path):
        texts[os.path.basename(path)] = " ".join(t.get_text().replace("\n", " ")
                                                 for t in fig.findobj(matplotlib.text.Text))
        save(fig, path)
    monkeypatch.setattr(sample, "_savefig", spy)
    return texts


def test_figures_say_what_they_show(run, tmp_path, monkeypatch):
    """Every figure has a title saying what it shows; a smoke run's say that it is one and what that means; the
    tree names its leaves as --leaf does and points at the TreeVAE-only redraw; reconstructions label their rows."""
    texts = figure_texts(monkeypatch)
    out = tmp_path / "figs"
    shutil.copytree(run, out)
    sample.make_figures(str(out), steps=3, metrics=json.loads((run / "metrics.json").read_text()))
    for name in ("tree.png", "all_leaves.png", "samples.png"):
        assert "SMOKE RUN, a one-minute pipeline check, not a result: refined images are noise" in texts[name], name
        assert "--preset fast or paper" in texts[name] and "ancestral DDPM, 50 steps" in texts[name], name
    assert "leaf k = sample.py --leaf k; edge width: share of the test set" in texts["tree.png"]
    assert "sample.py --tree --stage treevae" in texts["tree.png"]
    assert "column k = sample.py --leaf k" in texts["all_leaves.png"]
    assert "64 samples, leaves drawn from P(l | z_0)" in texts["samples.png"]
    common = ["--run", str(out), "--device", "cpu", "--steps", "3", "--n", "2"]
    sample.main(common + ["--recons", "--out", str(tmp_path / "rec.png")])
    assert "rows: original, TreeVAE, refined" in texts["rec.png"]
    assert all(f" {label} " in f" {texts['rec.png']} " for label in ("original", "TreeVAE", "refined"))
    sample.main(common + ["--leaf", "0", "--stage", "treevae", "--out", str(tmp_path / "tv.png")])
    assert "2 samples, leaf 0; TreeVAE only. SMOKE RUN" in texts["tv.png"]
    assert "a tiny TreeVAE, one epoch per phase, draws blurry images at best" in texts["tv.png"]


def test_sample_tree_redraws_the_tree_from_treevae_samples(run, tmp_path, monkeypatch, capsys):
    """sample.py --tree --stage treevae: the run's tree with the TreeVAE's own images (which a short run's noisy
    refinements hide in tree.png), its leaf sizes from metrics.json, leaf k captioned as --leaf k numbers it."""
    texts = figure_texts(monkeypatch)
    out = tmp_path / "tree"
    shutil.copytree(run, out)
    L = treevae.TreeVAE.from_checkpoint(load(out / "treevae.pt")).n_leaves
    sample.main(["--run", str(out), "--tree", "--stage", "treevae", "--n", "2", "--device", "cpu"])
    assert (out / "tree_treevae.png").is_file() and "tree_treevae.png (the tree" in capsys.readouterr().out
    assert f"{L} leaves; under each, 2 TreeVAE samples" in texts["tree_treevae.png"]
    assert "n=" in texts["tree_treevae.png"] and "leaf k = sample.py --leaf k" in texts["tree_treevae.png"]
    with np.load(out / "tree_treevae.npz") as f:
        assert f["images"].shape == (2 * L, 1, 28, 28) and np.array_equal(f["images"], f["treevae"])
    fails(sample_cli(capsys, "--run", out, "--tree", "--leaf", 0), "--tree shows every leaf", "drop --leaf")


def test_tree_captions_each_strip_with_its_leaf_index(tmp_path, monkeypatch):
    """plot_tree draws leaf_images[k] above the caption 'leaf k' (k = position in tv.leaves, what --leaf k and the
    clusters use), also where breadth-first order is not left to right."""
    import matplotlib.image
    import matplotlib.text
    tv = treevae.TreeVAE(treevae.treevae_config("mnist", "smoke"))
    tv.split(tv.leaves[0])                                   # leaves, breadth-first: [right, left-left, left-right]
    assert tv.n_leaves == 3
    figs = []
    monkeypatch.setattr(sample, "_savefig", lambda fig, path: figs.append(fig))
    strips = [torch.full((2, 1, 28, 28), 40 * (k + 1), dtype=torch.uint8) for k in range(3)]
    sample.plot_tree(tv, str(tmp_path / "t.png"), strips, title="t")
    ax = figs[0].axes[0]
    images = {round(sum(im.get_extent()[:2]) / 2, 3): int(im.get_array().min()) for im in
              ax.findobj(matplotlib.image.AxesImage)}           # strip centre x -> its images' value (gaps: 255)
    captions = {t.get_text().split("\n")[0]: round(t.get_position()[0], 3) for t in
                ax.findobj(matplotlib.text.Text) if t.get_text().startswith("leaf ")}
    assert sorted(captions) == ["leaf 0", "leaf 1", "leaf 2"]
    for k in range(3):
        assert images[captions[f"leaf {k}"]] == 40 * (k + 1)
    assert captions["leaf 0"] > captions["leaf 2"]            # leaf 0 (depth 1) is drawn right of leaves 1, 2


def test_ddpm_stage_advice_keeps_the_runs_options(data_dir, tmp_path):
    """--stage ddpm without stage 1: the suggested command keeps --out, --preset and --data-dir."""
    out = tmp_path / "elsewhere"
    proc = cli("train.py", *SMOKE, "--data-dir", data_dir, "--out", out, "--stage", "ddpm")
    fails(proc, f"python train.py --dataset mnist --preset smoke --out {out} --data-dir {data_dir} --stage treevae")
    assert not out.exists()                                  # the error left no empty run folder behind


def test_fid_run_reads_dataset_and_data_folder_from_the_run(run, tmp_path, capsys):
    import fid
    fid.main(["--run", str(run), "--n-boot", "5", "--cache-dir", str(tmp_path)])     # no --dataset, no --root
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("FID ") and "N gen 64 | N ref 100 (mnist test)" in line, line


# ----------------------------------------------------------------------------- Ctrl-C
def interrupt_when(trigger, script, *args):
    """Run a script, send it SIGINT when a line containing `trigger` appears; (returncode, stdout+stderr)."""
    import signal
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, script, *map(str, args)], cwd=ROOT, env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines = []
    for line in p.stdout:
        lines.append(line)
        if trigger in line and p.poll() is None:
            p.send_signal(signal.SIGINT)
            trigger = "\0"                                    # once
    p.wait(timeout=120)
    return p.returncode, "".join(lines)


def test_ctrl_c_while_planning_is_one_line_and_leaves_no_folder(data_dir, tmp_path):
    out = tmp_path / "runs" / "mnist"                         # neither folder exists yet
    code, text = interrupt_when("planning:", "train.py", *SMOKE, "--data-dir", data_dir, "--out", out)
    assert code == 130 and "Traceback" not in text, text[-2000:]
    assert text.splitlines()[-1] == "interrupted (Ctrl-C) before anything was written; nothing to clean up", text
    assert not (tmp_path / "runs").exists()


def test_ctrl_c_in_training_saves_and_exits_130(data_dir, tmp_path):
    """Ctrl-C during a training step: the checkpoint is written, the last line says how to continue, and the exit
    status is 130 (not 0), so a following `&& sample.py` does not run on an unfinished run."""
    out = tmp_path / "run"
    code, text = interrupt_when("[init] epoch", "train.py", *SMOKE, "--data-dir", data_dir, "--out", out,
                                "--plan", "false", "--log-every", "1")
    assert code == 130 and "Traceback" not in text, text[-2000:]
    assert text.splitlines()[-1].startswith("stopped in phase init at epoch 0, batch "), text[-2000:]
    assert text.splitlines()[-1].endswith("continue with --resume") and (out / "treevae.pt").exists()


def test_ctrl_c_elsewhere_is_one_line(data_dir, run, tmp_path, monkeypatch, capsys):
    """Loading data (train.py), sampling (sample.py), features (fid.py), timing (bench.py): Ctrl-C gives one line
    and exit code 130, no traceback; a run folder that existed before is kept, with the command to continue."""
    import train
    import fid

    def ctrl_c(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(train.data, "load", ctrl_c)
    with pytest.raises(train.Interrupted, match=r"^interrupted \(Ctrl-C\) before anything was written"):
        train.main([*SMOKE, "--data-dir", str(data_dir), "--out", str(tmp_path / "new")])
    assert not (tmp_path / "new").exists()
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "treevae.pt").write_bytes(b"")                # a run folder from before: left as it was
    with pytest.raises(train.Interrupted, match=r"before anything was written; .*old is as it was$"):
        train.main([*SMOKE, "--data-dir", str(data_dir), "--out", str(tmp_path / "old"), "--resume"])
    assert os.listdir(tmp_path / "old") == ["treevae.pt"]
    monkeypatch.undo()

    def fit_then_ctrl_c(stage):                                   # a checkpoint written, then Ctrl-C twice
        (tmp_path / "run" / "treevae.pt").write_bytes(b"")
        raise KeyboardInterrupt
    monkeypatch.setattr(train.TreeStage, "fit", fit_then_ctrl_c)
    with pytest.raises(train.Interrupted, match=r"; \S+run keeps the checkpoints saved so far: continue with python "
                                                r"train.py .*--plan false --resume$"):
        train.main([*SMOKE, "--data-dir", str(data_dir), "--out", str(tmp_path / "run"), "--plan", "false"])
    monkeypatch.undo()
    monkeypatch.setattr(sample, "all_leaves", ctrl_c)
    proc = sample_cli(capsys, "--run", run, "--all-leaves", "--out", tmp_path / "new" / "a.png")
    assert proc.returncode == 130 and proc.stderr == "interrupted (Ctrl-C); no picture written by this call\n"
    assert not (tmp_path / "new").exists()                   # the picture's folder is made only when it is saved
    monkeypatch.setattr(fid, "offline_extractor", ctrl_c)      # training the extractor takes a minute or more
    with pytest.raises(SystemExit) as e:
        fid.main(["--run", str(run), "--cache-dir", str(tmp_path)])
    assert e.value.code == 130 and capsys.readouterr().err.splitlines()[-1] == "interrupted (Ctrl-C)"
    code, text = interrupt_when('"figure": "matmul_peak"', "bench.py", "--device", "cpu", "--only", "peak,data")
    assert code == 130 and text.splitlines()[-1] == "interrupted (Ctrl-C)" and "Traceback" not in text, text
