"""Does the network read pneumonia from the lungs? Its AUC with only the lung box, and without it.

    python benchmarks/lung_focus.py runs/RUN/best_model.pt FOLDER     # FOLDER/<CLASS>/*, labelled
    python benchmarks/lung_focus.py /tmp/cv/fold0/run /tmp/cv/fold0/data/test   # a quality.py fold

Grad-CAM shows where one map points; this asks the network itself. Every image of FOLDER is
scored three times: as it is; with everything outside LUNG_BOX (where the lungs sit on a PA film,
in the network's input after the centre crop) replaced by the image's mean gray; and with the
lung box replaced instead. A network that read only the lungs would score about the same AUC on
the first two and about 0.5 on the third. Printed per version: AUC of the positive class, and the
share of images the out-of-distribution guard flags (a gray rectangle is not a chest X-ray, so
the guard should flag much of the last two: their AUCs measure the network, not a use case).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_cxr as T  # noqa: E402


def mask_box(images: np.ndarray, img_size: int, box=T.LUNG_BOX, keep_inside: bool = True) -> np.ndarray:
    """Copies of N x S x S uint8 images with the part outside (keep_inside) or inside the box set to
    each image's mean gray. box: x0, x1, y0, y1 as fractions of the centre crop of img_size."""
    n, size = images.shape[0], images.shape[-1]
    o = (size - img_size) // 2
    gray = images.reshape(n, -1).mean(1).round().astype(np.uint8)[:, None, None]
    inside = np.zeros(images.shape[1:], bool)
    inside[o:o + img_size, o:o + img_size] = T.lung_box_mask(img_size, img_size, box)  # the box of the centre crop
    return np.where(inside if not keep_inside else ~inside, gray, images)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a best_model.pt, or the run folder holding it")
    p.add_argument("folder", help="labelled images: one sub-folder per class, the checkpoint's classes")
    p.add_argument("--num-threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    a = p.parse_args(argv)
    if a.num_threads:
        torch.set_num_threads(a.num_threads)
    ckpt = T.load_checkpoint(a.checkpoint)
    model = T.model_from_checkpoint(ckpt).eval()
    classes, samples = T.list_image_folder(Path(a.folder))
    if classes != ckpt["class_names"]:
        raise SystemExit(f"{a.folder}: classes {classes}, the checkpoint's are {ckpt['class_names']}")
    images, bad = T.decode_all([s for s, _ in samples], ckpt["work_size"])
    unreadable = {path for path, _ in bad}
    ok = [i for i, (path, _) in enumerate(samples) if path not in unreadable]
    images, labels = images[ok], np.array([samples[i][1] for i in ok])
    rt = T.Runtime(device=torch.device("cpu"), amp_dtype=None)
    pos, img = ckpt["positive_class"], ckpt["img_size"]
    print(f"{a.checkpoint}: {len(labels)} images of {a.folder}; lung box {T.LUNG_BOX} of the {img} px input")
    aucs = {}
    for name, x in [("as they are", images), ("only the lung box", mask_box(images, img, keep_inside=True)),
                    ("lung box blanked", mask_box(images, img, keep_inside=False))]:
        res = T.score_images(model, ckpt, torch.from_numpy(np.ascontiguousarray(x)), rt)
        aucs[name] = roc_auc_score(labels == pos, res["probs"][:, pos])
        print(f"{name:<18} AUC {aucs[name]:.4f}   flagged by the guard {T.share_flagged(res['in_distribution']):6.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
