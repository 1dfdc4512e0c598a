"""Saying when a prediction cannot be trusted: calibration, threshold policies, the
out-of-distribution guard, fp32 scoring, old checkpoints, --recalibrate and the CSV columns."""
import dataclasses
import errno
import io
import json
import os
import re
import shutil
import signal
import types
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from scipy.spatial.distance import mahalanobis
from sklearn.calibration import calibration_curve
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_curve

import train_cxr as T
from conftest import TINY, load_benchmark, read_csv, run

ONE_THREAD = ["--num-threads", "1", "--device", "cpu"]  # compared with CPU runs: pinned where a GPU is visible


# ----------------------------------------------------------------------------------------------
# Calibration maths against references
# ----------------------------------------------------------------------------------------------
def overconfident(n=20000, temperature=3.0, prior_shift=0.8, seed=0):
    """Labels drawn from sigmoid(z), probabilities reported as sigmoid(temperature * z - shift)."""
    rng = np.random.default_rng(seed)
    z = np.clip(rng.normal(0, 1.2, n), -4, 4)  # no probability below the 1e-7 that the fit clips to
    y = rng.random(n) < 1 / (1 + np.exp(-z))
    p1 = 1 / (1 + np.exp(-(temperature * z - prior_shift)))
    return y.astype(int), np.stack([1 - p1, p1], 1)


def test_calibration_without_a_prior_equals_logistic_regression_on_the_log_odds():
    # For two classes softmax(log p / T + b) is Platt scaling: a logistic regression on logit(p).
    y, probs = overconfident()
    logit = np.log(probs[:, 1] / probs[:, 0])[:, None]
    ref = LogisticRegression(C=1e12, tol=1e-10, max_iter=10_000).fit(logit, y)
    for prior, rel in (("none", 1e-4), ("jeffreys", 2e-3)):  # 20,000 images: the prior barely pulls
        cal = T.fit_calibration(probs, y, prior)
        assert 1 / float(cal["temperature"]) == pytest.approx(ref.coef_[0, 0], rel=rel)
        b = cal["bias"].double().numpy()
        assert b[1] - b[0] == pytest.approx(ref.intercept_[0], abs=10 * rel)
        np.testing.assert_allclose(T.calibrate(probs, cal)[:, 1], ref.predict_proba(logit)[:, 1], atol=10 * rel)
    assert float(cal["temperature"]) == pytest.approx(3.0, rel=0.1)  # the distortion is recovered


def firth_score(logit, y, cal):
    """Firth's (1993) modified score of a logistic regression on x = (logit, 1), written out with
    the hat matrix: sum_i (y_i - p_i + h_i (1/2 - p_i)) x_i, zero at the Jeffreys-penalised optimum."""
    a, b = 1 / float(cal["temperature"]), float(cal["bias"][1] - cal["bias"][0])
    x = np.stack([logit, np.ones_like(logit)], 1)
    p = 1 / (1 + np.exp(-(a * logit + b)))
    w = p * (1 - p)
    xw = x * np.sqrt(w)[:, None]
    h = np.einsum("ij,jk,ik->i", xw, np.linalg.inv(x.T @ (x * w[:, None])), xw)
    return (y - p + h * (0.5 - p)) @ x


def test_calibration_is_firths_penalised_logistic_regression():
    rng = np.random.default_rng(5)
    p = np.r_[rng.uniform(0.3, 0.99, 30), rng.uniform(0.01, 0.7, 12)]  # 42 images, overlapping
    y = np.r_[np.ones(30, int), np.zeros(12, int)]
    cal = T.fit_calibration(np.stack([1 - p, p], 1), y)
    np.testing.assert_allclose(firth_score(np.log(p / (1 - p)), y, cal), 0, atol=1e-5)
    none = T.fit_calibration(np.stack([1 - p, p], 1), y, "none")
    assert np.abs(firth_score(np.log(p / (1 - p)), y, none)).max() > 0.1  # the check tells the two apart


def test_calibration_of_a_perfectly_separated_split_keeps_the_ranking():
    # A validation split the model gets entirely right: plain maximum likelihood sent T to ~0.01 and
    # every new image's probability to exactly 0 or 1 (ties: the AUC fell, the log loss exploded).
    rng = np.random.default_rng(4)
    p_val = np.r_[rng.uniform(0.6, 0.999, 30), rng.uniform(0.001, 0.4, 10)]
    y_val = np.r_[np.ones(30, int), np.zeros(10, int)]
    p_new = rng.uniform(0.001, 0.999, 2000)
    y_new = rng.random(2000) < p_new
    got = {}
    for prior in ("jeffreys", "platt", "none"):
        cal = T.fit_calibration(np.stack([1 - p_val, p_val], 1), y_val, prior)
        got[prior] = out = T.calibrate(np.stack([1 - p_new, p_new], 1), cal)[:, 1]
        if prior != "none":
            assert 0.1 < float(cal["temperature"]) < 1.5  # finite
            assert len(np.unique(out)) == len(np.unique(p_new)) and 0 < out.min() and out.max() < 1
            assert T.roc_auc(y_new, out) == T.roc_auc(y_new, p_new)
    np.testing.assert_allclose(firth_score(np.log(p_val / (1 - p_val)), y_val, T.fit_calibration(
        np.stack([1 - p_val, p_val], 1), y_val)), 0, atol=1e-5)
    assert T.roc_auc(y_new, got["none"]) < T.roc_auc(y_new, p_new)  # what the prior prevents


def test_calibration_is_monotone_and_lowers_ece():
    y, probs = overconfident(seed=1)
    cal = T.fit_calibration(probs, y)
    after = T.calibrate(probs, cal)
    order = np.argsort(probs[:, 1])
    assert np.all(np.diff(after[order, 1]) >= 0)  # ranking (AUC) unchanged
    assert T.calibration_error(y, after[:, 1]) < 0.02 < T.calibration_error(y, probs[:, 1])
    assert T.calibrate(probs, None) is probs  # no calibration: untouched


def test_calibration_keeps_the_ranking_of_probabilities_below_the_fits_floor():
    # A confident model (--label-smoothing 0) gives fp32 P(positive) below 1e-7, to positives it gets
    # wrong too: calibrate clipped them all to 1e-7, a tie that changed the AUC the README says it keeps.
    rng = np.random.default_rng(0)
    logit = np.r_[np.linspace(-30, -17, 12), rng.normal(0, 3, 40)]
    y = np.r_[[1, 0] * 6, rng.random(40) < 1 / (1 + np.exp(-logit[12:]))].astype(int)
    p = torch.from_numpy(np.stack([np.zeros_like(logit), logit], 1)).float().softmax(1).numpy()  # as scored
    cal = T.fit_calibration(p, y)
    out = T.calibrate(p, cal)[:, 1]
    order = np.argsort(p[:, 1])
    assert np.all(np.diff(p[order, 1]) > 0) and np.all(np.diff(out[order]) > 0)  # no new ties
    assert T.roc_auc(y, out) == T.roc_auc(y, p[:, 1])
    # Nor the log of fp32 probabilities, taken in fp32 (np.clip kept fp32): 21 neighbouring P gave 4 values.
    near = np.float32(1e-3) + np.arange(21, dtype=np.float32) * np.spacing(np.float32(1e-3))
    out = T.calibrate(np.stack([np.full_like(near, 0.999), near], 1), cal)[:, 1]
    assert len(np.unique(out)) == 21


def test_three_class_calibration_sums_to_one():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 3, 600)
    logits = rng.normal(size=(600, 3)) + 2 * np.eye(3)[labels]
    probs = torch.from_numpy(logits * 2.5).softmax(1).numpy()
    cal = T.fit_calibration(probs, labels)
    out = T.calibrate(probs, cal)
    np.testing.assert_allclose(out.sum(1), 1, atol=1e-9)
    assert float(cal["temperature"]) > 1.0  # overconfident inputs get a temperature above 1
    nll = lambda p: -np.log(p[np.arange(len(labels)), labels]).mean()
    assert nll(out) < nll(probs)


def test_ece_matches_a_reference_built_on_sklearn_calibration_curve():
    def reference(y, p):
        frac, mean = calibration_curve(y, p, n_bins=15, strategy="uniform")
        counts = np.histogram(p, bins=np.linspace(0, 1, 16))[0]
        return float((counts[counts > 0] / len(p) * np.abs(frac - mean)).sum())
    rng = np.random.default_rng(3)
    p = rng.random(5000) ** 1.5
    y = rng.random(5000) < np.clip(p + 0.1, 0, 1)
    assert T.calibration_error(y, p) == pytest.approx(reference(y, p), abs=1e-12)
    assert T.calibration_error(y, np.clip(p + 0.1, 0, 1)) < T.calibration_error(y, p)
    # Overconfident at both ends: the bins' gaps have opposite signs and must add up, not cancel.
    assert T.calibration_error([1, 0], [0.1, 0.9]) == pytest.approx(0.9)
    q = np.clip(0.5 + 1.8 * (p - 0.5), 0, 1)
    assert T.calibration_error(y, q) == pytest.approx(reference(y, q), abs=1e-12)


# ----------------------------------------------------------------------------------------------
# Threshold policies
# ----------------------------------------------------------------------------------------------
def scores(seed, n=400, decimals=2):
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.7
    return y, np.round(np.clip(rng.normal(0.35 + 0.3 * y, 0.15), 0, 1), decimals)  # rounded: many ties


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_youden_policy_maximises_j_and_never_sits_on_a_score(seed):
    y, s = scores(seed)
    t = T.choose_threshold(y, s, "youden")
    fpr, tpr, _ = roc_curve(y, s)
    m = T.binary_metrics(y, s, t)
    assert m["sensitivity"] + m["specificity"] - 1 == pytest.approx((tpr - fpr).max())
    assert t not in set(s.tolist())  # midway between neighbouring scores: a tie cannot flip it


@pytest.mark.parametrize("target", [0.8, 0.95, 0.99])
def test_sensitivity_policy_is_the_highest_threshold_meeting_the_target(target):
    y, s = scores(4, decimals=6)
    t = T.choose_threshold(y, s, f"sensitivity:{target}")
    assert T.binary_metrics(y, s, t)["sensitivity"] >= target
    nxt = np.sort(s[y])[np.sort(s[y]) > t][0]  # thresholds in (t, nxt] keep the same images...
    assert T.binary_metrics(y, s, nxt)["sensitivity"] == T.binary_metrics(y, s, t)["sensitivity"]
    assert T.binary_metrics(y, s, np.nextafter(nxt, 1))["sensitivity"] < target  # ...any higher one misses


def test_sensitivity_policy_that_must_keep_every_positive_sits_between_scores():
    # Under 20 positives, sensitivity:0.95 must keep them all: the threshold was the lowest positive
    # score itself, so any rounding of that score lost the image.
    y = np.r_[np.ones(19, bool), np.zeros(6, bool)]
    s = np.r_[np.linspace(0.5, 0.9, 19), [0.1, 0.2, 0.3, 0.4, 0.45, 0.7]]
    t = T.choose_threshold(y, s, "sensitivity:0.95")
    assert t == pytest.approx((0.5 + 0.45) / 2) and t not in set(s.tolist())
    assert T.binary_metrics(y, s, t)["sensitivity"] == 1.0
    assert T.choose_threshold(y[:19], s[:19], "sensitivity:0.95") == 0.5  # nothing lower: at the score


def test_sensitivity_policy_does_not_fall_below_a_negative_it_need_not_call_positive():
    # 20 positives at 0.5 / 0.6 / 0.7 and negatives in between: sensitivity:0.95 may lose one
    # positive. The threshold went midway between positive scores (0.6), calling the negatives at
    # 0.6-0.7 positive; 0.75 keeps the same positives.
    y = np.r_[np.ones(20, bool), np.zeros(3, bool)]
    s = np.r_[[0.5], [0.8] * 19, [0.6, 0.65, 0.7]]
    t = T.choose_threshold(y, s, "sensitivity:0.95")
    assert t == pytest.approx(0.75)
    m = T.binary_metrics(y, s, t)
    assert m["sensitivity"] == 0.95 and m["specificity"] == 1.0


def test_youden_policy_of_a_useless_model_calls_nothing_positive():
    # No cut beats "nothing positive" (every J <= 0): the threshold was min(1, inf) = 1.0, calling
    # nothing positive only by the accident that no score was 1. Now: midway from the top score to 1.
    y, s = np.array([1, 1, 0, 0], bool), np.array([0.2, 0.3, 0.9, 0.96])
    t = T.choose_threshold(y, s, "youden")
    assert t == pytest.approx(0.98) and T.binary_metrics(y, s, t)["counts"] == {"tp": 0, "fn": 2, "fp": 0, "tn": 2}


def test_ece_bins_are_the_reliability_figures_bins():
    # A probability on a bin edge (k / 15) fell in the bin above for the ECE and the bin below for
    # calibration_curve (the reliability figure): ECE 0.237 against 0.103 here.
    y, p = np.array([1, 0, 1, 0, 1, 1]), np.array([0.2, 0.2, 0.19, 0.19, 0.8, 0.8])
    frac, mean = calibration_curve(y, p, n_bins=15, strategy="uniform")
    counts = np.bincount(np.searchsorted(np.linspace(0, 1, 16)[1:-1], p), minlength=15)
    assert T.calibration_error(y, p) == pytest.approx(float((counts[counts > 0] / 6 * np.abs(frac - mean)).sum()))


def test_balanced_and_accuracy_policies():
    y, s = scores(5)
    assert T.choose_threshold(y, s, "balanced") == pytest.approx(y.mean())
    assert T.choose_threshold(y, s, "accuracy") == 0.5


@pytest.mark.parametrize("policy", ["sensitivity:1", "sensitivity:0", "sensitivity:x", "median", ""])
def test_bad_threshold_policy_is_one_line_error(policy, capsys):
    assert run(["--threshold-policy", policy, "--demo", "--output-dir", "/nonexistent/never"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--threshold-policy" in err[0]


# ----------------------------------------------------------------------------------------------
# Out-of-distribution guard
# ----------------------------------------------------------------------------------------------
def gaussian_layers(rng, n, shift=0.0):
    a = rng.normal(size=(n, 4)) @ np.diag([1, 2, 0.5, 1]) + shift
    b = rng.normal(size=(n, 6)) + shift
    return [a, b]


def test_mahalanobis_matches_scipy():
    rng = np.random.default_rng(0)
    x, means = rng.normal(size=(20, 5)), rng.normal(size=(2, 5))
    a = rng.normal(size=(5, 5))
    prec = a @ a.T + np.eye(5)
    ref = [min(mahalanobis(r, m, prec) ** 2 for m in means) for r in x]
    np.testing.assert_allclose(T._mahalanobis(x, means, prec), ref, rtol=1e-10)


def test_guard_flags_shifted_data_and_passes_held_out_data():
    rng = np.random.default_rng(1)
    train, held, fresh = (gaussian_layers(rng, n) for n in (3000, 1000, 2000))
    labels = rng.integers(0, 2, 3000)
    guard = T.fit_ood_guard(train, labels, held, quantile=0.99)
    flagged = lambda feats: float((T.ood_scores(guard, feats) > guard["cutoff"]).mean())
    assert flagged(held) == pytest.approx(0.01, abs=0.002)  # the cutoff is the held-out 99th percentile
    assert flagged(fresh) < 0.03
    assert flagged(gaussian_layers(rng, 500, shift=3.0)) > 0.99
    # Only one layer shifted: the mean over layers still catches it.
    one = gaussian_layers(rng, 500)
    one[1] = one[1] + 4.0
    assert flagged(one) > 0.99
    assert np.median(T.ood_scores(guard, held)) == pytest.approx(1.0, abs=0.1)  # 1 = a typical image


def tiny_untrained(n, bootstrap):
    """A 32 px config without a gallery, its untrained model (seed 0) and n random 36 px images, for test_report."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(T.Config(), img_size=32, channels=(4, 8, 8, 16), fc_hidden=12, bootstrap=bootstrap,
                              num_gradcam_images=0)
    model = T.CustomCNN(**T.model_kwargs(cfg, 2)).eval()
    return cfg, model, torch.from_numpy(np.random.default_rng(0).integers(0, 256, (n, 36, 36), dtype=np.uint8))


def test_in_distribution_only_metrics_leave_out_the_flagged_images(tmp_path):
    # test_metrics.json's ood.in_distribution_only: the metrics of the images the guard passed. A guard
    # fitted at quantile 0.5 on the images themselves flags about half of them.
    cfg, model, images = tiny_untrained(40, bootstrap=20)
    labels = torch.arange(40) % 2
    norm = {"mode": "image"}
    feats = T.layer_features(model, images, 32, norm, "cpu", 1)
    ckpt = {"config": cfg.to_dict(), "class_names": ["NORMAL", "PNEUMONIA"], "positive_class": 1, "img_size": 32,
            "normalization": norm, "threshold": 0.5, "threshold_policy": "accuracy", "calibration": None,
            "ood": {**T.fit_ood_guard(feats, labels.numpy(), feats, 0.5), "grid": 1}}
    res = T.test_report(model, ckpt, T.Split(images, labels, [f"{i}.png" for i in range(40)]),
                        T.Runtime(torch.device("cpu"), None, channels_last=False), tmp_path)
    kept = [r for r in read_csv(tmp_path / "test_predictions.csv") if r["in_distribution"] == "True"]
    assert 0 < res["ood"]["flagged"] < 40 and res["ood"]["in_distribution_only"]["n"] == len(kept)
    expected = T.binary_metrics([r["true"] == "PNEUMONIA" for r in kept], [float(r["prob_PNEUMONIA"]) for r in kept],
                                0.5)
    assert res["ood"]["in_distribution_only"]["counts"] == expected["counts"]


def test_summary_of_a_checkpoint_older_than_the_policy_setting_names_no_policy_none(tmp_path):
    # A checkpoint made before threshold_policy was stored has a threshold (Youden's J on the raw scores) and no
    # policy: --evaluate's console summary printed "threshold 0.5000 (None)", where its report page says
    # "policy not recorded".
    cfg, model, images = tiny_untrained(12, bootstrap=0)
    ckpt = {"config": cfg.to_dict(), "class_names": ["NORMAL", "PNEUMONIA"], "positive_class": 1, "img_size": 32,
            "normalization": {"mode": "image"}, "threshold": 0.5}
    res = T.test_report(model, ckpt, T.Split(images, torch.arange(12) % 2, [f"{i}.png" for i in range(12)]),
                        T.Runtime(torch.device("cpu"), None, channels_last=False), tmp_path)
    threshold_row = next(ln for ln in T.summary_table(res).splitlines() if ln.strip().startswith("threshold"))
    assert threshold_row.endswith("0.5000 (policy not recorded)")


def test_zoomed_view_part_flags_what_the_mahalanobis_part_misses():
    # A small shift spread over many features: the distance averaged over layers hardly notices
    # it, while the logistic part, shown such "zoomed" features at fit time, projects onto it.
    rng = np.random.default_rng(3)
    layers = lambda n, shift=0.0: [rng.normal(size=(n, 4)), rng.normal(size=(n, 30)) + shift]
    train, held = layers(3000), layers(1000)
    labels = rng.integers(0, 2, 3000)
    with_part = T.fit_ood_guard(train, labels, held, 0.99, zoomed_feats=layers(3000, 1.0))
    without = T.fit_ood_guard(train, labels, held, 0.99)
    # The part is weighted so that each part alone flags the same share of held-out images at the same
    # level: their (1 - (1 - q) / 2) quantiles are equal (README, Out-of-distribution guard).
    d, z = T._guard_parts(with_part, held)  # z carries the weight
    half = 1 - (1 - 0.99) / 2
    assert np.quantile(z, half) == pytest.approx(np.quantile(d, half), rel=1e-9)
    assert abs(int((d > np.quantile(d, half)).sum()) - int((z > np.quantile(d, half)).sum())) <= 1
    close_ups = layers(1000, 1.0)
    flagged = lambda g, f: float((T.ood_scores(g, f) > g["cutoff"]).mean())
    assert flagged(without, close_ups) < 0.5
    assert flagged(with_part, close_ups) > 0.95
    assert flagged(with_part, held) == pytest.approx(0.01, abs=0.002)
    assert flagged(with_part, layers(2000)) < 0.03
    assert flagged(with_part, layers(500, 3.0)) > 0.99
    assert np.median(T.ood_scores(with_part, held)) == pytest.approx(1.0, abs=0.1)
    # A guard without the part (an older checkpoint) scores exactly as before.
    d, z = T._guard_parts(without, held)
    np.testing.assert_array_equal(T.ood_scores(without, held), d)
    assert not z.any()


def test_zoomed_views_show_at_most_half_of_the_image():
    ramp = np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1))   # gray level = 4 * column
    batch = lambda im: torch.from_numpy(np.stack([im] * 30))
    across, down = T.zoomed_views(batch(ramp), seed=0), T.zoomed_views(batch(ramp.T.copy()), seed=0)
    assert across.shape == (30, 64, 64) and across.dtype == torch.uint8
    # The same seed crops the same boxes: the ramps show each box's width and height.
    width = (across.float().amax((1, 2)) - across.float().amin((1, 2)) + 4) / 256
    height = (down.float().amax((1, 2)) - down.float().amin((1, 2)) + 4) / 256
    assert ((width * height) <= 0.52).all() and ((width * height) >= 0.13).all()
    assert torch.equal(across, T.zoomed_views(batch(ramp), seed=0))


class _GpuLike(torch.Tensor):
    """Refuses numpy conversion as a CUDA tensor does (TypeError); .cpu() gives a plain tensor."""
    def __array__(self, *args, **kwargs):
        raise TypeError("can't convert cuda:0 device type tensor to numpy")

    def cpu(self, *args, **kwargs):
        return self.as_subclass(torch.Tensor)


def test_zoomed_views_of_images_kept_on_a_gpu():
    # Training keeps the decoded images on the GPU; the guard's zoomed views of them are cut on
    # the CPU. np.asarray on such a tensor crashed every CUDA run after its last epoch.
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (4, 32, 32), dtype=np.uint8))
    on_gpu = images.clone().as_subclass(_GpuLike)
    with pytest.raises(TypeError):
        np.asarray(on_gpu)
    assert torch.equal(T.zoomed_views(on_gpu, seed=3), T.zoomed_views(images, seed=3))


def test_guard_is_plain_tensors_in_the_checkpoint(tmp_path):
    rng = np.random.default_rng(2)
    train = gaussian_layers(rng, 500)
    guard = T.fit_ood_guard(train, rng.integers(0, 2, 500), gaussian_layers(rng, 200), 0.99,
                            zoomed_feats=[f + 1.0 for f in train])
    buf = io.BytesIO()
    torch.save({"ood": guard}, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=True)["ood"]  # nothing pickled beyond tensors and numbers
    feats = gaussian_layers(rng, 50)
    np.testing.assert_allclose(T.ood_scores(back, feats), T.ood_scores(guard, feats))
    assert all(isinstance(m, torch.Tensor) for m in back["means"] + back["precisions"])
    assert all(isinstance(v, (torch.Tensor, float)) for v in back["zoomed"].values())


def test_layer_features_shapes_and_mode_restored():
    model = T.CustomCNN(img_size=32, channels=(4, 8, 8, 16), fc_hidden=12).train()
    images = torch.randint(0, 255, (5, 36, 36), dtype=torch.uint8)
    feats = T.layer_features(model, images, 32, {"mode": "image"}, "cpu", batch_size=2)
    assert [f.shape for f in feats] == [(5, 16), (5, 32), (5, 32), (5, 64), (5, 12)]  # 2 x 2 regions per channel
    whole = T.layer_features(model, images, 32, {"mode": "image"}, "cpu", grid=1)  # what older guards were fitted on
    assert [f.shape for f in whole] == [(5, 4), (5, 8), (5, 8), (5, 16), (5, 12)]
    # The blocks' maps have even sides here (16, 8, 4, 2), so the four regions average to the whole.
    for g, w in zip(feats[:4], whole[:4]):
        np.testing.assert_allclose(g.reshape(5, -1, 4).mean(2), w, rtol=1e-5, atol=1e-6)
    assert model.training


def test_scores_do_not_depend_on_the_scoring_batch_size():
    # eval_batch_size is a speed setting (64 images on a CPU, 256 on a GPU): in eval mode each image's
    # probabilities and guard features are its own, whatever batch it is scored in, and none is dropped.
    torch.manual_seed(0)
    model = T.CustomCNN(img_size=32, channels=(4, 8, 8, 16), fc_hidden=12).train()
    images = torch.randint(0, 255, (70, 36, 36), dtype=torch.uint8)
    rt, norm = T.Runtime(torch.device("cpu"), None), {"mode": "image"}
    probs = [T.predict_probs(model, images, 32, norm, rt, True, batch_size=b) for b in (None, 1, 256)]
    feats = [T.layer_features(model, images, 32, norm, "cpu", batch_size=b) for b in (None, 1, 256)]
    assert probs[0].shape == (70, 2)
    for other in probs[1:]:
        np.testing.assert_allclose(probs[0], other, rtol=1e-5, atol=1e-6)
    for other in feats[1:]:
        for a, b in zip(feats[0], other):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert model.training
    # On a CPU, block 1's output of a batch stays under glibc's 32 MB mmap ceiling (16 channels: 0.77 MB
    # an image at 112 px, 1 MB at 128 px, 3.1 MB at 224 px); a GPU takes 256.
    default = T.CustomCNN(img_size=224)
    assert [T.eval_batch_size(default, s, "cpu") for s in (112, 128, 224, 2048)] == [32, 16, 8, 1]
    assert T.eval_batch_size(default, 112, "cuda") == 256 and T.eval_batch_size(model, 32, "cpu") == 256


# ----------------------------------------------------------------------------------------------
# End to end: what a trained run stores and writes
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(synth_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("trust")
    assert run([*TINY, "--epochs", "3", "--data-dir", synth_root, "--output-dir", out, "--run-name", "r",
                *ONE_THREAD]) == 0
    return out / "r"


def test_guard_log_says_how_many_validation_images_score_above_the_cutoff(trained):
    guard = T.load_checkpoint(trained / "best_model.pt")["ood"]
    n, above = guard["held_out"]["n"], guard["held_out"]["above"]
    log = (trained / "train.log").read_text()
    assert f"the 99th percentile of the {n} validation images ({above} score above it)" in log
    assert 0 < n < 200 and 1 <= above < n and f"a guard cutoff set on {n} validation images flags more" in log
    # held out = the validation split: scales and cutoff set on the training images themselves would
    # sit lower and flag new images more often than 1 - OOD_QUANTILE
    assert n == json.loads((trained / "config.json").read_text())["split_sizes"]["val"]


def test_guard_note_gives_the_share_of_a_quantile_that_is_no_whole_percent(data_copy, tmp_path):
    # The note rounded 1 - OOD_QUANTILE to a whole percent: at --ood-quantile 0.975 it promised "more
    # than 3%" of new images flagged (2.5% is the figure), at 0.999 "more than 0%".
    shutil.rmtree(data_copy / "test")
    assert run([*TINY, "--epochs", "1", "--num-gradcam-images", "0", "--ood-quantile", 0.975, "--data-dir", data_copy,
                "--output-dir", tmp_path, "--run-name", "q", *ONE_THREAD]) == 0
    log = (tmp_path / "q" / "train.log").read_text()
    assert "the 97.5th percentile" in log and re.search(r"validation images flags more than 2\.5% of new", log)


def test_cutoffs_the_guard_was_compared_with():
    # benchmarks/ood_cutoff.py and ood.py --compare measure two cutoffs that were not shipped
    # (README): check they are what the README says before trusting their figures.
    bench = load_benchmark("ood_cutoff")
    s = np.arange(1, 200, dtype=float)[::-1]  # 199 scores, unsorted
    assert bench.conformal(s, 0.99) == 198  # the ceil(200 * 0.99) = 198th smallest
    assert bench.conformal(s[:99], 0.99) == 199  # ceil(100 * 0.99) = 99, though 100 * 0.99 > 99 in floats
    assert bench.conformal(s[:50], 0.99) == 199  # too few for the bound: the highest
    # Exchangeable scores: a new one exceeds the cut of 199 others with probability 1 - 198/200.
    draws = np.random.default_rng(0).random((20000, 200))
    cut = np.sort(draws[:, :199], 1)[:, 197]
    assert bench.conformal(draws[0, :199], 0.99) == cut[0]
    assert (draws[:, 199] > cut).mean() == pytest.approx(0.01, abs=0.002)
    # Cross-fitted: the even positions scored by the guard fitted on the odd ones, then the other way.
    rng = np.random.default_rng(4)
    train, held, labels = gaussian_layers(rng, 400), gaussian_layers(rng, 41), rng.integers(0, 2, 400)
    crossed = bench.cross_fitted(train, labels, held, 0.99, None)
    on_odd = T.fit_ood_guard(train, labels, [f[1::2] for f in held], 0.99)
    np.testing.assert_allclose(crossed[0::2], T.ood_scores(on_odd, [f[0::2] for f in held]))
    on_even = T.fit_ood_guard(train, labels, [f[0::2] for f in held], 0.99)
    np.testing.assert_allclose(crossed[1::2], T.ood_scores(on_even, [f[1::2] for f in held]))
    assert not np.allclose(crossed, T.ood_scores(T.fit_ood_guard(train, labels, held, 0.99), held))


def test_guard_cutoff_and_count_are_those_of_the_scores_the_stored_guard_gives():
    # The fit scaled the zoomed-view part as (1 / (1 + e)) * w, ood_scores as w / (1 + e): the last bit could
    # differ. 101 held-out images put the 99th percentile exactly on one of their scores, so the image at the
    # cutoff passed in the fit's count (train.log's "score above it") and was flagged when scored by the guard.
    for seed in range(5):
        rng = np.random.default_rng(seed)
        train, held, labels = gaussian_layers(rng, 60), gaussian_layers(rng, 101), rng.integers(0, 2, 60)
        zoomed = [f * 1.5 + 1.0 for f in gaussian_layers(rng, 60)]
        guard = T.fit_ood_guard(train, labels, held, 0.99, zoomed)
        scores = T.ood_scores(guard, held)
        assert guard["cutoff"] == np.quantile(scores, 0.99)
        assert guard["held_out"] == {"n": 101, "above": int((scores > guard["cutoff"]).sum())}


def test_a_dead_layer_does_not_make_the_guard_flag_everything():
    # A layer whose features are all zero (a ReLU that never fires) had median distance 0: the
    # scaled distances were nan, the cutoff nan, and every image was flagged.
    rng = np.random.default_rng(6)
    feats = lambda n: [rng.normal(size=(n, 4)), np.zeros((n, 3))]
    guard = T.fit_ood_guard(feats(500), rng.integers(0, 2, 500), feats(300), 0.99)
    assert np.isfinite(guard["cutoff"])
    assert (T.ood_scores(guard, feats(2000)) > guard["cutoff"]).mean() < 0.05
    assert (T.ood_scores(guard, [f + 10 for f in feats(50)]) > guard["cutoff"]).all()


def test_checkpoint_stores_calibration_threshold_and_guard(trained):
    ck = T.load_checkpoint(trained / "best_model.pt")
    assert isinstance(ck["calibration"]["temperature"], torch.Tensor) and ck["calibration"]["bias"].shape == (2,)
    assert ck["threshold_policy"] == T.THRESHOLD_POLICY and 0 < ck["threshold"] < 1
    assert ck["ood"]["quantile"] == T.OOD_QUANTILE and len(ck["ood"]["means"]) == 5
    assert ck["ood"]["grid"] == T.GUARD_GRID and ck["ood"]["means"][0].shape[1] == 4 * ck["config"]["channels"][0]
    last = T.load_checkpoint(trained / "last.pt")
    assert last.get("calibration") is None and last.get("ood") is None  # only the best model is fitted


def test_guard_from_before_the_grid_scores_whole_image_features(trained, synth_root):
    ck = T.load_checkpoint(trained / "best_model.pt")
    model = T.model_from_checkpoint(ck)
    images = torch.from_numpy(T.decode_all([s for s, _ in T.list_image_folder(Path(synth_root) / "test")[1]][:40],
                                           ck["work_size"])[0])
    whole = lambda x: T.layer_features(model, x, ck["img_size"], ck["normalization"], "cpu", grid=1)
    old = T.fit_ood_guard(whole(images), np.arange(40) % 2, whole(images), 0.9)
    assert "grid" not in old  # what a checkpoint made before GUARD_GRID holds
    rt = T.Runtime(device=torch.device("cpu"), amp_dtype=None)
    got = T.score_images(model, {**ck, "ood": old}, images, rt)["ood_score"]
    np.testing.assert_allclose(got, T.ood_scores(old, whole(images)))
    assert got.max() > 0  # a real score, not the nan of a missing guard


def test_test_outputs_have_ece_reliability_ood_and_per_image_rows(trained):
    m = json.loads((trained / "test_metrics.json").read_text())
    assert 0 <= m["ece"] <= 1 and "ece_uncalibrated" in m and m["calibrated"] is True
    assert m["ood"]["flagged"] == round(m["ood"]["share_flagged"] * m["n"])
    assert (trained / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    rows = read_csv(trained / "test_predictions.csv")
    assert len(rows) == m["n"] == 50
    assert list(rows[0]) == ["path", "true", "predicted", "prob_NORMAL", "prob_PNEUMONIA", "threshold",
                             "ood_score", "in_distribution"]
    pred_pos = [r["predicted"] == "PNEUMONIA" for r in rows]
    assert pred_pos == [float(r["prob_PNEUMONIA"]) >= m["threshold"] for r in rows]
    tp = sum(p and r["true"] == "PNEUMONIA" for p, r in zip(pred_pos, rows))
    assert m["confusion_matrix"][1][1] == tp == m["counts"]["tp"]
    assert sum(r["in_distribution"] == "False" for r in rows) == m["ood"]["flagged"]
    if "in_distribution_only" in m["ood"]:
        assert m["ood"]["in_distribution_only"]["n"] == m["n"] - m["ood"]["flagged"]


def test_predict_warns_and_marks_images_unlike_training(trained, tmp_path, capsys):
    scans = tmp_path / "scans"
    scans.mkdir()
    rng = np.random.default_rng(0)
    import cv2
    for i in range(6):  # noise and blank pictures: nothing like a chest X-ray
        img = rng.integers(0, 255, (48, 48), dtype=np.uint8) if i % 2 else np.full((48, 48), 40 * i, np.uint8)
        cv2.imwrite(str(scans / f"junk{i}.png"), img)
    capsys.readouterr()
    assert run(["--predict", scans, "--checkpoint", trained, "--output-dir", tmp_path / "o", "--run-name", "p",
                "--num-workers", 0, *ONE_THREAD]) == 0
    out = capsys.readouterr().out
    rows = read_csv(tmp_path / "o" / "p" / "predictions.csv")
    assert all(r["in_distribution"] == "False" for r in rows)
    assert sum("do not look like the training data" in ln for ln in out.splitlines()) == 1
    assert all(f"junk{i}.png" in out for i in range(6))  # the per-image table
    overlays = sorted(p.name for p in (tmp_path / "o" / "p" / "grad_cam").glob("*.png"))
    assert len(overlays) == 6 and all(n.endswith("_ood.png") for n in overlays)


def test_predict_table_prints_p_and_threshold_to_digits_that_tell_the_label(trained, synth_root, tmp_path,
                                                                           monkeypatch):
    # Each P was printed to its own digits against the rule's 4: at threshold 0.71432, P 0.71431 (NORMAL)
    # read "0.71431" under "P >= 0.7143", a PNEUMONIA by the numbers shown.
    ck = T.load_checkpoint(trained / "best_model.pt")
    T.save_checkpoint(tmp_path / "m.pt", {**ck, "threshold": 0.71432})
    real = T.score_images

    def crafted(model, ckpt, images, rt, desc=""):
        sc = real(model, ckpt, images, rt, desc)
        p = np.array([0.71431, 0.71433, 0.9])
        sc["probs"] = np.stack([1 - p, p], 1)
        sc["preds"] = T.predict_labels(sc["probs"], 1, ckpt["threshold"])
        return sc
    monkeypatch.setattr(T, "score_images", crafted)
    scans = sorted((synth_root / "test" / "NORMAL").glob("*.png"))[:3]
    assert run(["--predict", *scans, "--checkpoint", tmp_path / "m.pt", "--output-dir", tmp_path, "--run-name", "p",
                "--num-workers", 0, *ONE_THREAD]) == 0
    log_text = (tmp_path / "p" / "train.log").read_text()
    shown_thr = float(re.search(r">= ([\d.]+) \(threshold", log_text)[1])
    rows = [ln.split() for ln in log_text.splitlines() if ln.split()[:1] and ln.split()[0] in {s.name for s in scans}]
    assert sorted(r[1] for r in rows) == ["NORMAL", "PNEUMONIA", "PNEUMONIA"]
    for r in rows:
        assert (float(r[2]) >= shown_thr) == (r[1] == "PNEUMONIA"), (r, shown_thr)


def test_folder_checkpoint_means_best_model(trained, synth_root, tmp_path):
    scans = synth_root / "test" / "PNEUMONIA"
    for name, ck in (("folder", trained), ("file", trained / "best_model.pt")):
        assert run(["--predict", scans, "--checkpoint", ck, "--output-dir", tmp_path, "--run-name", name,
                    "--num-workers", 0, *ONE_THREAD]) == 0
    a, b = read_csv(tmp_path / "folder" / "predictions.csv"), read_csv(tmp_path / "file" / "predictions.csv")
    assert a == b and a[0]["threshold"] != "none (argmax)"


def test_checkpoint_without_threshold_calibration_or_guard_says_so(trained, synth_root, tmp_path, capsys):
    capsys.readouterr()
    assert run(["--predict", synth_root / "test" / "NORMAL", "--checkpoint", trained / "last.pt", "--output-dir",
                tmp_path, "--run-name", "old", "--num-workers", 0, *ONE_THREAD]) == 0
    out = capsys.readouterr().out
    for what in ("no calibration", "no validation threshold", "no out-of-distribution guard"):
        assert sum(what in ln for ln in out.splitlines()) == 1, what
    rows = read_csv(tmp_path / "old" / "predictions.csv")
    assert {r["threshold"] for r in rows} == {"none (argmax)"} and {r["ood_score"] for r in rows} == {"nan"}
    assert {r["in_distribution"] for r in rows} == {""}  # unknown, not True: nothing checked them
    for r in rows:  # argmax labels
        assert r["predicted"] == ("PNEUMONIA" if float(r["prob_PNEUMONIA"]) >= float(r["prob_NORMAL"]) else "NORMAL")
    # --evaluate on last.pt used to end in a TypeError; now it reports the fallback it used.
    # The report settings typed with --evaluate are used (they used to be silently replaced by the run's).
    assert run(["--evaluate", "--checkpoint", trained / "last.pt", "--data-dir", synth_root, "--output-dir",
                tmp_path, "--run-name", "ev", "--num-workers", 0, "--bootstrap", 0, "--save-cam-arrays",
                *ONE_THREAD]) == 0
    assert list((tmp_path / "ev" / "grad_cam").glob("test_*.npy"))  # the training run saved none
    assert T.load_checkpoint(trained / "last.pt")["config"]["save_cam_arrays"] is False
    m = json.loads((tmp_path / "ev" / "test_metrics.json").read_text())
    assert m["threshold"] == 0.5 and m["threshold_policy"].startswith("none in the checkpoint")
    assert m["calibrated"] is False and "ood" not in m and "threshold_fitted_on" not in m
    assert m["auc_ci95"] == [None, None]  # --bootstrap 0: no resamples, no interval (the run used 50)
    headline = re.search(r'class="headline">([^<]*)<', (tmp_path / "ev" / "report.html").read_text()).group(1)
    assert "none in the checkpoint" in headline and "chosen on" not in headline  # it used to say "on validation"
    # --bootstrap 0 printed "nan - nan" as a CI; --num-gradcam-images 0 still made a gallery.
    capsys.readouterr()
    assert run(["--evaluate", "--checkpoint", trained, "--data-dir", synth_root, "--output-dir", tmp_path,
                "--run-name", "ev0", "--num-workers", 0, "--bootstrap", 0, "--num-gradcam-images", 0, *ONE_THREAD]) == 0
    assert re.search(r"AUC 95% CI +none \(--bootstrap 0", capsys.readouterr().out)
    assert not list((tmp_path / "ev0" / "grad_cam").glob("test_*"))
    headline = re.search(r'class="headline">([^<]*)<', (tmp_path / "ev0" / "report.html").read_text()).group(1)
    assert headline.startswith("Test AUC ") and "CI" not in headline
    page = (tmp_path / "ev0" / "report.html").read_text()  # its configuration shows the settings used, not the run's
    assert "<td>config.bootstrap</td><td>0</td>" in page and "<td>config.num_gradcam_images</td><td>0</td>" in page
    # --ood-quantile with a checkpoint that has no guard was ignored: refused, before anything is written.
    capsys.readouterr()
    assert run(["--recalibrate", synth_root / "test", "--checkpoint", trained / "last.pt", "--ood-quantile", 0.95,
                "--output-dir", tmp_path, "--run-name", "rq", *ONE_THREAD]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--ood-quantile" in err[0] and "no out-of-distribution guard" in err[0]
    assert not (tmp_path / "rq").exists()


def test_run_folder_without_best_model_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.pt").write_bytes(b"")
    capsys.readouterr()
    assert run(["--predict", tmp_path, "--checkpoint", tmp_path / "run", "--output-dir", tmp_path / "o"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "best_model.pt" in err and "last.pt explicitly" in err


@pytest.mark.parametrize("kind", ["text", "truncated", "pickle"])
def test_checkpoint_messages_say_what_is_wrong(trained, tmp_path, kind):
    bad = tmp_path / "bad.pt"
    if kind == "text":
        bad.write_text("hello")
    elif kind == "truncated":
        bad.write_bytes((trained / "best_model.pt").read_bytes()[:5000])
    else:
        torch.save({"format": T.CKPT_FORMAT, "x": print}, bad)  # a pickle that would call a function
    with pytest.raises(T.CXRError) as e:
        T.load_checkpoint(bad)
    if kind == "pickle":
        assert "refusing" in str(e.value) and "print" in str(e.value)
    else:
        assert "not a checkpoint, or it is damaged" in str(e.value) and "trust" not in str(e.value)


def test_a_run_folder_with_last_pt_but_no_best_model_is_not_said_to_have_finished_no_epoch(tmp_path):
    # The first epoch writes best_model.pt before last.pt, so last.pt alone means best_model.pt went away;
    # the message said "the run finished no epoch" about a run that had.
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.pt").write_bytes(b"")
    with pytest.raises(T.CXRError) as e:
        T.load_checkpoint(tmp_path / "run")
    assert "has no best_model.pt (moved or deleted?)" in str(e.value) and "pass its last.pt" in str(e.value)
    assert "no epoch" not in str(e.value)


def test_a_checkpoint_that_cannot_be_read_is_not_called_damaged(tmp_path, monkeypatch):
    # A colleague's best_model.pt readable by its owner only: "not a checkpoint, or it is damaged (an
    # incomplete copy?)" sent the user looking for a good copy of a file that was fine.
    ckpt = tmp_path / "best_model.pt"
    ckpt.write_bytes(b"PK")

    def denied(f, *a, **k):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(f))
    monkeypatch.setattr(T.torch, "load", denied)
    with pytest.raises(T.CXRError, match=f"^cannot read {re.escape(str(ckpt))} \\(Permission denied\\): check its "
                                         "permissions"):
        T.load_checkpoint(ckpt)


def test_scores_are_fp32_even_when_training_ran_in_bf16():
    torch.manual_seed(0)
    model = T.CustomCNN(img_size=32, channels=(4, 8, 8, 16), fc_hidden=12)
    images = torch.randint(0, 255, (6, 36, 36), dtype=torch.uint8)
    bf16 = T.Runtime(torch.device("cpu"), torch.bfloat16)
    fp32 = T.Runtime(torch.device("cpu"), None)
    a = T.predict_probs(model, images, 32, {"mode": "image"}, bf16, tta=True)
    b = T.predict_probs(model, images, 32, {"mode": "image"}, fp32, tta=True)
    np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------------------------
# Recalibration for a new site
# ----------------------------------------------------------------------------------------------
def test_recalibrate_refits_everything_but_the_weights(trained, synth_root, tmp_path, capsys):
    site = tmp_path / "site"
    T.write_synthetic_dataset(site, {"NORMAL": 30, "PNEUMONIA": 30}, {}, size=40, seed=7)
    before = T.load_checkpoint(trained / "best_model.pt")
    capsys.readouterr()
    assert run(["--recalibrate", site / "train", "--checkpoint", trained, "--output-dir", tmp_path / "o",
                "--run-name", "rc", "--threshold-policy", "sensitivity:0.9", "--ood-quantile", 0.95, "--num-workers", 0,
                *ONE_THREAD]) == 0
    after = T.load_checkpoint(tmp_path / "o" / "rc" / "recalibrated_model.pt")
    for k, v in before["model"].items():
        assert torch.equal(v, after["model"][k]), k  # the weights are never touched
    rec = after["recalibration"]
    assert rec["images"] == {"NORMAL": 30, "PNEUMONIA": 30} and rec["policy"] == "sensitivity:0.9"
    for k in ("threshold", "threshold_policy", "prevalence", "thresholds_by_policy"):  # all it replaced
        assert rec["before"][k] == before[k], k
    for k in ("temperature", "bias"):
        assert torch.equal(rec["before"]["calibration"][k], before["calibration"][k])
    assert rec["before"]["ood"] == {"cutoff": before["ood"]["cutoff"], "quantile": T.OOD_QUANTILE,
                                    "cutoff_fitted_on": None}
    assert after["threshold_policy"] == "sensitivity:0.9" and after["threshold"] != before["threshold"]
    pct = rec["ood_site_percentile"]
    assert pct["quantile"] == 0.95  # the typed one; the cutoff is that percentile or the old cutoff
    if pct["value"] > before["ood"]["cutoff"]:
        assert after["ood"]["cutoff"] == pct["value"] and after["ood"]["quantile"] == 0.95
        assert after["ood"]["cutoff_fitted_on"] == str((tmp_path / "site" / "train").resolve())
    else:
        assert [after["ood"].get(k) for k in ("cutoff", "quantile", "cutoff_fitted_on")] == \
            [before["ood"]["cutoff"], before["ood"]["quantile"], None]
    assert not torch.equal(after["calibration"]["bias"], before["calibration"]["bias"])
    fit = json.loads((tmp_path / "o" / "rc" / "recalibration.json").read_text())
    assert fit["after"]["sensitivity"] >= 0.9  # the policy holds on the folder it was fitted on
    # Its folder has a report page like every other mode's (it had none), and no empty grad_cam/.
    assert sorted(p.name for p in (tmp_path / "o" / "rc").iterdir()) == \
        ["recalibrated_model.pt", "recalibration.json", "report.html", "train.log"]
    page = (tmp_path / "o" / "rc" / "report.html").read_text()
    for name in ("before", "after"):
        assert f"<td>{T._fmt(fit[name]['threshold'])}</td>" in page and f"<td>{T._fmt(fit[name]['ece'])}</td>" in page
    assert "sensitivity:0.9" in page and '<a href="recalibrated_model.pt">' in page
    out = capsys.readouterr().out
    assert "weights unchanged" in out
    loud = "do not look like the training data" in out  # the loud line, as everywhere
    assert loud == (fit["before"]["share_flagged"] > 0.10)
    # The new checkpoint is a working checkpoint.
    assert run(["--predict", site / "train" / "NORMAL", "--checkpoint", tmp_path / "o" / "rc" / "recalibrated_model.pt",
                "--output-dir", tmp_path / "o", "--run-name", "p", "--num-workers", 0, *ONE_THREAD]) == 0
    # Its folder stands for it, as a run folder for its best_model.pt (it said "no best_model.pt").
    assert run(["--predict", site / "train" / "NORMAL", "--checkpoint", tmp_path / "o" / "rc",
                "--output-dir", tmp_path / "o", "--run-name", "p2", "--num-workers", 0, *ONE_THREAD]) == 0
    assert read_csv(tmp_path / "o" / "p2" / "predictions.csv") == read_csv(tmp_path / "o" / "p" / "predictions.csv")
    # Its test report names where the guard's cutoff came from, as it does for the threshold.
    own = json.loads((trained / "test_metrics.json").read_text())["ood"]
    assert [own[k] for k in ("quantile", "cutoff_fitted_on")] == [T.OOD_QUANTILE, "validation"]
    assert run(["--evaluate", "--checkpoint", tmp_path / "o" / "rc", "--data-dir", synth_root, "--output-dir",
                tmp_path / "o", "--run-name", "e", "--num-workers", 0, *ONE_THREAD]) == 0
    m = json.loads((tmp_path / "o" / "e" / "test_metrics.json").read_text())
    assert m["threshold_fitted_on"] == f"the recalibration folder {rec['folder']}"
    assert [m["ood"][k] for k in ("cutoff", "quantile", "cutoff_fitted_on")] == \
        [after["ood"]["cutoff"], after["ood"]["quantile"], after["ood"].get("cutoff_fitted_on") or "validation"]
    # Recalibrated again: the record of the first recalibration is kept under "before".
    assert run(["--recalibrate", site / "train", "--checkpoint", tmp_path / "o" / "rc" / "recalibrated_model.pt",
                "--output-dir", tmp_path / "o", "--run-name", "rc2", "--num-workers", 0, *ONE_THREAD]) == 0
    twice = T.load_checkpoint(tmp_path / "o" / "rc2" / "recalibrated_model.pt")["recalibration"]
    assert twice["before"]["recalibration"]["date"] == rec["date"] and twice["before"]["recalibration"]["before"]
    assert twice["before"]["threshold"] == after["threshold"] and twice["policy"] == "sensitivity:0.9"


def test_report_settings_of_predict_and_evaluate_follow_an_edited_constant_as_a_typed_flag(trained, tmp_path):
    # One rule for both modes: the settings a mode reads are this command's. --predict took an edited
    # SAVE_CAM_ARRAYS, while --evaluate kept the run's bootstrap and gallery unless the flag was typed.
    assert T.load_checkpoint(trained / "best_model.pt")["config"]["bootstrap"] == 50  # TINY's, the run's
    img = sorted((Path(T.load_checkpoint(trained / "best_model.pt")["config"]["data_dir"]) / "test" / "NORMAL")
                 .glob("*.png"))[0]
    common = ["--checkpoint", trained, "--output-dir", tmp_path, "--num-workers", 0, *ONE_THREAD]

    def edited(argv, **constants):  # the command run as if those constants were edited at the top
        cfg, args = T.parse_config([str(a) for a in argv])
        return T.main(parsed=(dataclasses.replace(cfg, **constants), args))
    assert edited(["--predict", img, "--run-name", "p", *common], save_cam_arrays=True) == 0
    assert list((tmp_path / "p" / "grad_cam").glob("*.npy"))
    assert edited(["--evaluate", "--data-dir", img.parents[2], "--run-name", "e", *common], bootstrap=0,
                  num_gradcam_images=0, save_cam_arrays=True) == 0
    m = json.loads((tmp_path / "e" / "test_metrics.json").read_text())
    assert m["auc_ci95"] == [None, None] and "gallery_files" not in m  # BOOTSTRAP = 0, NUM_GRADCAM_IMAGES = 0
    page = (tmp_path / "e" / "report.html").read_text()
    for k in ("bootstrap", "num_gradcam_images"):  # the report page shows the ones used
        assert f"<td>config.{k}</td><td>0</td>" in page


def test_recalibrate_runs_the_network_once_over_its_folder(trained, tmp_path, monkeypatch):
    # The fit, "before" and "after" differ only in calibration, threshold and cutoff: the folder went through
    # the network three times (and through the guard's feature pass twice) for the same outputs.
    site = tmp_path / "site"
    T.write_synthetic_dataset(site, {"NORMAL": 10, "PNEUMONIA": 10}, {}, size=40, seed=7)
    ck = T.load_checkpoint(trained / "best_model.pt")
    assert ck["ood"]  # a guard: its feature pass is counted too
    seen = []
    real = T.CustomCNN.forward

    def counted(self, x):
        seen.append(len(x))
        return real(self, x)
    monkeypatch.setattr(T.CustomCNN, "forward", counted)
    assert run(["--recalibrate", site / "train", "--checkpoint", trained, "--output-dir", tmp_path,
                "--run-name", "rc", "--num-workers", 0, *ONE_THREAD]) == 0
    tta = bool(ck["config"].get("tta", False))
    assert sum(seen) == 20 * ((2 if tta else 1) + 1)  # predict_probs (flipped too with TTA), layer_features


def test_recalibrating_a_checkpoint_without_a_threshold_uses_its_runs_policy(trained, tmp_path, capsys):
    # last.pt (or the best_model.pt of a stopped run) has no fitted policy: its run's --threshold-policy is in
    # its config. The constant's "balanced" was used instead, so a screening run's threshold lost its sensitivity.
    last = T.load_checkpoint(trained / "last.pt")
    last["config"]["threshold_policy"] = "sensitivity:0.9"  # as a run made with --threshold-policy sensitivity:0.9
    T.save_checkpoint(tmp_path / "last.pt", last)
    site = tmp_path / "site"
    T.write_synthetic_dataset(site, {"NORMAL": 10, "PNEUMONIA": 10}, {}, size=40, seed=7)
    assert run(["--recalibrate", site / "train", "--checkpoint", tmp_path / "last.pt", "--output-dir", tmp_path,
                "--run-name", "rc", "--num-workers", 0, *ONE_THREAD]) == 0
    after = T.load_checkpoint(tmp_path / "rc" / "recalibrated_model.pt")
    assert after["threshold_policy"] == after["recalibration"]["policy"] == "sensitivity:0.9"
    # Made from last.pt it still holds the optimizer; a resume of it would have trained into the recalibration folder.
    capsys.readouterr()
    assert run(["--resume", tmp_path / "rc" / "recalibrated_model.pt"]) == 2
    assert f"is a --recalibrate checkpoint: resume the training run it was made from, the folder of " \
           f"{tmp_path / 'last.pt'}" in capsys.readouterr().err
    assert not (tmp_path / "rc" / "history.csv").exists()


def test_recalibrating_a_checkpoint_older_than_the_policy_setting_keeps_youden_not_the_edited_constant(
        trained, tmp_path, capsys):
    # A checkpoint made before --threshold-policy existed (its run's threshold was Youden's J) was given the
    # constant as edited today, THRESHOLD_POLICY = "accuracy" below, without a word.
    last = T.load_checkpoint(trained / "last.pt")
    del last["config"]["threshold_policy"], last["config"]["ood_quantile"]
    T.save_checkpoint(tmp_path / "old.pt", last)
    site = tmp_path / "site"
    T.write_synthetic_dataset(site, {"NORMAL": 10, "PNEUMONIA": 10}, {}, size=40, seed=7)
    cfg, args = T.parse_config([str(a) for a in ["--recalibrate", site / "train", "--checkpoint", tmp_path / "old.pt",
                                                 "--output-dir", tmp_path, "--run-name", "rc", "--num-workers", 0,
                                                 *ONE_THREAD]])
    capsys.readouterr()
    assert T.main(parsed=(dataclasses.replace(cfg, threshold_policy="accuracy"), args)) == 0
    assert T.load_checkpoint(tmp_path / "rc" / "recalibrated_model.pt")["threshold_policy"] == "youden"
    assert (f"note: {tmp_path / 'old.pt'} was made before these settings existed, so they are read as its run had "
            "them: --threshold-policy youden, --ood-quantile 0.99\n") in capsys.readouterr().out


def test_resume_of_a_recalibrate_folder_names_it(tmp_path):
    # "run folder X has no last.pt" and no more, where its recalibrated_model.pt given itself names the run to resume.
    (tmp_path / "recalibrated_model.pt").write_bytes(b"")
    with pytest.raises(T.CXRError, match=f"^run folder {re.escape(str(tmp_path))} has no last.pt: it is a "
                                         "--recalibrate folder; resume the training run"):
        T.load_checkpoint(tmp_path, "last.pt")


def test_recalibrated_cutoff_is_never_lowered_and_its_record_describes_it(tmp_path):
    guard = {"cutoff": 2.0, "quantile": 0.99, "means": []}
    low = np.linspace(0, 1.5, 101)  # the site's 95th percentile (1.425) is below the cutoff: kept as it was
    kept, site = T.refit_ood_cutoff(guard, low, 0.95, tmp_path)
    assert kept == guard and site == pytest.approx(1.425)  # the old cutoff still goes with the old quantile
    new, site = T.refit_ood_cutoff(guard, low * 2, 0.95, tmp_path)
    assert new == {**guard, "cutoff": site, "quantile": 0.95, "cutoff_fitted_on": str(tmp_path),
                   "held_out": {"n": 101, "above": 5}}  # what it says of the images, of the folder's now
    assert site == pytest.approx(2.85) and guard["cutoff"] == 2.0  # the checkpoint's guard is not changed


def test_in_distribution_is_empty_only_without_a_guard():
    sc = {"preds": np.array([1, 0]), "probs": np.array([[0.2, 0.8], [0.9, 0.1]]),
          "ood_score": np.array([np.nan, 0.5]), "in_distribution": np.array([False, True])}
    header, rows = T.prediction_rows(["a.png", "b.png"], sc, ["NORMAL", "PNEUMONIA"], 0.5, guarded=True)
    col = header.index("in_distribution")
    assert [r[col] for r in rows] == [False, True]  # a guard's nan score (a broken old guard) is still flagged
    assert [r[col] for r in T.prediction_rows(["a.png", "b.png"], sc, ["NORMAL", "PNEUMONIA"], 0.5,
                                              guarded=False)[1]] == ["", ""]


def test_share_flagged_is_the_same_float_in_every_file():
    # recalibration.json computed 1 - mean(in_distribution), test_metrics.json mean(~in_distribution): for
    # 1 flagged of 3 the first gave 0.33333333333333337, the second 0.3333333333333333, for the same images.
    one_of_three = np.array([True, False, True])
    assert 1 - one_of_three.mean() != (~one_of_three).mean()  # the two old formulas
    assert T.share_flagged(one_of_three) == 1 / 3
    for n in (1, 7, 70, 101):
        for k in range(n + 1):
            inside = np.arange(n) >= k  # k flagged
            assert T.share_flagged(inside) == k / n, (n, k)  # flagged / n, correctly rounded
    assert T.share_flagged(np.array([], bool)) == 0.0


def test_figures_say_where_the_threshold_was_chosen():
    ck = {"class_names": ["NORMAL", "PNEUMONIA"], "positive_class": 1, "threshold": 0.61}
    assert T.label_rule(ck).endswith("P(PNEUMONIA) >= 0.6100 (threshold chosen on validation)")
    ck["recalibration"] = {"folder": "/data/site_a"}
    assert T.label_rule(ck, 2).endswith(">= 0.61 (threshold chosen on recalibration folder data/site_a)")
    assert "argmax" in T.label_rule({**ck, "threshold": None})
    assert T.label_rule({**ck, "class_names": ["A", "B", "C"]}) == "pred = the most probable class (argmax)"


def test_recalibration_folder_with_a_class_that_has_no_readable_file_is_refused(trained, tmp_path):
    site = tmp_path / "site"
    T.write_synthetic_dataset(site, {"NORMAL": 4, "PNEUMONIA": 4}, {}, size=40, seed=7)
    for f in (site / "train" / "NORMAL").glob("*.png"):
        f.write_bytes(b"")  # all skipped: the fit would see one class and move every probability to it
    with pytest.raises(T.CXRError, match="the recalibration folder has no usable images of class NORMAL"):
        T.split_from_folder(site / "train", T.load_checkpoint(trained), T.Config(num_workers=0), "recalibration")


def test_recalibrate_missing_folder_is_one_line_error(trained, tmp_path, capsys):
    capsys.readouterr()
    assert run(["--recalibrate", tmp_path / "nope", "--checkpoint", trained, "--output-dir", tmp_path / "o",
                *ONE_THREAD]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--recalibrate folder" in err[0] and "nope" in err[0] and "NORMAL" in err[0]
    assert not (tmp_path / "o").exists()


def test_recalibrate_refuses_other_classes(trained, tmp_path):
    site = tmp_path / "site"
    for c in ("A", "B"):
        (site / c).mkdir(parents=True)
    T.write_synthetic_dataset(tmp_path / "s", {"NORMAL": 3, "PNEUMONIA": 3}, {}, size=40)
    for i, p in enumerate(sorted((tmp_path / "s" / "train").rglob("*.png"))):
        p.rename(site / ("A" if i % 2 else "B") / p.name)
    with pytest.raises(T.CXRError, match="classes"):
        T.split_from_folder(site, T.load_checkpoint(trained), T.Config(num_workers=0), "recalibration")


def test_quality_benchmark_prints_ece_flagged_and_threshold_spread(tmp_path, monkeypatch, capsys):
    from conftest import load_benchmark
    T.write_synthetic_dataset(tmp_path / "d", {"NORMAL": 40, "PNEUMONIA": 60}, {}, size=40, seed=3)
    quality = load_benchmark("quality")
    monkeypatch.setattr("sys.argv", ["quality.py", "--data", str(tmp_path / "d" / "train"), "--folds", "3",
                                     "--only", "0", "--train-seeds", "1", "2", "--out", str(tmp_path / "cv"),
                                     "--", *TINY, "--epochs", "1", *ONE_THREAD])
    assert quality.main() == 0
    out = capsys.readouterr().out
    runs = [json.loads((tmp_path / "cv" / "fold0" / f"run_seed{s}" / "test_metrics.json").read_text()) for s in (1, 2)]
    for line, m in zip([ln for ln in out.splitlines() if ln.startswith("fold 0 seed")], runs):
        assert f"ece {m['ece']:.4f}" in line and f"flagged {m['ood']['share_flagged']:.4f}" in line
    spread = {ln.split()[0]: float(ln.split()[1]) for ln in out.split("per policy:")[1].strip().splitlines()}
    for policy, value in spread.items():
        v = [m["thresholds_by_policy"][policy] for m in runs]
        assert value == pytest.approx(max(v) - min(v), abs=1e-4), policy
    assert set(spread) == {"balanced", "accuracy", "youden", "sensitivity:0.95", "youden_uncalibrated"}
    # benchmarks/calibration.py on that fold: its fit on all of validation is the one the run stored.
    monkeypatch.setattr("sys.argv", ["calibration.py", str(tmp_path / "cv" / "fold0"), "--run", "run_seed1",
                                     "--sizes", "6", "--draws", "3"])
    assert load_benchmark("calibration").main() == 0
    rows = [ln.split() for ln in capsys.readouterr().out.splitlines() if ln.startswith("fold0 ")]
    subsets = [r[4] for r in rows if r[3] == "subsets"]
    full = {r[3]: r for r in rows if r[1] == "val" and r[3] != "subsets"}
    assert subsets == ["jeffreys", "platt", "none"] and list(full) == subsets
    stored = T.load_checkpoint(tmp_path / "cv" / "fold0" / "run_seed1" / "best_model.pt")["calibration"]
    assert float(full["jeffreys"][-2]) == pytest.approx(float(stored["temperature"]), abs=1e-4)  # the run's own fit


@pytest.mark.parametrize("name", ["calibration", "ood"])
def test_benchmarks_carve_a_runs_own_split_under_every_rule_it_was_made_with(tmp_path, monkeypatch, name):
    # calibration.py and ood.py passed the run's copies rule to prepare_data but not own_in_class: a fold run
    # made before that rule was re-carved under it, so "its" validation split held some of its training images.
    monkeypatch.syspath_prepend(str(Path(T.__file__).parent / "benchmarks"))  # ood.py imports ood_cutoff beside it
    bench = load_benchmark(name)
    for own in (False, True):
        ckpt = {"config": T.Config().to_dict(), "copies_grouped": True, "ood": None, "normalization": {},
                "img_size": 8, "work_size": 8, **({"own_in_class": True} if own else {})}
        asked = {}

        def prepare_data(cfg, typed=frozenset(), group_copies=True, own_in_class=True):
            asked.update(group_copies=group_copies, own_in_class=own_in_class)
            raise InterruptedError  # what was asked is all this test needs
        monkeypatch.setattr(T, "load_checkpoint", lambda *a, **k: ckpt)
        monkeypatch.setattr(T, "prepare_data", prepare_data)
        monkeypatch.setattr(T, "model_from_checkpoint", lambda *a, **k: None)
        monkeypatch.setattr(T, "list_image_folder", lambda *a: (["A", "B"], []))
        monkeypatch.setattr(T, "decode_all", lambda *a, **k: (np.zeros((0, 8, 8), np.uint8), []))
        monkeypatch.setattr(bench, "ood_sets", lambda *a: {}, raising=False)
        monkeypatch.setattr("sys.argv", [f"{name}.py", str(tmp_path)])
        with pytest.raises(InterruptedError):
            bench.raw_probs(tmp_path) if name == "calibration" else bench.main()
        assert asked == {"group_copies": True, "own_in_class": own}


def test_quality_benchmark_reuses_a_fold_it_made_and_refuses_another_in_its_place(tmp_path):
    # quality.py --out D run again (more --train-seeds on the same fold) died with a FileExistsError
    # traceback; a fold of other --folds or --seed in the same place must not be merged into it.
    from conftest import load_benchmark
    quality = load_benchmark("quality")
    samples = []
    for i in range(6):
        (tmp_path / "src" / f"{i}.png").parent.mkdir(exist_ok=True)
        (tmp_path / "src" / f"{i}.png").write_bytes(b"x")
        samples.append((str(tmp_path / "src" / f"{i}.png"), i % 2))
    fold = tmp_path / "cv" / "fold0" / "data"
    quality.link_fold(fold, samples, ["A", "B"], [0, 1, 2, 3], [4, 5])
    quality.link_fold(fold, samples, ["A", "B"], [0, 1, 2, 3], [4, 5])  # the same fold: reused
    assert sorted(p.relative_to(fold).as_posix() for p in fold.rglob("*.png")) == [
        "test/A/4.png", "test/B/5.png", "train/A/0.png", "train/A/2.png", "train/B/1.png", "train/B/3.png"]
    with pytest.raises(SystemExit, match="holds another fold.*pass another --out"):
        quality.link_fold(fold, samples, ["A", "B"], [0, 1, 4, 5], [2, 3])
    assert not (fold / "train" / "A" / "4.png").exists()


def test_quality_benchmark_goes_on_after_a_stop_with_the_same_out(tmp_path, monkeypatch, capsys):
    # Stopped while making a fold's links, the same --out again was refused as "another fold"; stopped in
    # training (or finished), its run folder was refused by train_cxr.py as taken.
    T.write_synthetic_dataset(tmp_path / "d", {"NORMAL": 40, "PNEUMONIA": 60}, {}, size=40, seed=3)
    quality = load_benchmark("quality")
    argv = ["quality.py", "--data", str(tmp_path / "d" / "train"), "--folds", "3", "--only", "0",
            "--out", str(tmp_path / "cv"), "--", *TINY, "--epochs", "2", *ONE_THREAD]
    monkeypatch.setattr("sys.argv", argv)
    fold, run_dir, real = tmp_path / "cv" / "fold0", tmp_path / "cv" / "fold0" / "run", Path.symlink_to
    made = []

    def stop_at_link_5(self, *a, **k):
        if len(made) == 5:
            raise KeyboardInterrupt()
        made.append(self)
        return real(self, *a, **k)
    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(Path, "symlink_to", stop_at_link_5)
        quality.main()
    capsys.readouterr()
    # Again: the links completed, then a Ctrl-C in epoch 1 (nothing to resume), then one in epoch 2.
    train_one_epoch = T.train_one_epoch
    for stop in (1, 2):
        def ctrl_c_in(st, train, epoch, stop=stop):
            if epoch == stop:
                T._STOP["signal"] = signal.SIGINT
            return train_one_epoch(st, train, epoch)
        with monkeypatch.context() as m:
            m.setitem(T._STOP, "signal", None)
            m.setattr(T, "train_one_epoch", ctrl_c_in)
            assert quality.main() == 130
    out = capsys.readouterr().out
    assert re.search(r"fold0/data: this fold, left half-made by an interrupted run \(5 of \d+ links\): completing", out)
    assert f"fold 0: {run_dir} stopped before its first epoch ended in an earlier run: trained again" in out
    assert (run_dir / "last.pt").is_file() and not (run_dir / "test_metrics.json").exists()
    assert quality.main() == 0
    out = capsys.readouterr().out
    assert f"fold 0: {run_dir} stopped in an earlier run of these settings: resumed" in out
    assert [r["epoch"] for r in read_csv(run_dir / "history.csv")] == ["1", "2"]
    line = [ln for ln in out.splitlines() if ln.startswith("fold 0: auc")][0]
    # Its minutes were this session's, printed (and averaged) as the run's: said, and left out of the mean.
    assert line.endswith("(resumed: this session only)") and "trained whole by this call (1 resumed)" in out
    epochs = sum(float(r["seconds"]) for r in read_csv(run_dir / "history.csv")) / 60  # both sessions' epochs
    assert f"epoch_minutes {epochs:.4f} minutes" in line
    assert quality.main() == 0  # finished: its figures again, without training
    out = capsys.readouterr().out
    assert f"fold 0: {run_dir} finished by an earlier run of these settings: its results are reused" in out
    again = [ln for ln in out.splitlines() if ln.startswith("fold 0: auc")][0]
    assert again.split(" minutes ")[0] == line.split(" minutes ")[0] and again.endswith("minutes reused (not timed)")
    assert "minutes: not timed, no run was trained whole by this call (1 reused)" in out and " nan" not in out
    # Other settings in the same place are still refused: another --epochs, another fold (--seed).
    monkeypatch.setattr("sys.argv", [*argv[:-len(ONE_THREAD) - 2], "--epochs", "3", *ONE_THREAD])
    with pytest.raises(SystemExit, match=r"run was made with other settings: --epochs 3 \(the run's: 2\); pass"):
        quality.main()
    monkeypatch.setattr("sys.argv", [*argv[:3], "--seed", "5", *argv[3:]])
    with pytest.raises(SystemExit, match="holds another fold"):
        quality.main()
    assert sorted(fold.iterdir()) == [fold / "data", run_dir]
    (run_dir / "last.pt").unlink()  # not what a stop leaves (best_model.pt is written first): kept, and said
    with pytest.raises(SystemExit, match="has a best_model.pt but no last.pt.*delete it to train it again"):
        quality.earlier_run(run_dir, [])
    assert (run_dir / "best_model.pt").is_file()


def test_quality_benchmark_minutes_say_what_was_timed(tmp_path):
    # A resumed run's minutes were its last session's, averaged with whole runs as if whole; a reused run's "nan".
    quality = load_benchmark("quality")
    (tmp_path / "history.csv").write_text("epoch,train_loss,seconds\n1,0.7,30.0\n2,0.6,90.0\n")
    assert quality.epoch_minutes(tmp_path) == pytest.approx(2.0)
    assert np.isnan(quality.epoch_minutes(tmp_path / "none"))
    assert quality.minutes_text(1.5, "new") == "1.5000"
    assert quality.minutes_text(0.5, "resume") == "0.5000 (resumed: this session only)"
    assert quality.minutes_text(0.01, "finished") == "reused (not timed)"
    assert quality.minutes_summary([(2.0, "new"), (4.0, "redo"), (0.5, "resume"), (0.0, "finished")]) == (
        "minutes: 3.0000 +- 1.4142 (the 2 run(s) trained whole by this call; 1 resumed, 1 reused left out)")
    assert quality.minutes_summary([(2.0, "new")]) == "minutes: 2.0000 +- 0.0000"
    assert quality.minutes_summary([(0.5, "resume"), (0.0, "finished")]) == (
        "minutes: not timed, no run was trained whole by this call (1 resumed, 1 reused): see epoch_minutes")

def test_train_log_ends_with_the_time_per_phase(trained):
    import re
    line = [ln for ln in (trained / "train.log").read_text().splitlines() if ln.startswith("time per phase")]
    assert len(line) == 1
    wall = float(re.search(r"\(([\d.]+) s wall\)", line[0]).group(1))
    parts = dict((k.strip(), float(v)) for k, v, _ in re.findall(r"(?:: |; )([^;:]+?) ([\d.-]+) s \((\d+)%\)", line[0]))
    for name in ("start-up", "decode and data checks", "training steps", "validation",
                 "per-epoch plots, Grad-CAM and report page", "calibration, guard and test set"):
        assert name in parts, name
    assert sum(parts.values()) == pytest.approx(wall, abs=0.6)  # the phases add up to the wall time
    speed = [ln for ln in (trained / "train.log").read_text().splitlines() if ln.startswith("training speed")][0]
    assert parts["training steps"] == pytest.approx(float(re.search(r"in ([\d.]+) s of training", speed).group(1)),
                                                    abs=0.3)


def test_mask_box_keeps_or_blanks_exactly_the_lung_box():
    lung = load_benchmark("lung_focus")
    images = np.arange(2 * 12 * 12, dtype=np.uint8).reshape(2, 12, 12)
    box = (0.25, 0.75, 0.5, 1.0)  # on the 8 px centre crop (offset 2): columns 4-7, rows 6-9
    kept, blanked = lung.mask_box(images, 8, box, keep_inside=True), lung.mask_box(images, 8, box, keep_inside=False)
    inside = np.zeros((12, 12), bool)
    inside[6:10, 4:8] = True
    for k in range(2):
        gray = round(images[k].mean())
        np.testing.assert_array_equal(kept[k][inside], images[k][inside])
        assert (kept[k][~inside] == gray).all() and (blanked[k][inside] == gray).all()
        np.testing.assert_array_equal(blanked[k][~inside], images[k][~inside])


def test_lung_focus_benchmark_prints_three_aucs(trained, synth_root, capsys):
    assert load_benchmark("lung_focus").main([str(trained), str(Path(synth_root) / "test"), "--num-threads", "1"]) == 0
    lines = {ln[:18].strip(): ln for ln in capsys.readouterr().out.splitlines()}
    names = ("as they are", "only the lung box", "lung box blanked")
    aucs = {k: float(lines[k].split("AUC ")[1].split()[0]) for k in names}
    m = json.loads((trained / "test_metrics.json").read_text())
    assert aucs["as they are"] == pytest.approx(m["auc"], abs=1e-4)  # the same images the test report scored
    flagged = {k: float(lines[k].split("guard")[1].strip().rstrip("%")) for k in aucs}
    assert flagged["as they are"] == pytest.approx(100 * m["ood"]["share_flagged"], abs=0.05)
    assert flagged["lung box blanked"] > flagged["as they are"]  # a gray rectangle is not a chest X-ray


def test_a_constant_that_is_no_flag_edited_since_training_is_refused(trained, tmp_path, monkeypatch, capsys):
    # DICOM_PERCENTILES and LUNG_BOX are edit-only: no checkpoint restored them, so after an edit --predict
    # windowed a model's DICOMs, and a resume blanked its lungs, otherwise than its run did, without a word.
    ckpt = T.load_checkpoint(trained / "best_model.pt")
    assert ckpt["edit_only"] == {"dicom_percentiles": list(T.DICOM_PERCENTILES), "lung_box": list(T.LUNG_BOX)}
    # One stored by a newer version names a constant this one lacks: not a KeyError traceback.
    T.check_edit_only({"edit_only": {**ckpt["edit_only"], "a_later_constant": [1.0]}}, "new.pt")
    img = tmp_path / "a.png"
    assert cv2.imwrite(str(img), np.full((40, 40), 128, np.uint8))
    flags = ["--predict", img, "--checkpoint", trained, "--output-dir", tmp_path, *ONE_THREAD]
    capsys.readouterr()
    monkeypatch.setattr(T, "DICOM_PERCENTILES", (1.0, 99.0))
    assert run(flags) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: DICOM_PERCENTILES = (1.0, 99.0) at the top of train_cxr.py, but {trained} was made "
                   "with (0.5, 99.5): set it back to use that model (it is no flag, so no checkpoint sets it)")
    monkeypatch.undo()
    monkeypatch.setattr(T, "LUNG_BOX", (0.1, 0.9, 0.1, 0.9))
    assert run(["--resume", trained]) == 2 and "LUNG_BOX = (0.1, 0.9, 0.1, 0.9)" in capsys.readouterr().err
    # A checkpoint made before they were stored is used with today's values, as before.
    del ckpt["edit_only"]
    T.save_checkpoint(tmp_path / "old.pt", ckpt)
    assert run([*flags[:2], "--checkpoint", tmp_path / "old.pt", *flags[4:]]) == 0


def test_resume_with_a_config_json_edited_without_its_precision_is_no_traceback(trained, tmp_path, capsys):
    run_dir = tmp_path / "r"
    shutil.copytree(trained, run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    del config["precision"]  # a file edited by hand: auto chooses again rather than a KeyError traceback
    (run_dir / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert run(["--resume", run_dir, "--amp", "auto"]) == 2
    assert "already finished" in capsys.readouterr().err


def test_prediction_csv_holds_the_scores_the_metrics_used():
    # At 6 decimals the two P(PNEUMONIA) below were both 1.000000 (a tie: the AUC from the CSV was not the
    # report's), and a score just above the cutoff read as equal to it.
    probs = np.array([[4e-7, 1 - 4e-7], [1e-7, 1 - 1e-7], [0.5, 0.5]])
    sc = {"preds": np.array([1, 1, 1]), "probs": probs, "ood_score": np.array([1.75711801, 0.5, 1.7571180098]),
          "in_distribution": np.array([False, True, True])}
    header, rows = T.prediction_rows(["a.png", "b.png", "c.png"], sc, ["NORMAL", "PNEUMONIA"], 0.5, guarded=True)
    read = lambda name: [float(r[header.index(name)]) for r in rows]
    assert read("prob_PNEUMONIA") == probs[:, 1].tolist() and read("prob_NORMAL") == probs[:, 0].tolist()
    assert read("ood_score") == sc["ood_score"].tolist()


def test_validation_accuracy_counts_a_tie_at_half_as_positive_like_the_reports():
    # A model with a zeroed output layer (one that learned nothing) gives P = 0.5 exactly: argmax called every
    # image NORMAL, while the test report, the CSV and the figure titles label P >= 0.5 PNEUMONIA.
    model = T.CustomCNN(img_size=32, channels=[4, 4, 4, 4], fc_hidden=8)
    torch.nn.init.zeros_(model.head[-1].weight)
    torch.nn.init.zeros_(model.head[-1].bias)
    cfg = T.Config.from_dict({**T.Config().to_dict(), "img_size": 32, "tta": False})
    st = types.SimpleNamespace(eval_model=model, cfg=cfg, norm={"mode": "image"}, pos=1,
                               rt=T.Runtime(torch.device("cpu"), None), criterion=torch.nn.CrossEntropyLoss())
    images = torch.randint(0, 255, (4, 36, 36), dtype=torch.uint8)
    split = types.SimpleNamespace(images=images, labels=torch.tensor([1, 1, 1, 0]))
    assert T.evaluate(st, split)["val_acc"] == 0.75
