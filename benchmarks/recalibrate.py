"""What --recalibrate buys at a new site: refit on a few dozen labelled images, score others.

    python benchmarks/quality.py --folds 3 --only 0 --out /tmp/cv     # a run with a held-out fold
    python benchmarks/recalibrate.py /tmp/cv/fold0 --per-class 40

The held-out fold FOLD/data/test (patients the model never saw) is split by patient into two
halves: the "site" half gives --per-class x (number of classes) labelled images to
--recalibrate, the "judge" half is scored by --evaluate with the original and the recalibrated
checkpoint. Three sites are simulated: the images as they are (site images drawn at the fold's
prevalence); the same through another scanner (gamma 1.6, contrast squeezed into 15-85% of the
range, a slight blur); and a site where half the patients have pneumonia (site and judge
images balanced by class, against ~74% in training). Printed per setting: log loss (of the
calibrated P(positive), from test_predictions.csv), ECE, accuracy, sensitivity, specificity,
threshold and the share flagged by the guard, before -> after. --prior refits with another prior
of train_cxr.fit_calibration (jeffreys, the shipped one; platt; none) for comparison.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import csv
import functools

import cv2
import numpy as np
from sklearn.metrics import log_loss

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_cxr as T  # noqa: E402


def other_scanner(img: np.ndarray) -> np.ndarray:
    x = (img.astype(np.float32) / 255) ** 1.6
    x = 0.15 + 0.70 * x
    return np.clip(cv2.GaussianBlur(x, (0, 0), 1.0) * 255, 0, 255).astype(np.uint8)


def write_half(root: Path, samples: list, classes: list, idx, shift: bool) -> None:
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
    for i in idx:
        path, label = samples[i]
        img = cv2.imread(path, cv2.IMREAD_GRAYSCALE)
        cv2.imwrite(str(root / classes[label] / (Path(path).stem + ".png")), other_scanner(img) if shift else img)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("fold", help="a fold folder left by benchmarks/quality.py (FOLD/run, FOLD/data/test)")
    p.add_argument("--run", default="run", help="the run folder inside FOLD")
    p.add_argument("--per-class", type=int, default=40, help="labelled site images per class for --recalibrate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prior", default="jeffreys", choices=["jeffreys", "platt", "none"])
    a = p.parse_args()
    T.fit_calibration = functools.partial(T.fit_calibration, prior=a.prior)  # --recalibrate runs in-process
    fold, ckpt = Path(a.fold), Path(a.fold) / a.run / "best_model.pt"
    classes, samples = T.list_image_folder(fold / "data" / "test")
    labels = np.array([s[1] for s in samples])
    site, judge = T.grouped_split(labels, [T.patient_id(s[0]) for s in samples], 0.5, a.seed)
    rng = np.random.default_rng(a.seed)
    n_site = a.per_class * len(classes)
    site_same = rng.permutation(site)[:n_site]  # the fold's own prevalence
    balanced = lambda idx, n: np.concatenate([rng.permutation(idx[labels[idx] == k])[:n] for k in range(len(classes))])
    judge_bal = balanced(judge, min(np.bincount(labels[judge])))
    settings = [("as is", site_same, judge, False), ("other scanner", site_same, judge, True),
                ("50% prevalence", balanced(site, a.per_class), judge_bal, False)]
    work = Path(tempfile.mkdtemp(prefix="recal_"))
    common = ["--num-workers", "0", "--output-dir", str(work)]
    print(f"{fold}: recalibrate on {n_site} images of half the held-out patients, judge on the other half "
          f"(prior {a.prior})")
    for n, (name, site_idx, judge_idx, shift) in enumerate(settings):
        tag = f"s{n}"
        write_half(work / f"site_{tag}", samples, classes, site_idx, shift)
        write_half(work / f"judge_{tag}", samples, classes, judge_idx, shift)
        assert T.main(["--recalibrate", str(work / f"site_{tag}"), "--checkpoint", str(ckpt), "--run-name",
                       f"recal_{tag}", *common]) == 0
        rows = {}
        for when, ck in (("before", ckpt), ("after", work / f"recal_{tag}" / "recalibrated_model.pt")):
            assert T.main(["--evaluate", "--checkpoint", str(ck), "--data-dir", str(work / f"judge_{tag}"),
                           "--run-name", f"eval_{tag}_{when}", *common]) == 0
            rows[when] = json.loads((work / f"eval_{tag}_{when}" / "test_metrics.json").read_text())
            with open(work / f"eval_{tag}_{when}" / "test_predictions.csv", newline="") as f:
                pred = list(csv.DictReader(f))
            pos = rows[when]["positive_class"]
            rows[when]["log_loss"] = log_loss([r["true"] == pos for r in pred],
                                              [float(r[f"prob_{pos}"]) for r in pred], labels=[False, True])
        keys = ("log_loss", "ece", "accuracy", "sensitivity", "specificity", "threshold")
        cells = [f"{k} {rows['before'][k]:.3f} -> {rows['after'][k]:.3f}" for k in keys]
        flagged = [rows[when]["ood"]["share_flagged"] for when in ("before", "after")]
        cells.append(f"flagged {flagged[0]:.1%} -> {flagged[1]:.1%}")
        print(f"{name:<15} (judge {rows['before']['n']} images) " + " | ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
