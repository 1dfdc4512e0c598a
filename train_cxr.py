"""Train and explain a chest X-ray classifier from scratch, in one readable file.

Run it:
    python train_cxr.py --demo                          # synthetic data, about a minute on 2 CPU cores
    python train_cxr.py --data-dir path/to/chest_xray   # DATA_DIR/train/<CLASS>/*, DATA_DIR/test/<CLASS>/*
    python train_cxr.py --help                          # every constant below, DATA_DIR..STRICT, is a flag
    python train_cxr.py --predict scans/ --checkpoint runs/RUN/best_model.pt
    python train_cxr.py --evaluate --checkpoint runs/RUN/best_model.pt --data-dir D
    python train_cxr.py --resume runs/RUN               # after Ctrl-C or a kill
    torchrun --nproc_per_node=2 train_cxr.py ...        # DistributedDataParallel

Every run writes one folder, OUTPUT_DIR/<run-name>/ (never overwritten):
    config.json, train.log, history.csv, training_history.png, best_model.pt, last.pt,
    grad_cam/ (per-epoch overlays + summaries, test gallery), test_metrics.json, test_predictions.csv,
    roc_curve.png, confusion_matrix.png, reliability.png, and report.html: all of it on one page.
DICOM files (.dcm, .dicom) are read like images, through pydicom (read_dicom).

The validation split is carved from train, grouped by patient; the test folder only
produces the final report and never chooses a checkpoint, a threshold or a schedule.

Measured (README.md has the rest): the default recipe (112 px) on the 5,216-image Kermany
training split takes 5.4 min end to end on 2 CPU cores without AMX (Xeon, fp32); over 3
patient-grouped folds it reaches AUC 0.9943 with a calibration error of 0.014 (same Xeon);
--demo takes 22-23 s there.
"""
from __future__ import annotations

# Only the standard library is imported before the command line is checked: `import torch` alone
# takes ~3 s, and --help or a mistyped flag should answer at once. The heavy imports follow the
# "Command line" section (a trap for anyone tidying the imports back to the top).
import argparse
import collections
import contextlib
import copy
import csv
import ctypes
import dataclasses
import datetime as _dt
import difflib
import errno
import functools
import hashlib
import html
import json
import logging
import logging.handlers
import math
import os
import platform
import re
import shlex
import shutil
import signal
import sys
import time
import unicodedata
import urllib.parse
import warnings
from pathlib import Path

_STARTED = time.perf_counter()  # process start, for the "start-up" phase of the time breakdown

# ----------------------------------------------------------------------------------------------
# Config: edit these, or pass the matching flag (--data-dir, --img-size, ...)
# ----------------------------------------------------------------------------------------------
# I/O
DATA_DIR = "data/chest_xray"      # holds train/<CLASS>/, optionally test/<CLASS>/ and val/<CLASS>/
OUTPUT_DIR = "runs"               # each run gets its own sub-folder here
RUN_NAME = ""                     # run folder name; "" = a timestamp
# data
# 112 rather than 128 since issue 15: the default run on 2 CPU cores without AMX (fp32) takes
# 5.4 minutes instead of 7.1 (without a test folder), and the 3-fold CV scored no lower (README).
IMG_SIZE = 112                    # network input, pixels a side
WORK_SCALE = 1.143                # images are decoded once at IMG_SIZE*WORK_SCALE (256 for 224)
VAL_FRACTION = 0.15               # share of train (per class, grouped by patient) used for validation
MIN_VAL_PER_CLASS = 50            # DATA_DIR/val is used only if every class has at least this many
NORMALIZE = "image"               # "image": per-image standardisation; "dataset": train mean/std
PATIENT_REGEX = ""                # 1st group: the patient id in the path below the class folder; "" = Kermany
POSITIVE_CLASS = ""               # the class whose sensitivity is reported; "" = PNEUMONIA if present
NUM_WORKERS = -1                  # processes that decode images (once); -1 = one per core (macOS, Windows: 2), 0 = none
# augmentation (training only; done on whole batches, on the training device)
AUG_SCALE_MIN = 0.60              # random resized crop keeps 60-100% of the image area
AUG_ROTATE_DEG = 10.0             # +- degrees
AUG_SHIFT = 0.06                  # extra translation beyond the crop's room, in half-widths (0.06: 3%)
AUG_HFLIP = True                  # horizontal flip with p=0.5
AUG_BRIGHTNESS = 0.25             # pixel * U(1-b, 1+b)
AUG_CONTRAST = 0.25               # (pixel - mean) * U(1-c, 1+c) + mean
# With NORMALIZE "image" the per-image standardisation undoes brightness and contrast except where
# they clip at black or white; gamma, which is not linear, it does not undo.
AUG_GAMMA = 0.30                  # pixel ** exp(U(-g, g)): exposure differences between sites
# With probability p, everything outside LUNG_BOX is set to the image's mean gray, so the network
# must find pneumonia in the lungs: Kermany's films let the rest (shoulders, abdomen, positioning)
# separate the classes on its own. p=0.5 on the 3 CV folds: AUC 0.9952 / 0.9942 / 0.9939 (default
# 0.9945 / 0.9939 / 0.9934); with the lung box blanked 0.819 / 0.870 / 0.813 (default 0.897 / 0.893
# / 0.899); lung box alone 0.991 / 0.991 / 0.990 (0.969 / 0.982 / 0.975); benchmarks/lung_focus.py.
# Off by default: over 5 seeds Grad-CAM's lung-box share was 0.55-0.70 (one below uniform), and on
# the demo it moved the heat off the known lesions for one seed of two (README, what it measured).
AUG_BLANK_OUTSIDE_LUNGS = 0.0     # probability of blanking everything outside LUNG_BOX
# model
# Half the usual 32-64-128-256: on a CPU the batch norm, ReLU and pooling of the first block's
# full-size maps dominate a step, and halving the widths trains 2.3x faster with the same
# cross-validated AUC (docs/results.md).
CHANNELS = (16, 32, 64, 128)      # output channels of the four conv blocks (flag: 16,32,64,128)
FC_HIDDEN = 256                   # width of the hidden fully connected layer
DROPOUT = 0.4                     # before each fully connected layer
# optimisation
EPOCHS = 20                       # passes over the training split; the cosine schedule ends here
BATCH_SIZE = 64                   # per process
LR = 2e-3                         # peak learning rate (AdamW), reached after WARMUP_EPOCHS
WARMUP_EPOCHS = 1.0               # linear warm-up, then cosine decay to 0 at EPOCHS
WEIGHT_DECAY = 5e-4
LABEL_SMOOTHING = 0.1
EMA_DECAY = 0.998                 # exponential moving average of weights; 0 = off
PATIENCE = 6                      # early stop after this many epochs without a better val AUC
# evaluation and explanations
TTA = True                        # average the prediction of the image and its mirror image
NUM_GRADCAM_IMAGES = 8            # fixed validation images explained after every epoch
SAVE_CAM_ARRAYS = False           # also save each Grad-CAM map as .npy (over the central crop, as the overlay)
BOOTSTRAP = 1000                  # resamples for the test AUC confidence interval
THRESHOLD_POLICY = "balanced"     # balanced | accuracy | youden | sensitivity:0.95 (README, Operating point)
OOD_QUANTILE = 0.99               # share of held-out training images the out-of-distribution guard passes
# system
SEED = 42                         # split, initialisation, augmentation and shuffling all derive from it
DEVICE = "auto"                   # auto | cpu | cuda
AMP = "auto"                      # auto | on | off: bf16 autocast (auto = CUDA, or a CPU with AMX)
DETERMINISTIC = False             # CUDA: no cuDNN autotuning or TF32, deterministic kernels (slower)
NUM_THREADS = 0                   # torch CPU threads; 0 = torch's default (one per core)
STRICT = False                    # unreadable images stop the run instead of being skipped

# No flag for the constants from here on: edit them here.
# The demo's small settings: applied by --demo unless the flag is given explicitly.
DEMO_OVERRIDES = dict(img_size=64, epochs=12, batch_size=32, fc_hidden=128, lr=1e-3, patience=12,
                      val_fraction=0.2, ema_decay=0.99, bootstrap=200, warmup_epochs=0.5)
DEMO_COUNTS = ({"NORMAL": 400, "PNEUMONIA": 700}, {"NORMAL": 100, "PNEUMONIA": 150})  # train, test
DICOM_EXTENSIONS = (".dcm", ".dicom")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".pgm", *DICOM_EXTENSIONS)
DICOM_MODALITIES = ("CR", "DX", "RG")  # DICOM modalities read as X-rays: computed, digital, film radiography
DICOM_PERCENTILES = (0.5, 99.5)        # display window of a DICOM that has no VOI LUT and no window
LUNG_BOX = (0.12, 0.88, 0.10, 0.90)  # x0, x1, y0, y1 as fractions: where lungs sit in a PA film
EDIT_ONLY_STORED = ("DICOM_PERCENTILES", "LUNG_BOX")  # kept in each checkpoint: a model is used as it was made
CKPT_FORMAT = "train_cxr/1"

log = logging.getLogger("train_cxr")
# A file name that is not UTF-8 (a Latin-1 archive unpacked on Linux) is logged with \xe9 escapes: raw, the
# console and train.log writers raised "Logging error" and the warning that named the file was lost.
def _escape_names(record: logging.LogRecord) -> bool:
    record.msg, record.args = as_text(record.getMessage()), None
    return True


log.addFilter(_escape_names)


class CXRError(Exception):
    """A problem with the user's input: printed as one line, exit code 2, no traceback."""


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived during training."""


# ----------------------------------------------------------------------------------------------
# Command line: every constant from DATA_DIR to STRICT is a flag (DATA_DIR -> --data-dir), grouped as in --help
# ----------------------------------------------------------------------------------------------
# (constant, help) per --help group: the one table that turns constants into flags and Config fields.
FLAGS = {
    "common flags": [
        ("DATA_DIR", "folder holding train/<CLASS>/*, optionally test/<CLASS>/* and val/<CLASS>/*"),
        ("OUTPUT_DIR", "each run gets its own sub-folder here"),
        ("RUN_NAME", "run folder name inside --output-dir, exp1 or exp/1 (default: a timestamp)"),
        ("EPOCHS", "passes over the training split; the cosine schedule ends here"),
        ("IMG_SIZE", "network input, pixels a side"),
        ("BATCH_SIZE", "images per step (per process)"),
        ("DEVICE", "where to train"),
        ("NUM_THREADS", "torch CPU threads; 0 = one per core")],
    "I/O": [
        ("NUM_WORKERS", "processes that decode images (once, before training); -1 = one per usable core (2 on "
                        "macOS and Windows, where each imports torch again; one per 64 files at most), 0 = decode "
                        "in this process")],
    "data": [
        ("WORK_SCALE", "images are decoded once at IMG_SIZE*WORK_SCALE pixels"),
        ("VAL_FRACTION", "share of train (per class, grouped by patient) used for validation"),
        ("MIN_VAL_PER_CLASS", "DATA_DIR/val is used only if every class has at least this many; a smaller val/ "
                              "joins train, and validation is carved from it"),
        ("NORMALIZE", "image: per-image standardisation; dataset: train mean/std"),
        ("PATIENT_REGEX", "its first group is the patient id, searched in the path below the class folder "
                          "(patient7/img0.png; wins over a DICOM PatientID; default: Kermany file names)"),
        ("POSITIVE_CLASS", "the class whose sensitivity is reported (default: PNEUMONIA if present; two "
                           "classes only)"),
        ("STRICT", "unreadable images stop the run instead of being skipped")],
    "augmentation (training only)": [
        ("AUG_SCALE_MIN", "random resized crop keeps this share of the area, or more"),
        ("AUG_ROTATE_DEG", "random rotation, +- degrees"),
        ("AUG_SHIFT", "extra translation beyond the crop's own room, in half-widths of the image "
                      "(affine_grid's -1..1 units: 0.06 moves it up to 3% of its width)"),
        ("AUG_HFLIP", "horizontal flip with p=0.5"),
        ("AUG_BRIGHTNESS", "pixel * U(1-b, 1+b); --normalize image undoes it except where it clips"),
        ("AUG_CONTRAST", "(pixel - mean) * U(1-c, 1+c) + mean; --normalize image undoes it except where it clips"),
        ("AUG_GAMMA", "pixel ** exp(U(-g, g))"),
        ("AUG_BLANK_OUTSIDE_LUNGS", "probability of setting everything outside LUNG_BOX to mean gray")],
    "model": [
        ("CHANNELS", "output channels of the four conv blocks"),
        ("FC_HIDDEN", "width of the hidden fully connected layer"),
        ("DROPOUT", "before each fully connected layer")],
    "optimisation": [
        ("LR", "peak learning rate (AdamW)"),
        ("WARMUP_EPOCHS", "linear warm-up, then cosine decay to 0"),
        ("WEIGHT_DECAY", "AdamW weight decay (not on biases and batch norm)"),
        ("LABEL_SMOOTHING", "cross-entropy label smoothing"),
        ("EMA_DECAY", "moving average of the weights; 0 = off"),
        ("PATIENCE", "early stop after this many epochs without a better validation AUC")],
    "evaluation and explanations": [
        ("TTA", "average the prediction of the image and its mirror image"),
        ("NUM_GRADCAM_IMAGES", "fixed validation images explained after every epoch"),
        ("SAVE_CAM_ARRAYS", "also save each Grad-CAM map as .npy: IMG_SIZE square, scaled 0-1 like the overlay, "
         "over the overlay's left panel (the file squashed square, its central crop), not the original pixels"),
        ("BOOTSTRAP", "resamples for the test AUC confidence interval"),
        ("THRESHOLD_POLICY", "how the decision threshold is chosen on validation: balanced, accuracy, youden "
                             "or sensitivity:X (README, Operating point)"),
        ("OOD_QUANTILE", "share of held-out training images the out-of-distribution guard passes")],
    "system": [
        ("SEED", "split, initialisation, augmentation and shuffling all derive from it"),
        ("AMP", "bf16 autocast: auto = on for CUDA or a CPU with AMX"),
        ("DETERMINISTIC", "CUDA: no cuDNN autotuning or TF32, deterministic kernels (slower)")],
}
CHOICES = {"normalize": ("image", "dataset"), "device": ("auto", "cpu", "cuda"), "amp": ("auto", "on", "off")}
TEXT_FLAGS = ("data_dir", "output_dir", "run_name", "normalize", "patient_regex", "positive_class",
              "threshold_policy", "device", "amp")  # the constants written in quotes; every other is a number or bool


# CHANNELS edited as a list, [16, 32, 64, 128], means the same: as a list, making Config below stopped every
# command with a dataclass traceback ("mutable default").
CHANNELS = tuple(CHANNELS)

# The settings added to Config after the first checkpoint format, each with the value that does what a run made
# before it did (Youden's J was the threshold; no guard, blanking or --deterministic; Kermany patient names; the
# PNEUMONIA rule). A checkpoint without one was made so: filling it from the constant, as edited today, made a
# resume of such a run blank lungs or pick its threshold the new way, unsaid.
ABSENT_MEANS = {"threshold_policy": "youden", "ood_quantile": 0.99, "patient_regex": "", "positive_class": "",
                "deterministic": False, "aug_blank_outside_lungs": 0.0}


def _config_from_dict(cls, d: dict):
    """Config of stored settings (a checkpoint's, config.json's): lists back to tuples, unknown keys (a newer
    or older version's) ignored, a setting it predates as ABSENT_MEANS says, never from today's constants."""
    lost = sorted(set(cls.__dataclass_fields__) - set(d) - set(ABSENT_MEANS))
    if lost:  # every checkpoint since the first holds these: guessing them would mislabel the model
        raise CXRError(f"the stored settings lack {', '.join(lost)}, which every checkpoint of train_cxr.py holds: "
                       "they were edited or made by another program; use the run's own best_model.pt or last.pt")
    d = {**ABSENT_MEANS, **d}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in cls.__dataclass_fields__})


def absent_settings(d: dict, skip=()) -> str:
    """'--x 0.0, --y youden' for the settings of ABSENT_MEANS that stored settings d predate, less those in skip
    (typed now): what Config.from_dict assumed, for a one-line note; '' when it predates none."""
    def said(k, v):  # as typed: --no-deterministic, --patient-regex ''
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            return flag if v else "--no-" + flag[2:]
        return f"{flag} {v}" if v != "" else f"{flag} ''"
    return ", ".join(said(k, v) for k, v in ABSENT_MEANS.items() if k not in d and k not in skip)


# The resolved settings of a run: one field per constant in FLAGS (IMG_SIZE -> cfg.img_size),
# defaulting to the constant's value. Saved in config.json and in every checkpoint, with the
# tuple CHANNELS as a list (JSON has no tuple); from_dict turns it back (_config_from_dict).
Config = dataclasses.make_dataclass(
    "Config", [(name.lower(), type(globals()[name]), globals()[name]) for group in FLAGS.values() for name, _ in group],
    namespace={"work_size": property(lambda c: max(c.img_size, int(round(c.img_size * c.work_scale)))),
               "to_dict": lambda c: {k: list(v) if isinstance(v, tuple) else v
                                     for k, v in dataclasses.asdict(c).items()},
               "from_dict": classmethod(_config_from_dict)})


def _int_tuple(text: str) -> tuple:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if len(values) != 4 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected 4 positive integers like 32,64,128,256, got {text!r}")
    return values


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # One line instead of the whole usage; a mistyped flag gets the nearest real one.
        m = re.match(r"unrecognized arguments: (\S+)", message)
        typed = m.group(1).split("=")[0] if m else ""
        # An abbreviation (--out) means a flag it starts, even where another is nearer by letters (--dropout).
        started = [o for o in self._option_string_actions if o.startswith(typed)] if typed.startswith("--") else []
        close = difflib.get_close_matches(typed, started or self._option_string_actions, n=1,
                                          cutoff=0.0 if started else 0.6) if m else []
        hint = f"; did you mean {close[0]}?" if close else ""
        # A flag's type is its constant's: EMA_DECAY edited to 0 (not 0.0) makes --ema-decay 0.99 an error.
        m = re.match(r"argument --([\w-]+): invalid int value: '([-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?)'$", message)
        const = m and m.group(1).upper().replace("-", "_")
        if m and const.lower() in Config.__dataclass_fields__:
            hint = (f"; a flag takes its constant's type, and {const} at the top of train_cxr.py is the whole "
                    f"number {globals()[const]} (a constant that holds fractions is written with a point: 0.0, not 0)")
        self.exit(2, f"error: {message}{hint} (python train_cxr.py --help lists every flag)\n")


def build_parser() -> argparse.ArgumentParser:
    # Config flags default to SUPPRESS, so the parsed namespace holds exactly the flags typed:
    # parse_config fills in the constants (or --demo's values) for the rest.
    p = _Parser(usage="python train_cxr.py [MODE] [FLAGS]   (python train_cxr.py --help lists them)",
                description="Train and explain a chest X-ray classifier. Every flag below is a constant "
                            "at the top of train_cxr.py (--img-size is IMG_SIZE); edit either.",
                epilog="Expected time of the default run on the 5,216-image Kermany training split (measured, README "
                       "'How long it takes'): ~45 s on one GPU; ~5 min on 2 CPU cores with AMX (bf16); 5-8 min "
                       "on 2 CPU cores without AMX (fp32: most laptops and cloud CPUs). --demo: 20 s to 1 min.",
                add_help=False, allow_abbrev=False, argument_default=argparse.SUPPRESS)
    modes = p.add_argument_group("modes (default: train on --data-dir)")
    modes.add_argument("-h", "--help", action="help", help="show this help and exit")
    # The defaults below are not the demo's: its own are listed, as DEMO_OVERRIDES holds them.
    demo = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in DEMO_OVERRIDES.items())
    modes.add_argument("--demo", action="store_true", default=False,
                       help=f"generate synthetic X-rays and run everything with small settings: {demo} (a typed "
                            "flag wins)")
    modes.add_argument("--predict", nargs="+", metavar="PATH", default=None,
                       help="files or folders to classify; marks the byte-identical copies of the model's "
                            "training images")
    modes.add_argument("--evaluate", action="store_true", default=False,
                       help="test report of --checkpoint on --data-dir; counts the folder's byte-identical "
                            "copies of the model's training images")
    modes.add_argument("--recalibrate", metavar="DIR", default=None,
                       help="refit calibration, threshold and the guard's cutoff of --checkpoint on a labelled "
                            "folder from a new site (DIR/<CLASS>/*); weights unchanged")
    modes.add_argument("--checkpoint", default=None, help="the model for --predict, --evaluate and --recalibrate: "
                       "a run folder (its best_model.pt; a --recalibrate folder: its recalibrated_model.pt) "
                       "or a .pt file")
    modes.add_argument("--resume", metavar="RUN", default=None, help="continue an interrupted run (its folder) with "
                       "its own settings and learning-rate schedule (a typed flag that differs is refused)")
    for title, entries in FLAGS.items():
        group = p.add_argument_group(title)
        for const, text in entries:
            name, default = const.lower(), globals()[const]
            shown = (("on" if default else "off") if isinstance(default, bool) else
                     ",".join(map(str, default)) if isinstance(default, tuple) else default)
            # A text that says what "" means ("default: a timestamp") gives the edited constant's value instead.
            if shown != "":
                text = (re.sub(r"default: [^;)]*", lambda m: f"default: {shown}", text) if "default:" in text
                        else f"{text} (default: {shown})")
            kw = (dict(action=argparse.BooleanOptionalAction) if isinstance(default, bool) else
                  dict(type=_int_tuple, metavar="A,B,C,D") if isinstance(default, tuple) else
                  dict(type=type(default), choices=CHOICES.get(name)))
            help_ = text.replace("%", "%%")  # argparse formats help with %
            group.add_argument("--" + name.replace("_", "-"), dest=name, help=help_, **kw)
    return p


def parse_config(argv=None) -> tuple:
    """(Config, argparse namespace); args.given is the set of Config fields typed on the command line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    for i, arg in enumerate(argv):  # --img_size is the natural spelling next to IMG_SIZE: accept it
        flag, eq, value = arg.partition("=")
        dashed = "--" + flag[2:].replace("_", "-")
        if flag.startswith("--") and dashed in parser._option_string_actions:
            argv[i] = dashed + eq + value
    args = parser.parse_args(argv)
    args.given = {f.name for f in dataclasses.fields(Config) if hasattr(args, f.name)}
    # A number edited in quotes (LR = "1e-3", copied from a YAML file) stopped check_config's comparisons with a
    # TypeError traceback; a typed --lr takes the constant's type, so it is the constant that is named.
    for name in Config.__dataclass_fields__:
        if isinstance(globals()[name.upper()], str) != (name in TEXT_FLAGS):
            raise CXRError(f"{name.upper()} = {globals()[name.upper()]!r} at the top of train_cxr.py is invalid: it "
                           "must be " + ("text in quotes" if name in TEXT_FLAGS else "a number (or True/False), "
                                         "written without quotes"))
    if args.demo and (odd := sorted(set(DEMO_OVERRIDES) - set(Config.__dataclass_fields__))):  # else a TypeError
        near = difflib.get_close_matches(odd[0], Config.__dataclass_fields__, n=1)
        raise CXRError(f"DEMO_OVERRIDES at the top of train_cxr.py sets {odd[0]!r}, which is no setting; " + (
            f"did you mean {near[0]!r}?" if near else "its keys are the flags' names, img_size for --img-size"))
    # An edited DEMO_OVERRIDES value is named as such: "--img-size 8 is invalid" blamed a flag never typed, and
    # a string (lr="1e-3") stopped check_config with a TypeError. Text against number only: a float for an int
    # (epochs=12.0) is check_config's to name, and 0.99 stays right where EMA_DECAY was edited to 0.
    demo = {k: tuple(v) if isinstance(v, list) else v  # channels=[...], as CHANNELS may be a list
            for k, v in DEMO_OVERRIDES.items() if k not in args.given} if args.demo else {}
    for k, v in demo.items():
        if isinstance(v, str) != (k in TEXT_FLAGS):
            raise CXRError(f"DEMO_OVERRIDES[{k!r}] = {v!r} at the top of train_cxr.py has the wrong type "
                           f"({type(v).__name__}): write it as {k.upper()} = {globals()[k.upper()]!r} is written")
    values = {**demo, **{n: getattr(args, n) for n in args.given}}
    cfg = Config(**values)
    # A ~ that no shell expanded (OUTPUT_DIR = "~/cxr_runs" edited above, or --output-dir=~/cxr_runs, where the
    # shell leaves a ~ after "=" as it is) made a folder named "~" in the current one and wrote the run there.
    cfg.data_dir, cfg.output_dir = os.path.expanduser(cfg.data_dir), os.path.expanduser(cfg.output_dir)
    for name in {"data_dir", "output_dir"} & args.given:  # --resume reads the typed ones: --data-dir=~/moved/data
        setattr(args, name, getattr(cfg, name))
    for mode in ("checkpoint", "resume", "recalibrate"):
        if getattr(args, mode):
            setattr(args, mode, os.path.expanduser(getattr(args, mode)))
    args.predict = args.predict and [os.path.expanduser(p) for p in args.predict]
    check_config(cfg, set(Config.__dataclass_fields__) - set(values), set(demo))
    check_modes(args)
    return cfg, args


# Typed flags a mode reads; every other setting of --predict, --evaluate and --recalibrate is the
# checkpoint's, so typing it would change nothing: refused rather than ignored (--amp too: scoring is fp32).
# The settings a mode reads shape only how this command runs and what it writes, so each is this command's: the
# flag if typed, else the constant at the top as edited now (an edited BOOTSTRAP counts with --evaluate, as an
# edited SAVE_CAM_ARRAYS does with --predict). --recalibrate's two are the exception: they make the new model's
# threshold and guard, so untyped they stay the checkpoint's, as the rest of the model does.
RUN_FLAGS = {"device", "deterministic", "num_threads", "num_workers", "strict", "output_dir", "run_name"}
MODE_FLAGS = {"predict": RUN_FLAGS | {"save_cam_arrays"},
              "evaluate": RUN_FLAGS | {"data_dir", "bootstrap", "num_gradcam_images", "save_cam_arrays"},
              "recalibrate": RUN_FLAGS | {"threshold_policy", "ood_quantile"}}


def check_modes(args) -> None:
    """One mode per command, and no flag that the chosen mode would silently ignore."""
    modes = [m for m in ("demo", "predict", "evaluate", "recalibrate", "resume") if getattr(args, m)]
    if len(modes) > 1:
        raise CXRError(f"--{modes[0]} and --{modes[1]} are separate modes: run them one at a time")
    mode = modes[0] if modes else "train"
    if args.checkpoint and mode not in MODE_FLAGS:
        raise CXRError("--checkpoint is read by --predict, --evaluate and --recalibrate only: training starts "
                       "from scratch (there is no warm start); drop --checkpoint, or add the mode")
    if mode == "demo" and "data_dir" in args.given:
        raise CXRError("--demo trains on synthetic X-rays it writes itself: drop --data-dir, or drop --demo")
    if mode in MODE_FLAGS and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        # Under torchrun every process scored all images into a run folder of its own: a second folder, or
        # (the same name) a misleading error whose exit made torchrun kill the other process mid-way.
        raise CXRError(f"--{mode} runs in one process: drop torchrun (python train_cxr.py --{mode} ...)")
    dashed = lambda names: ", ".join("--" + k.replace("_", "-") for k in sorted(names))
    if mode in MODE_FLAGS and args.given - MODE_FLAGS[mode]:
        raise CXRError(f"{dashed(args.given - MODE_FLAGS[mode])} would change nothing with --{mode}: it uses the "
                       f"checkpoint's own settings (it reads only {dashed(MODE_FLAGS[mode])})")


def check_config(cfg: Config, from_constants: set = frozenset(), from_demo: set = frozenset()) -> None:
    """Refuse a value no run can use, naming its flag; or its constant, for a field in from_constants (one not typed
    and not --demo's: the value edited at the top of train_cxr.py, which the user would not find in the command),
    or DEMO_OVERRIDES, for one in from_demo (set by --demo, not typed)."""
    rules = [("channels", len(cfg.channels) == 4 and all(isinstance(c, int) and c >= 1 for c in cfg.channels),
              "4 positive integers like 16,32,64,128, one per conv block"),
             ("img_size", cfg.img_size >= 16, "at least 16 (four 2x poolings)"),
             ("work_scale", cfg.work_scale >= 1.0, "at least 1.0"),
             ("val_fraction", 0.0 < cfg.val_fraction < 1.0, "between 0 and 1"),
             ("epochs", cfg.epochs >= 1, "at least 1"),
             ("batch_size", cfg.batch_size >= 2, "at least 2 (batch norm)"),
             ("lr", cfg.lr > 0, "positive"),
             ("dropout", 0.0 <= cfg.dropout < 1.0, "in [0, 1)"),
             ("ema_decay", 0.0 <= cfg.ema_decay < 1.0, "in [0, 1)"),
             ("label_smoothing", 0.0 <= cfg.label_smoothing < 1.0, "in [0, 1)"),
             ("aug_scale_min", 0.05 <= cfg.aug_scale_min <= 1.0, "in [0.05, 1]"),
             ("aug_blank_outside_lungs", 0.0 <= cfg.aug_blank_outside_lungs <= 1.0, "in [0, 1]"),
             ("patience", cfg.patience >= 1, "at least 1"),
             ("num_gradcam_images", cfg.num_gradcam_images >= 0, "0 or more"),
             ("bootstrap", cfg.bootstrap >= 0, "0 or more"),
             ("num_workers", cfg.num_workers >= -1, "-1 (one per core), 0 (none) or more"),
             ("ood_quantile", 0.5 <= cfg.ood_quantile < 1.0, "in [0.5, 1)"),
             ("fc_hidden", cfg.fc_hidden >= 1, "at least 1"),
             ("weight_decay", cfg.weight_decay >= 0, "0 or more"),
             ("warmup_epochs", cfg.warmup_epochs >= 0, "0 or more"),
             # A larger seed passed, then stopped the run with torch's "Overflow when unpacking long" traceback
             # after decoding, in a run folder already made.
             ("seed", 0 <= cfg.seed < 10**16, "0 or more and below 10^16 (each epoch's torch seed, seed * 1000 + "
              "epoch, must fit in 64 bits)"),
             # The anchor, not is_absolute(): on Windows /exp1 and C:exp1 are not absolute (no drive, no root), and
             # joined to --output-dir they replaced it, putting the run at C:\exp1 or in the current folder of C:.
             # --run-name=~/exp (no shell expands a ~ after "=") made a folder named "~" inside --output-dir.
             ("run_name", not Path(cfg.run_name).anchor and ".." not in Path(cfg.run_name).parts
              and not cfg.run_name.startswith("~"), "a folder name inside --output-dir (exp1, or exp/1), not an "
              "absolute path, a drive, a ~ path or one with '..'"),
             ("num_threads", cfg.num_threads >= 0, "0 (one per core) or more"),
             ("min_val_per_class", cfg.min_val_per_class >= 1, "at least 1"),
             ("aug_brightness", 0.0 <= cfg.aug_brightness < 1.0, "in [0, 1): a factor U(1-b, 1+b), 0.25 for 25%"),
             ("aug_contrast", 0.0 <= cfg.aug_contrast < 1.0, "in [0, 1): a factor U(1-c, 1+c), 0.25 for 25%"),
             ("aug_gamma", cfg.aug_gamma >= 0, "0 or more"),
             ("aug_rotate_deg", cfg.aug_rotate_deg >= 0, "0 or more"),
             ("aug_shift", cfg.aug_shift >= 0, "0 or more"),
             ("tta", not (cfg.tta and not cfg.aug_hflip), "off when --no-aug-hflip is given: the mirror image it "
              "averages in is one the network never saw in training; add --no-tta (TTA = False)"),
             ("threshold_policy", cfg.threshold_policy in ("balanced", "accuracy", "youden") or bool(re.fullmatch(
                 r"sensitivity:(0?\.\d*[1-9]\d*)", cfg.threshold_policy)), "one of balanced, accuracy, youden, "
                 "sensitivity:X with 0 < X < 1 (e.g. sensitivity:0.95)")]
    # argparse checks only a typed flag's choice: an edited constant (DEVICE = "gpu", AMP = "bf16") is checked here,
    # where "gpu" used to train on the CPU and "bf16" in fp32 without a word.
    rules += [(name, getattr(cfg, name) in ok, "one of " + ", ".join(ok)) for name, ok in CHOICES.items()]
    # Counts, sizes and the seed are whole numbers: BOOTSTRAP = 1e4 (a float) passed every rule above and stopped a
    # finished training run in its test report (range(10000.0)), EPOCHS = 20.0 at its first epoch.
    for name in ("epochs", "img_size", "batch_size", "num_threads", "num_workers", "min_val_per_class", "fc_hidden",
                 "patience", "num_gradcam_images", "bootstrap", "seed"):
        const = globals()[name.upper()]  # a typed --epochs 5 is 5.0 when EPOCHS = 20.0: the constant is to blame
        blame = (f"; a flag takes its constant's type, so {name.upper()} = {const!r} at the top of train_cxr.py "
                 "must be one too" if type(const) is not int and name not in from_constants else "")
        rules.append((name, type(getattr(cfg, name)) is int, "a whole number, written without a point or an "
                      f"exponent (10000, not 1e4 or 10000.0){blame}"))
    rules += [(f.name, math.isfinite(getattr(cfg, f.name)), "a finite number") for f in dataclasses.fields(cfg)
              if isinstance(getattr(cfg, f.name), float)]  # nan and inf pass some comparisons above
    for name, ok, want in rules:
        if not ok:
            value, flag = getattr(cfg, name), "--" + name.replace("_", "-")
            said = (f"{name.upper()} = {value!r} at the top of train_cxr.py ({flag})" if name in from_constants
                    else f"DEMO_OVERRIDES[{name!r}] = {value!r} at the top of train_cxr.py ({flag} of --demo)"
                    if name in from_demo else f"{flag} {value!r}")
            raise CXRError(f"{said} is invalid: it must be {want}")


if __name__ == "__main__":
    try:  # --help, a typo or a bad value ends here, before the slow imports below
        _PARSED = parse_config()
    except CXRError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

import cv2  # noqa: E402  (after the command line on purpose: see the note on the imports above)
import matplotlib  # noqa: E402
matplotlib.use("Agg")  # figures go to files; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pydicom.pixels  # noqa: E402  (binds pydicom too)
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision  # noqa: E402
from PIL import Image, ImageDraw, ImageFont, ImageOps  # noqa: E402
from sklearn.calibration import calibration_curve  # noqa: E402
from sklearn.covariance import LedoitWolf  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.metrics import accuracy_score, confusion_matrix, roc_auc_score, roc_curve  # noqa: E402
from tqdm import tqdm  # noqa: E402


# ----------------------------------------------------------------------------------------------
# Setup: device, precision, logging, distributed
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None     # None = full fp32
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # NHWC (channels_last) memory layout everywhere: on GPUs, for bf16 on AMX, and in fp32 on a CPU
    # without AMX, where oneDNN's convolutions run faster on it (2-core AMD EPYC, default model:
    # 1.27x the training steps/s of NCHW; benchmarks/cpu_paths.py prints both).
    channels_last: bool = True

    def autocast(self):
        return contextlib.nullcontext() if self.amp_dtype is None else torch.autocast(self.device.type, self.amp_dtype)


def cpu_has_fast_bf16() -> bool:
    # AMX (Sapphire Rapids and later) makes bf16 convolutions ~2.5x faster than fp32; AVX-512
    # bf16 alone does not pay off for small convs, so "auto" asks for AMX.
    try:
        return bool(torch.cpu._is_amx_tile_supported())
    except Exception:
        return False


@contextlib.contextmanager
def keep_freed_memory(on: bool = True):
    """While training on the CPU, keep freed activations in the process for the next step instead of
    handing them back to the OS; yields whether it took (False off Linux/glibc, or with on=False).

    A CPU step allocates and frees tens of 4-70 MB activations (block 1 of a 128 px batch: 64 x 16 x
    128 x 128 floats, 67 MB; 51 MB at 112); by default glibc mmap()s the large ones afresh and trims the heap after
    frees, so every step page-faults them in again (~70,000 faults a step). Raising the mmap threshold
    does not help: glibc caps it at 32 MB. Serving every allocation from the heap (no mmap) and
    trimming it only above 1 GB does: 2-core AMD EPYC, fp32, 1.47x training and 1.82x evaluation
    images/s against glibc's defaults (benchmarks/cpu_paths.py --allocator). Only around the epoch
    loop: left on for the guard's feature passes after it, a run's peak memory grew to 3.2 GB (1 epoch)
    and 4.7 GB (20 epochs) instead of 2.1, so on exit mmap comes back and the free heap is returned.
    (Returning it only above 32 / 64 MB instead of 128 KB cut page faults in a benchmark, but a real
    1-epoch run peaked at 2.1 GB instead of 1.8, and a 20-epoch one at 3.7, for no time saved.)
    """
    libc = None
    if on and sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>; glibc still mmap()s if the heap cannot grow
    took = libc is not None and bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
    try:
        yield took
    finally:
        if took:
            libc.mallopt(m_mmap_max, 65536)  # glibc's defaults again: mmap on, the heap trimmed above 128 KB
            libc.mallopt(m_trim_threshold, 128 * 1024)
            libc.malloc_trim(0)


def setup_runtime(cfg: Config) -> Runtime:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise CXRError("--device cuda was asked for but no CUDA GPU is visible: use --device cpu or auto")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    set_backend_flags(cfg.deterministic, use_cuda)
    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if cfg.num_threads > 0:  # also with a GPU: the CPU work around it (guard features, plots) uses these threads
        torch.set_num_threads(cfg.num_threads)
    if world > 1 and not torch.distributed.is_initialized():
        # PyTorch for Windows has no NCCL ("Distributed package doesn't have NCCL built in", a traceback): gloo
        # carries the CUDA tensors of DistributedDataParallel there too, slower.
        nccl = use_cuda and torch.distributed.is_nccl_available()
        torch.distributed.init_process_group("nccl" if nccl else "gloo")
    bf16 = cfg.amp == "on" or (cfg.amp == "auto" and (device.type == "cuda" or cpu_has_fast_bf16()))
    return Runtime(device, torch.bfloat16 if bf16 else None, rank, world)


def set_backend_flags(deterministic: bool, cuda: bool) -> None:
    """Process-wide switches between a fast and a reproducible GPU run: cuDNN autotuning (kernels picked
    by timing), TF32 (fp32 matmuls and convolutions rounded to 10-bit mantissas) and CUDA backward kernels
    that accumulate with atomics are fast, but two runs with one seed differ; --deterministic turns all
    three off. The CPU path is deterministic for a seed and a thread count either way."""
    if deterministic:
        # cuBLAS is deterministic only with a fixed workspace; it reads this when CUDA starts.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    fast = cuda and not deterministic
    torch.backends.cudnn.benchmark = torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = fast


class ConsoleHandler(logging.StreamHandler):
    """stdout, until a reader closes it (python train_cxr.py --predict DIR | head): then nowhere, rather
    than one BrokenPipeError traceback for every later line; the run and its files go on."""
    def handleError(self, record: logging.LogRecord) -> None:
        e = sys.exc_info()[1]
        if isinstance(e, BrokenPipeError):
            self.stream = open(os.devnull, "w", encoding="utf-8")
        elif isinstance(e, UnicodeEncodeError):
            # A name the console cannot show: Windows writes a redirected or piped stdout (> out.txt, | more)
            # in its ANSI code page, and a run folder under C:\Users\Иван was a logging traceback, its
            # line lost. The line with \u escapes instead, as stderr shows such names (train.log has them whole).
            text, enc = self.format(record) + self.terminator, getattr(self.stream, "encoding", None) or "ascii"
            try:
                self.stream.write(text.encode(enc, "backslashreplace").decode(enc))
                self.flush()
            except BrokenPipeError:  # raised here, inside logging's own handler, it would stop the run
                self.stream = open(os.devnull, "w", encoding="utf-8")
        else:
            super().handleError(record)


def setup_console_logging(is_main: bool = True) -> None:
    for h in list(log.handlers):  # main() may run several times in one process (tests)
        h.close()
        log.removeHandler(h)
    # The other processes of a torchrun run check the same data: their warnings would repeat rank 0's.
    log.setLevel(logging.INFO if is_main else logging.ERROR)
    log.propagate = False
    log.addHandler(ConsoleHandler(sys.stdout))  # a handler's default format is the bare message
    # Lines logged before the run folder exists are kept and replayed into train.log: every input
    # check runs before the folder is made, so without this the warnings about skipped files,
    # duplicates across splits and patient overlap (measured: the only two warnings of a run on
    # data with a broken and a copied file) would reach the console but not train.log.
    log.addHandler(logging.handlers.MemoryHandler(capacity=100_000, flushLevel=logging.CRITICAL + 1))


class LogFileHandler(logging.FileHandler):
    """train.log. A line it cannot write (a full disk, a quota) is said once, in one line: logging printed
    a 10-line traceback with every later line, ahead of the run's own "disk full while writing" error."""
    def handleError(self, record: logging.LogRecord) -> None:
        e = sys.exc_info()[1]
        if not isinstance(e, OSError):
            return super().handleError(record)
        print(f"warning: cannot write {self.baseFilename} ({e.strerror or e}): its lines from here on are on "
              "the console only", file=sys.stderr)
        with contextlib.suppress(OSError):  # the unwritten lines stay buffered: closing would raise again
            self.stream.close()
        self.stream = open(os.devnull, "w", encoding="utf-8")  # as train.log (a code page raised on names)


def attach_log_file(path: Path) -> None:
    fh = LogFileHandler(path, encoding="utf-8")
    for h in list(log.handlers):
        if isinstance(h, logging.handlers.MemoryHandler):
            h.setTarget(fh)
            h.flush()
            log.removeHandler(h)
    log.addHandler(fh)


def library_versions() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "numpy": np.__version__, "opencv": cv2.__version__,
            "platform": platform.platform(), "cpu_threads": torch.get_num_threads()}


# ----------------------------------------------------------------------------------------------
# Safe file writing (a temp file first, then renamed into place) and checkpoints
# ----------------------------------------------------------------------------------------------
def atomic_write(path: Path, write_fn) -> None:
    """write_fn(tmp_path) writes the content; a kill at any moment leaves the old or the new file."""
    path = Path(path)
    tmp, written = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}"), False
    try:
        write_fn(tmp)
        written = True
        os.replace(tmp, path)
    except BaseException as e:  # also Ctrl-C or a pickling error: never leave the temp file
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise CXRError(f"disk full while writing {path}: free some space or choose another --output-dir")
        # Windows refuses to replace a file that another program holds open (Excel locks a CSV it shows): the
        # folder took the new file, so "make it writable" below was the wrong advice, and the run had stopped.
        if written and isinstance(e, PermissionError) and sys.platform == "win32":
            raise CXRError(f"cannot replace {path} ({e.strerror}): another program has it open (Excel locks a CSV "
                           "it shows), or it is read-only: close it there and run again (a stopped training run "
                           "continues with --resume RUN_FOLDER)")
        # A shared server's quota (EDQUOT), a folder made read-only or a mount gone read-only mid-run: one
        # line naming the file, not a traceback (under torchrun, a CXRError also stops the other processes).
        if isinstance(e, OSError) and e.errno is not None:
            raise CXRError(f"cannot write {path} ({e.strerror}): free some space, make {path.parent} writable, "
                           "or choose another --output-dir")
        raise


def write_csv(path: Path, header: list, rows) -> None:
    def write(p):
        # UTF-8, as every other file of a run: Windows writes text in its ANSI code page unless told, and a path
        # under C:\Users\Иван stopped a finished run (UnicodeEncodeError in test_predictions.csv) before its report.
        with open(p, "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([header, *rows])
    atomic_write(path, write)


def save_json(path: Path, obj) -> None:
    # NaN/inf become null: strict JSON has no NaN (an AUC is NaN when a class is missing).
    text = json.dumps(json.loads(json.dumps(obj), parse_constant=lambda _: None), indent=2, allow_nan=False) + "\n"
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def save_checkpoint(path: Path, ckpt: dict) -> None:
    def write(p):
        # Through a Python file object: torch.save on a path reports a full disk as a
        # RuntimeError from its C++ writer, a file object raises OSError(ENOSPC).
        with open(p, "wb") as f:
            torch.save(ckpt, f)
            # On the disk before the rename: after a power cut, a rename that reached the disk ahead of the
            # data (ext4 data=writeback, XFS) left a best_model.pt of zeros where the good one had been.
            f.flush()
            sync_to_disk(f.fileno())
    atomic_write(path, write)


def sync_to_disk(fd: int) -> None:
    """os.fsync; on macOS F_FULLFSYNC, since its fsync stops at the drive's own write cache, which a power cut
    empties (Apple's fsync(2)). A file system without it (some network or USB drives) gets fsync."""
    if sys.platform == "darwin":
        import fcntl  # here, not at the top: Windows has no fcntl
        try:
            fcntl.fcntl(fd, fcntl.F_FULLFSYNC)
            return
        except OSError:
            pass
    os.fsync(fd)


def save_image(path: Path, bgr: np.ndarray) -> None:
    # Encoded in memory, written by Python: cv2.imwrite does not check its writes, so on a full disk it
    # returned True and a truncated PNG replaced the overlay; and a missing folder gave no reason at all.
    ok, data = cv2.imencode(Path(path).suffix, bgr)
    if not ok:
        raise OSError(f"could not encode image {path}")
    atomic_write(path, lambda p: p.write_bytes(data.tobytes()))


def load_checkpoint(path, in_folder: str = "best_model.pt") -> dict:
    """Load a checkpoint without executing anything in it (weights_only=True). A run folder means
    its best model (its last.pt for --resume), a --recalibrate folder its recalibrated model."""
    path = Path(path)
    if path.is_dir():
        recalibrated = path / "recalibrated_model.pt"
        if in_folder == "best_model.pt" and not (path / in_folder).is_file() and recalibrated.is_file():
            in_folder = recalibrated.name
        if not (path / in_folder).is_file():
            # Every epoch that writes last.pt has written best_model.pt before it (the first epoch is always the
            # best so far): a last.pt alone means best_model.pt was moved or deleted, not that no epoch finished.
            hint = (" (moved or deleted?); pass its last.pt explicitly to use the latest weights, "
                    "which carry no calibration or threshold" if (path / "last.pt").is_file() else
                    # --resume of a --recalibrate folder, which trains nothing: said for its checkpoint, not for it
                    ": it is a --recalibrate folder; resume the training run it was made from (its report.html "
                    "names that checkpoint)" if recalibrated.is_file() else "")
            raise CXRError(f"run folder {path} has no {in_folder}{hint}")
        path = path / in_folder
    if not path.is_file():
        raise CXRError(f"checkpoint {path} not found: pass a run folder or its best_model.pt / last.pt")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError as e:  # a colleague's file readable by its owner only was called "damaged" below
        raise CXRError(f"cannot read {path} ({e.strerror}): check its permissions, or ask its owner for a copy")
    except Exception as e:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # torch's message carries terminal colour codes
        # torch names the offending global only in its message text: the name tells the user what
        # the file would have run (the exception type, UnpicklingError, also fits a truncated pickle).
        if m := re.search(r"Unsupported global: GLOBAL (\S+)", text):
            raise CXRError(f"refusing to load {path}: it is a pickle that references {m.group(1)}, not plain "
                           "data; only load checkpoints written by train_cxr.py from people you trust")
        raise CXRError(f"{path} is not a checkpoint, or it is damaged (an incomplete copy?): "
                       "pass the best_model.pt or last.pt that train_cxr.py wrote")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise CXRError(f"{path} is not a train_cxr.py checkpoint (format {CKPT_FORMAT} expected)")
    if "config" in ckpt:  # a setting no checkpoint lacks, missing: refused here, naming the file, not later
        try:
            Config.from_dict(ckpt["config"])
        except CXRError as e:
            raise CXRError(f"{path}: {e}") from None
    return ckpt


def model_from_checkpoint(ckpt: dict, rt: Runtime | None = None) -> nn.Module:
    """The checkpoint's network in eval mode; with rt, on its device and in its layout, as in training
    (the layout of the weights decides oneDNN's path: an NCHW model scores NHWC input at NCHW speed)."""
    model = CustomCNN(**ckpt["model_kwargs"])
    model.load_state_dict(ckpt["model"])
    if rt is not None:
        model = model.to(rt.device, memory_format=torch.channels_last if rt.channels_last else torch.contiguous_format)
    return model.eval()


# ----------------------------------------------------------------------------------------------
# Data: discovery (ImageFolder), decoding once, patient-grouped split, batch augmentation
# ----------------------------------------------------------------------------------------------
def is_dicom(path: str) -> bool:
    """A .dcm/.dicom file, or a file without an extension that starts like DICOM ("DICM" after a 128-byte
    preamble): PACS exports often name files IM000001 or by their UID."""
    if path.lower().endswith(DICOM_EXTENSIONS):
        return True
    if os.path.splitext(path)[1] and not re.fullmatch(r"\.\d+", os.path.splitext(path)[1]):  # 1.2.840.1: a UID
        return False
    with contextlib.suppress(OSError), open(path, "rb") as f:
        return f.read(132)[128:] == b"DICM"
    return False


def is_hidden(path, root: str | Path | None = None) -> bool:
    """Whether a part of the path below root (the folder the user gave; without root, the file's own name)
    starts with '.', as .DS_Store and .ipynb_checkpoints/x.png do. Only below root: a DATA_DIR inside a
    hidden folder is still read."""
    below = os.path.relpath(path, root) if root is not None else os.path.basename(path)
    return any(p.startswith(".") for p in Path(below).parts)


def is_image_file(path: str, root: str | Path | None = None) -> bool:
    """An image by its extension (or a DICOM without one) and not hidden (is_hidden)."""
    # A DICOM CD's DICOMDIR, its index, starts like DICOM: it was listed as an unreadable image (refused with --strict)
    return (not is_hidden(path, root) and os.path.basename(path).upper() != "DICOMDIR"
            and (path.lower().endswith(IMAGE_EXTENSIONS) or is_dicom(path)))


SYSTEM_FILES = ("thumbs.db", "desktop.ini", "dicomdir")  # Windows' and a DICOM CD's index files: not worth a note


def note_other_files(others: list, where: str) -> None:
    """Says which files below a folder are not read because their extension is no image's (a .jfif saved by a
    browser, a .jp2 export): they were left out as quietly as Thumbs.db. Hidden files are not listed."""
    others = [p for p in others if os.path.basename(p).lower() not in SYSTEM_FILES]
    if others:
        kinds = collections.Counter(os.path.splitext(p)[1].lower() or "no extension" for p in others)
        log.info(f"note: {len(others)} file(s) in {where} are not images by their extension and are left out ("
                 + ", ".join(f"{k} {n}" for k, n in kinds.most_common(5)) + f"; e.g. {as_text(others[0])}); "
                 f"convert them to one of {', '.join(IMAGE_EXTENSIONS)} to use them"
                 # a PACS export's DICOM without the 128-byte preamble: read by its name, converting would lose it
                 + ("; a DICOM file without an extension or its preamble is read once named .dcm"
                    if "no extension" in kinds else ""))


def check_image_tree(root: str | Path) -> None:
    """Linked folders are followed (ImageFolder and --predict walk with followlinks): a link to a folder that
    holds it was walked again at every level until the OS gave up, 40 deep, each image read 40 times and
    another class's images labelled as the link's class. Refused, naming the link. A folder that cannot be
    listed is named in a warning: os.walk (ImageFolder's too) skips it without a word, and its images were
    left out of the run or of --predict's table unsaid (a hidden one holds no images that are read anyway)."""
    unreadable = []
    for d, dirs, _ in os.walk(root, followlinks=True, onerror=unreadable.append):
        up = Path(os.path.relpath(d, root)).parts
        for link in (os.path.join(d, n) for n in dirs if os.path.islink(os.path.join(d, n))):
            if os.path.realpath(link) in {os.path.realpath(os.path.join(root, *up[:i])) for i in range(len(up) + 1)}:
                raise CXRError(f"{link} links to {os.path.realpath(link)}, a folder that holds it, so its images would "
                               "be read again and again: remove the link")
    if any(os.fspath(e.filename) == os.fspath(root) for e in unreadable):
        raise CXRError(f"cannot read the folder {root} ({unreadable[0].strerror}): fix its permissions")
    unreadable = [e for e in unreadable if not is_hidden(e.filename, root)]
    if unreadable:
        log.warning(f"warning: skipping {len(unreadable)} folder(s) that cannot be read, their images left out: "
                    + "; ".join(f"{as_text(e.filename)} ({e.strerror})" for e in unreadable[:5])
                    + (" ..." if len(unreadable) > 5 else "") + "; fix their permissions to include them")


def list_image_folder(root: Path) -> tuple[list, list]:
    """(class names, [(path, label)]) of a folder with one sub-folder per class, via ImageFolder."""
    check_image_tree(root)
    # Like ImageFolder.find_classes, but hidden folders (.ipynb_checkpoints, .git) are not classes.
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise FileNotFoundError(f"no class folders in {root}")
    # ImageFolder reads only the class folders: an image beside them (train/x.png) has no class and was left
    # out of training or of the test report without a word.
    loose = sorted(e.name for e in os.scandir(root) if e.is_file() and is_image_file(e.path, root))
    if loose:
        log.warning(f"warning: {len(loose)} image file(s) directly in {as_text(root)}, outside the class folders, "
                    f"are left out (e.g. {as_text(loose[0])}): move each into the folder of its class")
    others = []

    def keep(path: str) -> bool:
        if is_image_file(path, root):
            return True
        if not is_hidden(path, root):
            others.append(path)
        return False
    samples = torchvision.datasets.folder.make_dataset(  # walks sub-folders of the class folders too
        str(root), {c: i for i, c in enumerate(classes)}, is_valid_file=keep, allow_empty=True)
    note_other_files(others, f"the class folders of {as_text(root)}")
    return classes, samples


LUMA_PER_1000 = (299, 587, 114)  # ITU-R 601-2 luma of R, G, B: the weights of Pillow's convert("L")


def luma(rgb: np.ndarray) -> np.ndarray:
    """The gray of an array of R, G, B (last axis) as float64, by the weights an 8-bit colour PNG or JPEG gets from
    Pillow: a colour DICOM or 16-bit colour PNG took the channel mean, so one picture decoded differently by
    format. Whole weights over 1000: equal channels give their value exactly."""
    return rgb.astype(np.float64) @ np.array(LUMA_PER_1000, np.float64) / 1000


def decode_xray(path: str, size: int) -> np.ndarray:
    """Any X-ray file as a size x size uint8 grayscale array: DICOM through read_dicom, 16-bit and float
    images min-max scaled to 8 bits. Raises on a broken file."""
    if is_dicom(path):
        arr = read_dicom(path)
    else:
        # From a file object, not the path: Pillow 11+ memory-maps a one-strip uncompressed TIFF opened by path and
        # reads an Orientation 5-8 one at the turned width (a gray, RGBA, CMYK or palette film scan came out as
        # diagonal stripes, trained on without a word)
        with open(path, "rb") as f, Image.open(f) as im:
            if im.format == "JPEG":
                im.draft("L", (size, size))  # decoded at the smallest 1/2, 1/4, 1/8 scale still >= size (DCT)
            # PIL keeps only the high byte of a 16-bit colour PNG or TIFF (a 12-bit X-ray came out as 0-15): such a
            # file is read by OpenCV, to gray with transparent = black, and min-max scaled below like 16-bit gray.
            deep = (im.format in ("PNG", "TIFF") and im.mode in ("RGB", "RGBA")
                    and any(";16" in str(t) for t in im.tile))  # its raw mode (RGB;16B); load() empties it
            im.load()  # raises OSError on truncated/corrupt data
            if deep:
                if (px := cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_UNCHANGED)) is None:
                    raise OSError("a 16-bit colour image that OpenCV cannot decode: save it as 16-bit grayscale")
                px, exif = px.astype(np.float32), im.getexif()
                gray = luma(px[..., 2::-1]) * (px[..., 3] / 65535 if px.shape[-1] == 4 else 1)  # OpenCV's BGR(A)
                im = Image.fromarray(gray.astype(np.float32))
                im.info["exif"] = exif.tobytes()  # its Orientation, for the next line
            im = ImageOps.exif_transpose(im)  # upright as every viewer shows it (EXIF Orientation, phone photos)
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                # transparent = black, like film background
                im = Image.alpha_composite(Image.new("RGBA", im.size, (0, 0, 0, 255)), im.convert("RGBA"))
            if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                arr = np.asarray(im, dtype=np.float32)
                finite = np.isfinite(arr)
                if not finite.all():  # a float TIFF with a masked (NaN) pixel decoded to a black image, unsaid
                    if not finite.any():
                        raise OSError("a float image without one finite pixel value")
                    lo, hi = float(arr[finite].min()), float(arr[finite].max())
                    arr = np.nan_to_num(arr, nan=lo, posinf=hi, neginf=lo)  # NaN as the darkest value
                lo, hi = float(arr.min()), float(arr.max())
                arr = ((arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)).astype(np.uint8)
            else:
                arr = np.asarray(im.convert("L"))
    if arr.shape != (size, size):
        interp = cv2.INTER_AREA if min(arr.shape) >= size else cv2.INTER_LINEAR
        arr = cv2.resize(arr, (size, size), interpolation=interp)
    return np.ascontiguousarray(arr)


class DicomNote(UserWarning):
    """Something read_dicom did to a file that the log says once for all the files decoded together."""


class FirstFrameOnly(DicomNote):
    """A multi-frame DICOM file was read: only its first frame is used."""


class ForProcessing(DicomNote):
    """A FOR PROCESSING image (raw detector data, before the vendor's processing for viewing) was read as it is."""


class UnknownVOIFunction(DicomNote):
    """A DICOM window whose VOI LUT Function the standard does not define was applied as LINEAR."""


class DicomRefused(ValueError):
    """A DICOM file this script does not read; the message, shown in full, says why."""


def dcmread(path: str, **kw) -> pydicom.Dataset:
    """pydicom.dcmread, which refuses a file without the 128-byte preamble and "DICM" (a bare data set, as
    older PACS exports and ACR-NEMA-era archives write them); a file named .dcm/.dicom is then read anyway,
    and without File Meta its transfer syntax is the encoding pydicom found (only uncompressed is possible)."""
    try:
        return pydicom.dcmread(path, **kw)
    except pydicom.errors.InvalidDicomError:
        if not path.lower().endswith(DICOM_EXTENSIONS):
            raise
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a file that is not DICOM at all gives a warning per "tag" it made up
        ds = pydicom.dcmread(path, force=True, **kw)
    if "TransferSyntaxUID" not in ds.file_meta:
        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (pydicom.uid.ImplicitVRLittleEndian if implicit else
                                          pydicom.uid.ExplicitVRLittleEndian if little else
                                          pydicom.uid.ExplicitVRBigEndian)
    return ds


def usable_window_width(ds: pydicom.Dataset) -> bool:
    """Whether the first WindowWidth is one pydicom can window with: at least 1 (LINEAR), above 0 (LINEAR_EXACT,
    SIGMOID). Some exports write 0 for "no window"; pydicom's ValueError then made the file unreadable, where a
    viewer windows the picture itself."""
    if ds.get("WindowWidth") is None:
        return False
    width = float(np.atleast_1d(ds.WindowWidth)[0])
    return width >= 1 or (width > 0 and ds.get("VOILUTFunction", "LINEAR") != "LINEAR")


FOR_PROCESSING_SOP_CLASSES = (pydicom.uid.DigitalXRayImageStorageForProcessing,
                              pydicom.uid.DigitalMammographyXRayImageStorageForProcessing,
                              pydicom.uid.DigitalIntraOralXRayImageStorageForProcessing)


def read_dicom(path: str) -> np.ndarray:
    """The picture of a DICOM X-ray as a uint8 array, through pydicom, in the standard's order.

    1. the Modality LUT (RescaleSlope/RescaleIntercept); 2. the VOI LUT, else WindowCenter/
    WindowWidth, else a window from the DICOM_PERCENTILES of the pixel values (Pixel Padding left
    out); 3. MONOCHROME1 is inverted (its low values are white). Multi-frame files give their first
    frame; FOR PROCESSING images (raw detector data) are read as they are, with a note; an unknown VOI LUT
    Function is windowed as LINEAR, with a note. Presentation LUT Shape is not applied: Photometric
    Interpretation decides (see README, DICOM).
    Raises DicomRefused for a modality that is not an X-ray, no pixel data, or a transfer syntax no
    installed package decodes.
    """
    ds = dcmread(path)
    if "PixelData" not in ds and "Modality" not in ds and not ds.file_meta.get("MediaStorageSOPClassUID"):
        raise DicomRefused("not a DICOM file: no DICOM header, no modality and no pixel data")
    modality = str(ds.get("Modality", "")).upper()
    if modality not in DICOM_MODALITIES:
        raise DicomRefused(f"DICOM modality {modality or '(none)'} is not an X-ray ({', '.join(DICOM_MODALITIES)})")
    if "PixelData" not in ds:
        raise DicomRefused("DICOM file without pixel data")
    ts = ds.file_meta.TransferSyntaxUID
    try:
        decoder = pydicom.pixels.get_decoder(ts)
    except NotImplementedError:  # pydicom has no decoder at all for this syntax
        decoder = None

    def install_hint() -> str:  # one pip-installable package that adds a decoder for ts, or ""
        needs = sorted(decoder.missing_dependencies if decoder else [], key=lambda d: not d.startswith("pylibjpeg"))
        return needs[0].split(" - requires ")[-1] if needs else ""
    if decoder is None or not decoder.is_available:
        raise DicomRefused(f"DICOM transfer syntax {ts.name} ({ts}) is not decodable here: it needs "
                           f"{install_hint() or 'a converter to an uncompressed DICOM'}")
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        warnings.warn(f"{path}: multi-frame DICOM, first frame used", FirstFrameOnly)
    # An enhanced multi-frame file keeps its rescale and window in functional groups, per frame or shared by all;
    # pydicom 3.0 reads them only at the top level, so the window was lost. The first frame's are put there.
    for groups in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
        for name in ("PixelValueTransformationSequence", "FrameVOILUTSequence"):
            if ds.get(groups) and ds[groups][0].get(name):
                for elem in ds[groups][0][name][0]:
                    if elem.tag not in ds:  # the top level's own come first, then the frame's, then the shared
                        ds.add(elem)
    if ds.get("ModalityLUTSequence") and ds.ModalityLUTSequence[0].LUTDescriptor[2] not in (8, 16):
        ds.ModalityLUTSequence[0].LUTDescriptor[2] = 16  # 10-15 bits an entry: pydicom asks numpy for a uint12
    if ds.get("ModalityLUTSequence") and ds.get("PixelRepresentation") == 1:
        d = ds.ModalityLUTSequence[0].LUTDescriptor
        if d[1] >= 2**15:  # a signed first value mapped written as US (-1000 as 64536): an OverflowError in pydicom
            d[1] -= 2**16
    try:
        px = pydicom.pixels.pixel_array(ds, index=0)
    except RuntimeError as e:  # every installed plugin failed, e.g. Pillow on 12-bit JPEG Extended (common in CR)
        if not (how := install_hint()):
            raise
        why = "; ".join(line.strip() for line in str(e).splitlines()[1:])  # each plugin's reason, on one line
        raise DicomRefused(f"DICOM transfer syntax {ts.name} ({ts}) failed to decode here ({why}); "
                           f"another decoder may read it: {how}")
    # Raw detector data, not the picture a radiologist reads (PS3.3 C.8.11.1, DX Series): read, but said: a model
    # trained on FOR PRESENTATION images, as the public sets are, was not trained on it.
    sop_class = ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID")
    if ds.get("PresentationIntentType") == "FOR PROCESSING" or sop_class in FOR_PROCESSING_SOP_CLASSES:
        warnings.warn(f"{path}: a FOR PROCESSING image (raw detector data), read as it is", ForProcessing)
    if ds.get("PhotometricInterpretation") == "PALETTE COLOR":
        # Stored values are indices into the palette: read as gray levels they gave a scrambled picture, unsaid.
        px = pydicom.pixels.apply_color_lut(px, ds)
    arr = pydicom.pixels.apply_modality_lut(px, ds)
    if arr.ndim == 3:
        arr = luma(arr)  # colour (RGB once pydicom has converted YBR) to gray, as Pillow makes a colour PNG
    invert = ds.get("PhotometricInterpretation") == "MONOCHROME1"  # its low values are white
    # The VOI (LUT or window) is for grayscale only (PS3.3 C.11.2): a colour file that kept its X-ray's window tags
    # made pydicom raise a ValueError, and the file was left out as unreadable.
    grey = ds.get("PhotometricInterpretation") in ("MONOCHROME1", "MONOCHROME2")
    # VOI LUT Function: LINEAR when absent (PS3.3 C.11.2.1.3). An empty one or a term the standard does not define
    # (a vendor's own) made pydicom raise a ValueError and the file was left out as unreadable; a viewer falls back
    # to LINEAR.
    function = str(ds.get("VOILUTFunction") or "LINEAR").upper()
    unknown_function = function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID")
    if "VOILUTFunction" in ds:
        ds.VOILUTFunction = "LINEAR" if unknown_function else function
    if grey and ds.get("VOILUTSequence"):
        d = ds.VOILUTSequence[0].LUTDescriptor
        if d[2] == 8:  # pydicom indexes an 8-bit LUT with uint8 too: past entry 255 (a 12-bit input's 4096) it wraps
            d[2] = 16  # the same entries, held in 16 bits
        if d[1] >= 2**15 and (ds.get("PixelRepresentation") == 1 or float(np.min(arr)) < 0):
            # Its first value mapped is signed for a signed input (PS3.3 C.11.2.1.1); written as US (-1000 as
            # 64536), the LUT began above every pixel, and the whole picture came out its first entry: black.
            d[1] -= 2**16
        ends = pydicom.pixels.apply_voi_lut(np.arange(d[1], d[1] + (d[0] or 2**16)), ds)  # every LUT entry
        arr = pydicom.pixels.apply_voi_lut(np.rint(arr).astype(np.int64), ds)  # a LUT is indexed by integers
        lo, hi = float(np.min(ends)), float(np.max(ends))
    elif grey and ds.get("WindowCenter") is not None and usable_window_width(ds):
        # Not just present: pydicom skips an empty (zero-length) window, which then spanned +-1e30: flat gray.
        if unknown_function:
            warnings.warn(f"{path}: unknown VOI LUT Function {function!r}, windowed as LINEAR", UnknownVOIFunction)
        # What the window makes of the darkest and the brightest input, in that order: with a negative
        # RescaleSlope pydicom's output range runs downwards, and min/max would swap black and white.
        with np.errstate(over="ignore"):  # a SIGMOID window's exp() overflows at +-1e30, to its exact ends
            lo, hi = map(float, pydicom.pixels.apply_voi_lut(np.array([-1e30, 1e30]), ds))
        arr = pydicom.pixels.apply_voi_lut(arr, ds)
    else:
        if invert:
            # Negated before the window, not inverted after it: 1 - x rounded half to even went the other way at
            # .5 ties, so a MONOCHROME1 file differed from its MONOCHROME2 twin by 1 gray level in 1 pixel in 8.
            arr, invert = -arr, False
        # Pixel Padding Value (to Pixel Padding Range Limit), in stored values, marks the pixels outside the image
        # (beyond the collimator): a viewer leaves them out of its window, else they squeeze the X-ray's contrast.
        body = arr
        if px.ndim == 2 and ds.get("PixelPaddingValue") is not None:
            limit = ds.get("PixelPaddingRangeLimit")
            pad = sorted((ds.PixelPaddingValue, ds.PixelPaddingValue if limit is None else limit))
            body = arr[(px < pad[0]) | (px > pad[1])]
        lo, hi = map(float, np.percentile(body if body.size else arr, DICOM_PERCENTILES))
    img = np.clip((arr - lo) / (hi - lo), 0, 1) if hi != lo else np.zeros(arr.shape)
    if invert:
        img = 1 - img
    return np.rint(img * 255).astype(np.uint8)


def _decode_one(item: tuple, size: int) -> tuple:
    """(index, array or None, error text, {DicomNote class name: its message}) of one (index, path): runs in a
    worker (names, not classes: a class defined in __main__ does not pickle to a spawned worker by that name)."""
    i, path = item
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            arr, err = decode_xray(path, size), ""
        except Exception as e:  # reported, not hidden: the caller lists every bad file
            arr, err = None, str(e) if isinstance(e, DicomRefused) else f"{type(e).__name__}: {str(e)[:120]}"
    return i, arr, err, {w.category.__name__: str(w.message) for w in caught if issubclass(w.category, DicomNote)}


def usable_cores() -> int:
    """The cores this process may run on (a container's or taskset's share, where the OS tells it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def decode_workers(setting: int, n_files: int) -> int:
    """Decoding processes for n_files: the setting, or with -1 one per usable core where workers are forked
    (Linux; none on a single core, where a worker only adds its start-up) and 2 where they are spawned
    (macOS, Windows: each imports torch and this file again, ~4 s and hundreds of MB); never fewer than
    64 files a worker."""
    if setting >= 0:
        want = setting
    elif (torch.multiprocessing.get_start_method(allow_none=True)  # without fixing it: a caller may set it
          or torch.multiprocessing.get_all_start_methods()[0]) != "fork":  # the platform's default comes first
        want = 2
    else:
        cores = usable_cores()
        want = cores if cores > 1 else 0
    return min(want, n_files // 64)


def decode_all(paths: list, size: int, num_workers: int = 0, desc: str = "decode") -> tuple[np.ndarray, list]:
    """Decode every file once: (N x size x size uint8 array, [(path, reason)] of bad files, whose rows stay
    zero). No on-disk cache: a cold decode of the 5,216-image training split (224 px JPEGs) takes 8.3 s
    with 2 workers, 3% of a full run. num_workers: decode_workers' setting (-1: one per usable core)."""
    out = np.zeros((len(paths), size, size), dtype=np.uint8)
    bad, noted = [], collections.defaultdict(list)  # DicomNote class name: [(path, message)]
    workers = decode_workers(num_workers, len(paths))
    # A list is a map-style dataset; with batch_size=None the workers apply collate_fn to each item.
    loader = torch.utils.data.DataLoader(list(enumerate(paths)), batch_size=None, num_workers=workers,
                                         collate_fn=functools.partial(_decode_one, size=size))
    for i, arr, err, notes in tqdm(loader, total=len(paths), desc=desc, leave=False, disable=None):
        if arr is None:
            bad.append((paths[i], err))
        else:
            out[i] = arr
        for name, message in notes.items():
            noted[name].append((paths[i], message))
    if multi_frame := noted["FirstFrameOnly"]:
        log.info(f"note: {len(multi_frame)} multi-frame DICOM file(s) (e.g. {multi_frame[0][0]}): "
                 "the first frame of each is used")
    if unknown := noted["UnknownVOIFunction"]:
        log.warning(f"note: {len(unknown)} DICOM file(s) have a VOI LUT Function the standard does not define; "
                    f"LINEAR, its default, is used, as a viewer does (e.g. {unknown[0][1]})")
    if raw := noted["ForProcessing"]:
        log.warning(f"note: {len(raw)} DICOM file(s) are FOR PROCESSING images (e.g. {raw[0][0]}), raw detector "
                    "data unlike the FOR PRESENTATION pictures radiologists read and public training sets hold: "
                    "read as they are, but a model trained on those was not trained on raw detector images")
    return out, bad


@dataclasses.dataclass
class Split:
    """One split in memory: decoded working-size images and their labels."""
    images: torch.Tensor   # N x S x S uint8
    labels: torch.Tensor   # N int64
    paths: list

    def __len__(self):
        return len(self.labels)

    def subset(self, idx) -> "Split":
        idx = np.asarray(idx, dtype=np.int64)
        return Split(self.images[torch.from_numpy(idx)], self.labels[torch.from_numpy(idx)],
                     [self.paths[i] for i in idx])


def load_split(samples: list, cfg: Config, desc: str) -> tuple[Split, list]:
    paths = [p for p, _ in samples]
    arr, bad = decode_all(paths, cfg.work_size, cfg.num_workers, desc)
    bad_paths = {p for p, _ in bad}
    split = Split(torch.from_numpy(arr), torch.tensor([y for _, y in samples], dtype=torch.long), paths)
    return split.subset([i for i, p in enumerate(paths) if p not in bad_paths]), bad


_PATIENT_PATTERNS = (re.compile(r"^(person\d+)_", re.I), re.compile(r"^(.*?IM-\d+)-\d+", re.I))


def patient_pattern(regex: str) -> re.Pattern | None:
    """--patient-regex compiled and checked; None (Kermany names) for ""."""
    if not regex:
        return None
    try:
        pat = re.compile(regex)
    except re.error as e:
        raise CXRError(f"--patient-regex {regex!r} is not a valid regular expression ({e})")
    if pat.groups < 1:
        raise CXRError(f"--patient-regex {regex!r} has no group: put the patient id in parentheses, "
                       r"e.g. '^(P\d+)_'")
    return pat


def class_relative(path: str, data_dir: Path) -> str:
    """The path of an image below DATA_DIR/<split>/<CLASS>/, '/'-separated: "patient007/img0.png" for a
    class folder with one sub-folder per patient, the file name for a flat one."""
    return "/".join(Path(os.path.relpath(path, data_dir)).parts[2:])


def patient_id(path: str, pattern: re.Pattern | None = None, stem: bool = True, rel: str | None = None) -> str:
    """The patient of an image, from the first of: --patient-regex's first group (pattern), searched in rel
    (the path below the class folder, see class_relative; the file name if not given); a DICOM file's
    PatientID ("dicom:<id>"); a Kermany-style id in the file name; else rel without its extension, so each
    file is its own patient ("" with stem=False). For a flat class folder that is the file's stem."""
    rel = rel or os.path.basename(path)
    # --patient-regex sees the folders below the class folder ('^([^/]+)/' = one folder per patient) and,
    # typed, wins over PatientID (anonymised exports often give every file the same one).
    if pattern and (m := pattern.search(rel)) and m.group(1):
        return m.group(1).lower()
    if is_dicom(path):
        with contextlib.suppress(OSError, pydicom.errors.InvalidDicomError):
            ds = dcmread(path, stop_before_pixels=True, specific_tags=["PatientID"])
            if pid := str(ds.get("PatientID", "")).strip():
                return f"dicom:{pid}"
    for pat in () if pattern else _PATIENT_PATTERNS:  # written for, and kept to, the file name
        if (m := pat.search(rel.rsplit("/", 1)[-1])) and m.group(1):
            return m.group(1).lower()
    # Not the stem alone: img0.png of patient007/ and of patient008/ would be merged into one "patient".
    return os.path.splitext(rel)[0].lower() if stem else ""


def grouped_split(labels, groups, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, patient-grouped train/val split: (train_idx, val_idx), sorted. Each patient goes wholly
    to one side: per class (a patient counts for the class of most of its images), patients are shuffled
    with the seed and moved to validation until that class's share reaches val_fraction of its images."""
    labels = np.asarray(labels)
    by_group: dict = {}
    for i, g in enumerate(groups):
        by_group.setdefault(g, []).append(i)
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(labels):
        members = sorted(g for g, idx in by_group.items() if np.bincount(labels[idx]).argmax() == c)
        rng.shuffle(members)
        target = val_fraction * sum(len(by_group[g]) for g in members)
        taken = 0
        for g in members:
            if taken >= target:
                break
            val.extend(by_group[g])
            taken += len(by_group[g])
    val_idx = np.array(sorted(val), dtype=np.int64)
    return np.setdiff1d(np.arange(len(labels)), val_idx), val_idx


def class_weights(labels, num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights n / (K * n_c): a balanced set gets all ones."""
    counts = np.bincount(np.asarray(labels), minlength=num_classes).astype(np.float64)
    if (counts == 0).any():
        raise CXRError("a class has no training images after the validation split")
    return torch.tensor(counts.sum() / (num_classes * counts), dtype=torch.float32)


def normalize(x: torch.Tensor, norm: dict) -> torch.Tensor:
    """x: N x 1 x H x W float in [0, 1]."""
    if norm["mode"] == "image":
        # Per-image standardisation removes exposure/contrast differences between machines and
        # sites, the main shift between this dataset's train and test splits.
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        std = x.std(dim=(1, 2, 3), keepdim=True)
        return (x - mean) / (std + 1e-3)
    return (x - norm["mean"]) / norm["std"]


def dataset_norm(images: torch.Tensor, mode: str) -> dict:
    """The normalisation stored with the model; "dataset" measures the training split's mean/std."""
    if mode != "dataset":
        return {"mode": mode}
    n, s, s2 = 0, 0.0, 0.0
    for chunk in images.split(512):  # chunked: a float copy of the whole split can be > 1 GB
        x = chunk.double().div_(255)
        n, s, s2 = n + x.numel(), s + float(x.sum()), s2 + float((x * x).sum())
    mean = s / n
    return {"mode": mode, "mean": round(mean, 5), "std": round(math.sqrt(max(s2 / n - mean ** 2, 1e-12)), 5)}


def center_crop(images: torch.Tensor, img_size: int) -> torch.Tensor:
    """Evaluation view: the central img_size crop of the working-size image (Resize+CenterCrop)."""
    o = (images.shape[-1] - img_size) // 2
    return images[..., o:o + img_size, o:o + img_size]


def eval_batch(images_u8: torch.Tensor, img_size: int, norm: dict, device) -> torch.Tensor:
    x = center_crop(images_u8, img_size).to(device, non_blocking=True).unsqueeze(1).float().div_(255)
    return normalize(x, norm)


def lung_box_mask(h: int, w: int, box=LUNG_BOX) -> np.ndarray:
    """h x w booleans, True inside the box (fractions x0, x1, y0, y1; the far edges rounded up): the
    one lung box of the augmentation, the Grad-CAM lung focus and benchmarks/lung_focus.py."""
    x0, x1, y0, y1 = box
    m = np.zeros((h, w), bool)
    m[int(y0 * h):int(math.ceil(y1 * h)), int(x0 * w):int(math.ceil(x1 * w))] = True
    return m


def augment_batch(images_u8: torch.Tensor, cfg: Config, norm: dict, gen: torch.Generator) -> torch.Tensor:
    """Random resized crop + rotation + shift + flip (one affine warp), then exposure jitter, on whole
    batches on any device. The random numbers come from the CPU generator `gen`, and each image's warp
    matrix and exposure factors are computed from them on the CPU, so a seed gives the same augmentation
    on CPU and GPU and after a resume (and a GPU gets them in two copies, not as some 65 operations a step)."""
    n, dev = images_u8.shape[0], images_u8.device
    u = torch.rand(n, 9, generator=gen)
    area = cfg.aug_scale_min + (1 - cfg.aug_scale_min) * u[:, 0]
    log_r = (u[:, 1] * 2 - 1) * math.log(4 / 3)
    w = torch.sqrt(area * torch.exp(log_r)).clamp(max=1.0)
    h = torch.sqrt(area / torch.exp(log_r)).clamp(max=1.0)
    # An elongated crop of over 75% of the area sticks out of the image: the clamp cut its area to as little
    # as sqrt(area * 3/4), below aug_scale_min above 0.75 (--aug-scale-min 1 still cut up to 13% away). Its
    # short side keeps aug_scale_min instead (at 0.75 or less, as by default, nothing changes).
    w, h = (torch.where(h >= 1, w.clamp(min=cfg.aug_scale_min), w),
            torch.where(w >= 1, h.clamp(min=cfg.aug_scale_min), h))
    angle = (u[:, 2] * 2 - 1) * math.radians(cfg.aug_rotate_deg)
    flip = torch.where((u[:, 3] < 0.5) & cfg.aug_hflip, -1.0, 1.0)
    tx = (u[:, 4] * 2 - 1) * ((1 - w) + cfg.aug_shift)
    ty = (u[:, 5] * 2 - 1) * ((1 - h) + cfg.aug_shift)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos * w * flip, -sin * h, tx], 1),
                         torch.stack([sin * w * flip, cos * h, ty], 1)], 1)
    exposure = torch.stack([1 + (u[:, 6] * 2 - 1) * cfg.aug_brightness,  # brightness, contrast, gamma
                            1 + (u[:, 7] * 2 - 1) * cfg.aug_contrast,
                            torch.exp((u[:, 8] * 2 - 1) * cfg.aug_gamma)], 1).view(n, 3, 1, 1, 1)
    # Non-blocking: a blocking copy makes the host wait for the GPU to finish its queue, every step.
    theta, exposure = theta.to(dev, non_blocking=True), exposure.to(dev, non_blocking=True)
    x = images_u8.unsqueeze(1).float().div_(255)
    grid = F.affine_grid(theta, [n, 1, cfg.img_size, cfg.img_size], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if cfg.aug_blank_outside_lungs > 0:  # no random draw when off: default runs keep their numbers
        outside = torch.from_numpy(~lung_box_mask(cfg.img_size, cfg.img_size)).to(dev, non_blocking=True)
        pick = (torch.rand(n, generator=gen) < cfg.aug_blank_outside_lungs).view(n, 1, 1, 1)
        x = torch.where(pick.to(dev, non_blocking=True) & outside, x.mean(dim=(1, 2, 3), keepdim=True), x)
    b, c, g = exposure.unbind(1)
    x = x.clamp(1e-6, 1).pow(g)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * c + mean) * b
    return normalize(x.clamp_(0, 1), norm)


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------
def conv_block(cin: int, cout: int) -> nn.Sequential:
    # Named layers: Grad-CAM hooks blocks[-1].relu, and checkpoints store blocks.0.conv.weight, ...
    return nn.Sequential(collections.OrderedDict(
        conv=nn.Conv2d(cin, cout, 3, padding=1, bias=False),  # bias is redundant before BN
        bn=nn.BatchNorm2d(cout), relu=nn.ReLU(inplace=True), pool=nn.MaxPool2d(2)))


class CustomCNN(nn.Module):
    """Four conv blocks (conv, batch norm, ReLU, max-pool), then two fully connected layers."""

    def __init__(self, num_classes: int = 2, in_channels: int = 1, img_size: int = IMG_SIZE,
                 channels=CHANNELS, fc_hidden: int = FC_HIDDEN, dropout: float = DROPOUT):
        super().__init__()
        self.blocks = nn.Sequential(*[conv_block(a, b) for a, b in zip([in_channels, *channels], channels)])
        with torch.no_grad():  # the flattened size follows from the input size, whatever it is
            n_flat = self.blocks(torch.zeros(1, in_channels, img_size, img_size)).numel()
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(n_flat, fc_hidden),
                                  nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(fc_hidden, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return self.head(self.blocks(x))


def model_kwargs(cfg: Config, num_classes: int) -> dict:
    return dict(num_classes=num_classes, in_channels=1, img_size=cfg.img_size,
                channels=list(cfg.channels), fc_hidden=cfg.fc_hidden, dropout=cfg.dropout)


class SummedCrossEntropy(nn.CrossEntropyLoss):
    """nn.CrossEntropyLoss's weighted mean, label smoothing included, as the batch's sum over its targets'
    weights: the same loss, but torch before 2.12 found those weights with masked_select when smoothing,
    and its data-dependent size made every CUDA training step wait for the GPU. Used on CUDA only, so the
    CPU path keeps its numbers bit for bit."""

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y, weight=self.weight, label_smoothing=self.label_smoothing,
                               reduction="sum") / self.weight[y].sum()


class EMA:
    """Exponential moving average of the weights and of the batch-norm statistics."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay, self.updates = decay, 0
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))  # short memory at the start
        # Batch-norm running statistics are averaged with the same decay, so that they describe
        # the averaged weights' activations rather than the live model's (the batch count is copied).
        # Recomputing them for the EMA weights costs forward passes and scored no better on a CV
        # fold (issue 12); copying them scored the same AUC with a higher early validation loss.
        buffers = list(zip(self.module.buffers(), model.buffers()))
        floats = [(e, b) for e, b in buffers if e.is_floating_point()]
        counts = [(e, b) for e, b in buffers if not e.is_floating_point()]
        # torch's multi-tensor ops (as torch.optim and swa_utils use them): on a GPU a few fused
        # kernels instead of one per tensor (28 for CustomCNN); the same numbers as a lerp_ per tensor.
        torch._foreach_lerp_(list(self.module.parameters()), list(model.parameters()), 1 - d)  # under no_grad
        torch._foreach_lerp_([e for e, _ in floats], [b for _, b in floats], 1 - d)
        torch._foreach_copy_([e for e, _ in counts], [b for _, b in counts])


# ----------------------------------------------------------------------------------------------
# Metrics: scikit-learn's, plus only what it lacks (bootstrap CI, calibration, threshold policies)
# ----------------------------------------------------------------------------------------------
def positive_index(class_names: list, name: str = "") -> int:
    """The positive class: --positive-class NAME, else PNEUMONIA; with more than two classes (where
    it only names the report's class) the last one. Two other names are refused, not guessed: for
    ABNORMAL/NORMAL a guess of NORMAL would swap sensitivity and specificity."""
    if name:
        if name not in class_names:
            raise CXRError(f"--positive-class {name!r} is not a class folder; choose one of {class_names}")
        return class_names.index(name)
    upper = [c.upper() for c in class_names]
    if "PNEUMONIA" in upper:
        return upper.index("PNEUMONIA")
    if len(class_names) == 2:
        raise CXRError(f"classes {class_names[0]} and {class_names[1]} leave the positive class ambiguous: "
                       "pass --positive-class with the one whose sensitivity you want")
    return len(class_names) - 1


def roc_auc(y_true, score) -> float:
    """Binary ROC AUC; nan when only one class is present (where scikit-learn raises)."""
    y = np.asarray(y_true).astype(bool)
    return float(roc_auc_score(y, score)) if 0 < y.sum() < len(y) else float("nan")


def multiclass_auc(labels, probs: np.ndarray, pos: int) -> float:
    """Binary: AUC of the positive class's probability. More classes: mean one-vs-rest AUC of the
    classes present (scikit-learn's multi_class="ovr" refuses a split that lacks a class)."""
    labels = np.asarray(labels)
    if probs.shape[1] == 2:
        return roc_auc(labels == pos, probs[:, pos])
    aucs = [a for a in (roc_auc(labels == k, probs[:, k]) for k in range(probs.shape[1])) if not math.isnan(a)]
    return float(np.mean(aucs)) if aucs else float("nan")


def binary_metrics(y_true, score, threshold: float) -> dict:
    """Metrics of the rule "positive when score >= threshold", with its counts by name (test_metrics.json's
    confusion_matrix is in class order, which puts the positive class first when it sorts first)."""
    y = np.asarray(y_true).astype(bool)
    (tn, fp), (fn, tp) = confusion_matrix(y, np.asarray(score) >= threshold, labels=[False, True]).tolist()
    div = lambda a, b: float(a / b) if b else float("nan")
    sens, prec = div(tp, tp + fn), div(tp, tp + fp)
    return {"threshold": float(threshold), "accuracy": div(tp + tn, len(y)), "sensitivity": sens,
            "specificity": div(tn, tn + fp), "precision": prec, "f1": div(2 * prec * sens, prec + sens) if tp else 0.0,
            "counts": {"tp": tp, "fn": fn, "fp": fp, "tn": tn}}


def bootstrap_auc_ci(y_true, score, n: int, seed: int) -> list:
    """Percentile 95% interval of the AUC over n resamples of the test set. With class labels and a
    probability matrix (three or more classes), of multiclass_auc's figure: the mean one-vs-rest AUC
    of the classes a resample holds.

    Each resample's AUC is counted by hand, as the share of (positive, negative) pairs that the
    scores order correctly, ties counting half: roc_auc_score's value, to the last bits (tested),
    without its per-call overhead, ~4 s of the 15 s that --evaluate took on 624 images."""
    score = np.asarray(score)
    ys, cols = (([np.asarray(y_true).astype(bool)], [score]) if score.ndim == 1 else
                ([np.asarray(y_true) == k for k in range(score.shape[1])], list(score.T)))
    # A class with one test image: every resample repeats that image, so the interval showed only the spread of
    # the others (one positive scored highest: "95% CI 1.0000 - 1.0000"), a certainty the data cannot give.
    if 1 in [int(y.sum()) for y in ys] + ([int((~ys[0]).sum())] if score.ndim == 1 else []):
        return [float("nan")] * 2
    ranks = [np.unique(c, return_inverse=True)[1] for c in cols]  # which distinct score each image has, lowest first
    sizes = [int(r.max()) + 1 if len(r) else 0 for r in ranks]
    rng, aucs = np.random.default_rng(seed), []
    for _ in range(n):
        i = rng.integers(0, len(score), len(score))
        per_class = []
        for y, rank, k in zip(ys, ranks, sizes):
            r, yi = rank[i], y[i]
            pos, neg = np.bincount(r[yi], minlength=k), np.bincount(r[~yi], minlength=k)
            n_pos, n_neg = int(pos.sum()), int(neg.sum())
            if n_pos and n_neg:  # a resample that lost a class has no AUC for it
                below = np.cumsum(neg) - neg  # negatives scored lower than each distinct score
                per_class.append(float(pos @ (below + neg / 2)) / (n_pos * n_neg))
        if per_class:
            aucs.append(float(np.mean(per_class)))
    return [float(np.percentile(aucs, q)) for q in (2.5, 97.5)] if aucs else [float("nan")] * 2


def fit_calibration(probs: np.ndarray, labels, prior: str = "jeffreys") -> dict:
    """A temperature T and class biases b, fitted on validation by log loss (LBFGS):

        calibrated = softmax(log(p) / T + b)

    T undoes over- or under-confidence (temperature scaling, Guo et al. 2017). b undoes the prior
    shift that the class-weighted loss and label smoothing build into p on purpose; for two classes
    this is Platt scaling of the log-odds (Platt 1999). Monotone in P(positive) for two classes, so
    the AUC and the ranking of images do not change. Returned as plain tensors for the checkpoint.

    The log loss is penalised by Jeffreys' prior, minus half the log-determinant of the Fisher
    information of (1/T, b) (Firth 1993): plain maximum likelihood (prior="none") has no optimum
    when the model gets every fitting image right (T -> 0 turns every probability into exactly 0
    or 1, and ranking, AUC and calibration on new images go with it; a few dozen --recalibrate
    images often are such a set), while the penalty's pull fades as 1/n. prior="platt" uses Platt's
    targets, (n + 1) / (n + 2) instead of 1, as scikit-learn's sigmoid calibration does.
    benchmarks/calibration.py measures the three; no library fits this penalised model.
    """
    z = torch.log(torch.as_tensor(probs, dtype=torch.float64).clamp_min(1e-7))
    y = np.asarray(labels).astype(np.int64)
    n, k = z.shape
    count = np.bincount(y, minlength=k)[y]
    hit = (count + 1) / (count + 2) if prior == "platt" else np.ones(n)
    target = np.repeat(((1 - hit) / (k - 1))[:, None], k, 1)
    target[np.arange(n), y] = hit
    target = torch.from_numpy(target)
    # d logits / d (1/T, b_1 .. b_k-1); b_0 stays 0, as softmax ignores a shift common to all classes
    jac = torch.cat([z[:, :, None], torch.eye(k, dtype=torch.float64)[:, 1:].expand(n, k, k - 1)], 2)
    log_inv_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)  # T = exp(-log_inv_t) > 0
    b = torch.zeros(k - 1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_inv_t, b], max_iter=500, tolerance_grad=1e-10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = z * log_inv_t.exp() + F.pad(b, (1, 0))
        loss = F.cross_entropy(logits, target, reduction="sum")
        if prior == "jeffreys":
            p = logits.softmax(1)
            fisher = torch.einsum("nki,nkl,nlj->ij", jac, torch.diag_embed(p) - p[:, :, None] * p[:, None, :], jac)
            loss = loss - 0.5 * torch.linalg.slogdet(fisher + 1e-12 * torch.eye(k, dtype=torch.float64))[1]
        loss.backward()
        return loss
    opt.step(closure)
    bias = F.pad(b.detach(), (1, 0))
    bias = bias - bias.mean()  # centred: the same map, and readable in the log
    # A model that learned nothing is best "calibrated" as a constant (T -> infinity); a cap keeps
    # its scores distinct, so the ranking (and the AUC) survives.
    return {"temperature": torch.exp(-log_inv_t.detach()).clamp(max=100.0).float()[0], "bias": bias.float()}


def calibrate(probs: np.ndarray, cal: dict | None) -> np.ndarray:
    """Apply fit_calibration's map; None (a checkpoint without calibration) leaves probs as they are."""
    if cal is None or len(probs) == 0:
        return probs
    # Only log(0) is clipped: a floor of 1e-7 (the fit's) tied every P below it, so a confident model's
    # ranking and AUC changed. float64 first: np.clip kept fp32 scores fp32, and their log merged close ones.
    p = np.clip(np.asarray(probs, dtype=np.float64), np.finfo(np.float64).tiny, 1)
    z = np.log(p) / float(cal["temperature"]) + np.asarray(cal["bias"], dtype=np.float64)
    return torch.from_numpy(z).softmax(1).numpy()  # float64: float32 would merge close scores into ties


def calibration_error(y_true, prob, bins: int = 15) -> float:
    """Expected calibration error over equal-width bins: sum_b n_b/N |frequency_b - mean prob_b|.
    (scikit-learn has the reliability curve, calibration_curve, but not this number.)"""
    y, p = np.asarray(y_true, dtype=np.float64), np.asarray(prob, dtype=np.float64)
    b = np.searchsorted(np.linspace(0.0, 1.0, bins + 1)[1:-1], p)  # calibration_curve's bins: the same figure
    gap = np.bincount(b, weights=y, minlength=bins) - np.bincount(b, weights=p, minlength=bins)
    return float(np.abs(gap).sum() / max(len(p), 1))


def report_ece(labels, probs: np.ndarray, pos: int) -> float:
    """The ECE every report gives: of P(positive) with two classes; with more, of the predicted
    class's probability (top-label confidence), which any number of classes has."""
    labels = np.asarray(labels)
    if probs.shape[1] == 2:
        return calibration_error(labels == pos, probs[:, pos])
    return calibration_error(probs.argmax(1) == labels, probs.max(1))


def choose_threshold(y_true, prob, policy: str) -> float:
    """The decision threshold on calibrated P(positive) for a --threshold-policy (validation data).

    balanced       the validation prevalence: with calibrated probabilities, "p >= prior" is the
                   rule that maximises sensitivity + specificity (Youden's objective) in expectation,
                   estimated from the two-parameter calibration fit instead of the argmax of a
                   nearly flat empirical curve, so it does not jump between seeds.
    accuracy       0.5: the fewest expected errors at the validation prevalence (calibration's).
    youden         the empirical maximiser of sensitivity + specificity - 1, placed midway between
                   the chosen score and the next lower one (on a score, any tie would flip).
    sensitivity:X  keeps at least X of the positive validation images: midway between the lowest
                   positive score it must keep and the next lower score of any image (a threshold
                   exactly at a validation score would lose that image to any rounding; one below a
                   negative between two positives would call that negative positive for nothing).
    """
    y, p = np.asarray(y_true).astype(bool), np.asarray(prob, dtype=np.float64)
    if policy == "balanced":
        return float(y.mean())
    if policy == "accuracy":
        return 0.5
    if policy == "youden":
        fpr, tpr, thr = roc_curve(y, p, drop_intermediate=False)
        j = int(np.argmax(tpr - fpr))
        if j == 0:  # no cut beats calling nothing positive (a useless model): above every score below 1
            return float((thr[1] + 1) / 2)
        return float(min(1.0, (thr[j] + thr[j + 1]) / 2 if j + 1 < len(thr) else thr[j]))
    target = float(policy.split(":", 1)[1])
    pos = np.sort(p[y])
    k = int(math.floor((1 - target) * len(pos) + 1e-9))  # positives allowed below the threshold
    below = p[p < pos[k]].max(initial=-1.0)
    return float((pos[k] + below) / 2 if below >= 0 else pos[k])


# ----------------------------------------------------------------------------------------------
# Train and evaluate
# ----------------------------------------------------------------------------------------------
_STOP = {"signal": None}


@contextlib.contextmanager
def stop_on_signals():
    """SIGINT/SIGTERM set a flag that the training loop checks after every batch."""
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    _STOP["signal"] = None
    for s in old:
        signal.signal(s, lambda signum, frame: _STOP.update(signal=signum))
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


PHASES: dict = {}  # seconds per phase of the current run, logged at its end


@contextlib.contextmanager
def phase(name: str):
    t = time.perf_counter()
    try:
        yield
    finally:
        PHASES[name] = PHASES.get(name, 0.0) + time.perf_counter() - t


def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # DistributedDataParallel


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Batch norm on its running statistics and dropout off inside the block; the model's mode is restored."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


GLIBC_MMAP_MAX = 32 * 2**20  # glibc's highest mmap threshold: an allocation this large is always mmap()ed afresh


def eval_batch_size(model: nn.Module, img_size: int, device) -> int:
    """Images per forward pass when scoring (validation, calibration, the guard's features, the test
    set): 256 on a GPU. On a CPU, the most (a power of two) whose block-1 output stays under glibc's
    32 MB mmap ceiling: 32 at 112 px, 16 at 128, 8 at 224. Larger ones are mmap()ed and page-faulted in
    afresh on every pass after training, when keep_freed_memory is off: calibration, the guard and a
    624-image test report took 22.7-33.4 s in full runs at 256 images (13 million page faults in a
    benchmark), 16.0 s at 32 (README, How long it takes; benchmarks/cpu_paths.py --eval-batches)."""
    if torch.device(device).type == "cuda":
        return 256
    per_image = unwrap(model).blocks[0].conv.out_channels * img_size ** 2 * 4  # fp32 bytes
    n = 1
    while n < 256 and 2 * n * per_image < GLIBC_MMAP_MAX:
        n *= 2
    return n


@torch.no_grad()
def predict_probs(model: nn.Module, images_u8: torch.Tensor, img_size: int, norm: dict, rt: Runtime,
                  tta: bool, desc: str = "", batch_size: int | None = None) -> np.ndarray:
    """Softmax probabilities (N x K) in eval mode, eval_batch_size images at a time; a progress bar
    named desc if given."""
    out, bs = [], batch_size or eval_batch_size(model, img_size, rt.device)
    with eval_mode(model):
        for i in tqdm(range(0, len(images_u8), bs), desc=desc, leave=False, disable=None if desc else True):
            x = eval_batch(images_u8[i:i + bs], img_size, norm, rt.device)
            x = x.contiguous(memory_format=torch.channels_last) if rt.channels_last else x
            # Always fp32, also after bf16 training: bf16 scores fall into ties, and a threshold
            # chosen among ties moves with every run.
            p = model(x).float().softmax(1)
            if tta:
                p = (p + model(torch.flip(x, dims=[3])).float().softmax(1)) / 2
            out.append(p.cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 0), dtype=np.float32)


def gather_rows(local: np.ndarray, rt: Runtime) -> np.ndarray:
    """Concatenate per-rank rows (each rank holds rows rank::world) back into the original order."""
    if rt.world == 1:
        return local
    parts = [None] * rt.world
    torch.distributed.all_gather_object(parts, local)
    # A process with no rows (more processes than validation images) holds a (0, 0) array: shape from the others.
    widest = max(parts, key=len)
    out = np.zeros((sum(map(len, parts)), *widest.shape[1:]), dtype=widest.dtype)
    for r, p in enumerate(parts):
        if len(p):
            out[r::rt.world] = p
    return out


def rank_max(value: float, rt: Runtime) -> float:
    """The largest value over all processes. A decision that ends the loop (a signal, a NaN) must
    be taken by every process at the same batch: one that stops alone leaves the others waiting
    forever in the next all-reduce."""
    if rt.world == 1:
        return value
    t = torch.tensor([float(value)], device=rt.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return float(t.item())


def shell_word(text: str) -> str:
    """text quoted as one word of a command the user pastes into this platform's shell. On Windows in double
    quotes, and only where needed: cmd.exe keeps shlex's single quotes as part of the word, and every run
    folder there has a backslash, which shlex quotes: 'runs\\20261129-101500', pasted, named no folder."""
    if sys.platform != "win32":
        return shlex.quote(text)
    return f'"{text}"' if re.search(r"[^\w.:/\\-]", text) else text  # PowerShell splits "a,b" bare, too


def resume_command(run_dir: Path, world: int) -> str:
    """The command that resumes run_dir: with as many processes as it ran with (train refuses another count).
    The folder quoted for the shell: pasted as printed, "runs/exp 1" resumed nothing ("unrecognized arguments")."""
    return (f"{'python' if world == 1 else f'torchrun --nproc_per_node={world}'} train_cxr.py "
            f"--resume {shell_word(str(run_dir))}")


def stop_if_signalled(rt: Runtime) -> None:
    """Raise Interrupted in every process if any of them caught Ctrl-C or SIGTERM (stop_on_signals)."""
    if signum := int(rank_max(_STOP["signal"] or 0, rt)):
        _STOP["signal"] = signum  # also in the processes the signal did not reach
        raise Interrupted()


@contextlib.contextmanager
def rank_0_writes(rt: Runtime):
    """Around the files only rank 0 writes: a CXRError there (a full disk) is raised in every process,
    which waits here for rank 0's outcome. Alone in rank 0, it left the others waiting in their next
    step for a process that had exited (gloo: a traceback that torchrun named the root cause)."""
    failed = None
    try:
        yield
    except CXRError as e:
        failed = e
    if rt.world > 1:
        box = [str(failed) if failed else None]
        torch.distributed.broadcast_object_list(box)
        failed = failed or (CXRError(box[0]) if box[0] else None)
    if failed:
        raise failed


@dataclasses.dataclass
class TrainState:
    """What build_state makes for fit: the objects a step changes (all saved in last.pt) and the
    settings train_one_epoch and evaluate read."""
    model: nn.Module           # what is trained (maybe wrapped in DDP)
    eval_model: nn.Module      # what is evaluated and saved: the EMA copy, or the model itself
    ema: EMA | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    criterion: nn.Module
    cfg: Config
    norm: dict
    rt: Runtime
    pos: int                   # index of the positive class (AUC)
    order_seed: int            # the shuffle's base seed (order_seed; cfg.seed in a run made before it)


def order_seed(seed: int) -> int:
    """The base seed of the training order: the sampler shuffles epoch e with base + e. With the
    plain seed as base (runs before this rule), seed s+1 repeated seed s's orders one epoch later,
    so runs meant as independent repeats shared them; a base drawn from the seed's own 63-bit
    stream keeps every seed's orders apart."""
    return int(np.random.SeedSequence(seed).generate_state(1, np.uint64)[0] >> 1)


def epoch_order(n: int, base_seed: int, epoch: int, rt: Runtime) -> torch.Tensor:
    """This process's share of the epoch's shuffled order of n training images: one permutation
    for all processes, each taking every world-th index (the sampler drops the n % world left over)."""
    sampler = torch.utils.data.DistributedSampler(range(n), num_replicas=rt.world, rank=rt.rank, shuffle=True,
                                                  seed=base_seed, drop_last=True)
    sampler.set_epoch(epoch)
    return torch.tensor(list(sampler))


def train_step(st: TrainState, images_u8: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple:
    """One optimisation step on a batch on the training device: augment, forward, backward, update, EMA.
    Returns the loss and the class probabilities, still on the device: nothing here waits for a GPU
    (tests/test_cuda.py checks), so the host queues the next step while the GPU runs this one."""
    x = augment_batch(images_u8, st.cfg, st.norm, gen)
    x = x.contiguous(memory_format=torch.channels_last) if st.rt.channels_last else x
    with st.rt.autocast():
        logits = st.model(x)
        loss = st.criterion(logits.float(), y)
    st.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    st.optimizer.step()
    st.scheduler.step()
    if st.ema is not None:
        st.ema.update(unwrap(st.model))
    return loss.detach(), logits.detach().float().softmax(1)


def train_one_epoch(st: TrainState, train: Split, epoch: int) -> dict:
    cfg, rt = st.cfg, st.rt
    # Every random draw of an epoch derives from (seed, epoch, rank): a resumed run repeats it exactly,
    # and under torchrun each process augments (and drops out) its own images differently; with the
    # same seed on every rank, image i of each rank's batch got the same crop, flip and mask.
    seed = cfg.seed * 1000 + epoch + rt.rank * 10**9
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    # Order, images and labels on the training device (images are there already; on a CPU nothing moves):
    # indexing a GPU tensor with a host index copies the index and waits for the GPU, every step.
    order = epoch_order(len(train), st.order_seed, epoch, rt).to(rt.device)
    images, all_labels = train.images.to(rt.device), train.labels.to(rt.device)
    # Each rank gets len(train) // world images and drops the last partial batch (batch norm needs > 1 image).
    n_batches = len(train) // rt.world // cfg.batch_size
    st.model.train()
    losses, probs, labels = [], [], []
    bar = tqdm(range(n_batches), desc=f"epoch {epoch} train", leave=False, disable=None if rt.is_main else True)
    for b in bar:
        idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
        y = all_labels[idx]
        loss, p = train_step(st, images[idx], y, gen)
        losses.append(loss)
        probs.append(p)
        labels.append(y)
        check = b % 20 == 19 or b == n_batches - 1  # the only host sync of the loop
        if check:
            recent = torch.stack(losses[-20:])
            bad = (~torch.isfinite(recent)).nonzero()
            if rank_max(len(bad), rt):
                if not len(bad):
                    raise FloatingPointError(f"loss became non-finite in another process at epoch {epoch}, "
                                             f"by batch {b + 1}")
                i = len(losses) - len(recent) + int(bad[0])
                raise FloatingPointError(f"loss became {float(losses[i])} at epoch {epoch}, batch {i + 1}")
            bar.set_postfix(loss=f"{float(recent.mean()):.4f}")
        if check or rt.world == 1:
            stop_if_signalled(rt)
    # Over all processes' shards: the same figures on every rank, and the whole epoch in history.csv.
    probs_np = gather_rows(torch.cat(probs).cpu().numpy(), rt)
    labels_np = gather_rows(torch.cat(labels).cpu().numpy(), rt)
    loss = gather_rows(torch.stack(losses).cpu().numpy(), rt).mean()
    return {"train_loss": float(loss), "train_acc": accuracy_score(labels_np, predict_labels(probs_np, st.pos, None)),
            "train_auc": multiclass_auc(labels_np, probs_np, st.pos)}


def evaluate(st: TrainState, split: Split) -> dict:
    """Validation loss, accuracy and AUC of the evaluated model (sharded over ranks, gathered)."""
    rt = st.rt
    probs = gather_rows(predict_probs(st.eval_model, split.images[rt.rank::rt.world], st.cfg.img_size, st.norm, rt,
                                      st.cfg.tta, desc="val" if rt.is_main else ""), rt)
    if not np.isfinite(probs).all():  # batch norm rescales each training batch: the loss can stay finite
        raise FloatingPointError("the validation scores became nan or inf: the weights overflowed while the "
                                 "training loss stayed finite")  # fit stops as for a nan loss (every rank: gathered)
    labels = split.labels.numpy()
    w = st.criterion.weight.cpu() if st.criterion.weight is not None else None
    loss = F.nll_loss(torch.from_numpy(np.log(np.clip(probs, 1e-7, 1))), split.labels, weight=w)
    # Labels as the reports make them (P(positive) >= 0.5 for two classes): argmax gave a tie to class 0, so a model
    # at P = 0.5 (one that learned nothing) scored apart from the test report's "at 0.5" and its figure titles.
    return {"val_loss": float(loss), "val_acc": accuracy_score(labels, predict_labels(probs, st.pos, None)),
            "val_auc": multiclass_auc(labels, probs, st.pos)}


# ----------------------------------------------------------------------------------------------
# Out-of-distribution guard: does an image look like the training images at all?
# ----------------------------------------------------------------------------------------------
# The guard's features keep a little layout: each conv block's output averaged over a 2 x 2 grid
# of regions, not over the whole image. Adults' films frame the chest differently from children's
# (lungs fill the picture, no arms or abdomen), and the global average hides where things are: on
# the 3 CV folds the 2 x 2 grid raised the adult share flagged from 36.0 / 38.2 / 44.9% to 51.1 /
# 47.8 / 60.7%, held-out children 1.0-3.1% (benchmarks/ood.py --refit); 3 x 3 and 4 x 4 did worse.
GUARD_GRID = 2


@torch.no_grad()
def layer_features(model: nn.Module, images_u8: torch.Tensor, img_size: int, norm: dict, device,
                   grid: int = GUARD_GRID, batch_size: int | None = None) -> list:
    """N x C*grid*grid features per layer: each conv block's output averaged over a grid x grid
    of regions (grid 1: over the whole image, as guards made before GUARD_GRID expect), then the
    hidden fully connected layer. Always fp32, in eval mode (the mode is restored)."""
    net = unwrap(model)
    layers = [*net.blocks, net.head[3]]  # head[3]: the ReLU after the first Linear
    feats: list = [[] for _ in layers]
    pool = (lambda out: out.mean((2, 3))) if grid == 1 else (lambda out: F.adaptive_avg_pool2d(out, grid).flatten(1))

    def keep(k):
        return lambda m, i, out: feats[k].append((pool(out) if out.ndim == 4 else out).float().cpu())
    handles = [m.register_forward_hook(keep(k)) for k, m in enumerate(layers)]
    batch_size = batch_size or eval_batch_size(net, img_size, device)
    try:
        with eval_mode(net):
            for i in range(0, len(images_u8), batch_size):
                net(eval_batch(images_u8[i:i + batch_size], img_size, norm, device))
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(f).double().numpy() if f else np.zeros((0, 1)) for f in feats]


def _mahalanobis(x: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Squared distance of each row of x to the nearest class mean under a shared precision. One
    matrix product (BLAS): the three-operand einsum it replaces looped in plain C, 1.2 s against
    0.03 s for the guard's five layers of 1,044 images."""
    d = (x[:, None, :] - means[None]).reshape(-1, x.shape[1])     # N*K x C
    return ((d @ precision) * d).sum(1).reshape(len(x), len(means)).min(1)


def zoomed_views(images_u8, seed, area: tuple = (0.15, 0.5), aspect: tuple = (0.6, 1.6)) -> torch.Tensor:
    """Each image cropped to 15-50% of its area (aspect 0.6-1.6) and resized back: part of the
    chest seen closer than any training augmentation shows it (AUG_SCALE_MIN keeps 60% or more).
    The guard learns what such views look like, as synthetic outliers (outlier exposure,
    Hendrycks et al. 2019). seed: an int or a numpy Generator (benchmarks/ood.py draws its
    partial crops from its own). images_u8 may sit on a GPU (training keeps them there): cropped on the CPU."""
    rng = np.random.default_rng(seed)
    size = images_u8.shape[-1]
    out = []
    for im in torch.as_tensor(images_u8).cpu().numpy():
        a, r = rng.uniform(*area), rng.uniform(*aspect)
        h = int(min(size, size * np.sqrt(a * r)))
        w = int(min(size, size * a * size / h))
        y, x = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
        out.append(cv2.resize(im[y:y + h, x:x + w], (size, size), interpolation=cv2.INTER_LINEAR))
    return torch.from_numpy(np.stack(out))


def fit_ood_guard(train_feats: list, train_labels, held_out_feats: list, quantile: float,
                  zoomed_feats: list | None = None) -> dict:
    """Two parts, one score. (1) Class-conditional Gaussians with a shared, shrunk covariance on
    every layer's features (Lee et al. 2018; Ledoit-Wolf shrinkage from scikit-learn): the mean
    over layers of an image's Mahalanobis distance, each divided by the layer's median distance on
    held-out images, so every layer counts alike (early layers see texture and exposure, late ones
    anatomy; no single layer catches every kind of outlier, Anthony & Kamnitsas 2023). (2) With
    zoomed_feats (features of zoomed_views of the training images): a logistic regression that
    tells training images from close-up views of part of the chest, which part (1) misses because
    augmentation taught the network to ignore scale. The score is the larger of the two, the
    second scaled so both parts flag alike; 1 is a typical held-out image. The cutoff is the
    `quantile` of the held-out (patient-grouped validation) scores: about 1 - quantile of images
    like the training ones are flagged. Plain tensors only, for the checkpoint."""
    labels = np.asarray(train_labels)
    classes, index = np.unique(labels, return_inverse=True)
    guard = {"means": [], "precisions": [], "scales": []}
    for f, h in zip(train_feats, held_out_feats):
        means = np.stack([f[labels == c].mean(0) for c in classes])
        centred = f - means[index]
        precision = LedoitWolf(assume_centered=True).fit(centred).precision_
        guard["means"].append(torch.from_numpy(means).float())
        guard["precisions"].append(torch.from_numpy(precision).float())
        scale = float(np.median(_mahalanobis(h, means, precision)))
        # A dead layer (features all zero, e.g. a ReLU that never fires) has distance 0 everywhere:
        # dividing by its zero median gave a nan cutoff that flagged every image.
        guard["scales"].append(scale if np.isfinite(scale) and scale > 0 else 1.0)
    guard["scales"] = torch.tensor(guard["scales"])
    if zoomed_feats is not None:
        x = np.concatenate([np.concatenate(train_feats, 1), np.concatenate(zoomed_feats, 1)])
        mean, sd = x.mean(0), x.std(0) + 1e-6
        clf = LogisticRegression(C=0.1, max_iter=2000).fit((x - mean) / sd, np.r_[np.zeros(len(labels)),
                                                                                 np.ones(len(zoomed_feats[0]))])
        guard["zoomed"] = {"mean": torch.from_numpy(mean).float(), "scale": torch.from_numpy(sd).float(),
                           "coef": torch.from_numpy(clf.coef_[0]).float(), "intercept": float(clf.intercept_[0]),
                           "weight": 1.0}
    d, z = _guard_parts(guard, held_out_feats)  # the held-out images' parts, the second not yet scaled
    if "zoomed" in guard:
        # Scale the second part so that both flag the same share of held-out images on their own.
        q = 1 - (1 - quantile) / 2
        guard["zoomed"]["weight"] = float(np.quantile(d, q) / max(np.quantile(z, q), 1e-12))
    # Scored as every image is: z * w differed from ood_scores' w / (1 + e) in the last bit, and a cutoff that
    # is one of these scores (np.quantile at a whole index) flagged that image on rescoring, not in the count.
    held_out = ood_scores(guard, held_out_feats)
    guard["cutoff"] = float(np.quantile(held_out, quantile))
    guard["quantile"] = float(quantile)
    # What the cutoff means in images: the quantile of a few dozen is near their maximum, and the
    # scales and the weight were fitted on the same images, so new ones are flagged more often.
    guard["held_out"] = {"n": int(len(held_out)), "above": int((held_out > guard["cutoff"]).sum())}
    return guard


def _guard_parts(guard: dict, feats: list) -> tuple:
    """The guard's two parts per image: the mean scaled Mahalanobis distance, and the weighted
    probability of a zoomed-in view (zeros for a guard that has no such part)."""
    d = np.mean([_mahalanobis(f, m.double().numpy(), p.double().numpy()) / float(s)
                 for f, m, p, s in zip(feats, guard["means"], guard["precisions"], guard["scales"])], axis=0)
    z = np.zeros_like(d)
    if "zoomed" in guard:
        g = {k: v.double().numpy() if torch.is_tensor(v) else v for k, v in guard["zoomed"].items()}
        logit = ((np.concatenate(feats, 1) - g["mean"]) / g["scale"]) @ g["coef"] + g["intercept"]
        z = g["weight"] / (1 + np.exp(-np.clip(logit, -50, 50)))
    return d, z


def ood_scores(guard: dict, feats: list) -> np.ndarray:
    """The guard's score per image: 1 is a typical held-out training image; above guard["cutoff"]
    the image is flagged as unlike the training data."""
    return np.maximum(*_guard_parts(guard, feats))


# ----------------------------------------------------------------------------------------------
# Grad-CAM
# ----------------------------------------------------------------------------------------------
class GradCAM:
    """Grad-CAM (Selvaraju et al., 2017) for a CNN classifier.

        with GradCAM(model) as cam:        # hooks exist only inside the block
            maps = cam(x)                  # N x H x W float32 in [0, 1]; target = predicted class
            maps = cam(x, target=1)        # or one class index per image

    CAM = ReLU(sum_k mean_ij(d y_c / d A_k) * A_k), min-max scaled per image, bilinearly resized to
    the input pixels it covers and scaled again (the order pytorch-grad-cam uses, which stretches it over the
    whole input: the same when the poolings divide the input size); a flat positive map is all 1.

    A_k are, by default, the rectified feature maps of the last conv block (its ReLU output, 1/8
    of the input size), the maps Grad-CAM is defined on. The raw conv output before batch norm
    was the default until it was measured on the real data: for 76% of the PNEUMONIA predictions
    of a trained model its weighted sum was negative everywhere, so the map came out empty (0%
    with the ReLU output). Pass target_layer to explain another layer. A forward hook keeps the
    activation; its gradient is taken with torch.autograd.grad on that tensor, not with a module
    backward hook (those misbehave with in-place ReLU), so parameters' .grad (and a training step
    in progress) are never touched. The model's train/eval mode is restored.
    """

    def __init__(self, model: nn.Module, target_layer: nn.Module | None = None):
        self.model = model
        self.target_layer = target_layer if target_layer is not None else unwrap(model).blocks[-1].relu
        self._hook = None
        self._act = None

    def __enter__(self) -> "GradCAM":
        self._hook = self.target_layer.register_forward_hook(lambda m, i, out: setattr(self, "_act", out))
        return self

    def __exit__(self, *exc) -> bool:
        self._hook.remove()
        self._hook = self._act = None
        return False  # never swallow an exception

    def __call__(self, x: torch.Tensor, target=None) -> np.ndarray:
        if self._hook is None:
            raise RuntimeError("GradCAM has no hooks: use it as `with GradCAM(model) as cam: cam(x)`")
        try:
            with eval_mode(self.model), torch.enable_grad():
                x = x.detach().requires_grad_(True)  # a graph exists even for a frozen model
                logits = self.model(x)
                if target is None:
                    tgt = logits.argmax(1)
                else:  # a list, array or tensor (on any device) of classes, or one class for every image
                    t = target.detach() if torch.is_tensor(target) else torch.as_tensor(np.asarray(target))
                    tgt = t.to(logits.device).long().reshape(-1)
                tgt = tgt.expand(len(x)) if len(tgt) == 1 else tgt
                if len(tgt) != len(x):
                    raise ValueError(f"target has {len(tgt)} entries for {len(x)} images")
                score = logits.gather(1, tgt.view(-1, 1)).sum()
                grad, = torch.autograd.grad(score, self._act)  # parameters keep their .grad
                weights = grad.float().mean(dim=(2, 3), keepdim=True)
                cam = F.relu((weights * self._act.detach().float()).sum(1, keepdim=True))
        finally:
            self._act = None
        # A cell covers `stride` pixels a side, a power of two (the 2x poolings before the layer), and pooling
        # drops an odd last row and column: the map covers the top-left h*stride pixels. Stretched over the whole
        # input (70 px: 8 cells of 8 px), the heat sat up to 5 px off its pixels; the rest repeats the edge cell.
        (H, W), (h, w) = x.shape[-2:], cam.shape[-2:]
        sh, sw = (2 ** int(math.log2(a / b)) for a, b in ((H, h), (W, w)))
        cam = F.interpolate(_minmax(cam), size=(h * sh, w * sw), mode="bilinear", align_corners=False)
        cam = F.pad(cam, (0, W - w * sw, 0, H - h * sh), mode="replicate")
        return _minmax(cam)[:, 0].cpu().numpy().astype(np.float32)


def _minmax(cam: torch.Tensor) -> torch.Tensor:
    lo, hi = cam.amin(dim=(2, 3), keepdim=True), cam.amax(dim=(2, 3), keepdim=True)
    # A positive map that varies by less than one step of the 256-colour scale is flat: the same evidence
    # everywhere, shown as 1 everywhere. Stretched, an exactly flat one came out all 0 ("no positive evidence")
    # and a 1e-6 wobble filled the scale from blue to red.
    flat = (hi - lo) * 256 < hi
    return torch.where(flat, torch.ones_like(cam), (cam - lo) / (1e-7 + hi - lo))  # an all-zero map stays zero


# Every picture's text goes through put_text. cv2.putText's Hershey fonts are ASCII only: OpenCV 4.x drew a
# class named "Lungenentzündung" as "Lungenentz??ndung" and 肺炎 as six "?" (one per UTF-8 byte); 5.0 draws
# them with fonts of its own, so the pictures depended on the OpenCV installed. DejaVu Sans ships with
# matplotlib, so it is there wherever this script runs. A character no font matplotlib finds has (CJK on a machine
# without a CJK font) is drawn with OpenCV 5's own fonts where they have it: cv2.putText drew it there before.
TEXT_FONT = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"


@functools.lru_cache(maxsize=None)
def _font_file_for(ch: str) -> str | None:
    """The font that draws ch: DejaVu Sans, else the first font matplotlib found on this machine that has
    it (DejaVu has no CJK), else None: put_text then draws it with OpenCV's fonts or writes the code point."""
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font
    others = sorted({f.fname for f in font_manager.fontManager.ttflist} - {str(TEXT_FONT)})
    for path in [str(TEXT_FONT), *others]:
        if "LastResort" in Path(path).name:  # its glyphs are boxes naming the Unicode block: tofu by design
            continue
        try:
            if FT2Font(path).get_char_index(ord(ch)):
                return path
        except (OSError, RuntimeError, ValueError):  # a font file that cannot be read is skipped
            continue
    if ch.isprintable() and not _cv2_draws(ch) and not _font_file_for.warned:  # once: not for every CJK character
        _font_file_for.warned = True
        log.warning(f"warning: neither an installed font nor OpenCV {cv2.__version__} draws {ch!r} "
                    f"(U+{ord(ch):04X}); the pictures write such characters as <U+XXXX>. To see them drawn, install "
                    "a font that has them (e.g. Noto Sans CJK) and delete matplotlib's font list (fontlist-*.json in "
                    "matplotlib.get_cachedir())")
    return None


_font_file_for.warned = False


@functools.lru_cache(maxsize=None)
def _cv2_draws(ch: str) -> bool:
    """Whether cv2.putText has a glyph for ch: OpenCV 5.x has fonts of its own (CJK among them), 4.x only the
    ASCII Hershey fonts. A glyph it lacks is drawn as "?", so ch has one if it is drawn differently."""
    if not hasattr(cv2, "FontFace"):  # OpenCV 4.x
        return False
    drawn = [cv2.putText(np.zeros((40, 40), np.uint8), c, (4, 30), 255, cv2.FontFace(), 24)[1] for c in (ch, "?")]
    return not np.array_equal(*drawn)


def _piece_width(font, piece: str, size: int) -> float:
    """Pixels a piece of _text_runs advances put_text's pen; OpenCV's putText returns where its text would go on."""
    if font is None:
        return cv2.putText(np.zeros((1, 1), np.uint8), piece, (0, 0), 0, cv2.FontFace(), size)[0][0]
    return font.getlength(piece)


@functools.lru_cache(maxsize=None)
def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size)


def _text_runs(text: str, size: int) -> list:
    """(font, text) pieces of text, each drawn with one font (None: with OpenCV's); a character no font has
    becomes <U+XXXX>."""
    if text.isascii() and text.isprintable():  # most titles: DejaVu has every printable ASCII character
        return [[_font(str(TEXT_FONT), size), text]]
    runs = []
    for ch in unicodedata.normalize("NFC", text):  # macOS hands folder names decomposed: u + combining ¨
        path = _font_file_for(ch)
        if path:
            font, piece = _font(path, size), ch
        elif _cv2_draws(ch):
            font, piece = None, ch
        else:
            font, piece = _font(str(TEXT_FONT), size), f"<U+{ord(ch):04X}>"
        if runs and runs[-1][0] is font:
            runs[-1][1] += piece
        else:
            runs.append([font, piece])
    return runs


@functools.lru_cache(maxsize=4096)  # wrapping measures each title's words again every epoch
def text_width(text: str, size: int = 12) -> float:
    """Pixels put_text's text takes across."""
    return sum(_piece_width(font, piece, size) for font, piece in _text_runs(text, size))


def put_text(img: np.ndarray, lines: list, org: tuple, size: int = 12, color: tuple = (0, 0, 0),
             spacing: int = 16) -> None:
    """Draw lines of text into the uint8 BGR image img (in place), one below the other `spacing` px apart;
    org: the left end of the first line's baseline, as cv2.putText's. Colours are BGR like the image."""
    pil = Image.fromarray(img)
    draw = ImageDraw.Draw(pil)
    by_cv2 = []  # (piece, baseline's left end): drawn into img once Pillow's text is back in it
    for k, line in enumerate(lines):
        x = org[0]
        for font, piece in _text_runs(line, size):
            if font is None:
                by_cv2.append((piece, (round(x), org[1] + spacing * k)))
            else:
                draw.text((x, org[1] + spacing * k), piece, font=font, fill=tuple(color), anchor="ls")
            x += _piece_width(font, piece, size)
    img[:] = np.asarray(pil)
    for piece, at in by_cv2:
        cv2.putText(img, piece, at, tuple(color), cv2.FontFace(), size)


def overlay_cam(gray_u8: np.ndarray, cam: np.ndarray, title: str, display: int = 200) -> np.ndarray:
    """BGR uint8 tile: the plain X-ray, the same X-ray under a JET heat map, a colour bar, and the
    title above them (wrapped to fit; "\n" starts a new line). An all-zero map is not tinted but
    marked: Grad-CAM keeps only positive evidence, and this layer had none for the class."""
    if not np.isfinite(cam).all() or cam.min() < 0 or cam.max() > 1:
        raise ValueError("the CAM must be scaled to [0, 1]")
    img = cv2.cvtColor(cv2.resize(gray_u8, (display, display), interpolation=cv2.INTER_LINEAR), cv2.COLOR_GRAY2BGR)
    if cam.max() > 0:
        heat = cv2.applyColorMap(np.uint8(255 * cv2.resize(cam, (display, display))), cv2.COLORMAP_JET)
        blend = cv2.addWeighted(img, 0.6, heat, 0.4, 0)
    else:
        blend = img.copy()
        cv2.rectangle(blend, (2, display // 2 - 24), (display - 3, display // 2 + 16), (255, 255, 255), -1)
        put_text(blend, ["no positive evidence", "at this layer"], (6, display // 2 - 8), color=(0, 0, 255), spacing=18)
    bar = np.full((display, 44, 3), 255, np.uint8)
    ramp = np.linspace(255, 0, display - 20).astype(np.uint8)[:, None].repeat(12, 1)
    bar[10:display - 10, 4:16] = cv2.applyColorMap(ramp, cv2.COLORMAP_JET)
    put_text(bar, ["1", "0"], (20, 18), spacing=display - 28)  # 1 at the top of the scale, 0 at its foot
    body = np.hstack([img, np.full((display, 4, 3), 255, np.uint8), blend, bar])
    lines, too_wide = [], lambda text: text_width(text) > body.shape[1] - 8
    for part in title.split("\n"):  # wrap each line at word boundaries to the tile's width
        words, line = part.split(" "), ""
        for w in words:
            trial = f"{line} {w}".strip()
            if line and too_wide(trial):
                lines.append(line)
                trial = w
            while len(trial) > 1 and too_wide(trial):  # a file name with no spaces (a DICOM UID) ran off the tile
                k = next(k for k in range(len(trial) - 1, 0, -1) if not too_wide(trial[:k]) or k == 1)
                lines.append(trial[:k])
                trial = trial[k:]
            line = trial
        lines.append(line)
    strip = np.full((6 + 16 * len(lines), body.shape[1], 3), 255, np.uint8)
    put_text(strip, lines, (4, 16))
    return np.vstack([strip, body])


def label_rule(ck: dict, digits: int = 4) -> str:
    """How predictions are labelled, in the words the figures use; ck: a checkpoint (or the run's meta)."""
    classes, threshold = ck["class_names"], ck.get("threshold")
    pos = classes[ck["positive_class"]]
    if len(classes) == 2 and threshold is not None:
        rec = ck.get("recalibration")
        where = f"recalibration folder {'/'.join(Path(rec['folder']).parts[-2:])}" if rec else "validation"
        return f"pred {pos} if P({pos}) >= {threshold:.{digits}f} (threshold chosen on {where})"
    return "pred = the most probable class (argmax" + (f", i.e. P({pos}) >= 0.5)" if len(classes) == 2 else ")")


def decision_threshold(ck: dict) -> float | None:
    """The cut on P(positive) that labels an image: the checkpoint's threshold, 0.5 without one (as
    predict_labels and the metrics count it); None with more than two classes (the argmax)."""
    if len(ck["class_names"]) != 2:
        return None
    return 0.5 if ck.get("threshold") is None else ck["threshold"]


def telling_digits(p: float | list, threshold: float | None, d: int = 2) -> int:
    """Decimals (d or more) at which p and the threshold, both rounded, still compare as p >= threshold
    does: at 2, P=0.6077 (below 0.6087) and 0.6099 (above) would both read 0.61 against 0.61. p may be
    several probabilities printed against one threshold (--predict's table): the digits that tell all."""
    shown = lambda x, d: float(f"{x:.{d}f}")  # as printed (numpy's round can differ from the f-string's)
    ps = np.atleast_1d(p).tolist()
    while threshold is not None and d < 10 and any((shown(x, d) >= shown(threshold, d)) != (x >= threshold)
                                                   for x in ps):
        d += 1
    return d


def gradcam_maps(model: nn.Module, images_u8: torch.Tensor, targets, ck: dict, rt: Runtime,
                 layer: nn.Module | None = None, batch_size: int = 128) -> np.ndarray:
    """Grad-CAM (N x img_size x img_size) of working-size uint8 images, one target class per image;
    ck (a checkpoint, or the run's meta during training) gives img_size and normalization."""
    targets, img_size = np.asarray(targets), ck["img_size"]
    maps = [np.zeros((0, img_size, img_size), np.float32)]
    with GradCAM(model, layer) as cam:
        for i in range(0, len(images_u8), batch_size):
            x = eval_batch(images_u8[i:i + batch_size], img_size, ck["normalization"], rt.device)
            maps.append(cam(x, target=targets[i:i + batch_size].tolist()))
    return np.concatenate(maps)


def predict_labels(probs: np.ndarray, pos: int, threshold: float | None) -> np.ndarray:
    """Two classes: positive when P(positive) >= threshold (0.5 without one, as the metrics count it: argmax
    would give a tie to class 0); more classes: the argmax. The maps explain these labels: with a
    threshold of 0.35, an image at p=0.4 is shown and explained as PNEUMONIA."""
    if probs.shape[1] == 2:
        return np.where(probs[:, pos] >= (0.5 if threshold is None else threshold), pos, 1 - pos)
    return probs.argmax(1)


def save_cam_set(folder: Path, stems: list, images_u8, maps, sc: dict, ck: dict, labels=None, names=None,
                 save_arrays: bool = False) -> list:
    """One overlay PNG per image, {stem}[_true-T]_pred-P_p{prob}[_ood].png (and with save_arrays the
    0-1 map as .npy), for the per-epoch set, the test gallery and --predict (names: file names that
    head the titles); returns the tiles. sc: probs, preds (and in_distribution) per image; ck: the
    checkpoint. Titles name the class whose probability they show, the labelling rule and the class the
    heat map explains (the label), with what its colours mean."""
    classes, pos = ck["class_names"], ck["positive_class"]
    crops = center_crop(images_u8, ck["img_size"]).cpu().numpy()
    tiles = []
    for i, (crop, cam) in enumerate(zip(crops, maps)):
        p = classes[int(sc["preds"][i])]
        shown = classes[pos] if len(classes) == 2 else p  # binary: P(positive); more classes: the top one
        prob = float(sc["probs"][i][pos] if len(classes) == 2 else sc["probs"][i].max())
        ood = "in_distribution" in sc and not sc["in_distribution"][i]
        true = classes[int(labels[i])] if labels is not None else None
        d = telling_digits(prob, decision_threshold(ck))  # the name's P, like the title's, reads as the label
        stem = stems[i] + (f"_true-{true}" if true else "") + f"_pred-{p}_p{prob:.{d}f}" + ("_ood" if ood else "")
        title = (("UNLIKE TRAINING | " if ood else "") + (f"{names[i]}\n" if names is not None else "")
                 + (f"true {true} | " if true else "") + f"pred {p} | P({shown})={prob:.{d}f}\n"
                 + label_rule(ck, d)
                 # the map explains the label, which for NORMAL is not the class whose P the title gives
                 + f"\nheat: evidence for {p} (red: the most in this image, blue: none)")
        tile = overlay_cam(crop, cam, title)
        save_image(folder / f"{stem}.png", tile)
        if save_arrays:
            atomic_write(folder / f"{stem}.npy", lambda q, m=cam: np.save(q, m))
        tiles.append(tile)
    return tiles


def save_grid(path: Path, tiles: list, title: str, cols: int = 4) -> None:
    if not tiles:
        return
    h, w = max(t.shape[0] for t in tiles), max(t.shape[1] for t in tiles)  # titles may wrap differently
    rows = math.ceil(len(tiles) / cols)
    grid = np.full((rows * h + 26, cols * w, 3), 255, np.uint8)
    put_text(grid, [title], (6, 18), size=15)
    for i, t in enumerate(tiles):
        r, c = divmod(i, cols)
        grid[26 + r * h:26 + r * h + t.shape[0], c * w:c * w + t.shape[1]] = t
    save_image(path, grid)


def pick_gradcam_images(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n fixed indices, classes taken in turn so that every class is represented."""
    rng = np.random.default_rng(seed)
    pools = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    turns = sorted((r, k, i) for k, pool in enumerate(pools) for r, i in enumerate(pool))  # round r, class k
    return np.array(sorted(i for _, _, i in turns[:n]), dtype=np.int64)


def gallery_indices(labels: np.ndarray, preds: np.ndarray, paths: list, n_classes: int, per_cell: int,
                    pattern: re.Pattern | None = None) -> np.ndarray:
    """The test gallery: per class, per_cell right and per_cell wrong predictions, in path order but one
    image per patient while the cell has others (a patient's films sit side by side: the demo's two right
    PNEUMONIA examples were both person1000's)."""
    picked = []
    for t in range(n_classes):
        for right in (True, False):
            first, again, seen = [], [], set()
            for i in np.flatnonzero((labels == t) & ((preds == t) == right)):
                if len(first) == per_cell:
                    break
                pid = patient_id(str(paths[i]), pattern)
                (again if pid in seen else first).append(int(i))
                seen.add(pid)
            picked += (first + again)[:per_cell]
    return np.array(sorted(picked), np.int64)


def lung_focus(maps: np.ndarray) -> dict:
    """Share of CAM mass inside LUNG_BOX, and the share a uniform map would have there."""
    m = lung_box_mask(*maps.shape[1:])
    mass = maps.reshape(len(maps), -1).sum(1)
    share = maps[:, m].sum(1)[mass > 0] / mass[mass > 0]
    return {"lung_box": list(LUNG_BOX), "mean_share_in_box": float(share.mean()) if len(share) else float("nan"),
            "uniform_share": float(m.mean()), "n_images": int(len(share)),
            "n_empty_maps": int((mass <= 0).sum())}  # all-zero maps have no share and are left out


# ----------------------------------------------------------------------------------------------
# Plots (matplotlib, no display needed)
# ----------------------------------------------------------------------------------------------
def _savefig(fig, path: Path) -> None:
    atomic_write(path, lambda p: fig.savefig(p, dpi=110, bbox_inches="tight", format="png"))
    plt.close(fig)


def plot_history(history: list, path: Path, best: int) -> None:
    """Loss, accuracy, AUC and learning rate per epoch; the best epoch (the saved model) is marked."""
    from matplotlib.ticker import MaxNLocator
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    ep = [h["epoch"] for h in history]
    for ax, key, name in zip(axes, ("loss", "acc", "auc", "lr"), ("loss", "accuracy", "ROC AUC", "learning rate")):
        if key == "lr":
            ax.plot(ep, [h["lr"] for h in history], "o-", color="gray", label="at epoch end")
        else:
            ax.plot(ep, [h[f"train_{key}"] for h in history], "o-", label="train")
            ax.plot(ep, [h[f"val_{key}"] for h in history], "o-", label="validation")
        ax.axvline(best, color="green", ls="--", lw=1, label=f"best epoch ({best})")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _savefig(fig, path)


def threshold_text(threshold: float) -> str:
    """The decision threshold as the printed summary and the ROC legend give it, to the 4 decimals of the
    page and the figure titles: the legend's 2 read 0.61 where the summary said 0.6087."""
    return f"{threshold:.4f}"


def plot_roc(curves: list, path: Path, title: str, point=None, threshold=None) -> None:
    """ROC curves [(fpr, tpr, label)], and the operating point (1 - specificity, sensitivity) if given."""
    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    for fpr, tpr, label in curves:
        ax.plot(fpr, tpr, lw=2, label=label)
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    if point is not None:
        shown = f" {threshold_text(threshold)}" if threshold is not None else ""
        ax.plot(*point, "ro", label="operating threshold" + shown)
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    _savefig(fig, path)


# ----------------------------------------------------------------------------------------------
# Test report (used after training and by --evaluate)
# ----------------------------------------------------------------------------------------------
def raw_probs(model: nn.Module, ckpt: dict, images_u8: torch.Tensor, rt: Runtime, desc: str = "") -> np.ndarray:
    """The network's uncalibrated probabilities, at the checkpoint's size and normalisation, mirrored too
    where its run used TTA."""
    return predict_probs(model, images_u8, ckpt["img_size"], ckpt["normalization"], rt,
                         bool(ckpt["config"].get("tta", False)), desc=desc)


def network_outputs(model: nn.Module, ckpt: dict, images_u8: torch.Tensor, rt: Runtime,
                    desc: str = "") -> tuple[np.ndarray, list | None]:
    """The network's part of score_images: raw (uncalibrated) probabilities and, with a guard, its
    layer features (None without). Calibration, threshold and cutoff are applied after, by scores_from."""
    raw, guard = raw_probs(model, ckpt, images_u8, rt, desc), ckpt.get("ood")
    feats = (layer_features(model, images_u8, ckpt["img_size"], ckpt["normalization"], rt.device, guard.get("grid", 1))
             if guard else None)
    return raw, feats


def score_images(model: nn.Module, ckpt: dict, images_u8: torch.Tensor, rt: Runtime, desc: str = "") -> dict:
    """What every report says about images: calibrated probabilities, the labels the checkpoint's
    threshold gives, and the out-of-distribution score (nan without a guard)."""
    return scores_from(ckpt, *network_outputs(model, ckpt, images_u8, rt, desc))


def scores_from(ckpt: dict, raw: np.ndarray, feats: list | None) -> dict:
    """score_images from network_outputs' raw probabilities and features, under ckpt's calibration,
    threshold and guard (the guard's grid must be the one the features were taken with)."""
    probs = calibrate(raw, ckpt.get("calibration"))
    guard = ckpt.get("ood")
    ood = ood_scores(guard, feats) if guard else np.full(len(raw), np.nan)
    return {"raw": raw, "probs": probs, "ood_score": ood,
            "preds": predict_labels(probs, ckpt["positive_class"], ckpt.get("threshold")),
            "in_distribution": ood <= guard["cutoff"] if guard else np.ones(len(raw), bool)}


def share_flagged(in_distribution: np.ndarray) -> float:
    """The share of images the guard flags, one formula for every file: test_metrics.json's (flagged / n)
    and recalibration.json's (1 - in-distribution share) differed in the last digits for the same images."""
    return float(np.mean(~np.asarray(in_distribution, bool))) if len(in_distribution) else 0.0


def numbered_stems(prefix: str, n: int, least: int = 2) -> list:
    """prefix + each index 0..n-1, zero-padded to the digits the last one needs (`least` or more): test_00 ...
    test_99, but test_000 ... test_100, as with a fixed 2 digits test_100 sorted before test_11 as text."""
    width = max(least, len(str(max(n - 1, 0))))
    return [f"{prefix}{i:0{width}d}" for i in range(n)]


def warn_if_unlike_training(in_distribution: np.ndarray, where: str) -> None:
    share = share_flagged(in_distribution)
    if share > 0.10:
        log.warning(f"WARNING: {share:.0%} of the images in {where} do not look like the training data "
                    "(ood_score above the cutoff): predictions on them are unreliable")


def as_text(path) -> str:
    """A path as text every writer takes: the bytes of a name that is not UTF-8 (a Latin-1 name from an old
    archive, which Python keeps as surrogates) as \\xe9 escapes. Raw, they crashed the CSV writer after the
    whole test report, and OpenCV's drawing of --predict's titles killed the process without a message."""
    return os.fsencode(str(path)).decode(errors="backslashreplace")


def prediction_rows(paths: list, sc: dict, class_names: list, threshold, guarded: bool,
                    labels=None) -> tuple[list, list]:
    """Header and rows of predictions.csv / test_predictions.csv; without a guard in_distribution is
    empty (unknown), not True. Probabilities and scores in full (Python's shortest exact text): at 6
    decimals, a confident or a flat model's distinct P turned into ties (the AUC from the CSV was not
    the report's), and a P or score rounded across the threshold or the cutoff read against its label."""
    header = ["path", *(["true"] if labels is not None else []), "predicted",
              *[f"prob_{c}" for c in class_names], "threshold", "ood_score", "in_distribution"]
    rows = [[as_text(path), *([class_names[int(labels[i])]] if labels is not None else []),
             class_names[sc["preds"][i]],
             *[str(float(v)) for v in sc["probs"][i]], "none (argmax)" if threshold is None else threshold,
             str(float(sc["ood_score"][i])), bool(sc["in_distribution"][i]) if guarded else ""]
            for i, path in enumerate(paths)]
    return header, rows


def plot_reliability(y, prob, ece: float, path: Path, title: str) -> None:
    frac, mean = calibration_curve(y, prob, n_bins=15, strategy="uniform")
    fig, (ax, hx) = plt.subplots(2, 1, figsize=(4.6, 5.6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.plot(mean, frac, "o-", label=f"this model (ECE {ece:.3f})")
    ax.set_ylabel("observed frequency")
    ax.set_title(title)
    ax.legend(loc="upper left")
    hx.hist(prob, bins=15, range=(0, 1), color="gray")
    hx.set_xlabel("predicted probability")
    hx.set_ylabel("images")
    _savefig(fig, path)


def test_report(model: nn.Module, ckpt: dict, test: Split, rt: Runtime, run_dir: Path,
                checks: dict | None = None) -> dict:
    """test_metrics.json, test_predictions.csv, the test figures and the Grad-CAM gallery of a
    checkpoint, with the bootstrap and gallery settings in its config: the run's, or --evaluate's own.
    checks: what was found about the folder (copies_of_training_images), kept beside n."""
    cfg = Config.from_dict(ckpt["config"])
    class_names, pos = ckpt["class_names"], ckpt["positive_class"]
    sc = score_images(model, ckpt, test.images, rt, desc="test")
    probs, preds, inside = sc["probs"], sc["preds"], sc["in_distribution"]
    labels, binary, threshold = test.labels.numpy(), len(class_names) == 2, ckpt.get("threshold")
    ece = {"ece": report_ece(labels, probs, pos), "ece_uncalibrated": report_ece(labels, sc["raw"], pos)}  # 15 bins
    res = {"n": int(len(labels)), **(checks or {}), "class_names": class_names, "positive_class": class_names[pos],
           "tta": bool(ckpt["config"].get("tta", False)), "calibrated": ckpt.get("calibration") is not None,
           "threshold_policy": ckpt.get("threshold_policy") if threshold is not None else
           "none in the checkpoint: labels are P >= 0.5" if binary else "argmax (more than two classes)",
           "thresholds_by_policy": ckpt.get("thresholds_by_policy")}
    if threshold is not None:
        res["threshold_fitted_on"] = (f"the recalibration folder {ckpt['recalibration']['folder']}"
                                      if ckpt.get("recalibration") else "validation")
    if binary:
        y, s = labels == pos, probs[:, pos]
        thr = decision_threshold(ckpt)
        at_thr = lambda y, s: {"n": int(len(y)), "auc": roc_auc(y, s),  # AUC with its CI, the metrics at thr
                               "auc_ci95": bootstrap_auc_ci(y, s, cfg.bootstrap, cfg.seed), **binary_metrics(y, s, thr)}
        res |= {**at_thr(y, s), "at_0.5": binary_metrics(y, s, 0.5), **ece}
        fpr, tpr, _ = roc_curve(y, s) if 0 < y.sum() < len(y) else ([0, 1], [0, 1], None)
        ci = res["auc_ci95"]
        ci_text = f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})" if all(map(math.isfinite, ci)) else ""
        plot_roc([(fpr, tpr, f"AUC {res['auc']:.3f}{ci_text}")], run_dir / "roc_curve.png",
                 f"test ROC ({class_names[pos]})", (1 - res["specificity"], res["sensitivity"]), thr)
        plot_reliability(y, s, res["ece"], run_dir / "reliability.png", f"test calibration: P({class_names[pos]})")
    else:
        at_thr = lambda labels, probs: {"n": int(len(labels)), "auc": multiclass_auc(labels, probs, pos),
                                        "auc_ci95": bootstrap_auc_ci(labels, probs, cfg.bootstrap, cfg.seed),
                                        "auc_classes": int(sum(0 < (labels == k).sum() < len(labels)  # averaged
                                                               for k in range(len(class_names)))),
                                        "accuracy": accuracy_score(labels, probs.argmax(1))}
        res |= {**at_thr(labels, probs), "threshold": None, **ece}  # ECE of the top-label confidence
        curves = [(*roc_curve(labels == k, probs[:, k])[:2], f"{name} (AUC {roc_auc(labels == k, probs[:, k]):.3f})")
                  for k, name in enumerate(class_names) if 0 < (labels == k).sum() < len(labels)]
        plot_roc(curves, run_dir / "roc_curve.png", "test ROC, one vs rest")
        plot_reliability(preds == labels, probs.max(1), res["ece"], run_dir / "reliability.png",
                         "test calibration: confidence of the predicted class")
    cm = confusion_matrix(labels, preds, labels=range(len(class_names)))
    res["confusion_matrix"] = cm.tolist()
    fig, ax = plt.subplots(figsize=(4.2, 3.8))
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
    ax.set_xticks(range(len(class_names)), class_names)
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set(xlabel="predicted", ylabel="true", title="test confusion matrix\n" + label_rule(ckpt))
    _savefig(fig, run_dir / "confusion_matrix.png")
    if ckpt.get("ood"):
        res["ood"] = {"cutoff": ckpt["ood"]["cutoff"], "quantile": ckpt["ood"].get("quantile"),  # as for the threshold:
                      "cutoff_fitted_on": ckpt["ood"].get("cutoff_fitted_on") or "validation",  # where it came from
                      "flagged": int((~inside).sum()), "share_flagged": share_flagged(inside)}
        if inside.any():
            res["ood"]["in_distribution_only"] = (at_thr(y[inside], s[inside]) if binary
                                                  else at_thr(labels[inside], probs[inside]))
        warn_if_unlike_training(inside, "the test set")
    write_csv(run_dir / "test_predictions.csv",
              *prediction_rows([str(p) for p in test.paths], sc, class_names, threshold, bool(ckpt.get("ood")), labels))

    # Grad-CAM: the share of heat inside the lung box over the whole test set, and a gallery of right and
    # wrong predictions, at least one of each per class (--num-gradcam-images 0: no gallery).
    maps_all = gradcam_maps(model, test.images, preds, ckpt, rt)
    res["gradcam"] = lung_focus(maps_all)
    per_cell = max(1, cfg.num_gradcam_images // (2 * len(class_names))) if cfg.num_gradcam_images else 0
    gallery = gallery_indices(labels, preds, test.paths, len(class_names), per_cell, patient_pattern(cfg.patient_regex))
    if len(gallery):
        folder = run_dir / "grad_cam"
        folder.mkdir(exist_ok=True)
        tiles = save_cam_set(folder, numbered_stems("test_", len(gallery)), test.images[gallery],
                             maps_all[gallery], {k: v[gallery] for k, v in sc.items()},
                             ckpt, labels[gallery], save_arrays=cfg.save_cam_arrays)
        save_grid(folder / "test_summary.png", tiles, "test gallery: right and wrong predictions | "
                  + label_rule(ckpt))
        res["gradcam"]["gallery"] = lung_focus(maps_all[gallery])
        res["gallery_files"] = [as_text(Path(test.paths[i]).name) for i in gallery]
    save_json(run_dir / "test_metrics.json", res)
    return res


def summary_table(res: dict) -> str:
    rows = [("n", res["n"]), ("AUC", f"{res['auc']:.4f}")]
    ood = res.get("ood", {}).get("in_distribution_only")
    lo, hi = res["auc_ci95"]  # nan without bootstrap resamples
    rows.append(("AUC 95% CI", f"{lo:.4f} - {hi:.4f}" if math.isfinite(lo) and math.isfinite(hi)
                 else "none (--bootstrap 0, a class with a single test image, or no resample kept both classes)"))
    if "sensitivity" in res:  # two classes
        # None: a checkpoint older than the setting, as the report page says it
        policy = res["threshold_policy"] or "policy not recorded"
        rows.append(("threshold", f"{threshold_text(res['threshold'])} ({policy})"))
        for k in ("accuracy", "sensitivity", "specificity", "precision", "f1"):
            rows.append((k, f"{res[k]:.4f}  (at 0.5: {res['at_0.5'][k]:.4f})"
                            + (f"  (in-distribution only: {ood[k]:.4f})" if ood else "")))
    else:
        inside = (f"  (in-distribution only: {ood['accuracy']:.4f}, AUC {ood['auc']:.4f} over {ood['auc_classes']} "
                  "classes)" if ood else "")
        rows.append(("accuracy", f"{res['accuracy']:.4f}{inside}"))
    ece = f"uncalibrated: {res['ece_uncalibrated']:.4f}" if res["calibrated"] else "the checkpoint has no calibration"
    rows.append(("calibration error (ECE)", f"{res['ece']:.4f}  ({ece})"))
    if "ood" in res:
        rows.append(("unlike training (OOD)", f"{res['ood']['flagged']} of {res['n']} "
                                              f"({res['ood']['share_flagged']:.1%}) flagged"))
    rows.append(("CAM share in lung box", f"{res['gradcam']['mean_share_in_box']:.3f} "
                                          f"(uniform: {res['gradcam']['uniform_share']:.3f})"))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


# ----------------------------------------------------------------------------------------------
# Report page: one static report.html per folder, built from the files the folder holds
# ----------------------------------------------------------------------------------------------
REPORT_PNGS = ("roc_curve.png", "confusion_matrix.png", "reliability.png")  # shown with the test metrics
REPORT_FILES = ("config.json", "train.log", "history.csv", "test_metrics.json", "test_predictions.csv",
                "predictions.csv", "recalibration.json", "best_model.pt", "recalibrated_model.pt")
REPORT_CSS = ("body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1180px;color:#222}"
              "table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:2px 8px;"
              "text-align:right}th{background:#f2f2f2}td:first-child{text-align:left}"
              "img{max-width:100%;vertical-align:top}figure{display:inline-block;margin:4px}"
              "figure img{max-width:560px}figure.wide img{max-width:100%}"
              ".headline{font-size:17px;background:#f6f8fa;padding:8px 12px}")


def report_outdated(folder: Path) -> bool:
    """folder/report.html is missing, or older than its test_metrics.json, the last file a run writes before
    its page: a run stopped between the two kept the last epoch's page, without the test set. (Not against
    every file it shows: a config.json edited by hand since is no unfinished run.)"""
    page, metrics = folder / "report.html", folder / "test_metrics.json"
    return not page.is_file() or (metrics.is_file() and metrics.stat().st_mtime > page.stat().st_mtime)


def _fmt(v) -> str:
    """A value as the page shows it; floats with 4 decimals, or 4 significant digits when tiny or huge."""
    if v is None:
        return "–"  # JSON null: a NaN metric
    if isinstance(v, (list, dict)):  # a list of lists or of dicts (config.json's resumes) as JSON, not Python's repr
        if isinstance(v, dict) or any(isinstance(x, (list, dict)) for x in v):
            return json.dumps(v, ensure_ascii=False)
        return ", ".join(map(_fmt, v))
    if isinstance(v, float):
        return f"{v:.4f}" if v == 0 or 1e-3 <= abs(v) < 1e6 else f"{v:.3e}"
    return str(v)


def _no_threshold(n_classes: int) -> str:
    """What the page shows for the threshold of a run with more than two classes: it has none (labels are
    the argmax), which "–", the page's sign for a NaN metric, did not say."""
    return f"n/a ({n_classes} classes: argmax)"


def _cell(key: str, v, n_classes: int) -> str:
    """_fmt, but a null threshold (or thresholds_by_policy) says why: a run with more than two classes has
    none, and a two-class checkpoint without one (a last.pt) labels at P >= 0.5, as its metrics count it."""
    if v is None and key.rsplit(".", 1)[-1] in ("threshold", "thresholds_by_policy"):
        return _no_threshold(n_classes) if n_classes > 2 else "none (argmax, P >= 0.5)"
    return _fmt(v)


def _csv_cell(text: str) -> str:
    with contextlib.suppress(ValueError):
        return str(int(text))
    with contextlib.suppress(ValueError):
        return _fmt(float(text))
    return text


def _flatten(d: dict, prefix: str = "") -> list:
    """[("a.b", value)] of a nested dict: every key of test_metrics.json or config.json, known or not."""
    return [row for k, v in d.items()
            for row in (_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else [(f"{prefix}{k}", v)])]


class _Html(str):
    """Text that is already HTML (an image in a table cell): not escaped again."""


def _table(table_id: str, header: list, rows: list) -> str:
    cell = lambda c: f"<td>{c if isinstance(c, _Html) else html.escape(c)}</td>"
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(map(cell, r)) + "</tr>" for r in rows)
    return f'<table id="{table_id}"><tr>{head}</tr>{body}</table>'


def _img(rel: str, caption: str, width: int = 0, wide: bool = False) -> _Html:
    """An image linked to itself (click for full size); with a width, a thumbnail without caption."""
    src, alt = urllib.parse.quote(rel), html.escape(caption)
    if width:
        return _Html(f'<a href="{src}"><img src="{src}" alt="{alt}" width="{width}" loading="lazy"></a>')
    return _Html(f'<figure{" class=wide" if wide else ""}><a href="{src}"><img src="{src}" alt="{alt}"></a>'
                 f"<figcaption>{alt}</figcaption></figure>")


def write_report(folder: Path, title: str, config: dict | None = None) -> Path:
    """folder/report.html, a static page (no script, no network) of whatever the folder holds: test
    metrics (every key of test_metrics.json), REPORT_PNGS, the history table and plot, the Grad-CAM
    summaries of the first, middle and last epochs, the test gallery, predictions.csv with each image's
    overlay, recalibration.json's before and after, and the configuration (config.json, or `config` for
    --predict/--evaluate/--recalibrate). Images are
    linked relative to the page, so the folder can be moved or zipped."""
    folder = Path(folder)
    cam = folder / "grad_cam"
    parts = [f"<h1>{html.escape(title)}</h1>"]
    if (folder / "test_metrics.json").is_file():
        m = json.loads((folder / "test_metrics.json").read_text(encoding="utf-8"))
        line = f"Test AUC {_fmt(m.get('auc'))}"
        if m.get("auc_ci95") and None not in m["auc_ci95"]:  # json writes a nan interval as nulls
            line += f" (95% CI {_fmt(m['auc_ci95'][0])} – {_fmt(m['auc_ci95'][1])})"
        if m.get("threshold_fitted_on"):  # absent: no threshold in the checkpoint, so threshold_policy says so
            line += (f"; decision threshold {_fmt(m['threshold'])}, chosen on {m['threshold_fitted_on']} "
                     f"({m.get('threshold_policy') or 'policy not recorded'})")
        elif m.get("threshold_policy"):
            line += f"; {m['threshold_policy']}"
        if m.get("copies_of_training_images"):  # absent in reports made before training runs counted them
            # The page reads only this count: "trained or validated on" was wrong for a recalibrated model's folder
            line += (f"; {m['copies_of_training_images']} of the {m['n']} images are copies of images the model had "
                     "already seen (in training, validation or a recalibration): optimistic for them")
        parts += ["<h2>Test set</h2>", f'<p class="headline">{html.escape(line)}</p>',
                  _table("test-metrics", ["metric", "value"],
                         [(k, _cell(k, v, len(m.get("class_names") or []))) for k, v in _flatten(m)])]
        parts += [_img(p, p) for p in REPORT_PNGS if (folder / p).is_file()]
    if (folder / "recalibration.json").is_file():
        m = json.loads((folder / "recalibration.json").read_text(encoding="utf-8"))
        keys = list(dict.fromkeys([*m["before"], *m["after"]]))  # a checkpoint without a threshold has fewer
        n_classes = len(m["images"])  # the classes, each with its count
        parts += ["<h2>Recalibration: the same images, before and after</h2>",
                  f"<p>{html.escape(', '.join(f'{c} {n}' for c, n in m['images'].items()))} images; fitted and "
                  "measured on the same images: judge it on other images of that site with --evaluate"
                  + (f"; {m['copies_of_training_images']} of them are copies of images the model had already seen "
                     "(in training, validation or a recalibration): both figures are optimistic for them"
                     if m.get("copies_of_training_images")
                     else "") + "</p>",
                  _table("recalibration", ["measure", "before", "after"],
                         [(k, _cell(k, m["before"].get(k), n_classes), _cell(k, m["after"].get(k), n_classes))
                          for k in keys])]
    if (folder / "history.csv").is_file():
        with open(folder / "history.csv", newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
        parts += ["<h2>Training history</h2>", _img("training_history.png", "training_history.png", wide=True)
                  if (folder / "training_history.png").is_file() else "",
                  _table("history", rows[0], [[_csv_cell(c) for c in r] for r in rows[1:]])]
    # In epoch order: past epoch 999 the names outgrow their 3 digits, and as text summary_epoch_1000
    # sorted before _101, so a 1,001-epoch run showed epochs 499 and 999 as its middle and last.
    summaries = sorted(cam.glob("summary_epoch_*.png"), key=lambda p: (len(p.name), p.name))
    if summaries:
        picks = sorted({0, len(summaries) // 2, len(summaries) - 1})
        parts += ["<h2>Grad-CAM of the fixed validation images: first, middle and last epoch</h2>"]
        parts += [_img(f"grad_cam/{summaries[i].name}", summaries[i].stem.replace("_", " ")) for i in picks]
    if (cam / "test_summary.png").is_file():
        parts += ["<h2>Grad-CAM test gallery: right and wrong predictions</h2>",
                  _img("grad_cam/test_summary.png", "grad_cam/test_summary.png")]
    if (folder / "predictions.csv").is_file():
        with open(folder / "predictions.csv", newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
        # --predict's overlays are named {k:05d}_<file>: five digits or more (100,001 images or more: six each)
        overlays = {int(m[1]): p.name for p in cam.glob("*.png") if (m := re.match(r"(\d{5,})_", p.name))}
        # As the CSV has them (in full): rounded to 4, P and threshold could read alike under other labels.
        body = [[*r, _img(f"grad_cam/{overlays[k]}", overlays[k], 128) if k in overlays else ""]
                for k, r in enumerate(rows[1:])]
        parts += [f"<h2>Predictions ({len(body)} images)</h2>", _table("predictions", [*rows[0], "overlay"], body)]
    if config is None and (folder / "config.json").is_file():
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if config:
        parts += ["<h2>Configuration and library versions</h2>",
                  _table("config", ["setting", "value"], [(k, _fmt(v)) for k, v in _flatten(config)])]
    files = [f'<a href="{n}">{n}</a>' for n in REPORT_FILES if (folder / n).is_file()]
    parts.append(f"<p>Files: {' · '.join(files)}</p>" if files else "")
    page = (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{REPORT_CSS}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")
    atomic_write(folder / "report.html", lambda p: p.write_text(page, encoding="utf-8"))
    return folder / "report.html"


# ----------------------------------------------------------------------------------------------
# Synthetic chest X-rays for --demo and the tests
# ----------------------------------------------------------------------------------------------
def synth_xray(rng: np.random.Generator, size: int, pneumonia: bool) -> tuple[np.ndarray, list]:
    """A chest-X-ray-like uint8 image (body, lungs, ribs, spine, heart); with pneumonia 1-2 soft
    opacities inside a lung, also returned as lesions (cx, cy, radius) in fractions of the size."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    j = lambda s: rng.uniform(-s, s)
    img = np.full((size, size), 0.06, np.float32)
    body = ((xx - 0.5 - j(0.02)) / (0.44 + j(0.03))) ** 2 + ((yy - 0.58) / (0.52 + j(0.03))) ** 2 < 1
    img[body] = 0.50
    lungs = []
    for side in (-1, 1):
        cx, cy, rx, ry = 0.5 + side * (0.17 + j(0.015)), 0.47 + j(0.02), 0.12 + j(0.01), 0.26 + j(0.02)
        lung = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 < 1
        img[lung] = 0.16
        lungs.append((cx, cy, rx, ry))
    for k in range(9):  # ribs: bright arcs across the lungs
        y0 = 0.24 + 0.055 * k + j(0.005)
        arc = np.abs(yy - (y0 + 0.5 * (xx - 0.5) ** 2)) < 0.007
        img[arc & body] += 0.10
    img[(np.abs(xx - 0.5) < 0.035) & body] = 0.62  # spine
    heart = ((xx - 0.56 - j(0.02)) / 0.11) ** 2 + ((yy - 0.64) / 0.10) ** 2 < 1
    img[heart] = np.maximum(img[heart], 0.45)
    lesions = []
    if pneumonia:
        for _ in range(int(rng.integers(1, 3))):
            cx, cy, rx, ry = lungs[int(rng.integers(0, 2))]
            a, r = rng.uniform(0, 2 * np.pi), np.sqrt(rng.uniform(0, 0.5))
            # Contrast and size measured for the demo: at 0.22-0.32 and 0.05-0.08 its 12 epochs called
            # every validation image PNEUMONIA until epoch 9; at these values both classes are
            # predicted from epoch 3-4 on.
            lx, ly, rad = cx + r * rx * np.cos(a), cy + r * ry * np.sin(a), rng.uniform(0.06, 0.09)
            img += rng.uniform(0.30, 0.42) * np.exp(-((xx - lx) ** 2 + (yy - ly) ** 2) / (2 * (rad / 1.5) ** 2))
            lesions.append((float(lx), float(ly), float(rad)))
    img = cv2.GaussianBlur(img, (0, 0), size / 160)
    img = img * rng.uniform(0.85, 1.15) + rng.normal(0, 0.025, img.shape)  # exposure and noise
    return np.clip(img * 255, 0, 255).astype(np.uint8), lesions


def write_synthetic_dataset(root: Path, n_train: dict, n_test: dict, size: int = 128, seed: int = 0) -> dict:
    """Write root/{train,test}/{NORMAL,PNEUMONIA}/*.png with Kermany-style patient names, some patients
    with two images (so the patient-grouped split is exercised). Returns the lesions of every PNEUMONIA
    file ({relative path: [(cx, cy, radius), ...]}), also saved as lesions.json."""
    rng = np.random.default_rng(seed)
    lesions, pid = {}, 0
    for split, counts in (("train", n_train), ("test", n_test)):
        for cls, n in counts.items():
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            k = 0
            while k < n:
                pid += 1
                for shot in range(min(n - k, 1 + int(rng.random() < 0.25))):
                    img, les = synth_xray(rng, size, cls == "PNEUMONIA")
                    name = f"person{pid}_bacteria_{k}.png" if cls == "PNEUMONIA" else f"IM-{pid:04d}-{shot + 1:04d}.png"
                    save_image(d / name, img)  # checked: cv2.imwrite wrote truncated files on a full disk
                    if les:
                        lesions[f"{split}/{cls}/{name}"] = les
                    k += 1
    save_json(root / "lesions.json", lesions)
    return lesions


# ----------------------------------------------------------------------------------------------
# Main: input checks, run folder, training, report; predict and evaluate modes
# ----------------------------------------------------------------------------------------------
def check_split_dir(path: Path, name: str) -> tuple[list, list]:
    if not path.is_dir():
        raise CXRError(f"{path} not found: DATA_DIR must hold {name}/<CLASS>/ folders "
                       "(edit DATA_DIR in train_cxr.py or pass --data-dir)")
    try:
        classes, samples = list_image_folder(path)
    except FileNotFoundError:
        raise CXRError(f"{path} has no class folders: put the images in {path}/<CLASS>/ (e.g. NORMAL, PNEUMONIA)")
    empty = [c for c, n in zip(classes, np.bincount([s[1] for s in samples], minlength=len(classes))) if n == 0]
    if empty:
        # Only train/ decides the classes: elsewhere (test/, --evaluate, --recalibrate) every class needs images.
        raise CXRError(f"class folder {path / empty[0]} has no images ({', '.join(IMAGE_EXTENSIONS)}): " + (
            "add images or remove the folder" if name == "train" else "add images of that class"))
    if len(classes) < 2:
        raise CXRError(f"{path} has only the class folder {classes[0]!r}: a classifier needs two or more")
    odd = [c for c in classes if as_text(c) != c]  # every label, title, CSV and report holds the class name
    if odd:
        raise CXRError(f"class folder {as_text(path / odd[0])} has a name that is not UTF-8: rename it")
    # NORMAL/ and Normal/ (two sources merged on a case-sensitive disk) are two classes to ImageFolder: a
    # 2-class set became a 3-class model, its labels and AUC another kind, said only by the class list.
    same = collections.defaultdict(list)
    for c in classes:
        same[re.sub(r"[\s_-]+", " ", c).strip().casefold()].append(c)
    for names in (n for n in same.values() if len(n) > 1):
        log.warning(f"warning: the class folders {' and '.join(names)} in {path} differ only in case, spaces, "
                    "underscores or hyphens, and are different classes: if they hold one class, merge them into one "
                    "folder")
    return classes, samples


def check_same_classes(root: Path, name: str, classes: list, found: list) -> None:
    """The class folders of DATA_DIR/name (test, val) must be train's: NORMAL/Pneumonia against
    NORMAL/PNEUMONIA would be mislabelled or dropped images, never what was meant."""
    if found != classes:
        raise CXRError(f"class folders differ: {root / 'train'} has {classes}, {root / name} has "
                       f"{found}; make them match")


TWO_CLASS_FLAGS = ("threshold_policy", "positive_class")


def check_two_class_flags(given: set, classes: list) -> None:
    """A threshold policy picks a cut on P(positive), and the positive class is the one sensitivity, AUC
    and threshold refer to; with more classes labels are the argmax and the AUC the mean over classes,
    so either flag typed (in given) would be ignored: refused instead."""
    typed = [k for k in TWO_CLASS_FLAGS if k in given]
    if len(classes) > 2 and typed:
        raise CXRError(f"--{typed[0].replace('_', '-')} needs two classes, and there are {len(classes)} "
                       f"({', '.join(classes)}): labels are the most probable class and the AUC is the mean "
                       "over classes; drop the flag")


def check_every_class(split: Split, classes: list, what: str, folder: Path) -> None:
    """Every class must keep a readable image (the folders were checked for files, not for readable ones):
    without one, AUC and calibration are undefined and a report would quietly cover fewer classes."""
    missing = sorted(set(range(len(classes))) - set(split.labels.tolist()))
    if missing:
        raise CXRError(f"{what} has no usable images of class {classes[missing[0]]}: check {folder}")


def report_bad_files(bad: list, strict: bool) -> None:
    if not bad:
        return
    listing = "; ".join(f"{as_text(p)} ({why})" for p, why in bad)  # a name that is not UTF-8 as escapes
    if strict:
        raise CXRError(f"{len(bad)} unreadable image file(s), --strict is on: {listing}. "
                       "Fix or remove them, or run without --strict to skip them")
    log.warning(f"warning: skipping {len(bad)} unreadable image file(s): {listing}")


def file_sha1(path) -> str | None:
    """The sha1 of a file's bytes (hex), or None for an empty or unreadable file."""
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:  # an empty file (a failed copy) is no image, nor a copy
                return None  # of one: decoding lists it; empty files in train and test were "copies" here
            return hashlib.file_digest(f, "sha1").hexdigest()
    except OSError:  # a broken link or an unreadable file: decoding lists it with the reason
        return None


def warn_duplicates(splits: dict) -> dict:
    """Warn about byte-identical files in two splits ({name: [paths]}): a test image that is also a
    training image makes the test figures optimistic. Returns each readable file's sha1 by path."""
    first, dups, digests = {}, [], {}
    for name, paths in splits.items():
        for p in paths:
            digest = file_sha1(p)
            if digest is None:
                continue
            digests[str(p)] = digest
            seen = first.setdefault(digest, (name, p))
            if seen[0] != name:
                dups.append(f"{seen[1]} = {p}")
    if dups:
        log.warning(f"warning: {len(dups)} file(s) are byte-identical copies across train/val/test, "
                    f"e.g. {'; '.join(dups[:3])}: remove the copies, or the test and validation "
                    "figures will be optimistic")
    return digests


def digest_table(digests) -> torch.Tensor:
    """sha1 digests (hex) as one sorted (N, 20) uint8 tensor, a row per distinct content: what a checkpoint
    keeps of its training and validation files (20 bytes each; plain data, so weights_only loads it)."""
    rows = sorted({bytes.fromhex(d) for d in digests if d})
    return torch.from_numpy(np.frombuffer(b"".join(rows), dtype=np.uint8).reshape(-1, 20).copy())


def seen_copies(ckpt: dict, digests) -> list | None:
    """Per file digest (hex; None for an empty or unreadable file), whether a file with those bytes is one the
    checkpoint's model was trained or validated on (its trained_on_sha1) or a --recalibrate refitted its
    calibration, threshold and cutoff on (recalibrated_on_sha1, absent before that); None for a checkpoint made
    before it kept them. Bytes only: a copy re-encoded (PNG saved as JPEG, a DICOM re-exported) is another file."""
    if ckpt.get("trained_on_sha1") is None:
        return None
    known = {row.tobytes() for key in ("trained_on_sha1", "recalibrated_on_sha1") if ckpt.get(key) is not None
             for row in ckpt[key].numpy()}
    return [d is not None and bytes.fromhex(d) in known for d in digests]


def training_copies(ckpt: dict, paths: list, where, source, then: str = "", digests=None) -> list | None:
    """seen_copies of `paths` (the files in `where`; their file_sha1s if `digests` is given), warned in one line
    ending in `then` (by default what it means for --evaluate's and --recalibrate's figures); None, said once,
    for a checkpoint made before it kept the digests."""
    then = then or "the figures are optimistic for them; remove them to measure the model on images it has not seen"
    flags = seen_copies(ckpt, [file_sha1(p) for p in paths] if digests is None else digests)
    if flags is None:
        log.warning(f"note: {source} was made before checkpoints kept the digests of their training images, so "
                    f"whether {where} holds copies of them cannot be checked")
        return None
    copies = [p for p, seen in zip(paths, flags) if seen]
    if copies:
        fitted = ("trained, validated or recalibrated" if ckpt.get("recalibrated_on_sha1") is not None
                  else "trained or validated")
        if len(paths) == 1:  # one file given to --predict: "1 of the 1 images in scan.png" said it clumsily
            which = f"{as_text(copies[0])} is a byte-identical copy of an image {source} was {fitted} on"
        else:
            which = (f"{len(copies)} of the {len(paths)} images in {where} are byte-identical copies of images "
                     f"{source} was {fitted} on (e.g. {as_text(copies[0])})")
        log.warning(f"warning: {which}: {then}")
    return flags


def copies_of_training_images(ckpt: dict, paths: list, folder: Path, source, digests=None) -> int | None:
    """How many of `paths` are byte-identical copies of files the checkpoint's model was trained, validated or
    recalibrated on, warned in one line; None, said once, for a checkpoint made before it kept their digests."""
    flags = training_copies(ckpt, paths, folder, source, digests=digests)
    return None if flags is None else sum(flags)


def same_group_for_copies(groups: list, digests: list) -> list:
    """Patient groups merged where byte-identical files (same digest) fall in different groups: copies
    under other names were carved into both train and validation (8 of 29 validation images, in a
    review's test), and a validation image seen in training makes validation optimistic."""
    groups_of, parent = collections.defaultdict(list), {}
    for g, d in zip(groups, digests):
        if d is not None:
            groups_of[d].append(g)

    def top(g):
        while parent.get(g, g) != g:
            g = parent[g]
        return g
    for gs in groups_of.values():
        for g in gs[1:]:
            if top(g) != top(gs[0]):
                parent[top(g)] = top(gs[0])
    if n := sum(len(gs) for gs in groups_of.values() if len(set(gs)) > 1):
        log.info(f"patients: {n} images have a byte-identical copy under another patient id; their patients "
                 "are kept on one side of the validation split")
    return [top(g) for g in groups]


def prepare_data(cfg: Config, typed: set = frozenset(), group_copies: bool = True, own_in_class: bool = True) -> dict:
    """Check the data folders, decode every image once, carve the validation split. typed: the
    settings typed on the command line (a typed one this data would ignore is refused); group_copies
    False carves as runs made before same_group_for_copies did, own_in_class False as runs made before a
    file that names no patient was its own within its class (their --resume must see that split)."""
    root = Path(cfg.data_dir)
    if not root.is_dir():
        raise CXRError(f"DATA_DIR {root} not found: edit DATA_DIR in train_cxr.py or pass --data-dir "
                       "(a folder with train/ and optionally test/), or try --demo")
    if not (root / "train").is_dir() and root.name.lower() in ("train", "test", "val"):
        raise CXRError(f"{root} is a split folder, not DATA_DIR: pass its parent, --data-dir {root.parent}")
    # D/train/PNEUMONIA was told "D/train/PNEUMONIA/train not found", not the folder to pass. A class folder has
    # other classes beside it: a lone DATA_DIR that happens to sit in a folder named train keeps that error.
    if not (root / "train").is_dir() and root.parent.name.lower() in ("train", "test", "val") and sum(
            e.is_dir() and not e.name.startswith(".") for e in os.scandir(root.parent)) > 1:
        raise CXRError(f"{root} is a class folder of the split folder {root.parent}, not DATA_DIR: pass the folder "
                       f"that holds {root.parent.name}/, --data-dir {root.parent.parent}")
    classes, train_samples = check_split_dir(root / "train", "train")
    # Refused from the class folders, before the images are decoded; here, where train/ is listed once: listed
    # again for it, a sub-folder that cannot be read was warned about twice.
    check_two_class_flags(typed, classes)
    test_classes, test_samples = check_split_dir(root / "test", "test") if (root / "test").is_dir() else (classes, [])
    check_same_classes(root, "test", classes, test_classes)
    pos = positive_index(classes, cfg.positive_class)
    pattern = patient_pattern(cfg.patient_regex)
    val_classes, val_samples, val_note, (val, bad_val) = [], [], "", (None, [])
    if (root / "val").is_dir():
        with contextlib.suppress(FileNotFoundError):  # no class folders: too small, like an empty one
            val_classes, val_samples = list_image_folder(root / "val")
        if val_classes:
            check_same_classes(root, "val", classes, val_classes)
        counts = np.bincount([s[1] for s in val_samples], minlength=len(classes))
        if val_classes == classes and counts.min() >= cfg.min_val_per_class:
            # Counted again once decoded: an unreadable file is no image, and a val/ with fewer readable
            # images than MIN_VAL_PER_CLASS of a class was used (its file count given as its size).
            val, bad_val = load_split(val_samples, cfg, "decode val")
            counts = np.bincount(val.labels.numpy(), minlength=len(classes))
        n_val = len(val) if val is not None else len(val_samples)
        if val is not None and counts.min() >= cfg.min_val_per_class:
            if "val_fraction" in typed:
                raise CXRError(f"--val-fraction: validation is {root / 'val'} ({n_val} images), nothing is "
                               "carved from train; drop the flag, or move val/ away to carve the split")
            val_note = f"validation: {root / 'val'} ({n_val} images)"
        else:
            val_note = (f"validation: {root / 'val'} is too small ({n_val} images; fewer than "
                        f"{cfg.min_val_per_class} per class), its images join train and validation is "
                        "carved from train")
            train_samples = train_samples + val_samples  # decoded again with train, bad files listed there
            val_samples, val, bad_val = [], None, []
    elif "min_val_per_class" in typed:  # it only judges a val/ folder: not a minimum of the carved split
        raise CXRError(f"--min-val-per-class: there is no {root / 'val'} folder for it to judge, and validation is "
                       "carved from train by --val-fraction without a minimum per class; drop the flag")
    digests = warn_duplicates({"train": [p for p, _ in train_samples], "val": [p for p, _ in val_samples],
                               "test": [p for p, _ in test_samples]})
    train, bad = load_split(train_samples, cfg, "decode train")
    rels = [class_relative(p, root) for p in train.paths]
    named = [patient_id(p, pattern, stem=False, rel=r) for p, r in zip(train.paths, rels)]  # "": none
    # A file that names no patient is its own: patient_id's fallback (read only for those files, since
    # reading a DICOM header twice costs time), within its class: without the class, 001.png of every class
    # folder numbered alike was one "patient" counted for the first class, and a small class's share of
    # validation was left to the draw of another's (none of 6 in validation, and the run refused).
    in_class = lambda y: f"{classes[y]}/" if own_in_class else ""
    train_ids = [n or in_class(y) + patient_id(p, pattern, rel=r)
                 for n, p, r, y in zip(named, train.paths, rels, train.labels.tolist())]
    if group_copies:
        train_ids = same_group_for_copies(train_ids, [digests.get(str(p)) for p in train.paths])
    first, clash = {}, []  # the same bytes in two class folders: one of the two labels is wrong
    for p, label in zip(train.paths, train.labels.tolist()):
        seen = first.setdefault(digests.get(str(p)) or p, (label, p))
        if seen[0] != label:
            clash.append(f"{seen[1]} ({classes[seen[0]]}) = {p} ({classes[label]})")
    if clash:
        log.warning(f"warning: {len(clash)} training file(s) are byte-identical copies of a file in another class, "
                    f"e.g. {'; '.join(clash[:3])}: one image with two labels; remove the wrong copy")
    missed = [r for n, r in zip(named, rels) if not n]  # files that name no patient: each its own
    in_folders = [r for r in missed if "/" in r]
    if in_folders and not pattern:
        # Grouping by folder unasked would be a guess: a sub-folder can as well be a hospital or a date.
        log.info(f"patients: {len(in_folders)} file(s) in sub-folders of the class folders (e.g. "
                 f"{in_folders[0]}) match no Kermany pattern, so each counts as its own patient; if each "
                 f"sub-folder holds one patient, pass --patient-regex {shell_word('^([^/]+)/')} to group by it")
    elif pattern and missed:
        # Said for some files too, not only for all: a regex that misses every second shot of a patient
        # put those shots in validation as patients of their own, beside their patient's in train.
        log.info(f"patients: {len(missed)} of {len(rels)} training file(s) match no --patient-regex "
                 f"{pattern.pattern!r} (searched in the path below the class folder, e.g. "
                 f"{next((r for r in missed if '/' in r), missed[0])}), so each "
                 "counts as its own patient; if they belong to patients named by the others, widen the regex")
    elif missed:
        # Also when only some miss (files of another source added to Kermany's folders): two of them
        # may be one patient, on both sides of the split.
        log.info(("patients: no file name matches" if len(missed) == len(rels) else
                  f"patients: {len(missed)} of {len(rels)} training file names (e.g. {missed[0]}) match none of") +
                 " the Kermany patterns (personN_, IM-N-), so each file counts as its own patient (pass "
                 "--patient-regex to group the images of one patient)")
    # The test split is decoded now and looked at only after training.
    test, bad_test = load_split(test_samples, cfg, "decode test") if test_samples else (None, [])
    bad += bad_test + bad_val
    for name, other in (("test", test), ("val", val)):  # a patient on both sides makes `other` optimistic
        if other is None:
            continue
        # Only ids that name a patient: a file that is its own patient is no one else's, and two files
        # called 1.png are not one patient (byte-identical copies were warned about above).
        shared = sorted(set(named) & {patient_id(p, pattern, stem=False, rel=class_relative(p, root))
                                      for p in other.paths} - {""})
        if shared:
            log.warning(f"warning: {len(shared)} patient id(s) have images in both train and {name} "
                        f"(e.g. {', '.join(shared[:3])}): {name} figures will be optimistic; move them "
                        "to one side (ids from file names, see --patient-regex)")
    if val is None:
        labels = train.labels.numpy()
        counts = np.bincount(labels, minlength=len(classes))
        if counts.min() < 2:
            c = classes[int(counts.argmin())]
            raise CXRError(f"class {c} has {counts.min()} usable training image(s) in {root / 'train' / c}: "
                           "a validation split needs at least 2 per class; add images")
        tr_idx, va_idx = grouped_split(labels, train_ids, cfg.val_fraction, cfg.seed)
        least = np.minimum(*(np.bincount(labels[idx], minlength=len(classes)) for idx in (tr_idx, va_idx)))
        if least.min() == 0:
            k = int(least.argmin())
            ids = collections.Counter(g for g, lab in zip(train_ids, labels) if lab == k)
            top, n = ids.most_common(1)[0]
            # Validation always takes a class's first patient, so mostly it is train that was left without the
            # class: a lower fraction helps there, a higher one (the old advice) only emptied it further.
            all_in_val = not (labels[tr_idx] == k).any()
            fraction = (f"{'lower' if all_in_val else 'raise'} --val-fraction (at {cfg.val_fraction:g} "
                        f"{'all' if all_in_val else 'none'} of them went to validation), " if len(ids) > 1 else "")
            raise CXRError(f"class {classes[k]} is too small to split into train and validation: its "
                           f"{counts[k]} images in {root / 'train' / classes[k]} belong to {len(ids)} patient(s)"
                           + (f", {n} of them to {top!r}" if n > 1 and 2 * n >= counts[k] else "") +
                           f"; add images, {fraction}or pass --patient-regex if those ids are wrong")
        train, val = train.subset(tr_idx), train.subset(va_idx)
        val_note = val_note or f"validation: {len(val)} images carved from train (grouped by patient)"
    report_bad_files(bad, cfg.strict)
    for name, sp in (("train", train), ("val", val), ("test", test)):
        if sp is not None:
            check_every_class(sp, classes, f"the {name} split",
                              root / ("train" if name == "val" and not (root / "val").is_dir() else name))
    return {"classes": classes, "train": train, "val": val, "test": test, "val_note": val_note, "digests": digests,
            "bad_files": [p for p, _ in bad], "pos": pos}


@contextlib.contextmanager
def removed_on_input_error(folder: Path | None):
    """A CXRError inside removes `folder` (made by this run, e.g. for the demo's data) with its log file."""
    try:
        yield
    except CXRError:
        if folder is not None:
            for h in [h for h in log.handlers if isinstance(h, logging.FileHandler)]:
                h.close()
                log.removeHandler(h)
            shutil.rmtree(folder, ignore_errors=True)
        raise


def check_run_dir_free(cfg: Config) -> None:
    """--output-dir is a folder (or missing) and --run-name is free: main asks before any work, as a taken
    name was refused only once the images had been decoded (every scan of a --predict folder, too)."""
    base = Path(cfg.output_dir)
    try:  # a name too long for the file system is said now, not once the images are decoded
        if base.exists() and not base.is_dir():
            raise CXRError(f"--output-dir {base} is a file, not a folder: pass a folder (it is created if missing)")
        if cfg.run_name:
            os.lstat(base / cfg.run_name)  # found, even as a broken link: taken
            raise run_dir_taken(base / cfg.run_name)
    except OSError as e:  # not found: free. A long --output-dir's ENAMETOOLONG was a traceback from exists()
        if e.errno == errno.ENAMETOOLONG or too_long_for_windows(e):  # Windows' too long is "not found"
            raise run_dir_error(base / cfg.run_name, e)


WINDOWS_MAX_DIR = 248  # CreateDirectory's limit without long paths: MAX_PATH (260) less room for an 8.3 name


def too_long_for_windows(e: OSError) -> bool:
    """Windows without long paths enabled answers a too-long folder path with ENOENT, not ENAMETOOLONG. Said so
    only when the path is that long and the folder it would be made in exists: a missing drive or share, or a
    missing folder above, is still ENOENT's own error."""
    if os.name != "nt" or e.errno != errno.ENOENT or not e.filename:
        return False
    path = os.path.abspath(os.fsdecode(e.filename))
    return len(path) >= WINDOWS_MAX_DIR and os.path.isdir(os.path.dirname(path))


def run_dir_error(run_dir: Path, e: OSError) -> CXRError:
    """Why a run folder cannot be made, with the fix for that reason."""
    if too_long_for_windows(e):  # mkdir(parents=True) names the first folder it could not make: the long one
        return CXRError(f"cannot create the run folder {run_dir} ({e.strerror}; the path is "
                        f"{len(os.path.abspath(os.fsdecode(e.filename)))} characters): shorten --run-name or "
                        f"--output-dir (Windows wants a folder path under {WINDOWS_MAX_DIR} characters unless long "
                        "paths are enabled)")
    if e.errno == errno.ENAMETOOLONG:  # "choose a writable --output-dir" was no help for a 300-letter --run-name
        return CXRError(f"cannot create the run folder {run_dir} ({e.strerror}): shorten --run-name or --output-dir "
                        "(most file systems allow 255 bytes a folder name)")
    return CXRError(f"cannot create the run folder {run_dir} ({e.strerror}): choose a writable --output-dir")


def run_dir_taken(run_dir: Path) -> CXRError:
    return CXRError(f"run folder {run_dir} already exists and is never overwritten: pass another --run-name "
                    "(a stopped training run continues with --resume RUN_FOLDER)")


def make_run_dir(cfg: Config, cam: bool = True) -> Path:
    """A new run folder (never an existing one), with grad_cam/ if cam, whose train.log gets the log, also
    what came before."""
    base = Path(cfg.output_dir)
    check_run_dir_free(cfg)
    # Runs started in the same second (a sweep launched from a script) chose one timestamp, and all but
    # the first stopped after decoding: a taken timestamp gets -2, -3, ... A --run-name is the user's own.
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    names = [cfg.run_name] if cfg.run_name else [stamp, *(f"{stamp}-{k}" for k in range(2, 1000))]
    run_dir = base / names[0]
    try:
        base.mkdir(parents=True, exist_ok=True)
        for name in names:
            run_dir = base / name
            try:  # mkdir is the claim: of two runs racing for one name, exactly one gets it
                run_dir.mkdir(parents=True)  # --run-name exp/1 makes exp/ too
                break
            except FileExistsError:
                if cfg.run_name or name == names[-1]:
                    raise run_dir_taken(run_dir)
        if cam:
            (run_dir / "grad_cam").mkdir()
    except OSError as e:
        raise run_dir_error(run_dir, e)
    attach_log_file(run_dir / "train.log")
    return run_dir


def reopen_run_dir(run_dir: Path) -> None:
    """A resumed run's folder: train.log goes on, and grad_cam/ (the biggest part, which a user may have
    deleted to save space: the resume then stopped at its first overlay) is made again if missing."""
    try:
        (run_dir / "grad_cam").mkdir(exist_ok=True)
        attach_log_file(run_dir / "train.log")
    except OSError as e:  # a run folder copied read-only, or on a read-only mount: a traceback before
        raise CXRError(f"cannot write in the run folder {run_dir} ({e.strerror}): make it writable, or resume "
                       "a writable copy of it")


def build_state(cfg: Config, rt: Runtime, class_names: list, train_labels, norm: dict, steps: int,
                cap_warmup: bool = True, own_orders: bool = True) -> TrainState:
    torch.manual_seed(cfg.seed)  # numpy draws all come from default_rng(seed), never the global generator
    model = CustomCNN(**model_kwargs(cfg, len(class_names))).to(rt.device)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    train_model = nn.parallel.DistributedDataParallel(
        model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None) if rt.world > 1 else model
    params = list(model.parameters())  # no weight decay on biases and BN
    opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim > 1], "weight_decay": cfg.weight_decay},
                             {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}], lr=cfg.lr)
    total, warm = max(1, cfg.epochs * steps), int(cfg.warmup_epochs * steps)
    if cap_warmup and warm >= total:  # the rate would only rise, and end at its peak
        warm = total // 2
        log.info(f"note: --warmup-epochs {cfg.warmup_epochs:g} is not shorter than --epochs {cfg.epochs}: the warm-up "
                 "takes the first half of the run instead, so the learning rate still decays to 0")
    warm = max(1, warm)

    def factor(step: int) -> float:  # linear warm-up, then cosine decay to 0 at the last step
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    loss_type = SummedCrossEntropy if rt.device.type == "cuda" else nn.CrossEntropyLoss
    crit = loss_type(weight=class_weights(train_labels, len(class_names)).to(rt.device),
                     label_smoothing=cfg.label_smoothing)
    return TrainState(train_model, ema.module if ema else model, ema, opt, sched, crit, cfg, norm, rt,
                      positive_index(class_names, cfg.positive_class), order_seed(cfg.seed) if own_orders else cfg.seed)


def history_plot_due(since_last: float, cost: float) -> bool:
    """Redraw training_history.png after an epoch only if drawing it takes under a tenth of the time since
    the last drawing: every epoch on a CPU (an epoch takes seconds, the plot ~0.3 s of matplotlib), every
    few on a GPU, where 20 drawings would cost more than the training. The last epoch is always drawn."""
    return since_last >= 10 * cost


def better(row: dict, best: dict | None) -> bool:
    """Is this epoch better than the kept one: a higher validation AUC, or a tie (to 1e-9: equal AUCs
    can differ in the 16th digit) with a lower validation loss? Keeping the first of tied epochs (a
    split scored perfectly from epoch 4 on) kept the least trained one and stopped the run early."""
    return best is None or row["val_auc"] > best["val_auc"] + 1e-9 or (
        abs(row["val_auc"] - best["val_auc"]) <= 1e-9 and row["val_loss"] < best["val_loss"])


def fit(st: TrainState, train_s: Split, val_s: Split, meta: dict, run_dir: Path, resume: dict | None) -> int:
    """The epoch loop: train, validate, checkpoint, plot, explain; early stopping on val AUC."""
    cfg, rt = st.cfg, st.rt
    history, best, since_best, start = [], None, 0, 1
    if resume is not None:
        unwrap(st.model).load_state_dict(resume["train_model"])
        st.optimizer.load_state_dict(resume["optimizer"])
        st.scheduler.load_state_dict(resume["scheduler"])
        if st.ema is not None:
            st.ema.module.load_state_dict(resume["ema"]["module"])
            st.ema.updates = int(resume["ema"]["updates"])
        history, since_best = list(resume["history"]), resume["since_best"]
        # The epoch best_model.pt holds (a last.pt from before best_epoch: ask best_model.pt itself).
        kept = resume.get("best_epoch") or load_checkpoint(run_dir / "best_model.pt")["epoch"]
        best = next(r for r in history if r["epoch"] == kept)
        start = resume["epoch"] + 1
        log.info(f"resuming {run_dir} after epoch {resume['epoch']} (best val AUC {best['val_auc']:.4f})")
    cam_idx = pick_gradcam_images(val_s.labels.numpy(), cfg.num_gradcam_images, cfg.seed)
    per_epoch = len(train_s) // rt.world // cfg.batch_size * cfg.batch_size * rt.world  # images trained on
    train_seconds, trained = 0.0, 0
    drawn = {"epoch": 0, "end": -math.inf, "cost": 0.0}  # the last training_history.png

    def draw_history(force: bool = False) -> None:
        if not rt.is_main or not history or drawn["epoch"] == history[-1]["epoch"]:
            return
        if force or history_plot_due(time.perf_counter() - drawn["end"], drawn["cost"]):
            t = time.perf_counter()
            plot_history(history, run_dir / "training_history.png", best["epoch"])
            drawn.update(epoch=history[-1]["epoch"], end=time.perf_counter(), cost=time.perf_counter() - t)
    log.info(f"{'epoch':>5} {'train_loss':>10} {'train_acc':>9} {'train_auc':>9} {'val_loss':>8} "
             f"{'val_acc':>7} {'val_auc':>7} {'lr':>9} {'sec':>6}")
    epochs_done = False
    with stop_on_signals():
        try:
            for epoch in range(start, cfg.epochs + 1):
                if since_best >= cfg.patience:
                    log.info(f"early stop: no better validation AUC for {cfg.patience} epochs")
                    break
                t0 = time.time()
                with phase("training steps"):
                    row = {"epoch": epoch, **train_one_epoch(st, train_s, epoch)}
                train_seconds += time.time() - t0  # the epoch's results reached the host: no pending work
                trained += per_epoch
                if rt.world > 1:  # batch-norm statistics: each process saw its own shard, validation scores one model
                    for b in st.eval_model.buffers():
                        if b.is_floating_point():
                            torch.distributed.all_reduce(b, op=torch.distributed.ReduceOp.SUM)
                            b.div_(rt.world)
                with phase("validation"):
                    row.update(evaluate(st, val_s))
                row.update(lr=st.optimizer.param_groups[0]["lr"], seconds=round(time.time() - t0, 2))
                history.append(row)
                improved = better(row, best)
                best = row if improved else best
                since_best = 0 if improved else since_best + 1
                with rank_0_writes(rt):  # checkpoints, history, plots: rank 0's alone
                    if not rt.is_main:
                        continue
                    log.info(f"{epoch:5d} {row['train_loss']:10.4f} {row['train_acc']:9.4f} {row['train_auc']:9.4f} "
                             f"{row['val_loss']:8.4f} {row['val_acc']:7.4f} {row['val_auc']:7.4f} "
                             f"{row['lr']:9.2e} {row['seconds']:6.1f}" + ("  *best" if improved else ""))
                    with phase("checkpoints"):  # plain data (tensors, numbers, strings, lists, dicts): weights_only
                        ckpt = {"format": CKPT_FORMAT, "model": st.eval_model.state_dict(), **meta,
                                "config": cfg.to_dict(), "epoch": epoch, "best_auc": best["val_auc"],
                                "best_epoch": best["epoch"], "history": history}
                        if improved:
                            save_checkpoint(run_dir / "best_model.pt", ckpt)
                        ema = {"module": st.ema.module.state_dict(), "updates": st.ema.updates} if st.ema else None
                        save_checkpoint(run_dir / "last.pt", {
                            **ckpt, "train_model": unwrap(st.model).state_dict(),
                            "optimizer": st.optimizer.state_dict(), "scheduler": st.scheduler.state_dict(),
                            "since_best": since_best, "ema": ema})
                    with phase("per-epoch plots, Grad-CAM and report page"):
                        write_csv(run_dir / "history.csv", list(row), [[r[k] for k in row] for r in history])
                        draw_history()
                        if len(cam_idx):  # Grad-CAM of the fixed validation images: one overlay each, a summary grid
                            images = val_s.images[cam_idx]
                            stems = numbered_stems(f"epoch_{epoch:03d}_", len(cam_idx))
                            probs = predict_probs(st.eval_model, images, cfg.img_size, st.norm, rt, tta=cfg.tta)
                            # the threshold comes after the last epoch: until then P >= 0.5, as label_rule(meta) says
                            sc = {"probs": probs, "preds": predict_labels(probs, meta["positive_class"], None)}
                            maps = gradcam_maps(st.eval_model, images, sc["preds"], meta, rt)
                            tiles = save_cam_set(run_dir / "grad_cam", stems, images, maps, sc, meta,
                                                 val_s.labels[cam_idx].numpy(), save_arrays=cfg.save_cam_arrays)
                            save_grid(run_dir / "grad_cam" / f"summary_epoch_{epoch:03d}.png", tiles, f"epoch {epoch}: "
                                      f"val AUC {row['val_auc']:.3f} | {label_rule(meta)}")
                        write_report(run_dir, f"train_cxr run {run_dir.name}")  # an interrupted run has its page too
            with phase("per-epoch plots, Grad-CAM and report page"), rank_0_writes(rt):
                draw_history(force=True)  # the last epoch, or the one an early stop ended on
            epochs_done = True
            # A signal caught after the last training step (validation, plots), which no step checks; every
            # process stops together, as in train_one_epoch, or rank 0 would go on to the report alone.
            stop_if_signalled(rt)
        except Interrupted:
            draw_history(force=True)
            done = history[-1]["epoch"] if history else start - 1
            if not (run_dir / "last.pt").is_file():  # stopped before the first epoch ended
                log.info(f"interrupted during epoch 1, before any epoch finished: there is nothing to "
                         f"resume. Start again with the same command (delete {run_dir} first to reuse "
                         "its --run-name)")
            elif epochs_done:
                log.info(f"interrupted after the last epoch ({done}), before calibration, the guard and the test "
                         f"report: finish them with: {resume_command(run_dir, rt.world)}")
            else:
                log.info(f"interrupted during epoch {done + 1}: last.pt holds epoch {done}. "
                         f"Resume with: {resume_command(run_dir, rt.world)}")
            return 128 + int(_STOP["signal"])
        except FloatingPointError as e:
            draw_history(force=True)
            kept = (f"last.pt keeps the last good epoch ({history[-1]['epoch']})" if history else
                    "no epoch finished, so nothing was saved to resume")
            log.info(f"stopped: {e}. {kept}; lower --lr or check the data")
            return 3
    if rt.is_main and trained:
        gpu = (f"; peak GPU memory {torch.cuda.max_memory_allocated(rt.device) / 2**30:.2f} GiB"
               if rt.device.type == "cuda" else "")
        log.info(f"training speed: {trained / train_seconds:.1f} images/s ({trained} images in "
                 f"{train_seconds:.2f} s of training steps, validation excluded){gpu}")
    return 0


def fit_operating_point(ckpt: dict, raw: np.ndarray, labels: np.ndarray, policy: str) -> dict:
    """Calibration, and for two classes the threshold of the policy, fitted on the raw probabilities
    (predict_probs) of a labelled split: the validation split after training, or a new site's
    folder for --recalibrate."""
    pos, classes = ckpt["positive_class"], ckpt["class_names"]
    cal = fit_calibration(raw, labels)
    few = [f"{c} {n}" for c, n in zip(classes, np.bincount(labels, minlength=len(classes))) if n < 30]
    if few:
        log.warning(f"note: the calibration {'and threshold are' if raw.shape[1] == 2 else 'is'} fitted on few "
                    f"images ({', '.join(few)}): expect a change on other images of the same kind")
    if raw.shape[1] == 2 and raw[labels == pos, pos].min() > raw[labels != pos, pos].max():
        log.warning(f"note: the model separates all {len(labels)} images it is calibrated on, so they cannot show "
                    "how often it errs: probabilities near 0 and 1 rest on the fit's prior, not on errors seen")
    out = {"calibration": cal, "threshold": None, "threshold_policy": None}
    if raw.shape[1] == 2:
        y, p = labels == pos, calibrate(raw, cal)[:, pos]
        out.update(threshold=choose_threshold(y, p, policy), threshold_policy=policy, prevalence=float(y.mean()))
        # What the other policies would pick, for the report (and the stability benchmark); the last
        # entry is the rule before calibration existed: Youden's J on raw scores, highest on ties.
        others = {q: choose_threshold(y, p, q) for q in ("balanced", "accuracy", "youden", "sensitivity:0.95")}
        fpr, tpr, thr = roc_curve(y, raw[:, pos])
        out["thresholds_by_policy"] = {**others, "youden_uncalibrated": float(min(1.0, thr[np.argmax(tpr - fpr)]))}
    return out


def final_report(cfg: Config, rt: Runtime, train_s: Split, val_s: Split, test_s: Split, run_dir: Path,
                 digests: dict) -> int:
    """With the best model: calibration, threshold and out-of-distribution guard fitted on
    training and validation data and stored in best_model.pt; then the test set, once."""
    if not (run_dir / "best_model.pt").is_file():
        log.info("no epoch finished, so there is no best model to report on")
        return 1
    best = load_checkpoint(run_dir / "best_model.pt")
    model = model_from_checkpoint(best, rt)
    raw = raw_probs(model, best, val_s.images, rt, desc="calibrate")
    best.update(fit_operating_point(best, raw, val_s.labels.numpy(), cfg.threshold_policy))
    feats = lambda images: layer_features(model, images, cfg.img_size, best["normalization"], rt.device)
    best["ood"] = {**fit_ood_guard(feats(train_s.images), train_s.labels.numpy(), feats(val_s.images),
                                   cfg.ood_quantile, feats(zoomed_views(train_s.images, cfg.seed))), "grid": GUARD_GRID}
    save_checkpoint(run_dir / "best_model.pt", best)
    log.info(f"calibration on validation: temperature {float(best['calibration']['temperature']):.3f}, "
             f"class biases {[round(b, 3) for b in best['calibration']['bias'].tolist()]}")
    if best["threshold"] is not None:
        log.info(f"threshold on validation ({cfg.threshold_policy}): {threshold_text(best['threshold'])} on the "
                 f"calibrated P({best['class_names'][best['positive_class']]}); validation prevalence "
                 f"{best['prevalence']:.3f}")
    held = best["ood"]["held_out"]
    log.info(f"out-of-distribution guard: cutoff {best['ood']['cutoff']:.3f}, the {100 * cfg.ood_quantile:g}th "
             f"percentile of the {held['n']} validation images ({held['above']} score above it)")
    if held["n"] < 200:
        # .3g, not a whole percent: --ood-quantile 0.975 flags 2.5% by design (":.0%" said 3%, 0.999 said 0%)
        log.warning(f"note: a guard cutoff set on {held['n']} validation images flags more than "
                    f"{100 * (1 - cfg.ood_quantile):.3g}% of new images like them (README, Out-of-distribution guard)")
    if test_s is None:
        log.info(f"no test folder, so no test report: best epoch {best['epoch']}, val AUC {best['best_auc']:.4f}")
    else:
        # The count --evaluate writes, beside the figures (the log warned of train/test copies at the start), from
        # the digests taken then (warn_duplicates'), of the bytes that were decoded: not every test file read again
        seen = seen_copies(best, [digests.get(str(p)) for p in test_s.paths])
        res = test_report(model, best, test_s, rt, run_dir,
                          {"copies_of_training_images": None if seen is None else sum(seen)})
        log.info(f"test report (best epoch {best['epoch']}, val AUC {best['best_auc']:.4f}):\n{summary_table(res)}")
    log.info(f"everything is in {run_dir}")
    return 0


RESUME_FLAGS = {"device", "amp", "deterministic", "num_threads", "num_workers", "strict"}


def check_resume_flags(args, cfg: Config, run_dir: Path) -> str | None:
    """A resume repeats the run's own settings: a typed flag that differs from them is refused, not ignored.
    Returns the run's data folder if it is gone and --data-dir names its new place (train checks the images)."""
    moved = None if Path(cfg.data_dir).is_dir() else cfg.data_dir

    def same(key, typed, stored):
        if key == "data_dir" and moved:  # its new place: train compares the images
            return True
        if key == "data_dir":  # the same folder spelled another way is the same folder
            return Path(typed).expanduser().resolve() == Path(stored).expanduser().resolve()
        if key in ("output_dir", "run_name"):  # together they name the run folder: runs + exp/1 is runs/exp + 1
            name = Path(args.run_name) if "run_name" in args.given else own
            out = Path(args.output_dir if "output_dir" in args.given else cfg.output_dir).expanduser()
            # or its own --run-name typed again, wherever its output folder has moved since
            return (out / name).resolve() == run_dir.resolve() or ("output_dir" not in args.given and name == own)
        return typed == stored
    own = Path(cfg.run_name or run_dir.name)  # --run-name exp/1: the run folder is OUTPUT_DIR/exp/1
    # ... unless the folder was moved since (a/b/exp1 copied to /data/exp1: an IndexError traceback): its parent
    here = run_dir.resolve()
    depth = len(own.parts) if here.parts[-len(own.parts):] == own.parts else 1
    stored = {**dataclasses.asdict(cfg), "output_dir": str(here.parents[depth - 1]), "run_name": str(own)}
    differ = [k for k in sorted(args.given - RESUME_FLAGS) if not same(k, getattr(args, k), stored[k])]
    if differ:
        show = lambda v: ",".join(map(str, v)) if isinstance(v, (tuple, list)) else v
        said = "; ".join(f"--{k.replace('_', '-')} {show(getattr(args, k))} (the run's: {show(stored.get(k))})"
                         for k in differ)
        raise CXRError(f"{said}: --resume continues {run_dir} with its own settings and learning-rate schedule "
                       "(only " + ", ".join("--" + k.replace("_", "-") for k in sorted(RESUME_FLAGS)) +
                       " may change); drop the flag, or start a new run")
    if moved and "data_dir" not in args.given:
        raise CXRError(f"the data folder of {run_dir}, {moved}, is gone: if it moved, pass its new place, "
                       f"--resume {shell_word(str(run_dir))} --data-dir NEW_PLACE")
    return moved


def split_fingerprint(data_dir: str, *splits: Split, digests: dict | None = None) -> str:
    """sha256 of each split's sorted file paths (relative to DATA_DIR): a resume must train on the same images.
    With digests ({path: sha1}, prepare_data's), of the files' contents instead, whatever their names and
    folder: what confirms that a moved data folder holds the same images."""
    root = os.path.abspath(data_dir)  # abspath, not resolve: a data set of symbolic links stays under its root
    h = hashlib.sha256()
    for s in splits:
        keys = (digests.get(str(p), "") if digests is not None else
                Path(os.path.relpath(os.path.abspath(p), root)).as_posix() for p in s.paths)
        h.update(("\n".join(sorted(keys)) + "\n\n").encode())
    return h.hexdigest()


def train(cfg: Config, args, rt: Runtime) -> int:
    """A training run, top-down: data, model, the epoch loop (fit), the report (final_report)."""
    resume, moved, saved = None, None, {}
    if args.resume:
        resume = load_checkpoint(args.resume, "last.pt")
        if "optimizer" not in resume:
            raise CXRError(f"{args.resume} holds weights only: resume from the run folder or its last.pt")
        if "recalibration" in resume:  # made from a last.pt, it still holds the optimizer
            raise CXRError(f"{args.resume} is a --recalibrate checkpoint: resume the training run it was made from, "
                           f"the folder of {resume['recalibration']['from_checkpoint']}")
        cfg = Config.from_dict(resume["config"])
        run_dir = Path(args.resume) if Path(args.resume).is_dir() else Path(args.resume).parent
        if absent := absent_settings(resume["config"], RESUME_FLAGS & args.given):  # not today's constants
            log.info(f"note: {run_dir} was made before these settings existed, so it continues as its run did: "
                     f"{absent}")
        check_edit_only(resume, run_dir)
        moved = check_resume_flags(args, cfg, run_dir)
        for key in RESUME_FLAGS & args.given:  # how to run, not what is trained: may change on a resume
            setattr(cfg, key, getattr(args, key))
        if "data_dir" in args.given:  # the run's folder, or its new place if it moved (same images: checked below)
            cfg.data_dir = os.path.abspath(args.data_dir)
        try:  # the precision --amp auto chose and the process count are read from it
            cfg_file = run_dir / "config.json"
            saved = json.loads(cfg_file.read_text(encoding="utf-8")) if cfg_file.is_file() else {}
        except (ValueError, OSError) as e:  # a JSONDecodeError traceback, for a file edited by hand or cut short
            raise CXRError(f"{run_dir / 'config.json'} cannot be read ({e}): restore it (the run wrote it at its "
                           "start) to resume with the precision and process count it started with")
        if cfg.amp == "auto" and "amp" not in args.given and saved.get("precision"):  # auto chose on the machine
            cfg.amp = "off" if saved["precision"] == "fp32" else "on"  # that started it (absent: edited by hand)
        rt = setup_runtime(cfg)  # the run's own precision and device, or a resume would diverge
        # --amp auto typed: auto chooses for this machine, as --amp on/off would change it (precision changes the
        # speed, not the recipe); kept as chosen, so that a later resume continues in it (it kept the start's).
        if cfg.amp == "auto":
            cfg.amp = "on" if rt.amp_dtype else "off"
            was, now = (saved.get("resumed") or [saved])[-1].get("precision"), str(rt.amp_dtype or "fp32")
            if "amp" in args.given and was and was != now:
                log.info(f"note: --amp auto chose {now} for this machine: {run_dir} trained in {was} until now "
                         f"(--amp {'off' if now != 'fp32' else 'on'} keeps {was})")
        started = saved.get("world_size", rt.world)
        if started != rt.world:  # steps per epoch (the schedule's clock) and each process's shard depend on it
            raise CXRError(f"{run_dir} was trained by {started} process(es) and this resume has {rt.world}: its "
                           f"learning-rate schedule counts steps of {started}; resume with the same number: "
                           f"{resume_command(run_dir, started)}")
        best_path = run_dir / "best_model.pt"
        # Finished: the test report is written, or without a test folder the best model calibrated. A run
        # stopped during its test report (best_model.pt calibrated just before it) finishes the report.
        if (run_dir / "test_metrics.json").exists() or (not (Path(cfg.data_dir) / "test").is_dir() and (
                best_path.is_file() and "calibration" in load_checkpoint(best_path))):
            outdated = [report_outdated(run_dir)]  # stopped (Ctrl-C, a crash) after the test report, before its page
            if rt.world > 1:  # rank 0's look for all: one taken after rank 0 rewrote the page said "finished", exit 2
                torch.distributed.broadcast_object_list(outdated)
            if outdated[0]:
                if rt.is_main:
                    # What was found, not why: "the run stopped before writing it" was said of a page deleted by hand
                    missing = not (run_dir / "report.html").is_file()
                    page = write_report(run_dir, f"train_cxr run {run_dir.name}")
                    found = "missing" if missing else "older than its test_metrics.json"
                    log.info(f"{run_dir} had finished, but its report.html was {found}: written again, {page}")
                return 0
            raise CXRError(f"{run_dir} already finished ({resume['epoch']} epochs; its best_model.pt is calibrated): "
                           "nothing to resume; start a new run to train longer")
    if args.demo and rt.world > 1:
        raise CXRError("--demo runs in one process: drop torchrun, or make the demo data first")
    if args.demo:
        run_dir = make_run_dir(cfg)
        data_root = run_dir / "demo_data"
        log.info(f"demo: writing synthetic X-rays to {data_root}")
        write_synthetic_dataset(data_root, *DEMO_COUNTS, size=cfg.work_size, seed=cfg.seed)
        cfg.data_dir = str(data_root)
    if resume is None:  # config.json and the checkpoints keep it absolute: --resume works from any folder
        cfg.data_dir = os.path.abspath(cfg.data_dir)
    PHASES.clear()
    PHASES["start-up"] = time.perf_counter() - _STARTED
    # The demo made its folder to write its data in: an input error found now removes it again.
    with phase("decode and data checks"), removed_on_input_error(run_dir if args.demo else None):
        # A run made before a rule keeps it on --resume: the same split, the same schedule.
        rules = {k: resume is None or bool(resume.get(k))
                 for k in ("copies_grouped", "warmup_capped", "own_orders", "own_in_class")}
        # every input check before the run folder
        data = prepare_data(cfg, args.given, rules["copies_grouped"], rules["own_in_class"])
        classes, train_s, val_s, test_s = data["classes"], data["train"], data["val"], data["test"]
        cfg.positive_class = classes[data["pos"]]  # resolved: config.json and the checkpoints name it
        split_sha = split_fingerprint(cfg.data_dir, train_s, val_s)
        if resume is not None and resume.get("split_sha256", split_sha) != split_sha:
            raise CXRError(f"the train/validation images of {cfg.data_dir} differ from those {run_dir} was trained on "
                           "(files added, removed or moved): a resume would continue on other images; restore the "
                           "folder, or start a new run")
        if resume is not None and "split_sha256" not in resume:
            log.info(f"note: {run_dir} predates the split check, so a resume cannot confirm it sees the same images")
        content_sha = split_fingerprint(cfg.data_dir, train_s, val_s, digests=data["digests"])
        if moved and resume.get("content_sha256") != content_sha:
            raise CXRError(f"{cfg.data_dir} does not hold the images {run_dir} was trained on in {moved} (or the run "
                           "predates the content check): restore that folder, or start a new run")
        steps = len(train_s) // rt.world // cfg.batch_size  # per epoch and process, as in train_one_epoch
        if steps == 0:
            raise CXRError(f"{len(train_s)} training images make no full batch of --batch-size {cfg.batch_size} "
                           f"in each of {rt.world} process(es): lower --batch-size or add images")
    refused = None  # why rank 0 could not make the run folder: every process must then stop
    if not args.demo and resume is None and rt.is_main:
        try:
            run_dir = make_run_dir(cfg)
        except CXRError as e:
            refused, run_dir = str(e), None
    if rt.world > 1:  # the other processes waited here for a folder that never came, or (NCCL) hung
        box = [(refused, str(run_dir)) if rt.is_main else None]
        torch.distributed.broadcast_object_list(box)
        refused, run_dir = box[0][0], Path(box[0][1])
    if refused:
        raise CXRError(refused)
    with rank_0_writes(rt):  # a refused folder stops every process, not rank 0 alone
        if rt.is_main and resume is not None:
            reopen_run_dir(run_dir)
    if rt.device.type == "cuda":
        # The decoded uint8 images (~85 MB for this data set at 112 px) go to the GPU once; batches
        # are then gathered and augmented there, with no host-to-device copy per step.
        train_s.images, val_s.images = train_s.images.to(rt.device), val_s.images.to(rt.device)
    norm = resume["normalization"] if resume else dataset_norm(train_s.images, cfg.normalize)
    st = build_state(cfg, rt, classes, train_s.labels.numpy(), norm, steps, rules["warmup_capped"], rules["own_orders"])
    meta = {"model_kwargs": model_kwargs(cfg, len(classes)), "class_names": classes, **rules,  # what checkpoints say
            "positive_class": st.pos, "img_size": cfg.img_size, "work_size": cfg.work_size,
            "threshold": None, "normalization": norm, "split_sha256": split_sha, "content_sha256": content_sha,
            "edit_only": {n.lower(): list(globals()[n]) for n in EDIT_ONLY_STORED},
            # --evaluate and --recalibrate find copies of these files in their folders (~20 bytes an image)
            "trained_on_sha1": digest_table(data["digests"].get(str(p)) for p in [*train_s.paths, *val_s.paths])}
    counts = lambda s: ", ".join(f"{c} {int((s.labels == k).sum())}" for k, c in enumerate(classes))
    log.info(f"run folder: {run_dir}")
    log.info(f"device: {rt.device} | precision: {rt.amp_dtype or 'fp32'} | processes: {rt.world} | "
             f"threads: {torch.get_num_threads()}")
    log.info(f"train: {len(train_s)} ({counts(train_s)}) | val: {len(val_s)} ({counts(val_s)}) | " +
             (f"test: {len(test_s)} (kept aside until the end)" if test_s is not None else
              f"test: none ({Path(cfg.data_dir) / 'test'} does not exist), so the test report is skipped"))
    log.info(data["val_note"])
    if len(classes) == 2:
        log.info(f"positive class: {cfg.positive_class} (sensitivity, AUC and threshold refer to it; "
                 "--positive-class to change)")
    else:
        log.info(f"{len(classes)} classes: labels are the most probable class (no threshold policy); the AUC is "
                 "the mean of the one-vs-rest AUCs")
    log.info("class weights: " + ", ".join(f"{c} {w:.3f}" for c, w in zip(classes, st.criterion.weight.tolist())))
    with rank_0_writes(rt):
        if rt.is_main and resume is None:
            save_json(run_dir / "config.json", {
                "config": cfg.to_dict(), "versions": library_versions(), "device": str(rt.device),
                "precision": str(rt.amp_dtype or "fp32"), "world_size": rt.world, "classes": classes,
                "normalization": norm, "skipped_files": [as_text(p) for p in data["bad_files"]],  # shown as text
                "split_sizes": {"train": len(train_s), "val": len(val_s), "test": len(test_s) if test_s else 0}})
        elif rt.is_main and saved:
            # The run's start stays as written; a resume adds where it ran and the flags it changed (--device cuda,
            # --amp on): config.json, and the report page that shows it, said the start's for every epoch.
            # Against the settings it continues (last.pt's), not the start's: a second resume's --no-strict after
            # a first one's --strict was recorded as no change.
            was = resume["config"]
            changed = {k: getattr(args, k) for k in sorted(RESUME_FLAGS & args.given)
                       if getattr(args, k) != was.get(k)} | ({"data_dir": cfg.data_dir} if moved else {})
            saved.setdefault("resumed", []).append({"after_epoch": resume["epoch"], "device": str(rt.device),
                                                    "precision": str(rt.amp_dtype or "fp32"), "changed": changed})
            save_json(run_dir / "config.json", saved)
    with keep_freed_memory(rt.device.type == "cpu"):
        rc = fit(st, train_s, val_s, meta, run_dir, resume)
    if rc != 0 or not rt.is_main:
        return rc
    try:  # signals are not caught here (no training step to finish): Ctrl-C raises KeyboardInterrupt
        with phase("calibration, guard and test set"):
            rc = final_report(cfg, rt, train_s, val_s, test_s, run_dir, data["digests"])
            page = write_report(run_dir, f"train_cxr run {run_dir.name}")
    except KeyboardInterrupt:
        log.info(f"interrupted after the last epoch, during calibration, the guard or the test report: finish "
                 f"them with: {resume_command(run_dir, rt.world)}")
        return 130
    # Where the wall time of the run went: the figure every speed claim starts from.
    wall = time.perf_counter() - _STARTED
    rows = [*PHASES.items(), ("other (set-up, logging)", wall - sum(PHASES.values()))]
    log.info(f"time per phase ({wall:.1f} s wall): " + "; ".join(f"{k} {v:.1f} s ({v / wall:.0%})" for k, v in rows))
    log.info(f"report page: {page}")
    return rc


def check_edit_only(ckpt: dict, source) -> None:
    """The constants that are no flags, so no checkpoint restores them (EDIT_ONLY_STORED), as the model's run
    had them: one edited since would window DICOMs or blank lungs otherwise than training did, unsaid."""
    for name, was in ckpt.get("edit_only", {}).items():  # absent in checkpoints made before it was stored
        if name.upper() not in EDIT_ONLY_STORED:  # stored by a newer version of this script: unknown here
            continue
        now = globals()[name.upper()]
        if [float(v) for v in was] != [float(v) for v in now]:
            raise CXRError(f"{name.upper()} = {tuple(now)} at the top of train_cxr.py, but {source} was made with "
                           f"{tuple(was)}: set it back to use that model (it is no flag, so no checkpoint sets it)")


def checkpoint_model(args, rt: Runtime) -> tuple[dict, nn.Module]:
    """The checkpoint of --checkpoint and its model; says once what an older or unfinished
    checkpoint lacks, and what is used instead."""
    if not args.checkpoint:
        raise CXRError("--predict, --evaluate and --recalibrate need --checkpoint runs/RUN (or its best_model.pt)")
    ckpt = load_checkpoint(args.checkpoint)
    check_edit_only(ckpt, args.checkpoint)
    # A setting the checkpoint predates is read as its run had it, not as the constant says today; how this
    # command runs (RUN_FLAGS) is today's anyway.
    if absent := absent_settings(ckpt["config"], RUN_FLAGS | args.given):
        log.info(f"note: {args.checkpoint} was made before these settings existed, so they are read as its run "
                 f"had them: {absent}")
    if "positive_class" not in ckpt:  # only then: for ABNORMAL/NORMAL the rule stops rather than guess
        ckpt["positive_class"] = positive_index(ckpt["class_names"], ckpt["config"].get("positive_class", ""))
    if ckpt.get("calibration") is None:
        log.warning("note: this checkpoint has no calibration (last.pt, an unfinished run, or an older version): "
                    "probabilities are the network's raw softmax")
    if ckpt.get("threshold") is None and len(ckpt["class_names"]) == 2:
        log.warning("note: this checkpoint has no validation threshold: labels are the argmax (P >= 0.5); "
                    "use the run's best_model.pt for the validated operating point")
    if ckpt.get("ood") is None:
        log.warning("note: this checkpoint has no out-of-distribution guard (made before it existed, or not "
                    "finished): ood_score is nan, in_distribution empty, and no image is flagged")
    return ckpt, model_from_checkpoint(ckpt, rt)


def split_from_folder(folder: Path, ckpt: dict, cfg: Config, what: str) -> Split:
    """A labelled folder (FOLDER/<CLASS>/*) decoded the way the checkpoint's run decoded images."""
    if what == "recalibration" and not folder.is_dir():
        raise CXRError(f"--recalibrate folder {folder} not found: pass a folder with one sub-folder of "
                       f"labelled images per class ({', '.join(ckpt['class_names'])})")
    # A class folder may hold sub-folders (patient7/, a DICOM series each), but none named as a class. Names are
    # compared ignoring case: Windows and macOS open D/test/pneumonia as typed, and that Path's name is typed's,
    # so its images beside patient folders were answered "has classes ['patient7', ...]".
    named = {c.casefold(): c for c in ckpt["class_names"]}
    if folder.is_dir() and folder.name.casefold() in named and not any(
            e.is_dir() and e.name.casefold() in named for e in os.scandir(folder)):
        # --data-dir D/test/NORMAL: the error asked for D/test/NORMAL/<CLASS>/ folders, a wrong fix
        flag = "--data-dir" if what == "test" else "--recalibrate"
        raise CXRError(f"{folder} is the class folder of {named[folder.name.casefold()]}: pass the folder that holds "
                       f"every class folder ({', '.join(ckpt['class_names'])}), {flag} {folder.parent}")
    classes, samples = check_split_dir(folder, what)
    if classes != ckpt["class_names"]:
        raise CXRError(f"{folder} has classes {classes}, the checkpoint was trained on {ckpt['class_names']}")
    ck_cfg = dataclasses.replace(Config.from_dict(ckpt["config"]), num_workers=cfg.num_workers)
    split, bad = load_split(samples, ck_cfg, f"decode {what}")
    report_bad_files(bad, cfg.strict)
    check_every_class(split, classes, f"the {what} folder", folder)
    return split


def mode_report(run_dir: Path, what: str, args, ckpt: dict, data: str = "") -> None:
    """The report page of --predict/--evaluate/--recalibrate: its configuration is the checkpoint's, and the
    flags typed."""
    n = len(ckpt["class_names"])
    config = {"checkpoint": str(args.checkpoint), **({"data": data} if data else {}),
              "flags": {k: v for k, v in sorted(vars(args).items()) if k in args.given},
              "threshold": _cell("threshold", ckpt.get("threshold"), n),
              "config": ckpt["config"], "versions": library_versions()}
    log.info(f"report page: {write_report(run_dir, f'train_cxr {what} {run_dir.name}', config)}")


def images_to_predict(folder: Path) -> list:
    """The image files below a --predict folder, sorted, less the run folders of this script inside it
    (train.log, with grad_cam/ or report.html): --predict scans/ from inside scans/ (runs/ lands there) scored the last
    run's Grad-CAM overlays as X-rays, 20 scans counted as 40 the second time, 60 the third."""
    files, runs, others = [], [], []
    # Not by grad_cam/ alone: a user may delete it to save space (--resume makes it again), leaving the run's
    # plots (roc_curve.png, ...) to be scored as X-rays; every run folder with images has train.log and one of these.
    is_run = lambda d: os.path.isfile(os.path.join(d, "train.log")) and any(
        os.path.exists(os.path.join(d, n)) for n in ("grad_cam", "report.html"))
    # os.walk with followlinks, as training's ImageFolder walks (Path.rglob skips linked folders); a
    # broken link is kept, so that decoding lists it as unreadable rather than it vanishing.
    for d, dirs, names in os.walk(folder, followlinks=True):
        if d != os.fspath(folder) and is_run(d):
            runs.append(as_text(d))
            dirs.clear()
            continue
        for f in (os.path.join(d, n) for n in names):
            if is_image_file(f, folder):
                files.append(f)
            elif not is_hidden(f, folder):
                others.append(f)
    note_other_files(others, as_text(folder))
    if runs:
        log.info(f"note: skipping {len(runs)} run folder(s) of train_cxr.py under {folder} (their images are "
                 f"Grad-CAM overlays, not X-rays): {', '.join(runs[:3])}{' ...' if len(runs) > 3 else ''}")
    return sorted(files)


def predict(cfg: Config, args, rt: Runtime) -> int:
    ckpt, model = checkpoint_model(args, rt)
    files = []
    for p in map(Path, args.predict):
        if not (p.is_dir() or p.is_file()):
            raise CXRError(f"--predict path {p} not found: pass existing image files or folders")
        if p.is_dir():
            check_image_tree(p)
        files += images_to_predict(p) if p.is_dir() else [str(p)]
    unique = {}
    for f in files:  # a file given and also inside a given folder (or given twice): one row, not two
        unique.setdefault(os.path.abspath(f), f)
    files = list(unique.values())
    if not files:
        raise CXRError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {', '.join(args.predict)}")
    classes, pos = ckpt["class_names"], ckpt["positive_class"]
    ck_cfg = dataclasses.replace(Config.from_dict(ckpt["config"]), num_workers=cfg.num_workers)
    split, bad = load_split([(f, 0) for f in files], ck_cfg, "decode")  # decoded as the run decoded
    report_bad_files(bad, cfg.strict)
    if not len(split):
        raise CXRError("none of the --predict files could be read")
    images, files = split.images, split.paths
    # What the table and the overlay titles call each file: its name, or with names that repeat (img0.png of
    # NORMAL/ and of PNEUMONIA/) its path below the folder all files share, else three rows read "img0.png".
    shown_as = [Path(f).name for f in files]
    if len(set(shown_as)) < len(shown_as):
        try:
            base = os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in files])
            shown_as = [os.path.relpath(os.path.abspath(f), base) for f in files]
        except ValueError:  # Windows: files on two drives (C:, D:) share no folder; their full paths then
            shown_as = [os.path.abspath(f) for f in files]
    shown_as = [as_text(Path(n).as_posix()) for n in shown_as]
    # A training image scored again gets the label it was taught: no evidence of how the model does on new ones
    where = args.predict[0] if len(args.predict) == 1 else "the --predict list"
    seen = training_copies(ckpt, files, where, args.checkpoint,
                           "a prediction for an image the model has seen says nothing of how it does on new ones "
                           "(copy_of_training_image in predictions.csv)")
    run_dir = make_run_dir(cfg)
    sc = score_images(model, ckpt, images, rt, desc="predict")
    probs, preds, inside = sc["probs"], sc["preds"], sc["in_distribution"]
    # The overlay's name holds the file's stem cut to 100 bytes: a long name (a non-ASCII character takes
    # 2-4 bytes) plus the label part passed the file system's 255 and stopped the run before the CSV.
    stem = lambda f: os.fsencode(Path(f).stem)[:100].decode(errors="ignore")
    numbers = numbered_stems("", len(files), least=5)  # the page finds overlays by 5 or more leading digits
    for i in tqdm(range(0, len(files), 64), desc="grad-cam", leave=False, disable=None):  # 64: bounded memory
        part = slice(i, i + 64)
        save_cam_set(run_dir / "grad_cam", [f"{k}_{stem(f)}" for k, f in zip(numbers[part], files[part])],
                     images[part], gradcam_maps(model, images[part], preds[part], ckpt, rt),
                     {k: v[part] for k, v in sc.items()}, ckpt,
                     names=shown_as[part], save_arrays=cfg.save_cam_arrays)
    header, rows = prediction_rows(files, sc, classes, ckpt.get("threshold"), bool(ckpt.get("ood")))
    # Last, so the columns before it keep their places; empty (unknown) for a checkpoint without the digests
    write_csv(run_dir / "predictions.csv", [*header, "copy_of_training_image"],
              [[*r, "" if seen is None else seen[k]] for k, r in enumerate(rows)])
    shown = 25
    name_w = min(40, max(len(n) for n in shown_as))
    # Two classes: P(positive), which the threshold cuts; more: the label's own probability, as its overlay
    # gives it (the positive class then only names the report's, and its P says nothing of the label).
    binary = len(classes) == 2
    thr = decision_threshold(ckpt)
    ps = [float(probs[k][pos if binary else preds[k]]) for k in range(min(shown, len(files)))]
    # The rule's threshold and every P to the same digits: each P, to its own digits, was read against
    # the rule's 4 (P 0.714 labelled PNEUMONIA under "P >= 0.7143").
    d = telling_digits(ps, thr, 4) if thr is not None else 3
    log.info(f"labels: {label_rule(ckpt, d)}")
    log.info(f"{'file':<{name_w}}  {'predicted':<12} {f'P({classes[pos]})' if binary else 'P(predicted)':>14}  "
             "in distribution")
    for k, p in enumerate(ps):
        flag = "no  (unlike the training images)" if not inside[k] else "yes" if ckpt.get("ood") else "?"
        log.info(f"{shown_as[k][-name_w:]:<{name_w}}  {classes[preds[k]]:<12} {p:>14.{d}f}  {flag}")
    if len(files) > shown:
        log.info(f"... and {len(files) - shown} more in predictions.csv")
    warn_if_unlike_training(inside, "--predict")
    log.info(f"predicted {len(files)} image(s) ({len(bad)} skipped): {run_dir / 'predictions.csv'}")
    mode_report(run_dir, "predictions", args, ckpt)
    return 0


def evaluate_mode(cfg: Config, args, rt: Runtime) -> int:
    ckpt, model = checkpoint_model(args, rt)
    root = Path(cfg.data_dir)
    folder = root / "test" if (root / "test").is_dir() else root
    splits = [n for n in ("train", "val") if (root / n).is_dir()]
    if folder == root and splits:
        raise CXRError(f"--evaluate reads {root}/test/<CLASS>/* or {root}/<CLASS>/*, but {root} holds only "
                       f"{'/, '.join(splits)}/: add a test/ folder, or pass --data-dir {root / splits[0]} "
                       "(its images may have been trained on)")
    split = split_from_folder(folder, ckpt, cfg, "test")
    # null: a checkpoint made before it kept its training files' digests, so nothing could be checked
    checks = {"copies_of_training_images": copies_of_training_images(ckpt, split.paths, folder, args.checkpoint)}
    run_dir = make_run_dir(cfg)
    # The report settings (--bootstrap, --num-gradcam-images, --save-cam-arrays) are this command's, typed or edited
    # at the top (MODE_FLAGS): the run's used to win over an edited constant, while --predict took its edit.
    mine = {k: getattr(cfg, k) for k in ("bootstrap", "num_gradcam_images", "save_cam_arrays")}
    ckpt = {**ckpt, "config": {**ckpt["config"], **mine}}  # and the report page shows the settings used
    res = test_report(model, ckpt, split, rt, run_dir, checks)
    log.info(f"evaluation of {args.checkpoint} on {folder}:\n{summary_table(res)}\neverything is in {run_dir}")
    mode_report(run_dir, "evaluation", args, ckpt, str(folder))
    return 0


def refit_ood_cutoff(guard: dict, site_scores: np.ndarray, quantile: float, folder: Path) -> tuple[dict, float]:
    """The guard with its cutoff refitted on a site's images, and the site's own `quantile` of them:
    the cutoff becomes that quantile but never drops below the old one (what passed before still
    passes; a few dozen images give a rough quantile). The stored quantile and cutoff_fitted_on
    (absent: the run's validation split) describe the cutoff that is kept."""
    site = float(np.quantile(site_scores, quantile))
    if site <= float(guard["cutoff"]):
        return guard, site
    above = int((np.asarray(site_scores) > site).sum())  # held_out now describes the folder, as the cutoff does
    return {**guard, "cutoff": site, "quantile": float(quantile), "cutoff_fitted_on": str(folder),
            "held_out": {"n": int(len(site_scores)), "above": above}}, site


def recalibrate(cfg: Config, args, rt: Runtime) -> int:
    """--recalibrate DIR: refit calibration, threshold and the guard's cutoff on a new site's
    labelled folder; the weights are copied unchanged into a new checkpoint."""
    ckpt, model = checkpoint_model(args, rt)
    folder, guard = Path(args.recalibrate), ckpt.get("ood")
    classes, pos = ckpt["class_names"], ckpt["positive_class"]
    check_two_class_flags(args.given, classes)
    if "ood_quantile" in args.given and not guard:
        raise CXRError(f"--ood-quantile: {args.checkpoint} has no out-of-distribution guard whose cutoff could be "
                       "refitted; drop the flag")
    split = split_from_folder(folder, ckpt, cfg, "recalibration")
    digests = [file_sha1(p) for p in split.paths]
    # Copies of what the checkpoint had seen before this folder: "before" and "after" alike
    copies = copies_of_training_images(ckpt, split.paths, folder, args.checkpoint, digests)
    # The checkpoint's fitted policy; one without (last.pt, a stopped run) has its run's --threshold-policy.
    # Its run's: a checkpoint made before the setting was (Youden's J) is not given today's constant.
    policy = (cfg.threshold_policy if "threshold_policy" in args.given
              else ckpt.get("threshold_policy") or Config.from_dict(ckpt["config"]).threshold_policy)
    # One pass of the network over the folder: the fit, "before" and "after" differ only in calibration,
    # threshold and cutoff, applied to the same probabilities and features (three passes took twice the time).
    raw, feats = network_outputs(model, ckpt, split.images, rt, desc="calibrate")
    new = fit_operating_point(ckpt, raw, split.labels.numpy(), policy)
    before = scores_from(ckpt, raw, feats)
    warn_if_unlike_training(before["in_distribution"], str(folder))
    counts = {c: int((split.labels == k).sum()) for k, c in enumerate(classes)}
    replaced = ("calibration", "threshold", "threshold_policy", "prevalence", "thresholds_by_policy", "recalibration")
    old_guard = {k: guard.get(k) for k in ("cutoff", "quantile", "cutoff_fitted_on")} if guard else None
    new["recalibration"] = {"folder": str(folder.resolve()), "images": counts, "policy": new["threshold_policy"],
                            "from_checkpoint": str(Path(args.checkpoint).resolve()),
                            "date": _dt.datetime.now().isoformat(timespec="seconds"),
                            "before": {k: ckpt.get(k) for k in replaced} | {"ood": old_guard}}
    # The folder the new calibration and threshold are fitted on, beside an earlier recalibration's (whose guard
    # cutoff may be kept): an --evaluate of the new model on it counts its images as copies (~20 bytes an image)
    earlier = ([r.tobytes().hex() for r in ckpt["recalibrated_on_sha1"].numpy()]
               if ckpt.get("recalibrated_on_sha1") is not None else [])
    new["recalibrated_on_sha1"] = digest_table([*earlier, *digests])
    if guard:
        q = cfg.ood_quantile if "ood_quantile" in args.given else float(guard["quantile"])
        new["ood"], site_cut = refit_ood_cutoff(guard, before["ood_score"], q, folder.resolve())
        new["recalibration"]["ood_site_percentile"] = {"quantile": q, "value": site_cut}
    run_dir = make_run_dir(cfg, cam=False)  # no explanations: the weights, so the heat maps, are the run's
    out = {**ckpt, **new}
    save_checkpoint(run_dir / "recalibrated_model.pt", out)
    after = scores_from(out, raw, feats)  # the refitted guard keeps the grid its features were taken with
    labels = split.labels.numpy()
    measured = {"images": counts, "copies_of_training_images": copies}
    for name, sc, ck in (("before", before, ckpt), ("after", after, out)):
        cut = decision_threshold(ck)
        at = binary_metrics(labels == pos, sc["probs"][:, pos], cut) if cut is not None else {}
        measured[name] = {"ece": report_ece(labels, sc["probs"], pos), "threshold": ck.get("threshold"),
                          "share_flagged": share_flagged(sc["in_distribution"]),
                          **{k: v for k, v in at.items() if k != "threshold"}}
    save_json(run_dir / "recalibration.json", measured)
    log.info(f"recalibrated on {folder} ({', '.join(f'{c} {n}' for c, n in counts.items())}); weights unchanged")
    if guard:
        log.info(f"  guard cutoff {new['ood']['cutoff']:.3f}: " + (
            f"kept, as the folder's {100 * q:g}th percentile ({site_cut:.3f}) is lower" if new["ood"] is guard
            else f"the folder's {100 * q:g}th percentile"))
    for name in ("before", "after"):
        m = measured[name]
        log.info(f"  {name:<6} on that folder: ECE {m['ece']:.4f}" + (
            f", threshold {threshold_text(m['threshold'])}, accuracy {m['accuracy']:.4f}, sensitivity "
            f"{m['sensitivity']:.4f}, specificity {m['specificity']:.4f}"
            if "accuracy" in m and m["threshold"] is not None else "")
            + f", flagged {m['share_flagged']:.1%}")
    log.info("  (fitted and measured on the same images: judge it on other images of that site with --evaluate)")
    mode_report(run_dir, "recalibration", args, out, str(folder))
    log.info(f"new checkpoint: {run_dir / 'recalibrated_model.pt'}")
    return 0


def main(argv=None, parsed=None) -> int:
    """Run the script; `parsed` is parse_config's result when the command line was checked already."""
    global _STARTED
    _STARTED = _STARTED or time.perf_counter()  # process start on the first call; later calls (tests) time themselves
    setup_console_logging(int(os.environ.get("RANK", 0)) == 0)
    try:
        cfg, args = parsed or parse_config(argv)
        # Under torchrun rank 0 alone decides, after the group is up (train): a rank on another node, whose disk
        # lacks the folder, would go on to wait for a rank 0 that had exited here.
        if not args.resume and int(os.environ.get("WORLD_SIZE", 1)) == 1:
            check_run_dir_free(cfg)
        rt = setup_runtime(cfg)
        mode = (predict if args.predict else evaluate_mode if args.evaluate else
                recalibrate if args.recalibrate else train)
        return mode(cfg, args, rt)
    except CXRError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except torch.cuda.OutOfMemoryError:
        print("error: out of GPU memory: lower --batch-size (e.g. half) or --img-size", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outside the training loop, which stops at a batch's end itself
        print("error: interrupted (Ctrl-C); files written so far are kept", file=sys.stderr)
        return 130
    finally:
        _STARTED = None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main(parsed=_PARSED))
