"""Does DICOM input train like PNG input? The demo data as PNGs, and the same pictures as DICOMs.

    python benchmarks/dicom_auc.py                 # ~3 x the demo's time; prints three validation AUCs

The demo's synthetic data set is written once as PNGs, then every PNG is converted to a 12-bit
MONOCHROME1 DICOM (stored value = (255 - pixel) * 16) with the patient id as PatientID, twice:
  dicom_window      with the WindowCenter/WindowWidth that shows it as the PNG (what a converter
                    writes): train_cxr.py must decode the PNG's pixels exactly, so the AUC must match;
  dicom_percentile  without a window: train_cxr.py falls back to its DICOM_PERCENTILES window, a
                    contrast stretch, so the pixels differ from the PNG's and so may the AUC.
All three folders are trained with the demo's settings and seed on the CPU.
write_dicom() is also what the tests build their DICOM files with.
"""
from __future__ import annotations

import argparse
import csv
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_cxr  # noqa: E402


def write_dicom(path: Path, pixels: np.ndarray | None, bits_stored: int = 8, photometric: str = "MONOCHROME2",
                modality: str = "DX", transfer_syntax=ExplicitVRLittleEndian, encapsulated: bytes | None = None,
                **tags) -> Path:
    """A minimal DX DICOM file of pixels (H x W, or frames x H x W; uint8 or uint16), or of
    already-encoded bytes (encapsulated, e.g. a JPEG) under transfer_syntax; extra tags by keyword."""
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.file_meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.Modality = modality
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, photometric, 0
    ds.BitsAllocated = 8 if bits_stored <= 8 else 16
    ds.BitsStored, ds.HighBit = bits_stored, bits_stored - 1
    if pixels is not None:
        ds.Rows, ds.Columns = pixels.shape[-2:]
        if pixels.ndim == 3:
            ds.NumberOfFrames = len(pixels)
        if encapsulated is None:
            dtype = np.uint8 if ds.BitsAllocated == 8 else np.dtype("<u2")
            ds.PixelData = np.ascontiguousarray(pixels, dtype=dtype).tobytes()
        else:
            ds.PixelData = pydicom.encaps.encapsulate([encapsulated])
            ds["PixelData"].VR = "OB"
    for k, v in tags.items():
        setattr(ds, k, v)
    ds.save_as(path, enforce_file_format=True)
    return Path(path)


def convert_folder(src: Path, dst: Path, window: bool) -> int:
    """Every PNG under src as a 12-bit MONOCHROME1 DICOM at the same place under dst."""
    # Stored values 0-4080; this linear window maps them to 0-1 exactly (PS3.3 C.11.2.1.2.1).
    tags = dict(WindowCenter=2040.5, WindowWidth=4081) if window else {}
    n = 0
    for png in sorted(src.rglob("*.png")):
        img = cv2.imread(str(png), cv2.IMREAD_GRAYSCALE)
        out = dst / png.relative_to(src).with_suffix(".dcm")
        out.parent.mkdir(parents=True, exist_ok=True)
        write_dicom(out, (255 - img.astype(np.uint16)) * 16, bits_stored=12, photometric="MONOCHROME1",
                    PatientID=train_cxr.patient_id(str(png)), **tags)
        n += 1
    return n


def best_val_auc(run_dir: Path) -> float:
    with open(run_dir / "history.csv", newline="") as f:
        return max(float(r["val_auc"]) for r in csv.DictReader(f))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-threads", type=int, default=1, help="torch CPU threads of each run (default: 1)")
    p.add_argument("--keep", help="keep the data and runs in this folder")
    p.add_argument("--seed", type=int, default=train_cxr.SEED, help="of the synthetic data and of the runs")
    args = p.parse_args()
    work = Path(args.keep or tempfile.mkdtemp(prefix="dicom_auc_"))
    cfg = train_cxr.Config(**train_cxr.DEMO_OVERRIDES, seed=args.seed)
    roots = {name: work / name for name in ("png", "dicom_window", "dicom_percentile")}
    train_cxr.write_synthetic_dataset(roots["png"], *train_cxr.DEMO_COUNTS, size=cfg.work_size, seed=cfg.seed)
    for name in ("dicom_window", "dicom_percentile"):
        n = convert_folder(roots["png"], roots[name], window=name == "dicom_window")
        print(f"{name}: {n} PNGs converted to 12-bit MONOCHROME1 DICOMs in {roots[name]}")
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in train_cxr.DEMO_OVERRIDES.items()]
    aucs = {}
    for name, root in roots.items():
        rc = train_cxr.main([*flags, "--data-dir", str(root), "--output-dir", str(work / "runs"), "--run-name", name,
                             "--device", "cpu", "--num-threads", str(args.num_threads), "--seed", str(args.seed)])
        if rc != 0:
            raise SystemExit(f"the {name} run failed with exit code {rc}")
        aucs[name] = best_val_auc(work / "runs" / name)
    for name, auc in aucs.items():
        diff = auc - aucs["png"]
        print(f"best validation AUC, {name:<16} {auc:.4f}  (vs png {diff:+.4f}, within 0.005: {abs(diff) <= 0.005})")

if __name__ == "__main__":
    main()
