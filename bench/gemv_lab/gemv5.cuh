// Version 5 (lead, session 8): the MX-block-exact FP8 path on Hopper's native FP8 tensor-core instruction, pipelined.
//
// Each CTA is one warpgroup (4 warps). The wgmma's 64 A rows are R weight rows times Q ranges of K (Q = 8: 8 rows,
// warp w holds ranges 2w / 2w + 1 as its fragment rows g / g + 8; Q = 4: 16 rows, warp w holds range w): every
// A row is real weight, so the E2M1 -> e4m3 conversion (bit placement, exact: value * 2^-6) is done once per
// weight, and a CTA of only 8 or 16 rows still owns the whole K (384 CTAs on 3072 x 6144: an even spread over
// 132 SMs, where 16-row tiles give 192). The B operand (activations as e4m3, each MX block scaled by its power of
// two into [4, 8), exact for MX-QDQ'd values) is laid out so that column 8j + q (Q = 8) holds token j's slice of
// range q: D is (rows x ranges) x (tokens x ranges) and only its diagonal blocks are used, all of them in the lanes
// t == w at compile-time register indices. D is fresh per MX block (scale-d = 0; a block's products are exact and
// their sum fits the tensor core's accumulator), then scaled in f32 by weight scale x activation scale, while the
// next block's wgmma runs (two D / A register sets in flight). The activation image (swizzled e4m3 + f32 scales)
// is written once per call by prep_kernel, which stands in for the QDQ producer, and each CTA copies it (6 KB per
// token at K = 6144) after griddepcontrol.wait; the weights and scale bytes are queued with cp.async before it.
namespace v5 {

template <int Q>
__host__ __device__ constexpr int rows() {
  return Q == 8 ? 8 : 16;
}
template <int Q, int MP>
__host__ __device__ constexpr int cols() {
  return Q == 8 ? 8 * MP : 8 * (MP < 2 ? 1 : MP / 2);
}
__host__ __device__ constexpr int col_of(int Q, int q, int j) { return Q == 8 ? 8 * j + q : 8 * (j / 2) + 2 * q + (j % 2); }
__host__ __device__ constexpr int reg_of(int Q, int h, int j) { return Q == 8 ? 4 * j + 3 * h : 4 * (j / 2) + 2 * h + (j % 2); }
template <int Q, int MP>
__host__ __device__ constexpr size_t image_bytes(int k) {
  return static_cast<size_t>(k / (32 * Q) / 4) * (cols<Q, MP>() / 8) * 1024;
}
template <int Q, int MP>
__host__ __device__ constexpr size_t xs_floats(int k) {
  return static_cast<size_t>(k / (32 * Q)) * Q * MP;
}
template <int Q, int MP, int S>
constexpr size_t smem_bytes() {
  return 1024 + static_cast<size_t>(S / 4) * (cols<Q, MP>() / 8) * 1024 + static_cast<size_t>(S) * Q * MP * 4 +
         4 * static_cast<size_t>(S) * 256 + 4 * 16 * static_cast<size_t>(S) + static_cast<size_t>(rows<Q>()) * Q * MP * 4;
}

struct Params {
  const uint8_t* w;       // packed [n, k/2]
  const uint8_t* scales;  // [n, k/32]
  const uint8_t* ximg;    // prep_kernel's image
  const float* xs;        // prep_kernel's block scales [S][Q][MP]
  float* y;               // f32 [m, ldy]
  int m, ldy, n, k;
};
constexpr int kEarlyTrigger = 1, kImageFirst = 2;
// Pipeline depth (wgmma in flight) for the variants timed: set by run_v5 before each timing.
inline int g_depth = 3;

__device__ __forceinline__ void cp_async_4(void* dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(smem_addr(dst)), "l"(src) : "memory");
}
__device__ __forceinline__ void commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wait_pending() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}
template <int G, int C = 0>
__device__ __forceinline__ void wait_chunk(int c) {
  if constexpr (C < G) {
    if (c == C) {
      wait_pending<G - 1 - C>();
    } else {
      wait_chunk<G, C + 1>(c);
    }
  }
}
template <int N>
__device__ __forceinline__ void wg_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N));
}
__device__ __forceinline__ void keep(float& r) { asm volatile("" : "+f"(r)); }
__device__ __forceinline__ void keep(uint32_t& r) { asm volatile("" : "+r"(r)); }

template <int N>
__device__ __forceinline__ void wgmma_e4m3(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc);
template <>
__device__ __forceinline__ void wgmma_e4m3<8>(float (&d)[4], const uint32_t (&a)[4], uint64_t desc) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %9, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n8k32.f32.e4m3.e4m3 {%0,%1,%2,%3}, {%4,%5,%6,%7}, %8, p, 1, 1;\n}\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(0));
}
template <>
__device__ __forceinline__ void wgmma_e4m3<16>(float (&d)[8], const uint32_t (&a)[4], uint64_t desc) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %13, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n16k32.f32.e4m3.e4m3 {%0,%1,%2,%3,%4,%5,%6,%7}, {%8,%9,%10,%11}, %12, p, 1, 1;\n}\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3]), "=f"(d[4]), "=f"(d[5]), "=f"(d[6]), "=f"(d[7])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(0));
}
template <>
__device__ __forceinline__ void wgmma_e4m3<32>(float (&d)[16], const uint32_t (&a)[4], uint64_t desc) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %21, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n32k32.f32.e4m3.e4m3 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15}, {%16,%17,%18,%19}, %20, p, 1, 1;\n}\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3]), "=f"(d[4]), "=f"(d[5]), "=f"(d[6]), "=f"(d[7]), "=f"(d[8]), "=f"(d[9]), "=f"(d[10]), "=f"(d[11]), "=f"(d[12]), "=f"(d[13]), "=f"(d[14]), "=f"(d[15])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(0));
}
template <>
__device__ __forceinline__ void wgmma_e4m3<64>(float (&d)[32], const uint32_t (&a)[4], uint64_t desc) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k32.f32.e4m3.e4m3 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, {%32,%33,%34,%35}, %36, p, 1, 1;\n}\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3]), "=f"(d[4]), "=f"(d[5]), "=f"(d[6]), "=f"(d[7]), "=f"(d[8]), "=f"(d[9]), "=f"(d[10]), "=f"(d[11]), "=f"(d[12]), "=f"(d[13]), "=f"(d[14]), "=f"(d[15]), "=f"(d[16]), "=f"(d[17]), "=f"(d[18]), "=f"(d[19]), "=f"(d[20]), "=f"(d[21]), "=f"(d[22]), "=f"(d[23]), "=f"(d[24]), "=f"(d[25]), "=f"(d[26]), "=f"(d[27]), "=f"(d[28]), "=f"(d[29]), "=f"(d[30]), "=f"(d[31])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(0));
}

// E2M1 codes (8 per word, natural k order) -> e4m3 bytes (value * 2^-6): low nibbles (even k) and high nibbles.
__device__ __forceinline__ uint32_t e4m3_of_low(uint32_t w) { return ((w << 2) & 0x1c1c1c1cu) | ((w << 4) & 0x80808080u); }
__device__ __forceinline__ uint32_t e4m3_of_high(uint32_t w) { return ((w >> 2) & 0x1c1c1c1cu) | (w & 0x80808080u); }

// 2^(s - 127) for an E8M0 byte, exactly (s = 0: the f32 subnormal 2^-127; 255: NaN).
__device__ __forceinline__ float e8m0_exact(uint32_t s) {
  return __uint_as_float(s == 0 ? 0x00400000u : (s == 255 ? 0x7fc00000u : s << 23));
}

// The activations of tokens [0, MP) (QDQ'd bf16 [m, k], rows past m read as zeros) as the wgmma B image: one thread
// per (token, MX block).
template <int Q, int MP>
__global__ void prep_kernel(const uint16_t* x, int m, int k, uint8_t* img, float* xs) {
  pdl_wait();
  pdl_launch_dependents();
  const int nb = k / 32, S = nb / Q;
  const int idx = blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= MP * nb) return;
  const int j = idx / nb, b = idx % nb;
  uint32_t words[2][4];
  const float scale = block_to_e4m3(j < m ? x + static_cast<size_t>(j) * k + static_cast<size_t>(b) * 32 : nullptr, words);
  const int q = b / S, i = b % S, n = col_of(Q, q, j);
  constexpr int N = cols<Q, MP>();
  const size_t atom = static_cast<size_t>(i / 4) * (N / 8) + n / 8;
  const int r8 = n % 8, s = i % 4;
  uint8_t* base = img + atom * 1024 + r8 * 128;
#pragma unroll
  for (int h = 0; h < 2; ++h)
    *reinterpret_cast<uint4*>(base + (((2 * s + h) ^ r8) * 16)) = make_uint4(words[h][0], words[h][1], words[h][2], words[h][3]);
  xs[(static_cast<size_t>(i) * Q + q) * MP + j] = j < m ? scale : 0.0f;
}

template <int Q, int MP, int S, int P>
__global__ void __launch_bounds__(128) gemv5_kernel(Params p, int flags) {
  constexpr int R = rows<Q>(), N = cols<Q, MP>(), G = S / 4, ND = N / 2, SW = S / 4;
  extern __shared__ uint8_t smem_raw[];
  __shared__ __align__(8) uint64_t image_bar;
  const uint32_t raw = smem_addr(smem_raw);
  uint8_t* const bimg = smem_raw + (((raw + 1023u) & ~1023u) - raw);        // [G][N/8][1 KB]
  float* const sxs = reinterpret_cast<float*>(bimg + G * (N / 8) * 1024);   // [S][Q][MP]
  uint4* const wsm_all = reinterpret_cast<uint4*>(sxs + S * Q * MP);        // [warp][S][2][8] 16-byte blocks
  uint32_t* const scl_all = reinterpret_cast<uint32_t*>(wsm_all + 4 * S * 16);  // [warp][16 segments][S/4]
  float* const part = reinterpret_cast<float*>(scl_all + 4 * 16 * SW);      // [R][Q][MP]

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int row0 = blockIdx.x * R;
  const size_t row_bytes = static_cast<size_t>(p.k) / 2, srow = static_cast<size_t>(p.k) / 32;
  auto row_of = [&](int h, int gg) { return row0 + (Q == 8 ? gg : gg + 8 * h); };
  auto range_of = [&](int h) { return Q == 8 ? 2 * warp + h : warp; };
  uint4* const wsm = wsm_all + warp * S * 16;
  uint32_t* const scl = scl_all + warp * 16 * SW;
  if (threadIdx.x == 0) {
    mbar_init(&image_bar, 128u);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }

  // Scale bytes of the warp's 16 (row, range) segments with chunk 0, then the weights chunk by chunk (4 MX blocks
  // of each segment per commit group). kImageFirst: only chunk 0 before the wait, the activation image next, the
  // other chunks after it (so the image does not land behind the CTA's whole weight slice).
  for (int idx = lane; idx < 16 * SW; idx += 32) {
    const int seg = idx / SW, wd = idx % SW, h = seg / 8, row = row_of(h, seg % 8);
    if (row < p.n) cp_async_4(scl + idx, p.scales + static_cast<size_t>(row) * srow + range_of(h) * S + wd * 4);
  }
  auto issue_chunk = [&](int c) {
#pragma unroll
    for (int pc = lane; pc < 64; pc += 32) {
      const int i = 4 * c + pc / 16, h = (pc / 8) % 2, gg = pc % 8, row = row_of(h, gg);
      if (row < p.n)
        cp_async_16(wsm + (i * 2 + h) * 8 + gg,
                    p.w + static_cast<size_t>(row) * row_bytes + static_cast<size_t>(range_of(h) * S + i) * 16);
    }
    commit();
  };
  const bool image_first = (flags & kImageFirst) != 0;
  issue_chunk(0);
  if (!image_first) {
#pragma unroll
    for (int c = 1; c < G; ++c) issue_chunk(c);
  }
  if (flags & kEarlyTrigger) pdl_launch_dependents();
  __syncthreads();  // the barrier's initialisation
  pdl_wait();
  {
    const uint4* src = reinterpret_cast<const uint4*>(p.ximg);
    uint4* dst = reinterpret_cast<uint4*>(bimg);
    for (int idx = threadIdx.x; idx < G * (N / 8) * 64; idx += 128) cp_async_16(dst + idx, src + idx);
    const uint4* xsrc = reinterpret_cast<const uint4*>(p.xs);
    uint4* xdst = reinterpret_cast<uint4*>(sxs);
    for (int idx = threadIdx.x; idx < S * Q * MP / 4; idx += 128) cp_async_16(xdst + idx, xsrc + idx);
    cp_async_arrive(&image_bar);  // when this thread's cp.async so far (chunk 0, scales, image) have landed
  }
  if (image_first) {
#pragma unroll
    for (int c = 1; c < G; ++c) issue_chunk(c);
  }
  if (!(flags & kEarlyTrigger)) pdl_launch_dependents();
  mbar_wait(&image_bar, 0);
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // the image is read by the tensor cores
  __syncwarp();
  uint32_t sw_words[2][SW];
  bool odd_scale = false;
#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (int wd = 0; wd < SW; ++wd) {
      const uint32_t v = scl[(h * 8 + g) * SW + wd];
      sw_words[h][wd] = v;
      odd_scale |= (__vcmpeq4(v, 0u) | __vcmpeq4(v, 0xffffffffu)) != 0u;
    }
  const bool robust = __syncthreads_or(odd_scale);

  float acc[2][MP];
  // The whole loop twice: the exact conversion of every scale byte only where the CTA holds a 0 or 255.
  auto run = [&](auto robust_tag) {
    constexpr bool kRobust = decltype(robust_tag)::value;
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int j = 0; j < MP; ++j) acc[h][j] = 0.0f;
    const uint32_t bbase = smem_addr(bimg);
    float d[P][ND];
    uint32_t a[P][4];
    auto apply = [&](int i, float(&di)[ND]) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const uint32_t word = sw_words[h][i / 4];
        float swf;
        if constexpr (kRobust) {
          swf = e8m0_exact((word >> (8 * (i % 4))) & 0xffu);
        } else {
          swf = __uint_as_float((i % 4 == 3 ? word >> 1 : word << (23 - 8 * (i % 4))) & 0x7f800000u);
        }
        const float* sx = sxs + (i * Q + range_of(h)) * MP;
#pragma unroll
        for (int j = 0; j < MP; ++j) acc[h][j] = fmaf(di[reg_of(Q, h, j)] * swf, sx[j], acc[h][j]);
      }
    };
    const uint32_t* w32 = reinterpret_cast<const uint32_t*>(wsm);
    uint32_t w0 = w32[g * 4 + t], w1 = w32[(8 + g) * 4 + t];
#pragma unroll
    for (int i = 0; i < S; ++i) {
      uint32_t (&ai)[4] = a[i % P];
      ai[0] = e4m3_of_low(w0);
      ai[1] = e4m3_of_low(w1);
      ai[2] = e4m3_of_high(w0);
      ai[3] = e4m3_of_high(w1);
      if (i + 1 < S) {
        if ((i + 1) % 4 == 0) {
          wait_chunk<G>((i + 1) / 4);
          __syncwarp();
        }
        w0 = w32[((i + 1) * 16 + g) * 4 + t];
        w1 = w32[((i + 1) * 16 + 8 + g) * 4 + t];
      }
      wg_fence();
      wgmma_e4m3<N>(d[i % P], ai, wgmma_desc_sw128(bbase + ((i / 4) * (N / 8)) * 1024 + (i % 4) * 32));
      wg_commit();
      if (i >= P - 1) {
        wg_wait<P - 1>();
        const int done = i - (P - 1);
#pragma unroll
        for (int r = 0; r < ND; ++r) keep(d[done % P][r]);
#pragma unroll
        for (int r = 0; r < 4; ++r) keep(a[done % P][r]);
        apply(done, d[done % P]);
      }
    }
    wg_wait<0>();
#pragma unroll
    for (int done = S - (P - 1) < 0 ? 0 : S - (P - 1); done < S; ++done) {
#pragma unroll
      for (int r = 0; r < ND; ++r) keep(d[done % P][r]);
#pragma unroll
      for (int r = 0; r < 4; ++r) keep(a[done % P][r]);
      apply(done, d[done % P]);
    }
  };
  if (robust) {
    run(std::true_type{});
  } else {
    run(std::false_type{});
  }

  if (t == warp) {
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int j = 0; j < MP; ++j) part[((Q == 8 ? g : g + 8 * h) * Q + range_of(h)) * MP + j] = acc[h][j];
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < R * MP; idx += 128) {
    const int r = idx / MP, j = idx % MP;
    if (j >= p.m || row0 + r >= p.n) continue;
    float s = 0.0f;
#pragma unroll
    for (int q = 0; q < Q; ++q) s += part[(r * Q + q) * MP + j];
    p.y[static_cast<size_t>(j) * p.ldy + row0 + r] = s;
  }
}

// Host: one launch of prep (optional) and the GEMV for m tokens; false where the shape is not taken.
template <int Q, int MP, int S>
void set_smem() {
  for (auto* kernel : {gemv5_kernel<Q, MP, S, 2>, gemv5_kernel<Q, MP, S, 3>, gemv5_kernel<Q, MP, S, 4>})
    CK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                            static_cast<int>(smem_bytes<Q, MP, S>())));
}
template <int Q, int MP, int S>
void launch_one(const Params& p, bool pdl, int flags, cudaStream_t stream) {
  auto* kernel = g_depth == 2 ? gemv5_kernel<Q, MP, S, 2> : (g_depth == 4 ? gemv5_kernel<Q, MP, S, 4> : gemv5_kernel<Q, MP, S, 3>);
  CK(launch_kernel(kernel, dim3((p.n + rows<Q>() - 1) / rows<Q>()), dim3(128), smem_bytes<Q, MP, S>(), stream, pdl,
                   p, flags));
}
template <int Q, int MP>
void prep(const uint16_t* x, int m, int k, uint8_t* img, float* xs, bool pdl, cudaStream_t stream) {
  const int threads = MP * (k / 32);
  CK(launch_kernel(prep_kernel<Q, MP>, dim3((threads + 127) / 128), dim3(128), 0, stream, pdl, x, m, k, img, xs));
}
template <int Q, int MP>
bool launch_mp(const Params& p, bool pdl, int flags, cudaStream_t stream) {
  const int S = p.k / (32 * Q);
  if (p.k % (32 * Q * 4) != 0) return false;
  if (S == 24) {
    launch_one<Q, MP, 24>(p, pdl, flags, stream);
  } else if (S == 12 && Q == 8) {
    launch_one<Q, MP, 12>(p, pdl, flags, stream);
  } else {
    return false;
  }
  return true;
}
inline int padded_tokens(int m) { return m <= 1 ? 1 : (m <= 2 ? 2 : (m <= 4 ? 4 : 8)); }
template <int Q>
bool launch(const Params& p, bool pdl, int flags, cudaStream_t stream) {
  switch (padded_tokens(p.m)) {
    case 1: return launch_mp<Q, 1>(p, pdl, flags, stream);
    case 2: return launch_mp<Q, 2>(p, pdl, flags, stream);
    case 4: return launch_mp<Q, 4>(p, pdl, flags, stream);
    default: return launch_mp<Q, 8>(p, pdl, flags, stream);
  }
}
template <int Q>
void prep_for(const uint16_t* x, int m, int k, uint8_t* img, float* xs, bool pdl, cudaStream_t stream) {
  switch (padded_tokens(m)) {
    case 1: prep<Q, 1>(x, m, k, img, xs, pdl, stream); break;
    case 2: prep<Q, 2>(x, m, k, img, xs, pdl, stream); break;
    case 4: prep<Q, 4>(x, m, k, img, xs, pdl, stream); break;
    default: prep<Q, 8>(x, m, k, img, xs, pdl, stream); break;
  }
}
template <int Q>
void set_all_smem() {
  set_smem<Q, 1, 24>(); set_smem<Q, 2, 24>(); set_smem<Q, 4, 24>(); set_smem<Q, 8, 24>();
  if constexpr (Q == 8) { set_smem<Q, 1, 12>(); set_smem<Q, 2, 12>(); set_smem<Q, 4, 12>(); set_smem<Q, 8, 12>(); }
}
constexpr size_t kImageMax = 1 << 20, kXsMax = 1 << 16;

}  // namespace v5

// --v5: checks (vs the double reference: fresh random weights, QDQ'd activations, ragged n, capped and special scale
// bytes, NaN-poisoned outputs, run-to-run bits) and timings of version 5 against version 4 (the backend), cuBLAS and
// the copy ceiling, all in this process.
inline int run_v5(bool quick, cudaStream_t stream, cublasHandle_t blas, double copy_gbs) {
  namespace cu = mxlm::backend::cuda;
  v5::set_all_smem<8>();
  v5::set_all_smem<4>();
  std::mt19937_64 rng(5555);
  uint8_t* img;
  float* xs;
  CK(cudaMalloc(&img, v5::kImageMax));
  CK(cudaMemset(img, 0, v5::kImageMax));
  CK(cudaMalloc(&xs, v5::kXsMax * 4));
  int checks = 0, failures = 0;
  auto run_q = [&](int q, const v5::Params& p, const uint16_t* x, bool pdl, int flags, bool with_prep) {
    if (q == 8) {
      if (with_prep) v5::prep_for<8>(x, p.m, p.k, img, xs, pdl, stream);
      return v5::launch<8>(p, pdl, flags, stream);
    }
    if (with_prep) v5::prep_for<4>(x, p.m, p.k, img, xs, pdl, stream);
    return v5::launch<4>(p, pdl, flags, stream);
  };
  struct CheckShape {
    int n, k, scale_mode;
  };
  for (const CheckShape cs : {CheckShape{3072, 6144, 0}, CheckShape{6144, 3072, 0}, CheckShape{2996, 6144, 1},
                              CheckShape{200, 3072, 2}, CheckShape{2996, 3072, 1}, CheckShape{1000, 6144, 2}}) {
    const size_t wbytes = static_cast<size_t>(cs.n) * cs.k / 2, sbytes = static_cast<size_t>(cs.n) * cs.k / 32;
    std::vector<uint8_t> hw(wbytes), hs(sbytes);
    for (auto& b : hw) b = static_cast<uint8_t>(rng());
    for (auto& b : hs) b = static_cast<uint8_t>(cs.scale_mode == 1 ? 100 + rng() % 51 : 118 + rng() % 7);
    if (cs.scale_mode == 2) {  // special bytes: 0 (2^-127) in rows 5 and 9, 255 (NaN) in row 7, 1 and 200 elsewhere
      const int nb = cs.k / 32;
      hs[5 * nb + 3] = 0;
      hs[9 * nb + nb - 1] = 0;
      hs[7 * nb + 10] = 255;
      hs[11 * nb + 0] = 1;
      hs[12 * nb + 40] = 200;
    }
    std::vector<uint16_t> hx(static_cast<size_t>(16) * cs.k);
    fill_qdq_activations(hx, rng);
    const CheckProblem prob(hw, hs, hx, cs.n, cs.k, stream);
    for (const int q : {8, 4}) {
      for (const int m : {1, 2, 3, 4, 5, 8})
      for (const int depth : {2, 3, 4})
      for (const int flags : {0, v5::kImageFirst}) {
        v5::g_depth = depth;
        CK(cudaMemsetAsync(prob.y, 0xff, static_cast<size_t>(16) * cs.n * 4, stream));
        const v5::Params p{prob.w, prob.s, img, xs, prob.y, m, cs.n, cs.n, cs.k};
        if (!run_q(q, p, prob.x, true, flags, true)) continue;
        CK(cudaStreamSynchronize(stream));
        std::vector<float> y(static_cast<size_t>(16) * cs.n);
        CK(cudaMemcpy(y.data(), prob.y, y.size() * 4, cudaMemcpyDeviceToHost));
        double max_err = 0, max_ref = 0;
        int bad = 0;
        for (int tok = 0; tok < m; ++tok)
          for (int row = 0; row < cs.n; ++row) {
            const double r = prob.ref[static_cast<size_t>(tok) * cs.n + row];
            const double o = y[static_cast<size_t>(tok) * cs.n + row];
            if (std::isnan(r)) {
              if (!std::isnan(o)) ++bad;
              continue;
            }
            if (!std::isfinite(o)) ++bad;
            max_err = std::max(max_err, std::fabs(o - r));
            max_ref = std::max(max_ref, std::fabs(r));
          }
        for (int tok = m; tok < 16; ++tok)
          for (int row = 0; row < cs.n; ++row) {
            uint32_t u;
            std::memcpy(&u, &y[static_cast<size_t>(tok) * cs.n + row], 4);
            if (u != 0xffffffffu) ++bad;
          }
        const double rel = max_err / std::max(max_ref, 1e-30);
        ++checks;
        if (bad || rel > 2e-6) {
          ++failures;
          std::printf("FAIL v5 Q=%d P=%d flags=%d n=%d k=%d m=%d scales=%d: rel err %.3g, %d bad values\n", q, depth,
                      flags, cs.n, cs.k, m, cs.scale_mode, rel, bad);
        } else if ((m == 1 || m == 8) && depth == 3 && flags == 0) {
          std::printf("ok   v5 Q=%d n=%d k=%d m=%d scales=%d: rel err %.3g\n", q, cs.n, cs.k, m, cs.scale_mode, rel);
        }
      }
      // run to run: the same bits
      const v5::Params p{prob.w, prob.s, img, xs, prob.y, 8, cs.n, cs.n, cs.k};
      std::vector<float> y1(static_cast<size_t>(8) * cs.n), y2(y1.size());
      if (!run_q(q, p, prob.x, true, 0, true)) continue;
      CK(cudaMemcpyAsync(y1.data(), prob.y, y1.size() * 4, cudaMemcpyDeviceToHost, stream));
      CK(cudaStreamSynchronize(stream));
      run_q(q, p, prob.x, true, 0, true);
      CK(cudaMemcpyAsync(y2.data(), prob.y, y2.size() * 4, cudaMemcpyDeviceToHost, stream));
      CK(cudaStreamSynchronize(stream));
      ++checks;
      if (std::memcmp(y1.data(), y2.data(), y1.size() * 4) != 0) {
        ++failures;
        std::printf("FAIL v5 determinism Q=%d n=%d k=%d\n", q, cs.n, cs.k);
      }
    }
  }
  std::printf("v5 checks: %d, failures: %d\n", checks, failures);

  struct Shape {
    int n, k, q;
  };
  const int sets = 8, calls = 64;
  for (const Shape sh : {Shape{3072, 6144, 8}, Shape{6144, 3072, 4}, Shape{6144, 3072, 8}}) {
    const size_t wbytes = static_cast<size_t>(sh.n) * sh.k / 2, sbytes = static_cast<size_t>(sh.n) * sh.k / 32;
    std::vector<WeightSet> ws = make_weight_sets(sh.n, sh.k, sets, rng, stream);
    TokenBuffers tb = make_token_buffers(sh.n, sh.k, rng);
    CK(cudaStreamSynchronize(stream));
    const double bytes = static_cast<double>(wbytes + sbytes);
    std::printf("\n== v5 Q=%d N=%d K=%d: weight bytes %.2f MB, copy floor %.2f us (80 %%: %.2f us)\n", sh.q, sh.n, sh.k,
                bytes / 1e6, bytes / (copy_gbs * 1e3), bytes / (copy_gbs * 1e3) / 0.8);
    for (const int m : quick ? std::vector<int>{1, 2, 4, 8} : std::vector<int>{1, 2, 3, 4, 5, 8}) {
      const double blas_us = cublas_time_us(blas, stream, calls, ws, sh.n, m, sh.k, tb.x, tb.y);
      auto v4_at = [&](int nsets) {
        return graph_time_us(stream, calls, [&](int i) {
          const cu::Mxfp4GemvGroup gr{ws[i % nsets].w, ws[i % nsets].s, tb.x, tb.y, m, sh.n};
          CK(cu::launch_mxfp4_gemv4(gr, sh.n, sh.k, true, stream));
        });
      };
      run_q(sh.q, v5::Params{ws[0].w, ws[0].s, img, xs, tb.y, m, sh.n, sh.n, sh.k}, tb.x, false, 0, true);
      CK(cudaStreamSynchronize(stream));
      auto v5_at = [&](int nsets, int flags, bool with_prep) {
        return graph_time_us(stream, calls, [&](int i) {
          run_q(sh.q, v5::Params{ws[i % nsets].w, ws[i % nsets].s, img, xs, tb.y, m, sh.n, sh.n, sh.k}, tb.x, true,
                flags, with_prep);
        });
      };
      auto row = [&](const char* name, double us) {
        std::printf("M=%d %-38s %7.2f us  %3.0f %% of copy  %.2fx cuBLAS bf16 (%.2f us)\n", m, name, us,
                    100.0 * bytes / (us * 1e3) / copy_gbs, blas_us / us, blas_us);
      };
      row("v4 (backend), PDL", v4_at(sets));
      row("v4 weights resident in L2", v4_at(1));
      for (const int depth : {2, 3, 4})
        for (const int flags : {0, v5::kImageFirst, v5::kImageFirst | v5::kEarlyTrigger}) {
          v5::g_depth = depth;
          char name[96];
          std::snprintf(name, sizeof name, "v5 P=%d %s%s", depth, flags & v5::kImageFirst ? "image first" : "weights first",
                        flags & v5::kEarlyTrigger ? ", early trigger" : "");
          row(name, v5_at(sets, flags, false));
          if (depth == 3 && flags == v5::kImageFirst) {
            row("v5 P=3 image first, resident in L2", v5_at(1, flags, false));
            row("v5 P=3 image first, prep + GEMV", v5_at(sets, flags, true));
          }
        }
    }
    free_weight_sets(ws);
    free_token_buffers(tb);
  }
  CK(cudaFree(img));
  CK(cudaFree(xs));
  std::printf("\nv5 checks: %d, failures: %d\n", checks, failures);
  return failures == 0 ? 0 : 2;
}
