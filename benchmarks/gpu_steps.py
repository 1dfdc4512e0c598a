"""Where a training step's time goes on a GPU: the GPU running kernels, or the GPU waiting for the host.

    python benchmarks/gpu_steps.py                          # CUDA: batch 64 (the default) and 256
    python benchmarks/gpu_steps.py --device cpu --steps 3   # a smoke check of the script

A GPU session is rare and short (issue 15), so this gathers in seconds what the next lever depends
on. For each batch size: the default recipe's model, AdamW, EMA and augmentation (train_cxr.build_state,
train_cxr.train_step) on random uint8 images held on the device as a run holds them, 10 warm-up steps,
then --steps steps timed between two synchronisations, then --steps more under torch.profiler:

  images/s          batch x steps / wall time
  wall ms/step      the same, per step
  GPU busy ms/step  the time the GPU spent in kernels (profiler; CUDA only)
  busy share        GPU busy / wall: well under 1 means the GPU waits for the host to queue work
                    (Python and kernel launches), and fewer launches (benchmarks/step_ops.py) or CUDA
                    graphs are the levers; near 1 means the GPU itself is the limit
  kernels/step      kernel launches the profiler saw (CUDA only)

Only speed: a bigger batch trains this network less well in 20 epochs (README, the batch-256 CV),
so its figure says what a batch-size change could buy, not that it should be made.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_cxr as T  # noqa: E402


def device_kernels(prof) -> tuple[float, int]:
    """(milliseconds the GPU spent in kernels and copies, their count) from a finished torch.profiler run:
    the events on the GPU itself, each lasting as long as its kernel ran."""
    on_gpu = [e for e in prof.events() if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    return sum(e.time_range.elapsed_us() for e in on_gpu) / 1000, len(on_gpu)


def measure(batch: int, steps: int, device: str) -> dict:
    cfg = T.Config(device=device, batch_size=batch)
    rt = T.setup_runtime(cfg)
    n = 4434  # the default run's training split
    gen_data = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, cfg.work_size, cfg.work_size), dtype=torch.uint8, generator=gen_data)
    labels = torch.randint(0, 2, (n,), generator=gen_data)
    images, labels_dev = images.to(rt.device), labels.to(rt.device)
    st = T.build_state(cfg, rt, ["NORMAL", "PNEUMONIA"], labels.numpy(), {"mode": cfg.normalize}, steps=n // batch)
    st.model.train()
    gen = torch.Generator().manual_seed(1)
    order = torch.randperm(n, generator=gen_data).to(rt.device)
    sync = torch.cuda.synchronize if rt.device.type == "cuda" else (lambda: None)

    def run(k: int, start: int) -> None:
        for s in range(start, start + k):
            idx = order[(s * batch) % (n - batch):][:batch]
            T.train_step(st, images[idx], labels_dev[idx], gen)

    run(10, 0)
    sync()
    t = time.perf_counter()
    run(steps, 10)
    sync()
    wall = (time.perf_counter() - t) / steps * 1000
    out = {"batch": batch, "images/s": batch / wall * 1000, "wall ms/step": wall}
    if rt.device.type == "cuda":
        try:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                    torch.profiler.ProfilerActivity.CUDA]) as prof:
                run(steps, 10 + steps)
                sync()
            busy, kernels = device_kernels(prof)
            out |= {"GPU busy ms/step": busy / steps, "busy share": busy / steps / wall,
                    "kernels/step": kernels / steps}
        except Exception as e:  # the wall figures still stand
            print(f"  profiler failed: {type(e).__name__}: {e}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--batches", default="64,256", help="batch sizes, comma-separated (default: 64,256)")
    ap.add_argument("--steps", type=int, default=50, help="timed steps per batch size (default: 50)")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA GPU is visible (use --device cpu for a smoke check)", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"training steps of the default recipe on {name}, torch {torch.__version__}, {args.steps} steps each")
    for batch in map(int, args.batches.split(",")):
        r = measure(batch, args.steps, args.device)
        print("  " + " | ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
