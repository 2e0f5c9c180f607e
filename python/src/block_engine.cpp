// Bindings of the block engine. Heavy calls release the GIL; a mutex per engine then serialises
// calls from several Python threads on one engine (the engine itself is not thread-safe), while
// separate engines run in parallel. Arrays are read and written in place (no copies), so a
// caller such as the torch optimizer can hand over its own buffers.

#include "common.hpp"

#include <saddlescape/block_engine.hpp>

#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace {

template <class T>
struct locked_engine {
  block_engine<T> engine;
  std::mutex mutex;
  locked_engine(std::vector<index_t> sizes, std::shared_ptr<schedule> beta,
                block_engine_options opts)
      : engine(std::move(sizes), std::move(beta), opts) {}
};

template <class T>
const T* input(const py::array& a, index_t rows, index_t dim, const char* name) {
  if (!py::isinstance<py::array_t<T>>(a))
    throw invalid_argument(std::string(name) + " must have dtype " +
                           py::str(py::dtype::of<T>()).cast<std::string>() + ", got " +
                           dtype_string(a));
  if (rows < 0) {
    SADDLESCAPE_EXPECTS(a.ndim() == 1 && a.shape(0) == dim, name, " must have shape (", dim,
                        ",), got shape ", shape_string(a));
  } else {
    SADDLESCAPE_EXPECTS(a.ndim() == 2 && a.shape(1) == dim, name, " must have shape (k, ", dim,
                        "), got shape ", shape_string(a));
  }
  SADDLESCAPE_EXPECTS(a.flags() & py::array::c_style, name,
                      " must be C-contiguous (the engine reads it in place)");
  return static_cast<const T*>(a.data());
}

template <class T>
T* output(py::array& a, index_t dim, const char* name) {
  input<T>(a, -1, dim, name);
  SADDLESCAPE_EXPECTS(a.writeable(), name, " must be writeable (it is updated in place)");
  return static_cast<T*>(a.mutable_data());
}

// A binding of out = method(v): both vectors checked, the GIL released, the engine locked.
template <class T>
auto vector_call(void (block_engine<T>::*method)(const T*, T*), const char* name) {
  return [method, name](locked_engine<T>& e, const py::array& v, py::array out) {
    const T* p = input<T>(v, -1, e.engine.dim(), name);
    T* o = output<T>(out, e.engine.dim(), "out");
    py::gil_scoped_release release;
    std::lock_guard<std::mutex> lock(e.mutex);
    (e.engine.*method)(p, o);
  };
}

template <class T>
void bind_engine(py::module_& m, const char* name) {
  using E = locked_engine<T>;
  py::class_<E>(m, name)
      .def(py::init([](std::vector<index_t> sizes, std::shared_ptr<schedule> beta, double eps,
                       const std::string& form, std::int64_t refresh_every, double tol,
                       bool bias_correction, bool warm_start,
                       std::int64_t max_consecutive_failures, double fallback_eps) {
             block_engine_options o;
             o.eps = eps;
             o.form = parse_root_form(form);
             o.refresh_every = refresh_every;
             o.tol = tol;
             o.bias_correction = bias_correction;
             o.warm_start = warm_start;
             o.max_consecutive_failures = max_consecutive_failures;
             o.fallback_eps = fallback_eps;
             return std::make_unique<E>(std::move(sizes), std::move(beta), o);
           }),
           py::arg("block_sizes"), py::arg("beta"), py::arg("eps"), py::arg("form"),
           py::arg("refresh_every"), py::arg("tol"), py::arg("bias_correction"),
           py::arg("warm_start"), py::arg("max_consecutive_failures") = 3,
           py::arg("fallback_eps") = 0.0)
      .def_property_readonly("dim", [](const E& e) { return e.engine.dim(); })
      .def_property_readonly("block_sizes", [](const E& e) { return e.engine.block_sizes(); })
      .def_property_readonly("block_offsets", [](const E& e) { return e.engine.block_offsets(); })
      .def_property_readonly("updates", [](const E& e) { return e.engine.updates(); })
      .def_property_readonly("memory_bytes", [](const E& e) { return e.engine.memory_bytes(); })
      .def_static("memory_bytes_for", &block_engine<T>::memory_bytes_for, py::arg("block_sizes"),
                  py::arg("refresh_every"))
      .def(
          "update",
          [](E& e, const py::array& g) {
            const T* p = input<T>(g, -1, e.engine.dim(), "g");
            py::gil_scoped_release release;
            std::lock_guard<std::mutex> lock(e.mutex);
            e.engine.update(p);
          },
          py::arg("g"))
      .def(
          "update_batch",
          [](E& e, const py::array& gs) {
            const T* p = input<T>(gs, 0, e.engine.dim(), "gs");
            const index_t k = gs.shape(0);
            py::gil_scoped_release release;
            std::lock_guard<std::mutex> lock(e.mutex);
            e.engine.update_batch(p, k);
          },
          py::arg("gs"))
      .def("direction", vector_call<T>(&block_engine<T>::direction, "v"), py::arg("v"),
           py::arg("out"))
      .def("update_direction", vector_call<T>(&block_engine<T>::update_direction, "g"),
           py::arg("g"), py::arg("out"))
      .def(
          "update_and_direction",
          [](E& e, const py::array& g, const py::array& v, py::array out) {
            const T* pg = input<T>(g, -1, e.engine.dim(), "g");
            const T* pv = input<T>(v, -1, e.engine.dim(), "v");
            T* po = output<T>(out, e.engine.dim(), "out");
            py::gil_scoped_release release;
            std::lock_guard<std::mutex> lock(e.mutex);
            e.engine.update_and_direction(pg, pv, po);
          },
          py::arg("g"), py::arg("v"), py::arg("out"))
      .def(
          "step",
          [](E& e, py::array x, const py::array& g, double lr) {
            T* px = output<T>(x, e.engine.dim(), "x");
            const T* pg = input<T>(g, -1, e.engine.dim(), "g");
            py::gil_scoped_release release;
            std::lock_guard<std::mutex> lock(e.mutex);
            e.engine.step(px, pg, lr);
          },
          py::arg("x"), py::arg("g"), py::arg("lr"))
      .def(
          "refresh",
          [](E& e, index_t block, bool warm) {
            py::gil_scoped_release release;
            std::lock_guard<std::mutex> lock(e.mutex);
            e.engine.refresh(block, warm);
          },
          py::arg("block"), py::arg("warm"))
      .def(
          "set_beta",
          [](E& e, std::shared_ptr<schedule> beta) {
            std::lock_guard<std::mutex> lock(e.mutex);
            e.engine.set_beta(std::move(beta));
          },
          py::arg("beta"))
      .def(
          "inject_refresh_failures",
          [](E& e, index_t block, std::int64_t attempts, int stages) {
            std::lock_guard<std::mutex> lock(e.mutex);
            e.engine.inject_refresh_failures(block, attempts, stages);
          },
          py::arg("block"), py::arg("attempts"), py::arg("stages"))
      .def("estimate",
           [](E& e) {
             std::vector<T> flat(static_cast<std::size_t>(e.engine.estimate_size()));
             {
               py::gil_scoped_release release;
               std::lock_guard<std::mutex> lock(e.mutex);
               e.engine.estimate(flat.data());
             }
             py::list blocks;
             index_t at = 0;
             for (const index_t b : e.engine.block_sizes()) {
               c_array<T> out({b, b});
               std::copy(flat.begin() + at, flat.begin() + at + b * b, out.mutable_data());
               blocks.append(std::move(out));
               at += b * b;
             }
             return blocks;
           })
      .def("statistics",
           [](E& e) {
             std::lock_guard<std::mutex> lock(e.mutex);
             const block_statistics s = e.engine.statistics();
             py::dict d;
             d["refreshes"] = s.refreshes;
             d["warm_refreshes"] = s.warm_refreshes;
             d["fallbacks"] = s.fallbacks;
             d["lambda_min"] = s.lambda_min;
             d["lambda_max"] = s.lambda_max;
             d["pending"] = s.pending;
             d["failed_refreshes"] = s.failed_refreshes;
             d["float64_retries"] = s.float64_retries;
             d["eps_retries"] = s.eps_retries;
             d["kept_bases"] = s.kept_bases;
             d["consecutive_failures"] = s.consecutive_failures;
             return d;
           })
      .def("save",
           [](E& e) {
             std::lock_guard<std::mutex> lock(e.mutex);
             const auto st = e.engine.save();
             c_array<T> data(static_cast<py::ssize_t>(st.data.size()));
             std::copy(st.data.begin(), st.data.end(), data.mutable_data());
             c_array<double> scalars(static_cast<py::ssize_t>(st.scalars.size()));
             std::copy(st.scalars.begin(), st.scalars.end(), scalars.mutable_data());
             return py::make_tuple(st.updates, st.beta_product, data, scalars);
           })
      .def(
          "load",
          [](E& e, std::int64_t updates, double beta_product, const py::array& data,
             const py::array& scalars) {
            SADDLESCAPE_EXPECTS(data.ndim() == 1, "state data must be 1-D, got shape ",
                                shape_string(data));
            SADDLESCAPE_EXPECTS(scalars.ndim() == 1, "state scalars must be 1-D, got shape ",
                                shape_string(scalars));
            const T* d = input<T>(data, -1, data.shape(0), "state data");
            const double* s = input<double>(scalars, -1, scalars.shape(0), "state scalars");
            typename block_engine<T>::state st;
            st.updates = updates;
            st.beta_product = beta_product;
            st.data.assign(d, d + data.shape(0));
            st.scalars.assign(s, s + scalars.shape(0));
            std::lock_guard<std::mutex> lock(e.mutex);
            e.engine.load(st);
          },
          py::arg("updates"), py::arg("beta_product"), py::arg("data"), py::arg("scalars"));
}

}  // namespace

void bind_block_engine(py::module_& m) {
  bind_engine<double>(m, "BlockEngine_float64");
  bind_engine<float>(m, "BlockEngine_float32");
}
