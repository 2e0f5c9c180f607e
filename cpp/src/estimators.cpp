#include <saddlescape/estimators.hpp>

#include <saddlescape/detail/formulas.hpp>

#include "checks.hpp"
#include "multiversion.hpp"
#include "lapack.hpp"
#include "memory.hpp"


#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <string>
#include <utility>

namespace saddlescape {

using detail::concat;

structure parse_structure(std::string_view name) {
  if (name == "full") return structure::full;
  if (name == "diag") return structure::diag;
  if (name == "block") return structure::block;
  throw invalid_argument(concat("structure must be 'full', 'diag' or 'block', got '", name, "'"));
}

std::string_view to_string(structure s) {
  switch (s) {
    case structure::diag: return "diag";
    case structure::block: return "block";
    default: return "full";
  }
}

namespace {

// The diagonal update produced a non-finite value: a NaN/Inf in the gradients (invalid input),
// or else an overflow (numerical).
template <class T>
[[noreturn]] void report_diag_failure(const T* g, index_t n, index_t rows) {
  detail::report_non_finite(g, rows, n, rows == 1 ? "g" : "gs", rows == 1);
  SADDLESCAPE_NUMERICAL_FAIL("the diagonal estimate would overflow ", detail::type_name<T>(),
                             "; the estimate is unchanged");
}


// out = b v + a g^2, and whether every out_i is finite (false for a NaN/Inf g_i or an overflow):
// one pass, three streams.
template <class T>
SADDLESCAPE_MULTIVERSION bool diag_update(index_t n, T b, T a, const T* __restrict v,
                                                 const T* __restrict g, T* __restrict out) {
  bool ok = true;
  for (index_t i = 0; i < n; ++i) {
    // The optimizers' and the GPU's formula, subnormals flushed; NaN and Inf pass through.
    const T o = detail::diag_ema(v[i], g[i], b, a);
    ok &= (o - o == T(0));  // false for NaN and +-Inf, and vectorisable
    out[i] = o;
  }
  return ok;
}

// out = b out + a g^2 in place; the same finiteness flag.
template <class T>
SADDLESCAPE_MULTIVERSION bool diag_accumulate(index_t n, T b, T a, const T* __restrict g,
                                              T* __restrict out) {
  bool ok = true;
  for (index_t i = 0; i < n; ++i) {
    const T o = detail::diag_ema(out[i], g[i], b, a);
    ok &= (o - o == T(0));
    out[i] = o;
  }
  return ok;
}

// max_i |g_i| in double, and whether all g_i are finite.
template <class T>
double max_abs(const T* g, index_t n, bool& finite) {
  double m = 0.0;
  bool ok = true;
  for (index_t i = 0; i < n; ++i) {
    const double x = std::abs(static_cast<double>(g[i]));
    ok &= (x - x == 0.0);
    m = x > m ? x : m;
  }
  finite = ok;
  return m;
}

}  // namespace

// ------------------------------------------------------------------------------------------

template <class T>
ema_estimator<T>::ema_estimator(index_t dim, schedule_ptr beta, structure s,
                                std::vector<index_t> block_sizes, bool bias_correction,
                                std::int64_t refresh_every)
    : dim_(dim),
      beta_(std::move(beta)),
      structure_(s),
      bias_correction_(bias_correction),
      refresh_every_(refresh_every) {
  SADDLESCAPE_EXPECTS(dim >= 1, "dim must be >= 1, got ", dim);
  SADDLESCAPE_EXPECTS(dim <= detail::lapack::max_dim, "dim is too large for 32-bit BLAS: ", dim);
  SADDLESCAPE_EXPECTS(beta_ != nullptr, "beta must be a number in [0, 1) or a schedule");
  SADDLESCAPE_EXPECTS(refresh_every >= 1, "refresh_every must be >= 1, got ", refresh_every);
  if (s == structure::block) {
    SADDLESCAPE_EXPECTS(!block_sizes.empty(), "structure 'block' needs block_sizes");
    index_t total = 0;
    for (std::size_t i = 0; i < block_sizes.size(); ++i) {
      SADDLESCAPE_EXPECTS(block_sizes[i] >= 1, "block sizes must be >= 1, got block_sizes[", i,
                          "] = ", block_sizes[i]);
    }
    for (std::size_t i = 0; i < block_sizes.size(); ++i) {
      // Checked before summing, so that huge sizes cannot wrap the sum around to dim.
      SADDLESCAPE_EXPECTS(block_sizes[i] <= dim, "block sizes must be <= dim = ", dim,
                          ", got block_sizes[", i, "] = ", block_sizes[i]);
      total += block_sizes[i];
    }
    SADDLESCAPE_EXPECTS(total == dim, "block_sizes must sum to dim = ", dim, ", they sum to ",
                        total);
    blocks_ = std::move(block_sizes);
  } else {
    SADDLESCAPE_EXPECTS(block_sizes.empty(), "block_sizes is only for structure 'block', got ",
                        block_sizes.size(), " sizes with structure '", to_string(s), "'");
    if (s == structure::full) blocks_ = {dim};
  }
  // A beta that is a constant can be checked now rather than at the first update.
  if (auto c = std::dynamic_pointer_cast<const constant_schedule>(beta_))
    SADDLESCAPE_EXPECTS(c->value() >= 0 && c->value() < 1, "beta must be in [0, 1), got ",
                        c->value());
  index_t row = 0, at = 0;
  for (const index_t b : blocks_) {
    offsets_.push_back(row);
    storage_.push_back(at);
    row += b;
    at += b * b;
  }
  // The estimate (and the diagonal's second buffer), and for full and block the factorisation
  // made at the first use (an eigenbasis per block and the largest block's workspace).
  double largest = 0.0;
  for (const index_t b : blocks_) largest = std::max(largest, static_cast<double>(b));
  const double entries = static_cast<double>(estimate_size());
  const double bytes = s == structure::diag
                           ? 2.0 * entries * sizeof(T)
                           : 2.0 * entries * sizeof(T) + 2.0 * largest * largest * sizeof(double);
  const std::string what = concat("an EMAEstimator of dim ", dim, " (structure '", to_string(s),
                                  "', ", detail::type_name<T>(), ")");
  detail::expect_memory(bytes, what);
  detail::allocating(bytes, what, [&] {
    data_.assign(static_cast<std::size_t>(estimate_size()), T(0));
    if (s == structure::diag) spare_.assign(data_.size(), T(0));
  });
  const std::size_t nb = blocks_.size();
  fb_failed_.assign(nb, 0);
  fb_f64_.assign(nb, 0);
  fb_eps_.assign(nb, 0);
  fb_kept_.assign(nb, 0);
  fb_consecutive_.assign(nb, 0);
  inject_attempts_.assign(nb, 0);
  inject_stages_.assign(nb, 0);
}

template <class T>
index_t ema_estimator<T>::estimate_size() const noexcept {
  if (structure_ == structure::diag) return dim_;
  index_t n = 0;
  for (const index_t b : blocks_) n += b * b;
  return n;
}

template <class T>
double ema_estimator<T>::next_beta(std::int64_t t) const {
  const double b = (*beta_)(t);
  if (!(b >= 0.0 && b < 1.0))
    throw invalid_argument(concat("beta must be in [0, 1), got beta_", t, " = ", b, " from ",
                                  beta_->describe()));
  return b;
}

template <class T>
void ema_estimator<T>::prepare_scale(double new_scale, double increment) {
  // new_scale: the scale after the decay; increment: an upper bound, in units of G, on what the
  // step adds to any entry. bound_ bounds max|S|. Renormalising when the scale drops below
  // sqrt(epsilon) keeps S within a factor ~1e8 (double) or ~3e3 (float) of G and costs one pass
  // every log(sqrt(eps)) / log(beta) steps; renormalising early keeps S from overflowing when
  // G is within that factor of the largest representable value.
  const double limit = static_cast<double>(std::numeric_limits<T>::max()) / 4;
  if (!(bound_ * new_scale + increment <= limit))
    SADDLESCAPE_NUMERICAL_FAIL("the estimate would overflow ", detail::type_name<T>(),
                               ": this update adds up to ", increment, " to entries of size up to ",
                               bound_ * new_scale, "; the estimate is unchanged");
  const double threshold = std::sqrt(static_cast<double>(std::numeric_limits<T>::epsilon()));
  if (new_scale >= threshold && bound_ + increment / new_scale <= limit) {
    scale_ = new_scale;
    bound_ += increment / new_scale;
    return;
  }
  const T s = static_cast<T>(new_scale);
  const T tiny = std::numeric_limits<T>::min();
  for (T& x : data_) {
    x *= s;
    if (std::abs(x) < tiny) x = T(0);  // never keep subnormals: they are 50x slower
  }
  scale_ = 1.0;
  bound_ = bound_ * new_scale + increment;
}

template <class T>
double ema_estimator<T>::correction() const noexcept {
  if (!bias_correction_ || steps_ == 0) return 1.0;
  return 1.0 / (1.0 - beta_product_);
}

template <class T>
void ema_estimator<T>::update(const T* g) {
  const double b = next_beta(steps_);
  const index_t d = dim_;
  if (structure_ == structure::diag) {
    // One fused pass into the spare buffer; swap only if every result is finite.
    if (!diag_update(d, static_cast<T>(b), static_cast<T>(1.0 - b), data_.data(), g,
                     spare_.data()))
      report_diag_failure(g, d, 1);
    std::swap(data_, spare_);
  } else {
    bool finite = true;
    const double m = max_abs(g, d, finite);
    if (!finite) detail::report_non_finite(g, 1, d, "g", true);
    const double root = std::sqrt(1.0 - b) * m;  // (1 - b) m^2 without overflowing m^2
    prepare_scale(b * scale_, root * root);
    const T alpha = static_cast<T>((1.0 - b) / scale_);
    for (std::size_t k = 0; k < blocks_.size(); ++k)
      detail::lapack::syr_lower(static_cast<int>(blocks_[k]), alpha, g + offsets_[k],
                                data_.data() + storage_[k]);
  }
  beta_product_ *= b;
  ++steps_;
}

template <class T>
void ema_estimator<T>::update_batch(const T* gs, index_t k) {
  SADDLESCAPE_EXPECTS(k >= 0, "the batch must have >= 0 rows, got ", k);
  SADDLESCAPE_EXPECTS(k <= detail::lapack::max_dim, "the batch is too large: ", k);
  if (k == 0) return;
  const index_t d = dim_;
  detail::check_finite(gs, k, d, "gs", false);
  std::vector<double>& betas = batch_betas_;
  betas.resize(static_cast<std::size_t>(k));
  for (index_t i = 0; i < k; ++i) betas[i] = next_beta(steps_ + i);

  if (structure_ == structure::diag) {
    // Column chunks that stay in cache: each chunk of the estimate is read once, receives all
    // k rows, and is written to the spare buffer, which replaces the estimate only if all of it
    // is finite.
    constexpr index_t chunk = 1024;
    bool ok = true;
    for (index_t i0 = 0; i0 < d; i0 += chunk) {
      const index_t n = std::min(chunk, d - i0);
      T* out = spare_.data() + i0;
      ok &= diag_update(n, static_cast<T>(betas[0]), static_cast<T>(1.0 - betas[0]),
                        data_.data() + i0, gs + i0, out);
      for (index_t r = 1; r < k; ++r)
        ok &= diag_accumulate(n, static_cast<T>(betas[r]), static_cast<T>(1.0 - betas[r]),
                              gs + r * d + i0, out);
    }
    if (!ok) report_diag_failure(gs, d, k);
    std::swap(data_, spare_);
    for (const double b : betas) beta_product_ *= b;
    steps_ += k;
    return;
  }

  // w_i = (1 - beta_i) prod_(j > i) beta_j, by suffix products.
  std::vector<double>& w = batch_weights_;
  w.resize(static_cast<std::size_t>(k));
  double suffix = 1.0;
  for (index_t i = k - 1; i >= 0; --i) {
    w[i] = (1.0 - betas[i]) * suffix;
    suffix *= betas[i];
  }
  double increment = 0.0;
  for (index_t i = 0; i < k; ++i) {
    bool finite = true;
    const double root = std::sqrt(w[i]) * max_abs(gs + i * d, d, finite);
    increment += root * root;
  }
  rows_.resize(static_cast<std::size_t>(k * d));  // may throw: before anything changes
  prepare_scale(suffix * scale_, increment);
  for (index_t i = 0; i < k; ++i) {
    const T r = static_cast<T>(std::sqrt(w[i] / scale_));
    const T* g = gs + i * d;
    T* y = rows_.data() + i * d;
    for (index_t j = 0; j < d; ++j) y[j] = r * g[j];
  }
  // Row-major (k, d) rows are a column-major d x k matrix Y^T with leading dimension d; a block
  // is its row range, so S_b += Y_b^T Y_b is one syrk per block.
  for (std::size_t b = 0; b < blocks_.size(); ++b)
    detail::lapack::syrk_lower(static_cast<int>(blocks_[b]), static_cast<int>(k), T(1),
                               rows_.data() + offsets_[b], static_cast<int>(d), T(1),
                               data_.data() + storage_[b], static_cast<int>(blocks_[b]));
  beta_product_ *= suffix;
  steps_ += k;
}

template <class T>
void ema_estimator<T>::estimate(T* out) const {
  const T c = static_cast<T>(scale_ * correction());
  if (structure_ == structure::diag) {
    for (index_t i = 0; i < dim_; ++i) out[i] = c * data_[i];
    return;
  }
  for (std::size_t b = 0; b < blocks_.size(); ++b) {
    const index_t n = blocks_[b];
    const T* s = data_.data() + storage_[b];
    T* o = out + storage_[b];
    for (index_t j = 0; j < n; ++j)
      for (index_t i = j; i < n; ++i) {
        const T v = c * s[i + j * n];  // column-major lower triangle
        o[i * n + j] = v;
        o[j * n + i] = v;
      }
  }
}

template <class T>
void ema_estimator<T>::refresh_factors() {
  if (cache_.factored_at >= 0 && steps_ - cache_.factored_at < refresh_every_) return;
  const bool resumed = cache_.factored_at < 0 && resume_from_ >= 0 && resume_from_ <= steps_;
  const std::size_t nb = blocks_.size();
  auto make = [&] {
    // Built aside and moved in, so that a throw (bad_alloc) never leaves a partial cache.
    decltype(cache_.roots) roots;
    for (const index_t b : blocks_) roots.push_back(std::make_unique<eigen_root<T>>(b));
    return roots;
  };
  if (cache_.roots.size() != nb) cache_.roots = make();
  if (cache_.spares.size() != nb) cache_.spares = make();
  const index_t largest = *std::max_element(blocks_.begin(), blocks_.end());
  dense_.resize(static_cast<std::size_t>(largest * largest));
  const T c = static_cast<T>(scale_ * correction());
  // Every block is factored into its spare first; the cache changes only once all succeeded
  // or fell back (the fallback policy, file comment).
  // 0 factored, 1 in float64, 2 with fallback_eps, 3 kept the previous
  std::vector<int> outcome(nb, 0);
  std::vector<char> first_failed(nb, 0);
  for (std::size_t b = 0; b < nb; ++b) {
    const index_t n = blocks_[b];
    const T* s = data_.data() + storage_[b];
    for (index_t j = 0; j < n; ++j)
      for (index_t i = j; i < n; ++i) dense_[i * n + j] = dense_[j * n + i] = c * s[i + j * n];
    const std::string name = nb == 1 ? std::string("the estimate")
                                     : concat("block ", b, " of the estimate");
    auto injected = [&](int stage) { return inject_attempts_[b] > 0 && stage < inject_stages_[b]; };
    auto attempt = [&](int stage) {
      if (injected(stage)) return false;
      try {
        cache_.spares[b]->factor(dense_.data(), name);
        return true;
      } catch (const numerical_error&) {
        return false;
      }
    };
    if (attempt(0)) continue;
    first_failed[b] = 1;
    if (sizeof(T) < sizeof(double) && !injected(1) && retry_in_double(b, name)) {
      outcome[b] = 1;
      continue;
    }
    if (fallback_.fallback_eps > 0.0) {
      for (index_t i = 0; i < n; ++i) dense_[i * n + i] += static_cast<T>(fallback_.fallback_eps);
      if (attempt(2)) {
        outcome[b] = 2;
        continue;
      }
    }
    if (!cache_.roots[b]->factored())
      SADDLESCAPE_NUMERICAL_FAIL("the factorisation of ", name, " failed",
                                 sizeof(T) < sizeof(double) ? " (also in float64)" : "",
                                 fallback_.fallback_eps > 0.0 ? " (also with fallback_eps)" : "",
                                 " and there is no previous one to keep; nothing was changed");
    if (fb_consecutive_[b] + 1 >= fallback_.max_consecutive_failures)
      SADDLESCAPE_NUMERICAL_FAIL("the factorisation of ", name, " failed ", fb_consecutive_[b] + 1,
                                 " times in a row (max_consecutive_failures = ",
                                 fallback_.max_consecutive_failures, "); nothing was changed");
    outcome[b] = 3;
  }
  bool kept = false;
  for (std::size_t b = 0; b < nb; ++b) {
    if (outcome[b] != 3) std::swap(cache_.roots[b], cache_.spares[b]);
    fb_failed_[b] += first_failed[b];
    fb_f64_[b] += outcome[b] == 1 ? 1 : 0;
    fb_eps_[b] += outcome[b] == 2 ? 1 : 0;
    fb_kept_[b] += outcome[b] == 3 ? 1 : 0;
    fb_consecutive_[b] = outcome[b] == 3 ? fb_consecutive_[b] + 1 : 0;
    kept |= outcome[b] == 3;
    if (inject_attempts_[b] > 0) --inject_attempts_[b];
  }
  // A block that kept its previous factorisation is retried at the next use (all blocks are
  // refactored then). Otherwise a loaded estimator keeps the saved refresh schedule, so that it
  // refactors when the saved one would have.
  if (kept) {
    cache_.factored_at = -1;
    return;
  }
  cache_.factored_at = resumed ? steps_ - (steps_ - resume_from_) % refresh_every_ : steps_;
  resume_from_ = -1;
}

template <class T>
bool ema_estimator<T>::retry_in_double(std::size_t b, const std::string& name) {
  auto& c = cache_;
  c.lambda64.resize(static_cast<std::size_t>(blocks_[b]));
  // From S itself, the scale applied in double: nothing rounds before the solver.
  const int info = detail::lapack::syevd_in_double(data_.data() + storage_[b],
                                                   static_cast<int>(blocks_[b]),
                                                   scale_ * correction(), 0.0, c.m64,
                                                   c.lambda64.data(), c.work64, c.iwork64);
  if (info != 0) return false;
  try {
    cache_.spares[b]->assign(c.m64.data(), c.lambda64.data(), name);
    return true;
  } catch (const numerical_error&) {
    return false;
  }
}

template <class T>
void ema_estimator<T>::set_fallback(const fallback_options& o) {
  SADDLESCAPE_EXPECTS(o.max_consecutive_failures >= 1,
                      "max_consecutive_failures must be >= 1, got ", o.max_consecutive_failures);
  SADDLESCAPE_EXPECTS(std::isfinite(o.fallback_eps) && o.fallback_eps >= 0.0,
                      "fallback_eps must be finite and >= 0, got ", o.fallback_eps);
  fallback_ = o;
}

template <class T>
fallback_statistics ema_estimator<T>::fallback_stats() const {
  return {fb_failed_, fb_f64_, fb_eps_, fb_kept_, fb_consecutive_};
}

template <class T>
std::vector<double> ema_estimator<T>::fallback_counters() const {
  std::vector<double> out;
  for (std::size_t b = 0; b < blocks_.size(); ++b)
    for (const std::int64_t v : {fb_failed_[b], fb_eps_[b], fb_kept_[b], fb_consecutive_[b]})
      out.push_back(static_cast<double>(v));
  return out;
}

template <class T>
void ema_estimator<T>::load_fallback_counters(const std::vector<double>& c) {
  const std::size_t nb = blocks_.size();
  SADDLESCAPE_EXPECTS(c.size() == 4 * nb, "the fallback counters must have ", 4 * nb,
                      " values (4 per block), got ", c.size());
  for (const double v : c)
    SADDLESCAPE_EXPECTS(v >= 0.0 && v <= 9.0e15 && v == std::floor(v),
                        "the fallback counters must be integers >= 0, got ", v);
  for (std::size_t b = 0; b < nb; ++b) {
    fb_failed_[b] = static_cast<std::int64_t>(c[4 * b]);
    fb_f64_[b] = 0;  // not saved (header)
    fb_eps_[b] = static_cast<std::int64_t>(c[4 * b + 1]);
    fb_kept_[b] = static_cast<std::int64_t>(c[4 * b + 2]);
    fb_consecutive_[b] = static_cast<std::int64_t>(c[4 * b + 3]);
  }
}

template <class T>
void ema_estimator<T>::inject_factor_failures(index_t block, std::int64_t attempts, int stages) {
  SADDLESCAPE_EXPECTS(structure_ != structure::diag, "the diagonal estimate has no factorisation");
  SADDLESCAPE_EXPECTS(block >= 0 && block < static_cast<index_t>(blocks_.size()),
                      "block must be in [0, ", blocks_.size() - 1, "], got ", block);
  SADDLESCAPE_EXPECTS(attempts >= 0, "attempts must be >= 0, got ", attempts);
  SADDLESCAPE_EXPECTS(stages >= 0 && stages <= 3, "stages must be in [0, 3], got ", stages);
  inject_attempts_[block] = attempts;
  inject_stages_[block] = stages;
}

template <class T>
void ema_estimator<T>::preconditioner(const root_spec& spec, T* out) {
  spec.validate();
  if (structure_ == structure::diag) {
    diag_.resize(static_cast<std::size_t>(dim_));
    estimate(diag_.data());
    diag_inv_root(diag_.data(), dim_, spec, out);
    return;
  }
  refresh_factors();
  for (std::size_t b = 0; b < blocks_.size(); ++b) cache_.roots[b]->matrix(spec, out + storage_[b]);
}

template <class T>
void ema_estimator<T>::apply(const root_spec& spec, const T* v, T* out) {
  spec.validate();
  detail::check_finite(v, 1, dim_, "v", true);
  if (structure_ == structure::diag) {
    diag_.resize(static_cast<std::size_t>(dim_));
    estimate(diag_.data());
    diag_inv_root(diag_.data(), dim_, spec, diag_.data());
    for (index_t i = 0; i < dim_; ++i) out[i] = diag_[i] * v[i];
    return;
  }
  refresh_factors();
  for (std::size_t b = 0; b < blocks_.size(); ++b)
    cache_.roots[b]->apply(spec, v + offsets_[b], 1, out + offsets_[b]);
}

template <class T>
typename ema_estimator<T>::state ema_estimator<T>::save() const {
  return state{steps_, scale_, beta_product_, std::vector<T>(data_.begin(), data_.end()),
               cache_.factored_at >= 0 ? cache_.factored_at : resume_from_};
}

template <class T>
void ema_estimator<T>::load(const state& st) {
  SADDLESCAPE_EXPECTS(st.steps >= 0, "state steps must be >= 0, got ", st.steps);
  SADDLESCAPE_EXPECTS(st.factored_at >= -1 && st.factored_at <= st.steps,
                      "state factored_at must be in [-1, steps = ", st.steps, "], got ",
                      st.factored_at);
  SADDLESCAPE_EXPECTS(std::isfinite(st.scale) && st.scale > 0 && st.scale <= 1,
                      "state scale must be in (0, 1], got ", st.scale);
  SADDLESCAPE_EXPECTS(st.beta_product >= 0 && st.beta_product <= 1,
                      "state beta_product must be in [0, 1], got ", st.beta_product);
  SADDLESCAPE_EXPECTS(static_cast<index_t>(st.data.size()) == estimate_size(),
                      "state data must have ", estimate_size(), " values for this estimator, got ",
                      st.data.size());
  // The bias correction divides by 1 - beta_product: exactly 1 before any step, below 1 after.
  SADDLESCAPE_EXPECTS(st.steps == 0 ? st.beta_product == 1.0 : st.beta_product < 1.0,
                      "state beta_product must be 1 before any step and < 1 after, got ",
                      st.beta_product, " with steps = ", st.steps);
  detail::check_finite(st.data.data(), 1, static_cast<index_t>(st.data.size()), "state data",
                       true);
  if (structure_ == structure::diag)
    for (std::size_t i = 0; i < st.data.size(); ++i)
      SADDLESCAPE_EXPECTS(st.data[i] >= T(0), "a diagonal state must be >= 0, got data[", i,
                          "] = ", st.data[i]);
  steps_ = st.steps;
  scale_ = st.scale;
  beta_product_ = st.beta_product;
  data_.assign(st.data.begin(), st.data.end());
  bound_ = 0.0;
  for (const T x : data_) bound_ = std::max(bound_, std::abs(static_cast<double>(x)));
  cache_.factored_at = -1;
  // A factorisation of the estimate before the load is no fallback for the loaded one.
  cache_.roots.clear();
  cache_.spares.clear();
  resume_from_ = st.factored_at;
}

// ------------------------------------------------------------------------------------------

template <class T>
covariance_estimator<T>::covariance_estimator(index_t dim, schedule_ptr beta, structure s,
                                              std::vector<index_t> block_sizes,
                                              bool bias_correction, std::int64_t refresh_every)
    : ema_(dim, std::move(beta), s, std::move(block_sizes), bias_correction, refresh_every),
      diff_(static_cast<std::size_t>(dim)) {}

template <class T>
void covariance_estimator<T>::update_pair(const T* g1, const T* g2) {
  const index_t d = ema_.dim();
  detail::check_finite(g1, 1, d, "g1", true);
  detail::check_finite(g2, 1, d, "g2", true);
  // (g1 - g2)(g1 - g2)^T / 2 is the outer product of (g1 - g2) / sqrt(2).
  const T r = static_cast<T>(std::sqrt(0.5));
  bool finite = true;
  for (index_t i = 0; i < d; ++i) {
    diff_[i] = r * (g1[i] - g2[i]);
    finite &= static_cast<bool>(std::isfinite(diff_[i]));
  }
  if (!finite)
    SADDLESCAPE_NUMERICAL_FAIL("g1 - g2 overflows ", detail::type_name<T>(),
                               "; the estimate is unchanged");
  ema_.update(diff_.data());
}

template class ema_estimator<float>;
template class ema_estimator<double>;
template class covariance_estimator<float>;
template class covariance_estimator<double>;

}  // namespace saddlescape
