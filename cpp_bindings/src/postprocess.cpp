#include "postprocess.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>

#include "simd.hpp"

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace edgead {
namespace {

// BORDER_REFLECT: fedcba|abcdefgh|hgfedcb, reflected again for kernels wider than the map.
int reflect(int p, int len) {
    if (len == 1) return 0;
    while (p < 0 || p >= len) p = p < 0 ? -p - 1 : 2 * len - p - 1;
    return p;
}

inline float at(const MapView& m, int y, int x) { return m.data[y * m.stride_y + x * m.stride_x]; }

// Bilinear source positions along one axis, as OpenCV's IPP path computes them.
struct LerpAxis {
    std::vector<int> i0, i1;
    std::vector<float> t;
};

LerpAxis lerp_axis(int ssize, int dsize) {
    LerpAxis a;
    const double scale = static_cast<double>(ssize) / dsize;
    for (int d = 0; d < dsize; ++d) {
        const double f = (d + 0.5) * scale - 0.5;
        int s = static_cast<int>(std::floor(f));
        double t = f - s;
        if (s < 0) s = 0, t = 0.0;
        if (s >= ssize - 1) s = ssize - 1, t = 0.0;
        a.i0.push_back(s);
        a.i1.push_back(std::min(s + 1, ssize - 1));
        a.t.push_back(static_cast<float>(t));
    }
    return a;
}

// Frame-resolution rows of the resized map, one at a time, top to bottom.
class MapRows {
public:
    MapRows(const MapView& map, int out_h, int out_w)
        : map_(map), out_w_(out_w), xa_(lerp_axis(map.width, out_w)), ya_(lerp_axis(map.height, out_h)),
          src_(map.width), cache_{std::vector<float>(out_w), std::vector<float>(out_w)} {}

    void row(int dy, float* out) {
        const float* h0 = horizontal(ya_.i0[dy]);
        const float* h1 = horizontal(ya_.i1[dy]);
        const float t = ya_.t[dy];
        for (int x = 0; x < out_w_; ++x) out[x] = std::fma(t, h1[x] - h0[x], h0[x]);
    }

private:
    const float* horizontal(int y) {  // two source rows cached: y only grows
        for (int i = 0; i < 2; ++i)
            if (cached_[i] == y) return cache_[i].data();
        const int slot = cached_[0] < cached_[1] ? 0 : 1;
        for (int x = 0; x < map_.width; ++x) src_[x] = at(map_, y, x);
        float* h = cache_[slot].data();
        const int* i0 = xa_.i0.data();
        const int* i1 = xa_.i1.data();
        const float* t = xa_.t.data();
        const float* s = src_.data();
        int x = 0;
#if defined(__AVX512F__)
        for (; x + 16 <= out_w_; x += 16) {  // the same arithmetic, 16 lanes at a time
            const __m512i j0 = _mm512_loadu_si512(i0 + x), j1 = _mm512_loadu_si512(i1 + x);
            __m512 a, b;
            const int first = i0[x];
            if (i1[x + 15] - first < 16 && first + 16 <= map_.width) {
                // Upsampling: the 16 lanes read a window of at most 16 source values, so one load
                // and an in-register permute replace two gathers.
                const __m512 window = _mm512_loadu_ps(s + first);
                const __m512i base = _mm512_set1_epi32(first);
                a = _mm512_permutexvar_ps(_mm512_sub_epi32(j0, base), window);
                b = _mm512_permutexvar_ps(_mm512_sub_epi32(j1, base), window);
            } else {
                a = _mm512_i32gather_ps(j0, s, 4);
                b = _mm512_i32gather_ps(j1, s, 4);
            }
            _mm512_storeu_ps(h + x, _mm512_fmadd_ps(_mm512_loadu_ps(t + x), _mm512_sub_ps(b, a), a));
        }
#elif defined(__AVX2__) && defined(__FMA__)
        for (; x + 8 <= out_w_; x += 8) {
            const __m256i j0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(i0 + x));
            const __m256i j1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(i1 + x));
            const __m256 a = _mm256_i32gather_ps(s, j0, 4), b = _mm256_i32gather_ps(s, j1, 4);
            _mm256_storeu_ps(h + x, _mm256_fmadd_ps(_mm256_loadu_ps(t + x), _mm256_sub_ps(b, a), a));
        }
#endif
        for (; x < out_w_; ++x) h[x] = std::fma(t[x], s[i1[x]] - s[i0[x]], s[i0[x]]);
        cached_[slot] = y;
        return h;
    }

    const MapView& map_;
    const int out_w_;
    const LerpAxis xa_, ya_;
    std::vector<float> src_;
    std::vector<float> cache_[2];
    int cached_[2] = {-1, -1};
};

// Union-find over runs of above-threshold pixels; each run starts as its own component.
class Components {
public:
    int add(int y, int x0, int x1, float peak, double sum, int64_t order) {
        parent_.push_back(static_cast<int>(parent_.size()));
        stats_.push_back({x0, y, x1, y, static_cast<int64_t>(x1 - x0 + 1), peak, sum, order});
        return parent_.back();
    }

    void unite(int a, int b) {
        a = find(a), b = find(b);
        if (a != b) parent_[std::max(a, b)] = std::min(a, b);
    }

    std::vector<RegionStats> regions(int64_t min_area) {
        for (size_t i = 0; i < parent_.size(); ++i) {
            const int root = find(static_cast<int>(i));
            if (root == static_cast<int>(i)) continue;
            Acc& r = stats_[root];
            const Acc& s = stats_[i];
            r.x0 = std::min(r.x0, s.x0), r.x1 = std::max(r.x1, s.x1);
            r.y0 = std::min(r.y0, s.y0), r.y1 = std::max(r.y1, s.y1);
            r.area += s.area, r.peak = std::max(r.peak, s.peak), r.sum += s.sum;
            r.order = std::min(r.order, s.order);
        }
        std::vector<RegionStats> out;
        for (size_t i = 0; i < parent_.size(); ++i) {
            const Acc& s = stats_[i];
            if (parent_[i] != static_cast<int>(i) || s.area < min_area) continue;
            out.push_back({s.x0, s.y0, s.x1 - s.x0 + 1, s.y1 - s.y0 + 1, s.area, s.peak,
                           s.sum / static_cast<double>(s.area), s.order});
        }
        std::sort(out.begin(), out.end(), [](const RegionStats& a, const RegionStats& b) {
            return a.area != b.area ? a.area > b.area : a.order < b.order;
        });
        return out;
    }

private:
    struct Acc {
        int x0, y0, x1, y1;
        int64_t area;
        float peak;
        double sum;
        int64_t order;
    };

    int find(int a) {
        while (parent_[a] != a) a = parent_[a] = parent_[parent_[a]];
        return a;
    }

    std::vector<int> parent_;
    std::vector<Acc> stats_;
};

struct Run {
    int x0, x1, label;
};

// Taps accumulated in registers over a tile of kTile outputs (4 vectors, enough independent FMA
// chains to hide their latency): each output still sees its taps in the same order with the same
// roundings, but the partial sums no longer make a load and a store per tap.
constexpr int kVectors = 4;
constexpr int kTile = 16 * kVectors;

// acc[i] = sum over taps j of p[i + j] * k[j], fused, left to right (OpenCV's row pass).
inline void row_taps_fused(const float* p, const float* k, int n, float* acc) {
    v16f t[kVectors] = {};
    for (int j = 0; j < n; ++j) {
        const v16f kj = splat(k[j]);
        for (int v = 0; v < kVectors; ++v) t[v] = fma16(load<v16f>(p + j + 16 * v), kj, t[v]);
    }
    std::memcpy(acc, t, sizeof t);
}

// o = centre * k[r], then + (above_j + below_j) * k[r + j] fused for j = 1..r (the column pass).
inline void column_taps_fused(const float* const* above, const float* const* below, const float* centre,
                              const float* k, int r, int x, float* o) {
    v16f t[kVectors];
    const v16f kr = splat(k[r]);
    for (int v = 0; v < kVectors; ++v) t[v] = load<v16f>(centre + x + 16 * v) * kr;
    for (int j = 1; j <= r; ++j) {
        const v16f kj = splat(k[r + j]);
        for (int v = 0; v < kVectors; ++v)
            t[v] = fma16(load<v16f>(above[j] + x + 16 * v) + load<v16f>(below[j] + x + 16 * v), kj, t[v]);
    }
    std::memcpy(o + x, t, sizeof t);
}

}  // namespace

void gaussian_blur(const MapView& map, const float* k, int n, float* out) {
    const int h = map.height, w = map.width, r = n / 2;
    if (n == 1) {  // OpenCV copies for a 1x1 kernel
        for (int y = 0; y < h; ++y)
            for (int x = 0; x < w; ++x) out[y * w + x] = at(map, y, x);
        return;
    }
    // OpenCV 5's AVX2 kernels use fused multiply-adds on whole vectors (4 lanes in the row pass,
    // 8 in the column pass) and separate multiply and add on the leftover columns.
    const int row_fused = w / 4 * 4, col_fused = w / 8 * 8;
    // Reused per thread: a fresh buffer of this size is a fresh mmap, page faults included, per frame.
    thread_local std::vector<float> rows, padded;
    rows.resize(static_cast<size_t>(h) * w);
    padded.resize(w + 2 * r);
    for (int y = 0; y < h; ++y) {
        for (int i = 0; i < w + 2 * r; ++i) {  // the reflected borders; the row itself is copied
            if (i == r) i = r + w;
            if (i < w + 2 * r) padded[i] = at(map, y, reflect(i - r, w));
        }
        if (map.stride_x == 1) std::memcpy(&padded[r], map.data + y * map.stride_y, w * sizeof(float));
        else for (int x = 0; x < w; ++x) padded[r + x] = at(map, y, x);
        float* acc = &rows[static_cast<size_t>(y) * w];
        int x = 0;
        for (; x + kTile <= row_fused; x += kTile) row_taps_fused(padded.data() + x, k, n, acc + x);
        for (; x < w; ++x) {
            float v = 0.0f;
            for (int j = 0; j < n; ++j) v = x < row_fused ? std::fma(padded[x + j], k[j], v) : v + padded[x + j] * k[j];
            acc[x] = v;
        }
    }
    std::vector<const float*> above(r + 1), below(r + 1);
    for (int y = 0; y < h; ++y) {  // symmetric: centre tap, then pairs (y + j, y - j)
        float* o = out + static_cast<size_t>(y) * w;
        const float* centre = &rows[static_cast<size_t>(y) * w];
        for (int j = 1; j <= r; ++j) {
            above[j] = &rows[static_cast<size_t>(reflect(y + j, h)) * w];
            below[j] = &rows[static_cast<size_t>(reflect(y - j, h)) * w];
        }
        int x = 0;
        for (; x + kTile <= col_fused; x += kTile) column_taps_fused(above.data(), below.data(), centre, k, r, x, o);
        for (; x < w; ++x) {
            float v = centre[x] * k[r];
            for (int j = 1; j <= r; ++j) {
                const float pair = above[j][x] + below[j][x];
                v = x < col_fused ? std::fma(pair, k[r + j], v) : v + pair * k[r + j];
            }
            o[x] = v;
        }
    }
}

void resize_map(const MapView& map, int out_h, int out_w, float* out) {
    MapRows rows(map, out_h, out_w);
    for (int y = 0; y < out_h; ++y) rows.row(y, out + static_cast<size_t>(y) * out_w);
}

std::vector<RegionStats> regions_of_resized(const MapView& map, int out_h, int out_w, float threshold,
                                            int64_t min_area) {
    MapRows rows(map, out_h, out_w);
    std::vector<float> v(out_w);
    std::vector<Run> prev, cur;
    Components comps;
    for (int y = 0; y < out_h; ++y) {
        rows.row(y, v.data());
        cur.clear();
        int above = 0;  // an integer count vectorises; a float max would not (strict FP order)
        for (int x = 0; x < out_w; ++x) above += v[x] > threshold;
        if (above) {
            for (int x = 0; x < out_w; ++x) {
                if (!(v[x] > threshold)) continue;
                const int x0 = x;
                float peak = v[x];
                double sum = 0.0;
                for (; x < out_w && v[x] > threshold; ++x) peak = std::max(peak, v[x]), sum += v[x];
                const int64_t order = static_cast<int64_t>(y >> 1) * out_w + (x0 >> 1);
                cur.push_back({x0, x - 1, comps.add(y, x0, x - 1, peak, sum, order)});
            }
        }
        // 8-connectivity: runs of adjacent rows touch when their spans, widened by one, overlap.
        for (size_t i = 0, j = 0; i < prev.size() && j < cur.size();) {
            const Run& p = prev[i];
            const Run& c = cur[j];
            if (p.x0 <= c.x1 + 1 && c.x0 <= p.x1 + 1) comps.unite(p.label, c.label);
            if (p.x1 < c.x1) ++i; else ++j;
        }
        std::swap(prev, cur);
    }
    return comps.regions(min_area);
}

}  // namespace edgead
