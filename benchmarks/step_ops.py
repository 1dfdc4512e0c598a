"""How many operations does one training step put on the device? A CPU-side measure of a GPU lever.

    python benchmarks/step_ops.py                   # the working tree against main
    python benchmarks/step_ops.py --rev 7292116     # against another revision

On a GPU this network is small enough that a step costs mostly the launching of its kernels: issue
15 measured 5,800-8,200 training images/s at batch 64 on an H200, far below what its arithmetic
allows. Fewer operations on the device a step is the lever, and it can be counted without a GPU.
This runs one default-recipe step (batch 64) on `meta` tensors (shapes only, no data, no arithmetic)
under a dispatch mode that sees every aten operation, for the working tree's train_cxr.py and a
baseline revision's, in one process, and prints them per part of the step:

  kernels   operations that compute or copy on the device (each at least one kernel launch)
  views     views and allocations on the device (detach, view, t, empty...): host work, no kernel
  host      operations on CPU tensors (the augmentation's random numbers and what is made of them)

AdamW runs with foreach=True, the default on CUDA (on `meta` it would fall back to one loop per
tensor). The step runs in fp32: a GPU's bf16 autocast adds a cast of each weight and input (autocast
has no `meta` device). Not seen: how many kernels a fused operation launches (cuDNN may use several),
how long each launch takes, and waits for the GPU (tests/test_cuda.py checks those under CUDA's sync debug
mode). The parts are the step's own calls, replayed in its order; for a revision that has
train_cxr.train_step, the replay's total must equal one train_step's, which the script checks.
"""
from __future__ import annotations

import argparse
import collections
import importlib.util
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from same_history import script_at  # noqa: E402
PARTS = ("augment", "forward and loss", "backward", "optimizer", "EMA")


class Count(TorchDispatchMode):
    """Counts aten operations by the part of the step in progress (self.part) and by kind."""

    def __init__(self):
        super().__init__()
        self.part, self.counts = "", collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
        if not any(t.device.type == "meta" for t in tensors):
            kind = "host"
        elif (func.__name__.startswith("empty")
              or any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)):
            kind = "views"
        else:
            kind = "kernels"
        self.counts[self.part, kind] += 1
        return out


def load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up while the file runs
    spec.loader.exec_module(mod)
    return mod


def step_counts(T) -> tuple[collections.Counter, int | None]:
    """(counts per (part, kind) of one replayed step, the total of one train_step or None without it)."""
    torch.manual_seed(0)
    cfg, dev = T.Config(device="cpu"), torch.device("meta")
    st = T.build_state(cfg, T.Runtime(dev, None), ["NORMAL", "PNEUMONIA"], np.array([0, 1] * 32),
                       {"mode": cfg.normalize}, steps=10)
    groups = [{k: g[k] for k in ("params", "weight_decay")} for g in st.optimizer.param_groups]
    st.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, foreach=True)
    st.scheduler = torch.optim.lr_scheduler.LambdaLR(st.optimizer, lambda s: 1.0)
    images = torch.empty((cfg.batch_size, cfg.work_size, cfg.work_size), dtype=torch.uint8, device=dev)
    y = torch.zeros(cfg.batch_size, dtype=torch.long, device=dev)
    gen = torch.Generator().manual_seed(0)
    mode = Count()

    def replay():  # the body of train_step (or of the older loop), part by part
        mode.part = "augment"
        x = T.augment_batch(images, cfg, st.norm, gen).contiguous(memory_format=torch.channels_last)
        mode.part = "forward and loss"
        logits = st.model(x)
        loss = st.criterion(logits.float(), y)
        loss.detach(), logits.detach().float().softmax(1)  # what the epoch keeps of each step
        mode.part = "backward"
        st.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        mode.part = "optimizer"
        st.optimizer.step()
        st.scheduler.step()
        mode.part = "EMA"
        st.ema.update(st.model)

    replay()  # the first step creates the optimizer's state
    with mode:
        replay()
    whole = None
    if hasattr(T, "train_step"):
        check = Count()
        with check:
            T.train_step(st, images, y, gen)
        whole = sum(check.counts.values())
    return mode.counts, whole


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rev", default="main", help="the baseline revision (default: main)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        old = script_at(args.rev, Path(tmp) / "train_cxr.py")
        results = {}
        for label, path in ((args.rev, old), ("working tree", ROOT / "train_cxr.py")):
            counts, whole = step_counts(load(path, f"train_cxr_{len(results)}"))
            replayed = sum(counts.values())
            if whole is not None and whole != replayed:
                print(f"error: {label}: the replay counted {replayed} operations, train_step {whole}", file=sys.stderr)
                return 1
            results[label] = counts
    print(f"aten operations in one default-recipe training step (batch 64), torch {torch.__version__}")
    print(f"{'part':<18}" + "".join(f"{label + ': ' + kind:>28}" for label in results for kind in ("kernels", "views")))
    for part in (*PARTS, "total"):
        row = []
        for counts in results.values():
            for kind in ("kernels", "views"):
                row.append(sum(v for (p, k), v in counts.items() if k == kind and part in (p, "total")))
        print(f"{part:<18}" + "".join(f"{n:>28}" for n in row))
    (a, b) = [sum(v for (_, k), v in c.items() if k == "kernels") for c in results.values()]
    hosts = [sum(v for (_, k), v in c.items() if k == "host") for c in results.values()]
    print(f"kernel-launching operations a step: {b} against {a} ({a / b:.2f}x fewer); "
          f"operations on the host: {hosts[1]} against {hosts[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
