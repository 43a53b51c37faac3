"""Data: MNIST, Fashion-MNIST and CIFAR-10 as uint8 tensors; pixel ranges; batches; augmentations.

File formats (read with struct/numpy; no pickle anywhere):
- IDX (MNIST, LeCun et al. 1998; Fashion-MNIST, Xiao et al. 2017), gzip-compressed, big-endian:
    images  {train,t10k}-images-idx3-ubyte.gz: magic 0x00000803 (two zero bytes, type 0x08 = uint8,
            ndim 3), uint32 N, rows, cols, then N*rows*cols pixel bytes, row-major, 0 = background
    labels  {train,t10k}-labels-idx1-ubyte.gz: magic 0x00000801, uint32 N, then N label bytes 0..9
  (t10k-* is the test split.)  An uncompressed copy (same name without .gz) is accepted too.
- CIFAR-10 binary version (Krizhevsky 2009), cifar-10-binary.tar.gz, members
    cifar-10-batches-bin/data_batch_1.bin .. data_batch_5.bin (train), cifar-10-batches-bin/test_batch.bin
  each 10,000 records of 3073 bytes: 1 label byte, then 1024 red, 1024 green, 1024 blue bytes (32x32,
  row-major). The members are read straight out of the tar; nothing is ever extracted to disk.

Where files go: load(name, split, root) looks in root/<folder> (folder = mnist, fashion-mnist, cifar10),
then in root itself, so root may be the parent folder or the folder holding the files. Missing files are
downloaded from DATASETS[name]["mirrors"] (tried in order), checked against the published checksum and
renamed into place only when complete (os.replace). Offline, put the files there by hand; a copy whose
checksum differs from the published one (e.g. a subset) is used, with a note, if its format is valid.

Symbols: N images, C channels, H = W = image size, B batch size. Pixel ranges live here and nowhere else:
uint8 {0..255} --to_float--> [0, 1] (TreeVAE) or [-1, 1] (DDPM, signed=True) --to_uint8--> uint8.

    images, labels = load("fashion_mnist", "train", root="data")   # (60000, 1, 28, 28) uint8, (60000,)
    train_idx, val_idx = train_val_split(len(images))               # the test split is for the end only
    batches = Batches(images[train_idx], labels[train_idx], batch_size=256, device="cuda")
    for x, y in batches.epoch(e): ...                               # x (B, 1, 28, 28) float in [0, 1]
"""
import argparse
import contextlib
import dataclasses
import gzip
import hashlib
import http.client
import io
import json
import math
import os
import struct
import sys
import tarfile
import tempfile
import textwrap
import urllib.request
import zlib

import numpy as np
import torch
import torch.nn.functional as F


class DataError(Exception):
    """A data problem the user can fix (missing, corrupt, unreachable files); one line: cause + remedy."""


# ----------------------------------------------------------------------------- the data sets
_IDX_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
              "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
_CIFAR_ARCHIVE = "cifar-10-binary.tar.gz"
_CIFAR_MEMBERS = {"train": [f"cifar-10-batches-bin/data_batch_{i}.bin" for i in range(1, 6)],
                  "test": ["cifar-10-batches-bin/test_batch.bin"]}
_CIFAR_RECORD = 1 + 3 * 32 * 32  # label byte + R, G, B planes

# likelihood: the TreeVAE decoder's output distribution (the authors' configs: a sigmoid output with BCE for the grey
# MNISTs, a linear output with the summed squared error, 'mse', for CIFAR-10). Mirrors are base URLs, tried in order; tests point them at file:// folders.
DATASETS = {
    "mnist": dict(
        channels=1, size=28, n_classes=10, likelihood="bernoulli", folder="mnist", files=_IDX_FILES,
        mirrors=["https://ossci-datasets.s3.amazonaws.com/mnist/",
                 "https://storage.googleapis.com/cvdf-datasets/mnist/"],
        checksums={  # md5, as torchvision lists them
            "train-images-idx3-ubyte.gz": ("md5", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
            "train-labels-idx1-ubyte.gz": ("md5", "d53e105ee54ea40749a09fcbcd1e9432"),
            "t10k-images-idx3-ubyte.gz": ("md5", "9fb629c4189551a2d022fa330f9573f3"),
            "t10k-labels-idx1-ubyte.gz": ("md5", "ec29112dd5afa0611ce80d1b7f02629c")}),
    "fashion_mnist": dict(
        channels=1, size=28, n_classes=10, likelihood="bernoulli", folder="fashion-mnist", files=_IDX_FILES,
        mirrors=["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
                 "https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/"],
        checksums={  # sha256 of the files on the mirrors below (zalandoresearch/fashion-mnist)
            "train-images-idx3-ubyte.gz": ("sha256", "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7"),
            "train-labels-idx1-ubyte.gz": ("sha256", "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056"),
            "t10k-images-idx3-ubyte.gz": ("sha256", "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa"),
            "t10k-labels-idx1-ubyte.gz": ("sha256", "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05")}),
    "cifar10": dict(
        channels=3, size=32, n_classes=10, likelihood="gaussian", folder="cifar10",
        files={"train": (_CIFAR_ARCHIVE,), "test": (_CIFAR_ARCHIVE,)},
        mirrors=["https://www.cs.toronto.edu/~kriz/"],
        checksums={_CIFAR_ARCHIVE: ("md5", "c32a1d4ab5d03f1284b67883e8d87530")}),  # the authors' page
}
_ALIASES = {"fashion-mnist": "fashion_mnist", "fmnist": "fashion_mnist", "cifar-10": "cifar10"}


def canonical_name(name):
    """'mnist' | 'fashion_mnist' | 'cifar10' for a data set name or alias (case-insensitive)."""
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise DataError(f"unknown data set {name!r}: choose one of mnist, fashion_mnist "
                        f"(or fashion-mnist, fmnist), cifar10")
    return key


def describe(name):
    """What a model needs to know about a data set: channels, image size, classes, likelihood hint."""
    spec = DATASETS[canonical_name(name)]
    return {k: spec[k] for k in ("channels", "size", "n_classes", "likelihood")}


# ----------------------------------------------------------------------------- hardware
# The one place that knows about devices and precision: every script calls these, so a bad --device or
# --precision is the same one-line error everywhere, and the models never ask where they run.
def device(name):
    """The torch.device for --device auto | cpu | cuda[:N] | mps, or a one-line DataError (every script's check;
    the data set lives there: Batches)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name.split(":")[0] not in ("cpu", "cuda", "mps"):
        raise DataError(f"unknown device {name!r}: use auto, cpu, cuda (or cuda:N) or mps")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DataError("--device cuda but no CUDA GPU is visible: use --device cpu")
    return torch.device(name)


def setup_device(name, precision="auto"):
    """(device, autocast) for train.py, sample.py and bench.py: autocast() is the context the models run in.
    bf16 autocast keeps the weights, the optimiser and every loss in float32 (the models cast their outputs up
    before a loss); only matmuls and convs run in bf16. On a CPU with bf16 units (AVX512-BF16 / AMX) it speeds up
    the U-Net too; fp32 is the default there."""
    if precision not in ("auto", "bf16", "fp32"):
        raise DataError(f"unknown precision {precision!r}: use auto, bf16 or fp32")
    dev = device(name)
    if dev.type == "cuda":
        # TF32 (10-bit mantissa) for the float32 matmuls and convs that bf16 autocast leaves (as in the measured GPU
        # runs); `--precision fp32` asks for float32, so there none.
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision != "fp32"
        torch.backends.cudnn.benchmark = True      # fixed shapes: let cuDNN time its algorithms once per shape
    bf16 = precision == "bf16" or (precision == "auto" and dev.type == "cuda")
    if bf16 and dev.type not in ("cuda", "cpu"):
        raise DataError(f"bf16 autocast is not supported on {dev.type}: use --precision fp32")
    # cache_enabled=False: a cached bf16 weight copy would go stale inside a replayed CUDA graph
    autocast = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16, cache_enabled=False)) if bf16 \
        else contextlib.nullcontext
    return dev, autocast


# ----------------------------------------------------------------------------- several processes (torchrun)
# Under torchrun, K processes train together (train.py's distributed section): every one forms the same global batch
# (the same permutation, from the shared seed) and keeps its rows, b = B / K of them. These two helpers are what the
# models need of that; with one process (no process group) they are the identity and plain draws.
def world():
    """(rank, K): this process's index and the number of processes training together; (0, 1) without torchrun,
    and inside alone()."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() and not _alone:
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


_alone = False


@contextlib.contextmanager
def alone():
    """A block where world() is (0, 1): what rank 0 measures by itself (train.py's planner) runs as one process,
    with no all-reduce that the other processes would have to join."""
    global _alone
    _alone = True
    try:
        yield
    finally:
        _alone = False


def my_rows(t):
    """This process's shard of a global-batch tensor: rows r b .. (r + 1) b - 1 of t (K b, ...), b = len(t) / K.
    The K shards are disjoint and cover the global batch, in rank order."""
    rank, K = world()
    b = len(t) // K
    return t if K == 1 else t[rank * b:(rank + 1) * b]


class _BothViews(torch.autograd.Function):
    """all_views' gather, with the gradient of a loss that every process computes alike on the gathered rows."""

    @staticmethod
    def forward(ctx, t):
        rank, K = world()
        parts = [torch.empty_like(t) for _ in range(K)]
        torch.distributed.all_gather(parts, t.contiguous())
        b = len(t) // 2
        return torch.cat([p[:b] for p in parts] + [p[b:] for p in parts])        # (2 K b, ...): view 1, view 2

    @staticmethod
    def backward(ctx, g):
        # Every process computed the same loss on the same gathered rows, so g is the same everywhere and this
        # process's rows of it are the loss's gradient for its rows. DDP then averages the parameters' gradients
        # over the K processes, i.e. divides the sum of the K row-shares by K: hence K x (what SimCLR's
        # all_reduce of g does, without a collective in the backward pass).
        rank, K = world()
        return K * my_view_rows(g)


def all_views(t):
    """The global batch's rows of a two-view tensor: t (2 b, ...) holds this process's view-1 rows then its view-2
    rows; returns (2 K b, ...) = all processes' view-1 rows in rank order, then their view-2 rows: exactly the
    tensor one process holds for the same global batch. A loss over the whole batch (the contrastive terms, whose
    negatives are the other images) computed on it is therefore the one-process loss, and its gradient reaches this
    process's rows. The identity with one process."""
    return t if world()[1] == 1 else _BothViews.apply(t)


def my_view_rows(t):
    """This process's rows of a two-view global-batch tensor t (2 K b, ...) = [view-1 rows; view-2 rows] (the
    layout of all_views): its view-1 rows then its view-2 rows, (2 b, ...). The identity with one process."""
    rank, K = world()
    b = len(t) // (2 * K)
    return t if K == 1 else torch.cat([t[rank * b:(rank + 1) * b], t[(K + rank) * b:(K + rank + 1) * b]])


def batch_random(fill, shape, dtype=torch.float32, device="cpu", memory_format=torch.contiguous_format,
                 views=False):
    """Random numbers for this process's b rows (shape (b, ...)) of the global batch: fill (an in-place sampler,
    e.g. lambda u: u.normal_()) fills the whole global batch's tensor (K b, ...), and this process keeps its rows
    (my_rows). Every process holds the same RNG state (same seed, same draws), so the K shards get the numbers that
    one process draws for the same global batch: the run does not depend on K (up to the rounding of the sums over
    processes), and --resume may change K. The price is K x the draws, small beside the convolutions they feed.
    With one process this is exactly torch.randn(shape) / rand_like / randint (each is empty(...).fill).
    views=True: the rows are two views concatenated (CIFAR-10's contrastive batch), picked by my_view_rows."""
    K = world()[1]
    u = torch.empty((K * shape[0], *shape[1:]), dtype=dtype, device=device, memory_format=memory_format)
    return (my_view_rows if views else my_rows)(fill(u))


# ----------------------------------------------------------------------------- loading
def load(name, split="train", root="data", download=True, mirrors=None):
    """(images uint8 (N, C, H, W), labels int64 (N,)) of one split, downloading missing files if allowed.

    mirrors: base URLs to use instead of DATASETS[name]["mirrors"] (the tests pass file:// folders)."""
    name = canonical_name(name)
    spec = DATASETS[name]
    if split not in ("train", "test"):
        raise DataError(f"unknown split {split!r}: use 'train' or 'test' (carve validation with train_val_split)")
    fnames = spec["files"][split]
    folder = _locate(spec, root, fnames)
    missing = [f for f in fnames if _find(folder, f) is None]
    # Every file of the data set that is not there, both splits: one message then covers all a user must copy
    # (the test files are needed too, at the end of every run), not only the split asked for first.
    absent = [f for f in dict.fromkeys(spec["files"]["train"] + spec["files"]["test"]) if _find(folder, f) is None]
    by_hand = (f"put {', '.join(absent)} into {os.path.abspath(folder)} by hand, or give the folder that holds "
               f"them with --data-dir")
    if missing and not download:
        raise DataError(f"{', '.join(missing)} not found in {os.path.abspath(folder)}: {by_hand} "
                        f"(or call load(..., download=True))")
    for fname in missing:
        _download(fname, folder, mirrors or spec["mirrors"], spec["checksums"][fname], by_hand)
    paths = [_find(folder, f) for f in fnames]
    differ = []  # files that differ from the published ones and have not been noted in this folder before
    if name == "cifar10":
        images, labels = _read_cifar(paths[0], _CIFAR_MEMBERS[split], spec["checksums"], differ)
    else:
        images = _read_idx(paths[0], 3, spec["checksums"], differ)
        labels = _read_idx(paths[1], 1, spec["checksums"], differ)
        images = images[:, None]  # (N, 1, 28, 28): the grey images get their channel axis
    if differ:  # one line per call, once per folder: _note_due remembers what was noted
        print(f"note: {', '.join(os.path.basename(p) for p in differ)} in {os.path.abspath(folder)}: checksum "
              f"({spec['checksums'][os.path.basename(differ[0])][0]}) differs from the published file; used as is "
              f"(a subset or another copy?)", file=sys.stderr)
    # The header may be self-consistent and still not be this data set (a wrong file placed by hand).
    want = (spec["channels"], spec["size"], spec["size"])
    if tuple(images.shape[1:]) != want:
        raise DataError(f"{paths[0]} holds images of shape {tuple(images.shape[1:])}, {name} has {want}: "
                        f"delete it and rerun to download it, or place the right file by hand")
    if len(labels) != len(images):
        raise DataError(f"{paths[-1]} has {len(labels)} labels for {len(images)} images in {paths[0]}: "
                        f"the files do not belong together; delete them and rerun, or place matching ones")
    if len(labels) and labels.max() >= spec["n_classes"]:
        raise DataError(f"{paths[-1]} has label {labels.max()} >= {spec['n_classes']} classes: "
                        f"delete it and rerun to download it, or place a valid file by hand")
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


def _find(folder, fname):
    """Path of fname in folder (an uncompressed IDX copy, name without .gz, also counts), else None."""
    for candidate in (fname, fname[:-3] if fname.endswith("-ubyte.gz") else None):
        if candidate and os.path.isfile(os.path.join(folder, candidate)):
            return os.path.join(folder, candidate)
    return None


def _locate(spec, root, fnames):
    """The folder to read from: root/<folder> (parent layout) or root (the folder itself), complete first."""
    sub, every = os.path.join(root, spec["folder"]), spec["files"]["train"] + spec["files"]["test"]
    # A complete folder wins; a partial one (holding any file of the data set, of either split) is completed
    # where it is, so both splits are looked for in the same place.
    for present, names in ((all, fnames), (any, every)):
        for folder in (sub, root):
            if present(_find(folder, f) for f in names):
                return folder
    # Nothing there yet: download into root/<folder>, unless root already is that folder.
    return root if os.path.basename(os.path.normpath(root)) == spec["folder"] else sub


_noted = set()  # files noted in this process (a read-only folder cannot remember them)
_RECORD = ".checksums.json"  # beside the data: {file name: [size, mtime_ns, algorithm, hex digest]}


def _note_due(path, raw, algo, published):
    """True when path (its bytes: raw) differs from the published file and this folder has not said so before.
    Such a file is remembered in the folder's record, keyed by its size and modification time (a file copied
    over it is checked afresh), so later calls skip both the note and the hashing. Files that match are not
    recorded: the folder keeps only the data unless there is something to remember. A folder without write
    permission (or any write error) keeps no record: everything still works, the note just comes every call."""
    folder, name = os.path.split(path)
    st, record_path = os.stat(path), os.path.join(folder, _RECORD)
    key = [st.st_size, st.st_mtime_ns, algo]
    try:
        with open(record_path) as f:
            record = json.load(f)
        entry = record.get(name)
    except (OSError, ValueError, AttributeError):  # none yet, unreadable or not ours: start afresh
        record, entry = {}, None
    if isinstance(entry, list) and entry[:3] == key:
        return False  # noted on an earlier call
    digest = hashlib.new(algo, raw).hexdigest()
    if digest == published:
        return False
    # Root may write into a folder marked read-only; a folder without write bits is left alone even so.
    if os.stat(folder or ".").st_mode & 0o222:
        record[name], tmp = key + [digest], None
        try:
            fd, tmp = tempfile.mkstemp(prefix=f"{_RECORD}.", suffix=".part", dir=folder or ".")
            with os.fdopen(fd, "w") as f:
                json.dump(record, f)
            os.chmod(tmp, 0o644)  # mkstemp's 0o600 would hide the record from the folder's other users
            os.replace(tmp, record_path)  # atomic: two processes at once never leave a half-written record
        except OSError:
            if tmp and os.path.exists(tmp):
                os.remove(tmp)
    return True


def _read_checked(path, checksums, differ):
    """The bytes of a file; a published file under its published name is compared with its checksum, and
    appended to `differ` when it differs and was not noted before (_note_due; once per process in any case)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"cannot read {path} ({e.strerror}): check its permissions or place it again") from None
    algo, digest = checksums.get(os.path.basename(path), (None, None))
    # A differing checksum is only a note: subsets and re-encodings placed by hand are fine if the
    # format checks below pass. Downloads were verified before they got their final name.
    if algo and path not in _noted and _note_due(path, raw, algo, digest):
        _noted.add(path)
        differ.append(path)
    return raw


def _read_idx(path, ndim, checksums, differ):
    """The array of an IDX file (gzip or raw), after checking magic number, dimensions and size."""
    remedy = "delete it and rerun to download it again, or place a valid copy there by hand"
    raw = _read_checked(path, checksums, differ)
    if raw[:2] == b"\x1f\x8b":  # gzip magic: decompress in one go (~0.25 s for 47 MB)
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:  # truncated stream, bad CRC, not gzip after all
            raise DataError(f"{path} is a broken gzip file ({e}): {remedy}") from None
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08" or raw[3] != ndim:
        raise DataError(f"{path} is not an IDX file of {ndim}-d uint8 (magic {raw[:4].hex() or 'missing'}, "
                        f"want 000008{ndim:02x}): {remedy}")
    header = 4 + 4 * ndim  # magic + one uint32 per dimension
    if len(raw) < header:
        raise DataError(f"{path} ends inside its IDX header: {remedy}")
    dims = struct.unpack(f">{ndim}I", raw[4:header])  # big-endian, as the format says
    if len(raw) != header + math.prod(dims):
        raise DataError(f"{path} has {len(raw) - header} data bytes but its header {dims} promises "
                        f"{math.prod(dims)} (truncated?): {remedy}")
    # frombuffer is a zero-copy view of read-only bytes; copy once so torch gets a writable array.
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims).copy()


def _read_cifar(path, members, checksums, differ):
    """(images (N, 3, 32, 32), labels (N,)) from the named members of the CIFAR-10 binary tar archive."""
    remedy = "delete it and rerun to download it again, or place the real cifar-10-binary.tar.gz by hand"
    raw = _read_checked(path, checksums, differ)
    found = {}
    try:
        # Stream mode ('r|*'): one pass through the (gzip) archive, members read in memory, never extracted.
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r|*") as tar:
            for member in tar:
                parts = member.name.replace("\\", "/").split("/")
                # Refuse names that would land outside a target folder, even though we never extract:
                # such an archive is not the published one and should not be trusted.
                if member.name.startswith(("/", "\\")) or ".." in parts or os.path.isabs(member.name):
                    raise DataError(f"{path} has a member {member.name!r} pointing outside its folder; "
                                    f"refusing the archive: {remedy}")
                name = member.name[2:] if member.name.startswith("./") else member.name
                if name in members and member.isfile():
                    found[name] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path} is a broken tar.gz archive ({e}): {remedy}") from None
    lacking = [m for m in members if m not in found]
    if lacking:
        raise DataError(f"{path} lacks {', '.join(lacking)} (not the binary version?): {remedy}")
    for m in members:
        if len(found[m]) % _CIFAR_RECORD:
            raise DataError(f"{path}: {m} has {len(found[m])} bytes, not a multiple of the "
                            f"{_CIFAR_RECORD}-byte record: {remedy}")
    records = np.concatenate([np.frombuffer(found[m], np.uint8).reshape(-1, _CIFAR_RECORD) for m in members])
    # Record = label, then the R, G, B planes: exactly the (3, 32, 32) channel-first layout.
    return records[:, 1:].reshape(-1, 3, 32, 32).copy(), records[:, 0].copy()


def _download(fname, folder, mirrors, checksum, by_hand):
    """Fetch fname from the first mirror that serves it with the right checksum, atomically. by_hand: the
    remedy that ends the error when no mirror serves it (which files to place where)."""
    where, algo, digest = os.path.abspath(folder), *checksum
    tried = []
    try:
        with new_folder(folder):  # a failed or interrupted download removes the (empty) folders it made
            # A hidden temporary name in the same folder: os.replace onto the final name is then atomic,
            # and an interrupted or corrupt download never sits under the final name.
            fd, tmp = tempfile.mkstemp(prefix=f".{fname}.", suffix=".part", dir=folder)
            os.close(fd)
            try:
                for base in mirrors:
                    url = base.rstrip("/") + "/" + fname
                    hasher = hashlib.new(algo)
                    try:
                        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
                            while chunk := response.read(1 << 20):  # 1 MB chunks: hash while writing
                                f.write(chunk)
                                hasher.update(chunk)
                    except (OSError, ValueError, http.client.HTTPException) as e:  # URLError is an OSError
                        tried.append(f"{url} ({getattr(e, 'reason', None) or e})")
                        continue
                    if hasher.hexdigest() != digest:
                        tried.append(f"{url} (checksum mismatch: {algo} {hasher.hexdigest()[:12]}.., "
                                     f"published {digest[:12]}..)")
                        continue
                    os.replace(tmp, os.path.join(folder, fname))
                    print(f"downloaded {url} -> {where}", file=sys.stderr)
                    return
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
            raise DataError(f"could not download {fname}: tried {'; '.join(tried)}; if offline, {by_hand}")
    except OSError as e:  # the folder or the temporary file could not be made
        raise DataError(f"cannot write into {where} ({e.strerror}): pass a writable folder, or {by_hand}") from None


@contextlib.contextmanager
def new_folder(path):
    """Make the folder `path` (and its missing parents) for the block; when the block ends by an exception (an
    error, Ctrl-C) before anything was written there, remove the folders it made, so that no empty run folder is
    left behind. A folder that existed before is never removed."""
    made, p = [], os.path.abspath(path)
    while not os.path.isdir(p):  # the folders this call creates, deepest first
        made.append(p)
        p = os.path.dirname(p)
    os.makedirs(path, exist_ok=True)
    try:
        yield path
    except BaseException:
        for folder in made:
            try:
                os.rmdir(folder)  # only an empty folder goes
            except OSError:
                break
        raise


# ----------------------------------------------------------------------------- pixel ranges
def to_float(x_uint8, signed=False):
    """uint8 {0..255} -> float32 in [0, 1], or in [-1, 1] when signed (the DDPM's range)."""
    if x_uint8.dtype != torch.uint8:
        raise TypeError(f"to_float expects uint8 pixels, got {x_uint8.dtype}")
    x = x_uint8.float() / 255.0
    return x * 2.0 - 1.0 if signed else x


def to_uint8(x_float, signed=False, source="the model"):
    """Inverse of to_float: round to the nearest level and clamp, so slightly-out-of-range outputs are fine.
    NaN or inf (a diverged model) raise NonFiniteError naming `source` (e.g. the checkpoint that made the images):
    the clamp would turn them into black or white pixels that look like a result."""
    check_finite(x_float, f"images made by {source}", "nothing was saved or scored: retrain or replace that model")
    x = (x_float + 1.0) / 2.0 if signed else x_float
    return (x * 255.0).round().clamp(0, 255).to(torch.uint8)


# ----------------------------------------------------------------------------- run files and finite numbers
# Every file a script reads back (checkpoints, metrics.json, .npz samples and features, cached extractors) goes
# through one reader per type, so that a damaged file (an interrupted copy, a full disk) is one line naming the file
# and the remedy, never a traceback. Files that depend on others record their fingerprints (see fingerprint).
class NonFiniteError(DataError):
    """NaN or inf where a result must be finite (a diverged model, a damaged file); one line: what, whose, remedy."""


def check_finite(x, what, remedy):
    """x itself if every value is finite, else NonFiniteError '<what>: k of n values are NaN or inf; <remedy>'.
    One host sync: for results (images, features, metrics, checkpoints), never inside a training step."""
    bad = int((~torch.isfinite(torch.as_tensor(x))).sum())
    if bad:
        raise NonFiniteError(f"{what}: {bad} of {torch.as_tensor(x).numel()} values are NaN or inf; {remedy}")
    return x


def nonfinite_tensor(tensors):
    """The name of the first floating-point tensor of a state dict that holds NaN or inf, else None (one sync)."""
    names = [k for k, v in tensors.items() if torch.is_tensor(v) and v.is_floating_point()]
    if not names:
        return None
    finite = torch.stack([tensors[k].isfinite().all() for k in names]).cpu()    # (n_tensors,) bool
    return None if finite.all() else names[int((~finite).nonzero()[0])]


def fingerprint(tensors):
    """12 hex digits of a SHA-1 over a state dict's names and bytes. A file made from weights records their
    fingerprint (ddpm.pt: treevae.pt's; metrics.json and samples.npz: both), so a reader can tell a stale file."""
    h = hashlib.sha1()
    for k, v in sorted(tensors.items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:12]


def read_checkpoint(path, remedy, finite=()):
    """The dict torch.save wrote at path, read safely (weights_only, tensors on the CPU), or a one-line DataError
    '<cause>: <remedy>' for a missing, truncated or foreign file, or NaN/inf in one of the `finite` entries (state
    dicts)."""
    if not os.path.exists(path):
        raise DataError(f"no {path}: {remedy}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch's message is a zip reader's or unpickler's; the cause is the file
        raise DataError(f"cannot read {path} ({type(e).__name__}: damaged, e.g. an interrupted copy or a full "
                        f"disk, or not written by this code): {remedy}") from None
    if not isinstance(ckpt, dict):
        raise DataError(f"{path} is not a checkpoint of this code: {remedy}")
    for key in finite:
        name = nonfinite_tensor(ckpt.get(key) or {})
        if name:
            raise NonFiniteError(f"{path} holds NaN/inf weights ({key} {name}): {remedy}")
    return ckpt


def read_json(path, remedy):
    """The dict in a JSON file (metrics.json), or a one-line DataError for a damaged one."""
    try:
        with open(path) as f:
            out = json.load(f)
    except (OSError, ValueError) as e:  # ValueError: JSONDecodeError (a truncated file), UnicodeDecodeError
        raise DataError(f"cannot read {path} ({type(e).__name__}: damaged or not JSON): {remedy}") from None
    if not isinstance(out, dict):
        raise DataError(f"{path} holds a JSON {type(out).__name__}, not the dict this code writes: {remedy}")
    return out


def write_json(path, obj):
    """obj as JSON, written to a temporary name and renamed: an interrupted write never leaves half a file."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def read_npz(path, remedy, need=()):
    """Every array of an .npz file (numpy, no pickles), or a one-line DataError for a missing, damaged or foreign
    file or one without the arrays named in `need`."""
    try:
        with np.load(path) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as e:  # OSError, BadZipFile (truncated), ValueError (pickled objects), zlib.error, ...
        why = e.strerror if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: damaged or not an .npz"
        raise DataError(f"cannot read {path} ({why}): {remedy}") from None
    missing = [k for k in need if k not in arrays]
    if missing:
        raise DataError(f"{path} has no array '{missing[0]}' (it has {', '.join(arrays) or 'none'}): {remedy}")
    return arrays


# ----------------------------------------------------------------------------- splits and batches
def train_val_split(n, val_fraction=0.1, seed=0):
    """(train_idx, val_idx): sorted, disjoint LongTensors covering range(n), a function of (n, fraction, seed)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))  # private RNG
    n_val = int(round(n * val_fraction))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def _epoch_seed(seed, epoch):
    # Hash the pair so (seed, epoch) pairs never collide the way seed + epoch would.
    return int.from_bytes(hashlib.sha256(f"{seed}:{epoch}".encode()).digest()[:8], "little")


class Batches:
    """Shuffled float mini-batches of a data set kept whole on `device` as uint8 (no DataLoader).

    MNIST-sized data (47 MB as uint8) fits on any GPU; indexing it there and converting per batch costs
    microseconds, and the order is a pure function of (seed, epoch), so a resumed run sees exactly the
    batches it would have seen (epoch(e, start)). Shuffling uses its own CPU generator: the global RNG,
    and with it the training's reproducibility, is untouched."""

    def __init__(self, images_uint8, labels=None, batch_size=256, device="cpu", shuffle=True,
                 drop_last=True, signed=False, seed=0):
        if images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4:
            raise TypeError(f"Batches expects uint8 images (N, C, H, W), got {images_uint8.dtype} "
                            f"{tuple(images_uint8.shape)}")
        if labels is not None and len(labels) != len(images_uint8):
            raise ValueError(f"{len(labels)} labels for {len(images_uint8)} images")
        if drop_last and len(images_uint8) < batch_size:
            raise DataError(f"{len(images_uint8)} images are fewer than one batch of {batch_size}: "
                            f"lower batch_size or use drop_last=False")
        self.device = torch.device(device)
        self.images = images_uint8.to(self.device)  # (N, C, H, W) uint8, resident
        self.labels = None if labels is None else labels.to(self.device, torch.int64)  # (N,)
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.signed, self.seed = signed, seed

    def __len__(self):
        n, b = len(self.images), self.batch_size
        return n // b if self.drop_last else -(-n // b)  # the last partial batch is dropped or kept

    def permutation(self, e):
        """The order of epoch e (N,), on the CPU: depends on (seed, e) only."""
        if not self.shuffle:
            return torch.arange(len(self.images))
        return torch.randperm(len(self.images), generator=torch.Generator().manual_seed(_epoch_seed(self.seed, e)))

    def epoch(self, e, start=0):
        """Iterator over (x float32 (B, C, H, W) on device, y int64 (B,) or None) from batch `start` on."""
        if not 0 <= start <= len(self):
            raise ValueError(f"start={start} outside 0..{len(self)}")
        perm = self.permutation(e).to(self.device)  # (N,) moved once per epoch
        return self._gather(perm, start)

    def _gather(self, perm, start):
        b = self.batch_size
        for i in range(start, len(self)):
            idx = perm[i * b:(i + 1) * b]  # (B,)
            x = to_float(self.images[idx], self.signed)  # gather uint8 on the device, then convert
            yield x, None if self.labels is None else self.labels[idx]

    def __iter__(self):
        return self.epoch(0)


# ----------------------------------------------------------------------------- augmentations
def augment(x, generator=None):
    """A SimCLR view (Chen et al. 2020) of each image, the augmentation of TreeVAE's contrastive CIFAR-10 training
    (the authors' cifar10.yml, augmentation_method 'InfoNCE,instancewise_full'): x float (B, C, H, W) in [0, 1] ->
    the same shape and range.

    torchvision's CIFAR recipe, as the authors use it, batched on x's device with per-sample parameters:
    RandomResizedCrop(scale 0.2-1, ratio 3/4-4/3), HorizontalFlip(0.5), ColorJitter(0.4, 0.4, 0.4, 0.1) with p 0.8,
    Grayscale with p 0.2. One-channel input skips the colour operations that need three channels. Random numbers
    come from `generator` (else the global RNG), drawn in a fixed order: crop, flip, jitter, grayscale."""
    if x.dim() != 4 or not x.is_floating_point():
        raise TypeError(f"augment expects float images (B, C, H, W), got {x.dtype} {tuple(x.shape)}")
    B = x.shape[0]
    gen_device = generator.device if generator is not None else torch.device("cpu")

    def uniform(lo, hi, *shape):  # drawn where the generator lives, then moved to the images
        return lo + (hi - lo) * torch.rand(shape or (B,), generator=generator, device=gen_device).to(x.device)

    x = _crop_and_flip(x, uniform)
    x = _colour_jitter(x, uniform)
    # 4. Grayscale with p 0.2 (three channels only): the luma replaces every channel.
    grey = uniform(0, 1) < 0.2
    if x.shape[1] == 3:
        x = torch.where(grey.view(B, 1, 1, 1), _luma(x).expand_as(x), x)
    return x.clamp(0, 1)


def _crop_and_flip(x, uniform):
    """Steps 1-2 of augment: a random resized crop with a random horizontal flip, one bilinear resampling."""
    B, C, H, W = x.shape
    # 1. Random resized crop. torchvision draws up to 10 (area, ratio) pairs and keeps the first that fits
    #    in the image, else takes the whole image; we draw the 10 candidates for every sample at once.
    area = H * W * uniform(0.2, 1.0, B, 10)  # (B, 10) pixels^2
    ratio = torch.exp(uniform(math.log(3 / 4), math.log(4 / 3), B, 10))  # log-uniform, as torchvision
    w, h = (area * ratio).sqrt(), (area / ratio).sqrt()  # (B, 10)
    fits = (w <= W) & (h <= H)
    first = fits.float().argmax(1, keepdim=True)  # index of the first fitting candidate, (B, 1)
    w = torch.where(fits.any(1), w.gather(1, first)[:, 0], torch.full_like(w[:, 0], W))  # (B,)
    h = torch.where(fits.any(1), h.gather(1, first)[:, 0], torch.full_like(h[:, 0], H))
    x0, y0 = uniform(0, 1) * (W - w), uniform(0, 1) * (H - h)  # top-left corner (continuous, not integer)
    # 2. Horizontal flip, folded into the same sampling grid by mirroring its x axis.
    flip = torch.where(uniform(0, 1) < 0.5, -1.0, 1.0)
    # affine_grid maps output coordinates in [-1, 1] to input ones; with align_corners=False, -1 and 1 are
    # the outer pixel edges, so the crop [x0, x0 + w] has centre (2 x0 + w) / W - 1 and half-width w / W.
    theta = torch.zeros(B, 2, 3, device=x.device)
    theta[:, 0, 0], theta[:, 0, 2] = flip * w / W, (2 * x0 + w) / W - 1
    theta[:, 1, 1], theta[:, 1, 2] = h / H, (2 * y0 + h) / H - 1
    grid = F.affine_grid(theta.to(x.dtype), (B, C, H, W), align_corners=False)  # (B, H, W, 2)
    # Bilinear weights are convex, so the result stays in [0, 1]; crops only magnify (no antialiasing needed).
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _colour_jitter(x, uniform):
    """Step 3 of augment: torchvision's ColorJitter(0.4, 0.4, 0.4, 0.1) with p 0.8, its four operations in a random
    order per sample; grey images get brightness and contrast only."""
    B, C = x.shape[:2]
    # Samples left alone get the identity factors (1, 1, 1, 0).
    jitter = uniform(0, 1) < 0.8
    factors = [torch.where(jitter, uniform(0.6, 1.4), 1.0) for _ in range(3)]  # brightness, contrast, sat.
    factors.append(torch.where(jitter, uniform(-0.1, 0.1), 0.0))  # hue shift, in turns of the colour wheel
    factors = [f.view(B, 1, 1, 1).to(x.dtype) for f in factors]
    # torchvision's ops, each a blend f * x + (1 - f) * target: brightness towards black, contrast towards
    # the image's mean grey level, saturation towards its own grey version; hue rotates the colour wheel.
    grey_level = _luma if C == 3 else (lambda x: x)
    ops = [lambda x, f: _blend(x, f, 0.0),
           lambda x, f: _blend(x, f, grey_level(x).mean((1, 2, 3), keepdim=True)),  # (B, 1, 1, 1) target
           lambda x, f: _blend(x, f, _luma(x)), _hue][:4 if C == 3 else 2]  # grey images: 2 of the 4
    order = uniform(0, 1, B, 4).argsort(1)  # (B, 4): a random permutation of the operations per sample
    for step in range(4):
        for k, op in enumerate(ops):
            # torch.where computes the op for the whole batch: no host sync; 32x32 images are cheap.
            x = torch.where((order[:, step] == k).view(B, 1, 1, 1), op(x, factors[k]), x)
    return x


def _luma(x):  # (B, 3, H, W) -> (B, 1, H, W); ITU-R 601 weights, as torchvision's rgb_to_grayscale
    return 0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def _blend(x, f, target):  # torchvision's _blend: f = 1 is the identity, f = 0 gives the target
    return (f * x + (1 - f) * target).clamp(0, 1)


def _hue(x, f):  # hue shift through RGB -> HSV -> RGB in torch (torchvision's method, not a YIQ rotation)
    hsv = _rgb_to_hsv(x)  # (B, 3, H, W)
    return _hsv_to_rgb(torch.cat([(hsv[:, :1] + f) % 1.0, hsv[:, 1:]], 1))


def _rgb_to_hsv(x):  # (B, 3, H, W) in [0, 1] -> (B, 3, H, W): hue in turns [0, 1), saturation, value
    r, g, b = x.unbind(1)
    v, _ = x.max(1)
    delta = v - x.min(1).values
    s = delta / v.clamp_min(1e-12)  # black: s = 0
    d = delta.clamp_min(1e-12)  # grey pixels: any hue is right, avoid 0/0
    h = torch.where(v == r, (g - b) / d, torch.where(v == g, 2.0 + (b - r) / d, 4.0 + (r - g) / d))
    return torch.stack([(h / 6.0) % 1.0, s, v], 1)


def _hsv_to_rgb(hsv):  # inverse of _rgb_to_hsv, the closed form f(n) = v - v s clamp(min(k, 4 - k), 0, 1)
    h, s, v = hsv.split(1, dim=1)  # (B, 1, H, W) each
    n = torch.tensor([5.0, 3.0, 1.0], device=hsv.device, dtype=hsv.dtype).view(1, 3, 1, 1)  # R, G, B
    k = (n + 6.0 * h) % 6.0  # (B, 3, H, W): position of each channel on the hexagon
    return v - v * s * torch.clamp(torch.minimum(k, 4.0 - k), 0, 1)


# ----------------------------------------------------------------------------- command lines
# Every option of every script states its meaning, unit and valid values once, next to its default: a config
# dataclass declares its fields with setting() and add_flags turns them into flags (fid.py and bench.py, which
# have no config dataclass, hand Range and choices to add_argument). argparse then refuses a bad value while the
# arguments are parsed, before any time is spent, and Parser turns its refusal into the one-line `error: ...`.

class UsageError(DataError):
    """A command line that argparse refused: unknown option, unparsable or out-of-range value, invalid choice."""


class Parser(argparse.ArgumentParser):
    """argparse with the scripts' one-line errors: a refusal raises UsageError (a DataError, so every script's
    `error: ...` handler prints it and exits with code 2) instead of printing the whole usage block. Its --help
    ends every option's line with its range and default (HelpFormatter)."""

    def __init__(self, **kw):
        super().__init__(formatter_class=HelpFormatter, **kw)

    def error(self, message):
        raise UsageError(f"{message}; see python {self.prog} --help")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """'help; range; default': the range of a Range-typed option, then its default (an action's `shown_default`,
    e.g. a preset-dependent text, else its parser default; none for switches, None and '', whose meaning the help
    text gives)."""

    def _get_help_string(self, action):
        help, default = action.help or "", getattr(action, "shown_default", action.default)
        if isinstance(action.type, Range):                 # before a default the help text states itself
            head, sep, tail = help.partition("; default")
            help = f"{head}; {action.type}{sep}{tail}"
        if default not in (None, "", argparse.SUPPRESS) and action.option_strings and action.nargs != 0:
            help += f"; default {flag_text(default)}".replace("%", "%%")     # argparse %-formats help
        return help

    def _get_default_metavar_for_optional(self, action):      # --repeat INT rather than --repeat REPEAT
        return action.type.kind.__name__.upper() if isinstance(action.type, Range) else action.dest.upper()

    def _split_lines(self, text, width):                # keep --flag-names whole when wrapping
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


class Range:
    """The valid values of a numeric option: ge <= x, gt < x, x <= le, x < lt (any of them), or x == off, a value
    outside those with a meaning of its own (0 = off). As argparse's `type` it turns one command-line word into a
    number, or refuses it with a message that names the word and the range. Floats must be finite."""

    def __init__(self, kind=int, ge=None, gt=None, le=None, lt=None, off=None):
        self.kind, self.ge, self.gt, self.le, self.lt, self.off = kind, ge, gt, le, lt, off
        self.__name__ = kind.__name__                # argparse names a type by its __name__

    def __contains__(self, x):
        return x == self.off or ((self.ge is None or x >= self.ge) and (self.gt is None or x > self.gt) and
                                 (self.le is None or x <= self.le) and (self.lt is None or x < self.lt))

    def __str__(self):                               # '>= 1', '> 0', 'in [0, 1)', '0 or >= 2'
        lo = ("[", self.ge) if self.ge is not None else ("(", self.gt) if self.gt is not None else None
        hi = (self.le, "]") if self.le is not None else (self.lt, ")") if self.lt is not None else None
        if lo and hi:
            text = f"in {lo[0]}{lo[1]}, {hi[0]}{hi[1]}"
        elif lo:
            text = f"{'>=' if lo[0] == '[' else '>'} {lo[1]}"
        elif hi:
            text = f"{'<=' if hi[1] == ']' else '<'} {hi[0]}"
        else:
            text = "any " + ("integer" if self.kind is int else "number")
        return text if self.off is None else f"{self.off} or {text}"

    def __call__(self, word):
        try:
            x = self.kind(word)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if self.kind is int else 'a number'}, "
                                              f"got {word!r}") from None
        if x not in self or not math.isfinite(x):
            raise argparse.ArgumentTypeError(f"{word} is out of range: must be {self}")
        return x


def setting(default, help, choices=None, flag=True, kind=None, **bounds):
    """A config dataclass field with what its command-line flag needs: `help`, one line saying what it sets, in
    which unit; its valid values: `choices`, or for a number the bounds of a Range (ge, gt, le, lt, off); `kind`,
    the number type where the default is None. flag=False: a field set from the data or the model (image size,
    leaf count), not by the user, so it gets no flag."""
    kind = kind or (int if isinstance(default, tuple) else type(default))     # a tuple holds integers
    meta = {"help": help, "choices": choices, "flag": flag, "kind": kind,
            "range": Range(kind, **bounds) if bounds else None}
    return dataclasses.field(default=default, metadata=meta)


def parse_bool(word):
    if word.lower() in ("1", "true", "yes", "on"):
        return True
    if word.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {word!r}")


def add_flags(parser, cls, prefix="", defaults=None):
    """One --flag per user setting of the dataclass cls (prefix 'treevae-' / 'ddpm-' for the stage configs), with
    its help line, range or choices and default. The parsed default is None, 'keep the config's value', so only
    the flags a user gives override anything; `defaults` (field -> text) shows defaults that depend on the preset."""
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if not meta.get("flag", True):
            continue
        name, kind, help = "--" + prefix + f.name.replace("_", "-"), meta["kind"], meta["help"].replace("%", "%%")
        if kind is bool:
            action = parser.add_argument(name, type=parse_bool, nargs="?", const=True, metavar="BOOL", help=help)
        elif isinstance(f.default, tuple):
            action = parser.add_argument(name, type=meta["range"], nargs="+", metavar="INT", help=help)
        elif meta["choices"]:
            action = parser.add_argument(name, type=kind, choices=meta["choices"], help=help)
        else:
            action = parser.add_argument(name, type=meta["range"] or kind, metavar=kind.__name__.upper(), help=help)
        action.shown_default = (defaults or {}).get(f.name, f.default)


def flag_text(value):
    """A value as one types it on the command line: 0.001, true, 1 2 2 2 for a tuple; text as it is."""
    if isinstance(value, tuple):
        return " ".join(map(str, value))
    return str(value).lower() if isinstance(value, bool) else value if isinstance(value, str) else repr(value)


def overrides(args, cls, prefix=""):
    """{field: value} of the flags given on the command line (tuples as tuples)."""
    out = {}
    for f in dataclasses.fields(cls):
        v = getattr(args, (prefix + f.name).replace("-", "_"), None)
        if v is not None:
            out[f.name] = tuple(v) if isinstance(f.default, tuple) else v
    return out


def train_command(run, *extra):
    """A run folder's train.py command line (run: train.RunConfig or anything with dataset, preset, out, data_dir),
    for the remedies of error messages; shared by train.py and sample.py."""
    data_dir = f" --data-dir {run.data_dir}" if run.data_dir != "data" else ""
    return " ".join([f"python train.py --dataset {run.dataset} --preset {run.preset} --out {run.out}{data_dir}",
                     *extra])
