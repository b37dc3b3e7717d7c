// Shared pieces of the CPU contrastive-loss kernels (clip_loss.cpp, siglip_loss.cpp).
//
// All kernels compute S = s * Q K^T + b tile by tile (MB x NB), never the B x B matrix:
//   * a 6x16 register-tile micro-kernel (AVX2/FMA intrinsics; a portable `omp simd` version otherwise) used for
//     the three GEMM shapes: S = Q K^T (K packed into 16-column panels [D][16]), dQ += G K, dK += G^T Q;
//   * fast vectorized exp / log (Cephes polynomials, ~1-2 ulp fp32) for the epilogues;
//   * fp32 inputs (the Python side upcasts bf16/fp16 once, O(B*D)), fp32 accumulation, double for the few
//     global sums (loss, dscale, dbias) so they do not drift at B^2 terms.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define BF_AVX2 1
#else
#define BF_AVX2 0
#endif

namespace bf {

using i64 = int64_t;
constexpr int MR = 6;   // micro-tile rows
constexpr int NR = 16;  // micro-tile columns (two 8-float vectors)

inline i64 round_up(i64 x, i64 m) { return (x + m - 1) / m * m; }

// ------------------------------------------------------------------------------------------ 8-wide vector
#if BF_AVX2
struct V {
  __m256 v;
  V() = default;
  V(__m256 x) : v(x) {}
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V zero() { return _mm256_setzero_ps(); }
  void store(float* p) const { _mm256_storeu_ps(p, v); }
};
inline V operator+(V a, V b) { return _mm256_add_ps(a.v, b.v); }
inline V operator-(V a, V b) { return _mm256_sub_ps(a.v, b.v); }
inline V operator*(V a, V b) { return _mm256_mul_ps(a.v, b.v); }
inline V operator/(V a, V b) { return _mm256_div_ps(a.v, b.v); }
inline V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a.v, b.v, c.v); }
inline V vmax(V a, V b) { return _mm256_max_ps(a.v, b.v); }
inline V vmin(V a, V b) { return _mm256_min_ps(a.v, b.v); }
inline V vabs(V a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a.v); }
inline float hsum(V a) {
  __m128 lo = _mm256_castps256_ps128(a.v), hi = _mm256_extractf128_ps(a.v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}
inline float hmax(V a) {
  __m128 lo = _mm256_castps256_ps128(a.v), hi = _mm256_extractf128_ps(a.v, 1);
  lo = _mm_max_ps(lo, hi);
  lo = _mm_max_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_max_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

// exp(x): Cephes expf on AVX2; inputs below -87.3 flush to 0, above 88.37 clamp (the callers subtract a max).
inline V vexp(V xv) {
  __m256 x = xv.v;
  const __m256 under = _mm256_cmp_ps(x, _mm256_set1_ps(-87.3365447f), _CMP_LT_OQ);
  x = _mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f));
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.3365447f));
  __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  y = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
  return _mm256_andnot_ps(under, y);
}

// log(x) for positive normal x: Cephes logf.
inline V vlog(V xv) {
  __m256 x = xv.v;
  __m256i bits = _mm256_castps_si256(x);
  __m256 e = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(126)));
  __m256 m = _mm256_castsi256_ps(
      _mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi32(0x007fffff)), _mm256_set1_epi32(0x3f000000)));
  // m in [0.5, 1): if m < sqrt(1/2) use 2m - 1 and e - 1, else m - 1.
  __m256 small = _mm256_cmp_ps(m, _mm256_set1_ps(0.707106781186547524f), _CMP_LT_OQ);
  e = _mm256_sub_ps(e, _mm256_and_ps(small, _mm256_set1_ps(1.0f)));
  m = _mm256_sub_ps(_mm256_add_ps(m, _mm256_and_ps(small, m)), _mm256_set1_ps(1.0f));
  __m256 z = _mm256_mul_ps(m, m);
  __m256 y = _mm256_set1_ps(7.0376836292E-2f);
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(-1.1514610310E-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(1.1676998740E-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(-1.2420140846E-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(1.4249322787E-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(-1.6668057665E-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(2.0000714765E-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(-2.4999993993E-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(3.3333331174E-1f));
  y = _mm256_mul_ps(_mm256_mul_ps(y, m), z);
  y = _mm256_fmadd_ps(e, _mm256_set1_ps(-2.12194440e-4f), y);
  y = _mm256_fnmadd_ps(z, _mm256_set1_ps(0.5f), y);
  return _mm256_fmadd_ps(e, _mm256_set1_ps(0.693359375f), _mm256_add_ps(m, y));
}

// log1p(y) for y in [0, 1] without cancellation: log(u) * y / (u - 1), u = 1 + y (Goldberg); y where u == 1.
inline V vlog1p_unit(V yv) {
  __m256 u = _mm256_add_ps(yv.v, _mm256_set1_ps(1.0f));
  __m256 d = _mm256_sub_ps(u, _mm256_set1_ps(1.0f));
  __m256 is1 = _mm256_cmp_ps(d, _mm256_setzero_ps(), _CMP_EQ_OQ);
  __m256 safe_d = _mm256_blendv_ps(d, _mm256_set1_ps(1.0f), is1);
  __m256 r = _mm256_div_ps(_mm256_mul_ps(vlog(u).v, yv.v), safe_d);
  return _mm256_blendv_ps(r, yv.v, is1);
}
#else   // portable fallback: plain arrays, the compiler vectorizes what it can.
struct V {
  float v[8];
  static V load(const float* p) { V r; std::memcpy(r.v, p, sizeof r.v); return r; }
  static V set1(float x) { V r; for (float& e : r.v) e = x; return r; }
  static V zero() { return set1(0.f); }
  void store(float* p) const { std::memcpy(p, v, sizeof v); }
};
#define BF_V_BINOP(op)                                   \
  inline V operator op(V a, V b) {                       \
    V r;                                                 \
    for (int i = 0; i < 8; ++i) r.v[i] = a.v[i] op b.v[i]; \
    return r;                                            \
  }
BF_V_BINOP(+)
BF_V_BINOP(-)
BF_V_BINOP(*)
BF_V_BINOP(/)
#undef BF_V_BINOP
inline V fmadd(V a, V b, V c) { V r; for (int i = 0; i < 8; ++i) r.v[i] = a.v[i] * b.v[i] + c.v[i]; return r; }
inline V vmax(V a, V b) { V r; for (int i = 0; i < 8; ++i) r.v[i] = std::max(a.v[i], b.v[i]); return r; }
inline V vmin(V a, V b) { V r; for (int i = 0; i < 8; ++i) r.v[i] = std::min(a.v[i], b.v[i]); return r; }
inline V vabs(V a) { V r; for (int i = 0; i < 8; ++i) r.v[i] = std::fabs(a.v[i]); return r; }
inline float hsum(V a) { float s = 0; for (float e : a.v) s += e; return s; }
inline float hmax(V a) { float m = a.v[0]; for (float e : a.v) m = std::max(m, e); return m; }
inline V vexp(V a) { V r; for (int i = 0; i < 8; ++i) r.v[i] = std::exp(a.v[i]); return r; }
inline V vlog1p_unit(V a) { V r; for (int i = 0; i < 8; ++i) r.v[i] = std::log1p(a.v[i]); return r; }
#endif

inline float sexp(float x) { return std::exp(x); }
inline float softplus_s(float x) { return std::max(x, 0.f) + std::log1p(std::exp(-std::fabs(x))); }
inline float sigmoid_s(float x) { return 1.f / (1.f + std::exp(-x)); }
inline V softplus_v(V x) { return vmax(x, V::zero()) + vlog1p_unit(vexp(V::zero() - vabs(x))); }
inline V sigmoid_v(V x) { return V::set1(1.f) / (V::set1(1.f) + vexp(V::zero() - x)); }

// ------------------------------------------------------------------------------------------ micro-kernel
// C[r][0..16) (+)= sum_p A(r, p) * B(p, 0..16), A(r, p) = a[r*a_rs + p*a_ps], B row p = b + p*b_ps (16 floats).
// always_inline + fully unrolled row loops: every call site gets its own copy whose 2*M accumulators live in
// registers (an out-of-line copy with rolled loops spilled them to the stack and ran ~2.5x slower).
#define BF_UNROLL _Pragma("GCC unroll 8")
template <int M>
__attribute__((always_inline)) inline void micro(const float* __restrict a, i64 a_rs, i64 a_ps,
                                                 const float* __restrict b, i64 b_ps, i64 kdim,
                                                 float* __restrict c, i64 c_rs, bool accumulate) {
#if BF_AVX2
  __m256 c0[M], c1[M];
  BF_UNROLL for (int r = 0; r < M; ++r) {
    c0[r] = accumulate ? _mm256_loadu_ps(c + r * c_rs) : _mm256_setzero_ps();
    c1[r] = accumulate ? _mm256_loadu_ps(c + r * c_rs + 8) : _mm256_setzero_ps();
  }
  for (i64 p = 0; p < kdim; ++p) {
    const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
    b += b_ps;
    const float* ap = a + p * a_ps;
    BF_UNROLL for (int r = 0; r < M; ++r) {
      const __m256 av = _mm256_broadcast_ss(ap + r * a_rs);
      c0[r] = _mm256_fmadd_ps(av, b0, c0[r]);
      c1[r] = _mm256_fmadd_ps(av, b1, c1[r]);
    }
  }
  BF_UNROLL for (int r = 0; r < M; ++r) {
    _mm256_storeu_ps(c + r * c_rs, c0[r]);
    _mm256_storeu_ps(c + r * c_rs + 8, c1[r]);
  }
#else
  float acc[M][NR];
  for (int r = 0; r < M; ++r)
    for (int j = 0; j < NR; ++j) acc[r][j] = accumulate ? c[r * c_rs + j] : 0.f;
  for (i64 p = 0; p < kdim; ++p) {
    const float* bp = b + p * b_ps;
    for (int r = 0; r < M; ++r) {
      const float av = a[r * a_rs + p * a_ps];
#pragma omp simd
      for (int j = 0; j < NR; ++j) acc[r][j] += av * bp[j];
    }
  }
  for (int r = 0; r < M; ++r)
    for (int j = 0; j < NR; ++j) c[r * c_rs + j] = acc[r][j];
#endif
}

// Same with a runtime row count 1..6 (block edges).
__attribute__((always_inline)) inline void micro_rows(int m, const float* a, i64 a_rs, i64 a_ps, const float* b, i64 b_ps, i64 kdim, float* c,
                       i64 c_rs, bool accumulate) {
  switch (m) {
    case 6: micro<6>(a, a_rs, a_ps, b, b_ps, kdim, c, c_rs, accumulate); break;
    case 5: micro<5>(a, a_rs, a_ps, b, b_ps, kdim, c, c_rs, accumulate); break;
    case 4: micro<4>(a, a_rs, a_ps, b, b_ps, kdim, c, c_rs, accumulate); break;
    case 3: micro<3>(a, a_rs, a_ps, b, b_ps, kdim, c, c_rs, accumulate); break;
    case 2: micro<2>(a, a_rs, a_ps, b, b_ps, kdim, c, c_rs, accumulate); break;
    case 1: micro<1>(a, a_rs, a_ps, b, b_ps, kdim, c, c_rs, accumulate); break;
    default: break;
  }
}

// C[m x (16*npanels)] (+)= A[m x kdim] * B where B is given as 16-wide column panels (panel stride b_pstride).
inline void gemm_panels(i64 m, i64 npanels, const float* a, i64 a_rs, i64 a_ps, const float* b, i64 b_ps,
                        i64 b_pstride, i64 kdim, float* c, i64 c_rs, bool accumulate) {
  for (i64 r = 0; r < m; r += MR) {
    const int mr = (int)std::min<i64>(MR, m - r);
    for (i64 p = 0; p < npanels; ++p)
      micro_rows(mr, a + r * a_rs, a_rs, a_ps, b + p * b_pstride, b_ps, kdim, c + r * c_rs + p * NR, c_rs,
                 accumulate);
  }
}

// ------------------------------------------------------------------------------------------ problem setup
struct Tiles {
  i64 MB, NB;  // rows per block (multiple of 6), columns per block (multiple of 16)
};

// Column block sized so the K panels of one block (NB*D floats) stay in L2 while all row panels sweep them.
inline Tiles choose_tiles(i64 D) {
  i64 nb = (48 * 1024 / std::max<i64>(D, 1)) / NR * NR;
  nb = std::clamp<i64>(nb, 32, 256);
  return {96, nb};
}

// K [Bk x D] row-major -> panels [ceil(Bk/16)][D][16], zero padded.
inline std::vector<float> pack_panels(const float* k, i64 Bk, i64 D, int nthreads) {
  const i64 np = (Bk + NR - 1) / NR;
  std::vector<float> out((size_t)(np * D * NR));
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (i64 p = 0; p < np; ++p) {
    float* dst = out.data() + p * D * NR;
    for (i64 d = 0; d < D; ++d)
      for (i64 j = 0; j < NR; ++j) {
        const i64 row = p * NR + j;
        dst[d * NR + j] = row < Bk ? k[row * D + d] : 0.f;
      }
  }
  return out;
}

// X [n x D] -> 16-wide column panels [ceil(D/16)][n][16], zero padded: the B operand of dQ += G K and
// dK += G^T Q, read sequentially by the micro-kernel (row p of a panel is 16 contiguous floats).
inline std::vector<float> pack_dpanels(const float* x, i64 n, i64 D, int nthreads) {
  const i64 npd = (D + NR - 1) / NR;
  std::vector<float> out((size_t)(npd * n * NR));
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (i64 i = 0; i < n; ++i)
    for (i64 p = 0; p < npd; ++p) {
      float* dst = out.data() + (p * n + i) * NR;
      for (i64 c = 0; c < NR; ++c) dst[c] = p * NR + c < D ? x[i * D + p * NR + c] : 0.f;
    }
  return out;
}

inline int resolve_threads(int nthreads) { return nthreads > 0 ? nthreads : omp_get_max_threads(); }

// dot(q_i, k_j) in double, for the positive-pair corrections.
inline double dot_d(const float* a, const float* b, i64 D) {
  double s = 0;
  for (i64 d = 0; d < D; ++d) s += (double)a[d] * b[d];
  return s;
}

// Extra memory the backward may spend on per-thread dK partials (bytes); above it the sweep runs in two passes.
// BIOCLIP_FAST_CPU_BWD_MEMORY_MB overrides (read on each call: cheap next to an O(B^2 D) sweep).
inline i64 partial_budget_bytes() {
  const char* env = std::getenv("BIOCLIP_FAST_CPU_BWD_MEMORY_MB");
  const i64 mb = env ? std::atoll(env) : 256;
  return std::max<i64>(0, mb) << 20;
}

// Backward driver shared by CLIP (sym/dir) and SigLIP. `epi(i0, mb, j0, nb, tile, ld, count)` turns the dot tile
// (row stride NB) into G in place (without the global factor) and returns (centred sum G*dot, sum G) for the tile
// (`count` false: the sums are not wanted). Writes dq_acc = G K [Bq x Dp] and dk_acc = G^T Q [Bk x Dp], both fp32
// (either may be skipped: need_q / need_k).
//
// dK needs a reduction over row blocks. One sweep with a dK partial per extra thread costs (threads-1)*Bk*Dp
// floats (6 GB at 64 threads, B = 32k, D = 768): used only while that fits partial_budget_bytes(). Otherwise two
// passes whose threads own their outputs: row blocks -> dQ, then column blocks -> dK (the dot tile is computed
// twice: 4 instead of 3 GEMM-shaped products), extra memory independent of the thread count.
template <class Epi>
inline void backward_sweep(const float* q, const float* k, i64 Bq, i64 Bk, i64 D, int nthreads, Epi epi,
                           std::vector<float>& dq_acc, std::vector<float>& dk_acc, double& sum_gdot,
                           double& sum_g, bool need_q = true, bool need_k = true,
                           std::vector<float>* row_sum = nullptr, std::vector<float>* col_sum = nullptr) {
  const i64 Dp = round_up(D, NR), npd = Dp / NR;
  const Tiles t = choose_tiles(D);
  const std::vector<float> kt = pack_panels(k, Bk, D, nthreads);
  const std::vector<float> qpp = need_k ? pack_dpanels(q, Bq, D, nthreads) : std::vector<float>();
  const std::vector<float> kpp = need_q ? pack_dpanels(k, Bk, D, nthreads) : std::vector<float>();
  if (need_q) dq_acc.assign((size_t)(Bq * Dp), 0.f);
  if (need_k) dk_acc.assign((size_t)(Bk * Dp), 0.f);
  const i64 nrb = (Bq + t.MB - 1) / t.MB;
  const i64 part_bytes = Bk * Dp * (i64)sizeof(float);
  const bool one_pass = !need_k || nthreads == 1 || (i64)(nthreads - 1) * part_bytes <= partial_budget_bytes();
  std::vector<std::vector<float>> dk_part((size_t)(one_pass && need_k ? std::max(0, nthreads - 1) : 0));
  // Row sums (renormalization) are owned by pass 1's row blocks. Column sums: per-thread vectors in one-pass mode
  // (O(threads * Bk) floats, far below the dK partials that mode already pays for), owned by pass 2 otherwise.
  if (row_sum) row_sum->assign((size_t)Bq, 0.f);
  if (col_sum) col_sum->assign((size_t)Bk, 0.f);
  std::vector<std::vector<float>> cs_part((size_t)(col_sum && one_pass ? std::max(0, nthreads - 1) : 0));
  double tot_gdot = 0, tot_g = 0;
#pragma omp parallel num_threads(nthreads) reduction(+ : tot_gdot, tot_g)
  {
    const int tid = omp_get_thread_num();
    float* dk_mine = nullptr;
    if (one_pass && need_k) {
      dk_mine = dk_acc.data();
      if (tid > 0) {
        dk_part[tid - 1].assign((size_t)(Bk * Dp), 0.f);
        dk_mine = dk_part[tid - 1].data();
      }
    }
    float* rs = row_sum ? row_sum->data() : nullptr;
    float* cs1 = nullptr;  // pass 1's column sums (one-pass mode only)
    if (col_sum && one_pass) {
      cs1 = col_sum->data();
      if (tid > 0) {
        cs_part[tid - 1].assign((size_t)Bk, 0.f);
        cs1 = cs_part[tid - 1].data();
      }
    }
    std::vector<float> tile((size_t)(t.MB * t.NB));
    // Pass 1 (the only pass in one-pass mode): row blocks, dQ owned, sums counted.
#pragma omp for schedule(dynamic, 1)
    for (i64 rb = 0; rb < nrb; ++rb) {
      const i64 i0 = rb * t.MB, mb = std::min(t.MB, Bq - i0);
      for (i64 j0 = 0; j0 < Bk; j0 += t.NB) {
        const i64 nb = std::min(t.NB, Bk - j0);
        gemm_panels(mb, (nb + NR - 1) / NR, q + i0 * D, D, 1, kt.data() + (j0 / NR) * D * NR, NR, D * NR, D,
                    tile.data(), t.NB, false);
        const std::pair<double, double> sums = epi(i0, mb, j0, nb, tile.data(), t.NB, true, rs, cs1);
        tot_gdot += sums.first;
        tot_g += sums.second;
        // dQ[i0:i0+mb] += G[mb x nb] K[j0:j0+nb]
        if (need_q)
          gemm_panels(mb, npd, tile.data(), t.NB, 1, kpp.data() + j0 * NR, NR, Bk * NR, nb,
                      dq_acc.data() + i0 * Dp, Dp, true);
        // dK[j0:j0+nb] += G^T[nb x mb] Q[i0:i0+mb]
        if (one_pass && need_k)
          gemm_panels(nb, npd, tile.data(), 1, t.NB, qpp.data() + i0 * NR, NR, Bq * NR, mb, dk_mine + j0 * Dp, Dp,
                      true);
      }
    }
    if (!one_pass) {
      // Pass 2: column blocks, dK owned (same tiles, same G, sums already counted).
      const i64 ncb = (Bk + t.NB - 1) / t.NB;
#pragma omp for schedule(dynamic, 1)
      for (i64 cb = 0; cb < ncb; ++cb) {
        const i64 j0 = cb * t.NB, nb = std::min(t.NB, Bk - j0);
        for (i64 i0 = 0; i0 < Bq; i0 += t.MB) {
          const i64 mb = std::min(t.MB, Bq - i0);
          gemm_panels(mb, (nb + NR - 1) / NR, q + i0 * D, D, 1, kt.data() + (j0 / NR) * D * NR, NR, D * NR, D,
                      tile.data(), t.NB, false);
          epi(i0, mb, j0, nb, tile.data(), t.NB, false, nullptr, col_sum ? col_sum->data() : nullptr);
          gemm_panels(nb, npd, tile.data(), 1, t.NB, qpp.data() + i0 * NR, NR, Bq * NR, mb,
                      dk_acc.data() + j0 * Dp, Dp, true);
        }
      }
    }
  }
  if (one_pass && need_k && nthreads > 1) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (i64 j = 0; j < Bk; ++j)
      for (const auto& part : dk_part) {
        if (part.empty()) continue;  // a thread that got no row block
        const float* src = part.data() + j * Dp;
        float* dst = dk_acc.data() + j * Dp;
#pragma omp simd
        for (i64 d = 0; d < Dp; ++d) dst[d] += src[d];
      }
  }
  if (col_sum && one_pass)
    for (const auto& part : cs_part)
      if (!part.empty())
        for (i64 j = 0; j < Bk; ++j) (*col_sum)[j] += part[j];
  sum_gdot = tot_gdot;
  sum_g = tot_g;
}

// One gradient entry from its epilogue: g (what the products use) and gc, its centred contribution to the
// dscale sum (see grad_tile).
struct GV {
  V g, gc, ra, ca;  // ra / ca: summed per row / per column into row_sum / col_sum (renormalization)
};
struct GS {
  float g, gc, ra, ca;
};

// Backward epilogue of one tile: replace the dot products by G = g(S) - delta*[j == i + offset] in place (the
// positive's -delta is applied inside the tile, before any product, so no cancellation against a large
// separately-computed term) and return (centred sum G*dot, sum G). Row sums are flushed to double per row.
// gv(r, j, dot8) -> GV for 8 columns of row r starting at j; gs(r, j, dot) -> GS for one column.
//
// dscale is computed cancellation-free: each softmax direction's G sums to zero along its row (column), so
// sum G*dot = sum G*(dot - c) with c the row's (column's) positive dot product; the epilogues return gc = g*(dot-c)
// per direction. On near-duplicate batches (dot ~ 1 everywhere) the plain sum loses all its digits. The positive's
// -delta term enters as -delta*(dot_pos - c_i). SigLIP's rows do not sum to zero: `row_centre` adds c_i * sum_j G.
template <class GVF, class GSF>
inline std::pair<double, double> grad_tile(i64 i0, i64 mb, i64 j0, i64 nb, float* tile, i64 ld, i64 offset,
                                           float delta, const float* centre, bool row_centre, bool count, GVF gv,
                                           GSF gs, float* row_sum = nullptr, float* col_sum = nullptr) {
  double sum_gdot = 0, sum_g = 0;
  for (i64 r = 0; r < mb; ++r) {
    float* d = tile + r * ld;
    const i64 jp = i0 + r + offset - j0;
    const bool has_pos = jp >= 0 && jp < nb;
    const float dot_pos = has_pos ? d[jp] : 0.f;
    V a = V::zero(), b = V::zero(), ra = V::zero();
    float at = 0, bt = 0, rt = 0;
    i64 j = 0;
    for (; j + 8 <= nb; j += 8) {
      const GV e = gv(r, j, V::load(d + j));
      a = a + e.gc;
      b = b + e.g;
      ra = ra + e.ra;
      if (col_sum) (V::load(col_sum + j0 + j) + e.ca).store(col_sum + j0 + j);
      e.g.store(d + j);
    }
    for (; j < nb; ++j) {
      const GS e = gs(r, j, d[j]);
      at += e.gc;
      bt += e.g;
      rt += e.ra;
      if (col_sum) col_sum[j0 + j] += e.ca;
      d[j] = e.g;
    }
    if (row_sum) row_sum[i0 + r] += hsum(ra) + rt;
    if (!count) {
      if (has_pos) d[jp] -= delta;
      continue;
    }
    const double c = centre[i0 + r];
    double rgd = (double)hsum(a) + at, rg = (double)hsum(b) + bt;
    if (has_pos) {
      d[jp] -= delta;
      rgd -= (double)delta * ((double)dot_pos - c);
      rg -= delta;
    }
    if (row_centre) rgd += c * rg;
    sum_gdot += rgd;
    sum_g += rg;
  }
  return {sum_gdot, sum_g};
}

// Centres c_i = <q_i, k_{i+offset}> (0 where row i has no positive), computed in double.
inline std::vector<float> positive_dots(const float* q, const float* k, i64 Bq, i64 Bk, i64 D, i64 offset,
                                        int nthreads) {
  std::vector<float> c((size_t)Bq, 0.f);
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (i64 i = 0; i < Bq; ++i)
    if (i + offset >= 0 && i + offset < Bk) c[i] = (float)dot_d(q + i * D, k + (i + offset) * D, D);
  return c;
}

// Renormalization of the owned softmax after the sweep (the stored LSE is rounded: fp32 at |lse| ~ 100 is off by
// up to 4e-6 relative, the same for a whole row, and near-duplicate columns amplify that systematic error in G K).
// exact: acc_i = (acc_i + y_pos) / s_i - y_pos (one-direction rows: acc holds P Y - y_pos);
// first order (symmetric): acc_i += w * (1/s_i - 1) * y_pos, exact when the softmax-weighted mean of Y is y_pos.
inline void renormalize(std::vector<float>& acc, const std::vector<float>& sums, const float* y, i64 n, i64 ny, i64 D,
                        i64 offset, bool exact, float w, int nthreads) {
  const i64 Dp = round_up(D, NR);
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (i64 i = 0; i < n; ++i) {
    const i64 p = i + offset;
    if (p < 0 || p >= ny || !(sums[i] > 0.f)) continue;
    const float* yp = y + p * D;
    float* a = acc.data() + i * Dp;
    const float inv = 1.f / sums[i];
    if (exact)
      for (i64 d = 0; d < D; ++d) a[d] = (a[d] + yp[d]) * inv - yp[d];
    else
      for (i64 d = 0; d < D; ++d) a[d] += w * (inv - 1.f) * yp[d];
  }
}

// Final pass of every backward: dq = cs * dq_acc, dk = cs * dk_acc (dropping the D padding).
inline void write_grads(const std::vector<float>& dq_acc, const std::vector<float>& dk_acc, i64 Bq, i64 Bk, i64 D,
                        float cs, float* dq, float* dk, int nthreads) {
  const i64 Dp = round_up(D, NR);
  const bool wq = dq != nullptr && !dq_acc.empty(), wk = dk != nullptr && !dk_acc.empty();
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (i64 i = 0; i < std::max(Bq, Bk); ++i) {
    if (wq && i < Bq)
      for (i64 d = 0; d < D; ++d) dq[i * D + d] = cs * dq_acc[i * Dp + d];
    if (wk && i < Bk)
      for (i64 d = 0; d < D; ++d) dk[i * D + d] = cs * dk_acc[i * Dp + d];
  }
}

// Epilogue helper: S = s*dot + b for 8 values.
struct Affine {
  float s, b;
  V sv, bv;
  Affine(float s_, float b_) : s(s_), b(b_), sv(V::set1(s_)), bv(V::set1(b_)) {}
  V operator()(V dot) const { return fmadd(dot, sv, bv); }
  float operator()(float dot) const { return dot * s + b; }
};

}  // namespace bf
