#!/usr/bin/env python3
"""mxlm quantize vs AMD Quark (amd-quark from PyPI) on the same checkpoint.

Two steps, so the Quark run can happen on another machine (it needs torch):
  quark_compare.py run-quark IN OUT [--device cpu] [--template-excludes]
                                                     runs the seed's own script (shared/seed/model-card-amd-
                                                     minimax-m3-mxfp4.txt): template registration, get_config,
                                                     ModelQuantizer.direct_quantize_checkpoint; prints time + peak RSS;
                                                     --template-excludes: get_config without exclude_layers
  quark_compare.py compare QUARK_OUT MXLM_OUT        every tensor byte for byte (the scale byte of an all-zero block
                                                     excepted: Quark writes 1, older versions 0), and the
                                                     quantization_config (equal as JSON; key order reported)
The only deviation from the seed script: `device` is passed (the seed relied on the default "cuda").
"""
import json
import os
import resource
import sys
import time

import numpy as np


def run_quark(model_dir, output_dir, device, template_excludes=False):
    from quark.torch import LLMTemplate, ModelQuantizer

    # --- the seed's script, verbatim apart from the paths and `device` ---
    minimax_m3_vl_template = LLMTemplate(
        model_type="minimax_m3_vl",
        kv_layers_name=["*language_model.*k_proj", "*language_model.*v_proj"],
        q_layer_name="*language_model.*q_proj",
        exclude_layers_name=[
            "*lm_head",
            "*vision_tower*",
            "*multi_modal_projector*",
            "*patch_merge_mlp*",
            "*block_sparse_moe.gate",
            "*self_attn.index_*",
        ],
    )
    LLMTemplate.register_template(minimax_m3_vl_template)
    quant_scheme = "mxfp4"
    exclude_layers = [
        "*lm_head",
        "*vision_tower*",
        "*multi_modal_projector*",
        "*patch_merge_mlp*",
        "*block_sparse_moe.gate",
        "*self_attn*",
        "*mlp.gate_proj",
        "*mlp.up_proj",
        "*mlp.down_proj",
    ]
    template = LLMTemplate.get("minimax_m3_vl")
    if template_excludes:  # the template's own list: what `mxlm quantize` does without --exclude-layers
        quant_config = template.get_config(scheme=quant_scheme)
    else:
        quant_config = template.get_config(scheme=quant_scheme, exclude_layers=exclude_layers)
    quantizer = ModelQuantizer(quant_config)
    start = time.perf_counter()
    quantizer.direct_quantize_checkpoint(pretrained_model_path=model_dir, save_path=output_dir, device=device)
    seconds = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    import quark

    print(json.dumps({"quark_version": getattr(quark, "__version__", "?"), "seconds": round(seconds, 3),
                      "peak_rss_mb": round(peak_kb / 1024, 1)}))


# ---- reading safetensors without torch ----

def read_dir(d):
    tensors = {}
    for name in sorted(os.listdir(d)):
        if not name.endswith(".safetensors"):
            continue
        with open(os.path.join(d, name), "rb") as f:
            blob = f.read()
        n = int.from_bytes(blob[:8], "little")
        header = json.loads(blob[8:8 + n])
        header.pop("__metadata__", None)
        base = 8 + n
        for key, info in header.items():
            b, e = info["data_offsets"]
            if key in tensors:
                raise SystemExit(f"tensor {key} appears in two files of {d}")
            tensors[key] = (info["dtype"], tuple(info["shape"]), blob[base + b:base + e])
    return tensors


def compare(quark_dir, mxlm_dir):
    q, m = read_dir(quark_dir), read_dir(mxlm_dir)
    problems = []
    if set(q) != set(m):
        problems.append(f"tensor names differ: only Quark {sorted(set(q) - set(m))[:5]}, only mxlm {sorted(set(m) - set(q))[:5]}")
    quantized = exact = zero_block_scales = 0
    for key in sorted(set(q) & set(m)):
        qd, qs, qb = q[key]
        md, ms, mb = m[key]
        if (qd, qs) != (md, ms):
            problems.append(f"{key}: Quark {qd}{list(qs)} vs mxlm {md}{list(ms)}")
            continue
        if qb == mb:
            exact += 1
            quantized += key.endswith(".weight_scale")
            continue
        if key.endswith(".weight_scale"):
            quantized += 1
            # A scale may differ only where its block is all zero (every code 0 or 8).
            packed = np.frombuffer(q[key[: -len("_scale")]][2], dtype=np.uint8).reshape(qs[0], -1)
            codes = np.stack([packed & 15, packed >> 4], axis=-1).reshape(qs[0], -1, 32)
            zero_block = np.all((codes & 7) == 0, axis=-1)
            a = np.frombuffer(qb, dtype=np.uint8).reshape(qs)
            b = np.frombuffer(mb, dtype=np.uint8).reshape(qs)
            bad = (a != b) & ~zero_block
            if bad.any():
                r, c = np.argwhere(bad)[0]
                problems.append(f"{key}: {int(bad.sum())} scale bytes differ, first at [{r},{c}]: Quark {a[r, c]} mxlm {b[r, c]}")
            else:
                zero_block_scales += int(((a != b) & zero_block).sum())
            continue
        diff = np.flatnonzero(np.frombuffer(qb, np.uint8) != np.frombuffer(mb, np.uint8))
        problems.append(f"{key} ({qd}): {len(diff)} bytes differ, first at byte {diff[0]}")

    qc = json.load(open(os.path.join(quark_dir, "config.json")))
    mc = json.load(open(os.path.join(mxlm_dir, "config.json")))
    qq, mq = qc.get("quantization_config"), mc.get("quantization_config")
    if qq != mq:
        for k in sorted(set(qq or {}) | set(mq or {})):
            if (qq or {}).get(k) != (mq or {}).get(k):
                problems.append(f"quantization_config.{k}: Quark {json.dumps((qq or {}).get(k))} vs mxlm {json.dumps((mq or {}).get(k))}")
    elif list(qq) != list(mq):
        problems.append(f"quantization_config key order: Quark {list(qq)} vs mxlm {list(mq)}")
    rest_q = {k: v for k, v in qc.items() if k != "quantization_config"}
    rest_m = {k: v for k, v in mc.items() if k != "quantization_config"}
    if rest_q != rest_m:
        problems.append("config.json outside quantization_config differs")
    aux_q = {f for f in os.listdir(quark_dir) if not f.endswith(".safetensors") and f != "model.safetensors.index.json"}
    aux_m = {f for f in os.listdir(mxlm_dir) if not f.endswith(".safetensors") and f != "model.safetensors.index.json"
             and not f.startswith(".mxlm")}
    if aux_q != aux_m:
        problems.append(f"non-weight files differ: only Quark {sorted(aux_q - aux_m)}, only mxlm {sorted(aux_m - aux_q)}")
    for f in sorted(aux_q & aux_m - {"config.json"}):
        if open(os.path.join(quark_dir, f), "rb").read() != open(os.path.join(mxlm_dir, f), "rb").read():
            problems.append(f"{f} differs")

    print(json.dumps({"tensors": len(q), "identical_bytes": exact, "quantized_layers": quantized,
                      "zero_block_scale_bytes_differing": zero_block_scales, "problems": problems}, indent=1))
    return 1 if problems else 0


def main():
    if len(sys.argv) >= 4 and sys.argv[1] == "run-quark":
        rest = sys.argv[4:]
        device = rest[rest.index("--device") + 1] if "--device" in rest else "cpu"
        run_quark(sys.argv[2], sys.argv[3], device, template_excludes="--template-excludes" in rest)
        return 0
    if len(sys.argv) == 4 and sys.argv[1] == "compare":
        return compare(sys.argv[2], sys.argv[3])
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main())
