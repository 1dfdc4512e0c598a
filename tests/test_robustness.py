"""Robustness: bad input files, interruption and resume, atomic writes, safe loading, NaN, disk full.

Every damaged or odd input is generated here (no committed binaries).
"""
import argparse
import dataclasses
import errno
import json
import logging
import math
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import types
from collections import OrderedDict
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import train_cxr
from conftest import TINY, needs_symlinks, read_csv, run

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32  # decode size used by the direct decode_xray checks
# One torch thread: these tiny models gain nothing from two, and lose a lot on a busy machine.
FAST = [*TINY, "--num-threads", "1"]


# ----------------------------------------------------------------------------------------------
# Bad-input corpus
# ----------------------------------------------------------------------------------------------
def _ramp(h: int, w: int, lo: float = 20, hi: float = 230) -> np.ndarray:
    """Horizontal uint8 ramp: dark on the left, bright on the right."""
    return np.tile(np.linspace(lo, hi, w), (h, 1)).round().astype(np.uint8)


# name -> class folder it goes to
BAD = {"zero_bytes.jpeg": "NORMAL", "truncated.jpeg": "PNEUMONIA", "not_an_image.png": "NORMAL"}
GOOD = {"gradient16.png": "NORMAL", "rgba.png": "PNEUMONIA", "cmyk.jpeg": "NORMAL",
        "one_pixel.png": "PNEUMONIA", "huge.jpeg": "NORMAL", "UPPER_CASE.JPG": "PNEUMONIA"}
IGNORED = {".DS_Store": "NORMAL", "Thumbs.db": "PNEUMONIA", "._IM-9999-0001.png": "NORMAL"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A flat folder holding every bad, odd and ignorable file once."""
    d = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    # broken
    (d / "zero_bytes.jpeg").write_bytes(b"")
    texture = cv2.GaussianBlur((rng.random((128, 128)) * 255).astype(np.uint8), (0, 0), 1.0)
    ok, jpg = cv2.imencode(".jpg", texture)
    assert ok
    (d / "truncated.jpeg").write_bytes(jpg.tobytes()[:len(jpg) // 2])
    (d / "not_an_image.png").write_text("this is a text file, not a PNG\n")
    # loadable but unusual
    g16 = np.tile(np.linspace(1000, 60000, 64), (48, 1)).astype(np.uint16)
    assert cv2.imwrite(str(d / "gradient16.png"), g16)
    ramp = _ramp(48, 64)
    rgba = np.dstack([ramp, ramp, ramp, np.full_like(ramp, 255)])
    Image.fromarray(rgba, "RGBA").save(d / "rgba.png")
    Image.fromarray(np.dstack([ramp] * 3)).convert("CMYK").save(d / "cmyk.jpeg", "JPEG", quality=95)
    Image.fromarray(np.full((1, 1), 137, np.uint8)).save(d / "one_pixel.png")
    assert cv2.imwrite(str(d / "huge.jpeg"), _ramp(5000, 6000, 0, 255))  # 30 MP, compresses to < 1 MB
    assert cv2.imwrite(str(d / "UPPER_CASE.JPG"), ramp, [cv2.IMWRITE_JPEG_QUALITY, 95])
    # not images at all: must be skipped silently
    for name in IGNORED:
        (d / name).write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return d


def _place_corpus(corpus: Path, data: Path) -> dict:
    """Copy the corpus into data/train/<CLASS>/; returns {name: placed path}."""
    placed = {}
    for name, cls in {**BAD, **GOOD, **IGNORED}.items():
        placed[name] = data / "train" / cls / name
        shutil.copyfile(corpus / name, placed[name])
    (data / "train" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    return placed


def test_decode_unusual_but_valid_files(corpus):
    out = {name: train_cxr.decode_xray(str(corpus / name), SIZE) for name in GOOD}
    for name, arr in out.items():
        assert arr.shape == (SIZE, SIZE) and arr.dtype == np.uint8, name
    want = cv2.resize(_ramp(48, 64), (SIZE, SIZE), interpolation=cv2.INTER_AREA).astype(int)

    # 16-bit: the ordering is kept and the full 8-bit range is used (no clipping to white, no
    # wrap-around, no loss of contrast).
    g = out["gradient16.png"].astype(int)
    cols = g.mean(0)
    assert np.all(np.diff(cols) > 0), cols
    assert cols[0] < 20 and cols[-1] > 235, cols
    assert np.ptp(g, axis=0).max() <= 1  # columns stay flat: rows did not get mixed up

    # RGBA (opaque) and CMYK: the gray content, not black and not inverted.
    for name, tol in (("rgba.png", 2), ("cmyk.jpeg", 10), ("UPPER_CASE.JPG", 8)):
        arr = out[name].astype(int)
        assert arr.mean() > 60, name
        assert np.abs(arr - want).max() <= tol, (name, arr[0], want[0])

    assert np.all(out["one_pixel.png"] == 137)

    huge = out["huge.jpeg"].astype(int).mean(0)
    assert huge[0] < 20 and huge[-1] > 235 and np.all(np.diff(huge) >= -2), huge


@pytest.mark.parametrize("name", sorted(BAD))
def test_decode_broken_files_raise(corpus, name):
    with pytest.raises(OSError):
        train_cxr.decode_xray(str(corpus / name), SIZE)


def test_bad_files_skipped_and_reported_once(corpus, synth_root, data_copy, tmp_path, capsys):
    placed = _place_corpus(corpus, data_copy)
    n_train = sum(1 for _ in (synth_root / "train").rglob("*.png"))
    out = tmp_path / "runs"
    rc = run(FAST + ["--epochs", "1", "--data-dir", data_copy, "--output-dir", out, "--run-name", "bad"])
    stdout = capsys.readouterr().out
    assert rc == 0, stdout

    warn = [line for line in stdout.splitlines() if "unreadable" in line]
    assert len(warn) == 1, warn
    for name in BAD:
        assert stdout.count(str(placed[name])) == 1, name
    # (The patients note may name a good file as one that matches no Kermany pattern: it was read.)
    said = "\n".join(line for line in stdout.splitlines() if not line.startswith("patients:"))
    for name in (*GOOD, *IGNORED, "Thumbs", "DS_Store"):
        assert name not in said, name

    cfg = json.loads((out / "bad" / "config.json").read_text())
    sizes = cfg["split_sizes"]
    assert sizes["train"] + sizes["val"] == n_train + len(GOOD)
    assert sizes["test"] == sum(1 for _ in (data_copy / "test").rglob("*.png"))
    assert sorted(os.path.realpath(p) for p in cfg["skipped_files"]) == \
        sorted(os.path.realpath(placed[n]) for n in BAD)


def test_files_of_other_kinds_in_the_class_folders_are_counted_in_a_note(data_copy, capsys):
    # A .jfif (a JPEG as a browser saves it) or a .jp2 export was left out as quietly as Thumbs.db.
    for name in ("a.jfif", "b.JFIF", "c.jp2"):
        (data_copy / "train" / "PNEUMONIA" / name).write_bytes(b"x")
    (data_copy / "train" / "NORMAL" / "Thumbs.db").write_bytes(b"x")
    (data_copy / "train" / "NORMAL" / ".hidden.jp2").write_bytes(b"x")
    train_cxr.setup_console_logging()
    capsys.readouterr()
    train_cxr.list_image_folder(data_copy / "train")
    out = capsys.readouterr().out
    assert f"note: 3 file(s) in the class folders of {data_copy / 'train'} are not images by their extension and " \
           "are left out (.jfif 2, .jp2 1; e.g. " in out
    assert "Thumbs" not in out and "hidden" not in out and "preamble" not in out
    # A file without an extension may be a DICOM without its preamble: naming it .dcm is the fix, not converting
    (data_copy / "train" / "NORMAL" / "IM000001").write_bytes(b"\x08\x00\x05\x00CS")
    train_cxr.list_image_folder(data_copy / "train")
    assert "(.jfif 2, no extension 1, .jp2 1; " in (out := capsys.readouterr().out)
    assert out.rstrip().endswith("a DICOM file without an extension or its preamble is read once named .dcm")


def test_class_folders_that_differ_only_in_case_or_spacing_are_warned_about(data_copy, capsys):
    # NORMAL/ and Normal/ from two merged sources were two classes: a 3-class model, said only by the list.
    (data_copy / "test").rename(data_copy / "held_out")  # no test/ to refuse the third class
    moved = sorted((data_copy / "train" / "NORMAL").glob("*.png"))[:10]
    for name in ("Normal", "pneumonia_"):
        (data_copy / "train" / name).mkdir()
    for p in moved:
        p.rename(data_copy / "train" / ("Normal" if p in moved[:5] else "pneumonia_") / p.name)
    train_cxr.setup_console_logging()
    capsys.readouterr()
    classes, _ = train_cxr.check_split_dir(data_copy / "train", "train")
    out = capsys.readouterr().out
    assert classes == ["NORMAL", "Normal", "PNEUMONIA", "pneumonia_"]
    assert "warning: the class folders NORMAL and Normal in " in out
    assert "warning: the class folders PNEUMONIA and pneumonia_ in " in out
    capsys.readouterr()
    train_cxr.check_split_dir(data_copy / "held_out", "test")
    assert "differ only" not in capsys.readouterr().out
    # Hyphens are folded too (COVID-19 and COVID 19): the warning named only case, spaces and underscores.
    for name in ("COVID-19", "COVID 19"):
        (data_copy / "hyphen" / name).mkdir(parents=True)
        shutil.copy(data_copy / "train" / "Normal" / moved[0].name, data_copy / "hyphen" / name / "a.png")
    capsys.readouterr()
    train_cxr.check_split_dir(data_copy / "hyphen", "train")
    said = capsys.readouterr()
    assert "COVID 19 and COVID-19 in " in said.out and "hyphens" in said.out, said


def test_a_float_image_with_a_nan_or_inf_pixel_keeps_its_picture(tmp_path):
    # One masked (NaN) pixel made min and max NaN: the float TIFF decoded to an all-black image, trained on.
    ramp = np.tile(np.linspace(0.0, 1.0, 40, dtype=np.float32), (40, 1))
    for bad, as_value in ((np.nan, 0.0), (np.inf, 1.0), (-np.inf, 0.0)):
        img = ramp.copy()
        img[5, 5], clean = bad, ramp.copy()
        clean[5, 5] = as_value
        Image.fromarray(img).save(tmp_path / "bad.tif")
        Image.fromarray(clean).save(tmp_path / "clean.tif")
        np.testing.assert_array_equal(train_cxr.decode_xray(str(tmp_path / "bad.tif"), 40),
                                      train_cxr.decode_xray(str(tmp_path / "clean.tif"), 40))
    Image.fromarray(np.full((8, 8), np.nan, np.float32)).save(tmp_path / "void.tif")
    with pytest.raises(OSError, match="without one finite pixel"):  # listed as unreadable, not a black image
        train_cxr.decode_xray(str(tmp_path / "void.tif"), 8)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_an_uncompressed_gray_tiff_with_a_turning_orientation_is_read_upright(tmp_path, dtype):
    # Pillow 11+ memory-maps such a file opened by its path, turns it while loading but reads its rows at the turned
    # width: the X-ray came out as diagonal stripes (LZW-compressed and RGB TIFFs were right). Each must equal the
    # upright picture saved plainly.
    stored = np.random.default_rng(0).integers(0, 250 if dtype == np.uint8 else 60000, (48, 32)).astype(dtype)
    for turn, upright in ((5, stored.T), (6, np.rot90(stored, -1)), (7, np.rot90(stored, 2).T),
                          (8, np.rot90(stored, 1)), (3, np.rot90(stored, 2))):
        Image.fromarray(stored).save(tmp_path / "turned.tif", tiffinfo={274: turn})
        Image.fromarray(np.ascontiguousarray(upright)).save(tmp_path / "plain.tif")
        np.testing.assert_array_equal(train_cxr.decode_xray(str(tmp_path / "turned.tif"), 40),
                                      train_cxr.decode_xray(str(tmp_path / "plain.tif"), 40), err_msg=str(turn))


@pytest.mark.parametrize("mode", ["RGBA", "CMYK", "P"])
def test_an_uncompressed_colour_tiff_with_a_turning_orientation_is_read_upright(tmp_path, mode):
    # Pillow 11+ memory-maps a one-strip uncompressed RGBA, CMYK or palette TIFF opened by its path, and read one
    # with an Orientation of 5-8 at the turned width: stripes, trained on without a word.
    rng = np.random.default_rng(0)
    stored = rng.integers(0, 256, (48, 32) if mode == "P" else (48, 32, 4)).astype(np.uint8)
    palette = rng.integers(0, 256, 768).tolist()

    def image(pixels):
        im = Image.fromarray(np.ascontiguousarray(pixels), mode)
        if mode == "P":
            im.putpalette(palette)
        return im
    for turn, upright in ((5, stored.swapaxes(0, 1)), (6, np.rot90(stored, -1)), (8, np.rot90(stored, 1))):
        image(stored).save(tmp_path / "turned.tif", tiffinfo={274: turn})
        image(upright).save(tmp_path / "plain.tif")
        np.testing.assert_array_equal(train_cxr.decode_xray(str(tmp_path / "turned.tif"), 40),
                                      train_cxr.decode_xray(str(tmp_path / "plain.tif"), 40), err_msg=str(turn))


def test_an_unreadable_file_whose_name_is_not_utf8_is_listed_escaped(data_copy, tmp_path, capsys):
    # Its path went raw into the warning (a logging error instead of the line) and into config.json's
    # skipped_files, from which the report page of epoch 1 could not be written: the run stopped there.
    folder = data_copy / "train" / "NORMAL"
    try:
        Path(os.fsdecode(os.fsencode(folder) + b"/broken-caf\xe9.png")).write_text("not an image")
    except (OSError, UnicodeError):
        pytest.skip("this file system takes UTF-8 names only")
    out = tmp_path / "runs"
    assert run(FAST + ["--epochs", "1", "--data-dir", data_copy, "--output-dir", out, "--run-name", "r"]) == 0
    shown = f"{folder}/broken-caf\\xe9.png"
    assert shown in capsys.readouterr().out
    assert json.loads((out / "r" / "config.json").read_text())["skipped_files"] == [shown]
    assert shown in (out / "r" / "report.html").read_text()


def test_csv_files_are_utf8_where_text_files_default_to_another_encoding(tmp_path, monkeypatch):
    # Windows opens text in its ANSI code page (cp1252 in Western Europe and the Americas) unless told: a test
    # path under C:\Users\Иван stopped a finished run with UnicodeEncodeError in test_predictions.csv,
    # before test_metrics.json and the report page were written. Simulated here by that default for open().
    real_open = open
    monkeypatch.setattr(train_cxr, "open", lambda *a, **k: real_open(*a, **{"encoding": "cp1252", **k}),
                        raising=False)
    path = "C:/Users/Иван/张伟/person1_bacteria_1.png"
    train_cxr.write_csv(tmp_path / "predictions.csv", ["path", "predicted", "prob_PNEUMONIA"],
                        [[path, "PNEUMONIA", "0.900000"]])
    assert (tmp_path / "predictions.csv").read_bytes().decode("utf-8").splitlines()[1].startswith(path)
    page = train_cxr.write_report(tmp_path, "t").read_text(encoding="utf-8")  # the page reads it back as written
    assert "Иван/张伟/person1_bacteria_1.png" in page


def test_a_class_folder_whose_name_is_not_utf8_is_refused_and_log_lines_escape_such_names(data_copy, tmp_path,
                                                                                           capsys):
    # The class name is drawn on every overlay: OpenCV's text drawing killed the process without a message.
    train = data_copy / "train"
    try:
        for split in ("train", "test"):
            (data_copy / split / "NORMAL").rename(os.fsdecode(os.fsencode(data_copy / split) + b"/NORMAL-\xe9"))
    except (OSError, UnicodeError):
        pytest.skip("this file system takes UTF-8 names only")
    out = tmp_path / "runs"
    assert run(FAST + ["--epochs", "1", "--data-dir", data_copy, "--output-dir", out, "--run-name", "r"]) == 2
    err = capsys.readouterr().err
    assert f"class folder {train}/NORMAL-\\xe9 has a name that is not UTF-8: rename it" in err, err
    assert not (out / "r").exists()
    # Any log line naming such a file (duplicates, patient notes) reaches the console and train.log escaped.
    train_cxr.setup_console_logging()
    train_cxr.attach_log_file(tmp_path / "train.log")
    train_cxr.log.warning("warning: %s and %s are the same image", "caf\udce9.png", "胸.png")
    captured = capsys.readouterr()
    assert "caf\\xe9.png and 胸.png" in captured.out and "Logging error" not in captured.err
    assert "caf\\xe9.png and 胸.png" in (tmp_path / "train.log").read_text(encoding="utf-8")
    train_cxr.setup_console_logging()  # closes train.log


def test_strict_refuses_bad_files(corpus, data_copy, tmp_path, capsys):
    placed = _place_corpus(corpus, data_copy)
    out = tmp_path / "runs"
    rc = run(FAST + ["--epochs", "1", "--data-dir", data_copy, "--output-dir", out, "--run-name", "strict",
                     "--strict"])
    err = capsys.readouterr().err
    assert rc == 2
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    for name in BAD:
        assert str(placed[name]) in lines[0], name
    for name in (*GOOD, *IGNORED):
        assert name not in lines[0], name
    assert not (out / "strict").exists()


@needs_symlinks
def test_broken_link_is_an_unreadable_file_not_a_crash(data_copy, tmp_path):
    link = data_copy / "train" / "NORMAL" / "gone.png"
    link.symlink_to(tmp_path / "moved_away.png")  # hashing for the duplicate check opened it: a traceback
    cfg = train_cxr.Config(data_dir=str(data_copy), img_size=32, num_workers=0)
    assert train_cxr.prepare_data(cfg)["bad_files"] == [str(link)]


@needs_symlinks
def test_a_link_to_a_folder_above_it_is_refused(data_copy, tmp_path):
    # Followed, it was walked again at every level until the OS gave up (40 deep): 150 images became 6,150,
    # the PNEUMONIA ones among them labelled NORMAL, with no more than a count of copies in the log.
    (data_copy / "train" / "NORMAL" / "more").symlink_to(data_copy / "train", target_is_directory=True)
    with pytest.raises(train_cxr.CXRError, match=f"{data_copy / 'train' / 'NORMAL' / 'more'} links to .*remove"):
        train_cxr.check_split_dir(data_copy / "train", "train")
    (data_copy / "train" / "NORMAL" / "more").unlink()  # a loop through two links, neither above the other
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "to_class").symlink_to(data_copy / "train" / "PNEUMONIA", target_is_directory=True)
    (data_copy / "train" / "PNEUMONIA" / "site").symlink_to(tmp_path / "a", target_is_directory=True)
    with pytest.raises(train_cxr.CXRError, match="links to"):
        train_cxr.check_split_dir(data_copy / "train", "train")


def test_a_folder_that_cannot_be_read_is_named_not_silently_left_out(data_copy, monkeypatch, capsys):
    # os.walk (ImageFolder's, --predict's) skips a folder it may not list without a word: the run trained
    # without its images and said nothing. Root here, so the refusal is made by os.scandir, as without rights.
    sub = data_copy / "train" / "NORMAL" / "site2"
    sub.mkdir()
    for f in sorted((data_copy / "train" / "NORMAL").glob("*.png"))[:5]:
        f.rename(sub / f.name)
    (data_copy / "train" / "NORMAL" / ".cache").mkdir()  # hidden: its images are never read, so no warning
    real = os.scandir

    def scandir(path="."):
        if Path(path).name in ("site2", ".cache"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real(path)
    monkeypatch.setattr(os, "scandir", scandir)
    train_cxr.setup_console_logging()
    capsys.readouterr()
    classes, samples = train_cxr.check_split_dir(data_copy / "train", "train")
    assert capsys.readouterr().out == (f"warning: skipping 1 folder(s) that cannot be read, their images left out: "
                                       f"{sub} (Permission denied); fix their permissions to include them\n")
    assert len(samples) == 145
    with pytest.raises(train_cxr.CXRError, match=f"^cannot read the folder {re.escape(str(sub))} \\(Permission"):
        train_cxr.check_image_tree(sub)


@pytest.mark.parametrize("flag", [["--positive-class", "PNEUMONIA"], ["--threshold-policy", "youden"]])
def test_a_folder_that_cannot_be_read_is_warned_about_once_with_a_two_class_flag(data_copy, tmp_path, monkeypatch,
                                                                                capsys, flag):
    # A typed two-class flag listed train/ for its check, and prepare_data listed it again: the warning twice.
    sub = data_copy / "train" / "NORMAL" / "site2"
    sub.mkdir()
    real = os.scandir

    def scandir(path="."):  # root here, so the refusal is made by os.scandir, as without rights
        if Path(path).name == "site2":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real(path)
    monkeypatch.setattr(os, "scandir", scandir)
    # Stopped at the first decode: the data checks, which warn, have all run by then.
    monkeypatch.setattr(train_cxr, "load_split", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    capsys.readouterr()
    assert run([*FAST, "--data-dir", data_copy, "--output-dir", tmp_path / "runs", *flag]) == 130
    assert capsys.readouterr().out.count("folder(s) that cannot be read") == 1


def test_a_test_class_with_no_readable_file_is_refused(data_copy):
    for f in (data_copy / "test" / "NORMAL").glob("*.png"):
        f.write_bytes(b"")  # all skipped: the report would be one class, AUC nan, exit 0
    cfg = train_cxr.Config(data_dir=str(data_copy), img_size=32, num_workers=0)
    with pytest.raises(train_cxr.CXRError, match="the test split has no usable images of class NORMAL: check .*test"):
        train_cxr.prepare_data(cfg)


def test_exif_orientation_is_applied(tmp_path):
    stored = np.zeros((60, 90), np.uint8)
    stored[:, :30] = 255  # bright left third as stored; Orientation 6 = shown rotated 90 degrees clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "phone.jpeg", exif=exif, quality=95)
    got = train_cxr.decode_xray(str(tmp_path / "phone.jpeg"), 30).astype(int)
    assert got[:8].mean() > 200 and got[-8:].mean() < 50  # bright on top, as every viewer shows it


def test_hidden_folders_are_not_classes(synth_root, data_copy):
    # Jupyter and macOS leave hidden folders next to the class folders.
    (data_copy / "train" / ".ipynb_checkpoints").mkdir()
    (data_copy / "train" / ".ipynb_checkpoints" / "IM-0001-0001-checkpoint.png").write_bytes(b"")
    classes, samples = train_cxr.check_split_dir(data_copy / "train", "train")
    assert classes == ["NORMAL", "PNEUMONIA"]
    assert len(samples) == sum(1 for _ in (synth_root / "train").rglob("*.png"))


def test_hidden_sub_folders_are_skipped(synth_root, data_copy, tmp_path):
    src = sorted((data_copy / "train" / "NORMAL").glob("*.png"))[0]
    for hidden in ("NORMAL/.ipynb_checkpoints", "PNEUMONIA/site1/.trash"):  # inside class folders, any depth
        (data_copy / "train" / hidden).mkdir(parents=True)
        shutil.copy(src, data_copy / "train" / hidden / "IM-0001-0001-checkpoint.png")
    n = sum(1 for _ in (synth_root / "train").rglob("*.png"))
    assert len(train_cxr.check_split_dir(data_copy / "train", "train")[1]) == n
    # Only what lies below the given folder counts: a DATA_DIR inside ~/.cache is read.
    inside = tmp_path / ".cache" / "data"
    shutil.copytree(synth_root, inside)
    assert len(train_cxr.check_split_dir(inside / "train", "train")[1]) == n


@needs_symlinks
def test_predict_collects_like_training(synth_root, tmp_path, monkeypatch):
    folder = tmp_path / ".cache" / "pr"  # hidden above the folder given: still read
    (folder / ".hidden").mkdir(parents=True)
    src = sorted((synth_root / "test" / "NORMAL").glob("*.png"))[0]
    for name in ("a.png", ".hidden/copy.png", ".b.png"):
        shutil.copy(src, folder / name)
    # A linked folder is walked (as training's ImageFolder does); a broken link is kept for decode to report.
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(src, tmp_path / "elsewhere" / "c.png")
    (folder / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (folder / "gone.png").symlink_to(tmp_path / "moved_away.png")
    # No checkpoint needed: the files --predict collects are what it hands to load_split.
    ckpt = {"class_names": ["NORMAL", "PNEUMONIA"], "positive_class": 1,
            "config": dataclasses.asdict(train_cxr.Config())}
    monkeypatch.setattr(train_cxr, "checkpoint_model", lambda args, rt: (ckpt, None))
    seen = []

    def collected(samples, cfg, desc):
        seen.extend(p for p, _ in samples)
        raise train_cxr.CXRError("files collected")

    monkeypatch.setattr(train_cxr, "load_split", collected)
    with pytest.raises(train_cxr.CXRError, match="files collected"):
        train_cxr.predict(train_cxr.Config(), argparse.Namespace(predict=[str(folder)]), None)
    assert seen == [str(folder / n) for n in ("a.png", "gone.png", "linked/c.png")]


# ----------------------------------------------------------------------------------------------
# Interruption and resume
# ----------------------------------------------------------------------------------------------
def _same(a: str, b: str) -> bool:
    x, y = float(a), float(b)
    return (math.isnan(x) and math.isnan(y)) or math.isclose(x, y, rel_tol=0, abs_tol=1e-6)


def _train_args(synth_root, out, name, epochs=3):
    return FAST + ["--epochs", str(epochs), "--data-dir", synth_root, "--output-dir", out, "--run-name", name]


@pytest.fixture(scope="module")
def reference_run(synth_root, tmp_path_factory) -> Path:
    """An uninterrupted 3-epoch run."""
    out = tmp_path_factory.mktemp("ref")
    n = torch.get_num_threads()
    try:
        assert run(_train_args(synth_root, out, "ref")) == 0
    finally:
        torch.set_num_threads(n)
    return out / "ref"


def test_sigint_in_epoch_2_then_resume_matches_uninterrupted(synth_root, tmp_path, monkeypatch, capsys,
                                                             reference_run):
    monkeypatch.setitem(train_cxr._STOP, "signal", None)  # restored afterwards for other tests
    # Act as a CPU where --amp auto means bf16 (AMX): the run's own --amp off must still hold after
    # the resume, whatever this machine is.
    monkeypatch.setattr(train_cxr, "cpu_has_fast_bf16", lambda: True)
    out = tmp_path / "runs"
    run_dir = out / "int"
    real = train_cxr.train_one_epoch
    seen, outer_handler = [], signal.getsignal(signal.SIGINT)

    def ctrl_c_in_epoch_2(st, train, epoch):
        seen.append(epoch)
        if epoch == 2:
            handler = signal.getsignal(signal.SIGINT)
            # Without the tool's handler a real Ctrl-C would kill pytest itself: check first.
            assert callable(handler) and handler is not signal.default_int_handler, handler
            signal.raise_signal(signal.SIGINT)  # os.kill would end pytest itself on Windows
        return real(st, train, epoch)

    monkeypatch.setattr(train_cxr, "train_one_epoch", ctrl_c_in_epoch_2)
    rc = run(_train_args(synth_root, out, "int"))
    stdout = capsys.readouterr().out
    precision = re.findall(r"precision: (\S+)", stdout)
    assert rc == 130, stdout
    assert seen == [1, 2]
    assert f"Resume with: python train_cxr.py --resume {run_dir}" in stdout
    ck = train_cxr.load_checkpoint(run_dir / "last.pt")
    assert ck["epoch"] == 1 and len(ck["history"]) == 1
    assert [r["epoch"] for r in read_csv(run_dir / "history.csv")] == ["1"]
    assert (run_dir / "training_history.png").stat().st_size > 0
    assert not (run_dir / "test_metrics.json").exists()
    assert signal.getsignal(signal.SIGINT) is outer_handler  # the caller's handler is restored

    monkeypatch.setattr(train_cxr, "train_one_epoch", real)
    shutil.rmtree(run_dir / "grad_cam")  # deleted to save space: the resume stopped at its first overlay
    assert run(["--resume", run_dir]) == 0
    resumed = capsys.readouterr().out
    assert (run_dir / "grad_cam" / "summary_epoch_003.png").is_file()
    # The run's own settings (here --amp off) apply after a resume, not this command line's defaults.
    assert re.findall(r"precision: (\S+)", resumed) == precision == ["fp32"], (precision, resumed[:600])
    got, want = read_csv(run_dir / "history.csv"), read_csv(reference_run / "history.csv")
    assert [r["epoch"] for r in got] == ["1", "2", "3"]
    assert list(got[0]) == list(want[0])
    for g, w in zip(got, want):
        for k in g:
            if k != "seconds":
                assert _same(g[k], w[k]), (g["epoch"], k, g[k], w[k])
    assert (run_dir / "test_metrics.json").is_file()


def test_a_run_folder_that_cannot_be_written_is_refused_on_resume_in_one_line(tmp_path, monkeypatch):
    # A run folder copied without write permission, or on a read-only mount: --resume ended with
    # a PermissionError traceback from opening train.log.
    def refused(path):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
    monkeypatch.setattr(train_cxr, "attach_log_file", refused)
    with pytest.raises(train_cxr.CXRError, match=f"^cannot write in the run folder {re.escape(str(tmp_path))} "
                                                  r"\(Permission denied\): make it writable"):
        train_cxr.reopen_run_dir(tmp_path)


@pytest.mark.skipif(sys.platform == "win32",  # there send_signal(SIGTERM) is TerminateProcess
                    reason="Windows has no SIGTERM to send to another process")
def test_sigterm_subprocess_leaves_resumable_run(synth_root, tmp_path):
    out = tmp_path / "runs"
    run_dir = out / "term"
    cmd = [sys.executable, str(ROOT / "train_cxr.py"), *map(str, FAST), "--epochs", "500", "--patience", "500",
           "--data-dir", str(synth_root), "--output-dir", str(out), "--run-name", "term"]
    with open(tmp_path / "stdout.txt", "w") as so, open(tmp_path / "stderr.txt", "w") as se:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=so, stderr=se)
        try:
            deadline = time.monotonic() + 90
            while not (run_dir / "last.pt").exists():
                assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()[-2000:]
                assert time.monotonic() < deadline, "no last.pt after 90 s"
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    stdout = (tmp_path / "stdout.txt").read_text()
    assert rc == 128 + signal.SIGTERM, (rc, stdout[-2000:])  # handled; -15 = killed by the signal
    resume = [line for line in stdout.splitlines() if "Resume with:" in line]
    assert len(resume) == 1, stdout[-2000:]
    assert resume[0].rstrip().endswith(f"python train_cxr.py --resume {run_dir}")
    ck = train_cxr.load_checkpoint(run_dir / "last.pt")
    assert ck["epoch"] >= 1
    assert len(read_csv(run_dir / "history.csv")) == ck["epoch"] == len(ck["history"])


# ----------------------------------------------------------------------------------------------
# Atomic writes
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("exc", [OSError(errno.EIO, "I/O error"), RuntimeError("could not pickle"),
                                 KeyboardInterrupt()], ids=["OSError", "RuntimeError", "KeyboardInterrupt"])
def test_atomic_write_failure_keeps_old_file(tmp_path, exc):
    target = tmp_path / "history.csv"
    old = b"epoch,loss\n1,0.5\n" * 50
    target.write_bytes(old)

    def half_then_die(p):
        with open(p, "wb") as f:
            f.write(b"epoch,loss\n1,0.5\n2,0.")  # half-written new content
        raise exc

    with pytest.raises(train_cxr.CXRError if isinstance(exc, OSError) else type(exc)):  # an OSError: one line
        train_cxr.atomic_write(target, half_then_die)
    assert target.read_bytes() == old
    assert os.listdir(tmp_path) == ["history.csv"]  # no temp file left behind


def _ckpt(epoch: int, n: int = 1000) -> dict:
    return {"format": train_cxr.CKPT_FORMAT, "epoch": epoch, "w": torch.full((n,), float(epoch))}


def test_save_checkpoint_replaces_atomically(tmp_path, monkeypatch):
    target = tmp_path / "last.pt"
    train_cxr.save_checkpoint(target, _ckpt(1))
    old = target.read_bytes()
    real_replace = os.replace
    calls = []

    def checking_replace(src, dst):
        src, dst = Path(src), Path(dst)
        calls.append((src, dst))
        assert dst == target and src != target
        assert src.parent == target.parent  # same file system: the rename is atomic
        assert target.read_bytes() == old  # the target was never written in place
        assert torch.load(src, weights_only=True)["epoch"] == 2  # what is moved in is complete
        return real_replace(src, dst)

    monkeypatch.setattr(train_cxr.os, "replace", checking_replace)
    train_cxr.save_checkpoint(target, _ckpt(2, 50_000))
    assert len(calls) == 1
    assert train_cxr.load_checkpoint(target)["epoch"] == 2
    new = target.read_bytes()

    def crash_before_rename(src, dst):
        raise OSError(errno.EIO, "simulated crash before the rename")

    monkeypatch.setattr(train_cxr.os, "replace", crash_before_rename)
    with pytest.raises((OSError, train_cxr.CXRError)):
        train_cxr.save_checkpoint(target, _ckpt(3))
    assert target.read_bytes() == new
    assert os.listdir(tmp_path) == ["last.pt"]


def test_concurrent_reader_never_sees_torn_checkpoint(tmp_path):
    target = tmp_path / "last.pt"
    train_cxr.save_checkpoint(target, _ckpt(0, 200_000))
    done, seen, errors = threading.Event(), [], []

    def reader():
        while not done.is_set():
            try:
                ck = torch.load(target, weights_only=True)
                assert torch.all(ck["w"] == ck["epoch"])
                seen.append(ck["epoch"])
            except Exception as e:  # a torn or missing file
                errors.append(repr(e))

    t = threading.Thread(target=reader)
    t.start()
    try:
        for epoch in range(1, 21):
            train_cxr.save_checkpoint(target, _ckpt(epoch, 200_000))
    finally:
        done.set()
        t.join()
    assert not errors, errors[:3]
    assert seen and seen == sorted(seen)


# ----------------------------------------------------------------------------------------------
# Safe loading
# ----------------------------------------------------------------------------------------------
class _TouchOnUnpickle:
    """Unpickling this creates a file: stands in for arbitrary code in a malicious checkpoint."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def _evil_checkpoint(path: Path, marker: Path) -> Path:
    torch.save({"format": train_cxr.CKPT_FORMAT, "model": {}, "payload": _TouchOnUnpickle(marker)}, path)
    return path


def test_malicious_checkpoint_is_refused(synth_root, tmp_path, capsys):
    # The payload is live: an unsafe load really runs it.
    proof = tmp_path / "proof_marker"
    torch.load(_evil_checkpoint(tmp_path / "proof.pt", proof), weights_only=False)
    assert proof.exists()

    marker = tmp_path / "marker"
    evil = _evil_checkpoint(tmp_path / "evil.pt", marker)
    with pytest.raises(train_cxr.CXRError) as ei:
        train_cxr.load_checkpoint(evil)
    msg = str(ei.value)
    assert str(evil) in msg
    assert re.search(r"refus|unsafe|not a plain|untrusted", msg, re.I), msg
    assert "\n" not in msg, repr(msg)
    assert "\x1b" not in msg, repr(msg)  # no terminal escape codes (torch's message has bold on/off)
    assert not marker.exists()

    image = sorted((synth_root / "test" / "NORMAL").glob("*.png"))[0]
    out = tmp_path / "runs"
    capsys.readouterr()
    rc = run(["--predict", image, "--checkpoint", evil, "--output-dir", out, "--num-workers", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and str(evil) in err
    assert run(["--resume", evil]) == 2
    assert not marker.exists()
    assert not out.exists()


_PLAIN = (bool, int, float, str, type(None))


def _assert_plain(x, where="ckpt"):
    if isinstance(x, torch.Tensor):
        return
    if type(x) in (dict, OrderedDict):
        for k, v in x.items():
            assert type(k) in (str, int), (where, k)
            _assert_plain(v, f"{where}[{k!r}]")
    elif type(x) in (list, tuple):  # tuples: AdamW's betas
        for i, v in enumerate(x):
            _assert_plain(v, f"{where}[{i}]")
    else:
        assert type(x) in _PLAIN, (where, type(x))


@pytest.mark.parametrize("name", ["last.pt", "best_model.pt"])
def test_genuine_checkpoint_is_plain_data(reference_run, name):
    ck = torch.load(reference_run / name, map_location="cpu", weights_only=True)
    _assert_plain(ck)
    assert ck["format"] == train_cxr.CKPT_FORMAT
    assert type(ck["config"]) is dict
    for k, v in ck["config"].items():
        assert type(k) is str
        assert type(v) in _PLAIN or (type(v) is list and all(type(i) is int for i in v)), (k, v)
    assert ck["class_names"] == ["NORMAL", "PNEUMONIA"]
    assert train_cxr.Config.from_dict(ck["config"]).epochs == 3
    if name == "last.pt":
        assert ck["epoch"] == 3 and {"optimizer", "scheduler", "train_model"} <= set(ck)


# ----------------------------------------------------------------------------------------------
# NaN loss
# ----------------------------------------------------------------------------------------------
def test_nan_loss_stops_with_exit_3(synth_root, tmp_path, monkeypatch, capsys):
    where = {"epoch": 0, "batch": 0}
    real_epoch, real_build = train_cxr.train_one_epoch, train_cxr.build_state

    def track_epoch(st, train, epoch):
        where.update(epoch=epoch, batch=0)
        return real_epoch(st, train, epoch)

    class NaNAtEpoch2Batch3:
        def __init__(self, inner):
            self.inner, self.weight = inner, inner.weight

        def __call__(self, logits, y):
            where["batch"] += 1
            loss = self.inner(logits, y)
            return loss * float("nan") if (where["epoch"], where["batch"]) == (2, 3) else loss

    def build_with_nan(*a, **k):
        st = real_build(*a, **k)
        st.criterion = NaNAtEpoch2Batch3(st.criterion)
        return st

    monkeypatch.setattr(train_cxr, "train_one_epoch", track_epoch)
    monkeypatch.setattr(train_cxr, "build_state", build_with_nan)
    out = tmp_path / "runs"
    rc = run(_train_args(synth_root, out, "nan"))
    stdout = capsys.readouterr().out
    assert rc == 3, stdout
    assert re.search(r"epoch 2\b.*batch 3\b", stdout), stdout
    assert "last.pt keeps the last good epoch (1)" in stdout
    ck = train_cxr.load_checkpoint(out / "nan" / "last.pt")
    assert ck["epoch"] == 1
    for key in ("model", "train_model"):
        for name, t in ck[key].items():
            if t.is_floating_point():
                assert torch.isfinite(t).all(), (key, name)
    assert len(read_csv(out / "nan" / "history.csv")) == 1


def test_weights_that_overflow_under_a_finite_loss_stop_with_exit_3(synth_root, tmp_path, capsys):
    # --lr 1e5 (1e-5 without its minus): batch norm rescales every training batch, so the training loss
    # stays finite while the weights overflow; validation then scored nan and scikit-learn's roc_auc_score
    # ended the run with a traceback ("Input contains NaN") instead of the stop a nan loss gets.
    out = tmp_path / "runs"
    rc = run([*_train_args(synth_root, out, "lr"), "--lr", "1e5"])
    stdout = capsys.readouterr().out
    assert rc == 3, stdout
    assert "stopped: the validation scores became nan or inf" in stdout and "--lr" in stdout
    assert "no epoch finished, so nothing was saved" in stdout and "last.pt" not in stdout  # it stopped in epoch 1
    assert not (out / "lr" / "best_model.pt").exists()


# ----------------------------------------------------------------------------------------------
# Disk full
# ----------------------------------------------------------------------------------------------
def _enospc(path=None):
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), None if path is None else str(path))


def test_disk_full_in_atomic_write(tmp_path):
    target = tmp_path / "config.json"
    target.write_text("{}\n")

    def writer(p):
        with open(p, "w") as f:
            f.write('{"config": ')
        raise _enospc(p)

    with pytest.raises(train_cxr.CXRError) as ei:
        train_cxr.atomic_write(target, writer)
    assert "disk full" in str(ei.value).lower() and str(target) in str(ei.value)
    assert target.read_text() == "{}\n"
    assert os.listdir(tmp_path) == ["config.json"]


@pytest.mark.parametrize("code", [errno.EDQUOT, errno.EROFS, errno.EACCES], ids=["quota", "read-only", "denied"])
def test_other_write_failures_are_one_line_naming_the_file(tmp_path, code):
    # A quota on a shared server (EDQUOT: "disk full" there), a folder or mount made read-only: the run
    # ended with a traceback (and under torchrun rank 1 waited for a rank 0 that had exited).
    target = tmp_path / "best_model.pt"
    target.write_bytes(b"the good one")

    def writer(p):
        Path(p).write_bytes(b"half")
        raise OSError(code, os.strerror(code), str(p))

    with pytest.raises(train_cxr.CXRError, match=f"^cannot write {re.escape(str(target))} \\({os.strerror(code)}\\)"):
        train_cxr.atomic_write(target, writer)
    assert target.read_bytes() == b"the good one" and os.listdir(tmp_path) == ["best_model.pt"]


def test_a_file_held_open_on_windows_is_named_with_the_program_as_the_fix(tmp_path, monkeypatch):
    # Excel locks a CSV it shows, and Windows will not replace a file held open: a user watching history.csv
    # there stopped the run with "make the folder writable", which it was.
    target = tmp_path / "history.csv"
    target.write_text("epoch\n1\n")

    def held(src, dst):
        raise PermissionError(errno.EACCES, "The process cannot access the file because it is being used by "
                              "another process", str(dst))
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setattr(train_cxr.os, "replace", held)
    with pytest.raises(train_cxr.CXRError, match=f"^cannot replace {re.escape(str(target))} .*another program has "
                                                  "it open .*close it there .*--resume"):
        train_cxr.write_csv(target, ["epoch"], [[1], [2]])
    assert target.read_text() == "epoch\n1\n" and os.listdir(tmp_path) == ["history.csv"]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_disk_full_during_save_checkpoint(tmp_path, monkeypatch):
    """torch.save as it behaves on a full disk: the same call, with every write going to /dev/full."""
    real_save = torch.save

    def save_on_full_disk(obj, f, *a, **k):
        if isinstance(f, (str, os.PathLike)):
            Path(f).touch()
            return real_save(obj, "/dev/full", *a, **k)
        with open("/dev/full", "wb") as full:
            return real_save(obj, full, *a, **k)

    target = tmp_path / "last.pt"
    train_cxr.save_checkpoint(target, _ckpt(1))
    monkeypatch.setattr(train_cxr.torch, "save", save_on_full_disk)
    with pytest.raises(train_cxr.CXRError) as ei:
        train_cxr.save_checkpoint(target, _ckpt(2))
    assert "disk full" in str(ei.value).lower() and str(target) in str(ei.value)
    monkeypatch.undo()
    assert train_cxr.load_checkpoint(target)["epoch"] == 1
    assert os.listdir(tmp_path) == ["last.pt"]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_disk_full_while_saving_an_overlay_is_not_a_silent_broken_png(tmp_path):
    # cv2.imwrite does not check its writes: on a full disk it returned True, and the truncated PNG
    # replaced the overlay with no word. The temp file save_image writes is made a link to /dev/full.
    target = tmp_path / "summary.png"
    img = np.full((32, 32, 3), 200, np.uint8)
    train_cxr.save_image(target, img)
    good = target.read_bytes()
    (tmp_path / f".summary.tmp{os.getpid()}.png").symlink_to("/dev/full")
    with pytest.raises(train_cxr.CXRError, match=f"^disk full while writing {re.escape(str(target))}"):
        train_cxr.save_image(target, np.zeros((32, 32, 3), np.uint8))
    assert target.read_bytes() == good and os.listdir(tmp_path) == ["summary.png"]
    assert (cv2.imread(str(target)) == img).all()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_the_demo_data_on_a_full_disk_stops_in_one_line(tmp_path):
    # write_synthetic_dataset (--demo's data) ignored cv2.imwrite's result, which is True on a full disk
    # anyway: the demo went on with truncated images. Its first file's name and temp name lead to /dev/full.
    folder = tmp_path / "train" / "NORMAL"
    folder.mkdir(parents=True)
    for name in ("IM-0001-0001.png", f".IM-0001-0001.tmp{os.getpid()}.png"):
        (folder / name).symlink_to("/dev/full")
    with pytest.raises(train_cxr.CXRError, match="^disk full while writing .*IM-0001-0001.png"):
        train_cxr.write_synthetic_dataset(tmp_path, {"NORMAL": 2}, {}, size=16)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_train_log_on_a_full_disk_is_one_warning_not_a_traceback_a_line(tmp_path, capsys):
    # Every line logged on a full disk came with logging's 10-line "--- Logging error ---" traceback.
    (tmp_path / "train.log").symlink_to("/dev/full")
    try:
        train_cxr.setup_console_logging()
        train_cxr.attach_log_file(tmp_path / "train.log")
        for epoch in (1, 2, 3):
            train_cxr.log.info(f"epoch {epoch}")
    finally:
        train_cxr.setup_console_logging()
    out, err = capsys.readouterr()
    assert out == "epoch 1\nepoch 2\nepoch 3\n"  # the console still has every line
    assert err == (f"warning: cannot write {tmp_path / 'train.log'} (No space left on device): its lines from here "
                   "on are on the console only\n")



def test_train_log_gone_to_null_takes_any_name_where_text_defaults_to_another_encoding(tmp_path, monkeypatch,
                                                                                       capsys):
    # After a full disk its lines go to os.devnull, opened in Windows' ANSI code page: a name outside it (a run
    # under C:\Users\Иван) printed logging's "--- Logging error ---" traceback with every such line.
    real_open = open
    monkeypatch.setattr(train_cxr, "open", lambda *a, **k: real_open(*a, **{"encoding": "cp1252", **k}),
                        raising=False)
    handler = train_cxr.LogFileHandler(tmp_path / "train.log", encoding="utf-8")
    line = lambda text: logging.LogRecord("train_cxr", logging.INFO, __file__, 1, text, None, None)
    try:
        raise OSError(errno.ENOSPC, "No space left on device")
    except OSError:
        handler.handleError(line("epoch 1"))  # as logging calls it when a write fails
    handler.handle(line("run folder: C:\\Users\\Иван\\runs\\1"))
    handler.close()
    err = capsys.readouterr().err
    assert "cannot write" in err and "Logging error" not in err, err

def test_a_checkpoint_is_on_the_disk_before_it_replaces_the_old_one(tmp_path, monkeypatch):
    # Renamed over the good best_model.pt with its bytes still in the page cache: a power cut could
    # leave an empty file in its place. The data must be synced before the rename.
    calls, real_fsync, real_replace = [], os.fsync, os.replace
    monkeypatch.setattr(sys, "platform", "linux")  # macOS's own sync: the next test
    monkeypatch.setattr(train_cxr.os, "fsync", lambda fd: (calls.append(("fsync", os.fstat(fd).st_size)),
                                                          real_fsync(fd)))
    monkeypatch.setattr(train_cxr.os, "replace", lambda a, b: (calls.append(("replace", Path(b).name)),
                                                              real_replace(a, b)))
    target = tmp_path / "best_model.pt"
    train_cxr.save_checkpoint(target, _ckpt(1))
    assert [c[0] for c in calls] == ["fsync", "replace"] and calls[0][1] == target.stat().st_size
    assert train_cxr.load_checkpoint(target)["epoch"] == 1



def test_on_macos_a_checkpoint_reaches_the_disk_itself_not_only_its_cache(tmp_path, monkeypatch):
    # macOS's fsync leaves the data in the drive's write cache (Apple's fsync(2)): the sync above did not
    # keep a power cut from leaving a best_model.pt of zeros there. F_FULLFSYNC does; fsync where it is refused.
    calls, real_fsync = [], os.fsync
    fcntl = types.SimpleNamespace(F_FULLFSYNC=51, fcntl=lambda fd, op: calls.append(("fcntl", op)))
    monkeypatch.setitem(sys.modules, "fcntl", fcntl)
    monkeypatch.setattr(train_cxr.os, "fsync", lambda fd: (calls.append(("fsync",)), real_fsync(fd)))
    monkeypatch.setattr(sys, "platform", "darwin")
    train_cxr.save_checkpoint(tmp_path / "best_model.pt", _ckpt(1))
    assert calls == [("fcntl", 51)]

    def refused(fd, op):
        raise OSError(errno.ENOTSUP, "Operation not supported")
    calls.clear()
    fcntl.fcntl = refused  # an exFAT USB drive, a network share
    train_cxr.save_checkpoint(tmp_path / "best_model.pt", _ckpt(2))
    assert calls == [("fsync",)] and train_cxr.load_checkpoint(tmp_path / "best_model.pt")["epoch"] == 2

def test_disk_full_end_to_end_exit_2(synth_root, tmp_path, monkeypatch, capsys):
    out = tmp_path / "runs"
    real_write_text = Path.write_text

    def write_text(self, *a, **k):
        if out in Path(self).parents:
            raise _enospc(self)
        return real_write_text(self, *a, **k)

    monkeypatch.setattr(pathlib.Path, "write_text", write_text)
    rc = run(_train_args(synth_root, out, "full", epochs=1))
    err = capsys.readouterr().err
    assert rc == 2
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "disk full" in lines[0].lower() and str(out / "full") in lines[0], err


def test_16_bit_images_are_min_max_scaled_and_transparency_is_black(tmp_path):
    # A 16-bit PNG that uses 1000-2000 of its range fills 0-255 (scaled by its own min and max, not
    # by its max); a transparent pixel is film background, black, whatever colour it stores.
    Image.fromarray(np.linspace(1000, 2000, 64 * 64).reshape(64, 64).astype(np.uint16)).save(tmp_path / "g16.png")
    out = train_cxr.decode_xray(str(tmp_path / "g16.png"), 64)
    assert out.min() == 0 and out.max() == 255
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., :3] = 180
    rgba[:, 32:, 3] = 255  # the left half transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = train_cxr.decode_xray(str(tmp_path / "a.png"), 64)
    assert out[:, :31].max() == 0 and abs(float(out[:, 33:].mean()) - 180) <= 1

    # 16 bits a colour channel (PNG, TIFF): PIL kept the high byte, so this 1000-2000 ramp came out 3-7.
    g16 = np.linspace(1000, 2000, 64 * 64).reshape(64, 64).astype(np.uint16)
    gray = train_cxr.decode_xray(str(tmp_path / "g16.png"), 64)
    for name in ("c16.png", "c16.tif"):
        assert cv2.imwrite(str(tmp_path / name), np.dstack([g16] * 3))
        assert np.abs(train_cxr.decode_xray(str(tmp_path / name), 64).astype(int) - gray).max() <= 1, name
    rgba16 = np.dstack([g16] * 3 + [np.full_like(g16, 65535)])
    rgba16[:, :32, 3] = 0  # the left half transparent: black
    assert cv2.imwrite(str(tmp_path / "a16.png"), rgba16)
    out = train_cxr.decode_xray(str(tmp_path / "a16.png"), 64)
    assert out[:, :31].max() == 0 and out[:, 33:].max() == 255
