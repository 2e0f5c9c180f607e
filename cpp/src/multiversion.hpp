#pragma once
// Streaming kernels are compiled for AVX2 as well as the x86-64 baseline, picked at load
// time (GCC/Clang function multiversioning), since the wheel cannot assume AVX2. ("avx2" is
// tested by feature, where "arch=haswell" would test the CPU model and miss AMD's.)
#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define SADDLESCAPE_MULTIVERSION __attribute__((target_clones("avx2", "default")))
#else
#define SADDLESCAPE_MULTIVERSION
#endif
