"""Using a trained model: --predict, --evaluate, and training under torchrun (2 CPU processes, gloo)."""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train_cxr
from conftest import ROOT, TINY, load_benchmark, read_csv, run

ONE_THREAD = ["--num-threads", "1"]  # 2 cores shared with other test runs: one thread is much faster here
CPU = ["--device", "cpu"]  # the expectations are CPU recomputations, also where a GPU is visible


@pytest.fixture(scope="module")
def trained(synth_root, tmp_path_factory) -> Path:
    """A TINY model trained for 2 epochs on synth_root; returns its run folder."""
    out = tmp_path_factory.mktemp("use_runs")
    assert run([*TINY, *ONE_THREAD, "--epochs", 2, "--data-dir", synth_root, "--output-dir", out,
                "--run-name", "tiny"]) == 0
    run_dir = out / "tiny"
    assert (run_dir / "best_model.pt").is_file() and (run_dir / "test_metrics.json").is_file()
    return run_dir


def input_by_hand(ckpt: dict, path: str) -> torch.Tensor:
    """decode at work_size, center crop, normalize: the network's input for one file."""
    img, work = ckpt["img_size"], ckpt["work_size"]
    x = torch.from_numpy(train_cxr.decode_xray(path, work)).float() / 255
    o = (work - img) // 2
    x = x[o:o + img, o:o + img][None, None]
    norm = ckpt["normalization"]
    if norm["mode"] == "image":
        x = (x - x.mean()) / (x.std() + 1e-3)
    else:
        x = (x - norm["mean"]) / norm["std"]
    return x


def probs_by_hand(ckpt: dict, model: torch.nn.Module, path: str) -> np.ndarray:
    """softmax of the network's input, mirror-averaged when the run used TTA, then the stored
    calibration softmax(log(p) / T + b) written out again here."""
    x = input_by_hand(ckpt, path)
    with torch.no_grad():
        p = model(x).softmax(1)
        if ckpt["config"]["tta"]:
            p = (p + model(torch.flip(x, dims=[3])).softmax(1)) / 2
    cal = ckpt["calibration"]
    return (p.double().log() / float(cal["temperature"]) + cal["bias"].double()).softmax(1)[0].numpy()


@pytest.fixture
def scans(synth_root, tmp_path):
    """A folder (with nested sub-folders, a broken image and a text file) plus one single file."""
    src = sorted((synth_root / "test" / "NORMAL").glob("*.png"))[:3] + \
        sorted((synth_root / "test" / "PNEUMONIA").glob("*.png"))[:3]
    folder = tmp_path / "scans"
    (folder / "sub" / "deeper").mkdir(parents=True)
    targets = [folder / "a.png", folder / "sub" / "b.png", folder / "sub" / "c.png",
               folder / "sub" / "deeper" / "d.png", folder / "sub" / "deeper" / "e.png"]
    for s, t in zip(src, targets):
        shutil.copy(s, t)
    single = tmp_path / "elsewhere" / "single_scan.png"
    single.parent.mkdir()
    shutil.copy(src[5], single)
    broken = folder / "sub" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really an image" * 10)
    (folder / "notes.txt").write_text("not an image")
    return folder, single, broken, [str(t) for t in targets] + [str(single)]


def test_predict_folders_and_files(trained, scans, tmp_path, capsys):
    folder, single, broken, good = scans
    ckpt_path = trained / "best_model.pt"
    out = tmp_path / "pred"
    assert run(["--predict", folder, single, "--checkpoint", ckpt_path, "--output-dir", out, "--run-name", "p",
                "--num-workers", 0, *ONE_THREAD, *CPU]) == 0
    pdir = out / "p"
    rows = read_csv(pdir / "predictions.csv")
    ckpt = train_cxr.load_checkpoint(ckpt_path)
    classes, thr = ckpt["class_names"], ckpt["threshold"]
    assert classes == ["NORMAL", "PNEUMONIA"] and isinstance(thr, float)
    assert list(rows[0].keys()) == ["path", "predicted", "prob_NORMAL", "prob_PNEUMONIA", "threshold",
                                    "ood_score", "in_distribution", "copy_of_training_image"]
    assert {r["copy_of_training_image"] for r in rows} == {"False"}  # test images: none was trained on
    cutoff = ckpt["ood"]["cutoff"]
    for r in rows:  # synthetic test images are like the synthetic training images
        assert r["in_distribution"] == str(float(r["ood_score"]) <= cutoff)

    # One row per readable image, found recursively; the broken file and the .txt are not rows.
    assert len(rows) == len(good) == 6
    assert sorted(os.path.realpath(r["path"]) for r in rows) == sorted(os.path.realpath(g) for g in good)

    # The broken file is reported as skipped (console log replayed into the run's train.log).
    log_text = (pdir / "train.log").read_text()
    assert "skipping 1 unreadable image file" in log_text and str(broken) in log_text
    unreadable = [ln for ln in log_text.splitlines() if "unreadable" in ln]
    assert "notes.txt" not in unreadable[0]  # not an image file: a note says it is left out (below), not broken
    assert f"note: 1 file(s) in {folder} are not images by their extension and are left out (.txt 1; " \
           f"e.g. {folder / 'notes.txt'})" in log_text

    # The console table says how labels are made, and each P to the digits that tell it from the threshold.
    d = train_cxr.telling_digits([float(r["prob_PNEUMONIA"]) for r in rows], thr, 4)  # the same for all
    assert f"labels: pred PNEUMONIA if P(PNEUMONIA) >= {thr:.{d}f} (threshold chosen on validation)" in log_text
    table = {ln.split()[0]: ln.split() for ln in log_text.splitlines() if ln.split()[:1] and
             ln.split()[0] in {Path(r["path"]).name for r in rows}}
    for r in rows:
        name, p = Path(r["path"]).name, float(r["prob_PNEUMONIA"])
        assert table[name][1] == r["predicted"]
        assert table[name][2] == f"{p:.{d}f}"

    model = train_cxr.model_from_checkpoint(ckpt)
    for r in rows:
        p = np.array([float(r["prob_NORMAL"]), float(r["prob_PNEUMONIA"])])
        assert abs(p.sum() - 1) < 1e-5
        expect = probs_by_hand(ckpt, model, r["path"])
        np.testing.assert_allclose(p, expect, atol=1e-5)
        assert float(r["threshold"]) == thr
        if abs(expect[1] - thr) > 1e-5:  # the label follows the stored threshold, not argmax
            assert r["predicted"] == ("PNEUMONIA" if expect[1] >= thr else "NORMAL")

    # One Grad-CAM overlay per predicted image, named after it, a readable colour image.
    overlays = sorted((pdir / "grad_cam").glob("*.png"))
    assert len(overlays) == len(rows)
    for r in rows:
        stem = Path(r["path"]).stem
        match = [o for o in overlays if f"_{stem}_pred-{r['predicted']}_" in o.name]
        assert len(match) == 1, (stem, [o.name for o in overlays])
        im = train_cxr.cv2.imread(str(match[0]))
        assert im is not None and im.ndim == 3 and im.shape[2] == 3

    # Nothing but the checkpoint decides preprocessing, TTA and threshold: flags that would change them are
    # refused with one line naming them (before anything is written), and a second run gives the same rows.
    capsys.readouterr()
    assert run(["--predict", folder, single, "--checkpoint", ckpt_path, "--output-dir", out, "--run-name", "q",
                "--img-size", 64, "--work-scale", 1.5, "--channels", "4,4,4,4", "--fc-hidden", 8,
                "--normalize", "dataset", "--no-tta", "--num-workers", 0, *ONE_THREAD, *CPU]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "would change nothing with --predict" in err[0]
    for flag in ("--channels", "--fc-hidden", "--img-size", "--normalize", "--tta", "--work-scale"):
        assert flag in err[0]
    assert not (out / "q").exists()
    assert run(["--predict", folder, single, "--checkpoint", ckpt_path, "--output-dir", out, "--run-name", "q",
                "--num-workers", 0, *ONE_THREAD, *CPU]) == 0
    assert read_csv(out / "q" / "predictions.csv") == rows


def test_predict_tells_same_named_files_apart_and_scores_a_file_once(trained, synth_root, tmp_path,
                                                                      monkeypatch):
    # img.png of A/ and of B/ were two rows "img.png" with different labels on the console and in the overlay
    # titles; a file given and also inside a given folder was scored, and counted, twice.
    src = sorted((synth_root / "test" / "PNEUMONIA").glob("*.png"))[:2]
    for s, sub in zip(src, ("A", "B")):
        (tmp_path / "x" / sub).mkdir(parents=True)
        shutil.copy(s, tmp_path / "x" / sub / "img.png")
    out = tmp_path / "pred"
    assert run(["--predict", tmp_path / "x", tmp_path / "x" / "A" / "img.png", "--checkpoint", trained,
                "--output-dir", out, "--run-name", "p", "--num-workers", 0, *ONE_THREAD, *CPU]) == 0
    rows = read_csv(out / "p" / "predictions.csv")
    assert [Path(r["path"]).relative_to(tmp_path).as_posix() for r in rows] == ["x/A/img.png", "x/B/img.png"]
    table = [ln.split()[:2] for ln in (out / "p" / "train.log").read_text().splitlines() if "img.png" in ln]
    assert table == [["A/img.png", rows[0]["predicted"]], ["B/img.png", rows[1]["predicted"]]]
    assert len(list((out / "p" / "grad_cam").glob("*.png"))) == 2
    # On Windows, files on two drives share no folder (commonpath raises): their full paths, not a traceback.
    def two_drives(paths):
        raise ValueError("Paths don't have the same drive")
    monkeypatch.setattr(os.path, "commonpath", two_drives)
    assert run(["--predict", tmp_path / "x", "--checkpoint", trained, "--output-dir", out, "--run-name", "q",
                "--num-workers", 0, *ONE_THREAD, *CPU]) == 0
    table = [ln.split()[0] for ln in (out / "q" / "train.log").read_text().splitlines() if "img.png" in ln]
    assert table == [str(tmp_path / "x" / c / "img.png")[-40:] for c in "AB"]  # the table keeps a path's last 40


def test_evaluate_on_one_class_folder_names_the_folder_to_pass(trained, synth_root, tmp_path, capsys):
    # D/test/NORMAL was answered "has no class folders: put the images in D/test/NORMAL/<CLASS>/", a wrong fix.
    capsys.readouterr()
    assert run(["--evaluate", "--checkpoint", trained, "--data-dir", synth_root / "test" / "NORMAL",
                "--output-dir", tmp_path, *CPU]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith(f"(NORMAL, PNEUMONIA), --data-dir {synth_root / 'test'}"), err
    assert run(["--recalibrate", synth_root / "test" / "PNEUMONIA", "--checkpoint", trained,
                "--output-dir", tmp_path, *CPU]) == 2
    assert capsys.readouterr().err.strip().endswith(f"--recalibrate {synth_root / 'test'}")
    assert not any(tmp_path.iterdir())


def test_a_class_folder_with_patient_sub_folders_is_named_as_one_class_folder_too(tmp_path):
    # NORMAL/patient7/img0.png (a DICOM series per folder, too) read as a folder of classes patient7, ...:
    # "has classes ['patient7']", not the folder to pass.
    ckpt = {"class_names": ["NORMAL", "PNEUMONIA"], "config": train_cxr.Config().to_dict()}
    for sub in ("patient7", "patient8"):
        (tmp_path / "D" / "test" / "NORMAL" / sub).mkdir(parents=True)
        (tmp_path / "D" / "test" / "NORMAL" / sub / "img0.png").write_bytes(b"x")
    for what, flag in (("test", "--data-dir"), ("recalibration", "--recalibrate")):
        advice = re.escape(f"(NORMAL, PNEUMONIA), {flag} {tmp_path / 'D' / 'test'}")
        with pytest.raises(train_cxr.CXRError, match=advice):
            train_cxr.split_from_folder(tmp_path / "D" / "test" / "NORMAL", ckpt, train_cxr.Config(), what)
    # A folder of class folders that happens to be named like a class is no class folder: its own error.
    (tmp_path / "NORMAL" / "NORMAL").mkdir(parents=True)
    (tmp_path / "NORMAL" / "NORMAL" / "img0.png").write_bytes(b"x")
    with pytest.raises(train_cxr.CXRError, match="has only the class folder 'NORMAL'"):
        train_cxr.split_from_folder(tmp_path / "NORMAL", ckpt, train_cxr.Config(), "test")


def test_a_class_folder_typed_in_another_case_with_images_beside_patient_folders_is_named_too(tmp_path):
    # D/test/pneumonia typed for PNEUMONIA/ (Windows and macOS open it), with images beside per-patient
    # sub-folders: "has classes ['patient7', 'patient8']", after a warning to move the images into class folders.
    ckpt = {"class_names": ["NORMAL", "PNEUMONIA"], "config": train_cxr.Config().to_dict()}
    folder = tmp_path / "D" / "test" / "pneumonia"
    for sub in ("patient7", "patient8"):
        (folder / sub).mkdir(parents=True)
        (folder / sub / "img0.png").write_bytes(b"x")
    (folder / "img1.png").write_bytes(b"x")
    for what, flag in (("test", "--data-dir"), ("recalibration", "--recalibrate")):
        advice = re.escape(f"is the class folder of PNEUMONIA: pass the folder that holds every class folder "
                           f"(NORMAL, PNEUMONIA), {flag} {tmp_path / 'D' / 'test'}")
        with pytest.raises(train_cxr.CXRError, match=advice):
            train_cxr.split_from_folder(folder, ckpt, train_cxr.Config(), what)
    # Its sub-folders named as a class in another case: a folder of class folders, as before.
    (tmp_path / "Normal" / "normal").mkdir(parents=True)
    (tmp_path / "Normal" / "normal" / "img0.png").write_bytes(b"x")
    with pytest.raises(train_cxr.CXRError, match="has only the class folder 'normal'"):
        train_cxr.split_from_folder(tmp_path / "Normal", ckpt, train_cxr.Config(), "test")

def test_predict_maps_explain_the_reported_label(trained, scans, tmp_path):
    folder, _, _, _ = scans
    ckpt_path = trained / "best_model.pt"
    out = tmp_path / "pred"
    assert run(["--predict", folder, "--checkpoint", ckpt_path, "--output-dir", out, "--run-name", "m",
                "--save-cam-arrays", "--num-workers", 0, *ONE_THREAD, *CPU]) == 0
    ckpt = train_cxr.load_checkpoint(ckpt_path)
    model = train_cxr.model_from_checkpoint(ckpt)
    rows = read_csv(out / "m" / "predictions.csv")
    arrays = sorted((out / "m" / "grad_cam").glob("*.npy"))
    assert len(arrays) == len(rows) >= 1
    for r in rows:
        saved = [a for a in arrays if f"_{Path(r['path']).stem}_pred-{r['predicted']}_" in a.name]
        assert len(saved) == 1
        with train_cxr.GradCAM(model) as cam:  # the label in the CSV, which follows the stored threshold
            want = cam(input_by_hand(ckpt, r["path"]), target=ckpt["class_names"].index(r["predicted"]))[0]
        np.testing.assert_allclose(np.load(saved[0]), want, atol=1e-4)


@pytest.mark.parametrize("case", ["no_checkpoint", "missing_path", "missing_checkpoint"])
def test_predict_bad_arguments_exit_2(trained, scans, tmp_path, capsys, case):
    folder, single, _, _ = scans
    out = tmp_path / "pred"
    argv = {"no_checkpoint": ["--predict", single],
            "missing_path": ["--predict", folder, tmp_path / "nope.png", "--checkpoint", trained / "best_model.pt"],
            "missing_checkpoint": ["--predict", single, "--checkpoint", tmp_path / "nope.pt"]}[case]
    capsys.readouterr()
    assert run([*argv, "--output-dir", out, "--run-name", "p", *ONE_THREAD]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    want = {"no_checkpoint": "--checkpoint", "missing_path": "nope.png", "missing_checkpoint": "nope.pt"}[case]
    assert want in err[0]
    assert not out.exists()  # no run folder for a command that did nothing


@pytest.mark.parametrize("where", ["root", "test_folder"])
def test_evaluate_reproduces_test_metrics(trained, synth_root, tmp_path, where):
    data = synth_root if where == "root" else synth_root / "test"
    out = tmp_path / "ev"
    # The report settings are this command's (BOOTSTRAP and NUM_GRADCAM_IMAGES at the top, 1000 and 8): the run's
    # (TINY's 50 and 4) are typed to get its interval and gallery back.
    assert run(["--evaluate", "--checkpoint", trained / "best_model.pt", "--data-dir", data, "--output-dir", out,
                "--run-name", "e", "--num-workers", 0, "--bootstrap", 50, "--num-gradcam-images", 4,
                *ONE_THREAD, *CPU]) == 0
    want = json.loads((trained / "test_metrics.json").read_text())
    got = json.loads((out / "e" / "test_metrics.json").read_text())
    assert want["n"] == got["n"] == 50 and want["copies_of_training_images"] == 0
    for key in ("class_names", "positive_class", "auc", "auc_ci95", "threshold", "accuracy", "sensitivity",
                "specificity", "confusion_matrix", "at_0.5", "ece", "ood", "threshold_policy",
                "copies_of_training_images"):
        assert got[key] == want[key], key
    for key in ("mean_share_in_box", "uniform_share", "n_images"):
        assert got["gradcam"][key] == pytest.approx(want["gradcam"][key], abs=1e-4), key
    assert got["gallery_files"] == want["gallery_files"]
    assert (out / "e" / "roc_curve.png").is_file() and (out / "e" / "confusion_matrix.png").is_file()


@pytest.fixture
def with_copies(synth_root, tmp_path) -> Path:
    """The synthetic test folder plus 3 byte-identical copies of training images, renamed (bytes, not names)."""
    data = tmp_path / "with_copies"
    shutil.copytree(synth_root / "test", data)
    for k, src in enumerate([*sorted((synth_root / "train" / "NORMAL").iterdir())[:2],
                             sorted((synth_root / "train" / "PNEUMONIA").iterdir())[0]]):
        shutil.copyfile(src, data / src.parent.name / f"site_{k}.png")
    return data


def test_evaluate_counts_copies_of_training_images(trained, synth_root, with_copies, tmp_path):
    # --evaluate on a folder holding training images gave optimistic figures without a word.
    common = ["--checkpoint", trained, "--output-dir", tmp_path, "--num-workers", 0, "--bootstrap", 0,
              "--num-gradcam-images", 0, *ONE_THREAD, *CPU]
    assert run(["--evaluate", "--data-dir", with_copies, "--run-name", "e", *common]) == 0
    warned = [ln for ln in (tmp_path / "e" / "train.log").read_text().splitlines() if "byte-identical" in ln]
    assert len(warned) == 1 and warned[0].startswith(f"warning: 3 of the 53 images in {with_copies} "), warned
    assert "site_" in warned[0] and "optimistic" in warned[0]
    metrics = json.loads((tmp_path / "e" / "test_metrics.json").read_text())
    assert metrics["n"] == 53 and metrics["copies_of_training_images"] == 3
    assert "3 of the 53 images are copies" in (tmp_path / "e" / "report.html").read_text()
    # A folder without copies: no warning, and a count of 0.
    assert run(["--evaluate", "--data-dir", synth_root, "--run-name", "clean", *common]) == 0
    assert "byte-identical" not in (tmp_path / "clean" / "train.log").read_text()
    assert json.loads((tmp_path / "clean" / "test_metrics.json").read_text())["copies_of_training_images"] == 0


def test_evaluate_of_a_checkpoint_without_digests_says_it_cannot_check(trained, with_copies, tmp_path):
    ckpt = torch.load(trained / "best_model.pt", weights_only=True)
    ckpt.pop("trained_on_sha1", None)  # as a checkpoint made before they were kept
    torch.save(ckpt, tmp_path / "old.pt")
    assert run(["--evaluate", "--checkpoint", tmp_path / "old.pt", "--data-dir", with_copies, "--output-dir", tmp_path,
                "--run-name", "e", "--num-workers", 0, "--bootstrap", 0, "--num-gradcam-images", 0,
                *ONE_THREAD, *CPU]) == 0
    notes = [ln for ln in (tmp_path / "e" / "train.log").read_text().splitlines() if "cannot be checked" in ln]
    assert notes == [f"note: {tmp_path / 'old.pt'} was made before checkpoints kept the digests of their training "
                     f"images, so whether {with_copies} holds copies of them cannot be checked"]
    assert json.loads((tmp_path / "e" / "test_metrics.json").read_text())["copies_of_training_images"] is None


def test_checkpoint_keeps_the_digests_of_train_and_validation_files(trained, synth_root):
    # One sorted row of 20 bytes per distinct training or validation file: the 150 files of train/.
    digests = train_cxr.load_checkpoint(trained / "best_model.pt")["trained_on_sha1"]
    files = sorted((synth_root / "train").rglob("*.png"))
    want = sorted({bytes.fromhex(train_cxr.file_sha1(p)) for p in files})
    assert digests.dtype == torch.uint8 and [r.tobytes() for r in digests.numpy()] == want and len(want) == 150
    assert torch.equal(train_cxr.load_checkpoint(trained / "last.pt")["trained_on_sha1"], digests)


def test_recalibrate_counts_copies_of_training_images(trained, with_copies, tmp_path):
    assert run(["--recalibrate", with_copies, "--checkpoint", trained, "--output-dir", tmp_path, "--run-name", "r",
                "--num-workers", 0, *ONE_THREAD, *CPU]) == 0
    log_text = (tmp_path / "r" / "train.log").read_text()
    assert f"warning: 3 of the 53 images in {with_copies} are byte-identical copies" in log_text
    assert json.loads((tmp_path / "r" / "recalibration.json").read_text())["copies_of_training_images"] == 3
    page = (tmp_path / "r" / "report.html").read_text()
    assert "3 of them are copies of images the model had already seen (in training" in page


def test_recalibrated_model_counts_its_recalibration_folder_as_seen(trained, synth_root, with_copies, tmp_path):
    # The operating point of a recalibrated model is fitted on its folder: an --evaluate of that folder with it
    # reported 3 copies (the training images among them), as though the other 50 were new to it.
    common = ["--output-dir", tmp_path, "--num-workers", 0, *ONE_THREAD, *CPU]
    assert run(["--recalibrate", with_copies, "--checkpoint", trained, "--run-name", "r", *common]) == 0
    new = train_cxr.load_checkpoint(tmp_path / "r")
    digests = new["recalibrated_on_sha1"]
    assert digests.dtype == torch.uint8 and digests.shape == (53, 20)  # a row per file of the folder
    assert torch.equal(new["trained_on_sha1"], train_cxr.load_checkpoint(trained)["trained_on_sha1"])  # unchanged
    assert run(["--evaluate", "--checkpoint", tmp_path / "r", "--data-dir", with_copies, "--run-name", "e",
                "--bootstrap", 0, "--num-gradcam-images", 0, *common]) == 0
    warned = [ln for ln in (tmp_path / "e" / "train.log").read_text().splitlines() if "byte-identical" in ln]
    assert len(warned) == 1 and warned[0].startswith(
        f"warning: 53 of the 53 images in {with_copies} are byte-identical copies of images {tmp_path / 'r'} was "
        "trained, validated or recalibrated on"), warned
    assert json.loads((tmp_path / "e" / "test_metrics.json").read_text())["copies_of_training_images"] == 53
    # A second recalibration keeps the first folder's digests beside its own: 53 and the 150 of train/, 3 shared.
    assert run(["--recalibrate", synth_root / "train", "--checkpoint", tmp_path / "r", "--run-name", "r2",
                *common]) == 0
    assert json.loads((tmp_path / "r2" / "recalibration.json").read_text())["copies_of_training_images"] == 150
    assert train_cxr.load_checkpoint(tmp_path / "r2")["recalibrated_on_sha1"].shape == (200, 20)


def test_predict_marks_copies_of_training_images(trained, with_copies, tmp_path):
    # --predict on a folder holding training images gave their (taught) labels without a word.
    common = ["--output-dir", tmp_path, "--num-workers", 0, *ONE_THREAD, *CPU]
    assert run(["--predict", with_copies, "--checkpoint", trained, "--run-name", "p", *common]) == 0
    warned = [ln for ln in (tmp_path / "p" / "train.log").read_text().splitlines() if "byte-identical" in ln]
    assert len(warned) == 1 and warned[0].startswith(f"warning: 3 of the 53 images in {with_copies} "), warned
    assert "site_" in warned[0] and "copy_of_training_image in predictions.csv" in warned[0]
    rows = read_csv(tmp_path / "p" / "predictions.csv")
    assert sorted(Path(r["path"]).name for r in rows if r["copy_of_training_image"] == "True") == \
        ["site_0.png", "site_1.png", "site_2.png"]
    assert {r["copy_of_training_image"] for r in rows if "site_" not in r["path"]} == {"False"}
    # One file given: said of that file, not as "1 of the 1 images in site_0.png".
    one = with_copies / "NORMAL" / "site_0.png"
    assert run(["--predict", one, "--checkpoint", trained, "--run-name", "p1", *common]) == 0
    warned = [ln for ln in (tmp_path / "p1" / "train.log").read_text().splitlines() if "byte-identical" in ln]
    assert warned == [f"warning: {one} is a byte-identical copy of an image {trained} was trained or validated on: "
                      "a prediction for an image the model has seen says nothing of how it does on new ones "
                      "(copy_of_training_image in predictions.csv)"]
    # A checkpoint made before the digests were kept: one note, and the column empty (unknown), not False.
    ckpt = torch.load(trained / "best_model.pt", weights_only=True)
    ckpt.pop("trained_on_sha1", None)
    torch.save(ckpt, tmp_path / "old.pt")
    assert run(["--predict", with_copies, "--checkpoint", tmp_path / "old.pt", "--run-name", "o", *common]) == 0
    log_text = (tmp_path / "o" / "train.log").read_text()
    assert "byte-identical" not in log_text
    assert [ln for ln in log_text.splitlines() if "cannot be checked" in ln] == [
        f"note: {tmp_path / 'old.pt'} was made before checkpoints kept the digests of their training images, so "
        f"whether {with_copies} holds copies of them cannot be checked"]
    assert {r["copy_of_training_image"] for r in read_csv(tmp_path / "o" / "predictions.csv")} == {""}


# ----------------------------------------------------------------------------------------------
# Distributed: torchrun, 2 processes, gloo on CPU
# ----------------------------------------------------------------------------------------------
# Settings under which the synthetic task is learnt within 4 short epochs. DDP runs 2 x 8 images
# per step, the single process 16: the same global batch and the same number of optimizer steps.
LEARN = ["--img-size", "32", "--channels", "8,16,32,32", "--fc-hidden", "32", "--bootstrap", "50",
         "--num-workers", "0", "--num-gradcam-images", "0", "--amp", "off", "--device", "cpu", "--epochs", "4",
         "--lr", "4e-3", "--aug-scale-min", "0.9", "--aug-rotate-deg", "3", "--aug-gamma", "0.1",
         "--label-smoothing", "0", "--dropout", "0", "--ema-decay", "0"]
EPOCHS = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def best_val_auc(run_dir: Path) -> float:
    return max(float(r["val_auc"]) for r in read_csv(run_dir / "history.csv"))


def test_torchrun_two_processes_matches_single(tmp_path_factory):
    data = tmp_path_factory.mktemp("ddp_data") / "chest_xray"
    train_cxr.write_synthetic_dataset(data, {"NORMAL": 320, "PNEUMONIA": 480}, {"NORMAL": 10, "PNEUMONIA": 10},
                                      size=40, seed=3)
    out = tmp_path_factory.mktemp("ddp_runs")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "train_cxr.py", "--data-dir", str(data), "--output-dir", str(out / "ddp_out"), "--run-name", "ddp",
           *LEARN, "--batch-size", "8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None), env.pop("WORLD_SIZE", None), env.pop("LOCAL_RANK", None)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # Exactly one run folder, one set of outputs, written by rank 0 only.
    assert [p.name for p in (out / "ddp_out").iterdir()] == ["ddp"]
    rd = out / "ddp_out" / "ddp"
    names = {p.name for p in rd.iterdir()}
    assert {"config.json", "train.log", "history.csv", "best_model.pt", "last.pt", "test_metrics.json"} <= names
    assert not [n for n in names if ".tmp" in n]
    config = json.loads((rd / "config.json").read_text())
    assert config["world_size"] == 2
    history = read_csv(rd / "history.csv")
    assert [int(r["epoch"]) for r in history] == list(range(1, EPOCHS + 1))
    lines = [ln for ln in (rd / "train.log").read_text().splitlines() if ln.strip()]
    assert len(lines) == len(set(lines)), "train.log has duplicated lines: more than one rank logs"
    assert proc.stdout.count("run folder:") == 1 and proc.stdout.count("test report") == 1
    assert train_cxr.load_checkpoint(rd / "best_model.pt")["threshold"] is not None

    # The same data and global batch in one process reach the same validation AUC.
    assert run(["--data-dir", data, "--output-dir", out / "single_out", "--run-name", "single", *LEARN,
                "--batch-size", 16, *ONE_THREAD]) == 0
    single = out / "single_out" / "single"
    single_config = json.loads((single / "config.json").read_text())
    assert single_config["world_size"] == 1
    assert single_config["split_sizes"] == config["split_sizes"]
    ddp_auc, single_auc = best_val_auc(rd), best_val_auc(single)
    print(f"best val AUC: torchrun x2 {ddp_auc:.4f}, single process {single_auc:.4f}")
    assert ddp_auc > 0.95 and single_auc > 0.95
    assert abs(ddp_auc - single_auc) <= 0.02


def test_gradcam_layers_benchmark_reports_every_layer(trained, synth_root, capsys):
    # benchmarks/gradcam_layers.py: the diagnostic behind the choice of Grad-CAM's default layer.
    mod = load_benchmark("gradcam_layers")
    capsys.readouterr()
    assert mod.main([str(trained / "best_model.pt"), str(synth_root / "test")]) == 0
    lines = capsys.readouterr().out.splitlines()
    n = sum(1 for _ in (synth_root / "test").rglob("*.png"))
    assert lines[0].startswith(f"{n} images (0 unreadable)")
    rows = {ln.split()[0]: ln for ln in lines[1:]}
    assert set(rows) == {"conv", "bn", "relu", "block"}
    for ln in rows.values():
        shares = [float(v) for v in re.findall(r"-pred (\d\.\d\d)", ln)]
        assert shares and all(0 <= v <= 1 for v in shares)
        assert 0 <= float(re.search(r"lung box (\d\.\d+)", ln).group(1)) <= 1


def test_predict_numbers_every_overlay_past_the_first_chunk(trained, synth_root, tmp_path):
    # Overlays are drawn in chunks of 64 images (bounded memory); a chunk numbered from 0 again would
    # give image 64 the name of image 0 and leave report.html's rows pointing at other images' maps.
    out = tmp_path / "pred"
    assert run(["--predict", synth_root / "test", synth_root / "train" / "NORMAL", "--checkpoint", trained,
                "--output-dir", out, "--run-name", "p", "--num-workers", 0, *ONE_THREAD, *CPU]) == 0
    rows = read_csv(out / "p" / "predictions.csv")
    assert len(rows) == 110
    names = sorted(p.name for p in (out / "p" / "grad_cam").glob("*.png"))
    assert len(names) == len(rows)
    for k, (r, name) in enumerate(zip(rows, names)):
        assert name.startswith(f"{k:05d}_{Path(r['path']).stem}_pred-{r['predicted']}_"), (k, name)
    page = (out / "p" / "report.html").read_text()
    assert [int(k) for k in re.findall(r'<img src="grad_cam/(\d+)_', page)] == list(range(110))


def test_predict_does_not_score_its_own_earlier_overlays(trained, synth_root, tmp_path, capsys):
    # --predict . from inside the scans folder puts runs/ there: the second call scored the first one's
    # Grad-CAM overlays as X-rays (2 scans predicted as 4, in predictions.csv and the report).
    scans = tmp_path / "scans"
    scans.mkdir()
    for f in sorted((synth_root / "test" / "PNEUMONIA").glob("*.png"))[:2]:
        shutil.copy(f, scans / f.name)
    for name in ("first", "second"):
        assert run(["--predict", scans, "--checkpoint", trained, "--output-dir", scans / "runs", "--run-name", name,
                    "--num-workers", 0, *ONE_THREAD, *CPU]) == 0
    assert [Path(r["path"]).parent for r in read_csv(scans / "runs" / "second" / "predictions.csv")] == [scans] * 2
    assert f"skipping 1 run folder(s) of train_cxr.py under {scans}" in capsys.readouterr().out


def test_predict_skips_a_run_folder_whose_grad_cam_was_deleted(tmp_path):
    # A run folder was recognised by train.log and grad_cam/: with grad_cam/ deleted to save space, its
    # roc_curve.png and training_history.png were scored as X-rays by --predict of the folder above it.
    scans = tmp_path / "scans"
    run_dir = scans / "runs" / "r"
    run_dir.mkdir(parents=True)
    img = np.full((32, 32, 3), 128, np.uint8)
    for p in (scans / "a.png", run_dir / "roc_curve.png", run_dir / "training_history.png"):
        train_cxr.save_image(p, img)
    for name in ("train.log", "report.html"):
        (run_dir / name).write_text("")
    assert train_cxr.images_to_predict(scans) == [str(scans / "a.png")]


def test_predict_survives_a_file_name_near_the_file_systems_limit(trained, synth_root, tmp_path):
    # A 242-byte name (80 non-ASCII characters of 3 bytes) is a valid file, but its overlay's name
    # (number, stem, label, P) passed the 255 bytes a file name may have: the run stopped with a
    # traceback after scoring, and predictions.csv was never written.
    scans = tmp_path / "scans"
    scans.mkdir()
    long = scans / ("胸部X線写真_" * 14 + ".png")
    shutil.copy(sorted((synth_root / "test" / "NORMAL").glob("*.png"))[0], long)
    out = tmp_path / "pred"
    assert run(["--predict", scans, "--checkpoint", trained, "--output-dir", out, "--run-name", "p",
                "--num-workers", 0, *ONE_THREAD, *CPU]) == 0
    assert [r["path"] for r in read_csv(out / "p" / "predictions.csv")] == [str(long)]
    (overlay,) = (out / "p" / "grad_cam").glob("*.png")
    assert overlay.name.startswith("00000_胸部X線写真_") and len(overlay.name.encode()) <= 255


def test_a_file_name_that_is_not_utf8_is_written_escaped(trained, synth_root, tmp_path):
    # A Latin-1 name (b"\xe9", an old archive unpacked on Linux) is a readable image, but Python keeps the
    # byte as a surrogate: the CSV writer refused it after the whole test report was computed, and
    # OpenCV's drawing of --predict's overlay titles killed the process (a segfault, no message).
    data = tmp_path / "data"
    shutil.copytree(synth_root / "test", data / "test")
    first = sorted((data / "test" / "NORMAL").glob("*.png"))[0]
    try:
        first.rename(os.fsdecode(os.fsencode(first.parent) + b"/IM-0000-caf\xe9.png"))
    except (OSError, UnicodeError):
        pytest.skip("this file system takes UTF-8 names only")
    out = tmp_path / "out"
    common = ["--checkpoint", trained, "--output-dir", out, "--num-workers", 0, *ONE_THREAD, *CPU]
    assert run(["--evaluate", "--data-dir", data, "--run-name", "e", *common]) == 0
    shown = f"{first.parent}/IM-0000-caf\\xe9.png"  # the byte as an escape, the rest of the path as it is
    assert read_csv(out / "e" / "test_predictions.csv")[0]["path"] == shown
    assert Path(shown).name in json.loads((out / "e" / "test_metrics.json").read_text())["gallery_files"]
    assert run(["--predict", first.parent, "--run-name", "p", *common]) == 0
    assert read_csv(out / "p" / "predictions.csv")[0]["path"] == shown
    assert Path(shown).name in (out / "p" / "report.html").read_text()


def test_normalize_dataset_stores_the_training_splits_statistics(synth_root, tmp_path):
    # --normalize dataset: the mean and std of the training split (as --help says), not of validation
    # or of train and validation together; the checkpoint carries them to --predict and --evaluate.
    assert run([*TINY, *ONE_THREAD, "--epochs", 1, "--normalize", "dataset", "--data-dir", synth_root,
                "--output-dir", tmp_path, "--run-name", "n", "--num-gradcam-images", 0, "--bootstrap", 0]) == 0
    ckpt = train_cxr.load_checkpoint(tmp_path / "n" / "best_model.pt")
    data = train_cxr.prepare_data(train_cxr.Config.from_dict(ckpt["config"]))
    train_stats = train_cxr.dataset_norm(data["train"].images, "dataset")
    assert train_stats != train_cxr.dataset_norm(data["val"].images, "dataset")  # the check can tell them apart
    assert ckpt["normalization"] == train_stats
