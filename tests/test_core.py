"""Foundation spec of train_cxr.py: flags, patient split, class weights, model, metrics,
one end-to-end run with every artifact, input errors, 3 classes, and a real-data smoke test."""
import csv
import dataclasses
import errno
import hashlib
import json
import os
import re
import shutil
import types
from pathlib import Path, PureWindowsPath

import numpy as np
import pytest
import torch
from sklearn.metrics import (accuracy_score, confusion_matrix, f1_score, precision_score, recall_score,
                             roc_auc_score)
from sklearn.utils.class_weight import compute_class_weight

import train_cxr
from conftest import REAL_TRAIN, TINY, read_csv, run

HISTORY_COLUMNS = ["epoch", "train_loss", "train_acc", "train_auc", "val_loss", "val_acc", "val_auc",
                   "lr", "seconds"]
CPU = train_cxr.Runtime(torch.device("cpu"), None)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def snapshot(folder: Path) -> dict:
    """{relative path: (mtime_ns, sha1)} of every file under folder."""
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, hashlib.sha1(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------
# 1. Flags
# ----------------------------------------------------------------------------------------------
def test_every_config_field_has_a_flag():
    parser = train_cxr.build_parser()
    options = parser._option_string_actions
    help_text = parser.format_help()
    for f in dataclasses.fields(train_cxr.Config):
        assert flag(f.name) in options, f"no flag for Config.{f.name}"
        assert options[flag(f.name)].dest == f.name
        assert flag(f.name) in help_text
    # With no flags, the config is exactly the defaults at the top of the file.
    cfg, _ = train_cxr.parse_config([])
    assert cfg == train_cxr.Config()
    assert cfg.epochs == train_cxr.EPOCHS and cfg.channels == tuple(train_cxr.CHANNELS)


def test_parse_values_and_booleans():
    cfg, args = train_cxr.parse_config(["--epochs", "3", "--channels", "8,16,32,64"])
    assert cfg.epochs == 3 and isinstance(cfg.epochs, int)
    assert tuple(cfg.channels) == (8, 16, 32, 64)
    assert cfg.lr == train_cxr.LR and cfg.img_size == train_cxr.IMG_SIZE
    assert not args.demo
    cfg, _ = train_cxr.parse_config(["--no-tta", "--lr", "0.01", "--device", "cpu"])
    assert cfg.tta is False and cfg.lr == 0.01 and cfg.device == "cpu"


def test_a_tilde_no_shell_expanded_means_the_home_folder(tmp_path, monkeypatch):
    # --output-dir=~/cxr_runs (the shell leaves a ~ after "=") or OUTPUT_DIR = "~/cxr_runs" made a folder
    # named "~" in the current one, and the run went there instead of the home folder.
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg, _ = train_cxr.parse_config(["--data-dir=~/data", "--output-dir=~/cxr_runs"])
    assert (cfg.data_dir, cfg.output_dir) == (str(tmp_path / "data"), str(tmp_path / "cxr_runs"))
    _, args = train_cxr.parse_config(["--predict", "~/scans", "a.png", "--checkpoint=~/runs/r"])
    assert args.predict == [str(tmp_path / "scans"), "a.png"] and args.checkpoint == str(tmp_path / "runs" / "r")
    assert train_cxr.parse_config(["--resume=~/runs/r"])[1].resume == str(tmp_path / "runs" / "r")


def test_demo_overrides_except_explicit_flags():
    cfg, args = train_cxr.parse_config(["--demo"])
    assert args.demo
    for k, v in train_cxr.DEMO_OVERRIDES.items():
        assert getattr(cfg, k) == v, k
    cfg, _ = train_cxr.parse_config(["--demo", "--epochs", "2", "--img-size", "48"])
    assert cfg.epochs == 2 and cfg.img_size == 48
    for k, v in train_cxr.DEMO_OVERRIDES.items():
        if k not in ("epochs", "img_size"):
            assert getattr(cfg, k) == v, k
    # An explicit flag equal to the plain default still wins over the demo value.
    cfg, _ = train_cxr.parse_config(["--demo", "--epochs", str(train_cxr.EPOCHS)])
    assert cfg.epochs == train_cxr.EPOCHS != train_cxr.DEMO_OVERRIDES["epochs"]


@pytest.mark.parametrize("argv", [["--no-such-flag"], ["--epochs", "three"], ["--lr", "fast"],
                                  ["--channels", "8,16"], ["--channels", "a,b,c,d"], ["--device", "tpu"]])
def test_bad_flags_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        train_cxr.parse_config(argv)
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        run(argv)
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize("name,text,value", [("val_fraction", "1.5", 1.5), ("val_fraction", "0", 0.0),
                                             ("img_size", "8", 8), ("batch_size", "1", 1), ("epochs", "0", 0),
                                             ("dropout", "1.0", 1.0), ("run_name", "/tmp/elsewhere", "/tmp/elsewhere"),
                                             ("run_name", "../up", "../up"), ("run_name", "a/../../b", "a/../../b"),
                                             ("run_name", "~/exp", "~/exp")])  # a ~ no shell expanded (after "=")
def test_check_config_names_the_flag(name, text, value, tmp_path, capsys):
    with pytest.raises(train_cxr.CXRError, match=re.escape(flag(name))):
        train_cxr.parse_config([flag(name), text])
    with pytest.raises(train_cxr.CXRError, match=re.escape(flag(name))):
        train_cxr.check_config(dataclasses.replace(train_cxr.Config(), **{name: value}))
    train_cxr.check_config(train_cxr.Config())  # the defaults are valid
    assert run([flag(name), text, "--output-dir", tmp_path / "runs"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flag(name) in err
    assert not (tmp_path / "runs").exists()


def test_a_run_name_with_a_drive_or_a_root_is_refused_as_windows_reads_it(monkeypatch):
    # On Windows "/exp1" (a root, no drive) and "C:exp1" (a drive, no root) are not absolute, and
    # Path("runs") / name replaced --output-dir with them: the run went to C:\exp1, outside runs.
    monkeypatch.setattr(train_cxr, "Path", PureWindowsPath)  # the parsing train_cxr.py gets on Windows
    for name in ("/exp1", "\\exp1", "C:exp1", "C:\\runs\\exp1", "..\\up"):
        with pytest.raises(train_cxr.CXRError, match="--run-name .* not an absolute path, a drive"):
            train_cxr.check_config(train_cxr.Config(run_name=name))
    for name in ("exp1", "exp\\1", "exp/1"):
        train_cxr.check_config(train_cxr.Config(run_name=name))


# ----------------------------------------------------------------------------------------------
# 2. Patient-grouped split
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,pid", [("person123_bacteria_456.jpeg", "person123"),
                                      ("person123_virus_9.jpeg", "person123"),
                                      ("IM-0115-0001.jpeg", "IM-0115"),
                                      ("IM-0429-0001-0002.jpeg", "IM-0429"),
                                      ("NORMAL2-IM-1427-0001.jpeg", "NORMAL2-IM-1427"),
                                      ("some/dir/person7_bacteria_1.jpeg", "person7"),
                                      ("scan.png", "scan")])
def test_patient_id(name, pid):
    assert train_cxr.patient_id(name).lower() == pid.lower()


def made_up_patients(seed=0):
    """Class 0: 120 patients, class 1: 200 patients, each with 1-4 images."""
    rng = np.random.default_rng(seed)
    labels, groups = [], []
    for c, n_pat in ((0, 120), (1, 200)):
        for p in range(n_pat):
            for _ in range(int(rng.integers(1, 5))):
                labels.append(c)
                groups.append(f"c{c}-patient{p}")
    order = rng.permutation(len(labels))  # files are not sorted by patient
    return np.array(labels)[order], [groups[i] for i in order]


def test_grouped_split_properties():
    labels, groups = made_up_patients()
    groups_arr = np.array(groups)
    tr, va = train_cxr.grouped_split(labels, groups, 0.2, seed=7)
    assert len(np.intersect1d(tr, va)) == 0
    assert sorted(np.r_[tr, va].tolist()) == list(range(len(labels)))
    assert not set(groups_arr[tr]) & set(groups_arr[va]), "a patient is on both sides"
    for c in (0, 1):
        n_c = (labels == c).sum()
        share = (labels[va] == c).sum() / n_c
        assert abs(share - 0.2) <= 4 / n_c + 0.01, (c, share)  # at most one patient off the target
    # Deterministic for a seed, different for another.
    tr2, va2 = train_cxr.grouped_split(labels, groups, 0.2, seed=7)
    assert np.array_equal(tr, tr2) and np.array_equal(va, va2)
    _, va3 = train_cxr.grouped_split(labels, groups, 0.2, seed=8)
    assert set(va3.tolist()) != set(va.tolist())
    # Another fraction scales the split.
    _, va4 = train_cxr.grouped_split(labels, groups, 0.5, seed=7)
    assert abs(len(va4) / len(labels) - 0.5) < 0.03


# ----------------------------------------------------------------------------------------------
# 3. Class weights
# ----------------------------------------------------------------------------------------------
def test_class_weights():
    labels = np.array([0] * 10 + [1] * 30 + [2] * 20)
    w = train_cxr.class_weights(labels, 3)
    counts = np.bincount(labels)
    expected = len(labels) / (3 * counts)
    assert w.shape == (3,)
    np.testing.assert_allclose(w.numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(w.numpy(), compute_class_weight("balanced", classes=np.arange(3), y=labels),
                               rtol=1e-6)
    np.testing.assert_allclose(w.numpy(), [2.0, 2 / 3, 1.0], rtol=1e-6)
    np.testing.assert_allclose(train_cxr.class_weights(np.array([0, 1, 1, 0, 2, 2]), 3).numpy(), np.ones(3))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_the_cuda_loss_is_the_weighted_mean_loss_without_its_wait(smoothing):
    # On CUDA the loss is the weighted sum over the targets' weights (torch < 2.12 found those weights with
    # masked_select when smoothing: a wait for the GPU every step); its value and gradients are the mean's.
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 3, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 3, (64,), generator=g)
    w = train_cxr.class_weights(y.numpy(), 3).double()
    got = train_cxr.SummedCrossEntropy(weight=w, label_smoothing=smoothing)(logits, y)
    (g_got,) = torch.autograd.grad(got, logits)
    want = torch.nn.CrossEntropyLoss(weight=w, label_smoothing=smoothing)(logits, y)
    (g_want,) = torch.autograd.grad(want, logits)
    assert abs((got - want).item()) < 1e-12 and torch.allclose(g_got, g_want, rtol=0, atol=1e-12)
    assert abs((want - torch.nn.CrossEntropyLoss(label_smoothing=smoothing)(logits, y)).item()) > 1e-3  # w acts


# ----------------------------------------------------------------------------------------------
# 4. Model
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [16, 33, 64, 100, 128])
@pytest.mark.parametrize("channels,num_classes", [((4, 8, 8, 16), 2), ((8, 16, 32, 64), 3), ((2, 3, 5, 7), 5)])
def test_custom_cnn_any_size(size, channels, num_classes):
    torch.manual_seed(0)
    model = train_cxr.CustomCNN(num_classes=num_classes, img_size=size, channels=channels, fc_hidden=12).eval()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears[0].in_features == channels[-1] * (size // 16) ** 2  # four 2x poolings, floored
    assert linears[-1].out_features == num_classes
    with torch.no_grad():
        out = model(torch.randn(3, 1, size, size))
    assert out.shape == (3, num_classes)
    assert torch.isfinite(out).all()


# ----------------------------------------------------------------------------------------------
# 5. Metrics against scikit-learn
# ----------------------------------------------------------------------------------------------
def random_scores(seed, n=300, decimals=1):
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.4
    s = np.round(rng.random(n) * 0.6 + 0.4 * y, decimals)  # rounding makes many ties
    return y, s


def test_roc_auc_is_nan_without_both_classes():
    # scikit-learn raises there; a validation split or bootstrap resample can lack a class.
    assert np.isnan(train_cxr.roc_auc([1, 1, 1], [0.1, 0.2, 0.3]))
    assert train_cxr.roc_auc([0, 0, 1, 1], [0.5, 0.5, 0.5, 0.5]) == pytest.approx(0.5)


@pytest.mark.parametrize("k", [3, 4])
def test_multiclass_auc_matches_sklearn(k):
    rng = np.random.default_rng(k)
    labels = rng.integers(0, k, 400)
    logits = rng.normal(size=(400, k)) + np.eye(k)[labels] * 1.0
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    probs = np.round(probs, 2)
    probs /= probs.sum(1, keepdims=True)
    ref = roc_auc_score(labels, probs, multi_class="ovr", average="macro")
    assert train_cxr.multiclass_auc(labels, probs, pos=1) == pytest.approx(ref, abs=1e-9)
    # Binary: the AUC of the positive class's probability.
    y2 = labels % 2
    p2 = np.stack([1 - probs[:, 0], probs[:, 0]], 1)
    assert train_cxr.multiclass_auc(y2, p2, pos=1) == pytest.approx(roc_auc_score(y2, p2[:, 1]))
    assert train_cxr.multiclass_auc(y2, p2, pos=0) == pytest.approx(roc_auc_score(y2 == 0, p2[:, 0]))


@pytest.mark.parametrize("seed", [0, 1])
def test_binary_metrics_match_sklearn(seed):
    y, s = random_scores(seed, decimals=2)
    for t in (0.2, 0.45, 0.5, 0.73):
        pred = s >= t
        m = train_cxr.binary_metrics(y, s, t)
        assert m["threshold"] == t
        (tn, fp), (fn, tp) = confusion_matrix(y, pred, labels=[False, True]).tolist()
        assert m["counts"] == {"tp": tp, "fn": fn, "fp": fp, "tn": tn}
        assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
        assert m["sensitivity"] == pytest.approx(recall_score(y, pred))
        assert m["specificity"] == pytest.approx(recall_score(~y, ~pred))
        assert m["precision"] == pytest.approx(precision_score(y, pred))
        assert m["f1"] == pytest.approx(f1_score(y, pred))


def test_bootstrap_ci():
    y, s = random_scores(3, n=200, decimals=2)
    auc = train_cxr.roc_auc(y, s)
    lo, hi = train_cxr.bootstrap_auc_ci(y, s, 300, seed=5)
    assert lo < auc < hi
    assert hi - lo < 0.25
    assert train_cxr.bootstrap_auc_ci(y, s, 300, seed=5) == [lo, hi]
    assert train_cxr.bootstrap_auc_ci(y, s, 300, seed=6) != [lo, hi]
    # The 2.5th and 97.5th percentiles of the resampled AUCs (report.html and test_metrics.json say 95%),
    # each resample's AUC roc_auc_score's (the bootstrap counts it by hand): with ties, float32 scores,
    # and resamples of a tiny set that lose a class (dropped)
    rng = np.random.default_rng(0)
    tiny = (np.array([True, False, False, True, False]), np.array([0.9, 0.1, 0.4, 0.4, 0.8]))
    for (y, s), seed in [((y, s), 5), (random_scores(4, n=300, decimals=1), 7), (tiny, 8),
                         ((rng.random(150) < 0.3, rng.random(150).astype(np.float32)), 9)]:
        draws = np.random.default_rng(seed)
        aucs = [train_cxr.roc_auc(y[i], s[i]) for i in (draws.integers(0, len(y), len(y)) for _ in range(300))]
        aucs = [a for a in aucs if not np.isnan(a)]
        assert train_cxr.bootstrap_auc_ci(y, s, 300, seed) == pytest.approx(np.percentile(aucs, [2.5, 97.5]),
                                                                           abs=1e-12)
    # Three classes: the same resamples of multiclass_auc's figure (mean one-vs-rest AUC of the classes
    # a resample holds); --bootstrap was ignored there, and the report had no interval.
    labels, probs = rng.integers(0, 3, 90), rng.dirichlet([1, 1, 1], 90).round(2)
    labels[:5] = 2  # and a rare class that some resamples lose
    labels[labels == 2] = np.r_[2, 2, np.zeros((labels == 2).sum() - 2, int)]
    draws = np.random.default_rng(3)
    aucs = [train_cxr.multiclass_auc(labels[i], probs[i], 2)
            for i in (draws.integers(0, len(labels), len(labels)) for _ in range(300))]
    assert train_cxr.bootstrap_auc_ci(labels, probs, 300, 3) == pytest.approx(np.percentile(aucs, [2.5, 97.5]),
                                                                               abs=1e-12)


def test_bootstrap_ci_needs_two_images_of_each_class():
    # One positive among 10 negatives, scored highest: every resample that held it gave AUC 1, and the report
    # said "AUC 95% CI 1.0000 - 1.0000" on a single positive image. No interval, as for --bootstrap 0.
    y, s = np.r_[True, np.zeros(10, bool)], np.r_[0.9, np.linspace(0.1, 0.5, 10)]
    assert np.isnan(train_cxr.bootstrap_auc_ci(y, s, 200, 0)).all()
    assert np.isnan(train_cxr.bootstrap_auc_ci(~y, s, 200, 0)).all()  # one negative, the same
    labels, probs = np.r_[0, 0, 0, 1, 1, 1, 2], np.random.default_rng(0).dirichlet([1, 1, 1], 7)
    assert np.isnan(train_cxr.bootstrap_auc_ci(labels, probs, 200, 0)).all()
    y[1] = True  # two positives: an interval again
    lo, hi = train_cxr.bootstrap_auc_ci(y, s, 200, 0)
    assert 0 <= lo < hi <= 1


# ----------------------------------------------------------------------------------------------
# 6. One-epoch end-to-end run
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def e2e(synth_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("core_runs")
    test_before = snapshot(synth_root / "test")
    rc = run([*TINY, "--epochs", "1", "--data-dir", synth_root, "--output-dir", out, "--run-name", "one"])
    return {"rc": rc, "out": out, "run": out / "one", "root": synth_root,
            "test_before": test_before, "test_after": snapshot(synth_root / "test")}


def test_e2e_artifacts(e2e):
    assert e2e["rc"] == 0
    run_dir = e2e["run"]
    for name in ("config.json", "train.log", "history.csv", "training_history.png", "best_model.pt", "last.pt",
                 "test_metrics.json", "roc_curve.png", "confusion_matrix.png"):
        assert (run_dir / name).is_file(), name
        assert (run_dir / name).stat().st_size > 0, name
    for png in run_dir.rglob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    assert not [p for p in run_dir.rglob("*") if ".tmp" in p.name], "temporary files left behind"

    cfg = json.loads((run_dir / "config.json").read_text())
    assert {"config", "versions", "device"} <= cfg.keys()
    assert cfg["config"]["epochs"] == 1 and cfg["config"]["img_size"] == 32
    assert {f.name for f in dataclasses.fields(train_cxr.Config)} <= cfg["config"].keys()
    assert cfg["versions"]["torch"] == torch.__version__
    assert cfg["device"] == "cpu"

    hist = read_csv(run_dir / "history.csv")
    with open(run_dir / "history.csv", newline="") as f:
        assert next(csv.reader(f)) == HISTORY_COLUMNS
    assert len(hist) == 1 and hist[0]["epoch"] == "1"
    for k in HISTORY_COLUMNS:
        assert np.isfinite(float(hist[0][k])), k
    val_auc = float(hist[0]["val_auc"])
    log_lines = (run_dir / "train.log").read_text().splitlines()
    epoch_lines = [ln for ln in log_lines if ln.split()[:1] == ["1"] and f"{val_auc:.4f}" in ln]
    assert epoch_lines, "train.log has no line for epoch 1"
    speed = [re.search(r"training speed: ([\d.]+) images/s \((\d+) images in ([\d.]+) s", ln) for ln in log_lines]
    speed = [m for m in speed if m]
    assert len(speed) == 1, "train.log has no training-speed line"
    rate, n, secs = float(speed[0].group(1)), int(speed[0].group(2)), float(speed[0].group(3))
    bs = cfg["config"]["batch_size"]
    assert n > 0 and n % bs == 0  # whole batches of the one epoch
    assert n / (secs + 0.005) - 0.05 <= rate <= n / max(secs - 0.005, 1e-9) + 0.05  # within the printed rounding


def test_e2e_gradcam_files(e2e):
    cam = e2e["run"] / "grad_cam"
    names = sorted(p.name for p in cam.iterdir())
    pat = re.compile(r"^epoch_001_(\d{2})_true-(NORMAL|PNEUMONIA)_pred-(NORMAL|PNEUMONIA)_p([01]\.\d{2,})\.png$")
    matches = [pat.match(n) for n in names if pat.match(n)]
    assert len(matches) == 4, names  # --num-gradcam-images 4
    assert sorted(m.group(1) for m in matches) == ["00", "01", "02", "03"]
    assert {m.group(2) for m in matches} == {"NORMAL", "PNEUMONIA"}  # every class is explained
    assert "summary_epoch_001.png" in names
    assert [n for n in names if re.match(r"^test_\d{2}_true-\w+_pred-\w+_p[01]\.\d{2,}\.png$", n)]


def test_e2e_test_metrics(e2e):
    m = json.loads((e2e["run"] / "test_metrics.json").read_text())
    for k in ("auc", "auc_ci95", "threshold", "accuracy", "sensitivity", "specificity", "precision", "f1",
              "confusion_matrix", "at_0.5", "n", "positive_class", "gradcam"):
        assert k in m, k
    assert m["n"] == 50 and m["positive_class"] == "PNEUMONIA"
    assert len(m["auc_ci95"]) == 2 and m["auc_ci95"][0] <= m["auc"] <= m["auc_ci95"][1]
    cm = np.array(m["confusion_matrix"])
    assert cm.shape == (2, 2) and cm.sum() == 50 and cm.sum(1).tolist() == [20, 30]
    assert m["accuracy"] == pytest.approx(np.trace(cm) / 50)
    assert m["sensitivity"] == pytest.approx(cm[1, 1] / cm[1].sum())
    assert m["specificity"] == pytest.approx(cm[0, 0] / cm[0].sum())
    assert m["at_0.5"]["threshold"] == 0.5 and sum(m["at_0.5"]["counts"].values()) == 50
    assert 0.0 <= m["threshold"] <= 1.0


def test_e2e_split_keeps_test_folder(e2e):
    cfg = json.loads((e2e["run"] / "config.json").read_text())
    sizes = cfg["split_sizes"]
    root = e2e["root"]
    n_train_files = sum(1 for p in (root / "train").rglob("*.png"))
    n_test_files = sum(1 for p in (root / "test").rglob("*.png"))
    assert sizes["test"] == n_test_files == 50
    assert sizes["train"] + sizes["val"] == n_train_files == 150
    assert abs(sizes["val"] - 0.15 * 150) <= 4
    assert e2e["test_before"] == e2e["test_after"]


def test_e2e_reload_reproduces(e2e):
    run_dir = e2e["run"]
    ckpt = train_cxr.load_checkpoint(run_dir / "best_model.pt")
    ckpt2 = train_cxr.load_checkpoint(run_dir / "best_model.pt")
    m1, m2 = train_cxr.model_from_checkpoint(ckpt), train_cxr.model_from_checkpoint(ckpt2)
    cfg = train_cxr.Config.from_dict(ckpt["config"])
    data = train_cxr.prepare_data(cfg)
    norm, img = ckpt["normalization"], ckpt["img_size"]
    test = data["test"]
    p1 = train_cxr.predict_probs(m1, test.images, img, norm, CPU, cfg.tta)
    p2 = train_cxr.predict_probs(m2, test.images, img, norm, CPU, cfg.tta)
    assert p1.shape == (50, 2)
    np.testing.assert_array_equal(p1, p2)
    np.testing.assert_allclose(p1.sum(1), 1, atol=1e-5)
    metrics = json.loads((run_dir / "test_metrics.json").read_text())
    pos = ckpt["class_names"].index("PNEUMONIA")
    y = test.labels.numpy() == pos
    assert train_cxr.roc_auc(y, p1[:, pos]) == pytest.approx(metrics["auc"], abs=1e-6)
    assert ckpt["threshold"] == pytest.approx(metrics["threshold"])
    # The validation metrics recorded for the best epoch come back from the saved weights.
    hist = read_csv(run_dir / "history.csv")
    best_row = next(h for h in hist if int(h["epoch"]) == ckpt["epoch"])
    val = data["val"]
    pv = train_cxr.predict_probs(m1, val.images, img, norm, CPU, cfg.tta)
    assert train_cxr.multiclass_auc(val.labels.numpy(), pv, pos) == pytest.approx(float(best_row["val_auc"]),
                                                                                  abs=1e-6)
    assert ckpt["best_auc"] == pytest.approx(float(best_row["val_auc"]), abs=1e-9)
    labelled = train_cxr.predict_labels(pv, pos, None)  # P >= 0.5 for two classes, as the reports label
    assert accuracy_score(val.labels.numpy(), labelled) == pytest.approx(float(best_row["val_acc"]), abs=1e-9)
    # The validation loss is the class-weighted NLL of the training loss (without label smoothing).
    w = train_cxr.class_weights(data["train"].labels.numpy(), 2)
    log_p = torch.from_numpy(np.log(np.clip(pv, 1e-7, 1)))
    weighted, plain = (float(torch.nn.functional.nll_loss(log_p, val.labels, weight=wt)) for wt in (w, None))
    assert abs(weighted - plain) > 1e-4, "precondition: the weights must change the loss"
    assert float(best_row["val_loss"]) == pytest.approx(weighted, abs=1e-5)
    pv_cal = train_cxr.calibrate(pv, ckpt["calibration"])  # the threshold lives on the calibrated scale
    assert train_cxr.choose_threshold(val.labels.numpy() == pos, pv_cal[:, pos],
                                      ckpt["threshold_policy"]) == pytest.approx(ckpt["threshold"])


def test_e2e_same_run_name_refused(e2e, capsys):
    before = snapshot(e2e["run"])
    capsys.readouterr()
    rc = run([*TINY, "--epochs", "1", "--data-dir", e2e["root"], "--output-dir", e2e["out"], "--run-name", "one"])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(e2e["run"]) in err
    assert snapshot(e2e["run"]) == before


@pytest.mark.parametrize("mode", ["train", "predict", "evaluate"])
def test_a_taken_run_name_is_refused_before_the_images_are_decoded(mode, synth_root, tmp_path, monkeypatch, capsys):
    # The refusal came once every image had been decoded (the training split, every scan of a --predict folder).
    (tmp_path / "runs" / "taken").mkdir(parents=True)

    def decode_all(*a, **k):
        raise AssertionError("decoded before the run name was checked")
    monkeypatch.setattr(train_cxr, "decode_all", decode_all)
    argv = {"train": ["--data-dir", synth_root],
            "predict": ["--predict", synth_root / "test", "--checkpoint", tmp_path / "best_model.pt"],
            "evaluate": ["--evaluate", "--data-dir", synth_root, "--checkpoint", tmp_path / "best_model.pt"]}[mode]
    capsys.readouterr()
    assert run([*argv, "--output-dir", tmp_path / "runs", "--run-name", "taken", "--num-workers", "0"]) == 2
    assert capsys.readouterr().err == (f"error: run folder {tmp_path / 'runs' / 'taken'} already exists and is never "
                                       "overwritten: pass another --run-name (a stopped training run continues with "
                                       "--resume RUN_FOLDER)\n")
    assert os.listdir(tmp_path / "runs") == ["taken"] and not any((tmp_path / "runs" / "taken").iterdir())


def test_e2e_same_seed_same_history(e2e, tmp_path):
    rc = run([*TINY, "--epochs", "1", "--data-dir", e2e["root"], "--output-dir", tmp_path, "--run-name", "again"])
    assert rc == 0
    h1 = read_csv(e2e["run"] / "history.csv")
    h2 = read_csv(tmp_path / "again" / "history.csv")
    assert len(h1) == len(h2) == 1
    for a, b in zip(h1, h2):
        assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}
    w1 = train_cxr.load_checkpoint(e2e["run"] / "best_model.pt")["model"]
    w2 = train_cxr.load_checkpoint(tmp_path / "again" / "best_model.pt")["model"]
    for k in w1:
        assert torch.equal(w1[k], w2[k]), k


# ----------------------------------------------------------------------------------------------
# 7. Input errors: exit 2, one line naming the path, no run folder
# ----------------------------------------------------------------------------------------------
def test_a_class_folder_as_data_dir_names_the_folder_to_pass(tmp_path):
    # --data-dir D/train/PNEUMONIA (images beside patient folders) was told "D/train/PNEUMONIA/train not found:
    # DATA_DIR must hold train/<CLASS>/ folders", not the folder to pass.
    for c in ("NORMAL", "PNEUMONIA"):
        (tmp_path / "D" / "train" / c / "patient7").mkdir(parents=True)
        (tmp_path / "D" / "train" / c / "patient7" / "img0.png").write_bytes(b"x")
        (tmp_path / "D" / "train" / c / "img1.png").write_bytes(b"x")
    folder = tmp_path / "D" / "train" / "PNEUMONIA"
    advice = re.escape(f"{folder} is a class folder of the split folder {folder.parent}, not DATA_DIR: pass the "
                       f"folder that holds train/, --data-dir {tmp_path / 'D'}")
    with pytest.raises(train_cxr.CXRError, match=advice + "$"):
        train_cxr.prepare_data(train_cxr.Config(data_dir=str(folder)))
    # A DATA_DIR alone in a folder named train, without its own train/, keeps its error.
    (tmp_path / "train" / "mine" / "NORMAL").mkdir(parents=True)
    with pytest.raises(train_cxr.CXRError, match=r"mine/train not found: DATA_DIR must hold train/<CLASS>/"):
        train_cxr.prepare_data(train_cxr.Config(data_dir=str(tmp_path / "train" / "mine")))



def _no_dir(d, tmp_path):
    return tmp_path / "does_not_exist", [tmp_path / "does_not_exist"]


def _no_train(d, tmp_path):
    shutil.rmtree(d / "train")
    return d, [d / "train"]


def _classes_differ(d, tmp_path):
    (d / "test" / "NORMAL").rename(d / "test" / "HEALTHY")
    return d, [d / "train", d / "test"]


def _empty_class(d, tmp_path):
    for p in (d / "test" / "NORMAL").iterdir():
        p.unlink()
    (d / "test" / "NORMAL" / "notes.txt").write_text("not an image")
    return d, [d / "test" / "NORMAL"]


def _one_image_class(d, tmp_path):
    files = sorted((d / "train" / "NORMAL").iterdir())
    for p in files[1:]:
        p.unlink()
    return d, [d / "train" / "NORMAL"]


def _one_patient_class(d, tmp_path):
    files = sorted((d / "train" / "NORMAL").iterdir())
    for k in (1, 2):  # two images of one patient cannot be split into train and validation
        shutil.copy(files[k], d / "train" / "NORMAL" / f"IM-9999-000{k}.png")
    for p in files:
        p.unlink()
    return d, [d / "train" / "NORMAL"]


@pytest.mark.parametrize("damage", [_no_dir, _no_train, _classes_differ, _empty_class, _one_image_class,
                                    _one_patient_class])
def test_input_errors(damage, data_copy, tmp_path, capsys):
    data_dir, paths = damage(data_copy, tmp_path)
    out = tmp_path / "runs"
    rc = run([*TINY, "--epochs", "1", "--data-dir", data_dir, "--output-dir", out, "--run-name", "bad"])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for p in paths:
        assert str(p) in err, (p, err)
    assert not (out / "bad").exists()
    assert not out.exists() or not any(out.iterdir())


def test_an_empty_class_folder_gets_the_fix_that_works_for_its_split(data_copy):
    # Removing an empty class folder is a fix only in train/, which decides the classes; in test/ (or
    # an --evaluate / --recalibrate folder) the classes must stay those of the model, so it was no fix.
    _empty_class(data_copy, None)
    with pytest.raises(train_cxr.CXRError, match="add images of that class$"):
        train_cxr.check_split_dir(data_copy / "test", "test")
    for p in (data_copy / "train" / "NORMAL").glob("*.png"):
        p.unlink()
    with pytest.raises(train_cxr.CXRError, match="add images or remove the folder$"):
        train_cxr.check_split_dir(data_copy / "train", "train")


def test_a_run_name_with_a_sub_folder(synth_root, tmp_path):
    # --run-name exp/1 failed with "choose a writable --output-dir" when exp/ did not exist.
    assert run([*TINY, "--epochs", "1", "--data-dir", synth_root, "--output-dir", tmp_path, "--run-name", "exp/1",
                "--num-threads", "1"]) == 0
    assert (tmp_path / "exp" / "1" / "best_model.pt").is_file()


def test_output_dir_not_writable(synth_root, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("I am a file, not a folder")
    out = blocker / "runs"
    rc = run([*TINY, "--epochs", "1", "--data-dir", synth_root, "--output-dir", out, "--run-name", "x"])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(out) in err
    assert blocker.is_file() and blocker.read_text() == "I am a file, not a folder"


def test_a_run_folder_name_too_long_says_shorten_it(synth_root, tmp_path, monkeypatch, capsys):
    # ENAMETOOLONG was told "choose a writable --output-dir" (a long --run-name), or (a long --output-dir) was
    # an OSError traceback from check_run_dir_free. Real names, too long for this file system (255 bytes).
    decoded, real = [], train_cxr.decode_all
    monkeypatch.setattr(train_cxr, "decode_all", lambda *a, **k: decoded.append(a) or real(*a, **k))
    for out, name in ((tmp_path, "x" * 300), (tmp_path / ("y" * 300), "r")):
        capsys.readouterr()
        assert run([*TINY, "--data-dir", synth_root, "--output-dir", out, "--run-name", name]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "(File name too long): shorten --run-name or --output-dir" in err, err
    assert not decoded and os.listdir(tmp_path) == []  # said before decoding, nothing made
    # Under an --output-dir not made yet, it is mkdir that meets the long name: the same advice.
    try:
        with pytest.raises(train_cxr.CXRError, match=r"\(File name too long\): shorten --run-name or --output-dir"):
            train_cxr.make_run_dir(train_cxr.Config(output_dir=str(tmp_path / "new"), run_name="x" * 300))
        # A folder that may not be written keeps its advice (root writes anywhere, so the refusal is made here).
        def refuse(self, *a, **k):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        monkeypatch.setattr(Path, "mkdir", refuse)
        with pytest.raises(train_cxr.CXRError, match=r"\(Permission denied\): choose a writable --output-dir$"):
            train_cxr.make_run_dir(train_cxr.Config(output_dir=str(tmp_path / "ro"), run_name="r"))
    finally:
        train_cxr.setup_console_logging()  # closes any train.log handler


def test_a_run_folder_path_too_long_for_windows_says_shorten_it(tmp_path, monkeypatch):
    # Windows without long paths refuses a folder path of 248+ characters with ENOENT, not ENAMETOOLONG: it was
    # told "choose a writable --output-dir". Checked with mocks only: os.name, and os.mkdir failing as Windows' does.
    real_mkdir = os.mkdir

    def windows_mkdir(path, *a, **k):
        if len(os.path.abspath(path)) >= 248:
            raise FileNotFoundError(errno.ENOENT, "The system cannot find the path specified", str(path))
        return real_mkdir(path, *a, **k)
    windows = types.ModuleType("os")  # train_cxr's os as on Windows; every other module keeps this machine's
    windows.__getattr__ = lambda name: getattr(os, name)
    windows.name = "nt"
    monkeypatch.setattr(os, "mkdir", windows_mkdir)
    monkeypatch.setattr(train_cxr, "os", windows)
    (tmp_path / "runs").mkdir()  # main's look before any image is decoded says it already
    with pytest.raises(train_cxr.CXRError, match=r"characters\): shorten --run-name or --output-dir \(Windows"):
        train_cxr.check_run_dir_free(train_cxr.Config(output_dir=str(tmp_path / "runs"), run_name="x" * 250))
    for out, name in ((tmp_path / "runs", "x" * 250), (tmp_path / ("y" * 250), "r")):
        with pytest.raises(train_cxr.CXRError, match=r"characters\): shorten --run-name or --output-dir \(Windows"):
            train_cxr.make_run_dir(train_cxr.Config(output_dir=str(out), run_name=name))
    # A folder that is missing for another reason keeps its advice: the one it would be made in is missing too
    # (on Windows mkdir makes missing folders above; a drive or share that is not there stays missing).
    gone = FileNotFoundError(errno.ENOENT, "The system cannot find the path specified",
                             str(tmp_path / "gone" / ("x" * 250)))
    assert str(train_cxr.run_dir_error(Path(gone.filename), gone)).endswith("choose a writable --output-dir")
    short = FileNotFoundError(errno.ENOENT, "The system cannot find the path specified", str(tmp_path / "r"))
    assert str(train_cxr.run_dir_error(tmp_path / "r", short)).endswith("choose a writable --output-dir")
    windows.name = "posix"  # and elsewhere ENOENT is never read as a long path
    long = FileNotFoundError(errno.ENOENT, "No such file or directory", str(tmp_path / ("x" * 250)))
    assert str(train_cxr.run_dir_error(tmp_path / ("x" * 250), long)).endswith("choose a writable --output-dir")

def test_runs_started_in_the_same_second_get_folders_of_their_own(tmp_path, monkeypatch):
    # A sweep launched from a script: both runs named their folder by the same second, and the second
    # one stopped with "already exists: pass another --run-name" (or, racing, "choose a writable --output-dir").
    class Frozen(train_cxr._dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2024, 5, 1, 12, 0, 0)
    monkeypatch.setattr(train_cxr._dt, "datetime", Frozen)
    cfg = train_cxr.Config(output_dir=str(tmp_path))
    try:
        made = [train_cxr.make_run_dir(cfg) for _ in range(3)]
    finally:
        train_cxr.setup_console_logging()  # closes the train.log handlers
    assert [p.name for p in made] == ["20240501-120000", "20240501-120000-2", "20240501-120000-3"]
    assert all((p / "grad_cam").is_dir() for p in made)
    # A --run-name is the user's choice: taken, it is refused, never renamed or reused.
    with pytest.raises(train_cxr.CXRError, match="already exists and is never overwritten"):
        train_cxr.make_run_dir(dataclasses.replace(cfg, run_name="20240501-120000"))


# ----------------------------------------------------------------------------------------------
# 8. Three classes
# ----------------------------------------------------------------------------------------------
def test_three_classes(data_copy, tmp_path, capsys, monkeypatch):
    for split in ("train", "test"):
        src, dst = data_copy / split / "NORMAL", data_copy / split / "VIRAL"
        dst.mkdir()
        for p in src.iterdir():  # new names: other patients than NORMAL's
            shutil.copy(p, dst / f"V{p.name}")
    # A threshold policy has nothing to cut with three classes: typed, it is refused, not ignored.
    capsys.readouterr()
    with monkeypatch.context() as m:
        decoded = []
        m.setattr(train_cxr, "decode_all", lambda *a, **k: decoded.append(a))
        rc = run([*TINY, "--data-dir", data_copy, "--output-dir", tmp_path / "runs", "--threshold-policy", "youden"])
    assert rc == 2 and not decoded  # refused before a single image is decoded
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--threshold-policy needs two classes" in err[0] and not (tmp_path / "runs").exists()
    # So is --positive-class: no sensitivity or threshold exists for it, and the AUC averages every class.
    with monkeypatch.context() as m:
        m.setattr(train_cxr, "decode_all", lambda *a, **k: decoded.append(a))
        rc = run([*TINY, "--data-dir", data_copy, "--output-dir", tmp_path / "runs", "--positive-class", "VIRAL"])
    assert rc == 2 and not decoded
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--positive-class needs two classes" in err[0] and not (tmp_path / "runs").exists()
    rc = run([*TINY, "--epochs", "1", "--data-dir", data_copy, "--output-dir", tmp_path / "runs", "--run-name", "k3"])
    assert rc == 0
    run_dir = tmp_path / "runs" / "k3"
    m = json.loads((run_dir / "test_metrics.json").read_text())
    cm = np.array(m["confusion_matrix"])
    assert cm.shape == (3, 3)
    assert m["n"] == 70 and cm.sum() == 70
    assert m["class_names"] == ["NORMAL", "PNEUMONIA", "VIRAL"]
    assert cm.sum(1).tolist() == [20, 30, 20]
    assert m["accuracy"] == pytest.approx(np.trace(cm) / 70)
    assert 0.0 <= m["auc"] <= 1.0 and m["auc_ci95"][0] <= m["auc"] <= m["auc_ci95"][1]
    ckpt = train_cxr.load_checkpoint(run_dir / "best_model.pt")
    model = train_cxr.model_from_checkpoint(ckpt)
    with torch.no_grad():
        assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 3)
    cams = [p.name for p in (run_dir / "grad_cam").glob("epoch_001_*.png")]
    assert {re.search(r"_true-([A-Z]+)_pred", n).group(1) for n in cams} == {"NORMAL", "PNEUMONIA", "VIRAL"}
    # The report says how labels are made, and what it says of all images it says of the unflagged ones.
    assert m["threshold_policy"] == "argmax (more than two classes)"
    inside = m["ood"]["in_distribution_only"]
    assert inside["n"] == 70 - m["ood"]["flagged"] and 0 <= inside["accuracy"] <= 1 and 0 <= inside["auc"] <= 1
    assert m["auc_classes"] == 3 and 1 <= inside["auc_classes"] <= 3  # a class the guard flags whole drops out
    with open(run_dir / "test_predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    probs = np.array([[float(r[f"prob_{c}"]) for c in m["class_names"]] for r in rows])
    truth = np.array([m["class_names"].index(r["true"]) for r in rows])
    assert m["ece"] == pytest.approx(train_cxr.calibration_error(probs.argmax(1) == truth, probs.max(1)), abs=1e-5)
    # --recalibrate measures calibration as the report does (top-label), so its "before" is the report's.
    assert run(["--recalibrate", data_copy / "test", "--checkpoint", run_dir, "--output-dir", tmp_path / "runs",
                "--run-name", "rc", "--num-workers", 0, "--device", "cpu"]) == 0
    fit = json.loads((tmp_path / "runs" / "rc" / "recalibration.json").read_text())
    assert fit["before"]["ece"] == pytest.approx(m["ece"], abs=1e-12) and fit["after"]["ece"] < fit["before"]["ece"]
    # and its flagged share is the report's to the last digit (1 - in-distribution share differed in the last ones)
    assert fit["before"]["share_flagged"] == m["ood"]["share_flagged"] == m["ood"]["flagged"] / 70
    # A 3-class run has no threshold: its pages say so, where "–" (a NaN metric's sign) stood.
    no_threshold = "<td>n/a (3 classes: argmax)</td>"
    assert f"<td>threshold</td>{no_threshold}" in (run_dir / "report.html").read_text()
    assert f"<td>threshold</td>{no_threshold * 2}" in (tmp_path / "runs" / "rc" / "report.html").read_text()
    # --predict's table gives each label's own probability, as its overlay does: P(PNEUMONIA), the class
    # that only names the report's, stood beside every label, VIRAL too.
    capsys.readouterr()
    assert run(["--predict", data_copy / "test", "--checkpoint", run_dir, "--output-dir", tmp_path / "runs",
                "--run-name", "p3", "--num-workers", 0, "--device", "cpu"]) == 0
    table = capsys.readouterr().out.splitlines()
    head = next(i for i, line in enumerate(table) if line.startswith("file "))
    assert "P(predicted)" in table[head] and "PNEUMONIA" not in table[head]
    for line, r in zip(table[head + 1:head + 26], read_csv(tmp_path / "runs" / "p3" / "predictions.csv")):
        assert line.split()[1:3] == [r["predicted"], f"{float(r['prob_' + r['predicted']]):.3f}"], line


# ----------------------------------------------------------------------------------------------
# 9. Real data smoke test
# ----------------------------------------------------------------------------------------------
def test_real_data_learns(tmp_path):
    if not REAL_TRAIN.is_dir():
        pytest.skip(f"real Kermany training split not found at {REAL_TRAIN}")
    data = tmp_path / "real"
    for cls in ("NORMAL", "PNEUMONIA"):
        files = sorted(p for p in (REAL_TRAIN / cls).iterdir() if train_cxr.is_image_file(p.name))
        pick = files[::len(files) // 120][:120]  # spread over the sorted list: many patients
        assert len(pick) == 120
        for i, p in enumerate(pick):
            dst = data / ("train" if i < 100 else "test") / cls
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copy(p, dst / p.name)
    out = tmp_path / "runs"
    rc = run(["--data-dir", data, "--output-dir", out, "--run-name", "real", "--img-size", "64",
              "--channels", "8,16,32,64", "--fc-hidden", "64", "--batch-size", "16", "--epochs", "3",
              "--lr", "2e-3", "--val-fraction", "0.3", "--num-workers", "0", "--amp", "off",
              "--bootstrap", "50", "--num-gradcam-images", "0"])
    assert rc == 0
    cfg = json.loads((out / "real" / "config.json").read_text())
    assert cfg["split_sizes"]["test"] == 40 and cfg["split_sizes"]["train"] + cfg["split_sizes"]["val"] == 200
    ckpt = train_cxr.load_checkpoint(out / "real" / "best_model.pt")
    hist = read_csv(out / "real" / "history.csv")
    best_hist = max(float(h["val_auc"]) for h in hist)
    assert ckpt["best_auc"] == pytest.approx(best_hist)
    print(f"real-data best validation AUC: {ckpt['best_auc']:.4f}")
    assert ckpt["best_auc"] > 0.8
