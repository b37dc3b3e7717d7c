// CPU OpenMP kernels of the SigLIP loss primitives: siglip_fwd/bwd.
// loss = (1/Bq) * (sum_ij softplus(S_ij) - sum_{positives} S_i,i+offset)   [= -(1/Bq) sum logsigmoid(z*S)]
// G    = (g/Bq) * (sigmoid(S) - delta)                                    [the delta part applied per row at the end]
// Elementwise in S: one tiled sweep forward, one backward (recompute), no B x B buffer.
#include <pybind11/pybind11.h>

#include "loss_common.h"

namespace py = pybind11;
using namespace bf;

namespace {

double siglip_fwd(std::uintptr_t q_ptr, std::uintptr_t k_ptr, i64 Bq, i64 Bk, i64 D, double scale, double bias,
                  i64 offset, int nthreads) {
  nthreads = resolve_threads(nthreads);
  const float* q = reinterpret_cast<const float*>(q_ptr);
  const float* k = reinterpret_cast<const float*>(k_ptr);
  const Affine aff((float)scale, (float)bias);
  const Tiles t = choose_tiles(D);
  const std::vector<float> kt = pack_panels(k, Bk, D, nthreads);
  const i64 nrb = (Bq + t.MB - 1) / t.MB;
  double total = 0;
#pragma omp parallel num_threads(nthreads) reduction(+ : total)
  {
    std::vector<float> tile((size_t)(t.MB * t.NB));
#pragma omp for schedule(dynamic, 1)
    for (i64 rb = 0; rb < nrb; ++rb) {
      const i64 i0 = rb * t.MB, mb = std::min(t.MB, Bq - i0);
      for (i64 j0 = 0; j0 < Bk; j0 += t.NB) {
        const i64 nb = std::min(t.NB, Bk - j0);
        gemm_panels(mb, (nb + NR - 1) / NR, q + i0 * D, D, 1, kt.data() + (j0 / NR) * D * NR, NR, D * NR, D,
                    tile.data(), t.NB, false);
        for (i64 r = 0; r < mb; ++r) {
          const float* d = tile.data() + r * t.NB;
          V acc = V::zero();
          float tail = 0;
          i64 j = 0;
          for (; j + 8 <= nb; j += 8) acc = acc + softplus_v(aff(V::load(d + j)));
          for (; j < nb; ++j) tail += softplus_s(aff(d[j]));
          total += (double)hsum(acc) + tail;  // fp32 within a row of the tile, double across rows and tiles
        }
      }
    }
  }
  double pos = 0;
  const i64 i_end = std::min(Bq, Bk - offset);  // rows whose positive column exists
#pragma omp parallel for num_threads(nthreads) reduction(+ : pos) schedule(static)
  for (i64 i = 0; i < std::max<i64>(i_end, 0); ++i) pos += scale * dot_d(q + i * D, k + (i + offset) * D, D) + bias;
  return (total - pos) / (double)Bq;
}

py::tuple siglip_bwd(std::uintptr_t q_ptr, std::uintptr_t k_ptr, i64 Bq, i64 Bk, i64 D, double scale, double bias,
                     i64 offset, double grad, std::uintptr_t dq_ptr, std::uintptr_t dk_ptr, int nthreads, bool need_q,
                     bool need_k) {
  double ds, db;
  {
    py::gil_scoped_release release;
    nthreads = resolve_threads(nthreads);
    const float* q = reinterpret_cast<const float*>(q_ptr);
    const float* k = reinterpret_cast<const float*>(k_ptr);
    float* dq = need_q ? reinterpret_cast<float*>(dq_ptr) : nullptr;
    float* dk = need_k ? reinterpret_cast<float*>(dk_ptr) : nullptr;
    const Affine aff((float)scale, (float)bias);
    const std::vector<float> cen = positive_dots(q, k, Bq, Bk, D, offset, nthreads);
    const float* c = cen.data();
    std::vector<float> dq_acc, dk_acc;
    double sum_gdot = 0, sum_g = 0;
    // dscale = sum_i [sum_j G_ij (dot_ij - c_i) + c_i sum_j G_ij] (row_centre = true), c_i the positive's dot.
    auto epi = [&](i64 i0, i64 mb, i64 j0, i64 nb, float* tile, i64 ld, bool count, float*, float*) {
      return grad_tile(
          i0, mb, j0, nb, tile, ld, offset, 1.f, c, true, count,
          [&](i64 r, i64, V dot) {
            const V g = sigmoid_v(aff(dot));
            return GV{g, g * (dot - V::set1(c[i0 + r])), V::zero(), V::zero()};
          },
          [&](i64 r, i64, float dot) {
            const float g = sigmoid_s(aff(dot));
            return GS{g, g * (dot - c[i0 + r]), 0.f, 0.f};
          });
    };
    backward_sweep(q, k, Bq, Bk, D, nthreads, epi, dq_acc, dk_acc, sum_gdot, sum_g, need_q, need_k);
    const double coef = grad / (double)Bq;
    write_grads(dq_acc, dk_acc, Bq, Bk, D, (float)(coef * scale), dq, dk, nthreads);
    ds = coef * sum_gdot;
    db = coef * sum_g;
  }
  return py::make_tuple(ds, db);
}

}  // namespace

void register_siglip_loss(py::module_& m) {
  m.def("siglip_fwd", &siglip_fwd, py::call_guard<py::gil_scoped_release>(),
        "siglip_fwd(q, k, Bq, Bk, D, scale, bias, offset, nthreads) -> loss; fp32 buffers by data_ptr", py::arg("q"),
        py::arg("k"), py::arg("Bq"), py::arg("Bk"), py::arg("D"), py::arg("scale"), py::arg("bias"),
        py::arg("offset"), py::arg("nthreads") = 0);
  m.def("siglip_bwd", &siglip_bwd,
        "siglip_bwd(q, k, Bq, Bk, D, scale, bias, offset, grad, dq, dk, nthreads) -> (dscale, dbias)", py::arg("q"),
        py::arg("k"), py::arg("Bq"), py::arg("Bk"), py::arg("D"), py::arg("scale"), py::arg("bias"),
        py::arg("offset"), py::arg("grad"), py::arg("dq"), py::arg("dk"), py::arg("nthreads") = 0,
        py::arg("need_q") = true, py::arg("need_k") = true);
}
