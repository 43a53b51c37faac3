"""Both stages data-parallel under torchrun (train.py's distributed section), on the CPU with Gloo and 2 processes:
the same weights as one process at the same global batch (float tolerance: the sums over processes round
differently), the whole smoke pipeline under `torchrun --nproc_per_node 2` (same tree as one process, checkpoints
that sample.py reads), and a 2-process run stopped and resumed, also by one process, ending where an uninterrupted
one does. Tiny data (tests/test_pipeline.py's synthetic digits); about a minute on 2 cores."""
import contextlib
import dataclasses
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import data
import ddpm
import train
import treevae
# data_dir: tests/test_pipeline.py's fixture (300 + 100 synthetic digits in MNIST's files)
from test_pipeline import ROOT, SMOKE, assert_identical, cli, data_dir, load, ok, sample_cli, synthetic_digits  # noqa: F401


# ----------------------------------------------------------------------------- in-process: steps against one process
def both_stages(out):
    """Stage 1 of the smoke preset on 64 synthetic digits (TreeStage.fit: init, a split chosen from the leaf
    probabilities, its subtree phase, the intermediate retraining, pruning, fine-tuning; 4 steps per phase at batch
    16), then 4 DDPM steps at batch 8 with dropout 0.3 (the masks are drawn for the global batch as well). Returns
    what must equal one process's: the tree's checkpoint, its growth log and the DDPM's weights and EMA."""
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    images = torch.from_numpy(synthetic_digits(80, 0)[0]).unsqueeze(1)               # (80, 1, 28, 28) uint8
    run = dataclasses.replace(train.RunConfig(), out=str(out), device="cpu", log_every=1000)
    cfg = treevae.treevae_config("mnist", "smoke")
    stage = train.TreeStage(run, cfg, torch.device("cpu"), contextlib.nullcontext, images[:64], images[64:])
    stage.fit()
    tv = stage.model
    dcfg = dataclasses.replace(ddpm.ddpm_config("mnist", "smoke", tv.n_leaves), dropout=0.3)
    train.train_ddpm(run, dcfg, tv, torch.device("cpu"), contextlib.nullcontext, images[:64])
    dm = torch.load(os.path.join(out, "ddpm.pt"), weights_only=True) if data.world()[0] == 0 else None
    return {"tree": tv.checkpoint(), "log": stage.st["log"], "ddpm": dm and {k: dm[k] for k in ("model", "ema")}}


def spawned(rank, K, folder, fn):
    """One of K processes (torch.multiprocessing.spawn): join the Gloo group through a file, run fn(folder/out),
    rank 0 saves the result."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=K)
    try:
        result = fn(os.path.join(folder, "out"))
        if rank == 0:
            torch.save(result, os.path.join(folder, "result.pt"))
    finally:
        dist.destroy_process_group()


def assert_close(a, b, where, atol=1e-4):
    """Nested equality, tensors to float tolerance (they are equal in one process up to summation order)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_close(a[k], b[k], f"{where}.{k}", atol)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for k, (u, v) in enumerate(zip(a, b)):
            assert_close(u, v, f"{where}[{k}]", atol)
    elif torch.is_tensor(a) and a.is_floating_point():
        assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=atol), \
            f"{where}: max difference {(a - b).abs().max():.3g}"
    elif torch.is_tensor(a):
        assert torch.equal(a, b), where
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def test_two_processes_train_as_one(tmp_path):
    """2 processes, each on half of every batch, end with one process's weights: the initial tree, a split chosen
    from broadcast leaf probabilities and its subtree, the whole schedule to fine-tuning, then DDPM steps."""
    one = both_stages(tmp_path / "one")
    mp.spawn(spawned, args=(2, str(tmp_path), both_stages), nprocs=2)
    two = torch.load(tmp_path / "result.pt", weights_only=True)
    assert two["log"] == one["log"]                                      # the same splits, counts and pruning
    assert_identical(two["tree"]["topology"], one["tree"]["topology"], "topology")
    assert_close(two["tree"]["state_dict"], one["tree"]["state_dict"], "treevae")   # incl. batch-norm statistics
    assert_close(two["ddpm"], one["ddpm"], "ddpm")                       # the U-Net and its EMA


def contrastive_terms(out):
    """CIFAR-10's two-view loss (the ELBO of both views and the contrastive terms: InfoNCE on a split's decisions,
    NT-Xent on every bottom-up level) of a fixed batch of 8 images, each process on its rows (eval mode: no batch
    statistics; the latents' noise drawn for the global batch), the loss and the parameters' gradients averaged
    over the processes as DDP does. Returns the contrastive term, the loss and the gradients."""
    torch.manual_seed(0)
    model = treevae.TreeVAE(treevae.treevae_config("cifar10", "smoke"))
    model.split(model.leaves[0])                                     # an inner node: its decisions enter InfoNCE
    model.eval()
    g = torch.Generator().manual_seed(1)
    x, x2 = torch.rand(8, 3, 32, 32, generator=g), torch.rand(8, 3, 32, 32, generator=g)
    torch.manual_seed(2)                                             # the same noise stream in every process
    out = model.infer(data.my_rows(x), data.my_rows(x2))[0]
    loss = model.loss(out, 0.5)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    K, loss = data.world()[1], loss.detach()
    for v in [loss, *grads.values()]:                                # DDP: the mean over the processes
        if K > 1:
            dist.all_reduce(v)
            v /= K
    return {"contrastive": out["contrastive"].detach(), "loss": loss, "grads": grads}


def test_contrastive_terms_use_the_global_batch(tmp_path):
    """Under 2 processes every image's negatives are the whole global batch's other images (data.all_views) and
    each view's latents get one process's noise (data.batch_random(views=True)), so the loss and the averaged
    gradients are one process's: not the mean of two half-batch contrastive losses."""
    one = contrastive_terms(None)
    mp.spawn(spawned, args=(2, str(tmp_path), contrastive_terms), nprocs=2)
    two = torch.load(tmp_path / "result.pt", weights_only=True)
    assert one["contrastive"] > 0 and len(one["grads"]) > 10
    assert_close(two, one, "contrastive")


def test_batch_must_split_into_equal_shards():
    """What K processes cannot do is one line before any work: a batch of 16 does not split into 3 shards."""
    run, tv_cfg = train.RunConfig(), treevae.treevae_config("mnist", "smoke")
    dcfg = ddpm.ddpm_config("mnist", "smoke")
    with pytest.raises(data.DataError, match="TreeVAE batch of 16 does not split into 3 equal shards"):
        train.check_processes(3, run, tv_cfg, dcfg)
    with pytest.raises(data.DataError, match="DDPM batch of 8 does not split into 3 .*resume with a number of"):
        train.check_processes(3, dataclasses.replace(run, resume=True), None, dcfg)
    train.check_processes(2, run, tv_cfg, dcfg)                          # 16 and 8 split into 2
    with pytest.raises(data.DataError, match="--graphs"):
        train.check_processes(2, dataclasses.replace(run, graphs=True), tv_cfg, dcfg)


# ----------------------------------------------------------------------------- train.py under torchrun
def torchrun(*args, nproc=2):
    """`torchrun --standalone --nproc_per_node nproc train.py args` (python -m torch.distributed.run, which is what
    the torchrun command runs) in the repository root, one thread per process; never raises on its exit code."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           "train.py", *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
    """The smoke pipeline four ways on the same data: one process; 2 processes uninterrupted; 2 processes stopped
    inside stage 1 (--max-steps 20: in the subtree phase) and resumed by 2 processes; the same stop resumed by one."""
    base = tmp_path_factory.mktemp("torchrun")
    args = [*SMOKE, "--data-dir", data_dir, "--plan", "false", "--sampler", "ddim"]   # figures: 5 DDIM steps
    one = ok(cli("train.py", *args, "--out", base / "one"))
    two = ok(torchrun(*args, "--out", base / "two"))
    p = ok(torchrun(*args, "--out", base / "stopped", "--max-steps", 20))
    assert "stopped in phase subtree" in p.stdout, p.stdout[-2000:]
    shutil.copytree(base / "stopped", base / "stopped_one")
    resumed = ok(torchrun(*args, "--out", base / "stopped", "--resume"))
    resumed_one = ok(cli("train.py", *args, "--out", base / "stopped_one", "--resume"))
    return base, {"one": one, "two": two, "resumed": resumed, "resumed_one": resumed_one}


def test_smoke_run_under_torchrun(runs, tmp_path, capsys):
    """The README's command on tiny data: rank 0 alone prints, the tree grows as in one process, and sample.py
    reads the checkpoints."""
    base, procs = runs
    out = procs["two"].stdout
    assert "torchrun: 2 processes (gloo), each training on 1/2 of every batch" in out, out[-2000:]
    assert out.count("[test] NMI") == 1 and out.count("wrote ") >= 2       # one process prints and writes
    a, b = load(base / "one" / "treevae.pt"), load(base / "two" / "treevae.pt")
    assert_identical(b["topology"], a["topology"], "topology")
    assert b["state"]["log"] == a["state"]["log"]                          # the same growth decisions
    for name in ("ddpm.pt", "metrics.json", "samples.png", "tree.png"):
        assert (base / "two" / name).is_file(), name
    ok(sample_cli(capsys, "--run", base / "two", "--n", 2, "--steps", 3, "--sampler", "ddim",
                  "--out", tmp_path / "s.png"))


def test_resume_under_torchrun(runs):
    """Stopped by --max-steps under torchrun and resumed: by 2 processes bit for bit as the uninterrupted 2-process
    run; by one process (another number of processes: the same global batches and noise) to float tolerance."""
    base, procs = runs
    assert "resumed" in procs["resumed"].stdout and "resumed" in procs["resumed_one"].stdout
    two, again = base / "two", base / "stopped"
    for name, keys in (("treevae.pt", ("topology", "state_dict", "state")), ("ddpm.pt", ("model", "ema", "state"))):
        a, b = load(two / name), load(again / name)
        for key in keys:
            assert_identical(b[key], a[key], f"{name}.{key}")
    a, b = load(two / "treevae.pt"), load(base / "stopped_one" / "treevae.pt")
    assert_identical(b["topology"], a["topology"], "topology")
    assert_close(b["state_dict"], a["state_dict"], "treevae")
    assert_close(load(base / "stopped_one" / "ddpm.pt")["ema"], load(two / "ddpm.pt")["ema"], "ema")
