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
the threshold, epoch_minutes (the run's epochs, history.csv's seconds, over every session that
trained it) and minutes (wall time, of the runs this call trained whole: a resumed run's line
gives its session's, a reused run's none, and the mean leaves both out, saying so). With
--train-seeds, every fold is trained once per seed and the spread of the threshold each policy
would choose is printed. Run again with the same --out after a stop
(Ctrl-C, a crash), it goes on where it stopped, saying so: a fold's links left half-made are
completed, a run stopped in training is resumed (or trained again if no epoch had ended) and a
finished run's results are reused; a fold or run of other settings there is refused.

Recipes: "default" is the script's constants; "baseline" is the original notebook recipe
(224 px, 3x identical channels averaged to gray, 32-64-128-256 channels, FC 512, Adam 1e-3,
no weight decay, no label smoothing, no EMA, no TTA, dataset normalisation, fp32).
Caveat (README): validation carved from train scores higher than the official test split.
"""
from __future__ import annotations

import argparse
import csv
import json
import shutil
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
    links = {root / split / classes[samples[i][1]] / Path(samples[i][0]).name: Path(samples[i][0]).resolve()
             for split, idx in (("train", train_idx), ("test", test_idx)) for i in idx}
    if root.exists():
        # The same --out again (more --train-seeds, or a fold run before): the fold's links are reused. They
        # stopped it with a FileExistsError traceback; and a fold made with other --folds, --seed or --data,
        # merged with this one, would put held-out patients into training: refused.
        have = {p: p.resolve() for p in root.rglob("*") if p.is_symlink()}
        if any(links.get(p) != target for p, target in have.items()):
            raise SystemExit(f"error: {root} holds another fold (other --data, --folds or --seed): pass another --out")
        if len(have) == len(links):
            return
        # Some of this fold's links and no other: an earlier run stopped while making them (it was refused
        # as another fold). The missing ones are made.
        print(f"{root}: this fold, left half-made by an interrupted run ({len(have)} of {len(links)} links): "
              "completing it")
    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
    for link, target in links.items():
        if not link.is_symlink():
            link.symlink_to(target)


def earlier_run(run: Path, argv: list) -> str:
    """What an earlier quality.py with this --out left at run: "new" (nothing), "redo" (stopped before its first
    epoch ended, so nothing to keep: removed), "resume" (stopped later) or "finished". A run of other settings
    (train_cxr.py's --resume check: other --epochs or extra flags) is refused: its figures are not these."""
    if not run.exists():
        return "new"
    if not (run / "last.pt").is_file():
        if (run / "best_model.pt").exists():  # every epoch writes best_model.pt before last.pt
            raise SystemExit(f"error: {run} has a best_model.pt but no last.pt, so it cannot be resumed or judged: "
                             "delete it to train it again, or pass another --out")
        shutil.rmtree(run)
        return "redo"
    _, args = train_cxr.parse_config(["--resume", str(run), *argv])
    cfg = train_cxr.Config.from_dict(train_cxr.load_checkpoint(run, "last.pt")["config"])
    try:
        train_cxr.check_resume_flags(args, cfg, run)
    except train_cxr.CXRError as e:  # its list of differences, without the advice meant for a resume
        raise SystemExit(f"error: {run} was made with other settings: {str(e).split(': --resume continues')[0]}; "
                         "pass another --out")
    return "finished" if (run / "test_metrics.json").is_file() else "resume"


EARLIER = {"redo": "stopped before its first epoch ended in an earlier run: trained again from the start",
           "resume": "stopped in an earlier run of these settings: resumed",
           "finished": "finished by an earlier run of these settings: its results are reused (not timed)"}


def epoch_minutes(run: Path) -> float:
    """The minutes of the run's epochs, training and validation, over every session that trained it: the sum of
    history.csv's seconds (nan without them). An epoch abandoned by a stop is not in it, nor decoding or the test
    report; but a resumed or reused run is counted whole, as the wall minutes of one call are not."""
    try:
        with open(run / "history.csv", newline="", encoding="utf-8") as f:
            return sum(float(r["seconds"]) for r in csv.DictReader(f)) / 60
    except (OSError, KeyError, ValueError):
        return float("nan")


def minutes_text(minutes: float, earlier: str) -> str:
    """A run's wall minutes on its line: of a resumed run only this call's session is timed, of a reused one
    nothing (they were printed as if whole, and as "nan")."""
    if earlier == "finished":
        return "reused (not timed)"
    return f"{minutes:.4f}" + (" (resumed: this session only)" if earlier == "resume" else "")


def minutes_summary(runs: list) -> str:
    """The summary's minutes line from (wall minutes, earlier) per run: the mean over runs trained whole by this
    call, naming those left out; the resumed runs' sessions were averaged with whole runs as if whole."""
    whole = np.array([m for m, earlier in runs if earlier in ("new", "redo")])
    resumed = sum(earlier == "resume" for _, earlier in runs)
    reused = sum(earlier == "finished" for _, earlier in runs)
    left = ", ".join(f"{n} {what}" for n, what in ((resumed, "resumed"), (reused, "reused")) if n)
    if not len(whole):
        return f"minutes: not timed, no run was trained whole by this call ({left}): see epoch_minutes"
    spread = whole.std(ddof=1) if len(whole) > 1 else 0
    return f"minutes: {whole.mean():.4f} +- {spread:.4f}" + (
        f" (the {len(whole)} run(s) trained whole by this call; {left} left out)" if left else "")


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
    p.add_argument("--out", default=None, help="keep the fold runs here (default: a temp folder); "
                   "the same --out again goes on after a stop")
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
    rows, thresholds, timed = [], [], []
    for k, test_idx in enumerate(folds):
        if a.only is not None and k not in a.only:
            continue
        train_idx = np.setdiff1d(np.arange(len(samples)), test_idx)
        assert not {groups[i] for i in train_idx} & {groups[i] for i in test_idx}, "patient leak"
        root = work / f"fold{k}"
        link_fold(root / "data", samples, classes, train_idx, test_idx)
        for seed in a.train_seeds or [None]:
            name = "run" if seed is None else f"run_seed{seed}"
            argv = ["--data-dir", str(root / "data"), "--output-dir", str(root), "--run-name", name,
                    *flags, *(["--seed", str(seed)] if seed is not None else [])]
            # The same --out again after a stop (Ctrl-C, a crash): train_cxr.py refused the run folder as taken.
            earlier = earlier_run(root / name, argv)
            if earlier != "new":
                print(f"fold {k}{'' if seed is None else f' seed {seed}'}: {root / name} {EARLIER[earlier]}")
            t0 = time.time()
            rc = 0 if earlier == "finished" else train_cxr.main(
                (["--resume", str(root / name)] if earlier == "resume" else []) + argv)
            if rc != 0:
                print(f"fold {k}: train_cxr.py exited {rc}")
                return rc
            m = json.loads((root / name / "test_metrics.json").read_text())
            rows.append({"auc": m["auc"], "accuracy": m["accuracy"], "sensitivity": m["sensitivity"],
                         "specificity": m["specificity"], "ece": m["ece"],
                         "flagged": m["ood"]["share_flagged"], "threshold": m["threshold"],
                         "epoch_minutes": epoch_minutes(root / name)})
            timed.append(((time.time() - t0) / 60, earlier))
            thresholds.append(m["thresholds_by_policy"])
            print(f"fold {k}{'' if seed is None else f' seed {seed}'}: "
                  + " ".join(f"{key} {v:.4f}" for key, v in rows[-1].items())
                  + f" minutes {minutes_text(*timed[-1])}", flush=True)
    ran = f"folds {', '.join(map(str, a.only))} of " if a.only is not None else ""
    print(f"\n{a.recipe} recipe, {ran}{a.folds}-fold patient-grouped CV on {a.data} ({len(samples)} images)")
    for key in rows[0]:
        v = np.array([r[key] for r in rows])
        print(f"{key}: {v.mean():.4f} +- {v.std(ddof=1) if len(v) > 1 else 0:.4f}")
    print(minutes_summary(timed))
    if len(thresholds) > 1:
        print("threshold chosen on validation, spread (max - min) over the runs above, per policy:")
        for policy in thresholds[0]:
            v = np.array([t[policy] for t in thresholds])
            scale = "raw scores" if policy.endswith("uncalibrated") else "calibrated"
            print(f"  {policy:<20} {v.max() - v.min():.4f}  ({scale}: {', '.join(f'{x:.3f}' for x in v)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
