// Python bindings (nanobind): the module edgead_native. Every entry point releases the GIL while
// it computes, so the runtime's stages overlap with each other and with the engine.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "postprocess.hpp"
#include "preprocess.hpp"
#include "resize_u8.hpp"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

using Frame = nb::ndarray<const uint8_t, nb::device::cpu>;
using Map = nb::ndarray<const float, nb::ndim<2>, nb::device::cpu>;
using Planes = nb::ndarray<float, nb::ndim<3>, nb::c_contig, nb::device::cpu>;
using Kernel = nb::ndarray<const float, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using RegionTuple = std::tuple<int, int, int, int, int64_t, float, double>;

edgead::FrameView frame_view(const Frame& f) {
    const size_t nd = f.ndim();
    if (nd != 2 && nd != 3) throw std::invalid_argument("frame must be HxW or HxWxC");
    const int channels = nd == 2 ? 1 : static_cast<int>(f.shape(2));
    if (channels != 1 && channels != 3) throw std::invalid_argument("frame must have 1 or 3 channels");
    if (f.shape(0) < 1 || f.shape(1) < 1) throw std::invalid_argument("frame is empty");
    return {f.data(), static_cast<int>(f.shape(0)), static_cast<int>(f.shape(1)), channels,
            f.stride(0), f.stride(1), nd == 3 ? f.stride(2) : 1};
}

edgead::MapView map_view(const Map& m) {
    if (m.shape(0) < 2 || m.shape(1) < 2) throw std::invalid_argument("map must be at least 2x2");
    return {m.data(), static_cast<int>(m.shape(0)), static_cast<int>(m.shape(1)), m.stride(0), m.stride(1)};
}

template <typename T, size_t N>
nb::ndarray<nb::numpy, T> owned(T* data, const size_t (&shape)[N]) {
    nb::capsule owner(data, [](void* p) noexcept { delete[] static_cast<T*>(p); });
    return nb::ndarray<nb::numpy, T>(data, N, shape, owner);
}

void check_size(int height, int width) {
    if (height < 1 || width < 1) throw std::invalid_argument("output size must be positive");
}

void preprocess_into(const Frame& frame, Planes out) {
    const edgead::FrameView f = frame_view(frame);
    const int channels = static_cast<int>(out.shape(0)), size = static_cast<int>(out.shape(1));
    if ((channels != 1 && channels != 3) || out.shape(2) != out.shape(1))
        throw std::invalid_argument("out must be (C, S, S) with C 1 or 3");
    nb::gil_scoped_release unlocked;
    edgead::preprocess_into(f, size, channels, out.data());
}

nb::ndarray<nb::numpy, uint8_t> resize_u8(const Frame& frame, int width, int height) {
    check_size(height, width);
    const edgead::FrameView f = frame_view(frame);
    auto* buf = new uint8_t[static_cast<size_t>(width) * height * f.channels];
    {
        nb::gil_scoped_release unlocked;
        edgead::resize_frame(f, width, height, buf);
    }
    if (frame.ndim() == 2) return owned(buf, {size_t(height), size_t(width)});
    return owned(buf, {size_t(height), size_t(width), size_t(f.channels)});
}

std::string resize_kind(int src_w, int src_h, int dst_w, int dst_h) {
    switch (edgead::resize_kind(src_w, src_h, dst_w, dst_h)) {
        case edgead::ResizeKind::copy: return "copy";
        case edgead::ResizeKind::area: return "area";
        case edgead::ResizeKind::area_fast: return "area_fast";
        case edgead::ResizeKind::linear: return "linear";
        case edgead::ResizeKind::area_linear: return "area_linear";
    }
    return "?";
}

float* smoothed(const edgead::MapView& m, const Kernel& kernel) {
    const int n = static_cast<int>(kernel.shape(0));
    if (n % 2 != 1) throw std::invalid_argument("kernel length must be odd");
    auto* out = new float[static_cast<size_t>(m.height) * m.width];
    nb::gil_scoped_release unlocked;
    edgead::gaussian_blur(m, kernel.data(), n, out);
    return out;
}

nb::ndarray<nb::numpy, float> gaussian_blur(const Map& map, const Kernel& kernel) {
    const edgead::MapView m = map_view(map);
    return owned(smoothed(m, kernel), {size_t(m.height), size_t(m.width)});
}

nb::ndarray<nb::numpy, float> resize_map(const Map& map, int height, int width) {
    check_size(height, width);
    const edgead::MapView m = map_view(map);
    auto* out = new float[static_cast<size_t>(height) * width];
    {
        nb::gil_scoped_release unlocked;
        edgead::resize_map(m, height, width, out);
    }
    return owned(out, {size_t(height), size_t(width)});
}

std::vector<RegionTuple> as_tuples(const std::vector<edgead::RegionStats>& found) {
    std::vector<RegionTuple> out;
    for (const auto& r : found) out.emplace_back(r.x, r.y, r.w, r.h, r.area, r.peak, r.mean);
    return out;
}

std::vector<RegionTuple> regions(const Map& map, int height, int width, float threshold, int64_t min_area) {
    check_size(height, width);
    const edgead::MapView m = map_view(map);
    std::vector<edgead::RegionStats> found;
    {
        nb::gil_scoped_release unlocked;
        found = edgead::regions_of_resized(m, height, width, threshold, min_area);
    }
    return as_tuples(found);
}

// Smoothing (unless kernel is None), then regions of the map resized to the frame, in one call.
std::tuple<nb::ndarray<nb::numpy, float>, std::vector<RegionTuple>> postprocess(
    const Map& map, std::optional<Kernel> kernel, int height, int width, float threshold, int64_t min_area) {
    check_size(height, width);
    const edgead::MapView m = map_view(map);
    const size_t h = m.height, w = m.width;
    float* smooth = nullptr;
    if (kernel) {
        smooth = smoothed(m, *kernel);
    } else {
        smooth = new float[h * w];
        for (size_t y = 0; y < h; ++y)
            for (size_t x = 0; x < w; ++x) smooth[y * w + x] = m.data[y * m.stride_y + x * m.stride_x];
    }
    auto result = owned(smooth, {h, w});
    std::vector<edgead::RegionStats> found;
    {
        nb::gil_scoped_release unlocked;
        const edgead::MapView s{smooth, m.height, m.width, m.width, 1};
        found = edgead::regions_of_resized(s, height, width, threshold, min_area);
    }
    return {result, as_tuples(found)};
}

nb::dict build_info() {
    nb::dict d;
    d["version"] = EDGEAD_NATIVE_VERSION;
    d["compiler"] = __VERSION__;
    d["flags"] = EDGEAD_NATIVE_FLAGS;
#if defined(__AVX512F__)
    d["simd"] = "avx512";
#elif defined(__AVX2__)
    d["simd"] = "avx2";
#elif defined(__ARM_NEON)
    d["simd"] = "neon";
#else
    d["simd"] = "baseline";
#endif
    d["fma"] =
#if defined(__FMA__) || defined(__ARM_FEATURE_FMA)
        true;
#else
        false;  // std::fma then runs in software: correct, slower
#endif
    return d;
}

}  // namespace

NB_MODULE(edgead_native, m) {
    m.doc() = "edgead's native per-frame core: preprocessing into the engine's input buffer and map "
              "post-processing, twins of edgead.data.images / edgead.core.postprocess";
    m.def("preprocess_into", &preprocess_into, "frame"_a, "out"_a.noconvert(),
          "uint8 grey/BGR frame -> resize -> RGB or grey -> /255 -> out (C, S, S) float32, in place");
    m.def("resize_u8", &resize_u8, "frame"_a, "width"_a, "height"_a,
          "cv2.resize under edgead's rule (area down, linear up), for tests");
    m.def("resize_kind", &resize_kind, "src_w"_a, "src_h"_a, "dst_w"_a, "dst_h"_a);
    m.def("gaussian_blur", &gaussian_blur, "map"_a, "kernel"_a,
          "cv2.GaussianBlur with BORDER_REFLECT and the given separable kernel");
    m.def("resize_map", &resize_map, "map"_a, "height"_a, "width"_a, "cv2.resize(map, (W, H), INTER_LINEAR)");
    m.def("regions", &regions, "map"_a, "height"_a, "width"_a, "threshold"_a, "min_area"_a,
          "regions of the resized map above threshold: (x, y, w, h, area, peak, mean), largest first");
    m.def("postprocess", &postprocess, "map"_a, "kernel"_a.none(), "height"_a, "width"_a, "threshold"_a,
          "min_area"_a, "(smoothed map, regions): smoothing, resize, threshold and regions in one call");
    m.def("build_info", &build_info);
    m.attr("__version__") = EDGEAD_NATIVE_VERSION;
}
