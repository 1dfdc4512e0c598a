"""The fast paths: reduced JPEG decode, batched augmentation, bf16 autocast.

CPU only, ~15 s in all, most of it the page-fault test (two fresh interpreters). No timing is
asserted here: benchmarks/speed.py measures speed.
"""
import contextlib
import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import train_cxr
from conftest import ROOT, load_benchmark


def xray_like(width: int, height: int, seed: int) -> np.ndarray:
    """A smooth grayscale film-like image: bright body, two dark lung fields, ribs, a little noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    u, v = xx / width, yy / height
    img = 170 + 40 * v - 30 * np.abs(u - 0.5)
    for cx in (0.32 + 0.03 * rng.standard_normal(), 0.68 + 0.03 * rng.standard_normal()):
        lung = ((u - cx) / 0.15) ** 2 + ((v - 0.48) / 0.30) ** 2 < 1
        img[lung] -= 90
    img += 18 * np.sin(v * 60 + rng.uniform(0, 6)) * (np.abs(u - 0.5) > 0.08)   # ribs
    img = cv2.GaussianBlur(img, (0, 0), 6)
    img += rng.normal(0, 3, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_jpeg(path: Path, img: np.ndarray, quality: int = 95) -> str:
    assert cv2.imwrite(str(path), img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    return str(path)


# ----------------------------------------------------------------------------------------------
# Reduced (draft) JPEG decode
# ----------------------------------------------------------------------------------------------
def test_draft_decode_matches_full_decode(tmp_path):
    size = train_cxr.Config().work_size
    path = write_jpeg(tmp_path / "big.jpeg", xray_like(1600, 1300, seed=3))
    with Image.open(path) as im:  # the draft path really is taken: DCT scaling to 1/8 (200 x 163)
        im.draft("L", (size, size))
        assert im.size == (200, 163)
    fast = train_cxr.decode_xray(path, size)
    full = cv2.resize(cv2.imread(path, cv2.IMREAD_GRAYSCALE), (size, size), interpolation=cv2.INTER_AREA)
    assert fast.shape == (size, size) and fast.dtype == np.uint8
    diff = np.abs(fast.astype(np.float64) - full)
    assert diff.mean() < 3.0, diff.mean()
    assert np.corrcoef(fast.ravel(), full.ravel())[0, 1] > 0.99
    arr, bad = train_cxr.decode_all([path], size, num_workers=0)
    assert bad == []
    np.testing.assert_array_equal(arr[0], fast)


def test_decode_uses_one_process_per_usable_core_by_default_with_the_same_result(synth_root, monkeypatch):
    # The default was 2 processes whatever the machine: a 16-core GPU machine decoded on 2 of them.
    assert train_cxr.NUM_WORKERS == -1 and train_cxr.Config().num_workers == -1
    monkeypatch.setattr(torch.multiprocessing, "get_start_method", lambda allow_none=False: "fork")  # Linux
    monkeypatch.setattr(train_cxr, "usable_cores", lambda: 16)
    assert [train_cxr.decode_workers(-1, n) for n in (5216, 500, 63)] == [16, 7, 0]  # >= 64 files each
    assert (train_cxr.decode_workers(2, 5216), train_cxr.decode_workers(0, 5216)) == (2, 0)
    monkeypatch.setattr(train_cxr, "usable_cores", lambda: 1)
    assert train_cxr.decode_workers(-1, 5216) == 0  # one core: in this process
    with monkeypatch.context() as m:  # macOS and Windows spawn workers, each importing torch again
        m.setattr(torch.multiprocessing, "get_start_method", lambda allow_none=False: "spawn")
        assert train_cxr.decode_workers(-1, 5216) == 2 and train_cxr.decode_workers(4, 5216) == 4
        m.setattr(torch.multiprocessing, "get_start_method", lambda allow_none=False: None)  # not fixed yet:
        m.setattr(torch.multiprocessing, "get_all_start_methods", lambda: ["spawn", "fork"])  # macOS's default
        assert train_cxr.decode_workers(-1, 5216) == 2
    # --help says so: it gave "one per usable core" alone, which macOS and Windows never get.
    text = " ".join(train_cxr.build_parser().format_help().split())
    assert "-1 = one per usable core (2 on macOS and Windows" in text and "one per 64 files at most" in text
    monkeypatch.setattr(train_cxr, "usable_cores", lambda: 2)
    paths = [p for p, _ in train_cxr.list_image_folder(synth_root / "train")[1]]  # 150 files: 2 workers
    assert train_cxr.decode_workers(-1, len(paths)) == 2
    arr, bad = train_cxr.decode_all(paths, 40, num_workers=-1)
    alone, bad_alone = train_cxr.decode_all(paths, 40, num_workers=0)
    assert bad == bad_alone == [] and arr.any()
    np.testing.assert_array_equal(arr, alone)
    with pytest.raises(train_cxr.CXRError, match="--num-workers -2 is invalid: it must be -1"):
        train_cxr.parse_config(["--num-workers", "-2"])


# ----------------------------------------------------------------------------------------------
# Batched augmentation and the evaluation view
# ----------------------------------------------------------------------------------------------
def small_cfg(**kw):
    return dataclasses.replace(train_cxr.Config(device="cpu", img_size=32), **kw)


def u8_batch(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.stack([xray_like(size, size, seed + i) for i in range(n)]))


def test_augment_batch_shape_determinism_and_randomness():
    cfg = small_cfg()
    imgs = u8_batch(6, cfg.work_size)
    norm = {"mode": "image"}
    a = train_cxr.augment_batch(imgs, cfg, norm, torch.Generator().manual_seed(7))
    b = train_cxr.augment_batch(imgs, cfg, norm, torch.Generator().manual_seed(7))
    c = train_cxr.augment_batch(imgs, cfg, norm, torch.Generator().manual_seed(8))
    assert a.shape == (6, 1, cfg.img_size, cfg.img_size) and a.dtype == torch.float32
    assert a.device.type == "cpu" and torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - c).abs().mean() > 0.05
    # per-image standardisation: every output image has mean ~0 and std ~1
    torch.testing.assert_close(a.mean(dim=(1, 2, 3)), torch.zeros(6), atol=1e-4, rtol=0)
    assert ((a.std(dim=(1, 2, 3)) - 1).abs() < 0.05).all()  # 1 up to the 1e-3 guard in the divisor
    # images of one batch get different transforms
    assert (a[0] - a[1]).abs().mean() > 0.05


def test_augment_batch_flip_is_a_mirror_image():
    """With the same random draws, aug_hflip only mirrors the images whose flip draw is < 0.5."""
    cfg_off = small_cfg(aug_hflip=False)
    cfg_on = small_cfg(aug_hflip=True)
    imgs = u8_batch(8, cfg_on.work_size, seed=10)
    norm = {"mode": "image"}
    on = train_cxr.augment_batch(imgs, cfg_on, norm, torch.Generator().manual_seed(3))
    off = train_cxr.augment_batch(imgs, cfg_off, norm, torch.Generator().manual_seed(3))
    flipped = torch.rand(8, 9, generator=torch.Generator().manual_seed(3))[:, 3] < 0.5
    assert 0 < int(flipped.sum()) < 8  # this seed exercises both cases
    for i in range(8):
        want = torch.flip(off[i], dims=[-1]) if flipped[i] else off[i]
        torch.testing.assert_close(on[i], want, atol=2e-3, rtol=0)
        if flipped[i]:
            assert (on[i] - off[i]).abs().mean() > 0.05


def test_blank_outside_lungs_leaves_only_the_lung_box_and_is_off_by_default():
    imgs = u8_batch(8, small_cfg().work_size, seed=20)
    norm = {"mode": "image"}
    outside = torch.from_numpy(~train_cxr.lung_box_mask(32, 32))
    assert (~outside).nonzero().amin(0).tolist() == [3, 3] and (~outside).nonzero().amax(0).tolist() == [28, 28]
    gen = torch.Generator().manual_seed(5)
    off = train_cxr.augment_batch(imgs, small_cfg(), norm, gen)
    assert train_cxr.AUG_BLANK_OUTSIDE_LUNGS == 0.0
    # Off: no extra random draw, so default runs keep their augmentation (and their numbers).
    ref = torch.Generator().manual_seed(5)
    torch.rand(8, 9, generator=ref)
    assert torch.equal(gen.get_state(), ref.get_state())
    blank = train_cxr.augment_batch(imgs, small_cfg(aug_blank_outside_lungs=1.0), norm,
                                    torch.Generator().manual_seed(5))
    for i in range(8):
        assert blank[i, 0][outside].std() < 1e-5  # one gray everywhere outside the box
        assert off[i, 0][outside].std() > 0.1
    # Same draws otherwise: inside the box the pictures agree up to the per-image standardisation.
    corr = [np.corrcoef(blank[i, 0][~outside].numpy(), off[i, 0][~outside].numpy())[0, 1] for i in range(8)]
    assert min(corr) > 0.99
    half = train_cxr.augment_batch(imgs, small_cfg(aug_blank_outside_lungs=0.5), norm,
                                   torch.Generator().manual_seed(5))
    n_blank = sum(bool(half[i, 0][outside].std() < 1e-5) for i in range(8))
    assert 0 < n_blank < 8


def test_identity_augmentation_is_the_evaluation_input():
    """Every augmentation at its off value (crops keeping 100% of the area, work size = input size):
    training sees exactly what evaluation sees. The aspect draw used to squash such a crop (its clamp
    to the image cut 0-13% of the area: --aug-scale-min 0.9 kept down to 82%)."""
    off = dict(aug_scale_min=1.0, aug_rotate_deg=0.0, aug_shift=0.0, aug_hflip=False, tta=False,
               aug_brightness=0.0, aug_contrast=0.0, aug_gamma=0.0)
    cfg = small_cfg(work_scale=1.0, **off)
    imgs = u8_batch(8, cfg.work_size, seed=30)
    for norm in ({"mode": "image"}, {"mode": "dataset", "mean": 0.4, "std": 0.2}):
        x = train_cxr.augment_batch(imgs, cfg, norm, torch.Generator().manual_seed(1))
        torch.testing.assert_close(x, train_cxr.eval_batch(imgs, cfg.img_size, norm, "cpu"), atol=1e-4, rtol=0)


def test_eval_batch_is_the_normalised_center_crop():
    cfg = small_cfg()
    imgs = u8_batch(3, cfg.work_size)
    x = train_cxr.eval_batch(imgs, cfg.img_size, {"mode": "image"}, torch.device("cpu"))
    assert x.shape == (3, 1, cfg.img_size, cfg.img_size) and x.dtype == torch.float32
    norm = {"mode": "dataset", "mean": 0.4, "std": 0.2}
    y = train_cxr.eval_batch(imgs, cfg.img_size, norm, torch.device("cpu"))
    o = (cfg.work_size - cfg.img_size) // 2
    want = (imgs[:, None, o:o + cfg.img_size, o:o + cfg.img_size].float() / 255 - 0.4) / 0.2
    torch.testing.assert_close(y, want)


# ----------------------------------------------------------------------------------------------
# bf16 autocast + channels_last on the CPU
# ----------------------------------------------------------------------------------------------
def varied_batch(n: int, size: int, seed: int) -> torch.Tensor:
    """Very different images (blurred noise at several scales), so that an untrained model's outputs vary."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        noise = rng.normal(0, 1, (size, size)).astype(np.float32)
        img = cv2.GaussianBlur(noise, (0, 0), 1 + i % 5)
        img = (img - img.min()) / (np.ptp(img) + 1e-6) * rng.uniform(60, 255)
        out.append(img.astype(np.uint8))
    return torch.from_numpy(np.stack(out))


def test_bf16_channels_last_forward_matches_fp32():
    torch.manual_seed(0)
    img = 64
    model = train_cxr.CustomCNN(num_classes=2, in_channels=1, img_size=img, channels=(8, 16, 32, 64),
                                fc_hidden=32).eval()
    imgs = varied_batch(16, img + 8, seed=20)
    norm = {"mode": "image"}
    fp32 = train_cxr.Runtime(torch.device("cpu"), None)
    bf16 = train_cxr.Runtime(torch.device("cpu"), torch.bfloat16)
    x = train_cxr.eval_batch(imgs, img, norm, fp32.device)
    with torch.no_grad():  # realistic batch-norm statistics, and logits spread enough that errors show
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = None
        model.train()(x)
        model.eval().head[-1].weight.mul_(8)
    with torch.no_grad():
        p32 = model(x).softmax(1)
        cl_model = train_cxr.CustomCNN(num_classes=2, in_channels=1, img_size=img, channels=(8, 16, 32, 64),
                                       fc_hidden=32)
        cl_model.load_state_dict(model.state_dict())
        cl_model = cl_model.eval().to(memory_format=torch.channels_last)
        with bf16.autocast():
            logits = cl_model(x.contiguous(memory_format=torch.channels_last))
        assert logits.dtype == torch.bfloat16  # the reduced-precision path really ran
        p16 = logits.float().softmax(1)
    assert p32[:, 1].std() > 0.05, "probabilities too uniform for the comparison to mean anything"
    assert (p16 - p32).abs().max() < 0.05
    # the same through the tool's prediction function
    q32 = train_cxr.predict_probs(model, imgs, img, norm, fp32, tta=True)
    q16 = train_cxr.predict_probs(cl_model, imgs, img, norm, bf16, tta=True)
    np.testing.assert_allclose(q32, p32.numpy() / 2 + model(torch.flip(x, dims=[3])).softmax(1).detach().numpy() / 2,
                               atol=1e-5)
    assert np.abs(q16 - q32).max() < 0.05
    assert np.allclose(q16.sum(1), 1, atol=1e-3)


# ----------------------------------------------------------------------------------------------
# The benchmark's data builder (benchmarks/speed.py)
# ----------------------------------------------------------------------------------------------
def test_benchmark_builds_kermany_sized_grayscale_copies(tmp_path):
    speed = load_benchmark("speed")
    src = tmp_path / "src"
    for c, n in (("NORMAL", 3), ("PNEUMONIA", 7)):
        (src / c).mkdir(parents=True)
        for i in range(n):
            cv2.imwrite(str(src / c / f"{c}_{i}.jpeg"), cv2.cvtColor(xray_like(64, 64, i), cv2.COLOR_GRAY2BGR))
    chosen = speed.select_sources(src, 4)
    assert len(chosen) == 4 and {c for c, _ in chosen} == {"NORMAL", "PNEUMONIA"}
    assert chosen == speed.select_sources(src, 4)  # deterministic
    out = tmp_path / "full"
    samples, _, reused = speed.build_copy(src, out, limit=4, seed=1, procs=1)
    assert not reused and len(samples) == 4
    for path, label in samples:
        assert Path(path).parent.name == ["NORMAL", "PNEUMONIA"][label]
        with Image.open(path) as im:
            w, h = im.size
            assert im.format == "JPEG" and im.mode == "L"
        assert 1400 <= w <= 2000 and 0.75 * w - 1 <= h <= 0.9 * w + 1
    assert len({Image.open(p).size for p, _ in samples}) > 1  # sizes vary
    again, seconds, reused = speed.build_copy(src, out, limit=4, seed=1, procs=1)
    assert reused and seconds == 0.0 and again == samples
    # A build stopped half-way is the benchmark's own: built again, not refused.
    (out / speed.MANIFEST).write_text(json.dumps({"complete": False}))
    assert speed.build_copy(src, out, limit=4, seed=1, procs=1)[0] == samples
    # A folder it did not build (--keep-dir pointed at the user's own data) is refused: its images of the
    # same names were replaced by upscaled copies of the 224 px ones.
    mine = tmp_path / "my_data"
    shutil.copytree(src, mine)
    before = {p: p.read_bytes() for p in mine.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit, match="holds files but no speed_manifest.json"):
        speed.build_copy(src, mine, limit=4, seed=1, procs=1)
    assert {p: p.read_bytes() for p in mine.rglob("*") if p.is_file()} == before


def test_benchmark_help_says_what_it_measures(capsys):
    # --help showed only the docstring's first line; and the docstring called the original's end-to-end
    # rate min(pipeline, training), while the speed-up divides by its loop as measured (--orig-batches).
    with pytest.raises(SystemExit):
        load_benchmark("speed").parse_args(["--help"])
    out = capsys.readouterr().out
    assert "What is measured" in out and "end_to_end_speedup divides by that" in out and "(default: 2)" in out


def test_benchmark_keeps_freed_memory_from_its_first_measurement(monkeypatch, tmp_path):
    # docs/results.md's speed table was measured while every run kept freed memory in the process; when
    # runs began to keep it only around their epochs, speed.py silently measured with glibc's defaults.
    speed, events = load_benchmark("speed"), []

    @contextlib.contextmanager
    def recorded(on=True):
        events.append("on")
        try:
            yield True
        finally:
            events.append("off")

    def build(*a, **k):  # the first measurement: stop the benchmark here
        events.append("build")
        raise KeyboardInterrupt
    monkeypatch.setattr(train_cxr, "keep_freed_memory", recorded)
    monkeypatch.setattr(speed, "build_copy", build)
    with pytest.raises(KeyboardInterrupt):
        speed.main(["--source", str(tmp_path)])
    train_cxr.setup_console_logging()  # speed.py silenced the tool's log: back to what other tests expect
    assert events == ["on", "build", "off"]



STEPS = """
import resource, sys, torch
sys.path.insert(0, {root!r})
import train_cxr
ctx = train_cxr.keep_freed_memory({tuned})
took = ctx.__enter__()
torch.manual_seed(0)
torch.set_num_threads(1)
# block 1's output is 36 x 16 x 128 x 128 floats (38 MB): above the largest mmap threshold glibc
# takes (32 MB), like the 67 MB of the default run; the narrow later blocks keep the steps quick
model = train_cxr.CustomCNN(img_size=128, channels=(16, 8, 8, 8))
opt = torch.optim.AdamW(model.parameters())
x, y = torch.randn(36, 1, 128, 128), torch.randint(0, 2, (36,))
def steps(n):
    for _ in range(n):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
steps(3)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
steps(6)
during = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
def released_mb(make):  # how many MB of what make() allocates go back to the OS when it is freed
    rss = lambda: int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() / 2**20
    held = make()
    full = rss()
    del held
    return round(full - rss())
tensor = lambda: torch.ones(50_000_000)  # 200 MB in one allocation
# 1 GB of 100 KB blocks, which glibc serves from the heap: more than the ~0.5 GB that the steps and the
# tensor left free inside the heap; those holes stay with the process, only what grows past them can be
# trimmed from the top
blocks = lambda: [bytes(100_000) for _ in range(10_000)]
kept = released_mb(tensor)
ctx.__exit__(None, None, None)  # the epoch loop is over: glibc's mmap and heap trimming are back
print(took, during, kept, released_mb(tensor), released_mb(blocks))
"""


def _step_faults(*tuned: bool) -> list:
    """(took, page faults of six steps, MB of a freed 200 MB tensor returned to the OS with the setting
    and after it, and of 1 GB of freed heap blocks after it) per setting, each in its own interpreter,
    run side by side."""
    procs = [subprocess.Popen([sys.executable, "-c", STEPS.format(root=str(ROOT), tuned=t)],
                              stdout=subprocess.PIPE, text=True) for t in tuned]
    outs = [p.communicate(timeout=120)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs), "a step subprocess failed (its error is printed above)"
    return [(out[0], *map(int, out[1:])) for out in outs]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")
def test_keep_freed_memory_stops_the_page_faults_of_every_step():
    # Fresh interpreters: the allocator setting is process-wide and cannot be undone. Six real
    # training steps page-fault 250,000-370,000 times with glibc's defaults (freed activations go back to
    # the OS and are faulted in again) and 0-8,000 times with the setting (measured).
    (off, default, _, _, _), (took, tuned, kept, after, heap_after) = _step_faults(False, True)
    assert off == "False"  # keep_freed_memory(False) leaves the allocator alone
    if took != "True":
        pytest.skip("this libc does not take mallopt (not glibc)")
    assert default > 5_000, f"six steps did not page-fault without the setting ({default}): nothing to test"
    assert tuned < default / 10, f"{tuned} page faults with keep_freed_memory(), {default} without"
    # Inside, freed memory stays in the process; on exit glibc's mmap is back and a freed large tensor
    # goes back to the OS (the guard's passes after the epoch loop then keep the run's peak ~2 GB)
    assert kept < 50, f"{kept} MB of a freed 200 MB tensor went back to the OS inside keep_freed_memory()"
    assert after > 150, f"only {after} MB of a freed 200 MB tensor went back to the OS after keep_freed_memory()"
    # and the heap is trimmed again (it was left trimming only above 1 GB)
    assert heap_after > 200, f"only {heap_after} MB of 1 GB of freed heap blocks went back to the OS after it"


def test_fp32_channels_last_gives_the_same_probabilities_and_gradients():
    # NHWC is only a memory layout: the CPU fp32 path uses it for speed and must not change results.
    torch.manual_seed(1)
    img = 64
    make = lambda: train_cxr.CustomCNN(img_size=img, channels=(8, 16, 32, 64), fc_hidden=32)
    model = make()
    imgs = varied_batch(12, img + 8, seed=3)
    norm = {"mode": "image"}
    nchw = train_cxr.Runtime(torch.device("cpu"), None, channels_last=False)
    nhwc = train_cxr.Runtime(torch.device("cpu"), None)
    assert nhwc.channels_last  # the default on every device
    np.testing.assert_allclose(train_cxr.predict_probs(model, imgs, img, norm, nhwc, tta=True),
                               train_cxr.predict_probs(model, imgs, img, norm, nchw, tta=True), atol=1e-5)
    cl = make()
    cl.load_state_dict(model.state_dict())
    cl = cl.to(memory_format=torch.channels_last)
    x = train_cxr.eval_batch(imgs, img, norm, torch.device("cpu"))
    for m, inp in ((model, x), (cl, x.contiguous(memory_format=torch.channels_last))):
        torch.manual_seed(2)  # the same dropout masks
        torch.nn.functional.cross_entropy(m.train()(inp), torch.arange(12) % 2).backward()
    for a, b in zip(model.parameters(), cl.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-3)


def test_a_training_step_launches_few_kernels_on_the_device():
    # A GPU step of this small network costs mostly kernel launches (issue 15). The augmentation's
    # parameters are computed on the host (73 device kernels a step before) and the EMA is three
    # multi-tensor calls (28 before); benchmarks/step_ops.py counts on meta tensors, no GPU needed.
    counts, whole = load_benchmark("step_ops").step_counts(train_cxr)
    kernels = {part: n for (part, kind), n in counts.items() if kind == "kernels"}
    assert kernels["augment"] <= 20 and kernels["EMA"] == 3, kernels
    assert kernels["forward and loss"] > 20 and kernels["backward"] > 20  # the count sees the network
    assert whole == sum(counts.values())  # the replay is train_step, operation for operation


def test_cpu_paths_refuses_a_missing_run_folder_before_its_step_table(tmp_path, monkeypatch, capsys):
    # `--run DATA` with a mistyped DATA ran the two-minute step table first, then died in a traceback.
    bench = load_benchmark("cpu_paths")
    monkeypatch.setattr(bench, "step_rate", lambda *a, **k: pytest.fail("the step table ran first"))
    monkeypatch.setattr(sys, "argv", ["cpu_paths.py", "--run", str(tmp_path / "nowhere"), "--vs=--img-size 128"])
    with pytest.raises(SystemExit) as e:
        bench.main()
    assert e.value.code == 2 and f"--run {tmp_path / 'nowhere'}" in capsys.readouterr().err
