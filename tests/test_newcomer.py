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
