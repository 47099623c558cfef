"""Builds tests/fixtures/vision/ with transformers 5.17 as the reference for the MiniMax-M3 image path.

A small random MiniMaxM3 (text as tools/gen_m3_fixtures.py's "dense" fixture, a 2-layer vision tower with
head_dim 20 so that, as in the real 80-dim heads, 3D rotary covers all but 2 dims), with transformers' vision
rotary replaced by the spec's 3D t/h/w form (shared/spec/m3_vision.md §4.5; 5.17's axial 2D version is a
regression). One image per forward (5.17 would let several images attend to each other, §3.4).

Per image i (generated deterministically with NumPy + Pillow and saved as image_i.png):
- pixel_values_i.npy: the tower input, from Pillow's bicubic resize + the processor's normalisation/patchify;
- processor_pixel_values_i.npy: what transformers' own image processor produces (its resampler may differ from
  Pillow by 1-2 levels on a few pixels; reference.json records the difference);
- features_i.npy: the last encoder layer's output (no post-LayerNorm);
- merged_i.npy: the projector + merge output that replaces the image tokens;
- logits_i.npy: the language model's logits for reference.json's prompt tokens_i (with the image expanded).

Run on the GPU machine (no internet): python3 tools/gen_vision_fixtures.py --out tests/fixtures/vision
"""

import argparse
import inspect
import json
import math
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gen_m3_fixtures as m3  # noqa: E402

import transformers  # noqa: E402
from PIL import Image  # noqa: E402
from transformers.models.minimax_m3_vl import modeling_minimax_m3_vl as mm  # noqa: E402

MEAN = [0.48145466, 0.4578275, 0.40821073]
STD = [0.26862954, 0.26130258, 0.27577711]
START, END = 100, 101  # stand-ins for ]<]start of image[>[ / ]<]end of image[>[ in the 512-token vocabulary
IMAGE_TOKEN = m3.VOCAB - 2
# (width, height) of the test images: upscaled to the minimum, tall, wide, medium, round-half-even edge.
IMAGES = [(60, 40), (33, 90), (200, 50), (250, 180), (70, 42)]

TEXT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
            rotary_dim=16, dense_intermediate_size=96, intermediate_size=32, shared_intermediate_size=32,
            num_local_experts=4, num_experts_per_tok=2, moe_layer_freq=[0, 0], sparse_freq=[0, 0],
            block_size=4, topk_blocks=2, index_heads=2, index_dim=32)
VISION = {"hidden_size": 80, "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 4,
          "patch_size": 14, "image_size": 56, "num_channels": 3, "hidden_act": "gelu", "layer_norm_eps": 1e-5,
          "rope_theta": 10000.0, "position_embedding_type": "rope", "rope_mode": "3d",
          "img_token_compression_config": {"spatial_merge_size": 2, "temporal_patch_size": 2}}


class Spec3DRotary(torch.nn.Module):
    """m3_vision.md §4.2: per axis 2·((head_dim//3)//2) dims, frequencies theta^(-2j/axis_dim) for t, h and w,
    concatenated (t, h, w) and duplicated for rotate-half; the remaining head dims pass through."""

    def __init__(self, head_dim, theta):
        super().__init__()
        self.axis_dim = 2 * ((head_dim // 3) // 2)
        self.theta = theta

    def forward(self, x, position_ids):
        inv = 1.0 / (self.theta ** (torch.arange(0, self.axis_dim, 2, dtype=torch.float32) / self.axis_dim))
        ang = position_ids.to(torch.float32)[..., None] * inv.to(x.device)  # (N, 3, axis_dim/2)
        ang = ang.flatten(-2)
        ang = torch.cat([ang, ang], dim=-1)
        return ang.cos().to(x.dtype), ang.sin().to(x.dtype)


def smart_resize(height, width, factor=28, min_pixels=3136, max_pixels=451584):
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def make_image(w, h, seed):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 127.5 + 127.5 * np.sin(x / w * 6.0 + y / h * 3.0 + seed)
    g = 255.0 * (((x // 5) + (y // 7)) % 2)
    b = rng.integers(0, 256, size=(h, w))
    return Image.fromarray(np.clip(np.round(np.stack([r, g, b], -1)), 0, 255).astype(np.uint8), "RGB")


def pillow_pixel_values(img):
    h, w = smart_resize(img.height, img.width)
    arr = np.asarray(img.resize((w, h), Image.BICUBIC)).astype(np.float32).transpose(2, 0, 1)
    mean = np.array(MEAN, np.float32) * np.float32(255)
    std = np.array(STD, np.float32) * np.float32(255)
    norm = (arr - mean[:, None, None]) / std[:, None, None]
    frames = np.stack([norm, norm])
    gh, gw = h // 14, w // 14
    p = frames.reshape(1, 2, 3, gh // 2, 2, 14, gw // 2, 2, 14).transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return p.reshape(gh * gw, 1176), (1, gh, gw)


def reference_processor():
    import transformers.models.minimax_m3_vl as pkg
    names = []
    for modname in ["image_processing_minimax_m3_vl", "image_processing_minimax_m3_vl_fast"]:
        try:
            mod = __import__(f"transformers.models.minimax_m3_vl.{modname}", fromlist=["x"])
        except Exception as e:  # noqa: BLE001
            print("no", modname, e)
            continue
        for n in dir(mod):
            if n.endswith("ImageProcessor") or n.endswith("ImageProcessorFast") or n.endswith("ImageProcessorPil"):
                names.append((n, getattr(mod, n)))
    print("image processors:", [n for n, _ in names], "package:", [n for n in dir(pkg) if "Processor" in n])
    return names


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures/vision")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    print("transformers", transformers.__version__, "torch", torch.__version__, "Pillow", Image.__version__)
    for n in ["MiniMaxM3VLVisionRotaryEmbedding", "MiniMaxM3VLVisionModel", "MiniMaxM3VLMultiModalProjector"]:
        if hasattr(mm, n):
            src = inspect.getsource(getattr(mm, n))
            print(f"===== {n} =====\n{src[:3000]}")
    cfg_dict = m3.full_config_dict(TEXT)
    cfg_dict["vision_config"] = VISION
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(cfg_dict, f, indent=2)
    config = transformers.AutoConfig.from_pretrained(args.out)
    config._attn_implementation = "eager"
    for sub in ("text_config", "vision_config"):
        try:
            getattr(config, sub)._attn_implementation = "eager"
        except Exception:  # noqa: BLE001
            pass
    model = m3.model_class()(config).to(torch.float32).eval()
    gen = torch.Generator().manual_seed(4321)
    m3.randomize(model, gen)
    # The spec's 3D rotary instead of 5.17's axial 2D one.
    vt = model.model.vision_tower
    head_dim = VISION["hidden_size"] // VISION["num_attention_heads"]
    patched = 0
    for name, mod in list(vt.named_modules()):
        for cname, child in list(mod.named_children()):
            if "Rotary" in type(child).__name__:
                setattr(mod, cname, Spec3DRotary(head_dim, VISION["rope_theta"]))
                patched += 1
    print("rotary modules replaced:", patched)
    if not patched:
        print([(n, type(m).__name__) for n, m in vt.named_modules()][:40])
    assert patched >= 1
    state = model.state_dict()
    upstream = m3.to_upstream(state, cfg_dict["text_config"])
    upstream = {k: v.to(torch.float32) for k, v in upstream.items()}  # all f32 here: the check is f32 <= 1e-4
    from safetensors.torch import save_file
    save_file(upstream, os.path.join(args.out, "model.safetensors"), metadata={"format": "pt"})
    # The model must compute with exactly the weights we saved (vision ones went through bf16 in to_upstream).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "vision_tower" in name or "multi_modal_projector" in name:
                p.copy_(p.to(torch.bfloat16).to(torch.float32))

    captured = {}
    vt.register_forward_hook(lambda mod, inp, out: captured.__setitem__(
        "features", (out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]).detach()))
    model.model.multi_modal_projector.register_forward_hook(
        lambda mod, inp, out: captured.__setitem__("merged", out.detach()))

    processors = reference_processor()
    ref = {"generator": "tools/gen_vision_fixtures.py", "transformers": transformers.__version__,
           "torch": torch.__version__, "pillow": Image.__version__, "image_token": IMAGE_TOKEN, "start_token": START,
           "end_token": END, "images": []}
    tg = torch.Generator().manual_seed(77)
    for i, (w, h) in enumerate(IMAGES):
        img = make_image(w, h, seed=i + 1)
        img.save(os.path.join(args.out, f"image_{i}.png"))
        pv, grid = pillow_pixel_values(img)
        n_tokens = grid[1] * grid[2] // 4
        before = torch.randint(0, 90, (3 + i,), generator=tg).tolist()
        after = torch.randint(0, 90, (4,), generator=tg).tolist()
        tokens = before + [START] + [IMAGE_TOKEN] * n_tokens + [END] + after
        captured.clear()
        with torch.no_grad():
            out = model(input_ids=torch.tensor([tokens]), pixel_values=torch.from_numpy(pv),
                        image_grid_thw=torch.tensor([list(grid)]), use_cache=False)
        logits = out.logits[0].float().numpy()
        feats = captured["features"].reshape(-1, VISION["hidden_size"]).float().numpy()
        merged = captured["merged"].reshape(-1, TEXT["hidden_size"]).float().numpy()
        assert feats.shape[0] == pv.shape[0] and merged.shape[0] == n_tokens, (feats.shape, merged.shape)
        np.save(os.path.join(args.out, f"pixel_values_{i}.npy"), pv.astype(np.float32))
        np.save(os.path.join(args.out, f"features_{i}.npy"), feats.astype(np.float32))
        np.save(os.path.join(args.out, f"merged_{i}.npy"), merged.astype(np.float32))
        np.save(os.path.join(args.out, f"logits_{i}.npy"), logits.astype(np.float32))
        entry = {"file": f"image_{i}.png", "size": [w, h], "grid_thw": list(grid), "tokens": tokens,
                 "processors": {}}
        for pname, pcls in processors:
            try:
                proc = pcls()
                res = proc(images=[img], return_tensors="pt")
                ppv = res["pixel_values"].float().numpy()
                pgrid = res["image_grid_thw"].tolist()
                info = {"grid_thw": pgrid, "shape": list(ppv.shape)}
                if ppv.shape == pv.shape:
                    d = np.abs(ppv - pv)
                    info.update(max_abs_diff=float(d.max()), frac_diff=float((d > 0).mean()))
                    np.save(os.path.join(args.out, f"processor_pixel_values_{i}.npy"), ppv.astype(np.float32))
                entry["processors"][pname] = info
            except Exception as e:  # noqa: BLE001
                entry["processors"][pname] = {"error": repr(e)[:300]}
        print(i, (w, h), grid, n_tokens, entry["processors"], "feat", float(np.abs(feats).max()),
              "logit", float(np.abs(logits).max()), flush=True)
        ref["images"].append(entry)
    with open(os.path.join(args.out, "reference.json"), "w") as f:
        json.dump(ref, f, indent=1)
    print("vision fixtures written")


if __name__ == "__main__":
    main()
