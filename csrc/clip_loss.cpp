// CPU OpenMP kernels of the CLIP (InfoNCE) loss primitives: clip_sym_fwd/bwd and clip_dir_fwd/bwd.
// Same math and memory bound as the Triton kernels (see bioclip_fast/ops/reference.py for the readable version):
// tiles of S = s*Q K^T + b with an online log-sum-exp over rows (per row block) and columns (per-thread partials
// merged at the end); backward recomputes S per tile, forms G and feeds two GEMMs (dQ += G K, dK += G^T Q).
// Extra memory: packed/padded copies of Q and K plus dK partials within a fixed budget (loss_common.h), all
// O(B*D) and independent of the thread count; never B x B.
#include <pybind11/pybind11.h>

#include "loss_common.h"

namespace py = pybind11;
using namespace bf;

namespace {

constexpr float NEG_INF = -std::numeric_limits<float>::infinity();
constexpr float JUMP = 60.f;  // e^60 * (terms per tile) stays far below FLT_MAX

// Forward sweep over all (row block, column block) tiles. `epi(tid, i0, mb, j0, nb, tile, ld)` consumes the
// dot-product tile (row stride ld).
template <class Epi>
void forward_sweep(const float* q, const float* k, i64 Bq, i64 Bk, i64 D, int nthreads, Epi epi) {
  const Tiles t = choose_tiles(D);
  const std::vector<float> kt = pack_panels(k, Bk, D, nthreads);
  const i64 nrb = (Bq + t.MB - 1) / t.MB;
#pragma omp parallel num_threads(nthreads)
  {
    const int tid = omp_get_thread_num();
    std::vector<float> tile((size_t)(t.MB * t.NB));
#pragma omp for schedule(dynamic, 1)
    for (i64 rb = 0; rb < nrb; ++rb) {
      const i64 i0 = rb * t.MB, mb = std::min(t.MB, Bq - i0);
      for (i64 j0 = 0; j0 < Bk; j0 += t.NB) {
        const i64 nb = std::min(t.NB, Bk - j0);
        gemm_panels(mb, (nb + NR - 1) / NR, q + i0 * D, D, 1, kt.data() + (j0 / NR) * D * NR, NR, D * NR, D,
                    tile.data(), t.NB, false);
        epi(tid, i0, mb, j0, nb, tile.data(), t.NB);
      }
    }
  }
}

// Online LSE update of one row of a tile: (m, l) hold the running max and sum of exp(S - m).
// Once a row has a running max, one pass suffices: sum exp(S - m) against the old max while tracking the tile max,
// then rescale everything to the new max. exp(S - m) cannot overflow while the tile raises the max by less than
// JUMP; a larger jump (first tiles of badly scaled inputs) takes the two-pass path.
inline void row_lse_update(const float* d, i64 nb, const Affine& aff, float& m, double& l) {
  if (m != NEG_INF) {
    const V Mv = V::set1(m);
    V mv = V::set1(NEG_INF), sv = V::zero();
    i64 j = 0;
    for (; j + 8 <= nb; j += 8) {
      const V S = aff(V::load(d + j));
      mv = vmax(mv, S);
      sv = sv + vexp(S - Mv);
    }
    float mt = hmax(mv), st = 0;
    for (; j < nb; ++j) {
      const float S = aff(d[j]);
      mt = std::max(mt, S);
      st += sexp(S - m);
    }
    if (mt - m < JUMP) {
      const float M = std::max(m, mt);
      l = (l + (double)hsum(sv) + st) * std::exp((double)m - (double)M);
      m = M;
      return;
    }
  }
  V mv = V::set1(NEG_INF);
  i64 j = 0;
  for (; j + 8 <= nb; j += 8) mv = vmax(mv, aff(V::load(d + j)));
  float mt = hmax(mv);
  for (; j < nb; ++j) mt = std::max(mt, aff(d[j]));
  const float M = std::max(m, mt);
  const V Mv = V::set1(M);
  V sv = V::zero();
  for (j = 0; j + 8 <= nb; j += 8) sv = sv + vexp(aff(V::load(d + j)) - Mv);
  float s = hsum(sv);
  for (; j < nb; ++j) s += sexp(aff(d[j]) - M);
  l = l * std::exp((double)m - (double)M) + (double)s;  // double across tiles: B_k/NB terms
  m = M;
}

// Column LSE of one tile (max and sum of exp(S - max) over its rows, fp32 vectors), merged into this thread's
// running column partials (cm: max, cl: sum in double, so thousands of row blocks do not drift).
inline void col_lse_update(const float* tile, i64 ld, i64 mb, i64 nb, const Affine& aff, float* cm, double* cl) {
  i64 j = 0;
  alignas(32) float tm[8], ts[8];
  for (; j + 8 <= nb; j += 8) {
    const V cmv = V::load(cm + j);
    if (hmax(V::zero() - cmv) != -NEG_INF) {  // every column already has a running max: try one pass
      V mv = V::set1(NEG_INF), sv = V::zero();
      for (i64 r = 0; r < mb; ++r) {
        const V S = aff(V::load(tile + r * ld + j));
        mv = vmax(mv, S);
        sv = sv + vexp(S - cmv);
      }
      if (hmax(mv - cmv) < JUMP) {
        sv.store(ts);
        mv.store(tm);
        for (int e = 0; e < 8; ++e) {
          const float M = std::max(cm[j + e], tm[e]);
          cl[j + e] = (cl[j + e] + (double)ts[e]) * std::exp((double)cm[j + e] - M);
          cm[j + e] = M;
        }
        continue;
      }
    }
    V mv = V::set1(NEG_INF);
    for (i64 r = 0; r < mb; ++r) mv = vmax(mv, aff(V::load(tile + r * ld + j)));
    V sv = V::zero();
    for (i64 r = 0; r < mb; ++r) sv = sv + vexp(aff(V::load(tile + r * ld + j)) - mv);
    mv.store(tm);
    sv.store(ts);
    for (int e = 0; e < 8; ++e) {
      const float M = std::max(cm[j + e], tm[e]);
      cl[j + e] = cl[j + e] * std::exp((double)cm[j + e] - M) + (double)ts[e] * std::exp((double)tm[e] - M);
      cm[j + e] = M;
    }
  }
  for (; j < nb; ++j) {
    float mt = NEG_INF;
    for (i64 r = 0; r < mb; ++r) mt = std::max(mt, aff(tile[r * ld + j]));
    float st = 0;
    for (i64 r = 0; r < mb; ++r) st += sexp(aff(tile[r * ld + j]) - mt);
    const float M = std::max(cm[j], mt);
    cl[j] = cl[j] * std::exp((double)cm[j] - M) + (double)st * std::exp((double)mt - M);
    cm[j] = M;
  }
}

double clip_sym_fwd(std::uintptr_t q_ptr, std::uintptr_t k_ptr, i64 B, i64 D, double scale, double bias,
                    std::uintptr_t lse_row_ptr, std::uintptr_t lse_col_ptr, int nthreads) {
  nthreads = resolve_threads(nthreads);
  const float* q = reinterpret_cast<const float*>(q_ptr);
  const float* k = reinterpret_cast<const float*>(k_ptr);
  float* lse_row = reinterpret_cast<float*>(lse_row_ptr);
  float* lse_col = reinterpret_cast<float*>(lse_col_ptr);
  const Affine aff((float)scale, (float)bias);
  std::vector<float> rm((size_t)B, NEG_INF), cm((size_t)(nthreads * B), NEG_INF);
  std::vector<double> rl((size_t)B, 0.0), cl((size_t)(nthreads * B), 0.0);
  forward_sweep(q, k, B, B, D, nthreads, [&](int tid, i64 i0, i64 mb, i64 j0, i64 nb, const float* tile, i64 ld) {
    for (i64 r = 0; r < mb; ++r) row_lse_update(tile + r * ld, nb, aff, rm[i0 + r], rl[i0 + r]);
    col_lse_update(tile, ld, mb, nb, aff, cm.data() + tid * B + j0, cl.data() + tid * B + j0);
  });
  double total = 0;
#pragma omp parallel for num_threads(nthreads) reduction(+ : total) schedule(static)
  for (i64 i = 0; i < B; ++i) {
    lse_row[i] = (float)(rm[i] + std::log(rl[i]));
    float M = NEG_INF;
    for (int t = 0; t < nthreads; ++t) M = std::max(M, cm[t * B + i]);
    double s = 0;
    for (int t = 0; t < nthreads; ++t) s += cl[t * B + i] * std::exp((double)cm[t * B + i] - M);
    lse_col[i] = (float)(M + std::log(s));
    const double diag = scale * dot_d(q + i * D, k + i * D, D) + bias;
    total += (double)lse_row[i] + (double)lse_col[i] - 2.0 * diag;
  }
  return 0.5 * total / (double)B;
}

py::tuple clip_sym_bwd(std::uintptr_t q_ptr, std::uintptr_t k_ptr, i64 B, i64 D, double scale, double bias,
                       std::uintptr_t lse_row_ptr, std::uintptr_t lse_col_ptr, double grad, std::uintptr_t dq_ptr,
                       std::uintptr_t dk_ptr, int nthreads, bool need_q, bool need_k) {
  double ds;
  {
    py::gil_scoped_release release;
    nthreads = resolve_threads(nthreads);
    const float* q = reinterpret_cast<const float*>(q_ptr);
    const float* k = reinterpret_cast<const float*>(k_ptr);
    const float* lse_row = reinterpret_cast<const float*>(lse_row_ptr);
    const float* lse_col = reinterpret_cast<const float*>(lse_col_ptr);
    float* dq = need_q ? reinterpret_cast<float*>(dq_ptr) : nullptr;
    float* dk = need_k ? reinterpret_cast<float*>(dk_ptr) : nullptr;
    const Affine aff((float)scale, (float)bias);
    const std::vector<float> cen = positive_dots(q, k, B, B, D, 0, nthreads);
    const float* c = cen.data();
    std::vector<float> dq_acc, dk_acc;
    // G / coef = softmax over the row + softmax over the column - 2*delta (both directions' positives); the row
    // softmax is centred on the row's positive dot, the column softmax on the column's (see grad_tile).
    auto epi = [&](i64 i0, i64 mb, i64 j0, i64 nb, float* tile, i64 ld, bool count, float* rs, float* cs) {
      return grad_tile(
          i0, mb, j0, nb, tile, ld, 0, 2.f, c, false, count,
          [&](i64 r, i64 j, V dot) {
            const V S = aff(dot);
            const V pr = vexp(S - V::set1(lse_row[i0 + r])), pc = vexp(S - V::load(lse_col + j0 + j));
            return GV{pr + pc, pr * (dot - V::set1(c[i0 + r])) + pc * (dot - V::load(c + j0 + j)), pr, pc};
          },
          [&](i64 r, i64 j, float dot) {
            const float S = aff(dot);
            const float pr = sexp(S - lse_row[i0 + r]), pc = sexp(S - lse_col[j0 + j]);
            return GS{pr + pc, pr * (dot - c[i0 + r]) + pc * (dot - c[j0 + j]), pr, pc};
          },
          rs, cs);
    };
    double sum_gdot = 0, sum_g = 0;
    std::vector<float> row_sum, col_sum;
    backward_sweep(q, k, B, B, D, nthreads, epi, dq_acc, dk_acc, sum_gdot, sum_g, need_q, need_k,
                   need_q ? &row_sum : nullptr, need_k ? &col_sum : nullptr);
    if (need_q) renormalize(dq_acc, row_sum, k, B, B, D, 0, false, 1.f, nthreads);
    if (need_k) renormalize(dk_acc, col_sum, q, B, B, D, 0, false, 1.f, nthreads);
    const double coef = 0.5 * grad / (double)B;
    write_grads(dq_acc, dk_acc, B, B, D, (float)(coef * scale), dq, dk, nthreads);
    ds = coef * sum_gdot;
  }
  return py::make_tuple(ds, 0.0);  // dbias = 0 exactly: a logit shift changes neither softmax
}

double clip_dir_fwd(std::uintptr_t q_ptr, std::uintptr_t k_ptr, i64 Bq, i64 Bk, i64 D, double scale, double bias,
                    i64 offset, std::uintptr_t lse_ptr, int nthreads) {
  nthreads = resolve_threads(nthreads);
  const float* q = reinterpret_cast<const float*>(q_ptr);
  const float* k = reinterpret_cast<const float*>(k_ptr);
  float* lse = reinterpret_cast<float*>(lse_ptr);
  const Affine aff((float)scale, (float)bias);
  std::vector<float> rm((size_t)Bq, NEG_INF);
  std::vector<double> rl((size_t)Bq, 0.0);
  forward_sweep(q, k, Bq, Bk, D, nthreads, [&](int, i64 i0, i64 mb, i64, i64 nb, const float* tile, i64 ld) {
    for (i64 r = 0; r < mb; ++r) row_lse_update(tile + r * ld, nb, aff, rm[i0 + r], rl[i0 + r]);
  });
  double total = 0;
#pragma omp parallel for num_threads(nthreads) reduction(+ : total) schedule(static)
  for (i64 i = 0; i < Bq; ++i) {
    lse[i] = (float)(rm[i] + std::log(rl[i]));
    total += (double)lse[i] - (scale * dot_d(q + i * D, k + (i + offset) * D, D) + bias);
  }
  return total / (double)Bq;
}

py::tuple clip_dir_bwd(std::uintptr_t q_ptr, std::uintptr_t k_ptr, i64 Bq, i64 Bk, i64 D, double scale, double bias,
                       std::uintptr_t lse_ptr, i64 offset, double grad, std::uintptr_t dq_ptr, std::uintptr_t dk_ptr,
                       int nthreads, bool need_q, bool need_k) {
  double ds;
  {
    py::gil_scoped_release release;
    nthreads = resolve_threads(nthreads);
    const float* q = reinterpret_cast<const float*>(q_ptr);
    const float* k = reinterpret_cast<const float*>(k_ptr);
    const float* lse = reinterpret_cast<const float*>(lse_ptr);
    float* dq = need_q ? reinterpret_cast<float*>(dq_ptr) : nullptr;
    float* dk = need_k ? reinterpret_cast<float*>(dk_ptr) : nullptr;
    const Affine aff((float)scale, (float)bias);
    const std::vector<float> cen = positive_dots(q, k, Bq, Bk, D, offset, nthreads);
    const float* c = cen.data();
    std::vector<float> dq_acc, dk_acc;
    double sum_gdot = 0, sum_g = 0;
    auto epi = [&](i64 i0, i64 mb, i64 j0, i64 nb, float* tile, i64 ld, bool count, float* rs, float*) {
      return grad_tile(
          i0, mb, j0, nb, tile, ld, offset, 1.f, c, false, count,
          [&](i64 r, i64, V dot) {
            const V p = vexp(aff(dot) - V::set1(lse[i0 + r]));
            return GV{p, p * (dot - V::set1(c[i0 + r])), p, V::zero()};
          },
          [&](i64 r, i64, float dot) {
            const float p = sexp(aff(dot) - lse[i0 + r]);
            return GS{p, p * (dot - c[i0 + r]), p, 0.f};
          },
          rs, nullptr);
    };
    std::vector<float> row_sum;
    backward_sweep(q, k, Bq, Bk, D, nthreads, epi, dq_acc, dk_acc, sum_gdot, sum_g, need_q, need_k,
                   need_q ? &row_sum : nullptr, nullptr);
    if (need_q) renormalize(dq_acc, row_sum, k, Bq, Bk, D, offset, true, 1.f, nthreads);
    const double coef = grad / (double)Bq;
    write_grads(dq_acc, dk_acc, Bq, Bk, D, (float)(coef * scale), dq, dk, nthreads);
    ds = coef * sum_gdot;
  }
  return py::make_tuple(ds, 0.0);  // dbias = 0 exactly
}

}  // namespace

void register_clip_loss(py::module_& m) {
  m.def("clip_sym_fwd", &clip_sym_fwd, py::call_guard<py::gil_scoped_release>(),
        "clip_sym_fwd(q, k, B, D, scale, bias, lse_row, lse_col, nthreads) -> loss; fp32 buffers by data_ptr",
        py::arg("q"), py::arg("k"), py::arg("B"), py::arg("D"), py::arg("scale"), py::arg("bias"),
        py::arg("lse_row"), py::arg("lse_col"), py::arg("nthreads") = 0);
  m.def("clip_sym_bwd", &clip_sym_bwd,
        "clip_sym_bwd(q, k, B, D, scale, bias, lse_row, lse_col, grad, dq, dk, nthreads) -> (dscale, dbias)",
        py::arg("q"), py::arg("k"), py::arg("B"), py::arg("D"), py::arg("scale"), py::arg("bias"),
        py::arg("lse_row"), py::arg("lse_col"), py::arg("grad"), py::arg("dq"), py::arg("dk"),
        py::arg("nthreads") = 0, py::arg("need_q") = true, py::arg("need_k") = true);
  m.def("clip_dir_fwd", &clip_dir_fwd, py::call_guard<py::gil_scoped_release>(),
        "clip_dir_fwd(q, k, Bq, Bk, D, scale, bias, offset, lse, nthreads) -> loss", py::arg("q"), py::arg("k"),
        py::arg("Bq"), py::arg("Bk"), py::arg("D"), py::arg("scale"), py::arg("bias"), py::arg("offset"),
        py::arg("lse"), py::arg("nthreads") = 0);
  m.def("clip_dir_bwd", &clip_dir_bwd,
        "clip_dir_bwd(q, k, Bq, Bk, D, scale, bias, lse, offset, grad, dq, dk, nthreads) -> (dscale, dbias)",
        py::arg("q"), py::arg("k"), py::arg("Bq"), py::arg("Bk"), py::arg("D"), py::arg("scale"), py::arg("bias"),
        py::arg("lse"), py::arg("offset"), py::arg("grad"), py::arg("dq"), py::arg("dk"), py::arg("nthreads") = 0,
        py::arg("need_q") = true, py::arg("need_k") = true);
}
