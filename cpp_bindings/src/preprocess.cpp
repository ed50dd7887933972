#include "preprocess.hpp"

#include <cmath>
#include <cstring>
#include <vector>

#include "resize_u8.hpp"

namespace edgead {
namespace {

// Rows of a strided frame; contiguous rows are handed out in place, others gathered.
class FrameRows final : public RowSource {
public:
    explicit FrameRows(const FrameView& f) : RowSource(f.width, f.height, f.channels), f_(f) {}

    const uint8_t* row(int y, uint8_t* scratch) const override {
        const uint8_t* base = f_.data + y * f_.stride_y;
        if (f_.stride_x == channels && (channels == 1 || f_.stride_c == 1)) return base;
        for (int x = 0; x < width; ++x)
            for (int c = 0; c < channels; ++c) scratch[x * channels + c] = base[x * f_.stride_x + c * f_.stride_c];
        return scratch;
    }

private:
    FrameView f_;
};

// BGR rows converted to grey as OpenCV 5's cvtColor(COLOR_BGR2GRAY) does for 8-bit: 15-bit fixed
// point weights (0.114, 0.587, 0.299 scaled to sum 32768), rounded half up.
class GreyRows final : public RowSource {
public:
    explicit GreyRows(const FrameRows& bgr) : RowSource(bgr.width, bgr.height, 1), bgr_(bgr), colour_(bgr.width * 3) {}

    const uint8_t* row(int y, uint8_t* scratch) const override {
        const uint8_t* s = bgr_.row(y, colour_.data());
        for (int x = 0; x < width; ++x) {
            const int b = s[3 * x], g = s[3 * x + 1], r = s[3 * x + 2];
            scratch[x] = static_cast<uint8_t>((b * 3735 + g * 19235 + r * 9798 + (1 << 14)) >> 15);
        }
        return scratch;
    }

private:
    const FrameRows& bgr_;
    mutable std::vector<uint8_t> colour_;
};

// v / 255 in float32, rounded as numpy's division rounds it. With hardware FMA: the product with
// the reciprocal, corrected by one Newton step on its residual, which is the correctly rounded
// quotient for every byte value (checked for all 256 by tests/test_native.py); vectorises, unlike
// a division or a table lookup.
inline float unit(float v) {
#if defined(__FMA__) || defined(__ARM_FEATURE_FMA)
    constexpr float r = 1.0f / 255.0f;
    const float q = v * r;
    return std::fma(std::fma(-q, 255.0f, v), r, q);
#else
    return v / 255.0f;
#endif
}

// Destination rows -> planes of out.
struct PlaneWriter {
    float* out;
    int size, out_channels, in_channels;

    void operator()(int dy, const uint8_t* row) const {
        const size_t plane = static_cast<size_t>(size) * size;
        float* dst = out + static_cast<size_t>(dy) * size;
        if (in_channels == 1) {
            for (int x = 0; x < size; ++x) dst[x] = unit(static_cast<float>(row[x]));
            for (int c = 1; c < out_channels; ++c) std::memcpy(dst + c * plane, dst, size * sizeof(float));
            return;
        }
        float* r = dst;  // BGR in, RGB out: plane c takes source channel 2 - c
        float* g = dst + plane;
        float* b = dst + 2 * plane;
        for (int x = 0; x < size; ++x) {
            b[x] = unit(static_cast<float>(row[3 * x]));
            g[x] = unit(static_cast<float>(row[3 * x + 1]));
            r[x] = unit(static_cast<float>(row[3 * x + 2]));
        }
    }
};

}  // namespace

void preprocess_into(const FrameView& frame, int size, int out_channels, float* out) {
    const FrameRows rows(frame);
    if (out_channels == 1 && frame.channels == 3) {  // reduce to grey first: one plane to resample
        const GreyRows grey(rows);
        resize_u8(grey, size, size, PlaneWriter{out, size, 1, 1});
        return;
    }
    resize_u8(rows, size, size, PlaneWriter{out, size, out_channels, frame.channels});
}

void resize_frame(const FrameView& frame, int dst_w, int dst_h, uint8_t* out) {
    const FrameRows rows(frame);
    const size_t row_bytes = static_cast<size_t>(dst_w) * frame.channels;
    resize_u8(rows, dst_w, dst_h, [&](int dy, const uint8_t* row) { std::memcpy(out + dy * row_bytes, row, row_bytes); });
}

}  // namespace edgead
