"""The rsp-fast command line: image maps, the demo, and one-line errors for bad input."""
import errno
import io
import json
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import rsp_fast
from rsp_fast.cli import main
from rsp_fast.errors import RSPError
from rsp_fast.images import read_image
from rsp_fast.models import build_model
from rsp_fast.render import Letterbox, colorize, heat_to_frame, letterbox_geometry


# for a child process: the rsp_fast these tests imported (a checkout's, not the one installed)
_THIS_PACKAGE = {"PYTHONPATH": str(Path(rsp_fast.__file__).resolve().parents[1])}


def _png(path, mode="RGB", size=(40, 30)):
    rng = np.random.default_rng(0)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = rng.integers(0, 255, (size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(arr.squeeze(-1) if channels == 1 else arr, mode).save(path)
    return path


def test_image_command_writes_maps_for_grey_alpha_and_colour(tmp_path, capsys):
    files = [_png(tmp_path / "a.png"), _png(tmp_path / "b.png", "RGBA", (31, 17)), _png(tmp_path / "c.png", "L")]
    out = tmp_path / "out"
    assert main(["image", *map(str, files), "-o", str(out), "--init", "gradcam"]) == 0
    for name in "abc":
        heat = np.asarray(Image.open(out / f"{name}_heatmap.png"))
        src = np.asarray(Image.open(tmp_path / f"{name}.png"))
        assert heat.shape[:2] == src.shape[:2]  # mapped back onto the frame
    report = json.loads((out / "report.json").read_text())
    assert [r["name"] for r in report["images"]] == ["a", "b", "c"]
    assert all(0 <= r["label"] < 1000 and 0 < r["score"] <= 1 for r in report["images"])
    assert (out / "contact_sheet.png").exists()
    here = "cuda" if torch.cuda.is_available() else "cpu"  # --device auto
    assert report["device"] == here and f"(3 images on {here})" in capsys.readouterr().out


def test_hidden_files_in_a_folder_are_not_taken_for_images(tmp_path):
    """macOS leaves ``._name.jpg`` metadata files beside pictures copied from it: they stopped a
    folder's run as unreadable images."""
    from rsp_fast.images import image_files
    _png(tmp_path / "cat.png")
    (tmp_path / "._cat.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    assert [name for name, _ in image_files([tmp_path])] == ["cat"]


def test_a_thin_image_keeps_the_contact_sheet_small(tmp_path):
    """Tiles were scaled to 512 pixels wide: a 1×500 strip (side by side with its overlay, 2×500)
    became 512×128000, and every other tile was padded to that height."""
    files = [_png(tmp_path / "strip.png", size=(1, 500)), _png(tmp_path / "photo.png", size=(64, 48))]
    out = tmp_path / "out"
    assert main(["image", *map(str, files), "-o", str(out), "--init", "gradcam"]) == 0
    with Image.open(out / "contact_sheet.png") as sheet:
        assert sheet.height <= 512 and sheet.width <= 2 * 512 + 4  # one row of two tiles, each within 512×512
        tiles = np.asarray(sheet)
    assert tiles[:, 512 + 4:].std() > 0  # the photo's tile is there, its width kept


def test_images_of_different_sizes_share_a_batch(tmp_path):
    """Each image is letterboxed on its own, so a batch of mixed sizes gives every image the
    map and label it gets alone; pixels are read batch by batch and a corrupt file met late
    is named (the maps already written are whole)."""
    from skimage import data
    photos = {"cat": data.chelsea(), "coffee": data.coffee()[::2, ::3], "rocket": data.rocket()[:300]}
    files = []
    for name, img in photos.items():
        Image.fromarray(img).save(tmp_path / f"{name}.png")
        files.append(str(tmp_path / f"{name}.png"))
    for batch in ("1", "3"):
        assert main(["image", *files, "-o", str(tmp_path / batch), "--batch-size", batch]) == 0
    one, three = (json.loads((tmp_path / b / "report.json").read_text())["images"] for b in ("1", "3"))
    assert [(r["name"], r["label"]) for r in one] == [(r["name"], r["label"]) for r in three]
    for name, img in photos.items():
        alone, shared = (np.asarray(Image.open(tmp_path / b / f"{name}_heatmap.png")).astype(int) for b in ("1", "3"))
        assert alone.shape[:2] == img.shape[:2] and np.abs(alone - shared).max() <= 1
    broken = tmp_path / "zz.jpg"
    Image.fromarray(data.astronaut()).save(broken)
    broken.write_bytes(broken.read_bytes()[:5000])  # its header opens, its pixels do not
    with pytest.raises(rsp_fast.RSPError, match="cannot read image .*zz.jpg"):
        from rsp_fast.images import explain_images, image_files
        spec = build_model("efficientnet_lite0")
        explain_images(spec, rsp_fast.RSP(spec.model), image_files([*files, str(broken)]), tmp_path / "b", batch_size=2)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == sorted(f"{n}_{kind}.png" for n in ("cat", "coffee") for kind in ("heatmap", "overlay"))


@pytest.mark.parametrize("wide", [
    lambda grey: Image.fromarray(grey.astype(np.uint16) * 257),  # 16-bit PNG (mode I;16)
    lambda grey: Image.fromarray(grey.astype(np.int32) * 257, "I"),  # 32-bit integer grey
    lambda grey: Image.fromarray(grey.astype(np.float32) / 255, "F"),  # float grey in [0, 1]
    lambda grey: Image.fromarray(grey.astype(np.float32), "F"),  # float grey in [0, 255]
    lambda grey: Image.fromarray(grey.astype(np.float32) * 257, "F")])  # float grey of 16-bit data
def test_wide_grey_images_read_like_their_8_bit_version(tmp_path, wide):
    """PIL's convert("RGB") clips 16-bit grey at 255: a 16-bit photo read as all white (a float
    one too, until later: scaled only where its peak was at most 1)."""
    from skimage import data
    grey = data.camera()
    path = tmp_path / ("wide.png" if wide(grey).mode.startswith("I;16") else "wide.tif")  # PNG holds no I or F
    wide(grey).save(path)
    rgb = read_image(path)
    assert rgb.shape == grey.shape + (3,) and rgb.dtype == np.uint8
    assert np.abs(rgb[..., 0].astype(int) - grey).max() <= 1 and (rgb[..., 0] == rgb[..., 2]).all()


@pytest.mark.parametrize("scale", [1.0, 255.0])
def test_saturated_float_grey_pixels_read_as_the_brightest(tmp_path, scale):
    """+Inf (a saturated sensor pixel) came out black, as NaN does; it is now white, and the
    finite pixels keep the scale they have without it."""
    grey = np.r_[np.linspace(0, 1, 5), np.inf, np.nan].astype(np.float32) * np.float32(scale)
    Image.fromarray(np.tile(grey, (4, 1)), "F").save(tmp_path / "g.tif")
    row = read_image(tmp_path / "g.tif")[0, :, 0]
    assert row.tolist() == [0, 64, 128, 191, 255, 255, 0]


# EXIF orientation → where viewers show a block stored in the top-left corner of a 32×64
# photo (EXIF 2.3: 3 turns it half round, 6 a quarter clockwise, 8 a quarter anticlockwise)
@pytest.mark.parametrize("orientation,shape,block", [(3, (32, 64), (slice(24, 32), slice(48, 64))),
                                                     (6, (64, 32), (slice(0, 16), slice(24, 32))),
                                                     (8, (64, 32), (slice(48, 64), slice(0, 8)))])
def test_photos_are_read_upright_by_their_exif_orientation(tmp_path, orientation, shape, block):
    stored = np.zeros((32, 64, 3), np.uint8)
    stored[:8, :16] = 255
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    white = read_image(tmp_path / "phone.jpg")[..., 0] > 128
    assert white.shape == shape and white[block].all() and white.sum() == white[block].size


def test_a_decompression_bomb_is_refused_by_name(tmp_path, monkeypatch):
    """PIL refuses pictures of more than twice MAX_IMAGE_PIXELS (a small file can claim billions);
    its error is not an OSError and ended the command in a traceback."""
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    from rsp_fast.images import image_files
    for read in (read_image, lambda p: image_files([p])):
        with pytest.raises(rsp_fast.RSPError, match=r"cannot read image '.*big.png': .*decompression bomb"):
            read(tmp_path / "big.png")


def test_a_picture_below_the_bomb_limit_reads_without_a_warning(tmp_path, monkeypatch):
    """Between MAX_IMAGE_PIXELS and twice that (90–179 MP) PIL only warns: two lines on stderr
    that ask nothing of the user, before an output that is fine."""
    Image.fromarray(np.full((30, 40, 3), 7, np.uint8)).save(tmp_path / "large.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    from rsp_fast.images import image_files
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_image(tmp_path / "large.png").shape == (30, 40, 3)
        assert [name for name, _ in image_files([tmp_path / "large.png"])] == ["large"]


@pytest.mark.parametrize("suffix", ["gif", "png", "webp"])
def test_animations_are_refused_by_name_and_single_frames_read(tmp_path, suffix):
    """An animated GIF, PNG or WebP was explained as its first frame without a word; the error
    names the file and the command that reads every frame. One frame of the same formats, and a
    TIFF of two pages (a pyramid's levels are not frames), still read as pictures."""
    rng = np.random.default_rng(1)
    pixels = [rng.integers(0, 255, (30, 40, 3), dtype=np.uint8) for _ in range(3)]
    frames = lambda: [Image.fromarray(p) for p in pixels]  # fresh ones: a save leaves its options on an image
    moving = tmp_path / f"moving.{suffix}"
    frames()[0].save(moving, save_all=True, append_images=frames()[1:], duration=100, loop=0)
    with pytest.raises(rsp_fast.RSPError, match=rf"image '.*moving.{suffix}' is animated \(3 frames\).*rsp-fast video"):
        read_image(moving)
    with pytest.raises(rsp_fast.RSPError, match="is animated"):
        from rsp_fast.images import image_files
        image_files([tmp_path])
    still = tmp_path / f"still.{suffix}"
    frames()[1].save(still)
    pages = tmp_path / "pages.tif"
    frames()[0].save(pages, save_all=True, append_images=frames()[1:2])
    assert read_image(still).shape == (30, 40, 3) and read_image(pages).shape == (30, 40, 3)


def test_folders_stand_for_their_images_and_names_stay_unique(tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
    _png(tmp_path / "a" / "cat.png"), _png(tmp_path / "b" / "cat.png", "L"), _png(tmp_path / "b" / "dog.png")
    (tmp_path / "b" / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    assert main(["image", str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(out), "--init", "gradcam"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert [r["name"] for r in report["images"]] == ["cat", "cat-2", "dog"]
    assert all((out / f"{name}_overlay.png").exists() for name in ("cat", "cat-2", "dog"))


def test_explain_images_from_python_checks_arrays_and_names(tmp_path):
    from rsp_fast.errors import RSPError
    from rsp_fast.images import explain_images, image_files
    spec = build_model("efficientnet_lite0")
    explainer = rsp_fast.RSP(spec.model, init="gradcam")
    rgb = np.asarray(Image.open(_png(tmp_path / "p.png")))
    report = explain_images(spec, explainer, [("a", rgb), ("a", rgb[..., 0])], tmp_path / "o")
    assert [r["name"] for r in report["images"]] == ["a", "a-2"]  # no map overwrites another
    assert (tmp_path / "o" / "a-2_overlay.png").exists()
    with pytest.raises(RSPError, match=r"image 'rgba' must be an H×W×3 \(RGB\) or H×W \(grey\) uint8 array"):
        explain_images(spec, explainer, [("rgba", np.zeros((8, 8, 4), np.uint8))], tmp_path / "o")
    with pytest.raises(RSPError, match="must be a plain file name"):
        explain_images(spec, explainer, [("../escaped", rgb)], tmp_path / "o")
    assert not (tmp_path / "escaped_overlay.png").exists()
    for folder, name in (("x", "cat"), ("y", "cat"), ("z", "cat-2")):  # a file of its own named like a renamed one
        (tmp_path / folder).mkdir()
        _png(tmp_path / folder / f"{name}.png")
    names = [n for n, _ in image_files([tmp_path / "x", tmp_path / "y", tmp_path / "z"])]
    assert names == ["cat", "cat-2", "cat-2-2"]
    (tmp_path / "w").mkdir()  # file names Linux allows: they were refused as having a folder part
    odd = [tmp_path / "w" / name for name in ("..png", "a\\b.png")]
    for path in odd:
        Image.fromarray(rgb).save(path, format="PNG")
    assert [n for n, _ in image_files(odd)] == [".", "a\\b"]
    other = rsp_fast.RSP(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                             torch.nn.Flatten(), torch.nn.Linear(4, 10)))
    with pytest.raises(RSPError, match="built for another model"):  # its maps and labels were written as the spec's
        explain_images(spec, other, [("b", rgb)], tmp_path / "other")
    assert not (tmp_path / "other").exists()
    with pytest.raises(RSPError, match=r"images must be \(name, image\) pairs; item 0 is ndarray"):
        explain_images(spec, explainer, [rgb], tmp_path / "o")
    with pytest.raises(RSPError, match="images must be an iterable of pictures, not NoneType"):
        explain_images(spec, explainer, None, tmp_path / "o")
    assert explain_images(spec.model, explainer, [("m", rgb)], tmp_path / "o")["images"][0]["name"] == "m"  # a bare module


def test_model_specs_are_checked():
    from rsp_fast.errors import RSPError
    from rsp_fast.models import ModelSpec
    model = torch.nn.Conv2d(3, 2, 1)
    with pytest.raises(RSPError, match="mean must be three numbers"):
        ModelSpec(model, "grey", mean=(0.5,), std=(0.5,))
    with pytest.raises(RSPError, match="input_size must be a positive int, not '64'"):
        ModelSpec(model, "m", input_size="64")
    with pytest.raises(RSPError, match="std must be above 0"):
        ModelSpec(model, "m", std=(0, 1, 1))


FACTORIES = """
import torch
from models import tiny_cnn
from rsp_fast.models import ModelSpec

def names_none():
    return ModelSpec(tiny_cnn(), "tiny", input_size=32, class_names=None)

def names_in_a_string():
    return ModelSpec(tiny_cnn(), "tiny", input_size=32, class_names="abcde")

def on_meta():
    with torch.device("meta"):
        return tiny_cnn()
"""


def test_factory_class_names_and_a_model_without_data_are_checked_before_work(tmp_path, monkeypatch, capsys):
    """class_names=None failed at the first label drawn, mid-run, with a TypeError traceback;
    a string was taken for one-letter names; a model on the meta device failed at .to(device)
    with PyTorch's traceback."""
    (tmp_path / "b3_factories.py").write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    png = str(_png(tmp_path / "a.png"))
    assert main(["image", png, "-o", str(tmp_path / "out"), "--model", "b3_factories:names_none", "--device", "cpu"]) == 0
    assert json.loads((tmp_path / "out" / "report.json").read_text())["images"][0]["class_name"].startswith("class ")
    for factory, message in [("names_in_a_string", "ModelSpec 'tiny': class_names must be a list of strings (or None: "
                                                   "no names), not 'abcde'"),
                             ("on_meta", "the model's 0.weight is on the meta device (no data)")]:
        capsys.readouterr()
        assert main(["image", png, "-o", str(tmp_path / factory), "--model", f"b3_factories:{factory}"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("rsp-fast: error: ") and message in err and len(err.splitlines()) == 1
        assert not (tmp_path / factory).exists()


def test_drawing_a_map_with_nan_or_inf(tmp_path):
    from rsp_fast import render
    heat = np.linspace(-1, 1, 64, dtype=np.float32).reshape(8, 8)
    scale = render.symmetric_scale(heat)
    broken = heat.copy()
    broken[0, 0], broken[1, 1] = np.nan, np.inf
    assert render.symmetric_scale(broken) == pytest.approx(scale, rel=0.05)  # the finite pixels decide
    colours = render.colorize(broken, scale)
    assert (colours[0, 0] == 255).all() and np.array_equal(colours[2:], render.colorize(heat, scale)[2:])
    assert render.overlay(np.zeros((8, 8), np.uint8), heat, scale).shape == (8, 8, 3)  # a grey frame


def test_overlay_names_a_frame_it_cannot_draw_on():
    """A uint16 frame wrapped (65535 drawn as 255 // 3), a float one failed deep in numpy, a
    heat map of another size failed in broadcasting."""
    from rsp_fast import render
    heat = np.linspace(-1, 1, 64, dtype=np.float32).reshape(8, 8)
    for frame in (np.full((8, 8, 3), 65535, np.uint16), np.zeros((8, 8, 3), np.float32), np.zeros((8, 8, 4), np.uint8),
                  np.zeros(8, np.uint8)):
        with pytest.raises(ValueError, match=f"overlay draws on uint8 .* not a {frame.dtype} array of shape"):
            render.overlay(frame, heat, 1.0)
    with pytest.raises(ValueError, match=r"heat map's shape \(8, 8\) is not the frame's \(8, 9\)"):
        render.overlay(np.zeros((8, 9, 3), np.uint8), heat, 1.0)


def test_cost_and_backends_name_bad_arguments():
    from rsp_fast.errors import RSPError
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(4 * 16 * 16, 2))
    for shape in (10, None, 3.5, (3, -1, 16), (3, 16.0, 16), (n for n in (3, 16, 16)), (True, 16, 16)):
        with pytest.raises(RSPError, match="input_shape must be a tuple of positive ints"):
            rsp_fast.cost(model, shape)
    assert rsp_fast.cost(model, [np.int64(3), 16, 16])["totals"]["forward_macs"] > 0  # numpy sizes are sizes
    with pytest.raises(RSPError, match="model must be a torch.nn.Module, not function"):
        rsp_fast.cost(lambda x: x, (3, 16, 16))
    with pytest.raises(RSPError, match="dtype torch.float64 is not the model's"):
        rsp_fast.cost(model, (3, 16, 16), dtype=torch.float64)
    with pytest.raises(RSPError, match="dtype must be a floating-point torch.dtype, not 'float64'"):
        rsp_fast.cost(model, (3, 16, 16), dtype="float64")
    # a wrong size is the forward's failure (an unbatched Conv2d ran on x[0] and suggested the batch was the problem)
    with pytest.raises(RSPError, match="forward failed .* mat1 and mat2 shapes cannot be multiplied"):
        rsp_fast.cost(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(1024, 2)),
                      (3, 32, 32))
    with pytest.raises(RSPError, match="input_shape is one sample's shape, without the batch"):
        rsp_fast.cost(model, (1, 3, 16, 16))
    with pytest.raises(RSPError, match=r"input_shape \(3, 1000000, 1000000\): two samples of that size do not fit"):
        rsp_fast.cost(model, (3, 10**6, 10**6))  # 12 TB
    with pytest.raises(RSPError, match="unknown device 'nonsense'"):
        rsp_fast.backends("nonsense")


def test_demo_runs_offline(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "-o", str(out), "--max-frames", "6", "--quiet", "--device", "cpu"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["totals"]["frames"] == 6 and report["device"] == "cpu"
    assert ": 6 frames on cpu in " in capsys.readouterr().out
    # the clip starts on scikit-image's cat photo, and the embedded weights are real ImageNet weights
    assert all("cat" in row["name"] for row in report["frames"])
    assert (out / "demo_rsp.mp4").exists() and (out / "contact_sheet.png").exists()


def test_image_demo_photos_are_recognised(tmp_path):
    from rsp_fast.images import sample_photos
    from PIL import Image
    paths = []
    for name, img in sample_photos()[:2]:
        Image.fromarray(img).save(tmp_path / f"{name}.png")
        paths.append(str(tmp_path / f"{name}.png"))
    assert main(["image", *paths, "-o", str(tmp_path / "o")]) == 0
    labels = {r["name"]: r["class_name"] for r in json.loads((tmp_path / "o" / "report.json").read_text())["images"]}
    assert "cat" in labels["chelsea"] and "espresso" in labels["coffee"]


@pytest.mark.parametrize("argv,message", [
    (["image", "missing.png", "-o", "x"], "image 'missing.png' does not exist"),
    (["image", "{notimage}", "-o", "x"], "cannot read image"),
    (["image", "{gif}", "-o", "x"], "is animated (2 frames)"),
    (["image", "{png}", "-o", "x", "--model", "alexnet"], "unknown model 'alexnet'"),
    (["image", "{png}", "-o", "x", "--model", "vgg16"], "vgg16 needs --weights"),
    (["image", "{png}", "-o", "x", "--model", "vgg16", "--weights", "{badweights}"], "do not match VGG"),
    (["image", "{png}", "-o", "x", "--target", "1000"], "class 1000 is out of range"),
    (["image", "{png}", "-o", "x", "--precision", "tf32", "--device", "cpu"], "precision='tf32' uses CUDA tensor cores"),
    (["image", "{png}", "-o", "x", "--batch-size", "0"], "batch size must be an int of at least 1"),
    (["image", "{png}", "-o", "{png}"], "is a file"),
    (["image", "{png}", "-o", ""], "output folder: the path is empty"),
    (["image", "{png}", "-o", "x", "--report", "{png}"], "is the input image"),
    (["image", "{pics}/a.png", "{pics}/a_overlay.png", "-o", "{pics}"],
     "/a_overlay.png' would replace the input image"),  # earlier outputs given as pictures
    (["image", "{pics}", "-o", "{pics}"], "is the input folder"),  # its maps would be the next run's pictures
    (["image", "{png}", "-o", "x", "--report", "x/p_overlay.png"], "report 'x/p_overlay.png' is the output"),
    (["image", "{png}", "-o", "x", "--report", "x/contact_sheet.png"], "is the contact sheet"),
    (["image", "{png}", "-o", "x", "--report", "x"], "report 'x' is the output folder"),
    (["demo", "-o", "x", "--report", "x/demo_rsp.mp4"], "report 'x/demo_rsp.mp4' is the output video"),
    (["image", "{empty}", "-o", "x"], "holds no images"),
    (["image", "{png}", "-o", "x", "--report", "r" * 256 + ".json"], "longer than the 255 bytes a file system holds"),
    (["image", "w" * 256 + ".png", "-o", "x"], "longer than the 255 bytes a file system holds"),
    (["image", "{png}", "-o", "x", "--batch-size", "x"], "argument --batch-size: invalid int value: 'x'"),
    (["image", "{png}"], "the following arguments are required: -o/--output"),
    (["demo", "-o", "x", "--fps", "abc"], "not a frame rate: 'abc'"),
    (["demo", "-o", "x", "--fps", "1/0"], "not a frame rate: '1/0'"),
    (["demo", "-o", "x", "--fps", "1/2000"], "frame rate must be from 1/1001 to 1000"),
    (["image", "{png}", "-o", "x", "--device", "gpu0"], "unknown device 'gpu0'"),
    pytest.param(["image", "{png}", "-o", "x", "--device", "cuda"], "no CUDA GPU is available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")),
])
def test_bad_input_is_one_line_on_stderr(tmp_path, argv, message):
    notimage = tmp_path / "notimage.png"
    notimage.write_text("hello")
    badweights = tmp_path / "w.pt"
    torch.save({"features.0.weight": torch.zeros(2, 2)}, badweights)
    (tmp_path / "empty").mkdir()
    gif = tmp_path / "moving.gif"
    Image.new("RGB", (8, 8), "red").save(gif, save_all=True, append_images=[Image.new("RGB", (8, 8), "blue")])
    (tmp_path / "pics").mkdir()
    _png(tmp_path / "pics" / "a.png"), _png(tmp_path / "pics" / "a_overlay.png")
    fill = {"notimage": notimage, "png": _png(tmp_path / "p.png"), "badweights": badweights, "empty": tmp_path / "empty",
            "gif": gif, "pics": tmp_path / "pics"}
    argv = [a.format(**fill) for a in argv]
    proc = subprocess.run([sys.executable, "-m", "rsp_fast.cli", *argv], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, **_THIS_PACKAGE})
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()  # no output folder for a run that wrote nothing


@pytest.mark.parametrize("variable, value, message", [
    ("RSP_FAST_CUDA_DENSE_PATH", "foo", "RSP_FAST_CUDA_DENSE_PATH='foo': choose one of grouped_conv, implicit_gemm"),
    ("RSP_FAST_CUDA_GRAM_SLOWDOWN", "abc", "RSP_FAST_CUDA_GRAM_SLOWDOWN='abc': give a number above 0"),
    ("RSP_FAST_CUDA_IMPLICIT_GRAM", "yes", "RSP_FAST_CUDA_IMPLICIT_GRAM='yes': choose 1 (on) or 0 (off)"),
    ("RSP_FAST_CUDA_FUSED_FIRST_LAYER", "on", "RSP_FAST_CUDA_FUSED_FIRST_LAYER='on': choose 1 (on) or 0 (off)"),
    ("RSP_FAST_CPU_CAPABILITY", "AVX2", "RSP_FAST_CPU_CAPABILITY='AVX2': choose one of avx512, avx2, default"),
])
def test_a_bad_tuning_variable_is_one_line_for_every_command(tmp_path, variable, value, message):
    """They raised at import (a traceback, status 1, CPU runs and info included) or, for the
    switches, took any value but 1 for off; the CPU capability was the depthwise kernel's
    RuntimeError (a traceback), and only where a depthwise layer ran."""
    png = _png(tmp_path / "p.png")
    for argv in (["info"], ["image", str(png), "-o", "x", "--device", "cpu"]):
        proc = subprocess.run([sys.executable, "-m", "rsp_fast.cli", *argv], capture_output=True, text=True, cwd=tmp_path,
                              env={**os.environ, **_THIS_PACKAGE, variable: value})
        assert (proc.returncode, proc.stderr) == (2, f"rsp-fast: error: {message}" + proc.stderr.split(message)[-1])
        assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "x").exists()


def test_debug_adds_the_traceback_and_keeps_the_status(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rsp_fast.cli", "image", "missing.png", "-o", "x", "--debug"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("Traceback") and proc.stderr.rstrip().endswith(
        "rsp-fast: error: image 'missing.png' does not exist")


def test_torchvision_model_with_weights_file(tmp_path):
    import torchvision
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet50().state_dict(), tmp_path / "r50.pt")
    img = _png(tmp_path / "a.png", size=(64, 48))
    assert main(["image", str(img), "-o", str(tmp_path / "o"), "--model", "resnet50", "--weights", str(tmp_path / "r50.pt")]) == 0
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["model"] == "resnet50" and report["layer"] == "layer4"


def test_weights_are_never_unpickled(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    path = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, path)
    with pytest.raises(rsp_fast.RSPError, match="cannot read weights.*holds Python objects besides tensors") as refused:
        build_model("resnet50", str(path))
    assert "\x1b" not in str(refused.value)  # torch's message colours a line: the one-line error stays plain
    assert "weights_only" not in str(refused.value)  # not torch's advice to unpickle it after all
    with (tmp_path / "plain.pkl").open("wb") as f:  # a pickle torch.save did not write, of an old protocol
        pickle.dump({"x": Evil()}, f, protocol=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's warning about the protocol is not shown: the error says it all
        with pytest.raises(rsp_fast.RSPError, match="not a torch checkpoint .*a pickle torch will not load: Unsupported"):
            build_model("resnet50", str(tmp_path / "plain.pkl"))


def test_letterbox_round_trip():
    box = letterbox_geometry((30, 60), 224)
    assert box == Letterbox((30, 60), 56, 0, 112, 224)
    heat = torch.zeros(1, 224, 224)
    heat[:, box.top:box.top + box.height, box.left:box.left + box.width] = 1.0
    back = heat_to_frame(heat, box)
    assert back.shape == (1, 30, 60) and torch.allclose(back, torch.ones_like(back))


def test_a_map_shrunk_onto_a_small_picture_is_averaged_not_point_sampled():
    """A 28×28 thumbnail at input size 224: each picture pixel covers 8×8 map pixels. A 3×3 hot
    spot between the sample points vanished (0.0) while one on them showed at full strength."""
    box = letterbox_geometry((28, 28), 224)
    for start in (98, 101):
        heat = torch.zeros(1, 224, 224)
        heat[:, start:start + 3, start:start + 3] = 1.0
        shown = heat_to_frame(heat, box)
        assert shown.sum().item() == pytest.approx(9 / 64, rel=0.05)  # the spot's mean over the picture's pixels, kept


def test_the_scale_of_a_sparse_map_is_its_peak_and_float64_beyond_float32_is_coloured():
    """Under 0.5 % of pixels non-zero: the 99.5 % quantile is 0, and -1e-9 of rounding noise was
    drawn as strong as the +1 evidence. A float64 map past float32's range was drawn white."""
    from rsp_fast.render import symmetric_scale

    for side in (100, 1201):  # the larger is sampled on a grid that misses the evidence
        heat = np.zeros((side, side))
        heat[1, 1:4], heat[50, 50] = 1.0, -1e-9
        assert symmetric_scale(heat) == 1.0
        assert colorize(heat, 1.0)[50, 50].tolist() == [255, 255, 255]
    huge = np.array([[1e300, -1e300, 0.0]])
    assert colorize(huge, symmetric_scale(huge)).tolist() == [[[255, 0, 0], [0, 0, 255], [255, 255, 255]]]


def test_no_label_covers_a_third_of_a_small_picture():
    from rsp_fast.render import draw_label

    small, tall = np.full((40, 60, 3), 100, np.uint8), np.full((240, 60, 3), 100, np.uint8)
    assert np.array_equal(draw_label(small.copy(), "tabby"), small)
    assert (draw_label(tall.copy(), "tabby")[:12] == 0).any()  # a picture big enough still gets its band


def test_names_that_are_not_utf8_are_read_and_written(tmp_path):
    """Linux file names are bytes: a Latin-1 name (Python's surrogate escapes) crashed every
    command with UnicodeEncodeError before any work."""
    import os

    folder = Path(os.fsdecode(bytes(tmp_path) + b"/caf\xe9"))
    folder.mkdir()
    _png(folder / os.fsdecode(b"th\xe9.png"))
    proc = subprocess.run([sys.executable, "-m", "rsp_fast", "image", str(folder), "-o", str(folder / "out"),
                           "--model", "models:tiny_cnn"], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)})
    assert proc.returncode == 0, proc.stderr
    assert (folder / "out" / os.fsdecode(b"th\xe9_overlay.png")).is_file()


def test_colormap_is_diverging_and_centred():
    rgb = colorize(np.array([[-1.0, 0.0, 1.0]]), 1.0)
    assert rgb[0, 0].tolist() == [0, 0, 255] and rgb[0, 1].tolist() == [255, 255, 255] and rgb[0, 2].tolist() == [255, 0, 0]


def test_colour_tables_match_the_pixelwise_formulas():
    """The overlay and colours come from quantised tables (fast on HD frames): within one unit
    of 255 of the formulas evaluated per pixel in float64 (three for the blend: α = √|v| is
    steep near 0); the scale, sampled on large maps, within 1 % of the exact quantile."""
    from rsp_fast.render import overlay, symmetric_scale
    rng = np.random.default_rng(3)
    heat = rng.standard_normal((600, 900)) ** 3
    frame = rng.integers(0, 256, (600, 900, 3), dtype=np.uint8)
    scale = symmetric_scale(heat)
    exact = np.quantile(np.abs(heat), 0.995)
    assert abs(scale - exact) < 0.01 * exact
    v = np.clip(heat / scale, -1, 1)
    pos, neg = np.clip(v, 0, 1), np.clip(-v, 0, 1)
    colour = np.stack([1 - neg, 1 - pos - neg, 1 - pos], -1) * 255
    assert np.abs(colorize(heat, scale).astype(float) - colour).max() <= 1.0
    alpha = 0.75 * np.sqrt(np.abs(v))[..., None]
    blend = (frame.mean(-1, keepdims=True) * 0.6 + 40) * (1 - alpha) + np.rint(colour) * alpha
    assert np.abs(overlay(frame, heat, scale).astype(float) - blend).max() <= 3.0


def test_device_auto_is_the_gpu_where_there_is_one(monkeypatch):
    """The commands' default device: "auto", CUDA where torch sees a GPU, else the CPU."""
    from rsp_fast.cli import build_parser
    from rsp_fast.models import checked_device
    assert build_parser().parse_args(["video", "a.mp4", "-o", "b.mp4"]).device == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert checked_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert checked_device("auto") == torch.device("cuda")


def test_a_png_that_cannot_be_written_is_named_and_leaves_nothing(tmp_path, monkeypatch):
    import errno
    from PIL import Image
    from rsp_fast.errors import RSPError
    from rsp_fast.render import save_png

    def full_disk(self, fp, *a, **k):
        open(fp, "wb").write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full_disk)
    with pytest.raises(RSPError, match=r"cannot write '.*map.png': No space left on device"):
        save_png(tmp_path / "map.png", np.zeros((4, 4, 3), np.uint8))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("stem", ["m" * 246, "é" * 123], ids=["ascii", "two-byte"])
def test_outputs_with_names_near_the_limit_are_written(tmp_path, stem):
    """An output whose name is allowed (250 bytes) is written: its temporary sibling fits the
    file system's 255 bytes too, hidden and this process's own."""
    from rsp_fast.paths import NAME_MAX, temporary_sibling
    from rsp_fast.render import save_png

    path = tmp_path / f"{stem}.png"
    tmp = temporary_sibling(path, ".png")
    assert len(tmp.name.encode()) <= NAME_MAX and tmp.name.startswith(".") and tmp.suffix == ".png"
    assert tmp != temporary_sibling(tmp_path / f"{stem}x.png", ".png")  # the cut names stay apart
    save_png(path, np.zeros((4, 4, 3), np.uint8))
    assert [f.name for f in tmp_path.iterdir()] == [path.name]


def test_a_report_that_cannot_be_written_is_named(tmp_path, monkeypatch):
    import errno
    from pathlib import Path

    from rsp_fast.cli import _write_report

    def full_disk(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(RSPError, match=r"cannot write report '.*r.json': No space left on device"):
        _write_report({}, tmp_path / "r.json")
    assert list(tmp_path.iterdir()) == []


def test_images_are_not_taken_for_one_clip_of_a_video_classifier(tmp_path):
    """A video classifier would take each batch of unrelated images for one clip (one label
    for all): the image command refuses it by name before writing anything."""
    from models import tiny_clip_spec

    from rsp_fast.images import explain_images

    spec = tiny_clip_spec()
    pictures = [("black", np.zeros((32, 32, 3), np.uint8)), ("white", np.full((32, 32, 3), 255, np.uint8))]
    with pytest.raises(RSPError, match="Sequential is a video classifier"):
        explain_images(spec, rsp_fast.RSP(spec.model.eval()), pictures, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_a_reader_that_stops_early_ends_the_run_quietly(tmp_path, monkeypatch, capsys):
    """`rsp-fast info | head -1`: the pipe closes under the writer; no error line, the status
    of a program ended by SIGPIPE."""
    import signal

    sink = open(tmp_path / "sink", "w")

    class ClosedPipe:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            pass

        def fileno(self):
            return sink.fileno()
    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert main(["info"]) == 128 + signal.SIGPIPE
    assert capsys.readouterr().err == ""
    sink.close()


def test_the_command_line_module_does_not_import_torch():
    """torch is imported inside main(), where a Ctrl-C during its import stops cleanly: the
    package loads its torch-based names on first use."""
    code = "import sys, rsp_fast.cli; assert 'torch' not in sys.modules; import rsp_fast; rsp_fast.RSP, rsp_fast.memory"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    with pytest.raises(AttributeError, match="no attribute 'nosuch'"):
        rsp_fast.nosuch


@pytest.mark.parametrize("module", ["PIL", "torchvision"])
def test_a_missing_optional_dependency_is_one_line_with_its_install_command(tmp_path, capsys, monkeypatch, module):
    """Pillow (for the pictures) and torchvision (for --model vgg16) come with the video extra:
    without them a command ends in one line that names the package, not a traceback."""
    photo = _png(tmp_path / "a.png")
    if module == "PIL":  # the photo is written first: Pillow is gone only for the command
        argv = ["image", str(photo), "-o", str(tmp_path / "out")]
    else:
        argv = ["image", str(photo), "-o", str(tmp_path / "out"), "--model", "vgg16"]
    for name in {module, *(m for m in sys.modules if m.startswith(module + "."))}:  # imported by now or not
        monkeypatch.setitem(sys.modules, name, None)  # what an environment without it raises on import
    assert main(argv) == 2
    err = capsys.readouterr().err
    dist = {"PIL": "pillow", "torchvision": "torchvision"}[module]
    assert err.startswith("rsp-fast: error: ") and f"pip install {dist}" in err and "Traceback" not in err


@pytest.mark.parametrize("module, version", [("PIL", "10.0.1"), ("av", "16.1.0")])
def test_an_optional_dependency_too_old_for_what_is_used_is_named_with_the_version_needed(tmp_path, capsys,
                                                                                         monkeypatch, module, version):
    """Pillow before 10.1 ignored the label's font size; PyAV before 17 has no colour tags on
    frames (the encoder failed with an AttributeError from inside)."""
    import importlib

    from rsp_fast.video.io import write_video

    photo = _png(tmp_path / "a.png")
    src = write_video(tmp_path / "in.mp4", [np.zeros((32, 32, 3), np.uint8)] * 2, fps=2)
    monkeypatch.setattr(importlib.import_module(module), "__version__", version)  # the inputs are made by now
    argv = ["image", str(photo), "-o", str(tmp_path / "out")] if module == "PIL" else \
        ["video", str(src), "-o", str(tmp_path / "out.mp4"), "--model", "models:tiny_cnn"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    dist = {"PIL": "pillow", "av": "av"}[module]
    assert f"needs {dist} " in err and f"{version} is installed" in err and f"pip install --upgrade '{dist}>=" in err
    assert not (tmp_path / "out.mp4").exists()


def test_an_optional_dependency_that_is_installed_but_does_not_import_is_one_line(tmp_path):
    """A PyAV built against an FFmpeg since replaced, a Pillow whose C part does not load: an
    ImportError (not ModuleNotFoundError), which ended the command with a traceback."""
    photo = _png(tmp_path / "a.png")
    (tmp_path / "stubs" / "PIL").mkdir(parents=True)
    (tmp_path / "stubs" / "PIL" / "__init__.py").write_text('raise ImportError("libtiff.so.6: cannot open shared object file")')
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "stubs")}
    proc = subprocess.run([sys.executable, "-m", "rsp_fast", "image", str(photo), "-o", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "pillow, which is installed but does not import (libtiff.so.6" in proc.stderr
    assert "pip install --force-reinstall pillow" in proc.stderr and "Traceback" not in proc.stderr


def test_safetensors_weights_without_safetensors_say_so(tmp_path, monkeypatch):
    from rsp_fast.models import load_state_dict_file

    path = tmp_path / "w.safetensors"
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(RSPError, match=r"reading \.safetensors weights needs safetensors, which is not installed"):
        load_state_dict_file(path)


def test_info_says_what_this_installation_runs(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"rsp-fast {rsp_fast.__version__}, torch {torch.__version__}")
    assert "rsp_fast._C: " in out and "backends on cpu (" in out
    for backend, status in rsp_fast.backends("cpu").items():  # each with its reason where it cannot run
        assert f"  {backend:<7} {status}\n" in out


def test_the_console_script_imports_a_factory_from_the_current_folder(tmp_path):
    """`python -m rsp_fast` has the current folder on sys.path, the `rsp-fast` script its own
    bin folder: `--model mymodels:small` beside the picture worked with one and not the other."""
    script = Path(sys.executable).with_name("rsp-fast")
    if not script.exists():
        pytest.skip("rsp-fast is not installed beside this Python")
    (tmp_path / "mymodels.py").write_text(
        "import torch.nn as nn\n"
        "class Small(nn.Sequential):\n"
        "    def forward(self, x):\n"
        "        from scaling import halve  # a module beside it, imported when the model runs\n"
        "        return super().forward(halve(x))\n"
        "def small():\n"
        "    return Small(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))\n")
    (tmp_path / "scaling.py").write_text("def halve(x):\n    return x * 0.5\n")
    _png(tmp_path / "a.png")
    proc = subprocess.run([str(script), "image", "a.png", "-o", "out", "--model", "mymodels:small"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "a_heatmap.png").exists() and str(tmp_path) not in sys.path


def test_a_failed_demo_leaves_nothing_behind(tmp_path, capsys):
    """The demo writes its input clip first: a run that failed after it (a class the model does
    not have) left the clip and the folders it made."""
    out = tmp_path / "new" / "demo"
    assert main(["demo", "-o", str(out), "--target", "5000", "--device", "cpu", "--quiet"]) == 2
    assert "5000" in capsys.readouterr().err and list(tmp_path.iterdir()) == []
    out.mkdir(parents=True)
    (out / "mine.txt").write_text("kept")
    assert main(["demo", "-o", str(out), "--target", "5000", "--device", "cpu", "--quiet"]) == 2
    assert [p.name for p in out.iterdir()] == ["mine.txt"]


@pytest.mark.parametrize("command, folder, message", [
    ("image", "report.json", "report '{out}/report.json' is a folder"),
    ("image", "a_overlay.png", "output '{out}/a_overlay.png' is a folder"),
    ("image", "contact_sheet.png", "contact sheet '{out}/contact_sheet.png' is a folder"),
    ("demo", "report.json", "report '{out}/report.json' is a folder"),
    ("demo", "contact_sheet.png", "contact sheet '{out}/contact_sheet.png' is a folder"),
    ("demo", "demo_rsp.mp4", "output video '{out}/demo_rsp.mp4' is a folder"),
    ("demo", "demo_input.mp4", "demo clip '{out}/demo_input.mp4' is a folder"),
])
def test_image_and_demo_outputs_are_checked_before_any_work(tmp_path, monkeypatch, capsys, command, folder, message):
    """Their own outputs (the maps, the contact sheet, the default report) were checked only
    when written: a folder there failed the run at its end, the demo's clip and video left."""
    import rsp_fast.cli

    def no_model(args):
        raise AssertionError("the model was built before the outputs were checked")
    monkeypatch.setattr(rsp_fast.cli, "_spec", no_model)
    out = tmp_path / "out"
    (out / folder).mkdir(parents=True)
    argv = ["image", str(_png(tmp_path / "a.png"))] if command == "image" else ["demo", "--quiet"]
    assert main([*argv, "-o", str(out), "--device", "cpu"]) == 2
    assert capsys.readouterr().err.startswith(f"rsp-fast: error: {message.format(out=out)}")
    assert [p.name for p in out.iterdir()] == [folder]


def test_image_outputs_that_are_links_get_their_targets(tmp_path):
    """A map or the report that is a symbolic link: the rename into place replaced the link
    with a file (the video's output kept its link, as the README says of every output)."""
    elsewhere, out = tmp_path / "elsewhere", tmp_path / "out"
    elsewhere.mkdir(), out.mkdir()
    (elsewhere / "keep.png").write_text("old"), (elsewhere / "rep.json").write_text("old")
    (out / "a_heatmap.png").symlink_to(elsewhere / "keep.png")
    (out / "report.json").symlink_to(elsewhere / "rep.json")
    assert main(["image", str(_png(tmp_path / "a.png")), "-o", str(out), "--model", "models:tiny_cnn", "--device", "cpu"]) == 0
    assert (out / "a_heatmap.png").is_symlink() and (out / "report.json").is_symlink()
    assert Image.open(elsewhere / "keep.png").size == (40, 30)
    assert json.loads((elsewhere / "rep.json").read_text())["images"][0]["name"] == "a"


def test_a_demo_that_fails_writing_its_clip_leaves_nothing_behind(tmp_path, monkeypatch):
    """A full disk (or Ctrl-C) while the clip was written left the folders the demo made."""
    import rsp_fast.video

    def disk_full(path, *args, **kwargs):
        raise RSPError(f"cannot write video {str(path)!r}: No space left on device")

    monkeypatch.setattr(rsp_fast.video, "make_demo_clip", disk_full)
    assert main(["demo", "-o", str(tmp_path / "new" / "demo"), "--device", "cpu", "--quiet"]) == 2
    assert list(tmp_path.iterdir()) == []


class _FullStream(io.StringIO):
    """A standard output on a full disk."""

    def write(self, text):
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_stdout_that_cannot_be_written_is_named_with_what_it_was_to_say(tmp_path, monkeypatch, capsys):
    """A run whose files were written but whose summary could not be printed said only "No space
    left on device", read as the run's own failure (a script would redo a good video)."""
    folder = tmp_path / "in"
    folder.mkdir()
    _png(folder / "cat.png")
    monkeypatch.setattr(sys, "stdout", _FullStream())
    assert main(["info"]) == 2
    assert "cannot write to standard output (No space left on device); it was to say: rsp-fast " in capsys.readouterr().err
    assert main(["image", str(folder), "-o", str(tmp_path / "out"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "cannot write to standard output (No space left on device); it was to say: cat: " in err
    assert (tmp_path / "out" / "cat_heatmap.png").is_file() and (tmp_path / "out" / "report.json").is_file()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
def test_a_full_stdout_is_one_line_and_status_2_with_buffered_output(tmp_path):
    """With stdout buffered (a file, not a terminal) the line that failed stayed in the buffer:
    the flush at exit failed again, with a traceback and status 120."""
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}, **_THIS_PACKAGE}
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-m", "rsp_fast", "info"], stdout=full, stderr=subprocess.PIPE, text=True,
                              cwd=tmp_path, env=env)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [proc.stderr.splitlines()[0]]
    assert proc.stderr.startswith("rsp-fast: error: cannot write to standard output (No space left on device)")


@pytest.mark.parametrize("output", ["same", "same/.", "link"])
def test_an_output_folder_that_is_an_input_folder_is_refused(tmp_path, monkeypatch, capsys, output):
    """Its maps went among the pictures, and the same command then refused them as inputs."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "same").mkdir()
    (tmp_path / "link").symlink_to("same")
    _png(tmp_path / "same" / "cat.png")
    assert main(["image", "same", "-o", output]) == 2
    assert f"output folder '{output}' is the input folder 'same'" in capsys.readouterr().err
    assert [f.name for f in (tmp_path / "same").iterdir()] == ["cat.png"]


def test_an_output_path_whose_temporary_file_would_be_too_long_is_refused_before_work(tmp_path):
    """A legal 4095-byte output path failed at its first write ("File name too long"), after the
    model was built: the temporary file beside it adds some 20 bytes."""
    from rsp_fast.paths import PATH_MAX, checked_output_file
    from rsp_fast.render import save_png

    def path_of(length):
        folder, room = tmp_path.resolve(), length - len(str(tmp_path.resolve())) - len("/m.png")
        while room > 0:
            part = "d" * min(200, room - 1) if room > 1 else ""
            folder, room = (folder / part, room - len(part) - 1) if part else (folder, 0)
        path = folder / ("m" * (length - len(str(folder)) - 1 - len(".png")) + ".png")
        assert len(str(path)) == length
        return path

    longest = PATH_MAX - 1 - len(f"..tmp-{os.getpid()}.png")  # "/.NAME.tmp-PID.png" beside "/NAME"
    with pytest.raises(RSPError, match=f"would have a path of {longest + 1 + len(f'..tmp-{os.getpid()}.png')} bytes, "
                                       f"more than the {PATH_MAX - 1} the system takes"):
        checked_output_file(path_of(longest + 1), "output video")
    fits = checked_output_file(path_of(longest), "output video")
    fits.parent.mkdir(parents=True)
    save_png(fits, np.zeros((4, 4, 3), np.uint8))  # the longest path allowed is written
    assert [f.name for f in fits.parent.iterdir()] == [fits.name]
