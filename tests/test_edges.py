"""Corner cases of issue 12: the positive class, patient overlap, --deterministic, --resume with
other settings or images, the EMA's batch-norm statistics, and decisions every DDP process takes together."""
import dataclasses
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path, PureWindowsPath

import cv2
import numpy as np
import pytest
import torch

import train_cxr as T
from conftest import ROOT, TINY, backend_flags, read_csv, restore_backend_flags, run, stopped_in_epoch

FAST = [*TINY, "--num-threads", "1"]
REAL_BUILD_STATE = T.build_state


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# ----------------------------------------------------------------------------------------------
# Positive class
# ----------------------------------------------------------------------------------------------
def test_positive_index_rules():
    assert T.positive_index(["NORMAL", "PNEUMONIA"]) == 1
    assert T.positive_index(["Pneumonia", "normal"]) == 0
    assert T.positive_index(["NORMAL", "PNEUMONIA"], "NORMAL") == 0
    assert T.positive_index(["ABNORMAL", "NORMAL"], "ABNORMAL") == 0
    assert T.positive_index(["COVID", "NORMAL", "VIRAL"]) == 2  # more classes: only names the report's class
    with pytest.raises(T.CXRError, match="--positive-class") as e:
        T.positive_index(["ABNORMAL", "NORMAL"])  # the old rule silently took NORMAL
    assert "ABNORMAL" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(T.CXRError, match="--positive-class 'SICK'"):
        T.positive_index(["NORMAL", "PNEUMONIA"], "SICK")


def test_predict_labels_follow_the_given_positive_class():
    probs = torch.tensor([[0.7, 0.3], [0.2, 0.8]]).numpy()
    # ABNORMAL (index 0) positive with threshold 0.6: only the first image reaches it.
    assert T.predict_labels(probs, 0, 0.6).tolist() == [0, 1]
    assert T.predict_labels(probs, 0, 0.15).tolist() == [0, 0]


def _rename_class(root: Path, old: str, new: str) -> None:
    for split in ("train", "test"):
        (root / split / old).rename(root / split / new)


def test_ambiguous_classes_stop_and_the_flag_decides(data_copy, tmp_path, capsys):
    _rename_class(data_copy, "PNEUMONIA", "ABNORMAL")  # classes ABNORMAL, NORMAL
    out = tmp_path / "runs"
    args = [*FAST, "--epochs", "1", "--data-dir", data_copy, "--output-dir", out]
    assert run([*args, "--run-name", "guess"]) == 2
    assert "--positive-class" in one_error_line(capsys)
    assert run([*args, "--run-name", "typo", "--positive-class", "ABNORMALL"]) == 2
    assert "--positive-class 'ABNORMALL'" in one_error_line(capsys)
    assert not out.exists()  # refused before anything was written

    assert run([*args, "--run-name", "ok", "--positive-class", "ABNORMAL"]) == 0
    assert "positive class: ABNORMAL" in capsys.readouterr().out
    metrics = json.loads((out / "ok" / "test_metrics.json").read_text())
    assert metrics["positive_class"] == "ABNORMAL"
    cm = metrics["confusion_matrix"]  # rows and columns in class order: ABNORMAL (30 images), NORMAL (20)
    assert sum(cm[0]) == 30 and sum(cm[1]) == 20
    assert metrics["sensitivity"] == pytest.approx(cm[0][0] / 30)  # ABNORMAL found as ABNORMAL
    assert metrics["specificity"] == pytest.approx(cm[1][1] / 20)
    ckpt = T.load_checkpoint(out / "ok" / "best_model.pt")
    assert ckpt["class_names"] == ["ABNORMAL", "NORMAL"] and ckpt["positive_class"] == 0
    assert json.loads((out / "ok" / "config.json").read_text())["config"]["positive_class"] == "ABNORMAL"
    # The checkpoint modes use the stored positive class: they refuse --positive-class, so guessing one
    # again (which stops for these names) made every --predict, --evaluate and --recalibrate fail.
    capsys.readouterr()
    assert run(["--predict", data_copy / "test" / "ABNORMAL", "--checkpoint", out / "ok", "--output-dir", out,
                "--run-name", "pred", "--num-workers", 0, "--device", "cpu"]) == 0
    assert "P(ABNORMAL)" in capsys.readouterr().out
    assert run(["--evaluate", "--data-dir", data_copy, "--checkpoint", out / "ok", "--output-dir", out,
                "--run-name", "eval", "--num-workers", 0, "--device", "cpu", "--num-gradcam-images", 0]) == 0
    assert json.loads((out / "eval" / "test_metrics.json").read_text())["sensitivity"] == metrics["sensitivity"]


# ----------------------------------------------------------------------------------------------
# Patients: grouping pattern and overlap between train and test / val
# ----------------------------------------------------------------------------------------------
def test_patient_regex():
    pat = T.patient_pattern(r"_(P\d+)_")
    assert T.patient_id("x/site1_P0042_view2.png", pat) == "p0042"
    assert T.patient_id("x/site1_view2.png", pat) == "site1_view2"  # no match: the file is its own patient
    assert T.patient_id("person7_bacteria_1.jpeg") == "person7"     # one argument: Kermany names
    assert T.patient_pattern("") is None
    with pytest.raises(T.CXRError, match=r"--patient-regex .*no group"):
        T.patient_pattern(r"P\d+")
    with pytest.raises(T.CXRError, match=r"--patient-regex .*not a valid"):
        T.patient_pattern(r"(P\d+")


def _prepare(capsys, **kw) -> tuple[dict, str]:
    T.setup_console_logging()  # the log's console handler writes to the captured stdout
    capsys.readouterr()
    data = T.prepare_data(T.Config(num_workers=0, img_size=32, **kw))
    return data, capsys.readouterr().out


def _copy_as(src: Path, dst_dir: Path, name: str) -> None:
    dst_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, dst_dir / name)


def _numbered_per_class(root: Path, counts: dict) -> None:
    """root/train/<CLASS>/001.png ...: every class folder numbered alike, as exports and hand-made sets often
    are; each file a different noise image (no copies, which are grouped on purpose)."""
    rng = np.random.default_rng(0)
    for c, n in counts.items():
        (root / "train" / c).mkdir(parents=True)
        for k in range(n):
            cv2.imwrite(str(root / "train" / c / f"{k + 1:03d}.png"), rng.integers(0, 256, (12, 12), np.uint8))


def test_files_that_name_no_patient_are_their_own_within_their_class(tmp_path, capsys):
    # 001.png of A, of B and of C were one "patient", counted for A: C's share of validation was left to A's
    # draw (seed 2: none of its 6 images; the run refused with "6 patient(s)... raise --val-fraction").
    _numbered_per_class(tmp_path, {"A": 30, "B": 30, "C": 6})
    for seed in range(1, 7):
        data, _ = _prepare(capsys, data_dir=str(tmp_path), seed=seed)
        assert [int((data["val"].labels == k).sum()) for k in range(3)] == [5, 5, 1]
    cfg = T.Config(data_dir=str(tmp_path), num_workers=0, img_size=32, seed=2)
    with pytest.raises(T.CXRError, match="class C is too small"):  # the rule of runs made before, for --resume
        T.prepare_data(cfg, own_in_class=False)


def test_resume_of_a_run_made_when_files_were_their_own_across_classes(tmp_path, monkeypatch):
    _numbered_per_class(tmp_path / "data", {"NORMAL": 40, "PNEUMONIA": 24})
    out, real = tmp_path / "runs", T.prepare_data
    monkeypatch.setattr(T, "prepare_data", lambda cfg, typed, copies, own: real(cfg, typed, copies, False))
    argv = [*FAST, "--epochs", "2", "--data-dir", tmp_path / "data", "--output-dir", out, "--run-name", "old"]
    assert stopped_in_epoch_2(monkeypatch, argv) == 130
    monkeypatch.setattr(T, "prepare_data", real)
    last = T.load_checkpoint(out / "old" / "last.pt")
    assert last.pop("own_in_class") is True  # what the run recorded; an older last.pt has no such entry
    old_sizes = json.loads((out / "old" / "config.json").read_text())["split_sizes"]
    T.save_checkpoint(out / "old" / "last.pt", last)
    assert run(["--resume", out / "old", "--num-threads", "1"]) == 0  # its own split: not refused as other images
    assert T.load_checkpoint(out / "old" / "best_model.pt")["split_sha256"] == last["split_sha256"]
    cfg = T.Config(data_dir=str(tmp_path / "data"), num_workers=0, img_size=32)
    assert real(cfg)["val"].paths != real(cfg, own_in_class=False)["val"].paths  # the rule changes this split
    assert old_sizes == json.loads((out / "old" / "config.json").read_text())["split_sizes"]


def test_images_beside_the_class_folders_are_named_as_left_out(data_copy, capsys):
    # train/x.png has no class: ImageFolder skipped it, and a test image put there left the report unsaid.
    shutil.copy(next((data_copy / "train" / "NORMAL").glob("*.png")), data_copy / "train" / "stray.png")
    shutil.copy(next((data_copy / "test" / "NORMAL").glob("*.png")), data_copy / "test" / "Stray.PNG")
    (data_copy / "test" / "notes.txt").write_text("not an image")
    data, out = _prepare(capsys, data_dir=str(data_copy))
    assert len(data["train"]) + len(data["val"]) == 150 and len(data["test"]) == 50
    assert f"1 image file(s) directly in {data_copy / 'train'}, outside the class folders, are left out " \
           "(e.g. stray.png)" in out
    assert f"directly in {data_copy / 'test'}, outside the class folders, are left out (e.g. Stray.PNG)" in out


def test_patient_overlap_with_test_is_reported(data_copy, capsys):
    data, out = _prepare(capsys, data_dir=str(data_copy))
    assert "both train and" not in out
    train_files = sorted((data_copy / "train" / "PNEUMONIA").glob("person*.png"))
    ids = sorted({T.patient_id(str(p)) for p in train_files})[:4]
    for k, pid in enumerate(ids):
        _copy_as(train_files[0], data_copy / "test" / "PNEUMONIA", f"{pid}_virus_{900 + k}.png")
    data, out = _prepare(capsys, data_dir=str(data_copy))
    lines = [ln for ln in out.splitlines() if "both train and test" in ln]
    assert len(lines) == 1, out
    assert "4 patient id(s)" in lines[0]
    examples = re.search(r"\(e\.g\. ([^)]*)\)", lines[0]).group(1).split(", ")
    assert len(examples) == 3 and set(examples) <= set(ids)


def test_patient_overlap_with_a_used_val_folder_is_reported(data_copy, capsys):
    train_files = sorted((data_copy / "train" / "NORMAL").glob("*.png"))
    for cls in ("NORMAL", "PNEUMONIA"):
        for k, src in enumerate(sorted((data_copy / "test" / cls).glob("*.png"))[:3]):
            _copy_as(src, data_copy / "val" / cls, f"{cls}_val_{k}.png")
    _copy_as(train_files[0], data_copy / "val" / "NORMAL", train_files[0].name)
    data, out = _prepare(capsys, data_dir=str(data_copy), min_val_per_class=3)
    assert data["val_note"].startswith(f"validation: {data_copy / 'val'} (")  # the folder is used
    lines = [ln for ln in out.splitlines() if "both train and val" in ln]
    assert len(lines) == 1 and "1 patient id(s)" in lines[0], out


def test_unmatched_names_are_said_once_and_regex_groups_them(data_copy, capsys):
    # Names of another scheme: site_<patient>_<shot>.png, two images per patient.
    for split in ("train", "test"):
        for cls in ("NORMAL", "PNEUMONIA"):
            for k, p in enumerate(sorted((data_copy / split / cls).glob("*.png"))):
                p.rename(p.with_name(f"site_{split[:2]}{cls[0]}{k // 2}_{k % 2}.png"))
    data, out = _prepare(capsys, data_dir=str(data_copy))
    assert out.count("each file counts as its own patient") == 1, out

    data, out = _prepare(capsys, data_dir=str(data_copy), patient_regex=r"^site_(\w+?)_\d+\.png$")
    assert "own patient" not in out
    pat = T.patient_pattern(r"^site_(\w+?)_\d+\.png$")
    tr = {T.patient_id(p, pat) for p in data["train"].paths}
    va = {T.patient_id(p, pat) for p in data["val"].paths}
    assert tr and va and not tr & va, "a patient is on both sides of the split"
    assert len(tr | va) < len(data["train"]) + len(data["val"])  # really grouped: 2 images a patient


def test_files_the_kermany_names_miss_are_counted_when_others_match(data_copy, capsys):
    # Kermany's folders with a few files of another source added: those files became their own patients
    # without a word (the note came only when no file matched), though two of them may be one patient.
    for k, p in enumerate(sorted((data_copy / "train" / "NORMAL").glob("*.png"))[:6]):
        p.rename(p.with_name(f"scan_{k // 2}_{k % 2}.png"))
    data, out = _prepare(capsys, data_dir=str(data_copy))
    lines = [ln for ln in out.splitlines() if "own patient" in ln]
    assert len(lines) == 1 and "6 of 150" in lines[0] and "scan_" in lines[0], out


def test_files_a_patient_regex_misses_are_counted(data_copy, capsys):
    # P<k>_0.png and P<k>-1.png: the regex misses every second shot, and each such file became its own
    # patient without a word, free to land in validation while its patient's other shot trains.
    for cls in ("NORMAL", "PNEUMONIA"):
        for k, p in enumerate(sorted((data_copy / "train" / cls).glob("*.png"))):
            p.rename(p.with_name(f"{cls[0]}{k // 2}{'_' if k % 2 == 0 else '-'}{k % 2}.png"))
    data, out = _prepare(capsys, data_dir=str(data_copy), patient_regex=r"^(\w\d+)_")
    lines = [ln for ln in out.splitlines() if "own patient" in ln]
    assert len(lines) == 1 and "75 of 150" in lines[0] and "-1.png" in lines[0], out

    (data_copy / "train" / "NORMAL" / "sub").mkdir()  # in a sub-folder '^' anchors at the folder's name
    for p in sorted((data_copy / "train" / "NORMAL").glob("*_0.png")):
        p.rename(p.with_name("sub") / p.name)
    data, out = _prepare(capsys, data_dir=str(data_copy), patient_regex=r"^(\w\d+)_")
    assert "105 of 150" in out and "sub/" in out, out


def _patient_folders(split_dir: Path, patients: dict, shots: int = 3, seed: int = 0) -> None:
    """split_dir/CLASS/<patient>/img0.png ...: one sub-folder per patient, generic file names."""
    rng = np.random.default_rng(seed)
    for cls, names in patients.items():
        for name in names:
            (split_dir / cls / name).mkdir(parents=True)
            for k in range(shots):
                cv2.imwrite(str(split_dir / cls / name / f"img{k}.png"), rng.integers(0, 255, (8, 8), np.uint8))


def test_patient_id_sees_the_folders_below_the_class_folder(tmp_path):
    path = str(tmp_path / "train" / "NORMAL" / "patient007" / "img0.png")
    rel = T.class_relative(path, tmp_path)
    assert rel == "patient007/img0.png"
    assert T.patient_id(path, rel=rel) == "patient007/img0"  # no match: the file, not every img0.png
    assert T.patient_id(path, rel=rel, stem=False) == ""
    assert T.patient_id(path, T.patient_pattern(r"^([^/]+)/"), rel=rel) == "patient007"
    flat = str(tmp_path / "train" / "NORMAL" / "IMG_7.png")  # a flat folder: the stem, as before
    assert T.patient_id(flat, rel=T.class_relative(flat, tmp_path)) == T.patient_id(flat) == "img_7"
    kermany = str(tmp_path / "train" / "PNEUMONIA" / "site2" / "person7_bacteria_1.jpeg")
    assert T.patient_id(kermany, rel=T.class_relative(kermany, tmp_path)) == "person7"  # the name, not the folder


def test_patients_in_sub_folders_never_straddle_the_split(tmp_path, capsys):
    # 2 classes x 20 patient folders x img0..2.png: the stems alone made 3 "patients" out of 40 real ones.
    root = tmp_path / "d"
    _patient_folders(root / "train", {c: [f"{c[0]}patient{k:03d}" for k in range(20)] for c in ("NORMAL", "PNEUMONIA")})
    data, out = _prepare(capsys, data_dir=str(root))
    assert len(data["val"]) == 2 * 9  # 15% of each class's 60 files, as for 60 unrelated files
    tr, va = ({T.patient_id(p, rel=T.class_relative(p, root)) for p in data[side].paths} for side in ("train", "val"))
    assert len(tr) == len(data["train"]) and len(va) == len(data["val"]) and not tr & va  # a file each
    assert out.count("each counts as its own patient") == 1 and "--patient-regex '^([^/]+)/'" in out, out
    assert "no file name matches" not in out  # one note, not two

    for regex in (r"^([^/]+)/", r"([NP]patient\d+)"):  # --patient-regex sees the sub-folder
        data, out = _prepare(capsys, data_dir=str(root), patient_regex=regex)
        assert "own patient" not in out, out
        folders = [{Path(p).parent.name for p in data[side].paths} for side in ("train", "val")]
        assert folders[0] and folders[1] and not folders[0] & folders[1], "a patient is on both sides"
        assert len(data["val"]) % 3 == 0 and len(folders[0] | folders[1]) == 40


def test_a_class_that_all_went_to_validation_asks_for_a_lower_val_fraction(tmp_path, capsys):
    # 3 NORMAL files, 3 patients: at --val-fraction 0.9 every one goes to validation, none stays to train.
    _patient_folders(tmp_path / "d" / "train", {"NORMAL": ["a", "b", "c"], "PNEUMONIA": list("defghijk")}, shots=1)
    with pytest.raises(T.CXRError, match="class NORMAL is too small") as e:
        _prepare(capsys, data_dir=str(tmp_path / "d"), val_fraction=0.9)
    assert "lower --val-fraction" in str(e.value) and "raise --val-fraction" not in str(e.value), e.value


def test_patient_overlap_counts_named_patients_only(tmp_path, capsys):
    root = tmp_path / "d"
    _patient_folders(root / "train", {c: [f"{c[0]}patient{k:03d}" for k in range(20)] for c in ("NORMAL", "PNEUMONIA")})
    # Other patients with the same generic file names, and one patient folder that is also in train.
    _patient_folders(root / "test", {"NORMAL": ["Npatient900", "Npatient000"], "PNEUMONIA": ["Ppatient900"]}, seed=1)
    data, out = _prepare(capsys, data_dir=str(root))
    assert "both train and test" not in out, out  # img0.png in two folders is not one patient
    data, out = _prepare(capsys, data_dir=str(root), patient_regex=r"^([^/]+)/")
    lines = [ln for ln in out.splitlines() if "both train and test" in ln]
    assert len(lines) == 1 and "1 patient id(s)" in lines[0] and "npatient000" in lines[0], out


def test_val_folder_with_other_class_names_is_refused(data_copy, capsys):
    for cls in ("NORMAL", "Pneumonia"):  # train/ has PNEUMONIA: the images used to vanish, said to join train
        for k, src in enumerate(sorted((data_copy / "test" / cls.upper()).glob("*.png"))[:3]):
            _copy_as(src, data_copy / "val" / cls, f"{cls}_val_{k}.png")
    with pytest.raises(T.CXRError) as e:
        _prepare(capsys, data_dir=str(data_copy))
    msg = str(e.value)
    assert str(data_copy / "val") in msg and "['NORMAL', 'PNEUMONIA']" in msg and "['NORMAL', 'Pneumonia']" in msg

    (data_copy / "val" / "Pneumonia").rename(data_copy / "val" / "PNEUMONIA")  # matching, too small: joins train
    data, out = _prepare(capsys, data_dir=str(data_copy))
    assert "its images join train" in data["val_note"]
    assert len(data["train"]) + len(data["val"]) == 150 + 6

    # 4 files a class, one unreadable: 3 images, fewer than 4, so too small (it was used, said to hold 8).
    for cls in ("NORMAL", "PNEUMONIA"):
        (data_copy / "val" / cls / "broken.png").write_bytes(b"")
    data, out = _prepare(capsys, data_dir=str(data_copy), min_val_per_class=4)
    assert "too small (6 images" in data["val_note"] and len(data["train"]) + len(data["val"]) == 150 + 6
    assert "skipping 2 unreadable" in out, out  # each listed once, not again when it joins train
    data, out = _prepare(capsys, data_dir=str(data_copy), min_val_per_class=3)
    assert data["val_note"] == f"validation: {data_copy / 'val'} (6 images)" and len(data["val"]) == 6


# ----------------------------------------------------------------------------------------------
# --deterministic and the process-wide backend flags
# ----------------------------------------------------------------------------------------------
def test_backend_flags_fast_deterministic_and_restored(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = backend_flags()
    T.set_backend_flags(deterministic=False, cuda=True)  # the default on a GPU: fast
    assert torch.backends.cudnn.benchmark and torch.backends.cudnn.allow_tf32
    assert torch.backends.cuda.matmul.allow_tf32 and not torch.are_deterministic_algorithms_enabled()
    T.set_backend_flags(deterministic=True, cuda=True)
    assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    assert torch.are_deterministic_algorithms_enabled()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    # Through the command line's path, on the CPU: the flag sets and a plain run unsets it.
    T.setup_runtime(T.Config(device="cpu", deterministic=True))
    assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark
    T.setup_runtime(T.Config(device="cpu"))
    assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic
    restore_backend_flags(before)  # what the autouse fixture does after every test
    assert backend_flags() == before



@pytest.mark.parametrize("nccl", [True, False], ids=["linux", "windows"])
def test_torchrun_on_gpus_uses_gloo_where_pytorch_has_no_nccl(nccl, monkeypatch):
    # PyTorch for Windows is built without NCCL: torchrun on its GPUs stopped with "Distributed package
    # doesn't have NCCL built in", a traceback.
    backends = []
    for k, v in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: nccl)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend: backends.append(backend))
    rt = T.setup_runtime(T.Config(device="auto"))
    assert backends == ["nccl" if nccl else "gloo"] and rt.device == torch.device("cuda", 0) and rt.world == 2


def test_deterministic_cpu_run_completes(synth_root, tmp_path):
    # Every op of a run (training, Grad-CAM, the report) has a deterministic CPU kernel.
    out = tmp_path / "runs"
    assert run([*FAST, "--epochs", "1", "--deterministic", "--data-dir", synth_root, "--output-dir", out,
                "--run-name", "det"]) == 0
    assert json.loads((out / "det" / "config.json").read_text())["config"]["deterministic"] is True


def test_compile_flag_is_gone(capsys):
    assert "compile" not in {f.name for f in dataclasses.fields(T.Config)}
    with pytest.raises(SystemExit) as e:
        T.parse_config(["--compile"])
    assert e.value.code == 2


def test_no_full_batch_is_an_input_error(synth_root, tmp_path, capsys):
    out = tmp_path / "runs"
    assert run([*FAST, "--batch-size", 500, "--data-dir", synth_root, "--output-dir", out, "--run-name", "b"]) == 2
    assert "--batch-size 500" in one_error_line(capsys)  # was a traceback from an empty epoch
    assert not out.exists()


# ----------------------------------------------------------------------------------------------
# --resume repeats the run: other settings, other images and finished runs are refused
# ----------------------------------------------------------------------------------------------
def stopped_in_epoch_2(monkeypatch, args) -> int:
    """Exit code of a training run that a Ctrl-C stops in epoch 2 (last.pt holds epoch 1)."""
    return stopped_in_epoch(2, monkeypatch, args)


def test_resume_accepts_a_nested_run_name_typed_again(tmp_path):
    # A run started with --output-dir runs --run-name exp/1 lives in runs/exp/1; typing those flags again
    # on --resume was refused as "another output dir" (its parent, runs/exp, was compared with runs).
    base, data = tmp_path / "runs", tmp_path / "data"
    run_dir = base / "exp" / "1"
    run_dir.mkdir(parents=True)
    data.mkdir()
    cfg = T.Config(data_dir=str(data), output_dir=str(base), run_name="exp/1")

    def check(*flags):
        _, args = T.parse_config(["--resume", str(run_dir), *map(str, flags)])
        return T.check_resume_flags(args, cfg, run_dir)
    for same in (["--output-dir", base, "--run-name", "exp/1"], ["--run-name", "exp/1"], ["--output-dir", base],
                 ["--output-dir", base / "exp", "--run-name", "1"],
                 ["--output-dir", f"{base}/./", "--run-name", "exp/1"]):
        assert check(*same) is None, same
    for other in (["--run-name", "exp/2"], ["--output-dir", tmp_path / "elsewhere"], ["--run-name", "1"],
                  ["--output-dir", base / "exp"], ["--output-dir", base, "--run-name", "1"]):
        with pytest.raises(T.CXRError, match="--resume continues"):
            check(*other)
    with pytest.raises(T.CXRError, match="--run-name 1 \\(the run's: exp/1\\)"):  # its own name, not a part
        check("--run-name", "1")
    # Copied out of its nesting to a folder nearer the root than its name is deep: an IndexError traceback.
    moved = Path(tmp_path.anchor) / "exp1"
    cfg.run_name = "/".join(["a"] * len(tmp_path.parts)) + "/exp1"
    _, args = T.parse_config(["--resume", str(moved), "--epochs", "3"])
    with pytest.raises(T.CXRError, match=f"--epochs 3 \\(the run's: {cfg.epochs}\\): --resume continues"):
        T.check_resume_flags(args, cfg, moved)


@pytest.mark.parametrize("world", [1, 2])
def test_the_printed_resume_command_can_be_pasted_for_a_folder_with_spaces(world):
    # "Resume with: python train_cxr.py --resume runs/exp 1" pasted into a shell passed "runs/exp" and "1".
    run_dir = Path("my runs") / "exp 1 (ü)"
    words = shlex.split(T.resume_command(run_dir, world))
    assert words[words.index("train_cxr.py") + 1:] == ["--resume", str(run_dir)]
    assert T.resume_command(Path("runs/r"), 1) == "python train_cxr.py --resume runs/r"  # plain paths as before


def test_the_printed_resume_command_can_be_pasted_into_windows_cmd(monkeypatch):
    # shlex's single quotes are no quotes to cmd.exe: it passed 'runs\20261129-101500', quotes and all,
    # and every run folder on Windows has a backslash, which shlex quotes.
    monkeypatch.setattr(sys, "platform", "win32")
    assert T.resume_command(PureWindowsPath(r"runs\20261129-101500"), 1) == \
        r"python train_cxr.py --resume runs\20261129-101500"
    assert T.resume_command(PureWindowsPath(r"C:\Users\Ann Lee\runs\exp 1"), 2) == \
        r'torchrun --nproc_per_node=2 train_cxr.py --resume "C:\Users\Ann Lee\runs\exp 1"'
    assert T.shell_word("^([^/]+)/") == '"^([^/]+)/"'  # the hint's regex: ^ is cmd.exe's escape outside quotes
    assert T.shell_word(r"runs\a,b") == r'"runs\a,b"'  # bare, PowerShell made an array of it
    monkeypatch.setattr(sys, "platform", "darwin")
    assert T.shell_word("^([^/]+)/") == "'^([^/]+)/'" and T.shell_word("runs/r") == "runs/r"


def test_resume_refuses_what_would_make_it_another_run(synth_root, tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    shutil.copytree(synth_root, data)  # a copy: one of its images is moved away below
    out = tmp_path / "runs"
    assert stopped_in_epoch_2(monkeypatch, [*FAST, "--epochs", "3", "--data-dir", data, "--output-dir", out,
                                            "--run-name", "r"]) == 130
    rd = out / "r"
    before = (rd / "last.pt").read_bytes()
    assert len(T.load_checkpoint(rd / "last.pt")["split_sha256"]) == 64
    capsys.readouterr()

    # Settings that define the run: named with both values, nothing touched.
    assert run(["--resume", rd, "--epochs", "5"]) == 2
    err = one_error_line(capsys)
    assert "--epochs 5 (the run's: 3)" in err and "learning-rate schedule" in err
    assert run(["--resume", rd, "--lr", "0.5", "--channels", "4,4,4,4", "--epochs", "3"]) == 2
    err = one_error_line(capsys)
    assert "--lr 0.5 (the run's: 0.001)" in err and "--channels 4,4,4,4 (the run's: 8,16,32,32)" in err
    assert "--epochs" not in err.split(": --resume")[0]  # the same value typed again is no difference
    assert run(["--resume", rd, "--data-dir", synth_root]) == 2  # another folder, even with the same images
    assert "--data-dir" in one_error_line(capsys)
    assert run(["--resume", rd, "--output-dir", tmp_path / "elsewhere"]) == 2
    assert "--output-dir" in one_error_line(capsys)
    # Started by torchrun with 2 processes, resumed with 1: the schedule counts steps of 2 processes' shards.
    config = (rd / "config.json").read_text()
    (rd / "config.json").write_text(config.replace('"world_size": 1', '"world_size": 2'))
    assert run(["--resume", rd]) == 2
    err = one_error_line(capsys)
    assert "trained by 2 process(es) and this resume has 1" in err and "--nproc_per_node=2" in err
    (rd / "config.json").write_text(config)

    # The same folder with one training image fewer: refused before anything is written.
    moved = sorted((data / "train" / "NORMAL").glob("*.png"))[0]
    moved.rename(tmp_path / moved.name)
    assert run(["--resume", rd]) == 2
    err = one_error_line(capsys)
    assert "differ from those" in err and str(rd) in err
    assert (rd / "last.pt").read_bytes() == before
    assert [r["epoch"] for r in read_csv(rd / "history.csv")] == ["1"]

    # Restored, and the same settings spelled another way (data folder as DIR/., a repeated --epochs), it resumes.
    (tmp_path / moved.name).rename(moved)
    assert run(["--resume", rd, "--data-dir", f"{data}/.", "--epochs", "3", "--num-threads", "1", "--strict"]) == 0
    assert [r["epoch"] for r in read_csv(rd / "history.csv")] == ["1", "2", "3"]
    # config.json keeps the start and adds the resume, with the run flag it changed (it said only the start's).
    saved = json.loads((rd / "config.json").read_text())
    assert saved["config"]["strict"] is False and saved["precision"] == "fp32"
    assert saved["resumed"] == [{"after_epoch": 1, "device": "cpu", "precision": "fp32", "changed": {"strict": True}}]

    # Stopped during its test report (best_model.pt already calibrated, no test_metrics.json yet: a Ctrl-C
    # there), the run finishes the report on a resume; it was refused as "already finished", without one.
    metrics = (rd / "test_metrics.json").read_text()
    (rd / "test_metrics.json").unlink()
    with monkeypatch.context() as m:  # Ctrl-C there: one line saying how to finish, not a traceback
        m.setattr(T, "test_report", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
        capsys.readouterr()
        assert run(["--resume", rd, "--no-strict"]) == 130
        assert f"finish them with: python train_cxr.py --resume {rd}" in capsys.readouterr().out
    # A second resume's change is against the first's --strict, not the start's (no change, it said)
    assert json.loads((rd / "config.json").read_text())["resumed"][1]["changed"] == {"strict": False}
    assert run(["--resume", rd]) == 0
    assert (rd / "test_metrics.json").read_text() == metrics
    assert [r["epoch"] for r in read_csv(rd / "history.csv")] == ["1", "2", "3"]

    # A finished run: refused by its test report, and without a test folder by its calibrated best model.
    capsys.readouterr()
    assert run(["--resume", rd]) == 2
    assert "already finished" in one_error_line(capsys)
    (rd / "test_metrics.json").unlink()
    shutil.rmtree(data / "test")
    assert run(["--resume", rd]) == 2
    assert "already finished" in one_error_line(capsys)


def test_a_run_stopped_between_its_test_report_and_its_page_is_finished_by_resume(synth_root, tmp_path,
                                                                                  monkeypatch, capsys):
    # A Ctrl-C (or a crash) after test_metrics.json, before report.html: --resume said "already finished",
    # and the page stayed the last epoch's, without the test set (or missing).
    out, real = tmp_path / "runs", T.write_report

    def stop_at_the_final_page(folder, *a, **k):
        if (Path(folder) / "test_metrics.json").exists():
            raise KeyboardInterrupt()
        return real(folder, *a, **k)
    with monkeypatch.context() as m:
        m.setattr(T, "write_report", stop_at_the_final_page)
        assert run([*FAST, "--epochs", "1", "--data-dir", synth_root, "--output-dir", out, "--run-name", "r"]) == 130
    rd = out / "r"
    assert "Test set" not in (rd / "report.html").read_text()  # the epoch's page
    capsys.readouterr()
    assert run(["--resume", rd]) == 0
    assert "written again" in capsys.readouterr().out
    page = (rd / "report.html").read_text()
    assert "<h2>Test set</h2>" in page
    assert run(["--resume", rd]) == 2  # up to date now: refused as before
    assert "already finished" in one_error_line(capsys)
    # The page deleted, or older than the metrics it shows: written again, the same page. The line says which
    # it found: "the run stopped before writing it" was said of a page deleted by hand too.
    (rd / "report.html").unlink()
    capsys.readouterr()
    assert run(["--resume", rd]) == 0 and (rd / "report.html").read_text() == page
    said = capsys.readouterr().out
    assert "its report.html was missing: written again" in said and "before writing it" not in said, said
    when = (rd / "test_metrics.json").stat().st_mtime
    os.utime(rd / "report.html", (when - 10, when - 10))
    assert run(["--resume", rd]) == 0 and (rd / "report.html").read_text() == page
    assert "its report.html was older than its test_metrics.json: written again" in capsys.readouterr().out
    assert run(["--resume", rd]) == 2


def test_under_torchrun_rank_0_decides_whether_a_finished_runs_page_is_rewritten(synth_root, tmp_path, monkeypatch):
    # Each process looked at the page itself: one that looked after rank 0 had rewritten it found it up to date,
    # called the run finished and exited 2, failing the torchrun command that had done its work.
    out = tmp_path / "runs"
    assert run([*FAST, "--epochs", "1", "--data-dir", synth_root, "--output-dir", out, "--run-name", "r"]) == 0
    rd = out / "r"
    config = json.loads((rd / "config.json").read_text())
    (rd / "config.json").write_text(json.dumps({**config, "world_size": 2}))  # as a 2-process run wrote it
    page, when = (rd / "report.html").read_text(), (rd / "report.html").stat().st_mtime_ns
    # Rank 1 of 2, after rank 0 found the page outdated (and rewrote it): the broadcast carries rank 0's finding.
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "destroy_process_group", lambda: None)
    sent = []

    def from_rank_0(box, src=0):
        sent.append(box[0])
        box[0] = True
    monkeypatch.setattr(torch.distributed, "broadcast_object_list", from_rank_0)
    assert run(["--resume", rd]) == 0  # not "already finished"
    assert sent == [False]  # its own look, replaced by rank 0's
    assert (rd / "report.html").stat().st_mtime_ns == when and (rd / "report.html").read_text() == page  # rank 0's



def test_resume_with_an_unreadable_config_json_is_one_line(tmp_path, capsys):
    # A config.json edited by hand into invalid JSON (or cut short) stopped --resume with a JSONDecodeError traceback.
    run_dir, data = tmp_path / "runs" / "r", tmp_path / "data"
    run_dir.mkdir(parents=True)
    data.mkdir()
    cfg = T.Config(data_dir=str(data)).to_dict()
    T.save_checkpoint(run_dir / "last.pt", {"format": T.CKPT_FORMAT, "optimizer": {}, "config": cfg, "epoch": 1})
    (run_dir / "config.json").write_text('{"config": {"epochs": 20,}')
    capsys.readouterr()
    assert run(["--resume", run_dir]) == 2
    err = one_error_line(capsys)
    assert err.startswith(f"error: {run_dir / 'config.json'} cannot be read (") and "restore it" in err, err


def test_resume_from_another_folder_after_a_relative_data_dir(synth_root, tmp_path, monkeypatch, capsys):
    # config.json kept --data-dir as typed ("data"): from any other folder the resume could not find
    # it, and typing the folder was refused as a different one.
    shutil.copytree(synth_root, tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    assert stopped_in_epoch_2(monkeypatch, [*FAST, "--epochs", "2", "--data-dir", "data", "--output-dir", "runs",
                                            "--run-name", "r"]) == 130
    assert json.loads((tmp_path / "runs" / "r" / "config.json").read_text())["config"]["data_dir"] == \
        str(tmp_path / "data")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    capsys.readouterr()
    assert run(["--resume", tmp_path / "runs" / "r", "--data-dir", "../data", "--num-threads", "1"]) == 0


def test_resume_after_the_data_folder_moved(synth_root, tmp_path, monkeypatch, capsys):
    # The stored folder is gone (the project moved): the typed new place is taken, and the split
    # check confirms it holds the same images. It was refused as "another folder".
    shutil.copytree(synth_root, tmp_path / "a" / "data")
    out = tmp_path / "runs"
    assert stopped_in_epoch_2(monkeypatch, [*FAST, "--epochs", "2", "--data-dir", tmp_path / "a" / "data",
                                            "--output-dir", out, "--run-name", "r"]) == 130
    (tmp_path / "a").rename(tmp_path / "b")
    capsys.readouterr()
    assert run(["--resume", out / "r", "--num-threads", "1"]) == 2
    assert f"is gone: if it moved, pass its new place, --resume {out / 'r'} --data-dir" in one_error_line(capsys)
    # Other images under the same names (here inverted) are not the moved folder: the contents are compared.
    shutil.copytree(tmp_path / "b" / "data", tmp_path / "c")
    for p in (tmp_path / "c").rglob("*.png"):
        cv2.imwrite(str(p), 255 - cv2.imread(str(p), cv2.IMREAD_GRAYSCALE))
    assert run(["--resume", out / "r", "--data-dir", tmp_path / "c", "--num-threads", "1"]) == 2
    assert "does not hold the images" in one_error_line(capsys)
    # Typed as --data-dir=~/b/data, whose ~ no shell expands: it was taken as a folder named "~" here, "not found".
    monkeypatch.setenv("HOME", str(tmp_path))
    assert run(["--resume", out / "r", "--data-dir=~/b/data", "--num-threads", "1"]) == 0
    assert T.load_checkpoint(out / "r" / "last.pt")["config"]["data_dir"] == str(tmp_path / "b" / "data")
    saved = json.loads((out / "r" / "config.json").read_text())  # the start's folder, and where the resume read
    assert saved["config"]["data_dir"] == str(tmp_path / "a" / "data")
    assert saved["resumed"][0]["changed"] == {"data_dir": str(tmp_path / "b" / "data")}


def test_resume_of_a_run_made_before_the_copy_grouping_the_warm_up_cap_and_own_orders(data_copy, tmp_path,
                                                                                    monkeypatch):
    # A run keeps the rules it started with: its split (copies were not grouped), its schedule (a
    # warm-up as long as the run was not capped) and its shuffle (seeded with the plain seed), or the
    # resume would continue on another split, jump the learning rate or train on other orders.
    for i, p in enumerate(sorted((data_copy / "train" / "NORMAL").glob("*.png"))[:12]):
        (p.parent / f"copy_{i}.png").write_bytes(p.read_bytes())
    out, argv = tmp_path / "runs", ["--epochs", "3", "--warmup-epochs", "5", "--data-dir", data_copy]
    real_group = T.same_group_for_copies
    monkeypatch.setattr(T, "same_group_for_copies", lambda groups, digests: groups)  # as before the rules
    monkeypatch.setattr(T, "build_state", lambda *a: REAL_BUILD_STATE(*a[:6], False, False))
    assert run([*FAST, *argv, "--output-dir", out, "--run-name", "whole"]) == 0
    assert stopped_in_epoch_2(monkeypatch, [*FAST, *argv, "--output-dir", out, "--run-name", "old"]) == 130
    monkeypatch.setattr(T, "same_group_for_copies", real_group)
    monkeypatch.setattr(T, "build_state", REAL_BUILD_STATE)
    last = T.load_checkpoint(out / "old" / "last.pt")
    for key in ("copies_grouped", "warmup_capped", "own_orders", "best_epoch", "content_sha256"):  # an older last.pt
        last.pop(key)
    T.save_checkpoint(out / "old" / "last.pt", last)
    assert run(["--resume", out / "old", "--num-threads", "1"]) == 0  # the same split: not refused
    history = read_csv(out / "old" / "history.csv")
    rates = [float(r["lr"]) for r in history]
    assert rates[0] < rates[1] < rates[2]  # still warming up, as the run began (capped: 0 at the end)
    # Epochs 2 and 3 trained on the old orders: the same as the run never stopped (seconds aside).
    drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    assert drop(history) == drop(read_csv(out / "whole" / "history.csv"))


def test_each_seed_shuffles_in_its_own_orders():
    # The sampler shuffles epoch e with base + e. With the seed itself as base, seed 2 at epoch 1
    # repeated seed 1 at epoch 2, so the repeats of a seed study shared their orders.
    rt = T.Runtime(torch.device("cpu"), None)
    old = lambda seed, epoch: T.epoch_order(500, seed, epoch, rt)
    new = lambda seed, epoch: T.epoch_order(500, T.order_seed(seed), epoch, rt)
    assert torch.equal(old(2, 1), old(1, 2))  # the flaw, kept for runs made before the rule
    bases = [T.order_seed(s) for s in range(1000)]
    assert min(np.diff(sorted(bases))) > 10**6 and all(0 <= b < 2**63 for b in bases)  # no two bases epochs apart
    assert not torch.equal(new(2, 1), new(1, 2))
    state = lambda *rule: REAL_BUILD_STATE(T.Config(seed=2), rt, ["NORMAL", "PNEUMONIA"], np.array([0, 1]),
                                           {"mode": "image"}, 9, *rule)
    assert state().order_seed == T.order_seed(2) and state(True, False).order_seed == 2  # new runs; older ones
    assert sorted(new(1, 2).tolist()) == list(range(500)) and torch.equal(new(1, 2), new(1, 2))
    # Two processes split one permutation, each taking every other index; the odd image is dropped.
    shares = [T.epoch_order(501, 7, 3, T.Runtime(torch.device("cpu"), None, rank=r, world=2)) for r in (0, 1)]
    assert len(shares[0]) == len(shares[1]) == 250 and not set(shares[0].tolist()) & set(shares[1].tolist())


def test_demo_input_error_leaves_no_folder(tmp_path, capsys):
    # The demo writes its data into its run folder before the checks: an error left ~1,350 files and
    # took the run name.
    assert run(["--demo", "--positive-class", "FOO", "--output-dir", tmp_path, "--run-name", "d",
                "--num-threads", "1"]) == 2
    assert "--positive-class 'FOO'" in one_error_line(capsys)
    assert not (tmp_path / "d").exists()


def test_resume_of_a_run_older_than_the_split_check(synth_root, tmp_path, monkeypatch, capsys):
    out = tmp_path / "runs"
    assert stopped_in_epoch_2(monkeypatch, [*FAST, "--epochs", "2", "--data-dir", synth_root, "--output-dir", out,
                                            "--run-name", "old"]) == 130
    ck = T.load_checkpoint(out / "old" / "last.pt")
    del ck["split_sha256"]
    del ck["config"]["aug_blank_outside_lungs"], ck["config"]["deterministic"]  # older still: made before these
    T.save_checkpoint(out / "old" / "last.pt", ck)
    capsys.readouterr()
    assert run(["--resume", out / "old", "--no-deterministic"]) == 0
    said = capsys.readouterr().out
    assert "predates the split check" in said
    # What it assumed is said once; --deterministic, typed, is no assumption.
    assert said.count(f"note: {out / 'old'} was made before these settings existed, so it continues as its run "
                      "did: --aug-blank-outside-lungs 0.0\n") == 1
    assert len(T.load_checkpoint(out / "old" / "best_model.pt")["split_sha256"]) == 64


def test_resume_keeps_the_precision_amp_auto_chose(synth_root, tmp_path, monkeypatch, capsys):
    """--amp auto started on a CPU without fast bf16 (fp32) stays fp32 when resumed on one with it, and back."""
    for first, later, want in ((False, True, "fp32"), (True, False, "torch.bfloat16")):
        monkeypatch.setattr(T, "cpu_has_fast_bf16", lambda: first)
        out, name = tmp_path / "runs", f"amp_{want}"
        assert stopped_in_epoch_2(monkeypatch, [*FAST, "--amp", "auto", "--epochs", "2", "--data-dir", synth_root,
                                                "--output-dir", out, "--run-name", name]) == 130
        assert re.findall(r"precision: (\S+)", capsys.readouterr().out) == [want]
        monkeypatch.setattr(T, "cpu_has_fast_bf16", lambda: later)
        assert run(["--resume", out / name]) == 0
        assert re.findall(r"precision: (\S+)", capsys.readouterr().out) == [want]


def _edited_script(tmp_path, monkeypatch, **constants):
    """train_cxr.py imported with constants edited at its top, as a user edits them (a module of its own: its
    Config takes its defaults from the edited values, as a monkeypatched constant would not)."""
    src = (ROOT / "train_cxr.py").read_text()
    for const, value in constants.items():
        src, n = re.subn(rf"^{const} = .*$", lambda m: f"{const} = {value!r}", src, count=1, flags=re.M)
        assert n == 1, const
    path = tmp_path / "train_cxr_edited.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("train_cxr_edited", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # where its dataclasses look themselves up
    spec.loader.exec_module(module)
    T.log.removeFilter(module._escape_names)  # it shares the "train_cxr" logger
    return module


def test_settings_a_checkpoint_predates_are_its_runs_not_todays_edited_constants(tmp_path, monkeypatch):
    # A checkpoint made before --aug-blank-outside-lungs or --threshold-policy existed was filled in from the
    # constants as edited today: a resume of it blanked lungs, and chose its threshold, as it never had.
    E = _edited_script(tmp_path, monkeypatch, AUG_BLANK_OUTSIDE_LUNGS=0.5, THRESHOLD_POLICY="accuracy",
                       PATIENT_REGEX=r"^(P\d+)")
    assert E.Config().aug_blank_outside_lungs == 0.5  # the edit took: a new run uses it
    later = ("threshold_policy", "ood_quantile", "patient_regex", "positive_class", "deterministic",
             "aug_blank_outside_lungs")  # the settings added after the first checkpoint format
    old = {k: v for k, v in E.Config().to_dict().items() if k not in later}
    cfg = E.Config.from_dict(old)
    assert (cfg.aug_blank_outside_lungs, cfg.threshold_policy, cfg.patient_regex) == (0.0, "youden", "")
    assert (cfg.ood_quantile, cfg.positive_class, cfg.deterministic) == (0.99, "", False)
    assert E.Config.from_dict({**old, "patient_regex": "x"}).patient_regex == "x"  # stored: kept
    assert E.absent_settings(old, {"deterministic"}) == ("--threshold-policy youden, --ood-quantile 0.99, "
                                                         "--patient-regex '', --positive-class '', "
                                                         "--aug-blank-outside-lungs 0.0")
    assert E.absent_settings(E.Config().to_dict()) == ""
    # Every other setting is in every checkpoint since the first format: one without it is not guessed.
    with pytest.raises(E.CXRError, match=r"^the stored settings lack img_size, lr, which every checkpoint of "
                                         r"train_cxr.py holds: .*use the run's own best_model.pt or last.pt$"):
        E.Config.from_dict({k: v for k, v in old.items() if k not in ("lr", "img_size")})
    torch.save({"format": T.CKPT_FORMAT, "config": {k: v for k, v in old.items() if k != "lr"}}, tmp_path / "x.pt")
    with pytest.raises(T.CXRError, match=f"^{re.escape(str(tmp_path / 'x.pt'))}: the stored settings lack lr, "):
        T.load_checkpoint(tmp_path / "x.pt")  # named at once, with its file
    # The settings the first checkpoint format held, and ABSENT_MEANS, are all there is: a setting added later
    # needs its entry there (the value that does what a run made before it did).
    first = {"data_dir", "output_dir", "run_name", "img_size", "work_scale", "val_fraction", "min_val_per_class",
             "normalize", "num_workers", "aug_scale_min", "aug_rotate_deg", "aug_shift", "aug_hflip", "aug_brightness",
             "aug_contrast", "aug_gamma", "channels", "fc_hidden", "dropout", "epochs", "batch_size", "lr",
             "warmup_epochs", "weight_decay", "label_smoothing", "ema_decay", "patience", "tta", "num_gradcam_images",
             "save_cam_arrays", "bootstrap", "seed", "device", "amp", "num_threads", "strict"}
    assert set(T.ABSENT_MEANS) == set(later) and set(T.Config.__dataclass_fields__) == first | set(later)


def test_amp_auto_typed_on_resume_chooses_again_for_this_machine(synth_root, tmp_path, monkeypatch, capsys):
    # Typed, --amp auto was turned back into the start's precision, so a run begun in fp32 stayed fp32 on a CPU
    # with AMX although the user had asked auto to choose (--amp on/off may change it: precision is no recipe).
    monkeypatch.setattr(T, "cpu_has_fast_bf16", lambda: False)
    out = tmp_path / "runs"
    assert stopped_in_epoch_2(monkeypatch, [*FAST, "--amp", "auto", "--epochs", "2", "--data-dir", synth_root,
                                            "--output-dir", out, "--run-name", "r"]) == 130
    capsys.readouterr()
    monkeypatch.setattr(T, "cpu_has_fast_bf16", lambda: True)
    assert run(["--resume", out / "r", "--amp", "auto"]) == 0
    said = capsys.readouterr().out
    assert re.findall(r"precision: (\S+)", said) == ["torch.bfloat16"]
    assert (f"note: --amp auto chose torch.bfloat16 for this machine: {out / 'r'} trained in fp32 until now "
            "(--amp off keeps fp32)") in said
    assert T.load_checkpoint(out / "r" / "last.pt")["config"]["amp"] == "on"  # a later resume continues in bf16
    resumed = json.loads((out / "r" / "config.json").read_text())["resumed"]
    assert [r["precision"] for r in resumed] == ["torch.bfloat16"]


def test_split_fingerprint_sees_moves_between_classes_and_splits(tmp_path):
    s = lambda *paths: T.Split(torch.zeros(len(paths), 1, 1, dtype=torch.uint8), torch.zeros(len(paths)),
                               [str(tmp_path / p) for p in paths])
    a = T.split_fingerprint(str(tmp_path), s("A/1.png", "B/2.png"), s("A/3.png"))
    assert a == T.split_fingerprint(str(tmp_path) + "/.", s("B/2.png", "A/1.png"), s("A/3.png"))  # order, spelling
    assert a != T.split_fingerprint(str(tmp_path), s("A/1.png", "A/2.png"), s("A/3.png"))  # another class
    assert a != T.split_fingerprint(str(tmp_path), s("A/1.png"), s("B/2.png", "A/3.png"))  # train -> validation
    # With the files' digests: their contents, whatever the folder or the names.
    digests = {str(tmp_path / n): d for n, d in (("A/1.png", "x"), ("B/2.png", "y"), ("A/3.png", "z"),
                                                   ("C/9.png", "x"))}
    by_content = T.split_fingerprint(str(tmp_path), s("A/1.png", "B/2.png"), s("A/3.png"), digests=digests)
    assert by_content == T.split_fingerprint("/elsewhere", s("C/9.png", "B/2.png"), s("A/3.png"), digests=digests)
    assert by_content != T.split_fingerprint(str(tmp_path), s("A/1.png"), s("B/2.png", "A/3.png"), digests=digests)


# ----------------------------------------------------------------------------------------------
# EMA: batch-norm statistics are averaged like the weights
# ----------------------------------------------------------------------------------------------
def test_ema_averages_batch_norm_statistics_with_the_weights():
    model = T.CustomCNN(img_size=32, channels=(4, 4, 8, 8), fc_hidden=8)
    ema = T.EMA(model, decay=0.9)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        for v in model.state_dict().values():
            v.add_(1)  # weights, running means and variances, and the batch counter
    for _ in range(3):
        ema.update(model)
    moved = {k: float((v - before[k]).float().mean()) for k, v in ema.module.state_dict().items()}
    weights = [k for k in moved if k.endswith("weight")]
    stats = [k for k in moved if k.endswith(("running_mean", "running_var"))]
    assert weights and stats
    for k in stats:  # the same share of the way as the weights: not copied (1.0), not frozen (0.0)
        assert moved[k] == pytest.approx(moved[weights[0]], abs=1e-5) and 0 < moved[k] < 1, k
    for k in moved:
        if k.endswith("num_batches_tracked"):
            assert torch.equal(ema.module.state_dict()[k], model.state_dict()[k])


# ----------------------------------------------------------------------------------------------
# DDP: two CPU processes (gloo) take every stop decision together
# ----------------------------------------------------------------------------------------------
PROBE = r'''
import hashlib, json, os, signal, sys
sys.path.insert(0, {root!r})
import train_cxr as T

out, mode, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
rank = int(os.environ["RANK"])
where = {{"epoch": 0, "batch": 0, "n": 0}}
real_epoch, real_eval, real_build, real_aug = T.train_one_epoch, T.evaluate, T.build_state, T.augment_batch


def dump(name, obj):
    with open(os.path.join(out, f"rank{{rank}}_{{name}}.json"), "w") as f:
        json.dump(obj, f)


def train_one_epoch(st, train, epoch):
    where.update(epoch=epoch, batch=0, n=len(train) // st.rt.world // st.cfg.batch_size)
    row = real_epoch(st, train, epoch)
    dump(f"train{{epoch}}", row)
    return row


def augment_batch(*a, **k):
    where["batch"] += 1
    if (where["epoch"], where["batch"]) == (1, 1):  # the next draws of the augmentation and global generators
        gen, state = T.torch.Generator(), T.torch.get_rng_state()
        gen.set_state(a[3].get_state())
        dump("draws1", {{"augment": T.torch.rand(3, generator=gen).tolist(), "global": T.torch.rand(3).tolist()}})
        T.torch.set_rng_state(state)
    if mode == "signal" and rank == 1 and (where["epoch"], where["batch"]) == (2, 3):
        T._STOP["signal"] = signal.SIGTERM  # as if the signal had reached this process only
    return real_aug(*a, **k)


def evaluate(st, split, *a, **k):
    if mode == "late" and rank == 1 and where["epoch"] == st.cfg.epochs:  # during the last validation
        T._STOP["signal"] = signal.SIGTERM
    sd = T.unwrap(st.eval_model).state_dict()
    dump(f"eval{{where['epoch']}}", {{n: hashlib.sha1(v.cpu().contiguous().numpy().tobytes()).hexdigest()
                                     for n, v in sd.items()}})
    return real_eval(st, split, *a, **k)


class NaNInLastBatchOnRank1:
    def __init__(self, inner):
        self.inner, self.weight = inner, inner.weight

    def __call__(self, logits, y):
        loss = self.inner(logits, y)
        last = (where["epoch"], where["batch"]) == (1, where["n"])
        return loss * float("nan") if rank == 1 and last else loss


def build_state(*a, **k):
    st = real_build(*a, **k)
    if mode == "nan":
        st.criterion = NaNInLastBatchOnRank1(st.criterion)
    return st


T.train_one_epoch, T.augment_batch, T.evaluate, T.build_state = train_one_epoch, augment_batch, evaluate, build_state
rc = T.main(argv)
with open(os.path.join(out, f"rank{{rank}}_rc"), "w") as f:
    f.write(str(rc))
sys.exit(rc)
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(tmp_path, mode: str, argv: list) -> tuple[list, Path, str]:
    """Run the probe as ranks 0 and 1 of a gloo group; returns (exit codes, dump folder, rank 0's stdout)."""
    probe, dumps = tmp_path / "probe.py", tmp_path / f"dumps_{mode}"
    probe.write_text(PROBE.format(root=str(ROOT)))
    dumps.mkdir()
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(probe), str(dumps), mode, *map(str, argv)], cwd=ROOT,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    try:
        outputs = [p.communicate(timeout=150)[0] for p in procs]
    finally:
        for p in procs:  # a process waiting forever for its partner: the bug this guards against
            if p.poll() is None:
                p.kill()
                p.wait()
    return [p.returncode for p in procs], dumps, outputs[0] + outputs[1][-2000:]


def _ddp_args(data, out, epochs):
    return [*FAST, "--epochs", epochs, "--batch-size", 8, "--num-gradcam-images", 0, "--data-dir", data,
            "--output-dir", out, "--run-name", "ddp"]


def test_ddp_signal_on_one_rank_stops_both_with_one_model(synth_root, tmp_path):
    out = tmp_path / "runs"
    rcs, dumps, log = _two_processes(tmp_path, "signal", _ddp_args(synth_root, out, 3))
    assert rcs == [128 + signal.SIGTERM] * 2, (rcs, log[-3000:])
    assert "interrupted during epoch 2" in log
    # With the process count it started with: "python train_cxr.py --resume" was refused for a 2-process run.
    assert f"Resume with: torchrun --nproc_per_node=2 train_cxr.py --resume {out / 'ddp'}" in log
    assert [r["epoch"] for r in read_csv(out / "ddp" / "history.csv")] == ["1"]
    # Epoch 1: the train metrics cover both shards (the same on both ranks, and in history.csv) ...
    rows = [json.loads((dumps / f"rank{r}_train1.json").read_text()) for r in (0, 1)]
    assert rows[0] == rows[1]
    hist = read_csv(out / "ddp" / "history.csv")[0]
    assert float(hist["train_loss"]) == pytest.approx(rows[0]["train_loss"], abs=1e-9)
    # ... and the validation scored one model: the EMA's weights and statistics agree bit for bit.
    states = [json.loads((dumps / f"rank{r}_eval1.json").read_text()) for r in (0, 1)]
    assert any("running_mean" in k for k in states[0]) and states[0] == states[1]
    # Each rank draws its own augmentations and dropout masks (the same seed on both gave image i of
    # each rank's batch the same crop, flip and mask).
    draws = [json.loads((dumps / f"rank{r}_draws1.json").read_text()) for r in (0, 1)]
    assert draws[0]["augment"] != draws[1]["augment"] and draws[0]["global"] != draws[1]["global"]


def test_ddp_run_folder_refused_on_rank_0_stops_both(synth_root, tmp_path):
    # Only rank 0 makes the run folder: when it was refused (the folder exists), rank 0 exited and
    # rank 1 waited for the folder's name (gloo: a traceback when the peer closed; NCCL: a hang).
    # Under torchrun no process checks the name before they meet (main): rank 0 alone decides.
    out = tmp_path / "runs"
    (out / "ddp").mkdir(parents=True)
    rcs, _, log = _two_processes(tmp_path, "plain", _ddp_args(synth_root, out, 1))
    assert rcs == [2, 2], (rcs, log[-3000:])
    assert "already exists and is never overwritten" in log and "Traceback" not in log
    assert not any((out / "ddp").iterdir())


def test_ddp_signal_on_one_rank_in_the_last_validation_stops_both(synth_root, tmp_path):
    # After the last training step only rank 1 saw the signal: it stopped, and rank 0 went on to
    # calibration and the test report alone (torchrun then killed it).
    out = tmp_path / "runs"
    rcs, _, log = _two_processes(tmp_path, "late", _ddp_args(synth_root, out, 2))
    assert rcs == [128 + signal.SIGTERM] * 2, (rcs, log[-3000:])
    assert "interrupted after the last epoch (2)" in log and not (out / "ddp" / "test_metrics.json").exists()
    assert f"finish them with: torchrun --nproc_per_node=2 train_cxr.py --resume {out / 'ddp'}" in log


def test_ddp_rank_1_stops_with_the_write_rank_0_could_not_make(synth_root, tmp_path, monkeypatch):
    # Only rank 0 writes files: when a write failed (a full disk), rank 0 exited with its one line and rank 1
    # went on alone into its next step, waiting for it (gloo: a traceback that torchrun named the root cause).
    # Rank 1 of two here, its partner simulated: the collectives give back rank 1's own values, and rank 0's
    # writes end in the error atomic_write raises on a full disk.
    failed = "disk full while writing runs/r/best_model.pt: free some space or choose another --output-dir"
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, op=None: None)
    both = lambda out, obj: out.__setitem__(slice(None), [obj] * 2)  # rank 0's part: rank 1's own
    monkeypatch.setattr(torch.distributed, "all_gather_object", both)
    monkeypatch.setattr(torch.distributed, "broadcast_object_list", lambda box: box.__setitem__(0, failed))
    monkeypatch.setattr(T, "evaluate", lambda st, split: {"val_loss": 0.5, "val_acc": 0.5, "val_auc": 0.5})
    cfg = T.Config(data_dir=str(synth_root), epochs=2, num_workers=0, img_size=32, channels=(8, 16, 32, 32),
                   fc_hidden=32, batch_size=16, amp="off", device="cpu", num_gradcam_images=0)
    data = T.prepare_data(cfg)
    rt = T.Runtime(torch.device("cpu"), None)
    st = T.build_state(cfg, rt, data["classes"], data["train"].labels.numpy(),
                       T.dataset_norm(data["train"].images, cfg.normalize), len(data["train"]) // 2 // 16)
    st.rt = dataclasses.replace(rt, rank=1, world=2)
    with pytest.raises(T.CXRError, match="^disk full while writing"):
        T.fit(st, data["train"], data["val"], {}, tmp_path, None)


def test_ddp_nan_on_one_rank_stops_both(synth_root, tmp_path):
    out = tmp_path / "runs"
    rcs, dumps, log = _two_processes(tmp_path, "nan", _ddp_args(synth_root, out, 1))
    assert rcs == [3, 3], (rcs, log[-3000:])
    assert re.search(r"stopped: loss became non-finite in another process at epoch 1", log), log[-3000:]


def test_gather_rows_with_more_processes_than_validation_images(monkeypatch):
    # 3 processes, 2 validation images: rank 2 scored none, and its (0, 0) array stopped every rank
    # with a numpy traceback at the first validation.
    parts = [np.array([[0.1, 0.9]], np.float32), np.array([[0.8, 0.2]], np.float32), np.zeros((0, 0), np.float32)]
    monkeypatch.setattr(torch.distributed, "all_gather_object", lambda out, local: out.__setitem__(slice(None), parts))
    for rank in range(3):
        rows = T.gather_rows(parts[rank], T.Runtime(torch.device("cpu"), None, rank, 3))
        np.testing.assert_array_equal(rows, np.concatenate(parts[:2]))


def test_only_rank_0_prints_warnings(data_copy, capsys):
    # Every process checks the same data: each printed the same warnings (a broken file, copies across
    # splits, patient overlap), once per process, where the README says only rank 0 prints.
    (data_copy / "train" / "NORMAL" / "broken.png").write_bytes(b"not an image")
    for is_main, printed in ((True, 1), (False, 0)):
        T.setup_console_logging(is_main)
        capsys.readouterr()
        T.prepare_data(T.Config(data_dir=str(data_copy), num_workers=0, img_size=32))
        assert capsys.readouterr().out.count("warning: skipping 1 unreadable") == printed
    T.setup_console_logging()


@pytest.mark.parametrize("argv", [["--predict", "a.png", "--checkpoint", "r"], ["--evaluate", "--checkpoint", "r"],
                                  ["--recalibrate", "d", "--checkpoint", "r"]])
def test_scoring_modes_under_torchrun_are_refused(argv, monkeypatch):
    # Each process scored every image into a run folder of its own: two folders, or (the same second)
    # "cannot create the run folder (File exists)" on one, whose exit made torchrun kill the other.
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(T.CXRError, match=f"^{argv[0]} runs in one process: drop torchrun"):
        T.parse_config(argv)
    monkeypatch.setenv("WORLD_SIZE", "1")
    T.parse_config(argv)  # one process: as before
