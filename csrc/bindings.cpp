// pybind11 module bioclip_fast._C; the loss kernels register themselves from their own files.
#include <pybind11/pybind11.h>
#include <omp.h>

namespace py = pybind11;

void register_clip_loss(py::module_& m);    // clip_loss.cpp
void register_siglip_loss(py::module_& m);  // siglip_loss.cpp

PYBIND11_MODULE(_C, m) {
  m.doc() = "bioclip_fast CPU kernels (OpenMP)";
  m.def("num_threads", []() { return omp_get_max_threads(); }, "OpenMP threads the kernels use");
  register_clip_loss(m);
  register_siglip_loss(m);
}
