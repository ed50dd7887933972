// A command-line twin of the module's entry points, without Python, so tests can build the core
// for other instruction sets than this machine's -march=native (AVX2, the x86-64 baseline) and
// hold each build to the same reference (tests/test_native_isa.py):
//   driver pre    IN H W C SIZE OUT_CHANNELS OUT   uint8 HxWxC frame -> float32 planes
//   driver blur   IN H W KERNEL_FILE N OUT         float32 HxW map -> smoothed map
//   driver resize IN H W OUT_H OUT_W OUT           float32 HxW map -> bilinear frame map
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "postprocess.hpp"
#include "preprocess.hpp"

namespace {

template <typename T>
std::vector<T> read_all(const char* path, size_t count) {
    std::vector<T> data(count);
    FILE* f = std::fopen(path, "rb");
    if (!f || std::fread(data.data(), sizeof(T), count, f) != count) throw std::runtime_error(std::string("cannot read ") + path);
    std::fclose(f);
    return data;
}

template <typename T>
void write_all(const char* path, const std::vector<T>& data) {
    FILE* f = std::fopen(path, "wb");
    if (!f || std::fwrite(data.data(), sizeof(T), data.size(), f) != data.size()) throw std::runtime_error(std::string("cannot write ") + path);
    std::fclose(f);
}

int run(int argc, char** argv) {
    const std::string mode = argc > 1 ? argv[1] : "";
    auto arg = [&](int i) { return std::atoi(argv[i]); };
    if (mode == "pre" && argc == 9) {
        const int h = arg(3), w = arg(4), c = arg(5), size = arg(6), out_c = arg(7);
        const auto frame = read_all<uint8_t>(argv[2], static_cast<size_t>(h) * w * c);
        std::vector<float> out(static_cast<size_t>(out_c) * size * size);
        edgead::preprocess_into({frame.data(), h, w, c, static_cast<int64_t>(w) * c, c, 1}, size, out_c, out.data());
        write_all(argv[8], out);
    } else if (mode == "blur" && argc == 8) {
        const int h = arg(3), w = arg(4), n = arg(6);
        const auto map = read_all<float>(argv[2], static_cast<size_t>(h) * w);
        const auto kernel = read_all<float>(argv[5], n);
        std::vector<float> out(map.size());
        edgead::gaussian_blur({map.data(), h, w, w, 1}, kernel.data(), n, out.data());
        write_all(argv[7], out);
    } else if (mode == "resize" && argc == 8) {
        const int h = arg(3), w = arg(4), out_h = arg(5), out_w = arg(6);
        const auto map = read_all<float>(argv[2], static_cast<size_t>(h) * w);
        std::vector<float> out(static_cast<size_t>(out_h) * out_w);
        edgead::resize_map({map.data(), h, w, w, 1}, out_h, out_w, out.data());
        write_all(argv[7], out);
    } else {
        std::fprintf(stderr, "usage: driver pre|blur|resize ... (see the file's header)\n");
        return 2;
    }
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    try {
        return run(argc, argv);
    } catch (const std::exception& e) {
        std::fprintf(stderr, "driver: %s\n", e.what());
        return 1;
    }
}
