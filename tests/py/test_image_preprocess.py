"""`mxlm image-preprocess` against Pillow (resampling, alpha compositing, decoding) and an independent NumPy
implementation of the official MiniMax-M3 processor (smart_resize, CLIP normalisation, merge-window patches)."""
import io
import json
import math
import os
import subprocess

import numpy as np
import pytest
from PIL import Image

MXLM = os.environ.get("MXLM_BIN", "mxlm")
MEAN = [0.48145466, 0.4578275, 0.40821073]
STD = [0.26862954, 0.26130258, 0.27577711]


def load_npy(path):
    return np.load(path)


def make_image(w, h, seed, mode="RGB"):
    """A deterministic image with smooth gradients, hard edges and noise (all three stress the filter)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 127.5 + 127.5 * np.sin(x / max(w, 1) * 7.0 + seed)
    g = 255.0 * ((x + y) % 17 < 8)
    b = rng.integers(0, 256, size=(h, w))
    arr = np.stack([r, g, b], axis=-1)
    arr = np.clip(np.round(arr), 0, 255).astype(np.uint8)
    if mode == "RGBA":
        a = rng.integers(0, 256, size=(h, w, 1)).astype(np.uint8)
        arr = np.concatenate([arr, a], axis=-1)
    return Image.fromarray(arr, mode)


def save(img, path, fmt="PNG", **kw):
    img.save(path, fmt, **kw)
    return str(path)


def run(*args, check=True):
    p = subprocess.run([MXLM, "image-preprocess", *map(str, args)], capture_output=True, text=True)
    if check and p.returncode != 0:
        raise AssertionError(p.stderr)
    return p


def mxlm_resize(tmp_path, img_path, w, h):
    out = tmp_path / "r.npy"
    run("--image", img_path, "--resize", f"{w}x{h}", "--resized-output", out)
    return load_npy(out).astype(np.uint8)


# (source w, h) -> [(target w, h)]: downscale by many factors, upscale, one axis only, extreme ratios, 1 px.
RESIZE_CASES = [
    ((640, 480), [(644, 476), (320, 240), (333, 101), (1000, 700), (640, 200), (100, 480), (1, 1), (3, 640)]),
    ((517, 733), [(504, 728), (56, 56), (728, 504), (517, 28)]),
    ((70, 42), [(56, 56), (28, 28), (140, 84), (1900, 3)]),
    ((1, 1), [(28, 28), (5, 3)]),
    ((19, 2), [(56, 28), (19, 200)]),
    ((1000, 10), [(112, 28), (999, 11)]),
    ((257, 1023), [(28, 112), (252, 1008), (84, 196)]),
]


@pytest.mark.parametrize("src,targets", RESIZE_CASES)
def test_resize_matches_pillow_bytes(tmp_path, src, targets):
    img = make_image(*src, seed=src[0] * 7 + src[1])
    path = save(img, tmp_path / "in.png")
    for w, h in targets:
        ours = mxlm_resize(tmp_path, path, w, h)
        ref = np.asarray(img.resize((w, h), Image.BICUBIC))
        assert ours.shape == ref.shape
        diff = np.argwhere(ours != ref)
        assert diff.size == 0, f"{src}->{(w, h)}: {len(diff)} bytes differ, first at {diff[0]}"


def test_resize_random_sizes_match_pillow(tmp_path):
    rng = np.random.default_rng(1234)
    for i in range(12):
        sw, sh = (int(v) for v in rng.integers(1, 400, size=2))
        tw, th = (int(v) for v in rng.integers(1, 500, size=2))
        img = make_image(sw, sh, seed=i)
        path = save(img, tmp_path / f"in{i}.png")
        ours = mxlm_resize(tmp_path, path, tw, th)
        ref = np.asarray(img.resize((tw, th), Image.BICUBIC))
        assert np.array_equal(ours, ref), f"{(sw, sh)}->{(tw, th)}"


def smart_resize_ref(height, width, factor=28, min_pixels=3136, max_pixels=451584):
    """The official MiniMax processor's smart_resize (shared/spec/m3_vision.md §2.2a), in Python."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError("aspect")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


# The spec's §2.7 table: (H, W) -> (h, w).
SPEC_TABLE = [
    ((480, 640), (476, 644)), ((720, 1280), (504, 896)), ((1080, 1920), (504, 896)), ((2048, 2048), (672, 672)),
    ((1024, 768), (756, 560)), ((3000, 4000), (560, 756)), ((517, 733), (504, 728)), ((300, 400), (308, 392)),
    ((224, 224), (224, 224)), ((42, 70), (56, 56)), ((70, 98), (56, 112)), ((10, 100), (28, 112)),
    ((100, 19000), (28, 9240)),
]


def reference_pixel_values(img, h, w):
    """Pillow resize + the transformers fast path's fused normalisation + HF patchify, in NumPy."""
    arr = np.asarray(img.resize((w, h), Image.BICUBIC)).astype(np.float32).transpose(2, 0, 1)  # C, H, W
    mean = np.array(MEAN, np.float32) * np.float32(255)
    std = np.array(STD, np.float32) * np.float32(255)
    norm = (arr - mean[:, None, None]) / std[:, None, None]
    frames = np.stack([norm, norm])  # temporal duplication: (2, C, H, W)
    gh, gw = h // 14, w // 14
    p = frames.reshape(1, 2, 3, gh // 2, 2, 14, gw // 2, 2, 14).transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return p.reshape(gh * gw, 3 * 2 * 14 * 14), norm


@pytest.mark.parametrize("hw,expected", SPEC_TABLE)
def test_smart_resize_table_and_pixel_values(tmp_path, hw, expected):
    H, W = hw
    assert smart_resize_ref(H, W) == expected
    img = make_image(W, H, seed=H + W)
    path = save(img, tmp_path / "in.png")
    pv = tmp_path / "pv.npy"
    rs = tmp_path / "rs.npy"
    summary = json.loads(run("--image", path, "--pixel-values-output", pv, "--resized-output", rs).stdout)
    h, w = expected
    assert (summary["resized_height"], summary["resized_width"]) == (h, w)
    assert summary["grid_thw"] == [1, h // 14, w // 14]
    assert summary["image_tokens"] == (h // 28) * (w // 28)
    ref, norm = reference_pixel_values(img, h, w)
    ours = load_npy(pv)
    assert ours.shape == ref.shape
    assert np.array_equal(ours, ref)
    # The unfused form (x/255 - mean)/std agrees to float32 rounding.
    arr = np.asarray(img.resize((w, h), Image.BICUBIC)).astype(np.float64).transpose(2, 0, 1) / 255.0
    unfused = (arr - np.array(MEAN)[:, None, None]) / np.array(STD)[:, None, None]
    assert np.max(np.abs(unfused - norm)) < 1e-5


def test_smart_resize_many_sizes(tmp_path):
    rng = np.random.default_rng(7)
    sizes = [(int(a), int(b)) for a, b in rng.integers(1, 3000, size=(20, 2))]
    # Half-way cases of the first rounding (x/28 = k + 0.5), the pixel bounds exactly, tiny sides, min upscale.
    sizes += [(14, 14), (42, 42), (70, 70), (98, 42), (56, 56), (28, 112), (13, 13), (1, 200), (200, 1),
              (672, 672), (673, 673), (686, 658), (3, 5), (55, 57), (5, 1000)]
    for H, W in sizes:
        if max(H, W) / min(H, W) > 200:
            continue
        img = make_image(W, H, seed=H * 3 + W)
        path = save(img, tmp_path / "in.png")
        summary = json.loads(run("--image", path).stdout)
        assert (summary["resized_height"], summary["resized_width"]) == smart_resize_ref(H, W), (H, W)


def test_custom_bounds_and_preprocessor_config(tmp_path):
    img = make_image(800, 600, seed=3)
    path = save(img, tmp_path / "in.png")
    s = json.loads(run("--image", path, "--max-pixels", 100000).stdout)
    assert (s["resized_height"], s["resized_width"]) == smart_resize_ref(600, 800, max_pixels=100000)
    model = tmp_path / "model"
    model.mkdir()
    (model / "preprocessor_config.json").write_text(json.dumps({"min_pixels": 3136, "max_pixels": 200704}))
    s = json.loads(run("--image", path, "--model", model).stdout)
    assert (s["resized_height"], s["resized_width"]) == smart_resize_ref(600, 800, max_pixels=200704)
    (model / "preprocessor_config.json").write_text(json.dumps({"size": {"shortest_edge": 3136,
                                                                          "longest_edge": 50176}}))
    s = json.loads(run("--image", path, "--model", model).stdout)
    assert (s["resized_height"], s["resized_width"]) == smart_resize_ref(600, 800, max_pixels=50176)


def test_aspect_ratio_over_200_is_an_error(tmp_path):
    path = save(make_image(201, 1, seed=1), tmp_path / "in.png")
    p = run("--image", path, check=False)
    assert p.returncode != 0 and "aspect ratio" in p.stderr


def decoded(tmp_path, path):
    """Decoded pixels (through an identity resize, which is a copy)."""
    s = json.loads(run("--image", path).stdout)
    return mxlm_resize(tmp_path, path, s["width"], s["height"])


def test_rgba_composited_on_white_like_vllm(tmp_path):
    img = make_image(37, 23, seed=5, mode="RGBA")
    path = save(img, tmp_path / "in.png")
    ref = Image.new("RGB", img.size, (255, 255, 255))
    ref.paste(img, mask=img.split()[3])  # vLLM's rgba_to_rgb
    assert np.array_equal(decoded(tmp_path, path), np.asarray(ref))


@pytest.mark.parametrize("fmt,kw", [("BMP", {}), ("WEBP", {"lossless": True}), ("PNG", {"optimize": True})])
def test_lossless_formats_decode_exactly(tmp_path, fmt, kw):
    img = make_image(45, 31, seed=11)
    path = save(img, tmp_path / f"in.{fmt.lower()}", fmt, **kw)
    assert np.array_equal(decoded(tmp_path, path), np.asarray(Image.open(path).convert("RGB")))


def test_webp_with_alpha(tmp_path):
    img = make_image(20, 16, seed=2, mode="RGBA")
    path = save(img, tmp_path / "in.webp", "WEBP", lossless=True)
    ref = Image.new("RGB", img.size, (255, 255, 255))
    src = Image.open(path)
    ref.paste(src, mask=src.split()[3])
    assert np.array_equal(decoded(tmp_path, path), np.asarray(ref))


def test_gif_first_frame(tmp_path):
    frames = [make_image(24, 18, seed=s).quantize(colors=64, dither=Image.Dither.NONE) for s in (1, 2)]
    path = tmp_path / "in.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100)
    ref = np.asarray(Image.open(path).convert("RGB"))
    assert np.array_equal(decoded(tmp_path, str(path)), ref)


def test_jpeg_and_lossy_webp_decode_close_to_pillow(tmp_path):
    # Different decoders (stb_image vs libjpeg-turbo) round their IDCT and chroma upsampling differently.
    img = make_image(64, 48, seed=9)
    for fmt, name in (("JPEG", "in.jpg"), ("WEBP", "in.webp")):
        path = save(img, tmp_path / name, fmt, quality=90)
        ours = decoded(tmp_path, path).astype(int)
        ref = np.asarray(Image.open(path).convert("RGB")).astype(int)
        assert ours.shape == ref.shape
        assert np.mean(np.abs(ours - ref)) < 2.0, fmt


@pytest.mark.parametrize("content,message", [
    (b"", "empty"),
    (b"hello world, not an image", "unsupported image format"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR\x00\x00", "corrupt"),
    (b"\xff\xd8\xff\xe0garbage", "corrupt"),
    (b"RIFF\x10\x00\x00\x00WEBPVP8 garbage", "WebP"),
])
def test_bad_images_are_clear_errors(tmp_path, content, message):
    path = tmp_path / "bad.bin"
    path.write_bytes(content)
    p = run("--image", path, check=False)
    assert p.returncode != 0
    assert message in p.stderr, p.stderr
    assert "bad.bin" in p.stderr


def test_truncated_png_is_an_error(tmp_path):
    buf = io.BytesIO()
    make_image(64, 64, seed=1).save(buf, "PNG")
    path = tmp_path / "trunc.png"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    p = run("--image", path, check=False)
    assert p.returncode != 0 and "corrupt" in p.stderr
