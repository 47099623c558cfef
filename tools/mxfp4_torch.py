"""An independent PyTorch implementation of AMD Quark's OCP-MXFP4 rule (shared/spec/mxfp4_numerics.md §3-§4,
quark_mxfp4_format.md §3-§5), written from the spec for the test fixtures: weight quantization as Quark's exporter
writes it (packed E2M1 codes, low nibble = even element, E8M0 scale bytes raised to at least 1), dequantization, and
the "even"-scale quantize-dequantize applied to activations by vLLM's emulation.

Everything works on float32 tensors whose last dimension is a multiple of 32.
"""

import torch

BLOCK = 32
# E2M1 magnitudes by code 0..7.
GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float32)


def scale_exponent(amax: torch.Tensor) -> torch.Tensor:
    """Quark "even" rule: add 0x200000 to the f32 bits of amax, keep sign+exponent, floor(log2) - 2, clamp."""
    amax = amax.to(torch.float32).contiguous()
    bits = amax.view(torch.int32)
    rounded = ((bits + 0x200000) & -0x800000).view(torch.float32)  # -0x800000 == 0xFF800000 as int32
    rounded = torch.where(amax == 0, torch.full_like(rounded, 2.0**-126), rounded)
    e = torch.floor(torch.log2(rounded)) - 2
    e = torch.nan_to_num(e, nan=127.0, posinf=127.0, neginf=-127.0)
    return e.clamp(-127, 127).to(torch.int32)


def round_e2m1(y: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 magnitude of |y| (ties to even, saturating at 6); returns magnitudes."""
    a = y.abs()
    # Step 0.5 below 2, 1 in [2, 4), 2 from 4; torch.round is round-half-to-even.
    small = torch.round(a * 2) / 2
    mid = torch.round(a)
    large = torch.round(a / 2) * 2
    mag = torch.where(a < 2, small, torch.where(a < 4, mid, large))
    return mag.clamp(max=6.0)


def _blocks(x: torch.Tensor) -> torch.Tensor:
    assert x.shape[-1] % BLOCK == 0, f"last dim {x.shape[-1]} is not a multiple of {BLOCK}"
    return x.to(torch.float32).reshape(*x.shape[:-1], x.shape[-1] // BLOCK, BLOCK)


def qdq(x: torch.Tensor) -> torch.Tensor:
    """Quantize-dequantize in groups of 32 along the last axis (the emulation's activation QDQ), f32 result."""
    xb = _blocks(x)
    e = scale_exponent(xb.abs().amax(dim=-1))
    y = torch.ldexp(xb, -e[..., None])
    q = torch.sign(y) * round_e2m1(y)
    return torch.ldexp(q, e[..., None]).reshape(x.shape).to(x.dtype)


def quantize(w: torch.Tensor):
    """Quark export of a [N, K] weight: (packed uint8 [N, K/2], scale bytes uint8 [N, K/32])."""
    assert w.dim() == 2
    wb = _blocks(w)
    e = scale_exponent(wb.abs().amax(dim=-1))
    y = torch.ldexp(wb, -e[..., None])
    mag = round_e2m1(y)
    code = torch.searchsorted(GRID, mag.contiguous()).to(torch.uint8)
    assert torch.equal(GRID[code.long()], mag), "magnitude off the E2M1 grid"
    code = code | ((y < 0) & (mag != 0)).to(torch.uint8) * 8
    code = code.reshape(w.shape)
    packed = (code[:, 0::2] | (code[:, 1::2] << 4)).to(torch.uint8).contiguous()
    scales = (e + 127).clamp(min=1).to(torch.uint8).contiguous()
    return packed, scales


def dequantize(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Inverse of quantize: f32 [N, K]."""
    lo = (packed & 0x0F).long()
    hi = (packed >> 4).long()
    codes = torch.stack([lo, hi], dim=-1).reshape(packed.shape[0], packed.shape[1] * 2)
    values = GRID[codes & 7] * torch.where(codes >= 8, -1.0, 1.0)
    exps = scales.to(torch.int32) - 127
    vb = values.reshape(values.shape[0], -1, BLOCK)
    return torch.ldexp(vb, exps[..., None]).reshape(values.shape)


def _self_test():
    # Spec §3.3 tie table and §9-style vectors at scale 1 (amax 6 -> e = 0 since 6 < 1.75 * 4).
    y = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, -0.3, 5.9])
    assert round_e2m1(y).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 0.5, 6.0]
    assert scale_exponent(torch.tensor([6.0, 7.0, 1.0, 0.0])).tolist() == [0, 1, -2, -127]
    w = torch.randn(8, 64) * 3
    p, s = quantize(w)
    assert torch.equal(dequantize(p, s), qdq(w))


if __name__ == "__main__":
    _self_test()
    print("mxfp4_torch self-test ok")
