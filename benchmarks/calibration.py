"""Which prior for the calibration fit? Jeffreys' (shipped), Platt's targets, or none, judged on held-out patients.

    python benchmarks/quality.py --folds 3 --only 0 --out /tmp/cv     # a run with a held-out fold
    python benchmarks/calibration.py /tmp/cv/fold0 [/tmp/cv/fold1 ...]

FOLD is a folder that quality.py left (FOLD/run/best_model.pt, trained on FOLD/data/train, which the
script split into train and a patient-grouped validation part; FOLD/data/test holds patients it never
saw). The network's raw probabilities on the run's own validation split and on the held-out patients
are computed once; then train_cxr.fit_calibration is fitted on validation, or on random subsets of
it (the few dozen images of a small data set or a --recalibrate folder), with each prior, and judged
on the held-out patients: log loss, Brier score, ECE (15 bins) and AUC of the calibrated
P(positive), and the temperature (means over the subsets). The last column counts the subsets the
model separates perfectly, where the fit without a prior sends T towards 0.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import brier_score_loss, log_loss

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_cxr as T  # noqa: E402


def raw_probs(fold: Path, run: str = "run") -> tuple:
    """(validation probs, labels), (held-out probs, labels) and the positive class of FOLD's run."""
    ckpt = T.load_checkpoint(fold / run / "best_model.pt")
    cfg = T.Config.from_dict(ckpt["config"])
    cfg.data_dir, cfg.num_workers = str(fold / "data"), 0
    # the run's own split: carved under the rules it was made with (absent: made before the rule)
    data = T.prepare_data(cfg, group_copies=bool(ckpt.get("copies_grouped")),
                          own_in_class=bool(ckpt.get("own_in_class")))
    model, rt = T.model_from_checkpoint(ckpt), T.setup_runtime(T.Config(device="cpu", amp="off"))
    probs = lambda s: T.predict_probs(model, s.images, ckpt["img_size"], ckpt["normalization"], rt, cfg.tta)
    return [(probs(data[k]), data[k].labels.numpy()) for k in ("val", "test")], ckpt["positive_class"]


def scores(p: np.ndarray, y: np.ndarray) -> list:
    """Log loss, Brier score, ECE and AUC of the probabilities p of the positive labels y."""
    return [log_loss(y, np.clip(p, 1e-15, 1 - 1e-15)), brier_score_loss(y, p), T.calibration_error(y, p),
            T.roc_auc(y, p)]


def judge(cal: dict, probs: np.ndarray, labels: np.ndarray, pos: int) -> list:
    return [*scores(T.calibrate(probs, cal)[:, pos], labels == pos), float(cal["temperature"])]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folds", nargs="+", help="fold folders left by benchmarks/quality.py")
    ap.add_argument("--sizes", type=int, nargs="+", default=[40, 100, 300], help="validation subset sizes")
    ap.add_argument("--draws", type=int, default=100, help="random subsets per size")
    ap.add_argument("--run", default="run", help="the run folder inside FOLD (quality.py --train-seeds: run_seedS)")
    a = ap.parse_args()
    names = ["log loss", "Brier", "ECE", "AUC", "T"]
    print(f"{'fold':<8} {'fit on':<16} {'prior':<8} " + " ".join(f"{n:>9}" for n in names) + "  separable")
    for fold in map(Path, a.folds):
        ((pv, yv), (pt, yt)), pos = raw_probs(fold, a.run)
        print(f"{fold.name:<8} {'(uncalibrated)':<16} {'':<8} "
              + " ".join(f"{v:9.4f}" for v in scores(pt[:, pos], yt == pos)))
        rng = np.random.default_rng(0)
        for size in [*(s for s in a.sizes if s < len(yv)), len(yv)]:
            draws = [np.arange(len(yv))] if size >= len(yv) else [rng.choice(len(yv), size, replace=False)
                                                                 for _ in range(a.draws)]
            draws = [d for d in draws if len(np.unique(yv[d])) == 2]  # a subset needs both classes
            sep = sum(pv[d][yv[d] == pos, pos].min() > pv[d][yv[d] != pos, pos].max() for d in draws)
            for prior in ("jeffreys", "platt", "none"):
                got = np.array([judge(T.fit_calibration(pv[d], yv[d], prior), pt, yt, pos) for d in draws])
                print(f"{fold.name:<8} {f'val {size}' + ('' if len(draws) == 1 else ' subsets'):<16} {prior:<8} "
                      + " ".join(f"{v:9.4f}" for v in got.mean(0)) + f"  {sep}/{len(draws)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
