"""Builds the small MiniMax-M3 test checkpoints in tests/fixtures/m3/ with transformers 5.17 as the reference.

For each fixture: a random MiniMaxM3SparseForConditionalGeneration (eager attention, f32), written in the
UPSTREAM checkpoint layout (shared/spec/m3_checkpoint.md §4: `language_model.` prefix, split gate/up, unstacked
experts `block_sparse_moe.experts.{e}.w1/w2/w3`, `index_*` projections), reloaded with transformers' own
`from_pretrained` to prove the layout (logits must be identical), plus reference logits for a few token
sequences (`logits_{i}.npy`, [T, vocab] f32, tokens in `reference.json`).

The `*_mxfp4` fixture quantizes the routed and shared experts of its base fixture with tools/mxfp4_torch.py
(Quark's rule, written independently from the spec) and saves them in the quantizer's format
(`<name>.weight` U8 [N, K/2] + `<name>.weight_scale` U8 [N, K/32]); its reference logits come from transformers
with the expert weights replaced by their dequantized values and the expert inputs (both GEMMs, routed and
shared) passed through QDQ, i.e. vLLM's emulation semantics.

Run (no internet needed): python3 tools/gen_m3_fixtures.py --out tests/fixtures/m3
"""

import argparse
import inspect
import json
import os
import re
import sys
import types

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mxfp4_torch  # noqa: E402

import transformers  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

VOCAB = 512

# name -> (text config overrides, token sequence lengths)
FIXTURES = {
    # Dense MLPs and full attention only; rotary_dim < head_dim.
    "dense": dict(
        text=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                  rotary_dim=16, dense_intermediate_size=96, intermediate_size=32, shared_intermediate_size=32,
                  num_local_experts=4, num_experts_per_tok=2, moe_layer_freq=[0, 0], sparse_freq=[0, 0],
                  block_size=4, topk_blocks=2, index_heads=2, index_dim=32),
        lengths=[23, 7]),
    # Dense/MoE and full/sparse mixed per layer; sparse blocks of 4 tokens, top-2, sequences >> 8 tokens.
    "mixed": dict(
        text=dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                  rotary_dim=16, dense_intermediate_size=96, intermediate_size=64, shared_intermediate_size=32,
                  num_local_experts=6, num_experts_per_tok=2, moe_layer_freq=[0, 1, 1, 0], sparse_freq=[0, 1, 0, 1],
                  block_size=4, topk_blocks=2, index_heads=2, index_dim=32),
        lengths=[45, 13]),
    # Larger expert count / top-k, every layer MoE + sparse (as in the real model's layers 3..59), GQA group 4.
    "moe16": dict(
        text=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                  rotary_dim=8, dense_intermediate_size=64, intermediate_size=32, shared_intermediate_size=32,
                  num_local_experts=16, num_experts_per_tok=4, moe_layer_freq=[1, 1], sparse_freq=[1, 1],
                  block_size=8, topk_blocks=3, index_heads=2, index_dim=16),
        lengths=[70, 30]),
}


def text_config_dict(t):
    """An upstream-style text_config (what MiniMaxAI ships), for a tiny model."""
    n = t["num_hidden_layers"]
    return {
        "vocab_size": VOCAB,
        "hidden_size": t["hidden_size"],
        "num_hidden_layers": n,
        "num_attention_heads": t["num_attention_heads"],
        "num_key_value_heads": t["num_key_value_heads"],
        "head_dim": t["head_dim"],
        "intermediate_size": t["intermediate_size"],
        "dense_intermediate_size": t["dense_intermediate_size"],
        "shared_intermediate_size": t["shared_intermediate_size"],
        "n_shared_experts": 1,
        "num_local_experts": t["num_local_experts"],
        "num_experts_per_tok": t["num_experts_per_tok"],
        "scoring_func": "sigmoid",
        "use_routing_bias": True,
        "routed_scaling_factor": 2.0,
        "moe_layer_freq": t["moe_layer_freq"],
        "hidden_act": "swigluoai",
        "swiglu_alpha": 1.702,
        "swiglu_limit": 7.0,
        "rms_norm_eps": 1e-6,
        "use_gemma_norm": True,
        "use_qk_norm": True,
        "qk_norm_type": "per_head",
        "attention_output_gate": False,
        "rope_theta": 10000.0,
        "rotary_dim": t["rotary_dim"],
        "partial_rotary_factor": t["rotary_dim"] / t["head_dim"],
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                            "partial_rotary_factor": t["rotary_dim"] / t["head_dim"]},
        "max_position_embeddings": 4096,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
        "sparse_attention_config": {
            "use_sparse_attention": any(t["sparse_freq"]),
            "sparse_attention_freq": t["sparse_freq"],
            "sparse_num_index_heads": t["index_heads"],
            "sparse_index_dim": t["index_dim"],
            "sparse_block_size": t["block_size"],
            "sparse_topk_blocks": t["topk_blocks"],
            "sparse_local_block": 1,
            "sparse_init_block": 0,
            "sparse_score_type": "max",
            "sparse_disable_index_value": True,
        },
    }


def full_config_dict(t):
    return {
        "architectures": ["MiniMaxM3SparseForConditionalGeneration"],
        "model_type": "minimax_m3_vl",
        "image_token_index": VOCAB - 2,
        "video_token_index": VOCAB - 1,
        "projector_hidden_size": t["hidden_size"],
        "tie_word_embeddings": False,
        "text_config": text_config_dict(t),
        "vision_config": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                          "num_attention_heads": 2, "patch_size": 14, "image_size": 56, "num_channels": 3,
                          "hidden_act": "gelu", "layer_norm_eps": 1e-5, "rope_theta": 10000.0,
                          "img_token_compression_config": {"spatial_merge_size": 2, "temporal_patch_size": 2}},
    }


def model_class():
    for name in ["MiniMaxM3SparseForConditionalGeneration", "MiniMaxM3VLForConditionalGeneration"]:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    from transformers.models.minimax_m3_vl import modeling_minimax_m3_vl as m
    print("classes:", [n for n in dir(m) if "For" in n])
    raise SystemExit("no MiniMax-M3 model class found")


def randomize(model, gen):
    """Weights large enough that activations hit the SwiGLU clamps and routing/selection really vary."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "layrnorm" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            elif p.dim() >= 2:
                fan_in = p.shape[-1] if "patch" not in name and "embeddings.proj" not in name else p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) * (2.5 / fan_in**0.5))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.rand(b.shape, generator=gen) * 0.4 - 0.2)


def to_upstream(state, text):
    """transformers 5.17 parameter names -> upstream MiniMaxAI names (m3_checkpoint.md §5 reversed). Text
    tensors stay f32; the (unused by these tests) vision tower and projectors are stored BF16 to keep the files
    small, which also makes the checkpoints mixed-dtype as the real one (F32 router, BF16 rest) is."""
    out = {}
    inter = text["intermediate_size"]
    for name, t in state.items():
        t = t.detach().to(torch.float32).contiguous()
        if name == "lm_head.weight":
            out["language_model.lm_head.weight"] = t
            continue
        m = re.match(r"model\.language_model\.(.*)$", name)
        if m:
            rest = m.group(1)
            lm = re.match(r"layers\.(\d+)\.(.*)$", rest)
            if not lm:
                out["language_model.model." + rest] = t
                continue
            i, r = int(lm.group(1)), lm.group(2)
            p = f"language_model.model.layers.{i}."
            moe = text["moe_layer_freq"][i]
            if r.startswith("self_attn.indexer."):
                out[p + "self_attn.index_" + r[len("self_attn.indexer."):]] = t
            elif r.startswith("self_attn.") or "layernorm" in r:
                out[p + r] = t
            elif not moe and r == "mlp.gate_up_proj.weight":
                g, u = t.chunk(2, dim=0)
                out[p + "mlp.gate_proj.weight"] = g.contiguous()
                out[p + "mlp.up_proj.weight"] = u.contiguous()
            elif not moe and r == "mlp.down_proj.weight":
                out[p + r] = t
            elif moe and r == "mlp.gate.weight":
                out[p + "block_sparse_moe.gate.weight"] = t
            elif moe and r in ("mlp.gate.e_score_correction_bias", "mlp.e_score_correction_bias"):
                out[p + "block_sparse_moe.e_score_correction_bias"] = t
            elif moe and r == "mlp.experts.gate_up_proj":
                hidden = text["hidden_size"]
                # transformers 5.17 stacks experts as F.linear weights: gate_up [E, 2I, H], down [E, H, I].
                assert t.shape[1:] == (2 * inter, hidden), t.shape
                for e in range(t.shape[0]):
                    out[p + f"block_sparse_moe.experts.{e}.w1.weight"] = t[e, :inter].contiguous()
                    out[p + f"block_sparse_moe.experts.{e}.w3.weight"] = t[e, inter:].contiguous()
            elif moe and r == "mlp.experts.down_proj":
                hidden = text["hidden_size"]
                assert t.shape[1:] == (hidden, inter), t.shape
                for e in range(t.shape[0]):
                    out[p + f"block_sparse_moe.experts.{e}.w2.weight"] = t[e].contiguous()
            elif moe and r == "mlp.shared_experts.gate_up_proj.weight":
                g, u = t.chunk(2, dim=0)
                out[p + "block_sparse_moe.shared_experts.gate_proj.weight"] = g.contiguous()
                out[p + "block_sparse_moe.shared_experts.up_proj.weight"] = u.contiguous()
            elif moe and r == "mlp.shared_experts.down_proj.weight":
                out[p + "block_sparse_moe.shared_experts.down_proj.weight"] = t
            else:
                raise SystemExit(f"unmapped text tensor {name}")
            continue
        m = re.match(r"model\.vision_tower\.(.*)$", name)
        if m:
            rest = m.group(1)
            rest = re.sub(r"^embeddings\.proj\.", "embeddings.patch_embedding.", rest)
            rest = re.sub(r"^layers\.", "encoder.layers.", rest)
            out["vision_tower.vision_model." + rest] = t.to(torch.bfloat16)
            continue
        m = re.match(r"model\.multi_modal_projector\.(merge_)?linear_(\d)\.(weight|bias)$", name)
        if m:
            owner = "patch_merge_mlp" if m.group(1) else "multi_modal_projector"
            out[f"{owner}.linear_{m.group(2)}.{m.group(3)}"] = t.to(torch.bfloat16)
            continue
        raise SystemExit(f"unmapped tensor {name}")
    return out


def logits_of(model, tokens):
    with torch.no_grad():
        ids = torch.tensor([tokens], dtype=torch.long)
        return model(input_ids=ids, use_cache=False).logits[0].to(torch.float32).numpy()


def write_fixture(folder, cfg, tensors, token_lists, logits_list, extra=None):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    ref = {"tokens": token_lists, "generator": "tools/gen_m3_fixtures.py", "transformers": transformers.__version__,
           "torch": torch.__version__}
    if extra:
        ref.update(extra)
    for i, lg in enumerate(logits_list):
        np.save(os.path.join(folder, f"logits_{i}.npy"), lg.astype(np.float32))
    with open(os.path.join(folder, "reference.json"), "w") as f:
        json.dump(ref, f, indent=1)


def qdq_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """MiniMaxM3VLExperts.forward with MXFP4 emulation: QDQ before both expert GEMMs."""
    final = torch.zeros_like(hidden_states)
    for e in range(self.gate_up_proj.shape[0]):
        token_idx, pos = torch.where(top_k_index == e)
        if token_idx.numel() == 0:
            continue
        gu = self.gate_up_proj[e]  # [2I, H]
        dn = self.down_proj[e]  # [H, I]
        x = mxfp4_torch.qdq(hidden_states[token_idx])
        h = F.linear(x, gu)
        gate, up = h.chunk(2, dim=-1)
        gate = gate.clamp(max=self.swiglu_limit)
        up = up.clamp(min=-self.swiglu_limit, max=self.swiglu_limit)
        act = (up + 1.0) * (gate * torch.sigmoid(gate * self.swiglu_alpha))
        y = F.linear(mxfp4_torch.qdq(act), dn) * top_k_weights[token_idx, pos, None]
        final.index_add_(0, token_idx, y.to(final.dtype))
    return final


def qdq_dense_forward(self, hidden_states):
    gate_up = self.gate_up_proj(mxfp4_torch.qdq(hidden_states))
    gate, up = gate_up.chunk(2, dim=-1)
    gate = gate.clamp(max=self.swiglu_limit)
    up = up.clamp(min=-self.swiglu_limit, max=self.swiglu_limit)
    act = (up + 1.0) * (gate * torch.sigmoid(gate * self.swiglu_alpha))
    return self.down_proj(mxfp4_torch.qdq(act))


def make_mxfp4(base_name, model, upstream, cfg, token_lists, out_dir):
    """Quantize experts + shared experts of `model`; returns nothing, writes <base>_mxfp4."""
    quantized = {}
    tensors = {}
    for name, t in upstream.items():
        is_expert = re.search(r"block_sparse_moe\.(experts\.\d+\.w[123]|shared_experts\.(gate|up|down)_proj)\.weight$",
                              name)
        if is_expert:
            packed, scales = mxfp4_torch.quantize(t)
            stem = name[: -len(".weight")]
            tensors[stem + ".weight"] = packed
            tensors[stem + ".weight_scale"] = scales
            quantized[stem] = mxfp4_torch.dequantize(packed, scales)
        else:
            tensors[name] = t
    # Replace transformers' expert weights by the dequantized values and emulate activation QDQ.
    text = cfg["text_config"]
    lm = model.model.language_model
    with torch.no_grad():
        for i, layer in enumerate(lm.layers):
            if not text["moe_layer_freq"][i]:
                continue
            p = f"language_model.model.layers.{i}.block_sparse_moe."
            ex = layer.mlp.experts
            for e in range(ex.gate_up_proj.shape[0]):
                gu = torch.cat([quantized[p + f"experts.{e}.w1"], quantized[p + f"experts.{e}.w3"]], dim=0)
                dn = quantized[p + f"experts.{e}.w2"]
                ex.gate_up_proj[e].copy_(gu)
                ex.down_proj[e].copy_(dn)
            ex.forward = types.MethodType(qdq_experts_forward, ex)
            sh = layer.mlp.shared_experts
            sh.gate_up_proj.weight.copy_(torch.cat([quantized[p + "shared_experts.gate_proj"],
                                                    quantized[p + "shared_experts.up_proj"]], dim=0))
            sh.down_proj.weight.copy_(quantized[p + "shared_experts.down_proj"])
            sh.forward = types.MethodType(qdq_dense_forward, sh)
    logits = [logits_of(model, toks) for toks in token_lists]
    qcfg = dict(cfg)
    fmt = {"dtype": "fp4", "qscheme": "per_group", "group_size": 32, "ch_axis": -1, "scale_format": "e8m0",
           "scale_calculation_mode": "even", "round_method": "half_even", "is_dynamic": False,
           "observer_cls": "PerBlockMXObserver"}
    qcfg["quantization_config"] = {
        "quant_method": "quark", "quant_mode": "eager_mode",
        "global_quant_config": {"weight": fmt, "input_tensors": dict(fmt, is_dynamic=True),
                                "output_tensors": None, "bias": None},
        "layer_quant_config": {}, "layer_type_quant_config": {}, "kv_cache_quant_config": {},
        "exclude": ["*lm_head", "*vision_tower*", "*multi_modal_projector*", "*patch_merge_mlp*",
                    "*block_sparse_moe.gate", "*self_attn*", "*mlp.gate_proj", "*mlp.up_proj", "*mlp.down_proj"],
        "export": {"kv_cache_group": [], "min_kv_scale": 0.0, "pack_method": "reorder",
                   "weight_format": "real_quantized", "weight_merge_groups": None},
    }
    write_fixture(os.path.join(out_dir, base_name + "_mxfp4"), qcfg, tensors, token_lists, logits,
                  extra={"base_fixture": base_name,
                         "note": "experts and shared experts quantized with tools/mxfp4_torch.py from the base "
                                 "fixture's f32 weights; logits with dequantized weights and QDQ'd expert inputs"})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures/m3")
    ap.add_argument("--only", default="")
    args = ap.parse_args()
    torch.manual_seed(0)
    print("transformers", transformers.__version__, "torch", torch.__version__, flush=True)
    from transformers.models.minimax_m3_vl import modeling_minimax_m3_vl as mm
    for cls_name in ["MiniMaxM3VLIndexer", "MiniMaxM3VLTopKRouter", "MiniMaxM3VLSparseMoeBlock"]:
        cls = getattr(mm, cls_name, None)
        if cls is not None:
            print(f"===== source of {cls_name} =====")
            print(inspect.getsource(cls))
    cls = model_class()
    for name, spec in FIXTURES.items():
        if args.only and name not in args.only.split(","):
            continue
        t = spec["text"]
        cfg_dict = full_config_dict(t)
        folder = os.path.join(args.out, name)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(cfg_dict, f, indent=2)
        config = transformers.AutoConfig.from_pretrained(folder)
        config._attn_implementation = "eager"
        try:
            config.text_config._attn_implementation = "eager"
        except Exception:
            pass
        model = cls(config).to(torch.float32).eval()
        gen = torch.Generator().manual_seed(1234 + len(name))
        randomize(model, gen)
        rot = model.model.language_model.rotary_emb.inv_freq
        print(f"[{name}] inv_freq len {rot.numel()} (rotary_dim {t['rotary_dim']}) layer_types",
              config.text_config.layer_types, flush=True)
        assert rot.numel() * 2 == t["rotary_dim"], "RoPE width does not follow rotary_dim"
        if name == "mixed":
            for k, v in model.state_dict().items():
                print("  ", k, tuple(v.shape), v.dtype)
        upstream = to_upstream(model.state_dict(), cfg_dict["text_config"])
        tg = torch.Generator().manual_seed(99 + len(name))
        token_lists = [torch.randint(0, VOCAB, (n,), generator=tg).tolist() for n in spec["lengths"]]
        logits = [logits_of(model, toks) for toks in token_lists]
        write_fixture(folder, cfg_dict, upstream, token_lists, logits)
        # Prove the layout: transformers' own loader must reproduce the logits exactly.
        reloaded, info = cls.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager",
                                             output_loading_info=True)
        reloaded.eval()
        print(f"[{name}] loading info:", {k: v for k, v in info.items() if v})
        for toks, ref in zip(token_lists, logits):
            got = logits_of(reloaded, toks)
            diff = float(np.abs(got - ref).max())
            print(f"[{name}] reload max|diff| = {diff} (logit scale {float(np.abs(ref).max()):.3f})", flush=True)
            assert diff == 0.0, "reloaded upstream layout gives different logits"
        if name == "mixed":
            make_mxfp4(name, model, upstream, cfg_dict, token_lists, args.out)
    print("all fixtures written")


if __name__ == "__main__":
    main()
