// Stage 2 in one pass: a camera frame -> resize -> colour -> [0, 1] -> CHW float32, written
// straight into the engine slot's input buffer. The twin of edgead.data.images.to_model_input for
// uint8 grey or BGR frames (any size, any strides), bit-exact with it (see resize_u8.hpp).
#pragma once

#include <cstdint>

namespace edgead {

// A uint8 frame: element (y, x, c) lives at data + y*stride_y + x*stride_x + c*stride_c (bytes;
// strides may be negative, as in a flipped numpy view). channels is 1 (grey) or 3 (BGR).
struct FrameView {
    const uint8_t* data;
    int height, width, channels;
    int64_t stride_y, stride_x, stride_c;
};

// Fills out[c][y][x] (contiguous, out_channels x size x size): out_channels 3 takes RGB (a grey
// frame is replicated), out_channels 1 takes grey (a BGR frame through OpenCV 5's BGR2GRAY).
void preprocess_into(const FrameView& frame, int size, int out_channels, float* out);

// The resize alone, for tests: the frame (grey or 3 channels, order kept) -> dst_w x dst_h.
void resize_frame(const FrameView& frame, int dst_w, int dst_h, uint8_t* out);

}  // namespace edgead
