"""A newcomer's first hour (issue 16): flags, messages, pictures and the demo explain themselves."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

import train_cxr
from conftest import ROOT, TINY, run

FAST = [*TINY, "--num-threads", "1"]


def _train(data, out, name, *extra):
    return FAST + ["--epochs", "2", "--data-dir", data, "--output-dir", out, "--run-name", name, *extra]


# ----------------------------------------------------------------------------------------------
# Interruption before any epoch finished
# ----------------------------------------------------------------------------------------------
def test_ctrl_c_in_epoch_1_does_not_advise_resume(synth_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(train_cxr._STOP, "signal", None)
    real = train_cxr.train_one_epoch

    def ctrl_c(st, train, epoch):
        os.kill(os.getpid(), signal.SIGINT)  # the tool's handler only sets a flag
        return real(st, train, epoch)

    monkeypatch.setattr(train_cxr, "train_one_epoch", ctrl_c)
    assert run(_train(synth_root, tmp_path / "runs", "early")) == 130
    out = capsys.readouterr().out
    assert not (tmp_path / "runs" / "early" / "last.pt").exists()
    assert "--resume" not in out
    assert "nothing to resume" in out and "Start again" in out


# ----------------------------------------------------------------------------------------------
# Flags: fast, one-line errors, no abbreviations, underscore spelling, grouped help
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [["--help"], ["--epohcs", "1"], ["--epochs", "two"], ["--img-size", "8"]])
def test_command_line_is_checked_before_torch_is_imported(argv):
    wrapper = ("import runpy, sys\n"
               f"sys.argv = ['train_cxr.py', *{argv!r}]\n"
               "try:\n    runpy.run_path('train_cxr.py', run_name='__main__')\n"
               "except SystemExit as e:\n    code = e.code\n"
               "print('EXIT', code, 'TORCH', 'torch' in sys.modules, 'CV2', 'cv2' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", wrapper], cwd=ROOT, capture_output=True, text=True, timeout=60)
    last = r.stdout.strip().splitlines()[-1]
    assert last.endswith("TORCH False CV2 False"), (last, r.stderr)
    assert last.startswith("EXIT 0" if argv == ["--help"] else "EXIT 2"), last


@pytest.mark.parametrize("argv,words", [
    (["--epohcs", "1"], ["--epohcs", "did you mean --epochs?"]),
    (["--epoch", "1"], ["--epoch", "did you mean --epochs?"]),          # no silent abbreviation
    (["--epochs", "two"], ["--epochs", "invalid int value: 'two'"]),
    (["--img-sise", "64"], ["did you mean --img-size?"])])
def test_flag_errors_are_one_line_with_a_suggestion(argv, words, capsys):
    with pytest.raises(SystemExit) as e:
        train_cxr.parse_config(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "usage" not in err, err
    for w in words:
        assert w in err, err


def test_underscore_spelling_is_accepted():
    cfg, args = train_cxr.parse_config(["--img_size", "48", "--num_gradcam_images=2", "--no-tta"])
    assert cfg.img_size == 48 and cfg.num_gradcam_images == 2 and cfg.tta is False
    assert args.given == {"img_size", "num_gradcam_images", "tta"}


def test_demo_settings_without_a_second_parse(monkeypatch):
    calls = []
    real = train_cxr._Parser.parse_args
    monkeypatch.setattr(train_cxr._Parser, "parse_args", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    cfg, args = train_cxr.parse_config(["--demo", "--epochs", "3"])
    assert len(calls) == 1
    assert cfg.epochs == 3 and cfg.img_size == train_cxr.DEMO_OVERRIDES["img_size"]
    assert args.given == {"epochs"}


def test_config_comes_from_the_constants_without_reading_the_source(monkeypatch):
    monkeypatch.setattr(Path, "read_text", lambda *a, **k: pytest.fail("the script read a file"))
    fields = [f.name for f in train_cxr.dataclasses.fields(train_cxr.Config)]
    table = [c for group in train_cxr.FLAGS.values() for c, _ in group]
    assert fields == [c.lower() for c in table]
    assert all(getattr(train_cxr.Config(), c.lower()) == getattr(train_cxr, c) for c in table)
    assert "--img-size" in train_cxr.build_parser().format_help()


def test_help_is_grouped_modes_first_without_odd_defaults():
    text = train_cxr.build_parser().format_help()
    assert "(default: )" not in text and "(default: (" not in text and "(default: None)" not in text
    assert "16,32,64,128)" in text
    order = [text.index(h) for h in ("modes", "--demo", "common flags", "--data-dir DATA_DIR", "--epochs", "I/O", "data:",
                                     "augmentation", "model:", "optimisation:", "evaluation", "system:")]
    assert order == sorted(order), order
    assert len(text.split("\n\n")[0].splitlines()) <= 2  # a short usage line, not every flag


# ----------------------------------------------------------------------------------------------
# Data: duplicates across splits, train-only data, messages that name the fix
# ----------------------------------------------------------------------------------------------
def test_duplicates_across_splits_are_counted(data_copy, tmp_path, capsys):
    train_files = sorted((data_copy / "train" / "NORMAL").glob("*.png"))[:5]
    for k, f in enumerate(train_files):  # a test folder that reuses training images under new names
        (data_copy / "test" / "NORMAL" / f"copy_{k}.png").write_bytes(f.read_bytes())
    assert run(_train(data_copy, tmp_path / "runs", "dups", "--epochs", "1", "--num-gradcam-images", "0")) == 0
    out = capsys.readouterr().out
    line = [x for x in out.splitlines() if "byte-identical" in x]
    assert len(line) == 1 and line[0].startswith("warning: 5 file(s)"), out[-1500:]
    assert str(train_files[0]) in line[0] or "copy_" in line[0]


def test_no_duplicate_warning_for_distinct_files(synth_root, tmp_path, capsys):
    n = train_cxr.warn_duplicates({"train": sorted(map(str, (synth_root / "train").rglob("*.png"))),
                                   "test": sorted(map(str, (synth_root / "test").rglob("*.png")))})
    assert n == 0 and "byte-identical" not in capsys.readouterr().out


def test_train_only_data_trains_and_skips_the_test_report(data_copy, tmp_path, capsys):
    import shutil
    shutil.rmtree(data_copy / "test")
    run_dir = tmp_path / "runs" / "notest"
    assert run(_train(data_copy, tmp_path / "runs", "notest", "--epochs", "1")) == 0
    out = capsys.readouterr().out.splitlines()
    start = [x for x in out if x.startswith("train: ")][0]
    assert "test: none" in start and "test report is skipped" in start
    assert "no test folder, so no test report" in out[-2] or any("no test folder" in x for x in out[-3:])
    assert (run_dir / "best_model.pt").is_file() and not (run_dir / "test_metrics.json").exists()
    assert train_cxr.load_checkpoint(run_dir / "best_model.pt")["threshold"] is not None


def test_data_dir_pointing_at_train_suggests_the_parent(synth_root, tmp_path, capsys):
    assert run(_train(synth_root / "train", tmp_path / "runs", "x")) == 2
    err = capsys.readouterr().err.strip()
    assert f"--data-dir {synth_root}" in err and len(err.splitlines()) == 1, err


def test_output_dir_that_is_a_file(synth_root, tmp_path, capsys):
    f = tmp_path / "runs.txt"
    f.write_text("notes")
    assert run(_train(synth_root, f, "x")) == 2
    err = capsys.readouterr().err.strip()
    assert f"{f} is a file, not a folder" in err, err
    assert f.read_text() == "notes"


def test_evaluate_on_train_only_folder_says_the_layout(synth_root, tmp_path, capsys):
    trained = tmp_path / "runs" / "m"
    assert run(_train(synth_root, tmp_path / "runs", "m", "--epochs", "1", "--num-gradcam-images", "0")) == 0
    only_train = tmp_path / "only_train"
    only_train.mkdir()
    (only_train / "train").symlink_to(synth_root / "train")
    capsys.readouterr()
    rc = run(["--evaluate", "--checkpoint", trained / "best_model.pt", "--data-dir", only_train,
              "--output-dir", tmp_path / "runs", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "test/<CLASS>/" in err and "only class folder" not in err, err
