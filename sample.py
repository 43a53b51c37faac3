"""Sample Diffuse-TreeVAE: a root sample, a leaf, the leaf's TreeVAE image, and its DDPM refinement.

Paper: Goncalves et al., "Structured Generations: Using Hierarchical Clusters to guide Diffusion Models"
(arXiv 2407.06124), and the sampling settings of the authors' configs/mnist.yml (evaluation: 1000-step
ancestral DDPM with the "fixedlarge" variance, EMA weights, modes sample / sample_all_leaves / recons).
Generation, in the order of the functions below:

    z_0 ~ N(0, I)                                    root_sample: the root latent (n, C, R, R)
    z_i ~ p(z_i | z_pa(i)) down the tree             TreeVAE.generate: every leaf l decoded -> x_hat^(l) in [0, 1]
    P(l | z_0) = prod of p-router decisions on P_l   its second output, leaf_probs (n, n_leaves)
    l ~ P(. | z_0), or l = --leaf                    pick_leaves
    x_T ~ N(0, I), x_0 ~ p_theta(x | x_hat^(l), l)   refine: DDIM (Song et al. Eq. 12) or ancestral DDPM (Ho et
                                                     al. Alg. 2), conditioned on cond = 2 x_hat - 1 in [-1, 1]
With one fixed z_0 and one fixed x_T, refining every leaf's image shows "the same sample, per cluster" (the
paper's signature figure, --all-leaves). --recons refines the argmax-leaf reconstruction of real test images.

Legend: x_hat TreeVAE image in [0, 1] (n, C, H, W); x DDPM image in [-1, 1]; leaf (n,) leaf indices (position
in tv.leaves); leaf_probs (n, n_leaves); L = n_leaves. Pixel ranges are converted by data.py only.

    python sample.py --run runs/mnist                  64 samples, leaves drawn from the path probabilities
    python sample.py --run runs/mnist --leaf 5         64 samples of leaf 5
    python sample.py --run runs/mnist --all-leaves     rows: root samples; columns: leaves; TreeVAE over refined
    python sample.py --run runs/mnist --recons         test images: original, TreeVAE reconstruction, refined
    python sample.py --run runs/mnist --stage treevae  stage 1 alone (no ddpm.pt needed)
    python sample.py --run runs/mnist --tree --stage treevae    tree.png redrawn with the TreeVAE's own images
                                                       (<run>/tree_treevae.png; without --stage: refined, tree.png)
    python sample.py --run runs/mnist --sampler ddim   DDIM with the run's ddim_steps (100 but in the smoke preset):
                                                       ~10x faster than the default ancestral sampler (the
                                                       authors', all T steps), less robust (README)
Each call writes a PNG grid and an .npz beside it (key 'images': uint8 (N, C, H, W); `python fid.py --gen`
scores it). train.py calls make_figures (tree.png, samples.png/.npz, all_leaves.png) and evaluate.
    python sample.py --run runs/mnist --evaluate       the FID table of both stages and leaf specificity
                                                       (<run>/eval.json, leaf_specificity.png; see `evaluate`)
"""
import dataclasses
import json
import math
import os
import sys
import textwrap
import time
from types import SimpleNamespace
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")  # files only, no window: works on servers and in CI
import matplotlib.pyplot as plt
import numpy as np
import torch

import data
import ddpm
import treevae
from data import setting


class SampleError(data.DataError):
    """A run-folder problem the user can fix; one line: cause + remedy. A DataError, so that train.py's
    `error: ...` handler also catches it when it calls make_figures."""


@dataclass
class SampleConfig:
    run: str = setting("runs/mnist", "run folder holding treevae.pt (and ddpm.pt), written by train.py")
    leaf: int = setting(-1, "-1: draw each sample's leaf from P(l | z_0); K: every sample from leaf K", ge=-1)
    n: int = setting(0, "images (root samples = rows for --all-leaves); 0: 64, 8 for --all-leaves, 16 for --recons",
                     ge=0)
    sampler: str = setting("ddpm", "ddpm (the authors' ancestral sampler: all T steps, or T respaced to --steps) | "
                                   "ddim (Song et al., --steps steps, deterministic for eta 0: less robust on a "
                                   "short run)", choices=("ddpm", "ddim"))
    # None: the run's own settings (train.py --ddpm-respace-steps, --ddpm-ddim-steps / --ddpm-ddim-eta, in ddpm.pt)
    steps: int = setting(None, "sampler steps, at most the DDPM's T: --sampler ddpm: T respaced to this many "
                               "(Nichol & Dhariwal; T = Ho et al.'s Alg. 2), default the run's respace_steps (0: "
                               "all T; at least 2); --sampler ddim: DDIM steps, default the run's ddim_steps", kind=int, ge=1)
    eta: float = setting(None, "DDIM noise: 0 deterministic, 1 = ancestral with the 'fixed small' variance; "
                               "default: the run's ddim_eta", kind=float, ge=0, le=1)
    all_leaves: bool = setting(False, "one root sample and one noise per row, refined at every leaf")
    tree: bool = setting(False, "draw the run's tree with --n samples under each leaf (default 3); with --stage "
                                "treevae its TreeVAE images (default file <run>/tree_treevae.png)")
    stage: str = setting("diffusion", "diffusion (refined by the DDPM) | treevae (stage-1 images, no DDPM)",
                         choices=("diffusion", "treevae"))
    recons: bool = setting(False, "refine the argmax-leaf reconstructions of real test images")
    evaluate: bool = setting(False, "FID of both stages and leaf specificity at --n images (default: the run's "
                                    "preset's: cpu 2,000, smoke 64, else 10,000) -> <run>/eval.json, "
                                    "leaf_specificity.png and a table")
    seed: int = setting(0, "seed of z_0, the leaves, the noise and the test images picked", ge=0)
    out: str = setting("", "PNG path; default <run>/samples_<mode>[_treevae|_ddim].png; the .npz goes beside it "
                           "(--evaluate: the JSON path, default <run>/eval.json)")
    device: str = setting("auto", "auto | cpu | cuda | cuda:N | mps")
    threads: int = setting(0, "CPU threads of torch's kernels (torch.set_num_threads); 0: torch's choice", ge=0)
    data_dir: str = setting("", "test images for --recons; default: the data_dir the run was trained with")


# ---------------------------------------------------------------------------------------------------------------
# Loading a run folder

@dataclass
class Models:
    tv: treevae.TreeVAE         # stage 1, eval mode
    unet: object                # stage 2: the EMA U-Net (eval), or None
    diffusion: object           # its ddpm.Diffusion, or None
    dataset: str
    data_dir: str               # where the run found its data
    ddpm_problem: str           # why there is no U-Net (one line), or ""
    tv_path: str = ""           # the checkpoints, named in errors about what they generate
    ddpm_path: str = ""
    tv_id: str = ""             # their fingerprints (data.fingerprint), recorded in the files made from them
    ddpm_id: str = ""           # "" without a usable U-Net
    preset: str = "paper"       # the preset stage 1 was trained with (train.py's RunConfig in treevae.pt)
    ddpm_preset: str = "paper"  # and stage 2 (ddpm.pt; older files do not say: stage 1's is assumed)


def _guess_dataset(run_dir):
    name = os.path.basename(os.path.normpath(run_dir))     # runs/<dataset> is train.py's default
    return name if name in data.DATASETS else "mnist"


def stage2_mismatch(d, tv, tv_path):
    """Why the ddpm.pt dict d does not belong to the TreeVAE tv read from tv_path (None: there is none), as the
    end of a sentence that starts with ddpm.pt's path; "" when d was trained on exactly these weights. Shared with
    train.py (--resume): a DDPM is conditioned on its tree's leaf images, so it is only valid with that tree."""
    if d.get("version") != treevae.VERSION:                   # train_ddpm stamps ddpm.pt with treevae.VERSION
        return (f"comes from an incompatible version of this code (checkpoint version {d.get('version')}, this "
                f"code reads {treevae.VERSION})")
    if tv is None:
        return f"was trained on a stage 1 that is gone ({tv_path} is missing)"
    if d.get("n_leaves") != tv.n_leaves:                      # stage 1 retrained after stage 2
        return f"was trained on a tree with {d.get('n_leaves')} leaves but {tv_path} has {tv.n_leaves}"
    if d.get("treevae_id") != data.fingerprint(tv.state_dict()):     # same leaf count, other weights
        return f"was trained on other stage-1 weights than {tv_path} (retrained or changed since?)"
    return ""


def load_run(run_dir, device="cpu"):
    """Models of a run folder: the TreeVAE (must have finished stage 1) and, if ddpm.pt is usable, the EMA U-Net
    (ddpm.py: sample with the EMA weights) with its Diffusion. Problems with stage 1 raise SampleError; a
    missing or unusable ddpm.pt only sets Models.ddpm_problem (stage-1 sampling still works)."""
    tv_path, dm_path = os.path.join(run_dir, "treevae.pt"), os.path.join(run_dir, "ddpm.pt")
    make = f"python train.py --dataset {_guess_dataset(run_dir)} --out {run_dir} --stage treevae"
    if not os.path.isdir(run_dir):
        raise SampleError(f"no run folder {run_dir}: train one with {make}, or pass --run <folder>")
    if not os.path.exists(tv_path):
        raise SampleError(f"no {tv_path} (the stage-1 checkpoint): train it with {make}")
    ckpt = data.read_checkpoint(tv_path, f"retrain with {make} --overwrite", finite=("state_dict",))
    info = ckpt.get("run") or {}                        # train.py's RunConfig, saved in the checkpoint
    dataset, data_dir = info.get("dataset", _guess_dataset(run_dir)), info.get("data_dir", "data")
    preset = info.get("preset", "paper")
    cmd = data.train_command(SimpleNamespace(dataset=dataset, preset=preset, out=run_dir, data_dir=data_dir))
    if ckpt.get("version") != treevae.VERSION:
        raise SampleError(f"{tv_path} comes from an incompatible version of this code (checkpoint version "
                          f"{ckpt.get('version')}, this code reads {treevae.VERSION}): retrain with {cmd} "
                          f"--overwrite")
    phase = (ckpt.get("state") or {}).get("phase")
    if phase != "done":
        raise SampleError(f"{tv_path} is an unfinished stage 1 (phase {phase}): finish it with "
                          f"{cmd} --stage treevae --resume")
    try:
        tv = treevae.TreeVAE.from_checkpoint(ckpt).to(device).eval().requires_grad_(False)
    except ValueError as e:                             # weights of another layout: one line with the remedy
        raise SampleError(f"{tv_path}: {e}: {cmd} --overwrite") from None

    unet, diffusion, problem, d, ddpm_preset = _load_ddpm(dm_path, tv, tv_path, cmd, device, preset)
    return Models(tv, unet, diffusion, dataset, data_dir, problem, tv_path, dm_path,
                  data.fingerprint(ckpt["state_dict"]), data.fingerprint(d["ema"]) if unet is not None else "",
                  preset, ddpm_preset)


def _load_ddpm(dm_path, tv, tv_path, cmd, device, preset):
    """load_run's stage 2: (EMA U-Net or None, its Diffusion or None, why there is none or "", ddpm.pt's dict or
    None, the preset it was trained with). Never raises for a bad ddpm.pt: stage 1 can still be sampled."""
    unet = diffusion = None
    problem, redo, d, ddpm_preset = "", f"train stage 2 afresh with {cmd} --stage ddpm --overwrite", None, preset
    if not os.path.exists(dm_path):
        problem = (f"no {dm_path}: the DDPM (stage 2) is not trained yet; sample stage 1 alone with "
                   f"--stage treevae, or train stage 2 with {cmd} --stage ddpm")
    else:
        try:                                         # unreadable or NaN weights: unusable, stage 1 still samples
            d = data.read_checkpoint(dm_path, redo, finite=("ema",))
        except data.DataError as e:
            problem = str(e)
        mismatch = stage2_mismatch(d, tv, tv_path) if d is not None else ""
        if mismatch:                                 # trained on another tree (or by another version)
            problem = f"{dm_path} {mismatch}: {redo}"
        elif d is not None:
            names = {f.name for f in dataclasses.fields(ddpm.DDPMConfig)}
            dcfg = ddpm.DDPMConfig(**{k: v for k, v in d["config"].items() if k in names})
            dcfg.channel_mult = tuple(dcfg.channel_mult)
            unet = ddpm.UNet(dcfg)
            unet.load_state_dict(d["ema"])                  # the EMA weights: what one samples with
            unet = unet.to(device).eval().requires_grad_(False)
            diffusion = ddpm.Diffusion(dcfg).to(device)
            ddpm_preset = (d.get("run") or {}).get("preset", preset)
            st, budget = d["state"], dcfg.max_steps or math.inf
            if st["epoch"] < dcfg.epochs and st["global_step"] < budget:
                print(f"note: {dm_path} is an unfinished stage 2 (epoch {st['epoch']}/{dcfg.epochs}, "
                      f"{st['global_step']} steps); sampling with its EMA weights so far")
    return unet, diffusion, problem, d, ddpm_preset


# ---------------------------------------------------------------------------------------------------------------
# Generation: small steps, each one line of the docstring's recipe

def root_sample(tv, n, generator):
    """z_0 ~ N(0, I): (n, C, R, R) on the TreeVAE's device."""
    c, r = tv.cfg.latent_channels, tv.cfg.latent_size
    return torch.randn(n, c, r, r, generator=generator, device=next(tv.parameters()).device)


def pick_leaves(leaf_probs, how, generator):
    """One leaf per sample (n,): 'sample' draws l ~ P(l | z_0) from the p-routers' path probabilities,
    'argmax' takes the most probable leaf (the hard cluster, used for the TreeVAE stage's FID), an int forces that
    leaf."""
    if how == "sample":
        return torch.multinomial(leaf_probs.float(), 1, generator=generator).squeeze(1)
    if how == "argmax":
        return leaf_probs.argmax(1)
    return torch.full((len(leaf_probs),), int(how), dtype=torch.long, device=leaf_probs.device)


def refine(m, x_hat, leaf, cfg, noise=None, generator=None):
    """x_0 ~ p_theta(x | x_hat^(l), l): the DDPM starts from x_T = noise (drawn from `generator` if None) and
    denoises conditioned on the TreeVAE image, mapped to [-1, 1] (DiffuseVAE Formulation 1), and on the leaf
    index (added to the time embedding). Returns x (n, C, H, W) in [-1, 1]."""
    cond = 2 * x_hat - 1 if m.unet.cfg.cond_image else None       # (n, C, H, W) in [-1, 1]
    leaf = leaf if m.unet.cfg.n_leaves else None                   # a U-Net trained without leaf input
    if cfg.sampler == "ddpm":                                      # Alg. 2: all T steps, "fixed large" variance
        diffusion = m.diffusion if cfg.steps >= m.unet.cfg.T else m.diffusion.respaced(cfg.steps)   # or respaced
        return diffusion.sample_ddpm(m.unet, x_hat.shape, cond, leaf, noise=noise, generator=generator)
    return m.diffusion.sample_ddim(m.unet, x_hat.shape, cond, leaf, steps=cfg.steps, eta=cfg.eta, noise=noise,
                                   generator=generator)


def sample(m, n, how, cfg, generator, batch=256):
    """n generations in batches: z_0 -> every leaf's image -> one leaf each -> refined (stage 'diffusion').
    Returns (x_hat (n, C, H, W) in [0, 1], x (n, C, H, W) in [-1, 1] or None, leaf (n,))."""
    out = []
    for start in range(0, n, batch):
        b = min(batch, n - start)
        x_hat, leaf_probs = m.tv.generate(b, z0=root_sample(m.tv, b, generator), generator=generator)
        leaf = pick_leaves(leaf_probs, how, generator)                 # (b,)
        x_hat = x_hat[torch.arange(b, device=leaf.device), leaf]       # (b, C, H, W): the chosen leaf's image
        x = refine(m, x_hat, leaf, cfg, generator=generator) if cfg.stage == "diffusion" else None
        out.append((x_hat, x, leaf))
    cat = lambda k: None if out[0][k] is None else torch.cat([o[k] for o in out])
    return cat(0), cat(1), cat(2)


def all_leaves(m, n, cfg, generator):
    """The signature figure's data: n root samples z_0, each decoded at every leaf, and each leaf's image refined
    from the same x_T and the same per-step noise (a generator re-seeded identically for every leaf), so that
    only (x_hat^(l), l) changes along a row. Returns (x_hat (n, L, C, H, W), x (n, L, C, H, W) or None,
    leaf_probs (n, L))."""
    x_hat, leaf_probs = m.tv.generate(n, z0=root_sample(m.tv, n, generator), generator=generator)
    if cfg.stage != "diffusion":
        return x_hat, None, leaf_probs
    dev = x_hat.device
    noise = torch.randn(x_hat[:, 0].shape, generator=generator, device=dev)      # x_T (n, C, H, W), one per row
    seed = int(torch.randint(2 ** 62, (1,), generator=generator, device=dev))   # per-step noise, shared by leaves
    x = [refine(m, x_hat[:, k], torch.full((n,), k, device=dev), cfg, noise=noise,
                generator=torch.Generator(dev).manual_seed(seed)) for k in range(m.tv.n_leaves)]
    return x_hat, torch.stack(x, 1), leaf_probs


def reconstructions(m, images, how, cfg, generator):
    """Real images (n, C, H, W) uint8 -> (x_hat of the argmax (or forced) leaf, its refinement or None, leaf).
    The TreeVAE reconstruction uses posterior means (deterministic); only the DDPM draws noise."""
    x = data.to_float(images).to(next(m.tv.parameters()).device)            # (n, C, H, W) in [0, 1]
    x_hat, leaf_probs = m.tv.reconstruct(x)                                   # (n, L, C, H, W), (n, L)
    leaf = pick_leaves(leaf_probs, "argmax" if how == "sample" else how, generator)
    x_hat = x_hat[torch.arange(len(x), device=x.device), leaf]               # (n, C, H, W)
    return x_hat, refine(m, x_hat, leaf, cfg, generator=generator) if cfg.stage == "diffusion" else None, leaf


# ---------------------------------------------------------------------------------------------------------------
# Pictures

def tile(images, ncol, pad=2, fill=255):
    """uint8 (N, C, H, W) -> one uint8 picture, row-major, `pad` white pixels between images: (h, w) for grey
    images (h, w, 3) for colour. Missing cells at the end stay white."""
    images = torch.as_tensor(images).cpu()
    N, C, H, W = images.shape
    nrow = max(1, -(-N // ncol))
    grid = np.full((pad + nrow * (H + pad), pad + ncol * (W + pad), C), fill, np.uint8)
    for k in range(N):
        r, c = divmod(k, ncol)
        grid[pad + r * (H + pad): pad + r * (H + pad) + H, pad + c * (W + pad): pad + c * (W + pad) + W] = \
            images[k].permute(1, 2, 0).numpy()                           # (H, W, C)
    return grid[..., 0] if C == 1 else grid


LINE_PX, LABEL_PX, MIN_WIDTH_PX = 12, 52, 240   # a title line, the row-label column, the narrowest picture


def wrap(text, width):
    """A title's lines of at most `width` characters, never breaking an option such as --leaf at its hyphens."""
    return textwrap.wrap(text, width, break_on_hyphens=False)


def _savefig(fig, path):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)   # made only now: an interrupted call leaves none
    fig.savefig(path)
    plt.close(fig)


def save_grid(path, images, ncol, title="", row_labels=None):
    """A PNG of the tiled images (uint8 (N, C, H, W)) under a title. The grid keeps one image pixel per PNG pixel:
    the picture's bottom-left corner is exactly tile(images, ncol). The title is wrapped above it; row_labels
    name the grid's rows on its left, cycled (e.g. original / TreeVAE / refined)."""
    grid = tile(images, ncol)
    grid = np.repeat(grid[..., None], 3, 2) if grid.ndim == 2 else grid     # (h, w, 3)
    (h, w), left = grid.shape[:2], LABEL_PX if row_labels else 0
    width = max(left + w, MIN_WIDTH_PX)
    lines = wrap(title, int(width / 5.3))                                   # ~5 px per character at 7 pt
    top = LINE_PX * len(lines) + 4 * bool(lines)
    canvas = np.full((top + h, width, 3), 255, np.uint8)
    canvas[top:, left:left + w] = grid
    fig = plt.figure(figsize=(width / 100, (top + h) / 100), dpi=100)
    fig.figimage(canvas, 0, 0, origin="upper")                             # pixel for pixel, no resampling
    to_fig = lambda x, y: (x / width, 1 - y / (top + h))                   # picture pixels -> figure fraction
    for k, line in enumerate(lines):
        fig.text(*to_fig(3, 2 + LINE_PX * (k + 0.5)), line, fontsize=7, va="center")
    H, pad = images.shape[-2], 2
    for r in range(-(-len(images) // ncol) if row_labels else 0):
        fig.text(*to_fig(left - 4, top + pad + r * (H + pad) + H / 2), row_labels[r % len(row_labels)],
                 fontsize=6, ha="right", va="center")
    _savefig(fig, path)


def pixels(m, x, refined=False):
    """uint8 pixels (data.to_uint8) of TreeVAE images in [0, 1] or, refined, of DDPM images in [-1, 1]. NaN or inf
    (a diverged model) is an error naming the checkpoint that made them, never a black image."""
    return data.to_uint8(x, signed=refined, source=m.ddpm_path if refined else m.tv_path)


def save_npz(path, m, refined, **arrays):
    """The images as uint8 arrays (key 'images': what fid.py reads) plus leaf indices etc., and the fingerprints
    of the checkpoints that made them (treevae_id, ddpm_id; "" for TreeVAE images): `fid.py --run` checks them
    against the run's checkpoints. Written to a temporary name and renamed (never half a file)."""
    with open(path + ".tmp", "wb") as f:
        np.savez(f, **{k: torch.as_tensor(v).cpu().numpy() for k, v in arrays.items() if v is not None},
                 treevae_id=m.tv_id, ddpm_id=m.ddpm_id if refined else "")
    os.replace(path + ".tmp", path)


def save_all_leaves(m, path, x_hat, x, labels=None, title=""):
    """The signature figure: columns = leaves; per root sample a row of TreeVAE images x_hat^(l) and, below it,
    their refinements (one x_T per row pair). x_hat (n, L, C, H, W) in [0, 1], x in [-1, 1] or None."""
    n, L = x_hat.shape[:2]
    rows = [pixels(m, x_hat)] + ([] if x is None else [pixels(m, x, refined=True)])   # (n, L, C, H, W)
    grid = torch.stack(rows, 1).flatten(0, 2)                     # (n * rows * L, C, H, W), row-major
    picture = tile(grid, L)
    H, pad = x_hat.shape[-1], 2
    fig, ax = plt.subplots(figsize=(1.2 + 0.55 * L, 0.6 + 0.55 * n * len(rows)), dpi=150)
    ax.imshow(picture, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    centers = [pad + k * (H + pad) + H / 2 for k in range(max(L, n * len(rows)))]
    ax.set_xticks(centers[:L], [f"leaf {k}" + (f"\n(maj. {labels[k]})" if labels and labels[k] is not None else "")
                                for k in range(L)], fontsize=6)
    ax.set_yticks(centers[:n * len(rows)], ["TreeVAE", "refined"][:len(rows)] * n, fontsize=6)
    ax.tick_params(length=0)
    ax.xaxis.tick_top()
    ax.set_frame_on(False)
    # the title spans the figure: ~19 characters of 6 pt per inch
    fig.suptitle("\n".join(wrap(title, int(19 * fig.get_figwidth()))), fontsize=6)
    fig.tight_layout()
    _savefig(fig, path)


def _tree_layout(tv):
    """{node: horizontal position} in leaf slots, with the one tree walk: every node owns an interval of leaf slots
    that its children split in order, so subtrees never cross; a node sits above the middle of its interval."""
    width, left, x = {}, {0: 0.0}, {}
    for i in reversed(list(tv.walk())):                 # children before parents
        width[i] = sum(width[c] for c in tv.child_ids[i]) or 1
    for i in tv.walk():                                 # parents before children
        x[i], cursor = left[i] + width[i] / 2 - 0.5, left[i]
        for c in tv.child_ids[i]:
            left[c], cursor = cursor, cursor + width[c]
    return x


def _subtree_mass(tv, leaf_sizes):
    """{node: its subtree's share of the (test) samples} from the leaf sizes, or None without sizes."""
    if leaf_sizes is None:
        return None
    total, mass = max(sum(leaf_sizes), 1), {}
    for i in reversed(list(tv.walk())):                 # children before parents
        kids = tv.child_ids[i]
        mass[i] = sum(mass[c] for c in kids) if kids else leaf_sizes[tv.leaves.index(i)] / total
    return mass


def plot_tree(tv, path, leaf_images, leaf_sizes=None, majority=None, title=None):
    """The learned tree: a node per circle (hollow: pass-through node left by pruning), edges as wide as the share
    of samples passing through them (leaf_sizes summed up the tree; equal widths without sizes), and under each
    leaf a strip of its images (leaf_images[k]: uint8 (m, C, H, W)) with its size and majority label."""
    L, unit = tv.n_leaves, 0.85                        # one leaf slot = one data unit = 0.85 inch
    x, mass = _tree_layout(tv), _subtree_mass(tv, leaf_sizes)
    m = max(len(v) for v in leaf_images)                # images per leaf strip
    depth, cell = max(tv.depth.values()), 0.62          # one image: 0.62 units square
    bottom = -depth - 0.3 - m * cell - 0.75             # room for the deepest strip and its caption
    span = max(L, 4.0)
    # The title's lines, wrapped to the width (6 pt characters: ~18 per unit), stacked above the root
    title = "\n".join(w for line in (title or f"TreeVAE, {L} leaves").split("\n")
                      for w in wrap(line, int(18 * span)))
    top = 0.45 + 0.14 * (title.count("\n") + 1)
    fig = plt.figure(figsize=(span * unit, (top - bottom) * unit), dpi=150)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_xlim(-0.5 - (span - L) / 2, L - 0.5 + (span - L) / 2)
    ax.set_ylim(bottom, top)
    ax.set_aspect("equal")
    ax.axis("off")
    for i in tv.walk():                                 # edges, behind the nodes
        p = tv.parent[i]
        if p is None:
            continue
        share = mass[i] if mass else 0.5
        ax.plot([x[p], x[i]], [-tv.depth[p], -tv.depth[i]], color="0.35", lw=0.6 + 7 * share,
                solid_capstyle="round", zorder=1)
        if mass:
            ax.text((x[p] + x[i]) / 2, -(tv.depth[p] + tv.depth[i]) / 2, f"{share:.0%}", fontsize=5, ha="center",
                    va="center", zorder=3, bbox=dict(boxstyle="round,pad=0.1", fc="white", ec="none", alpha=0.8))
    colours = plt.get_cmap("tab20")
    for i in tv.walk():
        kids, y = tv.child_ids[i], -tv.depth[i]
        face = "white" if len(kids) == 1 else "0.25" if kids else colours(tv.leaves.index(i) % 20)
        ax.scatter([x[i]], [y], s=90 if kids else 120, c=[face], edgecolors="0.1", linewidths=0.8, zorder=2)
        if kids:
            continue
        k = tv.leaves.index(i)                          # leaf index = cluster label = DDPM leaf input
        strip = tile(leaf_images[k], 1, pad=1)
        top = y - 0.3
        ax.imshow(strip, cmap="gray", vmin=0, vmax=255, interpolation="nearest", zorder=2,
                  extent=(x[i] - cell / 2, x[i] + cell / 2, top - len(leaf_images[k]) * cell, top))
        caption = [f"leaf {k}"] + ([f"n={leaf_sizes[k]}"] if leaf_sizes else []) + \
            ([f"majority {majority[k]}"] if majority and majority[k] is not None else [])
        ax.text(x[i], top - len(leaf_images[k]) * cell - 0.05, "\n".join(caption), fontsize=5.5, ha="center",
                va="top")
    ax.text(sum(ax.get_xlim()) / 2, 0.35, title, fontsize=6, ha="center", va="bottom", linespacing=1.3)
    _savefig(fig, path)


# ---------------------------------------------------------------------------------------------------------------
# What train.py calls

def run_steps(m, sampler):
    """The run's own step count of a sampler (ddpm.pt's config): respace_steps (0: all T) or ddim_steps."""
    return (m.unet.cfg.respace_steps or m.unet.cfg.T) if sampler == "ddpm" else m.unet.cfg.ddim_steps


def with_run_defaults(m, cfg):
    """cfg with the sampler settings the run was trained with (ddpm.pt's respace_steps for the ancestral sampler,
    ddim_steps and ddim_eta for DDIM: train.py's --ddpm-respace-steps, --ddpm-ddim-steps, --ddpm-ddim-eta) where it
    leaves them None, the steps capped at the DDPM's T. Without a DDPM nothing is refined and cfg is returned as
    it is."""
    if m.unet is None:
        return cfg
    steps, eta = run_steps(m, cfg.sampler) if cfg.steps is None else cfg.steps, cfg.eta
    return dataclasses.replace(cfg, steps=min(steps, m.unet.cfg.T), eta=m.unet.cfg.ddim_eta if eta is None else eta)


def _stage_config(m, steps=None, eta=None, **kw):
    """A SampleConfig for the run's models: refine when a DDPM exists; DDIM settings as with_run_defaults."""
    stage = "diffusion" if m.unet is not None else "treevae"
    return with_run_defaults(m, SampleConfig(stage=stage, steps=steps, eta=eta, **kw))


def sampler_name(m, cfg):
    """How the refinements were drawn, for the printed lines and metrics.json."""
    T, small = m.unet.cfg.T, ", fixed-small variance" if m.unet.cfg.var_type == "fixed_small" else ""
    return f"DDIM {cfg.steps} steps, eta {cfg.eta}" if cfg.sampler == "ddim" else \
        f"ancestral DDPM, {T} steps{small}" if cfg.steps >= T else \
        f"ancestral DDPM, {T} steps respaced to {cfg.steps}{small}"


def _generator(device, seed):
    return torch.Generator(torch.device(device)).manual_seed(seed)


def drop_stale(metrics, m):
    """Remove from metrics (metrics.json's dict, in place) every section computed from other checkpoints than the
    run's m, with a note: each records the fingerprints (treevae_id, ddpm_id) of the weights it describes."""
    now = {"treevae_id": m.tv_id, "ddpm_id": m.ddpm_id}
    for key in [k for k, v in metrics.items() if isinstance(v, dict) and any(
            i in v and v[i] != now[i] for i in now)]:
        print(f"note: dropped the '{key}' section of metrics.json: it describes other checkpoints than "
              f"{m.tv_path} and {m.ddpm_path if m.ddpm_id else 'no usable ddpm.pt'}")
        del metrics[key]
    return metrics


def smoke_note(m, refined):
    """What a smoke run's picture can show, for its title ("" for the other presets: train.py's preset is saved in
    the checkpoints)."""
    if (m.ddpm_preset if refined else m.preset) != "smoke":
        return ""
    shown = "refined images are noise (the DDPM trained a few steps)" if refined else \
        "a tiny TreeVAE, one epoch per phase, draws blurry images at best"
    return f"SMOKE RUN, a one-minute pipeline check, not a result: {shown}; use --preset fast or paper"


def titled(text, m, refined):
    """A grid's title: what it shows, then the smoke note if the run is one."""
    note = smoke_note(m, refined)
    return f"{text}. {note}" if note else text


def leaf_metrics(m, metrics):
    """(leaf sizes, majority labels) from metrics['treevae'], each None unless it belongs to this tree."""
    tvm = (metrics or {}).get("treevae") or {}
    fits = lambda v: v if v is not None and len(v) == m.tv.n_leaves else None   # metrics of another tree: skip
    return fits(tvm.get("leaf_sizes")), fits(tvm.get("leaf_majority"))


def save_tree(path, m, images, metrics, what, refined, hint=""):
    """The tree figure: plot_tree with a strip of each leaf's images (uint8 (n, L, C, H, W): images[:, k] under
    leaf k), the leaf sizes and majority labels of metrics['treevae'] when they belong to this tree, and a title
    saying what it shows (`what`, `hint`, the smoke note). Leaf k is tv.leaves[k], the index --leaf k samples and
    the cluster label: breadth-first, so the numbers need not grow from left to right."""
    sizes, majority = leaf_metrics(m, metrics)
    lines = [f"{m.dataset}: {m.tv.n_leaves} leaves; under each, {what}",
             "leaf k = sample.py --leaf k" + ("; edge width: share of the test set" if sizes else ""), hint,
             smoke_note(m, refined)]
    plot_tree(m.tv, path, [images[:, k] for k in range(m.tv.n_leaves)], sizes, majority,
              title="\n".join(line for line in lines if line))


def all_leaves_title(m, n, cfg, refined):
    return titled(f"{m.dataset}: {n} root samples z_0 (rows) x {m.tv.n_leaves} leaves (column k = sample.py --leaf "
                  f"k); " + (f"each TreeVAE image over its refinement ({sampler_name(m, cfg)}), one z_0 and one "
                             f"noise per row pair" if refined else "TreeVAE images"), m, refined)


def make_figures(run_dir, device="cpu", steps=None, metrics=None, n=64, rows=4, seed=0, sampler="ddpm", eta=None):
    """<run>/tree.png, all_leaves.png, samples.png (+ samples.npz for fid.py --run): refined images when the run
    has a DDPM, TreeVAE images otherwise. Leaf sizes and majority labels come from metrics['treevae']; sections of
    metrics computed from other checkpoints are dropped first (drop_stale). DDIM steps and eta: the run's own
    (with_run_defaults) unless given."""
    m = load_run(run_dir, device)
    drop_stale(metrics if metrics is not None else {}, m)
    if m.unet is None:                                    # a stage-1 run; or a ddpm.pt that does not fit (say why)
        stale = os.path.exists(os.path.join(run_dir, "ddpm.pt"))
        print(f"note: {m.ddpm_problem if stale else 'no ddpm.pt yet'}; the figures show TreeVAE images only")
    cfg, g = _stage_config(m, steps, eta, sampler=sampler), _generator(device, seed)
    x_hat, x, _ = all_leaves(m, rows, cfg, g)                          # (rows, L, C, H, W)
    final = pixels(m, x_hat) if x is None else pixels(m, x, refined=True)
    refined = x is not None
    what = "refined" if refined else "TreeVAE"
    save_tree(os.path.join(run_dir, "tree.png"), m, final[:3], metrics,
              f"3 {what} samples" + (f" ({sampler_name(m, cfg)})" if refined else ""), refined,
              f"the TreeVAE's own images: python sample.py --tree --stage treevae --run {run_dir}" if refined else "")
    save_all_leaves(m, os.path.join(run_dir, "all_leaves.png"), x_hat, x, leaf_metrics(m, metrics)[1],
                    title=all_leaves_title(m, rows, cfg, refined))
    x_hat, x, leaf = sample(m, n, "sample", cfg, g)
    images = pixels(m, x_hat) if x is None else pixels(m, x, refined=True)
    save_grid(os.path.join(run_dir, "samples.png"), images, math.ceil(math.sqrt(n)),
              title=titled(f"{m.dataset}: {n} samples, leaves drawn from P(l | z_0); " +
                           (f"refined ({sampler_name(m, cfg)})" if refined else "TreeVAE images"), m, refined))
    save_npz(os.path.join(run_dir, "samples.npz"), m, x is not None, images=images, leaf=leaf,
             treevae=pixels(m, x_hat))
    print(f"wrote {run_dir}/tree.png, all_leaves.png ({rows} root samples x {m.tv.n_leaves} leaves) and "
          f"samples.png/.npz ({n} {what} samples" + (f", {sampler_name(m, cfg)})" if x is not None else ")"))
    if smoke_note(m, refined):
        print(f"note: {smoke_note(m, refined)}")


# ---------------------------------------------------------------------------------------------------------------
# Evaluation: the paper's FID table and leaf specificity (sample.py --evaluate; train.py --fid-samples N)
#
# Rows, after the authors' evaluation (their configs' `eval` modes) with their protocols named:
#   treevae_generations          N root samples z_0 ~ N(0, I), each decoded at its argmax leaf (their TreeVAE FID)
#   treevae_reconstructions      N test images reconstructed at their argmax leaf (posterior means)
#   diffusion_generations        the same z_0, leaf drawn l ~ P(l | z_0), refined (their stage-2 `sample` mode)
#   diffusion_generations_argmax the same z_0 at the argmax leaf, refined: where the drawn leaf is the argmax leaf
#                                the refined image of the row above is reused (the same condition: a valid draw,
#                                and common random numbers make the two rows' difference less noisy)
#   diffusion_reconstructions    the N test images' reconstructions refined (their `recons` mode)
#   real_floor                   N training images: the FID of real data at this N (finite-N bias)
# each scored against the test split and against up to 10,000 training images that are not the floor's, with
# the offline extractor and, when its weights are in the torch.hub cache, Inception-v3; 95 % basic bootstrap
# intervals (fid.bootstrap_fid). Leaf specificity (the authors' check, their ResNet-50 replaced by the offline
# extractor's classifier): per leaf the class histogram of its refined generations; purity = sum over leaves of
# the largest class count / N (size-weighted); agreement = share of refined images whose class is that of the
# TreeVAE image they were conditioned on.

EVAL_ROWS = ("treevae_generations", "treevae_reconstructions", "diffusion_generations",
             "diffusion_generations_argmax", "diffusion_reconstructions", "real_floor")
EVAL_N = {"cpu": 2000, "smoke": 64}   # default N per preset: what a laptop evaluates in ~15 min; else 10,000
TRAIN_REF_MAX = 10000                 # training images in the 'train' reference (a seeded random subset)


def _say(line):
    print(line, flush=True)


def eval_n(m):
    """The default N of a run: its stage-2 preset's (stage 1's without a DDPM), 10,000 for paper and fast."""
    return EVAL_N.get(m.ddpm_preset if m.unet is not None else m.preset, 10000)


def _progress(label, total, log):
    """A callback done -> one progress line with elapsed time and ETA (sampling N images takes minutes)."""
    t0 = time.perf_counter()

    def step(done):
        el = time.perf_counter() - t0
        log(f"[eval] {label}: {done}/{total} images | {el / 60:.1f} min | ETA {el / done * (total - done) / 60:.1f} "
            f"min")
    return step


def eval_generations(m, n, cfg, g, batch, log=None):
    """The generation rows' images from one set of n root samples z_0 (module comment above). Returns uint8 CPU
    tensors (n, C, H, W): treevae (argmax leaf), treevae_drawn (the drawn leaf: what each refined image is
    conditioned on), and with a DDPM refined (drawn leaf) and refined_argmax; int64 (n,) leaf and leaf_argmax."""
    log = log or _say
    keys = ("treevae", "treevae_drawn", "refined", "refined_argmax", "leaf", "leaf_argmax")
    out, step = {k: [] for k in keys}, _progress("generations", n, log)
    for start in range(0, n, batch):
        b = min(batch, n - start)
        x_hat, leaf_probs = m.tv.generate(b, z0=root_sample(m.tv, b, g), generator=g)   # (b, L, C, H, W)
        rows = torch.arange(b, device=x_hat.device)
        arg, drawn = pick_leaves(leaf_probs, "argmax", g), pick_leaves(leaf_probs, "sample", g)      # (b,) each
        x_arg, x_drawn = x_hat[rows, arg], x_hat[rows, drawn]                                       # (b, C, H, W)
        out["treevae"].append(pixels(m, x_arg).cpu())
        out["treevae_drawn"].append(pixels(m, x_drawn).cpu())
        out["leaf"].append(drawn.cpu())
        out["leaf_argmax"].append(arg.cpu())
        if cfg.stage == "diffusion":
            x = refine(m, x_drawn, drawn, cfg, generator=g)                    # (b, C, H, W) in [-1, 1]
            x_a, differ = x.clone(), (arg != drawn).nonzero().squeeze(1)
            if len(differ):                                                    # only those need a second draw
                x_a[differ] = refine(m, x_arg[differ], arg[differ], cfg, generator=g)
            out["refined"].append(pixels(m, x, refined=True).cpu())
            out["refined_argmax"].append(pixels(m, x_a, refined=True).cpu())
            step(start + b)
    return {k: torch.cat(v) if v else None for k, v in out.items()}


def eval_reconstructions(m, images, cfg, g, batch, log=None):
    """(TreeVAE reconstructions at the argmax leaf, their refinements or None), uint8 CPU (n, C, H, W) each."""
    rec, ref, step = [], [], _progress("reconstructions", len(images), log or _say)
    for start in range(0, len(images), batch):
        x_hat, x, _ = reconstructions(m, images[start:start + batch], "argmax", cfg, g)
        rec.append(pixels(m, x_hat).cpu())
        if x is not None:
            ref.append(pixels(m, x, refined=True).cpu())
            step(start + len(x))
    return torch.cat(rec), torch.cat(ref) if ref else None


def leaf_specificity(classes, classes_cond, leaf, n_leaves, n_classes):
    """Leaf specificity of generated images: classes (N,) predicted for the images, classes_cond (N,) for the
    TreeVAE images they were conditioned on, leaf (N,) their leaves. Returns purity (sum over leaves of the
    largest class count, / N), agreement (share with classes == classes_cond), both in [0, 1], and per leaf n,
    histogram (n_classes counts), majority, purity and agreement (None for a leaf without images)."""
    hist = torch.zeros(n_leaves, n_classes, dtype=torch.long)
    hist.index_put_((leaf, classes), torch.ones_like(leaf), accumulate=True)     # (L, n_classes)
    agree = (classes == classes_cond).float()
    per_leaf = []
    for k in range(n_leaves):
        nk = int(hist[k].sum())
        per_leaf.append(dict(n=nk, histogram=hist[k].tolist(), majority=int(hist[k].argmax()) if nk else None,
                             purity=float(hist[k].max()) / nk if nk else None,
                             agreement=float(agree[leaf == k].mean()) if nk else None))
    return dict(purity=float(hist.max(1).values.sum()) / len(leaf), agreement=float(agree.mean()),
                n=len(leaf), per_leaf=per_leaf)


CLASS_NAMES = {"fashion_mnist": ("T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
                                 "bag", "boot"),
               "cifar10": ("plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")}


def plot_leaf_specificity(path, spec, spec_cond, title, class_names=None):
    """One bar chart per leaf: the class shares of its refined generations (filled) and of the TreeVAE images
    they were conditioned on (outline); the panel title gives n, purity and agreement."""
    L = len(spec["per_leaf"])
    ncol = min(L, 5)
    nrow = -(-L // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(2.1 * ncol, 1.6 * nrow + 0.5), squeeze=False, sharey=True)
    for k, ax in enumerate(axes.flat):
        if k >= L:
            ax.set_visible(False)
            continue
        leaf, cond = spec["per_leaf"][k], spec_cond["per_leaf"][k]
        c = np.arange(len(leaf["histogram"]))
        share = lambda h: np.asarray(h) / max(1, sum(h))
        ax.bar(c, share(leaf["histogram"]), color="tab:blue", label="refined")
        ax.bar(c, share(cond["histogram"]), fill=False, edgecolor="black", linewidth=0.8, label="TreeVAE")
        ax.set_title(f"leaf {k}: n {leaf['n']}" + (f", purity {leaf['purity']:.2f}, agr. {leaf['agreement']:.2f}"
                                                   if leaf["n"] else ""), fontsize=6)
        ax.set_xticks(c, class_names or [str(i) for i in c], fontsize=5, rotation=90 if class_names else 0)
        ax.tick_params(labelsize=5)
    axes.flat[0].legend(fontsize=5)
    fig.suptitle("\n".join(wrap(title, int(19 * fig.get_figwidth()))), fontsize=7)
    fig.tight_layout()
    _savefig(fig, path)


def _eval_extractors(m, data_dir, cache_dir, device, which, log):
    """[(short name, extractor)]: the offline one always; Inception-v3 when `which` is 'inception', or 'auto' and
    its weights are in the torch.hub cache. Returns (extractors, a note when Inception was skipped, or "")."""
    import fid                                                   # only needed here
    out = [("offline", fid.offline_extractor(m.dataset, root=data_dir, cache_dir=cache_dir, device=device,
                                              log=log))]
    path = fid.inception_file()
    if which == "inception" or (which == "auto" and os.path.exists(path)):
        out.append(("inception", fid.load_inception(device=device)))
        return out, ""
    return out, (f"Inception-v3 skipped: its weights are not in the torch.hub cache ({path}); online, `python "
                 f"fid.py --real-vs-real --extractor inception` downloads them once" if which == "auto" else "")


def evaluate(run_dir, n=None, device="cpu", data_dir=None, cache_dir="cache", sampler="ddpm", steps=None, eta=None,
             seed=0, n_boot=200, batch=None, extractors="auto", out=None, stage="diffusion", log=None):
    """The evaluation of a finished run (section comment above): writes out (default <run>/eval.json: rows, each
    with name, fid, ci95 [lo, hi], n, reference 'test'|'train', extractor, sampler; leaf_specificity with purity
    and agreement in [0, 1]), <run>/leaf_specificity.png and eval_images.npz (every row's uint8 images), prints
    the table, and returns the dict. n: images per row (default eval_n); the reconstruction rows use
    min(n, test split) test images. Without a usable ddpm.pt only the stage-1 rows and the floor are computed.
    Raises SampleError (run folder) or data.DataError (data)."""
    import fid
    log, t_start, device = log or _say, time.perf_counter(), torch.device(device)
    m = load_run(run_dir, device)
    n = n or eval_n(m)
    data_dir = data_dir or m.data_dir
    cfg = _stage_config(m, steps, eta, sampler=sampler)
    if stage == "treevae":                                       # stage 1 alone, even with a DDPM
        cfg = dataclasses.replace(cfg, stage="treevae")
    g, batch = _generator(device, seed), batch or (1000 if device.type == "cuda" else 64)
    refined = cfg.stage == "diffusion"
    how = sampler_name(m, cfg) if refined else None
    log(f"[eval] {run_dir}: N {n}, " + (how if refined else f"stage 1 only ({m.ddpm_problem or '--stage treevae'})"))
    train_x, _ = data.load(m.dataset, "train", data_dir)
    test_x, _ = data.load(m.dataset, "test", data_dir)
    pick = torch.Generator().manual_seed(seed)
    test_pick = torch.randperm(len(test_x), generator=pick)[:n].sort().values          # all of them if n >= split
    perm = torch.randperm(len(train_x), generator=pick)
    floor_x, train_ref = train_x[perm[:n]], train_x[perm[n:n + TRAIN_REF_MAX]]          # disjoint
    if len(train_ref) < 2:
        raise SampleError(f"N = {n} leaves {len(train_ref)} training images for the 'train' reference: use a "
                          f"smaller --n (at most {len(train_x) - 2})")
    seconds = {}
    t = time.perf_counter()
    gen = eval_generations(m, n, cfg, g, batch, log)
    seconds["generations"] = time.perf_counter() - t
    t = time.perf_counter()
    rec, rec_refined = eval_reconstructions(m, test_x[test_pick], cfg, g, batch, log)
    seconds["reconstructions"] = time.perf_counter() - t
    images = {"treevae_generations": gen["treevae"], "treevae_reconstructions": rec,
              "diffusion_generations": gen["refined"], "diffusion_generations_argmax": gen["refined_argmax"],
              "diffusion_reconstructions": rec_refined, "real_floor": floor_x}
    protocol = {"treevae_generations": "argmax leaf", "treevae_reconstructions": "argmax leaf",
                "diffusion_generations": "sampled leaf", "diffusion_generations_argmax": "argmax leaf",
                "diffusion_reconstructions": "argmax leaf", "real_floor": None}

    t = time.perf_counter()
    exs, note = _eval_extractors(m, data_dir, cache_dir, device, extractors, log)
    rows = []
    for short, ex in exs:
        refs = {"test": fid.extract_features(ex, test_x), "train": fid.extract_features(ex, train_ref)}
        for name in EVAL_ROWS:
            if images[name] is None:
                continue
            feats = fid.extract_features(ex, images[name])
            for ref, feats_ref in refs.items():
                r = fid.bootstrap_fid(feats_ref, feats, n_boot=n_boot, seed=seed, device=device)
                rows.append(dict(name=name, fid=r["fid"], ci95=[r["basic_lo"], r["basic_hi"]],
                                 bias_corrected=r["bias_corrected"], n=len(images[name]), n_ref=r["n_real"],
                                 reference=ref, extractor=ex.name, extractor_kind=short,
                                 sampler=how if name.startswith("diffusion") else None, leaf=protocol[name]))
    seconds["fid"] = time.perf_counter() - t

    classifier = exs[0][1]                                       # the offline extractor's own class head
    n_classes = data.DATASETS[m.dataset]["n_classes"]
    spec = None
    if refined:
        cls, cls_cond = classifier.classify(gen["refined"]), classifier.classify(gen["treevae_drawn"])
        spec = leaf_specificity(cls, cls_cond, gen["leaf"], m.tv.n_leaves, n_classes)
        spec_cond = leaf_specificity(cls_cond, cls_cond, gen["leaf"], m.tv.n_leaves, n_classes)
        spec.update(classifier=classifier.name, treevae_purity=spec_cond["purity"],
                    test_accuracy=classifier.meta["test_acc"])   # measured when the extractor was trained
        plot_leaf_specificity(os.path.join(run_dir, "leaf_specificity.png"), spec, spec_cond, titled(
            f"{m.dataset}: class shares of each leaf's {n} refined generations ({how}; bars) and of the TreeVAE "
            f"images they were conditioned on (outline); classes by the offline extractor's classifier "
            f"(test accuracy {spec['test_accuracy']:.1%}). Purity {spec['purity']:.3f} (TreeVAE images "
            f"{spec_cond['purity']:.3f}), agreement {spec['agreement']:.3f}", m, True), CLASS_NAMES.get(m.dataset))
    seconds["total"] = time.perf_counter() - t_start
    result = dict(rows=rows, leaf_specificity=spec, n=n, seed=seed, sampler=how, dataset=m.dataset,
                  data_dir=data_dir, inception="computed" if len(exs) > 1 else note, seconds=seconds,
                  device=str(device), torch=torch.__version__, treevae_id=m.tv_id, ddpm_id=m.ddpm_id)
    out = out or os.path.join(run_dir, "eval.json")
    data.write_json(out, result)
    save_npz(os.path.splitext(out)[0] + "_images.npz", m, refined,
             **{k: v for k, v in images.items() if v is not None}, leaf=gen["leaf"], leaf_argmax=gen["leaf_argmax"],
             treevae_drawn=gen["treevae_drawn"])
    log(eval_table(result))
    if note:
        log(f"note: {note}")
    log(f"wrote {out}" + (f", {run_dir}/leaf_specificity.png" if refined else "") +
        f" and {os.path.splitext(out)[0]}_images.npz ({seconds['total'] / 60:.1f} min)")
    return result


def eval_table(result):
    """eval.json's rows as a markdown table (one per extractor) and the leaf-specificity line."""
    lines = []
    for kind in dict.fromkeys(r["extractor_kind"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["extractor_kind"] == kind]
        lines += ["", f"FID, {rows[0]['extractor']}; 95 % basic bootstrap intervals; sampler: "
                      f"{result['sampler'] or 'none (stage 1 only)'}",
                  "| row | leaf | N | FID vs test | FID vs train |", "|---|---|---|---|---|"]
        for name in dict.fromkeys(r["name"] for r in rows):
            cell = {r["reference"]: f"{r['fid']:.2f} [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]"
                    for r in rows if r["name"] == name}
            first = next(r for r in rows if r["name"] == name)
            lines.append(f"| {name} | {first['leaf'] or '-'} | {first['n']} | {cell.get('test', '-')} | "
                         f"{cell.get('train', '-')} |")
    s = result["leaf_specificity"]
    if s:
        lines.append(f"\nleaf specificity: purity {s['purity']:.3f} (TreeVAE images {s['treevae_purity']:.3f}), "
                     f"agreement {s['agreement']:.3f}, N {s['n']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Command line

def run(cfg):
    """One sampling call of the command line (each value already in its range and choices): check the request,
    load, generate and save in the chosen mode, say what was written. Returns the picture's path."""
    if cfg.all_leaves and (cfg.recons or cfg.leaf >= 0):
        raise SampleError("--all-leaves shows every leaf: drop --leaf and --recons, or drop --all-leaves")
    if cfg.tree and (cfg.all_leaves or cfg.recons or cfg.leaf >= 0):
        raise SampleError("--tree shows every leaf: drop --leaf, --recons and --all-leaves, or drop --tree")
    if cfg.evaluate and (cfg.tree or cfg.all_leaves or cfg.recons or cfg.leaf >= 0):
        raise SampleError("--evaluate scores every row at once: drop --tree, --all-leaves, --recons and --leaf")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)                      # --threads: before any work
    device, _ = data.setup_device(cfg.device)                   # the one hardware block, shared with train.py
    torch.manual_seed(cfg.seed)
    m = load_run(cfg.run, device)
    L = m.tv.n_leaves
    if not -1 <= cfg.leaf < L:
        raise SampleError(f"leaf {cfg.leaf} is out of range: this tree has {L} leaves, valid leaves are 0..{L - 1} "
                          f"(or -1 to draw the leaf)")
    if cfg.stage == "diffusion" and m.unet is None and not cfg.evaluate:     # --evaluate: stage-1 rows only
        raise SampleError(m.ddpm_problem)
    if cfg.evaluate:
        return evaluate(cfg.run, cfg.n or None, device, cfg.data_dir or None, sampler=cfg.sampler, steps=cfg.steps,
                        eta=cfg.eta, seed=cfg.seed, out=cfg.out or None, stage=cfg.stage)
    steps = cfg.steps or (run_steps(m, cfg.sampler) if m.unet is not None else None)  # --steps, else the run's
    if m.unet is not None and steps > m.unet.cfg.T:
        print(f"note: {steps} {cfg.sampler.upper()} steps > the DDPM's T = {m.unet.cfg.T}; using {m.unet.cfg.T}")
    cfg = with_run_defaults(m, cfg)
    g = _generator(device, cfg.seed)
    mode = "all_leaves" if cfg.all_leaves else "recons" if cfg.recons else f"leaf{cfg.leaf}" if cfg.leaf >= 0 \
        else "sampled"
    suffix = "_treevae" if cfg.stage == "treevae" else "_ddim" if cfg.sampler == "ddim" else ""
    # the folder of `out` is made when the picture is saved (_savefig): Ctrl-C before that leaves no empty one
    out = cfg.out or os.path.join(cfg.run, f"tree{suffix}.png" if cfg.tree else f"samples_{mode}{suffix}.png")
    npz = os.path.splitext(out)[0] + ".npz"
    write = _write_every_leaf if cfg.all_leaves or cfg.tree else _write_recons if cfg.recons else _write_samples
    what = write(m, cfg, g, out, npz)
    how_made = sampler_name(m, cfg) if cfg.stage == "diffusion" else "TreeVAE only"
    print(f"wrote {out} ({what}; {how_made}) and {npz} (key 'images': uint8 (N, C, H, W))")
    return out


def _final(m, x_hat, x, refined):
    """The pictures' uint8 pixels: the refinements x when refined, else the TreeVAE images x_hat."""
    return pixels(m, x, refined=True) if refined else pixels(m, x_hat)


def _write_every_leaf(m, cfg, g, out, npz):
    """--all-leaves (the signature figure) or --tree (the run's tree with samples under each leaf): n root samples
    at every leaf. Returns what was drawn, for the printed line."""
    n, L, refined = cfg.n or (3 if cfg.tree else 8), m.tv.n_leaves, cfg.stage == "diffusion"
    how_made = sampler_name(m, cfg) if refined else "TreeVAE only"
    x_hat, x, leaf_probs = all_leaves(m, n, cfg, g)
    final = _final(m, x_hat, x, refined)                                       # (n, L, C, H, W)
    if cfg.tree:                  # the run's tree figure, with leaf sizes and labels from its metrics.json
        metrics_path = os.path.join(cfg.run, "metrics.json")
        metrics = drop_stale(data.read_json(metrics_path, "move it away (train.py writes a new one)"), m) \
            if os.path.exists(metrics_path) else {}
        save_tree(out, m, final, metrics, f"{n} " + (f"refined samples ({how_made})" if refined
                                                     else "TreeVAE samples"), refined)
    else:
        save_all_leaves(m, out, x_hat, x, title=all_leaves_title(m, n, cfg, refined))
    leaf = torch.arange(L).repeat(n)                                           # (n * L,) row-major
    save_npz(npz, m, refined, images=final.flatten(0, 1), leaf=leaf, treevae=pixels(m, x_hat).flatten(0, 1),
             leaf_probs=leaf_probs)
    return ("the tree, " if cfg.tree else "") + f"{n} root samples x {L} leaves"


def _write_recons(m, cfg, g, out, npz):
    """--recons: random test images, their TreeVAE reconstruction at the most probable (or --leaf) leaf and its
    refinement, in row blocks of at most 16 columns."""
    n, refined = cfg.n or 16, cfg.stage == "diffusion"
    how = cfg.leaf if cfg.leaf >= 0 else "sample"
    images, _ = data.load(m.dataset, "test", cfg.data_dir or m.data_dir)
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(cfg.seed))[:n]
    x_hat, x, leaf = reconstructions(m, images[pick], how, cfg, g)
    rows = [images[pick], pixels(m, x_hat).cpu()] + ([pixels(m, x, refined=True).cpu()] if refined else [])
    ncol = min(n, 16)                                 # blocks of ncol columns: original / TreeVAE / refined
    padded = [torch.cat([r, torch.full((-n % ncol, *r.shape[1:]), 255, dtype=torch.uint8)]) for r in rows]
    blocks = [r[s:s + ncol] for s in range(0, n, ncol) for r in padded]
    labels = ["original", "TreeVAE", "refined"][:len(rows)]
    save_grid(out, torch.cat(blocks), ncol, row_labels=labels,
              title=titled(f"{m.dataset}: {n} test images (rows: {', '.join(labels)}): the TreeVAE "
                           f"reconstruction at the most probable leaf" +
                           (f", refined ({sampler_name(m, cfg)})" if refined else ""), m, refined))
    save_npz(npz, m, refined, images=rows[-1], original=rows[0], treevae=rows[1], leaf=leaf)
    return f"{n} test images: original, TreeVAE reconstruction" + (", refined" if refined else "")


def _write_samples(m, cfg, g, out, npz):
    """The default mode: n samples, each leaf drawn from P(l | z_0), or all of leaf --leaf."""
    n, refined = cfg.n or 64, cfg.stage == "diffusion"
    how_made = sampler_name(m, cfg) if refined else "TreeVAE only"
    x_hat, x, leaf = sample(m, n, cfg.leaf if cfg.leaf >= 0 else "sample", cfg, g)
    final = _final(m, x_hat, x, refined)
    what = f"{n} samples, " + (f"leaf {cfg.leaf}" if cfg.leaf >= 0 else "leaves drawn from P(l | z_0)")
    save_grid(out, final, math.ceil(math.sqrt(n)), title=titled(f"{m.dataset}: {what}; {how_made}", m, refined))
    save_npz(npz, m, refined, images=final, leaf=leaf, treevae=pixels(m, x_hat) if refined else None)
    return what


def parser():
    """sample.py's command line: one flag per SampleConfig field."""
    p = data.Parser(
        prog="sample.py", description="Sample Diffuse-TreeVAE: root sample -> leaf -> TreeVAE image -> DDPM "
        "refinement.\nWrites a PNG grid and an .npz (key 'images', uint8 (N, C, H, W)) beside it.",
        epilog="examples:\n  python sample.py --run runs/mnist --leaf 5\n  python sample.py --run runs/mnist "
               "--all-leaves --n 4\n  python sample.py --run runs/mnist --recons --stage treevae")
    data.add_flags(p, SampleConfig)                             # one flag per field, as train.py's
    return p


def main(argv=None):
    cfg = SampleConfig(**data.overrides(parser().parse_args(argv), SampleConfig))
    return run(cfg)


def cli(argv=None):
    """The script's entry point: a user error becomes one `error: ...` line on stderr and exit code 2."""
    try:
        main(argv)
    except (data.DataError, ddpm.DDPMError) as e:               # SampleError is a DataError
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:                                   # pictures are written last: none half-made
        print("interrupted (Ctrl-C); no picture written by this call", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(cli())
