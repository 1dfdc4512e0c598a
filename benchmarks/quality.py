"""Judge a training recipe without any test set: k-fold cross-validation over patient groups.

    python benchmarks/quality.py --data ../shared/data/chest_xray_224/train --folds 5
    python benchmarks/quality.py --recipe baseline --folds 3 --epochs 4
    python benchmarks/quality.py --recipe default -- --img-size 160     # extra flags for train_cxr.py
    python benchmarks/quality.py --recipe baseline --folds 3 --only 0   # one fold of a slow recipe
    python benchmarks/quality.py --folds 3 --only 0 --train-seeds 1 2 3 4 5   # threshold stability

Each fold holds out a patient-grouped, stratified fifth (for 5 folds) of the training split and
runs the unmodified script on the rest, exactly as a user would: the script carves its own
validation split from the fold's training part, picks the best epoch and the threshold there,
and its "test" report is the held-out fold. The figures printed are mean +- std over folds of
AUC, accuracy, sensitivity and specificity at the threshold the script chose, the calibration
error (ECE, 15 bins), the share of the held-out fold that the out-of-distribution guard flags,
and the threshold. With --train-seeds, every fold is trained once per seed and the spread of
the threshold each policy would choose is printed.

Recipes: "default" is the script's constants; "baseline" is the original notebook recipe
(224 px, 3x identical channels averaged to gray, 32-64-128-256 channels, FC 512, Adam 1e-3,
no weight decay, no label smoothing, no EMA, no TTA, dataset normalisation, fp32).
Caveat (README): validation carved from train scores higher than the official test split.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_cxr  # noqa: E402

BASELINE = ["--img-size", "224", "--channels", "32,64,128,256", "--fc-hidden", "512", "--lr", "1e-3",
            "--weight-decay", "0", "--label-smoothing", "0", "--ema-decay", "0", "--no-tta", "--amp", "off",
            "--normalize", "dataset", "--dropout", "0.5", "--warmup-epochs", "0", "--aug-gamma", "0",
            "--aug-shift", "0", "--aug-scale-min", "0.8", "--aug-brightness", "0.2", "--aug-contrast", "0.2"]


def grouped_folds(labels, groups, k: int, seed: int) -> list:
    """k disjoint, patient-grouped, class-stratified folds covering every index once."""
    labels = np.asarray(labels)
    rest = np.arange(len(labels))
    folds = []
    for i in range(k, 1, -1):
        # Take 1/i of what is left: the last fold gets the remainder.
        keep, held = train_cxr.grouped_split(labels[rest], [groups[j] for j in rest], 1.0 / i, seed + i)
        folds.append(rest[held])
        rest = rest[keep]
    folds.append(rest)
    return folds


def link_fold(root: Path, samples: list, classes: list, train_idx, test_idx) -> None:
    for split, idx in (("train", train_idx), ("test", test_idx)):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
        for i in idx:
            path, label = samples[i]
            link = root / split / classes[label] / Path(path).name
            # Already there from an earlier call with this --out (--only 0, then more --train-seeds): kept; it
            # stopped that call with a FileExistsError traceback. A link elsewhere still raises.
            if not (link.is_symlink() and os.readlink(link) == str(Path(path).resolve())):
                link.symlink_to(Path(path).resolve())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/chest_xray_224/train"),
                   help="a folder with one sub-folder per class (the training split)")
    p.add_argument("--recipe", choices=("default", "baseline"), default="default")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs (state it when reporting)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", type=int, nargs="+", default=None, metavar="K",
                   help="run only these folds (0-based; the folds do not change): for recipes too slow for all")
    p.add_argument("--train-seeds", type=int, nargs="+", default=None, metavar="S",
                   help="train each fold once per seed (same folds): the spread of the chosen threshold")
    p.add_argument("--out", default=None, help="keep the fold runs here (default: a temp folder)")
    p.add_argument("extra", nargs="*", help="extra train_cxr.py flags after --")
    a = p.parse_args()
    classes, samples = train_cxr.list_image_folder(Path(a.data))
    labels = [s[1] for s in samples]
    groups = [train_cxr.patient_id(s[0]) for s in samples]
    folds = grouped_folds(labels, groups, a.folds, a.seed)
    work = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="cv_"))
    flags = (BASELINE if a.recipe == "baseline" else []) + (["--epochs", str(a.epochs)] if a.epochs else [])
    flags += ["--num-gradcam-images", "0", "--bootstrap", "0"] + a.extra
    print(f"recipe: {a.recipe} | folds: {a.folds} | flags: {' '.join(flags)}")
    if a.only is not None and not set(a.only) <= set(range(a.folds)):
        p.error(f"--only takes fold numbers 0 to {a.folds - 1}, got {a.only}")
    rows, thresholds = [], []
    for k, test_idx in enumerate(folds):
        if a.only is not None and k not in a.only:
            continue
        train_idx = np.setdiff1d(np.arange(len(samples)), test_idx)
        assert not {groups[i] for i in train_idx} & {groups[i] for i in test_idx}, "patient leak"
        root = work / f"fold{k}"
        link_fold(root / "data", samples, classes, train_idx, test_idx)
        for seed in a.train_seeds or [None]:
            name = "run" if seed is None else f"run_seed{seed}"
            t0 = time.time()
            rc = train_cxr.main(["--data-dir", str(root / "data"), "--output-dir", str(root), "--run-name", name,
                                 *flags, *(["--seed", str(seed)] if seed is not None else [])])
            if rc != 0:
                print(f"fold {k}: train_cxr.py exited {rc}")
                return rc
            m = json.loads((root / name / "test_metrics.json").read_text())
            rows.append({"auc": m["auc"], "accuracy": m["accuracy"], "sensitivity": m["sensitivity"],
                         "specificity": m["specificity"], "ece": m["ece"],
                         "flagged": m["ood"]["share_flagged"], "threshold": m["threshold"],
                         "minutes": (time.time() - t0) / 60})
            thresholds.append(m["thresholds_by_policy"])
            print(f"fold {k}{'' if seed is None else f' seed {seed}'}: "
                  + " ".join(f"{key} {v:.4f}" for key, v in rows[-1].items()), flush=True)
    ran = f"folds {', '.join(map(str, a.only))} of " if a.only is not None else ""
    print(f"\n{a.recipe} recipe, {ran}{a.folds}-fold patient-grouped CV on {a.data} ({len(samples)} images)")
    for key in rows[0]:
        v = np.array([r[key] for r in rows])
        print(f"{key}: {v.mean():.4f} +- {v.std(ddof=1) if len(v) > 1 else 0:.4f}")
    if len(thresholds) > 1:
        print("threshold chosen on validation, spread (max - min) over the runs above, per policy:")
        for policy in thresholds[0]:
            v = np.array([t[policy] for t in thresholds])
            scale = "raw scores" if policy.endswith("uncalibrated") else "calibrated"
            print(f"  {policy:<20} {v.max() - v.min():.4f}  ({scale}: {', '.join(f'{x:.3f}' for x in v)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
