#include "resize_u8.hpp"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <vector>

#include "simd.hpp"

namespace edgead {
namespace {

constexpr int kCoefBits = 11;  // OpenCV's INTER_RESIZE_COEF_BITS
constexpr int kCoefScale = 1 << kCoefBits;
constexpr int kBlockRows = 16;  // rows resampled together, one per vector lane

inline uint8_t saturate_u8(int v) { return static_cast<uint8_t>(std::min(255, std::max(0, v))); }
// cvRound: round half to even in the default rounding mode.
inline int round_even(float v) { return static_cast<int>(std::nearbyint(v)); }
inline int round_even(double v) { return static_cast<int>(std::nearbyint(v)); }

struct AxisScale {
    double inv;    // dst / src
    double scale;  // 1 / inv, as OpenCV computes it (not src / dst: they can differ in the last bit)
    int iscale;
    bool integral;
};

AxisScale axis_scale(int src, int dst) {
    AxisScale a;
    a.inv = static_cast<double>(dst) / src;
    a.scale = 1.0 / a.inv;
    a.iscale = round_even(a.scale);
    a.integral = std::abs(a.scale - a.iscale) < DBL_EPSILON;
    return a;
}

// ---- area (generic) -------------------------------------------------------------------------

// The source cells each destination cell covers: terms in increasing (dst, src) order.
struct AreaTable {
    std::vector<int> begin;  // terms of dst d: [begin[d], begin[d+1])
    std::vector<int> src;
    std::vector<float> weight;
};

AreaTable area_table(int ssize, int dsize, double scale) {
    AreaTable t;
    t.begin.assign(dsize + 1, 0);
    auto add = [&](int s, double w) {
        t.src.push_back(s);
        t.weight.push_back(static_cast<float>(w));
    };
    for (int d = 0; d < dsize; ++d) {
        const double f1 = d * scale, f2 = f1 + scale;
        const double cell = std::min(scale, ssize - f1);
        int s2 = std::min(static_cast<int>(std::floor(f2)), ssize - 1);
        int s1 = std::min(static_cast<int>(std::ceil(f1)), s2);
        if (s1 - f1 > 1e-3) add(s1 - 1, (s1 - f1) / cell);
        for (int s = s1; s < s2; ++s) add(s, 1.0 / cell);
        if (f2 - s2 > 1e-3) add(s2, std::min(std::min(f2 - s2, 1.0), cell) / cell);
        t.begin[d + 1] = static_cast<int>(t.src.size());
    }
    return t;
}

// The same terms, padded to one length per destination cell with zero weights on the cell's first
// source column: adding 0 * x leaves a float sum unchanged, and a fixed trip count lets the
// cells run in lockstep without branch misses.
struct PaddedTerms {
    int terms = 0;           // per cell
    std::vector<int> src;    // [cell][term]
    std::vector<float> weight;
};

PaddedTerms padded(const AreaTable& t, int dsize) {
    PaddedTerms p;
    for (int d = 0; d < dsize; ++d) p.terms = std::max(p.terms, t.begin[d + 1] - t.begin[d]);
    p.src.resize(static_cast<size_t>(dsize) * p.terms);
    p.weight.resize(p.src.size());
    for (int d = 0; d < dsize; ++d) {
        for (int k = 0; k < p.terms; ++k) {
            const int i = t.begin[d] + k;
            const bool real = i < t.begin[d + 1];
            p.src[d * p.terms + k] = real ? t.src[i] : t.src[t.begin[d]];
            p.weight[d * p.terms + k] = real ? t.weight[i] : 0.0f;
        }
    }
    return p;
}

// Source rows resampled horizontally 16 at a time: the rows are transposed into columns of 16
// lanes, so each destination cell's weighted sum runs down the vector lanes in exactly OpenCV's
// order (increasing source column, one rounding per multiply and per add). Cells are summed as
// soon as their columns are transposed, while those are still in L1.
class AreaRows {
public:
    AreaRows(const RowSource& src, const AreaTable& xt, int dst_w)
        : src_(src), xt_(padded(xt, dst_w)), dst_w_(dst_w), cn_(src.channels), row_len_(src.width * cn_),
          width_(dst_w * cn_), columns_(row_len_), scratch_(static_cast<size_t>(kBlockRows) * row_len_),
          out_(static_cast<size_t>(kBlockRows) * width_), zeros_(row_len_, 0), ready_(dst_w) {
        for (int d = 0; d < dst_w; ++d) {  // columns cell d needs: up to its last source pixel
            const int last = *std::max_element(&xt_.src[static_cast<size_t>(d) * xt_.terms],
                                               &xt_.src[static_cast<size_t>(d + 1) * xt_.terms]);
            ready_[d] = (last + 1) * cn_;
        }
    }

    // Horizontal sums of source row y (dst_w * channels floats).
    const float* row(int y) {
        if (y < y0_ || y >= y0_ + rows_) load_block(y);
        return &out_[static_cast<size_t>(y - y0_) * width_];
    }

private:
    void load_block(int y0) {
        y0_ = y0;
        rows_ = std::min(kBlockRows, src_.height - y0);
        const uint8_t* rows[kBlockRows];
        for (int r = 0; r < kBlockRows; ++r)
            rows[r] = r < rows_ ? src_.row(y0 + r, &scratch_[static_cast<size_t>(r) * row_len_]) : zeros_.data();
        if (cn_ == 3) sum_cells<3>(rows); else sum_cells<1>(rows);
    }

    // The tile and its fill count are locals, so they stay in registers: as members, every cell's
    // count update went through memory (11% of a 640x480 -> 128 frame on the AVX-512 EPYC).
    template <int CN>
    void sum_cells(const uint8_t* const rows[kBlockRows]) {
        v16f tile[16];
        int filled = 0, d = 0;
        for (int j = 0; j < row_len_; j += 64) {
            const int n = std::min(64, row_len_ - j);
            transpose_chunk(rows, j, n);
            for (; d < dst_w_ && ready_[d] <= j + n; ++d) cell<CN>(d, tile, filled);
        }
        if (filled) {
            for (int i = filled; i < 16; ++i) tile[i] = v16f{};
            flush(tile, width_ - filled, filled);
        }
    }

    void transpose_chunk(const uint8_t* const rows[kBlockRows], int j, int n) {
        v64u8 t[16];
        for (int r = 0; r < 16; ++r) {
            if (n == 64) {
                t[r] = load<v64u8>(rows[r] + j);
            } else {  // the row's last bytes: never read past its end
                uint8_t tail[64] = {};
                std::memcpy(tail, rows[r] + j, n);
                t[r] = load<v64u8>(tail);
            }
        }
        transpose16x64(t);
        for (int lane = 0; lane < 4; ++lane)
            for (int i = 0; i < 16; ++i)
                if (16 * lane + i < n) columns_[j + 16 * lane + i] = load<v16u8>(reinterpret_cast<const uint8_t*>(&t[i]) + 16 * lane);
    }

    template <int CN>
    void cell(int d, v16f tile[16], int& filled) {
        const int terms = xt_.terms;
        const int* src = &xt_.src[static_cast<size_t>(d) * terms];
        const float* weight = &xt_.weight[static_cast<size_t>(d) * terms];
        v16f acc[CN] = {};
        for (int k = 0; k < terms; ++k) {
            const v16u8* col = &columns_[static_cast<size_t>(src[k]) * CN];
            const v16f w = splat(weight[k]);
            for (int c = 0; c < CN; ++c) acc[c] = acc[c] + to_float(col[c]) * w;
        }
        for (int c = 0; c < CN; ++c) {
            tile[filled++] = acc[c];
            if (filled == 16) {
                flush(tile, d * CN + c - 15, 16);
                filled = 0;
            }
        }
    }

    // 16 consecutive outputs of the 16 rows, transposed back into the rows.
    void flush(v16f tile[16], int x0, int filled) {
        transpose16(tile);
        for (int r = 0; r < rows_; ++r) {
            float* dst = &out_[static_cast<size_t>(r) * width_ + x0];
            if (filled == 16) std::memcpy(dst, &tile[r], sizeof(v16f));  // fixed size: inlined
            else std::memcpy(dst, &tile[r], filled * sizeof(float));
        }
    }

    const RowSource& src_;
    const PaddedTerms xt_;
    const int dst_w_, cn_, row_len_, width_;
    std::vector<v16u8> columns_;  // column j of the block: its 16 rows' bytes
    std::vector<uint8_t> scratch_;
    std::vector<float> out_;
    std::vector<uint8_t> zeros_;
    std::vector<int> ready_;
    int y0_ = 0, rows_ = 0;
};

void resize_area(const RowSource& src, int dst_w, int dst_h, const RowSink& sink) {
    const AreaTable xt = area_table(src.width, dst_w, axis_scale(src.width, dst_w).scale);
    const AreaTable yt = area_table(src.height, dst_h, axis_scale(src.height, dst_h).scale);
    const int width = dst_w * src.channels;
    AreaRows rows(src, xt, dst_w);
    std::vector<float> sum(width, 0.0f);
    std::vector<uint8_t> out(width);
    auto emit = [&](int dy) {
        for (int x = 0; x < width; ++x) out[x] = saturate_u8(round_even(sum[x]));
        sink(dy, out.data());
    };
    // Source rows in order; each adds beta * (its horizontal sums) to the destination row it falls in.
    for (int dy = 0; dy < dst_h; ++dy) {
        for (int k = yt.begin[dy]; k < yt.begin[dy + 1]; ++k) {
            const float* h = rows.row(yt.src[k]);
            const float beta = yt.weight[k];
            if (k == yt.begin[dy]) {
                for (int x = 0; x < width; ++x) sum[x] = beta * h[x];
            } else {
                for (int x = 0; x < width; ++x) sum[x] = sum[x] + beta * h[x];
            }
        }
        emit(dy);
    }
}

// ---- area, integer factors --------------------------------------------------------------------

void resize_area_fast(const RowSource& src, int dst_w, int dst_h, const RowSink& sink) {
    const int cn = src.channels;
    const int ix = axis_scale(src.width, dst_w).iscale, iy = axis_scale(src.height, dst_h).iscale;
    const int area = ix * iy;
    const bool half_up = ix == 2 && iy == 2;  // OpenCV's dedicated 2x2 kernel: (sum + 2) >> 2
    const float inv_area = 1.f / static_cast<float>(area);
    const int used = dst_w * ix * cn;
    std::vector<int> column(used);
    std::vector<uint8_t> scratch(static_cast<size_t>(src.width) * cn), out(static_cast<size_t>(dst_w) * cn);
    for (int dy = 0; dy < dst_h; ++dy) {
        std::fill(column.begin(), column.end(), 0);
        for (int r = 0; r < iy; ++r) {
            const uint8_t* s = src.row(dy * iy + r, scratch.data());
            for (int x = 0; x < used; ++x) column[x] += s[x];
        }
        for (int d = 0; d < dst_w; ++d) {
            for (int c = 0; c < cn; ++c) {
                int sum = 0;
                for (int q = 0; q < ix; ++q) sum += column[(d * ix + q) * cn + c];
                out[d * cn + c] = half_up ? saturate_u8((sum + 2) >> 2)
                                          : saturate_u8(round_even(static_cast<float>(sum) * inv_area));
            }
        }
        sink(dy, out.data());
    }
}

// ---- linear, 11-bit fixed point ----------------------------------------------------------------

struct LinearAxis {
    std::vector<int> src;         // first source index (x: clamped to the image; y: as computed)
    std::vector<int16_t> w0, w1;  // weights of src and src + 1, scaled by 2048
};

LinearAxis linear_axis(int ssize, int dsize, bool area_weights, bool clamp) {
    const AxisScale a = axis_scale(ssize, dsize);
    LinearAxis ax;
    for (int d = 0; d < dsize; ++d) {
        int s;
        float f;
        if (!area_weights) {
            f = static_cast<float>((d + 0.5) * a.scale - 0.5);
            s = static_cast<int>(std::floor(f));
            f -= static_cast<float>(s);
        } else {  // INTER_AREA on an axis that grows
            s = static_cast<int>(std::floor(d * a.scale));
            f = static_cast<float>((d + 1) - (s + 1) * a.inv);
            f = f <= 0 ? 0.f : f - std::floor(f);
        }
        if (clamp && s < 0) f = 0.f, s = 0;
        if (clamp && s >= ssize - 1) f = 0.f, s = ssize - 1;
        ax.src.push_back(s);
        ax.w0.push_back(static_cast<int16_t>(round_even((1.f - f) * kCoefScale)));
        ax.w1.push_back(static_cast<int16_t>(round_even(f * kCoefScale)));
    }
    return ax;
}

void resize_linear(const RowSource& src, int dst_w, int dst_h, bool area_weights, const RowSink& sink) {
    const int cn = src.channels, width = dst_w * cn;
    const LinearAxis xa = linear_axis(src.width, dst_w, area_weights, true);
    const LinearAxis ya = linear_axis(src.height, dst_h, area_weights, false);
    std::vector<uint8_t> scratch(static_cast<size_t>(src.width) * cn), out(width);
    std::vector<int32_t> cache[2] = {std::vector<int32_t>(width), std::vector<int32_t>(width)};
    int cached[2] = {-1, -1};
    auto horizontal = [&](int y) -> const int32_t* {  // two rows cached: y only grows
        for (int i = 0; i < 2; ++i)
            if (cached[i] == y) return cache[i].data();
        const int slot = cached[0] < cached[1] ? 0 : 1;
        const uint8_t* s = src.row(y, scratch.data());
        int32_t* h = cache[slot].data();
        for (int d = 0; d < dst_w; ++d) {
            const int x0 = xa.src[d], x1 = std::min(x0 + 1, src.width - 1);
            for (int c = 0; c < cn; ++c)
                h[d * cn + c] = s[x0 * cn + c] * xa.w0[d] + s[x1 * cn + c] * xa.w1[d];
        }
        cached[slot] = y;
        return h;
    };
    for (int dy = 0; dy < dst_h; ++dy) {
        const int sy = ya.src[dy];
        const int y0 = std::clamp(sy, 0, src.height - 1), y1 = std::clamp(sy + 1, 0, src.height - 1);
        const int32_t* h0 = horizontal(std::min(y0, y1));
        const int32_t* h1 = horizontal(std::max(y0, y1));
        if (y0 > y1) std::swap(h0, h1);
        const int b0 = ya.w0[dy], b1 = ya.w1[dy];
        // OpenCV's vector kernel: 16-bit operands (>> 4), high halves of the products, round by 2.
        for (int x = 0; x < width; ++x) {
            const int v = (((h0[x] >> 4) * b0) >> 16) + (((h1[x] >> 4) * b1) >> 16);
            out[x] = saturate_u8((v + 2) >> 2);
        }
        sink(dy, out.data());
    }
}

void copy_rows(const RowSource& src, const RowSink& sink) {
    std::vector<uint8_t> scratch(static_cast<size_t>(src.width) * src.channels);
    for (int y = 0; y < src.height; ++y) sink(y, src.row(y, scratch.data()));
}

}  // namespace

ResizeKind resize_kind(int src_w, int src_h, int dst_w, int dst_h) {
    if (src_w == dst_w && src_h == dst_h) return ResizeKind::copy;
    const AxisScale x = axis_scale(src_w, dst_w), y = axis_scale(src_h, dst_h);
    if (dst_w < src_w || dst_h < src_h) {  // edgead's rule: INTER_AREA when either side shrinks
        if (x.scale >= 1 && y.scale >= 1) return x.integral && y.integral ? ResizeKind::area_fast : ResizeKind::area;
        return ResizeKind::area_linear;
    }
    return ResizeKind::linear;  // INTER_LINEAR when it only grows
}

void resize_u8(const RowSource& src, int dst_w, int dst_h, const RowSink& sink) {
    switch (resize_kind(src.width, src.height, dst_w, dst_h)) {
        case ResizeKind::copy: return copy_rows(src, sink);
        case ResizeKind::area: return resize_area(src, dst_w, dst_h, sink);
        case ResizeKind::area_fast: return resize_area_fast(src, dst_w, dst_h, sink);
        case ResizeKind::linear: return resize_linear(src, dst_w, dst_h, false, sink);
        case ResizeKind::area_linear: return resize_linear(src, dst_w, dst_h, true, sink);
    }
}

}  // namespace edgead
