#!/usr/bin/env bash
# mxlm quantize vs AMD Quark 0.13 (PyPI amd-quark) on the same small MiniMax-M3-layout checkpoint:
#   1. a venv with amd-quark==0.13 + torch (PyPI's torch wheel; the CPU run needs no GPU),
#   2. tools/make_tiny_m3_checkpoint.py writes the checkpoint (random BF16, F32 router, MXFP4 corner cases),
#   3. the seed's own script (template registration, get_config, direct_quantize_checkpoint) on device="cpu",
#   4. mxlm quantize with the seed's template and exclude list,
#   5. byte-for-byte tensor comparison + quantization_config comparison (tools/quark_compare.py compare),
#      once with the seed's exclude list and once with the template's own list,
#   6. wall time and peak RSS of both (/usr/bin/time -v).
# usage: tools/quark_compare.sh [MXLM_BIN] [checkpoint args for make_tiny_m3_checkpoint.py ...]
# env: QUARK_VENV (default /tmp/quark-venv), WORK (default /tmp/quark-compare)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
mxlm=${1:-$here/../build/mxlm}
shift || true
venv=${QUARK_VENV:-/tmp/quark-venv}
work=${WORK:-/tmp/quark-compare}

if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import quark, torch" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  "$venv/bin/pip" install -q "amd-quark==0.13" torch
fi
rm -rf "$work"
mkdir -p "$work"
"$venv/bin/python" "$here/make_tiny_m3_checkpoint.py" "$work/in" "$@"

echo "== Quark $("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("amd-quark"))'), torch $("$venv/bin/python" -c 'import torch; print(torch.__version__)')"
/usr/bin/time -v "$venv/bin/python" "$here/quark_compare.py" run-quark "$work/in" "$work/quark" --device cpu \
  > "$work/quark.log" 2> "$work/quark.time" || { tail -30 "$work/quark.log" "$work/quark.time"; exit 1; }
tail -1 "$work/quark.log"
grep -E "Elapsed|Maximum resident" "$work/quark.time"

echo "== mxlm"
/usr/bin/time -v "$mxlm" quantize --model "$work/in" --output "$work/mxlm" --template minimax_m3_vl \
  --exclude-layers '*lm_head' '*vision_tower*' '*multi_modal_projector*' '*patch_merge_mlp*' \
  '*block_sparse_moe.gate' '*self_attn*' '*mlp.gate_proj' '*mlp.up_proj' '*mlp.down_proj' \
  > "$work/mxlm.log" 2> "$work/mxlm.time" || { tail -30 "$work/mxlm.log" "$work/mxlm.time"; exit 1; }
cat "$work/mxlm.log"
grep -E "Elapsed|Maximum resident" "$work/mxlm.time"

echo "== comparison"
"$venv/bin/python" "$here/quark_compare.py" compare "$work/quark" "$work/mxlm"

echo "== the template's own exclude list (Quark get_config without exclude_layers; mxlm without --exclude-layers)"
"$venv/bin/python" "$here/quark_compare.py" run-quark "$work/in" "$work/quark-template" --device cpu --template-excludes \
  > "$work/quark-template.log" 2>&1 || { tail -30 "$work/quark-template.log"; exit 1; }
"$mxlm" quantize --model "$work/in" --output "$work/mxlm-template" --template minimax_m3_vl > /dev/null 2>&1
"$venv/bin/python" "$here/quark_compare.py" compare "$work/quark-template" "$work/mxlm-template"
