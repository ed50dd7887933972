// Portable fixed-width vectors (GCC/Clang vector extensions): the compiler lowers them to AVX-512,
// AVX2, SSE or NEON, whichever the target has. Only exact operations are used here; every float
// result is rounded as IEEE scalar code would round it (see CMakeLists.txt: -ffp-contract=off).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace edgead {

typedef uint8_t v16u8 __attribute__((vector_size(16)));
typedef uint8_t v64u8 __attribute__((vector_size(64)));
typedef int16_t v16i16 __attribute__((vector_size(32)));
typedef int32_t v16i32 __attribute__((vector_size(64)));
typedef float v16f __attribute__((vector_size(64)));

template <typename V>
inline V load(const void* p) {
    V v;
    std::memcpy(&v, p, sizeof v);
    return v;
}

inline v16f splat(float x) { return v16f{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }

// (__builtin_shufflevector is GCC >= 12 and Clang; JetPack 6's GCC 11 has __builtin_shuffle.)
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define EDGEAD_SHUFFLE(V, a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define EDGEAD_SHUFFLE(V, a, b, ...) __builtin_shuffle(a, b, V{__VA_ARGS__})
#endif

// Interleave the low (high) halves of each 16-byte lane of a and b: a0 b0 a1 b1 ... per lane,
// the one-instruction unpack of every SIMD ISA.
inline v64u8 zip_lo(v64u8 a, v64u8 b) {
    return EDGEAD_SHUFFLE(v64u8, a, b,
        0, 64, 1, 65, 2, 66, 3, 67, 4, 68, 5, 69, 6, 70, 7, 71, 16, 80, 17, 81, 18, 82, 19, 83, 20, 84,
        21, 85, 22, 86, 23, 87, 32, 96, 33, 97, 34, 98, 35, 99, 36, 100, 37, 101, 38, 102, 39, 103, 48,
        112, 49, 113, 50, 114, 51, 115, 52, 116, 53, 117, 54, 118, 55, 119);
}
inline v64u8 zip_hi(v64u8 a, v64u8 b) {
    return EDGEAD_SHUFFLE(v64u8, a, b,
        8, 72, 9, 73, 10, 74, 11, 75, 12, 76, 13, 77, 14, 78, 15, 79, 24, 88, 25, 89, 26, 90, 27, 91,
        28, 92, 29, 93, 30, 94, 31, 95, 40, 104, 41, 105, 42, 106, 43, 107, 44, 108, 45, 109, 46, 110,
        47, 111, 56, 120, 57, 121, 58, 122, 59, 123, 60, 124, 61, 125, 62, 126, 63, 127);
}

// Transpose four 16x16 byte tiles at once: r[i] holds bytes 0..63 of row i; afterwards each
// 16-byte lane L of r[i] holds column 16 L + i (its 16 rows). Four rounds of pairing row i with
// row i + 8 (a perfect shuffle) turn rows into columns.
inline void transpose16x64(v64u8 r[16]) {
    for (int round = 0; round < 4; ++round) {
        v64u8 t[16];
        for (int i = 0; i < 8; ++i) {
            t[2 * i] = zip_lo(r[i], r[i + 8]);
            t[2 * i + 1] = zip_hi(r[i], r[i + 8]);
        }
        for (int i = 0; i < 16; ++i) r[i] = t[i];
    }
}

// The same transpose for a 16x16 float tile (r[i][j] -> r[j][i]).
inline void transpose16(v16f r[16]) {
    for (int round = 0; round < 4; ++round) {
        v16f t[16];
        for (int i = 0; i < 8; ++i) {
            t[2 * i] = EDGEAD_SHUFFLE(v16i32, r[i], r[i + 8], 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
            t[2 * i + 1] =
                EDGEAD_SHUFFLE(v16i32, r[i], r[i + 8], 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
        }
        for (int i = 0; i < 16; ++i) r[i] = t[i];
    }
}

// uint8 lanes -> float lanes. Compilers lower a generic __builtin_convertvector of this to
// scalar code in some contexts, so the common x86 targets get their few instructions here.
inline v16f to_float(v16u8 v) {
#if defined(__AVX512F__)
    const __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(load<__m128i>(&v)));
    return load<v16f>(&f);
#elif defined(__AVX2__)
    const __m128i b = load<__m128i>(&v);
    const __m256 f[2] = {_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)),
                         _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(b, 8)))};
    return load<v16f>(f);
#else
    return __builtin_convertvector(__builtin_convertvector(__builtin_convertvector(v, v16i16), v16i32), v16f);
#endif
}

}  // namespace edgead
