"""Does a refactor of train_cxr.py change any number? Runs the demo with an old version and this one.

    python benchmarks/same_history.py                 # against 9c07a40 (before issue 13's slimming)
    python benchmarks/same_history.py --rev main --epochs 12

The old script is `git show REV:train_cxr.py`, written to a temp folder and run from there; both
runs use `--demo --device cpu --num-threads 1` and the same seed, each in its own process. Compared
exactly (no tolerance): every column of history.csv except the wall-clock `seconds`, every number
and string of test_metrics.json, and every cell of test_predictions.csv (paths made relative to the
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


def run_demo(script: Path, out: Path, epochs: int) -> Path:
    cmd = [sys.executable, str(script), "--demo", "--device", "cpu", "--num-threads", "1",
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
    return {**read_rows(run_dir / "history.csv", run_dir, drop=("seconds",)),
            **{f"test_metrics.json {k}": v for k, v in
               flat(json.loads((run_dir / "test_metrics.json").read_text())).items()},
            **read_rows(run_dir / "test_predictions.csv", run_dir)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rev", default="9c07a40", help="git revision of the old train_cxr.py")
    p.add_argument("--epochs", type=int, default=3, help="demo epochs (0 = the demo's own 12)")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "old" / "train_cxr.py"
        old.parent.mkdir()
        old.write_text(subprocess.run(["git", "show", f"{a.rev}:train_cxr.py"], cwd=ROOT, check=True,
                                      capture_output=True, text=True).stdout)
        before = numbers(run_demo(old, Path(tmp) / "runs_old", a.epochs))
        after = numbers(run_demo(ROOT / "train_cxr.py", Path(tmp) / "runs_new", a.epochs))
    diffs = [f"{k}: {before.get(k, '(missing)')} -> {after.get(k, '(missing)')}"
             for k in sorted(before.keys() | after.keys()) if before.get(k) != after.get(k)]
    if diffs:
        diffs.append(f"{len(diffs)} of {len(before | after)} values differ ({a.rev} vs the working tree)")
    print("\n".join(diffs) or f"same: {len(before)} numbers of history.csv, test_metrics.json and "
                            f"test_predictions.csv are identical ({a.rev} vs the working tree, "
                            f"demo with {a.epochs or 'its'} epochs)")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
