"""Train Diffuse-TreeVAE: stage 1 grows a CNN-TreeVAE, stage 2 trains a DDPM conditioned on its leaves.

    python train.py --dataset mnist                      # both stages, the authors' schedule (--preset paper)
    python train.py --dataset fashion_mnist --preset fast --stage treevae
    python train.py --dataset mnist --resume             # continue an interrupted run where it stopped
    torchrun --nproc-per-node 8 train.py --dataset mnist # both stages data-parallel on 8 GPUs (several processes)

Stage 1 schedule (the authors' train/train_tree.py and configs/mnist.yml; every epoch count a config field):
    init          train root + 2 leaves for epochs_init
    repeat:       every `splits_per_retrain` splits, train the whole tree epochs_intermediate ('intermediate');
                  choose a leaf (treevae.choose_split); stop at the leaf budget or max depth;
                  split it and train only the new subtree on that leaf's samples for epochs_subtree ('subtree')
    prune         drop leaves with < 1 % of the training samples
    finetune      train the whole tree epochs_finetune
Every phase has a fresh Adam, a step learning-rate decay and the KL weight alpha = min(1, kl_start + epoch *
decay_kl) (the authors' AnnealKLCallback, restarted per phase as they do). Stage 2 (Goncalves et al.; the ddpm
section of configs/mnist.yml): the frozen TreeVAE reconstructs each image at every leaf, one leaf l ~ P(l|x) is
sampled per image, and the DDPM learns eps(x_t, t | x_hat^(l), l) by Algorithm 1 of Ho et al.

Order of this file: the run's configuration and its command line; the training plumbing both stages share
(checkpoint files, RNG state, the progress line, Ctrl-C); several processes under torchrun (the global batch's
shards, SyncBatchNorm, DDP); stage 1 (TrainStep: one step; TreeStage: the schedule); stage 2 (leaf conditioning,
train_ddpm); the planner (measured step times -> predicted hours); then main and the
reading and checking of what a call continues from. The model math lives in treevae.py and ddpm.py, the
figures and FID in sample.py and fid.py; this file only decides what runs when, and what is saved.

Run folder (default runs/<dataset>): treevae.pt, ddpm.pt (self-contained, written atomically at every epoch
end, every `ckpt_every` DDPM steps and on Ctrl-C), metrics.json, tree.png and sample grids. A checkpoint holds
the phase, epoch and batch reached, so --resume continues exactly (same batches, same RNG state). A fresh run
into a folder holding checkpoints refuses (--resume continues them, --overwrite replaces them); ddpm.pt,
metrics.json and samples.npz record the fingerprints of the weights they were made from, and a NaN/inf loss
stops training before it is saved over the last good checkpoint.
"""
import contextlib
import dataclasses
import inspect
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import ddpm
import sample
import treevae
from data import setting


@dataclass
class RunConfig:
    """How to run (not what to learn): data, run folder, stage, hardware, seeds, logging. The models' settings are
    treevae.TreeVAEConfig and ddpm.DDPMConfig; all three are saved in the checkpoints, so a run folder says how it
    was made and --resume needs no flags but --resume."""
    dataset: str = setting("mnist", "data set: mnist | fashion_mnist (or fashion-mnist, fmnist) | cifar10")
    data_dir: str = setting("data", "folder holding the data files, or its parent: DIR and DIR/<data set> "
                                    "are looked in, missing files are downloaded into DIR/<data set>")
    preset: str = setting("paper", "schedule and model size (treevae.treevae_config, ddpm.ddpm_config): paper (the "
                          "authors') | fast (~7x shorter) | cpu (fast's stage 1, a 1.2 M-parameter U-Net for 3,150 "
                          "steps and a 100-step sampler: both stages and the evaluation on a laptop) | smoke (tiny "
                          "models, for tests)", choices=("paper", "fast", "cpu", "smoke"))
    out: str = setting("", "run folder; default runs/<dataset>")
    stage: str = setting("all", "what to train: treevae (stage 1) | ddpm (stage 2, on the finished stage 1 in --out) "
                         "| all (both)", choices=("treevae", "ddpm", "all"))
    resume: bool = setting(False, "continue the run in --out where it stopped, with the configuration it saved")
    overwrite: bool = setting(False, "let a fresh run replace the checkpoints in --out (treevae.pt, ddpm.pt; "
                                     "without it a fresh run refuses a folder that holds them: --resume continues "
                                     "them, --overwrite trains afresh and removes the ddpm.pt of a replaced tree)")
    device: str = setting("auto", "auto (cuda, else mps, else cpu) | cpu | cuda | cuda:N | mps")
    threads: int = setting(0, "CPU threads of torch's kernels (torch.set_num_threads), set before any work; 0: "
                              "torch's choice (one per core; on a busy machine 1 can be much faster)", ge=0)
    compile: bool = setting(False, "torch.compile the models' forward (checkpoints keep clean keys)")
    precision: str = setting("auto", "auto (bf16 autocast on CUDA, fp32 elsewhere) | bf16 | fp32",
                             choices=("auto", "bf16", "fp32"))
    seed: int = setting(0, "seed of the weights, the batches and the sampling", ge=0)
    restarts: int = setting(1, "stage 1 this many times side by side (seeds seed, seed+1, ...), keeping the tree "
                               "with the lowest validation -ELBO (no labels involved)", ge=1)
    log_every: int = setting(50, "optimisation steps between progress lines (the only host syncs)", ge=1)
    ckpt_every: int = setting(2000, "DDPM steps between checkpoints (one is also written every epoch)", ge=1)
    graphs: bool = setting(False, "CUDA only: capture each TreeVAE training step as a CUDA graph")
    plan: bool = setting(True, "print the predicted wall time of every phase before training")
    max_steps: int = setting(0, "stop (saving a checkpoint) after this many optimisation steps in this call; "
                                "0: no limit", ge=0)
    fid_samples: int = setting(0, "evaluate at the end with this many images per row (sample.py --evaluate: FID of "
                                  "both stages, leaf specificity -> eval.json); 0: no evaluation (a covariance "
                                  "needs >= 2 images)", ge=2, off=0)
    # The DDIM settings of the figures and the FID are the DDPM's own (--ddpm-ddim-steps, --ddpm-ddim-eta): they
    # are saved in ddpm.pt, so sample.py defaults to the settings the run used; a second flag here would be a
    # second source of truth.
    sampler: str = setting("ddpm", "sampler of the figures and the evaluation: ddpm (the authors' ancestral "
                                   "sampler, T steps or T respaced to --ddpm-respace-steps) | ddim "
                                   "(--ddpm-ddim-steps steps)", choices=("ddpm", "ddim"))


class Stop(Exception):
    """Raised to end a call early (max_steps or Ctrl-C) after the checkpoint is written. `code` is the exit status:
    0 when --max-steps ended the call (it did what was asked), 130 after a Ctrl-C (as for SIGINT), so that
    `python train.py ... && python sample.py ...` does not go on with an unfinished run."""
    def __init__(self, message, code=0):
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------------------------------------------------------
# Configuration: one dataclass per stage, flags generated from the fields.

def preset_defaults(make):
    """{field: default text} of a stage config: make(dataset, preset)'s value for mnist and the paper preset, then
    where another preset (on mnist) or data set (with the paper preset) differs, e.g. '150 (fast 24, smoke 1)'."""
    base = make("mnist", "paper")
    variants = [(p, make("mnist", p)) for p in ("fast", "cpu", "smoke")] + \
               [(d, make(d, "paper")) for d in ("fashion_mnist", "cifar10")]
    out = {}
    for f in dataclasses.fields(base):
        v = getattr(base, f.name)
        other = [f"{label} {data.flag_text(getattr(c, f.name))}" for label, c in variants if getattr(c, f.name) != v]
        out[f.name] = data.flag_text(v) + (f" ({', '.join(other)})" if other else "")
    return out


def parser():
    """train.py's command line: one flag per user setting of RunConfig, TreeVAEConfig and DDPMConfig."""
    p = data.Parser(prog="train.py", usage="python train.py [--dataset NAME] [--preset paper|fast|cpu|smoke] "
                    "[--stage treevae|ddpm|all] [--resume] [options]",
                    description="Train Diffuse-TreeVAE (stage 1 TreeVAE, stage 2 leaf-conditioned DDPM).\n"
                    "Every option has a default; the --treevae-* and --ddpm-* ones override the preset's value.")
    data.add_flags(p.add_argument_group("the run"), RunConfig)
    data.add_flags(p.add_argument_group("stage 1, the TreeVAE (treevae.TreeVAEConfig)"), treevae.TreeVAEConfig,
                   "treevae-", preset_defaults(treevae.treevae_config))
    dcfg_defaults = preset_defaults(ddpm.ddpm_config)
    dcfg_defaults["n_leaves"] = "the tree's leaf count"                 # ddpm_config's 0 is filled in by main
    data.add_flags(p.add_argument_group("stage 2, the DDPM (ddpm.DDPMConfig)"), ddpm.DDPMConfig, "ddpm-",
                   dcfg_defaults)
    return p


def parse_args(argv=None):
    """(RunConfig, TreeVAEConfig, {DDPMConfig field: value given}) of a command line. Every value is checked here,
    before any time is spent: ranges and choices by the parser, the DDPM's noise schedule by ddpm.check."""
    args = parser().parse_args(argv)
    run = RunConfig(**data.overrides(args, RunConfig))
    run.dataset = data.canonical_name(run.dataset)
    run.out = run.out or os.path.join("runs", run.dataset)
    # A stage config is the preset's, then the flags given on top (only those: None means "keep the preset's").
    tv_cfg = dataclasses.replace(treevae.treevae_config(run.dataset, run.preset),
                                 **data.overrides(args, treevae.TreeVAEConfig, "treevae-"))
    # The DDPM's config is completed later (its leaf count is the grown tree's), so only the overrides are kept.
    ddpm_overrides = data.overrides(args, ddpm.DDPMConfig, "ddpm-")
    ddpm.check(dataclasses.replace(ddpm.ddpm_config(run.dataset, run.preset), **ddpm_overrides))
    return run, tv_cfg, ddpm_overrides


# ---------------------------------------------------------------------------------------------------------------
# Training plumbing shared by both stages: checkpoint files, RNG state, the progress line, divergence, Ctrl-C.
# (The device and precision block is data.setup_device, shared with sample.py and bench.py.)

def save_atomic(obj, path):
    """Write to a temporary name and rename, so an interrupted save never leaves a broken checkpoint."""
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_state():
    """Every random stream a resumed run must continue: torch's CPU generator (batch order, noise on the CPU) and
    each GPU's. Saved in every checkpoint, so --resume draws the same numbers an uninterrupted run would. With
    several processes it is rank 0's, equal to every process's (the same draws), but for the GPUs: process r draws
    on cuda:r, so "cuda" holds rank 0's advanced cuda:0 stream and the untouched others."""
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    """Restore rng_state()'s streams (the GPU ones only where a GPU is visible: a CUDA run resumes on a CPU too).
    With several processes, each one's GPU continues the stream that training advanced (see rng_state)."""
    torch.set_rng_state(state["cpu"].cpu())   # a checkpoint loaded onto the GPU moves it
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
        if data.world()[1] > 1:               # rank 0 trained on cuda:0 (LOCAL_RANK 0): its stream is everyone's
            torch.cuda.set_rng_state(state["cuda"][0].cpu())   # on this process's device (start_processes)


class Progress:
    """A progress line every `every` steps: phase, epoch/step, loss terms, images/s and ETA of the phase. It is
    also where a diverged loss (NaN or inf) stops training, before the state is saved over `ckpt`: a check costs a
    host sync, and this line is the only one. A NaN between two lines costs at most `every` wasted steps (and the
    steps since the last save, as a crash would); the save guards (check_weights) catch one that arises after the
    last line."""
    def __init__(self, every, ckpt="the checkpoint", remedy=""):
        # ckpt, remedy: named in the divergence error (which file is kept, what to do instead of resuming)
        self.every, self.t0, self.seen, self.ckpt, self.remedy = every, time.time(), 0, ckpt, remedy

    def start(self):
        """Restart the clock: rates and ETAs are per phase, not since the process began."""
        self.t0, self.seen = time.time(), 0

    def __call__(self, tag, step, total, batch, terms):
        self.seen += batch
        if step % self.every and step != total:
            return
        dt = max(time.time() - self.t0, 1e-9)
        # ETA from the mean rate so far: step times are steady within a phase (fixed shapes, fixed tree)
        eta = (total - step) * dt / max(step, 1) if step else 0.0
        terms = mean_over_processes(terms)                    # several processes: the global batch's figures
        values = {k: float(v) for k, v in terms.items()}                   # the host sync happens only here
        loss = " ".join(f"{k} {v:.3f}" for k, v in values.items())
        print(f"{tag} step {step}/{total} | {loss} | {self.seen / dt:.0f} img/s | ETA {eta / 60:.1f} min",
              flush=True)
        bad = [k for k, v in values.items() if not math.isfinite(v)]
        if bad:
            raise data.NonFiniteError(f"{tag} step {step}: the {bad[0]} became {values[bad[0]]} (training "
                                      f"diverged); stopped before saving it over {self.ckpt}; {self.remedy}")


def check_weights(tensors, path, remedy):
    """Before every checkpoint write: a state dict holding NaN or inf (a divergence after the last progress line)
    is never saved over the last good checkpoint at path. One host sync per save."""
    name = data.nonfinite_tensor(tensors)
    if name:
        raise data.NonFiniteError(f"the weight {name} became NaN or inf (training diverged); stopped before "
                                  f"saving it over {path}; {remedy}")


def diverged_remedy(stage):
    """What to do after a divergence: resuming replays the same batches and random numbers, so start afresh."""
    flags, lr = ("--stage ddpm --overwrite", "--ddpm-lr") if stage == "ddpm" else ("--overwrite", "--treevae-lr")
    return f"resuming would repeat the same steps: start this stage afresh ({flags}) with a lower {lr} or another --seed"


class Interrupt:
    """While training, Ctrl-C sets a flag that the training loops check after every step, so the checkpoint is
    written at a step boundary (a second Ctrl-C aborts at once). restore() gives Ctrl-C back its plain meaning
    (KeyboardInterrupt: main's one-line message) for what follows training: figures, FID."""
    def __init__(self):
        self.requested = False
        self.previous = signal.signal(signal.SIGINT, self.handler)

    def handler(self, *_):
        # Only a flag: saving inside a signal handler could write a half-updated model (mid optimiser step).
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: saving a checkpoint at the end of this step (press again to abort without saving)")

    def restore(self):
        signal.signal(signal.SIGINT, self.previous)


# ---------------------------------------------------------------------------------------------------------------
# Several processes (torchrun): both stages data-parallel, with one process's results at the same global batch.
#
# `torchrun --nproc_per_node K train.py ...` starts K copies of this script (RANK, LOCAL_RANK, WORLD_SIZE and the
# rendezvous address in their environment); start_processes joins them into one process group: NCCL between GPUs
# (one per process, cuda:LOCAL_RANK), Gloo on CPUs. A plain `python train.py` has no WORLD_SIZE and starts nothing.
# - The global batch: every process seeds the same (run.seed), so it draws the same epoch permutation (data.Batches),
#   forms the same global batch of B images and keeps rows r b .. (r + 1) b - 1, b = B / K (data.my_rows): K
#   disjoint shards that cover the batch. A process's loss is its shard's mean, and DistributedDataParallel averages
#   the gradients over the processes during backward: (1/K) sum_r grad(mean over shard r) = grad(mean over the
#   batch), the one-process gradient (which is why B must divide by K: equal shards).
# - Batch norm: a TreeVAE batch norm normalises by its batch's mean and variance, so per-shard statistics would
#   change the model and its gradients with K. SyncBatchNorm (below) sums every layer's statistics over the
#   processes and normalises by the global batch's, as one process does. (The DDPM's GroupNorm is per image.)
# - Randomness: the processes keep one RNG state between them; the noise (the TreeVAE's eps, the DDPM's t, eps and
#   dropout masks, the leaf l ~ P(l|x), CIFAR-10's augmentations) is drawn for the whole global batch and each
#   process keeps its rows (data.batch_random), so every image gets the numbers it gets in one process,
#   reproducibly per rank, and the run does not depend on K up to the rounding of the sums over processes.
# - Identical weights: the processes start from the same weights (same seed; DDP also broadcasts rank 0's) and apply
#   the same averaged gradients with the same Adam, so the weights, the DDPM's EMA (an average of identical weights)
#   and the batch-norm statistics (from the same global sums) stay identical everywhere without being sent.
# - Growth decisions: the training set's leaf probabilities are computed once, on rank 0, and broadcast
#   (TreeStage.leaf_probs); the split choice and pruning are deterministic functions of them, hence identical.
# - Rank 0 alone prints and writes checkpoints, metrics and figures. A checkpoint holds every process's state (they
#   are equal), so --resume loads it on every process, with any K that divides the batch sizes.

CPU_GROUP = None    # the process group of the per-step stop flag (any_rank), set by start_processes


def start_processes(run):
    """Join torchrun's process group when this is one of K > 1 processes (WORLD_SIZE); returns K. Sets run.device
    to the process's own GPU (cuda:LOCAL_RANK) on CUDA; ranks > 0 print nothing (their stdout goes to devnull)."""
    K = int(os.environ.get("WORLD_SIZE", "1"))
    if K == 1:
        return 1
    dev = data.device(run.device)
    if dev.type == "mps":
        raise data.DataError("torchrun needs --device cuda (NCCL) or --device cpu (Gloo), not mps")
    if dev.type == "cuda":
        run.device = f"cuda:{os.environ['LOCAL_RANK']}"          # one GPU per process on each node
        torch.cuda.set_device(torch.device(run.device))
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    global CPU_GROUP    # the per-step stop flag is a CPU integer: a Gloo group beside NCCL, so it costs no GPU sync
    CPU_GROUP = dist.new_group(backend="gloo") if dev.type == "cuda" else dist.group.WORLD
    if dist.get_rank():
        sys.stdout = open(os.devnull, "w")
    return K


def check_processes(K, run, tv_cfg, dcfg):
    """A one-line error, before any work, for what K processes cannot do: a batch that does not split into K equal
    shards (the averaged gradient is the batch's only for equal shards), CUDA graphs (they cannot capture the
    all-reduce), --restarts (each restart is its own run). dcfg: the DDPM config stage 2 will train, or None."""
    for name, cfg, flag in (("TreeVAE", tv_cfg, "--treevae-batch-size"), ("DDPM", dcfg, "--ddpm-batch-size")):
        if cfg is not None and cfg.batch_size % K:
            how = f"resume with a number of processes that divides {cfg.batch_size}" if run.resume else \
                f"use a number of processes that divides it, or a {flag} that {K} divides"
            raise data.DataError(f"the {name} batch of {cfg.batch_size} does not split into {K} equal shards, one "
                                 f"per process: {how}")
    if run.graphs:
        raise data.DataError("--graphs cannot capture the all-reduce of several processes: drop it under torchrun")
    if run.restarts > 1:
        raise data.DataError("--restarts runs its restarts as processes of its own: drop it under torchrun, or run "
                             "the restarts with plain python")


class SumOverProcesses(torch.autograd.Function):
    """y = sum over the processes of x (an all-reduce), differentiable: d y / d x_r = 1 for every process's y, so the
    gradient of x_r is the sum of the processes' output gradients, again an all-reduce."""

    @staticmethod
    def forward(ctx, x):
        y = x.clone()
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class SyncBatchNorm:
    """Batch norm over the global batch: in training, each layer's per-channel sums of x and x^2 and the count of
    this process's shard are summed over the processes (one all-reduce of 2C + 1 numbers forward, one backward:
    SumOverProcesses), which gives the mean and biased variance one process computes over the whole batch, and the
    same running statistics. In eval mode, or with one process, it is nn.BatchNorm. Ours, not torch.nn.SyncBatchNorm: that one refuses CPU tensors, and the tests compare the
    CPU path with one process. sync_batchnorm makes a model's BatchNorm1d/2d layers into these in place."""

    def forward(self, x):                                 # x (B, C) or (B, C, H, W)
        if not self.training or data.world()[1] == 1:
            return super().forward(x)
        C, dims, shape = x.shape[1], [0, *range(2, x.dim())], (1, -1) + (1,) * (x.dim() - 2)
        # The sums are taken of x - c, c the running mean (the same on every process): E[(x-c)^2] - E[x-c]^2 then
        # keeps its digits where the mean is large beside the spread.
        c = self.running_mean.clone()
        xc = x.float() - c.view(shape)
        n = xc.new_full((1,), xc.numel() // C)
        sums = SumOverProcesses.apply(torch.cat([xc.sum(dims), (xc * xc).sum(dims), n]))   # (2C + 1,)
        N, mean_c = sums[-1], sums[:C] / sums[-1]
        var = sums[C:2 * C] / N - mean_c ** 2                                      # (C,) biased, as BatchNorm
        with torch.no_grad():                    # as nn.BatchNorm: momentum, the unbiased variance
            self.num_batches_tracked += 1
            m = self.momentum if self.momentum is not None else 1 / float(self.num_batches_tracked)
            self.running_mean.lerp_(c + mean_c, m)
            self.running_var.lerp_(var * N / (N - 1), m)
        y = (xc - mean_c.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        return (y * self.weight.view(shape) + self.bias.view(shape)).to(x.dtype)


class SyncBatchNorm1d(SyncBatchNorm, nn.BatchNorm1d):
    pass


class SyncBatchNorm2d(SyncBatchNorm, nn.BatchNorm2d):
    pass


def sync_batchnorm(model):
    """With several processes, turn model's BatchNorm1d/2d layers into SyncBatchNorm ones in place (same parameters,
    buffers and state-dict keys, so checkpoints do not change); layers a split adds later are turned at the next
    phase. Returns model."""
    if data.world()[1] > 1:
        for m in model.modules():
            if type(m) in (nn.BatchNorm1d, nn.BatchNorm2d):
                m.__class__ = SyncBatchNorm1d if type(m) is nn.BatchNorm1d else SyncBatchNorm2d
    return model


def data_parallel(model, device):
    """model in DistributedDataParallel with several processes (its gradients are averaged over the processes during
    backward), else model itself. Buffers are not broadcast before every forward: the batch-norm statistics are
    equal on every process already (SyncBatchNorm)."""
    if data.world()[1] == 1:
        return model
    # the flag's name since torch 2.13 (broadcast_buffers, older, still works there but warns)
    quiet = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters else \
        "broadcast_buffers"
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, **{quiet: False})


def any_rank(flag):
    """True on every process when flag is on any: Ctrl-C reaches the processes at slightly different steps, and all
    must stop after the same one (a process that went on would wait forever in the next all-reduce). One integer
    over the CPU group every step, a few microseconds; no GPU sync."""
    if data.world()[1] == 1:
        return flag
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=CPU_GROUP)
    return bool(t)


def mean_over_processes(terms):
    """{name: number or device tensor} averaged over the processes (the printed loss is the global batch's mean,
    and a NaN on any process stops all of them at the same line); unchanged with one process."""
    K = data.world()[1]
    if K == 1:
        return terms
    dev = next(v.device for v in terms.values() if torch.is_tensor(v))
    vec = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=dev).reshape(()) for v in terms.values()])
    dist.all_reduce(vec)
    return dict(zip(terms, (vec / K).tolist()))


def rank0_first(fn):
    """fn() on rank 0, then on the other processes: rank 0 may download the data files that the others then find.
    The others' notes on stderr are dropped: rank 0 has said them."""
    rank, K = data.world()
    if not rank:
        out = fn()
        if K > 1:
            dist.barrier()
        return out
    dist.barrier()
    with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
        return fn()


def allreduce_bytes(model, params):
    """Bytes all-reduced per training step with several processes (bench.py reports them): the float32 gradients of
    `params` (DDP's buckets) and, for each batch norm in training mode, its 2C + 1 statistics in the forward pass and
    their gradients in the backward pass (SyncBatchNorm). Each process sends and receives about 2 (K - 1)/K times
    this in a ring all-reduce."""
    bn = sum(2 * (2 * m.num_features + 1) * 4 for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training)
    return sum(p.numel() * p.element_size() for p in params) + bn


# ---------------------------------------------------------------------------------------------------------------
# Stage 1: grow the TreeVAE

class TrainStep:
    """One TreeVAE optimisation step: forward, the negative ELBO (TreeVAE.loss), backward, Adam. Returns (loss, rec)
    as device tensors, so the loop never waits for the GPU. Options: torch.compile of the forward (`compile`), and on CUDA the whole
    step captured once as a CUDA graph (`graphs`) and replayed: the tree's ~1,000 small kernels then cost one
    launch. Captured steps need static shapes, so the last partial batch is dropped (Batches does that)."""

    def __init__(self, model, params, cfg, device, autocast, compile=False, graphs=False, decode=None):
        self.model, self.cfg, self.autocast, self.decode = model, cfg, autocast, decode
        cuda = device.type == "cuda"
        self.graphs = graphs and cuda and not cfg.contrastive    # augmentation is random per call: eager
        # fused Adam: one multi-tensor kernel (CPU and CUDA); capturable keeps its step counter on the device
        self.opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True,
                                    capturable=self.graphs)
        # A captured graph already removes the launch overhead that compiling would save: compile only eager steps.
        # With several processes the forward runs in DistributedDataParallel (gradients averaged over processes).
        net = data_parallel(model, device)
        self.forward = torch.compile(net) if compile and not self.graphs else net
        self.alpha = torch.zeros((), device=device)             # a tensor, so a captured graph reads its value
        self.graph, self.warm = None, 0

    def set_lr(self, lr):
        """The step decay's learning rate (the authors' StepLR), set only when it changes: a change re-captures."""
        if any(g["lr"] != lr for g in self.opt.param_groups):
            for g in self.opt.param_groups:
                g["lr"] = lr
            self.graph = None                                   # the learning rate is baked into a captured step

    def eager(self, x, x2=None):
        """The step itself; the gradients were zeroed by the caller (outside a captured graph's region)."""
        with self.autocast():
            out = self.forward(x, x2, decode=self.decode)
        loss = self.model.loss(out, self.alpha)         # in float32: the model casts its outputs up under autocast
        loss.backward()
        self.opt.step()
        return loss.detach(), out["rec"].detach()

    def __call__(self, x, alpha, x2=None):
        """One step on the batch x (B, C, H, W) in [0, 1] with KL weight alpha; returns (loss, rec) tensors. With
        several processes x is the global batch and each process steps on its shard (data.my_rows)."""
        self.alpha.fill_(alpha)
        if self.cfg.contrastive:                                # CIFAR-10: two augmented views (cifar10.yml)
            x, x2 = data.augment(x), data.my_rows(data.augment(x))   # the global batch's draws, as one process
        x = data.my_rows(x)
        if not self.graphs:
            self.opt.zero_grad(set_to_none=True)
            return self.eager(x, x2)
        if self.graph is None and self.warm < 3:                # CUDA graphs need warm-up steps on a side stream
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.opt.zero_grad(set_to_none=True)
                result = self.eager(x)
            torch.cuda.current_stream().wait_stream(side)
            self.warm += 1
            return result
        if self.graph is None:                                  # capture (PyTorch's whole-network recipe)
            self.static_x = x.clone()
            self.opt.zero_grad(set_to_none=True)
            self.graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(self.graph):
                    self.static_out = self.eager(self.static_x)
            except RuntimeError as e:                           # e.g. an op that syncs: say so, stay eager
                print(f"warning: CUDA graph capture failed ({str(e).splitlines()[0]}); running eagerly")
                self.graphs, self.graph = False, None
                torch.cuda.synchronize()
                self.opt.zero_grad(set_to_none=True)
                return self.eager(x)
        self.static_x.copy_(x)                                  # a replay reads its inputs from fixed memory
        self.graph.replay()
        return self.static_out


class TreeStage:
    """The TreeVAE schedule as a small state machine, so that any point of it can be saved and resumed.
    State `st`: the phase (init, grow, subtree, intermediate, finetune, done), its epoch and batch, the split count,
    the node being split and its samples, and the growth log; all plain data, saved in treevae.pt."""

    def __init__(self, run, cfg, device, autocast, train, val, val_labels=None):
        self.run, self.cfg, self.device, self.autocast = run, cfg, device, autocast
        self.train_images, self.val_images = train, val
        self.val_labels = val_labels          # only printed (validation NMI), never used for training
        self.path = os.path.join(run.out, "treevae.pt")
        self.model, self.opt, self.steps_this_call = treevae.TreeVAE(cfg).to(device), None, 0
        self.st = {"phase": "init", "phase_idx": 0, "epoch": 0, "step": 0, "splits": 0, "retrained_at": 0,
                   "node": -1, "members": torch.zeros(0, dtype=torch.long), "log": [], "total_steps": 0}

    # -- checkpoint --------------------------------------------------------------------------------------------
    def save(self):
        """treevae.pt: the model's self-contained checkpoint plus the schedule state, RNG, run config, optimiser."""
        if data.world()[0]:                                    # rank 0 writes; the others hold the same state
            return
        check_weights(self.model.state_dict(), self.path, diverged_remedy("treevae"))
        ckpt = self.model.checkpoint()
        ckpt.update(state=self.st, rng=rng_state(), run=dataclasses.asdict(self.run),
                    optimizer=self.opt.state_dict() if self.opt is not None else None)
        save_atomic(ckpt, self.path)

    def load(self, ckpt, verb="resumed"):
        """Continue from a treevae.pt dict; the optimiser state waits for train_phase, which builds the optimiser."""
        self.model = treevae.TreeVAE.from_checkpoint(ckpt).to(self.device)
        self.st, self.pending_opt = ckpt["state"], ckpt["optimizer"]
        set_rng_state(ckpt["rng"])
        st = self.st
        print(f"{verb} {self.path}: phase {st['phase']}, epoch {st['epoch']}, batch {st['step']}, "
              f"{self.model.n_leaves} leaves, {st['total_steps']} steps done")

    # -- one phase of training ---------------------------------------------------------------------------------
    def train_phase(self, tag, epochs, images, params, decode=None):
        """Train `params` for `epochs` on `images` (from the saved epoch and batch on), saving at every epoch end; a
        fresh Adam per phase, as the authors' code builds one per training call. decode: see TreeVAE.forward."""
        cfg, st, run = self.cfg, self.st, self.run
        sync_batchnorm(self.model)                             # several processes: global-batch statistics
        self.step = TrainStep(self.model, params, cfg, self.device, self.autocast, run.compile, run.graphs, decode)
        self.opt = self.step.opt
        if getattr(self, "pending_opt", None):                 # resuming inside this phase
            self.opt.load_state_dict(self.pending_opt)
        self.pending_opt = None
        # a seed per phase: the batch order of any phase is reproducible alone, which makes --resume exact
        batches = data.Batches(images, None, min(cfg.batch_size, len(images)), self.device,
                               seed=run.seed * 1000 + st["phase_idx"])
        progress = Progress(run.log_every, self.path, diverged_remedy("treevae"))
        total = epochs * len(batches)
        for epoch in range(st["epoch"], epochs):
            # KL annealing, restarted every phase; the final fine-tuning ramps alpha to 1 over its epochs, as the
            # authors' code does (decay max(0.01, 1 / (epochs - 1))), so the finished model optimises the true ELBO
            ramp = st["phase"] == "finetune" and cfg.finetune_kl_ramp
            decay = max(0.01, 1 / max(1, epochs - 1)) if ramp else cfg.decay_kl
            alpha = min(1.0, cfg.kl_start + epoch * decay)
            self.step.set_lr(cfg.lr * cfg.lr_gamma ** (epoch // cfg.lr_decay_every))   # step decay
            for x, _ in batches.epoch(epoch, start=st["step"]):
                loss, rec = self.step(x, alpha)
                st["step"] += 1
                st["total_steps"] += 1
                self.steps_this_call += 1
                progress(f"[{tag}] epoch {epoch + 1}/{epochs}", epoch * len(batches) + st["step"], total, len(x),
                         {"loss": loss, "rec": rec, "alpha": alpha})
                if any_rank(self.interrupt.requested) or run.max_steps and self.steps_this_call >= run.max_steps:
                    self.save()
                    raise Stop(f"stopped in phase {st['phase']} at epoch {epoch}, batch {st['step']}; "
                               f"continue with --resume", code=130 if self.interrupt.requested else 0)
            st["epoch"], st["step"] = epoch + 1, 0
            self.save()
        self.opt = self.step = None

    # -- the schedule ------------------------------------------------------------------------------------------
    def next_phase(self, phase):
        """Enter `phase` at epoch 0 and save: a phase boundary is always a resumable point."""
        self.st.update(phase=phase, phase_idx=self.st["phase_idx"] + 1, epoch=0, step=0)
        self.save()

    def leaf_probs(self, images):
        """P(l|x) for a whole image set, deterministic (eval mode, no decoders needed). With several processes rank
        0 computes them and broadcasts them, so every growth decision made from them is the same everywhere."""
        self.model.eval()
        rank, K = data.world()
        probs = torch.empty(len(images), self.model.n_leaves, device=self.device)        # (N, n_leaves)
        if not rank:
            with torch.no_grad():
                for k, (x, _) in enumerate(data.Batches(images, None, 1024, self.device, shuffle=False,
                                                        drop_last=False).epoch(0)):
                    probs[k * 1024:k * 1024 + len(x)] = self.model(x, sample=False, decode=[])["leaf_probs"]
        if K > 1:
            dist.broadcast(probs, 0)
        return data.check_finite(probs, f"the leaf probabilities of the tree in {self.path}",
                                 diverged_remedy("treevae"))

    def log(self, msg):
        """Print a growth decision and keep it in the state: metrics.json's growth_log tells how the tree grew."""
        self.st["log"].append(msg)
        print(msg, flush=True)

    def fit(self):
        """Run the schedule from wherever the state says (a fresh "init" or a resumed phase) to "done"; every phase
        change is saved, so an interruption resumes at the phase, epoch and batch it reached."""
        cfg, st, model = self.cfg, self.st, self.model
        self.interrupt = Interrupt()                   # Ctrl-C saves at the next step boundary while fitting
        while st["phase"] != "done":
            model = self.model
            if st["phase"] == "init":
                model.train_all()
                self.train_phase("init", cfg.epochs_init, self.train_images, list(model.parameters()))
                self.validate("init")
                self.next_phase("grow")
            elif st["phase"] == "grow":
                self.grow()
            elif st["phase"] == "subtree":
                params = model.train_subtree(st["node"])
                kids = model.child_ids[st["node"]]
                self.train_phase(f"subtree {st['splits'] + 1}", cfg.epochs_subtree,
                                 self.train_images[st["members"]], params, decode=kids)
                st["splits"] += 1
                self.validate(f"subtree {st['splits']}")
                self.next_phase("grow")
            elif st["phase"] == "intermediate":
                model.train_all()
                self.train_phase("intermediate", cfg.epochs_intermediate, self.train_images, list(model.parameters()))
                self.validate("intermediate")
                st["retrained_at"] = st["splits"]
                self.next_phase("grow")
            elif st["phase"] == "finetune":
                model.train_all()
                self.train_phase("finetune", cfg.epochs_finetune, self.train_images, list(model.parameters()))
                self.validate("finetune")
                self.next_phase("done")
        self.interrupt.restore()
        self.model.eval()
        return self.model

    def grow(self):
        """One growing decision (the authors' train/train_tree.py): after every `splits_per_retrain` splits first
        retrain the whole tree; else split the leaf choose_split picks and train its subtree next, or, when growth
        stops, prune and go on to fine-tuning."""
        cfg, st, model = self.cfg, self.st, self.model
        if st["splits"] and st["splits"] % cfg.splits_per_retrain == 0 and st["retrained_at"] != st["splits"]:
            self.next_phase("intermediate")
            return
        probs = self.leaf_probs(self.train_images)                      # (N, n_leaves)
        # "one batch" in the authors' sense: the images a step feeds the model, both views on CIFAR-10 (their 256 =
        # our 128 images x 2 views), so a leaf needs as many samples as theirs before it splits
        leaf, msg, members = treevae.choose_split(model, probs, cfg.batch_size * (2 if cfg.contrastive else 1))
        if st["splits"] >= 150:                        # the authors' cap on growing iterations (train_tree.py)
            leaf, msg = None, "stop: 150 splits"
        self.log(f"[grow] {msg}")
        if leaf is None:                               # prune by hard (argmax) assignment, as the authors
            counts = torch.bincount(probs.argmax(1), minlength=model.n_leaves)
            pruned = model.prune(counts.tolist(), cfg.prune_threshold)
            self.log(f"[prune] removed leaves {pruned} (< {cfg.prune_threshold:.0%} of the samples); "
                     f"{model.n_leaves} leaves remain")
            self.next_phase("finetune")
            return
        model.split(leaf)
        model.to(self.device)                          # the new children's modules were built on the CPU
        st.update(node=leaf, members=members.nonzero().squeeze(1).cpu())
        self.next_phase("subtree")

    @torch.no_grad()
    def validate(self, tag):
        """Negative ELBO (alpha = 1) on the validation split, with the RNG forked so resuming stays exact."""
        self.model.eval()
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            terms = {}
            for x, _ in data.Batches(self.val_images, None, 1024, self.device, shuffle=False,
                                     drop_last=False).epoch(0):
                out = self.model(x)
                for k in ("rec", "kl_root", "kl_nodes", "kl_decisions"):
                    terms[k] = terms.get(k, 0.0) + float(out[k]) * len(x) / len(self.val_images)
        nmi = ""
        if self.val_labels is not None and len(self.val_images):   # labels for monitoring only
            pred = self.leaf_probs(self.val_images).argmax(1).cpu()
            nmi = f" | NMI {treevae.nmi(pred, self.val_labels):.3f}"
        self.st["val_elbo"] = elbo = sum(terms.values())            # the restarts' selection criterion
        print(f"[{tag}] validation: -ELBO {elbo:.2f} | " +
              " ".join(f"{k} {v:.2f}" for k, v in terms.items()) + f" | {self.model.n_leaves} leaves{nmi}", flush=True)
        data.check_finite(torch.tensor(elbo), f"[{tag}] the validation -ELBO of the tree in {self.path}",
                          diverged_remedy("treevae"))
        self.model.train_all()


def evaluate_clustering(model, images, labels, device, source="the tree"):
    """Hard clusters argmax_l P(l|x) on held-out images -> NMI, accuracy, leaf and dendrogram purity, and each
    leaf's majority label (None for an empty leaf; sample.plot_tree writes it under the leaf). NaN probabilities
    (argmax would pick them as the largest) raise NonFiniteError naming `source`."""
    model.eval()                                  # posterior means, frozen batch norms: deterministic clusters
    preds = []
    with torch.no_grad():
        for x, _ in data.Batches(images, None, 1024, device, shuffle=False, drop_last=False).epoch(0):
            probs = data.check_finite(model(x, sample=False, decode=[])["leaf_probs"],
                                      f"the leaf probabilities of {source}", "retrain it")
            preds.append(probs.argmax(1).cpu())
    pred = torch.cat(preds)
    n = treevae.contingency(pred, labels)                     # (leaves up to the last one used, classes)
    majority = [int(n[k].argmax()) if k < len(n) and n[k].sum() > 0 else None for k in range(model.n_leaves)]
    return {**treevae.cluster_metrics(model, pred, labels), "leaf_majority": majority}


# ---------------------------------------------------------------------------------------------------------------
# Stage 2: the leaf-conditioned DDPM on top of the frozen TreeVAE

@torch.no_grad()
def leaf_reconstructions(tv, images, device, batch=1024):
    """Every leaf's reconstruction x_hat^(l) of every image and P(l|x): ((N, L, C, H, W) in [0, 1], (N, L)).
    The stage-1 model is frozen and deterministic (eval mode, posterior means), so computing these once before the
    DDPM trains gives exactly the per-step values; per step, the ~1,000 small TreeVAE kernels made a GPU step 4.6x
    slower than the U-Net alone (measured on an H100: 961 img/s against 4,432). Memory: N x L images in float32
    (1.7 GB for full MNIST and 10 leaves)."""
    x_hat_all = probs_all = None
    for k, (x, _) in enumerate(data.Batches(images, None, batch, device, shuffle=False, drop_last=False).epoch(0)):
        x_hat, probs = tv.reconstruct(x)
        if x_hat_all is None:                    # filled in place: no second copy at the peak
            x_hat_all = x_hat.new_empty((len(images), *x_hat.shape[1:]))
            probs_all = probs.new_empty((len(images), probs.shape[1]), dtype=torch.float32)
        x_hat_all[k * batch: k * batch + len(x)], probs_all[k * batch: k * batch + len(x)] = x_hat, probs
    return x_hat_all, probs_all


def leaf_condition(x_hat, leaf_probs):
    """Goncalves et al.'s conditioning: one leaf l ~ P(l|x) per image (sampled, not the argmax, so that every leaf
    learns from the images it partly explains) and that leaf's reconstruction, from leaf_reconstructions' rows of the
    batch: x_hat (B, L, C, H, W) in [0, 1], leaf_probs (B, L) -> (x_hat^(l) in [-1, 1] (B, C, H, W), l (B,))."""
    # clamp: a probability of -1e-8 from rounding would make multinomial refuse the row
    leaf = torch.multinomial(leaf_probs.clamp(min=0), 1).squeeze(1)         # (B,)
    return x_hat[torch.arange(len(leaf), device=leaf.device), leaf] * 2 - 1, leaf


def ddpm_models(dcfg, tv, device, ckpt=None):
    """The U-Net, its EMA, the Diffusion and the optimiser of stage 2, with the state {epoch, step, global_step}
    and treevae_id, the fingerprint of the stage-1 weights they are conditioned on: fresh, or those of ckpt."""
    unet = ddpm.UNet(dcfg).to(device)
    if device.type == "cuda":                  # channels-last convolutions are the fast layout for cuDNN in bf16
        unet = unet.to(memory_format=torch.channels_last)
    ema, diffusion, opt = ddpm.EMA(unet, dcfg.ema_decay), ddpm.Diffusion(dcfg).to(device), ddpm.make_optimizer(unet, dcfg)
    st = {"epoch": 0, "step": 0, "global_step": 0}
    tv_id = data.fingerprint(tv.state_dict())    # which stage-1 weights this DDPM is conditioned on
    if ckpt is not None:
        unet.load_state_dict(ckpt["model"]), ema.model.load_state_dict(ckpt["ema"]), opt.load_state_dict(ckpt["optimizer"])
        st, tv_id = ckpt["state"], ckpt["treevae_id"]       # a checkpoint's provenance is never rewritten
        set_rng_state(ckpt["rng"])
    return unet, ema, diffusion, opt, st, tv_id


def train_ddpm(run, dcfg, tv, device, autocast, train_images, ckpt=None):
    """Stage 2 on the frozen tree tv (Algorithm 1 of Ho et al. with the leaf conditioning of leaf_condition);
    ckpt: the ddpm.pt to continue (read and checked against tv by run_stages). Returns the EMA U-Net. (~50 lines:
    the loop and its three save points, epoch end, every ckpt_every steps, a stop, read best in one piece.)"""
    path = os.path.join(run.out, "ddpm.pt")
    tv.eval().requires_grad_(False)
    unet, ema, diffusion, opt, st, tv_id = ddpm_models(dcfg, tv, device, ckpt)
    if ckpt is not None:
        print(f"resumed {path}: epoch {st['epoch']}, batch {st['step']}, {st['global_step']} steps done")
    print(f"DDPM: {sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M parameters, {tv.n_leaves} leaves")
    remedy = diverged_remedy("ddpm")

    def save():
        if data.world()[0]:                                    # rank 0 writes; the others hold the same state
            return
        check_weights({**unet.state_dict(), **{"ema." + k: v for k, v in ema.model.state_dict().items()}}, path,
                      remedy)
        save_atomic({"version": treevae.VERSION, "config": dataclasses.asdict(dcfg), "model": unet.state_dict(),
                     "ema": ema.model.state_dict(), "optimizer": opt.state_dict(), "state": st, "rng": rng_state(),
                     "n_leaves": tv.n_leaves, "treevae_id": tv_id, "run": dataclasses.asdict(run)}, path)

    # compile the forward only: the checkpoint saves unet's own state dict, whose keys compiling (and DDP, with
    # several processes) would prefix
    net = data_parallel(unet, device)
    net = torch.compile(net) if run.compile else net
    x_hat_all, probs_all = leaf_reconstructions(tv, train_images, device)      # (N, L, C, H, W), (N, L)
    # Batches hands out each batch's rows as its "labels": they index the precomputed conditioning above
    index = torch.arange(len(train_images))
    batches = data.Batches(train_images, index, min(dcfg.batch_size, len(train_images)), device,
                           seed=run.seed * 1000 + 999)
    total = dcfg.epochs * len(batches)
    total = min(total, dcfg.max_steps) if dcfg.max_steps else total       # the config's own step budget
    progress, steps_this_call, interrupt = Progress(run.log_every, path, remedy), 0, Interrupt()
    unet.train()
    for epoch in range(st["epoch"], dcfg.epochs):
        for x, rows in batches.epoch(epoch, start=st["step"]):
            if st["global_step"] >= total:
                break
            cond, leaf = leaf_condition(x_hat_all[rows], probs_all[rows])
            # several processes: x, rows are the global batch (the leaves drawn for all of it, as one process does);
            # each process trains on its shard
            x, cond, leaf = data.my_rows(x), data.my_rows(cond), data.my_rows(leaf)
            with autocast():
                loss = ddpm.train_step(net, ema, diffusion, opt, x * 2 - 1, cond if dcfg.cond_image else None,
                                       leaf if dcfg.n_leaves else None, dcfg, st["global_step"])
            st["step"] += 1
            st["global_step"] += 1
            steps_this_call += 1
            progress(f"[ddpm] epoch {epoch + 1}/{dcfg.epochs}", st["global_step"], total, len(rows),
                     {"loss": loss})
            if st["global_step"] % run.ckpt_every == 0:
                save()
            if any_rank(interrupt.requested) or run.max_steps and steps_this_call >= run.max_steps:
                save()
                raise Stop(f"stopped the DDPM at epoch {epoch}, batch {st['step']}; continue with --resume",
                           code=130 if interrupt.requested else 0)
        st["epoch"], st["step"] = epoch + 1, 0
        save()
    save()
    interrupt.restore()
    return ema.model


# ---------------------------------------------------------------------------------------------------------------
# Planner: measured step times x the preset's epochs = predicted wall time, printed before training starts.

def timed(fn, device, repeat, warmup=2):
    """Seconds per call of fn: (median, min, max) over `repeat` calls after `warmup`, device synchronised."""
    # CUDA runs asynchronously: without a sync the clock would time the kernel launches, not the work.
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):                     # first calls pay for allocation, autotuning, compilation
        fn()
    sync()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2], min(times), max(times)   # min/max: timing_warning's spread test


def grown_tree(cfg, n_leaves, device):
    """A tree of n_leaves leaves grown breadth-first (10 leaves -> depth 4), the shape after growing."""
    model = treevae.TreeVAE(cfg)
    while model.n_leaves < n_leaves:            # split the shallowest leaf: a balanced tree, as growth tends to be
        model.split(min(model.leaves, key=lambda l: (model.depth[l], l)))
    return model.to(device)


def plan(tv_cfg, dcfg, n_train, device, autocast, compile=False, graphs=False, repeat=3, tree=True,
         sample_steps=None, fid_samples=0, n_leaves=None, procs=1):
    """Predict each phase's wall time from measured step times (RNG forked: training is unaffected).
    tree=False plans stage 2 only; dcfg=None plans stage 1 only. The end-of-run figures (make_figures: 64 samples
    and 4 per leaf) and FID sample with sample_steps U-Net calls per image (default T: the ancestral sampler).
    n_leaves: the stage-2 tree's leaf count when it exists already (default: the leaf budget max_leaves).
    On a CPU, step times that contradict each other or vary wildly between repeats add timing_warning's line.
    procs: the number of processes training together (torchrun), each on 1/procs of every batch: the training
    phases take 1/procs of one process's time, an optimistic figure (the all-reduce is not timed, and a smaller
    batch may use a GPU less well); the figures are rank 0's alone. Returns {phase: seconds}."""
    what = " and ".join(["TreeVAE"] * tree + ["DDPM"] * (dcfg is not None))
    print(f"planning: timing a few {what} steps on {device} to predict each phase's duration (seconds to ~2 min "
          f"on a CPU; --plan false skips this)", flush=True)
    times = {}                                      # label -> (median, min, max) seconds, for timing_warning
    L, phases, steps = n_leaves or tv_cfg.max_leaves, {}, []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        shape = (tv_cfg.batch_size, tv_cfg.in_channels, tv_cfg.image_size, tv_cfg.image_size)
        x = torch.rand(shape, device=device)
        if tree:
            steps += _plan_tree(phases, times, tv_cfg, n_train, L, x, device, autocast, compile, graphs, repeat)
        if dcfg is not None:                       # one DDPM step, with the TreeVAE leaf reconstructions it needs
            steps += _plan_ddpm(phases, times, tv_cfg, dcfg, n_train, L, shape, device, autocast, repeat,
                                sample_steps, fid_samples)
    phases = {k: v if k == "figures" else v / procs for k, v in phases.items()}
    total = sum(phases.values())
    print("plan: " + " | ".join(f"{k} {v / 60:.1f} min" for k, v in phases.items()) +
          f" | total {total / 3600:.2f} h on {device} (steps: {', '.join(steps)})" +
          (f" | training divided by {procs} processes (all-reduce not timed; bench.py gives its bytes per step)"
           if procs > 1 else ""), flush=True)
    # Pairs (a, b) where a step a does a subset of step b's work (the 2-leaf tree and a subtree step are parts of
    # the L-leaf step; sampling is the training step's forward pass alone), so a must not take longer than b.
    # "subtree slower than 2 leaves" is no such pair: on a GPU, and for CIFAR-10 on a CPU, it is the normal case.
    faster = [(a, f"{L}-leaf") for a in ("2-leaf", "subtree") if L > 2] + [("sampling", "DDPM training")]
    warning = timing_warning(times, faster, torch.get_num_threads()) if device.type == "cpu" else None
    if warning:
        print(warning, flush=True)
    return phases


def _plan_tree(phases, times, tv_cfg, n_train, L, x, device, autocast, compile, graphs, repeat):
    """plan's stage 1: times a 2-leaf, an L-leaf and a subtree step on the images x, fills phases (seconds of the
    init, subtree, intermediate and finetune phases) and times; returns the step-time texts of the plan line."""
    B = tv_cfg.batch_size

    def tree_step(label, n_leaves, subtree=False):
        model = grown_tree(tv_cfg, n_leaves, device)
        node = model.leaves[-1]
        if subtree:
            model.split(node)
            params, decode = model.to(device).train_subtree(node), model.child_ids[node]
        else:
            params, decode = list(model.train_all().parameters()), None
        step = TrainStep(model, params, tv_cfg, device, autocast, compile, graphs, decode)
        times[label] = timed(lambda: step(x, 0.5), device, repeat, warmup=5)
        return times[label][0]
    t2, tL, t_sub = tree_step("2-leaf", 2), tree_step(f"{L}-leaf", L), tree_step("subtree", L - 1, True)
    t_at = lambda leaves: t2 + (tL - t2) * (leaves - 2) / max(L - 2, 1)   # linear in the leaf count
    spe, splits = n_train // B, L - 2                                     # steps per epoch, splits to L leaves
    phases.update({"init": tv_cfg.epochs_init * spe * t2,
                   # the k-th split trains on ~1/k of the data: a leaf of a k-leaf tree holds about that share
                   "subtrees": sum(tv_cfg.epochs_subtree * (n_train / k // B) * t_sub for k in range(2, L)),
                   "intermediate": sum(tv_cfg.epochs_intermediate * spe * t_at(2 + j * tv_cfg.splits_per_retrain)
                                       for j in range(1, splits // tv_cfg.splits_per_retrain + 1)),
                   "finetune": tv_cfg.epochs_finetune * spe * tL})
    return [f"2 leaves {t2 * 1e3:.1f} ms", f"{L} leaves {tL * 1e3:.1f} ms", f"subtree {t_sub * 1e3:.1f} ms at batch {B}"]


def _plan_ddpm(phases, times, tv_cfg, dcfg, n_train, L, shape, device, autocast, repeat, sample_steps, fid_samples):
    """plan's stage 2: times a DDPM training step (with an L-leaf tree's reconstructions) and a sampling call,
    fills phases ("ddpm", "figures": the end-of-run figures and FID) and times; returns the plan line's text."""
    tv = grown_tree(tv_cfg, L, device).eval()
    unet = ddpm.UNet(dataclasses.replace(dcfg, n_leaves=L)).to(device)
    ema, diffusion, opt = ddpm.EMA(unet, dcfg.ema_decay), ddpm.Diffusion(dcfg).to(device), ddpm.make_optimizer(unet, dcfg)
    b = dcfg.batch_size if device.type == "cuda" else min(dcfg.batch_size, 32)   # CPU: time 32, scale up
    xd = torch.rand(b, *shape[1:], device=device)
    x_hat_d, probs_d = tv.reconstruct(xd)             # computed once per data set (leaf_reconstructions)
    t_rec = timed(lambda: tv.reconstruct(xd), device, repeat, warmup=1)[0]

    def ddpm_step():
        cond, leaf = leaf_condition(x_hat_d, probs_d.float())
        with autocast():
            ddpm.train_step(unet, ema, diffusion, opt, xd * 2 - 1, cond, leaf, dcfg, 10 ** 6)
    times["DDPM training"] = timed(ddpm_step, device, repeat, warmup=1)          # at batch b
    t_ddpm = times["DDPM training"][0] * dcfg.batch_size / b
    n_steps = dcfg.epochs * (n_train // dcfg.batch_size)
    n_steps = min(n_steps, dcfg.max_steps) if dcfg.max_steps else n_steps
    phases["ddpm"] = n_steps * t_ddpm + n_train / b * t_rec
    cond, leaf = leaf_condition(x_hat_d, probs_d.float())
    t_idx = torch.full((b,), dcfg.T // 2, dtype=torch.long, device=device)

    @torch.no_grad()
    def reverse_step():
        with autocast():
            ema.model(xd * 2 - 1, t_idx, cond, leaf)
    times["sampling"] = timed(reverse_step, device, repeat, warmup=1)           # at batch b
    t_rev = times["sampling"][0]
    # the evaluation refines ~3 N images: N generations, those whose argmax leaf is not the drawn one, and up to
    # N test reconstructions (sample.evaluate)
    phases["figures"] = (64 + 4 * L + 3 * fid_samples) / b * (sample_steps or dcfg.T) * t_rev
    return [f"DDPM {t_ddpm * 1e3:.1f} ms at batch {dcfg.batch_size} with {L} leaf conditions, "
            f"sampling {t_rev * 1e3:.1f} ms per call at batch {b}"]


def timing_warning(times, faster, threads):
    """One line saying what to try when measured step times contradict each other or vary wildly between
    repeats (on a CPU the sign of oversubscription: torch's threads compete with another busy process or with
    each other, and a step then takes 4-70x longer, at random), else None.
    times: {label: (median, min, max) seconds}, as timed() returns them; faster: (a, b) label pairs where step a
    does less work than step b; threads: torch's CPU thread count, named in the advice.
    Contradiction: a's median over 1.5x b's (healthy 2-core runs: 2-leaf / 10-leaf 0.4, 2-leaf / 3-leaf 1.1).
    Wild: a step's slowest repeat over 3x its fastest and over 50 ms apart (healthy: within 15 %, docs/performance.md)."""
    ms = lambda t: f"{t * 1e3:,.0f} ms"
    why = [f"a {a} step took {ms(times[a][0])}, longer than a {b} step ({ms(times[b][0])})"
           for a, b in faster if a in times and b in times and times[a][0] > 1.5 * times[b][0]]
    why += [f"repeats of the {k} step took {ms(lo)} to {ms(hi)}" for k, (_, lo, hi) in times.items()
            if hi > 3 * lo and hi - lo > 0.05]
    if not why:
        return None
    return (f"warning: implausible step times ({'; '.join(why)}): the CPU is probably "
            f"oversubscribed (another busy process, or {threads} torch threads for fewer free cores), so this "
            f"plan is unreliable and training would crawl; try --threads 1 (or OMP_NUM_THREADS=1), or close the "
            f"other process")


LONG_RUN_H = 3     # hours: about what one sits through in a working session. Longer is an overnight or multi-day
                   # job, whose quicker alternatives a user should see before starting it. On 2 CPU cores the `fast`
                   # TreeVAE stage (10 min on the MNIST subset, ~1 h on full MNIST) stays below; the paper preset
                   # (100-700 h) and any DDPM stage on a full data set (tens of hours) are far above.
TREE_PHASES = {"init": "epochs_init", "subtrees": "epochs_subtree", "intermediate": "epochs_intermediate",
               "finetune": "epochs_finetune"}     # the planner's stage-1 phases and the epochs each scales with


def long_run_warning(phases, run, tv_cfg, dcfg, device):
    """One prominent line when a run planned off a CUDA GPU (phases: plan()'s seconds per phase) takes longer than
    LONG_RUN_H hours: the planned time and the quicker alternatives with their time on this machine (a phase takes
    time in proportion to its epochs; the `fast` preset keeps the architecture, so the same step times hold);
    else None. Nothing is refused: training starts after it."""
    total = sum(phases.values()) / 3600
    if device.type == "cuda" or total <= LONG_RUN_H:
        return None
    hours = lambda sec: f"{sec / 3600:.1f} h" if sec < 36000 else f"{sec / 3600:,.0f} h"
    stage1 = sum(v for k, v in phases.items() if k in TREE_PHASES)
    quicker = []
    if run.preset == "paper":                       # the same phases with the `fast` preset's epochs
        tv_fast, ratio = treevae.treevae_config(run.dataset, "fast"), lambda a, b: a / b if b else 0.0
        fast1 = sum(v * ratio(getattr(tv_fast, TREE_PHASES[k]), getattr(tv_cfg, TREE_PHASES[k]))
                    for k, v in phases.items() if k in TREE_PHASES)
        fast2 = phases.get("ddpm", 0) * ratio(ddpm.PRESETS["fast"].epochs, dcfg.epochs) if dcfg else 0.0
        quicker.append(f"--preset fast ({hours(fast1 + fast2 + phases.get('figures', 0))} here)")
    if run.stage == "all" and stage1:
        quicker.append(f"--stage treevae (stage 1 alone: {hours(stage1)}" +
                       (f"; {hours(fast1)} with --preset fast)" if run.preset == "paper" else ")"))
    quicker.append("a CUDA GPU (hours rather than days for the paper preset)")
    return (f"*** long run: {hours(total * 3600)} planned on {device.type}, over {LONG_RUN_H} h. Quicker: "
            f"{', '.join(quicker[:-1]) + ' or ' if len(quicker) > 1 else ''}{quicker[-1]}. Starting anyway "
            f"(Ctrl-C stops it with a checkpoint, --resume continues) ***")


# ---------------------------------------------------------------------------------------------------------------

def fit_restarts(run, argv):
    """Stage 1 `run.restarts` times as child processes side by side (seeds seed, seed + 1, ...; each on its share of
    the CPU threads, --threads or torch's count; folders <out>/restart_<k>, logs beside them), then keep the tree
    with the lowest validation -ELBO at the end of fine-tuning. On the MNIST subset's `fast` runs this criterion
    ranked six runs exactly as their test NMI did (README, Results). Returns a summary for metrics.json; the chosen
    treevae.pt is copied to <out>."""
    # Processes, not threads: each restart is a full train.py call (its own checkpoint, --resume works per restart),
    # and the threads are divided so that the restarts do not oversubscribe the cores together.
    threads = max(1, torch.get_num_threads() // run.restarts)
    procs, outs = [], [os.path.join(run.out, f"restart_{k}") for k in range(run.restarts)]
    for k, out_k in enumerate(outs):
        cmd = [sys.executable, os.path.abspath(__file__), *argv, "--restarts", "1", "--seed", str(run.seed + k),
               "--out", out_k, "--stage", "treevae", "--plan", "false", "--fid-samples", "0",
               "--threads", str(threads)]                  # overrides a --threads in argv: the share, not all
        log = open(out_k + ".log", "a")
        print(f"[restarts] {k}: seed {run.seed + k} -> {out_k} (log {out_k}.log, {threads} thread(s))", flush=True)
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                      env={**os.environ, "OMP_NUM_THREADS": str(threads)}))
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:                    # the children got the Ctrl-C too: let them save, then stop
        codes = [p.wait() for p in procs]
        raise Stop("stopped the restarts; continue with --resume", code=130)
    results = []
    for k, (code, out_k) in enumerate(zip(codes, outs)):
        path = os.path.join(out_k, "treevae.pt")
        st = read_treevae(run, path)["state"] if os.path.exists(path) else {}
        if code != 0 or st.get("phase") != "done":
            raise Stop(f"restart {k} did not finish (exit code {code}; see {out_k}.log); continue with --resume",
                       code=code if code in (0, 130) else 1)      # 0: its --max-steps ended it, as asked
        m = os.path.join(out_k, "metrics.json")                        # reported, never used to choose
        nmi = data.read_json(m, f"delete it (see {out_k}.log)")["treevae"]["nmi"] if os.path.exists(m) else None
        results.append({"restart": k, "seed": run.seed + k, "val_elbo": st["val_elbo"], "test_nmi": nmi})
    best = min(results, key=lambda r: r["val_elbo"])
    shutil.copyfile(os.path.join(outs[best["restart"]], "treevae.pt"), os.path.join(run.out, "treevae.pt"))
    print("[restarts] validation -ELBO " + ", ".join(f"{r['restart']}: {r['val_elbo']:.2f}" for r in results) +
          f"; keeping restart {best['restart']} (seed {best['seed']})", flush=True)
    return {"chosen": best["restart"], "runs": results}


def refuse_overwrite(run, tv_path, ddpm_path):
    """A fresh call (no --resume) never silently replaces a run: the checkpoints it would write over (and, for
    stage 1, a ddpm.pt that the new tree would leave stale) stop it with the remedies, unless --overwrite. Called
    before anything is read or trained."""
    if run.resume and run.overwrite:
        raise data.DataError("--resume continues the checkpoints that --overwrite would replace: give one of them")
    if run.resume:
        return
    # stage 2 alone replaces only ddpm.pt; stage 1 replaces the tree, which leaves any ddpm.pt (and the restarts'
    # trees) describing another tree
    paths = [ddpm_path] if run.stage == "ddpm" else [tv_path, ddpm_path] + \
        [os.path.join(run.out, f"restart_{k}", "treevae.pt") for k in range(run.restarts if run.restarts > 1 else 0)]
    found = [p for p in paths if os.path.exists(p)]
    if found and not run.overwrite:
        raise data.DataError(f"{', '.join(found)} from an earlier run would be replaced (or left stale) by this "
                             f"fresh run: continue that run with --resume, replace it with --overwrite, or choose "
                             f"another --out")


def read_treevae(run, path):
    """treevae.pt as saved (tensors on the CPU), or a one-line error: unreadable, NaN/inf weights, other version."""
    afresh = f"train stage 1 afresh with {data.train_command(run, '--stage treevae --overwrite')}"
    ckpt = data.read_checkpoint(path, f"put back a good copy, or {afresh}", finite=("state_dict",))
    if ckpt.get("version") != treevae.VERSION:
        raise data.DataError(f"{path} comes from an incompatible version of this code (checkpoint version "
                             f"{ckpt.get('version')}, this code reads {treevae.VERSION}): {afresh}")
    return ckpt


def read_ddpm(run, path, tv_ckpt, tv_path):
    """ddpm.pt to continue on the tree of tv_ckpt, or a one-line error: unreadable, NaN/inf weights, or trained on
    another tree (resuming it would stamp the old DDPM with the new tree's fingerprint)."""
    afresh = f"to train stage 2 afresh on this tree, move {path} away or run " + \
        data.train_command(run, "--stage ddpm --overwrite")
    ckpt = data.read_checkpoint(path, f"put back a good copy; {afresh}", finite=("model", "ema"))
    # The tree is rebuilt only to compare fingerprints; its weight initialisation must not move the seeded RNG.
    with torch.random.fork_rng(devices=[]):
        tv = treevae.TreeVAE.from_checkpoint(tv_ckpt) if tv_ckpt is not None else None
    problem = sample.stage2_mismatch(ckpt, tv, tv_path)
    if problem:
        raise data.DataError(f"{path} {problem}, so it cannot be resumed on this tree; {afresh}")
    return ckpt


def finished_stage1(run, tv_path, tv_ckpt):
    """tv_ckpt (loaded from tv_path, None if absent) if it is the finished stage 1 that stage 2 and the figures
    need, else a one-line error saying how to make it."""
    if tv_ckpt is None:
        raise data.DataError(f"no {tv_path}: train stage 1 first ({data.train_command(run, '--stage treevae')})")
    if tv_ckpt["state"]["phase"] != "done":
        raise data.DataError(f"{tv_path} is an unfinished stage 1: run "
                             f"{data.train_command(run, '--stage treevae --resume')}")
    return tv_ckpt


def stage1_metrics(model, log, test_images, test_labels, device, tv_path):
    """metrics.json's 'treevae' section: the test-split clustering figures of this tree (printed), its growth log,
    and its fingerprint (treevae_id: a reader can tell metrics of another tree)."""
    m = {**evaluate_clustering(model, test_images, test_labels, device, source=tv_path), "split": "test",
         "growth_log": log, "treevae_id": data.fingerprint(model.state_dict())}
    print(f"[test] NMI {m['nmi']:.3f} | accuracy {m['acc']:.3f} | leaf purity {m['leaf_purity']:.3f} | "
          f"dendrogram purity {m['dendrogram_purity']:.3f} | {m['n_leaves']} leaves, sizes {m['leaf_sizes']}")
    return m


class Interrupted(Exception):
    """Ctrl-C where no checkpoint is due (loading data, planning, figures, FID) or pressed twice in training:
    one line saying what was kept and how to continue (the script exits with code 130, as for SIGINT)."""


def main(argv=None):
    """train.py's command line: parse and check every flag (one `error:` line before any work), then run_stages in
    the run folder. A Ctrl-C outside a checkpointed step becomes one line (Interrupted) saying what was kept; a
    folder this call made and left empty is removed again (data.new_folder)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    run, tv_cfg, ddpm_overrides = parse_args(argv)
    if run.threads:
        torch.set_num_threads(run.threads)              # --threads: before any work (default: torch's choice)
    try:
        if start_processes(run) > 1:                    # under torchrun: join the other processes
            print(f"torchrun: {dist.get_world_size()} processes ({dist.get_backend()}), each training on 1/"
                  f"{dist.get_world_size()} of every batch; rank 0 prints and writes")
        _main(run, tv_cfg, ddpm_overrides, argv)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _main(run, tv_cfg, ddpm_overrides, argv):
    """main's body, inside the process group of torchrun's processes if there is one."""
    # The run folder's files and times before this call: after a Ctrl-C they tell whether anything was written.
    files = lambda: {e.name: e.stat().st_mtime_ns for e in os.scandir(run.out)} if os.path.isdir(run.out) else {}
    before, ctrl_c = files(), signal.getsignal(signal.SIGINT)   # Ctrl-C is restored at the end, whatever the
    try:                                                        # training loops installed
        # removed again if this call ends (error, Ctrl-C) before writing there; rank 0 alone makes it and writes
        with data.new_folder(run.out) if not data.world()[0] else contextlib.nullcontext():
            run_stages(run, tv_cfg, ddpm_overrides, argv)
    except KeyboardInterrupt:
        if files() == before:
            raise Interrupted("interrupted (Ctrl-C) before anything was written; " +
                              (f"{run.out} is as it was" if before else "nothing to clean up")) from None
        again = f"python train.py {shlex.join(argv)}" + ("" if run.resume else " --resume")
        raise Interrupted(f"interrupted (Ctrl-C); {run.out} keeps the checkpoints saved so far: continue with "
                          f"{again}") from None
    finally:
        signal.signal(signal.SIGINT, ctrl_c)


def run_stages(run, tv_cfg, ddpm_overrides, argv):
    """Both stages (or the one run.stage asks for), then the figures and FID: what one call of train.py does, in
    its run folder (made by main). Everything a call continues from is read and checked before any training."""
    tv_path, ddpm_path, metrics_path = (os.path.join(run.out, f) for f in ("treevae.pt", "ddpm.pt", "metrics.json"))
    refuse_overwrite(run, tv_path, ddpm_path)          # before anything is read or trained
    torch.manual_seed(run.seed)
    device, autocast = data.setup_device(run.device, run.precision)
    (images, labels), (test_images, test_labels) = rank0_first(lambda: [data.load(run.dataset, split, run.data_dir)
                                                                       for split in ("train", "test")])
    lead, K = data.world()[0] == 0, data.world()[1]     # rank 0 writes (and with one process, it is rank 0)
    # What this call continues from, read and checked before any training or timing: a damaged file, NaN weights
    # or a ddpm.pt trained on another tree is one line (and the files stay as they are).
    fresh1 = not run.resume and run.stage != "ddpm"     # stage 1 from scratch: the old files are not needed
    tv_ckpt = read_treevae(run, tv_path) if not fresh1 and os.path.exists(tv_path) else None
    if run.resume and tv_ckpt is not None:              # a resumed run keeps the schedule it was started with
        tv_cfg = resumed_config(run, tv_ckpt, tv_path)
    # The validation split: a fixed 10 % of the training split (seed 0 whatever --seed), never the test set.
    train_idx, val_idx = data.train_val_split(len(images), tv_cfg.val_fraction, seed=0)
    print(f"run: {json.dumps(dataclasses.asdict(run))}\ntreevae: {json.dumps(dataclasses.asdict(tv_cfg))}")
    print(f"data: {run.dataset} {len(train_idx)} train / {len(val_idx)} validation / {len(test_images)} test, "
          f"device {device}" + (f", {torch.get_num_threads()} thread(s)" if device.type == "cpu" else ""))
    if run.stage == "ddpm":                             # stage 2 alone: say what is missing before any timing
        finished_stage1(run, tv_path, tv_ckpt)
    dm_ckpt = read_ddpm(run, ddpm_path, tv_ckpt, tv_path) if run.resume and run.stage != "treevae" and \
        os.path.exists(ddpm_path) else None
    metrics = data.read_json(metrics_path, "move it away (this run writes a new one)") \
        if os.path.exists(metrics_path) and not fresh1 else {}
    if K > 1:                                           # what K processes cannot do, before any work
        dcfg = None if run.stage == "treevae" else ddpm.DDPMConfig(**dm_ckpt["config"]) if dm_ckpt else \
            dataclasses.replace(ddpm.ddpm_config(run.dataset, run.preset), **ddpm_overrides)
        check_processes(K, run, tv_cfg if run.stage != "ddpm" else None, dcfg)
    if run.plan and not run.resume and lead:
        print_plan(run, tv_cfg, ddpm_overrides, tv_ckpt, len(train_idx), device, autocast)
    stage1 = TreeStage(run, tv_cfg, device, autocast, images[train_idx], images[val_idx], labels[val_idx])
    if run.stage in ("treevae", "all"):
        restarts = run_stage1(run, stage1, tv_path, ddpm_path, fresh1, tv_ckpt, argv)
        if lead:
            metrics["treevae"] = stage1_metrics(stage1.model, stage1.st["log"], test_images, test_labels, device,
                                                tv_path)
            if restarts:
                metrics["treevae"]["restarts"] = restarts
            data.write_json(metrics_path, metrics)
        if K > 1:
            dist.barrier()                              # treevae.pt is written before the others read it
    if run.stage != "ddpm":                             # stage 1 ran above: read the checkpoint it wrote
        tv_ckpt = finished_stage1(run, tv_path, read_treevae(run, tv_path))
    tv = treevae.TreeVAE.from_checkpoint(tv_ckpt).to(device)
    if run.stage in ("ddpm", "all"):
        run_stage2(run, tv, tv_ckpt, dm_ckpt, ddpm_overrides, metrics, images[train_idx], test_images, test_labels,
                   device, autocast, tv_path, metrics_path)
    if not lead:                                        # the figures and the evaluation are rank 0's
        return
    # The figures (tree.png and the sample grids) and the evaluation come from sample.py. Sampler steps: those
    # saved in ddpm.pt (--ddpm-respace-steps, --ddpm-ddim-steps, --ddpm-ddim-eta), as sample.py's defaults.
    sample.make_figures(run.out, device=device, metrics=metrics, sampler=run.sampler)
    data.write_json(metrics_path, metrics)
    print(f"wrote {metrics_path}")
    if run.fid_samples:                                 # eval.json: sample.py --run <out> --evaluate --n N
        sample.evaluate(run.out, run.fid_samples, device=device, data_dir=run.data_dir, sampler=run.sampler)


def resumed_config(run, tv_ckpt, tv_path):
    """The TreeVAE configuration a resumed run continues with: the one saved in tv_ckpt, which must be of
    run.dataset (the tree learnt that data, whatever the image shape)."""
    tv_cfg = treevae.TreeVAE.from_checkpoint(tv_ckpt).cfg
    if tv_cfg.dataset != run.dataset:
        raise data.DataError(f"{tv_path} was trained on {tv_cfg.dataset}, not {run.dataset}: resume it with "
                             f"--dataset {tv_cfg.dataset}, or give another --out")
    print(f"--resume: using the TreeVAE configuration saved in {tv_path}")
    return tv_cfg


def print_plan(run, tv_cfg, ddpm_overrides, tv_ckpt, n_train, device, autocast):
    """The planner's lines before a fresh call trains: each phase's predicted time and, off a GPU, the long-run
    warning with its quicker alternatives. Stage 2 alone is planned on the saved tree (its leaf count)."""
    saved = treevae.TreeVAE.from_checkpoint(tv_ckpt) if run.stage == "ddpm" else None   # stage 2's tree
    dcfg_plan = None if run.stage == "treevae" else dataclasses.replace(   # the U-Net the run will train
        ddpm.ddpm_config(run.dataset, run.preset, tv_cfg.max_leaves), **ddpm_overrides)
    K = data.world()[1]
    with data.alone():                   # timed by rank 0 alone, as one process; then divided by the processes
        phases = plan(saved.cfg if saved else tv_cfg, dcfg_plan, n_train, device, autocast, run.compile,
                      run.graphs, tree=run.stage != "ddpm", fid_samples=run.fid_samples,
                      sample_steps=None if dcfg_plan is None else min(dcfg_plan.ddim_steps, dcfg_plan.T)
                      if run.sampler == "ddim" else dcfg_plan.respace_steps or None,
                      n_leaves=saved.n_leaves if saved else None, procs=K)
    warning = long_run_warning(phases, run, tv_cfg, dcfg_plan, device)
    if warning:
        print(warning, flush=True)


def run_stage1(run, stage1, tv_path, ddpm_path, fresh1, tv_ckpt, argv):
    """Stage 1 into tv_path: fit stage1 (resumed from tv_ckpt with --resume), or run --restarts copies side by side
    and load the chosen one. Returns the restarts' summary for metrics.json, or None."""
    if fresh1 and os.path.exists(ddpm_path) and not data.world()[0]:   # --overwrite: it belongs to the old tree
        os.remove(ddpm_path)
        print(f"--overwrite: removed {ddpm_path} (trained on the stage 1 that this run replaces)")
    if run.restarts > 1:                             # the chosen restart becomes this run's stage 1
        restarts = fit_restarts(run, argv)
        stage1.load(read_treevae(run, tv_path), verb="loaded the chosen")
        return restarts
    if run.resume and tv_ckpt is not None:
        stage1.load(tv_ckpt)
    elif run.resume:
        print(f"--resume: no {tv_path} yet, starting stage 1 from scratch")
    stage1.fit()
    return None


def run_stage2(run, tv, tv_ckpt, dm_ckpt, ddpm_overrides, metrics, train_images, test_images, test_labels, device,
               autocast, tv_path, metrics_path):
    """Stage 2 on the finished tree tv: metrics.json's stage-1 section made to describe tv first (the figures
    label the leaves with it), then the DDPM, fresh or continued from dm_ckpt."""
    tv_id, section = data.fingerprint(tv.state_dict()), metrics.get("treevae")
    # absent, or of another tree: this one's (rank 0's to compute, print and save)
    if not data.world()[0] and (section is None or section.get("treevae_id", tv_id) != tv_id):
        if section is not None:
            print(f"note: {metrics_path} describes other stage-1 weights than {tv_path}; recomputing them")
        metrics["treevae"] = stage1_metrics(tv, tv_ckpt["state"]["log"], test_images, test_labels, device, tv_path)
    dcfg = dataclasses.replace(ddpm.ddpm_config(run.dataset, run.preset, tv.n_leaves), **ddpm_overrides)
    if dm_ckpt is not None:                          # keep the DDPM configuration it was started with ...
        saved = ddpm.DDPMConfig(**dm_ckpt["config"])
        # ... but for the sampler settings: they train nothing, and the figures and evaluation sample with them
        dcfg = dataclasses.replace(saved, **{k: v for k, v in ddpm_overrides.items()
                                             if k.startswith("ddim_") or k == "respace_steps"})
    print(f"ddpm: {json.dumps(dataclasses.asdict(dcfg))}")
    train_ddpm(run, dcfg, tv, device, autocast, train_images, dm_ckpt)


if __name__ == "__main__":
    # Under torchrun every process meets the same user error or Ctrl-C: rank 0 alone says it (RANK is set before
    # the process group exists, so this holds for the command line's errors too).
    say = sys.stderr if os.environ.get("RANK", "0") == "0" else open(os.devnull, "w")
    try:
        main()
    except Stop as e:
        print(e)
        sys.exit(e.code)
    except Interrupted as e:
        print(e, file=say)
        sys.exit(130)
    except (data.DataError, ddpm.DDPMError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=say)
        sys.exit(2)
