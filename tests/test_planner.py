"""The planner's own judgement, fed with numbers: step times that contradict each other or vary wildly between
repeats (the sign of an oversubscribed CPU) give one line saying what to try; a plan of many hours off a GPU gives
one line with the quicker alternatives. Both are pure functions of the measured times; plan() prints them."""
import dataclasses

import torch

import data
import ddpm
import train
import treevae

MS = 1e-3
# Medians, minima and maxima measured by the planner on a busy 2-core machine with one thread (paper preset):
# a healthy CPU, however slow.
HEALTHY = {"2-leaf": (174 * MS, 172 * MS, 199 * MS), "10-leaf": (415 * MS, 413 * MS, 461 * MS),
           "subtree": (132 * MS, 117 * MS, 155 * MS), "DDPM training": (4031 * MS, 3908 * MS, 4118 * MS),
           "sampling": (1065 * MS, 1054 * MS, 1072 * MS)}
FASTER = [("2-leaf", "10-leaf"), ("subtree", "10-leaf"), ("sampling", "DDPM training")]


def test_timing_warning_only_for_contradictions_and_wild_repeats():
    assert train.timing_warning(HEALTHY, FASTER, 1) is None
    # a subtree step slower than a 2-leaf step is normal on a GPU and for CIFAR-10: not a contradiction
    assert train.timing_warning({**HEALTHY, "subtree": (300 * MS, 290 * MS, 310 * MS)}, FASTER, 1) is None
    # tiny steps jitter by milliseconds: not wild (3 leaves: the 2-leaf step can be a little slower)
    small = {"2-leaf": (34 * MS, 20 * MS, 35 * MS), "3-leaf": (31 * MS, 30 * MS, 33 * MS),
             "sampling": (29 * MS, 9 * MS, 46 * MS)}
    assert train.timing_warning(small, [("2-leaf", "3-leaf")], 1) is None
    # the numbers: a 2-leaf step of 4,440 ms against 1,748 ms for 10 leaves, 2 threads
    line = train.timing_warning({**HEALTHY, "2-leaf": (4.44, 4.2, 4.6), "10-leaf": (1.748, 1.7, 1.8)}, FASTER, 2)
    assert line.startswith("warning: ") and "\n" not in line
    assert "a 2-leaf step took 4,440 ms, longer than a 10-leaf step (1,748 ms)" in line, line
    for advice in ("oversubscribed", "another busy process", "2 torch threads", "--threads 1",
                   "OMP_NUM_THREADS=1", "close the other process"):
        assert advice in line, (advice, line)
    # repeats that vary wildly (2.5 s to 15.3 s, as measured with 2 threads beside other jobs)
    line = train.timing_warning({**HEALTHY, "DDPM training": (9.9, 2.507, 15.313)}, FASTER, 2)
    assert "repeats of the DDPM training step took 2,507 ms to 15,313 ms" in line, line


def test_plan_says_it_is_measuring_and_warns_on_contradictions(monkeypatch, capsys):
    """plan() (train.py and bench.py --plan) announces the timing before it starts and prints timing_warning's
    line after the plan when the measured times contradict each other."""
    times = iter([(0.30, 0.29, 0.31), (0.10, 0.09, 0.11), (0.05, 0.05, 0.06),     # 2 leaves slower than 3
                  (0.02, 0.02, 0.02), (0.50, 0.49, 0.51), (0.10, 0.10, 0.11)])    # reconstruct, DDPM, sampling
    monkeypatch.setattr(train, "timed", lambda *a, **k: next(times))
    cfg = treevae.treevae_config("mnist", "smoke")
    dcfg = ddpm.ddpm_config("mnist", "smoke", cfg.max_leaves)
    phases = train.plan(cfg, dcfg, 300, torch.device("cpu"), data.setup_device("cpu")[1])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("planning: timing a few TreeVAE and DDPM steps on cpu"), lines
    assert lines[1].startswith("plan: init") and set(phases) >= {"init", "ddpm", "figures"}
    assert lines[2].startswith("warning: implausible step times (a 2-leaf step took 300 ms, longer than a 3-leaf "
                               "step (100 ms))"), lines
    assert len(lines) == 3


def run_config(**kw):
    return dataclasses.replace(train.RunConfig(), **kw)


def test_long_run_warning_names_quicker_alternatives():
    """A CPU plan over LONG_RUN_H hours: one prominent line with --preset fast, --stage treevae and a GPU, each
    alternative with its time on this machine (phases scale with their epochs); nothing for a GPU or short runs."""
    tv, dcfg = treevae.treevae_config("mnist", "paper"), ddpm.ddpm_config("mnist", "paper", 10)
    h = 3600.0
    phases = {"init": 0.5 * h, "subtrees": 0.5 * h, "intermediate": 1.0 * h, "finetune": 2.0 * h,
              "ddpm": 200.0 * h, "figures": 1.0 * h}                                # 205 h in all
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    line = train.long_run_warning(phases, run_config(), tv, dcfg, cpu)
    assert line.startswith("*** long run: 205 h planned on cpu, over 3 h.") and line.endswith("***"), line
    fast1 = 0.5 * 24 / 150 + 0.5 * 12 / 150 + 1.0 * 6 / 80 + 2.0 * 24 / 200           # the fast preset's epochs
    fast = fast1 + 200 * 60 / 1000 + 1.0
    assert f"--preset fast ({fast:.0f} h here)" in line and fast > 10, line      # whole hours from 10 h on
    assert f"--stage treevae (stage 1 alone: 4.0 h; {fast1:.1f} h with --preset fast)" in line, line
    assert "a CUDA GPU" in line and "Starting anyway" in line and "\n" not in line
    assert train.long_run_warning(phases, run_config(), tv, dcfg, cuda) is None     # a GPU: the user's choice
    short = {k: v / 100 for k, v in phases.items()}                                  # 2.05 h
    assert train.long_run_warning(short, run_config(), tv, dcfg, cpu) is None
    # already `fast` and stage 1 alone: only the GPU is left to suggest
    tree_only = {k: v * 2 for k, v in phases.items() if k in train.TREE_PHASES}      # 8 h
    line = train.long_run_warning(tree_only, run_config(preset="fast", stage="treevae"), tv, None, cpu)
    assert "Quicker: a CUDA GPU" in line and "--preset" not in line.split("Starting")[0], line
