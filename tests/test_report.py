"""report.html: one static page per run, --evaluate and --predict folder, parsed with html.parser."""
import csv
import html
import json
import re
import shutil
import urllib.parse
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

import train_cxr
from conftest import TINY, read_csv, run

FAST = [*TINY, "--device", "cpu", "--num-threads", "1"]


class Page(HTMLParser):
    """Every src/href, every table (by id) as rows of cell texts, and the page's text."""

    def __init__(self, path: Path):
        super().__init__()
        self.links, self.tables, self.tags, self.text = [], {}, set(), []
        self._table = self._row = self._cell = None
        self.feed(path.read_text(encoding="utf-8"))

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.add(tag)
        self.links += [a[k] for k in ("src", "href") if k in a]
        if tag == "table":
            self._table = self.tables.setdefault(a.get("id"), [])
        elif tag == "tr" and self._table is not None:
            self._row = []
            self._table.append(self._row)
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)

    def pairs(self, table_id: str) -> dict:
        return {r[0]: r[1] for r in self.tables[table_id][1:]}


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def same_number(cell: str, value) -> bool:
    return float(cell) == pytest.approx(float(value), rel=1e-3, abs=5e-5)


def check_links(folder: Path, page: Page) -> list:
    """Every link is relative, stays inside the folder and names an existing file; returns them."""
    files = []
    for link in page.links:
        parts = urllib.parse.urlsplit(link)
        assert not parts.scheme and not parts.netloc and not link.startswith("/"), link
        path = (folder / urllib.parse.unquote(parts.path)).resolve()
        assert path.is_file() and folder.resolve() in path.parents, link
        files.append(path.relative_to(folder.resolve()).as_posix())
    assert "script" not in page.tags and "link" not in page.tags  # nothing to run, nothing to fetch
    return files


@pytest.fixture(scope="module")
def folders(synth_root, tmp_path_factory):
    """A 4-epoch run, a --predict folder and an --evaluate folder of its best model."""
    out = tmp_path_factory.mktemp("report_runs")
    assert run([*FAST, "--epochs", 4, "--data-dir", synth_root, "--output-dir", out, "--run-name", "run"]) == 0
    ckpt = out / "run" / "best_model.pt"
    scans = sorted((synth_root / "test" / "PNEUMONIA").glob("*.png"))[:3] + \
        sorted((synth_root / "test" / "NORMAL").glob("*.png"))[:2]
    assert run(["--predict", *scans, "--checkpoint", ckpt, "--output-dir", out, "--run-name", "pred",
                "--num-workers", 0, "--num-threads", 1]) == 0
    assert run(["--evaluate", "--checkpoint", ckpt, "--data-dir", synth_root, "--output-dir", out,
                "--run-name", "eval", "--num-workers", 0, "--num-threads", 1]) == 0
    return {"run": out / "run", "pred": out / "pred", "eval": out / "eval"}


def test_run_page_links_every_figure_relative_and_existing(folders):
    folder = folders["run"]
    files = check_links(folder, Page(folder / "report.html"))
    for name in ("training_history.png", "roc_curve.png", "confusion_matrix.png", "grad_cam/test_summary.png",
                 "config.json", "history.csv", "test_metrics.json", "train.log"):
        assert name in files, name
    # Grad-CAM summaries of the first, middle and last of the 4 epochs, and no other.
    assert sorted(f for f in set(files) if "summary_epoch" in f) == \
        [f"grad_cam/summary_epoch_{e:03d}.png" for e in (1, 3, 4)]
    assert not [p for p in folder.rglob("*") if ".tmp" in p.name]


def test_run_page_numbers_equal_the_files(folders):
    folder = folders["run"]
    page = Page(folder / "report.html")
    metrics = flatten(json.loads((folder / "test_metrics.json").read_text()))
    shown = page.pairs("test-metrics")
    assert shown.keys() == metrics.keys()
    for key, value in metrics.items():
        if isinstance(value, float):
            assert same_number(shown[key], value), key
        elif isinstance(value, list) and not any(isinstance(v, list) for v in value):
            cells = shown[key].split(", ")
            assert len(cells) == len(value), key
            assert all(same_number(c, v) if isinstance(v, float) else c == str(v) for c, v in zip(cells, value)), key
        elif isinstance(value, list):
            assert json.loads(shown[key]) == value, key  # the confusion matrices
        else:
            assert shown[key] == str(value), key
    text = " ".join(" ".join(page.text).split())
    lo, hi = json.loads((folder / "test_metrics.json").read_text())["auc_ci95"]
    assert f"95% CI {lo:.4f} – {hi:.4f}" in text
    policy = metrics["threshold_policy"]
    assert f"decision threshold {metrics['threshold']:.4f}, chosen on validation ({policy})" in text
    assert metrics["threshold_policy"] == train_cxr.THRESHOLD_POLICY  # the page names the policy used, not another one

    history = page.tables["history"]
    with open(folder / "history.csv", newline="") as f:
        want = list(csv.reader(f))
    assert history[0] == want[0] and len(history) == len(want) == 5
    for got_row, want_row in zip(history[1:], want[1:]):
        assert all(same_number(g, w) for g, w in zip(got_row, want_row)), (got_row, want_row)

    config = page.pairs("config")
    assert config["config.epochs"] == "4" and config["versions.torch"] == torch.__version__


def test_predict_page_has_every_image_with_its_overlay(folders):
    folder = folders["pred"]
    page = Page(folder / "report.html")
    files = check_links(folder, page)
    rows = read_csv(folder / "predictions.csv")
    table = page.tables["predictions"]
    assert table[0] == [*rows[0].keys(), "overlay"] and len(table) == len(rows) + 1 == 6
    for k, (r, cells) in enumerate(zip(rows, table[1:])):
        assert cells[0] == r["path"] and cells[1] == r["predicted"]
        assert same_number(cells[3], r["prob_PNEUMONIA"])
        name = f"grad_cam/{k:05d}_{Path(r['path']).stem}_pred-{r['predicted']}_"
        overlay = {f for f in files if f.startswith(name)}
        assert len(overlay) == 1, (k, r["path"])
    config = page.pairs("config")
    assert config["checkpoint"].endswith("best_model.pt") and same_number(config["threshold"], rows[0]["threshold"])


def test_evaluate_page_numbers_equal_its_test_metrics(folders):
    folder = folders["eval"]
    page = Page(folder / "report.html")
    files = check_links(folder, page)
    assert {"roc_curve.png", "confusion_matrix.png", "grad_cam/test_summary.png"} <= set(files)
    metrics = json.loads((folder / "test_metrics.json").read_text())
    shown = page.pairs("test-metrics")
    for key in ("auc", "threshold", "accuracy", "sensitivity", "specificity"):
        assert same_number(shown[key], metrics[key]), key
    assert "history" not in page.tables  # nothing trained here


def test_new_metrics_figures_and_columns_appear_without_code_that_knows_them(folders, tmp_path):
    run_dir, pred_dir = tmp_path / "run", tmp_path / "pred"
    shutil.copytree(folders["run"], run_dir)
    shutil.copytree(folders["pred"], pred_dir)
    assert "reliability.png" in check_links(run_dir, Page(run_dir / "report.html"))  # REPORT_PNGS that exist
    (run_dir / "reliability.png").unlink()
    metrics = json.loads((run_dir / "test_metrics.json").read_text())
    metrics.update(brier=0.0345, drift={"auroc": 0.912, "flagged": 3})
    (run_dir / "test_metrics.json").write_text(json.dumps(metrics))
    train_cxr.write_report(run_dir, "run")
    page = Page(run_dir / "report.html")
    shown = page.pairs("test-metrics")
    assert shown["brier"] == "0.0345" and shown["drift.auroc"] == "0.9120" and shown["drift.flagged"] == "3"
    assert "reliability.png" not in check_links(run_dir, page)

    rows = read_csv(pred_dir / "predictions.csv")
    with open(pred_dir / "predictions.csv", "w", newline="") as f:
        w = csv.DictWriter(f, [*rows[0].keys(), "site_score", "site"])
        w.writeheader()
        w.writerows({**r, "site_score": f"{0.1 * k:.6f}", "site": "A"} for k, r in enumerate(rows))
    train_cxr.write_report(pred_dir, "pred")
    table = Page(pred_dir / "report.html").tables["predictions"]
    assert table[0][-3:] == ["site_score", "site", "overlay"]
    assert [r[-3] for r in table[1:]] == [f"{0.1 * k:.6f}" for k in range(len(rows))]
    # Every cell as the CSV has it: rounded to 4 decimals, a P just below the threshold read as equal to it.
    assert [r[:len(rows[0])] for r in table[1:]] == [list(r.values()) for r in rows]


def test_report_is_written_atomically(folders, tmp_path, monkeypatch):
    written = []
    real = train_cxr.atomic_write
    monkeypatch.setattr(train_cxr, "atomic_write", lambda path, fn: (written.append(Path(path)), real(path, fn)))
    train_cxr.write_report(tmp_path, "empty folder")  # a folder with nothing in it still gets a valid page
    assert written == [tmp_path / "report.html"]
    assert Page(tmp_path / "report.html").links == []


def test_predict_page_finds_overlays_past_image_99999(tmp_path):
    # --predict names overlays {k:05d}_<file>; image 100,000's prefix has six digits and the page's
    # lookup once matched exactly five, so that image and every later one lost its overlay silently.
    (tmp_path / "grad_cam").mkdir()
    with open(tmp_path / "predictions.csv", "w", newline="") as f:
        csv.writer(f).writerows([["file", "predicted"], *([f"x{k}.png", "NORMAL"] for k in range(100_001))])
    for name in ("00007_x7.png", "100000_x100000.png"):
        (tmp_path / "grad_cam" / name).write_bytes(b"")
    page = Page(train_cxr.write_report(tmp_path, "predict"))
    assert len(page.tables["predictions"]) == 100_002
    # each overlay is linked twice (the thumbnail and its link), and nothing else is
    overlays = sorted(link for link in page.links if link.startswith("grad_cam/"))
    assert overlays == ["grad_cam/00007_x7.png"] * 2 + ["grad_cam/100000_x100000.png"] * 2


def test_run_page_picks_first_middle_and_last_epoch_past_epoch_999(tmp_path):
    # Summaries are named summary_epoch_{E:03d}: from epoch 1000 on, sorted as text (1000 before 101),
    # a 1,001-epoch run's page showed epochs 1, 499 and 999 under "first, middle and last epoch".
    (tmp_path / "grad_cam").mkdir()
    for e in range(1, 1002):
        (tmp_path / "grad_cam" / f"summary_epoch_{e:03d}.png").write_bytes(b"")
    page = Page(train_cxr.write_report(tmp_path, "run"))
    assert set(page.links) == {f"grad_cam/summary_epoch_{e:03d}.png" for e in (1, 501, 1001)}


def test_console_summary_shows_the_metrics_at_0_5_beside_those_at_the_threshold():
    # The summary printed after training: each metric at the run's threshold, then "(at 0.5: ...)".
    at = lambda v: {k: v for k in ("accuracy", "sensitivity", "specificity", "precision", "f1")}
    res = {"n": 10, "auc": 0.9, "auc_ci95": [0.8, 0.95], "threshold": 0.3, "threshold_policy": "youden",
           **at(0.1111), "at_0.5": at(0.2222), "ece": 0.05, "ece_uncalibrated": 0.1, "calibrated": True,
           "gradcam": {"mean_share_in_box": 0.7, "uniform_share": 0.6}}
    text = train_cxr.summary_table(res)
    for k in ("accuracy", "sensitivity", "specificity", "precision", "f1"):
        assert re.search(rf"^ +{k} +0\.1111  \(at 0\.5: 0\.2222\)$", text, re.M), (k, text)
    assert re.search(r"^ +threshold +0\.3000 \(youden\)$", text, re.M)


def test_config_json_resumes_show_as_json_on_the_page(tmp_path):
    # config.json's "resumed" is a list of dicts: the page showed Python's repr ({'after_epoch': 1, ...}).
    resumed = [{"after_epoch": 1, "device": "cpu", "changed": {"strict": True}}]
    (tmp_path / "config.json").write_text(json.dumps({"config": {"epochs": 3}, "resumed": resumed}))
    page = train_cxr.write_report(tmp_path, "run").read_text()
    assert html.escape(json.dumps(resumed[0])) in page and "&#x27;after_epoch&#x27;" not in page
    assert train_cxr._fmt([[1, 2], [3, 4]]) == "[[1, 2], [3, 4]]"  # as before
    assert train_cxr._fmt([0.5, 2]) == "0.5000, 2"


def test_roc_legend_gives_the_threshold_as_the_summary_does(tmp_path, monkeypatch):
    # The legend gave 2 decimals (0.61) where the printed summary and the page gave 4 (0.6087).
    legends = []
    monkeypatch.setattr(train_cxr, "_savefig", lambda fig, path: (
        legends.extend(t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()),
        train_cxr.plt.close(fig)))
    train_cxr.plot_roc([([0, 0.2, 1], [0, 0.8, 1], "AUC 0.900")], tmp_path / "roc.png", "test ROC", (0.2, 0.8), 0.60874)
    at = {k: 0.5 for k in ("accuracy", "sensitivity", "specificity", "precision", "f1")}
    res = {"n": 10, "auc": 0.9, "auc_ci95": [0.8, 0.95], "threshold": 0.60874, "threshold_policy": "youden",
           **at, "at_0.5": at, "ece": 0.05, "ece_uncalibrated": 0.1, "calibrated": True,
           "gradcam": {"mean_share_in_box": 0.7, "uniform_share": 0.6}}
    shown = re.search(r"^ +threshold +(\S+) \(youden\)$", train_cxr.summary_table(res), re.M)[1]
    assert shown == "0.6087" and f"operating threshold {shown}" in legends


def test_three_class_page_says_there_is_no_threshold_and_keeps_the_nan_sign(tmp_path):
    # A 3-class run's null threshold showed "–", the sign of a NaN metric (json writes nan as null).
    metrics = {"n": 70, "class_names": ["NORMAL", "PNEUMONIA", "VIRAL"], "auc": 0.9, "auc_ci95": [None, None],
               "threshold_policy": "argmax (more than two classes)", "thresholds_by_policy": None,
               "threshold": None, "ece": None}
    (tmp_path / "test_metrics.json").write_text(json.dumps(metrics))
    (tmp_path / "recalibration.json").write_text(json.dumps({
        "images": {"NORMAL": 20, "PNEUMONIA": 30, "VIRAL": 20},
        "before": {"ece": None, "threshold": None, "share_flagged": 0.1},
        "after": {"ece": 0.02, "threshold": None, "share_flagged": 0.1}}))
    page = Page(train_cxr.write_report(tmp_path, "run"))
    shown = page.pairs("test-metrics")
    assert shown["threshold"] == shown["thresholds_by_policy"] == "n/a (3 classes: argmax)"
    assert shown["ece"] == "–" and shown["auc_ci95"] == "–, –"  # NaN metrics keep their sign
    rows = {r[0]: r[1:] for r in page.tables["recalibration"][1:]}
    assert rows["threshold"] == ["n/a (3 classes: argmax)"] * 2 and rows["ece"] == ["–", "0.0200"]
    # Two classes: a null threshold (--recalibrate's "before" of a last.pt) labels at P >= 0.5, as its metrics
    # were counted; it read "–" too. A NaN metric keeps its sign.
    metrics["class_names"] = ["NORMAL", "PNEUMONIA"]
    (tmp_path / "test_metrics.json").write_text(json.dumps(metrics))
    recal = json.loads((tmp_path / "recalibration.json").read_text())
    recal["images"] = {"NORMAL": 20, "PNEUMONIA": 30}
    (tmp_path / "recalibration.json").write_text(json.dumps(recal))
    page = Page(train_cxr.write_report(tmp_path, "run"))
    shown = page.pairs("test-metrics")
    assert shown["threshold"] == "none (argmax, P >= 0.5)" and shown["ece"] == "–"
    rows = {r[0]: r[1:] for r in page.tables["recalibration"][1:]}
    assert rows["threshold"] == ["none (argmax, P >= 0.5)"] * 2 and rows["ece"] == ["–", "0.0200"]


def test_overlay_names_are_padded_to_the_digits_the_count_needs():
    # With 2 digits the 101st gallery image was test_100, which sorts before test_11 as text.
    assert train_cxr.numbered_stems("test_", 3) == ["test_00", "test_01", "test_02"]  # the default names stay
    assert train_cxr.numbered_stems("test_", 100)[-1] == "test_99"
    for n in (101, 250, 1001):
        names = train_cxr.numbered_stems("epoch_012_", n)
        assert sorted(names) == names and len(set(map(len, names))) == 1 and names[-1] == f"epoch_012_{n - 1}"
    # --predict: 5 digits, the page's lookup, up to image 99,999; six for all from 100,001 images on
    assert train_cxr.numbered_stems("", 100_000, least=5)[::99_999] == ["00000", "99999"]
    assert train_cxr.numbered_stems("", 100_001, least=5)[::100_000] == ["000000", "100000"]
    assert train_cxr.numbered_stems("", 0) == []
