#pragma once
// Helpers shared by the binding translation units of saddlescape._core.

#include <saddlescape/saddlescape.hpp>

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

namespace py = pybind11;
using namespace saddlescape;

template <class T>
using c_array = py::array_t<T, py::array::c_style>;

inline std::string shape_string(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) {
    if (i) s += ", ";
    s += std::to_string(a.shape(i));
  }
  return s + (a.ndim() == 1 ? ",)" : ")");
}

// c_array<T>::ensure(a), which returns a null array (its Python error cleared) when the copy
// to C order and dtype T cannot be made: for a float array, when the memory cannot be
// allocated. Raised as a MemoryError naming the bytes rather than used (a crash).
template <class T>
c_array<T> ensure_c(const py::array& a, const char* name) {
  c_array<T> out = c_array<T>::ensure(a);
  if (!out)
    throw out_of_memory(detail::concat(name, ": its C-contiguous ", detail::type_name<T>(),
                                       " copy needs ", static_cast<double>(a.size()) * sizeof(T),
                                       " bytes, which could not be allocated"));
  return out;
}

inline std::string dtype_string(const py::array& a) { return py::str(a.dtype()).cast<std::string>(); }

// Equivalence, not identity: a dtype object equal to float64 but distinct (with metadata, say)
// is still float64.
inline bool is_float32(const py::array& a) { return py::isinstance<py::array_t<float>>(a); }
inline bool is_float64(const py::array& a) { return py::isinstance<py::array_t<double>>(a); }

inline void expect_float(const py::array& a, const char* name) {
  if (!is_float32(a) && !is_float64(a))
    throw invalid_argument(std::string(name) + " must have dtype float32 or float64, got " +
                           dtype_string(a));
}

