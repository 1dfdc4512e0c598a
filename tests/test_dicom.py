"""DICOM input: every file is built here with pydicom from a synthetic X-ray (no downloaded files).

Each decodable case must give the picture of its source PNG: exactly for lossless files, within
JPEG tolerance for JPEG Baseline, after inversion (MONOCHROME1) and windowing.
"""
import dataclasses
import json
import shutil
import warnings

import cv2
import numpy as np
import pydicom
import pydicom.data
import pytest
from PIL import Image

import train_cxr
from conftest import TINY, load_benchmark, read_csv, run

write_dicom = load_benchmark("dicom_auc").write_dicom
SIZE = 64
FAST = [*TINY, "--device", "cpu", "--num-threads", "1"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """(PNG path, its pixels) of one synthetic PNEUMONIA X-ray."""
    img, _ = train_cxr.synth_xray(np.random.default_rng(3), SIZE, True)
    png = tmp_path_factory.mktemp("src") / "person1_bacteria_1.png"
    assert cv2.imwrite(str(png), img)
    assert np.array_equal(train_cxr.decode_xray(str(png), SIZE), img)
    return png, img


def percentile_window(img: np.ndarray) -> np.ndarray:
    """What the DICOM_PERCENTILES window makes of a picture (percentiles follow a linear encoding)."""
    lo, hi = np.percentile(img.astype(np.float64), train_cxr.DICOM_PERCENTILES)
    return np.rint(np.clip((img - lo) / (hi - lo), 0, 1) * 255)


def dicom_window(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """The standard's linear window (PS3.3 C.11.2.1.2.1), written out independently of pydicom."""
    return np.rint(np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0, 1) * 255)


def decoded(path) -> np.ndarray:
    return train_cxr.decode_xray(str(path), SIZE).astype(np.float64)


def test_monochrome2_8_bit_without_window_gets_the_percentile_window(source, tmp_path):
    _, img = source
    got = decoded(write_dicom(tmp_path / "a.dcm", img))
    np.testing.assert_array_equal(got, percentile_window(img))
    assert got.min() == 0 and got.max() == 255  # the window stretches: not a flat, low-contrast picture


def test_monochrome2_12_bit_in_16_bit_container(source, tmp_path):
    _, img = source
    stored = img.astype(np.uint16) * 16 | 0xF000  # values in bits 0-11; the unused top bits hold junk
    got = decoded(write_dicom(tmp_path / "a.dcm", stored, bits_stored=12))
    np.testing.assert_array_equal(got, percentile_window(img))  # not black, not wrapped


def test_monochrome1_is_inverted(source, tmp_path):
    _, img = source
    got = decoded(write_dicom(tmp_path / "a.dcm", (255 - img.astype(np.uint16)) * 16, bits_stored=12,
                              photometric="MONOCHROME1"))
    # Bone bright, as in the PNG, to the last pixel (see test_monochrome1_equals_its_monochrome2_twin)
    assert np.array_equal(got, percentile_window(img))


def test_monochrome1_equals_its_monochrome2_twin(source, tmp_path):
    """The same picture stored either way decodes to the same pixels: inverted after its percentile window it
    rounded .5 ties the other way (this picture's window maps stored values onto halves of a gray level)."""
    _, img = source
    two = decoded(write_dicom(tmp_path / "two.dcm", img.astype(np.uint16) * 16, bits_stored=12))
    one = decoded(write_dicom(tmp_path / "one.dcm", (255 - img.astype(np.uint16)) * 16, bits_stored=12,
                              photometric="MONOCHROME1"))
    assert np.array_equal(one, two)


def test_signed_pixels_and_big_endian_are_read(source, tmp_path):
    """Signed 12-bit values, negative ones included, with junk in the unused high bits; then Explicit VR Big
    Endian (older archives): both decode to the picture."""
    _, img = source
    signed = (img.astype(np.int16) * 8 - 1000).astype(np.uint16) & 0x0FFF | 0x5000
    path = write_dicom(tmp_path / "signed.dcm", signed, bits_stored=12, PixelRepresentation=1)
    assert np.array_equal(decoded(path), percentile_window(img))
    ds = pydicom.dcmread(write_dicom(tmp_path / "le.dcm", img.astype(np.uint16) * 16, bits_stored=12))
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRBigEndian
    ds.PixelData = (img.astype(np.uint16) * 16).astype(">u2").tobytes()
    pydicom.dcmwrite(tmp_path / "be.dcm", ds, little_endian=False, implicit_vr=False)
    assert np.array_equal(decoded(tmp_path / "be.dcm"), percentile_window(img))


@pytest.mark.parametrize("photometric", ["RGB", "YBR_FULL"])
@pytest.mark.parametrize("planar", [0, 1])
def test_colour_is_read_as_gray_without_its_window(source, tmp_path, photometric, planar):
    """Colour, either Planar Configuration, gets the percentile window: the window tags it kept from its X-ray
    do not apply to colour (PS3.3 C.11.2) and made pydicom raise, so the file was unreadable."""
    _, img = source
    rgb = np.stack([img] * 3, -1)
    stored = pydicom.pixels.convert_color_space(rgb, "RGB", photometric) if photometric != "RGB" else rgb
    path = write_dicom(tmp_path / "a.dcm", img, photometric=photometric, WindowCenter=128, WindowWidth=256)
    ds = pydicom.dcmread(path)
    ds.SamplesPerPixel, ds.PlanarConfiguration = 3, planar
    ds.PixelData = np.ascontiguousarray(stored.transpose(2, 0, 1) if planar else stored).tobytes()
    ds.save_as(path)
    assert np.array_equal(decoded(path), percentile_window(img))


def test_colour_becomes_gray_by_one_rule_in_png_16_bit_and_dicom(source, tmp_path):
    """The same colour picture (unequal channels) as an 8-bit PNG, a 16-bit PNG and TIFF, and an RGB DICOM gives
    the same gray: Pillow's luma weights (299, 587, 114 per 1000) everywhere. The DICOM and 16-bit files took the
    plain channel mean, 30+ gray levels away. Black and white corners make both the DICOM's percentile window and
    the 16-bit min-max scaling the identity. Within 1 gray level, not exact: Pillow computes the 8-bit luma in
    16-bit fixed point rounding halves up, and the 16-bit path truncates to 8 bits as it does for gray."""
    _, img = source
    rgb = np.stack([img, img // 2 + 64, 255 - img], -1)
    rgb[:8, :8], rgb[-8:, -8:] = 0, 255
    Image.fromarray(rgb).save(tmp_path / "c8.png")
    png = decoded(tmp_path / "c8.png")
    np.testing.assert_array_equal(png, np.asarray(Image.fromarray(rgb).convert("L")))  # 8-bit: as before
    for name in ("c16.png", "c16.tif"):
        assert cv2.imwrite(str(tmp_path / name), rgb[..., ::-1].astype(np.uint16) * 257)  # OpenCV writes BGR
    path = write_dicom(tmp_path / "c.dcm", img, photometric="RGB")
    ds = pydicom.dcmread(path)
    ds.SamplesPerPixel, ds.PlanarConfiguration, ds.PixelData = 3, 0, rgb.tobytes()
    ds.save_as(path)
    for name in ("c16.png", "c16.tif", "c.dcm"):
        diff = np.abs(decoded(tmp_path / name) - png)
        assert diff.max() <= 1, (name, diff.max())
    assert (diff == 0).mean() > 0.99  # the DICOM: a tie rounded the other way, or 19595/65536 against 0.299


def test_palette_color_is_looked_up(source, tmp_path):
    """PALETTE COLOR stores indices into a colour table: read as gray levels they gave a scrambled picture."""
    _, img = source
    order = np.random.default_rng(0).permutation(256)  # index order[v] holds gray v
    table = np.zeros(256, np.uint16)
    table[order] = np.arange(256) * 257
    path = write_dicom(tmp_path / "a.dcm", order[img].astype(np.uint8), photometric="PALETTE COLOR")
    ds = pydicom.dcmread(path)
    for colour in ("Red", "Green", "Blue"):
        ds.add_new(f"{colour}PaletteColorLookupTableDescriptor", "US", [256, 0, 16])
        ds.add_new(f"{colour}PaletteColorLookupTableData", "OW", table.tobytes())
    ds.save_as(path)
    assert np.array_equal(decoded(path), percentile_window(img))


def test_rescale_slope_and_intercept_come_before_the_window(source, tmp_path):
    _, img = source
    # Stored values 2000-2510 mean img after the Modality LUT; the window is in those units and maps
    # 0-255 to black-white, so only a decoder that rescales first gets the PNG back.
    path = write_dicom(tmp_path / "a.dcm", img.astype(np.uint16) * 2 + 2000, bits_stored=12,
                       RescaleSlope=0.5, RescaleIntercept=-1000, WindowCenter=128, WindowWidth=256)
    np.testing.assert_array_equal(decoded(path), img)


def test_modality_lut_sequence_of_12_bit_entries(source, tmp_path):
    _, img = source
    # A Modality LUT may hold 8 to 16 bits an entry (PS3.3 C.11.1.1); this one maps 12-bit values back to img.
    item = pydicom.Dataset()
    item.add_new("LUTDescriptor", "US", [4096, 0, 12])
    item.add_new("LUTData", "US", [int(v) for v in np.arange(4096) >> 4])
    item.ModalityLUTType = "US"
    path = write_dicom(tmp_path / "a.dcm", img.astype(np.uint16) * 16, bits_stored=12, ModalityLUTSequence=[item])
    np.testing.assert_array_equal(decoded(path), percentile_window(img))  # read, not skipped as unreadable


@pytest.mark.parametrize("vr", ["SS", "US"])
def test_modality_lut_of_signed_pixels(source, tmp_path, vr):
    """A signed first value mapped, also when written as US (-1000 as 64536): it was an unreadable file."""
    _, img = source
    stored = img.astype(np.int16) * 8 - 1000
    item = pydicom.Dataset()
    item.add_new("LUTDescriptor", vr, [2048, -1000 if vr == "SS" else 2**16 - 1000, 16])
    item.add_new("LUTData", "OW", (np.arange(2048) * 32).astype("<u2").tobytes())
    item.ModalityLUTType = "US"
    path = write_dicom(tmp_path / "a.dcm", stored.astype(np.uint16), bits_stored=12, PixelRepresentation=1,
                       ModalityLUTSequence=[item])
    assert np.array_equal(decoded(path), percentile_window(img))


def test_negative_rescale_slope_with_a_window_keeps_black_black(source, tmp_path):
    _, img = source
    # Stored 255 - img with slope -1, intercept 255: the modality values are img again, so a window over
    # 0-255 must give the PNG (pydicom's window output runs downwards here; min/max read it inverted).
    path = write_dicom(tmp_path / "a.dcm", 255 - img.astype(np.uint16), RescaleSlope=-1, RescaleIntercept=255,
                       WindowCenter=128, WindowWidth=256)
    np.testing.assert_array_equal(decoded(path), img)


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_pixel_padding_is_left_out_of_the_percentile_window(source, tmp_path, photometric):
    _, img = source
    # A quarter of the picture is Pixel Padding (outside the collimator; the darkest stored value for MONOCHROME2,
    # the brightest for MONOCHROME1): a viewer leaves it out of the window, so the X-ray keeps its full contrast.
    stored = img.astype(np.uint16) * 16 + 512
    stored[:, :16] = 0
    if photometric == "MONOCHROME1":
        stored = 4095 - stored
    got = decoded(write_dicom(tmp_path / "a.dcm", stored, bits_stored=12, photometric=photometric,
                              PixelPaddingValue=int(stored[0, 0])))
    np.testing.assert_allclose(got[:, 16:], percentile_window(img[:, 16:]), atol=1)  # not squeezed into 40-255
    assert (got[:, :16] == 0).all()  # the padding black


def test_empty_window_tags_get_the_percentile_window(source, tmp_path):
    _, img = source
    # Zero-length WindowCenter/WindowWidth elements (type 3: some exports write them empty) are no window.
    path = write_dicom(tmp_path / "a.dcm", img)
    ds = pydicom.dcmread(path)
    ds.add_new("WindowCenter", "DS", None)
    ds.add_new("WindowWidth", "DS", None)
    ds.save_as(path)
    np.testing.assert_array_equal(decoded(path), percentile_window(img))  # not a flat gray picture


@pytest.mark.parametrize("width", [0, -5, 0.5])
def test_an_unusable_window_width_gets_the_percentile_window(source, tmp_path, width):
    """A WindowWidth pydicom cannot window with (0: some exports' "no window") made the file unreadable."""
    _, img = source
    path = write_dicom(tmp_path / "a.dcm", img, WindowCenter=128, WindowWidth=width)
    np.testing.assert_array_equal(decoded(path), percentile_window(img))


def test_dicom_without_extension_is_found_read_and_grouped(source, tmp_path):
    _, img = source
    folder = tmp_path / "export"
    folder.mkdir()
    write_dicom(tmp_path / "a.dcm", img, PatientID="P7").rename(folder / "IM000001")  # a PACS export's name
    write_dicom(tmp_path / "b.dcm", img, PatientID="P7").rename(folder / "1.2.840.10008.1")  # named by its UID
    (folder / "README").write_text("not an image")
    (folder / "notes.txt").write_bytes(b"\0" * 128 + b"DICM")  # an extension that is not DICOM's: not read
    found = sorted(p.name for p in folder.iterdir() if train_cxr.is_image_file(str(p), folder))
    assert found == ["1.2.840.10008.1", "IM000001"]
    np.testing.assert_array_equal(decoded(folder / "IM000001"), percentile_window(img))
    assert train_cxr.patient_id(str(folder / "IM000001")) == "dicom:P7"


def test_a_dicom_cds_dicomdir_is_not_an_image(source, tmp_path, capsys):
    # The index of a DICOM CD starts like DICOM: --predict on a CD's copy listed it as an unreadable image,
    # and with --strict refused the folder.
    _, img = source
    folder = tmp_path / "cd"
    folder.mkdir()
    write_dicom(tmp_path / "a.dcm", img, PatientID="P7").rename(folder / "IM000001")
    shutil.copy(pydicom.data.get_testdata_file("DICOMDIR"), folder / "DICOMDIR")
    assert train_cxr.is_dicom(str(folder / "DICOMDIR"))  # by its preamble, as IM000001
    train_cxr.setup_console_logging()
    capsys.readouterr()
    assert [p.rsplit("/", 1)[-1] for p in train_cxr.images_to_predict(folder)] == ["IM000001"]
    assert "DICOMDIR" not in capsys.readouterr().out  # not in the note of files left out either


@pytest.mark.parametrize("layout", ["implicit", "explicit", "meta_without_preamble"])
def test_dicom_without_the_dicm_preamble_is_read_and_grouped(source, tmp_path, layout):
    _, img = source
    # A bare data set (no 128-byte preamble, no "DICM"), as older PACS exports write them: pydicom refuses it
    # unless forced, and it was skipped as unreadable; named .dcm, it is an X-ray the user means to train on.
    ds = pydicom.dcmread(write_dicom(tmp_path / "a.dcm", img, PatientID="P9"))
    ds.preamble = None
    if layout != "meta_without_preamble":
        ds.file_meta = pydicom.dataset.FileMetaDataset()
    path = tmp_path / "bare.dcm"
    ds.save_as(path, implicit_vr=layout == "implicit", little_endian=True, enforce_file_format=False)
    with pytest.raises(pydicom.errors.InvalidDicomError):
        pydicom.dcmread(path)  # the case: pydicom's own reader refuses it
    np.testing.assert_array_equal(decoded(path), percentile_window(img))
    assert train_cxr.patient_id(str(path)) == "dicom:P9"


def test_a_dcm_file_that_is_not_dicom_is_refused_in_one_line(tmp_path):
    path = tmp_path / "notes.dcm"
    path.write_bytes(b"scanned requisition form, not an image " * 20)
    _, arr, err, _ = train_cxr._decode_one((0, str(path)), SIZE)
    assert arr is None and err == "not a DICOM file: no DICOM header, no modality and no pixel data"


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_window_center_and_width(source, tmp_path, photometric):
    _, img = source
    # The same window on the same tissue: gray values 30-149 of the PNG, in the stored units.
    stored, center = (img, 90) if photometric == "MONOCHROME2" else (255 - img, 166)
    path = write_dicom(tmp_path / "a.dcm", stored, photometric=photometric, WindowCenter=center, WindowWidth=120)
    want = dicom_window(img.astype(np.float64), 90, 120)
    if photometric == "MONOCHROME1":  # windowed first, then inverted
        assert np.abs(255 - dicom_window(stored.astype(np.float64), center, 120) - want).max() <= 1
    assert np.abs(decoded(path) - want).max() <= 1
    assert (want == 0).mean() > 0.05 and (want == 255).mean() > 0.01  # the window really clips


def test_sigmoid_window_follows_the_standard_without_a_warning(source, tmp_path):
    _, img = source
    x = img.astype(np.float64) * 16
    path = write_dicom(tmp_path / "a.dcm", img.astype(np.uint16) * 16, bits_stored=12, WindowCenter=[2040, 100],
                       WindowWidth=[4080, 50], VOILUTFunction="SIGMOID")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy warned of an overflow in exp() on each decode_xray() call
        got = decoded(path)
    # PS3.3 C.11.2.1.3.1, written out independently of pydicom; the first of the two windows
    np.testing.assert_array_equal(got, np.rint(255 / (1 + np.exp(-4 * (x - 2040) / 4080))))


def test_voi_lut_sequence(source, tmp_path):
    _, img = source
    item = pydicom.Dataset()
    item.add_new("LUTDescriptor", "US", [256, 0, 8])
    item.add_new("LUTData", "US", [int(v) for v in np.rint(np.sqrt(np.arange(256) / 255) * 255)])  # a gamma curve
    path = write_dicom(tmp_path / "a.dcm", img, VOILUTSequence=[item])
    np.testing.assert_array_equal(decoded(path), np.rint(np.sqrt(img / 255) * 255))


@pytest.mark.parametrize("vr", ["SS", "US"])
def test_voi_lut_of_signed_pixels(source, tmp_path, vr):
    """A VOI LUT whose first value mapped is negative: as the standard writes it (SS), and as some writers do
    (US, -1000 stored as 64536), which made a black picture."""
    _, img = source
    stored = img.astype(np.int16) * 8 - 1000
    ds = pydicom.dcmread(write_dicom(tmp_path / "a.dcm", stored.astype(np.uint16), bits_stored=12,
                                     PixelRepresentation=1))
    lut = pydicom.Dataset()
    lut.add_new("LUTDescriptor", vr, [2048, -1000 if vr == "SS" else 2**16 - 1000, 16])
    lut.add_new("LUTData", "OW", (np.arange(2048) * 32).astype("<u2").tobytes())  # linear, 0 to 65504
    ds.VOILUTSequence = [lut]
    ds.save_as(tmp_path / "a.dcm")
    assert np.array_equal(decoded(tmp_path / "a.dcm"), np.rint((stored + 1000.0) * 32 / 65504 * 255))


def test_8_bit_voi_lut_of_a_12_bit_image(source, tmp_path):
    _, img = source
    # 4096 entries for the 12-bit input, 8 bits each (LUT Descriptor 4096, 0, 8): entries past 255 count too.
    item = pydicom.Dataset()
    item.add_new("LUTDescriptor", "US", [4096, 0, 8])
    item.add_new("LUTData", "US", [int(v) for v in np.arange(4096) >> 4])
    path = write_dicom(tmp_path / "a.dcm", img.astype(np.uint16) * 16, bits_stored=12, VOILUTSequence=[item])
    np.testing.assert_array_equal(decoded(path), img)


def test_jpeg_baseline_encapsulated(source, tmp_path):
    _, img = source
    ok, jpeg = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    path = write_dicom(tmp_path / "a.dcm", img, transfer_syntax=pydicom.uid.JPEGBaseline8Bit,
                       encapsulated=jpeg.tobytes())
    diff = np.abs(decoded(path) - percentile_window(img))
    assert diff.mean() < 3.0 and diff.max() <= 16, (diff.mean(), diff.max())


def test_multi_frame_gives_the_first_frame_and_says_so_once(source, tmp_path, monkeypatch):
    _, img = source
    paths = [str(write_dicom(tmp_path / f"m{i}.dcm", np.stack([img, 255 - img, img // 2]))) for i in range(2)]
    notes = []
    monkeypatch.setattr(train_cxr.log, "info", notes.append)
    arr, bad = train_cxr.decode_all(paths, SIZE)
    assert bad == []
    for row in arr:
        np.testing.assert_array_equal(row, percentile_window(img))
    assert len(notes) == 1 and "2 multi-frame DICOM" in notes[0] and "first frame" in notes[0], notes



@pytest.mark.parametrize("function", ["VENDOR_CURVE", ""])
def test_an_unknown_voi_lut_function_is_windowed_as_linear_and_said_once(source, tmp_path, monkeypatch, function):
    """A VOI LUT Function the standard does not define (a vendor's term), or an empty one, made pydicom raise and
    the file was left out as unreadable; LINEAR is the default (PS3.3 C.11.2.1.3), as a viewer falls back to.
    A vendor's term is named once for all the files decoded together; an empty one means absent: no note."""
    _, img = source
    paths = [str(write_dicom(tmp_path / f"v{i}.dcm", img, WindowCenter=90, WindowWidth=120,
                             VOILUTFunction=function)) for i in range(2)]
    notes = []
    monkeypatch.setattr(train_cxr.log, "warning", notes.append)
    monkeypatch.setattr(train_cxr.log, "info", notes.append)
    arr, bad = train_cxr.decode_all(paths, SIZE)
    assert bad == []
    linear = decoded(write_dicom(tmp_path / "linear.dcm", img, WindowCenter=90, WindowWidth=120))
    for row in arr:
        np.testing.assert_array_equal(row, linear)
    if function:
        assert len(notes) == 1 and "2 DICOM file(s)" in notes[0] and paths[0] in notes[0], notes
        assert "'VENDOR_CURVE'" in notes[0] and "LINEAR" in notes[0], notes
    else:
        assert notes == []


def test_for_processing_images_are_read_and_said_once(source, tmp_path, monkeypatch):
    """Raw detector data (Presentation Intent Type FOR PROCESSING, or the DX For Processing SOP Class) looks unlike
    the FOR PRESENTATION pictures models are trained on: read, and counted in one note; a plain file is not."""
    _, img = source
    intent = write_dicom(tmp_path / "intent.dcm", img, PresentationIntentType="FOR PROCESSING")
    sop = pydicom.dcmread(write_dicom(tmp_path / "sop.dcm", img))
    sop.SOPClassUID = sop.file_meta.MediaStorageSOPClassUID = pydicom.uid.DigitalXRayImageStorageForProcessing
    sop.save_as(tmp_path / "sop.dcm")
    plain = write_dicom(tmp_path / "plain.dcm", img, PresentationIntentType="FOR PRESENTATION")
    notes = []
    monkeypatch.setattr(train_cxr.log, "warning", notes.append)
    monkeypatch.setattr(train_cxr.log, "info", notes.append)
    arr, bad = train_cxr.decode_all([str(intent), str(tmp_path / "sop.dcm"), str(plain)], SIZE)
    assert bad == []
    for row in arr:
        np.testing.assert_array_equal(row, percentile_window(img))
    assert len(notes) == 1 and "2 DICOM file(s)" in notes[0] and "FOR PROCESSING" in notes[0], notes
    assert str(intent) in notes[0] and "not trained" in notes[0], notes


@pytest.mark.parametrize("groups", ["SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"])
def test_rescale_and_window_in_functional_groups_are_read(source, tmp_path, groups):
    """An enhanced multi-frame file keeps its rescale and window in functional groups, not at the top level, where
    pydicom 3.0 looks: the window was lost and the file got the percentile window. The first frame's are used."""
    _, img = source
    item = pydicom.Dataset()
    item.PixelValueTransformationSequence = [pydicom.Dataset()]
    item.PixelValueTransformationSequence[0].update(dict(RescaleIntercept=-1000, RescaleSlope=1, RescaleType="US"))
    item.FrameVOILUTSequence = [pydicom.Dataset()]
    item.FrameVOILUTSequence[0].update(dict(WindowCenter=90, WindowWidth=120))
    other = pydicom.Dataset()  # the second frame's: not used
    other.FrameVOILUTSequence = [pydicom.Dataset()]
    other.FrameVOILUTSequence[0].update(dict(WindowCenter=1090, WindowWidth=2))
    frames = np.stack([img, img]).astype(np.uint16) + 1000
    path = write_dicom(tmp_path / "a.dcm", frames, bits_stored=12,
                       **{groups: [item] if groups.startswith("Shared") else [item, other]})
    with pytest.warns(train_cxr.FirstFrameOnly):
        got = decoded(path)
    assert np.abs(got - dicom_window(img.astype(np.float64), 90, 120)).max() <= 1

def unsupported_syntax():
    uid = pydicom.uid.JPEGLSLossless
    if pydicom.pixels.get_decoder(uid).is_available:
        pytest.skip("a JPEG-LS decoder is installed here")
    return uid


def bad_dicoms(folder, img) -> dict:
    """{path: words its skip reason must contain} for the three kinds of DICOM that are refused."""
    return {write_dicom(folder / "jpeg_ls.dcm", img, transfer_syntax=unsupported_syntax(),
                        encapsulated=b"\xff\xd8\xff\xf7 not decodable here"):
            ["JPEG-LS Lossless", "1.2.840.10008.1.2.4.80", "pylibjpeg-libjpeg"],
            write_dicom(folder / "no_pixels.dcm", None): ["without pixel data"],
            write_dicom(folder / "ct.dcm", img, modality="CT"): ["modality CT", "not an X-ray"]}


def test_refused_dicoms_are_bad_files_with_a_reason(source, tmp_path):
    _, img = source
    bad_files = bad_dicoms(tmp_path, img)
    arr, bad = train_cxr.decode_all([str(p) for p in bad_files], SIZE)
    assert len(bad) == 3
    for (path, why), words in zip(bad, bad_files.values()):
        assert "\n" not in why
        for w in words:
            assert w in why, (path, why)


def test_12_bit_jpeg_extended_without_its_decoder_names_what_to_install(source, tmp_path):
    _, img = source
    uid = pydicom.uid.JPEGExtended12Bit  # 12-bit CR/DX: Pillow reads only 8-bit JPEG Extended, and says so on decoding
    if not pydicom.pixels.get_decoder(uid).missing_dependencies:
        pytest.skip("every decoder of JPEG Extended is installed here")
    path = write_dicom(tmp_path / "a.dcm", img.astype(np.uint16) * 16, bits_stored=12, transfer_syntax=uid,
                       encapsulated=cv2.imencode(".jpg", img)[1].tobytes())
    _, arr, why, _ = train_cxr._decode_one((0, str(path)), SIZE)
    assert arr is None and "\n" not in why, why  # one line in the list of skipped files
    for w in ["JPEG Extended", "1.2.840.10008.1.2.4.51", "12-bit", "pylibjpeg-libjpeg"]:
        assert w in why, why


def kermany_like(root, n_patients: int, shots: int, seed: int = 0):
    """train/ and test/ of DICOMs named by number only; the patient is in PatientID alone."""
    rng = np.random.default_rng(seed)
    k = 0
    for split in ("train", "test"):
        for cls in ("NORMAL", "PNEUMONIA"):
            (root / split / cls).mkdir(parents=True)
            for p in range(n_patients if split == "train" else 3):
                for _ in range(shots):
                    img, _ = train_cxr.synth_xray(rng, 40, cls == "PNEUMONIA")
                    k += 1
                    write_dicom(root / split / cls / f"{k:05d}.dcm", img, PatientID=f"{split}-{cls}-{p}")


def test_patient_id_from_dicom_keeps_patients_on_one_side(tmp_path):
    kermany_like(tmp_path / "d", n_patients=12, shots=3)
    cfg = train_cxr.Config(data_dir=str(tmp_path / "d"), img_size=32, num_workers=0, val_fraction=0.3)
    data = train_cxr.prepare_data(cfg)
    pid = lambda p: pydicom.dcmread(p, stop_before_pixels=True).PatientID
    train_ids, val_ids = {pid(p) for p in data["train"].paths}, {pid(p) for p in data["val"].paths}
    assert train_ids and val_ids and not train_ids & val_ids
    assert len(data["val"]) % 3 == 0  # whole patients, three images each
    assert train_cxr.patient_id(data["train"].paths[0]).startswith("dicom:")
    assert train_cxr.patient_id(str(tmp_path / "x.png")) == "x"  # a PNG is not read as DICOM


def test_one_patient_id_for_every_dicom_is_named_and_patient_regex_overrides_it(tmp_path):
    kermany_like(tmp_path / "d", n_patients=6, shots=2)
    for f in (tmp_path / "d" / "train").rglob("*.dcm"):  # an anonymised export: one PatientID for all
        ds = pydicom.dcmread(f)
        ds.PatientID = "ANONYMOUS"
        ds.save_as(f)
    cfg = train_cxr.Config(data_dir=str(tmp_path / "d"), img_size=32, num_workers=0, val_fraction=0.3)
    with pytest.raises(train_cxr.CXRError, match="12 images .* belong to 1 patient.*'dicom:ANONYMOUS'") as e:
        train_cxr.prepare_data(cfg)
    assert "--patient-regex" in str(e.value)
    # A typed --patient-regex wins over PatientID: here every file is its own patient (its 5-digit number).
    data = train_cxr.prepare_data(dataclasses.replace(cfg, patient_regex=r"^(\d+)\."))
    assert len(data["val"]) > 0 and not set(data["train"].paths) & set(data["val"].paths)


def test_mixed_png_jpeg_dicom_folder_trains_end_to_end(synth_root, tmp_path, source):
    """A third of the PNGs become DICOMs (MONOCHROME1 12-bit or JPEG Baseline), a third JPEGs; plus the
    three refused DICOMs, which are skipped and listed. Then --predict and --evaluate read DICOMs too."""
    data = tmp_path / "data"
    shutil.copytree(synth_root, data)
    n = {"dcm": 0, "jpeg": 0}
    for i, png in enumerate(sorted(data.rglob("*.png"))):
        img = cv2.imread(str(png), cv2.IMREAD_GRAYSCALE)
        if i % 3 == 1:
            assert cv2.imwrite(str(png.with_suffix(".jpeg")), img)
            n["jpeg"] += 1
        elif i % 3 == 2 and i % 2:
            write_dicom(png.with_suffix(".dcm"), (255 - img.astype(np.uint16)) * 16, bits_stored=12,
                        photometric="MONOCHROME1")
            n["dcm"] += 1
        elif i % 3 == 2:
            jpeg = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
            write_dicom(png.with_suffix(".dicom"), img, transfer_syntax=pydicom.uid.JPEGBaseline8Bit,
                        encapsulated=jpeg)
            n["dcm"] += 1
        else:
            continue
        png.unlink()
    refused = bad_dicoms(data / "train" / "PNEUMONIA", source[1])
    out = tmp_path / "runs"
    assert run([*FAST, "--epochs", "1", "--data-dir", data, "--output-dir", out, "--run-name", "mixed"]) == 0
    cfg = json.loads((out / "mixed" / "config.json").read_text())
    assert sum(cfg["split_sizes"].values()) == 200 and n["dcm"] > 40 and n["jpeg"] > 40
    assert sorted(cfg["skipped_files"]) == sorted(str(p) for p in refused)

    dicoms = sorted(str(p) for p in (data / "test").rglob("*.dc*"))
    assert run(["--predict", *dicoms, "--checkpoint", out / "mixed" / "best_model.pt", "--output-dir", out,
                "--run-name", "pred", "--num-workers", 0, "--num-threads", 1]) == 0
    assert sorted(r["path"] for r in read_csv(out / "pred" / "predictions.csv")) == dicoms
    assert run(["--evaluate", "--checkpoint", out / "mixed" / "best_model.pt", "--data-dir", data,
                "--output-dir", out, "--run-name", "ev", "--num-workers", 0, "--num-threads", 1]) == 0
    assert json.loads((out / "ev" / "test_metrics.json").read_text())["n"] == 50


def test_strict_refuses_a_bad_dicom(synth_root, tmp_path, source, capsys):
    data = tmp_path / "data"
    shutil.copytree(synth_root, data)
    write_dicom(data / "train" / "NORMAL" / "ct.dcm", source[1], modality="CT")
    assert run([*FAST, "--epochs", "1", "--data-dir", data, "--output-dir", tmp_path / "runs", "--strict"]) == 2
    err = capsys.readouterr().err
    assert "ct.dcm (DICOM modality CT is not an X-ray (CR, DX, RG))" in err and "--strict" in err
