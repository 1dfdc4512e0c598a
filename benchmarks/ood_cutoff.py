"""How many new training-like images does the guard flag, by the size of the validation split?

    python benchmarks/ood_cutoff.py [--repeats 40]

The guard's cutoff is the OOD_QUANTILE (99%) percentile of the validation images' scores, and the
same images set each layer's scale and the weight of the zoomed-view part. This fits
train_cxr.fit_ood_guard on synthetic Gaussian "layer features" (two layers, 2,000 training images,
a shifted copy as the zoomed views) with n validation images drawn from the training distribution,
then scores 5,000 fresh images of that distribution: the share flagged, averaged over --repeats
fits, against the 1% the quantile names. No network is involved: it isolates the cutoff's statistics.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_cxr as T  # noqa: E402


def features(rng: np.random.Generator, n: int) -> list:
    return [rng.normal(size=(n, 4)) * [1, 2, 0.5, 1], rng.normal(size=(n, 6))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 23, 50, 100, 300, 1000])
    a = ap.parse_args()
    print(f"validation images -> share of fresh training-like images flagged (quantile {T.OOD_QUANTILE})")
    for n in a.sizes:
        shares = []
        for rep in range(a.repeats):
            rng = np.random.default_rng(rep)
            guard = T.fit_ood_guard(features(rng, 2000), rng.integers(0, 2, 2000), features(rng, n), T.OOD_QUANTILE,
                                    [f * 1.5 + 0.3 for f in features(rng, 2000)])
            shares.append(float((T.ood_scores(guard, features(rng, 5000)) > guard["cutoff"]).mean()))
        print(f"{n:>6}: {np.mean(shares):.1%} (sd {np.std(shares):.1%} over {a.repeats} fits)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
