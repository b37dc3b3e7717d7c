// pybind11 module of the CPU loss kernels; the kernels register themselves from their own files.
//
// setup.py builds these sources twice on x86-64: `bioclip_fast._C` for the baseline ISA (runs on every x86-64
// CPU) and `bioclip_fast._C_avx2` with -mavx2 -mfma (the 8-wide FMA micro-kernel). No -march=native: a build on
// one machine must not die with SIGILL on another (a shared cluster filesystem, a wheel). bioclip_fast.ops.cpp
// picks the variant at run time from cpuid (`cpu_supports`, from the baseline module).
#include <pybind11/pybind11.h>
#include <omp.h>

#include <string>

#ifndef BF_MODULE_NAME
#define BF_MODULE_NAME _C
#endif

namespace py = pybind11;

void register_clip_loss(py::module_& m);    // clip_loss.cpp
void register_siglip_loss(py::module_& m);  // siglip_loss.cpp

static bool cpu_supports(const std::string& feature) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (feature == "avx2") return __builtin_cpu_supports("avx2");
  if (feature == "fma") return __builtin_cpu_supports("fma");
  if (feature == "avx512f") return __builtin_cpu_supports("avx512f");
  if (feature == "sse4.2") return __builtin_cpu_supports("sse4.2");
#endif
  (void)feature;
  return false;
}

static const char* isa() {
#if defined(__AVX2__) && defined(__FMA__)
  return "avx2+fma";
#elif defined(__x86_64__)
  return "x86-64";
#else
  return "generic";
#endif
}

PYBIND11_MODULE(BF_MODULE_NAME, m) {
  m.doc() = "bioclip_fast CPU kernels (OpenMP)";
  m.def("num_threads", []() { return omp_get_max_threads(); }, "OpenMP threads the kernels use");
  m.def("isa", &isa, "instruction set this module was compiled for");
  m.def("cpu_supports", &cpu_supports, "whether this CPU has an ISA feature (cpuid): avx2, fma, avx512f, sse4.2",
        py::arg("feature"));
  register_clip_loss(m);
  register_siglip_loss(m);
}
