"""The default recipe's pieces are wired: EMA weights are what is saved, TTA is what is evaluated."""
import copy

import numpy as np
import pytest
import torch

import train_cxr as T
from conftest import TINY, run


def test_default_recipe_builds_its_pieces():
    cfg = T.Config(device="cpu")
    rt = T.Runtime(torch.device("cpu"), None)
    labels = np.array([0] * 10 + [1] * 30)
    st = T.build_state(cfg, rt, ["NORMAL", "PNEUMONIA"], labels, {"mode": cfg.normalize}, steps=10)
    assert (st.ema is not None) == (cfg.ema_decay > 0)
    if st.ema is not None:
        assert st.eval_model is st.ema.module and st.eval_model is not st.model
    assert st.criterion.label_smoothing == cfg.label_smoothing
    assert torch.allclose(st.criterion.weight, T.class_weights(labels, 2))
    decays = sorted(g["weight_decay"] for g in st.optimizer.param_groups)
    assert decays == [0.0, cfg.weight_decay]  # no decay on biases and batch-norm parameters


def test_ema_update_is_one_lerp_per_parameter_and_float_buffer_and_copies_the_batch_counts():
    # EMA.update uses torch's multi-tensor ops (fewer kernels on a GPU): the same numbers, bit for bit, as
    # a lerp_ of each parameter and floating-point buffer and a copy of each integer one (the loop it replaced).
    model = T.CustomCNN(img_size=32, channels=(4, 4, 8, 8), fc_hidden=8).to(memory_format=torch.channels_last)
    ema = T.EMA(model, decay=0.9)
    ema.updates = 10**6  # warmed up: d = decay
    reference = copy.deepcopy(ema.module)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.add_(torch.rand(t.shape, generator=gen).to(t.dtype) if t.is_floating_point() else 7)
        ema.update(model)
        for e, p in zip(reference.parameters(), model.parameters()):
            e.lerp_(p, 0.1)
        for e, b in zip(reference.buffers(), model.buffers()):
            e.lerp_(b, 0.1) if e.is_floating_point() else e.copy_(b)
    got, want = ema.module.state_dict(), reference.state_dict()
    assert list(got) == list(want) and any(k.endswith("num_batches_tracked") for k in got)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert not torch.equal(got["blocks.0.conv.weight"], model.state_dict()["blocks.0.conv.weight"])  # lags


def test_ema_tracks_and_lags_the_trained_weights():
    model = T.CustomCNN(img_size=32, channels=(4, 4, 8, 8), fc_hidden=8)
    ema = T.EMA(model, decay=0.9)
    before = [p.clone() for p in ema.module.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    for _ in range(3):
        ema.update(model)
    for b, e, p in zip(before, ema.module.parameters(), model.parameters()):
        assert torch.all(e > b) and torch.all(e < p)  # moved towards the model, not onto it
    # How far: update n keeps d = min(decay, (1 + n) / (10 + n)) of the gap, so the 3 updates leave
    # 2/11 * 3/12 * 4/13 of it; warmed up, one update closes 1 - decay. (Between the two, as checked
    # above, is all a decay used the wrong way round would also be.)
    for b, e in zip(before, ema.module.parameters()):
        torch.testing.assert_close(e - b, torch.full_like(b, 1 - 2 / 11 * 3 / 12 * 4 / 13))
    ema.updates = 10**9
    start = [e.clone() for e in ema.module.parameters()]
    ema.update(model)
    for s, e, p in zip(start, ema.module.parameters(), model.parameters()):
        torch.testing.assert_close(e - s, 0.1 * (p - s))


def test_saved_best_model_holds_the_ema_weights(synth_root, tmp_path):
    # One epoch: best_model.pt and last.pt are then both of epoch 1, whatever the AUC does.
    args = ["--data-dir", synth_root, "--output-dir", tmp_path, "--run-name", "r", "--epochs", "1",
            "--ema-decay", "0.9", *TINY]
    assert run(args) == 0
    best = T.load_checkpoint(tmp_path / "r" / "best_model.pt")
    last = T.load_checkpoint(tmp_path / "r" / "last.pt")
    assert best["epoch"] == last["epoch"] == 1
    ema_sd = last["ema"]["module"]
    assert best["model"].keys() == ema_sd.keys()
    for k, v in best["model"].items():
        assert torch.equal(v, ema_sd[k]), k
    # The EMA copy is not the trained copy.
    diffs = [not torch.equal(last["model"][k], last["train_model"][k])
             for k in last["model"] if last["model"][k].is_floating_point()]
    assert any(diffs)


def test_tta_averages_the_mirror_image():
    torch.manual_seed(0)
    model = T.CustomCNN(img_size=32, channels=(4, 4, 8, 8), fc_hidden=8).eval()
    images = torch.randint(0, 255, (6, 36, 36), dtype=torch.uint8)
    rt = T.Runtime(torch.device("cpu"), None)
    norm = {"mode": "image"}
    plain = T.predict_probs(model, images, 32, norm, rt, tta=False)
    tta = T.predict_probs(model, images, 32, norm, rt, tta=True)
    x = T.eval_batch(images, 32, norm, "cpu")
    with torch.no_grad():
        mirrored = model(torch.flip(x, dims=[3])).softmax(1).numpy()
    np.testing.assert_allclose(tta, (plain + mirrored) / 2, atol=1e-6)
    assert not np.allclose(tta, plain)


@pytest.mark.parametrize("flag,want", [("--tta", True), ("--no-tta", False)])
def test_test_report_uses_tta_when_configured(synth_root, tmp_path, monkeypatch, flag, want):
    seen = []
    real = T.predict_probs

    def spy(model, images, img_size, norm, rt, tta, *a, **k):
        seen.append((k.get("desc", ""), tta))
        return real(model, images, img_size, norm, rt, tta, *a, **k)
    monkeypatch.setattr(T, "predict_probs", spy)
    args = ["--data-dir", synth_root, "--output-dir", tmp_path, "--run-name", "r", "--epochs", "1", flag, *TINY]
    assert run(args) == 0
    # Validation metrics, the calibration and threshold, the test report and the per-epoch Grad-CAM
    # captions (no desc) all follow the flag: an overlay's label is the one validation counted (its
    # map explains that class on the unmirrored image, as the test gallery's and --predict's do).
    scored = [tta for desc, tta in seen if desc in ("val", "calibrate", "test")]
    assert len(scored) >= 3 and all(t is want for t in scored)
    assert ("test", want) in seen
    captions = [tta for desc, tta in seen if not desc]
    assert captions and all(t is want for t in captions)
