// Fixed-width vectors of 16 floats (v16f) and 64 bytes (v64u8), the units of the native core's
// kernels. With AVX-512 they are GCC/Clang vector extensions, one register each. Elsewhere they
// are arrays of the target's own vectors (8 floats with AVX2, 4 with SSE or NEON): a generic
// vector wider than the hardware's is compiled through the stack, which made the AVX2 build
// 4-5x slower than the AVX-512 one. Only exact operations are used; every float result is
// rounded as IEEE scalar code would round it (see CMakeLists.txt: -ffp-contract=off).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__SSE2__)
#include <immintrin.h>
#endif
#if defined(__ARM_NEON)
#include <arm_neon.h>
#endif

// (__builtin_shufflevector is GCC >= 12 and Clang; JetPack 6's GCC 11 has __builtin_shuffle.)
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define EDGEAD_SHUFFLE(V, a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define EDGEAD_SHUFFLE(V, a, b, ...) __builtin_shuffle(a, b, V{__VA_ARGS__})
#endif

namespace edgead {

typedef uint8_t v16u8 __attribute__((vector_size(16)));

template <typename V>
inline V load(const void* p) {
    V v;
    std::memcpy(&v, p, sizeof v);
    return v;
}

#if defined(__AVX512F__)

typedef uint8_t v64u8 __attribute__((vector_size(64)));
typedef int32_t v16i32 __attribute__((vector_size(64)));
typedef float v16f __attribute__((vector_size(64)));

inline v16f splat(float x) { return v16f{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }

// Interleave the low (high) halves of each 16-byte lane of a and b: a0 b0 a1 b1 ... per lane.
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
// Lanes 0..7 (8..15) of a and b interleaved: a0 b0 a1 b1 ... a7 b7.
inline v16f interleave_lo(v16f a, v16f b) {
    return EDGEAD_SHUFFLE(v16i32, a, b, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
}
inline v16f interleave_hi(v16f a, v16f b) {
    return EDGEAD_SHUFFLE(v16i32, a, b, 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
}

inline v16f to_float(v16u8 v) {
    const __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(load<__m128i>(&v)));
    return load<v16f>(&f);
}

inline v16f fma16(v16f a, v16f b, v16f c) {
    const __m512 r = _mm512_fmadd_ps(load<__m512>(&a), load<__m512>(&b), load<__m512>(&c));
    return load<v16f>(&r);
}

#else  // arrays of the target's vectors

#if defined(__AVX2__)
constexpr int kFloatLanes = 8, kByteLanes = 32;
#else
constexpr int kFloatLanes = 4, kByteLanes = 16;
#endif
typedef float vnf __attribute__((vector_size(4 * kFloatLanes)));
typedef int32_t vni __attribute__((vector_size(4 * kFloatLanes)));
typedef uint8_t vnb __attribute__((vector_size(kByteLanes)));
constexpr int kFloatParts = 16 / kFloatLanes, kByteParts = 64 / kByteLanes;

struct v16f {
    vnf p[kFloatParts];
};
struct v64u8 {
    vnb p[kByteParts];
};

// Loads part by part: one memcpy of the whole array compiles to 16-byte moves through the stack,
// read back as wider vectors, and every such read stalls on store forwarding.
template <>
inline v16f load<v16f>(const void* p) {
    v16f v;
    for (int i = 0; i < kFloatParts; ++i) v.p[i] = load<vnf>(static_cast<const float*>(p) + i * kFloatLanes);
    return v;
}
template <>
inline v64u8 load<v64u8>(const void* p) {
    v64u8 v;
    for (int i = 0; i < kByteParts; ++i) v.p[i] = load<vnb>(static_cast<const uint8_t*>(p) + i * kByteLanes);
    return v;
}

inline v16f operator+(v16f a, const v16f& b) {
    for (int i = 0; i < kFloatParts; ++i) a.p[i] = a.p[i] + b.p[i];
    return a;
}
inline v16f operator*(v16f a, const v16f& b) {
    for (int i = 0; i < kFloatParts; ++i) a.p[i] = a.p[i] * b.p[i];
    return a;
}
inline v16f splat(float x) {
    v16f v;
    for (int i = 0; i < kFloatParts; ++i) v.p[i] = vnf{} + x;
    return v;
}

// Per 16-byte lane, as vpunpcklbw / vzip1q_u8 do it.
inline vnb zip_lo(vnb a, vnb b) {
#if defined(__AVX2__)
    return EDGEAD_SHUFFLE(vnb, a, b, 0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39, 16, 48, 17, 49,
                          18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55);
#else
    return EDGEAD_SHUFFLE(vnb, a, b, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
#endif
}
inline vnb zip_hi(vnb a, vnb b) {
#if defined(__AVX2__)
    return EDGEAD_SHUFFLE(vnb, a, b, 8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47, 24, 56, 25,
                          57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63);
#else
    return EDGEAD_SHUFFLE(vnb, a, b, 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
#endif
}
inline v64u8 zip_lo(const v64u8& a, const v64u8& b) {
    v64u8 r;
    for (int i = 0; i < kByteParts; ++i) r.p[i] = zip_lo(a.p[i], b.p[i]);
    return r;
}
inline v64u8 zip_hi(const v64u8& a, const v64u8& b) {
    v64u8 r;
    for (int i = 0; i < kByteParts; ++i) r.p[i] = zip_hi(a.p[i], b.p[i]);
    return r;
}

// Interleave the low (high) halves of two native float vectors.
inline vnf zip_lo(vnf a, vnf b) {
#if defined(__AVX2__)
    return EDGEAD_SHUFFLE(vni, a, b, 0, 8, 1, 9, 2, 10, 3, 11);
#else
    return EDGEAD_SHUFFLE(vni, a, b, 0, 4, 1, 5);
#endif
}
inline vnf zip_hi(vnf a, vnf b) {
#if defined(__AVX2__)
    return EDGEAD_SHUFFLE(vni, a, b, 4, 12, 5, 13, 6, 14, 7, 15);
#else
    return EDGEAD_SHUFFLE(vni, a, b, 2, 6, 3, 7);
#endif
}
// Lanes 0..7 (8..15) of a and b interleaved: a0 b0 a1 b1 ... a7 b7.
inline v16f interleave_half(const v16f& a, const v16f& b, int half) {
    v16f r;
    for (int m = 0; m < kFloatParts / 2; ++m) {
        const int q = half * kFloatParts / 2 + m;
        r.p[2 * m] = zip_lo(a.p[q], b.p[q]);
        r.p[2 * m + 1] = zip_hi(a.p[q], b.p[q]);
    }
    return r;
}
inline v16f interleave_lo(const v16f& a, const v16f& b) { return interleave_half(a, b, 0); }
inline v16f interleave_hi(const v16f& a, const v16f& b) { return interleave_half(a, b, 1); }

inline v16f to_float(v16u8 v) {
#if defined(__AVX2__)
    const __m128i b = load<__m128i>(&v);
    const __m256 f[2] = {_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)),
                         _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(b, 8)))};
    return load<v16f>(f);
#elif defined(__SSE2__)
    const __m128i b = load<__m128i>(&v), zero = _mm_setzero_si128();
    const __m128i lo = _mm_unpacklo_epi8(b, zero), hi = _mm_unpackhi_epi8(b, zero);
    const __m128 f[4] = {_mm_cvtepi32_ps(_mm_unpacklo_epi16(lo, zero)), _mm_cvtepi32_ps(_mm_unpackhi_epi16(lo, zero)),
                         _mm_cvtepi32_ps(_mm_unpacklo_epi16(hi, zero)), _mm_cvtepi32_ps(_mm_unpackhi_epi16(hi, zero))};
    v16f r;
    for (int i = 0; i < 4; ++i) r.p[i] = load<vnf>(&f[i]);
    return r;
#elif defined(__ARM_NEON)
    const uint8x16_t b = load<uint8x16_t>(&v);
    const uint16x8_t lo = vmovl_u8(vget_low_u8(b)), hi = vmovl_u8(vget_high_u8(b));
    const float32x4_t f[4] = {vcvtq_f32_u32(vmovl_u16(vget_low_u16(lo))), vcvtq_f32_u32(vmovl_u16(vget_high_u16(lo))),
                              vcvtq_f32_u32(vmovl_u16(vget_low_u16(hi))), vcvtq_f32_u32(vmovl_u16(vget_high_u16(hi)))};
    v16f r;
    for (int i = 0; i < 4; ++i) r.p[i] = load<vnf>(&f[i]);
    return r;
#else
    v16f r;
    for (int i = 0; i < 16; ++i) r.p[i / kFloatLanes][i % kFloatLanes] = static_cast<float>(v[i]);
    return r;
#endif
}

// a * b + c with one rounding per lane.
inline v16f fma16(const v16f& a, const v16f& b, const v16f& c) {
    v16f r;
#if defined(__AVX2__) && defined(__FMA__)
    for (int i = 0; i < kFloatParts; ++i) {
        const __m256 f = _mm256_fmadd_ps(load<__m256>(&a.p[i]), load<__m256>(&b.p[i]), load<__m256>(&c.p[i]));
        r.p[i] = load<vnf>(&f);
    }
#elif defined(__ARM_NEON) && defined(__ARM_FEATURE_FMA)
    for (int i = 0; i < kFloatParts; ++i) {
        const float32x4_t f = vfmaq_f32(load<float32x4_t>(&c.p[i]), load<float32x4_t>(&a.p[i]), load<float32x4_t>(&b.p[i]));
        r.p[i] = load<vnf>(&f);
    }
#else
    for (int i = 0; i < kFloatParts; ++i)
        for (int j = 0; j < kFloatLanes; ++j) r.p[i][j] = __builtin_fmaf(a.p[i][j], b.p[i][j], c.p[i][j]);
#endif
    return r;
}

#endif

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
            t[2 * i] = interleave_lo(r[i], r[i + 8]);
            t[2 * i + 1] = interleave_hi(r[i], r[i + 8]);
        }
        for (int i = 0; i < 16; ++i) r[i] = t[i];
    }
}

}  // namespace edgead
