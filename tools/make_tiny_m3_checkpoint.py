#!/usr/bin/env python3
"""Writes a tiny checkpoint with the exact MiniMax-M3 tensor naming (shared/spec/m3_checkpoint.md §4) and random
BF16 weights (F32 router and score-correction bias), sharded with a model.safetensors.index.json, plus the
non-weight files a real checkpoint ships. Needs only numpy: the safetensors format is written by hand (numpy
has no bfloat16), byte-compatible with the `safetensors` package (header padded to 8 bytes with spaces).

Used by tools/quark_compare.sh (mxlm quantize vs AMD Quark) and the quantizer tests. Some expert weights get
hand-made blocks that exercise the MXFP4 corner cases: all-zero blocks, exact E2M1 ties, block maxima right at
the "even" rounding threshold (1.75 * 2^e), tiny and huge magnitudes.

usage: make_tiny_m3_checkpoint.py OUT_DIR [--layers 3] [--dense-layers 1] [--experts 4] [--hidden 64]
       [--vision-layers 2] [--shards 3] [--seed 0] [--scale 1.0]
"""
import argparse
import json
import os

import numpy as np


def to_bf16_bits(x):
    """float32 array -> uint16 bf16 bits, round to nearest even (NaN kept quiet)."""
    b = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    nan = (b & 0x7FFFFFFF) > 0x7F800000
    rounded = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(nan, ((b >> 16) | 0x40).astype(np.uint16), rounded)


def tensor_bytes(dtype, values):
    if dtype == "BF16":
        return to_bf16_bits(values).tobytes()
    if dtype == "F32":
        return np.ascontiguousarray(values, dtype="<f4").tobytes()
    if dtype == "F16":
        return np.ascontiguousarray(values, dtype="<f2").tobytes()
    raise ValueError(dtype)


def write_safetensors(path, tensors):
    """tensors: list of (name, dtype, shape, bytes). Laid out like the Python package: sorted by (-itemsize, name)."""
    size = {"BF16": 2, "F16": 2, "F32": 4, "U8": 1}
    order = sorted(tensors, key=lambda t: (-size[t[1]], t[0]))
    header, offset = {}, 0
    for name, dtype, shape, data in order:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for _, _, _, data in order:
            f.write(data)


def special_blocks(rng, rows, k):
    """A weight whose blocks cover MXFP4 corner cases, then random rows."""
    w = (rng.standard_normal((rows, k)) * 0.02).astype(np.float32)
    grid = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], dtype=np.float32)
    ties = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0], dtype=np.float32)
    if k >= 32 and rows >= 8:
        w[0, :32] = 0.0                                           # all-zero block
        w[1, :32] = np.resize(np.concatenate([ties, -ties]), 32) * 2.0**-3  # ties around the grid
        w[2, :32] = np.resize(np.concatenate([grid, -grid]), 32) * 2.0**5
        w[3, :32] = 0.01
        w[3, 5] = 1.75 * 2.0**-4                                  # block max exactly at the "even" threshold
        w[4, :32] = 0.01
        w[4, 7] = -1.7421875 * 2.0**-4                            # just below it (bf16-representable)
        w[5, :32] = 2.0**-130                                     # subnormal-only block
        w[6, :32] = rng.standard_normal(32).astype(np.float32) * 3.0e4  # large magnitudes
        w[7, :16] = 0.0
        w[7, 16:32] = -0.0
    return w


def build(args):
    rng = np.random.default_rng(args.seed)
    h = args.hidden
    heads, kv_heads, head_dim = 4, 1, 16
    idx_heads, idx_dim = 2, 16
    moe_inter, shared_inter, dense_inter = h // 2, h // 2, 3 * h // 2
    vocab = 256
    vh, vinter = 32, 64
    tensors = []  # (name, dtype, shape, values)

    def add(name, shape, dtype="BF16", values=None, std=0.02):
        if values is None:
            values = (rng.standard_normal(shape) * std * args.scale).astype(np.float32)
        tensors.append((name, dtype, tuple(shape), values))

    p = "language_model.model."
    add(p + "embed_tokens.weight", [vocab, h])
    add(p + "norm.weight", [h])
    add("language_model.lm_head.weight", [vocab, h])
    for i in range(args.layers):
        lp = f"{p}layers.{i}."
        add(lp + "input_layernorm.weight", [h])
        add(lp + "post_attention_layernorm.weight", [h])
        add(lp + "self_attn.q_proj.weight", [heads * head_dim, h])
        add(lp + "self_attn.k_proj.weight", [kv_heads * head_dim, h])
        add(lp + "self_attn.v_proj.weight", [kv_heads * head_dim, h])
        add(lp + "self_attn.o_proj.weight", [h, heads * head_dim])
        add(lp + "self_attn.q_norm.weight", [head_dim])
        add(lp + "self_attn.k_norm.weight", [head_dim])
        if i < args.dense_layers:
            add(lp + "mlp.gate_proj.weight", [dense_inter, h])
            add(lp + "mlp.up_proj.weight", [dense_inter, h])
            add(lp + "mlp.down_proj.weight", [h, dense_inter])
            continue
        add(lp + "self_attn.index_q_proj.weight", [idx_heads * idx_dim, h])
        add(lp + "self_attn.index_k_proj.weight", [idx_dim, h])
        add(lp + "self_attn.index_q_norm.weight", [idx_dim])
        add(lp + "self_attn.index_k_norm.weight", [idx_dim])
        mp = lp + "block_sparse_moe."
        add(mp + "gate.weight", [args.experts, h], dtype="F32")
        add(mp + "e_score_correction_bias", [args.experts], dtype="F32")
        for e in range(args.experts):
            first = i == args.dense_layers and e == 0
            add(mp + f"experts.{e}.w1.weight", [moe_inter, h], values=special_blocks(rng, moe_inter, h) if first else None)
            add(mp + f"experts.{e}.w2.weight", [h, moe_inter])
            add(mp + f"experts.{e}.w3.weight", [moe_inter, h])
        add(mp + "shared_experts.gate_proj.weight", [shared_inter, h])
        add(mp + "shared_experts.up_proj.weight", [shared_inter, h])
        add(mp + "shared_experts.down_proj.weight", [h, shared_inter])

    vp = "vision_tower.vision_model."
    add(vp + "embeddings.patch_embedding.weight", [vh, 3, 2, 14, 14])
    add(vp + "pre_layrnorm.weight", [vh])
    add(vp + "pre_layrnorm.bias", [vh])
    for j in range(args.vision_layers):
        ep = f"{vp}encoder.layers.{j}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            add(ep + f"self_attn.{proj}.weight", [vh, vh])
            add(ep + f"self_attn.{proj}.bias", [vh])
        for norm in ("layer_norm1", "layer_norm2"):
            add(ep + f"{norm}.weight", [vh])
            add(ep + f"{norm}.bias", [vh])
        add(ep + "mlp.fc1.weight", [vinter, vh])
        add(ep + "mlp.fc1.bias", [vinter])
        add(ep + "mlp.fc2.weight", [vh, vinter])
        add(ep + "mlp.fc2.bias", [vh])
    add("multi_modal_projector.linear_1.weight", [h, vh])
    add("multi_modal_projector.linear_1.bias", [h])
    add("multi_modal_projector.linear_2.weight", [h, h])
    add("multi_modal_projector.linear_2.bias", [h])
    add("patch_merge_mlp.linear_1.weight", [h, 4 * h])
    add("patch_merge_mlp.linear_1.bias", [h])
    add("patch_merge_mlp.linear_2.weight", [h, h])
    add("patch_merge_mlp.linear_2.bias", [h])

    config = {
        "architectures": ["MiniMaxM3SparseForConditionalGeneration"],
        "model_type": "minimax_m3_vl",
        "image_token_index": 200025,
        "video_token_index": 200026,
        "projector_hidden_size": h,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "text_config": {
            "model_type": "minimax_m3",
            "vocab_size": vocab,
            "hidden_size": h,
            "num_hidden_layers": args.layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "head_dim": head_dim,
            "rotary_dim": head_dim // 2,
            "intermediate_size": moe_inter,
            "shared_intermediate_size": shared_inter,
            "dense_intermediate_size": dense_inter,
            "num_local_experts": args.experts,
            "num_experts_per_tok": 2,
            "first_k_dense_replace": args.dense_layers,
            "rms_norm_eps": 1e-06,
            "rope_theta": 5000000.0,
            "torch_dtype": "bfloat16",
        },
        "vision_config": {"hidden_size": vh, "intermediate_size": vinter, "num_hidden_layers": args.vision_layers,
                          "num_attention_heads": 2, "patch_size": 14},
    }
    return tensors, config


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--dense-layers", type=int, default=1)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--vision-layers", type=int, default=2)
    ap.add_argument("--shards", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale", type=float, default=1.0)
    args = ap.parse_args()
    assert args.hidden % 64 == 0, "hidden must be a multiple of 64 (experts' K = hidden/2 must be a multiple of 32)"

    tensors, config = build(args)
    os.makedirs(args.out, exist_ok=True)
    n = args.shards
    shards = [[] for _ in range(n)]
    weight_map = {}
    for i, (name, dtype, shape, values) in enumerate(tensors):
        s = min(n - 1, i * n // len(tensors))
        shards[s].append((name, dtype, shape, tensor_bytes(dtype, values)))
    total = 0
    for s, items in enumerate(shards):
        fname = f"model-{s + 1:05d}-of-{n:05d}.safetensors"
        write_safetensors(os.path.join(args.out, fname), items)
        for name, _, _, data in items:
            weight_map[name] = fname
            total += len(data)
    with open(os.path.join(args.out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(args.out, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 200019, "eos_token_id": 200020, "do_sample": True, "temperature": 1.0}, f, indent=2)
    with open(os.path.join(args.out, "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": 1048576, "tokenizer_class": "GPT2Tokenizer"}, f, indent=2)
    with open(os.path.join(args.out, "chat_template.jinja"), "w") as f:
        f.write("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    with open(os.path.join(args.out, "configuration_minimax_m3.py"), "w") as f:
        f.write("# remote code placeholder of the tiny test checkpoint\n")
    print(f"wrote {len(tensors)} tensors in {n} shards ({total / 1e6:.2f} MB) to {args.out}")


if __name__ == "__main__":
    main()
