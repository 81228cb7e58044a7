// Little helpers of the emulation drivers: binary files of little-endian
// values in, binary files out (the test harness writes and reads them).
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

template <typename T>
std::vector<T> emu_read(std::FILE* f, int64_t n) {
  std::vector<T> v(static_cast<size_t>(n > 0 ? n : 0));
  if (n > 0 && std::fread(v.data(), sizeof(T), v.size(), f) != v.size()) {
    std::fprintf(stderr, "short input\n");
    std::exit(2);
  }
  return v;
}

template <typename T>
void emu_write(std::FILE* f, const std::vector<T>& v) {
  if (!v.empty()) std::fwrite(v.data(), sizeof(T), v.size(), f);
}

template <typename T>
void emu_write_one(std::FILE* f, T v) {
  std::fwrite(&v, sizeof(T), 1, f);
}
