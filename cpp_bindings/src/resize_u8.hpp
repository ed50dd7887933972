// 8-bit resampling that reproduces cv2.resize (OpenCV 5.0, as pip's opencv-python ships it) bit
// for bit under edgead's rule "area down / linear up" (edgead/data/images.py, RESIZE_RULE).
//
// OpenCV itself dispatches that rule to four different kernels, and so does this file:
//   area       both axes shrink (or one stays), non-integer factor: separable weighted averages
//              in float, rows first, rounded half-to-even at the end;
//   area_fast  both factors are integers: exact integer sums; 2x2 rounds half up, others
//              round sum * (1/area) in float;
//   linear     no axis shrinks: 11-bit fixed-point bilinear weights, vertical pass in 16-bit
//              products as OpenCV's vector code does it (shift by 4, high half, round by 2);
//   area_linear one axis shrinks and one grows: the linear machinery with INTER_AREA's weights.
// The arithmetic follows OpenCV's documented algorithm, re-derived and checked against cv2 by
// tests/test_native.py and, at start-up, by edgead/runtime/native.py; no OpenCV code is used.
#pragma once

#include <cstdint>
#include <functional>

namespace edgead {

// A frame seen as contiguous rows of interleaved uint8 channels (1 or 3).
class RowSource {
public:
    RowSource(int width, int height, int channels) : width(width), height(height), channels(channels) {}
    virtual ~RowSource() = default;
    // Row y as width * channels contiguous bytes; may build it in `scratch` (that many bytes).
    virtual const uint8_t* row(int y, uint8_t* scratch) const = 0;

    const int width, height, channels;
};

// Receives each destination row once, in increasing order: dst_width * channels bytes.
using RowSink = std::function<void(int dy, const uint8_t* row)>;

enum class ResizeKind { copy, area, area_fast, linear, area_linear };

// The kernel cv2.resize runs for edgead's rule at these sizes.
ResizeKind resize_kind(int src_w, int src_h, int dst_w, int dst_h);

void resize_u8(const RowSource& src, int dst_w, int dst_h, const RowSink& sink);

}  // namespace edgead
