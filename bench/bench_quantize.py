#!/usr/bin/env python3
"""Writes a random BF16 MoE-expert checkpoint with MiniMax-M3's real expert shapes (w1/w3 [3072, 6144], w2
[6144, 3072], 37.7 MB each) for bench/bench_quantize.sh: LAYERS x EXPERTS x 3 tensors in shards of ~1 GB with
an index and config.json. The bf16 bits are drawn directly (random sign and mantissa, exponents for
magnitudes 2^-12..2^-5, like trained weights), so a few GB take seconds and never hold more than one tensor.

usage: bench_quantize.py OUT_DIR [--gb 3.0]
"""
import argparse
import json
import os

import numpy as np

SHAPES = {"w1": (3072, 6144), "w3": (3072, 6144), "w2": (6144, 3072)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--gb", type=float, default=3.0)
    ap.add_argument("--experts-per-layer", type=int, default=16)
    args = ap.parse_args()
    per_tensor = 3072 * 6144 * 2
    count = max(3, int(args.gb * 1e9 / per_tensor) // 3 * 3)
    names = []
    for i in range(count // 3):
        layer, expert = 3 + i // args.experts_per_layer, i % args.experts_per_layer
        for w in ("w1", "w2", "w3"):
            names.append((f"language_model.model.layers.{layer}.block_sparse_moe.experts.{expert}.{w}.weight", SHAPES[w]))
    os.makedirs(args.out, exist_ok=True)
    per_shard = max(1, int(1e9 // per_tensor))
    shards = [names[i:i + per_shard] for i in range(0, len(names), per_shard)]
    rng = np.random.default_rng(0)
    weight_map, total = {}, 0
    for s, items in enumerate(shards):
        fname = f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape in sorted(items):
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + per_tensor]}
            offset += per_tensor
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * ((8 - len(text) % 8) % 8)
        with open(os.path.join(args.out, fname), "wb") as f:
            f.write(len(text).to_bytes(8, "little"))
            f.write(text)
            for name, shape in sorted(items):
                r = rng.integers(0, 1 << 16, size=shape, dtype=np.uint16)
                bits = (r & 0x807F) | ((0x73 + ((r >> 8) & 7)) << 7).astype(np.uint16)
                f.write(bits.tobytes())
                weight_map[name] = fname
                total += per_tensor
    with open(os.path.join(args.out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump({"model_type": "minimax_m3_vl", "architectures": ["MiniMaxM3SparseForConditionalGeneration"]}, f)
    print(f"{len(names)} tensors, {total / 1e9:.2f} GB in {len(shards)} shards")


if __name__ == "__main__":
    main()
