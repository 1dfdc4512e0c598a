"""The GPU's own checks, skipped without CUDA: results are compared on the device that made them.

A CUDA run is not bit-identical to a CPU run (TF32, other kernels, other summation orders), and
without --deterministic not even to another CUDA run: so probabilities are compared to TF32-level
tolerances, Grad-CAM maps by correlation for an explicit target class, and only --deterministic
runs bit for bit. benchmarks/gpu_check.sh runs this file with the rest of the suite.
"""
import inspect
import json
import linecache
import traceback
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import train_cxr as T
from conftest import TINY, read_csv, run

DEVICE = "cuda"
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU")
ON_DEVICE = [*TINY, "--device", DEVICE]  # the later --device wins over TINY's cpu


@pytest.fixture(scope="module")
def cuda_run(synth_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("cuda_runs")
    assert run([*ON_DEVICE, "--epochs", 2, "--data-dir", synth_root, "--output-dir", out, "--run-name", "gpu"]) == 0
    return out / "gpu"


def test_cuda_run_writes_a_report_on_its_device(cuda_run, synth_root, tmp_path):
    config = json.loads((cuda_run / "config.json").read_text())
    assert config["device"].startswith(DEVICE)
    # --evaluate on the same device reproduces the test report up to TF32 rounding.
    assert run(["--evaluate", "--checkpoint", cuda_run / "best_model.pt", "--data-dir", synth_root, "--device", DEVICE,
                "--output-dir", tmp_path, "--run-name", "ev", "--num-workers", 0]) == 0
    want = json.loads((cuda_run / "test_metrics.json").read_text())
    got = json.loads((tmp_path / "ev" / "test_metrics.json").read_text())
    assert got["threshold"] == want["threshold"] and got["n"] == want["n"]
    assert got["auc"] == pytest.approx(want["auc"], abs=0.01)


def test_cuda_predict_probabilities_and_maps(cuda_run, synth_root, tmp_path):
    files = sorted((synth_root / "test").rglob("*.png"))[::5]
    assert run(["--predict", *files, "--checkpoint", cuda_run / "best_model.pt", "--device", DEVICE,
                "--output-dir", tmp_path, "--run-name", "p", "--save-cam-arrays", "--num-workers", 0]) == 0
    rows = read_csv(tmp_path / "p" / "predictions.csv")
    ckpt = T.load_checkpoint(cuda_run / "best_model.pt")
    classes, tta = ckpt["class_names"], ckpt["config"]["tta"]
    rt = T.Runtime(torch.device(DEVICE), None)
    model = T.model_from_checkpoint(ckpt).to(rt.device)
    arr, bad = T.decode_all([r["path"] for r in rows], ckpt["work_size"])
    assert not bad
    images = torch.from_numpy(arr)
    # The CSV holds calibrated probabilities (the checkpoint's temperature and biases): compared with the raw
    # softmax, as before calibration existed, this failed on the first GPU it met (0.37 for 0.51).
    probs = T.calibrate(T.predict_probs(model, images, ckpt["img_size"], ckpt["normalization"], rt, tta),
                        ckpt["calibration"])
    saved = np.array([[float(r[f"prob_{c}"]) for c in classes] for r in rows])
    np.testing.assert_allclose(saved, probs, atol=2e-3)  # TF32-level, same device

    targets = [classes.index(r["predicted"]) for r in rows]  # explicit: the label the CSV reports
    maps = T.gradcam_maps(model, images, targets, ckpt, rt)
    arrays = sorted((tmp_path / "p" / "grad_cam").glob("*.npy"))
    assert len(arrays) == len(rows)
    for k, (row, m) in enumerate(zip(rows, maps)):
        a = np.load(next(p for p in arrays if p.name.startswith(f"{k:05d}_")))
        if a.std() < 1e-6 or m.std() < 1e-6:  # an empty map must stay empty
            assert a.std() < 1e-6 and m.std() < 1e-6, row["path"]
            continue
        assert np.corrcoef(a.ravel(), m.ravel())[0, 1] > 0.99, row["path"]


def test_cuda_deterministic_runs_are_identical(synth_root, tmp_path):
    # The user's GPU settings (bf16 autocast, channels_last), with --deterministic.
    args = [*ON_DEVICE, "--amp", "auto", "--deterministic", "--epochs", 2, "--data-dir", synth_root,
            "--output-dir", tmp_path]
    assert run([*args, "--run-name", "a"]) == 0
    assert run([*args, "--run-name", "b"]) == 0
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    h1, h2 = (strip(read_csv(tmp_path / n / "history.csv")) for n in ("a", "b"))
    assert len(h1) == 2 and h1 == h2
    w1, w2 = (T.load_checkpoint(tmp_path / n / "last.pt")["train_model"] for n in ("a", "b"))
    for k in w1:
        assert torch.equal(w1[k], w2[k]), k


def test_no_training_step_waits_for_the_gpu():
    # The host queues step n+1 while the GPU runs step n, unless something in the step waits for the
    # GPU: every step did, twice (a blocking copy of the augmentation's random numbers, and the GPU's
    # images indexed with an index on the host). Allowed: the epoch's set-up before the batch loop, the
    # loss check every 20 batches and what follows it, the epoch's end. CUDA's sync debug mode warns
    # at each wait, with the line that caused it (inside torch or the step's own functions: not allowed).
    if DEVICE != "cuda":
        pytest.skip("the sync debug mode is CUDA's")
    src, first = inspect.getsourcelines(T.train_one_epoch)
    loop = first + next(i for i, line in enumerate(src) if line.strip().startswith("for b in bar:"))
    check = first + next(i for i, line in enumerate(src) if line.strip().startswith("check = "))
    allowed = set(range(first, loop)) | set(range(check, first + len(src)))
    cfg = T.Config(device=DEVICE, img_size=32, channels=(8, 16, 32, 32), fc_hidden=32, batch_size=8)
    rt = T.Runtime(torch.device(DEVICE), torch.bfloat16)
    labels = torch.arange(48) % 2
    train = T.Split(torch.randint(0, 256, (48, 36, 36), dtype=torch.uint8).to(rt.device), labels, [""] * 48)
    st = T.build_state(cfg, rt, ["NORMAL", "PNEUMONIA"], labels.numpy(), {"mode": "image"}, steps=6)
    T.train_one_epoch(st, train, 1)  # the first steps may wait (the optimizer's state, kernel choice)
    waits = []  # (where the wait happened, the line of train_cxr.py that led to it)

    def keep(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):  # a wait inside torch is judged by the line of ours that called it
            ours = [f.lineno for f in traceback.extract_stack() if Path(f.filename).name == "train_cxr.py"]
            where = "/".join(Path(filename).parts[-3:])  # torch/cuda/__init__.py, not a bare __init__.py
            waits.append((f"{where}:{lineno}", ours[-1] if ours else None))
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = keep
        torch.cuda.set_sync_debug_mode("warn")
        try:
            T.train_one_epoch(st, train, 2)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert waits  # the loss check and the epoch's end do wait: the mode reports waits here
    in_steps = sorted({(at, ours, linecache.getline(T.__file__, ours or 0).strip())
                       for at, ours in waits if ours not in allowed})
    assert not in_steps, in_steps  # e.g. torch 2.11 on an H200: waits in functional.py:3504 and __init__.py:1270
