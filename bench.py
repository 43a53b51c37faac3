"""Benchmarks: one JSON line per figure, and a planner for the full schedule.

    python bench.py --device cpu              # TreeVAE / subtree / DDPM steps, sampling, features, data loading
    python bench.py --device cuda --compile --graphs   # the same on a GPU (bf16 autocast, compile, CUDA graphs)
    python bench.py --plan --dataset mnist    # predicted wall time of the paper schedule on this machine

Every figure is the median (with min and max) over repeated steps after warm-up, on random inputs of the real
shapes (MNIST 1 x 28 x 28, batch 256 unless noted). Rates are images per second (sampling img*steps/s,
matmul_peak TFLOP/s), to 4 significant digits.
The authors' code on the same machine kinds: 2-core CPU 1,134 / 300 / 437 img/s for the 2-leaf, 10-leaf and
subtree steps, 17.3 img/s for the U-Net step at batch 32; one H200 7,776 / 2,171 / 3,713 and 4,427.

allreduce_bytes (training steps): what each step all-reduces when torchrun runs K processes (train.py's
allreduce_bytes: the trained parameters' float32 gradients plus the batch-norm statistics), the figure to set
against the interconnect's bandwidth; the time is ~2 (K - 1)/K x bytes / bandwidth for a ring all-reduce.

Why these figures: the TreeVAE steps are what stage 1's ~1,700 epochs (the authors' schedule) multiply, and the
2- and 10-leaf trees bracket every tree the schedule trains (the planner interpolates between them); the subtree
step is what a split trains; the U-Net step and the reverse step are stage 2's training and sampling; matmul_peak
is the machine's roofline, so the U-Net's `tflops` says how far from it the step runs. Timing is train.py's own
(timed, TrainStep, grown_tree, plan), so a figure here is exactly what the planner measures before a run.
"""
import json
import statistics
import sys
import time

import torch

import data
import ddpm
import treevae
from train import TrainStep, allreduce_bytes, grown_tree, plan, timed


def report(name, device, batch, t, args, dtype="fp32", unit="img/s", work=None, **extra):
    """One JSON line: rate (4 significant digits) from the median step time (`work` units per step, default batch)."""
    # The median, not the mean: one slow repeat (another process, a page fault) must not move the figure; min and
    # max stay in the line so that a noisy machine shows itself (the planner warns on the same spread).
    med, lo, hi = t
    work = batch if work is None else work
    line = {"figure": name, "device": str(device), "dtype": dtype, "batch": batch, "compile": args.compile,
            "rate": float(f"{work / med:.4g}"), "unit": unit, "median_ms": round(med * 1e3, 3),
            "min_ms": round(lo * 1e3, 3), "max_ms": round(hi * 1e3, 3), **extra}
    if device.type == "cpu":                     # CPU figures scale with the thread count: say which
        line["threads"] = torch.get_num_threads()
    print(json.dumps(line), flush=True)
    return line


def bench_treevae(args, device, autocast):
    """The TreeVAE training steps of the paper configuration: a 2-leaf and a 10-leaf tree (the initial tree and the
    leaf budget), each eager and, with --graphs, captured as a CUDA graph; then a split's subtree step."""
    # Random images of the data set's shape: step time does not depend on pixel values, and no download is needed.
    cfg = treevae.treevae_config(data.canonical_name(args.dataset), "paper")     # --dataset: mnist or cifar10 shapes
    x = torch.rand(args.batch, cfg.in_channels, cfg.image_size, cfg.image_size, device=device)
    out = []
    # Each tree is timed under the same settings a run would use (compile, autocast), so the planner's numbers
    # and these agree; with --graphs both variants are timed to show what capturing saves.
    variants = [(n, g) for n in (2, 10) for g in ([False, True] if args.graphs else [False])]
    for n_leaves, graphs in variants:     # with --graphs: each tree eager, then captured (before/after)
        model = grown_tree(cfg, n_leaves, device).train_all()
        step = TrainStep(model, list(model.parameters()), cfg, device, autocast, args.compile, graphs)
        t = timed(lambda: step(x, 0.5), device, args.repeat, warmup=5)   # graphs: 3 warm-ups + capture
        out.append(report(f"treevae_train_step_{n_leaves}_leaves", device, args.batch, t, args, args.dtype,
                          graphs=step.graphs,
                          params=sum(p.numel() for p in model.parameters()),
                          depth=max(model.depth.values()),
                          allreduce_bytes=allreduce_bytes(model, list(model.parameters()))))
    # the small-subtree step: split a leaf of a 9-leaf tree and train only the new subtree (the last split before
    # the 10-leaf budget: the deepest, costliest frozen tree a subtree step runs under)
    model = grown_tree(cfg, 9, device)
    node = model.leaves[-1]
    model.split(node)
    model.to(device)
    params = model.train_subtree(node)
    step = TrainStep(model, params, cfg, device, autocast, args.compile, args.graphs, decode=model.child_ids[node])
    t = timed(lambda: step(x, 0.5), device, args.repeat, warmup=5)
    out.append(report("treevae_subtree_step_under_9_leaves", device, args.batch, t, args, args.dtype,
                      allreduce_bytes=allreduce_bytes(model, params)))
    return out


def unet_flops(unet, batch, cfg, device):
    """FLOPs of one U-Net forward at this batch, counted by torch's FlopCounterMode (matmuls and convs)."""
    # Counted, not derived by hand: the counter sees exactly the convs and matmuls the eager U-Net runs.
    from torch.utils.flop_counter import FlopCounterMode
    x = torch.randn(batch, cfg.image_channels, cfg.image_size, cfg.image_size, device=device)
    t, leaf = torch.zeros(batch, dtype=torch.long, device=device), torch.zeros(batch, dtype=torch.long, device=device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(x, t, x, leaf)
    return counter.get_total_flops()


def bench_ddpm(args, device, autocast):
    """Stage 2: the paper U-Net's training step (with EMA, as train.py runs it), one reverse step without gradients
    (what a sampler repeats T times per image) and a short DDIM run end to end."""
    cfg = ddpm.ddpm_config("mnist", "paper", n_leaves=10)     # 10 leaves: the leaf budget, the paper's tree size
    unet = ddpm.UNet(cfg).to(device)
    if device.type == "cuda":
        unet = unet.to(memory_format=torch.channels_last)
    ema, diffusion, opt = ddpm.EMA(unet, cfg.ema_decay), ddpm.Diffusion(cfg).to(device), ddpm.make_optimizer(unet, cfg)
    net = torch.compile(unet) if args.compile else unet
    b = args.ddpm_batch
    x0 = torch.rand(b, 1, 28, 28, device=device) * 2 - 1
    cond, leaf = torch.rand_like(x0) * 2 - 1, torch.randint(0, 10, (b,), device=device)
    counter = iter(range(10 ** 9))              # a growing step index: lr warm-up and EMA weight as in training

    def train():
        with autocast():
            ddpm.train_step(net, ema, diffusion, opt, x0, cond, leaf, cfg, next(counter))
    t0 = time.perf_counter()
    train()                                      # the first step pays for cuDNN autotuning or compilation
    first = time.perf_counter() - t0
    # The first step is reported apart (first_step_s): it is a one-off cost that a long run amortises.
    t = timed(train, device, args.repeat)
    extra = {"params": sum(p.numel() for p in unet.parameters()), "first_step_s": round(first, 2),
             "allreduce_bytes": allreduce_bytes(unet, list(unet.parameters()))}
    # achieved rate: a training step is ~3 forward passes of the FLOPs that run eagerly (compare matmul_peak;
    # on a CPU with --compile the compiled step runs the plain up-convs, ~8 % more FLOPs than counted here)
    extra["tflops"] = round(3 * unet_flops(unet, b, cfg, device) / t[0] / 1e12, 3 if device.type == "cpu" else 1)
    out = [report("ddpm_train_step_with_ema", device, b, t, args, args.dtype, **extra)]
    ema.model.eval()                             # sampling runs the EMA copy in eval mode (no dropout)
    t_idx = torch.full((b,), 500, dtype=torch.long, device=device)   # mid-chain: every t costs the same

    @torch.no_grad()
    def reverse_step():
        with autocast():
            ema.model(x0, t_idx, cond, leaf)
    out.append(report("ddpm_reverse_step_no_grad", device, b, timed(reverse_step, device, args.repeat), args,
                      args.dtype, unit="img*steps/s"))
    # DDIM end to end: the sampler's own overhead (schedule lookups, the clip, the update) on top of the U-Net calls
    n, steps = args.ddim_images, args.ddim_steps
    cond_n, leaf_n = torch.rand(n, 1, 28, 28, device=device) * 2 - 1, torch.randint(0, 10, (n,), device=device)

    def ddim():
        with autocast():
            diffusion.sample_ddim(ema.model, (n, 1, 28, 28), cond_n, leaf_n, steps=steps)
    out.append(report(f"ddim_{steps}_steps_{n}_images", device, n, timed(ddim, device, 1, warmup=1), args,
                      args.dtype, unit="img/s"))
    return out


def bench_peak(args, device):
    """The machine's matrix-multiply rate (TFLOP/s) in the benchmark's dtype (operands made in it, no casts): the
    roofline the U-Net step's `tflops` is read against (its convolutions run as matrix products). On CUDA, fp32
    means IEEE float32 (setup_device turns TF32 off for --precision fp32; the `tf32` field says so)."""
    n = 2048 if device.type == "cpu" else 8192   # large enough to reach the peak, small enough for a quick run
    dtype = torch.bfloat16 if args.dtype.startswith("bf16") else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    t = timed(lambda: a @ b, device, args.repeat)
    extra = {"tf32": torch.backends.cuda.matmul.allow_tf32} if device.type == "cuda" and dtype == torch.float32 else {}
    return report("matmul_peak", device, n, t, args, args.dtype, unit="TFLOP/s", work=2 * n ** 3 / 1e12, **extra)


def bench_features(args, device):
    """Feature extraction for FID: Inception-v3 at 299 x 299 (dominates a CPU FID) and the offline extractor."""
    import fid                                   # only this group needs it
    out = []
    x = torch.rand(args.feature_batch, 1, 28, 28, device=device)
    net = fid.InceptionV3().to(device).eval()          # random weights: the speed is the same
    with torch.no_grad():
        out.append(report("inception_features", device, len(x), timed(lambda: net.features(x), device,
                                                                      max(2, args.repeat // 4)), args))
    extractor = fid.OfflineNet(1, 28).to(device).eval() if hasattr(fid, "OfflineNet") else None
    if extractor is not None:
        xb = torch.rand(1000, 1, 28, 28, device=device)   # a small net: a big batch shows its throughput
        with torch.no_grad():
            out.append(report("offline_extractor_features", device, len(xb),
                              timed(lambda: extractor.features(xb), device, args.repeat), args))
    return out


def bench_data(args, device):
    """Reading Fashion-MNIST from its IDX files (with --data-dir) and one epoch of data.Batches on the device: the
    input side must stay far below a training step's time (the whole data set sits on the device)."""
    out = []
    if args.data_dir:
        t0 = time.perf_counter()
        images, _ = data.load("fashion_mnist", "train", args.data_dir)
        dt = time.perf_counter() - t0
        print(json.dumps({"figure": "load_fashion_mnist_train", "seconds": round(dt, 3), "n": len(images)}))
    else:                                        # the training split's size and type, without a download
        images = torch.randint(0, 256, (60000, 1, 28, 28), dtype=torch.uint8)
    batches = data.Batches(images, None, 256, device)     # shuffling, slicing, uint8 -> float on the device

    def one_epoch():
        for x, _ in batches.epoch(0):
            pass
    out.append(report("batches_epoch", device, len(batches) * 256, timed(one_epoch, device, 3, warmup=1), args))
    return out


# The groups --only picks from, in the order they run: the training steps first, so an interrupted run has already
# printed the figures that matter most.
FIGURES = ("treevae", "ddpm", "peak", "features", "data")


def parser():
    """bench.py's command line."""
    p = data.Parser(prog="bench.py", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", help="auto (cuda, else mps, else cpu) | cpu | cuda | cuda:N | mps")
    p.add_argument("--threads", type=data.Range(int, ge=0), default=0, help="CPU threads of torch's kernels "
                   "(torch.set_num_threads), set before any work; 0: torch's choice (each JSON line says how many)")
    p.add_argument("--compile", action="store_true", help="torch.compile the models")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                   help="auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32")
    p.add_argument("--graphs", action="store_true", help="also time the TreeVAE steps captured as CUDA graphs")
    p.add_argument("--repeat", type=data.Range(int, ge=1), default=10, help="timed steps per figure, after warm-up")
    p.add_argument("--batch", type=data.Range(int, ge=2), default=256,
                   help="images per TreeVAE step (batch norm needs 2)")
    # None: a default per device, filled in below. A CPU gets small batches and few DDIM steps so that the whole
    # run takes minutes; a GPU gets the paper's batch and the 100 steps train.py's figures use.
    p.add_argument("--ddpm-batch", type=data.Range(int, ge=1), help="images per U-Net step; default 32 on CPU, "
                   "256 on CUDA")
    p.add_argument("--ddim-images", type=data.Range(int, ge=1), help="images of the DDIM figure; default 16 on CPU, "
                   "1000 on CUDA")
    p.add_argument("--ddim-steps", type=data.Range(int, ge=1, le=1000), help="steps of the DDIM figure (at most "
                   "the paper DDPM's T = 1000); default 5 on CPU, 100 on CUDA")
    p.add_argument("--feature-batch", type=data.Range(int, ge=1), help="images per Inception feature batch; "
                   "default 8 on CPU, 500 on CUDA")
    p.add_argument("--data-dir", default="", help="folder with Fashion-MNIST (e.g. ../shared/data) to time load(); "
                   "default: random images")
    p.add_argument("--only", default=",".join(FIGURES), help="comma-separated subset of " + ",".join(FIGURES))
    p.add_argument("--plan", action="store_true", help="predict the paper schedule's wall time (train.py's planner)")
    p.add_argument("--dataset", default="mnist", help="the TreeVAE figures' and the planner's architecture: "
                   "mnist | fashion_mnist | cifar10")
    return p


def main(argv=None):
    """bench.py's command line: the chosen figure groups, one JSON line per figure; --plan prints the planner's
    prediction for the paper schedule instead."""
    args = parser().parse_args(argv)
    only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(only) - set(FIGURES))
    if unknown or not only:
        raise data.DataError(f"--only {args.only!r}: unknown or no figure group ({','.join(unknown)}); "
                             f"choose from {','.join(FIGURES)}")
    if args.threads:
        torch.set_num_threads(args.threads)          # before any work: torch fixes its pool at the first op
    # The same hardware block as train.py, so a figure is measured under the settings a run uses (TF32, autocast).
    device, autocast = data.setup_device(args.device, args.precision)
    cuda = device.type == "cuda"
    # The dtype each line reports: under autocast matmuls and convs run in bf16, the weights stay float32.
    args.dtype = "bf16-autocast" if args.precision == "bf16" or (cuda and args.precision == "auto") else "fp32"
    args.ddpm_batch = args.ddpm_batch or (256 if cuda else 32)
    args.ddim_images = args.ddim_images or (1000 if cuda else 16)
    args.ddim_steps = args.ddim_steps or (100 if cuda else 5)
    args.feature_batch = args.feature_batch or (500 if cuda else 8)
    if args.plan:                                # the paper schedule's duration here, with train.py's planner
        name = data.canonical_name(args.dataset)
        # the training split minus train.py's 10 % validation split, the size the paper schedule trains on
        n_train = {"mnist": 54000, "fashion_mnist": 54000, "cifar10": 45000}[name]
        plan(treevae.treevae_config(name, "paper"), ddpm.ddpm_config(name, "paper", 10), n_train, device, autocast,
             args.compile, args.graphs)
        return
    if "treevae" in only:
        bench_treevae(args, device, autocast)
    if "ddpm" in only:
        bench_ddpm(args, device, autocast)
    if "peak" in only:
        bench_peak(args, device)
    if "features" in only:
        bench_features(args, device)
    if "data" in only:
        bench_data(args, device)


if __name__ == "__main__":
    try:
        main()
    except (data.DataError, ddpm.DDPMError, FileNotFoundError) as e:    # e.g. --device cuda without a GPU
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:                       # the JSON lines printed so far stand; nothing is written
        print("interrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(130)
