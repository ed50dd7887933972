// Stage 4 on the map: Gaussian smoothing -> bilinear resize to the frame -> threshold -> 8-connected
// regions with their stats, the twin of edgead.core.postprocess (smooth, to_frame, regions).
//
// The resize and the threshold run in one pass over the frame's rows, and the regions are found
// on the fly from runs of above-threshold pixels (union-find over runs), so no frame-sized map or
// label image is ever written unless a caller asks for the map (frame_map).
#pragma once

#include <cstdint>
#include <vector>

namespace edgead {

struct MapView {  // float32 (h, w), element strides
    const float* data;
    int height, width;
    int64_t stride_y, stride_x;
};

// cv2.GaussianBlur(map, (0,0), sigma, borderType=BORDER_REFLECT) with the separable kernel taken
// from cv2.getGaussianKernel (odd length n). Writes h*w floats, contiguous.
void gaussian_blur(const MapView& map, const float* kernel, int n, float* out);

// cv2.resize(map, (W, H), INTER_LINEAR) for float32 as pip's OpenCV runs it (its IPP kernel:
// double-precision coordinates, lerp a + t*(b - a) with one rounding).
void resize_map(const MapView& map, int out_h, int out_w, float* out);

struct RegionStats {
    int x, y, w, h;
    int64_t area;
    float peak;
    double mean;
    int64_t order;  // OpenCV's label order: the component's first 2x2 block in raster order
};

// Regions of resize_map(map) > threshold (float32 comparison, as numpy does it), area >=
// min_area, largest first and, among equal areas, in connectedComponentsWithStats' label order.
std::vector<RegionStats> regions_of_resized(const MapView& map, int out_h, int out_w, float threshold,
                                            int64_t min_area);

}  // namespace edgead
