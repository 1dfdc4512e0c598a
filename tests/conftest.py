"""Shared fixtures: tiny synthetic datasets and a way to run the script in-process."""
import csv
import importlib.util
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from threadpoolctl import threadpool_limits

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train_cxr  # noqa: E402

# One CPU thread for the whole test process: torch's intra-op pool and the BLAS under numpy/scikit-learn.
# The tests' networks and matrices are tiny, so a second thread only adds waiting, and on a busy 2-core
# machine a run on 2 threads took 3-4 times the CPU of the same run on one (the waiting threads spin).
# A run without --num-threads keeps the thread count it finds (setup_runtime), so it runs on one too.
torch.set_num_threads(1)
threadpool_limits(1)

REAL_TRAIN = ROOT.parent / "shared" / "data" / "chest_xray_224" / "train"

# Small, fast settings for end-to-end runs on 2 CPU cores. On the CPU even where a GPU is visible:
# the tests compare against CPU recomputations and bit-identical reruns (tests/test_cuda.py has the
# GPU's own checks).
TINY = ["--img-size", "32", "--channels", "8,16,32,32", "--fc-hidden", "32", "--batch-size", "16",
        "--bootstrap", "50", "--num-workers", "0", "--num-gradcam-images", "4", "--lr", "1e-3",
        "--amp", "off", "--device", "cpu"]



def _can_symlink() -> bool:
    with tempfile.TemporaryDirectory() as d:
        try:
            os.symlink(d, os.path.join(d, "link"), target_is_directory=True)
        except (OSError, NotImplementedError):
            return False
    return True


# Windows makes symbolic links only with Developer Mode or as an administrator (WinError 1314 otherwise).
needs_symlinks = pytest.mark.skipif(not _can_symlink(), reason="this OS account cannot make symbolic links")


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """A read-only-by-convention synthetic dataset: train 60/90, test 20/30 (NORMAL/PNEUMONIA), 40 px."""
    root = tmp_path_factory.mktemp("synth") / "chest_xray"
    train_cxr.write_synthetic_dataset(root, {"NORMAL": 60, "PNEUMONIA": 90}, {"NORMAL": 20, "PNEUMONIA": 30},
                                      size=40, seed=1)
    return root


@pytest.fixture
def data_copy(synth_root, tmp_path) -> Path:
    """A private copy of the synthetic dataset that a test may damage."""
    dst = tmp_path / "data"
    shutil.copytree(synth_root, dst)
    return dst


def backend_flags() -> dict:
    """Every process-wide setting the script changes (setup_runtime, --num-threads, --deterministic)."""
    return {"threads": torch.get_num_threads(),
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "deterministic_warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
            "cudnn_deterministic": torch.backends.cudnn.deterministic,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cublas_workspace": os.environ.get("CUBLAS_WORKSPACE_CONFIG")}


def restore_backend_flags(flags: dict) -> None:
    torch.set_num_threads(flags["threads"])
    torch.use_deterministic_algorithms(flags["deterministic_algorithms"], warn_only=flags["deterministic_warn_only"])
    torch.backends.cudnn.deterministic = flags["cudnn_deterministic"]
    torch.backends.cudnn.benchmark = flags["cudnn_benchmark"]
    torch.backends.cudnn.allow_tf32 = flags["cudnn_allow_tf32"]
    # Not torch.get/set_float32_matmul_precision (the script never sets it): on a CUDA machine with torch 2.11,
    # once a run had set matmul.allow_tf32, the getter raised "mix of the legacy and new APIs" in every later test.
    torch.backends.cuda.matmul.allow_tf32 = flags["matmul_allow_tf32"]
    if flags["cublas_workspace"] is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = flags["cublas_workspace"]


@pytest.fixture(autouse=True)
def _keep_backend_flags():
    """A run sets process-wide torch switches: give every other test the values it found."""
    flags = backend_flags()
    yield
    restore_backend_flags(flags)


def read_csv(path: Path) -> list:
    """The rows of a CSV the script wrote (history.csv, predictions.csv) as dicts."""
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def load_benchmark(name: str):
    """benchmarks/NAME.py as a module (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run(argv, capsys=None) -> int:
    """Run train_cxr.main in-process and return its exit code."""
    return train_cxr.main([str(a) for a in argv])


def stopped_in_epoch(n: int, monkeypatch, argv) -> int:
    """Exit code of a training run that a Ctrl-C stops in epoch n (last.pt holds epoch n - 1)."""
    monkeypatch.setitem(train_cxr._STOP, "signal", None)
    real = train_cxr.train_one_epoch

    def stop(st, train, epoch):
        if epoch == n:
            train_cxr._STOP["signal"] = signal.SIGINT
        return real(st, train, epoch)
    monkeypatch.setattr(train_cxr, "train_one_epoch", stop)
    try:
        return run(argv)
    finally:
        monkeypatch.setattr(train_cxr, "train_one_epoch", real)
