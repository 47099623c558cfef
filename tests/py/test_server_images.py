"""Image input through `mxlm serve` with the official `openai` client, on a servable copy of the vision fixture (a
small random MiniMax-M3 with a vision tower, tests/fixtures/vision, checked against transformers by the model
tests) with the serve-tiny tokenizer and the M3 chat template: images as data: URIs (PNG, JPEG, GIF, WebP, BMP),
local files under --allowed-local-media-path, http URLs from a local http.server; the 400s that name the bad part;
usage.prompt_tokens against an independent count (Jinja2 + HF tokenizers for the text, the spec's smart_resize for
the image tokens); and proof that the image embeddings reach the model (other pixels, other logprobs; the same
pixels, the same logprobs and prefix-cache hits)."""
import base64
import http.server
import io
import json
import math
import os
import shutil
import struct
import sys
import threading
import time
import zlib

import openai
import pytest
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from PIL import Image
from tokenizers import Tokenizer

sys.path.insert(0, os.path.join(os.environ.get("MXLM_SOURCE_DIR", "."), "tests", "server"))
from serve_helpers import MODEL_NAME, SRC, Server, make_model  # noqa: E402
import make_serve_fixture  # noqa: E402  (on the path through serve_helpers)

VISION = os.path.join(SRC, "tests", "fixtures", "vision")
MAX_IMAGE_BYTES = 300_000
BLOCK = 4  # serve_helpers' --block-size


def make_vision_model(out):
    """The vision fixture's weights and config with the serve-tiny tokenizer and the M3 chat template. The fixture's
    config names image token 510 (its transformers run used raw ids); the tokenizer's ]<]image[>[ is what the
    template emits, so the copy names that one."""
    os.makedirs(out, exist_ok=True)
    tok = Tokenizer.from_file(os.path.join(make_serve_fixture.FIXTURE, "tokenizer.json"))
    with open(os.path.join(VISION, "config.json")) as f:
        config = json.load(f)
    config["image_token_index"] = tok.token_to_id("]<]image[>[")
    config["video_token_index"] = tok.token_to_id("]<]video[>[")
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    os.symlink(os.path.join(VISION, "model.safetensors"), os.path.join(out, "model.safetensors"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(make_serve_fixture.FIXTURE, name), os.path.join(out, name))
    shutil.copy(make_serve_fixture.TEMPLATE, os.path.join(out, "chat_template.jinja"))
    return out


# ---- independent references ----

def smart_resize(height, width, factor=28, min_pixels=3136, max_pixels=451584):
    """shared/spec/m3_vision.md §2.2a (the official processor; Python's round is half-even)."""
    assert max(height, width) / min(height, width) <= 200
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = math.floor(height / beta / factor) * factor
        w = math.floor(width / beta / factor) * factor
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def image_tokens(img):
    h, w = smart_resize(img.height, img.width)
    return (h // 28) * (w // 28)


def test_smart_resize_matches_the_spec_table():
    # m3_vision.md §2.7
    assert smart_resize(480, 640) == (476, 644)
    assert smart_resize(2048, 2048) == (672, 672)
    assert smart_resize(42, 70) == (56, 56)
    assert smart_resize(10, 100) == (28, 112)
    assert smart_resize(517, 733) == (504, 728)


def jinja_env():
    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    return env


def expected_prompt(model_dir, hf, messages, images):
    """Token ids of the chat template as transformers renders it (image parts as {"type": "image"}), and the
    prompt length once each placeholder becomes start + N image tokens + end."""
    with open(os.path.join(model_dir, "chat_template.jinja")) as f:
        template = jinja_env().from_string(f.read())
    plain = []
    for m in messages:
        m = dict(m)
        if isinstance(m.get("content"), list):
            m["content"] = [{"type": "image"} if p["type"] == "image_url" else p for p in m["content"]]
        plain.append(m)
    text = template.render(messages=plain, tools=None, add_generation_prompt=True, bos_token="]~!b[",
                           eos_token="[e~[", pad_token="]!p~[")
    ids = hf.encode(text, add_special_tokens=False).ids
    placeholder = hf.token_to_id("]<]image[>[")
    assert ids.count(placeholder) == len(images)
    return ids, len(ids) + sum(image_tokens(img) + 1 for img in images)


# ---- images ----

def picture(width, height, seed):
    """A smooth picture with some structure (compresses well, differs per seed)."""
    img = Image.new("RGB", (width, height))
    px = img.load()
    for y in range(height):
        for x in range(width):
            px[x, y] = ((x * 7 + seed * 40) % 256, (y * 5 + seed * 90) % 256, ((x + y) * 3 + seed * 13) % 256)
    return img


def encode(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def data_uri(img, fmt="PNG", mime=None):
    mime = mime or "image/" + fmt.lower()
    return f"data:{mime};base64," + base64.b64encode(encode(img, fmt)).decode()


def image_part(url):
    return {"type": "image_url", "image_url": {"url": url}}


def user(*parts):
    return {"role": "user", "content": [{"type": "text", "text": p} if isinstance(p, str) else p for p in parts]}


# ---- fixtures ----

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_vision_model(str(tmp_path_factory.mktemp("model") / "vision-tiny"))


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    (d / "allowed").mkdir()
    (d / "outside").mkdir()
    picture(64, 40, 3).save(d / "allowed" / "inside.png")
    picture(64, 40, 3).save(d / "outside" / "outside.png")
    os.symlink(d / "outside" / "outside.png", d / "allowed" / "link.png")
    return d


@pytest.fixture(scope="module")
def web(media_dir):
    """A local http.server: /small.jpg, /large.png (over --max-image-bytes), /slow.png (answers after 3 s)."""
    files = {"/small.jpg": encode(picture(50, 70, 4), "JPEG"),
             "/large.png": os.urandom(MAX_IMAGE_BYTES + 1000)}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/slow.png":
                time.sleep(3)
            body = files.get(self.path, files["/small.jpg"] if self.path == "/slow.png" else None)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            try:
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server gave up on it (too large)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", files
    httpd.shutdown()


@pytest.fixture(scope="module")
def server(model_dir, media_dir, tmp_path_factory):
    s = Server(model_dir, tmp_path_factory.mktemp("logs"),
               extra=["--allowed-local-media-path", str(media_dir / "allowed"), "--max-image-bytes",
                      str(MAX_IMAGE_BYTES), "--image-fetch-timeout", "1.5", "--limit-mm-per-prompt", '{"image": 5}'])
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.client(timeout=120)


@pytest.fixture(scope="module")
def hf(model_dir):
    return Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))


def chat(client, messages, **kw):
    args = dict(model=MODEL_NAME, messages=messages, max_tokens=3, temperature=0, logprobs=True, top_logprobs=5)
    args.update(kw)
    return client.chat.completions.create(**args)


def first_logprobs(r):
    return {t.token: t.logprob for t in r.choices[0].logprobs.content[0].top_logprobs}


def bad_request(client, messages):
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, messages)
    return e.value.message


# ---- tests ----

def test_two_images_as_data_uris_count_their_tokens(client, model_dir, hf):
    png, jpeg = picture(100, 60, 1), picture(90, 130, 2)
    messages = [user("Compare", image_part(data_uri(png)), "with", image_part(data_uri(jpeg, "JPEG")), "briefly.")]
    _, want = expected_prompt(model_dir, hf, messages, [png, jpeg])
    assert image_tokens(png) == 8 and image_tokens(jpeg) == 15  # 56x112 and 140x84
    r = chat(client, messages)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == want
    assert r.usage.completion_tokens == len(r.choices[0].logprobs.content)


def test_images_across_messages_and_sizes(client, model_dir, hf):
    # Below min_pixels (20x20 -> 56x56), above max_pixels (800x640 -> 728x588... per smart_resize), GIF, WebP, BMP.
    tiny, big, gif, webp, bmp = (picture(20, 20, 5), picture(800, 640, 6), picture(60, 45, 7), picture(70, 50, 8),
                                 picture(33, 90, 9))
    assert smart_resize(20, 20) == (56, 56)
    assert smart_resize(640, 800)[0] * smart_resize(640, 800)[1] <= 451584
    messages = [
        {"role": "system", "content": "You describe pictures."},
        user(image_part(data_uri(tiny)), "and", image_part(data_uri(big))),
        {"role": "assistant", "content": "Two pictures."},
        user("More:", image_part(data_uri(gif, "GIF")), image_part(data_uri(webp, "WEBP")),
             image_part(data_uri(bmp, "BMP")), "Which is largest?"),
    ]
    _, want = expected_prompt(model_dir, hf, messages, [tiny, big, gif, webp, bmp])
    r = chat(client, messages)
    assert r.usage.prompt_tokens == want


def test_rgba_is_composited_on_white(client):
    # A transparent PNG reads as white: the same logprobs as an opaque white picture of that size.
    clear = Image.new("RGBA", (56, 56), (10, 200, 30, 0))
    white = Image.new("RGB", (56, 56), (255, 255, 255))
    a = chat(client, [user("What colour?", image_part(data_uri(clear)))])
    b = chat(client, [user("What colour?", image_part(data_uri(white)))])
    assert first_logprobs(a) == pytest.approx(first_logprobs(b), abs=1e-5)


def test_gif_takes_its_first_frame(client):
    frames = [picture(56, 56, 20), picture(56, 56, 21), picture(56, 56, 22)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    animated = "data:image/gif;base64," + base64.b64encode(buf.getvalue()).decode()
    first = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")  # Pillow's decoding of frame 0
    second = Image.open(io.BytesIO(buf.getvalue()))
    second.seek(1)
    second = second.convert("RGB")
    assert first.tobytes() != second.tobytes()
    got = first_logprobs(chat(client, [user("Which?", image_part(animated))]))
    assert got == pytest.approx(first_logprobs(chat(client, [user("Which?", image_part(data_uri(first)))])), abs=1e-5)
    assert got != pytest.approx(first_logprobs(chat(client, [user("Which?", image_part(data_uri(second)))])),
                                abs=1e-4)


def test_tokenize_counts_the_image_tokens(server, model_dir, hf):
    img = picture(120, 90, 23)
    messages = [user("Count", image_part(data_uri(img)))]
    ids, want = expected_prompt(model_dir, hf, messages, [img])
    status, body = server.post("/tokenize", {"model": MODEL_NAME, "messages": messages})
    assert status == 200 and body["count"] == want
    n = image_tokens(img)
    at = ids.index(hf.token_to_id("]<]image[>["))
    assert body["tokens"][at:at + n + 2] == ([hf.token_to_id("]<]start of image[>[")] +
                                             [hf.token_to_id("]<]image[>[")] * n + [hf.token_to_id("]<]end of image[>[")])
    assert body["tokens"][:at] == ids[:at] and body["tokens"][at + n + 2:] == ids[at + 1:]


def test_limit_mm_per_prompt(client):
    img = image_part(data_uri(picture(30, 30, 24)))
    msg = bad_request(client, [user(img, img, img), user(img, img, img)])
    assert "At most 5 image(s)" in msg


def test_the_image_embeddings_reach_the_model(client, model_dir, hf):
    a, b = picture(84, 56, 11), picture(84, 56, 12)  # same size: identical prompt token ids
    prompt = lambda img: [user("Describe", image_part(data_uri(img)), "in one word.")]  # noqa: E731
    ids, n = expected_prompt(model_dir, hf, prompt(a), [a])
    image_at = ids.index(hf.token_to_id("]<]image[>["))  # the start token lands here, the image run after it
    ra = chat(client, prompt(a))
    rb = chat(client, prompt(b))
    assert ra.usage.prompt_tokens == rb.usage.prompt_tokens == n
    la, lb = first_logprobs(ra), first_logprobs(rb)
    assert la != pytest.approx(lb, abs=1e-4), "another picture must change the logits"
    # Same ids, other pixels: no cached block may hold image tokens.
    assert rb.usage.prompt_tokens_details.cached_tokens <= (image_at + 1) // BLOCK * BLOCK
    # The same picture again: the same logits, and every full block but the last comes from the prefix cache.
    ra2 = chat(client, prompt(a))
    assert first_logprobs(ra2) == pytest.approx(la, abs=1e-5)
    assert ra2.usage.prompt_tokens_details.cached_tokens == (n - 1) // BLOCK * BLOCK
    assert [t.token for t in ra2.choices[0].logprobs.content] == [t.token for t in ra.choices[0].logprobs.content]


def test_streaming_and_n_with_an_image(client, model_dir, hf):
    img = picture(70, 70, 13)
    messages = [user(image_part(data_uri(img)), "What is this?")]
    _, want = expected_prompt(model_dir, hf, messages, [img])
    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=3, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens == want
    r = chat(client, messages, n=2)
    assert len(r.choices) == 2 and r.usage.prompt_tokens == want
    assert r.choices[0].message.content == r.choices[1].message.content  # greedy, same image


def test_bad_images_are_400s_naming_the_part(client):
    good = image_part(data_uri(picture(40, 40, 1)))
    msg = bad_request(client, [user("hi"), user("look", good, image_part("data:image/png;base64," +
                                                                         base64.b64encode(b"not an image").decode()))])
    assert "messages[1].content[2]" in msg and "unsupported image format" in msg
    png = encode(picture(40, 40, 1), "PNG")
    msg = bad_request(client, [user(image_part("data:image/png;base64," + base64.b64encode(png[:60]).decode()))])
    assert "messages[0].content[0]" in msg and "corrupt" in msg
    msg = bad_request(client, [user("x", image_part("data:image/png;base64,"))])
    assert "messages[0].content[1]" in msg and "empty" in msg
    msg = bad_request(client, [user(image_part("data:image/png;base64,@@@@"))])
    assert "messages[0].content[0]" in msg and "base64" in msg
    # A PNG header claiming 20000x20000 pixels (over Pillow's decompression-bomb limit): refused before decoding.
    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data +  # noqa: E731
                                struct.pack(">I", zlib.crc32(kind + data)))
    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")
    msg = bad_request(client, [user(image_part("data:image/png;base64," + base64.b64encode(bomb).decode()))])
    assert "messages[0].content[0]" in msg and "too large" in msg
    msg = bad_request(client, [user(image_part(data_uri(picture(1000, 4, 1))))])  # aspect ratio 250 > 200
    assert "messages[0].content[0]" in msg
    msg = bad_request(client, [user("clip", {"type": "video_url", "video_url": {"url": "http://x/v.mp4"}})])
    assert "messages[0].content[1]" in msg and "video input is not supported" in msg
    msg = bad_request(client, [user(image_part("ftp://example.com/a.png"))])
    assert "messages[0].content[0]" in msg
    msg = bad_request(client, [user({"type": "image_url", "image_url": {}})])
    assert "messages[0].content[0]" in msg
    # The server still serves.
    assert chat(client, [user(good)]).usage.prompt_tokens > 0


def test_local_files_only_under_the_allowed_folder(client, media_dir):
    inside = media_dir / "allowed" / "inside.png"
    r = chat(client, [user(image_part("file://" + str(inside)))])
    assert r.usage.prompt_tokens > 0
    assert chat(client, [user(image_part(str(inside)))]).usage.prompt_tokens == r.usage.prompt_tokens
    msg = bad_request(client, [user("x", image_part("file://" + str(media_dir / "outside" / "outside.png")))])
    assert "messages[0].content[1]" in msg and "outside" in msg
    msg = bad_request(client, [user(image_part("file://" + str(media_dir / "allowed" / ".." / "outside" /
                                                               "outside.png")))])
    assert "outside" in msg
    msg = bad_request(client, [user(image_part("file://" + str(media_dir / "allowed" / "link.png")))])
    assert "outside" in msg  # a symlink out of the folder
    msg = bad_request(client, [user(image_part("file://" + str(media_dir / "allowed" / "missing.png")))])
    assert "does not exist" in msg


def test_http_urls_with_size_limit_and_timeout(client, web, model_dir, hf):
    base, files = web
    img = Image.open(io.BytesIO(files["/small.jpg"]))
    messages = [user("From the web:", image_part(base + "/small.jpg"))]
    _, want = expected_prompt(model_dir, hf, messages, [img])
    assert chat(client, messages).usage.prompt_tokens == want
    msg = bad_request(client, [user(image_part(base + "/large.png"))])
    assert "messages[0].content[0]" in msg and "larger than" in msg
    msg = bad_request(client, [user(image_part(base + "/missing.png"))])
    assert "404" in msg
    t0 = time.time()
    msg = bad_request(client, [user(image_part(base + "/slow.png"))])
    assert time.time() - t0 < 3.0 and "messages[0].content[0]" in msg


def without_vision_tower(model_dir):
    """Rewrites the model's safetensors without the vision tower, projector and merge tensors (raw bytes copied)."""
    path = os.path.join(model_dir, "model.safetensors")
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    keep, out, offset = {}, [], 0
    for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0] if kv[0] != "__metadata__" else -1):
        if name == "__metadata__":
            keep[name] = info
            continue
        if name.startswith(("vision_tower.", "multi_modal_projector.", "patch_merge_mlp.")):
            continue
        begin, end = info["data_offsets"]
        out.append(data[begin:end])
        keep[name] = dict(info, data_offsets=[offset, offset + end - begin])
        offset += end - begin
    head = json.dumps(keep).encode()
    head += b" " * (-len(head) % 8)
    os.remove(path)  # a link to the fixture
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head + b"".join(out))
    return model_dir


def test_a_model_without_vision_tower_refuses_images(tmp_path_factory):
    s = Server(without_vision_tower(make_model(tmp_path_factory.mktemp("text-model"))), tmp_path_factory.mktemp("logs"))
    try:
        c = s.client()
        msg = bad_request(c, [user("hi", image_part(data_uri(picture(40, 40, 1))))])
        assert "messages[0].content[1]" in msg and "no vision tower" in msg
        assert chat(c, [user("hi")]).usage.prompt_tokens > 0
    finally:
        s.stop()
