"""The command lines of train.py, sample.py, fid.py and bench.py: every option has a help line, every numeric option
a range that the parser enforces (a one-line error naming the value and the range, before any work), word options
name the bad value and their choices, settings derived from the data are not flags, every config field is read by
some code, and --threads takes effect. In-process where the parser alone answers; a subprocess per script checks the
whole path (exit code 2, one `error:` line, nothing done before)."""
import ast
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import bench
import data
import ddpm
import fid
import sample
import train
import treevae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARSERS = {"train.py": train.parser, "sample.py": sample.parser, "fid.py": fid.parser, "bench.py": bench.parser}


def options(script):
    """[(flag, argparse action)] of every option of a script but --help."""
    return [(a.option_strings[-1], a) for a in PARSERS[script]()._actions if a.option_strings and a.dest != "help"]


def script(name, *args):
    """`python name args` in the repository root (one thread), as a CompletedProcess."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, name, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def one_error_line(rc, out, err):
    """A user error: exit code 2, one `error: ...` line on stderr, no traceback; returns the line."""
    assert rc == 2, f"exit {rc}\n{out[-2000:]}\n{err[-2000:]}"
    assert "Traceback" not in err + out and "usage:" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and len(err.strip().splitlines()) == 1, err
    return lines[0]


# ----------------------------------------------------------------------------- help and ranges, every flag
@pytest.mark.parametrize("name", PARSERS)
def test_every_option_has_help_and_every_number_a_range(name):
    """A help line that says more than the flag's name, for every option; for every numeric option a Range with at
    least one bound (or a fixed set of choices), shown in --help."""
    text = " ".join(PARSERS[name]().format_help().split())
    for flag, a in options(name):
        words = (a.help or "").replace(flag, "").split()
        assert len(words) >= 3, f"{name} {flag}: help {a.help!r}"
        assert a.type not in (int, float) or a.choices, f"{name} {flag}: a number without a range"
        if isinstance(a.type, data.Range):
            assert not str(a.type).startswith("any"), f"{name} {flag}: a Range without bounds"
            assert f"; {a.type}" in text, f"{name} {flag}: range not in --help"
        elif a.choices is None and a.type not in (None, str, data.parse_bool):
            pytest.fail(f"{name} {flag}: type {a.type} is neither a Range, a word nor true/false")


def just_outside(r):
    """(values just beyond each bound of a Range, values on its closed bounds and `off`)."""
    one = 1 if r.kind is int else 0.5
    bad = ([r.ge - one] if r.ge is not None else []) + ([r.gt] if r.gt is not None else []) + \
          ([r.le + one] if r.le is not None else []) + ([r.lt] if r.lt is not None else [])
    return [v for v in bad if v != r.off], [v for v in (r.ge, r.le, r.off) if v is not None]


@pytest.mark.parametrize("name", PARSERS)
def test_every_range_is_enforced_while_parsing(name):
    """Every numeric option of every script (train.py's generated --treevae-* / --ddpm-* flags included): a value
    just beyond each bound is refused with the value and the range in the message; the bounds themselves pass."""
    checked = 0
    for flag, a in options(name):
        if not isinstance(a.type, data.Range):
            continue
        bad, good = just_outside(a.type)
        for v in bad:
            with pytest.raises(data.UsageError) as e:
                PARSERS[name]().parse_args([flag, str(v)])
            assert f"argument {flag}: {v} is out of range: must be {a.type}; see python {name} --help" == str(e.value)
            checked += 1
        for v in good:
            PARSERS[name]().parse_args([flag, str(v)])
    assert checked >= {"train.py": 40, "sample.py": 5, "fid.py": 4, "bench.py": 7}[name], checked
    with pytest.raises(data.UsageError, match="expected an integer, got 'many'"):
        PARSERS[name]().parse_args(["--threads", "many"])
    with pytest.raises(data.UsageError, match="inf is out of range"):     # no infinite floats either
        train.parser().parse_args(["--treevae-lr", "inf"])


def test_preset_values_are_in_their_ranges():
    """The ranges describe values that work: every preset's value for every data set lies inside them."""
    configs = [train.RunConfig(), sample.SampleConfig()]
    for dataset in ("mnist", "fashion_mnist", "cifar10"):
        for preset in ("paper", "fast", "smoke"):
            configs += [treevae.treevae_config(dataset, preset), ddpm.ddpm_config(dataset, preset)]
    for cfg in configs:
        for f in dataclasses.fields(cfg):
            v, meta = getattr(cfg, f.name), f.metadata
            for x in (v if isinstance(v, tuple) else (v,)):
                if meta["range"] is not None and x is not None:
                    assert x in meta["range"], f"{type(cfg).__name__}.{f.name} = {x}: outside {meta['range']}"
                if meta["choices"]:
                    assert x in meta["choices"], f"{type(cfg).__name__}.{f.name} = {x}"


def test_ddpm_schedule_that_cannot_work_is_refused_while_parsing():
    """Cross-field: the linear schedule scales the betas by 1000/T, and a beta >= 1 has no alpha_t > 0."""
    with pytest.raises(ddpm.DDPMError, match="T = 10 .* must be < 1: raise T above 20"):
        train.parse_args(["--ddpm-T", "10"])
    with pytest.raises(ddpm.DDPMError, match="raise T above 40"):
        train.parse_args(["--ddpm-T", "30", "--ddpm-beta-T", "0.04"])
    train.parse_args(["--ddpm-T", "10", "--ddpm-schedule", "cosine"])            # the cosine schedule has no scale
    train.parse_args(["--preset", "smoke"])                                        # T = 50


# ----------------------------------------------------------------------------- one check per script, whole path
def test_train_refuses_fid_samples_1_before_any_work(tmp_path):
    """The issue's example: --stage ddpm --resume --fid-samples 1 trained to the end, then failed on the
    covariance; now it stops while parsing (not even the data are read)."""
    proc = script("train.py", "--dataset", "mnist", "--preset", "smoke", "--device", "cpu", "--stage", "ddpm",
                  "--resume", "--fid-samples", 1, "--data-dir", tmp_path / "none", "--out", tmp_path / "run")
    line = one_error_line(proc.returncode, proc.stdout, proc.stderr)
    assert line == "error: argument --fid-samples: 1 is out of range: must be 0 or >= 2; see python train.py --help"
    assert proc.stdout == "" and not (tmp_path / "run").exists()
    for bad in ("-3", "1"):
        with pytest.raises(data.UsageError, match="must be 0 or >= 2"):
            train.parse_args(["--fid-samples", bad])


def test_sample_refuses_out_of_range_values(tmp_path, capsys):
    for argv, msg in ((["--steps", "0"], "argument --steps: 0 is out of range: must be >= 1"),
                      (["--leaf", "-2"], "argument --leaf: -2 is out of range: must be >= -1"),
                      (["--n", "-3"], "argument --n: -3 is out of range: must be >= 0"),
                      (["--eta", "1.5"], "argument --eta: 1.5 is out of range: must be in [0, 1]")):
        rc = sample.cli(["--run", str(tmp_path), *argv])
        out = capsys.readouterr()
        assert msg in one_error_line(rc, out.out, out.err)


def test_fid_refuses_out_of_range_values(tmp_path, capsys):
    np.savez(tmp_path / "a.npz", features=np.zeros((5, 3)))
    common = ["--gen-feats", str(tmp_path / "a.npz"), "--ref-feats", str(tmp_path / "a.npz")]
    for argv, msg in ((["--n", "1"], "argument --n: 1 is out of range: must be >= 2"),
                      (["--n-boot", "1"], "argument --n-boot: 1 is out of range: must be 0 or >= 2"),
                      (["--batch-size", "0"], "argument --batch-size: 0 is out of range: must be >= 1")):
        with pytest.raises(SystemExit) as e:
            fid.main(common + argv)
        out = capsys.readouterr()
        assert msg in one_error_line(e.value.code, out.out, out.err)


def test_bench_refuses_out_of_range_values():
    proc = script("bench.py", "--device", "cpu", "--repeat", 0)
    assert "argument --repeat: 0 is out of range: must be >= 1" in one_error_line(proc.returncode, proc.stdout,
                                                                                    proc.stderr)
    assert proc.stdout == ""
    with pytest.raises(data.UsageError, match="--ddim-steps: 1001 is out of range: must be in \\[1, 1000\\]"):
        bench.parser().parse_args(["--ddim-steps", "1001"])


# ----------------------------------------------------------------------------- choices and flags that are not settings
@pytest.mark.parametrize("name, argv, choices", [
    ("train.py", ["--stage", "bogus"], "'treevae', 'ddpm', 'all'"),
    ("train.py", ["--preset", "bogus"], "'paper', 'fast', 'cpu', 'smoke'"),
    ("train.py", ["--sampler", "bogus"], "'ddpm', 'ddim'"),
    ("train.py", ["--precision", "bogus"], "'auto', 'bf16', 'fp32'"),
    ("train.py", ["--treevae-activation", "bogus"], "'swish', 'leaky_relu'"),
    ("train.py", ["--ddpm-schedule", "bogus"], "'linear', 'cosine'"),
    ("sample.py", ["--sampler", "bogus"], "'ddpm', 'ddim'"),
    ("sample.py", ["--stage", "bogus"], "'diffusion', 'treevae'"),
    ("fid.py", ["--extractor", "bogus"], "'offline', 'inception', 'tf-inception'"),
    ("bench.py", ["--precision", "bogus"], "'auto', 'bf16', 'fp32'"),
])
def test_a_wrong_word_is_named_with_the_choices(name, argv, choices):
    with pytest.raises(data.UsageError) as e:
        PARSERS[name]().parse_args(argv)
    assert f"argument {argv[0]}: invalid choice: 'bogus' (choose from {choices})" in str(e.value)


def test_train_wrong_preset_is_one_line_naming_value_and_choices():
    proc = script("train.py", "--preset", "huge")
    line = one_error_line(proc.returncode, proc.stdout, proc.stderr)
    assert "'huge'" in line and "'paper', 'fast', 'cpu', 'smoke'" in line, line


def test_derived_fields_are_not_flags():
    """Fields set from the data set or the tree are not user settings; the DDIM steps have one flag, not two."""
    flags = {flag for flag, _ in options("train.py")}
    for gone in ("--treevae-dataset", "--treevae-in-channels", "--treevae-image-size", "--treevae-latent-size",
                 "--ddpm-dataset", "--ddpm-image-channels", "--ddpm-image-size", "--sample-steps"):
        assert gone not in flags, gone
    assert {"--ddpm-ddim-steps", "--ddpm-ddim-eta", "--threads", "--treevae-lr", "--ddpm-T"} <= flags


# ----------------------------------------------------------------------------- every config field is read
# Which expressions hold an instance of each config dataclass, per file (bench.py's `cfg` is a TreeVAEConfig in
# bench_treevae and a DDPMConfig in bench_ddpm).
READERS = {
    train.RunConfig: {"train.py": {"run"}},
    treevae.TreeVAEConfig: {"treevae.py": {"cfg", "self.cfg", "model.cfg"}, "train.py": {"cfg", "tv_cfg", "self.cfg"},
                            "sample.py": {"tv.cfg", "m.tv.cfg"}, "bench.py": {"cfg"}},
    ddpm.DDPMConfig: {"ddpm.py": {"cfg", "self.cfg"}, "train.py": {"dcfg"}, "sample.py": {"unet.cfg", "m.unet.cfg"},
                      "bench.py": {"cfg"}},
    sample.SampleConfig: {"sample.py": {"cfg"}},
}
# Fields no code reads on purpose, each with the reason.
UNREAD_OK = {
    # provenance in ddpm.pt's config: which data set the DDPM was made for. Resuming on other data is refused by
    # the stage-1 check (TreeVAEConfig.dataset), and the DDPM is tied to its tree by the tree's fingerprint.
    (ddpm.DDPMConfig, "dataset"),
}


def test_every_config_field_is_read_by_some_code():
    """A field that no code reads is an option that does nothing (the issue: --ddpm-ddim-steps / --ddpm-ddim-eta
    were saved but never used). Reads are attribute loads `receiver.field` found in the parsed sources (comments,
    strings and assignments do not count)."""
    reads = {}
    for name in ("train.py", "treevae.py", "ddpm.py", "sample.py", "fid.py", "bench.py", "data.py"):
        tree = ast.parse(open(os.path.join(ROOT, name)).read())
        reads[name] = {(ast.unparse(n.value), n.attr) for n in ast.walk(tree)
                       if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Load)}
    unread = [f"{cls.__name__}.{f.name}" for cls, where in READERS.items() for f in dataclasses.fields(cls)
              if (cls, f.name) not in UNREAD_OK
              and not any((r, f.name) in reads[name] for name, receivers in where.items() for r in receivers)]
    assert not unread, f"config fields no code reads: {unread}"
    # fid.py and bench.py have no config dataclass: each option is read from the parsed arguments (a, args)
    for name, receiver in (("fid.py", "a"), ("bench.py", "args")):
        unread = [flag for flag, action in options(name) if (receiver, action.dest) not in reads[name]]
        assert not unread, f"{name} options no code reads: {unread}"


# ----------------------------------------------------------------------------- --threads
def test_threads_option_takes_effect(tmp_path, capsys):
    """--threads N calls torch.set_num_threads(N) before any work (default: torch's choice); train.py's in
    test_pipeline (it needs data)."""
    proc = script("bench.py", "--device", "cpu", "--only", "peak", "--repeat", 1, "--threads", 3)
    line = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("{")))
    assert proc.returncode == 0 and line["threads"] == 3, proc.stderr
    proc = script("bench.py", "--device", "cpu", "--only", "peak", "--repeat", 1)            # OMP_NUM_THREADS=1
    assert json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("{")))["threads"] == 1
    before = torch.get_num_threads()
    try:
        assert sample.cli(["--run", str(tmp_path / "nowhere"), "--threads", "2", "--device", "cpu"]) == 2
        assert torch.get_num_threads() == 2
        torch.set_num_threads(1)
        with pytest.raises(SystemExit):
            fid.main(["--gen-feats", str(tmp_path / "a.npz"), "--threads", "3"])     # fails after set-up
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
    capsys.readouterr()
