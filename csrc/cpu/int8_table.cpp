// The int8 mode's table (Table7, binding.h): a table of up to 16 entries rounded to 7-bit
// integers times one scale, and a per-thread cache of it by the table's bytes.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <unordered_map>

#include "binding.h"

namespace flute_cpu::binding {
namespace {

Table7 quantize_table7(const float* t, int n) {
  Table7 r{};
  float tmax = 0.f;
  for (int c = 0; c < n; ++c) tmax = std::max(tmax, std::fabs(t[c]));
  r.scale = 0.f;
  double best = 0.;
  for (int i = 0; i <= (63 - 8) * 16 && tmax > 0.f; ++i) {
    const float sc = static_cast<float>(tmax / (63.0 - i / 16.0));
    double err = 0.;
    for (int c = 0; c < n; ++c) {
      const float v = std::max(-63.f, std::min(63.f, std::nearbyint(t[c] / sc)));
      const double e = static_cast<double>(t[c]) - static_cast<double>(v) * sc;
      err += e * e;
    }
    if (i == 0 || err < best * (1 - 1e-9)) {  // strictly better by a margin: ties keep the larger d
      best = err;
      r.scale = sc;
    }
  }
  for (int c = 0; c < 16; ++c) {
    const float v = c < n && r.scale > 0.f ? std::nearbyint(t[c] / r.scale) : 0.f;
    r.tu[c] = static_cast<uint8_t>(64 + static_cast<int>(std::max(-63.f, std::min(63.f, v))));
  }
  return r;
}

// quantize_table7 costs ~10 us (881 candidate scales); a model reuses its tables every call, so the
// results are cached per thread by the table's bytes (a fixed-size key: no allocation per lookup).
struct TableKey {
  uint32_t words[16];
  int n;
  bool operator==(const TableKey& o) const {
    return n == o.n && std::memcmp(words, o.words, sizeof(words)) == 0;
  }
};

struct TableKeyHash {
  size_t operator()(const TableKey& k) const {
    uint64_t h = 1469598103934665603ull ^ static_cast<uint64_t>(k.n);
    for (int i = 0; i < k.n; ++i) h = (h ^ k.words[i]) * 1099511628211ull;
    return static_cast<size_t>(h);
  }
};

}  // namespace

const Table7& table7(const float* t, int n) {
  thread_local std::unordered_map<TableKey, Table7, TableKeyHash> cache;
  TableKey key{};
  key.n = n;
  std::memcpy(key.words, t, n * sizeof(float));
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  if (cache.size() > 4096) cache.clear();
  return cache.emplace(key, quantize_table7(t, n)).first->second;
}

}  // namespace flute_cpu::binding
