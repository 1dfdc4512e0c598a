"""How many new training-like images does the guard flag, by the size of the validation split?

    python benchmarks/ood_cutoff.py [--repeats 40]

The guard's cutoff is the OOD_QUANTILE (99%) percentile of the validation images' scores, and the
same images set each layer's scale and the weight of the zoomed-view part. This fits
train_cxr.fit_ood_guard on synthetic Gaussian "layer features" (two layers, 2,000 training images,
a shifted copy as the zoomed views) with n validation images drawn from the training distribution,
then scores 5,000 fresh images of that distribution: the share flagged, averaged over --repeats
fits, against the 1% the quantile names. No network is involved: it isolates the cutoff's statistics.

Beside the shipped cutoff, on the same fits, two that were measured and not shipped (README,
Out-of-distribution guard): the conformal order statistic of the same scores, and that statistic
of cross-fitted scores (each half of the validation images scored with the scales and weight
fitted on the other half). benchmarks/ood.py --compare measures both on real folds.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_cxr as T  # noqa: E402


def features(rng: np.random.Generator, n: int) -> list:
    return [rng.normal(size=(n, 4)) * [1, 2, 0.5, 1], rng.normal(size=(n, 6))]


def conformal(scores: np.ndarray, q: float) -> float:
    """The ceil((n + 1) q)-th smallest of n scores (the highest when there are too few): a new score
    exchangeable with them exceeds it with probability at most 1 - q (Angelopoulos & Bates 2021)."""
    k = math.ceil((len(scores) + 1) * q - 1e-9)
    return float(np.sort(scores)[min(k, len(scores)) - 1])


def cross_fitted(train: list, labels, held: list, q: float, zoomed: list | None) -> np.ndarray:
    """The score of each image of `held`, in its order, by a guard whose scales and weight were
    fitted on the other half (even and odd positions; fit_ood_guard on one half fits exactly those)."""
    n = len(held[0])
    halves, out = (np.arange(0, n, 2), np.arange(1, n, 2)), np.empty(n)
    for fit_on, score in (halves, halves[::-1]):
        guard = T.fit_ood_guard(train, labels, [f[fit_on] for f in held], q, zoomed)
        out[score] = T.ood_scores(guard, [f[score] for f in held])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 23, 50, 100, 300, 1000])
    a = ap.parse_args()
    q = T.OOD_QUANTILE
    print(f"share of fresh training-like images flagged, mean (sd) over {a.repeats} fits; quantile {q}")
    cols = ("shipped (np.quantile)", "conformal", "conformal, cross-fitted")
    print(f"{'validation images':>17}" + "".join(f"{c:>26}" for c in cols))
    for n in a.sizes:
        shares = {c: [] for c in cols}
        for rep in range(a.repeats):
            rng = np.random.default_rng(rep)
            train, labels, held = features(rng, 2000), rng.integers(0, 2, 2000), features(rng, n)
            zoomed = [f * 1.5 + 0.3 for f in features(rng, 2000)]
            guard = T.fit_ood_guard(train, labels, held, q, zoomed)
            fresh = T.ood_scores(guard, features(rng, 5000))
            cuts = (guard["cutoff"], conformal(T.ood_scores(guard, held), q),
                    conformal(cross_fitted(train, labels, held, q, zoomed), q))
            for c, cut in zip(cols, cuts):
                shares[c].append(float((fresh > cut).mean()))
        print(f"{n:>17}" + "".join(f"{f'{np.mean(s):.1%} ({np.std(s):.1%})':>26}" for s in shares.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
