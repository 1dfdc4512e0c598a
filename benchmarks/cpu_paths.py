"""Training speed of the default model on this CPU, per precision and memory layout, and
optionally a whole default run with its per-phase time table.

    python benchmarks/cpu_paths.py                        # the step table, ~2 minutes on 2 cores
    python benchmarks/cpu_paths.py --run ../shared/data/chest_xray_224 --amp off --out /tmp/speed

The step table times forward + backward + AdamW of the default CustomCNN (IMG_SIZE, CHANNELS,
FC_HIDDEN, batch BATCH_SIZE) on random images, for fp32 and bf16 autocast, each in the NCHW and
the NHWC (channels_last) layout, interleaved so that load from other processes hits every path
alike; it prints images/s and the ratio to fp32 NCHW (the layout train_cxr.py used on CPUs without
AMX before it switched to NHWC). `--amp auto` picks bf16 only on a CPU with AMX.

`--allocator` times training steps and evaluation (batch 256, as every scoring pass had it before
eval_batch_size; a CPU now scores 32 images a batch at 112 px) under three glibc malloc settings,
each in a fresh interpreter, interleaved: glibc's defaults, the 32 MB mmap threshold train_cxr.py
set before, and keep_freed_memory() as it is now (no mmap); it prints images/s, page faults per
training step, peak memory, and the ratios to the defaults.

`--eval-batches RUN` times what follows training, calibration, the guard's feature passes and the
test report (final_report), of a finished run on its data, once per scoring batch size
(`--batches`, default 256,64,32,16; 256 was the size of every pass before eval_batch_size),
interleaved over `--rounds`, each on a fresh copy of the run folder, with the allocator as a run
leaves it after training; it prints the median seconds, the ratio to the first size, the page
faults, and the size eval_batch_size picks for that run:

    python benchmarks/cpu_paths.py --eval-batches /tmp/cxr_cpu_paths/RUN --rounds 3

--run DATA trains the default recipe on DATA (a subprocess: `python train_cxr.py --data-dir DATA
--amp AMP`) and prints its wall time and the per-phase table from its train.log. With --vs FLAGS it
then trains once more with those flags added, for example the previous default, and prints that
run's table and the ratio of the two wall times:

    python benchmarks/cpu_paths.py --run ../shared/data/chest_xray_224 --amp off --vs="--img-size 128"
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import re
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_cxr as T  # noqa: E402


def step_rate(layout: str, dtype, steps: int, seed: int = 0) -> float:
    torch.manual_seed(seed)
    model = T.CustomCNN(img_size=T.IMG_SIZE, channels=T.CHANNELS, fc_hidden=T.FC_HIDDEN).train()
    x = torch.randn(T.BATCH_SIZE, 1, T.IMG_SIZE, T.IMG_SIZE)
    y = torch.randint(0, 2, (T.BATCH_SIZE,))
    if layout == "NHWC":
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ctx = (lambda: torch.autocast("cpu", dtype=dtype)) if dtype is not None else contextlib.nullcontext

    def step():
        with ctx():
            loss = nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # first call: oneDNN picks and caches its kernels
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * T.BATCH_SIZE / (time.perf_counter() - t)


ALLOC = """
import ctypes, resource, sys, time, torch
sys.path.insert(0, {root!r})
import train_cxr as T
libc = ctypes.CDLL("libc.so.6")
if {setting!r} == "mmap threshold 32 MB":
    libc.mallopt(-3, 32 << 20); libc.mallopt(-1, 1 << 30)
elif {setting!r} == "no mmap (now)":
    assert T.keep_freed_memory().__enter__()  # left on for the rest of this process
if {threads}:
    torch.set_num_threads({threads})
torch.manual_seed(0)
model = T.CustomCNN(img_size=T.IMG_SIZE, channels=T.CHANNELS, fc_hidden=T.FC_HIDDEN)
model = model.to(memory_format=torch.channels_last)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
x = torch.randn(T.BATCH_SIZE, 1, T.IMG_SIZE, T.IMG_SIZE).contiguous(memory_format=torch.channels_last)
y = torch.randint(0, 2, (T.BATCH_SIZE,))
def step():
    loss = torch.nn.functional.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
step(); step()
f0, t = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
for _ in range({steps}):
    step()
train = {steps} * T.BATCH_SIZE / (time.perf_counter() - t)
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / {steps}
model.eval()
xe = torch.randn(256, 1, T.IMG_SIZE, T.IMG_SIZE).contiguous(memory_format=torch.channels_last)
with torch.no_grad():
    model(xe)
    t = time.perf_counter()
    for _ in range({steps}):
        model(xe)
    ev = {steps} * 256 / (time.perf_counter() - t)
print(train, ev, faults, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""
ALLOC_SETTINGS = ("glibc defaults", "mmap threshold 32 MB", "no mmap (now)")


def allocator_table(steps: int, rounds: int, threads: int) -> None:
    res: dict = {s: [] for s in ALLOC_SETTINGS}
    for _ in range(rounds):
        for setting in ALLOC_SETTINGS:
            code = ALLOC.format(root=str(ROOT), setting=setting, steps=steps, threads=threads)
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            res[setting].append([float(v) for v in out.stdout.split()])
    base = [max(r[i] for r in res[ALLOC_SETTINGS[0]]) for i in (0, 1)]
    print(f"{'malloc setting':<22} {'train img/s':>11} {'ratio':>6} {'eval img/s':>10} {'ratio':>6} "
          f"{'faults/step':>11} {'peak MB':>8}   (best of {rounds} rounds)")
    for setting, r in res.items():
        tr, ev = max(v[0] for v in r), max(v[1] for v in r)
        print(f"{setting:<22} {tr:>11.1f} {tr / base[0]:>5.2f}x {ev:>10.1f} {ev / base[1]:>5.2f}x "
              f"{statistics.median(v[2] for v in r):>11.0f} {max(v[3] for v in r):>8.0f}")


def eval_batch_table(run: str, batches: list, rounds: int) -> None:
    """final_report (calibration, the guard's feature passes, the test report) of a finished run,
    on a copy of the run folder per try, with eval_batch_size pinned to each batch size in turn."""
    ck = T.load_checkpoint(Path(run) / "best_model.pt")
    cfg = T.Config.from_dict(ck["config"])
    cfg.device, cfg.amp = "cpu", "off"
    rt = T.setup_runtime(cfg)
    data = T.prepare_data(cfg)
    with T.keep_freed_memory():  # on and off again, as a run leaves the allocator after its epoch loop
        data["train"].images.float().sum()  # a float copy of the training images (~270 MB), freed again
    rule = T.eval_batch_size(T.model_from_checkpoint(ck, rt), cfg.img_size, "cpu")
    logging.getLogger().setLevel(logging.ERROR)  # the report's own lines, once per try
    real, seconds, faults = T.eval_batch_size, {b: [] for b in batches}, {b: [] for b in batches}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for b in batches:
                T.eval_batch_size = lambda model, img_size, device, b=b: b
                copy = Path(tmp) / f"{b}_{r}"
                shutil.copytree(run, copy)
                f, t = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
                T.final_report(cfg, rt, data["train"], data["val"], data["test"], copy, data["digests"])
                seconds[b].append(time.perf_counter() - t)
                faults[b].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f)
                shutil.rmtree(copy)
    T.eval_batch_size = real
    test = f"{len(data['test'])} test images" if data["test"] is not None else "no test folder"
    print(f"calibration, guard and test report of {run} ({cfg.img_size} px, {test}); the rule picks {rule}")
    base = statistics.median(seconds[batches[0]])
    for b in batches:
        med = statistics.median(seconds[b])
        print(f"batch {b:>4}: median {med:6.1f} s ({base / med:4.2f}x batch {batches[0]}); each round: "
              f"{', '.join(f'{v:.1f} s' for v in seconds[b])}; page faults (millions): "
              f"{', '.join(f'{v / 1e6:.2f}' for v in faults[b])}")


def run_default(data: str, amp: str, out: str, extra: tuple = ()) -> float:
    name = f"cpu_paths_{amp}_{int(time.time())}"
    cmd = [sys.executable, str(ROOT / "train_cxr.py"), "--data-dir", data, "--amp", amp,
           "--output-dir", out, "--run-name", name, *extra]
    print("running:", " ".join(cmd), flush=True)
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    log = (Path(out) / name / "train.log").read_text()
    line = [ln for ln in log.splitlines() if "time per phase" in ln][-1]
    precision = re.search(r"precision: (\S+)", log)
    print(f"{' '.join(['default run', *extra])}, --amp {amp} ({precision.group(1) if precision else '?'}): "
          f"{wall:.1f} s wall ({wall / 60:.1f} min) including the interpreter start")
    print(f"{'phase':<44} {'seconds':>8} {'share':>6}")
    for part in line.split("wall): ")[1].split("; "):
        m = re.fullmatch(r"(.+) ([\d.]+) s \((\d+%)\)", part.strip())
        if m:
            print(f"{m.group(1):<44} {float(m.group(2)):>8.1f} {m.group(3):>6}")
    return wall


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6, help="timed steps per path and round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best round is reported")
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    p.add_argument("--allocator", action="store_true", help="only the malloc-setting table (Linux, glibc)")
    p.add_argument("--eval-batches", default="", metavar="RUN",
                   help="only time the calibration, guard and test report of this finished run per batch size")
    p.add_argument("--batches", default="256,64,32,16", help="batch sizes for --eval-batches")
    p.add_argument("--run", default="", help="also train the default recipe on this data folder")
    p.add_argument("--amp", default="off", choices=("auto", "on", "off"), help="--amp of that run")
    p.add_argument("--out", default="/tmp/cxr_cpu_paths", help="where that run's folder goes")
    p.add_argument("--vs", default="", metavar="FLAGS",
                   help='after --run, a second run with these train_cxr.py flags added (--vs="--img-size 128")')
    a = p.parse_args()
    if a.vs and not a.run:  # before the two-minute step table, not after it
        p.error("--vs needs --run DATA")
    if a.run and not Path(a.run).is_dir():
        p.error(f"--run {a.run} is not a folder: pass a DATA_DIR (the folder that holds train/)")
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.allocator:
        allocator_table(a.steps, a.rounds, a.threads)
        return 0
    if a.eval_batches:
        eval_batch_table(a.eval_batches, [int(v) for v in a.batches.split(",")], a.rounds)
        return 0
    T.keep_freed_memory().__enter__()  # on for the rest of this process, as train_cxr.py's epoch loop has it
    amx = T.cpu_has_fast_bf16()
    print(f"CPU threads {torch.get_num_threads()}, AMX {amx}, torch {torch.__version__}; "
          f"model: CustomCNN {T.IMG_SIZE} px, channels {T.CHANNELS}, FC {T.FC_HIDDEN}, batch {T.BATCH_SIZE}")
    paths = [("fp32", "NCHW", None), ("fp32", "NHWC", None), ("bf16", "NCHW", torch.bfloat16),
             ("bf16", "NHWC", torch.bfloat16)]
    rates: dict = {p_[:2]: [] for p_ in paths}
    for _ in range(a.rounds):
        for prec, layout, dtype in paths:
            # bf16 without AMX is an order of magnitude slower: fewer steps keep the table quick
            rates[(prec, layout)].append(step_rate(layout, dtype, a.steps if dtype is None or amx else 2))
    base = max(rates[("fp32", "NCHW")])
    print(f"{'precision':<10} {'layout':<7} {'images/s':>9} {'vs fp32 NCHW':>13}   (best of {a.rounds} rounds; "
          "median in brackets)")
    for (prec, layout), r in rates.items():
        print(f"{prec:<10} {layout:<7} {max(r):>9.1f} {max(r) / base:>12.2f}x   ({statistics.median(r):.1f})")
    if a.run:
        wall = run_default(a.run, a.amp, a.out)
        if a.vs:
            other = run_default(a.run, a.amp, a.out, tuple(shlex.split(a.vs)))
            print(f"wall time: {wall:.1f} s against {other:.1f} s with {a.vs}: {other / wall:.2f}x faster")
    return 0


if __name__ == "__main__":
    sys.exit(main())
