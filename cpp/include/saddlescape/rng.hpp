#pragma once
/// @file rng.hpp
/// The random number generator of every native run, fixed so that a seed names one result
/// bit for bit on every platform and compiler (the standard library's distributions are
/// implementation-defined, so none is used). The same class runs on CUDA devices (one
/// generator per thread), so a GPU run draws exactly what the CPU run with that seed draws.
///
/// Generator: xoshiro256** (Blackman and Vigna, 2018), its 256-bit state filled from the
/// 64-bit seed by four outputs of splitmix64.
/// - uniform(): the top 53 bits of one output times 2^-53, in [0, 1).
/// - below(n): Lemire's multiply-and-reject method, exactly uniform on {0, ..., n-1}.
/// - normal(): Marsaglia's polar method on pairs of uniform(2 u - 1) draws; the second normal
///   of each accepted pair is kept and returned by the next call.

#include <saddlescape/detail/formulas.hpp>

#include <cmath>
#include <cstdint>

namespace saddlescape {

class rng {
 public:
  SADDLESCAPE_HD explicit rng(std::uint64_t seed = 0) noexcept { reseed(seed); }

  SADDLESCAPE_HD void reseed(std::uint64_t seed) noexcept {
    std::uint64_t z = seed;
    for (auto& word : s_) word = splitmix64(z);
    has_spare_ = false;
    spare_ = 0.0;
  }

  /// The next 64 random bits.
  SADDLESCAPE_HD std::uint64_t next() noexcept {
    const std::uint64_t result = rotl(s_[1] * 5, 7) * 9;
    const std::uint64_t t = s_[1] << 17;
    s_[2] ^= s_[0];
    s_[3] ^= s_[1];
    s_[1] ^= s_[2];
    s_[0] ^= s_[3];
    s_[2] ^= t;
    s_[3] = rotl(s_[3], 45);
    return result;
  }

  /// Uniform on [0, 1), a multiple of 2^-53.
  SADDLESCAPE_HD double uniform() noexcept {
    return static_cast<double>(next() >> 11) * 0x1.0p-53;
  }

  /// Uniform on {0, ..., n - 1}; n >= 1.
  SADDLESCAPE_HD std::uint64_t below(std::uint64_t n) noexcept {
    std::uint64_t high;
    std::uint64_t low = multiply(next(), n, high);
    if (low < n) {
      const std::uint64_t threshold = (0 - n) % n;
      while (low < threshold) low = multiply(next(), n, high);
    }
    return high;
  }

  /// Standard normal.
  SADDLESCAPE_HD double normal() noexcept {
    if (has_spare_) {
      has_spare_ = false;
      return spare_;
    }
    double u, v, s;
    do {
      u = 2.0 * uniform() - 1.0;
      v = 2.0 * uniform() - 1.0;
#if defined(__CUDA_ARCH__)
      // Rounded as on the host: a fused multiply-add could move s across 1.0 and change
      // which pairs are accepted, and with them every later draw of the stream.
      s = __dadd_rn(__dmul_rn(u, u), __dmul_rn(v, v));
#else
      s = u * u + v * v;
#endif
    } while (s >= 1.0 || s == 0.0);
    const double f = std::sqrt(-2.0 * std::log(s) / s);
    spare_ = v * f;
    has_spare_ = true;
    return u * f;
  }

  /// The full state, for saving and restoring a generator mid-stream.
  struct state {
    std::uint64_t s[4];
    bool has_spare;
    double spare;
  };
  SADDLESCAPE_HD state save() const noexcept {
    return {{s_[0], s_[1], s_[2], s_[3]}, has_spare_, spare_};
  }
  SADDLESCAPE_HD void load(const state& st) noexcept {
    for (int i = 0; i < 4; ++i) s_[i] = st.s[i];
    has_spare_ = st.has_spare;
    spare_ = st.spare;
  }

 private:
  // The 128-bit product a * b: returns the low word and stores the high one.
  SADDLESCAPE_HD static std::uint64_t multiply(std::uint64_t a, std::uint64_t b,
                                               std::uint64_t& high) noexcept {
#if defined(__CUDA_ARCH__)
    high = __umul64hi(a, b);
    return a * b;
#elif defined(__SIZEOF_INT128__)
    __extension__ using u128 = unsigned __int128;
    const u128 m = static_cast<u128>(a) * b;
    high = static_cast<std::uint64_t>(m >> 64);
    return static_cast<std::uint64_t>(m);
#else
    const std::uint64_t a0 = a & 0xffffffffu, a1 = a >> 32, b0 = b & 0xffffffffu, b1 = b >> 32;
    const std::uint64_t p00 = a0 * b0, p01 = a0 * b1, p10 = a1 * b0, p11 = a1 * b1;
    const std::uint64_t mid = (p00 >> 32) + (p01 & 0xffffffffu) + (p10 & 0xffffffffu);
    high = p11 + (p01 >> 32) + (p10 >> 32) + (mid >> 32);
    return (mid << 32) | (p00 & 0xffffffffu);
#endif
  }
  SADDLESCAPE_HD static std::uint64_t rotl(std::uint64_t x, int k) noexcept {
    return (x << k) | (x >> (64 - k));
  }
  SADDLESCAPE_HD static std::uint64_t splitmix64(std::uint64_t& z) noexcept {
    z += 0x9e3779b97f4a7c15ULL;
    std::uint64_t r = z;
    r = (r ^ (r >> 30)) * 0xbf58476d1ce4e5b9ULL;
    r = (r ^ (r >> 27)) * 0x94d049bb133111ebULL;
    return r ^ (r >> 31);
  }

  std::uint64_t s_[4];
  bool has_spare_ = false;
  double spare_ = 0.0;
};

}  // namespace saddlescape
