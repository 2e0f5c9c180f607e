// The pybind11 module saddlescape._core: a thin layer that checks dtypes and shapes, hands
// C-contiguous numpy buffers to the C++ library without copying them, and releases the GIL
// around every computation. Arrays are only created or touched while the GIL is held.

#include "common.hpp"

#include <string>
#include <vector>

namespace {

// (n, d) of a (d, d) or (n, d, d) stack of square matrices.
std::pair<index_t, index_t> square_stack(const py::array& G) {
  SADDLESCAPE_EXPECTS(G.ndim() == 2 || G.ndim() == 3,
                      "G must have shape (d, d) or (n, d, d), got shape ", shape_string(G));
  const index_t d = G.shape(G.ndim() - 1);
  SADDLESCAPE_EXPECTS(G.shape(G.ndim() - 2) == d, "G must be square, got shape ", shape_string(G));
  return {G.ndim() == 3 ? G.shape(0) : 1, d};
}

template <class T>
py::array inv_root_typed(const py::array& G_in, const root_spec& spec, root_method method,
                         const newton_options& opts) {
  const auto G = ensure_c<T>(G_in, "G");  // no copy when already C-contiguous
  const auto [n, d] = square_stack(G);
  c_array<T> out(std::vector<py::ssize_t>(G.shape(), G.shape() + G.ndim()));
  const T* g = G.data();
  T* a = out.mutable_data();
  {
    py::gil_scoped_release release;
    inv_root_batched<T>(g, n, d, spec, method, opts, a);
  }
  return std::move(out);
}

template <class T>
py::array inv_root_apply_typed(const py::array& G_in, const py::array& v_in, const root_spec& spec,
                               root_method method, const newton_options& opts) {
  const auto G = ensure_c<T>(G_in, "G");
  const auto v = ensure_c<T>(v_in, "v");
  const index_t d = G.shape(0);
  const index_t k = v.ndim() == 2 ? v.shape(1) : 1;
  c_array<T> out(std::vector<py::ssize_t>(v.shape(), v.shape() + v.ndim()));
  const T* g = G.data();
  const T* x = v.data();
  T* o = out.mutable_data();
  {
    py::gil_scoped_release release;
    inv_root_apply<T>(g, d, x, k, spec, method, opts, o);
  }
  return std::move(out);
}

template <class T>
py::array diag_inv_root_typed(const py::array& v_in, const root_spec& spec) {
  const auto v = ensure_c<T>(v_in, "v");
  c_array<T> out(std::vector<py::ssize_t>(v.shape(), v.shape() + v.ndim()));
  const T* x = v.data();
  T* o = out.mutable_data();
  const index_t n = v.size();
  {
    py::gil_scoped_release release;
    diag_inv_root<T>(x, n, spec, o);
  }
  return std::move(out);
}

py::array inv_root_py(const py::array& G, int p, double eps, const std::string& form,
                      const std::string& method, double tol, int max_iter) {
  expect_float(G, "G");
  square_stack(G);
  const root_spec spec{p, eps, parse_root_form(form)};
  const newton_options opts{tol, max_iter};
  const root_method m = parse_root_method(method);
  return is_float64(G) ? inv_root_typed<double>(G, spec, m, opts)
                       : inv_root_typed<float>(G, spec, m, opts);
}

py::array inv_root_apply_py(const py::array& G, const py::array& v, int p, double eps,
                            const std::string& form, const std::string& method, double tol,
                            int max_iter) {
  expect_float(G, "G");
  expect_float(v, "v");
  SADDLESCAPE_EXPECTS(G.ndim() == 2, "G must have shape (d, d), got shape ", shape_string(G));
  const index_t d = square_stack(G).second;
  SADDLESCAPE_EXPECTS((v.ndim() == 1 || v.ndim() == 2) && v.shape(0) == d,
                      "v must have shape (", d, ",) or (", d, ", k) to match G, got shape ",
                      shape_string(v));
  SADDLESCAPE_EXPECTS(is_float64(G) == is_float64(v), "G and v must have the same dtype, got ",
                      dtype_string(G), " and ", dtype_string(v));
  const root_spec spec{p, eps, parse_root_form(form)};
  const newton_options opts{tol, max_iter};
  const root_method m = parse_root_method(method);
  return is_float64(G) ? inv_root_apply_typed<double>(G, v, spec, m, opts)
                       : inv_root_apply_typed<float>(G, v, spec, m, opts);
}

py::array diag_inv_root_py(const py::array& v, int p, double eps, const std::string& form) {
  expect_float(v, "v");
  const root_spec spec{p, eps, parse_root_form(form)};
  return is_float64(v) ? diag_inv_root_typed<double>(v, spec)
                       : diag_inv_root_typed<float>(v, spec);
}

}  // namespace

void bind_estimators(py::module_& m);
void bind_loop(py::module_& m);
void bind_block_engine(py::module_& m);
void bind_diag_step(py::module_& m);

PYBIND11_MODULE(_core, m) {
  m.doc() = "saddlescape's compiled core; use the functions re-exported by `saddlescape`.";
  py::register_exception<numerical_error>(m, "NumericalError", PyExc_ArithmeticError);

  m.def("inv_root", &inv_root_py, py::arg("G"), py::arg("p"), py::arg("eps"), py::arg("form"),
        py::arg("method"), py::arg("tol"), py::arg("max_iter"),
        "f(G) for a (d, d) or (n, d, d) float array; see saddlescape.inv_root.");
  m.def("inv_root_apply", &inv_root_apply_py, py::arg("G"), py::arg("v"), py::arg("p"),
        py::arg("eps"), py::arg("form"), py::arg("method"), py::arg("tol"), py::arg("max_iter"),
        "f(G) v without forming f(G); see saddlescape.inv_sqrt_apply.");
  m.def("diag_inv_root", &diag_inv_root_py, py::arg("v"), py::arg("p"), py::arg("eps"),
        py::arg("form"), "Elementwise f(v); see saddlescape.diag_inv_sqrt.");
  m.attr("symmetry_tolerance_float64") = symmetry_tolerance<double>();
  m.attr("symmetry_tolerance_float32") = symmetry_tolerance<float>();
  bind_estimators(m);
  bind_loop(m);
  bind_block_engine(m);
  bind_diag_step(m);
}
