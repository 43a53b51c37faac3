"""Tests for data.py: file formats on tiny files made here, downloads through file:// URLs, pixel ranges,
batching, splits, augmentations; plus the real Fashion-MNIST copy in ../shared when it is there."""
import gzip
import hashlib
import io
import os
import struct
import tarfile

import numpy as np
import pytest
import torch

import data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared", "data")


def idx_bytes(array):
    """IDX encoding of a uint8 array, written independently of data.py: magic, big-endian dims, bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_mnist(folder, split="train", n=7, seed=0, compress=True):
    """Tiny random MNIST-format files in folder; returns (images (n, 28, 28), labels (n,))."""
    rng = np.random.default_rng(seed)
    images, labels = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8)
    os.makedirs(folder, exist_ok=True)
    for fname, array in zip(data._IDX_FILES[split], (images, labels)):
        payload = idx_bytes(array)
        with open(os.path.join(folder, fname if compress else fname[:-3]), "wb") as f:
            f.write(gzip.compress(payload) if compress else payload)
    return images, labels


def md5(path):
    with open(path, "rb") as f:
        return hashlib.md5(f.read()).hexdigest()


# ----------------------------------------------------------------------------- names
def test_names_and_describe():
    assert data.canonical_name("Fashion-MNIST") == data.canonical_name("fmnist") == "fashion_mnist"
    assert data.describe("mnist") == dict(channels=1, size=28, n_classes=10, likelihood="bernoulli")
    assert data.describe("cifar10")["likelihood"] == "gaussian" and data.describe("cifar10")["channels"] == 3
    with pytest.raises(data.DataError, match="mnist.*cifar10"):
        data.canonical_name("imagenet")


# ----------------------------------------------------------------------------- IDX
@pytest.mark.parametrize("layout", ["parent", "direct", "uncompressed"])
def test_idx_round_trip(tmp_path, layout, capsys):
    folder = tmp_path / "mnist" if layout == "parent" else tmp_path
    images, labels = write_mnist(folder, compress=layout != "uncompressed")
    x, y = data.load("mnist", "train", root=str(tmp_path), download=False)
    assert x.dtype == torch.uint8 and x.shape == (7, 1, 28, 28) and y.dtype == torch.int64 and x.is_contiguous()
    assert torch.equal(x[:, 0], torch.from_numpy(images)) and torch.equal(y, torch.from_numpy(labels).long())
    # Files placed by hand that differ from the published ones are used with a note.
    assert layout == "uncompressed" or "differs from the published" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["magic", "truncated_gzip", "truncated_idx", "not_gzip_tail"])
def test_idx_corrupt_files_raise_clear_error(tmp_path, damage):
    write_mnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    if damage == "magic":
        raw = b"\x00\x00\x08\x02" + raw[4:]  # says 2-d
        path.write_bytes(gzip.compress(raw))
    elif damage == "truncated_gzip":  # an interrupted copy: the gzip stream ends early
        path.write_bytes(path.read_bytes()[:-100])
    elif damage == "truncated_idx":  # a valid gzip of a too-short IDX payload
        path.write_bytes(gzip.compress(raw[:-28]))
    else:  # gzip header followed by garbage
        path.write_bytes(path.read_bytes()[:10] + b"garbage" * 50)
    with pytest.raises(data.DataError, match="train-images-idx3-ubyte.gz.*delete it and rerun") as err:
        data.load("mnist", "train", root=str(tmp_path), download=False)
    assert "\n" not in str(err.value)


def test_mismatched_label_file_raises(tmp_path):
    write_mnist(tmp_path, n=7)
    labels = np.zeros(5, np.uint8)  # 5 labels for 7 images
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels)))
    with pytest.raises(data.DataError, match="5 labels for 7 images"):
        data.load("mnist", "train", root=str(tmp_path), download=False)


# ----------------------------------------------------------------------------- downloads
def test_download_through_file_url(tmp_path, monkeypatch):
    mirror, root = tmp_path / "mirror", tmp_path / "root"
    images, labels = write_mnist(mirror)
    for fname in data._IDX_FILES["train"]:  # publish the tiny files' checksums
        monkeypatch.setitem(data.DATASETS["mnist"]["checksums"], fname, ("md5", md5(mirror / fname)))
    # The first mirror is unreachable, the second one serves: the loop must go on to it.
    mirrors = ["file:///nonexistent/mnist/", mirror.as_uri() + "/"]
    x, y = data.load("mnist", "train", root=str(root), mirrors=mirrors)
    assert torch.equal(x[:, 0], torch.from_numpy(images)) and torch.equal(y, torch.from_numpy(labels).long())
    assert sorted(os.listdir(root / "mnist")) == sorted(data._IDX_FILES["train"])  # no temporary left


def test_checksum_mismatch_leaves_no_file(tmp_path):
    mirror, root = tmp_path / "mirror", tmp_path / "root"
    write_mnist(mirror)  # not the published bytes: the real md5 sums cannot match
    with pytest.raises(data.DataError, match="checksum mismatch"):
        data.load("mnist", "train", root=str(root), mirrors=[mirror.as_uri() + "/"])
    assert not os.path.exists(root / "mnist")  # no final name, no .part file, not even the empty folder


def test_offline_error_names_urls_and_folder(tmp_path):
    mirrors = ["file:///nonexistent/a/", "file:///nonexistent/b/"]
    with pytest.raises(data.DataError) as err:
        data.load("fmnist", "test", root=str(tmp_path), mirrors=mirrors)
    message = str(err.value)
    assert "file:///nonexistent/a/t10k-images-idx3-ubyte.gz" in message
    assert "file:///nonexistent/b/t10k-images-idx3-ubyte.gz" in message
    assert os.path.abspath(tmp_path / "fashion-mnist") in message and "by hand" in message
    with pytest.raises(data.DataError, match="download=True"):
        data.load("mnist", "test", root=str(tmp_path), download=False)


def test_offline_error_names_every_missing_file_and_data_dir(tmp_path):
    """Offline, the first error names all files of the data set that are missing, the test split's too (they
    are needed at the end of every run), and the --data-dir option: one round trip, not two."""
    with pytest.raises(data.DataError) as err:
        data.load("mnist", "train", root=str(tmp_path / "data"), mirrors=["file:///nonexistent/"])
    message = str(err.value)
    for fname in data._IDX_FILES["train"] + data._IDX_FILES["test"]:
        assert fname in message.split("if offline")[1], message
    assert "--data-dir" in message and os.path.abspath(tmp_path / "data" / "mnist") in message
    assert not (tmp_path / "data").exists()                  # the failed download left no empty folders
    # The training files copied by hand (straight into root): the test files are looked for, and named, there.
    write_mnist(tmp_path, "train")
    with pytest.raises(data.DataError) as err:
        data.load("mnist", "test", root=str(tmp_path), download=False)
    message = str(err.value)
    assert "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz into " + os.path.abspath(tmp_path) in message
    assert "train-images" not in message and "--data-dir" in message and "download=True" in message


def test_checksum_note_once_per_folder(tmp_path, capsys, monkeypatch):
    """Files that differ from the published ones get their note once per folder, not on every call: the folder
    remembers them by size and modification time; a changed file is noted again; a read-only folder still loads
    (it only cannot remember)."""
    write_mnist(tmp_path)
    data.load("mnist", "train", root=str(tmp_path), download=False)
    note = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("note:")]
    assert len(note) == 1 and "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz" in note[0], note
    monkeypatch.setattr(data, "_noted", set())                     # a new process
    data.load("mnist", "train", root=str(tmp_path), download=False)
    assert "note:" not in capsys.readouterr().err
    write_mnist(tmp_path, seed=1)                                  # other files copied over them
    monkeypatch.setattr(data, "_noted", set())
    data.load("mnist", "train", root=str(tmp_path), download=False)
    assert "differs from the published file" in capsys.readouterr().err
    frozen = tmp_path / "frozen"
    write_mnist(frozen)
    os.chmod(frozen, 0o555)
    try:
        for _ in range(2):
            monkeypatch.setattr(data, "_noted", set())
            x, _ = data.load("mnist", "train", root=str(frozen), download=False)
            assert len(x) == 7 and "differs from the published file" in capsys.readouterr().err
        assert sorted(os.listdir(frozen)) == sorted(data._IDX_FILES["train"])   # nothing written there
    finally:
        os.chmod(frozen, 0o755)


# ----------------------------------------------------------------------------- CIFAR-10 binary
def write_cifar(path, members, n=3, seed=0):
    """A tiny cifar-10-binary.tar.gz; returns {member: (images (n, 3, 32, 32), labels (n,))}."""
    rng = np.random.default_rng(seed)
    content = {}
    with tarfile.open(path, "w:gz") as tar:
        for name in members:
            images, labels = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, n)
            # record = label byte + R plane + G plane + B plane
            payload = b"".join(bytes([labels[i]]) + images[i].tobytes() for i in range(n))
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
            content[name] = (images, labels)
    return content


def test_cifar_round_trip(tmp_path):
    os.makedirs(tmp_path / "cifar10")
    members = data._CIFAR_MEMBERS["train"] + data._CIFAR_MEMBERS["test"]
    content = write_cifar(tmp_path / "cifar10" / "cifar-10-binary.tar.gz", members)
    for split in ("train", "test"):
        x, y = data.load("cifar10", split, root=str(tmp_path), download=False)
        parts = [content[m] for m in data._CIFAR_MEMBERS[split]]
        assert x.shape == (3 * len(parts), 3, 32, 32) and x.dtype == torch.uint8
        assert torch.equal(x, torch.from_numpy(np.concatenate([p[0] for p in parts])))
        assert torch.equal(y, torch.from_numpy(np.concatenate([p[1] for p in parts])).long())


@pytest.mark.parametrize("evil", ["../escape.bin", "/tmp/escape.bin", "cifar-10-batches-bin/../../escape.bin"])
def test_cifar_path_traversal_refused(tmp_path, evil):
    members = data._CIFAR_MEMBERS["train"] + [evil]
    write_cifar(tmp_path / "cifar-10-binary.tar.gz", members)
    with pytest.raises(data.DataError, match="outside"):
        data.load("cifar10", "train", root=str(tmp_path), download=False)
    assert not os.path.exists(tmp_path.parent / "escape.bin") and not os.path.exists("/tmp/escape.bin")


def test_cifar_truncated_archive(tmp_path):
    path = tmp_path / "cifar-10-binary.tar.gz"
    write_cifar(path, data._CIFAR_MEMBERS["test"])
    path.write_bytes(path.read_bytes()[:-200])  # an interrupted copy
    with pytest.raises(data.DataError, match="broken tar.gz.*delete it and rerun"):
        data.load("cifar10", "test", root=str(tmp_path), download=False)


def test_cifar_missing_member(tmp_path):
    write_cifar(tmp_path / "cifar-10-binary.tar.gz", data._CIFAR_MEMBERS["test"])
    with pytest.raises(data.DataError, match="lacks.*data_batch_1.bin"):
        data.load("cifar10", "train", root=str(tmp_path), download=False)


# ----------------------------------------------------------------------------- pixel ranges
@pytest.mark.parametrize("signed", [False, True])
def test_pixel_round_trip_exact(signed):
    levels = torch.arange(256, dtype=torch.uint8)
    x = data.to_float(levels, signed)
    assert x.dtype == torch.float32 and x[0] == (-1 if signed else 0) and x[-1] == 1
    assert torch.equal(data.to_uint8(x, signed), levels)
    # Out-of-range model outputs clamp instead of wrapping around.
    assert data.to_uint8(torch.tensor([-3.0, 3.0]), signed).tolist() == [0, 255]


def test_to_uint8_refuses_non_finite_pixels():
    """NaN used to become 0 (a black pixel) under the clamp: an all-black grid saved as a result. Now an error
    that names the model that made the images."""
    x = torch.rand(2, 1, 4, 4)
    x[1, 0, 2, 3] = float("nan")
    with pytest.raises(data.NonFiniteError, match=r"images made by runs/x/ddpm.pt: 1 of 32 values are NaN or inf"):
        data.to_uint8(x, signed=True, source="runs/x/ddpm.pt")
    with pytest.raises(data.DataError, match="NaN or inf"):        # a DataError: every script's `error:` line
        data.to_uint8(torch.tensor([0.5, float("inf")]))


# ----------------------------------------------------------------------------- run files
def test_damaged_run_files_are_one_line_errors(tmp_path):
    """Every reader of a file the scripts write names the file and the remedy for a truncated copy (an interrupted
    copy, a full disk), a foreign file or NaN weights, instead of torch's, json's or numpy's traceback."""
    good = {"state_dict": {"w": torch.ones(3), "step": torch.tensor(4)}, "version": 2}
    torch.save(good, tmp_path / "a.pt")
    raw = (tmp_path / "a.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(raw[:len(raw) // 2])
    assert data.read_checkpoint(str(tmp_path / "a.pt"), "fix it", finite=("state_dict",))["version"] == 2
    for name in ("cut.pt", "missing.pt"):
        with pytest.raises(data.DataError, match=f"{name}.*: fix it$"):
            data.read_checkpoint(str(tmp_path / name), "fix it")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(data.DataError, match="not a checkpoint of this code: fix it"):
        data.read_checkpoint(str(tmp_path / "list.pt"), "fix it")
    good["state_dict"]["w"][1] = float("nan")
    torch.save(good, tmp_path / "nan.pt")
    with pytest.raises(data.NonFiniteError, match=r"nan.pt holds NaN/inf weights \(state_dict w\): fix it"):
        data.read_checkpoint(str(tmp_path / "nan.pt"), "fix it", finite=("state_dict",))
    # metrics.json: written atomically, read back; a truncated one is an error naming it
    data.write_json(str(tmp_path / "m.json"), {"nmi": 0.5})
    assert data.read_json(str(tmp_path / "m.json"), "x") == {"nmi": 0.5} and not (tmp_path / "m.json.tmp").exists()
    (tmp_path / "cut.json").write_text('{"nmi": 0.')
    with pytest.raises(data.DataError, match="cannot read .*cut.json .*: delete it"):
        data.read_json(str(tmp_path / "cut.json"), "delete it")
    # .npz: a truncated zip, a missing key
    np.savez(tmp_path / "s.npz", images=np.zeros((2, 1, 4, 4), np.uint8))
    assert data.read_npz(str(tmp_path / "s.npz"), "x", need=("images",))["images"].shape == (2, 1, 4, 4)
    raw = (tmp_path / "s.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(raw[:len(raw) - 30])
    with pytest.raises(data.DataError, match="cannot read .*cut.npz .*: sample again"):
        data.read_npz(str(tmp_path / "cut.npz"), "sample again")
    with pytest.raises(data.DataError, match="s.npz has no array 'features' .*images.*: y"):
        data.read_npz(str(tmp_path / "s.npz"), "y", need=("features",))


def test_fingerprint_and_nonfinite_tensor():
    a = {"w": torch.arange(6.0).view(2, 3), "n": torch.tensor(3)}
    assert data.fingerprint(a) == data.fingerprint({"n": torch.tensor(3), "w": torch.arange(6.0).view(2, 3)})
    assert data.fingerprint(a) != data.fingerprint({**a, "w": a["w"] + 1e-6}) and len(data.fingerprint(a)) == 12
    assert data.fingerprint({"w": a["w"].t()}) == data.fingerprint({"w": a["w"].t().contiguous()})
    assert data.nonfinite_tensor(a) is None
    assert data.nonfinite_tensor({**a, "v": torch.tensor([1.0, float("-inf")])}) == "v"


# ----------------------------------------------------------------------------- splits and batches
def test_train_val_split():
    train, val = data.train_val_split(1000, 0.1, seed=3)
    assert len(val) == 100 and len(train) == 900 and train.dtype == torch.int64
    assert torch.equal(torch.cat([train, val]).sort().values, torch.arange(1000))  # disjoint, complete
    assert all(torch.equal(a, b) for a, b in zip((train, val), data.train_val_split(1000, 0.1, seed=3)))
    assert not torch.equal(val, data.train_val_split(1000, 0.1, seed=4)[1])


def test_batches_shuffle_deterministic_and_resumable():
    n = 50
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    labels = torch.arange(n)
    batches = data.Batches(images, labels, batch_size=8, seed=1)
    assert len(batches) == 6  # 50 // 8, the partial batch dropped

    def order(b, e, start=0):
        return [y for x, y in b.epoch(e, start)]

    rng_before = torch.get_rng_state()
    e0, e1 = order(batches, 0), order(batches, 1)
    assert torch.equal(torch.get_rng_state(), rng_before)  # shuffling leaves the global RNG alone
    assert not torch.equal(torch.cat(e0), torch.cat(e1))  # a new order every epoch
    assert all(torch.equal(a, b) for a, b in zip(e1, order(data.Batches(images, labels, 8, seed=1), 1)))
    assert all(torch.equal(a, b) for a, b in zip(e1[4:], order(batches, 1, start=4)))  # resume mid-epoch
    x, y = next(iter(batches))
    assert x.dtype == torch.float32 and x.shape == (8, 1, 2, 2)
    assert torch.equal(data.to_uint8(x[:, 0, 0, 0]).long(), y)  # images travel with their labels
    full = data.Batches(images, None, batch_size=8, drop_last=False, signed=True)
    xs = torch.cat([x for x, y in full.epoch(3)])
    assert len(full) == 7 and y is not None and xs.min() >= -1
    assert torch.equal(data.to_uint8(xs[:, 0, 0, 0], signed=True).sort().values, images[:, 0, 0, 0])
    with pytest.raises(data.DataError, match="fewer than one batch"):
        data.Batches(images, labels, batch_size=64)


# ----------------------------------------------------------------------------- augmentations
# Small images keep each op below torch's threading grain: fast even on a busy 2-core machine.
@pytest.mark.parametrize("channels", [3, 1])
def test_augment_shape_range_reproducible(channels):
    x = torch.rand(8, channels, 16, 16)
    a = data.augment(x, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and a.dtype == x.dtype and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, data.augment(x, torch.Generator().manual_seed(0)))
    assert (a - x).abs().mean() > 0.05  # the views really differ from the input


def test_augment_geometry():
    # A grey left-to-right ramp: crops keep every row equal and monotone; flips reverse the direction.
    ramp = torch.linspace(0, 1, 8).expand(64, 1, 8, 8)
    a = data.augment(ramp, torch.Generator().manual_seed(1))
    assert torch.allclose(a, a[:, :, :1].expand_as(a), atol=1e-6)  # rows stay identical
    steps = a[:, 0, 0].diff(dim=1)  # (64, 7)
    rising, falling = (steps >= -1e-6).all(1), (steps <= 1e-6).all(1)
    assert (rising | falling).all() and rising.any() and falling.any()


def test_hsv_round_trip_and_hue_shift():
    rgb = torch.rand(4, 3, 8, 8)
    assert torch.allclose(data._hsv_to_rgb(data._rgb_to_hsv(rgb)), rgb, atol=1e-5)
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    # A third of a turn takes pure red to pure green.
    assert torch.allclose(data._hue(red, torch.tensor(1 / 3).view(1, 1, 1, 1)), red.roll(1, 1), atol=1e-5)


# ----------------------------------------------------------------------------- real data (optional)
def parse_idx(path):
    """Direct parse with gzip + struct + torch.frombuffer, independent of data.py's numpy path."""
    with gzip.open(path, "rb") as f:
        raw = bytearray(f.read())
    ndim = raw[3]
    dims = struct.unpack(">" + "I" * ndim, bytes(raw[4:4 + 4 * ndim]))
    return torch.frombuffer(raw, dtype=torch.uint8, offset=4 + 4 * ndim).view(*dims)


def test_real_fashion_mnist():
    folder = os.path.join(SHARED, "fashion-mnist")
    if not os.path.isdir(folder):
        pytest.skip("no ../shared/data/fashion-mnist")
    x, y = data.load("fashion_mnist", "train", root=SHARED, download=False)
    assert x.shape == (60000, 1, 28, 28) and torch.equal(torch.bincount(y), torch.full((10,), 6000))
    assert torch.equal(x[:, 0], parse_idx(os.path.join(folder, "train-images-idx3-ubyte.gz")))
    assert torch.equal(y, parse_idx(os.path.join(folder, "train-labels-idx1-ubyte.gz")).long())
    x, y = data.load("fmnist", "test", root=folder, download=False)  # the folder itself
    assert x.shape == (10000, 1, 28, 28) and len(y) == 10000


def test_real_mnist_subset():
    folder = os.path.join(SHARED, "mnist-subset")
    if not os.path.isdir(folder):
        pytest.skip("no ../shared/data/mnist-subset")
    x, y = data.load("mnist", "train", root=folder, download=False)
    assert x.shape == (9003, 1, 28, 28) and y.max() == 9
