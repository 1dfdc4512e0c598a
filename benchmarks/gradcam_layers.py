"""Which layer should Grad-CAM explain? Empty maps and lung focus per layer of the last block.

    python benchmarks/gradcam_layers.py runs/RUN/best_model.pt FOLDER   # FOLDER/<CLASS>/images

For each candidate layer of the last conv block (conv output, batch norm, ReLU, the whole block
after pooling) it computes Grad-CAM for every image in FOLDER, for the label the checkpoint's
threshold reports, and prints the share of all-zero maps per predicted class and the mean share
of heat inside LUNG_BOX. An empty map explains nothing: that share should be near 0.
Note: the ReLU is in place, so the "bn" hook sees the rectified values too (same maps as "relu").
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_cxr  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a best_model.pt written by train_cxr.py")
    p.add_argument("folder", help="a folder with one sub-folder per class")
    p.add_argument("--batch", type=int, default=128)
    a = p.parse_args(argv)
    ckpt = train_cxr.load_checkpoint(a.checkpoint)
    model = train_cxr.model_from_checkpoint(ckpt).eval()
    classes, samples = train_cxr.list_image_folder(Path(a.folder))
    if classes != ckpt["class_names"]:
        raise SystemExit(f"error: {a.folder} has classes {classes}, the checkpoint {ckpt['class_names']}")
    arr, bad = train_cxr.decode_all([s for s, _ in samples], ckpt["work_size"], 2)
    images = torch.from_numpy(arr)
    rt = train_cxr.Runtime(torch.device("cpu"), None)
    norm, size = ckpt["normalization"], ckpt["img_size"]
    probs = train_cxr.predict_probs(model, images, size, norm, rt, tta=False)
    preds = train_cxr.predict_labels(probs, ckpt["positive_class"], ckpt.get("threshold"))
    print(f"{len(images)} images ({len(bad)} unreadable), threshold {ckpt.get('threshold')}")
    last = model.blocks[-1]
    for name, layer in (("conv", last.conv), ("bn", last.bn), ("relu", last.relu), ("block", last)):
        maps = train_cxr.gradcam_maps(model, images, preds, ckpt, rt, layer=layer, batch_size=a.batch)
        empty = maps.reshape(len(maps), -1).max(1) <= 0
        per_class = " ".join(f"{c}-pred {empty[preds == k].mean():.2f}" if (preds == k).any() else f"{c}-pred -"
                             for k, c in enumerate(classes))
        focus = train_cxr.lung_focus(maps)
        print(f"{name:6s} empty maps: {per_class} | heat in lung box {focus['mean_share_in_box']:.3f} "
              f"(uniform {focus['uniform_share']:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
