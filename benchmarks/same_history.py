"""Does a refactor of train_cxr.py change any number? Runs the demo with an old version and this one.

    python benchmarks/same_history.py                 # the working tree against main, demo, 3 epochs
    python benchmarks/same_history.py --rev 9c07a40 --epochs 0   # the full demo against another revision
    python benchmarks/same_history.py --data-dir ../shared/data/chest_xray_224 --epochs 1   # the default recipe

The old script is `git show REV:train_cxr.py`, written to a temp folder and run from there (the
working tree's is copied there too when the check starts); both runs use `--device cpu
--num-threads 1` and the same seed, each in its own process: `--demo`, or with --data-dir the
default recipe on that folder. Compared exactly (no tolerance): every column of history.csv except
the wall-clock `seconds`; the calibration, threshold and guard lines of train.log; every number
and string of test_metrics.json; every cell of test_predictions.csv (paths made relative to the
run folder). Prints each difference; exit code 1 if there is any, 0 if none.
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_demo(script: Path, out: Path, epochs: int, data_dir: str) -> Path:
    mode = ["--data-dir", str(Path(data_dir).resolve())] if data_dir else ["--demo"]
    cmd = [sys.executable, str(script), *mode, "--device", "cpu", "--num-threads", "1",
           "--output-dir", str(out), "--run-name", "demo", *(["--epochs", str(epochs)] if epochs else [])]
    done = subprocess.run(cmd, cwd=script.parent, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{script} failed (exit {done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return out / "demo"


def flat(obj, prefix: str = "") -> dict:
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items() for k, v in flat(val, f"{prefix}{key}.").items()}
    if isinstance(obj, list):
        return {k: v for i, val in enumerate(obj) for k, v in flat(val, f"{prefix}{i}.").items()}
    return {prefix.rstrip("."): obj}


def read_rows(path: Path, run_dir: Path, drop: tuple = ()) -> dict:
    if not path.is_file():
        return {f"{path.name}": "(no such file)"}
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {f"{path.name} row {i} {k}": v.replace(str(run_dir), "RUN") for i, r in enumerate(rows)
            for k, v in r.items() if k not in drop}


def numbers(run_dir: Path) -> dict:
    metrics = run_dir / "test_metrics.json"
    fitted = [ln for ln in (run_dir / "train.log").read_text().splitlines()
              if ln.startswith(("calibration on validation", "threshold on validation", "out-of-distribution guard"))]
    return {**read_rows(run_dir / "history.csv", run_dir, drop=("seconds",)),
            **{f"train.log line {i}": ln for i, ln in enumerate(fitted)},
            **({f"test_metrics.json {k}": v for k, v in flat(json.loads(metrics.read_text())).items()}
               if metrics.is_file() else {"test_metrics.json": "(no such file)"}),
            **read_rows(run_dir / "test_predictions.csv", run_dir)}


def script_at(rev: str, path: Path) -> Path:
    """Write train_cxr.py as it is at git revision rev to path (benchmarks/step_ops.py uses it too)."""
    path.write_text(subprocess.run(["git", "show", f"{rev}:train_cxr.py"], cwd=ROOT, check=True,
                                   capture_output=True, text=True).stdout)
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rev", default="main", help="git revision of the old train_cxr.py (default: main)")
    p.add_argument("--epochs", type=int, default=3, help="epochs (0 = the run's own: 12 for the demo)")
    p.add_argument("--data-dir", default="", help="run the default recipe on this DATA_DIR instead of --demo")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        old, new = Path(tmp) / "old" / "train_cxr.py", Path(tmp) / "new" / "train_cxr.py"
        old.parent.mkdir()
        new.parent.mkdir()
        script_at(a.rev, old)
        new.write_text((ROOT / "train_cxr.py").read_text())
        before = numbers(run_demo(old, Path(tmp) / "runs_old", a.epochs, a.data_dir))
        after = numbers(run_demo(new, Path(tmp) / "runs_new", a.epochs, a.data_dir))
    diffs = [f"{k}: {before.get(k, '(missing)')} -> {after.get(k, '(missing)')}"
             for k in sorted(before.keys() | after.keys()) if before.get(k) != after.get(k)]
    if diffs:
        diffs.append(f"{len(diffs)} of {len(before | after)} values differ ({a.rev} vs the working tree)")
    print("\n".join(diffs) or f"same: {len(before)} numbers of history.csv, test_metrics.json and "
                            f"test_predictions.csv (and the fitted lines of train.log) are identical ({a.rev} vs the "
                            f"working tree, {'the default recipe on ' + a.data_dir if a.data_dir else 'the demo'}, "
                            f"{a.epochs or 'its own'} epochs)")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
